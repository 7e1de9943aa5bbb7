//! The library's top-level error: a format or quant error, with the file it concerns.

use std::path::PathBuf;

use crate::format::FormatError;
use crate::quant::QuantError;

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
    /// llama.cpp at run time failed (load, decode, tokenize, a weight write).
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    /// A request that cannot be carried out (bad option, unknown type name).
    #[error("{0}")]
    Invalid(String),
    /// Building the thread pool failed.
    #[error("cannot start {threads} threads: {reason}")]
    Threads {
        /// Threads asked for.
        threads: usize,
        /// Why.
        reason: String,
    },
}

/// Result of a ggmerge flow.
pub type Result<T, E = Error> = std::result::Result<T, E>;
