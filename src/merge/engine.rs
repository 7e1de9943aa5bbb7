//! Merging one tensor, streaming: statistics passes where a method needs a whole-tensor number
//! (TIES rank cuts, L1 rescale factors, SLERP angles), then the main pass that dequantizes the
//! base and every model chunk by chunk, sparsifies, combines, requantizes and hands the bytes
//! to the writer slab by slab.
//!
//! Requantization follows the job's [`Requant`]: in full (ggml's quantizer; rows left unchanged
//! keep the base's bytes), or — where the output type is the base's and has a grid codec
//! ([`crate::quant::grid`]) — on the base's grid, stochastic rounding drawing from the
//! tensor's [`RoundingKey`] stream.
//!
//! Parallelism is over fixed chunks of rows (their layout depends only on the row length), and
//! every statistic is either an integer sum or a float sum taken in chunk order, so the output
//! and the report are the same for any thread count.

use rayon::prelude::*;

use crate::format::GgmlType;
use crate::merge::kernel::{self, Combine, ModelSparsity, ScaleRule};
use crate::merge::mask::{self, MaskKey, RoundingKey};
use crate::merge::measure::{self, DeltaMeasure};
use crate::merge::method::{Kind, MethodSpec, Rescale, Sparsifier};
use crate::merge::select::{self, HighHistogram, LowHistogram, RankCut};
use crate::quant::grid::{self, GridCodec, GridCounts, Requant, Rounding};
use crate::quant::{codec, QuantError};

/// Elements per chunk (rounded to whole rows) unless a job says otherwise.
pub const DEFAULT_CHUNK_ELEMS: usize = 32 * 1024;
/// The noise report estimates the base's quantization step from every this-many-th block.
const STEP_SAMPLE_EVERY: usize = 8;
/// Output bytes per slab handed to the writer.
pub const SLAB_BYTES: usize = 2 << 20;
/// Parts (slabs of at most 2 MiB, or small tensors) queued for the writer thread: while the
/// writer lags (a page-cache copy runs at ~1 GB/s on a slow machine) computing goes on, up to
/// 32 MiB ahead, instead of a worker blocking on the queue.
pub(crate) const QUEUED_PARTS: usize = 16;

/// Output bytes of the consecutive small tensors computed together.
pub(crate) const WINDOW_BYTES: u64 = 2 << 20;

/// One input tensor's bytes and type, with its row size checked.
#[derive(Clone, Copy)]
pub struct InputTensor<'a> {
    /// Raw data (only the first `n_rows` rows are used).
    pub data: &'a [u8],
    /// Its type.
    pub ty: GgmlType,
    /// Bytes per row of `n_per_row` elements.
    pub row_bytes: usize,
}

impl<'a> InputTensor<'a> {
    /// `data` of type `ty` in rows of `n_per_row` elements; an error if a row of that length
    /// is not a whole number of the type's blocks.
    pub fn new(
        data: &'a [u8],
        ty: GgmlType,
        n_per_row: u64,
        tensor: &str,
    ) -> Result<Self, QuantError> {
        let row_bytes = ty
            .row_bytes(n_per_row)
            .ok_or_else(|| QuantError::CannotQuantize {
                tensor: tensor.into(),
                ty,
                reason: format!("rows of {n_per_row} elements are not whole blocks of {ty}"),
            })? as usize;
        Ok(InputTensor {
            data,
            ty,
            row_bytes,
        })
    }
}

/// A model's tensor as the engine reads it: full values, or a sparse delta from a delta pack.
#[derive(Clone, Copy)]
pub enum ModelInput<'a> {
    /// The fine-tune's values (the delta is computed against the base).
    Dense(InputTensor<'a>),
    /// Kept delta values only, already sparsified and rescaled (a delta pack's `NAME.dv`).
    Sparse(SparseDelta<'a>),
}

/// A sparse delta: its kept values in element order and where they go.
#[derive(Clone, Copy)]
pub struct SparseDelta<'a> {
    /// Kept values, compacted (F32, F16, BF16 or Q8_0; Q8_0 padded to whole blocks).
    pub values: &'a [u8],
    /// Their type.
    pub values_ty: GgmlType,
    /// Which elements were kept.
    pub mask: SparseMask<'a>,
}

/// Which elements of a sparse delta were kept.
#[derive(Clone, Copy)]
pub enum SparseMask<'a> {
    /// Regenerated from the Philox mask (DARE): kept iff draw < ⌊density·2³²⌋.
    Philox {
        /// The pack's mask key (seed, stream, tensor name).
        key: MaskKey,
        /// Keep probability.
        density: f64,
    },
    /// Explicit ascending element indices (u32 little-endian).
    Indices(&'a [u8]),
    /// Every element (density 1).
    All,
}

/// What the main pass produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobOutput {
    /// The merged tensor in `out_ty`.
    Merged,
    /// Model 0's sparsified, rescaled delta as F32 (what delta-pack extraction stores).
    SparseDelta,
}

/// Per-model parameters for this tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelParams {
    /// Weight.
    pub weight: f32,
    /// Keep fraction (1 keeps all).
    pub density: f64,
    /// Breadcrumbs: fraction of largest magnitudes removed.
    pub gamma: f64,
    /// DELLA: half-width of the keep-probability range.
    pub epsilon: f64,
    /// Mask stream (the model's index among the merge inputs).
    pub stream: u32,
}

/// Everything needed to merge one tensor.
pub struct TensorJob<'a> {
    /// Output (GGUF) name, also the mask key's tensor name.
    pub name: &'a str,
    /// Row length.
    pub n_per_row: usize,
    /// Rows.
    pub n_rows: usize,
    /// Base tensor (`None` for linear merges).
    pub base: Option<InputTensor<'a>>,
    /// Model tensors, in input order.
    pub models: Vec<ModelInput<'a>>,
    /// Their parameters.
    pub params: Vec<ModelParams>,
    /// The method.
    pub method: MethodSpec,
    /// Scale of the mixed delta.
    pub lambda: f32,
    /// SLERP's interpolation parameter.
    pub t: f64,
    /// Mask seed.
    pub seed: u64,
    /// Output type.
    pub out_ty: GgmlType,
    /// How merged values are requantized when `out_ty` is the base's type (other outputs are
    /// always quantized in full).
    pub requant: Requant,
    /// Elements per chunk of parallel work ([`DEFAULT_CHUNK_ELEMS`]); the output does not
    /// depend on it.
    pub chunk_elems: usize,
    /// Merged output (normal) or model 0's sparse delta (delta-pack extraction).
    pub output: JobOutput,
    /// Take the report's measurements ([`TensorStats`] delta noise, kept counts, retention);
    /// without them only `elements` is filled (the runtime prints no report).
    pub measure: bool,
    /// Called with a row range once the main pass has written it: those rows of every input
    /// are not read again by this job (so a caller can release memory-mapped pages).
    pub rows_done: Option<&'a (dyn Fn(std::ops::Range<usize>) + Sync)>,
    /// Where output slabs come from (and a caller returns them once written), if anywhere:
    /// fresh buffers cost a page fault and zeroing per page, reused ones neither.
    pub slabs: Option<&'a SlabPool>,
}

/// Output buffers handed back after use, for the next slabs: a merge's output then reuses a
/// few buffers' pages instead of faulting in fresh memory for every slab. Holds at most
/// [`SlabPool::KEEP`] buffers.
#[derive(Default)]
pub struct SlabPool {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl SlabPool {
    /// Buffers kept for reuse at most (more are dropped).
    pub const KEEP: usize = 8;

    /// A buffer of `len` bytes with unspecified contents (reused if one is free).
    pub fn take(&self, len: usize) -> Vec<u8> {
        let reused = self.free.lock().ok().and_then(|mut f| f.pop());
        let mut buf = reused.unwrap_or_default();
        buf.truncate(len);
        buf.resize(len, 0);
        buf
    }

