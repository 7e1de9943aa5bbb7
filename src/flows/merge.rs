//! `merge`: combine a base and fine-tuned models (GGUF of any type, or safetensors) into one
//! GGUF, streaming tensor by tensor, in parallel, reproducibly.
//!
//! The flow resolves the config into a per-tensor plan ([`plan_merge`]: which tensors are
//! copied verbatim, which are merged, the output type of each), then runs the engine
//! ([`crate::merge::engine`]) tensor by tensor and writes the result with the base's metadata
//! and tokenizer. The report carries the delta-noise and delta-retention measurements.

use std::borrow::Cow;
use std::sync::Arc;

use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::delta::pack::{fingerprint, DeltaPack};
use crate::error::{Error, Result};
use crate::flows::progress::{with_threads, Progress};
use crate::format::gguf::{is_gguf_file, GgufModel, GgufWriter, Metadata, TensorSpec, Value};
use crate::format::hf_names::{self, HfConfig};
use crate::format::output::{Destination, FileFormat};
use crate::format::safetensors::{
    write_safetensors, ExportTensor, SafetensorsModel, SafetensorsOptions,
};
use crate::format::source::{ModelSource, SourceTensor};
use crate::format::{nbytes, GgmlType};
use crate::merge::config::{MergeConfig, Method, Rescale, TensorContext};
use crate::merge::engine::{
    self, Culprit, InputTensor, Kind, MergeTensorError, MethodSpec, ModelInput, ModelParams,
    RescaleMode, SlabPool, SparseDelta, SparseMask, TensorJob,
};
use crate::merge::kernel::Sparsifier;
use crate::quant::{plan_types, ModelFacts, PlanInput, Target, FTYPES};

/// Options of [`merge_models`] beyond the config.
#[derive(Clone, Debug, Default)]
pub struct MergeOptions {
    /// Output path: `*.gguf` (GGUF), `*.safetensors` or a directory (safetensors with Hugging
    /// Face names); any other name needs [`MergeOptions::format`]
    /// ([`Destination::resolve`]).
    pub output: PathBuf,
    /// The output format, when the path does not say it.
    pub format: Option<FileFormat>,
    /// Replace existing files beside the named output (`config.json`, shards, the files
    /// inside an output directory); without it they are an error.
    pub force: bool,
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
    /// Reference model (the base; for linear merges without base, the first model).
    pub reference: Box<dyn ModelSource>,
    /// Output format, from the output path.
    pub format: OutputFormat,
    /// Where the output goes.
    pub destination: Destination,
    /// Models (fine-tunes or delta packs) in input order.
    pub models: Vec<MergeInput>,
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
    /// Found while planning (delta packs of absurd scale).
    pub warnings: Vec<String>,
}

/// One merge input: a model (GGUF or safetensors), or a delta pack of one.
pub enum MergeInput {
    /// A fine-tuned model; its delta is computed against the base.
    Model(Box<dyn ModelSource>),
    /// A sparse delta pack extracted against this base (shared: the runtime keeps its packs
    /// open, with their cached kept indices, across mixtures).
    Pack(Arc<DeltaPack>),
}

impl MergeInput {
    /// The input's path.
    pub fn path(&self) -> &Path {
        match self {
            MergeInput::Model(m) => m.path(),
            MergeInput::Pack(p) => p.path(),
        }
    }
    /// Its architecture, if known.
    pub fn architecture(&self) -> Option<&str> {
        match self {
            MergeInput::Model(m) => m.architecture(),
            MergeInput::Pack(p) => p.architecture(),
        }
    }
}

/// The output file format.
#[derive(Clone, Debug, PartialEq)]
pub enum OutputFormat {
    /// GGUF with the base's metadata and tokenizer.
    Gguf,
    /// safetensors with HF names (`config` written next to it), sharded at `max_shard_bytes`.
    Safetensors {
        /// Architecture and head counts for names and transforms.
        config: Box<HfConfig>,
        /// Shard size, when the base is sharded.
        max_shard_bytes: Option<u64>,
    },
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
    /// Where the output went, and in which format.
    pub destination: Destination,
    /// Wall time.
    pub seconds: f64,
    /// Per model.
    pub models: Vec<ModelReport>,
    /// Per output type.
    pub retention: Vec<RetentionReport>,
    /// Advice for the user (noise-dominated experts, low retention).
    pub warnings: Vec<String>,
}

