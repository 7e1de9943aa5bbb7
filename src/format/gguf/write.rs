//! Streaming GGUF writer: the header (metadata and tensor infos, sizes known up front) is
//! written first, then each tensor's data in order with alignment padding, so a model is never
//! held in memory. Output goes through [`OutputFile`] (temporary file, renamed on success).

use std::path::Path;

use super::read::{align_up, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS, MAX_NAME_LEN};
use super::value::{Array, Metadata, Value};
use crate::format::error::{FormatError, Result};
use crate::format::ggml_type::{nbytes, GgmlType};
use crate::format::output::OutputFile;

/// A tensor to be written: name, shape (ggml order) and type.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    /// Name (≤ 63 bytes).
    pub name: String,
    /// Shape, `shape[0]` the row length.
    pub shape: Vec<u64>,
    /// Storage type.
    pub ty: GgmlType,
}

impl From<&super::read::TensorInfo> for TensorSpec {
    /// The spec of an existing tensor (to write a model with another's layout).
    fn from(t: &super::read::TensorInfo) -> TensorSpec {
        TensorSpec {
            name: t.name.clone(),
            shape: t.shape.clone(),
            ty: t.ty,
        }
    }
}

/// Writes one GGUF file tensor by tensor.
pub struct GgufWriter {
    out: OutputFile,
    sizes: Vec<u64>,
    names: Vec<String>,
    next: usize,
    alignment: u64,
    tensor_start: u64,
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.push(*x as u8),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(u8::from(*x)),
        Value::String(s) => put_str(buf, s),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Array(a) => {
            buf.extend_from_slice(&(a.element_type() as u32).to_le_bytes());
            buf.extend_from_slice(&(a.len() as u64).to_le_bytes());
            match a {
                Array::U8(v) => buf.extend_from_slice(v),
                Array::I8(v) => buf.extend(v.iter().map(|&x| x as u8)),
                Array::U16(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                Array::I16(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                Array::U32(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                Array::I32(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                Array::F32(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                Array::Bool(v) => buf.extend(v.iter().map(|&x| u8::from(x))),
                Array::String(v) => v.iter().for_each(|s| put_str(buf, s)),
                Array::U64(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                Array::I64(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
                Array::F64(v) => v
                    .iter()
                    .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
            }
        }
    }
}

/// Encodes a GGUF header (everything before the data section, without the final padding) and
/// returns it with the tensors' data sizes.
pub fn encode_header(
    version: u32,
    metadata: &Metadata,
    tensors: &[TensorSpec],
    path: &Path,
) -> Result<(Vec<u8>, Vec<u64>, u64)> {
    let err = |reason: String| FormatError::Write {
        path: path.to_path_buf(),
        reason,
    };
    if !(2..=3).contains(&version) {
        return Err(err(format!("cannot write GGUF version {version}")));
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => u64::from(*a),
        Some(v) => {
            return Err(err(format!(
                "general.alignment must be a u32 power of two, is {v:?}"
            )))
        }
    };
    let mut buf = Vec::with_capacity(1 << 16);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&version.to_le_bytes());
    buf.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata.iter() {
        if k.is_empty() {
            return Err(err("metadata keys must not be empty".into()));
        }
        put_str(&mut buf, k);
        buf.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
        put_value(&mut buf, v);
    }
    let mut sizes = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    let mut seen = std::collections::HashSet::new();
    for t in tensors {
        if t.name.len() > MAX_NAME_LEN {
            return Err(err(format!(
                "tensor name {:?} is longer than {MAX_NAME_LEN} bytes",
                t.name
            )));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(err(format!("duplicate tensor {:?}", t.name)));
        }
        if t.shape.is_empty() || t.shape.len() > MAX_DIMS || t.shape.contains(&0) {
            return Err(err(format!(
                "tensor {:?} has invalid shape {:?}",
                t.name, t.shape
            )));
        }
        let size = nbytes(&t.shape, t.ty)
            .map_err(|e| err(format!("tensor {:?} ({} {:?}): {e}", t.name, t.ty, t.shape)))?;
        put_str(&mut buf, &t.name);
        buf.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in &t.shape {
            buf.extend_from_slice(&d.to_le_bytes());
        }
        buf.extend_from_slice(&t.ty.id().to_le_bytes());
        buf.extend_from_slice(&offset.to_le_bytes());
        sizes.push(size);
        offset = offset
            .checked_add(size)
            .and_then(|o| align_up(o, alignment))
            .ok_or_else(|| err("total data size overflows".into()))?;
    }
    Ok((buf, sizes, alignment))
}

impl GgufWriter {
    /// Creates `path` (via a temporary file) and writes the header. `inputs` are the files being
    /// read; writing onto one of them is refused.
    pub fn create(
        path: &Path,
        version: u32,
        metadata: &Metadata,
        tensors: &[TensorSpec],
        inputs: &[&Path],
    ) -> Result<GgufWriter> {
        let (header, sizes, alignment) = encode_header(version, metadata, tensors, path)?;
        let mut out = OutputFile::create(path, inputs)?;
        out.write_all(&header)?;
        let pad = align_up(header.len() as u64, alignment).unwrap_or(0) - header.len() as u64;
        out.write_zeros(pad)?;
        let tensor_start = out.written();
        Ok(GgufWriter {
            out,
            sizes,
            names: tensors.iter().map(|t| t.name.clone()).collect(),
            next: 0,
            alignment,
            tensor_start,
        })
    }

    /// Name of the tensor whose data is expected next, if any.
    pub fn next_tensor(&self) -> Option<&str> {
        self.names.get(self.next).map(String::as_str)
    }

    /// Appends part of the next tensor's data. Call [`GgufWriter::end_tensor`] after its last
    /// part; the parts must add up to the tensor's size.
    pub fn write_part(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)
    }

    /// Writes the next tensor's data in one piece.
    pub fn write_tensor(&mut self, bytes: &[u8]) -> Result<()> {
        self.write_part(bytes)?;
        self.end_tensor()
    }

    /// Closes the next tensor: checks its size and writes the alignment padding.
    pub fn end_tensor(&mut self) -> Result<()> {
        let expected = *self
            .sizes
            .get(self.next)
            .ok_or_else(|| FormatError::Write {
                path: self.out.target().to_path_buf(),
                reason: "more tensors written than declared".into(),
            })?;
        let got = self.out.written() - self.tensor_start;
        if got != expected {
            return Err(FormatError::Write {
                path: self.out.target().to_path_buf(),
                reason: format!(
                    "tensor {:?}: wrote {got} bytes, its shape and type need {expected}",
                    self.names[self.next]
                ),
            });
        }
        let pad = align_up(got, self.alignment).unwrap_or(got) - got;
        self.out.write_zeros(pad)?;
        self.next += 1;
        self.tensor_start = self.out.written();
        self.out.check_inputs()
    }

    /// Checks every declared tensor was written, then syncs and renames into place. Returns the
    /// file size.
    pub fn finish(self) -> Result<u64> {
        if self.next != self.sizes.len() {
            return Err(FormatError::Write {
                path: self.out.target().to_path_buf(),
                reason: format!(
                    "only {} of {} tensors were written",
                    self.next,
                    self.sizes.len()
                ),
            });
        }
        self.out.commit()
    }
}
