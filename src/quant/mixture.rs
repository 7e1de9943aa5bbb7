//! llama.cpp's quantization mixtures (`Q4_K_M`, `Q3_K_S`, …) as per-tensor type plans.
//!
//! A *mixture* (llama.cpp's "ftype") names a default type plus rules that give some tensors more
//! bits (attention V, some `ffn_down` layers, the output/tied embedding), keep others as they
//! are (norms, 1-D tensors, routers), and fall back when a row length is not a multiple of the
//! type's block (e.g. Q4_K → Q5_0 for Gemma 3 270M's 640-wide rows). [`plan_types`] applies
//! the same rules in the same order as `llama-quantize` of the pinned llama.cpp version, so the
//! per-tensor types match it exactly; a test checks this against the Gemma 3 fixture (made by
//! `llama-quantize` as Q4_K_M) and against `llama_model_quantize` itself.
//!
//! Not modelled (ggmerge does not compute them or the archs are not supported): importance
//! matrices, `--tensor-type` overrides, GLM5-next / BailingMoE3 special cases, MXFP4_MOE.

use crate::format::gguf::{Metadata, Value};
use crate::format::GgmlType;
use crate::quant::error::QuantError;

/// One llama.cpp file type (mixture): name, `llama_ftype` id, default tensor type.
#[derive(Debug, PartialEq, Eq)]
pub struct Ftype {
    /// Name as `llama-quantize` spells it.
    pub name: &'static str,
    /// `llama_ftype` value, written to `general.file_type`.
    pub id: u32,
    /// The type most weight tensors get.
    pub default_type: GgmlType,
}

macro_rules! ftypes {
    ($( $name:literal $id:literal $ty:ident ;)*) => {
        /// Every mixture ggmerge plans, as `llama-quantize` names them.
        pub static FTYPES: &[Ftype] = &[ $( Ftype { name: $name, id: $id, default_type: GgmlType::$ty }, )* ];
    };
}

ftypes! {
    "F32"     0  F32;
    "F16"     1  F16;
    "BF16"    32 BF16;
    "Q4_0"    2  Q4_0;
    "Q4_1"    3  Q4_1;
    "Q5_0"    8  Q5_0;
    "Q5_1"    9  Q5_1;
    "Q8_0"    7  Q8_0;
    "Q2_K"    10 Q2_K;
    "Q2_K_S"  21 Q2_K;
    "Q3_K_S"  11 Q3_K;
    "Q3_K_M"  12 Q3_K;
    "Q3_K_L"  13 Q3_K;
    "Q4_K_S"  14 Q4_K;
    "Q4_K_M"  15 Q4_K;
    "Q5_K_S"  16 Q5_K;
    "Q5_K_M"  17 Q5_K;
    "Q6_K"    18 Q6_K;
    "IQ2_XXS" 19 IQ2_XXS;
    "IQ2_XS"  20 IQ2_XS;
    "IQ2_S"   28 IQ2_XS;
    "IQ2_M"   29 IQ2_S;
    "IQ3_XS"  22 IQ3_S;
    "IQ3_XXS" 23 IQ3_XXS;
    "IQ1_S"   24 IQ1_S;
    "IQ1_M"   31 IQ1_M;
    "IQ4_NL"  25 IQ4_NL;
    "IQ4_XS"  30 IQ4_XS;
    "IQ3_S"   26 IQ3_S;
    "IQ3_M"   27 IQ3_S;
    "TQ1_0"   36 TQ1_0;
    "TQ2_0"   37 TQ2_0;
    "Q1_0"    40 Q1_0;
    "Q2_0"    41 Q2_0;
}

/// `llama-quantize`'s short aliases.
const ALIASES: &[(&str, &str)] = &[("Q3_K", "Q3_K_M"), ("Q4_K", "Q4_K_M"), ("Q5_K", "Q5_K_M")];

