//! Planning a merge: from a config and its open inputs ([`Inputs`]) to a [`MergePlan`] — the
//! output type of every tensor, whether it is copied, requantized or merged, and each model's
//! parameters there — without computing anything (`merge --dry-run` prints it).
//!
//! The steps of [`plan`], each a function: check the inputs against the base (`check_inputs`:
//! method, architectures), choose the output layout and types (`output_layout`,
//! `output_types`), then plan each tensor (`plan_tensors`: shape checks, parameter resolution,
//! copy detection). Running a plan is [`crate::merge::run`].

use std::path::PathBuf;
use std::sync::Arc;

use crate::format::gguf::{
    block_index, Metadata, Value, KEY_SPLIT_COUNT, KEY_SPLIT_NO, KEY_SPLIT_TENSORS_COUNT,
};
use crate::format::hf_names::{self, HfConfig};
use crate::format::output::FileFormat;
use crate::format::source::ModelSource;
use crate::format::{nbytes, GgmlType};
use crate::merge::config::{number_fits_f32, MergeConfig, TensorContext};
use crate::merge::engine::{self, ModelParams, SlabPool};
use crate::merge::error::{MergeError, Result};
use crate::merge::input::{Inputs, MergeInput};
use crate::merge::method::{Kind, Method, MethodSpec};
use crate::quant::{plan_types, ModelFacts, PlanInput, Requant, Target};

/// What a plan needs to know besides the config and the inputs.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// The output format (it decides the output types and metadata).
    pub format: FileFormat,
    /// Output type: `None` keeps every tensor's base type; a ggml type name (`Q8_0`, `F16`)
    /// gives every weight matrix that type; a mixture name (`Q4_K_M`) applies llama.cpp's
    /// per-tensor rules. Overrides the config's `dtype`/`type`.
    pub out_type: Option<String>,
    /// Mask seed (overrides the config's); also the stochastic rounding seed.
    pub seed: Option<u64>,
    /// Worker threads (for the memory estimate; `None`: all cores).
    pub threads: Option<usize>,
    /// How tensors of the base's type are requantized (overrides the config's; `None`: the
    /// config's, else [`Requant::DEFAULT`]).
    pub requant: Option<Requant>,
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
    /// Output bytes (checked when planned: every later size computation may trust it).
    pub out_bytes: u64,
    /// What happens.
    pub action: TensorAction,
    /// Per model: weight, density, gamma, epsilon, stream.
    pub params: Vec<ModelParams>,
    /// λ.
    pub lambda: f32,
    /// SLERP t.
    pub t: f64,
}

impl PlannedTensor {
    /// Elements per row (`shape[0]`).
    pub fn n_per_row(&self) -> u64 {
        self.shape[0]
    }

    /// Rows (the product of the other dimensions).
    pub fn n_rows(&self) -> u64 {
        self.shape[1..].iter().product()
    }
}

/// Hugging Face layout of a safetensors output.
#[derive(Clone, Debug, PartialEq)]
pub struct SafetensorsLayout {
    /// Architecture and head counts for names and transforms.
    pub config: HfConfig,
    /// Shard size, when the base is sharded (the output is sharded like it).
    pub max_shard_bytes: Option<u64>,
}

/// The resolved merge: inputs, method, and every output tensor.
pub struct MergePlan {
    /// The inputs.
    pub inputs: Inputs,
    /// The output format.
    pub format: FileFormat,
    /// For safetensors output: names and sharding.
    pub safetensors: Option<SafetensorsLayout>,
    /// Method, resolved.
    pub method: MethodSpec,
    /// Method name (mergekit's).
    pub method_name: &'static str,
    /// Mask seed (and stochastic rounding seed).
    pub seed: u64,
    /// How merged tensors of the base's type are requantized.
    pub requant: Requant,
    /// Output tensors in the base's order.
    pub tensors: Vec<PlannedTensor>,
    /// Output metadata (GGUF).
    pub metadata: Metadata,
    /// Output size in bytes (tensor data).
    pub output_bytes: u64,
    /// Estimated peak working memory in bytes (besides memory-mapped inputs).
    pub peak_memory: u64,
    /// Found while opening or planning (delta packs of absurd scale).
    pub warnings: Vec<String>,
}

impl MergePlan {
    /// The reference model (the base; for `linear`, the first model).
    pub fn reference(&self) -> &Arc<dyn ModelSource> {
        &self.inputs.reference
    }

