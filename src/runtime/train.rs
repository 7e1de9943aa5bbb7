//! Full fine-tuning of a loaded [`Model`] with llama.cpp's training API (AdamW), as llama.cpp's
//! own `examples/training/finetune.cpp` does it: every F32 weight except the token embedding is
//! trained (llama.cpp leaves `token_embd.weight` frozen), next-token cross-entropy over windows
//! of `n_ctx` tokens taken every `stride` tokens of the text.
//!
//! - [`train`] — trains the model in place; [`TrainOptions`] says how, [`TrainEvent`]s report
//!   progress (the plan, every optimizer step, every epoch) to a callback, and the
//!   [`TrainReport`] holds loss and accuracy per epoch, training and validation.
//! - [`save`] — `llama_model_save_to_file`. Its writer drops the metadata llama.cpp does not
//!   model (chat template, `general.*`) and records the training context as
//!   `context_length`, so `flows::finetune` rewraps its tensors in the base's file.
//! - [`TrainError`] — what can go wrong beyond loading and decoding (inside
//!   [`RuntimeError::Train`]).
//!
//! What [`train`] does, each step the llama.cpp call `finetune.cpp` makes:
//! 0. refuses architectures whose graph ggml cannot differentiate ([`check_trainable`]: Gemma's
//!    GEGLU, GELU models), because llama.cpp aborts the process on them;
//! 1. checks that every weight is F32 (llama.cpp silently skips other types as parameters);
//!    the model must have been loaded without mmap, as [`Model::load`] does (training writes
//!    the weights in place);
//! 2. creates a context with `n_batch = n_ubatch = n_ctx`, F32 KV cache and flash attention off
//!    (no backward pass for F16 `OUT_PROD` or `FLASH_ATTN_EXT`); with `n_ubatch == n_ctx` the K
//!    and V projections receive gradients too. llama.cpp pads `n_ctx` to a multiple of 256, so
//!    [`TrainOptions::n_ctx`] is rounded up to one;
//! 3. tokenizes the text as `common_tokenize(ctx, text, add_special = true)` and builds the
//!    dataset of `common_opt_dataset_init(ctx, tokens, stride)`, reimplemented here (it is not
//!    in the bindings): `(n_tokens - n_ctx - 1) / stride` windows, labels shifted by one token;
//! 4. decodes one token: llama.cpp's training path (`llama_opt_epoch` → `ggml_opt_eval`) never
//!    hands the context's thread count to the CPU backend — only `llama_decode` does — so
//!    training would otherwise run on ggml's default of 4 threads whatever was asked (on 2
//!    cores: spinning in `ggml_barrier`, 4–6× slower). Every training step clears the memory, so
//!    this leaves nothing behind (losses and weights are bit-identical either way);
//! 5. `llama_opt_init` (AdamW, constant learning rate as `common_opt_lr_pars` gives without
//!    decay), then per epoch `llama_opt_epoch` over the first `(1 - val_split) · n` windows for
//!    training, the rest evaluated only; windows in file order, no shuffling. For fixed inputs
//!    and one thread the result is deterministic.
//!
//! `llama_opt_init` also sets the model's training context (`n_ctx_train`) to the training
//! context's size, so after [`train`] a [`SessionOptions`](super::SessionOptions) with
//! `n_ctx: 0` means that size.
//!
//! ```no_run
//! use ggmerge::runtime::train::{self, TrainEvent, TrainOptions};
//! use ggmerge::runtime::{Model, ModelOptions};
//!
//! let load = ModelOptions { repack: false, ..Default::default() };
//! let mut model = Model::load("base-f32.gguf", &load)?;
//! let text = std::fs::read_to_string("train.txt")?;
//! let opts = TrainOptions { lr: 1e-4, epochs: 3, ..Default::default() };
//! let report = train::train(&mut model, &text, &opts, &mut |e| {
//!     if let TrainEvent::Epoch(r) = e {
//!         println!("epoch {}: loss {:.3}", r.epoch, r.train.loss);
//!     }
//! })?;
//! train::save(&model, "trained.llama.gguf".as_ref())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::any::Any;
use std::cell::Cell;
use std::ffi::c_void;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::time::Instant;

use llama_cpp_sys_2 as sys;

use super::backend;
use super::context::{Batch, Context};
use super::error::{Result, RuntimeError};
use super::model::{default_threads, path_cstring, Model, Token};
use crate::format::GgmlType;

/// llama.cpp pads every context to a multiple of this many tokens.
pub const CTX_PADDING: u32 = 256;

/// The largest training context accepted (tokens).
pub const MAX_CTX: u32 = 1 << 20;

