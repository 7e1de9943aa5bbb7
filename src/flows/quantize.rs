//! `quantize`: rewrite a GGUF model with another type or llama.cpp mixture, streaming tensor by
//! tensor (slab by slab of rows), in parallel, byte-identical to what ggml produces.
//!
//! Memory stays flat as models grow: the input is memory-mapped and each slab's input pages
//! leave the process's resident set once converted (bytes copied as they are, once written),
//! and a writer thread ([`crate::format::stream`]) writes finished slabs, reusing their
//! buffers, while the next ones are converted. Consecutive small tensors are converted
//! together, so that a tensor of a few parallel tasks does not leave cores idle.

use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::flows::progress::{with_threads, Progress};
use crate::format::gguf::{
    GgufModel, GgufWriter, Metadata, TensorRef, TensorSpec, Value, KEY_SPLIT_COUNT, KEY_SPLIT_NO,
    KEY_SPLIT_TENSORS_COUNT,
};
use crate::format::stream::{write_behind, Parts};
use crate::format::{nbytes, GgmlType};
use crate::quant::{codec, ggml, plan_types, ModelFacts, PlanInput, QuantError, Target};

/// Output bytes converted per slab, at least (see [`slab_bytes`]).
const SLAB_BYTES: usize = 4 << 20;

/// Output bytes converted per slab, at most.
const MAX_SLAB_BYTES: usize = 32 << 20;

/// Options of [`quantize_model`].
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    /// Type or mixture to produce.
    pub target: Target,
    /// Worker threads (`None`: all cores).
    pub threads: Option<usize>,
}

/// What one tensor became.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorOutcome {
    /// Name.
    pub name: String,
    /// Type before.
    pub from: GgmlType,
    /// Type after.
    pub to: GgmlType,
}

