//! Merging: the method vocabulary, configuration, masks, the per-tensor engine, and planning
//! and running a whole merge. Sits on `quant` and `format` (may import those, never `delta`,
//! `runtime` or `flows`).
//!
//! - [`method`] — [`Method`](method::Method) and what it does: sparsifier, rescale, kind; one
//!   table.
//! - [`config`] — mergekit YAML / native TOML configs and per-tensor parameter resolution.
//! - [`mask`] — the Philox4x32-10 mask RNG (DESIGN.md "Mask RNG"): masks depend only on
//!   (seed, stream, tensor name, element index).
//! - [`select`] — exact top-k / rank-window selection over |δ| without sorting the tensor.
//! - [`kernel`] — per-chunk arithmetic: sparsify, sign election, combine, SLERP.
//! - [`measure`] — per-chunk measurements for the report (delta noise, retention) and the
//!   finiteness check, as fixed-order vectorizable reductions.
//! - `simd` — which path the hot loops take (AVX2 kernels or portable loops).
//! - [`engine`] — one tensor, streamed: statistics passes, then dequantize → merge →
//!   requantize chunk by chunk in parallel.
//! - [`input`] — a merge's open inputs: models and sparse deltas.
//! - [`plan`] — config + inputs → [`MergePlan`](plan::MergePlan): every tensor's output type,
//!   action and parameters.
//! - [`run`] — a plan → the output file (GGUF or safetensors), or tensors in memory.
//! - [`report`] — what a run measured: delta noise, kept shares, retention, advice.
//! - [`error`] — [`MergeError`].

pub mod config;
pub mod engine;
pub mod error;
pub mod input;
pub mod kernel;
pub mod mask;
pub mod measure;
pub mod method;
pub mod plan;
pub mod report;
pub mod run;
pub mod select;
mod simd;

pub use error::MergeError;