/// How to train.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOptions {
    /// AdamW learning rate of the first epoch (> 0). A pretrained model wants about 5e-5; a
    /// randomly initialised one far more (1e-3 …).
    pub lr: f32,
    /// Learning rate of the last epoch (> 0, ≤ `lr`): the rate decays exponentially, epoch by
    /// epoch, from `lr` to it ([`TrainOptions::lr_at`]); `None` keeps `lr` constant (as
    /// llama.cpp's `finetune` without `-lr-min`).
    pub lr_min: Option<f32>,
    /// AdamW weight decay (≥ 0).
    pub weight_decay: f32,
    /// Passes over the training sequences (≥ 1).
    pub epochs: usize,
    /// Tokens per training sequence, rounded up to a multiple of [`CTX_PADDING`] as llama.cpp
    /// pads contexts ([`TrainOptions::padded_ctx`]); 1 ..= [`MAX_CTX`].
    pub n_ctx: u32,
    /// Tokens between the starts of two sequences (≥ 1); `None`: half the context, as
    /// llama.cpp's `finetune`.
    pub stride: Option<usize>,
    /// Fraction of the sequences (the last ones) evaluated, not trained on, in [0, 1).
    pub val_split: f32,
    /// CPU threads (all cores when `None`).
    pub threads: Option<usize>,
}

impl Default for TrainOptions {
    /// llama.cpp `finetune`'s defaults where it has them (validation split 0.05, stride half
    /// the context), a learning rate for a pretrained model, two epochs, 256-token sequences.
    fn default() -> TrainOptions {
        TrainOptions {
            lr: 5e-5,
            lr_min: None,
            weight_decay: 0.0,
            epochs: 2,
            n_ctx: 256,
            stride: None,
            val_split: 0.05,
            threads: None,
        }
    }
}

impl TrainOptions {
    /// Checks the options without a model, so a command can refuse bad arguments before it
    /// spends seconds loading one.
    pub fn validate(&self) -> Result<()> {
        let invalid = |m: String| Err(RuntimeError::Invalid(m));
        if !self.lr.is_finite() || self.lr <= 0.0 {
            return invalid(format!(
                "learning rate {}: must be a positive number",
                self.lr
            ));
        }
        if let Some(min) = self.lr_min {
            if !min.is_finite() || min <= 0.0 || min > self.lr {
                return invalid(format!(
                    "minimum learning rate {min}: must be a positive number ≤ the learning rate {}",
                    self.lr
                ));
            }
        }
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return invalid(format!(
                "weight decay {}: must be a number ≥ 0",
                self.weight_decay
            ));
        }
        if self.epochs == 0 {
            return invalid("epochs: at least 1".into());
        }
        if self.n_ctx == 0 || self.n_ctx > MAX_CTX {
            return invalid(format!(
                "training context {}: out of range (1 ..= {MAX_CTX})",
                self.n_ctx
            ));
        }
        if self.stride == Some(0) {
            return invalid("stride: at least 1 token".into());
        }
        if !(0.0..1.0).contains(&self.val_split) {
            return invalid(format!(
                "validation split {}: must be in [0, 1)",
                self.val_split
            ));
        }
        default_threads(self.threads)?;
        Ok(())
    }

    /// The learning rate of `epoch` (1-based): `lr` for the first, `lr_min` for the last, the
    /// ratio between consecutive epochs constant in between (`lr` throughout without `lr_min`).
    pub fn lr_at(&self, epoch: usize) -> f32 {
        match self.lr_min {
            Some(min) if self.epochs > 1 => {
                let t = (epoch.clamp(1, self.epochs) - 1) as f64 / (self.epochs - 1) as f64;
                let (lr, min) = (f64::from(self.lr), f64::from(min));
                (lr * (min / lr).powf(t)) as f32
            }
            _ => self.lr,
        }
    }

    /// [`TrainOptions::n_ctx`] rounded up to a multiple of [`CTX_PADDING`]: the context
    /// llama.cpp trains with.
    pub fn padded_ctx(&self) -> u32 {
        self.n_ctx.div_ceil(CTX_PADDING) * CTX_PADDING
    }
}

/// What a run will do, known once the text is tokenized (sent as [`TrainEvent::Start`] and kept
/// in the [`TrainReport`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainPlan {
    /// Tokens of the text (BOS included when the model adds one).
    pub text_tokens: usize,
    /// The context asked for ([`TrainOptions::n_ctx`]).
    pub n_ctx_requested: u32,
    /// Tokens per training sequence: the context llama.cpp uses, after padding.
    pub n_ctx: usize,
    /// Tokens between the starts of two sequences.
    pub stride: usize,
    /// Sequences in the dataset.
    pub sequences: usize,
    /// Sequences trained on (the first ones).
    pub train_sequences: usize,
    /// Sequences only evaluated (the last ones).
    pub val_sequences: usize,
    /// AdamW learning rate (of the first epoch).
    pub lr: f32,
    /// Learning rate of the last epoch, when it decays.
    pub lr_min: Option<f32>,
    /// AdamW weight decay.
    pub weight_decay: f32,
    /// Passes over the training sequences.
    pub epochs: usize,
    /// CPU threads.
    pub threads: usize,
}

