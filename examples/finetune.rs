//! Full fine-tuning of a GGUF model with llama.cpp's training API (AdamW), as llama.cpp's own
//! `examples/training/finetune.cpp` does it: every F32 weight except the token embedding is
//! trained (llama.cpp leaves `token_embd.weight` frozen), next-token cross-entropy over windows of
//! `ctx` tokens taken every `stride` tokens of the text. A means to make real homologous experts
//! for ggmerge's experiments, not part of the product.
//!
//! ```sh
//! target/release/ggmerge quantize .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smol-f32.gguf F32
//! cargo run --release --example finetune -- --base /tmp/smol-f32.gguf --data train.txt \
//!     -o /tmp/expert.gguf --lr 5e-5 --epochs 2 --ctx 256 -t 2
//! ```
//!
//! Steps, each the llama.cpp call finetune.cpp makes:
//! 1. load the base without mmap (`LLAMA_LOAD_MODE_NONE`: training writes the weights in place);
//!    every tensor must be F32 (llama.cpp silently skips other types as parameters);
//! 2. a context with `n_batch = n_ubatch = n_ctx`, F32 KV cache and flash attention off (no
//!    backward pass for F16 `OUT_PROD` or `FLASH_ATTN_EXT`); with `n_ubatch == n_ctx` the K and V
//!    projections receive gradients too. llama.cpp pads `n_ctx` to a multiple of 256, so `--ctx`
//!    is rounded up to one;
//! 3. the text tokenized as `common_tokenize(ctx, text, add_special = true)`, and the dataset of
//!    `common_opt_dataset_init(ctx, tokens, stride = n_ctx / 2)`, reimplemented here (it is not in
//!    the bindings): `(n_tokens - n_ctx - 1) / stride` windows, labels shifted by one token;
//! 4. `llama_opt_init` (AdamW, constant learning rate as `common_opt_lr_pars` gives without decay),
//!    then per epoch `llama_opt_epoch` over the first `(1 - val_split) · n` windows for training,
//!    the rest evaluated only; windows in file order, no shuffling;
//! 5. `llama_model_save_to_file`. Its writer drops metadata llama.cpp does not model (chat
//!    template, `general.*`) and stores the training context as `context_length`, so the output
//!    is then rewritten with the base's metadata and tensor order, tensor data from the trained
//!    model: the expert is homologous to the base in everything but the weights.
//!
//! `GGMERGE_LLAMA_LOG=1` lets llama.cpp's log through.

use std::ffi::{c_void, CString};
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _, Result};
use ggmerge::format::gguf::{GgufModel, GgufWriter, TensorSpec};
use ggmerge::format::GgmlType;
use ggmerge::runtime::backend;
use llama_cpp_sys_2 as sys;