    /// Returns a buffer for reuse.
    pub fn give(&self, buf: Vec<u8>) {
        if let Ok(mut free) = self.free.lock() {
            if free.len() < Self::KEEP {
                free.push(buf);
            }
        }
    }
}

/// What merging one tensor measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorStats {
    /// Elements.
    pub elements: u64,
    /// Per model: deltas that were exactly zero before sparsification.
    pub zero_deltas: Vec<u64>,
    /// Per model: Σ δ² before sparsification.
    pub delta_sumsq: Vec<f64>,
    /// Per model: non-zero deltas after sparsification.
    pub kept: Vec<u64>,
    /// Σ over the measured blocks (a sample) of (estimated quantization step of the base)².
    pub step_sumsq: f64,
    /// Blocks measured for `step_sumsq`.
    pub step_blocks: u64,
    /// ⟨q(merged) − base, Δ⟩ where Δ = merged − base before requantization.
    pub retention_num: f64,
    /// ⟨Δ, Δ⟩.
    pub retention_den: f64,
    /// What on-grid requantization did with the blocks, when the tensor was requantized on the
    /// base's grid (`None`: in full).
    pub grid: Option<GridCounts>,
}

/// Delta RMS over the rounding noise expected from two independent roundings at the base's
/// quantization step (`step_rms`): a uniform rounding error has RMS step/√12, two add as √2.
/// Below ~2, much of a delta is quantization noise.
pub fn signal_to_noise(delta_rms: f64, step_rms: f64) -> f64 {
    delta_rms / (step_rms / 12f64.sqrt() * 2f64.sqrt()).max(1e-30)
}

/// What an [`EngineError`] is to be blamed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Culprit {
    /// The base's data (a NaN/Inf weight, a bad size).
    Base,
    /// Model `i`'s data (a fine-tune's or a delta pack's values).
    Model(usize),
    /// The merge itself: every input was fine, but the combination is not representable (the
    /// method's parameters — weights, λ — scale it past `f32` or the output type's range).
    Result,
}

impl std::fmt::Display for Culprit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Culprit::Base => f.write_str("the base"),
            Culprit::Model(i) => write!(f, "model {i}"),
            Culprit::Result => f.write_str("the merged values"),
        }
    }
}

/// An error while merging a tensor, and what caused it.
#[derive(Debug, thiserror::Error)]
#[error("{culprit}")]
pub struct EngineError {
    /// Which input (or the merge's result) the error concerns.
    pub culprit: Culprit,
    /// What failed.
    #[source]
    pub source: QuantError,
}

impl EngineError {
    fn of(input: Option<usize>, source: QuantError) -> EngineError {
        EngineError {
            culprit: input.map_or(Culprit::Base, Culprit::Model),
            source,
        }
    }
}

/// Per-thread work buffer of the main pass (merged values), reused across chunks and tensors
/// instead of allocated per chunk.
#[derive(Default)]
struct Scratch {
    out: Vec<f32>,
}

impl Scratch {
    /// The buffer, `len` long (contents unspecified: every user overwrites it whole).
    fn take(&mut self, len: usize) -> &mut [f32] {
        self.out.resize(len, 0.0);
        &mut self.out[..len]
    }
}

/// Per-thread input buffers (the base's values and one delta per model), reused across chunks
/// and tensors: fresh buffers per chunk cost page faults and zeroing in profiles.
#[derive(Default)]
struct Inputs {
    base: Vec<f32>,
    deltas: Vec<Vec<f32>>,
    /// Per model, the delta measurement taken while loading (if it was).
    measured: Vec<Option<DeltaMeasure>>,
}

impl Inputs {
    /// The base buffer, `models` delta buffers (contents unspecified) and `models` empty
    /// measurement slots.
    fn take(&mut self, models: usize) -> Loaded<'_> {
        if self.deltas.len() < models {
            self.deltas.resize_with(models, Vec::new);
        }
        self.measured.clear();
        self.measured.resize(models, None);
        Loaded {
            base: &mut self.base,
            deltas: &mut self.deltas[..models],
            measured: &mut self.measured,
        }
    }
}

/// One chunk's inputs as loaded: base values, deltas, and the deltas' measurements where
/// loading took them.
struct Loaded<'a> {
    base: &'a mut Vec<f32>,
    deltas: &'a mut [Vec<f32>],
    measured: &'a mut [Option<DeltaMeasure>],
}

/// Elements dequantized at a time when loading a model's values to turn them into deltas: a
/// multiple of every block size (1, 32, 256), small enough to stay in the L1 cache.
const PIECE: usize = 512;

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
    static INPUTS: std::cell::RefCell<Inputs> = std::cell::RefCell::new(Inputs::default());
}

struct Chunk {
    index: usize,
    row0: usize,
    rows: usize,
}