    /// The models, in config order.
    pub fn models(&self) -> &[MergeInput] {
        &self.inputs.models
    }
}

/// The reference of a config: its base, or for `linear` its first model.
pub fn reference_path(config: &MergeConfig) -> Result<PathBuf> {
    if config.method == Method::Linear {
        let first = config.models.first().ok_or(MergeError::NoModels)?;
        return Ok(PathBuf::from(&first.model));
    }
    config
        .base_model
        .as_ref()
        .map(PathBuf::from)
        .ok_or(MergeError::MissingBase {
            method: config.method,
        })
}

/// Plans a merge of `inputs` (opened from `config`) without computing anything.
pub fn plan(config: &MergeConfig, inputs: Inputs, opts: &PlanOptions) -> Result<MergePlan> {
    config.validate()?;
    let method = config.spec();
    check_inputs(config, &inputs)?;
    let layout = output_layout(&inputs, opts.format)?;
    let out_type = opts.out_type.clone().or_else(|| config.out_type.clone());
    let target = out_type
        .as_deref()
        .map(Target::parse_type_or_mixture)
        .transpose()
        .map_err(MergeError::OutputType)?;
    let types = output_types(
        inputs.reference.as_ref(),
        opts.format,
        out_type.as_deref(),
        target,
    )?;
    let tensors = plan_tensors(config, &inputs, method, &types)?;
    // Checks the quantize layer would otherwise report mid-merge.
    for t in tensors.iter().filter(|t| t.action != TensorAction::Copy) {
        crate::quant::codec::check_quantize(t.out_ty, t.n_per_row(), &t.name)
            .map_err(MergeError::OutputType)?;
    }
    let output_bytes = tensors.iter().map(|t| t.out_bytes).sum();
    let peak_memory = peak_memory(opts.threads, inputs.models.len());

    let mut metadata = inputs.reference.metadata().cloned().unwrap_or_default();
    for k in [KEY_SPLIT_NO, KEY_SPLIT_COUNT, KEY_SPLIT_TENSORS_COUNT] {
        metadata.remove(k);
    }
    if let Some(target) = target {
        metadata.set("general.file_type", Value::U32(target.ftype.id));
        metadata.set("general.quantization_version", Value::U32(2));
    }
    let warnings = inputs.warnings.clone();
    Ok(MergePlan {
        inputs,
        format: opts.format,
        safetensors: layout,
        method,
        method_name: config.method.name(),
        seed: opts.seed.or(config.seed).unwrap_or(0),
        requant: opts.requant.or(config.requant).unwrap_or_default(),
        tensors,
        metadata,
        output_bytes,
        peak_memory,
        warnings,
    })
}

/// The method's model count and every model's architecture against the base.
fn check_inputs(config: &MergeConfig, inputs: &Inputs) -> Result<()> {
    let reference = inputs.reference.as_ref();
    if config.method.kind() == Kind::Slerp && inputs.models.len() != 1 {
        return Err(MergeError::SlerpModels {
            found: inputs.models.len(),
        });
    }
    let arch = reference.architecture().unwrap_or("");
    for m in &inputs.models {
        if let Some(a) = m.architecture().filter(|a| *a != arch) {
            return Err(MergeError::ArchitectureMismatch {
                path: m.path().to_path_buf(),
                arch: a.to_string(),
                base_arch: arch.to_string(),
                base: reference.path().to_path_buf(),
            });
        }
        if let MergeInput::Sparse(p) = m {
            if let Some((name, _)) = p
                .changed_tensors()
                .iter()
                .find(|(n, _)| reference.tensor_info(n).is_none())
            {
                return Err(MergeError::UnknownTensor {
                    path: p.path().to_path_buf(),
                    tensor: name.clone(),
                    base: reference.path().to_path_buf(),
                });
            }
        }
    }
    Ok(())
}

