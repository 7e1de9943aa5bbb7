//! `merge`: combine a base and fine-tuned models (GGUF of any type, or safetensors) into one
//! GGUF, streaming tensor by tensor, in parallel, reproducibly.
//!
//! The flow resolves the config into a per-tensor plan ([`plan_merge`]: which tensors are
//! copied verbatim, which are merged, the output type of each), then runs the engine
//! ([`crate::merge::engine`]) tensor by tensor and writes the result with the base's metadata
//! and tokenizer. The report carries the delta-noise and delta-retention measurements.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::flows::progress::{with_threads, Progress};
use crate::format::gguf::{GgufModel, GgufWriter, Metadata, TensorSpec, Value};
use crate::format::source::ModelSource;
use crate::format::{nbytes, GgmlType};
use crate::merge::config::{MergeConfig, Method, Rescale, TensorContext};
use crate::merge::engine::{
    self, InputTensor, Kind, MergeTensorError, MethodSpec, ModelParams, RescaleMode, TensorJob,
};
use crate::merge::kernel::Sparsifier;
use crate::quant::{plan_types, ModelFacts, PlanInput, Target, FTYPES};

/// Options of [`merge_models`] beyond the config.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// Output GGUF path.
    pub output: PathBuf,
    /// Output type: `None` keeps every tensor's base type; a ggml type name (`Q8_0`, `F16`)
    /// gives every weight matrix that type; a mixture name (`Q4_K_M`) applies llama.cpp's
    /// per-tensor rules. Overrides the config's `dtype`/`type`.
    pub out_type: Option<String>,
    /// Mask seed (overrides the config's).
    pub seed: Option<u64>,
    /// Worker threads (`None`: all cores).
    pub threads: Option<usize>,
}

/// What happens to one output tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorAction {
    /// Every model equals the base: the base's bytes are copied.
    Copy,
    /// Every model equals the base but the output type differs: the base is requantized.
    Requantize,
    /// Merged.
    Merge,
}

/// One output tensor of the plan.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    /// GGUF name.
    pub name: String,
    /// Shape (ggml order).
    pub shape: Vec<u64>,
    /// Base type.
    pub base_ty: GgmlType,
    /// Output type.
    pub out_ty: GgmlType,
    /// What happens.
    pub action: TensorAction,
    /// Per model: weight, density, gamma, epsilon, stream.
    pub params: Vec<ModelParams>,
    /// λ.
    pub lambda: f32,
    /// SLERP t.
    pub t: f64,
}

/// The resolved merge: inputs, method, and every output tensor.
pub struct MergePlan {
    /// Reference GGUF (the base; for linear merges without base, the first model).
    pub reference: GgufModel,
    /// Models in input order.
    pub models: Vec<Box<dyn ModelSource>>,
    /// Method, resolved.
    pub method: MethodSpec,
    /// Method name (mergekit's).
    pub method_name: &'static str,
    /// Mask seed.
    pub seed: u64,
    /// Output tensors in the base's order.
    pub tensors: Vec<PlannedTensor>,
    /// Output metadata.
    pub metadata: Metadata,
    /// Estimated output size in bytes.
    pub output_bytes: u64,
    /// Estimated peak working memory in bytes (besides memory-mapped inputs).
    pub peak_memory: u64,
}

/// Per-model measurements of a merge.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelReport {
    /// The model's path.
    pub path: String,
    /// Share of delta elements that were exactly zero (quantized experts: high values mean the
    /// fine-tune's change is below the quantization step).
    pub zero_delta_share: f64,
    /// RMS of the delta.
    pub delta_rms: f64,
    /// Delta RMS over the rounding noise expected from two independent quantizations at the
    /// base's step (`None` for unquantized bases). Below ~2, noise dominates.
    pub signal_to_noise: Option<f64>,
    /// Share of delta elements kept after sparsification (non-zero).
    pub kept_share: f64,
}

/// Delta retention of one output type.
#[derive(Clone, Debug, PartialEq)]
pub struct RetentionReport {
    /// Output type.
    pub ty: String,
    /// ⟨q(merged) − base, Δ⟩ / ⟨Δ, Δ⟩ over the merged tensors of this type.
    pub retention: f64,
    /// Tensors.
    pub tensors: usize,
}