/// Summary of a [`quantize_model`] run.
#[derive(Clone, Debug)]
pub struct QuantizeReport {
    /// Input bytes on disk.
    pub input_bytes: u64,
    /// Output bytes on disk.
    pub output_bytes: u64,
    /// Per tensor, in file order.
    pub tensors: Vec<TensorOutcome>,
    /// Tensors converted from an already block-quantized type (error compounds).
    pub requantized: usize,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl QuantizeReport {
    /// Tensors whose type changed.
    pub fn converted(&self) -> usize {
        self.tensors.iter().filter(|t| t.from != t.to).count()
    }
}

/// The per-tensor plan for `target`: the output type of every tensor, in file order.
pub fn plan_model(model: &GgufModel, target: Target) -> Vec<GgmlType> {
    let inputs: Vec<PlanInput<'_>> = model
        .tensors()
        .map(|t| PlanInput {
            name: &t.info.name,
            shape: &t.info.shape,
            ty: t.info.ty,
        })
        .collect();
    plan_types(
        &inputs,
        &ModelFacts::from_metadata(model.metadata()),
        target,
    )
}

/// The output metadata: the input's, with `general.file_type` and
/// `general.quantization_version` set and split keys removed (as llama-quantize does).
fn output_metadata(md: &Metadata, target: Target) -> Metadata {
    let mut out = md.clone();
    out.set("general.quantization_version", Value::U32(2));
    out.set("general.file_type", Value::U32(target.ftype.id));
    for k in [KEY_SPLIT_NO, KEY_SPLIT_COUNT, KEY_SPLIT_TENSORS_COUNT] {
        out.remove(k);
    }
    out
}

/// Requantizes the GGUF model `input` (a file or split model) to `output`.
///
/// Tensors whose planned type equals their current type are copied byte for byte; the others
/// are dequantized and quantized row by row with ggml. The output is written to a temporary
/// file and renamed when complete; `output` may not be the input.
///
/// ```no_run
/// use ggmerge::{quantize_model, QuantizeOptions, NoProgress};
/// use ggmerge::quant::Target;
///
/// let opts = QuantizeOptions { target: Target::parse("Q4_K_M", false)?, threads: Some(4) };
/// let report = quantize_model("model-f16.gguf".as_ref(), "model-q4_k_m.gguf".as_ref(), &opts, &NoProgress)?;
/// println!("{} -> {} bytes", report.input_bytes, report.output_bytes);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn quantize_model(
    input: &Path,
    output: &Path,
    opts: &QuantizeOptions,
    progress: &dyn Progress,
) -> Result<QuantizeReport> {
    let started = Instant::now();
    let model = GgufModel::open(input)?;
    let plan = plan_model(&model, opts.target);
    let tensor_err = |source: QuantError| Error::Tensor {
        path: input.to_path_buf(),
        source,
    };

    // Check every conversion before creating the output, so a bad request leaves nothing.
    let mut specs = Vec::with_capacity(plan.len());
    let mut sizes = Vec::with_capacity(plan.len());
    let mut total = 0u64;
    for (t, &to) in model.tensors().zip(&plan) {
        let i = t.info;
        if to != i.ty {
            codec::check_dequantize(i.ty, &i.name).map_err(tensor_err)?;
            codec::check_quantize(to, i.row_len(), &i.name).map_err(tensor_err)?;
        }
        let size = nbytes(&i.shape, to).map_err(|e| Error::BadTensor {
            path: input.to_path_buf(),
            tensor: i.name.clone(),
            reason: format!("{to}: {e}"),
        })?;
        total += size;
        sizes.push(size);
        specs.push(TensorSpec {
            name: i.name.clone(),
            shape: i.shape.clone(),
            ty: to,
        });
    }

    let inputs: Vec<&Path> = model.shards().iter().map(|s| s.path()).collect();
    let version = model.shards()[0].header().version.max(2);
    let md = output_metadata(model.metadata(), opts.target);
    let mut writer = GgufWriter::create(output, version, &md, &specs, &inputs)?;

    let slab = slab_bytes(crate::threads::clamp(opts.threads));
    let release = |part: &[u8]| model.release_bytes(part);
    let job = Job {
        model: &model,
        input,
        sizes: &sizes,
        slab,
    };
    progress.start(total);
    let n = model.n_tensors();
    let result = with_threads(opts.threads, || -> Result<()> {
        write_behind(&mut writer, &release, |parts| -> Result<()> {
            for window in tensor_windows(&sizes, slab as u64) {
                if window.len() == 1 {
                    // Streamed slab by slab (a large tensor, or one alone).
                    let idx = window.start;
                    progress.tensor(&model.tensor(idx).info.name, idx, n);
                    job.stream_tensor(parts, idx, plan[idx], progress)?;
                    parts.end_tensor()?;
                    continue;
                }
                // Small tensors, converted together (one alone is a few parallel tasks at
                // most); sent in order, the first error in order.
                let converted: Vec<Result<Whole<'_>>> = window
                    .clone()
                    .into_par_iter()
                    .map(|idx| job.whole_tensor(parts, idx, plan[idx]))
                    .collect();
                for (idx, whole) in window.zip(converted) {
                    progress.tensor(&model.tensor(idx).info.name, idx, n);
                    let len = match whole? {
                        Whole::Mapped(bytes) => {
                            parts.send_mapped(bytes)?;
                            bytes.len()
                        }
                        Whole::Owned(buf) => {
                            let len = buf.len();
                            parts.send(buf)?;
                            len
                        }
                    };
                    progress.advance(len as u64);
                    parts.end_tensor()?;
                }
            }
            Ok(())
        })
    });
    progress.finish();
    result?;
    let output_bytes = writer.finish()?;
    let tensors: Vec<TensorOutcome> = model
        .tensors()
        .zip(&plan)
        .map(|(t, &to)| TensorOutcome {
            name: t.info.name.clone(),
            from: t.info.ty,
            to,
        })
        .collect();
    let requantized = tensors
        .iter()
        .filter(|t| t.from != t.to && t.from.is_quantized())
        .count();
    Ok(QuantizeReport {
        input_bytes: model.file_size(),
        output_bytes,
        tensors,
        requantized,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Output bytes per slab: at least [`SLAB_BYTES`], more with many threads (a slab is split into
/// parallel tasks of 64 Ki elements, and every thread needs several), at most
/// [`MAX_SLAB_BYTES`]. Memory is about `QUEUED_PARTS + 2` slabs, whatever the model's size.
fn slab_bytes(threads: usize) -> usize {
    threads
        .saturating_mul(512 << 10)
        .clamp(SLAB_BYTES, MAX_SLAB_BYTES)
}

/// The tensors in order, grouped into windows of consecutive tensors whose outputs add up to
/// at most `max` bytes; a larger tensor is a window of its own.
fn tensor_windows(sizes: &[u64], max: u64) -> Vec<std::ops::Range<usize>> {
    let mut windows = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && bytes.saturating_add(size) > max {
            windows.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes = bytes.saturating_add(size);
    }
    if start < sizes.len() {
        windows.push(start..sizes.len());
    }
    windows
}

/// A whole small tensor's output.
enum Whole<'a> {
    /// Its input bytes, unchanged.
    Mapped(&'a [u8]),
    /// Converted.
    Owned(Vec<u8>),
}

/// What converting one tensor needs.
struct Job<'m> {
    model: &'m GgufModel,
    input: &'m Path,
    /// Output bytes of each tensor (checked).
    sizes: &'m [u64],
    /// Output bytes per slab.
    slab: usize,
}

impl<'m> Job<'m> {
    fn tensor_err(&self, source: QuantError) -> Error {
        Error::Tensor {
            path: self.input.to_path_buf(),
            source,
        }
    }

    /// Converts `src` (whole rows of tensor `t`) into `out`, checks the result with ggml, and
    /// releases `src` from the resident set.
    fn convert(&self, t: TensorRef<'m>, to: GgmlType, src: &[u8], out: &mut [u8]) -> Result<()> {
        let i = t.info;
        codec::convert(i.ty, src, to, out, i.row_len(), &i.name).map_err(|e| self.tensor_err(e))?;
        let dst_row = codec::row_size(to, i.row_len(), &i.name).map_err(|e| self.tensor_err(e))?;
        if !valid_rows(to, out, dst_row) {
            return Err(self.tensor_err(QuantError::CannotQuantize {
                tensor: i.name.clone(),
                ty: to,
                reason: "ggml_validate_row_data rejected the quantized data".into(),
            }));
        }
        self.model.release_bytes(src);
        Ok(())
    }

    /// Tensor `idx` as `to`, slab by slab, to the writer: its bytes as they are when the type
    /// stays, else converted rows, each slab's input released once converted.
    fn stream_tensor(
        &self,
        parts: &Parts<'m>,
        idx: usize,
        to: GgmlType,
        progress: &dyn Progress,
    ) -> Result<()> {
        let t = self.model.tensor(idx);
        let i = t.info;
        if to == i.ty {
            for part in t.data.chunks(self.slab) {
                parts.send_mapped(part)?;
                progress.advance(part.len() as u64);
            }
            return Ok(());
        }
        let src_row =
            codec::row_size(i.ty, i.row_len(), &i.name).map_err(|e| self.tensor_err(e))?;
        let dst_row = codec::row_size(to, i.row_len(), &i.name).map_err(|e| self.tensor_err(e))?;
        // A slab of output, and at most 4 of input (F32 → Q4_K is 7× smaller).
        let rows = (self.slab / dst_row.max(1))
            .min(4 * self.slab / src_row.max(1))
            .max(1);
        for src in t.data.chunks(rows * src_row) {
            let mut out = parts.buffer(src.len() / src_row.max(1) * dst_row);
            self.convert(t, to, src, &mut out)?;
            let len = out.len();
            parts.send(out)?;
            progress.advance(len as u64);
        }
        Ok(())
    }

    /// Tensor `idx` as `to`, whole (a small one).
    fn whole_tensor(&self, parts: &Parts<'m>, idx: usize, to: GgmlType) -> Result<Whole<'m>> {
        let t = self.model.tensor(idx);
        if to == t.info.ty {
            return Ok(Whole::Mapped(t.data));
        }
        let mut out = parts.buffer(self.sizes[idx] as usize);
        self.convert(t, to, t.data, &mut out)?;
        Ok(Whole::Owned(out))
    }
}

/// `ggml_validate_row_data` over a slab, in parallel by rows.
fn valid_rows(ty: GgmlType, data: &[u8], row: usize) -> bool {
    if ty == GgmlType::F32 {
        return true;
    }
    let rows_per_task = (1 << 20) / row.max(1) + 1;
    data.par_chunks(rows_per_task * row)
        .all(|c| ggml::validate_row_data(ty, c))
}