impl TensorJob<'_> {
    fn rows_per_chunk(&self) -> usize {
        (self.chunk_elems / self.n_per_row.max(1)).max(1)
    }

    fn chunks(&self) -> Vec<Chunk> {
        let rpc = self.rows_per_chunk();
        (0..self.n_rows.div_ceil(rpc))
            .map(|index| Chunk {
                index,
                row0: index * rpc,
                rows: rpc.min(self.n_rows - index * rpc),
            })
            .collect()
    }

    /// The bytes of chunk `c`'s rows of `t` (in range: checked by [`TensorJob::check`]).
    fn chunk_bytes<'t>(&self, t: &InputTensor<'t>, c: &Chunk) -> &'t [u8] {
        let row = t.row_bytes;
        &t.data[c.row0 * row..(c.row0 + c.rows) * row]
    }

    /// The output's row size, and a check of every input: its row size is its type's for
    /// `n_per_row`, and it holds `n_rows` rows. Run once per job, before any chunk.
    fn check(&self) -> Result<usize, EngineError> {
        let size_error = |culprit, expected: u64, found: u64| EngineError {
            culprit,
            source: QuantError::SizeMismatch {
                tensor: self.name.into(),
                expected,
                found,
            },
        };
        let inputs = self.base.iter().map(|b| (Culprit::Base, b)).chain(
            self.models.iter().enumerate().filter_map(|(i, m)| match m {
                ModelInput::Dense(t) => Some((Culprit::Model(i), t)),
                ModelInput::Sparse(_) => None,
            }),
        );
        for (culprit, t) in inputs {
            let row = t.ty.row_bytes(self.n_per_row as u64);
            let need = row.and_then(|r| r.checked_mul(self.n_rows as u64));
            match need {
                Some(need) if row == Some(t.row_bytes as u64) && t.data.len() as u64 >= need => {}
                _ => {
                    return Err(size_error(
                        culprit,
                        need.unwrap_or(u64::MAX),
                        t.data.len() as u64,
                    ))
                }
            }
        }
        let out_ty = match self.output {
            JobOutput::Merged => self.out_ty,
            JobOutput::SparseDelta => GgmlType::F32,
        };
        out_ty
            .row_bytes(self.n_per_row as u64)
            .map(|r| r as usize)
            .ok_or_else(|| EngineError {
                culprit: Culprit::Result,
                source: QuantError::CannotQuantize {
                    tensor: self.name.into(),
                    ty: out_ty,
                    reason: format!("rows of {} elements are not whole blocks", self.n_per_row),
                },
            })
    }

    /// The error for the non-finite value at `bad` (an index into chunk `c`) of input `input`,
    /// if any.
    fn check_finite(
        &self,
        bad: Option<usize>,
        t: &InputTensor<'_>,
        c: &Chunk,
        input: Option<usize>,
    ) -> Result<(), EngineError> {
        let Some(i) = bad else { return Ok(()) };
        // Decode the value again for the message (the buffer may hold a delta by now).
        let mut values = vec![0f32; c.rows * self.n_per_row];
        codec::dequantize_into(t.ty, self.chunk_bytes(t, c), &mut values);
        Err(EngineError::of(
            input,
            QuantError::NonFinite {
                tensor: self.name.into(),
                index: (c.row0 * self.n_per_row + i) as u64,
                value: values[i],
            },
        ))
    }

    fn dequant_rows(
        &self,
        t: &InputTensor<'_>,
        c: &Chunk,
        out: &mut [f32],
        input: Option<usize>,
    ) -> Result<(), EngineError> {
        codec::dequantize_into(t.ty, self.chunk_bytes(t, c), out);
        self.check_finite(measure::first_non_finite(out), t, c, input)
    }

    /// Dequantizes the base and the models for chunk `c` and turns model values into deltas
    /// (for linear merges, with no base, the "deltas" are the values themselves). Sparse inputs
    /// are expanded: their kept values from `offsets` on, zeros elsewhere. With `measure`,
    /// dense models' deltas are measured on the way.
    fn load(
        &self,
        c: &Chunk,
        offsets: &[Vec<u64>],
        loaded: &mut Loaded<'_>,
        measure: bool,
    ) -> Result<(), EngineError> {
        let Loaded {
            base,
            deltas,
            measured,
        } = loaded;
        let n = c.rows * self.n_per_row;
        // Buffers are reused from chunk to chunk and overwritten whole: `resize` after
        // `truncate` only fills what grows (zero-filling every chunk showed in profiles).
        let fit = |v: &mut Vec<f32>| {
            v.truncate(n);
            v.resize(n, 0.0);
        };
        match &self.base {
            Some(b) => {
                fit(base);
                self.dequant_rows(b, c, base, None)?;
            }
            None => base.clear(),
        }
        for (i, (m, d)) in self.models.iter().zip(deltas.iter_mut()).enumerate() {
            fit(d);
            match m {
                ModelInput::Dense(t) if !base.is_empty() => {
                    let mut m = measure.then(DeltaMeasure::default);
                    let bad = self.load_delta(t, c, base, d, m.as_mut());
                    self.check_finite(bad, t, c, Some(i))?;
                    measured[i] = m;
                }
                ModelInput::Dense(t) => self.dequant_rows(t, c, d, Some(i))?,
                ModelInput::Sparse(sp) => {
                    let start = (c.row0 * self.n_per_row) as u64;
                    let first = offsets[i].get(c.index).copied().unwrap_or(0);
                    self.expand_sparse(sp, start, first, d)
                        .map_err(|source| EngineError::of(Some(i), source))?;
                }
            }
        }
        Ok(())
    }

    /// Writes model `t`'s deltas against `base` for chunk `c` into `d`, checking, subtracting
    /// (and measuring) each dequantized piece in one pass; returns the index of the first
    /// non-finite model value, if any.
    fn load_delta(
        &self,
        t: &InputTensor<'_>,
        c: &Chunk,
        base: &[f32],
        d: &mut [f32],
        mut measure: Option<&mut DeltaMeasure>,
    ) -> Option<usize> {
        for_each_piece(t.ty, self.chunk_bytes(t, c), d.len(), |at, values| {
            let range = at..at + values.len();
            measure::subtract_measured(
                values,
                &base[range.clone()],
                &mut d[range],
                measure.as_deref_mut(),
            )
            .map(|i| at + i)
        })
    }

    /// Writes the sparse delta's elements `start..start + out.len()` into `out`; `first` is the
    /// index of the first kept value at or after `start`.
    fn expand_sparse(
        &self,
        sp: &SparseDelta<'_>,
        start: u64,
        first: u64,
        out: &mut [f32],
    ) -> Result<(), QuantError> {
        self.expand_sparse_unchecked(sp, start, first, out)?;
        // A pack's values were checked at extraction (and its checksum on open): a NaN/Inf
        // here is a damaged or hand-made pack, named as the culprit.
        match measure::first_non_finite(out) {
            None => Ok(()),
            Some(i) => Err(QuantError::NonFinite {
                tensor: self.name.into(),
                index: start + i as u64,
                value: out[i],
            }),
        }
    }

    fn expand_sparse_unchecked(
        &self,
        sp: &SparseDelta<'_>,
        start: u64,
        first: u64,
        out: &mut [f32],
    ) -> Result<(), QuantError> {
        out.fill(0.0);
        let len = out.len();
        match sp.mask {
            SparseMask::All => decode_values(sp, first, out, self.name),
            SparseMask::Philox { key, density } => {
                let mut keep = vec![false; len];
                let k = mask::keep_mask(&key, density, start, &mut keep) as usize;
                let mut vals = vec![0f32; k];
                decode_values(sp, first, &mut vals, self.name)?;
                let mut it = vals.into_iter();
                for (o, _) in out.iter_mut().zip(&keep).filter(|(_, &kp)| kp) {
                    *o = it.next().unwrap_or(0.0);
                }
                Ok(())
            }
            SparseMask::Indices(idx) => {
                let count = idx.len() / 4;
                let mut j = first as usize;
                let mut end = j;
                while end < count && index_at(idx, end) < start + len as u64 {
                    end += 1;
                }
                let mut vals = vec![0f32; end - j];
                decode_values(sp, first, &mut vals, self.name)?;
                for v in vals {
                    let pos = index_at(idx, j);
                    if pos < start {
                        return Err(QuantError::SizeMismatch {
                            tensor: self.name.into(),
                            expected: start,
                            found: pos,
                        });
                    }
                    out[(pos - start) as usize] = v;
                    j += 1;
                }
                Ok(())
            }
        }
    }

    /// Per sparse model, the index of the first kept value of each chunk (empty for dense).
    fn sparse_offsets(&self, chunks: &[Chunk]) -> Vec<Vec<u64>> {
        self.models
            .iter()
            .map(|m| match m {
                ModelInput::Dense(_) => Vec::new(),
                ModelInput::Sparse(sp) => {
                    let counts: Vec<u64> = chunks
                        .par_iter()
                        .map(|c| {
                            let start = (c.row0 * self.n_per_row) as u64;
                            let len = (c.rows * self.n_per_row) as u64;
                            match sp.mask {
                                SparseMask::All => len,
                                SparseMask::Philox { key, density } => {
                                    let mut keep = vec![false; len as usize];
                                    mask::keep_mask(&key, density, start, &mut keep)
                                }
                                SparseMask::Indices(idx) => {
                                    let n = idx.len() / 4;
                                    let lo = partition(n, |j| index_at(idx, j) < start);
                                    let hi = partition(n, |j| index_at(idx, j) < start + len);
                                    (hi - lo) as u64
                                }
                            }
                        })
                        .collect();
                    let mut acc = 0;
                    counts
                        .into_iter()
                        .map(|k| {
                            let before = acc;
                            acc += k;
                            before
                        })
                        .collect()
                }
            })
            .collect()
    }

    /// Runs `f` on every chunk (in parallel) with the chunk's base and deltas; results in chunk
    /// order.
    fn for_chunks<R: Send>(
        &self,
        chunks: &[Chunk],
        offsets: &[Vec<u64>],
        f: impl Fn(&Chunk, &[f32], &mut [Vec<f32>]) -> R + Sync,
    ) -> Result<Vec<R>, EngineError> {
        let parts = vec![(); chunks.len()];
        self.for_chunks_with(chunks, offsets, parts, false, |c, (), loaded| {
            f(c, loaded.base, loaded.deltas)
        })
    }

    /// [`Self::for_chunks`] with one more argument per chunk, `parts[k]` going to chunk `k`
    /// (e.g. the chunk's share of an output buffer), and the deltas measured while loading
    /// where `measure` asks for it.
    fn for_chunks_with<P: Send, R: Send>(
        &self,
        chunks: &[Chunk],
        offsets: &[Vec<u64>],
        parts: Vec<P>,
        measure: bool,
        f: impl Fn(&Chunk, P, Loaded<'_>) -> R + Sync,
    ) -> Result<Vec<R>, EngineError> {
        chunks
            .par_iter()
            .zip(parts)
            .map(|(c, part)| {
                INPUTS.with_borrow_mut(|inputs| {
                    let mut loaded = inputs.take(self.models.len());
                    self.load(c, offsets, &mut loaded, measure)?;
                    Ok(f(c, part, loaded))
                })
            })
            .collect()
    }
}

/// Rank window [from, until) per model for magnitude sparsifiers, in elements.
fn rank_window(kind: Sparsifier, p: &ModelParams, n: u64) -> Option<(u64, u64)> {
    if p.density >= 1.0 {
        return None;
    }
    let target = (p.density * n as f64) as u64;
    match kind {
        Sparsifier::Magnitude => Some((0, target)),
        Sparsifier::Outliers => {
            let mut top = (p.gamma * n as f64) as u64;
            if target + top > n {
                top = n - target;
            }
            Some((top, top + target))
        }
        _ => None,
    }
}

