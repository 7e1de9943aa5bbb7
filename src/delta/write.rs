//! Writing a delta pack ([`PackWriter`]): the kept values (and, for explicit masks, indices)
//! of each changed tensor are encoded and streamed to a scratch file as they come — values
//! slab by slab, as the caller computes them — and checksummed on the way;
//! [`PackWriter::finish`] then writes the GGUF pack header first (with the kept counts and the
//! checksum, known only at the end) and copies the data after it. The keys are the reader's constants ([`crate::delta::pack`]).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use crate::delta::error::{DeltaError, Result};
use crate::delta::pack::{
    MaskKind, INDICES_SUFFIX, KEY_BASE_FINGERPRINT, KEY_BASE_NAME, KEY_CHECKSUM, KEY_DENSITY,
    KEY_KEPT, KEY_MASK, KEY_METHOD, KEY_RESCALE, KEY_SEED, KEY_STREAM, KEY_VALUES, PACK_TYPE,
    VALUES_SUFFIX,
};
use crate::format::gguf::{Array, GgufWriter, Metadata, TensorSpec, Value};
use crate::format::output::{check_output_path, TempFile};
use crate::format::{FormatError, GgmlType};
use crate::merge::method::{Rescale, Sparsifier};
use crate::quant;

/// What a pack records about how it was made.
#[derive(Clone, Debug)]
pub struct PackHeader {
    /// The base's architecture.
    pub architecture: String,
    /// The fine-tune's `general.name`, if it has one.
    pub name: Option<String>,
    /// The base's fingerprint ([`crate::delta::pack::fingerprint`]).
    pub base_fingerprint: String,
    /// The base's file name (for messages).
    pub base_name: String,
    /// The sparsifier.
    pub sparsifier: Sparsifier,
    /// Keep fraction.
    pub density: f64,
    /// Mask seed.
    pub seed: u64,
    /// Mask stream.
    pub stream: u32,
    /// Rescale applied to the values.
    pub rescale: Rescale,
    /// How the mask is stored.
    pub mask: MaskKind,
    /// Value type: F32, F16, BF16 or Q8_0.
    pub values: GgmlType,
}

/// A pack being written.
pub struct PackWriter {
    output: PathBuf,
    header: PackHeader,
    spill_file: TempFile,
    spill: BufWriter<File>,
    checksum: Xxh3,
    specs: Vec<TensorSpec>,
    /// Bytes of each tensor in the spill file, in order.
    sizes: Vec<usize>,
    kept: Vec<u64>,
    /// The tensor being added.
    current: Option<Current>,
    /// Encoded values, reused.
    encoded: Vec<u8>,
}

/// A tensor being added to a [`PackWriter`].
struct Current {
    /// Base tensor name.
    tensor: String,
    /// Values pushed so far.
    kept: u64,
    /// Values held back until they fill a block.
    held: Vec<f32>,
    /// Encoded bytes spilled so far.
    bytes: usize,
}

impl PackWriter {
    /// Starts a pack at `output` (checked first: a regular file or a new one).
    pub fn create(output: &Path, header: PackHeader) -> Result<PackWriter> {
        if !matches!(
            header.values,
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0
        ) {
            return Err(DeltaError::ValuesType {
                ty: header.values.to_string(),
            });
        }
        check_output_path(output)?;
        let (spill_file, spill) = TempFile::create(output, "spill")?;
        Ok(PackWriter {
            output: output.to_path_buf(),
            header,
            spill_file,
            spill: BufWriter::new(spill),
            checksum: Xxh3::new(),
            specs: Vec::new(),
            sizes: Vec::new(),
            kept: Vec::new(),
            current: None,
            encoded: Vec::new(),
        })
    }

    fn spill_error(&self, source: std::io::Error) -> DeltaError {
        FormatError::Io {
            path: self.spill_file.path().to_path_buf(),
            what: "cannot write the temporary file (is the disk full?)",
            source,
        }
        .into()
    }

    /// Adds base tensor `tensor`'s kept values (already rescaled, in element order) and, for
    /// explicit masks, their element indices: [`begin_tensor`](Self::begin_tensor),
    /// [`push_values`](Self::push_values), [`end_tensor`](Self::end_tensor) in one call.
    pub fn add(&mut self, tensor: &str, values: &[f32], indices: Option<&[u32]>) -> Result<()> {
        self.begin_tensor(tensor)?;
        self.push_values(values)?;
        self.end_tensor(indices)
    }

    /// Starts base tensor `tensor`: its kept values follow in element order
    /// ([`push_values`](Self::push_values), any number of times), then
    /// [`end_tensor`](Self::end_tensor). A tensor's values are encoded and spilled as they
    /// come (Q8_0 holds back less than a block), so only the caller's slab is in memory.
    pub fn begin_tensor(&mut self, tensor: &str) -> Result<()> {
        let name = format!("{tensor}{VALUES_SUFFIX}");
        if name.len() > 63 {
            return Err(DeltaError::NameTooLong {
                tensor: tensor.to_string(),
            });
        }
        self.current = Some(Current {
            tensor: tensor.to_string(),
            kept: 0,
            held: Vec::new(),
            bytes: 0,
        });
        Ok(())
    }

    /// Appends kept values (already rescaled) of the tensor begun last.
    pub fn push_values(&mut self, values: &[f32]) -> Result<()> {
        let Some(mut cur) = self.current.take() else {
            return Err(self.out_of_order("values pushed outside a tensor"));
        };
        cur.kept += values.len() as u64;
        let r = if cur.held.is_empty() && self.block() == 1 {
            self.encode(&mut cur, values)
        } else {
            // Whole blocks only; the rest is held for the next values or the padding.
            cur.held.extend_from_slice(values);
            let whole = cur.held.len() / self.block() * self.block();
            let held = std::mem::take(&mut cur.held);
            let r = self.encode(&mut cur, &held[..whole]);
            cur.held = held[whole..].to_vec();
            r
        };
        self.current = Some(cur);
        r
    }

