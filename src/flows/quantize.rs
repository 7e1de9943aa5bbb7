//! `quantize`: rewrite a GGUF model with another type or llama.cpp mixture, streaming tensor by
//! tensor (slab by slab of rows), in parallel, byte-identical to what ggml produces.

use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::flows::progress::{with_threads, Progress};
use crate::format::gguf::{
    GgufModel, GgufWriter, Metadata, TensorSpec, Value, KEY_SPLIT_COUNT, KEY_SPLIT_NO,
    KEY_SPLIT_TENSORS_COUNT,
};
use crate::format::{nbytes, GgmlType};
use crate::quant::{codec, ggml, plan_types, ModelFacts, PlanInput, QuantError, Target};

/// Output bytes converted per slab: bounds memory to one slab of output plus small per-thread
/// f32 buffers, whatever the tensor size.
const SLAB_BYTES: u64 = 32 << 20;

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
    let mut total = 0u64;
    for (t, &to) in model.tensors().zip(&plan) {
        let i = t.info;
        if to != i.ty {
            codec::check_dequantize(i.ty, &i.name).map_err(tensor_err)?;
            codec::check_quantize(to, i.row_len(), &i.name).map_err(tensor_err)?;
        }
        total += nbytes(&i.shape, to).map_err(|e| Error::BadTensor {
            path: input.to_path_buf(),
            tensor: i.name.clone(),
            reason: format!("{to}: {e}"),
        })?;
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

    progress.start(total);
    let n = model.n_tensors();
    let result = with_threads(opts.threads, || -> Result<_> {
        let mut outcomes = Vec::with_capacity(n);
        let mut requantized = 0;
        for (idx, (t, &to)) in model.tensors().zip(&plan).enumerate() {
            let i = t.info;
            progress.tensor(&i.name, idx, n);
            if to == i.ty {
                for part in t.data.chunks(SLAB_BYTES as usize) {
                    writer.write_part(part)?;
                    progress.advance(part.len() as u64);
                }
            } else {
                if i.ty.is_quantized() {
                    requantized += 1;
                }
                convert_tensor(
                    &mut writer,
                    t.data,
                    i.ty,
                    to,
                    i.row_len(),
                    &i.name,
                    progress,
                )
                .map_err(|e| match e {
                    ConvertError::Quant(q) => tensor_err(q),
                    ConvertError::Other(e) => e,
                })?;
            }
            writer.end_tensor()?;
            outcomes.push(TensorOutcome {
                name: i.name.clone(),
                from: i.ty,
                to,
            });
        }
        Ok((outcomes, requantized))
    });
    progress.finish();
    let (tensors, requantized) = result?;
    let output_bytes = writer.finish()?;
    Ok(QuantizeReport {
        input_bytes: model.file_size(),
        output_bytes,
        tensors,
        requantized,
        seconds: started.elapsed().as_secs_f64(),
    })
}

enum ConvertError {
    Quant(QuantError),
    Other(Error),
}

/// Converts one tensor slab by slab and streams it to the writer.
fn convert_tensor(
    writer: &mut GgufWriter,
    src: &[u8],
    from: GgmlType,
    to: GgmlType,
    n_per_row: u64,
    name: &str,
    progress: &dyn Progress,
) -> std::result::Result<(), ConvertError> {
    let src_row = codec::row_size(from, n_per_row, name).map_err(ConvertError::Quant)?;
    let dst_row = codec::row_size(to, n_per_row, name).map_err(ConvertError::Quant)?;
    let rows_per_slab = (SLAB_BYTES as usize / dst_row.max(src_row)).max(1);
    let mut out = Vec::new();
    for slab in src.chunks(rows_per_slab * src_row) {
        let rows = slab.len() / src_row;
        out.resize(rows * dst_row, 0);
        codec::convert(from, slab, to, &mut out, n_per_row, name).map_err(ConvertError::Quant)?;
        if !valid_rows(to, &out, dst_row) {
            return Err(ConvertError::Quant(QuantError::CannotQuantize {
                tensor: name.into(),
                ty: to,
                reason: "ggml_validate_row_data rejected the quantized data".into(),
            }));
        }
        writer
            .write_part(&out)
            .map_err(|e| ConvertError::Other(e.into()))?;
        progress.advance(out.len() as u64);
    }
    Ok(())
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
