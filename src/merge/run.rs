//! Running a [`MergePlan`]: every tensor computed by the engine (or copied) in plan order and
//! streamed to the output — a GGUF file, or safetensors with Hugging Face names — or, for the
//! runtime, handed over in memory ([`for_each_changed_tensor`]).
//!
//! Work and writing overlap: a writer thread takes finished slabs through a short queue while
//! the next ones are computed, and small consecutive tensors are computed together
//! (2 MiB of output at a time). Input rows the engine is done with leave the process's resident set
//! (inputs are memory-mapped), so memory follows the slab being merged, not the model size —
//! for safetensors output too: its writer pulls f32 slabs from the same queue instead of a
//! whole tensor in f32.

use std::borrow::Cow;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver};

use rayon::prelude::*;

use crate::format::gguf::{GgufWriter, TensorSpec};
use crate::format::output::Destination;
use crate::format::safetensors::{
    write_config_json, write_safetensors, ExportTensor, SafetensorsOptions,
};
use crate::format::source::SourceTensor;
use crate::format::GgmlType;
use crate::merge::engine::{
    self, Culprit, EngineError, InputTensor, MergeTensorError, ModelInput, SlabPool, SparseDelta,
    SparseMask, TensorJob, TensorStats, QUEUED_PARTS, WINDOW_BYTES,
};
use crate::merge::error::{MergeError, Result};
use crate::merge::input::MergeInput;
use crate::merge::method::Kind;
use crate::merge::plan::{MergePlan, PlannedTensor, SafetensorsLayout, TensorAction};
use crate::merge::report::{MergeReport, Totals};
use crate::progress::Progress;
use crate::quant::QuantError;
use crate::threads::with_threads;

/// How to write a plan's output.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Replace existing files beside the named output (`config.json`, shards).
    pub force: bool,
    /// Worker threads (`None`: all cores).
    pub threads: Option<usize>,
}

/// Runs `plan` and writes its output to `dest` (which must be of the plan's format). The
/// output appears only when complete ([`crate::format::output`]); on any error nothing is left.
pub fn write(
    plan: &MergePlan,
    dest: &Destination,
    opts: &RunOptions,
    progress: &dyn Progress,
    started: std::time::Instant,
) -> Result<MergeReport> {
    let inputs = plan.inputs.files();
    let mut totals = Totals::new(plan.models().len());
    let created_dir = dest.prepare(opts.force)?;
    progress.start(plan.output_bytes);
    let result = with_threads(opts.threads, || match &plan.safetensors {
        None => write_gguf(plan, &dest.file, &inputs, &mut totals, progress),
        Some(layout) => write_hf(
            plan,
            layout,
            dest,
            opts.force,
            &inputs,
            &mut totals,
            progress,
        ),
    });
    progress.finish();
    let output_bytes = result?;
    created_dir.keep();
    Ok(crate::merge::report::report(
        plan,
        totals,
        dest.clone(),
        output_bytes,
        started.elapsed().as_secs_f64(),
    ))
}

/// A message to the writer thread.
enum Msg<'p> {
    /// Bytes of the current tensor.
    Part(Cow<'p, [u8]>),
    /// The current tensor is complete.
    EndTensor,
}

