//! Errors of the format layer: one variant per failed check, each naming the file and, where
//! there is one, the tensor or key and the byte offset.

use std::path::PathBuf;

/// A GGUF file (or an output file) could not be read, validated or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// An I/O call failed.
    #[error("{}: {what}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file ends before a field that the header says is there.
    #[error("{}: truncated: {what} at byte {offset} needs {needed} bytes, file has {available} left", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The field.
        what: String,
        /// Its offset.
        offset: u64,
        /// Bytes it needs.
        needed: u64,
        /// Bytes left in the file.
        available: u64,
    },
    /// The first four bytes are not `GGUF`.
    #[error("{}: not a GGUF file (magic {found:02x?}, expected \"GGUF\")", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The bytes found.
        found: Vec<u8>,
    },
    /// Only GGUF versions 2 and 3 (little-endian) are read.
    #[error("{}: unsupported GGUF version {version}{hint}", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version field as read little-endian.
        version: u32,
        /// Extra advice (big-endian files, version 1).
        hint: &'static str,
    },
    /// A count cannot be right: it needs more bytes than the file has left.
    #[error("{}: {what} count {count} at byte {offset} is impossible: the file has only {available} bytes left", path.display())]
    ImpossibleCount {
        /// The file.
        path: PathBuf,
        /// What is counted.
        what: String,
        /// The count read.
        count: u64,
        /// Its offset.
        offset: u64,
        /// Bytes left.
        available: u64,
    },
    /// A string is not valid UTF-8.
    #[error("{}: {what} at byte {offset} is not valid UTF-8", path.display())]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// The field.
        what: String,
        /// Its offset.
        offset: u64,
    },
    /// A metadata value has an unknown type id.
    #[error("{}: metadata key {key:?} has unknown value type {id}", path.display())]
    UnknownValueType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The type id.
        id: u32,
    },
    /// A metadata value is malformed (nested array, bool not 0/1, wrong type for a known key).
    #[error("{}: metadata key {key:?}: {reason}", path.display())]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The same metadata key appears twice.
    #[error("{}: duplicate metadata key {key:?}", path.display())]
    DuplicateKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// The same tensor name appears twice.
    #[error("{}: duplicate tensor {name:?}", path.display())]
    DuplicateTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
    },
    /// A tensor's info is invalid (name too long, too many dims, zero dim, bad size).
    #[error("{}: tensor {name:?}: {reason}", path.display())]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor has a type id that is removed from ggml or unknown.
    #[error("{}: tensor {name:?} has unknown or removed ggml type id {id} (known: 0-3, 6-30, 34, 35, 39-42)", path.display())]
    UnknownTensorType {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The type id.
        id: u32,
    },
    /// A tensor's data offset is not where the layout puts it (misaligned, overlapping, gaps).
    #[error("{}: tensor {name:?} has data offset {found}, expected {expected} (data must be contiguous and aligned to {alignment} bytes)", path.display())]
    BadOffset {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Offset in the file, relative to the data section.
        found: u64,
        /// Where it must be.
        expected: u64,
        /// The alignment.
        alignment: u64,
    },
    /// Tensor data runs past the end of the file.
    #[error("{}: tensor {name:?} data ends at byte {end}, past the end of the file ({file_len} bytes); the file is truncated", path.display())]
    DataOutOfBounds {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Absolute end offset.
        end: u64,
        /// The file's length.
        file_len: u64,
    },
    /// A split model's shards do not fit together.
    #[error("{}: split model: {reason}", path.display())]
    Split {
        /// The shard.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A write was asked for that would be invalid (wrong data size, out of order, overwrite).
    #[error("{}: {reason}", path.display())]
    Write {
        /// The output file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An input changed while it was being read (another process truncated or rewrote it):
    /// the output would mix old and new bytes, so it is not written.
    #[error("{}: the input changed while ggmerge was reading it ({detail}); no output was written — run again once nothing else writes to it", path.display())]
    InputChanged {
        /// The input.
        path: PathBuf,
        /// What changed.
        detail: String,
    },
    /// The thread writing an output stopped (its own error, if any, is reported instead).
    #[error("the output writer stopped")]
    WriterStopped,
    /// A `config.json` or `model.safetensors.index.json` is invalid or names an unsupported
    /// architecture.
    #[error("{}: {reason}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A safetensors header is invalid (bad JSON, offsets, sizes), or a model directory lacks the
    /// files a safetensors model needs.
    #[error("{}: not a valid safetensors model: {reason}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A safetensors tensor has a dtype ggmerge does not read (only F32, F16 and BF16).
    #[error("{}: tensor {name:?} has dtype {dtype}; only F32, F16 and BF16 are supported", path.display())]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor (HF name).
        name: String,
        /// The dtype as written in the header.
        dtype: String,
    },
    /// A tensor has no counterpart name in the other format for this architecture.
    #[error("{}: tensor {name:?} has no {target} name for architecture {arch:?}", path.display())]
    UnmappedTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The architecture (GGUF spelling).
        arch: String,
        /// `GGUF` or `Hugging Face`.
        target: &'static str,
    },
}

/// Result of the format layer.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