/// Opens a merge input: a GGUF file (or split model), else safetensors (a file, a sharded
/// index, or an HF directory). A safetensors model without `config.json` takes its
/// architecture and head counts from `fallback` (the GGUF base's metadata).
pub fn open_model(path: &Path, fallback: Option<&HfConfig>) -> Result<Box<dyn ModelSource>> {
    if is_gguf_file(path) {
        return Ok(Box::new(GgufModel::open(path)?));
    }
    if !path.exists() {
        return Err(Error::Invalid(format!(
            "{}: no such file or directory",
            path.display()
        )));
    }
    // A file that is neither GGUF nor named like safetensors is reported as a bad GGUF (its
    // magic), not as a bad safetensors model.
    let safetensors_name = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors") || e.eq_ignore_ascii_case("json"));
    if path.is_file() && !safetensors_name {
        return Ok(Box::new(GgufModel::open(path)?));
    }
    Ok(Box::new(match fallback {
        Some(c) => SafetensorsModel::open_or_config(path, c.clone())?,
        None => SafetensorsModel::open(path)?,
    }))
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

/// The HF config of a safetensors base (its `config.json`, else the fallback) and, when it is
/// sharded, its largest shard's size, so the output is sharded like the input.
fn safetensors_base(path: &Path, fallback: Option<&HfConfig>) -> Result<(HfConfig, Option<u64>)> {
    let model = match fallback {
        Some(c) => SafetensorsModel::open_or_config(path, c.clone())?,
        None => SafetensorsModel::open(path)?,
    };
    let files = model.files();
    let shard = (files.len() > 1)
        .then(|| {
            files
                .iter()
                .filter_map(|f| std::fs::metadata(f).ok())
                .map(|m| m.len())
                .max()
        })
        .flatten();
    Ok((model.config().clone(), shard))
}

/// Model `i`'s parameters for one tensor, checked.
fn model_params(
    config: &MergeConfig,
    i: usize,
    ctx: &TensorContext<'_>,
    name: &str,
) -> Result<ModelParams> {
    let weight = config.number(Some(i), "weight", ctx).unwrap_or(1.0);
    let density = config.number(Some(i), "density", ctx).unwrap_or(1.0);
    if !(density > 0.0 && density <= 1.0) {
        return Err(Error::Invalid(format!(
            "model {}: density {density} for tensor {name:?} is outside (0, 1]",
            config.models[i].model
        )));
    }
    if !crate::merge::config::number_fits_f32(weight) {
        return Err(Error::Invalid(format!(
            "model {}: weight {weight} for tensor {name:?} is not a finite number of at most \
             3.4e38 in magnitude",
            config.models[i].model
        )));
    }
    Ok(ModelParams {
        weight: weight as f32,
        density,
        gamma: config.number(Some(i), "gamma", ctx).unwrap_or(0.01),
        epsilon: config.number(Some(i), "epsilon", ctx).unwrap_or(0.15),
        stream: i as u32,
    })
}

/// Resolves a config into a plan without computing anything (`--dry-run` prints it). The
/// output path is checked first ([`Destination::check`]), so a path that cannot be written
/// fails before any input is opened.
pub fn plan_merge(config: &MergeConfig, opts: &MergeOptions) -> Result<MergePlan> {
    Destination::resolve(&opts.output, opts.format)?.check(opts.force)?;
    plan_merge_with_packs(config, opts, &[])
}

/// [`plan_merge`], taking delta packs from `open` (matched by path) instead of opening them
/// again: the runtime plans every mixture this way, reusing packs whose kept indices it has
/// cached ([`DeltaPack::cache_kept_indices`]). Packs not in `open` are opened as usual.
///
/// The caller has checked the packs in `open` against this base ([`DeltaPack::check_base`],
/// as an expert session does when it opens them): their base fingerprint — a hash of the
/// whole base — is not recomputed on every plan. Packs opened here are checked.
pub fn plan_merge_with_packs(
    config: &MergeConfig,
    opts: &MergeOptions,
    open: &[Arc<DeltaPack>],
) -> Result<MergePlan> {
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
    // Each input is parsed once, all of them concurrently: a GGUF header with a 50k-token
    // vocabulary takes milliseconds to read, serial time before any tensor is merged. GGUF
    // models open alongside the base; safetensors ones need the base's architecture (their
    // tensor names are mapped with it), so they open after it.
    let (reference, gguf_models) = rayon::join(
        || open_model(&base_path, None),
        || {
            config
                .models
                .par_iter()
                .map(|m| {
                    let path = Path::new(&m.model);
                    // (input, whether its base fingerprint still needs checking)
                    if let Some(p) = open.iter().find(|p| p.path() == path) {
                        return Some(Ok((MergeInput::Pack(Arc::clone(p)), false)));
                    }
                    is_gguf_file(path).then(|| {
                        let file = GgufModel::open(path)?;
                        Ok(if DeltaPack::is_pack_file(&file) {
                            let pack = DeltaPack::from_file(path, file)?;
                            (MergeInput::Pack(Arc::new(pack)), true)
                        } else {
                            (MergeInput::Model(Box::new(file)), false)
                        })
                    })
                })
                .collect::<Vec<Option<Result<(MergeInput, bool)>>>>()
        },
    );
    let reference = reference?;
    let fallback = reference.metadata().and_then(HfConfig::from_gguf_metadata);
    let opened: Vec<Result<(MergeInput, bool)>> = gguf_models
        .into_par_iter()
        .zip(&config.models)
        .map(|(opened, m)| {
            opened.unwrap_or_else(|| {
                let model = open_model(Path::new(&m.model), fallback.as_ref())?;
                Ok((MergeInput::Model(model), false))
            })
        })
        .collect();
    let mut base_fingerprint: Option<String> = None;
    let mut warnings = Vec::new();
    let mut models = Vec::with_capacity(config.models.len());
    for input in opened {
        let (input, unchecked) = input?;
        if let MergeInput::Pack(pack) = &input {
            if unchecked {
                if base_fingerprint.is_none() {
                    base_fingerprint = Some(fingerprint(reference.as_ref())?);
                }
                pack.check_base(
                    reference.as_ref(),
                    base_fingerprint.as_deref().unwrap_or(""),
                )?;
                warnings.extend(pack.scale_warnings(reference.as_ref())?);
            }
            if let Some((name, _)) = pack
                .tensors
                .iter()
                .find(|(n, _)| reference.tensor_info(n).is_none())
            {
                return Err(Error::Invalid(format!(
                    "{}: has a delta for tensor {name:?}, which the base {} does not have",
                    pack.path().display(),
                    reference.path().display()
                )));
            }
        }
        models.push(input);
    }
    let destination = Destination::resolve(&opts.output, opts.format)?;
    let format = if destination.format == FileFormat::Gguf {
        if reference.metadata().is_none() {
            return Err(invalid(format!(
                "{}: GGUF output takes its metadata and tokenizer from a GGUF base, but the base {} is safetensors; \
                 write .safetensors output, or use a GGUF base",
                opts.output.display(),
                base_path.display()
            )));
        }
        OutputFormat::Gguf
    } else {
        let (config, max_shard_bytes) = match reference.metadata() {
            Some(md) => (
                HfConfig::from_gguf_metadata(md).ok_or_else(|| {
                    invalid(format!(
                        "{}: safetensors output needs an architecture ggmerge maps to Hugging Face names ({})",
                        base_path.display(),
                        hf_names::SUPPORTED_ARCHS.join(", ")
                    ))
                })?,
                None,
            ),
            None => safetensors_base(&base_path, fallback.as_ref())?,
        };
        OutputFormat::Safetensors {
            config: Box::new(config),
            max_shard_bytes,
        }
    };
    if method.kind == Kind::Slerp && models.len() != 1 {
        return Err(invalid(format!(
            "slerp interpolates the base and exactly one model; {} given",
            models.len()
        )));
    }
    // Architectures must agree.
    let arch = reference.architecture().unwrap_or("").to_string();
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
    let n_layers = reference.block_count().unwrap_or(1).max(1) as u32;

    // Output types.
    let out_type = opts.out_type.clone().or_else(|| config.out_type.clone());
    let names = reference.tensor_names();
    let infos: Vec<(Vec<u64>, GgmlType)> = names
        .iter()
        .map(|n| reference.tensor_info(n).expect("listed tensor"))
        .collect();
    let types: Vec<GgmlType> = match (&out_type, &format) {
        (None, OutputFormat::Gguf) => infos.iter().map(|i| i.1).collect(),
        (Some(name), OutputFormat::Gguf) => {
            let target = parse_out_type(name)?;
            let inputs: Vec<PlanInput<'_>> = names
                .iter()
                .zip(&infos)
                .map(|(n, (shape, ty))| PlanInput {
                    name: n,
                    shape,
                    ty: *ty,
                })
                .collect();
            let facts = reference
                .metadata()
                .map(ModelFacts::from_metadata)
                .unwrap_or_default();
            plan_types(&inputs, &facts, target)
        }
        (name, OutputFormat::Safetensors { .. }) => {
            let matrices = match name {
                Some(n) => match GgmlType::from_name(n) {
                    Some(t @ (GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)) => Some(t),
                    _ => {
                        return Err(invalid(format!(
                            "safetensors output is F32, F16 or BF16, not {n}"
                        )))
                    }
                },
                None => None,
            };
            infos
                .iter()
                .map(|(shape, ty)| match (shape.len(), matrices) {
                    (1, _) => GgmlType::F32,
                    (_, Some(t)) => t,
                    (_, None) if matches!(*ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) => {
                        *ty
                    }
                    (_, None) => GgmlType::F16,
                })
                .collect()
        }
    };

    let linear_ref = method.kind == Kind::Linear;
    let mut tensors = Vec::with_capacity(names.len());
    let mut output_bytes = 0u64;
    for ((name, (shape, base_ty)), &out_ty) in names.iter().zip(&infos).zip(&types) {
        let hf = hf_names::gguf_to_hf(&arch, name);
        let ctx = TensorContext {
            gguf_name: name,
            hf_name: hf.as_deref(),
            layer: layer_of(name),
            n_layers,
        };
        let mut base_data = None;
        let mut params = Vec::with_capacity(models.len());
        let mut all_same = true;
        for (i, m) in models.iter().enumerate() {
            let m = match m {
                MergeInput::Model(m) => m,
                MergeInput::Pack(p) => {
                    // A pack changes the tensors it lists; the rest are the base's.
                    if let Some(t) = p.tensor(name) {
                        let n: u64 = shape.iter().product();
                        if t.kept > n {
                            return Err(invalid(format!(
                                "{}: tensor {name:?} has {} kept values but the base tensor has {n} elements",
                                p.path().display(),
                                t.kept
                            )));
                        }
                        all_same = false;
                    }
                    params.push(model_params(config, i, &ctx, name)?);
                    continue;
                }
            };
            let (m_shape, m_ty) = m.tensor_info(name).ok_or_else(|| {
                invalid(format!(
                    "{}: has no tensor {:?} that the base {} has (architectures or tensor sets differ)",
                    m.path().display(),
                    name,
                    base_path.display()
                ))
            })?;
            let embed = name == "token_embd.weight" || name == "output.weight";
            let rows_ok = m_shape.len() == shape.len()
                && m_shape[0] == shape[0]
                && (m_shape[1..] == shape[1..] || (embed && m_shape[1..] >= shape[1..]));
            if !rows_ok {
                return Err(invalid(format!(
                    "{}: tensor {:?} has shape {m_shape:?}, the base has {:?}",
                    m.path().display(),
                    name,
                    *shape
                )));
            }
            if all_same && !(linear_ref && i == 0) {
                all_same = m_ty == *base_ty && m_shape == *shape;
                if all_same {
                    // Read (and for safetensors, transform) the base only when it may be equal.
                    if base_data.is_none() {
                        base_data = reference.tensor(name)?;
                    }
                    let base_bytes = base_data.as_ref().map(|b| b.data.as_ref());
                    all_same = m
                        .tensor(name)?
                        .is_some_and(|mt| Some(mt.data.as_ref()) == base_bytes);
                }
            }
            params.push(model_params(config, i, &ctx, name)?);
        }
        let normalize_identity = !linear_ref || method.normalize;
        let action = if all_same && normalize_identity {
            if out_ty == *base_ty {
                TensorAction::Copy
            } else {
                TensorAction::Requantize
            }
        } else {
            TensorAction::Merge
        };
        output_bytes += nbytes(shape, out_ty)
            .map_err(|e| invalid(format!("tensor {:?} as {out_ty}: {e}", name)))?;
        tensors.push(PlannedTensor {
            name: name.clone(),
            shape: shape.clone(),
            base_ty: *base_ty,
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
    // Per thread: base and output chunks plus one per model, f32; two 64 Ki-bucket histograms
    // for rank selection. Output slabs: queued, being written, being computed (or a window of
    // small tensors), and kept for reuse.
    let chunk = engine::DEFAULT_CHUNK_ELEMS as u64 * 4;
    let slabs = (QUEUED_PARTS + 2 + SlabPool::KEEP) as u64 * engine::SLAB_BYTES as u64;
    let peak_memory =
        threads * (chunk * (models.len() as u64 + 2) + 2 * 65536 * 8) + slabs + WINDOW_BYTES;

    let mut metadata = reference.metadata().cloned().unwrap_or_default();
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
        format,
        destination,
        output_bytes,
        peak_memory,
        warnings,
    })
}

/// Merges according to `config` and writes `opts.output`.
///
/// ```no_run
/// use ggmerge::merge::config::MergeConfig;
/// use ggmerge::{merge_models, MergeOptions, NoProgress};
///
/// let config = MergeConfig::from_path("merge.yml".as_ref())?;
/// let opts = MergeOptions { output: "merged.gguf".into(), seed: Some(42), ..Default::default() };
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
    // Planning opens the inputs concurrently: on the merge's own threads (`-t`).
    let plan = with_threads(opts.threads, || plan_merge(config, opts))?;
    run_plan(&plan, opts, progress, started)
}

/// Running totals of the engine's per-tensor measurements.
#[derive(Default)]
struct Totals {
    zero: Vec<u64>,
    sumsq: Vec<f64>,
    kept: Vec<u64>,
    elements: u64,
    step_sumsq: f64,
    step_blocks: u64,
    retention: Vec<(GgmlType, f64, f64, usize)>,
    merged: usize,
}

impl Totals {
    fn add(&mut self, st: &engine::TensorStats, out_ty: GgmlType) {
        self.merged += 1;
        self.elements += st.elements;
        self.zero.resize(st.zero_deltas.len(), 0);
        self.sumsq.resize(st.delta_sumsq.len(), 0.0);
        self.kept.resize(st.kept.len(), 0);
        for i in 0..st.kept.len() {
            self.zero[i] += st.zero_deltas[i];
            self.sumsq[i] += st.delta_sumsq[i];
            self.kept[i] += st.kept[i];
        }
        self.step_sumsq += st.step_sumsq;
        self.step_blocks += st.step_blocks;
        if st.retention_den > 0.0 && out_ty != GgmlType::F32 {
            match self.retention.iter_mut().find(|r| r.0 == out_ty) {
                Some(r) => {
                    r.1 += st.retention_num;
                    r.2 += st.retention_den;
                    r.3 += 1;
                }
                None => self
                    .retention
                    .push((out_ty, st.retention_num, st.retention_den, 1)),
            }
        }
    }
}

/// Hints to every input that tensor `name` is done, so mapped inputs drop its pages from the
/// process's resident set: a merge's RSS then follows the tensor being merged, not the inputs'
/// total size.
fn release_inputs(plan: &MergePlan, name: &str) {
    plan.reference.release(name, 0..usize::MAX);
    for m in &plan.models {
        match m {
            MergeInput::Model(m) => m.release(name, 0..usize::MAX),
            MergeInput::Pack(p) => p.release(name),
        }
    }
}

/// Produces output tensor `idx` of the plan as `out_ty` bytes, handed to `write` in order
/// (computed parts owned, verbatim copies borrowed from the base's map); returns the engine's
/// measurements for a merged tensor (`None` for a copy).
fn produce_tensor<'p>(
    plan: &'p MergePlan,
    idx: usize,
    out_ty: GgmlType,
    measure: bool,
    slabs: Option<&SlabPool>,
    write: &mut dyn FnMut(Cow<'p, [u8]>) -> Result<()>,
) -> Result<Option<engine::TensorStats>> {
    produce(plan, idx, out_ty, measure, Sink::Parts(slabs, write))
}

/// Where [`produce`] puts a tensor's bytes.
enum Sink<'s, 'p> {
    /// Handed over in order, part by part (slabs from the pool, if any).
    Parts(
        Option<&'s SlabPool>,
        &'s mut dyn FnMut(Cow<'p, [u8]>) -> Result<()>,
    ),
    /// The whole tensor in one buffer, computed in place.
    Whole(&'s mut Vec<u8>),
}

/// Output tensor `idx` of the plan as `out_ty` bytes, into `sink`; the engine's measurements
/// for a merged tensor (`None` for a copy).
fn produce<'p>(
    plan: &'p MergePlan,
    idx: usize,
    out_ty: GgmlType,
    measure: bool,
    sink: Sink<'_, 'p>,
) -> Result<Option<engine::TensorStats>> {
    let (slabs, mut sink) = match sink {
        Sink::Parts(slabs, write) => (slabs, Sink::Parts(None, write)),
        whole => (None, whole),
    };
    fn emit<'p>(sink: &mut Sink<'_, 'p>, bytes: Cow<'p, [u8]>) -> Result<()> {
        match sink {
            Sink::Parts(_, write) => write(bytes),
            Sink::Whole(buf) => {
                **buf = bytes.into_owned();
                Ok(())
            }
        }
    }
    let t = &plan.tensors[idx];
    let base = plan.reference.tensor(&t.name)?.ok_or_else(|| {
        Error::Invalid(format!(
            "{}: tensor {:?} vanished",
            plan.reference.path().display(),
            t.name
        ))
    })?;
    let base_err = |source| Error::Tensor {
        path: plan.reference.path().to_path_buf(),
        source,
    };
    match t.action {
        TensorAction::Copy if out_ty == base.ty => emit(&mut sink, base.data).map(|()| None),
        TensorAction::Copy | TensorAction::Requantize => {
            let size = nbytes(&t.shape, out_ty).unwrap_or(0) as usize;
            let mut out = vec![0u8; size];
            crate::quant::convert(base.ty, &base.data, out_ty, &mut out, t.shape[0], &t.name)
                .map_err(base_err)?;
            emit(&mut sink, Cow::Owned(out)).map(|()| None)
        }
        TensorAction::Merge => {
            let dense: Vec<Option<SourceTensor<'_>>> = plan
                .models
                .iter()
                .map(|m| match m {
                    MergeInput::Model(m) => m.tensor(&t.name)?.map(Some).ok_or_else(|| {
                        Error::Invalid(format!(
                            "{}: tensor {:?} vanished",
                            m.path().display(),
                            t.name
                        ))
                    }),
                    MergeInput::Pack(_) => Ok(None),
                })
                .collect::<Result<_>>()?;
            let inputs: Vec<ModelInput<'_>> = plan
                .models
                .iter()
                .zip(&dense)
                .map(|(m, d)| match (m, d) {
                    (_, Some(x)) => ModelInput::Dense(InputTensor {
                        data: &x.data,
                        ty: x.ty,
                    }),
                    (MergeInput::Pack(p), None) => {
                        ModelInput::Sparse(p.sparse(&t.name).unwrap_or(SparseDelta {
                            values: &[],
                            values_ty: GgmlType::F32,
                            mask: SparseMask::Indices(&[]),
                        }))
                    }
                    (MergeInput::Model(_), None) => unreachable!("dense inputs were read above"),
                })
                .collect();
            let linear = plan.method.kind == Kind::Linear;
            // Rows the engine is done with leave the process's resident set (inputs are
            // memory-mapped): RSS follows the slab being merged, even for a huge embedding.
            let n_per_row = t.shape[0];
            let row_bytes = |ty: GgmlType| ty.row_bytes(n_per_row).unwrap_or(0) as usize;
            let dense_types: Vec<Option<GgmlType>> =
                dense.iter().map(|d| d.as_ref().map(|x| x.ty)).collect();
            let rows_done = |rows: std::ops::Range<usize>| {
                let bytes = |ty| rows.start * row_bytes(ty)..rows.end * row_bytes(ty);
                plan.reference.release(&t.name, bytes(base.ty));
                for (m, ty) in plan.models.iter().zip(&dense_types) {
                    if let (MergeInput::Model(m), Some(ty)) = (m, ty) {
                        m.release(&t.name, bytes(*ty));
                    }
                }
            };
            let job = TensorJob {
                name: &t.name,
                n_per_row: t.shape[0] as usize,
                n_rows: t.shape[1..].iter().product::<u64>() as usize,
                base: (!linear).then_some(InputTensor {
                    data: &base.data,
                    ty: base.ty,
                }),
                models: inputs,
                params: t.params.clone(),
                method: plan.method,
                lambda: t.lambda,
                t: t.t,
                seed: plan.seed,
                out_ty,
                chunk_elems: engine::DEFAULT_CHUNK_ELEMS,
                output: engine::JobOutput::Merged,
                measure,
                rows_done: Some(&rows_done),
                slabs,
            };
            let merged = match &mut sink {
                Sink::Whole(buf) => {
                    // Zeroed pages come from the kernel lazily; every byte is then computed.
                    **buf = vec![0u8; nbytes(&t.shape, out_ty).unwrap_or(0) as usize];
                    engine::merge_tensor_into(&job, buf)
                }
                Sink::Parts(_, write) => {
                    engine::merge_tensor(&job, &mut |bytes| write(Cow::Owned(bytes)))
                }
            };
            let st = merged.map_err(|e| match e {
                MergeTensorError::Write(e) => e,
                MergeTensorError::Engine(e) => engine_error(plan, t, e),
            })?;
            Ok(Some(st))
        }
    }
}

