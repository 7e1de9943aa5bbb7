//! Text generation on a [`Session`]: tokenize (optionally through the chat template), decode the
//! prompt in batches, sample with llama.cpp's sampler chain, detokenize.
//!
//! Mirrors llama.cpp's `simple` example: the prompt is tokenized with `add_special` and
//! `parse_special`; greedy sampling when `temp == 0`, else top-k → top-p → temp → dist(seed);
//! generation stops at an end-of-generation token, after `n_predict` tokens, or when the context
//! is full.

use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::error::{Result, RuntimeError};
use super::model::{ChatMessage, Token};
use super::session::Session;

/// llama.h's `LLAMA_DEFAULT_SEED` (a `#define` bindgen does not export): "pick a random seed".
const LLAMA_DEFAULT_SEED: u32 = 0xFFFF_FFFF;

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate (`-n`).
    pub n_predict: usize,
    /// Temperature (`--temp`); 0 is greedy decoding.
    pub temp: f32,
    /// Sampling seed (`--seed`); `None` lets llama.cpp pick one at random.
    pub seed: Option<u32>,
    /// Keep the `k` most likely tokens before sampling (ignored when greedy).
    pub top_k: Option<i32>,
    /// Nucleus sampling threshold in (0, 1] (ignored when greedy).
    pub top_p: Option<f32>,
    /// Wrap the prompt as one user message in the model's chat template (`--chat`).
    pub chat: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            n_predict: 128,
            temp: 0.0,
            seed: None,
            top_k: None,
            top_p: None,
            chat: false,
        }
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-generation token (not included in the output).
    EndOfGeneration,
    /// `n_predict` tokens were generated.
    Length,
    /// The context is full.
    ContextFull,
    /// The caller's callback asked to stop (a stop string, a client that went away).
    Stopped,
}

/// The result of [`Session::generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated text (invalid UTF-8, e.g. a character cut by the token limit, replaced).
    pub text: String,
    /// The generated tokens.
    pub tokens: Vec<Token>,
    /// Tokens in the prompt (after the chat template).
    pub n_prompt: usize,
    /// Prompt tokens whose keys and values were kept from the previous completion (not
    /// decoded again); 0 for [`Session::generate`].
    pub n_cached: usize,
    /// Why it stopped.
    pub stop: StopReason,
}

/// An owned sampler chain (`llama_sampler_chain_init`; freeing the chain frees its samplers).
struct Sampler(NonNull<sys::llama_sampler>);

impl Drop for Sampler {
    fn drop(&mut self) {
        // SAFETY: the chain came from llama_sampler_chain_init and is freed once; it owns the
        // samplers added to it.
        unsafe { sys::llama_sampler_free(self.0.as_ptr()) }
    }
}

impl Sampler {
    fn new(opts: &GenerateOptions) -> Result<Sampler> {
        if !opts.temp.is_finite() || opts.temp < 0.0 {
            return Err(RuntimeError::Invalid(format!(
                "temperature must be a finite number ≥ 0, got {}",
                opts.temp
            )));
        }
        if let Some(k) = opts.top_k {
            if k <= 0 {
                return Err(RuntimeError::Invalid(format!("top-k must be ≥ 1, got {k}")));
            }
        }
        if let Some(p) = opts.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(RuntimeError::Invalid(format!(
                    "top-p must be in (0, 1], got {p}"
                )));
            }
        }
        // SAFETY: plain-data defaults; the chain is null-checked below.
        let chain = unsafe {
            let mut p = sys::llama_sampler_chain_default_params();
            p.no_perf = true;
            sys::llama_sampler_chain_init(p)
        };
        let chain =
            Sampler(NonNull::new(chain).ok_or_else(|| {
                RuntimeError::Invalid("llama.cpp could not create a sampler".into())
            })?);
        let add = |s: *mut sys::llama_sampler| {
            if s.is_null() {
                return Err(RuntimeError::Invalid(
                    "llama.cpp could not create a sampler".into(),
                ));
            }
            // SAFETY: the chain is alive and takes ownership of the non-null sampler `s`.
            unsafe { sys::llama_sampler_chain_add(chain.0.as_ptr(), s) };
            Ok(())
        };
        // Each llama_sampler_init_* below takes plain values (validated above) and returns a
        // new sampler, or null, which `add` checks.
        if opts.temp == 0.0 {
            // SAFETY: see above.
            add(unsafe { sys::llama_sampler_init_greedy() })?;
        } else {
            if let Some(k) = opts.top_k {
                // SAFETY: see above; k ≥ 1.
                add(unsafe { sys::llama_sampler_init_top_k(k) })?;
            }
            if let Some(p) = opts.top_p {
                // SAFETY: see above; 0 < p ≤ 1, min_keep 1.
                add(unsafe { sys::llama_sampler_init_top_p(p, 1) })?;
            }
            // SAFETY: see above; temp > 0 and finite.
            add(unsafe { sys::llama_sampler_init_temp(opts.temp) })?;
            let seed = opts.seed.unwrap_or(LLAMA_DEFAULT_SEED);
            // SAFETY: see above; any seed is valid.
            add(unsafe { sys::llama_sampler_init_dist(seed) })?;
        }
        Ok(chain)
    }
}

/// Turns a stream of token pieces into text, holding back an incomplete UTF-8 character until
/// its remaining bytes arrive.
#[derive(Default)]
struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds `bytes`; returns the text that is complete now.
    fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    // from_utf8 says the first `good` bytes are valid UTF-8.
                    out.push_str(std::str::from_utf8(&self.pending[..good]).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                        // Invalid bytes: replace and go on.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..good + bad);
                        }
                    }
                }
            }
        }
    }

    /// What is left at the end (an incomplete character becomes U+FFFD).
    fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