/// Loss and next-token accuracy accumulated over part of an epoch (`ggml_opt_result_*`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainStats {
    /// Mean cross-entropy per sequence's tokens, in nats.
    pub loss: f64,
    /// Standard error of [`TrainStats::loss`]; `None` until two sequences are in.
    pub loss_unc: Option<f64>,
    /// Share of tokens whose most likely next token was the right one.
    pub accuracy: f64,
    /// Standard error of [`TrainStats::accuracy`]; `None` until two tokens are in.
    pub accuracy_unc: Option<f64>,
    /// Next-token predictions scored.
    pub tokens: u64,
}

/// Training (optimizer steps) or validation (evaluation only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Sequences trained on.
    Train,
    /// Sequences only evaluated.
    Validation,
}

/// After one optimizer step (training) or one evaluated sequence (validation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepProgress {
    /// The epoch (1-based).
    pub epoch: usize,
    /// Epochs in the run.
    pub epochs: usize,
    /// Training or validation.
    pub phase: Phase,
    /// Steps of this phase done in this epoch (1-based).
    pub step: u64,
    /// Steps of this phase per epoch.
    pub steps: u64,
    /// This phase of this epoch so far.
    pub stats: TrainStats,
    /// Mean wall time per step of this phase so far, seconds.
    pub secs_per_step: f64,
    /// Estimated seconds left in this phase of this epoch.
    pub eta_secs: f64,
}

/// One epoch's results.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochReport {
    /// The epoch (1-based).
    pub epoch: usize,
    /// The learning rate it trained with.
    pub lr: f32,
    /// Over the training sequences (measured while training).
    pub train: TrainStats,
    /// Over the validation sequences; `None` without any.
    pub val: Option<TrainStats>,
    /// Wall time of the epoch, seconds.
    pub secs: f64,
    /// Mean wall time per training step, seconds.
    pub secs_per_step: f64,
}

/// Progress of [`train`], in order: one `Start`, then per epoch its `Step`s (training, then
/// validation), one `Epoch` and one `Trained`.
#[derive(Clone, Copy, Debug)]
pub enum TrainEvent<'a> {
    /// The text is tokenized and the model about to be trained.
    Start(&'a TrainPlan),
    /// An optimizer step, or a validation sequence, is done.
    Step(&'a StepProgress),
    /// An epoch is done.
    Epoch(&'a EpochReport),
    /// The weights after an epoch, to read (score questions with a [`super::Session`] of the
    /// model, as `ggmerge finetune --eval` does); training goes on when the handler returns.
    Trained {
        /// The epoch just done (1-based).
        epoch: usize,
        /// The model being trained.
        model: &'a Model,
    },
}

/// What [`train`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainReport {
    /// The run's sizes and settings.
    pub plan: TrainPlan,
    /// Per epoch, in order.
    pub epochs: Vec<EpochReport>,
    /// Wall time of the epochs (not the setup), seconds.
    pub secs: f64,
}

impl TrainReport {
    /// Mean wall time per training step over all epochs, seconds.
    pub fn secs_per_step(&self) -> f64 {
        self.epochs.iter().map(|e| e.secs_per_step).sum::<f64>() / self.epochs.len().max(1) as f64
    }
}

/// Training failures beyond loading and decoding (carried by [`RuntimeError::Train`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// Some weights are not F32: llama.cpp would silently leave them untrained.
    #[error(
        "{}: training needs every weight in F32; {not_f32} of {total} tensors are not (e.g. \
         {example}, {ty}). Make an F32 copy first: ggmerge quantize {} MODEL-f32.gguf F32",
        path.display(),
        path.display()
    )]
    NotF32 {
        /// The model file.
        path: PathBuf,
        /// Tensors that are not F32.
        not_f32: usize,
        /// Tensors in all.
        total: usize,
        /// The first tensor that is not F32.
        example: String,
        /// Its type.
        ty: String,
    },
    /// The architecture's graph uses an operation ggml cannot differentiate: llama.cpp would
    /// abort the process inside its first training step.
    #[error(
        "{}: {arch} models cannot be fine-tuned with llama.cpp's training API: {reason}. \
         Fine-tune it with another trainer (e.g. PyTorch) and use the result with `extract`, \
         `merge` and `run`; llama-architecture models (llama, mistral, qwen2, SmolLM2 …) train",
        path.display()
    )]
    UnsupportedArchitecture {
        /// The model file.
        path: PathBuf,
        /// `general.architecture`.
        arch: String,
        /// What in its graph has no backward pass.
        reason: &'static str,
    },
    /// The text is too short for one sequence.
    #[error(
        "the text has {tokens} tokens: one training sequence needs at least {needed} (context \
         {n_ctx} + 1 + stride {stride}); give more text or a smaller context"
    )]
    TooLittleText {
        /// Tokens of the text.
        tokens: usize,
        /// Tokens needed.
        needed: usize,
        /// The training context.
        n_ctx: usize,
        /// The stride.
        stride: usize,
    },
    /// The validation split leaves no sequence to train on.
    #[error(
        "{sequences} sequence(s) of {n_ctx} tokens with validation split {val_split} leave none \
         to train on; give more text or a validation split of 0"
    )]
    NothingToTrain {
        /// Sequences in the dataset.
        sequences: usize,
        /// The training context.
        n_ctx: usize,
        /// The validation split.
        val_split: f32,
    },
    /// ggml could not create an optimizer object.
    #[error("ggml could not create {what}")]
    Alloc {
        /// `the dataset`, `a result`.
        what: &'static str,
    },
    /// `llama_model_save_to_file` failed (it logged an error, or wrote nothing).
    #[error("{}: llama.cpp could not save the model{}", path.display(), suffix(detail))]
    Save {
        /// Where it was asked to write.
        path: PathBuf,
        /// llama.cpp's last error message, if it logged one.
        detail: String,
    },
}

