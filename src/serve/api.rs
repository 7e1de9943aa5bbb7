//! The OpenAI API's request and response shapes that the server speaks, plus ggmerge's
//! extensions: `experts` (a mixture by expert name, what the `openai` client sends through
//! `extra_body`) and `merge_method` in requests, and a `ggmerge` object in responses saying
//! which mixture answered and how long its switch took.
//!
//! Fields clients send that the server does not use (`frequency_penalty`, `user`, …) are
//! accepted and ignored, as llama-server does; values that are used are checked here, each
//! error naming the field ([`ApiError`]).

use std::collections::BTreeMap;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with its HTTP
/// status.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for people.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, `authentication_error`, `server_error`).
    pub kind: &'static str,
    /// The request field at fault, if one.
    pub param: Option<String>,
    /// A machine-readable code (`context_length_exceeded`, `model_not_found`, …).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error` about field `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    /// The same error with a code.
    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// A 5xx `server_error`.
    pub fn server(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some(code),
        }
    }

    /// 503 `shutting_down`: the inference thread is gone or going.
    pub fn shutting_down() -> ApiError {
        ApiError::server(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        )
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// `stop`: one string or a list.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Up to four.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the token counts.
    #[serde(default)]
    pub include_usage: bool,
}

/// A message's content: a string, or a list of parts of which the text ones are used.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// `[{"type": "text", "text": …}, …]`.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    /// `text` (other kinds are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

/// One chat message.
#[derive(Clone, Debug, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (or another role the template knows).
    pub role: String,
    /// The text (`null` for an assistant message with tool calls, which are not supported).
    #[serde(default)]
    pub content: Option<Content>,
}

/// The fields chat and text completion requests share.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Sampling {
    /// A model id of `GET /v1/models`: `base`, an expert, or a preset.
    #[serde(default)]
    pub model: Option<String>,
    /// Most tokens to generate (`max_completion_tokens` wins when both are given).
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Same as `max_tokens`, OpenAI's newer name.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// 0 is greedy; default 0.8 (llama-server's).
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus sampling, in (0, 1].
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Sampling seed (its low 32 bits).
    #[serde(default)]
    pub seed: Option<i64>,
    /// Stop strings (not included in the output).
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Completions per prompt: 1 only.
    #[serde(default)]
    pub n: Option<i64>,
    /// ggmerge: the mixture, expert name → weight (experts not named get 0); overrides `model`.
    #[serde(default)]
    pub experts: Option<BTreeMap<String, f64>>,
    /// ggmerge: how the experts' deltas combine (`task_arithmetic`, `ties`, `dare_ties`,
    /// `dare_linear`); default: the server's `--method`.
    #[serde(default)]
    pub merge_method: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Model, sampling and mixture.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `prompt`: a string, or a list holding one string.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptText {
    /// One prompt.
    One(String),
    /// A list (one prompt only).
    Many(Vec<String>),
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    /// The text to continue.
    pub prompt: PromptText,
    /// Model, sampling and mixture.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `POST /experts`: load a pack from the server's `--expert-dir`.
#[derive(Clone, Debug, Deserialize)]
pub struct LoadExpert {
    /// The pack's file name in the expert directory (no directories).
    pub file: String,
    /// The expert's name (default: the file name without `.dpk.gguf`).
    #[serde(default)]
    pub name: Option<String>,
}

/// Token counts of a response.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens (after the chat template).
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
    /// Prompt tokens whose keys and values were reused from the previous request under the
    /// same mixture.
    pub prompt_tokens_details: PromptDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct PromptDetails {
    /// Prompt tokens not decoded again.
    pub cached_tokens: usize,
}