/// The short alias of a mixture name (`Q4_K_M` → `Q4_K`), if it has one.
pub fn alias_of(mixture: &str) -> Option<&'static str> {
    ALIASES.iter().find(|(_, m)| *m == mixture).map(|(a, _)| *a)
}

/// A quantization target: a mixture, optionally `pure` (every quantizable tensor gets the
/// default type, no per-tensor rules; shape fallbacks still apply), as `llama-quantize --pure`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// The mixture.
    pub ftype: &'static Ftype,
    /// No per-tensor rules.
    pub pure: bool,
}

impl Target {
    /// Parses a mixture name (case-insensitive; `Q4_K` means `Q4_K_M` as in llama-quantize).
    pub fn parse(name: &str, pure: bool) -> Result<Target, QuantError> {
        let canonical = ALIASES
            .iter()
            .find(|(a, _)| a.eq_ignore_ascii_case(name))
            .map_or(name, |(_, m)| m);
        FTYPES
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(canonical))
            .map(|ftype| Target { ftype, pure })
            .ok_or_else(|| QuantError::UnknownTarget {
                name: name.into(),
                known: FTYPES.iter().map(|f| f.name).collect::<Vec<_>>().join(", "),
            })
    }

    /// An output type as `merge --type` takes it: a plain ggml type name (`Q8_0`, `Q4_K`,
    /// `F16`) gives every weight matrix that one type (a pure target); any other name is a
    /// mixture with llama.cpp's per-tensor rules (`Q4_K_M`, `Q3_K_S` …).
    pub fn parse_type_or_mixture(name: &str) -> Result<Target, QuantError> {
        if let Some(ty) = GgmlType::from_name(name) {
            if let Some(ftype) = FTYPES.iter().find(|f| f.default_type == ty) {
                return Ok(Target { ftype, pure: true });
            }
        }
        Target::parse(name, false)
    }

    /// The mixture's name, with ` (pure)` when pure.
    pub fn describe(&self) -> String {
        if self.pure {
            format!("{} (pure)", self.ftype.name)
        } else {
            self.ftype.name.to_string()
        }
    }
}

/// What the rules need to know about the model (llama.cpp reads these from hparams).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelFacts {
    /// `general.architecture`.
    pub arch: String,
    /// `{arch}.block_count`.
    pub n_layer: u64,
    /// Query heads (first layer).
    pub n_head: u64,
    /// KV heads (first layer).
    pub n_head_kv: u64,
    /// `{arch}.expert_count` (0 for dense models).
    pub n_expert: u64,
}

fn first_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Array(a) => match a {
            crate::format::gguf::Array::U32(x) => x.first().map(|&v| v.into()),
            crate::format::gguf::Array::I32(x) => x.first().and_then(|&v| u64::try_from(v).ok()),
            crate::format::gguf::Array::U64(x) => x.first().copied(),
            _ => None,
        },
        v => v.as_u64(),
    }
}

impl ModelFacts {
    /// Reads the facts from GGUF metadata (missing keys read as llama.cpp's defaults).
    pub fn from_metadata(md: &Metadata) -> ModelFacts {
        let arch = md.architecture().unwrap_or("").to_string();
        let get = |k: &str| md.get(&format!("{arch}.{k}")).and_then(first_u64);
        let n_head = get("attention.head_count").unwrap_or(0);
        ModelFacts {
            n_layer: get("block_count").unwrap_or(0),
            n_head,
            n_head_kv: get("attention.head_count_kv").unwrap_or(n_head),
            n_expert: get("expert_count").unwrap_or(0),
            arch,
        }
    }

    fn n_gqa(&self) -> u64 {
        self.n_head.checked_div(self.n_head_kv).unwrap_or(0)
    }

    /// llama.cpp's LLM_TYPE_70B: 80-layer llama with grouped KV heads.
    fn is_70b(&self) -> bool {
        self.arch == "llama" && self.n_layer == 80 && self.n_head != self.n_head_kv
    }
}