const USAGE: &str = "\
usage: finetune --base BASE.gguf --data TRAIN.txt -o OUT.gguf [options]
  --base PATH        model to fine-tune; every tensor must be F32
                     (make one with `ggmerge quantize BASE.gguf BASE-f32.gguf F32`)
  --data PATH        training text (used as is, tokenized with the model's BOS setting)
  -o, --out PATH     the fine-tuned model (GGUF, F32, the base's metadata)
  --lr X             AdamW learning rate, constant (default 5e-5)
  --wd X             AdamW weight decay (default 0)
  --epochs N         passes over the data (default 2)
  --ctx N            tokens per training sequence, rounded up to a multiple of 256 as llama.cpp
                     pads contexts (default 256)
  --stride N         tokens between the starts of two sequences (default ctx / 2, as llama.cpp)
  --val-split X      fraction of the sequences (the last ones) evaluated, not trained on
                     (default 0.05, as llama.cpp)
  -t, --threads N    CPU threads (default: all cores)";

struct Args {
    base: PathBuf,
    data: PathBuf,
    out: PathBuf,
    lr: f32,
    wd: f32,
    epochs: usize,
    ctx: u32,
    stride: Option<usize>,
    val_split: f32,
    threads: usize,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut base, mut data, mut out) = (None, None, None);
    let (mut lr, mut wd, mut epochs, mut ctx) = (5e-5f32, 0f32, 2usize, 256u32);
    let (mut stride, mut val_split, mut threads) = (None, 0.05f32, None);
    fn num<T: std::str::FromStr>(flag: &str, v: &str, what: &str) -> Result<T, String> {
        v.parse().map_err(|_| format!("{flag} {v:?}: not {what}"))
    }
    while let Some(a) = args.next() {
        let mut value = |flag: &str| args.next().ok_or_else(|| format!("{flag} needs a value"));
        match a.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--base" => base = Some(PathBuf::from(value("--base")?)),
            "--data" => data = Some(PathBuf::from(value("--data")?)),
            "-o" | "--out" => out = Some(PathBuf::from(value("--out")?)),
            "--lr" | "--wd" => {
                let v = value(&a)?;
                let x: f32 = num(&a, &v, "a number")?;
                if !x.is_finite() || x < 0.0 || (a == "--lr" && x == 0.0) {
                    return Err(format!("{a} {v:?}: out of range"));
                }
                *(if a == "--lr" { &mut lr } else { &mut wd }) = x;
            }
            "--epochs" => {
                let v = value(&a)?;
                epochs = num(&a, &v, "an unsigned integer")?;
                if epochs == 0 {
                    return Err("--epochs must be at least 1".into());
                }
            }
            "--ctx" => {
                let v = value(&a)?;
                ctx = num(&a, &v, "an unsigned integer")?;
                if ctx == 0 || ctx > 1 << 20 {
                    return Err(format!("--ctx {v:?}: out of range (1 ..= 1048576)"));
                }
            }
            "--stride" => {
                let v = value(&a)?;
                let s: usize = num(&a, &v, "an unsigned integer")?;
                if s == 0 {
                    return Err("--stride must be at least 1".into());
                }
                stride = Some(s);
            }
            "--val-split" => {
                let v = value(&a)?;
                val_split = num(&a, &v, "a number")?;
                if !(0.0..1.0).contains(&val_split) {
                    return Err(format!("--val-split {v:?}: must be in [0, 1)"));
                }
            }
            "-t" | "--threads" => {
                let v = value(&a)?;
                let n: usize = num(&a, &v, "an unsigned integer")?;
                if n == 0 || n > 4096 {
                    return Err(format!("--threads {v:?}: out of range"));
                }
                threads = Some(n);
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    let need = |x: Option<PathBuf>, flag: &str| x.ok_or_else(|| format!("{flag} is required"));
    Ok(Args {
        base: need(base, "--base")?,
        data: need(data, "--data")?,
        out: need(out, "-o")?,
        lr,
        wd,
        epochs,
        ctx,
        stride,
        val_split,
        threads: threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(4, |n| n.get())),
    })
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Owning wrappers of the llama.cpp / ggml-opt objects used here.

fn c_path(path: &Path) -> Result<CString> {
    #[cfg(unix)]
    let bytes = {
        use std::os::unix::ffi::OsStrExt;
        path.as_os_str().as_bytes().to_vec()
    };
    #[cfg(not(unix))]
    let bytes = path.to_string_lossy().into_owned().into_bytes();
    CString::new(bytes).map_err(|_| anyhow!("{}: path contains a NUL byte", path.display()))
}

/// A `llama_model` loaded without mmap (writable weights); freed on drop.
struct LlamaModel(NonNull<sys::llama_model>);

impl Drop for LlamaModel {
    fn drop(&mut self) {
        // SAFETY: the pointer came from llama_model_load_from_file and is freed once, here;
        // every LlamaContext borrows the model (lifetime 'm), so none is alive any more.
        unsafe { sys::llama_model_free(self.0.as_ptr()) }
    }
}

impl LlamaModel {
    fn load(path: &Path) -> Result<LlamaModel> {
        let c = c_path(path)?;
        // SAFETY: plain-data defaults; no pointers are set.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.n_gpu_layers = 0;
        // Training updates the weights in place: mmap'd CPU weights are read-only.
        params.load_mode = sys::LLAMA_LOAD_MODE_NONE;
        params.lazy_mode = sys::LLAMA_LAZY_MODE_OFF;
        // Repacked buffers have no backward pass (and F32 is never repacked anyway).
        params.use_extra_bufts = false;
        backend::clear_last_error();
        // SAFETY: `c` is a NUL-terminated path alive for the call; `params` holds only null
        // pointers (devices, overrides, callbacks), meaning "none". Null is returned on failure.
        let raw = unsafe { sys::llama_model_load_from_file(c.as_ptr(), params) };
        NonNull::new(raw).map(LlamaModel).ok_or_else(|| {
            anyhow!(
                "llama.cpp could not load {}: {}",
                path.display(),
                backend::take_last_error()
            )
        })
    }

    /// `llama_tokenize` of the whole text, like `common_tokenize(ctx, text, add_special = true,
    /// parse_special = false)`.
    fn tokenize(&self, text: &[u8]) -> Result<Vec<i32>> {
        let len = i32::try_from(text.len()).context("the training text is over 2 GiB")?;
        // SAFETY: the model is alive; its vocabulary is owned by it.
        let vocab = unsafe { sys::llama_model_get_vocab(self.0.as_ptr()) };
        let mut toks = vec![0i32; text.len() / 2 + 16];
        for _ in 0..2 {
            let cap = i32::try_from(toks.len()).unwrap_or(i32::MAX);
            // SAFETY: `text` is valid for `len` bytes (no NUL needed: the length is given);
            // `toks` has room for `cap` tokens and llama_tokenize writes at most that many,
            // returning minus the needed count when they do not fit.
            let n = unsafe {
                sys::llama_tokenize(
                    vocab,
                    text.as_ptr().cast(),
                    len,
                    toks.as_mut_ptr(),
                    cap,
                    true,
                    false,
                )
            };
            if n == i32::MIN {
                bail!("tokenization overflowed (too many tokens)");
            }
            if n >= 0 {
                toks.truncate(n as usize);
                return Ok(toks);
            }
            toks.resize(n.unsigned_abs() as usize, 0);
        }
        bail!("llama_tokenize kept asking for a larger buffer")
    }
}

/// A `llama_context` set up for training; freed (with its optimizer state) on drop, before the
/// model it borrows.
struct TrainContext<'m> {
    raw: NonNull<sys::llama_context>,
    _model: PhantomData<&'m LlamaModel>,
}

impl Drop for TrainContext<'_> {
    fn drop(&mut self) {
        // SAFETY: the pointer came from llama_init_from_model and is freed once, here; the
        // lifetime 'm keeps the model alive until after this.
        unsafe { sys::llama_free(self.raw.as_ptr()) }
    }
}

impl<'m> TrainContext<'m> {
    /// A context of `n_ctx` tokens with `n_batch = n_ubatch = n_ctx` (one optimizer step per
    /// sequence, K/V gradients on), F32 KV cache and flash attention off, as finetune.cpp forces.
    fn new(model: &'m LlamaModel, n_ctx: u32, threads: usize) -> Result<TrainContext<'m>> {
        let threads = i32::try_from(threads).context("too many threads")?;
        // SAFETY: plain-data defaults.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = n_ctx;
        cp.n_batch = n_ctx;
        cp.n_ubatch = n_ctx;
        cp.n_seq_max = 1;
        cp.n_threads = threads;
        cp.n_threads_batch = threads;
        cp.type_k = sys::GGML_TYPE_F32;
        cp.type_v = sys::GGML_TYPE_F32;
        cp.flash_attn_type = sys::LLAMA_FLASH_ATTN_TYPE_DISABLED;
        cp.no_perf = true;
        backend::clear_last_error();
        // SAFETY: the model is alive for 'm, longer than the context; `cp` holds only null
        // pointers (callbacks, samplers), meaning "none". Null is returned on failure.
        let raw = unsafe { sys::llama_init_from_model(model.0.as_ptr(), cp) };
        let raw = NonNull::new(raw).ok_or_else(|| {
            anyhow!(
                "llama.cpp could not create a context of {n_ctx} tokens: {}",
                backend::take_last_error()
            )
        })?;
        Ok(TrainContext {
            raw,
            _model: PhantomData,
        })
    }

    /// The context size llama.cpp actually uses (`llama_n_ctx`, after padding).
    fn n_ctx(&self) -> usize {
        // SAFETY: the context is alive.
        unsafe { sys::llama_n_ctx(self.raw.as_ptr()) as usize }
    }
}

/// A `ggml_opt_dataset` of I32 token windows and next-token labels; freed on drop.
struct Dataset(NonNull<sys::ggml_opt_dataset>);

impl Drop for Dataset {
    fn drop(&mut self) {
        // SAFETY: the pointer came from ggml_opt_dataset_init and is freed once, here.
        unsafe { sys::ggml_opt_dataset_free(self.0.as_ptr()) }
    }
}

impl Dataset {
    /// `common_opt_dataset_init`: window `i` is `tokens[i·stride ..][..n_ctx]`, its labels the
    /// same window shifted by one token. Like llama.cpp, `(n_tokens - n_ctx - 1) / stride`
    /// windows (the formula leaves out the last window that would still fit).
    fn from_tokens(tokens: &[i32], n_ctx: usize, stride: usize) -> Result<Dataset> {
        let ndata = tokens.len().saturating_sub(n_ctx + 1) / stride;
        if ndata == 0 {
            bail!(
                "the text has {} tokens: one training sequence needs at least {} \
                 (ctx {n_ctx} + 1 + stride {stride}); give more text or a smaller --ctx",
                tokens.len(),
                n_ctx + 1 + stride
            );
        }
        let (ne, nd) = (n_ctx as i64, ndata as i64);
        // SAFETY: plain sizes; ggml allocates the data/labels tensors (ne × ndata I32 each) in
        // its own CPU context, aborting on allocation failure. Shard size 1 as llama.cpp.
        let raw = unsafe {
            sys::ggml_opt_dataset_init(sys::GGML_TYPE_I32, sys::GGML_TYPE_I32, ne, ne, nd, 1)
        };
        let ds = Dataset(NonNull::new(raw).context("ggml_opt_dataset_init failed")?);
        // SAFETY: the dataset is alive; its data and labels tensors are contiguous I32 tensors
        // of shape [n_ctx, ndata] allocated in host memory (ggml_opt_dataset_init uses a CPU
        // buffer), so `data` points to n_ctx·ndata i32 each, written only through these slices
        // while nothing else accesses the dataset.
        let (data, labels) = unsafe {
            let d = sys::ggml_opt_dataset_data(ds.0.as_ptr());
            let l = sys::ggml_opt_dataset_labels(ds.0.as_ptr());
            if d.is_null() || l.is_null() || (*d).data.is_null() || (*l).data.is_null() {
                bail!("ggml_opt_dataset_init returned no data buffers");
            }
            (
                std::slice::from_raw_parts_mut((*d).data.cast::<i32>(), n_ctx * ndata),
                std::slice::from_raw_parts_mut((*l).data.cast::<i32>(), n_ctx * ndata),
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
            .context("ggml_opt_result_init failed")
    }

    fn reset(&mut self) {
        // SAFETY: the result is alive and not in use by an epoch (we hold `&mut`).
        unsafe { sys::ggml_opt_result_reset(self.0.as_ptr()) }
    }

    fn stats(&self) -> Stats {
        // SAFETY: the result is alive.
        unsafe { Stats::of(self.0.as_ptr()) }
    }
}

/// Loss (mean cross-entropy per token, nats) and next-token accuracy so far.
#[derive(Clone, Copy, Debug)]
struct Stats {
    loss: f64,
    loss_unc: f64,
    accuracy: f64,
    ndata: i64,
}

impl Stats {
    /// # Safety
    /// `r` must be a live `ggml_opt_result`.
    unsafe fn of(r: sys::ggml_opt_result_t) -> Stats {
        let (mut loss, mut loss_unc, mut accuracy, mut acc_unc, mut ndata) =
            (0f64, 0f64, 0f64, 0f64, 0i64);
        // SAFETY: `r` is live (caller); each function writes one value through each pointer,
        // all pointing to locals. The uncertainty pointers must not be null: with no batches
        // ggml_opt_result_loss writes NaN through `unc` unconditionally.
        unsafe {
            sys::ggml_opt_result_loss(r, &mut loss, &mut loss_unc);
            sys::ggml_opt_result_accuracy(r, &mut accuracy, &mut acc_unc);
            sys::ggml_opt_result_ndata(r, &mut ndata);
        }
        Stats {
            loss,
            loss_unc,
            accuracy,
            ndata,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Callbacks handed to llama.cpp.

/// Optimizer parameters read by [`opt_pars`] before every optimizer step.
#[repr(C)]
struct LrPars {
    lr: f32,
    wd: f32,
}

/// `ggml_opt_get_optimizer_params`: ggml's AdamW defaults (β1 0.9, β2 0.999, ε 1e-8) with our
/// learning rate and weight decay, as `common_opt_lr_pars` without decay.
unsafe extern "C" fn opt_pars(ud: *mut c_void) -> sys::ggml_opt_optimizer_params {
    // SAFETY: ggml_opt_get_default_optimizer_params ignores its argument.
    let mut p = unsafe { sys::ggml_opt_get_default_optimizer_params(std::ptr::null_mut()) };
    // SAFETY: `ud` is the `LrPars` handed to llama_opt_init, alive (on `run`'s stack) until the
    // context that calls this is freed, and never written while training runs.
    if let Some(lr) = unsafe { ud.cast::<LrPars>().as_ref() } {
        p.adamw.alpha = lr.lr;
        p.adamw.wd = lr.wd;
        p.sgd.alpha = lr.lr;
        p.sgd.wd = lr.wd;
    }
    p
}

/// The epoch being run (1-based), for the progress lines.
static EPOCH: AtomicUsize = AtomicUsize::new(0);

/// Wall time per training step of the current epoch so far, µs (set by [`on_step`]).
static TRAIN_STEP_US: AtomicU64 = AtomicU64::new(0);

/// `ggml_opt_epoch_callback`: one line per optimizer step (training) or evaluated sequence.
unsafe extern "C" fn on_step(
    train: bool,
    _opt: sys::ggml_opt_context_t,
    _dataset: sys::ggml_opt_dataset_t,
    result: sys::ggml_opt_result_t,
    ibatch: i64,
    ibatch_max: i64,
    t_start_us: i64,
) {
    // A panic must not unwind into C.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if result.is_null() {
            return;
        }
        // SAFETY: llama.cpp passes the live result it is accumulating into (checked non-null).
        let s = unsafe { Stats::of(result) };
        // SAFETY: reads a clock; no arguments.
        let now = unsafe { sys::ggml_time_us() };
        let per_step = (now - t_start_us) as f64 / 1e6 / ibatch.max(1) as f64;
        if train {
            TRAIN_STEP_US.store((per_step * 1e6) as u64, Ordering::Relaxed);
        }
        let eta = per_step * (ibatch_max - ibatch).max(0) as f64;
        eprintln!(
            "epoch {} {} {ibatch:>4}/{ibatch_max}: loss {:.4} ± {:.4}, accuracy {:.2}%, \
             {per_step:.2} s/step, eta {eta:.0} s",
            EPOCH.load(Ordering::Relaxed),
            if train { "train" } else { "val  " },
            s.loss,
            if s.loss_unc.is_finite() {
                s.loss_unc
            } else {
                0.0
            },
            100.0 * s.accuracy,
        );
    }));
}

// ---------------------------------------------------------------------------------------------

/// Rewrites llama.cpp's save (`trained`) as `out`: the base's metadata and tensor order, each
/// tensor's data from `trained` (same name, shape and type required). Returns (changed tensors,
/// total tensors, bytes written).
fn rewrap(base_path: &Path, trained: &Path, out: &Path) -> Result<(usize, usize, u64)> {
    // FormatError's message names the file and its cause already.
    let base = GgufModel::open(base_path).map_err(|e| anyhow!("{e}"))?;
    let new = GgufModel::open(trained).map_err(|e| anyhow!("{e}"))?;
    let version = base.shards()[0].header().version;
    let mut meta = base.metadata().clone();
    for k in ["split.no", "split.count", "split.tensors.count"] {
        meta.remove(k);
    }
    let specs: Vec<TensorSpec> = base
        .tensors()
        .map(|t| TensorSpec {
            name: t.info.name.clone(),
            shape: t.info.shape.clone(),
            ty: t.info.ty,
        })
        .collect();
    let mut w = GgufWriter::create(out, version, &meta, &specs, &[base_path, trained])
        .map_err(|e| anyhow!("{e}"))?;
    let mut changed = 0;
    for t in base.tensors() {
        let name = &t.info.name;
        let n = new
            .tensor_by_name(name)
            .ok_or_else(|| anyhow!("llama.cpp's save lacks tensor {name:?}"))?;
        if n.info.shape != t.info.shape || n.info.ty != t.info.ty {
            bail!(
                "tensor {name:?}: saved as {:?} {:?}, the base has {:?} {:?}",
                n.info.ty,
                n.info.shape,
                t.info.ty,
                t.info.shape
            );
        }
        changed += usize::from(n.data != t.data);
        w.write_tensor(n.data).map_err(|e| anyhow!("{e}"))?;
    }
    let size = w.finish().map_err(|e| anyhow!("{e}"))?;
    Ok((changed, specs.len(), size))
}

fn run(a: &Args) -> Result<()> {
    let t0 = Instant::now();
    // Check everything cheap before the model is loaded.
    let base = GgufModel::open(&a.base).map_err(|e| anyhow!("{e}"))?;
    let not_f32: Vec<String> = base
        .tensors()
        .filter(|t| t.info.ty != GgmlType::F32)
        .map(|t| format!("{} ({:?})", t.info.name, t.info.ty))
        .collect();
    if !not_f32.is_empty() {
        bail!(
            "training needs every weight in F32; {} of {} tensors are not (e.g. {}). \
             Make an F32 copy first: ggmerge quantize {} BASE-f32.gguf F32",
            not_f32.len(),
            base.n_tensors(),
            not_f32[0],
            a.base.display()
        );
    }
    drop(base);
    let text = std::fs::read(&a.data).with_context(|| format!("reading {}", a.data.display()))?;
    if a.out
        .canonicalize()
        .ok()
        .is_some_and(|o| Some(o) == a.base.canonicalize().ok())
    {
        bail!("-o {} is the base model itself", a.out.display());
    }
    let out_dir = match a.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !out_dir.is_dir() {
        bail!(
            "-o {}: directory {} does not exist",
            a.out.display(),
            out_dir.display()
        );
    }
    let mut tmp_name = a
        .out
        .file_name()
        .context("-o needs a file name")?
        .to_os_string();
    tmp_name.push(".llama-save.tmp");
    let tmp = out_dir.join(tmp_name);
    std::fs::File::create(&tmp)
        .with_context(|| format!("-o {}: cannot write {}", a.out.display(), tmp.display()))?;
    let _ = std::fs::remove_file(&tmp);
    let tmp_c = c_path(&tmp)?;

    // Read by `opt_pars` during training: declared before the context, so it is dropped after it.
    let lr = LrPars { lr: a.lr, wd: a.wd };
    backend::init();
    let model = LlamaModel::load(&a.base)?;
    let n_ctx_req = a.ctx.div_ceil(256) * 256;
    if n_ctx_req != a.ctx {
        eprintln!(
            "note: --ctx {} rounded up to {n_ctx_req} (llama.cpp pads contexts to 256)",
            a.ctx
        );
    }
    let ctx = TrainContext::new(&model, n_ctx_req, a.threads)?;
    let n_ctx = ctx.n_ctx();
    let stride = a.stride.unwrap_or(n_ctx / 2).max(1);
    let tokens = model.tokenize(&text)?;
    let dataset = Dataset::from_tokens(&tokens, n_ctx, stride)?;
    let ndata = tokens.len().saturating_sub(n_ctx + 1) / stride;
    // As finetune.cpp: idata_split = ndata · (1 − val_split), truncated.
    let split = (ndata as f64 * (1.0 - f64::from(a.val_split))) as usize;
    if split == 0 {
        bail!(
            "{ndata} sequence(s) of {n_ctx} tokens and --val-split {} leave none to train on; \
             give more text or --val-split 0",
            a.val_split
        );
    }
    eprintln!(
        "{}: {} tokens of text -> {ndata} sequences of {n_ctx} tokens (stride {stride}): \
         {split} train, {} validation; AdamW lr {:e} wd {}, {} epoch(s), {} thread(s)",
        a.data.display(),
        tokens.len(),
        ndata - split,
        a.lr,
        a.wd,
        a.epochs,
        a.threads
    );

    let lopt = sys::llama_opt_params {
        // 0: the context's size. Another value makes llama_opt_epoch index past its buffers.
        n_ctx_train: 0,
        param_filter: Some(sys::llama_opt_param_filter_all),
        param_filter_ud: std::ptr::null_mut(),
        get_opt_pars: Some(opt_pars),
        get_opt_pars_ud: (&lr as *const LrPars).cast_mut().cast(),
        optimizer_type: sys::GGML_OPT_OPTIMIZER_TYPE_ADAMW,
    };
    // llama.cpp's training path (llama_opt_epoch → ggml_opt_eval) never hands the context's
    // thread count to the CPU backend — only llama_decode does — so training would run on
    // ggml's default of 4 threads whatever -t says (on 2 cores: spinning in ggml_barrier,
    // 4–6× slower). One throwaway one-token decode sets it; every training step clears the
    // memory, so it leaves nothing behind (losses and weights are bit-identical either way).
    let mut first = tokens.first().copied().unwrap_or(0);
    // SAFETY: context and model are alive; the batch views one valid token id (from the
    // model's tokenizer) for the duration of the call.
    let rc = unsafe {
        let batch = sys::llama_batch_get_one(&mut first, 1);
        sys::llama_decode(ctx.raw.as_ptr(), batch)
    };
    if rc != 0 {
        bail!("llama_decode of one token failed ({rc}) while setting the thread count");
    }
    // SAFETY: context and model are alive and belong together; the context has no optimizer
    // yet (llama_opt_init asserts that) and n_batch = n_ubatch = n_ctx satisfies its divisibility
    // asserts. `lr` outlives the context (declared before it, so dropped after it, and never
    // written); the filter and callback are `extern "C"` functions that do not unwind.
    unsafe { sys::llama_opt_init(ctx.raw.as_ptr(), model.0.as_ptr(), lopt) };

    let mut res_train = OptResult::new()?;
    let mut res_val = OptResult::new()?;
    let train_start = Instant::now();
    let mut history = Vec::new();
    let mut step_secs = Vec::new();
    for epoch in 1..=a.epochs {
        EPOCH.store(epoch, Ordering::Relaxed);
        let te = Instant::now();
        // SAFETY: context (with its optimizer), dataset and results are alive and used by this
        // thread only; 0 ≤ split ≤ ndata (checked above); the callbacks are `extern "C"`
        // functions that catch panics. Each window holds n_ctx tokens of the model's vocabulary
        // (they came from its tokenizer), as opt_epoch requires.
        unsafe {
            sys::llama_opt_epoch(
                ctx.raw.as_ptr(),
                dataset.0.as_ptr(),
                res_train.0.as_ptr(),
                res_val.0.as_ptr(),
                split as i64,
                Some(on_step),
                Some(on_step),
            )
        };
        let (tr, va) = (res_train.stats(), res_val.stats());
        let secs = te.elapsed().as_secs_f64();
        let val = if va.ndata > 0 {
            format!(
                ", val loss {:.4} accuracy {:.2}%",
                va.loss,
                100.0 * va.accuracy
            )
        } else {
            String::new()
        };
        let step = TRAIN_STEP_US.load(Ordering::Relaxed) as f64 / 1e6;
        println!(
            "epoch {epoch}/{}: train loss {:.4} accuracy {:.2}%{val} ({secs:.1} s, {step:.2} s/step)",
            a.epochs,
            tr.loss,
            100.0 * tr.accuracy,
        );
        step_secs.push(step);
        history.push((tr, (va.ndata > 0).then_some(va)));
        res_train.reset();
        res_val.reset();
    }
    let train_secs = train_start.elapsed().as_secs_f64();

    backend::clear_last_error();
    // SAFETY: the model is alive (the context only borrows it); `tmp_c` is a NUL-terminated
    // path. llama_model_save_to_file reports no error, so the file is checked below.
    unsafe { sys::llama_model_save_to_file(model.0.as_ptr(), tmp_c.as_ptr()) };
    drop(ctx);
    drop(model);
    if !tmp.is_file() {
        bail!(
            "llama_model_save_to_file wrote no {}: {}",
            tmp.display(),
            backend::take_last_error()
        );
    }
    let rewrapped = rewrap(&a.base, &tmp, &a.out);
    let _ = std::fs::remove_file(&tmp);
    let (changed, total, size) = rewrapped?;

    if let (Some((first, _)), Some((last, last_val)), true) =
        (history.first(), history.last(), history.len() > 1)
    {
        println!(
            "train loss {:.4} -> {:.4}{}",
            first.loss,
            last.loss,
            last_val.map_or(String::new(), |v| format!(", final val loss {:.4}", v.loss))
        );
    }
    println!(
        "wrote {} ({:.1} MiB, {changed} of {total} tensors changed; token_embd stays frozen \
         as in llama.cpp); training {train_secs:.1} s, {:.2} s per training step; total {:.1} s",
        a.out.display(),
        size as f64 / (1 << 20) as f64,
        step_secs.iter().sum::<f64>() / step_secs.len().max(1) as f64,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