/// The flow's error for an engine error on tensor `t`: the input it names, or — when the
/// merged values themselves overflow — the parameters that made them.
fn engine_error(plan: &MergePlan, t: &PlannedTensor, e: engine::EngineError) -> Error {
    let path = |culprit| match culprit {
        Culprit::Model(i) => plan.models[i].path().to_path_buf(),
        _ => plan.reference.path().to_path_buf(),
    };
    match e.culprit {
        Culprit::Result => {
            let weights = plan
                .models
                .iter()
                .zip(&t.params)
                .map(|(m, p)| format!("{:?} for {}", p.weight, m.path().display()))
                .collect::<Vec<_>>()
                .join(", ");
            let what = match &e.source {
                crate::quant::QuantError::NonFinite { index, value, .. } => {
                    format!("merged element {index} is {value}")
                }
                crate::quant::QuantError::OutOfRange { ty, max, .. } => {
                    format!("merged values reach {max:e}, more than {ty} can store")
                }
                other => other.to_string(),
            };
            Error::Invalid(format!(
                "tensor {:?}: {what}, although every input value there is finite: the merge's \
                 parameters push the result out of range (weight {weights}; lambda {}); use \
                 weights and lambda of ordinary size (around 1)",
                t.name, t.lambda
            ))
        }
        culprit => Error::Tensor {
            path: path(culprit),
            source: e.source,
        },
    }
}

