//! Sparse delta packs (`.dpk.gguf`): one fine-tune stored as its DARE- (or magnitude-)
//! sparsified delta against a fingerprinted base. Sits on `merge` (the same sparsifiers, masks
//! and engine) and `format` (a pack is a GGUF file, so GGUF tooling can read it); may import
//! those and `quant`, never `runtime` or `flows`.
//!
//! - [`pack`] — the format: keys, tensor naming, [`pack::DeltaPack`] (open, validate, check
//!   against a base), [`pack::fingerprint`] of a base; packs are merge inputs
//!   ([`crate::merge::input::SparseSource`]).
//! - [`write`](mod@write) — [`write::PackWriter`]: tensors streamed to a scratch file, then
//!   the pack written header first.
//! - [`extract`](mod@extract) — a fine-tune → a pack, with the merge engine's sparsifiers.
//! - [`open`] — a merge's inputs from a config, packs recognized and checked.
//! - [`error`] — [`DeltaError`].

pub mod error;
pub mod extract;
pub mod open;
pub mod pack;
pub mod write;

pub use error::DeltaError;
pub use open::open_inputs;
