//! Hugging Face ↔ GGUF: tensor names, the tensor transforms llama.cpp's converter applies, and
//! the few `config.json` facts those transforms need — for the llama family.
//!
//! Covered architectures (GGUF spelling): `llama` (HF `LlamaForCausalLM`, `MistralForCausalLM`),
//! `qwen2`, `qwen3`, `gemma2`, `gemma3` (`Gemma3ForCausalLM`, and the text part of
//! `Gemma3ForConditionalGeneration`, whose names carry a `language_model.` segment).
//!
//! What llama.cpp's `convert_hf_to_gguf.py` does, and this module mirrors:
//!
//! - **Names** (`gguf-py/gguf/tensor_mapping.py`): `model.embed_tokens` → `token_embd`,
//!   `model.norm` → `output_norm`, `lm_head` → `output`, and per block `model.layers.N.*` →
//!   `blk.N.*` ([`hf_to_gguf`], [`gguf_to_hf`]). `post_attention_layernorm` is `ffn_norm` for
//!   llama/qwen but `post_attention_norm` for Gemma 2/3, whose `pre_feedforward_layernorm` is
//!   `ffn_norm` and `post_feedforward_layernorm` is `post_ffw_norm`. Rotary `inv_freq` buffers,
//!   Gemma 2's `lm_head` and Gemma 3's vision tower are dropped ([`hf_is_skipped`]).
//! - **q/k row permutation** (`LlamaModel.permute`, llama/mistral only): the rows of `q_proj`
//!   (weight and bias) are reordered within each of `n_head` heads, those of `k_proj` within each
//!   of `n_head_kv` heads, from HF's rotate-half pairing to ggml's interleaved pairing
//!   ([`hf_row_of_gguf_row`], [`gguf_row_of_hf_row`], [`permute_rows`]).
//! - **Gemma norm offset** (`Gemma2Model`/`Gemma3Model.modify_tensors`): every tensor whose HF
//!   name ends in `norm.weight` (input/post-attention/pre- and post-feedforward layernorms,
//!   q/k norms, the final norm) is stored in GGUF as `HF + 1` ([`Transform::AddOne`]).
//!
//! Not done here: llama.cpp also trims Gemma 3's `embed_tokens` to the tokenizer's vocabulary
//! and generates `rope_freqs` for llama-3 rope scaling; those are data, not name mappings
//! (`rope_freqs` has no HF name and [`gguf_to_hf`] returns `None` for it).

use crate::format::gguf::parse_block_number;
use std::path::Path;

use serde_json::{json, Map, Value as Json};

use crate::format::error::{FormatError, Result};
use crate::format::gguf::{Array, Metadata, Value};

/// Architectures (GGUF spelling) this module maps.
pub const SUPPORTED_ARCHS: &[&str] = &["llama", "qwen2", "qwen3", "gemma2", "gemma3"];

/// The GGUF architecture of an HF `config.json` `architectures` entry
/// (`LlamaForCausalLM` → `llama`, `MistralForCausalLM` → `llama`, …), or `None` if unsupported.
pub fn arch_from_hf_architecture(hf: &str) -> Option<&'static str> {
    Some(match hf {
        "LlamaForCausalLM" | "LLaMAForCausalLM" | "MistralForCausalLM" => "llama",
        "Qwen2ForCausalLM" => "qwen2",
        "Qwen3ForCausalLM" => "qwen3",
        "Gemma2ForCausalLM" => "gemma2",
        "Gemma3ForCausalLM" | "Gemma3ForConditionalGeneration" => "gemma3",
        _ => return None,
    })
}

/// The GGUF architecture of an HF `config.json` `model_type` (used when `architectures` is
/// missing).
pub fn arch_from_model_type(model_type: &str) -> Option<&'static str> {
    Some(match model_type {
        "llama" | "mistral" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        "gemma2" => "gemma2",
        "gemma3" | "gemma3_text" => "gemma3",
        _ => return None,
    })
}

/// The HF class written to `config.json` for a GGUF architecture (`llama` → `LlamaForCausalLM`).
pub fn hf_architecture(arch: &str) -> Option<&'static str> {
    Some(match canonical_arch(arch)? {
        "llama" => "LlamaForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        "gemma2" => "Gemma2ForCausalLM",
        "gemma3" => "Gemma3ForCausalLM",
        _ => return None,
    })
}