/// Exact cuts at the given ranks of |δ| of model `i`, via two radix passes.
fn rank_cuts(
    job: &TensorJob<'_>,
    chunks: &[Chunk],
    offsets: &[Vec<u64>],
    i: usize,
    ranks: &[u64],
    n: u64,
) -> Result<Vec<RankCut>, EngineError> {
    let high = job
        .for_chunks(chunks, offsets, |_, _, d| {
            let mut h = HighHistogram::default();
            h.add(&d[i]);
            h
        })?
        .into_iter()
        .fold(HighHistogram::default(), |mut a, b| {
            a.merge(&b);
            a
        });
    let mut cuts = Vec::with_capacity(ranks.len());
    for &r in ranks {
        if r >= n {
            cuts.push(RankCut::everything());
            continue;
        }
        if r == 0 {
            cuts.push(RankCut::nothing());
            continue;
        }
        let (bucket, above) = select::locate_high(&high, r);
        let low = job
            .for_chunks(chunks, offsets, |_, _, d| {
                let mut l = LowHistogram::new(bucket);
                l.add(&d[i]);
                l
            })?
            .into_iter()
            .fold(LowHistogram::new(bucket), |mut a, b| {
                a.merge(&b);
                a
            });
        cuts.push(select::locate_low(&low, above, r));
    }
    Ok(cuts)
}

/// Merges one tensor; output bytes go to `write` in order, slab by slab (each slab's buffer
/// is the callee's to keep: chunks are computed straight into it, and it is handed over, not
/// copied).
pub fn merge_tensor<E: std::error::Error + 'static>(
    job: &TensorJob<'_>,
    write: &mut dyn FnMut(Vec<u8>) -> Result<(), E>,
) -> Result<TensorStats, MergeTensorError<E>> {
    merge_slabs(job, None, write)
}

/// Merges one tensor into `dst`, which must hold exactly the output tensor's bytes: slabs are
/// computed in place, with no buffer per slab and no copy (for a caller that keeps the whole
/// tensor anyway).
pub fn merge_tensor_into(job: &TensorJob<'_>, dst: &mut [u8]) -> Result<TensorStats, EngineError> {
    let want = job.check()? * job.n_rows;
    if dst.len() != want {
        return Err(EngineError {
            culprit: Culprit::Result,
            source: QuantError::SizeMismatch {
                tensor: job.name.into(),
                expected: want as u64,
                found: dst.len() as u64,
            },
        });
    }
    merge_slabs(job, Some(dst), &mut |_| {
        Ok::<(), std::convert::Infallible>(())
    })
    .map_err(|e| match e {
        MergeTensorError::Engine(e) => e,
        MergeTensorError::Write(never) => match never {},
    })
}

/// What the statistics passes found for one tensor, before its main pass: each model's
/// sparsity (mask key, rank cuts, rescale factor), per-chunk counts of elements equal to the
/// rank cuts, and SLERP's coefficients.
struct Prepared {
    sparsity: Vec<ModelSparsity>,
    equal_prefix: Vec<Vec<(u64, u64)>>,
    slerp: (f32, f32),
}

impl Prepared {
    /// Model `i`'s sparsity in chunk `c`.
    fn sparsity_at(&self, i: usize, c: &Chunk) -> ModelSparsity {
        let mut s = self.sparsity[i].clone();
        if let Some(&e) = self.equal_prefix[i].get(c.index) {
            s.equal_before_chunk = e;
        }
        s
    }
}

/// The sparsifier of model `i`: the method's, except for a model of density 1 or an
/// already-sparsified input (a pack), which are not sparsified.
fn sparsifier_of(job: &TensorJob<'_>, i: usize) -> Sparsifier {
    if job.params[i].density >= 1.0 || matches!(job.models[i], ModelInput::Sparse(_)) {
        Sparsifier::None
    } else {
        job.method.sparsifier
    }
}

/// The setup and the statistics passes of one tensor: per-model sparsity, TIES/breadcrumbs
/// rank cuts (two radix passes each), L1 rescale factors, SLERP's angle.
fn prepare(
    job: &TensorJob<'_>,
    chunks: &[Chunk],
    offsets: &[Vec<u64>],
) -> Result<Prepared, EngineError> {
    let n = (job.n_per_row * job.n_rows) as u64;
    let m = job.models.len();
    let spec = job.method;
    let sparsifier_of = |i: usize| sparsifier_of(job, i);
    // Per-model sparsity setup: masks, rank cuts, equal-prefix counts, rescale factors.
    let mut sparsity: Vec<ModelSparsity> = job
        .params
        .iter()
        .map(|p| ModelSparsity {
            density: p.density,
            epsilon: p.epsilon,
            key: MaskKey::new(job.seed, p.stream, job.name),
            keep_from: RankCut::nothing(),
            keep_until: RankCut::everything(),
            equal_before_chunk: (0, 0),
            scale: match (spec.rescale, spec.sparsifier) {
                (Rescale::Inverse, Sparsifier::Random) if p.density < 1.0 => {
                    ScaleRule::Factor((1.0 / p.density) as f32)
                }
                (Rescale::Inverse, Sparsifier::Della) if p.density < 1.0 => {
                    ScaleRule::InverseProbability
                }
                _ => ScaleRule::None,
            },
        })
        .collect();
    // Equal-prefix counts per chunk for the magnitude windows.
    let mut equal_prefix: Vec<Vec<(u64, u64)>> = vec![Vec::new(); m];
    if matches!(
        spec.sparsifier,
        Sparsifier::Magnitude | Sparsifier::Outliers
    ) {
        for i in 0..m {
            let Some((from, until)) = rank_window(sparsifier_of(i), &job.params[i], n) else {
                continue;
            };
            let cuts = rank_cuts(job, chunks, offsets, i, &[from, until], n)?;
            sparsity[i].keep_from = cuts[0];
            sparsity[i].keep_until = cuts[1];
            let (vf, vu) = (cuts[0].value_bits, cuts[1].value_bits);
            let counts = job.for_chunks(chunks, offsets, |_, _, d| {
                let mut e = (0u64, 0u64);
                for v in &d[i] {
                    let b = v.abs().to_bits();
                    e.0 += u64::from(b == vf);
                    e.1 += u64::from(b == vu);
                }
                e
            })?;
            let mut acc = (0u64, 0u64);
            equal_prefix[i] = counts
                .into_iter()
                .map(|c| {
                    let before = acc;
                    acc = (acc.0 + c.0, acc.1 + c.1);
                    before
                })
                .collect();
        }
    }

    // L1 rescale: factor = ‖δ‖₁ / ‖sparsified δ‖₁ per model and tensor.
    if spec.rescale == Rescale::L1 && spec.sparsifier != Sparsifier::None {
        let sums = job.for_chunks(chunks, offsets, |c, _, d| {
            (0..m)
                .map(|i| {
                    let before: f64 = d[i].iter().map(|v| f64::from(v.abs())).sum();
                    let mut s = {
                        let mut s = sparsity[i].clone();
                        if let Some(&e) = equal_prefix[i].get(c.index) {
                            s.equal_before_chunk = e;
                        }
                        s
                    };
                    s.scale = ScaleRule::None;
                    kernel::sparsify(
                        sparsifier_of(i),
                        &s,
                        (c.row0 * job.n_per_row) as u64,
                        job.n_per_row,
                        &mut d[i],
                    );
                    let after: f64 = d[i].iter().map(|v| f64::from(v.abs())).sum();
                    (before, after)
                })
                .collect::<Vec<_>>()
        })?;
        for (i, s) in sparsity.iter_mut().enumerate() {
            let (before, after) = sums
                .iter()
                .fold((0.0, 0.0), |a, c| (a.0 + c[i].0, a.1 + c[i].1));
            s.scale = if before >= 1e-7 && after >= 1e-7 {
                ScaleRule::Factor((before / after) as f32)
            } else {
                ScaleRule::None
            };
        }
    }

    // SLERP: one angle per tensor.
    let mut slerp = (1.0f32, 0.0f32);
    if spec.kind == Kind::Slerp {
        let parts = job.for_chunks(chunks, offsets, |_, base, d| {
            let (mut dot, mut n0, mut n1) = (0f64, 0f64, 0f64);
            for (b, dv) in base.iter().zip(&d[0]) {
                let x = f64::from(b + dv);
                let b = f64::from(*b);
                dot += b * x;
                n0 += b * b;
                n1 += x * x;
            }
            (dot, n0, n1)
        })?;
        let (dot, n0, n1) = parts
            .iter()
            .fold((0.0, 0.0, 0.0), |a, p| (a.0 + p.0, a.1 + p.1, a.2 + p.2));
        slerp = kernel::slerp_coefficients(job.t, dot, n0, n1);
    }

    Ok(Prepared {
        sparsity,
        equal_prefix,
        slerp,
    })
}

