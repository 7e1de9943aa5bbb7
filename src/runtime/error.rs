//! [`RuntimeError`]: every way the llama.cpp runtime layer can fail, with the file, tensor or
//! numbers the user needs to fix it.

use std::path::PathBuf;

/// An error of the llama.cpp runtime ([`crate::runtime`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The model file does not exist (or is not a file).
    #[error("{}: no such model file", path.display())]
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// The path cannot be passed to C (it contains a NUL byte).
    #[error("{}: the path contains a NUL byte", path.display())]
    BadPath {
        /// The path given.
        path: PathBuf,
    },
    /// llama.cpp refused to load the model.
    #[error("{}: llama.cpp could not load the model{}", path.display(), detail_suffix(detail))]
    Load {
        /// The model file.
        path: PathBuf,
        /// llama.cpp's last error message, if it logged one.
        detail: String,
    },
    /// llama.cpp could not create an inference context.
    #[error(
        "llama.cpp could not create a context (n_ctx {n_ctx}){}",
        detail_suffix(detail)
    )]
    Context {
        /// The context size asked for.
        n_ctx: u32,
        /// llama.cpp's last error message, if it logged one.
        detail: String,
    },
    /// `llama_decode` failed.
    #[error(
        "llama.cpp failed to decode a batch of {n_tokens} tokens (code {code}){}",
        detail_suffix(detail)
    )]
    Decode {
        /// `llama_decode`'s return value (1: no room in the KV cache, 2: aborted, <0: error).
        code: i32,
        /// Tokens in the batch.
        n_tokens: usize,
        /// llama.cpp's last error message, if it logged one.
        detail: String,
    },
    /// llama.cpp gave no logits where some were expected.
    #[error("llama.cpp returned no logits for output {index}")]
    NoLogits {
        /// The batch index asked for.
        index: i32,
    },
    /// The text could not be tokenized.
    #[error("cannot tokenize the text: {0}")]
    Tokenize(String),
    /// The prompt does not fit in the context.
    #[error("the prompt is {tokens} tokens but the context holds {n_ctx}: shorten the prompt or raise the context size (-c)")]
    PromptTooLong {
        /// Prompt tokens.
        tokens: usize,
        /// The context size.
        n_ctx: u32,
    },
    /// A perplexity text is shorter than two context windows (llama-perplexity's rule).
    #[error("perplexity needs at least {needed} tokens (2 × context {n_ctx}) but the text has {tokens}: use a longer text or a smaller context (-c)")]
    TextTooShort {
        /// Tokens in the text.
        tokens: usize,
        /// Tokens needed.
        needed: usize,
        /// The context (chunk) size.
        n_ctx: u32,
    },
    /// The model's tokenizer adds EOS, which perplexity cannot handle (as in llama-perplexity).
    #[error("the model's tokenizer appends EOS to every text; perplexity is not defined for it")]
    AddsEos,
    /// The model has no weight tensor of this name.
    #[error("the model has no weight tensor {name:?}")]
    UnknownTensor {
        /// The name asked for.
        name: String,
    },
    /// Bytes for a weight are not exactly the tensor's size.
    #[error("tensor {name:?} is {expected} bytes ({ty}), got {found}")]
    WeightSize {
        /// The tensor.
        name: String,
        /// `ggml_nbytes` of the tensor.
        expected: u64,
        /// Bytes given.
        found: u64,
        /// The tensor's type.
        ty: String,
    },
    /// A weight tensor has a ggml type that ggmerge does not know.
    #[error("tensor {name:?} has ggml type id {id}, unknown to ggmerge")]
    UnknownType {
        /// The tensor.
        name: String,
        /// The ggml type id.
        id: u32,
    },
    /// Weight discovery found something inconsistent.
    #[error("weight discovery: {0}")]
    Discovery(String),
    /// The model has no chat template.
    #[error("the model has no chat template (tokenizer.chat_template)")]
    NoChatTemplate,
    /// llama.cpp cannot apply the model's chat template.
    #[error("llama.cpp cannot apply the model's chat template: {0}")]
    ChatTemplate(String),
    /// An option is out of range.
    #[error("{0}")]
    Invalid(String),
    /// Only methods that combine packs can mix experts at run time.
    #[error("experts at run time combine with task_arithmetic, ties, dare_ties or dare_linear, not {method}")]
    Method {
        /// The method asked for.
        method: &'static str,
    },
    /// A mixture names an expert the session does not have.
    #[error("unknown expert {name:?}; known: {known}")]
    UnknownExpert {
        /// The name given.
        name: String,
        /// The session's experts.
        known: String,
    },
    /// A mixture names an expert twice.
    #[error("expert {name} is given twice; give each expert once")]
    DuplicateExpert {
        /// The expert.
        name: String,
    },
    /// An expert's weight is not a usable number.
    #[error(
        "weight {value:?} of expert {expert} is not a finite number of at most 3.4e38 in magnitude"
    )]
    ExpertWeight {
        /// The expert.
        expert: String,
        /// The weight as given.
        value: String,
    },
    /// A mixture entry is not `name=weight`.
    #[error("{part:?}: write name=weight, e.g. math=1 code=0.3")]
    MixtureSyntax {
        /// The entry.
        part: String,
    },
    /// A mixture has another number of weights than the session has experts.
    #[error("{given} weights for {experts} experts")]
    WeightCount {
        /// Weights given.
        given: usize,
        /// Experts of the session.
        experts: usize,
    },
    /// Planning or computing a mixture failed.
    #[error(transparent)]
    Merge(#[from] crate::merge::MergeError),
    /// Opening or checking a delta pack failed.
    #[error(transparent)]
    Delta(#[from] crate::delta::DeltaError),
    /// Reading a file failed.
    #[error(transparent)]
    Format(#[from] crate::format::FormatError),
    /// The thread pool could not be made.
    #[error(transparent)]
    Threads(#[from] crate::threads::ThreadsError),
    /// Training failed ([`crate::runtime::train`]).
    #[error(transparent)]
    Train(Box<crate::runtime::train::TrainError>),
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

/// Result of the runtime layer.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