/// `": detail"`, or nothing for an empty detail.
fn suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl From<TrainError> for RuntimeError {
    fn from(e: TrainError) -> RuntimeError {
        RuntimeError::Train(Box::new(e))
    }
}

// ---------------------------------------------------------------------------------------------
// Owning wrappers of the ggml-opt objects (the model and context are the runtime's own).

/// A `ggml_opt_dataset` of I32 token windows and next-token labels; freed on drop.
struct Dataset {
    raw: NonNull<sys::ggml_opt_dataset>,
    ndata: usize,
}

impl Drop for Dataset {
    fn drop(&mut self) {
        // SAFETY: the pointer came from ggml_opt_dataset_init and is freed once, here.
        unsafe { sys::ggml_opt_dataset_free(self.raw.as_ptr()) }
    }
}

impl Dataset {
    /// `common_opt_dataset_init`: window `i` is `tokens[i·stride ..][..n_ctx]`, its labels the
    /// same window shifted by one token. Like llama.cpp, `(n_tokens - n_ctx - 1) / stride`
    /// windows (the formula leaves out the last window that would still fit).
    fn from_tokens(tokens: &[Token], n_ctx: usize, stride: usize) -> Result<Dataset> {
        let ndata = tokens.len().saturating_sub(n_ctx + 1) / stride;
        if ndata == 0 {
            return Err(TrainError::TooLittleText {
                tokens: tokens.len(),
                needed: n_ctx + 1 + stride,
                n_ctx,
                stride,
            }
            .into());
        }
        let too_big = || RuntimeError::Invalid(format!("{ndata} sequences of {n_ctx} tokens"));
        let ne = i64::try_from(n_ctx).map_err(|_| too_big())?;
        let nd = i64::try_from(ndata).map_err(|_| too_big())?;
        let total = n_ctx.checked_mul(ndata).ok_or_else(too_big)?;
        // SAFETY: plain sizes (positive); ggml allocates the data and labels tensors (ne × nd
        // I32 each) in its own CPU context, aborting on allocation failure. Shard size 1 as
        // llama.cpp.
        let raw = unsafe {
            sys::ggml_opt_dataset_init(sys::GGML_TYPE_I32, sys::GGML_TYPE_I32, ne, ne, nd, 1)
        };
        let raw = NonNull::new(raw).ok_or(TrainError::Alloc {
            what: "the dataset",
        })?;
        let ds = Dataset { raw, ndata };
        // SAFETY: the dataset is alive; its data and labels tensors are contiguous I32 tensors
        // of shape [n_ctx, ndata] allocated in host memory (ggml_opt_dataset_init uses a CPU
        // buffer), so each points to `total` i32, written only through these slices while
        // nothing else accesses the dataset. Null pointers are checked first.
        let (data, labels) = unsafe {
            let d = sys::ggml_opt_dataset_data(ds.raw.as_ptr());
            let l = sys::ggml_opt_dataset_labels(ds.raw.as_ptr());
            if d.is_null() || l.is_null() || (*d).data.is_null() || (*l).data.is_null() {
                return Err(TrainError::Alloc {
                    what: "the dataset's buffers",
                }
                .into());
            }
            (
                std::slice::from_raw_parts_mut((*d).data.cast::<i32>(), total),
                std::slice::from_raw_parts_mut((*l).data.cast::<i32>(), total),
            )
        };
        for i in 0..ndata {
            let s = i * stride;
            data[i * n_ctx..][..n_ctx].copy_from_slice(&tokens[s..s + n_ctx]);
            labels[i * n_ctx..][..n_ctx].copy_from_slice(&tokens[s + 1..s + 1 + n_ctx]);
        }
        Ok(ds)
    }
}