/// Per-tensor constants of the main pass.
struct ChunkContext {
    combine: Combine,
    weights: Vec<f32>,
    out_row: usize,
    /// Block size of a quantized base (for the noise report's step estimate).
    step_block: Option<usize>,
    /// Quantization levels of the base's type (step = range / levels).
    step_levels: f64,
    /// The grid codec when the tensor is requantized on the base's grid.
    grid: Option<&'static GridCodec>,
    /// The stochastic rounding stream, for [`Requant::GridStochastic`].
    rounding: Option<RoundingKey>,
}

impl ChunkContext {
    /// The grid codec and rounding stream for `job`: on the grid only for merged output of
    /// the base's own type, in a mode that asks for it, of a type with a codec.
    fn grid_of(job: &TensorJob<'_>) -> (Option<&'static GridCodec>, Option<RoundingKey>) {
        let codec = match job.base {
            Some(b)
                if job.requant.on_grid()
                    && job.output == JobOutput::Merged
                    && b.ty == job.out_ty =>
            {
                grid::grid_of(job.out_ty)
            }
            _ => None,
        };
        let rounding = (codec.is_some() && job.requant == Requant::GridStochastic)
            .then(|| RoundingKey::new(job.seed, job.name));
        (codec, rounding)
    }
}

/// The main pass over one chunk: measure the deltas, sparsify, combine (or SLERP), check the
/// range, and requantize into `bytes` — or copy the base's bytes for rows left unchanged.
fn merge_chunk(
    job: &TensorJob<'_>,
    prep: &Prepared,
    cx: &ChunkContext,
    c: &Chunk,
    bytes: &mut [u8],
    loaded: Loaded<'_>,
) -> Result<TensorStats, EngineError> {
    let m = job.models.len();
    let spec = job.method;
    let out_row = cx.out_row;
    let Loaded {
        base,
        deltas: d,
        measured,
    } = loaded;
    let base: &[f32] = base;
    let len = c.rows * job.n_per_row;
    let start = (c.row0 * job.n_per_row) as u64;
    let mut st = TensorStats {
        zero_deltas: vec![0; m],
        delta_sumsq: vec![0.0; m],
        kept: vec![0; m],
        ..TensorStats::default()
    };
    if let Some(bs) = cx.step_block.filter(|_| job.measure) {
        let (range_sumsq, blocks) = measure::block_range_sumsq(base, bs, STEP_SAMPLE_EVERY);
        st.step_sumsq += range_sumsq / (cx.step_levels * cx.step_levels);
        st.step_blocks += blocks;
    }
    for (i, di) in d.iter().enumerate().filter(|_| job.measure) {
        (st.zero_deltas[i], st.delta_sumsq[i]) = match &measured[i] {
            Some(m) => m.totals(),
            None => measure::zeros_and_sumsq(di),
        };
    }
    SCRATCH.with_borrow_mut(|scratch| {
        let out = scratch.take(len);
        let mut in_range = false;
        if spec.kind == Kind::Slerp {
            for ((o, b), dv) in out.iter_mut().zip(base).zip(&d[0]) {
                *o = prep.slerp.0 * b + prep.slerp.1 * (b + dv);
            }
        } else {
            for (i, di) in d.iter_mut().enumerate() {
                let s = prep.sparsity_at(i, c);
                let counted = kernel::sparsify(sparsifier_of(job, i), &s, start, job.n_per_row, di);
                if job.measure {
                    st.kept[i] = counted.unwrap_or_else(|| measure::nonzeros(di));
                }
            }
            if job.output == JobOutput::SparseDelta {
                for (b, v) in bytes.chunks_exact_mut(4).zip(&d[0]) {
                    b.copy_from_slice(&v.to_le_bytes());
                }
                return Ok(st);
            }
            in_range = kernel::combine(cx.combine, base, d, &cx.weights, out);
        }
        if !in_range {
            // Every input value was checked on loading: the parameters did it.
            check_merged(out, job.out_ty, job.name, start)?;
        }
        if let (Some(codec), Some(b)) = (cx.grid, job.base) {
            // On the base's grid: unchanged blocks keep their bytes, changed elements move.
            let base_bytes = &b.data[c.row0 * out_row..(c.row0 + c.rows) * out_row];
            let draws = |offset: usize, d: &mut [u32]| {
                if let Some(key) = &cx.rounding {
                    key.fill(start + offset as u64, d);
                }
            };
            let rounding = match cx.rounding {
                Some(_) => Rounding::Stochastic(&draws),
                None => Rounding::Nearest,
            };
            st.grid = Some(grid::requantize(
                codec, base_bytes, base, out, bytes, rounding,
            ));
            if job.measure {
                (st.retention_num, st.retention_den) = retention(job.out_ty, bytes, out, base);
            }
            return Ok(st);
        }
        // Rows the merge leaves exactly as they were keep the base's own bytes:
        // requantizing dequantized values is not always the identity (K-quants search
        // their scales), and an untouched row must not change.
        if let Some(b) = job.base.filter(|b| b.ty == job.out_ty) {
            if out
                .iter()
                .zip(base)
                .all(|(o, x)| o.to_bits() == x.to_bits())
            {
                bytes.copy_from_slice(&b.data[c.row0 * out_row..(c.row0 + c.rows) * out_row]);
                return Ok(st);
            }
        }
        codec::quantize_into(job.out_ty, out, job.n_per_row as u64, bytes);
        if job.measure && !base.is_empty() {
            (st.retention_num, st.retention_den) = retention(job.out_ty, bytes, out, base);
        }
        Ok(st)
    })
}

/// [`merge_tensor`] (slabs handed to `write`) or [`merge_tensor_into`] (slabs are parts of
/// `dst`): the statistics passes ([`prepare`]), then the main pass slab by slab, each slab's
/// chunks in parallel ([`merge_chunk`]).
fn merge_slabs<E: std::error::Error + 'static>(
    job: &TensorJob<'_>,
    mut dst: Option<&mut [u8]>,
    write: &mut dyn FnMut(Vec<u8>) -> Result<(), E>,
) -> Result<TensorStats, MergeTensorError<E>> {
    let out_row = job.check().map_err(MergeTensorError::Engine)?;
    let chunks = job.chunks();
    let offsets = job.sparse_offsets(&chunks);
    let n = (job.n_per_row * job.n_rows) as u64;
    let m = job.models.len();
    let prep = prepare(job, &chunks, &offsets).map_err(MergeTensorError::Engine)?;
    let base_ty = job.base.map(|b| b.ty);
    let (grid, rounding) = ChunkContext::grid_of(job);
    let cx = ChunkContext {
        combine: Combine {
            consensus: job.method.consensus,
            normalize: job.method.normalize,
            lambda: job.lambda,
        },
        weights: job.params.iter().map(|p| p.weight).collect(),
        out_row,
        step_block: base_ty
            .filter(|t| t.is_quantized())
            .map(|t| t.block_size() as usize),
        step_levels: base_ty.map_or(1.0, |t| {
            (2f64.powf(t.bits_per_weight().round()) - 1.0).max(1.0)
        }),
        grid,
        rounding,
    };

    let mut stats = TensorStats {
        elements: n,
        zero_deltas: vec![0; m],
        delta_sumsq: vec![0.0; m],
        kept: vec![0; m],
        grid: cx.grid.map(|_| GridCounts::default()),
        ..TensorStats::default()
    };
    let chunks_per_slab = (SLAB_BYTES / (out_row * job.rows_per_chunk()).max(1)).max(1);
    for slab in chunks.chunks(chunks_per_slab) {
        let slab_rows: usize = slab.iter().map(|c| c.rows).sum();
        // Every chunk writes all of its bytes, so a reused buffer need not be cleared.
        let slab_len = slab_rows * out_row;
        let (mut owned, mut into) = (Vec::new(), None);
        match dst.take() {
            Some(d) => {
                let (here, later) = d.split_at_mut(slab_len.min(d.len()));
                into = Some(here);
                dst = Some(later);
            }
            None => {
                owned = match job.slabs {
                    Some(pool) => pool.take(slab_len),
                    None => vec![0u8; slab_len],
                }
            }
        }
        let slab_bytes: &mut [u8] = match into {
            Some(d) => d,
            None => &mut owned,
        };
        let mut parts = Vec::with_capacity(slab.len());
        let mut rest = &mut slab_bytes[..];
        for c in slab {
            let (part, tail) = rest.split_at_mut(c.rows * out_row);
            parts.push(part);
            rest = tail;
        }
        let results = job
            .for_chunks_with(slab, &offsets, parts, job.measure, |c, bytes, loaded| {
                merge_chunk(job, &prep, &cx, c, bytes, loaded)
            })
            .map_err(MergeTensorError::Engine)?;
        for r in results {
            let st = r.map_err(MergeTensorError::Engine)?;
            for i in 0..m {
                stats.zero_deltas[i] += st.zero_deltas[i];
                stats.delta_sumsq[i] += st.delta_sumsq[i];
                stats.kept[i] += st.kept[i];
            }
            stats.step_sumsq += st.step_sumsq;
            stats.step_blocks += st.step_blocks;
            stats.retention_num += st.retention_num;
            stats.retention_den += st.retention_den;
            if let (Some(total), Some(counts)) = (&mut stats.grid, &st.grid) {
                total.add(counts);
            }
        }
        if dst.is_none() {
            write(owned).map_err(MergeTensorError::Write)?;
        }
        if let (Some(done), Some(first), Some(last)) = (job.rows_done, slab.first(), slab.last()) {
            done(first.row0..last.row0 + last.rows);
        }
    }
    Ok(stats)
}

