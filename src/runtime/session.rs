//! [`Session`]: an inference context on a [`Model`] — weight writes, raw logits, and (in
//! sibling modules) generation and perplexity.

use llama_cpp_sys_2 as sys;

use super::context::{Batch, Context, ContextParams};
use super::error::{Result, RuntimeError};
use super::model::{default_threads, Model, Token};
use crate::quant::Requant;

/// How to create a [`Session`].
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Context size in tokens (`-c`); 0 takes the model's training context, as llama.cpp's
    /// `-c 0`. llama.cpp rounds the KV cache up to a multiple of 256, but ggmerge uses this
    /// value as the limit (prompt length, perplexity chunk size).
    pub n_ctx: u32,
    /// Tokens per `llama_decode` call (clamped to `n_ctx`).
    pub n_batch: u32,
    /// Threads (`-t`; all cores when `None`).
    pub threads: Option<usize>,
    /// How an [`ExpertSession`](super::ExpertSession) requantizes the tensors a mixture
    /// changes (`--requant`; the same bytes as `ggmerge apply --requant` without `--seed`). A
    /// plain session ignores it.
    pub requant: Requant,
}

impl SessionOptions {
    /// Checks the options without a model, so a command can refuse bad arguments before it
    /// spends seconds loading one.
    pub fn validate(&self) -> Result<()> {
        if self.n_ctx > i32::MAX as u32 {
            return Err(RuntimeError::Invalid(format!(
                "context size {} is too large",
                self.n_ctx
            )));
        }
        if self.n_batch == 0 {
            return Err(RuntimeError::Invalid(
                "batch size must be at least 1".into(),
            ));
        }
        if self.threads == Some(0) {
            return Err(RuntimeError::Invalid(
                "thread count must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            n_ctx: 4096,
            n_batch: 2048,
            threads: None,
            requant: Requant::DEFAULT,
        }
    }
}

/// An inference session: owns a `llama_context` on a borrowed [`Model`] (so it cannot outlive
/// it); dropping it frees the context.
///
/// Weights are the model's: [`Session::set_weight`] changes them for every session of the model,
/// and clears only this session's memory (call [`Session::clear_memory`] on the others).
pub struct Session<'m> {
    pub(super) ctx: Context<'m>,
    pub(super) model: &'m Model,
    pub(super) n_ctx: u32,
    pub(super) n_batch: u32,
    /// The tokens whose keys and values the memory holds, from position 0, as far as
    /// [`Session::complete`] knows (every other path clears the memory first and leaves this
    /// empty, which only costs a prefix that could have been reused).
    pub(super) kv_tokens: Vec<Token>,
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("model", &self.model.path())
            .field("n_ctx", &self.n_ctx)
            .field("n_batch", &self.n_batch)
            .finish()
    }
}

