//! ggmerge merges fine-tuned language models directly on GGUF — quantized or not — and on
//! safetensors, writes quantized GGUF that llama.cpp loads, ships fine-tunes as sparse delta
//! packs, and applies them to a base at load time with llama.cpp, switchable while running.
//!
//! Layers, lowest first; each imports only those below it (and the shared [`threads`] and
//! [`progress`] utilities):
//!
//! - [`format`](mod@format) — files: GGUF reading (zero-copy, validated, split models) and
//!   streaming writing, safetensors, Hugging Face names, the table of ggml types, outputs
//!   written atomically. Knows bytes, not math.
//! - [`quant`] — dequantize/quantize through ggml (bit-exact), llama.cpp's mixtures
//!   (`Q4_K_M`…).
//! - [`merge`] — the method vocabulary, merge configs (mergekit YAML, TOML), the Philox mask
//!   RNG, the streaming per-tensor engine, and planning and running a whole merge.
//! - [`delta`] — sparse delta packs (`.dpk.gguf`): format, writer, extraction, and opening a
//!   merge's inputs with packs among them.
//! - [`runtime`] — llama.cpp at run time: load a base, overwrite weight tensors in memory,
//!   experts applied and switched live ([`runtime::ExpertSession`]), generate, perplexity,
//!   fine-tuning.
//! - [`flows`] — the user-facing operations — [`inspect`], [`quantize_model`],
//!   [`convert_model`], [`merge_models`], [`flows::extract::extract_delta`],
//!   [`flows::finetune::finetune`] — each a few lines over the layers; the `ggmerge` binary
//!   wraps them.
//!
//! Errors: each layer has its own ([`format::FormatError`], [`quant::QuantError`],
//! [`merge::MergeError`] with [`merge::config::ConfigError`] as a source,
//! [`delta::DeltaError`], [`runtime::RuntimeError`]); the flows return [`Error`], which keeps
//! them as they are. Print the chain (`{:#}` with anyhow) to see the cause.
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
pub mod serve;
pub mod threads;

pub use error::{Error, Result};
pub use flows::convert::{convert_model, ConvertOptions, ConvertReport};
pub use flows::inspect::{inspect, ModelSummary};
pub use flows::merge::{merge_models, MergeOptions, MergeReport};
pub use flows::progress::{NoProgress, Progress};
pub use flows::quantize::{quantize_model, QuantizeOptions, QuantizeReport};