/// Summary of a [`merge_models`] run.
#[derive(Clone, Debug)]
pub struct MergeReport {
    /// Tensors in the output.
    pub tensors: usize,
    /// Tensors merged.
    pub merged: usize,
    /// Tensors copied verbatim.
    pub copied: usize,
    /// Output size.
    pub output_bytes: u64,
    /// Wall time.
    pub seconds: f64,
    /// Per model.
    pub models: Vec<ModelReport>,
    /// Per output type.
    pub retention: Vec<RetentionReport>,
    /// Advice for the user (noise-dominated experts, low retention).
    pub warnings: Vec<String>,
}

/// Opens a merge input: a GGUF file (or split model), else safetensors.
pub fn open_model(path: &Path) -> Result<Box<dyn ModelSource>> {
    Ok(Box::new(GgufModel::open(path)?))
}

/// The engine's view of a method.
pub fn method_spec(config: &MergeConfig) -> MethodSpec {
    use Method::*;
    let (kind, sparsifier, consensus) = match config.method {
        Linear => (Kind::Linear, Sparsifier::None, false),
        Slerp => (Kind::Slerp, Sparsifier::None, false),
        TaskArithmetic => (Kind::TaskVector, Sparsifier::None, false),
        Ties => (Kind::TaskVector, Sparsifier::Magnitude, true),
        DareLinear => (Kind::TaskVector, Sparsifier::Random, false),
        DareTies => (Kind::TaskVector, Sparsifier::Random, true),
        Breadcrumbs => (Kind::TaskVector, Sparsifier::Outliers, false),
        BreadcrumbsTies => (Kind::TaskVector, Sparsifier::Outliers, true),
        Della => (Kind::TaskVector, Sparsifier::Della, true),
        DellaLinear => (Kind::TaskVector, Sparsifier::Della, false),
    };
    let ctx = TensorContext {
        gguf_name: "",
        hf_name: None,
        layer: None,
        n_layers: 1,
    };
    let normalize = config
        .flag(None, "normalize", &ctx)
        .unwrap_or(config.method.default_normalize());
    MethodSpec {
        kind,
        sparsifier,
        consensus,
        normalize,
        rescale: match config.rescale() {
            Rescale::Inverse => RescaleMode::Inverse,
            Rescale::L1 => RescaleMode::L1,
            Rescale::None => RescaleMode::None,
        },
    }
}

/// Parses an output type: a mixture name (`Q4_K_M`, `Q3_K_S` …) applies llama.cpp's rules; a
/// plain ggml type name (`Q8_0`, `Q4_K`, `F16`) gives every weight matrix that one type.
pub fn parse_out_type(name: &str) -> Result<Target> {
    if let Some(ty) = GgmlType::from_name(name) {
        if let Some(ftype) = FTYPES.iter().find(|f| f.default_type == ty) {
            return Ok(Target { ftype, pure: true });
        }
    }
    Target::parse(name, false).map_err(|e| Error::Invalid(e.to_string()))
}