impl<'m> Session<'m> {
    /// Creates a context (`llama_init_from_model`) with `opts`.
    pub fn new(model: &'m Model, opts: &SessionOptions) -> Result<Session<'m>> {
        opts.validate()?;
        // 0: the model's training context, as llama.cpp's `-c 0`.
        let n_ctx = match opts.n_ctx {
            0 => model.n_ctx_train().max(1),
            n => n,
        };
        let n_batch = opts.n_batch.min(n_ctx);
        let ctx = Context::new(
            model,
            &ContextParams {
                n_ctx,
                n_batch,
                threads: default_threads(opts.threads)?,
                cb_eval: None,
                cb_eval_user_data: std::ptr::null_mut(),
            },
        )?;
        Ok(Session {
            ctx,
            model,
            n_ctx,
            n_batch,
            kv_tokens: Vec::new(),
        })
    }

    /// The model.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// The context size asked for (the limit ggmerge enforces).
    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    /// Tokens per decode call.
    pub fn n_batch(&self) -> u32 {
        self.n_batch
    }

    /// Forgets everything decoded so far (KV cache included: `llama_memory_clear`).
    pub fn clear_memory(&mut self) {
        self.ctx.clear_memory();
        self.kv_tokens.clear();
    }

    /// Overwrites the whole weight tensor `name` with `bytes` (see [`Session::write_weight`]),
    /// then clears this session's memory.
    pub fn set_weight(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.write_weight(name, bytes)?;
        self.clear_memory();
        Ok(())
    }

    /// Overwrites the whole weight tensor `name` with `bytes` (its type's encoding, exactly
    /// [`WeightTensor::nbytes`](super::WeightTensor::nbytes) long) through
    /// `ggml_backend_tensor_set`, without clearing the memory — for writing many tensors, then
    /// calling [`Session::clear_memory`] once (the KV cache is stale until then). Repacked
    /// tensors are repacked from `bytes` by their buffer. Weights are never read back: keep
    /// the bytes you may want to restore.
    pub fn write_weight(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let weights = self.model.weights()?;
        let t = weights
            .get(name)
            .ok_or_else(|| RuntimeError::UnknownTensor { name: name.into() })?;
        if bytes.len() as u64 != t.nbytes() {
            return Err(RuntimeError::WeightSize {
                name: name.into(),
                expected: t.nbytes(),
                found: bytes.len() as u64,
                ty: t.ty().to_string(),
            });
        }
        // Every copy of a tied tensor (see runtime::weights) has the same type and shape.
        for raw in t.raws() {
            // SAFETY: `raw` is a weight tensor of the model (or a copy of one), alive while
            // `self.model` is, and has a buffer (discovery keeps only tensors with one). offset
            // 0 + size ggml_nbytes(raw) is the whole tensor, as every buffer type requires (the
            // repack buffer asserts exactly this). `bytes` holds that many readable bytes
            // (checked above; copies share the type and shape). No decode runs meanwhile: Model
            // is not Sync, so every session of it is on this thread, and `&mut self` excludes a
            // decode of this one. The CPU buffer is writable because the model was loaded
            // without mmap.
            unsafe { sys::ggml_backend_tensor_set(raw, bytes.as_ptr().cast(), 0, bytes.len()) };
        }
        Ok(())
    }

    /// Clears the memory, decodes `tokens` from position 0 and returns the logits after the
    /// last one (`n_vocab` floats).
    pub fn logits_for(&mut self, tokens: &[Token]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(RuntimeError::Invalid(
                "logits_for needs at least one token".into(),
            ));
        }
        self.check_fits(tokens.len())?;
        self.clear_memory();
        self.decode_sequence(tokens, 0)?;
        Ok(self.ctx.logits(-1, self.model.n_vocab())?.to_vec())
    }

    /// Errors unless `n` tokens fit in the context.
    pub(super) fn check_fits(&self, n: usize) -> Result<()> {
        if n > self.n_ctx as usize {
            return Err(RuntimeError::PromptTooLong {
                tokens: n,
                n_ctx: self.n_ctx,
            });
        }
        Ok(())
    }

    /// Decodes `tokens` at positions `pos0..` in batches of `n_batch`, asking for the logits of
    /// the last token only.
    pub(super) fn decode_sequence(&mut self, tokens: &[Token], pos0: usize) -> Result<()> {
        let n_vocab = self.model.n_vocab();
        if let Some(&bad) = tokens.iter().find(|&&t| t < 0 || t as usize >= n_vocab) {
            return Err(RuntimeError::Invalid(format!(
                "token {bad} is outside the vocabulary (0..{n_vocab})"
            )));
        }
        let mut batch = Batch::new(self.n_batch as usize);
        let Some(last) = tokens.len().checked_sub(1) else {
            return Ok(());
        };
        for (c, chunk) in tokens.chunks(self.n_batch as usize).enumerate() {
            batch.clear();
            for (k, &t) in chunk.iter().enumerate() {
                let i = c * self.n_batch as usize + k;
                batch.push(t, (pos0 + i) as i32, i == last);
            }
            self.ctx.decode(&batch)?;
        }
        Ok(())
    }
}
