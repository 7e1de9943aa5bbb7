//! [`DeltaError`]: why a delta pack could not be read, checked, written or extracted — naming
//! the pack, tensor or parameter. Errors of the layers below are kept as sources.

use std::path::PathBuf;

use crate::format::FormatError;
use crate::merge::MergeError;
use crate::quant::QuantError;
use crate::threads::ThreadsError;

/// A delta pack that cannot be used or made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaError {
    /// The file is not a well-formed pack.
    #[error("{}: not a valid delta pack: {reason}", path.display())]
    NotAPack {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The pack's data does not match its recorded checksum.
    #[error("{}: the pack's data does not match its checksum ({got}, recorded {recorded}): the file is corrupt or was changed after extraction; extract it again", path.display())]
    Checksum {
        /// The pack.
        path: PathBuf,
        /// The checksum of the data read.
        got: String,
        /// The checksum the pack records.
        recorded: String,
    },
    /// The pack was extracted against another base.
    #[error("{}: this delta pack was extracted against another base (fingerprint {fingerprint}), not {} (fingerprint {base_fingerprint}); apply it to the base it was made from", path.display(), base.display())]
    WrongBase {
        /// The pack.
        path: PathBuf,
        /// The base fingerprint it records.
        fingerprint: String,
        /// The base given.
        base: PathBuf,
        /// That base's fingerprint.
        base_fingerprint: String,
    },
    /// A tensor's recorded kept count disagrees with its mask, or an index lies outside it.
    #[error("{}: tensor {tensor:?}: {reason}", path.display())]
    BadTensor {
        /// The pack.
        path: PathBuf,
        /// The base tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor of `path` could not be converted (a NaN in a fine-tune, a value F16 cannot
    /// hold).
    #[error("{}", path.display())]
    Tensor {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: QuantError,
    },
    /// The density to extract at is outside (0, 1].
    #[error("density {value} is outside (0, 1]")]
    Density {
        /// The value given.
        value: f64,
    },
    /// Pack values can be F32, F16, BF16 or Q8_0 only.
    #[error("pack values must be f32, f16, bf16 or q8_0, not {ty}")]
    ValuesType {
        /// The type given.
        ty: String,
    },
    /// A tensor name too long for a pack (GGUF allows 63 bytes, with the `.dv` suffix).
    #[error(
        "tensor name {tensor:?} is too long for a pack (GGUF allows 63 bytes with the .dv suffix)"
    )]
    NameTooLong {
        /// The tensor.
        tensor: String,
    },
    /// Explicit indices are 32-bit: tensors of 2³² elements or more need DARE packs.
    #[error("tensor {tensor:?} has more than 2^32 elements; use --sparsify dare")]
    TooManyElements {
        /// The tensor.
        tensor: String,
    },
    /// The base of a pack must be GGUF (the runtime loads it with llama.cpp).
    #[error("{}: the base of a delta pack must be GGUF (the runtime loads it with llama.cpp)", path.display())]
    BaseNotGguf {
        /// The base given.
        path: PathBuf,
    },
    /// The fine-tune does not fit the base (tensors, shapes, architecture), or a merge of
    /// packs failed.
    #[error(transparent)]
    Merge(#[from] MergeError),
    /// Reading or writing a file failed.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The thread pool could not be made.
    #[error(transparent)]
    Threads(#[from] ThreadsError),
}

/// Result of the delta layer.
pub type Result<T, E = DeltaError> = std::result::Result<T, E>;