/// A `ggml_opt_result` (loss and accuracy accumulated over an epoch); freed on drop.
struct OptResult(NonNull<sys::ggml_opt_result>);

impl Drop for OptResult {
    fn drop(&mut self) {
        // SAFETY: the pointer came from ggml_opt_result_init and is freed once, here.
        unsafe { sys::ggml_opt_result_free(self.0.as_ptr()) }
    }
}

impl OptResult {
    fn new() -> Result<OptResult> {
        // SAFETY: no arguments; returns a new result or null.
        let raw = unsafe { sys::ggml_opt_result_init() };
        NonNull::new(raw)
            .map(OptResult)
            .ok_or_else(|| TrainError::Alloc { what: "a result" }.into())
    }

    fn reset(&mut self) {
        // SAFETY: the result is alive and not in use by an epoch (we hold `&mut`).
        unsafe { sys::ggml_opt_result_reset(self.0.as_ptr()) }
    }

    fn stats(&self) -> TrainStats {
        // SAFETY: the result is alive.
        unsafe { stats_of(self.0.as_ptr()) }
    }
}

/// The stats accumulated in `r`.
///
/// # Safety
/// `r` must be a live `ggml_opt_result`.
unsafe fn stats_of(r: sys::ggml_opt_result_t) -> TrainStats {
    let (mut loss, mut loss_unc, mut accuracy, mut acc_unc, mut ndata) =
        (0f64, 0f64, 0f64, 0f64, 0i64);
    // SAFETY: `r` is live (caller); each function writes one value through each pointer, all
    // pointing to locals. The uncertainty pointers must not be null: with no batches
    // ggml_opt_result_loss writes NaN through `unc` unconditionally.
    unsafe {
        sys::ggml_opt_result_loss(r, &mut loss, &mut loss_unc);
        sys::ggml_opt_result_accuracy(r, &mut accuracy, &mut acc_unc);
        sys::ggml_opt_result_ndata(r, &mut ndata);
    }
    TrainStats {
        loss,
        loss_unc: loss_unc.is_finite().then_some(loss_unc),
        accuracy,
        accuracy_unc: acc_unc.is_finite().then_some(acc_unc),
        tokens: ndata.max(0) as u64,
    }
}

// ---------------------------------------------------------------------------------------------
// Callbacks handed to llama.cpp.

/// Optimizer parameters read by [`opt_pars`] before every optimizer step; `lr` is set between
/// epochs (never while llama.cpp runs, on the thread that runs it).
#[repr(C)]
struct LrPars {
    lr: Cell<f32>,
    wd: f32,
}

/// `ggml_opt_get_optimizer_params`: ggml's AdamW defaults (β1 0.9, β2 0.999, ε 1e-8) with our
/// learning rate and weight decay, as `common_opt_lr_pars` without decay.
unsafe extern "C" fn opt_pars(ud: *mut c_void) -> sys::ggml_opt_optimizer_params {
    // SAFETY: ggml_opt_get_default_optimizer_params ignores its argument.
    let mut p = unsafe { sys::ggml_opt_get_default_optimizer_params(std::ptr::null_mut()) };
    // A panic must not unwind into C (nothing here can panic; the guard is the rule).
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `ud` is the `LrPars` handed to llama_opt_init, alive (on `train`'s stack)
        // until the context that calls this is freed; llama.cpp calls this on the thread that
        // called llama_opt_epoch, and `train` writes `lr` only between those calls.
        if let Some(lr) = unsafe { ud.cast::<LrPars>().as_ref() } {
            p.adamw.alpha = lr.lr.get();
            p.adamw.wd = lr.wd;
            p.sgd.alpha = lr.lr.get();
            p.sgd.wd = lr.wd;
        }
    }));
    p
}

/// Where [`on_step`] sends its events: `llama_opt_epoch`'s callback has no user-data pointer,
/// so the sink of the epoch running on this thread is found through a thread-local (llama.cpp
/// calls it on the thread that called `llama_opt_epoch`).
struct StepSink<'a> {
    epoch: usize,
    epochs: usize,
    on_event: &'a mut dyn FnMut(TrainEvent<'_>),
    /// Mean seconds per training step of the current epoch so far.
    train_secs_per_step: f64,
    /// A panic of `on_event`, resumed once llama.cpp has returned.
    panic: Option<Box<dyn Any + Send>>,
}

