//! The delta-pack format (DESIGN.md "Sparse delta packs") and its reader.
//!
//! A pack is a GGUF file with `general.type = "ggmerge.delta"`, the base's
//! `general.architecture`, and:
//!
//! | key | type | meaning |
//! |---|---|---|
//! | `delta.base.fingerprint` | string | [`fingerprint`] of the base (hex) |
//! | `delta.method` | string | the [`Sparsifier`]: `dare`, `magnitude` or `della` |
//! | `delta.density` | f64 | keep fraction |
//! | `delta.seed`, `delta.stream` | u64, u32 | mask key inputs (Philox masks) |
//! | `delta.rescale` | string | the [`Rescale`] (`inverse`, `l1`, `none`), already applied |
//! | `delta.mask` | string | `philox` (regenerated), `explicit` (`NAME.di` indices) or `dense` |
//! | `delta.values` | string | type of the values: `F32`, `F16`, `BF16` or `Q8_0` |
//! | `delta.kept` | u64 array | kept values per changed tensor, in tensor order |
//! | `delta.checksum` | string | xxh3-64 (hex) of every tensor's data in file order, padding excluded; verified on open (absent in packs of ggmerge before 0.1) |
//!
//! Per changed base tensor `NAME`: `NAME.dv` holds the kept, already-rescaled delta values in
//! element order (Q8_0 padded with zeros to whole blocks); `NAME.di` (I32) their element
//! indices for explicit masks. Tensors whose delta is all zero are absent.
//!
//! The key names are constants here, shared with the writer ([`crate::delta::write`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use xxhash_rust::xxh3::Xxh3;

use crate::delta::error::{DeltaError, Result};
use crate::format::gguf::{GgufModel, TensorRef, Value};
use crate::format::source::ModelSource;
use crate::format::GgmlType;
use crate::merge::engine::{SparseDelta, SparseMask};
use crate::merge::input::SparseSource;
use crate::merge::mask::{self, MaskKey};
use crate::merge::method::{Rescale, Sparsifier};

/// `general.type` of a pack.
pub const PACK_TYPE: &str = "ggmerge.delta";
/// Suffix of a tensor's values.
pub const VALUES_SUFFIX: &str = ".dv";
/// Suffix of a tensor's explicit indices.
pub const INDICES_SUFFIX: &str = ".di";
/// Metadata key: the base's [`fingerprint`].
pub const KEY_BASE_FINGERPRINT: &str = "delta.base.fingerprint";
/// Metadata key: the base's file name (for messages only).
pub const KEY_BASE_NAME: &str = "delta.base.name";
/// Metadata key: the [`Sparsifier`]'s name.
pub const KEY_METHOD: &str = "delta.method";
/// Metadata key: the density (f64).
pub const KEY_DENSITY: &str = "delta.density";
/// Metadata key: the mask seed (u64).
pub const KEY_SEED: &str = "delta.seed";
/// Metadata key: the mask stream (u32).
pub const KEY_STREAM: &str = "delta.stream";
/// Metadata key: the [`Rescale`]'s name.
pub const KEY_RESCALE: &str = "delta.rescale";
/// Metadata key: the [`MaskKind`]'s name.
pub const KEY_MASK: &str = "delta.mask";
/// Metadata key: the values' type name.
pub const KEY_VALUES: &str = "delta.values";
/// Metadata key: kept values per changed tensor (u64 array).
pub const KEY_KEPT: &str = "delta.kept";
/// Metadata key of the data checksum.
pub const KEY_CHECKSUM: &str = "delta.checksum";
/// A pack whose delta, spread over its tensor, is this many times the base weights' RMS or more
/// gets a warning: no fine-tune moves its weights by more than their own size.
pub const ABSURD_DELTA_RATIO: f64 = 1.0;

/// How a pack's mask is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    /// Regenerated from (seed, stream, tensor name, density) with Philox.
    Philox,
    /// Element indices stored as `NAME.di`.
    Explicit,
    /// Every element kept (density 1).
    Dense,
}