/// The Hugging Face layout of a safetensors output (from the GGUF base's metadata, or the
/// safetensors base's own config and sharding); `None` for GGUF. GGUF output needs a GGUF base.
fn output_layout(inputs: &Inputs, format: FileFormat) -> Result<Option<SafetensorsLayout>> {
    let reference = inputs.reference.as_ref();
    let base = || reference.path().to_path_buf();
    match (format, reference.metadata(), reference.hf_config()) {
        (FileFormat::Gguf, Some(_), _) => Ok(None),
        (FileFormat::Gguf, None, _) => Err(MergeError::GgufOutputNeedsGgufBase { base: base() }),
        (FileFormat::Safetensors, Some(md), _) => {
            let config = HfConfig::from_gguf_metadata(md).ok_or_else(|| MergeError::NoHfNames {
                base: base(),
                supported: hf_names::SUPPORTED_ARCHS.join(", "),
            })?;
            Ok(Some(SafetensorsLayout {
                config,
                max_shard_bytes: None,
            }))
        }
        (FileFormat::Safetensors, None, hf) => {
            let config = hf.cloned().ok_or_else(|| MergeError::NoHfNames {
                base: base(),
                supported: hf_names::SUPPORTED_ARCHS.join(", "),
            })?;
            // Sharded like the base: its largest shard as the limit.
            let files = reference.files();
            let max_shard_bytes = (files.len() > 1)
                .then(|| {
                    files
                        .iter()
                        .filter_map(|f| std::fs::metadata(f).ok())
                        .map(|m| m.len())
                        .max()
                })
                .flatten();
            Ok(Some(SafetensorsLayout {
                config,
                max_shard_bytes,
            }))
        }
    }
}

/// One tensor's name, shape, base type and output type.
type TensorTypes = (String, Vec<u64>, GgmlType, GgmlType);

