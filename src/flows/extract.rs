//! `extract`: a fine-tune → a sparse delta pack against its base (format in
//! [`crate::delta::pack`]).
//!
//! The delta of every changed tensor is computed and sparsified by the merge engine itself
//! (same masks, same rescale), so applying a DARE pack reproduces `merge` byte for byte when
//! values are stored as F32 and the stream is the model's index in the merge. Values are
//! streamed to a spill file tensor by tensor (one tensor in memory), then the pack is written
//! header first.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::time::Instant;

use xxhash_rust::xxh3::Xxh3;

use crate::delta::pack::{
    fingerprint, MaskKind, INDICES_SUFFIX, KEY_CHECKSUM, PACK_TYPE, VALUES_SUFFIX,
};
use crate::error::{Error, Result};
use crate::flows::merge::open_model;
use crate::flows::progress::{with_threads, Progress};
use crate::format::gguf::{Array, GgufWriter, Metadata, TensorSpec, Value};
use crate::format::hf_names::HfConfig;
use crate::format::GgmlType;
use crate::merge::config::Rescale;
use crate::merge::engine::{
    self, InputTensor, JobOutput, Kind, MergeTensorError, MethodSpec, ModelInput, ModelParams,
    RescaleMode, TensorJob,
};
use crate::merge::kernel::Sparsifier;
use crate::merge::mask::{self, MaskKey};
use crate::quant;

/// How the delta is sparsified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparsify {
    /// DARE: random (Philox) mask, regenerated at apply time — no indices stored.
    Dare,
    /// TIES-style top-k magnitudes per tensor (indices stored).
    Magnitude,
    /// DELLA: magnitude-ranked keep probabilities (indices stored).
    Della,
}

impl Sparsify {
    /// Parses `dare`, `magnitude` or `della`.
    pub fn parse(s: &str) -> Option<Sparsify> {
        match s {
            "dare" => Some(Sparsify::Dare),
            "magnitude" => Some(Sparsify::Magnitude),
            "della" => Some(Sparsify::Della),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Sparsify::Dare => "dare",
            Sparsify::Magnitude => "magnitude",
            Sparsify::Della => "della",
        }
    }
}

/// Options of [`extract_delta`].
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    /// Keep fraction in (0, 1].
    pub density: f64,
    /// Sparsifier.
    pub sparsify: Sparsify,
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
            sparsify: Sparsify::Dare,
            values: GgmlType::F16,
            seed: 0,
            stream: 0,
            rescale: Rescale::Inverse,
            epsilon: 0.15,
            threads: None,
        }
    }
}

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