/// Computes every tensor the plan changes (those not copied verbatim) in its output type and
/// hands it to `f`, in plan order, without writing a file: the runtime applies expert mixtures
/// this way. Tensors are computed concurrently (each also in parallel chunks), since nothing
/// has to be written in order: small tensors, whose few chunks cannot keep every core busy,
/// overlap. Holds every changed tensor's bytes until `f` has seen them (the runtime caches
/// them anyway).
pub fn for_each_changed_tensor(
    plan: &MergePlan,
    threads: Option<usize>,
    f: &mut (dyn FnMut(&PlannedTensor, Vec<u8>) -> Result<()> + Send),
) -> Result<()> {
    with_threads(threads, || {
        let changed: Vec<usize> = (0..plan.tensors.len())
            .filter(|&i| plan.tensors[i].action != TensorAction::Copy)
            .collect();
        let computed: Vec<Vec<u8>> = changed
            .par_iter()
            .map(|&idx| {
                let t = &plan.tensors[idx];
                let mut bytes = Vec::new();
                produce(plan, idx, t.out_ty, false, Sink::Whole(&mut bytes))?;
                Ok(bytes)
            })
            .collect::<Result<_>>()?;
        for (idx, bytes) in changed.into_iter().zip(computed) {
            f(&plan.tensors[idx], bytes)?;
        }
        Ok(())
    })
}