/// Computes every tensor in plan order and sends its parts to `send`, `EndTensor` after each;
/// measurements go to `totals`. Consecutive small tensors are computed together.
fn compute_in_order<'p>(
    plan: &'p MergePlan,
    out_ty: impl Fn(&PlannedTensor) -> GgmlType + Sync,
    pool: Option<&SlabPool>,
    totals: &mut Totals,
    progress: &dyn Progress,
    send: &mut dyn FnMut(Msg<'p>) -> Result<()>,
) -> Result<()> {
    let n = plan.tensors.len();
    for window in tensor_windows(plan) {
        if window.len() == 1 {
            // Streamed slab by slab (a large tensor, or one alone).
            let idx = window.start;
            let t = &plan.tensors[idx];
            progress.tensor(&t.name, idx, n);
            let st = produce(plan, idx, out_ty(t), pool, &mut |bytes| {
                progress.advance(bytes.len() as u64);
                send(Msg::Part(bytes))
            })?;
            if let Some(st) = st {
                totals.add(&st, out_ty(t), t.base_ty);
            }
            send(Msg::EndTensor)?;
            // Every part sent was copied out of the maps, verbatim copies too.
            release_inputs(plan, &t.name);
            continue;
        }
        // Small tensors, computed together; results (and the first error) in plan order, so
        // output and report do not depend on scheduling.
        type Parts<'p> = Vec<Cow<'p, [u8]>>;
        let computed: Vec<Result<(Parts<'_>, Option<TensorStats>)>> = window
            .clone()
            .into_par_iter()
            .map(|idx| {
                let t = &plan.tensors[idx];
                let mut parts = Vec::new();
                let st = produce(plan, idx, out_ty(t), pool, &mut |b| {
                    parts.push(b);
                    Ok(())
                })?;
                Ok((parts, st))
            })
            .collect();
        for (idx, r) in window.zip(computed) {
            let t = &plan.tensors[idx];
            let (parts, st) = r?;
            progress.tensor(&t.name, idx, n);
            if let Some(st) = st {
                totals.add(&st, out_ty(t), t.base_ty);
            }
            for part in parts {
                progress.advance(part.len() as u64);
                send(Msg::Part(part))?;
            }
            send(Msg::EndTensor)?;
            release_inputs(plan, &t.name);
        }
    }
    Ok(())
}

/// The writer's error explains a stopped queue, so it wins over the compute side's
/// [`MergeError::WriterStopped`]; otherwise the compute error wins (the writer then refuses the
/// incomplete file, which is deleted).
fn first_error(computed: Result<()>, written: Result<u64>) -> Result<u64> {
    match (computed, written) {
        (Ok(()), w) => w,
        (Err(MergeError::WriterStopped), Err(w)) => Err(w),
        (Err(e), _) => Err(e),
    }
}

fn write_gguf(
    plan: &MergePlan,
    path: &Path,
    inputs: &[&Path],
    totals: &mut Totals,
    progress: &dyn Progress,
) -> Result<u64> {
    let specs: Vec<TensorSpec> = plan
        .tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            shape: t.shape.clone(),
            ty: t.out_ty,
        })
        .collect();
    let mut writer = GgufWriter::create(path, 3, &plan.metadata, &specs, inputs)?;
    let (tx, rx) = sync_channel::<Msg>(QUEUED_PARTS);
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
        let computed =
            compute_in_order(plan, |t| t.out_ty, Some(pool), totals, progress, &mut |m| {
                tx.send(m).map_err(|_| MergeError::WriterStopped)
            });
        drop(tx);
        let written = writing.join().unwrap_or(Err(MergeError::WriterStopped));
        first_error(computed, written)
    })
}

fn write_hf(
    plan: &MergePlan,
    layout: &SafetensorsLayout,
    dest: &Destination,
    force: bool,
    inputs: &[&Path],
    totals: &mut Totals,
    progress: &dyn Progress,
) -> Result<u64> {
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
        max_shard_bytes: layout.max_shard_bytes,
        path_is_named: !dest.is_dir,
        overwrite: force,
        ..Default::default()
    };
    let (tx, rx) = sync_channel::<Msg>(QUEUED_PARTS);
    let written = std::thread::scope(|scope| {
        // The writer pulls f32 slabs in order: from this queue, fed tensor by tensor below.
        let writing = scope.spawn(move || -> Result<u64> {
            let mut feed = F32Feed::new(rx);
            let out = write_safetensors(
                &dest.file,
                &layout.config,
                &export,
                &st_opts,
                inputs,
                |i, _first, buf: &mut [f32]| feed.fill(i, buf),
            )?;
            Ok(out.bytes)
        });
        let computed =
            compute_in_order(plan, |_| GgmlType::F32, None, totals, progress, &mut |m| {
                tx.send(m).map_err(|_| MergeError::WriterStopped)
            });
        drop(tx);
        let written = writing.join().unwrap_or(Err(MergeError::WriterStopped));
        first_error(computed, written)
    })?;
    write_config_json(&dest.dir, &layout.config, inputs, force)?;
    Ok(written)
}

/// The f32 values of the tensors, in order, as the safetensors writer asks for them: parts
/// arrive from the compute side through a queue, each tensor closed by `EndTensor`.
struct F32Feed<'p> {
    rx: Receiver<Msg<'p>>,
    /// The tensor being read.
    tensor: usize,
    /// The part being read, and how many of its bytes are used.
    part: Cow<'p, [u8]>,
    used: usize,
}

