//! GGUF header parser: bytes → [`Header`], validating every count, length and offset before
//! trusting it.
//!
//! Checks, in order (as the `safetensors` crate does): enough bytes for each field → counts
//! bounded by the bytes left (so a hostile count cannot make a huge allocation) → checked
//! arithmetic → UTF-8 → known types → tensor sizes via [`nbytes`] → data offsets contiguous,
//! aligned, and inside the file. Only a [`Header`] that passed all of them is handed out.

use std::path::{Path, PathBuf};

use super::value::{Array, Metadata, StringArray, Value, ValueType};
use crate::format::error::{FormatError, Result};
use crate::format::ggml_type::{nbytes, GgmlType};

/// GGUF magic bytes.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Default data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's limit on tensor dimensions.
pub const MAX_DIMS: usize = 4;
/// ggml's limit on tensor name length in bytes (`GGML_MAX_NAME` − 1).
pub const MAX_NAME_LEN: usize = 63;
/// Most list entries reserved up front from a count read from the file. Bounding a count by the
/// bytes left still lets one hostile count in a multi-GB file reserve several times the file's
/// size; past this, lists grow only as entries are actually read.
const MAX_PREALLOC: usize = 4096;

/// One tensor's header entry, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Tensor name (≤ 63 bytes).
    pub name: String,
    /// Shape in ggml order: `shape[0]` is the row length (innermost). 1–4 dims, none zero.
    pub shape: Vec<u64>,
    /// Storage type.
    pub ty: GgmlType,
    /// Data offset relative to the start of the data section.
    pub offset: u64,
    /// Data size in bytes.
    pub nbytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        // Validated at parse time not to overflow.
        self.shape.iter().product()
    }
    /// Row length (`ne[0]`).
    pub fn row_len(&self) -> u64 {
        self.shape[0]
    }
    /// Number of rows (product of dims after the first).
    pub fn n_rows(&self) -> u64 {
        self.shape[1..].iter().product()
    }
}

/// A parsed, validated GGUF header.
#[derive(Clone, Debug)]
pub struct Header {
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Metadata,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    /// Data alignment.
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| FormatError::Truncated {
                path: self.path.to_path_buf(),
                what: what(),
                offset: self.pos as u64,
                needed: n,
                available: self.left(),
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count of items each at least `min_size` bytes: refused if they cannot fit in what is left.
    fn count(&mut self, min_size: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let offset = self.pos as u64;
        let count = self.u64(what)?;
        let need = count.checked_mul(min_size as u64);
        match need {
            Some(need) if need <= self.left() => Ok(count as usize),
            _ => Err(FormatError::ImpossibleCount {
                path: self.path.to_path_buf(),
                what: what(),
                count,
                offset,
                available: self.left(),
            }),
        }
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        self.str(what).map(str::to_string)
    }

    /// A string, borrowed from the file.
    fn str(&mut self, what: &dyn Fn() -> String) -> Result<&'a str> {
        let len = self.u64(what)?;
        let offset = self.pos as u64;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|_| FormatError::InvalidUtf8 {
            path: self.path.to_path_buf(),
            what: what(),
            offset,
        })
    }
}

fn scalars<T, const N: usize>(
    c: &mut Cursor<'_>,
    n: usize,
    what: &dyn Fn() -> String,
    f: fn([u8; N]) -> T,
) -> Result<Vec<T>> {
    let bytes = c.take((n as u64) * N as u64, what)?;
    Ok(bytes
        .chunks_exact(N)
        .map(|b| {
            let mut a = [0u8; N];
            a.copy_from_slice(b);
            f(a)
        })
        .collect())
}

fn bool_from(path: &Path, key: &str, b: u8) -> Result<bool> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(FormatError::BadValue {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason: format!("bool value must be 0 or 1, found {b}"),
        }),
    }
}

