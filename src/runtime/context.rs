//! The two small owning wrappers under [`Session`](super::Session) and
//! [`train`](super::train): [`Context`] (a `llama_context`) and [`Batch`] (a `llama_batch`
//! from `llama_batch_init`). Crate-private.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::backend;
use super::error::{Result, RuntimeError};
use super::model::{Model, Token};

/// What a context is created with.
pub(crate) struct ContextParams {
    /// Context size asked for (llama.cpp pads it to a multiple of 256).
    pub n_ctx: u32,
    /// Logical batch (tokens per `llama_decode`).
    pub n_batch: u32,
    /// Threads for generation and batch processing.
    pub threads: usize,
    /// `cb_eval` and its user data (weight discovery only).
    pub cb_eval: sys::ggml_backend_sched_eval_callback,
    /// User data for `cb_eval`; must outlive the context.
    pub cb_eval_user_data: *mut c_void,
}

/// An owned `llama_context`, tied to its model by `'m`.
pub(crate) struct Context<'m> {
    raw: NonNull<sys::llama_context>,
    _model: PhantomData<&'m Model>,
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: `raw` came from llama_init_from_model and is freed once, here, before the
        // model it borrows (the lifetime `'m` guarantees the model outlives it).
        unsafe { sys::llama_free(self.raw.as_ptr()) }
    }
}

