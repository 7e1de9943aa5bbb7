//! [`Model`]: a GGUF model loaded by llama.cpp's own loader, with its vocabulary, chat template
//! and (discovered on first use) its weight tensors.

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::backend;
use super::error::{Result, RuntimeError};
use super::session::{Session, SessionOptions};
use super::weights::{self, WeightMap};

/// A token id of the model's vocabulary (llama.cpp's `llama_token`).
pub type Token = i32;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Layers to offload to a GPU (llama.cpp's `n_gpu_layers`): 0 keeps everything on the CPU,
    /// a negative number offloads every layer and the output. Without a GPU in the build
    /// ([`super::backend::gpu_offload_supported`]) llama.cpp ignores it.
    pub gpu_layers: i32,
    /// The GPU that holds the model when layers are offloaded to one GPU (llama.cpp's
    /// `main_gpu`, an index among the GPUs of [`super::backend::devices`]).
    pub main_gpu: i32,
    /// Let llama.cpp repack weights for its fast CPU kernels (`use_extra_bufts`). Repacked
    /// tensors still accept whole-tensor writes ([`Session::set_weight`]).
    pub repack: bool,
    /// Threads for the one-token decode of weight discovery (1 when `None`: with cb_eval set
    /// the scheduler runs the graph node by node, and more threads mostly add a
    /// synchronization per node).
    pub threads: Option<usize>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            gpu_layers: 0,
            main_gpu: 0,
            repack: true,
            threads: None,
        }
    }
}

/// Weights of one layer in one backend buffer ([`Model::placement`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The layer (`blk.N`), or `None` for tensors outside the layers.
    pub layer: Option<u32>,
    /// The buffer's name: `CPU`, `CPU_REPACK` (repacked for the fast CPU kernels), or a
    /// device's (`CUDA0`, `Vulkan0`, `Metal` …).
    pub buffer: String,
    /// Weight tensors there.
    pub tensors: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// One message of a chat, for [`Model::apply_chat_template`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with this role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model loaded by `llama_model_load_from_file` without mmap (`LLAMA_LOAD_MODE_NONE`), so its
/// CPU weights live in writable buffers. Owns the `llama_model`; dropping it frees it.
///
/// `Model` is `Send` but not `Sync`: weights are written through a shared `&Model` (by
/// [`Session::set_weight`]), so every session of a model stays on one thread and no decode can
/// read a weight while it is being written.
pub struct Model {
    raw: NonNull<sys::llama_model>,
    path: PathBuf,
    threads: usize,
    weights: OnceCell<WeightMap>,
}

// SAFETY: a llama_model has no thread affinity: it may be used and freed from any thread, one
// thread at a time. `Model` is not `Sync` (the `OnceCell` and the raw pointer keep it so), and the
// weight pointers in `weights` point into buffers owned by this model.
unsafe impl Send for Model {}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: `raw` came from llama_model_load_from_file and is freed once, here. Every
        // Session borrows the Model, so none is alive; the discovery context was freed before
        // `weights` was stored. The weight pointers die with the model and are never used again.
        unsafe { sys::llama_model_free(self.raw.as_ptr()) }
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("path", &self.path).finish()
    }
}

pub(super) fn path_cstring(path: &Path) -> Result<CString> {
    #[cfg(unix)]
    let bytes = {
        use std::os::unix::ffi::OsStrExt;
        path.as_os_str().as_bytes().to_vec()
    };
    #[cfg(not(unix))]
    let bytes = path.to_string_lossy().into_owned().into_bytes();
    CString::new(bytes).map_err(|_| RuntimeError::BadPath { path: path.into() })
}

pub(crate) fn default_threads(threads: Option<usize>) -> Result<usize> {
    match threads {
        Some(0) => Err(RuntimeError::Invalid(
            "thread count must be at least 1".into(),
        )),
        n => Ok(crate::threads::clamp(n)),
    }
}