fn read_value(c: &mut Cursor<'_>, key: &str, ty: ValueType) -> Result<Value> {
    let what = || format!("value of metadata key {key:?}");
    Ok(match ty {
        ValueType::U8 => Value::U8(c.array::<1>(&what)?[0]),
        ValueType::I8 => Value::I8(c.array::<1>(&what)?[0] as i8),
        ValueType::U16 => Value::U16(u16::from_le_bytes(c.array(&what)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(c.array(&what)?)),
        ValueType::U32 => Value::U32(u32::from_le_bytes(c.array(&what)?)),
        ValueType::I32 => Value::I32(i32::from_le_bytes(c.array(&what)?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(c.array(&what)?)),
        ValueType::U64 => Value::U64(u64::from_le_bytes(c.array(&what)?)),
        ValueType::I64 => Value::I64(i64::from_le_bytes(c.array(&what)?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(c.array(&what)?)),
        ValueType::Bool => Value::Bool(bool_from(c.path, key, c.array::<1>(&what)?[0])?),
        ValueType::String => Value::String(c.string(&what)?),
        ValueType::Array => {
            let id = c.u32(&|| format!("array element type of metadata key {key:?}"))?;
            let elem = ValueType::from_id(id).ok_or_else(|| FormatError::UnknownValueType {
                path: c.path.to_path_buf(),
                key: key.to_string(),
                id,
            })?;
            if elem == ValueType::Array {
                return Err(FormatError::BadValue {
                    path: c.path.to_path_buf(),
                    key: key.to_string(),
                    reason: "nested arrays are not supported".into(),
                });
            }
            let what_n = || format!("array length of metadata key {key:?}");
            let n = c.count(elem.min_encoded_size(), &what_n)?;
            Value::Array(match elem {
                ValueType::U8 => Array::U8(scalars(c, n, &what, |[b]: [u8; 1]| b)?),
                ValueType::I8 => Array::I8(scalars(c, n, &what, |[b]: [u8; 1]| b as i8)?),
                ValueType::U16 => Array::U16(scalars(c, n, &what, u16::from_le_bytes)?),
                ValueType::I16 => Array::I16(scalars(c, n, &what, i16::from_le_bytes)?),
                ValueType::U32 => Array::U32(scalars(c, n, &what, u32::from_le_bytes)?),
                ValueType::I32 => Array::I32(scalars(c, n, &what, i32::from_le_bytes)?),
                ValueType::F32 => Array::F32(scalars(c, n, &what, f32::from_le_bytes)?),
                ValueType::U64 => Array::U64(scalars(c, n, &what, u64::from_le_bytes)?),
                ValueType::I64 => Array::I64(scalars(c, n, &what, i64::from_le_bytes)?),
                ValueType::F64 => Array::F64(scalars(c, n, &what, f64::from_le_bytes)?),
                ValueType::Bool => {
                    let raw = c.take(n as u64, &what)?;
                    Array::Bool(
                        raw.iter()
                            .map(|&b| bool_from(c.path, key, b))
                            .collect::<Result<_>>()?,
                    )
                }
                ValueType::String => {
                    let mut v = StringArray::with_capacity(n.min(MAX_PREALLOC), 0);
                    for _ in 0..n {
                        v.push(c.str(&what)?);
                    }
                    Array::String(v)
                }
                ValueType::Array => unreachable!("rejected above"),
            })
        }
    })
}

/// Parses and validates a GGUF header. `bytes` is the whole file (its length bounds the data).
pub fn parse_header(bytes: &[u8], path: &Path) -> Result<Header> {
    let mut c = Cursor {
        buf: bytes,
        pos: 0,
        path,
    };
    let magic = c.take(4, &|| "magic".into())?;
    if magic != MAGIC {
        return Err(FormatError::BadMagic {
            path: path.to_path_buf(),
            found: magic.to_vec(),
        });
    }
    let version = c.u32(&|| "version".into())?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(FormatError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
                hint: " (GGUF v1 used 32-bit counts; convert it with a current llama.cpp)",
            })
        }
        v if v != 0 && v.swap_bytes() <= 3 => {
            return Err(FormatError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
                hint:
                    " (this looks like a big-endian GGUF; only little-endian files are supported)",
            })
        }
        _ => {
            return Err(FormatError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
                hint: "",
            })
        }
    }
    // A tensor info is at least: name length 8 + n_dims 4 + one dim 8 + type 4 + offset 8.
    let n_tensors = c.count(32, &|| "tensor".into())?;
    // A key/value is at least: key length 8 + value type 4 + one byte of value.
    let n_kv = c.count(13, &|| "metadata key/value".into())?;

    let mut metadata = Metadata::new();
    let mut seen = std::collections::HashSet::with_capacity(n_kv.min(MAX_PREALLOC));
    for i in 0..n_kv {
        let key = c.string(&|| format!("key of metadata entry {i}"))?;
        if key.is_empty() {
            // gguf.cpp refuses empty keys, so llama.cpp cannot load such a file.
            return Err(FormatError::BadValue {
                path: path.to_path_buf(),
                key,
                reason: format!("metadata entry {i} has an empty key"),
            });
        }
        if !seen.insert(key.clone()) {
            return Err(FormatError::DuplicateKey {
                path: path.to_path_buf(),
                key,
            });
        }
        let id = c.u32(&|| format!("value type of metadata key {key:?}"))?;
        let ty = ValueType::from_id(id).ok_or_else(|| FormatError::UnknownValueType {
            path: path.to_path_buf(),
            key: key.clone(),
            id,
        })?;
        let value = read_value(&mut c, &key, ty)?;
        metadata.push_unchecked(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => u64::from(*a),
        Some(v) => {
            return Err(FormatError::BadValue {
                path: path.to_path_buf(),
                key: "general.alignment".into(),
                reason: format!("must be a u32 power of two, found {v:?}"),
            })
        }
    };

    let mut tensors = Vec::with_capacity(n_tensors.min(MAX_PREALLOC));
    let mut names = std::collections::HashSet::with_capacity(n_tensors.min(MAX_PREALLOC));
    for i in 0..n_tensors {
        let name = c.string(&|| format!("name of tensor {i}"))?;
        let bad = |reason: String| FormatError::BadTensor {
            path: path.to_path_buf(),
            name: name.clone(),
            reason,
        };
        if name.len() > MAX_NAME_LEN {
            return Err(bad(format!(
                "name is {} bytes, ggml allows at most {MAX_NAME_LEN}",
                name.len()
            )));
        }
        let n_dims = c.u32(&|| format!("dimension count of tensor {name:?}"))?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(bad(format!(
                "has {n_dims} dimensions, ggml allows 1 to {MAX_DIMS}"
            )));
        }
        let mut shape = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            shape.push(c.u64(&|| format!("shape of tensor {name:?}"))?);
        }
        if shape.contains(&0) {
            return Err(bad(format!("has a zero dimension in shape {shape:?}")));
        }
        // ggml stores sizes as int64: every product must fit in i64.
        let fits = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .is_some_and(|n| n <= i64::MAX as u64);
        if !fits {
            return Err(bad(format!("shape {shape:?} has more than 2^63 elements")));
        }
        let type_id = c.u32(&|| format!("type of tensor {name:?}"))?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| FormatError::UnknownTensorType {
            path: path.to_path_buf(),
            name: name.clone(),
            id: type_id,
        })?;
        let size = nbytes(&shape, ty).map_err(|e| bad(format!("{ty} shape {shape:?}: {e}")))?;
        let offset = c.u64(&|| format!("data offset of tensor {name:?}"))?;
        if !names.insert(name.clone()) {
            return Err(FormatError::DuplicateTensor {
                path: path.to_path_buf(),
                name,
            });
        }
        tensors.push(TensorInfo {
            name,
            shape,
            ty,
            offset,
            nbytes: size,
        });
    }

    let header_end = c.pos as u64;
    let data_offset = align_up(header_end, alignment).ok_or_else(|| FormatError::Truncated {
        path: path.to_path_buf(),
        what: "data section".into(),
        offset: header_end,
        needed: alignment,
        available: 0,
    })?;
    let file_len = bytes.len() as u64;
    if n_tensors > 0 && data_offset > file_len {
        return Err(FormatError::Truncated {
            path: path.to_path_buf(),
            what: "padding before the data section".into(),
            offset: header_end,
            needed: data_offset - header_end,
            available: file_len - header_end,
        });
    }

    // Data must be laid out as ggml writes it: in info order, each tensor padded to the
    // alignment, no gaps, no overlap (gguf.cpp refuses anything else).
    let mut expected = 0u64;
    for t in &tensors {
        if t.offset != expected {
            return Err(FormatError::BadOffset {
                path: path.to_path_buf(),
                name: t.name.clone(),
                found: t.offset,
                expected,
                alignment,
            });
        }
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.nbytes));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(FormatError::DataOutOfBounds {
                    path: path.to_path_buf(),
                    name: t.name.clone(),
                    end: end.unwrap_or(u64::MAX),
                    file_len,
                })
            }
        }
        expected = t
            .offset
            .checked_add(t.nbytes)
            .and_then(|e| align_up(e, alignment))
            .unwrap_or(u64::MAX);
    }

    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// `x` rounded up to a multiple of `align` (a power of two), checked.
pub fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

/// Helper for callers that want a `PathBuf` in errors from in-memory buffers.
pub fn memory_path() -> PathBuf {
    PathBuf::from("<memory>")
}