/// Extracts `finetuned − base` as a sparse delta pack at `output`.
///
/// ```no_run
/// use ggmerge::flows::extract::{extract_delta, ExtractOptions};
/// use ggmerge::NoProgress;
///
/// let opts = ExtractOptions { density: 0.1, seed: 42, ..Default::default() };
/// let r = extract_delta("base.gguf".as_ref(), "math.gguf".as_ref(), "math.dpk.gguf".as_ref(), &opts, &NoProgress)?;
/// println!("pack is {:.1}% of the fine-tune", 100.0 * r.pack_bytes as f64 / r.finetuned_bytes as f64);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn extract_delta(
    base_path: &Path,
    finetuned: &Path,
    output: &Path,
    opts: &ExtractOptions,
    progress: &dyn Progress,
) -> Result<ExtractReport> {
    let started = Instant::now();
    let invalid = |s: String| Error::Invalid(s);
    if !(opts.density > 0.0 && opts.density <= 1.0) {
        return Err(invalid(format!(
            "density {} is outside (0, 1]",
            opts.density
        )));
    }
    if !matches!(
        opts.values,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0
    ) {
        return Err(invalid(format!(
            "pack values must be f32, f16, bf16 or q8_0, not {}",
            opts.values
        )));
    }
    let base = open_model(base_path, None)?;
    let Some(base_md) = base.metadata().cloned() else {
        return Err(invalid(format!(
            "{}: the base of a delta pack must be GGUF (the runtime loads it with llama.cpp)",
            base_path.display()
        )));
    };
    let fallback = HfConfig::from_gguf_metadata(&base_md);
    let ft = open_model(finetuned, fallback.as_ref())?;
    let arch = base.architecture().unwrap_or("").to_string();
    if let Some(a) = ft.architecture() {
        if a != arch {
            return Err(invalid(format!(
                "{}: architecture {a} does not match the base's {arch} ({})",
                finetuned.display(),
                base_path.display()
            )));
        }
    }
    let base_fp = fingerprint(base.as_ref())?;
    let mask_kind = match (opts.sparsify, opts.density >= 1.0) {
        (_, true) => MaskKind::Dense,
        (Sparsify::Dare, false) => MaskKind::Philox,
        (_, false) => MaskKind::Explicit,
    };
    let spec = MethodSpec {
        kind: Kind::TaskVector,
        sparsifier: match opts.sparsify {
            Sparsify::Dare => Sparsifier::Random,
            Sparsify::Magnitude => Sparsifier::Magnitude,
            Sparsify::Della => Sparsifier::Della,
        },
        consensus: false,
        normalize: false,
        rescale: match opts.rescale {
            Rescale::Inverse => RescaleMode::Inverse,
            Rescale::L1 => RescaleMode::L1,
            Rescale::None => RescaleMode::None,
        },
    };

    // Pass 1: every changed tensor's kept values (and indices) to a spill file (a registered
    // temporary file: removed on error, on Ctrl-C, or by a later run if this one is killed).
    crate::format::output::check_output_path(output)?;
    let (spill_file, spill) = crate::format::output::TempFile::create(output, "spill")?;
    let spill_path = spill_file.path().to_path_buf();
    let mut spill = BufWriter::new(spill);
    // The pack's checksum: its tensors' data, in order, as written (DeltaPack verifies it).
    let mut checksum = Xxh3::new();
    let io = |e: std::io::Error| {
        invalid(format!(
            "{}: cannot write the temporary file (is the disk full?): {e}",
            spill_path.display()
        ))
    };

    let names = base.tensor_names();
    let mut specs: Vec<TensorSpec> = Vec::new();
    let mut kept_counts: Vec<u64> = Vec::new();
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
            let b = base.tensor(name)?.expect("listed tensor");
            let n_elems: u64 = b.shape.iter().product();
            let f = ft.tensor(name)?.ok_or_else(|| {
                invalid(format!(
                    "{}: has no tensor {name:?} that the base {} has",
                    finetuned.display(),
                    base_path.display()
                ))
            })?;
            let embed = name == "token_embd.weight" || name == "output.weight";
            let shape_ok = f.shape.len() == b.shape.len()
                && f.shape[0] == b.shape[0]
                && (f.shape[1..] == b.shape[1..] || (embed && f.shape[1..] >= b.shape[1..]));
            if !shape_ok {
                return Err(invalid(format!(
                    "{}: tensor {name:?} has shape {:?}, the base has {:?}",
                    finetuned.display(),
                    f.shape,
                    b.shape
                )));
            }
            if f.ty == b.ty && f.shape == b.shape && f.data == b.data {
                progress.advance(n_elems);
                continue;
            }
            let job = TensorJob {
                name,
                n_per_row: b.shape[0] as usize,
                n_rows: b.shape[1..].iter().product::<u64>() as usize,
                base: Some(InputTensor {
                    data: &b.data,
                    ty: b.ty,
                }),
                models: vec![ModelInput::Dense(InputTensor {
                    data: &f.data,
                    ty: f.ty,
                })],
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
                chunk_elems: engine::DEFAULT_CHUNK_ELEMS,
                output: JobOutput::SparseDelta,
                measure: true,
                rows_done: None,
                slabs: None,
            };
            let key = MaskKey::new(opts.seed, opts.stream, name);
            let mut values: Vec<f32> = Vec::new();
            let mut indices: Vec<u32> = Vec::new();
            let mut pos = 0u64;
            let st = engine::merge_tensor(&job, &mut |bytes| {
                let delta: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                match mask_kind {
                    MaskKind::Dense => values.extend_from_slice(&delta),
                    MaskKind::Philox => {
                        let mut keep = vec![false; delta.len()];
                        mask::keep_mask(&key, opts.density, pos, &mut keep);
                        values.extend(delta.iter().zip(&keep).filter(|(_, &k)| k).map(|(v, _)| *v));
                    }
                    MaskKind::Explicit => {
                        for (j, v) in delta.iter().enumerate() {
                            if *v != 0.0 {
                                values.push(*v);
                                indices.push((pos + j as u64) as u32);
                            }
                        }
                    }
                }
                pos += delta.len() as u64;
                progress.advance(delta.len() as u64);
                Ok(())
            })
            .map_err(|e| match e {
                MergeTensorError::Write(e) => e,
                MergeTensorError::Engine(e) => Error::Tensor {
                    path: if e.culprit == engine::Culprit::Base {
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
            if mask_kind == MaskKind::Explicit && values.is_empty() {
                continue;
            }
            if n_elems > u64::from(u32::MAX) && mask_kind == MaskKind::Explicit {
                return Err(invalid(format!(
                    "tensor {name:?} has more than 2^32 elements; use --sparsify dare"
                )));
            }
            let kept = values.len() as u64;
            let padded = if opts.values == GgmlType::Q8_0 {
                kept.div_ceil(32).max(1) * 32
            } else {
                kept.max(1)
            };
            values.resize(padded as usize, 0.0);
            let mut encoded = vec![0u8; opts.values.row_bytes(padded).unwrap_or(0) as usize];
            quant::quantize(opts.values, &values, padded, &mut encoded, name).map_err(
                |source| Error::Tensor {
                    path: finetuned.to_path_buf(),
                    source,
                },
            )?;
            spill.write_all(&encoded).map_err(io)?;
            checksum.update(&encoded);
            let dv = format!("{name}{VALUES_SUFFIX}");
            if dv.len() > 63 {
                return Err(invalid(format!("tensor name {name:?} is too long for a pack (GGUF allows 63 bytes with the .dv suffix)")));
            }
            specs.push(TensorSpec {
                name: dv,
                shape: vec![padded],
                ty: opts.values,
            });
            if mask_kind == MaskKind::Explicit {
                let bytes: Vec<u8> = indices.iter().flat_map(|i| i.to_le_bytes()).collect();
                spill.write_all(&bytes).map_err(io)?;
                checksum.update(&bytes);
                specs.push(TensorSpec {
                    name: format!("{name}{INDICES_SUFFIX}"),
                    shape: vec![kept],
                    ty: GgmlType::from_id(26).expect("I32"),
                });
            }
            kept_counts.push(kept);
        }
        Ok(())
    });
    progress.finish();
    computed?;
    spill.flush().map_err(io)?;
    drop(spill);

    // Pass 2: the pack, header first, data copied from the spill file.
    let mut md = Metadata::new();
    md.set("general.architecture", Value::String(arch.clone()));
    md.set("general.type", Value::String(PACK_TYPE.into()));
    if let Some(n) = ft
        .metadata()
        .and_then(|m| m.get("general.name"))
        .and_then(Value::as_str)
    {
        md.set("general.name", Value::String(n.to_string()));
    }
    md.set("delta.base.fingerprint", Value::String(base_fp));
    md.set(
        "delta.base.name",
        Value::String(
            base_path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
    );
    md.set("delta.method", Value::String(opts.sparsify.name().into()));
    md.set("delta.density", Value::F64(opts.density));
    md.set("delta.seed", Value::U64(opts.seed));
    md.set("delta.stream", Value::U32(opts.stream));
    md.set("delta.rescale", Value::String(opts.rescale.name().into()));
    md.set("delta.mask", Value::String(mask_kind.name().into()));
    md.set("delta.values", Value::String(opts.values.name().into()));
    md.set("delta.kept", Value::Array(Array::U64(kept_counts.clone())));
    md.set(
        KEY_CHECKSUM,
        Value::String(format!("{:016x}", checksum.digest())),
    );
    let mut writer = GgufWriter::create(output, 3, &md, &specs, &[base_path, finetuned])?;
    let mut spill = File::open(&spill_path).map_err(io)?;
    for spec in &specs {
        let size = crate::format::nbytes(&spec.shape, spec.ty).unwrap_or(0) as usize;
        let mut buf = vec![0u8; size];
        spill.read_exact(&mut buf).map_err(io)?;
        writer.write_tensor(&buf)?;
    }
    let pack_bytes = writer.finish()?;
    drop(spill_file);

    let e = elements.max(1) as f64;
    let delta_rms = (sumsq / e).sqrt();
    let step_rms = (step_blocks > 0).then(|| (step_sumsq / step_blocks as f64).sqrt());
    Ok(ExtractReport {
        tensors: names.len(),
        changed: kept_counts.len(),
        kept: kept_counts.iter().sum(),
        elements,
        pack_bytes,
        finetuned_bytes: file_size(finetuned),
        zero_delta_share: zero as f64 / e,
        delta_rms,
        signal_to_noise: step_rms.map(|s| engine::signal_to_noise(delta_rms, s)),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Size of a file or of all files in a directory.
fn file_size(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    } else {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }
}