fn layer_of(name: &str) -> Option<u32> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Resolves a config into a plan without computing anything (`--dry-run` prints it).
pub fn plan_merge(config: &MergeConfig, opts: &MergeOptions) -> Result<MergePlan> {
    config
        .validate()
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let method = method_spec(config);
    let invalid = |s: String| Error::Invalid(s);

    // Inputs: for linear merges the models are all the inputs and the first is the reference.
    let base_path = if config.method == Method::Linear {
        PathBuf::from(
            &config
                .models
                .first()
                .ok_or_else(|| invalid("no models to merge".into()))?
                .model,
        )
    } else {
        match &config.base_model {
            Some(b) => PathBuf::from(b),
            None => {
                return Err(invalid(format!(
                    "merge method {} needs a base model (base_model / --base)",
                    config.method.name()
                )))
            }
        }
    };
    let reference = GgufModel::open(&base_path).map_err(|e| match e {
        crate::format::FormatError::BadMagic { .. } => invalid(format!(
            "{}: the base must be a GGUF file: the output takes its metadata and tokenizer from it",
            base_path.display()
        )),
        e => e.into(),
    })?;
    let models: Vec<Box<dyn ModelSource>> = config
        .models
        .iter()
        .map(|m| open_model(Path::new(&m.model)))
        .collect::<Result<_>>()?;
    if method.kind == Kind::Slerp && models.len() != 1 {
        return Err(invalid(format!(
            "slerp interpolates the base and exactly one model; {} given",
            models.len()
        )));
    }

    // Architectures must agree.
    let arch = reference
        .metadata()
        .architecture()
        .unwrap_or("")
        .to_string();
    for m in &models {
        if let Some(a) = m.architecture() {
            if a != arch {
                return Err(invalid(format!(
                    "{}: architecture {a} does not match the base's {arch} ({})",
                    m.path().display(),
                    base_path.display()
                )));
            }
        }
    }

    let seed = opts.seed.or(config.seed).unwrap_or(0);
    let n_layers = reference
        .metadata()
        .arch_u64("block_count")
        .unwrap_or(1)
        .max(1) as u32;

    // Output types.
    let out_type = opts.out_type.clone().or_else(|| config.out_type.clone());
    let types: Vec<GgmlType> = match &out_type {
        None => reference.tensors().map(|t| t.info.ty).collect(),
        Some(name) => {
            let target = parse_out_type(name)?;
            let inputs: Vec<PlanInput<'_>> = reference
                .tensors()
                .map(|t| PlanInput {
                    name: &t.info.name,
                    shape: &t.info.shape,
                    ty: t.info.ty,
                })
                .collect();
            plan_types(
                &inputs,
                &ModelFacts::from_metadata(reference.metadata()),
                target,
            )
        }
    };

    let linear_ref = method.kind == Kind::Linear;
    let mut tensors = Vec::with_capacity(reference.n_tensors());
    let mut output_bytes = 0u64;
    for (t, &out_ty) in reference.tensors().zip(&types) {
        let info = t.info;
        let ctx = TensorContext {
            gguf_name: &info.name,
            hf_name: None,
            layer: layer_of(&info.name),
            n_layers,
        };
        let mut params = Vec::with_capacity(models.len());
        let mut all_same = true;
        for (i, m) in models.iter().enumerate() {
            let (shape, ty) = m.tensor_info(&info.name).ok_or_else(|| {
                invalid(format!(
                    "{}: has no tensor {:?} that the base {} has (architectures or tensor sets differ)",
                    m.path().display(),
                    info.name,
                    base_path.display()
                ))
            })?;
            let embed = info.name == "token_embd.weight" || info.name == "output.weight";
            let rows_ok = shape.len() == info.shape.len()
                && shape[0] == info.shape[0]
                && (shape[1..] == info.shape[1..] || (embed && shape[1..] >= info.shape[1..]));
            if !rows_ok {
                return Err(invalid(format!(
                    "{}: tensor {:?} has shape {shape:?}, the base has {:?}",
                    m.path().display(),
                    info.name,
                    info.shape
                )));
            }
            if all_same && !(linear_ref && i == 0) {
                let same_type = ty == info.ty && shape == info.shape;
                all_same = same_type
                    && m.tensor(&info.name)?
                        .is_some_and(|mt| mt.data.as_ref() == t.data);
            }
            let weight = config.number(Some(i), "weight", &ctx).unwrap_or(1.0);
            let density = config.number(Some(i), "density", &ctx).unwrap_or(1.0);
            if !(density > 0.0 && density <= 1.0) {
                return Err(invalid(format!(
                    "model {}: density {density} for tensor {:?} is outside (0, 1]",
                    config.models[i].model, info.name
                )));
            }
            if !weight.is_finite() {
                return Err(invalid(format!(
                    "model {}: weight for tensor {:?} is not a finite number",
                    config.models[i].model, info.name
                )));
            }
            params.push(ModelParams {
                weight: weight as f32,
                density,
                gamma: config.number(Some(i), "gamma", &ctx).unwrap_or(0.01),
                epsilon: config.number(Some(i), "epsilon", &ctx).unwrap_or(0.15),
                stream: i as u32,
            });
        }
        let normalize_identity = !linear_ref || method.normalize;
        let action = if all_same && normalize_identity {
            if out_ty == info.ty {
                TensorAction::Copy
            } else {
                TensorAction::Requantize
            }
        } else {
            TensorAction::Merge
        };
        output_bytes += nbytes(&info.shape, out_ty)
            .map_err(|e| invalid(format!("tensor {:?} as {out_ty}: {e}", info.name)))?;
        tensors.push(PlannedTensor {
            name: info.name.clone(),
            shape: info.shape.clone(),
            base_ty: info.ty,
            out_ty,
            action,
            params,
            lambda: config.number(None, "lambda", &ctx).unwrap_or(1.0) as f32,
            t: config.number(None, "t", &ctx).unwrap_or(0.5),
        });
    }
    // Checks the quantize layer would otherwise report mid-merge.
    for t in tensors.iter().filter(|t| t.action != TensorAction::Copy) {
        crate::quant::codec::check_quantize(t.out_ty, t.shape[0], &t.name)
            .map_err(|e| invalid(format!("{}: {e}", opts.output.display())))?;
    }

    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        as u64;
    // Per thread: base, output and dequantized output chunks plus one per model, f32; two
    // 64 Ki-bucket histograms for rank selection; one output slab.
    let chunk = 64 * 1024 * 4u64;
    let peak_memory = threads * (chunk * (models.len() as u64 + 3) + 2 * 65536 * 8) + (32 << 20);

    let mut metadata = reference.metadata().clone();
    for k in ["split.no", "split.count", "split.tensors.count"] {
        metadata.remove(k);
    }
    if let Some(name) = &out_type {
        let target = parse_out_type(name)?;
        metadata.set("general.file_type", Value::U32(target.ftype.id));
        metadata.set("general.quantization_version", Value::U32(2));
    }
    Ok(MergePlan {
        reference,
        models,
        method,
        method_name: config.method.name(),
        seed,
        tensors,
        metadata,
        output_bytes,
        peak_memory,
    })
}

