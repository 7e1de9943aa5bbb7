//! The llama.cpp runtime: load a model with llama.cpp's own loader, overwrite its weight tensors
//! in memory, generate, measure perplexity and fine-tune, and run a base with expert packs
//! applied at load time and switched while running ([`experts`]). The only module with
//! llama.cpp *context* FFI (the ggml quantization FFI is in [`crate::quant::ggml`]); everything
//! here is behind a small safe API. The top library layer below the flows: it may import every
//! other layer (mixtures are planned and computed by [`crate::merge`] over packs of
//! [`crate::delta`]), never `flows`.
//!
//! - [`Model`] — a GGUF model loaded by `llama_model_load_from_file` without mmap (mmap'd CPU
//!   weights are read-only), with its vocabulary and chat template. Owns the `llama_model`.
//! - [`WeightMap`] / [`WeightTensor`] — the model's weight tensors, found through the public API
//!   only: a throwaway context's `cb_eval` records every `*.weight` source of a one-token
//!   decode ([`weights`]). From [`Model::weights`].
//! - [`Session`] — a `llama_context` borrowing the model: [`Session::set_weight`] (whole-tensor
//!   `ggml_backend_tensor_set`, then the memory is cleared), [`Session::logits_for`],
//!   [`Session::generate`] ([`generate`]), [`Session::perplexity`] ([`perplexity`], the
//!   chunking of llama-perplexity), [`Session::score_answer`] ([`answer`]: greedy exact match
//!   and log-likelihood of a short answer, for knowledge evaluations).
//! - [`experts`] — [`ExpertSession`]: a session whose weights are the base plus a weighted
//!   mixture of delta packs, switchable in place, recent mixtures cached.
//! - [`train`] — full fine-tuning of a loaded model with llama.cpp's training API (AdamW):
//!   [`train::train`] with [`TrainOptions`], progress as [`TrainEvent`]s, a [`TrainReport`]
//!   of loss and accuracy per epoch; [`train::save`].
//! - [`backend`] — `llama_backend_init` once and the log sink (quiet unless
//!   `GGMERGE_LLAMA_LOG=1`; the last error is kept per thread).
//! - [`RuntimeError`] — every failure, naming the file, tensor or sizes concerned.
//!
//! ```no_run
//! use ggmerge::runtime::{GenerateOptions, Model, ModelOptions, SessionOptions};
//!
//! let model = Model::load("model.gguf", &ModelOptions::default())?;
//! println!("{} weight tensors", model.weights()?.len());
//! let mut session = model.session(&SessionOptions { n_ctx: 2048, ..Default::default() })?;
//! let out = session.generate("The capital of France is", &GenerateOptions::default())?;
//! println!("{}", out.text);
//! # Ok::<(), ggmerge::runtime::RuntimeError>(())
//! ```

pub mod answer;
pub mod backend;
mod context;
pub mod error;
pub mod experts;
pub mod generate;
pub mod model;
pub mod perplexity;
pub mod session;
pub mod train;
pub mod weights;

pub use answer::AnswerScore;
pub use error::RuntimeError;
pub use experts::{Expert, ExpertSession, SwitchReport};
pub use generate::{GenerateOptions, Generation, StopReason};
pub use model::{ChatMessage, Model, ModelOptions, Placement, Token};
pub use perplexity::Perplexity;
pub use session::{Session, SessionOptions};
pub use train::{TrainError, TrainEvent, TrainOptions, TrainReport};
pub use weights::{WeightMap, WeightTensor};
