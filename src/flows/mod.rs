//! The main flows as library calls; the CLI is a thin layer over them. Each is a few lines
//! over the layers below: no merge, pack or runtime logic lives here.
//!
//! - [`inspect`](inspect::inspect): summarize a GGUF model or pack.
//! - [`quantize_model`](quantize::quantize_model): requantize a model to a type or mixture.
//! - [`convert_model`](convert::convert_model): GGUF ↔ safetensors (HF names and transforms).
//! - [`extract_delta`](extract::extract_delta): a fine-tune → a sparse delta pack.
//! - [`merge_models`](merge::merge_models): merge fine-tunes (or packs) into a base.
//! - [`evaluate`](eval::evaluate): greedy exact match and answer log-likelihood on questions.
//! - [`finetune`](finetune::finetune): full fine-tuning of an F32 GGUF model on a text
//!   (llama.cpp's training API), written homologous to its base.
//! - [`facts`]: invented-fact datasets (training text, questions, held-out phrasing) for
//!   knowledge experts.
//! - [`progress`] — the [`Progress`](progress::Progress) callback.
//!
//! Experts at run time are [`crate::runtime::ExpertSession`].

pub mod convert;
pub mod eval;
pub mod extract;
pub mod facts;
pub mod finetune;
pub mod inspect;
pub mod merge;
pub mod progress;
pub mod quantize;