/// The HF `model_type` written to `config.json` for a GGUF architecture.
pub fn hf_model_type(arch: &str) -> Option<&'static str> {
    Some(match canonical_arch(arch)? {
        "llama" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        "gemma2" => "gemma2",
        "gemma3" => "gemma3_text",
        _ => return None,
    })
}

/// The supported GGUF architecture `arch` names (`mistral` is accepted as `llama`, as GGUF
/// files of Mistral models say `llama`).
fn canonical_arch(arch: &str) -> Option<&'static str> {
    match arch {
        "mistral" => Some("llama"),
        _ => SUPPORTED_ARCHS.iter().copied().find(|a| *a == arch),
    }
}

/// Whether `arch` (GGUF spelling) is mapped by this module.
pub fn is_supported(arch: &str) -> bool {
    canonical_arch(arch).is_some()
}

/// Top-level modules: (HF, GGUF).
const GLOBAL: &[(&str, &str)] = &[
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
];

/// Block modules shared by every covered architecture: (HF after `model.layers.N.`, GGUF after
/// `blk.N.`).
const BLOCK_COMMON: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

const BLOCK_LLAMA: &[(&str, &str)] = &[("post_attention_layernorm", "ffn_norm")];

const BLOCK_QWEN3: &[(&str, &str)] = &[
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
];

const BLOCK_GEMMA2: &[(&str, &str)] = &[
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
];

const BLOCK_GEMMA3: &[(&str, &str)] = &[
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
];

/// The architecture-specific block table (after [`BLOCK_COMMON`]).
fn block_extra(arch: &str) -> &'static [(&'static str, &'static str)] {
    match arch {
        "llama" | "qwen2" => BLOCK_LLAMA,
        "qwen3" => BLOCK_QWEN3,
        "gemma2" => BLOCK_GEMMA2,
        "gemma3" => BLOCK_GEMMA3,
        _ => &[],
    }
}

fn block_modules(arch: &str) -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    BLOCK_COMMON.iter().chain(block_extra(arch))
}

/// Whether `arch` has an output (`lm_head`) tensor in GGUF. Gemma 2's converter drops it.
fn has_output(arch: &str) -> bool {
    arch != "gemma2"
}

/// `"17"` → 17; rejects empty strings, signs and leading zeros so that names round-trip.
/// Splits `NAME.weight` / `NAME.bias` into (`NAME`, `weight`/`bias`).
fn split_suffix(name: &str) -> Option<(&str, &str)> {
    let (module, suffix) = name.rsplit_once('.')?;
    matches!(suffix, "weight" | "bias").then_some((module, suffix))
}

/// The HF name with Gemma 3 multimodal prefixes removed, as llama.cpp does
/// (`name.replace("language_model.", "")`): `model.language_model.layers.0…` and
/// `language_model.model.layers.0…` both become `model.layers.0…`.
fn strip_language_model(arch: &str, hf_name: &str) -> String {
    if arch == "gemma3" {
        hf_name.replace("language_model.", "")
    } else {
        hf_name.to_string()
    }
}

/// Whether llama.cpp's converter drops this HF tensor on purpose (no GGUF counterpart):
/// rotary `inv_freq` buffers, Gemma 2's `lm_head`, Gemma 3's vision tower and projector.
pub fn hf_is_skipped(arch: &str, hf_name: &str) -> bool {
    let Some(arch) = canonical_arch(arch) else {
        return false;
    };
    if hf_name.ends_with("rotary_emb.inv_freq") {
        return true;
    }
    let name = strip_language_model(arch, hf_name);
    match arch {
        "gemma2" => name == "lm_head.weight",
        "gemma3" => {
            let n = name.strip_prefix("model.").unwrap_or(&name);
            [
                "vision_tower.",
                "multi_modal_projector.",
                "multimodal_projector.",
                "vision_model.",
            ]
            .iter()
            .any(|p| n.starts_with(p))
        }
        _ => false,
    }
}

