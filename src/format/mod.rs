//! File formats: the bottom layer. Knows bytes, not math.
//!
//! - [`ggml_type`] — the table of ggml tensor types and the one checked [`nbytes`].
//! - [`gguf`] — GGUF reading (zero-copy, validated, split models) and streaming writing.
//! - [`hf_names`] — Hugging Face ↔ GGUF tensor names and llama.cpp's conversion transforms.
//! - [`safetensors`](mod@safetensors) — safetensors models (single, sharded, HF directory) as
//!   sources, and a streaming writer.
//! - [`source`] — [`source::ModelSource`], a model as merge input (GGUF or other formats).
//! - [`output`] — temporary-file-then-rename outputs that refuse to overwrite inputs.
//! - [`stream`] — a writer thread that writes an output's parts while the next are computed.
//! - [`error`] — [`FormatError`], one variant per failed check.
//!
//! Nothing here depends on a higher layer (quant, merge, …).

pub mod error;
pub mod ggml_type;
pub mod gguf;
pub mod hf_names;
mod mmap;
pub mod output;
pub mod safetensors;
pub mod source;
pub mod stream;

pub use error::FormatError;
pub use ggml_type::{nbytes, GgmlType};
