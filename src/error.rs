//! The flows' error ([`Error`]): each layer's error as it is (kept as the source, so a printed
//! chain reads `merging …: model.gguf: tensor "x": element 7 is NaN …`), plus the few failures
//! that belong to a flow itself (converting between formats, reading question files).
//! Lower layers never name this type.

use std::path::PathBuf;

use crate::delta::DeltaError;
use crate::format::FormatError;
use crate::merge::MergeError;
use crate::quant::QuantError;
use crate::runtime::RuntimeError;
use crate::threads::ThreadsError;

/// Any error of a ggmerge flow.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading, validating or writing a file failed.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A tensor of `path` could not be converted.
    #[error("{}", path.display())]
    Tensor {
        /// The file the tensor comes from.
        path: PathBuf,
        /// What failed.
        #[source]
        source: QuantError,
    },
    /// A type or mixture name is unknown, or a type cannot be produced.
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// A merge could not be planned or run.
    #[error(transparent)]
    Merge(#[from] MergeError),
    /// A delta pack could not be read, checked, written or extracted.
    #[error(transparent)]
    Delta(#[from] DeltaError),
    /// llama.cpp at run time failed (load, decode, tokenize, a weight write).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The thread pool could not be made.
    #[error(transparent)]
    Threads(#[from] ThreadsError),
    /// A model's architecture has no Hugging Face names (safetensors conversion).
    #[error("{}: architecture {arch:?} cannot be converted to safetensors (supported: {supported})", path.display())]
    NoHfNames {
        /// The model.
        path: PathBuf,
        /// Its architecture.
        arch: String,
        /// The architectures that are mapped.
        supported: String,
    },
    /// safetensors holds F32, F16 and BF16 only.
    #[error("safetensors output supports F32, F16 and BF16, not {ty}")]
    SafetensorsType {
        /// The type asked for.
        ty: String,
    },
    /// safetensors → GGUF needs a GGUF model for metadata and tokenizer.
    #[error("{}: GGUF output needs metadata and a tokenizer, which safetensors does not carry: give a GGUF base model to take them from (metadata_from / --metadata-from BASE.gguf)", path.display())]
    NeedsMetadataFrom {
        /// The safetensors input.
        path: PathBuf,
    },
    /// A converted model and the GGUF it takes metadata from are of different architectures.
    #[error("{} is a {arch} model but the base {} is {base_arch:?}", path.display(), base.display())]
    ArchitectureMismatch {
        /// The input.
        path: PathBuf,
        /// Its architecture.
        arch: String,
        /// The base.
        base: PathBuf,
        /// The base's architecture.
        base_arch: String,
    },
    /// A tensor of a converted model does not fit its base or its own data.
    #[error("{}: tensor {tensor:?}: {reason}", path.display())]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A training text is not UTF-8.
    #[error("{}: the training text is not UTF-8 (byte {offset})", path.display())]
    TrainingText {
        /// The file.
        path: PathBuf,
        /// The first byte that is not valid UTF-8.
        offset: usize,
    },
    /// A line of a question file is not a question.
    #[error("{}:{line}: {reason}", path.display())]
    Questions {
        /// The file.
        path: PathBuf,
        /// The line (1-based; 0 for the whole file).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// Scoring one question failed (it does not fit the context, …).
    #[error("line {line}")]
    Question {
        /// The question's line in its file (its position when not read from a file).
        line: usize,
        /// What failed.
        #[source]
        source: RuntimeError,
    },
}

/// Result of a ggmerge flow.
pub type Result<T, E = Error> = std::result::Result<T, E>;