impl super::Model {
    /// The tokens of a prompt as `generate` decodes it: tokenized with BOS and special tokens,
    /// or with `chat` first wrapped as one user message in the model's chat template.
    pub fn prompt_tokens(&self, prompt: &str, chat: bool) -> Result<Vec<Token>> {
        if chat {
            return self.chat_tokens(&[ChatMessage::new("user", prompt)]);
        }
        self.tokenize(prompt, true, true)
    }

    /// The tokens of a conversation rendered with the model's chat template, ready for the
    /// assistant's answer.
    pub fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<Token>> {
        let text = self.apply_chat_template(messages, true)?;
        let mut t = self.tokenize(&text, true, true)?;
        // A template that writes BOS itself (Gemma's `<bos>`) plus add_special's BOS would
        // give two: keep one.
        if let Some(bos) = self.bos() {
            if t.len() >= 2 && t[0] == bos && t[1] == bos {
                t.remove(0);
            }
        }
        Ok(t)
    }
}

impl Session<'_> {
    /// Generates a continuation of `prompt` (see [`GenerateOptions`]); starts from an empty
    /// memory.
    pub fn generate(&mut self, prompt: &str, opts: &GenerateOptions) -> Result<Generation> {
        self.generate_with(prompt, opts, |_| {})
    }

    /// [`Session::generate`], calling `on_text` with each piece of text as soon as it is
    /// complete UTF-8 (for streaming output).
    pub fn generate_with(
        &mut self,
        prompt: &str,
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let tokens = self.model.prompt_tokens(prompt, opts.chat)?;
        self.clear_memory();
        self.complete(&tokens, opts, &mut |piece| {
            on_text(piece);
            true
        })
    }

    /// How many leading tokens of `tokens` [`Session::complete`] would find in the memory and
    /// not decode again (the shared prefix, all but the last prompt token at most).
    pub fn shared_prefix(&self, tokens: &[Token]) -> usize {
        self.kv_tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
            .min(tokens.len().saturating_sub(1))
    }

    /// Generates a continuation of the prompt `tokens`, reusing the keys and values of the
    /// longest prefix it shares with what the memory holds from the previous completion (a
    /// follow-up chat turn decodes only what is new). `on_text` gets each piece of text as soon
    /// as it is complete UTF-8 and returns whether to go on ([`StopReason::Stopped`] when
    /// not). The memory must be cleared by the caller whenever the weights change (an expert
    /// session does it on every switch).
    ///
    /// Decoding a prompt in other batches than before can change the last bits of the logits,
    /// so a reused prefix gives the same greedy text as a fresh decode in practice, not by
    /// construction.
    pub fn complete(
        &mut self,
        tokens: &[Token],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let model = self.model;
        let sampler = Sampler::new(opts)?;
        if tokens.is_empty() {
            return Err(RuntimeError::Tokenize("the prompt has no tokens".into()));
        }
        self.check_fits(tokens.len())?;
        // Keep the common prefix, but decode at least the last prompt token (its logits give
        // the first sampled token).
        let shared = self.shared_prefix(tokens);
        let cached = if shared > 0 && self.ctx.forget_from(shared) {
            self.kv_tokens.truncate(shared);
            shared
        } else {
            self.clear_memory();
            0
        };
        // Until the prompt is decoded the memory's content is not known exactly.
        self.kv_tokens.clear();
        self.decode_sequence(&tokens[cached..], cached)?;
        self.kv_tokens.extend_from_slice(tokens);

        let mut out = Generation {
            text: String::new(),
            tokens: Vec::new(),
            n_prompt: tokens.len(),
            n_cached: cached,
            stop: StopReason::Length,
        };
        let mut utf8 = Utf8Stream::default();
        let mut pos = tokens.len();
        let mut batch = super::context::Batch::new(1);
        while out.tokens.len() < opts.n_predict {
            // SAFETY: the sampler chain and the context are alive; index -1 is the last
            // output of the previous decode, which asked for logits of its last token.
            let tok = unsafe { sys::llama_sampler_sample(sampler.0.as_ptr(), self.ctx.raw(), -1) };
            if model.is_eog(tok) {
                out.stop = StopReason::EndOfGeneration;
                break;
            }
            out.tokens.push(tok);
            let piece = utf8.push(&model.token_to_piece(tok, true));
            if !piece.is_empty() {
                out.text.push_str(&piece);
                if !on_text(&piece) {
                    out.stop = StopReason::Stopped;
                    break;
                }
            }
            if out.tokens.len() == opts.n_predict {
                break;
            }
            if pos >= self.n_ctx as usize {
                out.stop = StopReason::ContextFull;
                break;
            }
            batch.clear();
            batch.push(tok, pos as i32, true);
            if let Err(e) = self.ctx.decode(&batch) {
                self.kv_tokens.clear();
                return Err(e);
            }
            self.kv_tokens.push(tok);
            pos += 1;
        }
        let rest = utf8.finish();
        if !rest.is_empty() && out.stop != StopReason::Stopped {
            out.text.push_str(&rest);
            on_text(&rest);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::Utf8Stream;

    #[test]
    fn utf8_split_across_pieces() {
        let s = "né €😀";
        let b = s.as_bytes();
        let mut u = Utf8Stream::default();
        let mut out = String::new();
        for byte in b {
            out.push_str(&u.push(std::slice::from_ref(byte)));
        }
        out.push_str(&u.finish());
        assert_eq!(out, s);
    }

    #[test]
    fn utf8_invalid_and_truncated() {
        let mut u = Utf8Stream::default();
        assert_eq!(u.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(u.push(b"\xe2\x82"), "");
        assert_eq!(u.finish(), "\u{fffd}");
    }
}