impl Model {
    /// Loads a GGUF model (a split model through its first part) with llama.cpp
    /// (`llama_model_load_from_file`), without mmap and without lazy loading.
    pub fn load(path: impl AsRef<Path>, opts: &ModelOptions) -> Result<Model> {
        let path = path.as_ref();
        let threads = default_threads(Some(opts.threads.unwrap_or(1)))?;
        backend::init();
        if !path.is_file() {
            return Err(RuntimeError::NotFound { path: path.into() });
        }
        let c_path = path_cstring(path)?;
        // SAFETY: plain-data default parameters; no pointers are set.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.n_gpu_layers = opts.gpu_layers;
        params.main_gpu = opts.main_gpu;
        // mmap'd CPU weights are read-only: writing them would segfault.
        params.load_mode = sys::LLAMA_LOAD_MODE_NONE;
        params.lazy_mode = sys::LLAMA_LAZY_MODE_OFF;
        params.use_extra_bufts = opts.repack;
        backend::clear_last_error();
        // SAFETY: `c_path` is a NUL-terminated string alive for the call; `params` holds only
        // null pointers (devices, overrides, callbacks), which mean "none". The result is null
        // on failure, checked below.
        let raw = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), params) };
        let raw = NonNull::new(raw).ok_or_else(|| RuntimeError::Load {
            path: path.into(),
            detail: backend::take_last_error(),
        })?;
        Ok(Model {
            raw,
            path: path.into(),
            threads,
            weights: OnceCell::new(),
        })
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn raw(&self) -> *mut sys::llama_model {
        self.raw.as_ptr()
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: the model is alive; the vocabulary is owned by it and lives as long.
        unsafe { sys::llama_model_get_vocab(self.raw.as_ptr()) }
    }

    /// Opens an inference session (a llama.cpp context) on this model.
    pub fn session(&self, opts: &SessionOptions) -> Result<Session<'_>> {
        Session::new(self, opts)
    }

    /// The weight tensors, found on first call by a one-token decode (see
    /// [`crate::runtime::weights`]) and kept for the model's lifetime.
    pub fn weights(&self) -> Result<&WeightMap> {
        if let Some(w) = self.weights.get() {
            return Ok(w);
        }
        let found = weights::discover(self, self.threads)?;
        Ok(self.weights.get_or_init(|| found))
    }

    /// Where the weights live: per layer (`blk.N.*`; `None` for the tensors outside layers:
    /// embeddings, output, norms) and backend buffer (`CPU`, `CPU_REPACK`, `CUDA0`,
    /// `Vulkan0` …), the tensors and bytes there — in layer order, the non-layer group first.
    pub fn placement(&self) -> Result<Vec<Placement>> {
        let mut groups: BTreeMap<(Option<u32>, String), (usize, u64)> = BTreeMap::new();
        for t in self.weights()?.iter() {
            let layer = crate::format::gguf::block_index(t.name());
            for buffer in std::iter::once(t.buffer_name()).chain(t.copy_buffer_names()) {
                let g = groups.entry((layer, buffer.to_string())).or_default();
                g.0 += 1;
                g.1 += t.nbytes();
            }
        }
        Ok(groups
            .into_iter()
            .map(|((layer, buffer), (tensors, bytes))| Placement {
                layer,
                buffer,
                tensors,
                bytes,
            })
            .collect())
    }

    /// The model's description (`llama_model_desc`, e.g. `llama 135M Q4_1`).
    pub fn description(&self) -> String {
        let mut buf = vec![0u8; 256];
        // SAFETY: the model is alive; llama_model_desc writes at most `buf.len()` bytes
        // including the NUL and returns the length it wanted (snprintf semantics).
        let n =
            unsafe { sys::llama_model_desc(self.raw.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        let n = (n.max(0) as usize).min(buf.len() - 1);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// The string value of metadata key `key` as llama.cpp read it
    /// (`llama_model_meta_val_str`), or `None` when the model has no such key (or the key
    /// holds an interior NUL, which no GGUF key name does).
    pub fn meta_str(&self, key: &str) -> Option<String> {
        let key = std::ffi::CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: the model is alive, `key` is NUL-terminated, and llama_model_meta_val_str
            // writes at most `buf.len()` bytes including the NUL; it returns the length it
            // wanted (snprintf semantics) or -1 when the key is missing.
            let n = unsafe {
                sys::llama_model_meta_val_str(
                    self.raw.as_ptr(),
                    key.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            let n = usize::try_from(n).ok()?;
            if n < buf.len() {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            buf.resize(n + 1, 0);
        }
    }

    /// `general.architecture` (e.g. `llama`, `gemma3`).
    pub fn architecture(&self) -> Option<String> {
        self.meta_str("general.architecture")
    }

    /// Number of parameters (`llama_model_n_params`).
    pub fn n_params(&self) -> u64 {
        // SAFETY: the model is alive.
        unsafe { sys::llama_model_n_params(self.raw.as_ptr()) }
    }

    /// The context length the model was trained with (`llama_model_n_ctx_train`).
    pub fn n_ctx_train(&self) -> u32 {
        // SAFETY: the model is alive.
        unsafe { sys::llama_model_n_ctx_train(self.raw.as_ptr()) }.max(0) as u32
    }

    /// Vocabulary size (`llama_vocab_n_tokens`).
    pub fn n_vocab(&self) -> usize {
        // SAFETY: the vocabulary is alive with the model.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()) }.max(0) as usize
    }

    /// The beginning-of-sequence token, if the vocabulary has one (`llama_vocab_bos`).
    pub fn bos(&self) -> Option<Token> {
        // SAFETY: the vocabulary is alive with the model.
        let t = unsafe { sys::llama_vocab_bos(self.vocab()) };
        (t >= 0).then_some(t)
    }

    /// Whether tokenizing with `add_special` prepends BOS (`llama_vocab_get_add_bos`).
    pub fn adds_bos(&self) -> bool {
        // SAFETY: the vocabulary is alive with the model.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab()) }
    }

    /// Whether tokenizing with `add_special` appends EOS (`llama_vocab_get_add_eos`).
    pub fn adds_eos(&self) -> bool {
        // SAFETY: the vocabulary is alive with the model.
        unsafe { sys::llama_vocab_get_add_eos(self.vocab()) }
    }

    /// Whether `token` ends generation (EOS, EOT, …: `llama_vocab_is_eog`).
    pub fn is_eog(&self, token: Token) -> bool {
        if token < 0 || token as usize >= self.n_vocab() {
            return false;
        }
        // SAFETY: the vocabulary is alive; `token` is in range (checked above).
        unsafe { sys::llama_vocab_is_eog(self.vocab(), token) }
    }

    /// Tokenizes `text` (`llama_tokenize`). `add_special` adds BOS/EOS as the model is
    /// configured to; `parse_special` turns special-token text (`<|im_start|>`) into tokens.
    pub fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<Token>> {
        let len = i32::try_from(text.len()).map_err(|_| {
            RuntimeError::Tokenize(format!("text of {} bytes is too long", text.len()))
        })?;
        let mut toks: Vec<Token> = vec![0; text.len() + 8];
        for _ in 0..2 {
            let cap = i32::try_from(toks.len()).unwrap_or(i32::MAX);
            // SAFETY: `text` is valid for `len` bytes (it need not be NUL-terminated: the
            // length is passed); `toks` has room for `cap` tokens and llama_tokenize writes at
            // most that many, returning minus the needed count when they do not fit.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab(),
                    text.as_ptr().cast(),
                    len,
                    toks.as_mut_ptr(),
                    cap,
                    add_special,
                    parse_special,
                )
            };
            if n == i32::MIN {
                return Err(RuntimeError::Tokenize("too many tokens".into()));
            }
            if n >= 0 {
                toks.truncate(n as usize);
                return Ok(toks);
            }
            toks.resize(n.unsigned_abs() as usize, 0);
        }
        Err(RuntimeError::Tokenize(
            "llama_tokenize kept asking for a larger buffer".into(),
        ))
    }

    /// The bytes of one token (`llama_token_to_piece`; `special` renders control tokens). A
    /// piece may be part of a multi-byte UTF-8 character; invalid tokens give no bytes.
    pub fn token_to_piece(&self, token: Token, special: bool) -> Vec<u8> {
        if token < 0 || token as usize >= self.n_vocab() {
            return Vec::new();
        }
        let mut buf = vec![0u8; 64];
        for _ in 0..2 {
            let cap = i32::try_from(buf.len()).unwrap_or(i32::MAX);
            // SAFETY: the vocabulary is alive, `token` is in range (checked above) and `buf`
            // has room for `cap` bytes; llama_token_to_piece writes at most that many (no NUL)
            // and returns minus the needed length when they do not fit.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab(),
                    token,
                    buf.as_mut_ptr().cast(),
                    cap,
                    0,
                    special,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize(n.unsigned_abs() as usize, 0);
        }
        Vec::new()
    }

    /// The text of a token sequence (pieces concatenated; invalid UTF-8 replaced).
    pub fn detokenize(&self, tokens: &[Token], special: bool) -> String {
        let bytes: Vec<u8> = tokens
            .iter()
            .flat_map(|&t| self.token_to_piece(t, special))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The model's default chat template (`llama_model_chat_template`), if it has one.
    pub fn chat_template(&self) -> Option<String> {
        let p = self.chat_template_ptr()?;
        // SAFETY: a non-null pointer from llama_model_chat_template is a NUL-terminated string
        // owned by the (alive) model.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    /// Whether the model has a chat template (`tokenizer.chat_template`).
    pub fn has_chat_template(&self) -> bool {
        self.chat_template_ptr().is_some()
    }

    fn chat_template_ptr(&self) -> Option<*const c_char> {
        // SAFETY: the model is alive; a null name asks for the default template.
        let p = unsafe { sys::llama_model_chat_template(self.raw.as_ptr(), std::ptr::null()) };
        (!p.is_null()).then_some(p)
    }

    /// Formats `messages` with the model's chat template (`llama_chat_apply_template`, which
    /// knows llama.cpp's built-in templates, not arbitrary Jinja). With `add_assistant` the
    /// text ends with the tokens that open the assistant's reply.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_assistant: bool,
    ) -> Result<String> {
        let tmpl = self
            .chat_template_ptr()
            .ok_or(RuntimeError::NoChatTemplate)?;
        let owned: Vec<(CString, CString)> = messages
            .iter()
            .map(|m| {
                let role = CString::new(m.role.as_str());
                let content = CString::new(m.content.as_str());
                match (role, content) {
                    (Ok(r), Ok(c)) => Ok((r, c)),
                    _ => Err(RuntimeError::ChatTemplate(
                        "a message contains a NUL byte".into(),
                    )),
                }
            })
            .collect::<Result<_>>()?;
        let msgs: Vec<sys::llama_chat_message> = owned
            .iter()
            .map(|(r, c)| sys::llama_chat_message {
                role: r.as_ptr(),
                content: c.as_ptr(),
            })
            .collect();
        let total: usize = messages
            .iter()
            .map(|m| m.content.len() + m.role.len())
            .sum();
        let mut buf = vec![0u8; 2 * total + 256];
        for _ in 0..2 {
            let cap = i32::try_from(buf.len())
                .map_err(|_| RuntimeError::ChatTemplate("conversation too long".into()))?;
            // SAFETY: `tmpl` is the model's NUL-terminated template (alive with the model);
            // `msgs` holds `msgs.len()` messages whose strings live in `owned` for the call;
            // `buf` has room for `cap` bytes and at most that many are written. The return value
            // is the full length, possibly larger than `cap` (then we retry with room).
            let n = unsafe {
                sys::llama_chat_apply_template(
                    tmpl,
                    msgs.as_ptr(),
                    msgs.len(),
                    add_assistant,
                    buf.as_mut_ptr().cast(),
                    cap,
                )
            };
            if n < 0 {
                return Err(RuntimeError::ChatTemplate(
                    "the template is not one llama.cpp supports".into(),
                ));
            }
            let n = n as usize;
            if n <= buf.len() {
                buf.truncate(n);
                return String::from_utf8(buf)
                    .map_err(|_| RuntimeError::ChatTemplate("output is not UTF-8".into()));
            }
            buf.resize(n, 0);
        }
        Err(RuntimeError::ChatTemplate(
            "llama_chat_apply_template kept asking for a larger buffer".into(),
        ))
    }
}