/// The GGUF name of HF tensor `hf_name` in architecture `arch` (GGUF spelling), or `None` when
/// the name is unknown or dropped by llama.cpp ([`hf_is_skipped`]).
///
/// ```
/// use ggmerge::format::hf_names::hf_to_gguf;
/// assert_eq!(hf_to_gguf("llama", "model.layers.3.self_attn.q_proj.weight").as_deref(),
///            Some("blk.3.attn_q.weight"));
/// assert_eq!(hf_to_gguf("gemma3", "model.language_model.norm.weight").as_deref(),
///            Some("output_norm.weight"));
/// ```
pub fn hf_to_gguf(arch: &str, hf_name: &str) -> Option<String> {
    let arch = canonical_arch(arch)?;
    if hf_is_skipped(arch, hf_name) {
        return None;
    }
    let name = strip_language_model(arch, hf_name);
    let (module, suffix) = split_suffix(&name)?;
    if let Some(rest) = module.strip_prefix("model.layers.") {
        let (bid, sub) = rest.split_once('.')?;
        let bid = parse_block_number(bid)?;
        let (_, gguf) = block_modules(arch).find(|(hf, _)| *hf == sub)?;
        return Some(format!("blk.{bid}.{gguf}.{suffix}"));
    }
    let (_, gguf) = GLOBAL
        .iter()
        .filter(|(_, g)| *g != "output" || has_output(arch))
        .find(|(hf, _)| *hf == module)?;
    Some(format!("{gguf}.{suffix}"))
}

/// The HF name of GGUF tensor `gguf_name` in architecture `arch`, or `None` when it has none
/// (`rope_freqs.weight`, unknown names). Gemma 3 names come out in `Gemma3ForCausalLM` form
/// (`model.layers.…`).
///
/// ```
/// use ggmerge::format::hf_names::gguf_to_hf;
/// assert_eq!(gguf_to_hf("gemma3", "blk.0.post_ffw_norm.weight").as_deref(),
///            Some("model.layers.0.post_feedforward_layernorm.weight"));
/// ```
pub fn gguf_to_hf(arch: &str, gguf_name: &str) -> Option<String> {
    let arch = canonical_arch(arch)?;
    let (module, suffix) = split_suffix(gguf_name)?;
    if let Some(rest) = module.strip_prefix("blk.") {
        let (bid, sub) = rest.split_once('.')?;
        let bid = parse_block_number(bid)?;
        let (hf, _) = block_modules(arch).find(|(_, g)| *g == sub)?;
        return Some(format!("model.layers.{bid}.{hf}.{suffix}"));
    }
    let (hf, _) = GLOBAL
        .iter()
        .filter(|(_, g)| *g != "output" || has_output(arch))
        .find(|(_, g)| *g == module)?;
    Some(format!("{hf}.{suffix}"))
}

/// The change llama.cpp's converter makes to a tensor's values on the way HF → GGUF.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Transform {
    /// Values are copied.
    None,
    /// llama `attn_q` (weight or bias): rows permuted within each of `n_head` heads.
    PermuteQ,
    /// llama `attn_k` (weight or bias): rows permuted within each of `n_head_kv` heads.
    PermuteK,
    /// Gemma 2/3 norm weights: GGUF = HF + 1.
    AddOne,
}

/// The transform of GGUF tensor `gguf_name` in `arch` (GGUF names and HF names give the same
/// answer: the norms end in `norm.weight` in both).
pub fn transform_of(arch: &str, gguf_name: &str) -> Transform {
    match canonical_arch(arch) {
        Some("llama") => match split_suffix(gguf_name) {
            Some((m, _)) if m.starts_with("blk.") && m.ends_with(".attn_q") => Transform::PermuteQ,
            Some((m, _)) if m.starts_with("blk.") && m.ends_with(".attn_k") => Transform::PermuteK,
            _ => Transform::None,
        },
        Some("gemma2" | "gemma3") if gguf_name.ends_with("norm.weight") => Transform::AddOne,
        _ => Transform::None,
    }
}

/// Checks that `n_rows` rows can be permuted over `n_head` heads (llama.cpp reshapes to
/// `(n_head, 2, n_rows / n_head / 2)`) and returns the head size.
pub fn head_dim(n_rows: u64, n_head: u64) -> std::result::Result<u64, String> {
    if n_head == 0 || !n_rows.is_multiple_of(n_head) || !(n_rows / n_head).is_multiple_of(2) {
        return Err(format!(
            "{n_rows} rows cannot be split into {n_head} heads of an even size"
        ));
    }
    Ok(n_rows / n_head)
}

/// For llama.cpp's q/k permutation with head size `head_dim` (even): the HF row stored at GGUF
/// row `row`. Row `h·d + 2i + j` of GGUF is row `h·d + j·d/2 + i` of HF (`d` the head size,
/// `i < d/2`, `j ∈ {0, 1}`), i.e. `reshape(n_head, 2, d/2).swapaxes(1, 2)`.
pub fn hf_row_of_gguf_row(row: u64, head_dim: u64) -> u64 {
    let half = head_dim / 2;
    let (h, w) = (row / head_dim, row % head_dim);
    h * head_dim + (w % 2) * half + w / 2
}