/// Parts (slabs of at most 2 MiB, or small tensors) queued for the writer thread: while the
/// writer lags (a page-cache copy runs at ~1 GB/s on a slow machine) computing goes on, up to
/// 32 MiB ahead, instead of a worker blocking on the queue.
const QUEUED_PARTS: usize = 16;

/// Output bytes of the consecutive small tensors [`run_plan`] computes together.
const WINDOW_BYTES: u64 = 2 << 20;

/// The plan's tensors in order, grouped into windows of consecutive tensors whose outputs add
/// up to at most [`WINDOW_BYTES`]; a larger tensor is a window of its own.
///
/// A window's tensors are computed concurrently and its outputs held until written: each
/// tensor alone is split into parallel chunks, but a small one (SmolLM2's 576×192 attention
/// projections are 4 chunks) cannot keep every core busy, and each tensor would otherwise end
/// in a wait for its slowest chunk. Holding a window costs at most [`WINDOW_BYTES`].
fn tensor_windows(plan: &MergePlan) -> Vec<std::ops::Range<usize>> {
    let size = |t: &PlannedTensor| nbytes(&t.shape, t.out_ty).unwrap_or(u64::MAX);
    let mut windows = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, t) in plan.tensors.iter().enumerate() {
        let b = size(t);
        if i > start && bytes.saturating_add(b) > WINDOW_BYTES {
            windows.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes = bytes.saturating_add(b);
    }
    if start < plan.tensors.len() {
        windows.push(start..plan.tensors.len());
    }
    windows
}

