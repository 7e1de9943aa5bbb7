//! Writing: [`SafetensorsWriter`] (one file, header first) and [`write_safetensors`] (a model
//! under Hugging Face names, sharded like HF checkpoints, inverse transforms applied).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Metadata as StMetadata, TensorInfo as StInfo};

use crate::format::error::{FormatError, Result};
use crate::format::hf_names::{self, Direction, HfConfig, Transform};
use crate::format::output::OutputFile;
use crate::format::stream::write_behind;

use crate::format::{nbytes, GgmlType};

use super::{dtype_of, CONFIG_FILE, MAX_HEADER, SLAB_ELEMS};

/// A tensor of a safetensors file to be written: HF name, HF (row-major, outermost first)
/// shape, and dtype (F32, F16 or BF16).
#[derive(Clone, Debug, PartialEq)]
pub struct StTensorSpec {
    /// Name as written.
    pub name: String,
    /// Shape, outermost dimension first (HF order).
    pub shape: Vec<u64>,
    /// F32, F16 or BF16.
    pub ty: GgmlType,
}

/// Encodes a safetensors header (8-byte length, JSON padded with spaces to a multiple of 8)
/// for `tensors` laid out in order, and returns it with each tensor's byte size. The header is
/// built and validated with the `safetensors` crate's own `Metadata`.
pub fn encode_header(
    tensors: &[StTensorSpec],
    metadata: &BTreeMap<String, String>,
    path: &Path,
) -> Result<(Vec<u8>, Vec<u64>)> {
    let err = |reason: String| FormatError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let mut infos = Vec::with_capacity(tensors.len());
    let mut sizes = Vec::with_capacity(tensors.len());
    let mut seen = std::collections::HashSet::new();
    let mut offset = 0usize;
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(err(format!("duplicate tensor {:?}", t.name)));
        }
        if t.name == "__metadata__" {
            return Err(err("a tensor cannot be named __metadata__".into()));
        }
        let dtype = dtype_of(t.ty).ok_or_else(|| {
            err(format!(
                "tensor {:?}: safetensors output supports F32, F16 and BF16, not {}",
                t.name, t.ty
            ))
        })?;
        let ggml_shape: Vec<u64> = t.shape.iter().rev().copied().collect();
        let size = nbytes(&ggml_shape, t.ty)
            .map_err(|e| err(format!("tensor {:?} {:?}: {e}", t.name, t.shape)))?;
        let usize_of = |x: u64| usize::try_from(x).map_err(|_| err("size overflows".into()));
        let end = offset
            .checked_add(usize_of(size)?)
            .ok_or_else(|| err("total data size overflows".into()))?;
        let shape = t
            .shape
            .iter()
            .map(|&d| usize_of(d))
            .collect::<Result<Vec<usize>>>()?;
        infos.push((
            t.name.clone(),
            StInfo {
                dtype,
                shape,
                data_offsets: (offset, end),
            },
        ));
        sizes.push(size);
        offset = end;
    }
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    let meta = StMetadata::new((!meta.is_empty()).then_some(meta), infos)
        .map_err(|e| err(format!("invalid safetensors header: {e}")))?;
    let mut json =
        serde_json::to_vec(&meta).map_err(|e| err(format!("cannot encode the header: {e}")))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    if json.len() as u64 > MAX_HEADER {
        return Err(err(format!(
            "header of {} bytes is over the safetensors limit of {MAX_HEADER}",
            json.len()
        )));
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok((out, sizes))
}

/// Writes one safetensors file tensor by tensor: the header (all offsets computed from shapes
/// and dtypes) first, then each tensor's bytes in the declared order. Output goes through
/// [`OutputFile`] (temporary file, renamed on [`SafetensorsWriter::finish`]).
pub struct SafetensorsWriter {
    out: OutputFile,
    sizes: Vec<u64>,
    names: Vec<String>,
    next: usize,
    tensor_start: u64,
}

impl SafetensorsWriter {
    /// Creates `path` (via a temporary file) and writes the header. `metadata` is the
    /// `__metadata__` map (HF writes `{"format": "pt"}`); writing onto one of `inputs` is
    /// refused.
    pub fn create(
        path: &Path,
        tensors: &[StTensorSpec],
        metadata: &BTreeMap<String, String>,
        inputs: &[&Path],
    ) -> Result<SafetensorsWriter> {
        Self::create_file(path, tensors, metadata, inputs, None)
    }

    /// [`SafetensorsWriter::create`] for a file written beside the output the user named (a
    /// shard, or the weights inside an output directory): an existing file is replaced only
    /// with `overwrite` (`--force`).
    pub fn create_beside(
        path: &Path,
        tensors: &[StTensorSpec],
        metadata: &BTreeMap<String, String>,
        inputs: &[&Path],
        overwrite: bool,
    ) -> Result<SafetensorsWriter> {
        Self::create_file(path, tensors, metadata, inputs, Some(overwrite))
    }