/// A tensor as the planner sees it.
#[derive(Clone, Copy, Debug)]
pub struct PlanInput<'a> {
    /// Name.
    pub name: &'a str,
    /// Shape (ggml order).
    pub shape: &'a [u64],
    /// Current type.
    pub ty: GgmlType,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Category {
    Output,
    TokenEmbd,
    AttnQkv,
    AttnKvB,
    AttnV,
    AttnK,
    AttnQ,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    use Category::*;
    if name == "output.weight" {
        return Output;
    }
    if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        return TokenEmbd;
    }
    const RULES: &[(&str, Category)] = &[
        ("attn_qkv.weight", AttnQkv),
        ("attn_kv_b.weight", AttnKvB),
        ("attn_v.weight", AttnV),
        ("attn_k.weight", AttnK),
        ("attn_q.weight", AttnQ),
        ("attn_output.weight", AttnOutput),
        ("ffn_up", FfnUp),
        ("ffn_gate", FfnGate),
        ("ffn_down", FfnDown),
    ];
    RULES
        .iter()
        .find(|(pat, _)| name.contains(pat))
        .map_or(Other, |&(_, c)| c)
}

fn is_attn_v_like(c: Category) -> bool {
    matches!(c, Category::AttnV | Category::AttnQkv | Category::AttnKvB)
}

/// Whether llama.cpp quantizes this tensor at all (else it keeps its type): 2-D+ weights,
/// minus norms, routers and the small or special tensors it lists.
pub fn allows_quantization(name: &str, shape: &[u64]) -> bool {
    if shape.len() < 2 || !name.ends_with("weight") {
        return false;
    }
    const NEVER: &[&str] = &[
        "_norm.weight",
        "ffn_gate_inp.weight",
        "ffn_gate_tid2eid.weight",
        "altup",
        "laurel",
        "per_layer_model_proj",
        "ssm_conv1d",
        "shortconv.conv.weight",
        "indexer.k_proj.weight",
        "indexer.q_proj.weight",
        "time_mix_first.weight",
        "time_mix_w0.weight",
        "time_mix_w1.weight",
        "time_mix_w2.weight",
        "time_mix_v0.weight",
        "time_mix_v1.weight",
        "time_mix_v2.weight",
        "time_mix_a0.weight",
        "time_mix_a1.weight",
        "time_mix_a2.weight",
        "time_mix_g1.weight",
        "time_mix_g2.weight",
        "time_mix_decay_w1.weight",
        "time_mix_decay_w2.weight",
        "time_mix_lerp_fused.weight",
        "attn_rel_b.weight",
        ".position_embd",
        "sam.pos_embd",
        "sam.neck.",
        "sam.net_",
        ".rel_pos",
        ".patch_embd",
        ".patch_merger",
        "a.rvq.codebook",
        "mm.a.code_embd",
    ];
    if NEVER.iter().any(|p| name.contains(p)) {
        return false;
    }
    name != "position_embd.weight" && name != "token_types.weight"
}

/// Layer index of `blk.N.*`, or -1 (llama.cpp's `weight_name_comparer`).
fn layer_of(name: &str) -> i64 {
    crate::format::gguf::block_index(name).map_or(-1, i64::from)
}

struct State<'f> {
    facts: &'f ModelFacts,
    ftype: &'static str,
    has_tied_embeddings: bool,
    n_attention_wv: i64,
    i_attention_wv: i64,
    n_ffn: i64,
    i_ffn_down: i64,
    i_ffn_gate: i64,
    i_ffn_up: i64,
}

fn use_more_bits(i: i64, n: i64) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

