//! [`MergeError`]: why a merge could not be planned or run — one variant per failure, naming
//! the file, tensor or parameter at fault. Errors of the layers below are kept as sources.

use std::path::PathBuf;

use crate::format::FormatError;
use crate::merge::config::ConfigError;
use crate::merge::method::Method;
use crate::quant::QuantError;
use crate::threads::ThreadsError;

/// A merge that cannot be planned or carried out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MergeError {
    /// The config is invalid.
    #[error("invalid merge config")]
    Config(#[from] ConfigError),
    /// Reading an input or writing the output failed.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A tensor of `path` (an input) could not be converted: a NaN weight, a bad type.
    #[error("{}", path.display())]
    Tensor {
        /// The input the tensor comes from.
        path: PathBuf,
        /// What failed.
        #[source]
        source: QuantError,
    },
    /// The output type name is not a ggml type or llama.cpp mixture.
    #[error("output type")]
    OutputType(#[source] QuantError),
    /// The method needs a base and none is given.
    #[error("merge method {method} needs a base model (base_model / --base)")]
    MissingBase {
        /// The method.
        method: Method,
    },
    /// Nothing to merge.
    #[error("no models to merge")]
    NoModels,
    /// SLERP takes exactly one model besides the base.
    #[error("slerp interpolates the base and exactly one model; {found} given")]
    SlerpModels {
        /// Models given.
        found: usize,
    },
    /// An input lacks a tensor of the base.
    #[error("{}: has no tensor {tensor:?} that the base {} has (architectures or tensor sets differ)", path.display(), base.display())]
    MissingTensor {
        /// The input.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The base.
        base: PathBuf,
    },
    /// A delta (pack) changes a tensor the base does not have.
    #[error("{}: has a delta for tensor {tensor:?}, which the base {} does not have", path.display(), base.display())]
    UnknownTensor {
        /// The pack.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The base.
        base: PathBuf,
    },
    /// An input's tensor has another shape than the base's.
    #[error("{}: tensor {tensor:?} has shape {shape:?}, the base has {base_shape:?}", path.display())]
    ShapeMismatch {
        /// The input.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its shape (ggml order).
        shape: Vec<u64>,
        /// The base's.
        base_shape: Vec<u64>,
    },
    /// A sparse delta keeps more values than its tensor has elements.
    #[error("{}: tensor {tensor:?} has {kept} kept values but the base tensor has {elements} elements", path.display())]
    KeptTooMany {
        /// The pack.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Kept values recorded.
        kept: u64,
        /// Elements of the base tensor.
        elements: u64,
    },
    /// An input is of another architecture than the base.
    #[error("{}: architecture {arch} does not match the base's {base_arch} ({})", path.display(), base.display())]
    ArchitectureMismatch {
        /// The input.
        path: PathBuf,
        /// Its architecture.
        arch: String,
        /// The base's.
        base_arch: String,
        /// The base.
        base: PathBuf,
    },
    /// GGUF output needs a GGUF base (for metadata and tokenizer).
    #[error("GGUF output takes its metadata and tokenizer from a GGUF base, but the base {} is safetensors; write .safetensors output, or use a GGUF base", base.display())]
    GgufOutputNeedsGgufBase {
        /// The base.
        base: PathBuf,
    },
    /// safetensors output needs Hugging Face names for the base's architecture.
    #[error("{}: safetensors output needs an architecture ggmerge maps to Hugging Face names ({supported})", base.display())]
    NoHfNames {
        /// The base.
        base: PathBuf,
        /// The architectures that are mapped.
        supported: String,
    },
    /// safetensors output of a type it cannot hold.
    #[error("safetensors output is F32, F16 or BF16, not {ty}")]
    SafetensorsType {
        /// The type asked for.
        ty: String,
    },
    /// A per-model parameter resolved for a tensor is out of range.
    #[error("model {model}: {name} {value:?} for tensor {tensor:?} {reason}")]
    Parameter {
        /// The model as written in the config.
        model: String,
        /// The tensor.
        tensor: String,
        /// The parameter.
        name: &'static str,
        /// Its value there.
        value: f64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The merged values overflow although every input is finite: the parameters' fault.
    #[error("tensor {tensor:?}: {what}, although every input value there is finite: the merge's parameters push the result out of range (weight {weights}; lambda {lambda:?}); use weights and lambda of ordinary size (around 1)")]
    Overflow {
        /// The tensor.
        tensor: String,
        /// What overflowed (`merged element 7 is inf`, `merged values reach 1e9 …`).
        what: String,
        /// Each model's weight there, with the model.
        weights: String,
        /// λ there.
        lambda: f32,
    },
    /// A tensor's size overflows (absurd shape and type).
    #[error("tensor {tensor:?} as {ty}: {reason}")]
    Size {
        /// The tensor.
        tensor: String,
        /// The type.
        ty: String,
        /// Why.
        reason: String,
    },
    /// An input tensor that was planned could not be read back.
    #[error("{}: tensor {tensor:?} vanished", path.display())]
    Vanished {
        /// The input.
        path: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// The thread that writes the output stopped (its error, if any, is reported instead).
    #[error("the output writer stopped")]
    WriterStopped,
    /// The thread pool could not be made.
    #[error(transparent)]
    Threads(#[from] ThreadsError),
}

/// Result of the merge layer.
pub type Result<T, E = MergeError> = std::result::Result<T, E>;