impl<'p> F32Feed<'p> {
    fn new(rx: Receiver<Msg<'p>>) -> F32Feed<'p> {
        F32Feed {
            rx,
            tensor: 0,
            part: Cow::Borrowed(&[]),
            used: 0,
        }
    }

    /// Fills `buf` with the next values of tensor `i` (requests come in order, and every
    /// value of a tensor is asked for before the next tensor's).
    fn fill(&mut self, i: usize, buf: &mut [f32]) -> Result<()> {
        while self.tensor < i {
            match self.rx.recv().map_err(|_| MergeError::WriterStopped)? {
                Msg::Part(_) => {}
                Msg::EndTensor => {
                    self.tensor += 1;
                    self.part = Cow::Borrowed(&[]);
                    self.used = 0;
                }
            }
        }
        let mut filled = 0;
        while filled < buf.len() {
            if self.used == self.part.len() {
                match self.rx.recv().map_err(|_| MergeError::WriterStopped)? {
                    Msg::Part(bytes) => {
                        self.part = bytes;
                        self.used = 0;
                    }
                    Msg::EndTensor => return Err(MergeError::WriterStopped),
                }
            }
            let k = ((self.part.len() - self.used) / 4).min(buf.len() - filled);
            let src = &self.part[self.used..self.used + 4 * k];
            for (v, b) in buf[filled..filled + k].iter_mut().zip(src.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            self.used += 4 * k;
            filled += k;
        }
        Ok(())
    }
}

/// What [`for_each_changed_tensor`]'s callback returns.
pub type TensorResult<E> = std::result::Result<(), E>;

/// Computes every tensor the plan changes (those not copied verbatim) in its output type and
/// hands it to `f`, in plan order, without writing a file: the runtime applies expert mixtures
/// this way. Tensors are computed concurrently (each also in parallel chunks), since nothing
/// has to be written in order: small tensors, whose few chunks cannot keep every core busy,
/// overlap. Holds every changed tensor's bytes until `f` has seen them (the runtime caches
/// them anyway).
pub fn for_each_changed_tensor<E: From<MergeError> + Send>(
    plan: &MergePlan,
    threads: Option<usize>,
    f: &mut (dyn FnMut(&PlannedTensor, Vec<u8>) -> TensorResult<E> + Send),
) -> std::result::Result<(), E> {
    let changed: Vec<usize> = (0..plan.tensors.len())
        .filter(|&i| plan.tensors[i].action != TensorAction::Copy)
        .collect();
    let computed: Vec<Vec<u8>> = with_threads(threads, || {
        changed
            .par_iter()
            .map(|&idx| produce_whole(plan, idx))
            .collect::<Result<_>>()
    })?;
    for (idx, bytes) in changed.into_iter().zip(computed) {
        f(&plan.tensors[idx], bytes)?;
    }
    Ok(())
}

/// The plan's tensors in order, grouped into windows of consecutive tensors whose outputs add
/// up to at most [`WINDOW_BYTES`]; a larger tensor is a window of its own.
///
/// A window's tensors are computed concurrently and its outputs held until written: each
/// tensor alone is split into parallel chunks, but a small one (SmolLM2's 576×192 attention
/// projections are 4 chunks) cannot keep every core busy, and each tensor would otherwise end
/// in a wait for its slowest chunk. Holding a window costs at most [`WINDOW_BYTES`].
fn tensor_windows(plan: &MergePlan) -> Vec<std::ops::Range<usize>> {
    let mut windows = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, t) in plan.tensors.iter().enumerate() {
        if i > start && bytes.saturating_add(t.out_bytes) > WINDOW_BYTES {
            windows.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes = bytes.saturating_add(t.out_bytes);
    }
    if start < plan.tensors.len() {
        windows.push(start..plan.tensors.len());
    }
    windows
}

/// Hints to every input that tensor `name` is done, so mapped inputs drop its pages from the
/// process's resident set: a merge's RSS then follows the tensor being merged, not the inputs'
/// total size.
fn release_inputs(plan: &MergePlan, name: &str) {
    plan.reference().release(name, 0..usize::MAX);
    for m in plan.models() {
        m.release(name);
    }
}

/// The merge error for an engine error on tensor `t`: the input it names, or — when the
/// merged values themselves overflow — the parameters that made them.
fn engine_error(plan: &MergePlan, t: &PlannedTensor, e: EngineError) -> MergeError {
    match e.culprit {
        Culprit::Result => {
            let weights = plan
                .models()
                .iter()
                .zip(&t.params)
                .map(|(m, p)| format!("{:?} for {}", p.weight, m.path().display()))
                .collect::<Vec<_>>()
                .join(", ");
            let what = match &e.source {
                QuantError::NonFinite { index, value, .. } => {
                    format!("merged element {index} is {value}")
                }
                QuantError::OutOfRange { ty, max, .. } => {
                    format!("merged values reach {max:e}, more than {ty} can store")
                }
                other => other.to_string(),
            };
            MergeError::Overflow {
                tensor: t.name.clone(),
                what,
                weights,
                lambda: t.lambda,
            }
        }
        Culprit::Base => MergeError::Tensor {
            path: plan.reference().path().to_path_buf(),
            source: e.source,
        },
        Culprit::Model(i) => MergeError::Tensor {
            path: plan.models()[i].path().to_path_buf(),
            source: e.source,
        },
    }
}

/// Output tensor `idx` of the plan as one buffer of its output type (computed in place).
fn produce_whole(plan: &MergePlan, idx: usize) -> Result<Vec<u8>> {
    let t = &plan.tensors[idx];
    let mut out = Vec::new();
    produce_into(plan, idx, t.out_ty, Sink::Whole(&mut out))?;
    Ok(out)
}

/// Output tensor `idx` of the plan as `out_ty` bytes, handed to `write` in order (computed
/// parts owned — from `pool` if given —, verbatim copies borrowed from the base's map);
/// the engine's measurements for a merged tensor (`None` for a copy).
fn produce<'p>(
    plan: &'p MergePlan,
    idx: usize,
    out_ty: GgmlType,
    pool: Option<&SlabPool>,
    write: &mut dyn FnMut(Cow<'p, [u8]>) -> Result<()>,
) -> Result<Option<TensorStats>> {
    produce_into(plan, idx, out_ty, Sink::Parts(pool, write))
}

/// Where [`produce_into`] puts a tensor's bytes.
enum Sink<'s, 'p> {
    /// Handed over in order, part by part (slabs from the pool, if any).
    Parts(
        Option<&'s SlabPool>,
        &'s mut dyn FnMut(Cow<'p, [u8]>) -> Result<()>,
    ),
    /// The whole tensor in one buffer, computed in place (no measurements: the runtime).
    Whole(&'s mut Vec<u8>),
}

fn produce_into<'p>(
    plan: &'p MergePlan,
    idx: usize,
    out_ty: GgmlType,
    sink: Sink<'_, 'p>,
) -> Result<Option<TensorStats>> {
    let t = &plan.tensors[idx];
    let reference = plan.reference();
    let base = reference
        .tensor(&t.name)?
        .ok_or_else(|| MergeError::Vanished {
            path: reference.path().to_path_buf(),
            tensor: t.name.clone(),
        })?;
    let base_err = |source| MergeError::Tensor {
        path: reference.path().to_path_buf(),
        source,
    };
    // Sizes were checked when planned: the output type's size of the plan's shape.
    let out_bytes = if out_ty == t.out_ty {
        t.out_bytes
    } else {
        crate::format::nbytes(&t.shape, out_ty).map_err(|e| MergeError::Size {
            tensor: t.name.clone(),
            ty: out_ty.to_string(),
            reason: e.to_string(),
        })?
    } as usize;
    match (t.action.clone(), sink) {
        (TensorAction::Copy, Sink::Parts(_, write)) if out_ty == base.ty => {
            write(base.data).map(|()| None)
        }
        (TensorAction::Copy, Sink::Whole(buf)) if out_ty == base.ty => {
            *buf = base.data.into_owned();
            Ok(None)
        }
        (TensorAction::Copy | TensorAction::Requantize, sink) => {
            let mut out = vec![0u8; out_bytes];
            crate::quant::convert(
                base.ty,
                &base.data,
                out_ty,
                &mut out,
                t.n_per_row(),
                &t.name,
            )
            .map_err(base_err)?;
            match sink {
                Sink::Parts(_, write) => write(Cow::Owned(out))?,
                Sink::Whole(buf) => *buf = out,
            }
            Ok(None)
        }
        (TensorAction::Merge, sink) => merge_one(plan, t, &base, out_ty, out_bytes, sink).map(Some),
    }
}

/// Merges tensor `t` (its base data `base`) into `sink` as `out_ty` (`out_bytes` bytes).
fn merge_one<'p>(
    plan: &'p MergePlan,
    t: &PlannedTensor,
    base: &SourceTensor<'_>,
    out_ty: GgmlType,
    out_bytes: usize,
    sink: Sink<'_, 'p>,
) -> Result<TensorStats> {
    let models = plan.models();
    let dense: Vec<Option<SourceTensor<'_>>> = models
        .iter()
        .map(|m| match m {
            MergeInput::Model(m) => {
                m.tensor(&t.name)?
                    .map(Some)
                    .ok_or_else(|| MergeError::Vanished {
                        path: m.path().to_path_buf(),
                        tensor: t.name.clone(),
                    })
            }
            MergeInput::Sparse(_) => Ok(None),
        })
        .collect::<Result<_>>()?;
    let empty = SparseDelta {
        values: &[],
        values_ty: GgmlType::F32,
        mask: SparseMask::Indices(&[]),
    };
    let n_per_row = t.n_per_row();
    fn input<'x>(
        path: &Path,
        x: &'x SourceTensor<'_>,
        n_per_row: u64,
        name: &str,
    ) -> Result<InputTensor<'x>> {
        InputTensor::new(&x.data, x.ty, n_per_row, name).map_err(|source| MergeError::Tensor {
            path: path.to_path_buf(),
            source,
        })
    }
    let mut inputs: Vec<ModelInput<'_>> = Vec::with_capacity(models.len());
    for (m, d) in models.iter().zip(&dense) {
        inputs.push(match (m, d) {
            (_, Some(x)) => ModelInput::Dense(input(m.path(), x, n_per_row, &t.name)?),
            (MergeInput::Sparse(p), None) => ModelInput::Sparse(p.sparse(&t.name).unwrap_or(empty)),
            // Dense inputs were all read just above.
            (MergeInput::Model(_), None) => ModelInput::Sparse(empty),
        });
    }
    let base_input = input(plan.reference().path(), base, n_per_row, &t.name)?;
    let linear = plan.method.kind == Kind::Linear;
    // Rows the engine is done with leave the process's resident set (inputs are
    // memory-mapped): RSS follows the slab being merged, even for a huge embedding.
    let dense_rows: Vec<Option<usize>> = inputs
        .iter()
        .map(|i| match i {
            ModelInput::Dense(x) => Some(x.row_bytes),
            ModelInput::Sparse(_) => None,
        })
        .collect();
    let reference = plan.reference();
    let rows_done = |rows: std::ops::Range<usize>| {
        let bytes = |row: usize| rows.start * row..rows.end * row;
        reference.release(&t.name, bytes(base_input.row_bytes));
        for (m, row) in models.iter().zip(&dense_rows) {
            if let (MergeInput::Model(m), Some(row)) = (m, row) {
                m.release(&t.name, bytes(*row));
            }
        }
    };
    let (measure, slabs) = match &sink {
        Sink::Parts(pool, _) => (true, *pool),
        Sink::Whole(_) => (false, None),
    };
    let job = TensorJob {
        name: &t.name,
        n_per_row: n_per_row as usize,
        n_rows: t.n_rows() as usize,
        base: (!linear).then_some(base_input),
        models: inputs,
        params: t.params.clone(),
        method: plan.method,
        lambda: t.lambda,
        t: t.t,
        seed: plan.seed,
        out_ty,
        requant: plan.requant,
        chunk_elems: engine::DEFAULT_CHUNK_ELEMS,
        output: engine::JobOutput::Merged,
        measure,
        rows_done: Some(&rows_done),
        slabs,
    };
    match sink {
        Sink::Whole(buf) => {
            // Zeroed pages come from the kernel lazily; every byte is then computed.
            *buf = vec![0u8; out_bytes];
            engine::merge_tensor_into(&job, buf).map_err(|e| engine_error(plan, t, e))
        }
        Sink::Parts(_, write) => engine::merge_tensor(&job, &mut |bytes| write(Cow::Owned(bytes)))
            .map_err(|e| match e {
                MergeTensorError::Write(e) => e,
                MergeTensorError::Engine(e) => engine_error(plan, t, e),
            }),
    }
}