impl State<'_> {
    fn is(&self, names: &[&str]) -> bool {
        names.contains(&self.ftype)
    }

    /// (layer, n_layer) of an FFN tensor: the running counter, or the name for MoE models.
    fn layer_info(&self, counter: i64, name: &str) -> (i64, i64) {
        if self.facts.n_expert > 1 {
            (layer_of(name), self.n_ffn)
        } else {
            (counter, self.n_ffn)
        }
    }

    /// llama.cpp's `llama_tensor_get_type_impl` for a quantized default type.
    fn rule(&mut self, mut t: GgmlType, name: &str, shape: &[u64], cat: Category) -> GgmlType {
        use GgmlType as G;
        let f = self.facts;
        let arch_falcon = f.arch == "falcon";
        let iq_low = ["IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"];
        if cat == Category::Output || (self.has_tied_embeddings && cat == Category::TokenEmbd) {
            let nx = shape[0];
            if arch_falcon || !nx.is_multiple_of(t.block_size()) {
                t = G::Q8_0;
            } else if self.is(&[
                "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M",
            ]) {
                t = G::Q5_K;
            } else if t != G::Q8_0 {
                t = G::Q6_K;
            }
        } else if cat == Category::TokenEmbd {
            if self.is(&["IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"]) {
                t = G::Q2_K;
            } else if self.is(&["IQ2_S", "IQ2_M", "IQ3_XXS"]) {
                t = G::IQ3_S;
            } else if self.is(&["TQ1_0", "TQ2_0", "Q2_0"]) {
                t = G::Q4_K;
            }
        } else if self.is(&iq_low) {
            let s_or_m = self.is(&["IQ2_S", "IQ2_M"]);
            if is_attn_v_like(cat) {
                t = if f.n_gqa() >= 4 || f.n_expert >= 4 {
                    G::Q4_K
                } else if s_or_m {
                    G::IQ3_S
                } else {
                    G::Q2_K
                };
                self.i_attention_wv += 1;
            } else if f.n_expert == 8 && cat == Category::AttnK {
                t = G::Q4_K;
            } else if cat == Category::FfnDown {
                if self.i_ffn_down < self.n_ffn / 8 {
                    t = if s_or_m { G::IQ3_S } else { G::Q2_K };
                }
                self.i_ffn_down += 1;
            } else if cat == Category::AttnOutput {
                if f.n_expert == 8 {
                    t = G::Q5_K;
                } else if self.is(&["IQ1_S", "IQ1_M"]) {
                    t = G::IQ2_XXS;
                } else if s_or_m {
                    t = G::IQ3_S;
                }
            }
        } else if is_attn_v_like(cat) {
            let gqa4 = f.n_gqa() >= 4;
            if self.is(&["Q2_K"]) {
                t = if gqa4 { G::Q4_K } else { G::Q3_K };
            } else if self.is(&["Q2_K_S"]) && gqa4 {
                t = G::Q4_K;
            } else if self.is(&["IQ3_XXS"]) {
                // Without an imatrix (ggmerge never has one) llama.cpp picks IQ3_S here.
                t = if gqa4 { G::Q4_K } else { G::IQ3_S };
            } else if (self.is(&["IQ3_XS", "IQ3_S"]) && gqa4) || self.is(&["IQ3_M"]) {
                t = G::Q4_K;
            } else if self.is(&["Q3_K_M"]) {
                t = if self.i_attention_wv < 2 {
                    G::Q5_K
                } else {
                    G::Q4_K
                };
            } else if self.is(&["Q3_K_L"]) || (self.is(&["IQ4_NL", "IQ4_XS"]) && gqa4) {
                t = G::Q5_K;
            } else if self.is(&["Q4_K_M", "Q5_K_M"])
                && use_more_bits(self.i_attention_wv, self.n_attention_wv)
            {
                t = G::Q6_K;
            } else if self.is(&["Q4_K_S"]) && self.i_attention_wv < 4 {
                t = G::Q5_K;
            }
            if f.is_70b() && (t == G::Q3_K || t == G::Q4_K) {
                t = G::Q5_K;
            }
            if f.n_expert == 8 {
                t = G::Q8_0;
            }
            self.i_attention_wv += 1;
        } else if cat == Category::AttnK {
            if f.n_expert == 8 {
                t = G::Q8_0;
            } else if self.is(&["IQ3_XS"]) {
                t = G::IQ3_XXS;
            } else if self.is(&["IQ3_XXS"]) {
                t = G::IQ2_S;
            }
        } else if cat == Category::AttnQ {
            if self.is(&["IQ3_XS"]) {
                t = G::IQ3_XXS;
            } else if self.is(&["IQ3_XXS"]) {
                t = G::IQ2_S;
            }
        } else if cat == Category::FfnDown {
            let (i, n) = self.layer_info(self.i_ffn_down, name);
            if self.is(&["Q2_K"]) {
                t = G::Q3_K;
            } else if self.is(&["Q2_K_S"]) {
                if i < n / 8 {
                    t = G::Q4_K;
                }
            } else if self.is(&["IQ3_XXS"]) {
                t = if i < n / 8 { G::Q4_K } else { G::Q3_K };
            } else if self.is(&["Q3_K_M"]) {
                t = if i < n / 16 {
                    G::Q5_K
                } else if !arch_falcon || use_more_bits(i, n) {
                    G::Q4_K
                } else {
                    G::Q3_K
                };
            } else if self.is(&["IQ3_M"]) && (i < n / 8 || (f.n_expert == 8 && use_more_bits(i, n)))
            {
                t = G::Q4_K;
            } else if self.is(&["Q3_K_L"]) {
                t = if arch_falcon { G::Q4_K } else { G::Q5_K };
            } else if self.is(&["Q4_K_M"]) {
                if arch_falcon {
                    t = if i < n / 16 {
                        G::Q6_K
                    } else if use_more_bits(i, n) {
                        G::Q5_K
                    } else {
                        G::Q4_K
                    };
                } else if use_more_bits(i, n) {
                    t = G::Q6_K;
                }
            } else if i < n / 8 && self.is(&["IQ4_NL", "IQ4_XS"]) {
                t = G::Q5_K;
            } else if self.is(&["Q5_K_M"]) && use_more_bits(i, n) {
                t = G::Q6_K;
            } else if self.is(&["Q4_K_S"]) && !arch_falcon && i < n / 8 {
                t = G::Q5_K;
            }
            self.i_ffn_down += 1;
        } else if cat == Category::AttnOutput {
            if !arch_falcon {
                if f.n_expert == 8 {
                    if self.is(&[
                        "Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S",
                        "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS",
                    ]) {
                        t = G::Q5_K;
                    }
                } else if self.is(&["Q2_K"]) {
                    t = G::Q3_K;
                } else if self.is(&["IQ3_XXS"]) {
                    t = G::IQ3_S;
                } else if self.is(&["Q3_K_M", "IQ3_M"]) {
                    t = G::Q4_K;
                } else if self.is(&["Q3_K_L"]) {
                    t = G::Q5_K;
                }
            } else if self.is(&["Q3_K_L"]) {
                t = G::Q4_K;
            }
        } else if cat == Category::AttnQkv {
            if self.is(&["Q3_K_M", "Q3_K_L", "IQ3_M"]) {
                t = G::Q4_K;
            } else if self.is(&["Q4_K_M"]) {
                t = G::Q5_K;
            } else if self.is(&["Q5_K_M"]) {
                t = G::Q6_K;
            }
        } else if cat == Category::FfnGate || cat == Category::FfnUp {
            let counter = if cat == Category::FfnGate {
                self.i_ffn_gate
            } else {
                self.i_ffn_up
            };
            let (i, n) = self.layer_info(counter, name);
            if self.is(&["IQ3_XS"]) && i >= n / 8 && i < 7 * n / 8 {
                t = G::IQ3_XXS;
            }
            if cat == Category::FfnGate {
                self.i_ffn_gate += 1;
            } else {
                self.i_ffn_up += 1;
            }
        }
        t
    }
}

