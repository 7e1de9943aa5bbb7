//! Quantization: the codecs and llama.cpp's mixtures. Sits on `format`.
//!
//! - [`codec`] — dequantize / quantize / convert rows in parallel (ggml for block types).
//! - [`grid`] — on-grid requantization ([`Requant`]): merged values re-encoded on the base
//!   block's own grid (scales kept, only changed elements' codes moved), one table of block
//!   layouts ([`grid::GRIDS`]).
//! - [`mixture`] — llama.cpp's file types (`Q4_K_M`, …) as per-tensor type plans.
//! - [`ggml`] — the only ggml quantization FFI, behind a small safe API.
//! - [`error`] — [`QuantError`].
//!
//! The type table itself ([`crate::format::ggml_type::TYPES`]) lives in `format`, because
//! the parser needs block sizes; this layer supplies what its capability columns promise.

pub mod codec;
pub mod error;
pub mod ggml;
pub mod grid;
pub mod mixture;
pub mod q8_0;

pub use crate::format::ggml_type::{GgmlType, QuantizeSupport, TypeTraits, TYPES};
pub use codec::{convert, dequantize, quantize};
pub use error::QuantError;
pub use grid::Requant;
pub use mixture::{plan_types, ModelFacts, PlanInput, Target, FTYPES};