impl MaskKind {
    /// How a pack extracted with `sparsifier` at `density` stores its mask.
    pub fn of(sparsifier: Sparsifier, density: f64) -> MaskKind {
        match (sparsifier.mask_is_regenerable(), density >= 1.0) {
            (_, true) => MaskKind::Dense,
            (true, false) => MaskKind::Philox,
            (false, false) => MaskKind::Explicit,
        }
    }

    /// The `delta.mask` value.
    pub fn name(self) -> &'static str {
        match self {
            MaskKind::Philox => "philox",
            MaskKind::Explicit => "explicit",
            MaskKind::Dense => "dense",
        }
    }
    fn parse(s: &str) -> Option<MaskKind> {
        [MaskKind::Philox, MaskKind::Explicit, MaskKind::Dense]
            .into_iter()
            .find(|k| k.name() == s)
    }
}

/// Bytes of a tensor hashed between two releases of its pages ([`fingerprint`]).
const FINGERPRINT_PIECE: usize = 8 << 20;

/// The fingerprint of a base model: xxh3 over every tensor's name, shape, type and data (per
/// tensor, in parallel), combined in tensor order. Hex, 16 digits.
pub fn fingerprint(model: &dyn ModelSource) -> Result<String> {
    let names = model.tensor_names();
    let hashes: Vec<u64> = names
        .par_iter()
        .map(|name| -> Result<u64> {
            let t = model
                .tensor(name)?
                .ok_or_else(|| crate::merge::MergeError::Vanished {
                    path: model.path().to_path_buf(),
                    tensor: name.clone(),
                })?;
            let mut h = Xxh3::new();
            h.update(name.as_bytes());
            for d in &t.shape {
                h.update(&d.to_le_bytes());
            }
            h.update(&t.ty.id().to_le_bytes());
            // The data's xxh3, streamed (the same value as one pass) 8 MiB at a time, each
            // piece's pages leaving the resident set once read: fingerprinting a base costs a
            // few pieces of memory whatever its largest tensor (an embedding is 100s of MB).
            let mut data = Xxh3::new();
            for (k, piece) in t.data.chunks(FINGERPRINT_PIECE).enumerate() {
                data.update(piece);
                let start = k * FINGERPRINT_PIECE;
                model.release(name, start..start + piece.len());
            }
            h.update(&data.digest().to_le_bytes());
            Ok(h.digest())
        })
        .collect::<Result<_>>()?;
    let mut all = Xxh3::new();
    for h in hashes {
        all.update(&h.to_le_bytes());
    }
    Ok(format!("{:016x}", all.digest()))
}

/// One changed tensor of a pack.
#[derive(Clone, Copy)]
pub struct PackTensor<'a> {
    /// Kept values.
    pub values: TensorRef<'a>,
    /// Explicit indices, for explicit masks.
    pub indices: Option<TensorRef<'a>>,
    /// Number of kept values (without Q8_0 padding).
    pub kept: u64,
}

/// An opened, validated delta pack.
pub struct DeltaPack {
    file: GgufModel,
    /// The data checksum, verified when the pack was opened (`None`: an older pack without
    /// one, not verified).
    pub checksum: Option<String>,
    /// Base fingerprint.
    pub fingerprint: String,
    /// How it was sparsified.
    pub sparsifier: Sparsifier,
    /// Keep fraction.
    pub density: f64,
    /// Mask seed.
    pub seed: u64,
    /// Mask stream.
    pub stream: u32,
    /// Rescale already applied.
    pub rescale: Rescale,
    /// Mask storage.
    pub mask: MaskKind,
    /// Value type.
    pub values: GgmlType,
    /// Changed base tensors, in pack order, with their kept counts.
    pub tensors: Vec<(String, u64)>,
    /// Kept-element indices (u32 little-endian) per tensor of a Philox-masked pack, once
    /// [`cache_kept_indices`](Self::cache_kept_indices) has computed them.
    kept_indices: HashMap<String, Vec<u8>>,
}