/// Checks merged values that [`kernel::combine`] found outside ±[`kernel::RANGE_LIMIT`]:
/// a NaN/Inf is always an error; finite values beyond the limit are an error for every output
/// type but F32 and BF16 (F16 holds ±65504, and quantized types store F16 block scales).
/// `start` is the index of `out[0]` in the tensor.
fn check_merged(out: &[f32], ty: GgmlType, tensor: &str, start: u64) -> Result<(), EngineError> {
    let result = |source| EngineError {
        culprit: Culprit::Result,
        source,
    };
    if let Some(i) = measure::first_non_finite(out) {
        return Err(result(QuantError::NonFinite {
            tensor: tensor.into(),
            index: start + i as u64,
            value: out[i],
        }));
    }
    if ty != GgmlType::F32 && ty != GgmlType::BF16 {
        let max = out.iter().fold(0f32, |m, x| m.max(x.abs()));
        if max > kernel::RANGE_LIMIT {
            return Err(result(QuantError::OutOfRange {
                tensor: tensor.into(),
                ty,
                max,
            }));
        }
    }
    Ok(())
}

/// The delta retention terms ([`measure::retention_sums`]) of one chunk: `bytes` are `out`
/// requantized to `ty`.
fn retention(ty: GgmlType, bytes: &[u8], out: &[f32], base: &[f32]) -> (f64, f64) {
    let mut r = measure::Retention::default();
    for_each_piece(ty, bytes, out.len(), |at, back| {
        let range = at..at + back.len();
        r.add(back, &out[range.clone()], &base[range]);
        None::<()>
    });
    r.totals()
}

/// Dequantizes the `len` elements in `bytes` (of type `ty`, whole blocks) [`PIECE`] at a time
/// into a small buffer that stays in the L1 cache, calling `f(offset, values)` on each piece
/// until it returns something (then returns that). A whole-buffer pass per step would stream
/// every chunk-sized buffer through the slower caches again.
fn for_each_piece<R>(
    ty: GgmlType,
    bytes: &[u8],
    len: usize,
    mut f: impl FnMut(usize, &[f32]) -> Option<R>,
) -> Option<R> {
    let block = ty.block_size() as usize;
    let piece_bytes = PIECE / block.max(1) * ty.type_size() as usize;
    if block == 0 || !PIECE.is_multiple_of(block) || piece_bytes == 0 {
        // (No such type today.) The whole buffer at once.
        let mut values = vec![0f32; len];
        codec::dequantize_into(ty, bytes, &mut values);
        return f(0, &values);
    }
    let mut values = [0f32; PIECE];
    for (k, src) in bytes.chunks(piece_bytes).enumerate() {
        let at = k * PIECE;
        let v = &mut values[..PIECE.min(len.saturating_sub(at))];
        codec::dequantize_into(ty, src, v);
        if let Some(r) = f(at, v) {
            return Some(r);
        }
    }
    None
}

/// Why a tensor merge failed: the engine, or the caller's `write` (error type `E`).
#[derive(Debug, thiserror::Error)]
pub enum MergeTensorError<E: std::error::Error + 'static> {
    /// Reading or computing.
    #[error(transparent)]
    Engine(EngineError),
    /// Writing the output.
    #[error(transparent)]
    Write(E),
}

/// Element index `j` of a little-endian u32 index array.
fn index_at(idx: &[u8], j: usize) -> u64 {
    u64::from(u32::from_le_bytes([
        idx[4 * j],
        idx[4 * j + 1],
        idx[4 * j + 2],
        idx[4 * j + 3],
    ]))
}