    fn create_file(
        path: &Path,
        tensors: &[StTensorSpec],
        metadata: &BTreeMap<String, String>,
        inputs: &[&Path],
        beside: Option<bool>,
    ) -> Result<SafetensorsWriter> {
        let (header, sizes) = encode_header(tensors, metadata, path)?;
        let mut out = match beside {
            None => OutputFile::create(path, inputs)?,
            Some(overwrite) => OutputFile::create_beside(path, inputs, overwrite)?,
        };
        out.write_all(&header)?;
        let tensor_start = out.written();
        Ok(SafetensorsWriter {
            out,
            sizes,
            names: tensors.iter().map(|t| t.name.clone()).collect(),
            next: 0,
            tensor_start,
        })
    }

    /// Name of the tensor whose data is expected next, if any.
    pub fn next_tensor(&self) -> Option<&str> {
        self.names.get(self.next).map(String::as_str)
    }

    /// Appends part of the next tensor's data.
    pub fn write_part(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)
    }

    /// Closes the next tensor, checking its size.
    pub fn end_tensor(&mut self) -> Result<()> {
        let target = self.out.target().to_path_buf();
        let expected = *self
            .sizes
            .get(self.next)
            .ok_or_else(|| FormatError::Write {
                path: target.clone(),
                reason: "more tensors written than declared".into(),
            })?;
        let got = self.out.written() - self.tensor_start;
        if got != expected {
            return Err(FormatError::Write {
                path: target,
                reason: format!(
                    "tensor {:?}: wrote {got} bytes, its shape and dtype need {expected}",
                    self.names[self.next]
                ),
            });
        }
        self.next += 1;
        self.tensor_start = self.out.written();
        self.out.check_inputs()
    }

    /// Checks every tensor was written and returns the uncommitted output.
    fn close(self) -> Result<OutputFile> {
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
        Ok(self.out)
    }

    /// Checks every tensor was written, then syncs and renames into place. Returns the size.
    pub fn finish(self) -> Result<u64> {
        self.close()?.commit()
    }
}

/// A tensor to export with [`write_safetensors`]: its GGUF name and ggml-order shape (as the
/// source model has them) and the dtype to write.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportTensor {
    /// GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// ggml-order shape (`shape[0]` the row length).
    pub shape: Vec<u64>,
    /// Output dtype: F32, F16 or BF16.
    pub ty: GgmlType,
}

/// Options of [`write_safetensors`].
#[derive(Clone, Debug)]
pub struct SafetensorsOptions {
    /// Largest shard in bytes of tensor data; `None` writes one file. A tensor larger than this
    /// gets a shard of its own. When the model fits in one shard no index is written.
    pub max_shard_bytes: Option<u64>,
    /// The `__metadata__` of every file (default `{"format": "pt"}`, which transformers
    /// expects).
    pub metadata: BTreeMap<String, String>,
    /// Whether the weights path given to [`write_safetensors`] is itself the output the user
    /// named (default). `false` for the weights inside an output directory: every file is then
    /// written *beside* the named output, like shards and the index always are.
    pub path_is_named: bool,
    /// Replace existing files beside the named output (`--force`); without it they are an
    /// error naming the file.
    pub overwrite: bool,
}

impl Default for SafetensorsOptions {
    fn default() -> SafetensorsOptions {
        SafetensorsOptions {
            max_shard_bytes: None,
            metadata: BTreeMap::from([("format".to_string(), "pt".to_string())]),
            path_is_named: true,
            overwrite: false,
        }
    }
}

/// What [`write_safetensors`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct SafetensorsOutput {
    /// The weight files, in shard order.
    pub files: Vec<PathBuf>,
    /// The index file, when sharded.
    pub index: Option<PathBuf>,
    /// Bytes written over all files (index included).
    pub bytes: u64,
    /// (GGUF name, HF name) of every tensor, in order.
    pub names: Vec<(String, String)>,
}

/// The shard file names for `path` (`DIR/STEM.safetensors`): `STEM-0000K-of-0000N.safetensors`
/// and `STEM.safetensors.index.json`, as HF names them for `model.safetensors`.
pub(super) fn shard_paths(path: &Path, n: usize) -> (Vec<PathBuf>, PathBuf) {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = file
        .strip_suffix(".safetensors")
        .unwrap_or(&file)
        .to_string();
    let files = (1..=n)
        .map(|k| path.with_file_name(format!("{stem}-{k:05}-of-{n:05}.safetensors")))
        .collect();
    (
        files,
        path.with_file_name(format!("{stem}.safetensors.index.json")),
    )
}

