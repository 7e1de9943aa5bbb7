//! Sparse delta packs (`.dpk.gguf`): one fine-tune stored as its DARE- (or magnitude-)
//! sparsified delta against a fingerprinted base. Sits on `merge` (the same sparsifiers and
//! masks) and `format` (a pack is a GGUF file, so GGUF tooling can read it).
//!
//! - [`pack`] — the format: keys, tensor naming, [`pack::DeltaPack`] (open and validate),
//!   [`pack::fingerprint`] of a base.
//!
//! Extraction and application are flows ([`crate::flows::extract`], and merges whose inputs
//! are packs: [`crate::flows::merge`]).

pub mod pack;
