//! Extraction: a fine-tune → a sparse delta pack against its base.
//!
//! The delta of every changed tensor is computed and sparsified by the merge engine itself
//! (same masks, same rescale), so applying a DARE pack reproduces `merge` byte for byte when
//! values are stored as F32 and the stream is the model's index in the merge. Tensors go to
//! the [`PackWriter`] slab by slab as the engine computes them, and input rows the engine is
//! done with leave the process's resident set (inputs are memory-mapped), so extraction holds
//! about one slab whatever the model's size.

use std::path::Path;
use std::time::Instant;

use crate::delta::error::{DeltaError, Result};
use crate::delta::pack::{fingerprint, MaskKind};
use crate::delta::write::{PackHeader, PackWriter};
use crate::format::gguf::Value;
use crate::format::hf_names::HfConfig;
use crate::format::source;
use crate::format::GgmlType;
use crate::merge::engine::{
    self, signal_to_noise, Culprit, InputTensor, JobOutput, MergeTensorError, ModelInput,
    ModelParams, TensorJob,
};
use crate::merge::mask::{self, MaskKey};
use crate::merge::method::{Method, Rescale, Sparsifier};
use crate::merge::MergeError;
use crate::progress::Progress;
use crate::quant::Requant;
use crate::threads::with_threads;

/// Bytes of an unchanged tensor compared between two releases of its pages.
const COMPARE_PIECE: usize = 8 << 20;

/// Options of [`extract`].
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    /// Keep fraction in (0, 1].
    pub density: f64,
    /// Sparsifier: [`Sparsifier::Random`] (DARE: mask regenerated, no indices stored),
    /// [`Sparsifier::Magnitude`] or [`Sparsifier::Della`] (indices stored).
    pub sparsifier: Sparsifier,
    /// Value type: F32 (exact), F16, BF16 or Q8_0.
    pub values: GgmlType,
    /// Mask seed.
    pub seed: u64,
    /// Mask stream: to reproduce `merge`, the model's index among the merge's models.
    pub stream: u32,
    /// Rescale of the survivors (applied before storing).
    pub rescale: Rescale,
    /// DELLA's half-width of the keep-probability range.
    pub epsilon: f64,
    /// Worker threads (`None`: all cores).
    pub threads: Option<usize>,
}

impl Default for ExtractOptions {
    fn default() -> ExtractOptions {
        ExtractOptions {
            density: 0.1,
            sparsifier: Sparsifier::Random,
            values: GgmlType::F16,
            seed: 0,
            stream: 0,
            rescale: Rescale::Inverse,
            epsilon: 0.15,
            threads: None,
        }
    }
}

/// The sparsifiers a pack can be extracted with.
pub const PACK_SPARSIFIERS: [Sparsifier; 3] =
    [Sparsifier::Random, Sparsifier::Magnitude, Sparsifier::Della];

/// Summary of an extraction.
#[derive(Clone, Debug)]
pub struct ExtractReport {
    /// Tensors of the base.
    pub tensors: usize,
    /// Tensors the fine-tune changes (stored in the pack).
    pub changed: usize,
    /// Kept values over all tensors.
    pub kept: u64,
    /// Elements of the changed tensors.
    pub elements: u64,
    /// Pack size on disk.
    pub pack_bytes: u64,
    /// Fine-tune size on disk.
    pub finetuned_bytes: u64,
    /// Share of exactly-zero deltas in the changed tensors.
    pub zero_delta_share: f64,
    /// RMS of the delta.
    pub delta_rms: f64,
    /// Delta RMS over the expected rounding noise at the base's quantization step (quantized
    /// bases only).
    pub signal_to_noise: Option<f64>,
    /// Wall time.
    pub seconds: f64,
}

