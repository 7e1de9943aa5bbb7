//! ggmerge merges fine-tuned language models directly on GGUF — quantized or not — and writes
//! quantized GGUF that llama.cpp loads.
//!
//! Layers, lowest first (each depends only on those below it):
//!
//! - [`format`](mod@format) — GGUF reading (zero-copy, validated, split models) and streaming writing; the
//!   table of ggml types.
//! - [`merge`] — merge configs (mergekit YAML, TOML), the Philox mask RNG, and the streaming
//!   per-tensor merge engine.
//! - [`delta`] — sparse delta packs (`.dpk.gguf`): format, reader, base fingerprint.
//! - [`quant`] — dequantize/quantize through ggml (bit-exact), llama.cpp's mixtures (`Q4_K_M`…).
//! - [`runtime`] — llama.cpp at run time: load a base, overwrite weight tensors in memory,
//!   generate, perplexity.
//! - [`flows`] — the user-facing operations — [`inspect`], [`quantize_model`] — that the `ggmerge`
//!   binary wraps.
//!
//! ```no_run
//! use ggmerge::{inspect, quantize_model, NoProgress, QuantizeOptions};
//! use ggmerge::quant::Target;
//!
//! let summary = inspect("model.gguf")?;
//! println!("{} parameters, {:.2} bits/weight", summary.n_params, summary.bits_per_weight);
//! let opts = QuantizeOptions { target: Target::parse("Q8_0", false)?, threads: None };
//! quantize_model("model.gguf".as_ref(), "model-q8_0.gguf".as_ref(), &opts, &NoProgress)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod delta;
pub mod error;
pub mod flows;
pub mod format;
pub mod merge;
pub mod progress;
pub mod quant;
pub mod runtime;
pub mod threads;

pub use error::{Error, Result};
pub use flows::convert::{convert_model, ConvertOptions, ConvertReport};
pub use flows::inspect::{inspect, ModelSummary};
pub use flows::merge::{merge_models, MergeOptions, MergeReport};
pub use flows::progress::{NoProgress, Progress};
pub use flows::quantize::{quantize_model, QuantizeOptions, QuantizeReport};