    /// Ends the tensor begun last: pads its values to whole blocks (Q8_0) — a tensor that
    /// keeps nothing still stores one zero value (GGUF tensors are not empty) — and, for
    /// explicit masks, stores `indices` (one per kept value).
    pub fn end_tensor(&mut self, indices: Option<&[u32]>) -> Result<()> {
        let Some(mut cur) = self.current.take() else {
            return Err(self.out_of_order("a tensor ended that was not begun"));
        };
        let ty = self.header.values;
        let padded = if ty == GgmlType::Q8_0 {
            cur.kept.div_ceil(32).max(1) * 32
        } else {
            cur.kept.max(1)
        };
        let mut tail = std::mem::take(&mut cur.held);
        tail.resize((padded - (cur.kept - tail.len() as u64)) as usize, 0.0);
        self.encode(&mut cur, &tail)?;
        self.sizes.push(cur.bytes);
        self.specs.push(TensorSpec {
            name: format!("{}{VALUES_SUFFIX}", cur.tensor),
            shape: vec![padded],
            ty,
        });
        if let Some(idx) = indices {
            let bytes: Vec<u8> = idx.iter().flat_map(|i| i.to_le_bytes()).collect();
            self.spill
                .write_all(&bytes)
                .map_err(|e| self.spill_error(e))?;
            self.checksum.update(&bytes);
            self.sizes.push(bytes.len());
            self.specs.push(TensorSpec {
                name: format!("{}{INDICES_SUFFIX}", cur.tensor),
                shape: vec![cur.kept],
                ty: GgmlType::I32,
            });
        }
        self.kept.push(cur.kept);
        Ok(())
    }

    /// Drops the tensor begun last, which must have kept nothing (an explicit mask's tensor
    /// whose delta was all zero: such tensors are absent from the pack).
    pub fn discard_tensor(&mut self) -> Result<()> {
        match self.current.take() {
            Some(cur) if cur.kept == 0 => Ok(()),
            _ => Err(self.out_of_order("only a tensor that kept nothing can be discarded")),
        }
    }

    /// Elements per block of the value type.
    fn block(&self) -> usize {
        self.header.values.block_size() as usize
    }

    /// Encodes `values` (whole blocks) of tensor `cur` and spills them.
    fn encode(&mut self, cur: &mut Current, values: &[f32]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let ty = self.header.values;
        let n = values.len() as u64;
        let size =
            quant::codec::row_size(ty, n, &cur.tensor).map_err(|source| DeltaError::Tensor {
                path: self.output.clone(),
                source,
            })?;
        self.encoded.resize(size, 0);
        quant::quantize(ty, values, n, &mut self.encoded, &cur.tensor).map_err(|source| {
            DeltaError::Tensor {
                path: self.output.clone(),
                source,
            }
        })?;
        self.spill
            .write_all(&self.encoded)
            .map_err(|e| self.spill_error(e))?;
        self.checksum.update(&self.encoded);
        cur.bytes += size;
        Ok(())
    }

    fn out_of_order(&self, what: &str) -> DeltaError {
        FormatError::Write {
            path: self.output.clone(),
            reason: format!("pack written out of order: {what}"),
        }
        .into()
    }

    /// The kept counts of the tensors added so far.
    pub fn kept(&self) -> &[u64] {
        &self.kept
    }

    /// Writes the pack (header, then the data) to a temporary file renamed onto the output;
    /// `inputs` are the files it was made from (never overwritten). Returns the pack's size.
    pub fn finish(mut self, inputs: &[&Path]) -> Result<u64> {
        if self.current.is_some() {
            return Err(self.out_of_order("finished inside a tensor"));
        }
        self.spill.flush().map_err(|e| self.spill_error(e))?;
        let h = &self.header;
        let mut md = Metadata::new();
        md.set(
            "general.architecture",
            Value::String(h.architecture.clone()),
        );
        md.set("general.type", Value::String(PACK_TYPE.into()));
        if let Some(n) = &h.name {
            md.set("general.name", Value::String(n.clone()));
        }
        md.set(
            KEY_BASE_FINGERPRINT,
            Value::String(h.base_fingerprint.clone()),
        );
        md.set(KEY_BASE_NAME, Value::String(h.base_name.clone()));
        md.set(KEY_METHOD, Value::String(h.sparsifier.name().into()));
        md.set(KEY_DENSITY, Value::F64(h.density));
        md.set(KEY_SEED, Value::U64(h.seed));
        md.set(KEY_STREAM, Value::U32(h.stream));
        md.set(KEY_RESCALE, Value::String(h.rescale.name().into()));
        md.set(KEY_MASK, Value::String(h.mask.name().into()));
        md.set(KEY_VALUES, Value::String(h.values.name().into()));
        md.set(KEY_KEPT, Value::Array(Array::U64(self.kept.clone())));
        md.set(
            KEY_CHECKSUM,
            Value::String(format!("{:016x}", self.checksum.digest())),
        );
        let mut writer = GgufWriter::create(&self.output, 3, &md, &self.specs, inputs)?;
        let path = self.spill_file.path().to_path_buf();
        let read_error = |source| FormatError::Io {
            path: path.clone(),
            what: "cannot read the temporary file",
            source,
        };
        let mut spill = File::open(&path).map_err(read_error)?;
        let mut buf = Vec::new();
        for &size in &self.sizes {
            buf.resize(size, 0);
            spill.read_exact(&mut buf).map_err(read_error)?;
            writer.write_tensor(&buf)?;
        }
        Ok(writer.finish()?)
    }
}