/// The inverse of [`hf_row_of_gguf_row`]: the GGUF row holding HF row `row`.
pub fn gguf_row_of_hf_row(row: u64, head_dim: u64) -> u64 {
    let half = head_dim / 2;
    let (h, w) = (row / head_dim, row % head_dim);
    h * head_dim + 2 * (w % half) + w / half
}

/// Which way [`permute_rows`] goes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Direction {
    /// HF layout in, GGUF layout out (what llama.cpp's converter does).
    HfToGguf,
    /// GGUF layout in, HF layout out.
    GgufToHf,
}

/// Permutes whole rows of `row_bytes` bytes from `src` into `dst` (same length, a whole number
/// of heads of `head_dim` rows). Works on any element type: rows move, bytes do not change.
pub fn permute_rows(src: &[u8], dst: &mut [u8], row_bytes: usize, head_dim: u64, dir: Direction) {
    debug_assert_eq!(src.len(), dst.len());
    for (r, out) in dst.chunks_exact_mut(row_bytes.max(1)).enumerate() {
        let from = match dir {
            Direction::HfToGguf => hf_row_of_gguf_row(r as u64, head_dim),
            Direction::GgufToHf => gguf_row_of_hf_row(r as u64, head_dim),
        } as usize;
        out.copy_from_slice(&src[from * row_bytes..(from + 1) * row_bytes]);
    }
}

/// What a transform needs from `config.json` (or GGUF metadata), plus what a minimal
/// `config.json` written next to a converted model holds. Every field but `arch` is optional.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HfConfig {
    /// GGUF architecture (`llama`, `gemma3`, …).
    pub arch: String,
    /// The HF class named in `architectures` (`LlamaForCausalLM`), if known.
    pub hf_architecture: Option<String>,
    /// `num_hidden_layers` (GGUF `block_count`).
    pub n_layers: Option<u64>,
    /// `num_attention_heads` (GGUF `attention.head_count`).
    pub n_head: Option<u64>,
    /// `num_key_value_heads` (GGUF `attention.head_count_kv`); `n_head` when absent.
    pub n_head_kv: Option<u64>,
    /// `hidden_size` (GGUF `embedding_length`).
    pub hidden_size: Option<u64>,
    /// `intermediate_size` (GGUF `feed_forward_length`).
    pub intermediate_size: Option<u64>,
    /// `head_dim` (GGUF `attention.key_length`).
    pub head_dim: Option<u64>,
    /// `vocab_size`.
    pub vocab_size: Option<u64>,
    /// `rms_norm_eps` (GGUF `attention.layer_norm_rms_epsilon`).
    pub rms_norm_eps: Option<f64>,
    /// `rope_theta` (GGUF `rope.freq_base`).
    pub rope_theta: Option<f64>,
    /// `max_position_embeddings` (GGUF `context_length`).
    pub max_position_embeddings: Option<u64>,
    /// `sliding_window` (GGUF `attention.sliding_window`).
    pub sliding_window: Option<u64>,
    /// `tie_word_embeddings`.
    pub tie_word_embeddings: Option<bool>,
}

fn json_u64(obj: &Map<String, Json>, keys: &[&str]) -> Option<u64> {
    keys.iter().find_map(|k| obj.get(*k).and_then(Json::as_u64))
}

fn json_f64(obj: &Map<String, Json>, key: &str) -> Option<f64> {
    obj.get(key).and_then(Json::as_f64)
}

impl HfConfig {
    /// A config that knows only the architecture (for an explicit override).
    pub fn for_arch(arch: &str) -> Option<HfConfig> {
        Some(HfConfig {
            arch: canonical_arch(arch)?.to_string(),
            ..HfConfig::default()
        })
    }