thread_local! {
    /// The [`StepSink`] of the `llama_opt_epoch` call running on this thread, or null.
    static SINK: Cell<*mut c_void> = const { Cell::new(std::ptr::null_mut()) };
}

/// Installs a sink for the duration of one `llama_opt_epoch` call; restores the previous one
/// (normally null) on drop.
struct SinkGuard(*mut c_void);

impl SinkGuard {
    fn install(sink: *mut StepSink<'_>) -> SinkGuard {
        SinkGuard(SINK.with(|s| s.replace(sink.cast())))
    }
}

impl Drop for SinkGuard {
    fn drop(&mut self) {
        SINK.with(|s| s.set(self.0));
    }
}

/// `ggml_opt_epoch_callback`: after every optimizer step (training) or evaluated sequence.
unsafe extern "C" fn on_step(
    train: bool,
    _opt: sys::ggml_opt_context_t,
    _dataset: sys::ggml_opt_dataset_t,
    result: sys::ggml_opt_result_t,
    ibatch: i64,
    ibatch_max: i64,
    t_start_us: i64,
) {
    // A panic must not unwind into C: it is kept in the sink and resumed after the epoch.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let sink = SINK.with(Cell::get).cast::<StepSink<'_>>();
        if sink.is_null() || result.is_null() {
            return;
        }
        // SAFETY: a non-null SINK points to the StepSink that `train` installed for the
        // llama_opt_epoch call running on this thread (the guard clears it when that call
        // returns); `train` does not touch the sink during the call, so this is the only
        // reference to it.
        let sink = unsafe { &mut *sink };
        if sink.panic.is_some() {
            return;
        }
        // SAFETY: llama.cpp passes the live result it is accumulating into (checked non-null).
        let stats = unsafe { stats_of(result) };
        // SAFETY: reads a clock; no arguments.
        let now = unsafe { sys::ggml_time_us() };
        let secs_per_step = (now - t_start_us) as f64 / 1e6 / ibatch.max(1) as f64;
        if train {
            sink.train_secs_per_step = secs_per_step;
        }
        let p = StepProgress {
            epoch: sink.epoch,
            epochs: sink.epochs,
            phase: if train {
                Phase::Train
            } else {
                Phase::Validation
            },
            step: ibatch.max(0) as u64,
            steps: ibatch_max.max(0) as u64,
            stats,
            secs_per_step,
            eta_secs: secs_per_step * (ibatch_max - ibatch).max(0) as f64,
        };
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| (sink.on_event)(TrainEvent::Step(&p)))) {
            sink.panic = Some(e);
        }
    }));
}

// ---------------------------------------------------------------------------------------------

/// Architectures whose forward graph (llama.cpp's `src/models/*.cpp` in the bundled version)
/// uses an operation without a backward pass in ggml (`ggml_compute_backward` aborts the
/// process on it), with that operation. ggml differentiates SiLU/SwiGLU, ReLU, soft-max, RoPE,
/// RMS norm and matrix products, so llama-style models train; it has no GELU, GEGLU or norm
/// (LayerNorm) backward. Checked before anything is trained, because llama.cpp's abort cannot
/// be caught.
const UNTRAINABLE_ARCHITECTURES: &[(&str, &str)] = {
    const GEGLU: &str = "its GEGLU feed-forward has no backward pass in ggml";
    const GELU: &str = "its GELU feed-forward has no backward pass in ggml";
    &[
        ("gemma", GEGLU),
        ("gemma2", GEGLU),
        ("gemma3", GEGLU),
        ("gemma3n", GEGLU),
        ("gemma4", GEGLU),
        ("gemma4-assistant", GEGLU),
        ("gemma-embedding", GEGLU),
        ("grok", GELU),
        ("bert", GELU),
        ("modern-bert", GEGLU),
        ("t5", GELU),
        ("bloom", GELU),
        ("falcon", GELU),
        ("gpt2", GELU),
        ("gptneox", GELU),
        ("mpt", GELU),
        ("phi2", GELU),
        ("starcoder", GELU),
        ("starcoder2", GELU),
        ("codeshell", GELU),
    ]
};

/// Errors when models of architecture `arch` (`general.architecture` of the file `path`)
/// cannot be trained by llama.cpp (a table in this module: Gemma's GEGLU, GELU models).
/// Unknown or missing architectures pass: llama.cpp's loader judges those.
pub fn check_trainable(path: &Path, arch: Option<&str>) -> Result<()> {
    let Some(arch) = arch else { return Ok(()) };
    match UNTRAINABLE_ARCHITECTURES.iter().find(|(a, _)| *a == arch) {
        None => Ok(()),
        Some(&(_, reason)) => Err(TrainError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            arch: arch.to_string(),
            reason,
        }
        .into()),
    }
}