/// Extracts `finetuned − base` as a sparse delta pack at `output` (see the module docs).
pub fn extract(
    base_path: &Path,
    finetuned: &Path,
    output: &Path,
    opts: &ExtractOptions,
    progress: &dyn Progress,
) -> Result<ExtractReport> {
    let started = Instant::now();
    if !(opts.density > 0.0 && opts.density <= 1.0) {
        return Err(DeltaError::Density {
            value: opts.density,
        });
    }
    if !PACK_SPARSIFIERS.contains(&opts.sparsifier) {
        return Err(DeltaError::NotAPack {
            path: output.to_path_buf(),
            reason: format!(
                "packs are extracted with dare, magnitude or della, not {}",
                opts.sparsifier
            ),
        });
    }
    crate::format::output::check_output_path(output)?;
    let base = source::open(base_path, None)?;
    let Some(base_md) = base.metadata().cloned() else {
        return Err(DeltaError::BaseNotGguf {
            path: base_path.to_path_buf(),
        });
    };
    let fallback = HfConfig::from_gguf_metadata(&base_md);
    let ft = source::open(finetuned, fallback.as_ref())?;
    let arch = base.architecture().unwrap_or("").to_string();
    if let Some(a) = ft.architecture().filter(|a| *a != arch) {
        return Err(MergeError::ArchitectureMismatch {
            path: finetuned.to_path_buf(),
            arch: a.to_string(),
            base_arch: arch,
            base: base_path.to_path_buf(),
        }
        .into());
    }
    let mask_kind = MaskKind::of(opts.sparsifier, opts.density);
    // The engine's DARE/TIES machinery on one model, without sign election or normalization.
    let spec = Method::TaskArithmetic.spec(false, opts.rescale);
    let spec = crate::merge::method::MethodSpec {
        sparsifier: opts.sparsifier,
        ..spec
    };
    let mut pack = PackWriter::create(
        output,
        PackHeader {
            architecture: arch,
            name: ft
                .metadata()
                .and_then(|m| m.get("general.name"))
                .and_then(Value::as_str)
                .map(str::to_string),
            base_fingerprint: fingerprint(base.as_ref())?,
            base_name: base_path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sparsifier: opts.sparsifier,
            density: opts.density,
            seed: opts.seed,
            stream: opts.stream,
            rescale: opts.rescale,
            mask: mask_kind,
            values: opts.values,
        },
    )?;

    let names = base.tensor_names();
    let (mut zero, mut sumsq, mut elements, mut step_sumsq, mut step_blocks) =
        (0u64, 0f64, 0u64, 0f64, 0u64);
    let total: u64 = names
        .iter()
        .filter_map(|n| base.tensor_info(n))
        .map(|(s, _)| s.iter().product::<u64>())
        .sum();
    progress.start(total);
    let n_tensors = names.len();
    let computed = with_threads(opts.threads, || -> Result<()> {
        for (idx, name) in names.iter().enumerate() {
            progress.tensor(name, idx, n_tensors);
            let b = base.tensor(name)?.ok_or_else(|| MergeError::Vanished {
                path: base_path.to_path_buf(),
                tensor: name.clone(),
            })?;
            let n_elems: u64 = b.shape.iter().product();
            let f = ft.tensor(name)?.ok_or_else(|| MergeError::MissingTensor {
                path: finetuned.to_path_buf(),
                tensor: name.clone(),
                base: base_path.to_path_buf(),
            })?;
            let embed = name == "token_embd.weight" || name == "output.weight";
            let shape_ok = f.shape.len() == b.shape.len()
                && f.shape[0] == b.shape[0]
                && (f.shape[1..] == b.shape[1..] || (embed && f.shape[1..] >= b.shape[1..]));
            if !shape_ok {
                return Err(MergeError::ShapeMismatch {
                    path: finetuned.to_path_buf(),
                    tensor: name.clone(),
                    shape: f.shape.clone(),
                    base_shape: b.shape.clone(),
                }
                .into());
            }
            // Read once: the pages of both leave the resident set when the tensor is done.
            let release = || {
                base.release(name, 0..usize::MAX);
                ft.release(name, 0..usize::MAX);
            };
            // Unchanged tensors (often the embedding, 100s of MB) are compared piece by
            // piece, each piece's pages released once compared.
            let same = f.ty == b.ty
                && f.shape == b.shape
                && f.data.len() == b.data.len()
                && (f.data.chunks(COMPARE_PIECE))
                    .zip(b.data.chunks(COMPARE_PIECE))
                    .enumerate()
                    .all(|(k, (x, y))| {
                        let equal = x == y;
                        let start = k * COMPARE_PIECE;
                        base.release(name, start..start + y.len());
                        ft.release(name, start..start + x.len());
                        equal
                    });
            if same {
                progress.advance(n_elems);
                continue;
            }
            if n_elems > u64::from(u32::MAX) && mask_kind == MaskKind::Explicit {
                return Err(DeltaError::TooManyElements {
                    tensor: name.clone(),
                });
            }
            let base_input =
                InputTensor::new(&b.data, b.ty, b.shape[0], name).map_err(|source| {
                    DeltaError::Tensor {
                        path: base_path.to_path_buf(),
                        source,
                    }
                })?;
            let ft_input = InputTensor::new(&f.data, f.ty, f.shape[0], name).map_err(|source| {
                DeltaError::Tensor {
                    path: finetuned.to_path_buf(),
                    source,
                }
            })?;
            // Rows the engine is done with leave the resident set, as in a merge.
            let (base_row, ft_row) = (base_input.row_bytes, ft_input.row_bytes);
            let rows_done = |rows: std::ops::Range<usize>| {
                base.release(name, rows.start * base_row..rows.end * base_row);
                ft.release(name, rows.start * ft_row..rows.end * ft_row);
            };
            let job = TensorJob {
                name,
                n_per_row: b.shape[0] as usize,
                n_rows: b.shape[1..].iter().product::<u64>() as usize,
                base: Some(base_input),
                models: vec![ModelInput::Dense(ft_input)],
                params: vec![ModelParams {
                    weight: 1.0,
                    density: opts.density,
                    gamma: 0.0,
                    epsilon: opts.epsilon,
                    stream: opts.stream,
                }],
                method: spec,
                lambda: 1.0,
                t: 0.0,
                seed: opts.seed,
                out_ty: GgmlType::F32,
                // A pack stores F32 deltas: nothing is requantized.
                requant: Requant::Full,
                chunk_elems: engine::DEFAULT_CHUNK_ELEMS,
                output: JobOutput::SparseDelta,
                measure: true,
                rows_done: Some(&rows_done),
                slabs: None,
            };
            let key = MaskKey::new(opts.seed, opts.stream, name);
            // Kept values go to the pack slab by slab; explicit masks' indices are stored
            // after the values, so they are collected (4 bytes per kept value).
            let mut values: Vec<f32> = Vec::new();
            let mut keep: Vec<bool> = Vec::new();
            let mut indices: Vec<u32> = Vec::new();
            let mut pos = 0u64;
            pack.begin_tensor(name)?;
            let st = engine::merge_tensor(&job, &mut |bytes| {
                let delta = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                let n = bytes.len() / 4;
                values.clear();
                match mask_kind {
                    MaskKind::Dense => values.extend(delta),
                    MaskKind::Philox => {
                        keep.clear();
                        keep.resize(n, false);
                        mask::keep_mask(&key, opts.density, pos, &mut keep);
                        values.extend(delta.zip(&keep).filter(|(_, &k)| k).map(|(v, _)| v));
                    }
                    MaskKind::Explicit => {
                        for (j, v) in delta.enumerate() {
                            if v != 0.0 {
                                values.push(v);
                                indices.push((pos + j as u64) as u32);
                            }
                        }
                    }
                }
                pos += n as u64;
                progress.advance(n as u64);
                pack.push_values(&values)
            })
            .map_err(|e| match e {
                MergeTensorError::Write(e) => e,
                MergeTensorError::Engine(e) => DeltaError::Tensor {
                    path: if e.culprit == Culprit::Base {
                        base_path.to_path_buf()
                    } else {
                        finetuned.to_path_buf()
                    },
                    source: e.source,
                },
            })?;
            zero += st.zero_deltas[0];
            sumsq += st.delta_sumsq[0];
            elements += st.elements;
            step_sumsq += st.step_sumsq;
            step_blocks += st.step_blocks;
            release();
            if mask_kind == MaskKind::Explicit && indices.is_empty() {
                pack.discard_tensor()?;
                continue;
            }
            let idx = (mask_kind == MaskKind::Explicit).then_some(&indices[..]);
            pack.end_tensor(idx)?;
        }
        Ok(())
    });
    progress.finish();
    computed?;
    let kept: Vec<u64> = pack.kept().to_vec();
    let mut inputs = base.files();
    inputs.extend(ft.files());
    let pack_bytes = pack.finish(&inputs)?;

    let e = elements.max(1) as f64;
    let delta_rms = (sumsq / e).sqrt();
    let step_rms = (step_blocks > 0).then(|| (step_sumsq / step_blocks as f64).sqrt());
    Ok(ExtractReport {
        tensors: names.len(),
        changed: kept.len(),
        kept: kept.iter().sum(),
        elements,
        pack_bytes,
        finetuned_bytes: ft.files().iter().map(|f| file_size(f)).sum(),
        zero_delta_share: zero as f64 / e,
        delta_rms,
        signal_to_noise: step_rms.map(|s| signal_to_noise(delta_rms, s)),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Size of a file (0 if it cannot be read).
fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}