/// First `j` in `0..n` where `pred(j)` is false (`pred` must be true, then false).
fn partition(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Decodes `out.len()` compacted values of a sparse delta starting at value index `first`.
fn decode_values(
    sp: &SparseDelta<'_>,
    first: u64,
    out: &mut [f32],
    name: &str,
) -> Result<(), QuantError> {
    let ty = sp.values_ty;
    let blk = ty.block_size();
    let b0 = first / blk;
    let b1 = (first + out.len() as u64).div_ceil(blk);
    let (s, e) = (
        (b0 * ty.type_size()) as usize,
        (b1 * ty.type_size()) as usize,
    );
    let bytes = sp
        .values
        .get(s..e)
        .ok_or_else(|| QuantError::SizeMismatch {
            tensor: name.into(),
            expected: e as u64,
            found: sp.values.len() as u64,
        })?;
    if blk == 1 {
        codec::dequantize_into(ty, bytes, out);
    } else {
        let mut tmp = vec![0f32; ((b1 - b0) * blk) as usize];
        codec::dequantize_into(ty, bytes, &mut tmp);
        let off = (first - b0 * blk) as usize;
        out.copy_from_slice(&tmp[off..off + out.len()]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn run(job: &TensorJob<'_>) -> (Vec<f32>, TensorStats) {
        let mut out = Vec::new();
        let st = merge_tensor(job, &mut |b| {
            out.extend_from_slice(&b);
            Ok::<(), std::convert::Infallible>(())
        })
        .map_err(|_| "merge failed")
        .unwrap();
        let v = out
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (v, st)
    }

    fn job<'a>(
        base: &'a [u8],
        models: &[&'a [u8]],
        params: Vec<ModelParams>,
        method: MethodSpec,
        n_per_row: usize,
    ) -> TensorJob<'a> {
        TensorJob {
            name: "blk.0.ffn_up.weight",
            n_per_row,
            n_rows: base.len() / 4 / n_per_row,
            base: Some(InputTensor::new(base, GgmlType::F32, n_per_row as u64, "t").unwrap()),
            models: models
                .iter()
                .map(|d| {
                    ModelInput::Dense(
                        InputTensor::new(d, GgmlType::F32, n_per_row as u64, "t").unwrap(),
                    )
                })
                .collect(),
            params,
            method,
            lambda: 1.0,
            t: 0.5,
            seed: 1,
            out_ty: GgmlType::F32,
            requant: Requant::Full,
            chunk_elems: DEFAULT_CHUNK_ELEMS,
            output: JobOutput::Merged,
            measure: true,
            rows_done: None,
            slabs: None,
        }
    }

    fn p(weight: f32, density: f64, stream: u32) -> ModelParams {
        ModelParams {
            weight,
            density,
            gamma: 0.0,
            epsilon: 0.0,
            stream,
        }
    }

    const TIES: MethodSpec = MethodSpec {
        kind: Kind::TaskVector,
        sparsifier: Sparsifier::Magnitude,
        consensus: true,
        normalize: true,
        rescale: Rescale::None,
    };

    #[test]
    fn ties_by_hand() {
        // Base 0; model A δ = [3, -1, 2, -4], model B δ = [-2, 1, 1, -1], density 0.5:
        // A keeps 3 and -4, B keeps -2 and 1 (|1| ties with |-1| and |1|: first by index wins).
        // Election: e0: 3 - 2 = 1 > 0 → +, keep 3 (div 1) → 3. e1: B +1 → 1. e2: 0. e3: -4 → -4.
        let base = f32_bytes(&[0.0; 4]);
        let a = f32_bytes(&[3.0, -1.0, 2.0, -4.0]);
        let b = f32_bytes(&[-2.0, 1.0, 1.0, -1.0]);
        let (out, st) = run(&job(
            &base,
            &[&a, &b],
            vec![p(1.0, 0.5, 0), p(1.0, 0.5, 1)],
            TIES,
            4,
        ));
        assert_eq!(out, [3.0, 1.0, 0.0, -4.0]);
        assert_eq!(st.kept, [2, 2]);
    }

    #[test]
    fn density_one_dare_equals_task_arithmetic_and_tiny_density_drops_almost_all() {
        let n = 4096;
        let base_v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let d_v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 0.01).collect();
        let base = f32_bytes(&base_v);
        let m: Vec<u8> = f32_bytes(
            &base_v
                .iter()
                .zip(&d_v)
                .map(|(b, d)| b + d)
                .collect::<Vec<_>>(),
        );
        let dare = MethodSpec {
            kind: Kind::TaskVector,
            sparsifier: Sparsifier::Random,
            consensus: false,
            normalize: false,
            rescale: Rescale::Inverse,
        };
        let ta = MethodSpec {
            sparsifier: Sparsifier::None,
            ..dare
        };
        let (x, _) = run(&job(&base, &[&m], vec![p(0.5, 1.0, 0)], dare, 64));
        let (y, _) = run(&job(&base, &[&m], vec![p(0.5, 1.0, 0)], ta, 64));
        assert_eq!(x, y);
        let (z, st) = run(&job(&base, &[&m], vec![p(0.5, 1e-6, 0)], dare, 64));
        assert!(st.kept[0] <= 2, "{st:?}");
        assert!(z.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn dare_preserves_the_mean_delta_after_rescale() {
        // δ = 0.01 everywhere; after DARE at density 0.1 with ÷ density, the mean of the merged
        // delta stays 0.01 within the binomial bound (5 σ).
        let n = 1 << 20;
        let base = f32_bytes(&vec![0.0; n]);
        let m = f32_bytes(&vec![0.01; n]);
        let dare = MethodSpec {
            kind: Kind::TaskVector,
            sparsifier: Sparsifier::Random,
            consensus: false,
            normalize: false,
            rescale: Rescale::Inverse,
        };
        let (out, st) = run(&job(&base, &[&m], vec![p(1.0, 0.1, 0)], dare, 1024));
        let mean = out.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let sigma = 0.01 * ((0.9 / 0.1) / n as f64).sqrt();
        assert!((mean - 0.01).abs() < 5.0 * sigma, "mean {mean}");
        let kept = st.kept[0] as f64 / n as f64;
        assert!(
            (kept - 0.1).abs() < 5.0 * (0.1 * 0.9 / n as f64).sqrt(),
            "kept {kept}"
        );
    }

    #[test]
    fn merging_into_a_buffer_equals_streaming_slabs() {
        // Q8_0 output over several slabs (and a pool that hands back dirty buffers).
        let (n_per_row, rows) = (1024, 2300);
        let base_v: Vec<f32> = (0..n_per_row * rows)
            .map(|i| (i as f32 * 0.013).sin())
            .collect();
        let base = f32_bytes(&base_v);
        let m = f32_bytes(
            &base_v
                .iter()
                .enumerate()
                .map(|(i, b)| b + (i % 11) as f32 * 1e-3)
                .collect::<Vec<_>>(),
        );
        let dare = MethodSpec {
            kind: Kind::TaskVector,
            sparsifier: Sparsifier::Random,
            consensus: true,
            normalize: true,
            rescale: Rescale::Inverse,
        };
        let pool = SlabPool::default();
        pool.give(vec![0xAB; 3 << 20]);
        let mut j = job(
            &base,
            &[&m, &base],
            vec![p(0.7, 0.2, 0), p(0.3, 0.5, 1)],
            dare,
            n_per_row,
        );
        j.out_ty = GgmlType::Q8_0;
        j.slabs = Some(&pool);
        let mut streamed = Vec::new();
        let mut slabs = 0;
        let st = merge_tensor(&j, &mut |b| {
            streamed.extend_from_slice(&b);
            slabs += 1;
            Ok::<(), std::convert::Infallible>(())
        })
        .map_err(|_| "merge failed")
        .unwrap();
        assert!(slabs > 1, "{slabs} slab(s)");
        let mut whole = vec![0u8; streamed.len()];
        let st2 = merge_tensor_into(&j, &mut whole)
            .map_err(|_| "merge failed")
            .unwrap();
        assert_eq!(whole, streamed);
        assert_eq!(st, st2);
        let mut short = vec![0u8; streamed.len() - 34];
        assert!(merge_tensor_into(&j, &mut short).is_err());
    }

    #[test]
    fn output_does_not_depend_on_chunk_size() {
        let n_per_row = 96;
        let rows = 300;
        let base_v: Vec<f32> = (0..n_per_row * rows)
            .map(|i| ((i * 7919) % 211) as f32 * 0.01 - 1.0)
            .collect();
        let base = f32_bytes(&base_v);
        // Quantized-like deltas: few distinct magnitudes, so rank cuts fall inside ties.
        let a = f32_bytes(
            &base_v
                .iter()
                .enumerate()
                .map(|(i, b)| b + ((i % 7) as f32 - 3.0) * 0.01)
                .collect::<Vec<_>>(),
        );
        let b = f32_bytes(
            &base_v
                .iter()
                .enumerate()
                .map(|(i, b)| b + ((i % 5) as f32 - 2.0) * 0.01)
                .collect::<Vec<_>>(),
        );
        for method in [
            TIES,
            MethodSpec {
                sparsifier: Sparsifier::Outliers,
                consensus: false,
                normalize: false,
                ..TIES
            },
            MethodSpec {
                sparsifier: Sparsifier::Random,
                rescale: Rescale::L1,
                ..TIES
            },
            MethodSpec {
                sparsifier: Sparsifier::Della,
                rescale: Rescale::Inverse,
                ..TIES
            },
        ] {
            let params = vec![
                ModelParams {
                    weight: 0.6,
                    density: 0.3,
                    gamma: 0.05,
                    epsilon: 0.1,
                    stream: 0,
                },
                ModelParams {
                    weight: 0.4,
                    density: 0.3,
                    gamma: 0.05,
                    epsilon: 0.1,
                    stream: 1,
                },
            ];
            let mut reference = None;
            for chunk_elems in [n_per_row, 7 * n_per_row, DEFAULT_CHUNK_ELEMS] {
                let mut j = job(&base, &[&a, &b], params.clone(), method, n_per_row);
                j.chunk_elems = chunk_elems;
                let (out, _) = run(&j);
                match &reference {
                    None => reference = Some(out),
                    Some(r) => assert!(r == &out, "{method:?} chunk {chunk_elems}"),
                }
            }
        }
    }

    /// Weight-like values (a fixed pseudo-random pattern, scale ~0.05).
    fn weights(n: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = ((i * 7919 + salt * 104_729) % 10_007) as f32 / 10_007.0 - 0.5;
                let y = (((i + salt) * 31) % 101) as f32 / 101.0 - 0.5;
                (x + 0.5 * y) * 0.08
            })
            .collect()
    }

    /// `values` quantized to `ty` and decoded again.
    fn quantized(ty: GgmlType, values: &[f32], n_per_row: usize) -> (Vec<u8>, Vec<f32>) {
        let row = ty.row_bytes(n_per_row as u64).unwrap() as usize;
        let mut bytes = vec![0u8; row * values.len() / n_per_row];
        codec::quantize(ty, values, n_per_row as u64, &mut bytes, "t").unwrap();
        let mut decoded = vec![0f32; values.len()];
        codec::dequantize(ty, &bytes, &mut decoded, "t").unwrap();
        (bytes, decoded)
    }

    const TASK_ARITHMETIC: MethodSpec = MethodSpec {
        kind: Kind::TaskVector,
        sparsifier: Sparsifier::None,
        consensus: false,
        normalize: false,
        rescale: Rescale::None,
    };

    /// A job merging `model` (F32) into the quantized `base` (of `ty`) with weight 1, output in
    /// the base's type.
    fn grid_job<'a>(
        ty: GgmlType,
        base: &'a [u8],
        model: &'a [u8],
        n_per_row: usize,
        requant: Requant,
        seed: u64,
    ) -> TensorJob<'a> {
        let n_rows = model.len() / 4 / n_per_row;
        TensorJob {
            name: "blk.0.ffn_down.weight",
            n_per_row,
            n_rows,
            base: Some(InputTensor::new(base, ty, n_per_row as u64, "t").unwrap()),
            models: vec![ModelInput::Dense(
                InputTensor::new(model, GgmlType::F32, n_per_row as u64, "t").unwrap(),
            )],
            params: vec![p(1.0, 1.0, 0)],
            method: TASK_ARITHMETIC,
            lambda: 1.0,
            t: 0.5,
            seed,
            out_ty: ty,
            requant,
            chunk_elems: DEFAULT_CHUNK_ELEMS,
            output: JobOutput::Merged,
            measure: true,
            rows_done: None,
            slabs: None,
        }
    }

    fn merged_bytes(job: &TensorJob<'_>) -> (Vec<u8>, TensorStats) {
        let mut out = Vec::new();
        let st = merge_tensor(job, &mut |b| {
            out.extend_from_slice(&b);
            Ok::<(), std::convert::Infallible>(())
        })
        .map_err(|_| "merge failed")
        .unwrap();
        (out, st)
    }

    #[test]
    fn stochastic_rounding_keeps_a_small_delta_in_expectation_over_seeds() {
        // Every element moved by a tenth of its grid step towards the inside of its grid (so
        // never clamped at an extreme level; task arithmetic, weight 1): on the grid, nearest
        // rounding keeps none of it; stochastic rounding, averaged over seeds (each a
        // different Philox rounding stream), keeps all of it. Measured along the delta's
        // signs; bound: 6 σ of the mean of two-point draws (a gap² / 4 variance at most per
        // element), plus f32 rounding.
        const SEEDS: u64 = 300;
        for codec in &grid::GRIDS {
            let n_per_row = codec.block * 2;
            let (bytes, base) = quantized(codec.ty, &weights(n_per_row, 1), n_per_row);
            let mut delta = vec![0f32; n_per_row];
            let mut gaps = vec![0f64; n_per_row];
            for (k, block) in bytes.chunks_exact(codec.bytes).enumerate() {
                let mut groups = [grid::Affine::default(); 16];
                (codec.groups)(block, &mut groups[..codec.block / codec.group]);
                let mut codes = vec![0u8; codec.block];
                (codec.unpack)(block, &mut codes);
                for j in 0..codec.block {
                    let signed = groups[j / codec.group].step;
                    let step = f64::from(signed.abs());
                    let inwards = if usize::from(codes[j]) + 1 == codec.levels.count() {
                        -1.0
                    } else {
                        1.0
                    };
                    // IQ4's levels are 9–24 apart: the step between neighbours is larger.
                    let gap = match codec.levels {
                        grid::Levels::Uniform { .. } => step,
                        grid::Levels::Table(_) => 24.0 * step,
                    };
                    gaps[k * codec.block + j] = gap;
                    delta[k * codec.block + j] = 0.1 * signed * inwards;
                }
            }
            let model: Vec<f32> = base.iter().zip(&delta).map(|(b, d)| b + d).collect();
            let model = f32_bytes(&model);
            let mean_change = |requant, seeds: u64| {
                let mut sum = 0f64;
                for seed in 0..seeds {
                    let job = grid_job(codec.ty, &bytes, &model, n_per_row, requant, seed);
                    let (out, st) = merged_bytes(&job);
                    assert_eq!(st.grid.map(|g| g.fallback), Some(0), "{}", codec.ty);
                    let mut back = vec![0f32; n_per_row];
                    codec::dequantize(codec.ty, &out, &mut back, "t").unwrap();
                    sum += back
                        .iter()
                        .zip(&base)
                        .zip(&delta)
                        .map(|((x, b), d)| f64::from(x - b) * f64::from(d.signum()))
                        .sum::<f64>();
                }
                sum / seeds as f64
            };
            let want: f64 = delta.iter().map(|&d| f64::from(d.abs())).sum();
            let sigma =
                gaps.iter().map(|g| g * g / 4.0).sum::<f64>().sqrt() / (SEEDS as f64).sqrt();
            let stochastic = mean_change(Requant::GridStochastic, SEEDS);
            assert!(
                (stochastic - want).abs() <= 6.0 * sigma + 1e-3 * want.abs(),
                "{}: mean change {stochastic}, delta {want}, 6σ {}",
                codec.ty,
                6.0 * sigma
            );
            let nearest = mean_change(Requant::Grid, 1);
            assert!(
                nearest.abs() < 0.05 * want,
                "{}: nearest kept {nearest} of {want}",
                codec.ty
            );
        }
    }

    #[test]
    fn grid_output_does_not_depend_on_chunks_or_threads() {
        for ty in [GgmlType::Q4_K, GgmlType::Q4_1, GgmlType::IQ4_NL] {
            let (n_per_row, rows) = (512, 300);
            let (bytes, base) = quantized(ty, &weights(n_per_row * rows, 2), n_per_row);
            // A sparse delta: a third of the elements, some far beyond their block's range.
            let model: Vec<f32> = base
                .iter()
                .enumerate()
                .map(|(i, b)| match i % 3 {
                    0 if i % 997 == 0 => b + 1.0,
                    0 => b + 0.0005 * ((i % 13) as f32 - 6.0),
                    _ => *b,
                })
                .collect();
            let model = f32_bytes(&model);
            for requant in [Requant::Grid, Requant::GridStochastic] {
                let mut reference = None;
                for (chunk_elems, threads) in
                    [(n_per_row, 1), (7 * n_per_row, 2), (DEFAULT_CHUNK_ELEMS, 2)]
                {
                    let mut job = grid_job(ty, &bytes, &model, n_per_row, requant, 5);
                    job.chunk_elems = chunk_elems;
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let (out, st) = pool.install(|| merged_bytes(&job));
                    let g = st.grid.unwrap();
                    assert!(g.fallback > 0 && g.moved > 0 && g.kept == 0, "{ty}: {g:?}");
                    match &reference {
                        None => reference = Some((out, st)),
                        // (The report's float sums follow the chunks; the counts do not.)
                        Some(r) => assert!(
                            r.0 == out && r.1.grid == st.grid,
                            "{ty} {requant} {chunk_elems}"
                        ),
                    }
                }
            }
        }
    }

    #[test]
    fn grid_applies_only_to_the_base_type_and_unchanged_rows_keep_their_bytes() {
        let n_per_row = 256;
        let (bytes, base) = quantized(GgmlType::Q6_K, &weights(n_per_row * 8, 3), n_per_row);
        // Rows 2 and 5 change (one element each); the others are the base.
        let mut model = base.clone();
        model[2 * n_per_row + 17] += 0.01;
        model[5 * n_per_row + 200] -= 0.01;
        let model = f32_bytes(&model);
        let row = bytes.len() / 8;
        for requant in [Requant::Grid, Requant::GridStochastic] {
            let (out, st) = merged_bytes(&grid_job(
                GgmlType::Q6_K,
                &bytes,
                &model,
                n_per_row,
                requant,
                1,
            ));
            assert_eq!(
                st.grid,
                Some(GridCounts {
                    kept: 6,
                    moved: 2,
                    fallback: 0
                })
            );
            for r in [0, 1, 3, 4, 6, 7] {
                assert_eq!(out[r * row..(r + 1) * row], bytes[r * row..(r + 1) * row]);
            }
            assert_ne!(out[2 * row..3 * row], bytes[2 * row..3 * row]);
            // Another output type: quantized in full, no grid counts.
            let mut job = grid_job(GgmlType::Q6_K, &bytes, &model, n_per_row, requant, 1);
            job.out_ty = GgmlType::Q8_0;
            assert_eq!(merged_bytes(&job).1.grid, None);
        }
        let (_, st) = merged_bytes(&grid_job(
            GgmlType::Q6_K,
            &bytes,
            &model,
            n_per_row,
            Requant::Full,
            1,
        ));
        assert_eq!(st.grid, None);
    }
}