/// Errors unless every weight of `model` is F32.
fn check_f32(model: &Model) -> Result<()> {
    let weights = model.weights()?;
    let mut not_f32 = weights.iter().filter(|t| t.ty() != GgmlType::F32);
    if let Some(first) = not_f32.next() {
        return Err(TrainError::NotF32 {
            path: model.path().to_path_buf(),
            not_f32: 1 + not_f32.count(),
            total: weights.len(),
            example: first.name().to_string(),
            ty: first.ty().to_string(),
        }
        .into());
    }
    Ok(())
}

/// Fine-tunes `model` in place on `text` (see the [module](self) for each step); `on_event`
/// receives the plan, every step and every epoch. The model must be all F32 and loaded by
/// [`Model::load`] (no mmap); `&mut` keeps every session of it closed meanwhile.
///
/// A panic in `on_event` is resumed after the llama.cpp call it happened in returns.
pub fn train(
    model: &mut Model,
    text: &str,
    opts: &TrainOptions,
    on_event: &mut dyn FnMut(TrainEvent<'_>),
) -> Result<TrainReport> {
    opts.validate()?;
    let threads = default_threads(opts.threads)?;
    backend::init();
    let model: &Model = model;
    check_trainable(model.path(), model.architecture().as_deref())?;
    check_f32(model)?;

    // Read by `opt_pars` during training: declared before the context, so it is dropped after
    // it (locals drop in reverse order).
    let pars = LrPars {
        lr: Cell::new(opts.lr),
        wd: opts.weight_decay,
    };
    let mut ctx = Context::for_training(model, opts.padded_ctx(), threads)?;
    let n_ctx = ctx.n_ctx();
    let stride = opts.stride.unwrap_or(n_ctx / 2).max(1);
    let tokens = model.tokenize(text, true, false)?;
    let dataset = Dataset::from_tokens(&tokens, n_ctx, stride)?;
    let ndata = dataset.ndata;
    // As finetune.cpp: idata_split = ndata · (1 − val_split), truncated.
    let split = (ndata as f64 * (1.0 - f64::from(opts.val_split))) as usize;
    if split == 0 {
        return Err(TrainError::NothingToTrain {
            sequences: ndata,
            n_ctx,
            val_split: opts.val_split,
        }
        .into());
    }
    let plan = TrainPlan {
        text_tokens: tokens.len(),
        n_ctx_requested: opts.n_ctx,
        n_ctx,
        stride,
        sequences: ndata,
        train_sequences: split,
        val_sequences: ndata - split,
        lr: opts.lr,
        lr_min: opts.lr_min,
        weight_decay: opts.weight_decay,
        epochs: opts.epochs,
        threads,
    };
    on_event(TrainEvent::Start(&plan));

    // Sets the CPU backend's thread count (see the module's step 4).
    let mut batch = Batch::new(1);
    batch.push(tokens[0], 0, true);
    ctx.decode(&batch)?;
    ctx.clear_memory();

    let lopt = sys::llama_opt_params {
        // 0: the context's size. Another value makes llama_opt_epoch index past its buffers.
        n_ctx_train: 0,
        param_filter: Some(sys::llama_opt_param_filter_all),
        param_filter_ud: std::ptr::null_mut(),
        get_opt_pars: Some(opt_pars),
        get_opt_pars_ud: (&pars as *const LrPars).cast_mut().cast(),
        optimizer_type: sys::GGML_OPT_OPTIMIZER_TYPE_ADAMW,
    };
    // SAFETY: context and model are alive and belong together; the context is new, so it has
    // no optimizer yet (llama_opt_init asserts that), and n_batch = n_ubatch = n_ctx satisfies
    // its divisibility asserts. `pars` outlives the context (declared before it, never
    // written); the filter and callback are `extern "C"` functions that do not unwind.
    unsafe { sys::llama_opt_init(ctx.raw(), model.raw(), lopt) };

    let mut res_train = OptResult::new()?;
    let mut res_val = OptResult::new()?;
    let started = Instant::now();
    let mut epochs = Vec::with_capacity(opts.epochs);
    for epoch in 1..=opts.epochs {
        let t = Instant::now();
        pars.lr.set(opts.lr_at(epoch));
        let mut sink = StepSink {
            epoch,
            epochs: opts.epochs,
            on_event: &mut *on_event,
            train_secs_per_step: 0.0,
            panic: None,
        };
        {
            let _guard = SinkGuard::install(&mut sink);
            // SAFETY: context (with its optimizer), dataset and results are alive and used by
            // this thread only; 0 < split ≤ ndata (checked above); the callbacks are
            // `extern "C"` functions that catch panics, and the sink they use outlives the call
            // (the guard uninstalls it first). Each window holds n_ctx tokens of the model's
            // vocabulary (they came from its tokenizer), as llama_opt_epoch requires.
            unsafe {
                sys::llama_opt_epoch(
                    ctx.raw(),
                    dataset.raw.as_ptr(),
                    res_train.0.as_ptr(),
                    res_val.0.as_ptr(),
                    split as i64,
                    Some(on_step),
                    Some(on_step),
                )
            };
        }
        if let Some(p) = sink.panic.take() {
            resume_unwind(p);
        }
        let val = res_val.stats();
        let report = EpochReport {
            epoch,
            lr: pars.lr.get(),
            train: res_train.stats(),
            val: (val.tokens > 0).then_some(val),
            secs: t.elapsed().as_secs_f64(),
            secs_per_step: sink.train_secs_per_step,
        };
        on_event(TrainEvent::Epoch(&report));
        on_event(TrainEvent::Trained { epoch, model });
        epochs.push(report);
        res_train.reset();
        res_val.reset();
    }
    Ok(TrainReport {
        plan,
        epochs,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// Writes the model to `path` with `llama_model_save_to_file`: its tensors as they are in
/// memory (trained ones included), with the metadata llama.cpp models — no chat template, no
/// `general.*` keys, the training context as `context_length`. To keep a base's metadata,
/// rewrap its tensors (`flows::finetune` does).
pub fn save(model: &Model, path: &Path) -> Result<()> {
    let c_path = path_cstring(path)?;
    backend::clear_last_error();
    // SAFETY: the model is alive; `c_path` is a NUL-terminated path alive for the call.
    // llama_model_save_to_file returns nothing: gguf_write_to_file logs its failures (cannot
    // open, short write), so the log and the file are checked below.
    unsafe { sys::llama_model_save_to_file(model.raw(), c_path.as_ptr()) };
    let detail = backend::take_last_error();
    let written = std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() > 0);
    if !detail.is_empty() || !written {
        return Err(TrainError::Save {
            path: path.to_path_buf(),
            detail,
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_without_a_model() {
        assert!(TrainOptions::default().validate().is_ok());
        let bad = |f: &dyn Fn(&mut TrainOptions), what: &str| {
            let mut o = TrainOptions::default();
            f(&mut o);
            let e = o.validate().unwrap_err().to_string();
            assert!(e.contains(what), "{e:?} lacks {what:?}");
        };
        bad(&|o| o.lr = 0.0, "learning rate");
        bad(&|o| o.lr = f32::NAN, "learning rate");
        bad(&|o| o.weight_decay = -1.0, "weight decay");
        bad(&|o| o.weight_decay = f32::INFINITY, "weight decay");
        bad(&|o| o.epochs = 0, "epochs");
        bad(&|o| o.n_ctx = 0, "training context");
        bad(&|o| o.n_ctx = MAX_CTX + 1, "training context");
        bad(&|o| o.stride = Some(0), "stride");
        bad(&|o| o.val_split = 1.0, "validation split");
        bad(&|o| o.val_split = -0.1, "validation split");
        bad(&|o| o.threads = Some(0), "thread");
        bad(&|o| o.lr_min = Some(1.0), "minimum learning rate");
        bad(&|o| o.lr_min = Some(0.0), "minimum learning rate");
        bad(&|o| o.lr_min = Some(f32::NAN), "minimum learning rate");
    }

    #[test]
    fn the_learning_rate_decays_from_lr_to_lr_min() {
        let o = TrainOptions {
            lr: 1e-4,
            lr_min: Some(1e-5),
            epochs: 3,
            ..Default::default()
        };
        assert_eq!(o.lr_at(1), 1e-4);
        assert!((o.lr_at(2) - 1e-4 / 10f32.sqrt()).abs() < 1e-10);
        assert!((o.lr_at(3) - 1e-5).abs() < 1e-11);
        let constant = TrainOptions {
            lr_min: None,
            ..o.clone()
        };
        assert_eq!(constant.lr_at(3), 1e-4);
        let one = TrainOptions { epochs: 1, ..o };
        assert_eq!(one.lr_at(1), 1e-4);
    }

    #[test]
    fn the_context_is_padded_as_llama_cpp_pads_it() {
        let ctx = |n| TrainOptions {
            n_ctx: n,
            ..Default::default()
        };
        assert_eq!(ctx(1).padded_ctx(), 256);
        assert_eq!(ctx(256).padded_ctx(), 256);
        assert_eq!(ctx(257).padded_ctx(), 512);
        assert_eq!(ctx(MAX_CTX).padded_ctx(), MAX_CTX);
    }
}