    /// Parses the text of an HF `config.json`. The architecture comes from `architectures[0]`
    /// (else `model_type`); numbers from the top level, or from `text_config` for multimodal
    /// checkpoints (`Gemma3ForConditionalGeneration`).
    pub fn from_json(text: &str) -> std::result::Result<HfConfig, String> {
        let root: Json = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let obj = root
            .as_object()
            .ok_or_else(|| "not a JSON object".to_string())?;
        let hf_arch = obj
            .get("architectures")
            .and_then(Json::as_array)
            .and_then(|a| a.first())
            .and_then(Json::as_str);
        let model_type = obj.get("model_type").and_then(Json::as_str);
        let arch = match (hf_arch, model_type) {
            (Some(a), _) => arch_from_hf_architecture(a).ok_or_else(|| {
                format!(
                    "architecture {a:?} is not supported (supported: LlamaForCausalLM, \
                     MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, \
                     Gemma3ForCausalLM, Gemma3ForConditionalGeneration)"
                )
            })?,
            (None, Some(t)) => arch_from_model_type(t)
                .ok_or_else(|| format!("model_type {t:?} is not supported"))?,
            (None, None) => return Err("has neither \"architectures\" nor \"model_type\"".into()),
        };
        let text_obj = obj.get("text_config").and_then(Json::as_object);
        let p = text_obj.unwrap_or(obj);
        Ok(HfConfig {
            arch: arch.to_string(),
            hf_architecture: hf_arch.map(str::to_string),
            n_layers: json_u64(p, &["num_hidden_layers", "n_layers"]),
            n_head: json_u64(p, &["num_attention_heads", "n_heads"]),
            n_head_kv: json_u64(p, &["num_key_value_heads", "n_kv_heads"]),
            hidden_size: json_u64(p, &["hidden_size"]),
            intermediate_size: json_u64(p, &["intermediate_size"]),
            head_dim: json_u64(p, &["head_dim"]),
            vocab_size: json_u64(p, &["vocab_size"]).or_else(|| json_u64(obj, &["vocab_size"])),
            rms_norm_eps: json_f64(p, "rms_norm_eps"),
            rope_theta: json_f64(p, "rope_theta"),
            max_position_embeddings: json_u64(p, &["max_position_embeddings"]),
            sliding_window: json_u64(p, &["sliding_window"]),
            tie_word_embeddings: obj
                .get("tie_word_embeddings")
                .or_else(|| p.get("tie_word_embeddings"))
                .and_then(Json::as_bool),
        })
    }