fn run_plan(
    plan: &MergePlan,
    opts: &MergeOptions,
    progress: &dyn Progress,
    started: Instant,
) -> Result<MergeReport> {
    let mut inputs: Vec<&Path> = vec![plan.reference.path()];
    inputs.extend(plan.models.iter().map(|m| m.path()));
    let mut totals = Totals::default();
    let n = plan.tensors.len();
    let created_dir = plan.destination.prepare(opts.force)?;
    progress.start(plan.output_bytes);
    let result = with_threads(opts.threads, || match &plan.format {
        OutputFormat::Gguf => {
            let specs: Vec<TensorSpec> = plan
                .tensors
                .iter()
                .map(|t| TensorSpec {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    ty: t.out_ty,
                })
                .collect();
            let mut writer =
                GgufWriter::create(&plan.destination.file, 3, &plan.metadata, &specs, &inputs)?;
            // A writer thread takes finished slabs through a short queue, so the next slab (and
            // the next tensor) is computed while the previous one is written.
            enum Msg<'p> {
                Part(Cow<'p, [u8]>),
                EndTensor,
            }
            let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(QUEUED_PARTS);
            // Written slabs come back for the next ones.
            let slabs = SlabPool::default();
            let pool = &slabs;
            std::thread::scope(|scope| {
                let writing = scope.spawn(move || -> Result<u64> {
                    for msg in rx {
                        match msg {
                            Msg::Part(bytes) => {
                                writer.write_part(&bytes)?;
                                if let Cow::Owned(buf) = bytes {
                                    pool.give(buf);
                                }
                            }
                            Msg::EndTensor => writer.end_tensor()?,
                        }
                    }
                    Ok(writer.finish()?)
                });
                let stopped = || Error::Invalid("the output writer stopped".into());
                let computed = (|| -> Result<()> {
                    for window in tensor_windows(plan) {
                        if window.len() == 1 {
                            // Streamed slab by slab (a large tensor, or one alone).
                            let idx = window.start;
                            let t = &plan.tensors[idx];
                            progress.tensor(&t.name, idx, n);
                            let st = produce_tensor(
                                plan,
                                idx,
                                t.out_ty,
                                true,
                                Some(pool),
                                &mut |bytes| {
                                    progress.advance(bytes.len() as u64);
                                    tx.send(Msg::Part(bytes)).map_err(|_| stopped())
                                },
                            )?;
                            if let Some(st) = st {
                                totals.add(&st, t.out_ty);
                            }
                            tx.send(Msg::EndTensor).map_err(|_| stopped())?;
                            // Every part sent was copied out of the maps, verbatim copies too.
                            release_inputs(plan, &t.name);
                            continue;
                        }
                        // Small tensors, computed together; results (and the first error) in
                        // plan order, so output and report do not depend on scheduling.
                        type Parts<'p> = Vec<Cow<'p, [u8]>>;
                        let computed: Vec<Result<(Parts<'_>, Option<engine::TensorStats>)>> =
                            window
                                .clone()
                                .into_par_iter()
                                .map(|idx| {
                                    let t = &plan.tensors[idx];
                                    let mut parts = Vec::new();
                                    let st = produce_tensor(
                                        plan,
                                        idx,
                                        t.out_ty,
                                        true,
                                        Some(pool),
                                        &mut |b| {
                                            parts.push(b);
                                            Ok(())
                                        },
                                    )?;
                                    Ok((parts, st))
                                })
                                .collect();
                        for (idx, r) in window.zip(computed) {
                            let t = &plan.tensors[idx];
                            let (parts, st) = r?;
                            progress.tensor(&t.name, idx, n);
                            if let Some(st) = st {
                                totals.add(&st, t.out_ty);
                            }
                            for part in parts {
                                progress.advance(part.len() as u64);
                                tx.send(Msg::Part(part)).map_err(|_| stopped())?;
                            }
                            tx.send(Msg::EndTensor).map_err(|_| stopped())?;
                            release_inputs(plan, &t.name);
                        }
                    }
                    Ok(())
                })();
                drop(tx);
                let written = writing
                    .join()
                    .unwrap_or_else(|_| Err(Error::Invalid("the output writer panicked".into())));
                // A write error explains a stopped queue, so it wins. After a compute error the
                // queue ends early and `finish` refuses the incomplete file (it is deleted).
                match (computed, written) {
                    (_, Err(e))
                        if !matches!(
                            e,
                            Error::Format(crate::format::FormatError::Write { .. })
                        ) =>
                    {
                        Err(e)
                    }
                    (Err(e), _) => Err(e),
                    (Ok(()), w) => w,
                }
            })
        }
        OutputFormat::Safetensors {
            config,
            max_shard_bytes,
        } => {
            let export: Vec<ExportTensor> = plan
                .tensors
                .iter()
                .map(|t| ExportTensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    ty: t.out_ty,
                })
                .collect();
            let st_opts = SafetensorsOptions {
                max_shard_bytes: *max_shard_bytes,
                path_is_named: !plan.destination.is_dir,
                overwrite: opts.force,
                ..Default::default()
            };
            // The writer pulls f32 slabs in order; each tensor is merged whole (as F32) when its
            // first slab is asked for — one tensor in f32 at a time.
            let mut current: Option<(usize, Vec<f32>)> = None;
            let out = write_safetensors(
                &plan.destination.file,
                config,
                &export,
                &st_opts,
                &inputs,
                |i, first, buf: &mut [f32]| {
                    if current.as_ref().map(|c| c.0) != Some(i) {
                        progress.tensor(&plan.tensors[i].name, i, n);
                        let mut values: Vec<f32> = Vec::new();
                        let st =
                            produce_tensor(plan, i, GgmlType::F32, true, None, &mut |bytes| {
                                values.extend(
                                    bytes
                                        .chunks_exact(4)
                                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                                );
                                Ok(())
                            })?;
                        if let Some(st) = st {
                            totals.add(&st, GgmlType::F32);
                        }
                        current = Some((i, values));
                    }
                    let values = &current.as_ref().expect("just set").1;
                    let first = first as usize;
                    buf.copy_from_slice(&values[first..first + buf.len()]);
                    progress.advance(
                        buf.len() as u64 * u64::from(plan.tensors[i].out_ty.traits().type_size),
                    );
                    Ok::<(), Error>(())
                },
            )?;
            crate::format::safetensors::write_config_json(
                &plan.destination.dir,
                config,
                &inputs,
                opts.force,
            )?;
            Ok(out.bytes)
        }
    });
    progress.finish();
    let output_bytes = result?;
    created_dir.keep();
    let Totals {
        zero,
        sumsq,
        kept,
        elements,
        step_sumsq,
        step_blocks,
        retention,
        merged,
    } = totals;
    let m = plan.models.len();
    let zero = if zero.is_empty() { vec![0; m] } else { zero };
    let sumsq = if sumsq.is_empty() {
        vec![0.0; m]
    } else {
        sumsq
    };
    let kept = if kept.is_empty() { vec![0; m] } else { kept };

    let step_rms = (step_blocks > 0).then(|| (step_sumsq / step_blocks as f64).sqrt());
    let mut warnings = plan.warnings.clone();
    let models: Vec<ModelReport> = plan
        .models
        .iter()
        .enumerate()
        .map(|(i, mm)| {
            let e = elements.max(1) as f64;
            let delta_rms = (sumsq[i] / e).sqrt();
            let signal_to_noise = step_rms.map(|s| engine::signal_to_noise(delta_rms, s));
            if let Some(snr) = signal_to_noise {
                if snr < 2.0 && plan.method.kind == Kind::TaskVector {
                    warnings.push(format!(
                        "{}: its delta (RMS {delta_rms:.2e}) is comparable to the rounding noise of the base's quantization \
                         (ratio {snr:.2}): if the fine-tune was trained from unquantized weights, much of what is merged is \
                         rounding noise — prefer a higher-precision (F16/Q8_0) base and experts",
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
        destination: plan.destination.clone(),
        seconds: started.elapsed().as_secs_f64(),
        models,
        retention,
        warnings,
    })
}