/// Every tensor's output type, in the reference's order: the base's types, llama.cpp's
/// mixture rules for `target`, or for safetensors F32/F16/BF16.
fn output_types(
    reference: &dyn ModelSource,
    format: FileFormat,
    out_type: Option<&str>,
    target: Option<Target>,
) -> Result<Vec<TensorTypes>> {
    let names = reference.tensor_names();
    let infos: Vec<(String, Vec<u64>, GgmlType)> = names
        .into_iter()
        .filter_map(|n| {
            let (shape, ty) = reference.tensor_info(&n)?;
            Some((n, shape, ty))
        })
        .collect();
    let types: Vec<GgmlType> = match (format, target) {
        (FileFormat::Gguf, None) => infos.iter().map(|i| i.2).collect(),
        (FileFormat::Gguf, Some(target)) => {
            let inputs: Vec<PlanInput<'_>> = infos
                .iter()
                .map(|(n, shape, ty)| PlanInput {
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
        (FileFormat::Safetensors, _) => {
            let matrices = match out_type {
                Some(n) => match GgmlType::from_name(n) {
                    Some(t @ (GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)) => Some(t),
                    _ => return Err(MergeError::SafetensorsType { ty: n.to_string() }),
                },
                None => None,
            };
            infos
                .iter()
                .map(|(_, shape, ty)| match (shape.len(), matrices) {
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
    Ok(infos
        .into_iter()
        .zip(types)
        .map(|((n, shape, ty), out)| (n, shape, ty, out))
        .collect())
}

/// Plans each tensor: checks every model's tensor against the base's, resolves the
/// parameters, and finds tensors no model changes (copied, or requantized when the output type
/// differs).
fn plan_tensors(
    config: &MergeConfig,
    inputs: &Inputs,
    method: MethodSpec,
    types: &[TensorTypes],
) -> Result<Vec<PlannedTensor>> {
    let reference = inputs.reference.as_ref();
    let base_path = reference.path();
    let arch = reference.architecture().unwrap_or("").to_string();
    let n_layers = reference.block_count().unwrap_or(1).max(1) as u32;
    let linear_ref = method.kind == Kind::Linear;
    let mut tensors = Vec::with_capacity(types.len());
    for (name, shape, base_ty, out_ty) in types {
        let (shape, base_ty, out_ty) = (shape.clone(), *base_ty, *out_ty);
        let hf = hf_names::gguf_to_hf(&arch, name);
        let ctx = TensorContext {
            gguf_name: name,
            hf_name: hf.as_deref(),
            layer: block_index(name),
            n_layers,
        };
        let elements: u64 = shape.iter().product();
        let mut base_data = None;
        let mut params = Vec::with_capacity(inputs.models.len());
        let mut all_same = true;
        for (i, m) in inputs.models.iter().enumerate() {
            params.push(model_params(config, i, &ctx, name)?);
            let m = match m {
                MergeInput::Model(m) => m,
                MergeInput::Sparse(p) => {
                    // A pack changes the tensors it lists; the rest are the base's.
                    if let Some((_, kept)) = p.changed_tensors().iter().find(|(n, _)| n == name) {
                        if *kept > elements {
                            return Err(MergeError::KeptTooMany {
                                path: p.path().to_path_buf(),
                                tensor: name.clone(),
                                kept: *kept,
                                elements,
                            });
                        }
                        all_same = false;
                    }
                    continue;
                }
            };
            let (m_shape, m_ty) = m
                .tensor_info(name)
                .ok_or_else(|| MergeError::MissingTensor {
                    path: m.path().to_path_buf(),
                    tensor: name.clone(),
                    base: base_path.to_path_buf(),
                })?;
            // A model may have extra vocabulary rows (they are dropped); nothing else may differ.
            let embed = name == "token_embd.weight" || name == "output.weight";
            let rows_ok = m_shape.len() == shape.len()
                && m_shape[0] == shape[0]
                && (m_shape[1..] == shape[1..] || (embed && m_shape[1..] >= shape[1..]));
            if !rows_ok {
                return Err(MergeError::ShapeMismatch {
                    path: m.path().to_path_buf(),
                    tensor: name.clone(),
                    shape: m_shape,
                    base_shape: shape,
                });
            }
            if all_same && !(linear_ref && i == 0) {
                all_same = m_ty == base_ty && m_shape == shape;
                if all_same {
                    // Read (and for safetensors, transform) the base only when it may be equal.
                    if base_data.is_none() {
                        base_data = reference.tensor(name)?;
                    }
                    let base_bytes = base_data.as_ref().map(|b| b.data.as_ref());
                    all_same = m
                        .tensor(name)?
                        .is_some_and(|mt| Some(mt.data.as_ref()) == base_bytes);
                    // Pages read for the comparison are not needed again before the merge.
                    m.release(name, 0..usize::MAX);
                }
            }
        }
        if base_data.is_some() {
            reference.release(name, 0..usize::MAX);
        }
        let normalize_identity = !linear_ref || method.normalize;
        let action = if all_same && normalize_identity {
            if out_ty == base_ty {
                TensorAction::Copy
            } else {
                TensorAction::Requantize
            }
        } else {
            TensorAction::Merge
        };
        let out_bytes = nbytes(&shape, out_ty).map_err(|e| MergeError::Size {
            tensor: name.clone(),
            ty: out_ty.to_string(),
            reason: e.to_string(),
        })?;
        tensors.push(PlannedTensor {
            name: name.clone(),
            shape,
            base_ty,
            out_ty,
            out_bytes,
            action,
            params,
            lambda: config.number(None, "lambda", &ctx).unwrap_or(1.0) as f32,
            t: config.number(None, "t", &ctx).unwrap_or(0.5),
        });
    }
    Ok(tensors)
}

/// Model `i`'s parameters for one tensor, checked (a filtered or gradient setting is only
/// known per tensor).
fn model_params(
    config: &MergeConfig,
    i: usize,
    ctx: &TensorContext<'_>,
    tensor: &str,
) -> Result<ModelParams> {
    let bad = |name, value, reason| MergeError::Parameter {
        model: config.models[i].model.clone(),
        tensor: tensor.to_string(),
        name,
        value,
        reason,
    };
    let weight = config.number(Some(i), "weight", ctx).unwrap_or(1.0);
    let density = config.number(Some(i), "density", ctx).unwrap_or(1.0);
    if !(density > 0.0 && density <= 1.0) {
        return Err(bad("density", density, "is outside (0, 1]"));
    }
    if !number_fits_f32(weight) {
        return Err(bad(
            "weight",
            weight,
            "is not a finite number of at most 3.4e38 in magnitude",
        ));
    }
    Ok(ModelParams {
        weight: weight as f32,
        density,
        gamma: config.number(Some(i), "gamma", ctx).unwrap_or(0.01),
        epsilon: config.number(Some(i), "epsilon", ctx).unwrap_or(0.15),
        stream: i as u32,
    })
}

/// Working memory of a merge besides the mapped inputs: per thread, base and output chunks
/// plus one per model (f32) and two 64 Ki-bucket histograms for rank selection; output slabs
/// queued, being written, being computed (or a window of small tensors), and kept for reuse.
fn peak_memory(threads: Option<usize>, models: usize) -> u64 {
    let threads = crate::threads::clamp(threads) as u64;
    let chunk = engine::DEFAULT_CHUNK_ELEMS as u64 * 4;
    let slabs = (engine::QUEUED_PARTS + 2 + SlabPool::KEEP) as u64 * engine::SLAB_BYTES as u64;
    threads * (chunk * (models as u64 + 2) + 2 * 65536 * 8) + slabs + engine::WINDOW_BYTES
}