/// Merges according to `config` and writes `opts.output`.
///
/// ```no_run
/// use ggmerge::merge::config::MergeConfig;
/// use ggmerge::{merge_models, MergeOptions, NoProgress};
///
/// let config = MergeConfig::from_path("merge.yml".as_ref())?;
/// let opts = MergeOptions { output: "merged.gguf".into(), out_type: None, seed: Some(42), threads: None };
/// let report = merge_models(&config, &opts, &NoProgress)?;
/// println!("{} tensors merged, {} copied", report.merged, report.copied);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn merge_models(
    config: &MergeConfig,
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<MergeReport> {
    let started = Instant::now();
    let plan = plan_merge(config, opts)?;
    run_plan(&plan, opts, progress, started)
}

fn run_plan(
    plan: &MergePlan,
    opts: &MergeOptions,
    progress: &dyn Progress,
    started: Instant,
) -> Result<MergeReport> {
    let specs: Vec<TensorSpec> = plan
        .tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            shape: t.shape.clone(),
            ty: t.out_ty,
        })
        .collect();
    let mut inputs: Vec<&Path> = plan.reference.shards().iter().map(|s| s.path()).collect();
    inputs.extend(plan.models.iter().map(|m| m.path()));
    let version = plan.reference.shards()[0].header().version.max(2);
    let mut writer = GgufWriter::create(&opts.output, version, &plan.metadata, &specs, &inputs)?;

    let m = plan.models.len();
    let mut zero = vec![0u64; m];
    let mut sumsq = vec![0f64; m];
    let mut kept = vec![0u64; m];
    let mut elements = 0u64;
    let (mut step_sumsq, mut step_blocks) = (0f64, 0u64);
    let mut retention: Vec<(GgmlType, f64, f64, usize)> = Vec::new();
    let mut merged = 0;
    progress.start(plan.output_bytes);
    let n = plan.tensors.len();
    let result = with_threads(opts.threads, || {
        for (idx, t) in plan.tensors.iter().enumerate() {
            progress.tensor(&t.name, idx, n);
            let base = plan.reference.tensor(idx);
            match t.action {
                TensorAction::Copy => {
                    writer.write_part(base.data)?;
                    progress.advance(base.data.len() as u64);
                }
                TensorAction::Requantize => {
                    let size = nbytes(&t.shape, t.out_ty).unwrap_or(0) as usize;
                    let mut out = vec![0u8; size];
                    crate::quant::convert(
                        t.base_ty, base.data, t.out_ty, &mut out, t.shape[0], &t.name,
                    )
                    .map_err(|source| Error::Tensor {
                        path: plan.reference.path().to_path_buf(),
                        source,
                    })?;
                    writer.write_part(&out)?;
                    progress.advance(size as u64);
                }
                TensorAction::Merge => {
                    merged += 1;
                    let model_tensors: Vec<_> = plan
                        .models
                        .iter()
                        .map(|mm| {
                            mm.tensor(&t.name)
                                .map(|x| x.expect("planned tensor exists"))
                        })
                        .collect::<std::result::Result<_, _>>()?;
                    let linear = plan.method.kind == Kind::Linear;
                    let job = TensorJob {
                        name: &t.name,
                        n_per_row: t.shape[0] as usize,
                        n_rows: (t.shape[1..].iter().product::<u64>()) as usize,
                        base: (!linear).then_some(InputTensor {
                            data: base.data,
                            ty: t.base_ty,
                        }),
                        models: model_tensors
                            .iter()
                            .map(|x| InputTensor {
                                data: &x.data,
                                ty: x.ty,
                            })
                            .collect(),
                        params: t.params.clone(),
                        method: plan.method,
                        lambda: t.lambda,
                        t: t.t,
                        seed: plan.seed,
                        out_ty: t.out_ty,
                    };
                    let st = engine::merge_tensor(&job, &mut |bytes| {
                        progress.advance(bytes.len() as u64);
                        writer.write_part(bytes).map_err(Error::from)
                    })
                    .map_err(|e| match e {
                        MergeTensorError::Write(e) => e,
                        MergeTensorError::Engine(e) => Error::Tensor {
                            path: match e.input {
                                None => plan.reference.path().to_path_buf(),
                                Some(i) => plan.models[i].path().to_path_buf(),
                            },
                            source: e.source,
                        },
                    })?;
                    elements += st.elements;
                    for i in 0..m {
                        zero[i] += st.zero_deltas[i];
                        sumsq[i] += st.delta_sumsq[i];
                        kept[i] += st.kept[i];
                    }
                    step_sumsq += st.step_sumsq;
                    step_blocks += st.step_blocks;
                    if st.retention_den > 0.0 && t.out_ty != GgmlType::F32 {
                        match retention.iter_mut().find(|r| r.0 == t.out_ty) {
                            Some(r) => {
                                r.1 += st.retention_num;
                                r.2 += st.retention_den;
                                r.3 += 1;
                            }
                            None => {
                                retention.push((t.out_ty, st.retention_num, st.retention_den, 1))
                            }
                        }
                    }
                }
            }
            writer.end_tensor()?;
        }
        Ok(())
    });
    progress.finish();
    result?;
    let output_bytes = writer.finish()?;

    let step_rms = (step_blocks > 0).then(|| (step_sumsq / step_blocks as f64).sqrt());
    let mut warnings = Vec::new();
    let models: Vec<ModelReport> = plan
        .models
        .iter()
        .enumerate()
        .map(|(i, mm)| {
            let e = elements.max(1) as f64;
            let delta_rms = (sumsq[i] / e).sqrt();
            // Two independent roundings with step s: noise RMS ≈ s/√12 · √2.
            let signal_to_noise = step_rms.map(|s| delta_rms / (s / 12f64.sqrt() * 2f64.sqrt()).max(1e-30));
            if let Some(snr) = signal_to_noise {
                if snr < 2.0 && plan.method.kind == Kind::TaskVector {
                    warnings.push(format!(
                        "{}: its delta (RMS {delta_rms:.2e}) is not far above the base's quantization noise (ratio {snr:.2}): \
                         much of what is merged is rounding noise; use higher-precision (F16/Q8_0) experts and base if you can",
                        mm.path().display()
                    ));
                }
            }
            ModelReport {
                path: mm.path().display().to_string(),
                zero_delta_share: zero[i] as f64 / e,
                delta_rms,
                signal_to_noise,
                kept_share: kept[i] as f64 / e,
            }
        })
        .collect();
    let retention: Vec<RetentionReport> = retention
        .into_iter()
        .map(|(ty, num, den, tensors)| {
            let r = num / den;
            if r < 0.5 {
                warnings.push(format!(
                    "{ty} output keeps only {:.0}% of the merged delta (requantization rounds small changes away): \
                     use DARE (dare_ties / dare_linear) with a lower density so kept deltas are rescaled above the step, \
                     or more bits for the changed tensors (--type Q8_0)",
                    r * 100.0
                ));
            }
            RetentionReport { ty: ty.name().into(), retention: r, tensors }
        })
        .collect();
    Ok(MergeReport {
        tensors: n,
        merged,
        copied: plan
            .tensors
            .iter()
            .filter(|t| t.action == TensorAction::Copy)
            .count(),
        output_bytes,
        seconds: started.elapsed().as_secs_f64(),
        models,
        retention,
        warnings,
    })
}