impl<'m> Context<'m> {
    /// `llama_init_from_model` with llama.cpp's defaults plus `p`; one sequence.
    pub fn new(model: &'m Model, p: &ContextParams) -> Result<Context<'m>> {
        let threads = i32::try_from(p.threads)
            .map_err(|_| RuntimeError::Invalid(format!("{} threads is too many", p.threads)))?;
        // SAFETY: plain-data defaults.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = p.n_ctx;
        cp.n_batch = p.n_batch;
        cp.n_ubatch = p.n_batch.min(cp.n_ubatch);
        cp.n_seq_max = 1;
        cp.n_threads = threads;
        cp.n_threads_batch = threads;
        cp.no_perf = true;
        cp.cb_eval = p.cb_eval;
        cp.cb_eval_user_data = p.cb_eval_user_data;
        // `cp`'s pointers are null except cb_eval/cb_eval_user_data, whose caller guarantees
        // the user data outlives the context (see `weights::discover`).
        Self::init(model, cp)
    }

    /// A context for training ([`super::train`]), as llama.cpp's `finetune.cpp` sets it up:
    /// `n_batch = n_ubatch = n_ctx` (one optimizer step per sequence, and the K and V
    /// projections receive gradients), F32 KV cache and flash attention off (no backward pass
    /// for F16 `OUT_PROD` or `FLASH_ATTN_EXT`); one sequence.
    pub fn for_training(model: &'m Model, n_ctx: u32, threads: usize) -> Result<Context<'m>> {
        let threads = i32::try_from(threads)
            .map_err(|_| RuntimeError::Invalid(format!("{threads} threads is too many")))?;
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
        // No callbacks: every pointer in `cp` is null.
        Self::init(model, cp)
    }

    /// `llama_init_from_model(model, cp)`; `cp`'s callbacks and their user data (if any) must
    /// outlive the context.
    fn init(model: &'m Model, cp: sys::llama_context_params) -> Result<Context<'m>> {
        backend::clear_last_error();
        // SAFETY: the model is alive for `'m`, longer than the context. Both callers set no
        // pointer in `cp` but cb_eval/cb_eval_user_data, whose user data outlives the context
        // (`Context::new`'s contract). Null is returned on failure, checked below.
        let raw = unsafe { sys::llama_init_from_model(model.raw(), cp) };
        let raw = NonNull::new(raw).ok_or_else(|| RuntimeError::Context {
            n_ctx: cp.n_ctx,
            detail: backend::take_last_error(),
        })?;
        Ok(Context {
            raw,
            _model: PhantomData,
        })
    }

    pub fn raw(&self) -> *mut sys::llama_context {
        self.raw.as_ptr()
    }

    /// The context size llama.cpp actually uses (`llama_n_ctx`: the size asked for, padded).
    pub fn n_ctx(&self) -> usize {
        // SAFETY: the context is alive.
        unsafe { sys::llama_n_ctx(self.raw.as_ptr()) as usize }
    }

    /// Forgets positions `pos..` of sequence 0 (`llama_memory_seq_rm(mem, 0, pos, -1)`),
    /// keeping `0..pos`. `false` when the memory cannot drop part of a sequence (some
    /// recurrent or sliding-window caches): the caller then clears it all.
    pub fn forget_from(&mut self, pos: usize) -> bool {
        let Ok(pos) = i32::try_from(pos) else {
            return false;
        };
        // SAFETY: the context is alive; its memory handle is owned by it (null for models
        // without memory: nothing to keep, report failure so the caller clears).
        unsafe {
            let mem = sys::llama_get_memory(self.raw.as_ptr());
            !mem.is_null() && sys::llama_memory_seq_rm(mem, 0, pos, -1)
        }
    }

    /// Empties the KV cache / memory, data included (`llama_memory_clear(mem, true)`).
    pub fn clear_memory(&mut self) {
        // SAFETY: the context is alive; its memory handle is owned by it (null for models
        // without memory, then there is nothing to clear).
        unsafe {
            let mem = sys::llama_get_memory(self.raw.as_ptr());
            if !mem.is_null() {
                sys::llama_memory_clear(mem, true);
            }
        }
    }

    /// `llama_decode` of `batch` (its length must not exceed the context's n_batch).
    pub fn decode(&mut self, batch: &Batch) -> Result<()> {
        backend::clear_last_error();
        // SAFETY: the context is alive; `batch` is a llama_batch_init batch whose arrays hold
        // `n_tokens` valid entries (Batch::push keeps n_tokens ≤ capacity), each with one
        // sequence id (0). llama_decode validates token ids and positions itself (returning -1).
        let code = unsafe { sys::llama_decode(self.raw.as_ptr(), batch.raw) };
        if code != 0 {
            return Err(RuntimeError::Decode {
                code,
                n_tokens: batch.len(),
                detail: backend::take_last_error(),
            });
        }
        Ok(())
    }

    /// The logits of output `i` of the last decoded batch (`llama_get_logits_ith`; `-1` is the
    /// last output), borrowed until the next decode.
    pub fn logits(&self, i: i32, n_vocab: usize) -> Result<&[f32]> {
        // SAFETY: the context is alive; llama_get_logits_ith returns null for an index without
        // logits (checked below), else a pointer to n_vocab floats owned by the context, valid
        // until the next decode, which needs `&mut self`: the borrow returned here ends first.
        unsafe {
            let p = sys::llama_get_logits_ith(self.raw.as_ptr(), i);
            if p.is_null() {
                return Err(RuntimeError::NoLogits { index: i });
            }
            Ok(std::slice::from_raw_parts(p, n_vocab))
        }
    }
}

/// An owned `llama_batch` (`llama_batch_init` … `llama_batch_free`) for one sequence.
pub(crate) struct Batch {
    raw: sys::llama_batch,
    cap: usize,
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: `raw` came from llama_batch_init and is freed once, here.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

impl Batch {
    /// A batch with room for `cap` tokens (at least 1).
    pub fn new(cap: usize) -> Batch {
        let cap = cap.max(1);
        let n = i32::try_from(cap).expect("batch capacity fits i32 (n_batch is a u32 ≤ n_ctx)");
        // SAFETY: allocates arrays for `n` tokens with one sequence id each; embd = 0 means
        // token input. Allocation failure aborts inside llama.cpp (malloc), as in its examples.
        let raw = unsafe { sys::llama_batch_init(n, 0, 1) };
        assert!(
            !raw.token.is_null() && !raw.seq_id.is_null(),
            "llama_batch_init failed"
        );
        Batch { raw, cap }
    }

    pub fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    /// Appends `token` at position `pos` of sequence 0; `output` asks for its logits.
    pub fn push(&mut self, token: Token, pos: i32, output: bool) {
        let i = self.len();
        assert!(i < self.cap, "batch overflow (a bug in the caller)");
        // SAFETY: `i < cap`, and llama_batch_init allocated `cap` entries for token, pos,
        // n_seq_id, seq_id (each seq_id[i] with room for 1 id) and logits.
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = 0;
            *self.raw.logits.add(i) = output as i8;
        }
        self.raw.n_tokens += 1;
    }
}