/// Encodes f32 values into `ty` (F32/F16/BF16) little-endian bytes, refusing finite values the
/// type cannot hold (F16 above 65504).
pub(super) fn encode(
    ty: GgmlType,
    v: &[f32],
    out: &mut Vec<u8>,
) -> std::result::Result<(), (usize, f32)> {
    out.clear();
    match ty {
        GgmlType::F16 => {
            for (i, &x) in v.iter().enumerate() {
                let h = f16::from_f32(x);
                if h.is_infinite() && x.is_finite() {
                    return Err((i, x));
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (i, &x) in v.iter().enumerate() {
                let h = bf16::from_f32(x);
                if h.is_infinite() && x.is_finite() {
                    return Err((i, x));
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        _ => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
    }
    Ok(())
}

/// Writes a model as safetensors under HF names, streaming, to `path` (a `.safetensors` file),
/// or to `STEM-0000K-of-0000N.safetensors` shards plus `STEM.safetensors.index.json` next to it
/// when [`SafetensorsOptions::max_shard_bytes`] splits it.
///
/// `tensors` are given by GGUF name and ggml shape; each gets its HF name
/// ([`hf_names::gguf_to_hf`]; a tensor without one is an error — filter first) and the inverse
/// of llama.cpp's transform (llama q/k rows un-permuted with `config`'s head counts, Gemma norms
/// `- 1`). Values come from `fill(i, first, buf)`: fill `buf` with elements
/// `first..first + buf.len()` of tensor `i` as f32 in GGUF layout and meaning. Slabs are whole
/// rows (whole heads for permuted tensors, the whole tensor for 1-D ones), about 4 MiB of f32
/// (more when one row or head is larger), requested in order.
///
/// Encoded slabs are written by a writer thread ([`crate::format::stream`]) while the next
/// ones are filled. Every file is written to a temporary file and renamed only when all are
/// complete; the index is renamed last.
pub fn write_safetensors<E: From<FormatError>>(
    path: &Path,
    config: &HfConfig,
    tensors: &[ExportTensor],
    opts: &SafetensorsOptions,
    inputs: &[&Path],
    mut fill: impl FnMut(usize, u64, &mut [f32]) -> std::result::Result<(), E>,
) -> std::result::Result<SafetensorsOutput, E> {
    let werr = |reason: String| FormatError::Write {
        path: path.to_path_buf(),
        reason,
    };
    // Plan every tensor before creating anything, so a bad request leaves no files.
    struct Planned {
        spec: StTensorSpec,
        transform: Transform,
        head_dim: u64,
        size: u64,
    }
    let mut plan = Vec::with_capacity(tensors.len());
    for t in tensors {
        let hf = hf_names::gguf_to_hf(&config.arch, &t.name).ok_or_else(|| {
            FormatError::UnmappedTensor {
                path: path.to_path_buf(),
                name: t.name.clone(),
                arch: config.arch.clone(),
                target: "Hugging Face",
            }
        })?;
        if dtype_of(t.ty).is_none() {
            return Err(werr(format!(
                "tensor {:?}: safetensors output supports F32, F16 and BF16, not {}",
                t.name, t.ty
            ))
            .into());
        }
        if t.shape.is_empty() || t.shape.contains(&0) {
            return Err(werr(format!(
                "tensor {:?} has invalid shape {:?}",
                t.name, t.shape
            ))
            .into());
        }
        let transform = hf_names::transform_of(&config.arch, &t.name);
        let mut head_dim = 0;
        if matches!(transform, Transform::PermuteQ | Transform::PermuteK) {
            let heads = config.permute_heads(transform).ok_or_else(|| {
                werr(format!(
                    "tensor {:?}: the head count is unknown, and un-permuting q/k needs it",
                    t.name
                ))
            })?;
            head_dim = hf_names::head_dim(*t.shape.last().unwrap_or(&1), heads)
                .map_err(|e| werr(format!("tensor {:?}: {e}", t.name)))?;
        }
        let size = nbytes(&t.shape, t.ty)
            .map_err(|e| werr(format!("tensor {:?} {:?}: {e}", t.name, t.shape)))?;
        plan.push(Planned {
            spec: StTensorSpec {
                name: hf,
                shape: t.shape.iter().rev().copied().collect(),
                ty: t.ty,
            },
            transform,
            head_dim,
            size,
        });
    }

    // Greedy sharding in order, as transformers' save_pretrained does.
    let mut shards: Vec<std::ops::Range<usize>> = Vec::new();
    let mut start = 0;
    let mut acc = 0u64;
    for (i, p) in plan.iter().enumerate() {
        if let Some(max) = opts.max_shard_bytes {
            if i > start && acc + p.size > max {
                shards.push(start..i);
                start = i;
                acc = 0;
            }
        }
        acc += p.size;
    }
    shards.push(start..plan.len());
    let (files, index_path) = if shards.len() == 1 {
        (vec![path.to_path_buf()], None)
    } else {
        let (f, i) = shard_paths(path, shards.len());
        (f, Some(i))
    };

    let mut pending = Vec::with_capacity(files.len() + 1);
    let mut buf: Vec<f32> = Vec::new();
    let mut tmp: Vec<f32> = Vec::new();
    for (range, file) in shards.iter().zip(&files) {
        let specs: Vec<StTensorSpec> = plan[range.clone()].iter().map(|p| p.spec.clone()).collect();
        let mut w = if file == path && opts.path_is_named {
            SafetensorsWriter::create(file, &specs, &opts.metadata, inputs)?
        } else {
            SafetensorsWriter::create_beside(file, &specs, &opts.metadata, inputs, opts.overwrite)?
        };
        // Encoded slabs are written by a thread of their own while the next are filled.
        write_behind(&mut w, &|_| {}, |parts| -> std::result::Result<(), E> {
            for i in range.clone() {
                let p = &plan[i];
                let shape = &tensors[i].shape;
                let rows = *shape.last().unwrap_or(&1);
                let inner: u64 = shape[..shape.len() - 1].iter().product();
                let mut slab_rows = if shape.len() == 1 {
                    rows
                } else {
                    (SLAB_ELEMS / inner.max(1)).clamp(1, rows)
                };
                // Permuted tensors: whole heads per slab.
                if let Some(heads) = slab_rows.checked_div(p.head_dim) {
                    slab_rows = heads.max(1) * p.head_dim;
                }
                let mut row = 0;
                while row < rows {
                    let n = slab_rows.min(rows - row);
                    buf.resize((n * inner) as usize, 0.0);
                    fill(i, row * inner, &mut buf)?;
                    match p.transform {
                        Transform::AddOne => buf.iter_mut().for_each(|x| *x -= 1.0),
                        Transform::PermuteQ | Transform::PermuteK => {
                            tmp.resize(buf.len(), 0.0);
                            hf_names::permute_rows(
                                bytemuck::cast_slice(&buf),
                                bytemuck::cast_slice_mut(&mut tmp),
                                inner as usize * 4,
                                p.head_dim,
                                Direction::GgufToHf,
                            );
                            std::mem::swap(&mut buf, &mut tmp);
                        }
                        Transform::None => {}
                    }
                    let mut bytes = parts.buffer(0);
                    encode(p.spec.ty, &buf, &mut bytes).map_err(|(k, x)| {
                        werr(format!(
                        "tensor {:?}: element {} is {x}, which {} cannot hold; write F32 or BF16",
                        tensors[i].name,
                        row * inner + k as u64,
                        p.spec.ty
                    ))
                    })?;
                    parts.send(bytes)?;
                    row += n;
                }
                parts.end_tensor()?;
            }
            Ok(())
        })?;
        pending.push(w.close()?);
    }
    if let Some(ix) = &index_path {
        let total: u64 = plan.iter().map(|p| p.size).sum();
        let mut weight_map = BTreeMap::new();
        for (range, file) in shards.iter().zip(&files) {
            let name = file
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            for p in &plan[range.clone()] {
                weight_map.insert(p.spec.name.clone(), name.clone());
            }
        }
        let json = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        let text = serde_json::to_vec_pretty(&json)
            .map_err(|e| werr(format!("cannot encode the index: {e}")))?;
        let mut out = OutputFile::create_beside(ix, inputs, opts.overwrite)?;
        out.write_all(&text)?;
        out.write_all(b"\n")?;
        pending.push(out);
    }
    let mut written = 0;
    for out in pending {
        written += out.commit()?;
    }
    Ok(SafetensorsOutput {
        files,
        index: index_path,
        bytes: written,
        names: tensors
            .iter()
            .zip(&plan)
            .map(|(t, p)| (t.name.clone(), p.spec.name.clone()))
            .collect(),
    })
}

/// Writes `config.json` (the minimal one of [`HfConfig::to_json`]) into `dir`, via a temporary
/// file; an existing `config.json` is replaced only with `overwrite` (it is a file beside the
/// output the user named). Returns its path.
pub fn write_config_json(
    dir: &Path,
    config: &HfConfig,
    inputs: &[&Path],
    overwrite: bool,
) -> Result<PathBuf> {
    let path = dir.join(CONFIG_FILE);
    let text = serde_json::to_vec_pretty(&config.to_json()).map_err(|e| FormatError::Write {
        path: path.clone(),
        reason: format!("cannot encode config.json: {e}"),
    })?;
    let mut out = OutputFile::create_beside(&path, inputs, overwrite)?;
    out.write_all(&text)?;
    out.write_all(b"\n")?;
    out.commit()?;
    Ok(path)
}