/// llama.cpp's shape fallback: a type whose block does not divide the row length is replaced
/// by a compatible one (Q4_K → Q5_0, Q6_K → Q8_0, …; F16 when nothing fits).
pub fn fallback(t: GgmlType, ncols: u64) -> GgmlType {
    use GgmlType as G;
    if ncols.is_multiple_of(t.block_size()) {
        return t;
    }
    let r = match t {
        G::IQ1_S
        | G::IQ1_M
        | G::IQ2_XXS
        | G::IQ2_XS
        | G::IQ2_S
        | G::IQ3_XXS
        | G::IQ3_S
        | G::IQ4_XS => G::IQ4_NL,
        G::Q2_0 | G::Q2_K | G::Q3_K | G::TQ1_0 | G::TQ2_0 => G::Q4_0,
        G::Q4_K => G::Q5_0,
        G::Q5_K => G::Q5_1,
        G::Q6_K => G::Q8_0,
        other => other,
    };
    if ncols.is_multiple_of(r.block_size()) {
        r
    } else {
        G::F16
    }
}

/// The type each tensor gets under `target`, in the order of `tensors`.
///
/// Rules that count tensors (attention V "more bits" layers, `ffn_down` layers) walk the
/// tensors in llama.cpp's order (by layer, then name), whatever order the file has.
pub fn plan_types(tensors: &[PlanInput<'_>], facts: &ModelFacts, target: Target) -> Vec<GgmlType> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (na, nb) = (tensors[a].name, tensors[b].name);
        (layer_of(na), na).cmp(&(layer_of(nb), nb))
    });
    let mut st = State {
        facts,
        ftype: target.ftype.name,
        has_tied_embeddings: !tensors.iter().any(|t| category(t.name) == Category::Output),
        n_attention_wv: tensors
            .iter()
            .filter(|t| is_attn_v_like(category(t.name)))
            .count() as i64,
        i_attention_wv: 0,
        n_ffn: facts.n_layer as i64,
        i_ffn_down: 0,
        i_ffn_gate: 0,
        i_ffn_up: 0,
    };
    let default = target.ftype.default_type;
    let mut out = vec![GgmlType::F32; tensors.len()];
    for i in order {
        let t = &tensors[i];
        out[i] = if !allows_quantization(t.name, t.shape) {
            t.ty
        } else if !default.is_quantized() {
            default
        } else {
            let chosen = if target.pure {
                default
            } else {
                st.rule(default, t.name, t.shape, category(t.name))
            };
            fallback(chosen, t.shape[0])
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases_parse() {
        assert_eq!(Target::parse("q4_k_m", false).unwrap().ftype.id, 15);
        assert_eq!(Target::parse("Q4_K", false).unwrap().ftype.name, "Q4_K_M");
        assert_eq!(
            Target::parse("f16", true).unwrap().ftype.default_type,
            GgmlType::F16
        );
        let err = Target::parse("Q4_K_X", false).unwrap_err().to_string();
        assert!(err.contains("Q4_K_M"), "{err}");
    }

    #[test]
    fn fallbacks_follow_llama_cpp() {
        assert_eq!(fallback(GgmlType::Q4_K, 640), GgmlType::Q5_0);
        assert_eq!(fallback(GgmlType::Q6_K, 576), GgmlType::Q8_0);
        assert_eq!(fallback(GgmlType::Q5_K, 576), GgmlType::Q5_1);
        assert_eq!(fallback(GgmlType::IQ4_XS, 576), GgmlType::IQ4_NL);
        assert_eq!(fallback(GgmlType::Q4_K, 100), GgmlType::F16);
        assert_eq!(fallback(GgmlType::Q8_0, 100), GgmlType::F16);
        assert_eq!(fallback(GgmlType::Q4_K, 2048), GgmlType::Q4_K);
    }

    #[test]
    fn norms_and_vectors_keep_their_type() {
        assert!(!allows_quantization("blk.0.attn_norm.weight", &[576, 1]));
        assert!(!allows_quantization("blk.0.attn_q.bias", &[576, 2]));
        assert!(!allows_quantization("output_norm.weight", &[576]));
        assert!(allows_quantization("blk.0.attn_q.weight", &[576, 576]));
    }
}
