//! Perplexity with the chunking of llama.cpp's `llama-perplexity` (`perplexity()` in
//! `tools/perplexity/perplexity.cpp`), reproduced here:
//!
//! - The whole text is tokenized with `add_special = true`, `parse_special = false`
//!   (`common_tokenize(ctx, prompt, true)`), so BOS is prepended when the vocabulary adds it.
//!   A tokenizer that appends EOS is refused (it asserts `!llama_vocab_get_add_eos`).
//! - At least `2·n_ctx` tokens are required; the text is cut into `n_chunk = n_tokens / n_ctx`
//!   consecutive chunks of `n_ctx` tokens (a partial last chunk is dropped).
//! - For each chunk the memory is cleared (`llama_memory_clear(mem, true)`) and its tokens are
//!   decoded at positions `0..n_ctx` in batches of `n_batch`; when the vocabulary adds BOS, the
//!   first token of every chunk is replaced by BOS for the decode.
//! - Logits are requested for positions `pos >= first = n_ctx/2`. The logits at positions
//!   `first ..= n_ctx-2` score tokens `first+1 ..= n_ctx-1` of the chunk: `n_ctx - first - 1`
//!   values per chunk, each `-log softmax(logits)[next]` computed as llama.cpp does (max
//!   subtracted, `expf` summed in double).
//! - `ppl = exp(Σ nll / count)`; the uncertainty is llama-perplexity's
//!   `ppl · sqrt((⟨nll²⟩ − ⟨nll⟩²)/(count − 1))`; `running` holds the values it prints after
//!   each chunk (`[1]…,[2]…`).
//!
//! One difference: llama-perplexity packs `n_batch / n_ctx` chunks into one decode as parallel
//! sequences; ggmerge decodes one chunk at a time. The arithmetic is the same per position, so
//! results agree up to floating-point summation order inside llama.cpp's kernels.

use rayon::prelude::*;

use super::context::Batch;
use super::error::{Result, RuntimeError};
use super::session::Session;
use crate::progress::Progress;

/// The result of [`Session::perplexity`].
#[derive(Debug, Clone)]
pub struct Perplexity {
    /// exp(mean negative log-likelihood) over all scored tokens.
    pub ppl: f64,
    /// Its standard error (llama-perplexity's `+/-`).
    pub ppl_err: f64,
    /// Each chunk's own perplexity.
    pub chunk_ppl: Vec<f64>,
    /// The running estimate after each chunk, as llama-perplexity prints it.
    pub running: Vec<f64>,
    /// Tokens in the text (BOS included).
    pub n_tokens: usize,
    /// Chunk (context) size.
    pub n_ctx: u32,
    /// Tokens scored.
    pub n_scored: usize,
}

/// `-log p(tok)` from raw logits, as llama-perplexity's `log_softmax`.
fn nll(logits: &[f32], tok: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum_exp: f64 = logits.iter().map(|&l| f64::from((l - max).exp())).sum();
    -(f64::from(logits[tok] - max) - sum_exp.ln())
}

/// Calls `finish` when dropped, so the progress ends on every path.
struct Finish<'a>(&'a dyn Progress);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

impl Session<'_> {
    /// Perplexity of `text` with chunks of this session's `n_ctx` tokens (see the module docs).
    /// `progress` gets `start(n_chunks)`, then `advance(1)` per chunk and `finish()`.
    pub fn perplexity(&mut self, text: &str, progress: &dyn Progress) -> Result<Perplexity> {
        let model = self.model;
        let n_ctx = self.n_ctx as usize;
        if n_ctx < 4 {
            return Err(RuntimeError::Invalid(format!(
                "perplexity needs a context of at least 4 tokens, got {n_ctx}"
            )));
        }
        if model.adds_eos() {
            return Err(RuntimeError::AddsEos);
        }
        let tokens = model.tokenize(text, true, false)?;
        if tokens.len() < 2 * n_ctx {
            return Err(RuntimeError::TextTooShort {
                tokens: tokens.len(),
                needed: 2 * n_ctx,
                n_ctx: self.n_ctx,
            });
        }
        let bos = if model.adds_bos() { model.bos() } else { None };
        let n_vocab = model.n_vocab();
        let n_batch = self.n_batch as usize;
        let n_chunk = tokens.len() / n_ctx;
        let first = n_ctx / 2;

        progress.start(n_chunk as u64);
        let _finish = Finish(progress);
        let mut batch = Batch::new(n_batch);
        let (mut sum, mut sum2, mut count) = (0f64, 0f64, 0usize);
        let mut chunk_ppl = Vec::with_capacity(n_chunk);
        let mut running = Vec::with_capacity(n_chunk);
        for i in 0..n_chunk {
            let chunk = &tokens[i * n_ctx..(i + 1) * n_ctx];
            self.clear_memory();
            let mut chunk_nll = 0f64;
            for j0 in (0..n_ctx).step_by(n_batch) {
                let j1 = (j0 + n_batch).min(n_ctx);
                batch.clear();
                let mut outputs = Vec::new();
                for (pos, &tok) in chunk.iter().enumerate().take(j1).skip(j0) {
                    let tok = match bos {
                        Some(b) if pos == 0 => b,
                        _ => tok,
                    };
                    let out = pos >= first;
                    if out && pos + 1 < n_ctx {
                        outputs.push(((pos - j0) as i32, chunk[pos + 1] as usize));
                    }
                    batch.push(tok, pos as i32, out);
                }
                self.ctx.decode(&batch)?;
                let rows: Vec<&[f32]> = outputs
                    .iter()
                    .map(|&(idx, _)| self.ctx.logits(idx, n_vocab))
                    .collect::<Result<_>>()?;
                let vals: Vec<f64> = rows
                    .par_iter()
                    .zip(outputs.par_iter())
                    .map(|(l, &(_, next))| nll(l, next))
                    .collect();
                for v in vals {
                    sum += v;
                    sum2 += v * v;
                    chunk_nll += v;
                }
            }
            let scored = n_ctx - first - 1;
            count += scored;
            chunk_ppl.push((chunk_nll / scored as f64).exp());
            running.push((sum / count as f64).exp());
            progress.advance(1);
        }
        let mean = sum / count as f64;
        let ppl = mean.exp();
        let var = sum2 / count as f64 - mean * mean;
        let ppl_err = if var > 0.0 && count > 1 {
            ppl * (var / (count - 1) as f64).sqrt()
        } else {
            0.0
        };
        Ok(Perplexity {
            ppl,
            ppl_err,
            chunk_ppl,
            running,
            n_tokens: tokens.len(),
            n_ctx: self.n_ctx,
            n_scored: count,
        })
    }
}