fn bad(path: &Path, reason: impl Into<String>) -> DeltaError {
    DeltaError::NotAPack {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl DeltaPack {
    /// Whether `path` is a GGUF file whose `general.type` says it is a pack.
    pub fn is_pack(path: &Path) -> bool {
        crate::format::gguf::is_gguf_file(path)
            && GgufModel::open(path).is_ok_and(|m| DeltaPack::is_pack_file(&m))
    }

    /// Whether an opened GGUF file's `general.type` says it is a pack.
    pub fn is_pack_file(file: &GgufModel) -> bool {
        file.metadata().get("general.type").and_then(Value::as_str) == Some(PACK_TYPE)
    }

    /// Opens and validates a pack.
    pub fn open(path: impl AsRef<Path>) -> Result<DeltaPack> {
        let path = path.as_ref();
        DeltaPack::from_file(path, GgufModel::open(path)?)
    }

    /// Validates an opened GGUF file (read from `path`) as a pack.
    pub fn from_file(path: &Path, file: GgufModel) -> Result<DeltaPack> {
        let md = file.metadata();
        let s = |k: &str| -> Result<String> {
            md.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(path, format!("missing string key {k}")))
        };
        if !DeltaPack::is_pack_file(&file) {
            return Err(bad(
                path,
                format!("general.type is not {PACK_TYPE:?} (is this a model, not a pack?)"),
            ));
        }
        let density = match md.get(KEY_DENSITY) {
            Some(Value::F64(d)) => *d,
            Some(Value::F32(d)) => f64::from(*d),
            _ => return Err(bad(path, "missing delta.density")),
        };
        if !(density > 0.0 && density <= 1.0) {
            return Err(bad(
                path,
                format!("delta.density {density} is outside (0, 1]"),
            ));
        }
        let mask = MaskKind::parse(&s(KEY_MASK)?).ok_or_else(|| bad(path, "unknown delta.mask"))?;
        let sparsifier = Sparsifier::from_name(&s(KEY_METHOD)?)
            .ok_or_else(|| bad(path, "unknown delta.method"))?;
        let rescale = Rescale::from_name(&s(KEY_RESCALE)?)
            .ok_or_else(|| bad(path, "unknown delta.rescale"))?;
        let values = GgmlType::from_name(&s(KEY_VALUES)?)
            .filter(|t| {
                matches!(
                    *t,
                    GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0
                )
            })
            .ok_or_else(|| bad(path, "delta.values must be F32, F16, BF16 or Q8_0"))?;
        let kept: Vec<u64> = match md.get(KEY_KEPT) {
            Some(Value::Array(crate::format::gguf::Array::U64(v))) => v.clone(),
            _ => return Err(bad(path, "missing delta.kept")),
        };
        let names: Vec<String> = file
            .tensors()
            .filter_map(|t| t.info.name.strip_suffix(VALUES_SUFFIX).map(str::to_string))
            .collect();
        if names.len() != kept.len() {
            return Err(bad(
                path,
                format!(
                    "{} value tensors but {} kept counts",
                    names.len(),
                    kept.len()
                ),
            ));
        }
        for (name, &k) in names.iter().zip(&kept) {
            let v = file
                .tensor_by_name(&format!("{name}{VALUES_SUFFIX}"))
                .expect("listed");
            if v.info.ty != values
                || v.info.shape.len() != 1
                || v.info.shape[0] < k
                // Padding: Q8_0 values fill whole blocks of 32, and a tensor that keeps
                // nothing still stores one (zero) value, since GGUF tensors are not empty.
                || v.info.shape[0] > k.div_ceil(32).max(1) * 32
            {
                return Err(bad(
                    path,
                    format!("tensor {name}{VALUES_SUFFIX} does not hold {k} {values} values"),
                ));
            }
            match (
                mask,
                file.tensor_by_name(&format!("{name}{INDICES_SUFFIX}")),
            ) {
                (MaskKind::Explicit, Some(i))
                    if i.info.ty == GgmlType::from_id(26).expect("I32") && i.info.shape == [k] =>
                {
                    // Indices must be ascending (the engine walks them in order).
                    let ok = i
                        .data
                        .chunks_exact(4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect::<Vec<_>>()
                        .windows(2)
                        .all(|w| w[0] < w[1]);
                    file.release_bytes(i.data);
                    if !ok {
                        return Err(bad(path, format!("indices of {name} are not ascending")));
                    }
                }
                (MaskKind::Explicit, _) => {
                    return Err(bad(
                        path,
                        format!("missing or malformed {name}{INDICES_SUFFIX}"),
                    ))
                }
                (_, _) => {}
            }
        }
        let checksum = match md.get(KEY_CHECKSUM) {
            None => None,
            Some(v) => {
                let want = v
                    .as_str()
                    .ok_or_else(|| bad(path, format!("{KEY_CHECKSUM} is not a string")))?;
                let mut h = Xxh3::new();
                for t in file.tensors() {
                    h.update(t.data);
                    // Read again only when applied, tensor by tensor.
                    file.release_bytes(t.data);
                }
                let got = format!("{:016x}", h.digest());
                if got != want {
                    return Err(DeltaError::Checksum {
                        path: path.to_path_buf(),
                        got,
                        recorded: want.to_string(),
                    });
                }
                Some(got)
            }
        };
        Ok(DeltaPack {
            checksum,
            fingerprint: s(KEY_BASE_FINGERPRINT)?,
            sparsifier,
            density,
            seed: md
                .get_u64(KEY_SEED)
                .ok_or_else(|| bad(path, "missing delta.seed"))?,
            stream: u32::try_from(
                md.get_u64(KEY_STREAM)
                    .ok_or_else(|| bad(path, "missing delta.stream"))?,
            )
            .map_err(|_| bad(path, "delta.stream does not fit 32 bits"))?,
            rescale,
            mask,
            values,
            tensors: names.into_iter().zip(kept).collect(),
            file,
            kept_indices: HashMap::new(),
        })
    }

    /// Regenerates the Philox mask of every tensor once and keeps the indices of its kept
    /// elements (4 bytes per kept value), so that [`sparse`](Self::sparse) hands the engine
    /// explicit indices: applying the pack again then scatters its values instead of
    /// generating masks (the runtime does this so a mixture switch costs no mask generation).
    /// `base` gives each tensor's element count. Returns the bytes now held. Packs with
    /// explicit or dense masks need nothing and return 0; tensors of 2³² elements or more keep
    /// the Philox path.
    pub fn cache_kept_indices(&mut self, base: &dyn ModelSource) -> Result<u64> {
        if self.mask != MaskKind::Philox {
            return Ok(0);
        }
        let path = self.path().to_path_buf();
        let (seed, stream, density) = (self.seed, self.stream, self.density);
        let built: Vec<(String, Vec<u8>)> = self
            .tensors
            .par_iter()
            .filter_map(|(name, kept)| {
                let (shape, _) = base.tensor_info(name)?;
                let n = shape.iter().product::<u64>();
                (n <= u64::from(u32::MAX)).then_some((name, *kept, n))
            })
            .map(|(name, kept, n)| {
                let key = MaskKey::new(seed, stream, name);
                let mut idx = Vec::with_capacity(kept as usize * 4);
                let mut keep = vec![false; (n as usize).min(1 << 20)];
                let mut start = 0u64;
                while start < n {
                    let len = (n - start).min(keep.len() as u64) as usize;
                    mask::keep_mask(&key, density, start, &mut keep[..len]);
                    for (j, _) in keep[..len].iter().enumerate().filter(|(_, k)| **k) {
                        idx.extend_from_slice(&((start + j as u64) as u32).to_le_bytes());
                    }
                    start += len as u64;
                }
                if idx.len() as u64 != kept * 4 {
                    return Err(DeltaError::BadTensor {
                        path: path.clone(),
                        tensor: name.clone(),
                        reason: format!(
                            "records {kept} kept values, its mask keeps {}",
                            idx.len() / 4
                        ),
                    });
                }
                Ok((name.clone(), idx))
            })
            .collect::<Result<_>>()?;
        self.kept_indices = built.into_iter().collect();
        Ok(self.kept_indices.values().map(|v| v.len() as u64).sum())
    }

    /// Bytes held by the kept indices [`cache_kept_indices`](Self::cache_kept_indices)
    /// computed (0 before).
    pub fn kept_index_bytes(&self) -> u64 {
        self.kept_indices.values().map(|v| v.len() as u64).sum()
    }

    /// The pack's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The pack as a GGUF model (for inspection).
    pub fn gguf(&self) -> &GgufModel {
        &self.file
    }

    /// Architecture of the base.
    pub fn architecture(&self) -> Option<&str> {
        self.file.metadata().architecture()
    }

    /// The changed tensor `name` of the base, if the pack has it.
    pub fn tensor(&self, name: &str) -> Option<PackTensor<'_>> {
        let kept = self.tensors.iter().find(|(n, _)| n == name)?.1;
        Some(PackTensor {
            values: self
                .file
                .tensor_by_name(&format!("{name}{VALUES_SUFFIX}"))?,
            indices: self.file.tensor_by_name(&format!("{name}{INDICES_SUFFIX}")),
            kept,
        })
    }

    /// Drops the pages of base tensor `name`'s stored delta from the process's resident set
    /// until it is read again (see [`crate::format::source::ModelSource::release`]).
    pub fn release(&self, name: &str) {
        self.file
            .release_tensor(&format!("{name}{VALUES_SUFFIX}"), 0..usize::MAX);
        self.file
            .release_tensor(&format!("{name}{INDICES_SUFFIX}"), 0..usize::MAX);
    }

    /// The engine's view of tensor `name` (`None` when the pack leaves it unchanged).
    pub fn sparse(&self, name: &str) -> Option<SparseDelta<'_>> {
        let t = self.tensor(name)?;
        Some(SparseDelta {
            values: t.values.data,
            values_ty: self.values,
            mask: match self.mask {
                MaskKind::Dense => SparseMask::All,
                MaskKind::Explicit => SparseMask::Indices(t.indices.map_or(&[][..], |i| i.data)),
                MaskKind::Philox => match self.kept_indices.get(name) {
                    Some(idx) => SparseMask::Indices(idx),
                    None => SparseMask::Philox {
                        key: MaskKey::new(self.seed, self.stream, name),
                        density: self.density,
                    },
                },
            },
        })
    }

    /// Warnings for tensors whose delta is absurdly large next to the base's weights (RMS of
    /// the delta spread over the whole tensor ≥ [`ABSURD_DELTA_RATIO`] × the base tensor's
    /// RMS, estimated from its first 64 Ki elements): a pack extracted from a diverged
    /// fine-tune, or values overwritten after the checksum was recomputed. One line per pack
    /// at most, naming its worst tensor.
    pub fn scale_warnings(&self, base: &dyn ModelSource) -> Result<Vec<String>> {
        let ratios: Vec<Option<(f64, String)>> = self
            .tensors
            .par_iter()
            .map(|(name, kept)| -> Result<Option<(f64, String)>> {
                let (Some(t), Some(b)) = (self.tensor(name), base.tensor(name)?) else {
                    return Ok(None);
                };
                let n: u64 = b.shape.iter().product();
                // Σ v² over the kept values, dequantized 64 Ki at a time (whole blocks; in
                // order, so the sum is the one a single pass gives).
                let (vblock, vsize) = (self.values.block_size() as usize, self.values.type_size());
                let chunk = (1 << 16) / vblock * vblock;
                let kept = (*kept as usize).min(t.values.info.n_elements() as usize);
                let mut values = vec![0f32; chunk];
                let mut sumsq = 0f64;
                for (k, src) in t
                    .values
                    .data
                    .chunks(chunk / vblock * vsize as usize)
                    .enumerate()
                {
                    let len = src.len() / vsize as usize * vblock;
                    crate::quant::codec::dequantize_into(self.values, src, &mut values[..len]);
                    let take = kept.saturating_sub(k * chunk).min(len);
                    for v in &values[..take] {
                        sumsq += f64::from(*v) * f64::from(*v);
                    }
                }
                self.file.release_bytes(t.values.data);
                let delta_rms = (sumsq / n.max(1) as f64).sqrt();
                // The base's first 64 Ki elements (whole blocks) as a sample of its scale.
                let block = b.ty.block_size().max(1);
                let sample = (n.min(1 << 16) / block * block).max(block.min(n));
                let bytes = (sample / block * b.ty.type_size()) as usize;
                let mut base_values = vec![0f32; sample as usize];
                if let Some(src) = b.data.get(..bytes) {
                    crate::quant::codec::dequantize_into(b.ty, src, &mut base_values);
                }
                base.release(name, 0..bytes);
                let base_sumsq: f64 = base_values.iter().map(|v| f64::from(*v).powi(2)).sum();
                let base_rms = (base_sumsq / sample.max(1) as f64).sqrt();
                let ratio = if base_rms > 0.0 {
                    delta_rms / base_rms
                } else if delta_rms > 0.0 {
                    f64::INFINITY
                } else {
                    0.0
                };
                Ok(Some((ratio, name.clone())))
            })
            .collect::<Result<_>>()?;
        let worst = ratios
            .into_iter()
            .flatten()
            .filter(|(r, _)| r.is_nan() || *r >= ABSURD_DELTA_RATIO)
            .max_by(|a, b| a.0.total_cmp(&b.0));
        Ok(worst
            .map(|(r, name)| {
                format!(
                    "{}: its delta on {name} is {r:.3e} times the size of the base's weights \
                     (RMS): no fine-tune changes weights that much — the pack is probably \
                     corrupt or was extracted from a diverged fine-tune, and outputs made with \
                     it will be garbage",
                    self.path().display()
                )
            })
            .into_iter()
            .collect())
    }

    /// Refuses a base whose fingerprint differs, and explicit indices beyond the base
    /// tensor's elements (the mask of a pack made against this base never has them).
    pub fn check_base(&self, base: &dyn ModelSource, base_fingerprint: &str) -> Result<()> {
        if base_fingerprint != self.fingerprint {
            return Err(DeltaError::WrongBase {
                path: self.path().to_path_buf(),
                fingerprint: self.fingerprint.clone(),
                base: base.path().to_path_buf(),
                base_fingerprint: base_fingerprint.to_string(),
            });
        }
        for (name, _) in &self.tensors {
            let (Some(t), Some((shape, _))) = (self.tensor(name), base.tensor_info(name)) else {
                continue;
            };
            let elements: u64 = shape.iter().product();
            // Indices are ascending (checked on open): the last is the largest.
            let last = t.indices.and_then(|i| {
                let b = i.data.get(i.data.len().checked_sub(4)?..)?;
                Some(u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            });
            if let Some(last) = last.filter(|&l| l >= elements) {
                return Err(DeltaError::BadTensor {
                    path: self.path().to_path_buf(),
                    tensor: name.clone(),
                    reason: format!(
                        "stores a delta for element {last}, but the base tensor has {elements}"
                    ),
                });
            }
        }
        Ok(())
    }
}

impl SparseSource for DeltaPack {
    fn path(&self) -> &Path {
        DeltaPack::path(self)
    }
    fn architecture(&self) -> Option<&str> {
        DeltaPack::architecture(self)
    }
    fn changed_tensors(&self) -> &[(String, u64)] {
        &self.tensors
    }
    fn sparse(&self, name: &str) -> Option<SparseDelta<'_>> {
        DeltaPack::sparse(self, name)
    }
    fn release(&self, name: &str) {
        DeltaPack::release(self, name);
    }
}

/// Default output name for a pack of `finetuned`: `NAME.dpk.gguf` next to the current dir.
pub fn default_pack_path(finetuned: &Path) -> PathBuf {
    let stem = finetuned
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "delta".into());
    PathBuf::from(format!("{stem}.dpk.gguf"))
}