    /// Reads and parses `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<HfConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| FormatError::Io {
            path: path.to_path_buf(),
            what: "cannot read config.json",
            source,
        })?;
        HfConfig::from_json(&text).map_err(|reason| FormatError::Config {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// The config of a GGUF model, from its metadata (`None` when the architecture is missing
    /// or not supported here).
    pub fn from_gguf_metadata(md: &Metadata) -> Option<HfConfig> {
        let arch = canonical_arch(md.architecture()?)?;
        // Per-layer keys (head counts of some models) are arrays: take the first layer's.
        let u = |k: &str| match md.get(&format!("{arch}.{k}"))? {
            Value::Array(Array::U32(v)) => v.first().map(|&x| u64::from(x)),
            Value::Array(Array::I32(v)) => v.first().and_then(|&x| u64::try_from(x).ok()),
            Value::Array(Array::U64(v)) => v.first().copied(),
            v => v.as_u64(),
        };
        let f = |k: &str| match md.get(&format!("{arch}.{k}")) {
            Some(Value::F32(x)) => Some(f64::from(*x)),
            Some(Value::F64(x)) => Some(*x),
            _ => None,
        };
        let vocab_size = match md.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => Some(a.len() as u64),
            _ => u("vocab_size"),
        };
        Some(HfConfig {
            arch: arch.to_string(),
            hf_architecture: hf_architecture(arch).map(str::to_string),
            n_layers: u("block_count"),
            n_head: u("attention.head_count"),
            n_head_kv: u("attention.head_count_kv"),
            hidden_size: u("embedding_length"),
            intermediate_size: u("feed_forward_length"),
            head_dim: u("attention.key_length"),
            vocab_size,
            rms_norm_eps: f("attention.layer_norm_rms_epsilon"),
            rope_theta: f("rope.freq_base"),
            max_position_embeddings: u("context_length"),
            sliding_window: u("attention.sliding_window"),
            tie_word_embeddings: None,
        })
    }

    /// `num_key_value_heads`, defaulting to `num_attention_heads` as transformers does.
    pub fn n_head_kv_or_default(&self) -> Option<u64> {
        self.n_head_kv.or(self.n_head)
    }

    /// The head count the permutation of `t` uses (`None` for other transforms or when the
    /// config lacks it).
    pub fn permute_heads(&self, t: Transform) -> Option<u64> {
        match t {
            Transform::PermuteQ => self.n_head,
            Transform::PermuteK => self.n_head_kv_or_default(),
            _ => None,
        }
    }

    /// A minimal HF `config.json` (architectures, model_type and the known numbers) — enough
    /// for [`HfConfig::from_json`] and for tools that read the shapes.
    pub fn to_json(&self) -> Json {
        let mut o = Map::new();
        let class = self
            .hf_architecture
            .clone()
            .or_else(|| hf_architecture(&self.arch).map(str::to_string));
        if let Some(c) = class {
            o.insert("architectures".into(), json!([c]));
        }
        if let Some(t) = hf_model_type(&self.arch) {
            o.insert("model_type".into(), json!(t));
        }
        let mut put_u = |k: &str, v: Option<u64>| {
            if let Some(v) = v {
                o.insert(k.into(), json!(v));
            }
        };
        put_u("num_hidden_layers", self.n_layers);
        put_u("num_attention_heads", self.n_head);
        put_u("num_key_value_heads", self.n_head_kv_or_default());
        put_u("hidden_size", self.hidden_size);
        put_u("intermediate_size", self.intermediate_size);
        put_u("head_dim", self.head_dim);
        put_u("vocab_size", self.vocab_size);
        put_u("max_position_embeddings", self.max_position_embeddings);
        put_u("sliding_window", self.sliding_window);
        for (k, v) in [
            ("rms_norm_eps", self.rms_norm_eps),
            ("rope_theta", self.rope_theta),
        ] {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                o.insert(k.into(), json!(v));
            }
        }
        if let Some(t) = self.tie_word_embeddings {
            o.insert("tie_word_embeddings".into(), json!(t));
        }
        Json::Object(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (HF, GGUF) pair of block 7 and the globals, per architecture.
    fn pairs(arch: &str) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = block_modules(arch)
            .flat_map(|(hf, g)| {
                ["weight", "bias"]
                    .map(|s| (format!("model.layers.7.{hf}.{s}"), format!("blk.7.{g}.{s}")))
            })
            .collect();
        for (hf, g) in GLOBAL {
            if *g == "output" && !has_output(arch) {
                continue;
            }
            v.push((format!("{hf}.weight"), format!("{g}.weight")));
        }
        v
    }

    #[test]
    fn names_round_trip_for_every_arch() {
        for arch in SUPPORTED_ARCHS {
            let p = pairs(arch);
            assert!(p.len() >= 19, "{arch}");
            for (hf, g) in &p {
                assert_eq!(
                    hf_to_gguf(arch, hf).as_deref(),
                    Some(g.as_str()),
                    "{arch} {hf}"
                );
                assert_eq!(
                    gguf_to_hf(arch, g).as_deref(),
                    Some(hf.as_str()),
                    "{arch} {g}"
                );
            }
        }
    }

    #[test]
    fn per_arch_facts() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            (
                "llama",
                "model.layers.0.post_attention_layernorm.weight",
                Some("blk.0.ffn_norm.weight"),
            ),
            (
                "mistral",
                "model.layers.31.self_attn.k_proj.weight",
                Some("blk.31.attn_k.weight"),
            ),
            ("llama", "lm_head.weight", Some("output.weight")),
            ("llama", "model.layers.0.self_attn.q_norm.weight", None),
            (
                "llama",
                "model.layers.0.self_attn.rotary_emb.inv_freq",
                None,
            ),
            (
                "qwen2",
                "model.layers.2.self_attn.q_proj.bias",
                Some("blk.2.attn_q.bias"),
            ),
            (
                "qwen2",
                "model.layers.2.post_attention_layernorm.weight",
                Some("blk.2.ffn_norm.weight"),
            ),
            (
                "qwen3",
                "model.layers.5.self_attn.k_norm.weight",
                Some("blk.5.attn_k_norm.weight"),
            ),
            (
                "gemma2",
                "model.layers.1.post_attention_layernorm.weight",
                Some("blk.1.post_attention_norm.weight"),
            ),
            (
                "gemma2",
                "model.layers.1.pre_feedforward_layernorm.weight",
                Some("blk.1.ffn_norm.weight"),
            ),
            (
                "gemma2",
                "model.layers.1.post_feedforward_layernorm.weight",
                Some("blk.1.post_ffw_norm.weight"),
            ),
            ("gemma2", "lm_head.weight", None),
            ("gemma2", "model.layers.1.self_attn.q_norm.weight", None),
            (
                "gemma3",
                "model.layers.1.self_attn.q_norm.weight",
                Some("blk.1.attn_q_norm.weight"),
            ),
            (
                "gemma3",
                "language_model.model.layers.4.mlp.up_proj.weight",
                Some("blk.4.ffn_up.weight"),
            ),
            (
                "gemma3",
                "model.language_model.layers.4.mlp.up_proj.weight",
                Some("blk.4.ffn_up.weight"),
            ),
            (
                "gemma3",
                "model.language_model.embed_tokens.weight",
                Some("token_embd.weight"),
            ),
            (
                "gemma3",
                "language_model.lm_head.weight",
                Some("output.weight"),
            ),
            (
                "gemma3",
                "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                None,
            ),
            (
                "gemma3",
                "model.vision_tower.vision_model.post_layernorm.weight",
                None,
            ),
            (
                "gemma3",
                "multi_modal_projector.mm_soft_emb_norm.weight",
                None,
            ),
            ("phi3", "model.layers.0.self_attn.q_proj.weight", None),
            ("llama", "model.layers.01.mlp.up_proj.weight", None),
            ("llama", "model.layers.x.mlp.up_proj.weight", None),
            ("llama", "model.layers.0.mlp.up_proj.scale", None),
        ];
        for (arch, hf, g) in cases {
            assert_eq!(hf_to_gguf(arch, hf).as_deref(), *g, "{arch} {hf}");
        }
        assert!(hf_is_skipped("gemma2", "lm_head.weight"));
        assert!(hf_is_skipped("gemma3", "model.vision_tower.x.weight"));
        assert!(hf_is_skipped(
            "llama",
            "model.layers.0.self_attn.rotary_emb.inv_freq"
        ));
        assert!(!hf_is_skipped("llama", "model.layers.0.foo.weight"));
        assert_eq!(gguf_to_hf("llama", "rope_freqs.weight"), None);
        assert_eq!(gguf_to_hf("gemma2", "output.weight"), None);
        assert_eq!(gguf_to_hf("llama", "blk.0.post_ffw_norm.weight"), None);
    }

    #[test]
    fn transforms_per_arch() {
        assert_eq!(
            transform_of("llama", "blk.0.attn_q.weight"),
            Transform::PermuteQ
        );
        assert_eq!(
            transform_of("llama", "blk.0.attn_q.bias"),
            Transform::PermuteQ
        );
        assert_eq!(
            transform_of("mistral", "blk.9.attn_k.weight"),
            Transform::PermuteK
        );
        assert_eq!(
            transform_of("llama", "blk.0.attn_v.weight"),
            Transform::None
        );
        assert_eq!(
            transform_of("llama", "blk.0.attn_norm.weight"),
            Transform::None
        );
        assert_eq!(
            transform_of("qwen2", "blk.0.attn_q.weight"),
            Transform::None
        );
        assert_eq!(
            transform_of("qwen3", "blk.0.attn_q_norm.weight"),
            Transform::None
        );
        for n in [
            "blk.0.attn_norm.weight",
            "blk.0.post_attention_norm.weight",
            "blk.0.ffn_norm.weight",
            "blk.0.post_ffw_norm.weight",
            "output_norm.weight",
        ] {
            assert_eq!(transform_of("gemma2", n), Transform::AddOne, "{n}");
            assert_eq!(transform_of("gemma3", n), Transform::AddOne, "{n}");
        }
        assert_eq!(
            transform_of("gemma3", "blk.0.attn_q_norm.weight"),
            Transform::AddOne
        );
        assert_eq!(
            transform_of("gemma3", "blk.0.attn_q.weight"),
            Transform::None
        );
        assert_eq!(transform_of("gemma3", "token_embd.weight"), Transform::None);
    }

    /// llama.cpp's `permute` with numpy semantics, written out: reshape (n_head, 2, d/2, …),
    /// swap axes 1 and 2, reshape back. Returns, for each output row, the input row.
    fn llama_cpp_permute(n_rows: usize, n_head: usize) -> Vec<usize> {
        let half = n_rows / n_head / 2;
        let mut out = Vec::with_capacity(n_rows);
        // Output index (h, i, j) over shape (n_head, half, 2) reads input (h, j, i) over
        // shape (n_head, 2, half).
        for h in 0..n_head {
            for i in 0..half {
                for j in 0..2 {
                    out.push(h * 2 * half + j * half + i);
                }
            }
        }
        out
    }

    #[test]
    fn permutation_matches_llama_cpp_and_is_a_bijection() {
        for (n_rows, n_head) in [(8, 1), (8, 2), (12, 3), (576, 9), (192, 3), (64, 4)] {
            let d = head_dim(n_rows, n_head).unwrap();
            let reference = llama_cpp_permute(n_rows as usize, n_head as usize);
            let mut seen = vec![false; n_rows as usize];
            for r in 0..n_rows {
                let hf = hf_row_of_gguf_row(r, d);
                assert_eq!(
                    hf as usize, reference[r as usize],
                    "rows {n_rows} heads {n_head} row {r}"
                );
                assert!(!seen[hf as usize]);
                seen[hf as usize] = true;
                assert_eq!(gguf_row_of_hf_row(hf, d), r);
            }
        }
        // A small example by hand: one head of 8 rows.
        let order: Vec<u64> = (0..8).map(|r| hf_row_of_gguf_row(r, 8)).collect();
        assert_eq!(order, [0, 4, 1, 5, 2, 6, 3, 7]);
        assert!(head_dim(10, 2).is_err());
        assert!(head_dim(12, 0).is_err());
        assert!(head_dim(12, 5).is_err());
    }

    #[test]
    fn permute_rows_both_ways() {
        let rows = 12usize;
        let rb = 3usize;
        let src: Vec<u8> = (0..rows * rb).map(|i| i as u8).collect();
        let d = head_dim(rows as u64, 2).unwrap();
        let mut g = vec![0u8; src.len()];
        permute_rows(&src, &mut g, rb, d, Direction::HfToGguf);
        for r in 0..rows {
            let hf = hf_row_of_gguf_row(r as u64, d) as usize;
            assert_eq!(g[r * rb..(r + 1) * rb], src[hf * rb..(hf + 1) * rb]);
        }
        let mut back = vec![0u8; src.len()];
        permute_rows(&g, &mut back, rb, d, Direction::GgufToHf);
        assert_eq!(back, src);
    }

    #[test]
    fn config_json_parsing() {
        let c = HfConfig::from_json(
            r#"{"architectures":["MistralForCausalLM"],"num_attention_heads":32,
                "num_key_value_heads":8,"num_hidden_layers":32,"hidden_size":4096}"#,
        )
        .unwrap();
        assert_eq!(c.arch, "llama");
        assert_eq!(
            (c.n_head, c.n_head_kv, c.n_layers),
            (Some(32), Some(8), Some(32))
        );
        assert_eq!(c.permute_heads(Transform::PermuteK), Some(8));

        let c = HfConfig::from_json(
            r#"{"architectures":["Gemma3ForConditionalGeneration"],
                "text_config":{"num_hidden_layers":34,"num_attention_heads":8,"num_key_value_heads":4,"hidden_size":2560},
                "vision_config":{"num_hidden_layers":27}}"#,
        )
        .unwrap();
        assert_eq!(c.arch, "gemma3");
        assert_eq!(c.n_layers, Some(34));

        let c = HfConfig::from_json(r#"{"model_type":"qwen3","num_attention_heads":16}"#).unwrap();
        assert_eq!(
            (c.arch.as_str(), c.n_head_kv_or_default()),
            ("qwen3", Some(16))
        );

        for bad in [
            "[1]",
            "{",
            r#"{"architectures":["Phi3ForCausalLM"]}"#,
            r#"{"hidden_size":1}"#,
        ] {
            assert!(HfConfig::from_json(bad).is_err(), "{bad}");
        }
        for (hf, a) in [
            ("LlamaForCausalLM", "llama"),
            ("MistralForCausalLM", "llama"),
            ("Qwen2ForCausalLM", "qwen2"),
            ("Qwen3ForCausalLM", "qwen3"),
            ("Gemma2ForCausalLM", "gemma2"),
            ("Gemma3ForCausalLM", "gemma3"),
            ("Gemma3ForConditionalGeneration", "gemma3"),
        ] {
            assert_eq!(arch_from_hf_architecture(hf), Some(a));
        }
    }

    #[test]
    fn config_json_round_trips() {
        let c = HfConfig {
            arch: "gemma3".into(),
            hf_architecture: None,
            n_layers: Some(18),
            n_head: Some(4),
            n_head_kv: Some(1),
            hidden_size: Some(640),
            intermediate_size: Some(2048),
            head_dim: Some(256),
            vocab_size: Some(262144),
            rms_norm_eps: Some(1e-6),
            rope_theta: Some(1e6),
            max_position_embeddings: Some(32768),
            sliding_window: Some(512),
            tie_word_embeddings: Some(true),
        };
        let back = HfConfig::from_json(&c.to_json().to_string()).unwrap();
        assert_eq!(
            back,
            HfConfig {
                hf_architecture: Some("Gemma3ForCausalLM".into()),
                ..c
            }
        );
    }
}
