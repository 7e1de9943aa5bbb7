//! A tiny llama-architecture model with random weights, written as GGUF by ggmerge's own
//! writer, with SmolLM2's tokenizer: small enough that llama.cpp trains it in seconds
//! (`ggmerge finetune` needs every tensor in F32, which these are).
//!
//! It has a separate `output.weight` (no tied embeddings), because llama.cpp's training leaves
//! `token_embd.weight` frozen: with an output matrix of its own the output layer is trained.

use std::path::Path;

use ggmerge::format::gguf::{GgufModel, GgufWriter, Metadata, TensorSpec, Value};
use ggmerge::format::GgmlType;

use super::experts::Noise;

/// Hyper-parameters of a tiny llama.
#[derive(Clone, Copy, Debug)]
pub struct TinyLlama {
    /// Transformer blocks.
    pub blocks: u32,
    /// Embedding width.
    pub n_embd: u32,
    /// Attention heads (and KV heads: no grouped-query attention).
    pub heads: u32,
    /// Feed-forward width.
    pub n_ff: u32,
    /// Context length written as `llama.context_length`.
    pub n_ctx_train: u32,
    /// Standard deviation of the random matrices (norms are 1).
    pub scale: f32,
    /// PRNG seed of the weights.
    pub seed: u64,
}

impl Default for TinyLlama {
    fn default() -> TinyLlama {
        TinyLlama {
            blocks: 2,
            n_embd: 64,
            heads: 4,
            n_ff: 192,
            n_ctx_train: 2048,
            scale: 0.02,
            seed: 1,
        }
    }
}

impl TinyLlama {
    /// Writes the model to `out`: llama hyper-parameters, every `tokenizer.*` key of
    /// `tokenizer_from` (a real llama-architecture GGUF, e.g. SmolLM2), all tensors F32.
    pub fn write(&self, tokenizer_from: &Path, out: &Path) {
        let src = GgufModel::open(tokenizer_from).expect("tokenizer source");
        let n_vocab = match src.metadata().get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len() as u64,
            _ => panic!("{} has no tokenizer.ggml.tokens", tokenizer_from.display()),
        };
        let mut meta = Metadata::new();
        let s = |v: &str| Value::String(v.into());
        meta.set("general.architecture", s("llama"));
        meta.set("general.type", s("model"));
        meta.set("general.name", s("tiny-llama-test"));
        meta.set("general.file_type", Value::U32(0)); // ALL_F32
        let arch = |k: &str| format!("llama.{k}");
        meta.set(arch("vocab_size"), Value::U32(n_vocab as u32));
        meta.set(arch("context_length"), Value::U32(self.n_ctx_train));
        meta.set(arch("embedding_length"), Value::U32(self.n_embd));
        meta.set(arch("block_count"), Value::U32(self.blocks));
        meta.set(arch("feed_forward_length"), Value::U32(self.n_ff));
        meta.set(arch("attention.head_count"), Value::U32(self.heads));
        meta.set(arch("attention.head_count_kv"), Value::U32(self.heads));
        meta.set(
            arch("rope.dimension_count"),
            Value::U32(self.n_embd / self.heads),
        );
        meta.set(arch("rope.freq_base"), Value::F32(10000.0));
        meta.set(arch("attention.layer_norm_rms_epsilon"), Value::F32(1e-5));
        // The chat template is left out: nothing here chats, and it names SmolLM2.
        for (k, v) in src.metadata().iter() {
            if k.starts_with("tokenizer.") && k != "tokenizer.chat_template" {
                meta.set(k, v.clone());
            }
        }

        let (e, f) = (u64::from(self.n_embd), u64::from(self.n_ff));
        let mut specs = vec![
            ("token_embd.weight".to_string(), vec![e, n_vocab]),
            ("output_norm.weight".to_string(), vec![e]),
            ("output.weight".to_string(), vec![e, n_vocab]),
        ];
        for b in 0..self.blocks {
            for (t, shape) in [
                ("attn_norm", vec![e]),
                ("attn_q", vec![e, e]),
                ("attn_k", vec![e, e]),
                ("attn_v", vec![e, e]),
                ("attn_output", vec![e, e]),
                ("ffn_norm", vec![e]),
                ("ffn_gate", vec![e, f]),
                ("ffn_up", vec![e, f]),
                ("ffn_down", vec![f, e]),
            ] {
                specs.push((format!("blk.{b}.{t}.weight"), shape));
            }
        }
        let specs: Vec<TensorSpec> = specs
            .into_iter()
            .map(|(name, shape)| TensorSpec {
                name,
                shape,
                ty: GgmlType::F32,
            })
            .collect();
        let mut w = GgufWriter::create(out, 3, &meta, &specs, &[tokenizer_from])
            .expect("create the tiny model");
        let mut noise = Noise::new(self.seed);
        for spec in &specs {
            let n: u64 = spec.shape.iter().product();
            let bytes: Vec<u8> = (0..n)
                .flat_map(|_| {
                    let x = if spec.shape.len() == 1 {
                        1.0
                    } else {
                        self.scale * noise.normal()
                    };
                    x.to_le_bytes()
                })
                .collect();
            w.write_tensor(&bytes).expect("write a tensor");
        }
        w.finish().expect("finish the tiny model");
    }
}
