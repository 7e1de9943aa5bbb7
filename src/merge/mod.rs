//! Merging: configuration, masks, and the per-tensor engine. Sits on `quant` and `format`.
//!
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
//!
//! The user-facing flow that plans a whole merge and writes the file is
//! [`crate::flows::merge`].

pub mod config;
pub mod engine;
pub mod kernel;
pub mod mask;
pub mod measure;
pub mod method;
pub mod select;
mod simd;
