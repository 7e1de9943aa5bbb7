//! Scoring a short answer to a prompt: does greedy decoding produce exactly this answer, and
//! how likely is it?
//!
//! Greedy decoding from `prompt` produces the answer's tokens `a₁ … aₙ` followed by a newline
//! (or an end-of-generation token) iff, at every step, the most likely next token is that token;
//! after the answer, any token whose text starts with a newline ends it as well (Gemma's
//! vocabulary has `"\n\n"` as one token, which a model trained on blank-line separated text
//! prefers to `"\n"`: the generated text is still the answer followed by a newline).
//! Feeding the prompt and the answer in one batch gives all those next-token distributions at
//! once (teacher forcing), so [`Session::score_answer`] decides the greedy exact match with one
//! decode instead of one per generated token, with the same result — and gets the answer's
//! log-likelihood, a smoother measure than the 0/1 match, from the same logits.
//!
//! Ties between the expected token and another with the very same logit count as a miss
//! (greedy sampling takes the lowest token id among equals; the check here is the strict
//! comparison `logit(expected) > logit(other)` for every other token).

use super::context::Batch;
use super::error::{Result, RuntimeError};
use super::model::Token;
use super::session::Session;

/// How a session answers one question.
#[derive(Clone, Debug, PartialEq)]
pub struct AnswerScore {
    /// Greedy decoding produces exactly the answer, then a newline or an end of generation.
    pub exact: bool,
    /// Σ log p(token) over the answer's tokens (the terminator excluded).
    pub logprob: f64,
    /// Number of answer tokens (the terminator excluded).
    pub tokens: usize,
}

/// Log-softmax value of `logits[i]`.
fn log_prob(logits: &[f32], i: usize) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    f64::from(logits[i] - max) - sum.ln()
}

/// Whether `logits[i]` is strictly larger than every other logit.
fn is_strict_argmax(logits: &[f32], i: usize) -> bool {
    let v = logits[i];
    logits.iter().enumerate().all(|(j, &l)| j == i || l < v)
}

impl Session<'_> {
    /// Scores `answer` (e.g. `" Paris"`, with its leading space) as the continuation of
    /// `prompt`: whether greedy decoding produces exactly it followed by a newline (see the
    /// module docs), and its log-likelihood. Clears the session's memory first.
    ///
    /// The answer's tokens are those the tokenizer gives `prompt + answer + "\n"` after the
    /// prompt's own tokens (so the answer is tokenized in context, as a model would generate
    /// it); if tokenizing in context changes the prompt's tokens, the answer is tokenized on
    /// its own. An empty answer is an error.
    pub fn score_answer(&mut self, prompt: &str, answer: &str) -> Result<AnswerScore> {
        if answer.is_empty() {
            return Err(RuntimeError::Invalid("the answer is empty".into()));
        }
        let model = self.model;
        let prompt_tokens = model.tokenize(prompt, true, false)?;
        let full = model.tokenize(&format!("{prompt}{answer}\n"), true, false)?;
        let expected: Vec<Token> = if full.starts_with(&prompt_tokens) {
            full[prompt_tokens.len()..].to_vec()
        } else {
            model.tokenize(&format!("{answer}\n"), false, false)?
        };
        // The last expected token is the terminator ("\n", possibly merged with the answer's
        // last characters by the tokenizer; then the answer has no separate terminator).
        let newline = model.tokenize("\n", false, false)?;
        let terminated = expected.len() > newline.len() && expected.ends_with(&newline);
        let n_answer = if terminated {
            expected.len() - newline.len()
        } else {
            expected.len()
        };
        if prompt_tokens.is_empty() || n_answer == 0 {
            return Err(RuntimeError::Invalid(format!(
                "cannot score {answer:?} after {prompt:?}: no tokens"
            )));
        }
        // Feed prompt + expected[..last]: the logits after position p predict token p + 1.
        let mut seq = prompt_tokens.clone();
        seq.extend_from_slice(&expected[..expected.len() - 1]);
        self.check_fits(seq.len())?;
        let n_vocab = model.n_vocab();
        if let Some(&bad) = seq.iter().find(|&&t| t < 0 || t as usize >= n_vocab) {
            return Err(RuntimeError::Invalid(format!(
                "token {bad} is outside the vocabulary (0..{n_vocab})"
            )));
        }
        self.clear_memory();
        let first_scored = prompt_tokens.len() - 1;
        let mut batch = Batch::new(self.n_batch as usize);
        let mut rows: Vec<Vec<f32>> = Vec::with_capacity(expected.len());
        for (c, chunk) in seq.chunks(self.n_batch as usize).enumerate() {
            batch.clear();
            // llama_get_logits_ith takes the token's index in the batch.
            let mut outputs = Vec::new();
            for (k, &t) in chunk.iter().enumerate() {
                let pos = c * self.n_batch as usize + k;
                let out = pos >= first_scored;
                batch.push(t, pos as i32, out);
                if out {
                    outputs.push(k as i32);
                }
            }
            self.ctx.decode(&batch)?;
            for idx in outputs {
                rows.push(self.ctx.logits(idx, n_vocab)?.to_vec());
            }
        }
        let eog_ok = |row: &[f32]| {
            // Greedy stops at an end-of-generation token, or its text has a newline right after
            // the answer (a token starting with one, e.g. "\n\n").
            let best = row
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |a, (j, &l)| {
                    if l > a.1 {
                        (j, l)
                    } else {
                        a
                    }
                })
                .0;
            model.is_eog(best as Token)
                || model.token_to_piece(best as Token, false).first() == Some(&b'\n')
        };
        let checks: Vec<(bool, f64)> = rows
            .iter()
            .zip(&expected)
            .enumerate()
            .map(|(k, (row, &tok))| {
                let hit = is_strict_argmax(row, tok as usize);
                let lp = if k < n_answer {
                    log_prob(row, tok as usize)
                } else {
                    0.0
                };
                // The terminator position may also end with an end-of-generation token or
                // another token starting with a newline.
                (hit || (k >= n_answer && eog_ok(row)), lp)
            })
            .collect();
        Ok(AnswerScore {
            exact: checks.iter().all(|c| c.0),
            logprob: checks.iter().map(|c| c.1).sum(),
            tokens: n_answer,
        })
    }
}
