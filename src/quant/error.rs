//! Errors of the quant layer.

use crate::format::GgmlType;

/// A tensor could not be converted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuantError {
    /// The source type has no dequantizer.
    #[error("tensor {tensor:?}: cannot dequantize type {ty} (integer or internal type)")]
    CannotDequantize {
        /// The tensor.
        tensor: String,
        /// Its type.
        ty: GgmlType,
    },
    /// The target type cannot be produced for this tensor.
    #[error("tensor {tensor:?}: cannot quantize to {ty}: {reason}")]
    CannotQuantize {
        /// The tensor.
        tensor: String,
        /// The target type.
        ty: GgmlType,
        /// Why.
        reason: String,
    },
    /// A value is NaN or infinite.
    #[error("tensor {tensor:?}: element {index} is {value} (NaN/Inf weights cannot be quantized; the file is probably corrupt)")]
    NonFinite {
        /// The tensor.
        tensor: String,
        /// Element index.
        index: u64,
        /// The value.
        value: f32,
    },
    /// Finite values too large for the type (F16 holds ±65504; block scales are F16 too).
    #[error("tensor {tensor:?}: values up to {max:e} in magnitude do not fit in {ty}")]
    OutOfRange {
        /// The tensor.
        tensor: String,
        /// The type.
        ty: GgmlType,
        /// The largest magnitude.
        max: f32,
    },
    /// Buffer sizes disagree with the shape.
    #[error("tensor {tensor:?}: data is {found} bytes, expected {expected}")]
    SizeMismatch {
        /// The tensor.
        tensor: String,
        /// Expected bytes.
        expected: u64,
        /// Bytes found.
        found: u64,
    },
    /// A target type or mixture name is unknown.
    #[error("unknown quantization type {name:?}; known: {known}")]
    UnknownTarget {
        /// The name given.
        name: String,
        /// The names that are accepted.
        known: String,
    },
}
