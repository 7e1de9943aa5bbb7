//! The HTTP side: axum routes that parse and check requests, resolve the mixture, queue a job
//! for the inference thread, and turn its events into OpenAI responses — JSON, or server-sent
//! events when streaming. Nothing here touches llama.cpp; paths and sizes from the network are
//! checked before anything uses them (a pack is loaded only by file name from the configured
//! expert directory, bodies are bounded).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path as UrlPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::merge::config::number_fits_f32;
use crate::merge::method::Method;
use crate::runtime::{ChatMessage, GenerateOptions};
use crate::serve::api::{
    ApiError, ChatRequest, CompletionRequest, Content, LoadExpert, PromptText, Sampling, Stop,
    Usage,
};
use crate::serve::metrics::Metrics;
use crate::serve::worker::{Catalog, Control, Done, Event, Job, Mixture, Prompt, Queue, Started};

/// Default sampling temperature (llama-server's).
pub const DEFAULT_TEMPERATURE: f64 = 0.8;
/// Most stop strings per request (OpenAI's limit).
pub const MAX_STOPS: usize = 4;

/// Everything the handlers share.
pub struct AppState {
    /// Jobs for the inference thread.
    pub queue: Arc<Queue>,
    /// Experts and the loaded mixture, as the inference thread published them.
    pub catalog: Arc<RwLock<Catalog>>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Named mixtures (`--preset`).
    pub presets: Vec<(String, BTreeMap<String, f64>)>,
    /// The default combination.
    pub method: Method,
    /// Required `Authorization: Bearer` key, if any.
    pub api_key: Option<String>,
    /// Where `POST /experts` may load packs from.
    pub expert_dir: Option<PathBuf>,
    /// Request ids.
    pub next_id: AtomicU64,
    /// Server start (Unix seconds), the models' `created`.
    pub created: u64,
}

impl AppState {
    fn catalog(&self) -> std::sync::RwLockReadGuard<'_, Catalog> {
        self.catalog.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// The page at `/` (and everything it needs: it is self-contained).
const PAGE: &str = include_str!("page.html");

/// The routes, with the body limit and the API key check.
pub fn router(state: Arc<AppState>, body_limit: usize) -> Router {
    let protected = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/experts", get(list_experts).post(load_expert))
        .route("/experts/{name}", delete(remove_expert))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(health))
        .merge(protected)
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("not_found"),
            }
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Refuses requests without the configured API key (401, OpenAI's shape).
async fn authorize(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes()));
        if !ok {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: if given.is_some() {
                    "incorrect API key".into()
                } else {
                    "missing API key: send Authorization: Bearer KEY".into()
                },
                kind: "authentication_error",
                param: None,
                code: Some("invalid_api_key"),
            }
            .into_response();
        }
    }
    next.run(req).await
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Json` whose rejections are OpenAI-shaped errors (400 malformed JSON, 413 too large).
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(e) => {
                let status = e.status();
                let (code, message) = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    (
                        "request_too_large",
                        "the request body is larger than the server accepts (--max-body)"
                            .to_string(),
                    )
                } else if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
                    (
                        "invalid_content_type",
                        "send the body as application/json".to_string(),
                    )
                } else {
                    (
                        "invalid_json",
                        format!("the request body is not a valid request: {}", e.body_text()),
                    )
                };
                Err(ApiError {
                    status,
                    message,
                    kind: "invalid_request_error",
                    param: None,
                    code: Some(code),
                })
            }
        }
    }
}

async fn health(State(state): State<Arc<AppState>>) -> Json<Value> {
    let c = state.catalog();
    Json(json!({
        "status": "ok",
        "model": c.description,
        "experts": c.experts.len(),
        "queue": state.queue.len(),
    }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// The models: `base`, each expert alone, each preset.
fn model_list(state: &AppState) -> Vec<(String, BTreeMap<String, f64>)> {
    let c = state.catalog();
    let mut out = vec![("base".to_string(), BTreeMap::new())];
    for e in &c.experts {
        out.push((e.name.clone(), [(e.name.clone(), 1.0)].into()));
    }
    out.extend(state.presets.iter().cloned());
    out
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = model_list(&state)
        .into_iter()
        .map(|(id, mixture)| {
            json!({
                "id": id,
                "object": "model",
                "created": state.created,
                "owned_by": "ggmerge",
                "mixture": mixture,
            })
        })
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

async fn list_experts(State(state): State<Arc<AppState>>) -> Json<Value> {
    let c = state.catalog();
    Json(json!({
        "experts": c.experts,
        "loaded": c.loaded.as_ref().map(|m| json!({
            "experts": m.weights,
            "merge_method": m.method.name(),
        })),
        "presets": state.presets.iter().map(|(n, m)| json!({"id": n, "mixture": m})).collect::<Vec<_>>(),
        "expert_dir": state.expert_dir.is_some(),
    }))
}

/// A name for an expert or preset: letters, digits, `_ - .`, at most 64 bytes.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

/// The pack `file` in `dir`, if it is a plain file name of a regular file directly in `dir`
/// (no directories, no `..`, no link leading elsewhere).
fn pack_in(dir: &Path, file: &str) -> Result<PathBuf, ApiError> {
    let bad = |m: &str| ApiError::invalid("file", m);
    if file.is_empty()
        || file.len() > 255
        || file.contains(['/', '\\', '\0'])
        || file == "."
        || file == ".."
    {
        return Err(bad(
            "give the pack's file name in the server's expert directory, without directories",
        ));
    }
    let dir = dir.canonicalize().map_err(|_| {
        ApiError::server(
            StatusCode::INTERNAL_SERVER_ERROR,
            "expert_dir",
            "the expert directory is not readable",
        )
    })?;
    let path = dir.join(file);
    let real = path
        .canonicalize()
        .map_err(|_| bad("no such pack in the expert directory"))?;
    if real.parent() != Some(dir.as_path()) || !real.is_file() {
        return Err(bad("no such pack in the expert directory"));
    }
    Ok(real)
}

async fn load_expert(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<LoadExpert>,
) -> Result<Response, ApiError> {
    let Some(dir) = &state.expert_dir else {
        return Err(ApiError {
            status: StatusCode::FORBIDDEN,
            message: "this server loads no packs at run time: start it with --expert-dir DIR"
                .into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("no_expert_dir"),
        });
    };
    let path = pack_in(dir, &req.file)?;
    let name = match req.name {
        Some(n) => n,
        None => crate::runtime::Expert::from_path(&path).name,
    };
    if !valid_name(&name) || name == "base" || state.presets.iter().any(|(p, _)| *p == name) {
        return Err(ApiError::invalid(
            "name",
            format!("{name:?} cannot name an expert: use letters, digits, _ - . (at most 64), not base or a preset's name"),
        ));
    }
    let (tx, rx) = oneshot::channel();
    state.queue.control(Control::AddExpert {
        path,
        name: name.clone(),
        reply: tx,
    })?;
    rx.await.map_err(|_| ApiError::shutting_down())??;
    let c = state.catalog();
    let info = c.experts.iter().find(|e| e.name == name).cloned();
    Ok((StatusCode::CREATED, Json(json!({ "expert": info }))).into_response())
}

async fn remove_expert(
    State(state): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let (tx, rx) = oneshot::channel();
    state.queue.control(Control::RemoveExpert {
        name: name.clone(),
        reply: tx,
    })?;
    rx.await.map_err(|_| ApiError::shutting_down())??;
    Ok(Json(json!({ "removed": name })))
}

/// The mixture of a request: `experts` if given (names checked, weights finite), else the
/// model id's; the method from `merge_method` or the server's.
fn mixture_of(state: &AppState, s: &Sampling) -> Result<(Mixture, String), ApiError> {
    let method = match &s.merge_method {
        None => state.method,
        Some(m) => Method::from_name(m)
            .filter(|m| m.combines_packs())
            .ok_or_else(|| {
                ApiError::invalid(
                    "merge_method",
                    format!("{m:?} is not one of task_arithmetic, ties, dare_ties, dare_linear"),
                )
            })?,
    };
    let names: Vec<String> = state
        .catalog()
        .experts
        .iter()
        .map(|e| e.name.clone())
        .collect();
    let (weights, label) = match (&s.experts, &s.model) {
        (Some(map), model) => {
            for (name, w) in map {
                if !names.contains(name) {
                    return Err(ApiError::invalid(
                        "experts",
                        format!("unknown expert {name:?}; known: {}", names.join(", ")),
                    )
                    .with_code("expert_not_found"));
                }
                if !number_fits_f32(*w) {
                    return Err(ApiError::invalid(
                        "experts",
                        format!("the weight of {name} is not a finite number of at most 3.4e38 in magnitude"),
                    ));
                }
            }
            (
                map.clone(),
                model.clone().unwrap_or_else(|| "mixture".into()),
            )
        }
        (None, Some(model)) => {
            let found = model_list(state).into_iter().find(|(id, _)| id == model);
            match found {
                Some((_, m)) => (m, model.clone()),
                None => {
                    return Err(ApiError {
                        status: StatusCode::NOT_FOUND,
                        message: format!(
                            "the model {model:?} does not exist; GET /v1/models lists them (base, each expert, each preset)"
                        ),
                        kind: "invalid_request_error",
                        param: Some("model".into()),
                        code: Some("model_not_found"),
                    })
                }
            }
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "model",
                "give a model (GET /v1/models lists them) or an experts mixture",
            ))
        }
    };
    let weights = weights.into_iter().filter(|(_, w)| *w != 0.0).collect();
    Ok((Mixture { weights, method }, label))
}

/// Sampling options, stop strings and the token limit of a request, checked.
fn sampling_of(s: &Sampling) -> Result<(GenerateOptions, Vec<String>, Option<usize>), ApiError> {
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "only n = 1 is supported"));
    }
    let temp = s.temperature.unwrap_or(DEFAULT_TEMPERATURE);
    if !(temp.is_finite() && (0.0..=10.0).contains(&temp)) {
        return Err(ApiError::invalid(
            "temperature",
            "temperature must be between 0 and 10",
        ));
    }
    let top_p = match s.top_p {
        None => None,
        Some(p) if p > 0.0 && p <= 1.0 => (p < 1.0).then_some(p as f32),
        Some(_) => return Err(ApiError::invalid("top_p", "top_p must be in (0, 1]")),
    };
    let max = match s.max_completion_tokens.or(s.max_tokens) {
        None => None,
        Some(n) if n >= 1 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        Some(_) => {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ))
        }
    };
    let stop = match &s.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOPS || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::invalid(
            "stop",
            format!("give at most {MAX_STOPS} stop strings of 1 to 256 bytes"),
        ));
    }
    let opts = GenerateOptions {
        n_predict: 0,
        temp: temp as f32,
        seed: s.seed.map(|x| x as u32),
        top_k: None,
        top_p,
        chat: false,
    };
    Ok((opts, stop, max))
}

/// The conversation of a chat request.
fn messages_of(req: &ChatRequest) -> Result<Vec<ChatMessage>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    req.messages
        .iter()
        .map(|m| {
            let text = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut t = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(x)) => t.push_str(x),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    "messages",
                                    format!(
                                    "content parts of type {kind:?} are not supported (text only)"
                                ),
                                ))
                            }
                        }
                    }
                    t
                }
            };
            Ok(ChatMessage::new(m.role.clone(), text))
        })
        .collect()
}

/// Which endpoint answers: the shapes differ.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

async fn chat(State(state): State<Arc<AppState>>, ApiJson(req): ApiJson<ChatRequest>) -> Response {
    let run = || -> Result<_, ApiError> {
        let messages = messages_of(&req)?;
        if !state.catalog().chat_template {
            return Err(ApiError::invalid(
                "messages",
                "the model has no chat template: use /v1/completions with a prompt",
            ));
        }
        Ok(Prompt::Chat(messages))
    };
    match run() {
        Ok(prompt) => respond(state, Kind::Chat, prompt, &req.sampling).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Response {
    let prompt = match req.prompt {
        PromptText::One(p) => p,
        PromptText::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptText::Many(_) => {
            return ApiError::invalid("prompt", "give one prompt (a string)").into_response()
        }
    };
    respond(state, Kind::Text, Prompt::Text(prompt), &req.sampling).await
}

/// Queues the job and answers: JSON once done, or server-sent events as it goes.
async fn respond(state: Arc<AppState>, kind: Kind, prompt: Prompt, s: &Sampling) -> Response {
    let prepared = mixture_of(&state, s).and_then(|(m, label)| {
        let (opts, stop, max) = sampling_of(s)?;
        Ok((m, label, opts, stop, max))
    });
    let (mixture, label, opts, stop, max) = match prepared {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let (tx, mut rx) = mpsc::channel(256);
    if let Err(e) = state
        .queue
        .submit(Job::new(mixture, prompt, max, opts, stop, tx))
    {
        return e.into_response();
    }
    state.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        state.next_id.fetch_add(1, Ordering::Relaxed)
    );
    // The status is known from the first event: an error, or the request runs.
    let started = match rx.recv().await {
        Some(Event::Started(st)) => st,
        Some(Event::Error(e)) => return e.into_response(),
        _ => {
            return ApiError::server(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the request ended without an answer",
            )
            .into_response()
        }
    };
    let reply = Reply {
        kind,
        id,
        model: label,
        created: now(),
        started,
    };
    if s.stream.unwrap_or(false) {
        let usage = s.stream_options.as_ref().is_some_and(|o| o.include_usage);
        stream(reply, rx, usage).into_response()
    } else {
        whole(reply, rx).await
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What every chunk of one response repeats.
struct Reply {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    started: Started,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    /// ggmerge's extension: the mixture that answered and what its switch cost.
    fn extension(&self, cached_tokens: usize) -> Value {
        let st = &self.started;
        json!({
            "mixture": st.mixture.weights,
            "merge_method": st.mixture.method.name(),
            "switch_seconds": st.switch_seconds,
            "switch_cached": st.switch_cached,
            "queue_seconds": st.queue_seconds,
            "cached_prompt_tokens": cached_tokens,
            "served": st.served,
        })
    }

    fn usage(&self, done: &Done) -> Usage {
        let p = self.started.prompt_tokens;
        Usage {
            prompt_tokens: p,
            completion_tokens: done.completion_tokens,
            total_tokens: p + done.completion_tokens,
            prompt_tokens_details: crate::serve::api::PromptDetails {
                cached_tokens: done.cached_tokens,
            },
        }
    }

    fn choice(&self, text: &str, finish: Option<&str>, chunk: bool, first: bool) -> Value {
        match (self.kind, chunk) {
            (Kind::Chat, false) => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }),
            (Kind::Chat, true) => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if !text.is_empty() || first {
                    delta.insert("content".into(), json!(text));
                }
                json!({"index": 0, "delta": delta, "finish_reason": finish})
            }
            (Kind::Text, _) => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish,
            }),
        }
    }

    fn body(
        &self,
        choices: Vec<Value>,
        usage: Option<Usage>,
        chunk: bool,
        ext: Option<Value>,
    ) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "ggmerge",
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = json!(u);
        }
        if let Some(e) = ext {
            v["ggmerge"] = e;
        }
        v
    }
}

/// Collects the whole answer.
async fn whole(reply: Reply, mut rx: mpsc::Receiver<Event>) -> Response {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done(done)) => {
                let choice = reply.choice(&text, Some(done.finish_reason), false, false);
                let ext = reply.extension(done.cached_tokens);
                return Json(reply.body(vec![choice], Some(reply.usage(&done)), false, Some(ext)))
                    .into_response();
            }
            Some(Event::Error(e)) => return e.into_response(),
            Some(Event::Started(_)) | None => {
                return ApiError::server(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "the request ended without an answer",
                )
                .into_response()
            }
        }
    }
}

/// Streams the answer as server-sent events: a first chunk (the role, and ggmerge's extension),
/// one chunk per piece of text, a last chunk with the finish reason, the usage chunk if asked,
/// then `data: [DONE]`. A client that goes away drops the stream: the converter stops, its
/// receiver closes, and the inference thread stops generating.
fn stream(reply: Reply, mut rx: mpsc::Receiver<Event>, usage: bool) -> impl IntoResponse {
    let (tx, out) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let send = |v: Value| SseEvent::default().data(v.to_string());
        let mut first = true;
        let mut pending_first = Some(reply.extension(reply.started.cached_tokens));
        // The first chunk opens the assistant's message (chat) before any text.
        if reply.kind == Kind::Chat {
            let c = reply.choice("", None, true, true);
            first = false;
            if tx
                .send(Ok(send(reply.body(
                    vec![c],
                    None,
                    true,
                    pending_first.take(),
                ))))
                .await
                .is_err()
            {
                return;
            }
        }
        loop {
            match rx.recv().await {
                Some(Event::Text(t)) => {
                    let c = reply.choice(&t, None, true, first);
                    first = false;
                    let body = reply.body(vec![c], None, true, pending_first.take());
                    if tx.send(Ok(send(body))).await.is_err() {
                        return;
                    }
                }
                Some(Event::Done(done)) => {
                    let c = reply.choice("", Some(done.finish_reason), true, false);
                    let ext = pending_first
                        .take()
                        .or(Some(reply.extension(done.cached_tokens)));
                    let _ = tx
                        .send(Ok(send(reply.body(vec![c], None, true, ext))))
                        .await;
                    if usage {
                        let u = reply.usage(&done);
                        let _ = tx
                            .send(Ok(send(reply.body(vec![], Some(u), true, None))))
                            .await;
                    }
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                    return;
                }
                Some(Event::Error(e)) => {
                    let _ = tx.send(Ok(send(e.body()))).await;
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                    return;
                }
                Some(Event::Started(_)) | None => return,
            }
        }
    });
    Sse::new(ReceiverStream::new(out)).keep_alive(KeepAlive::default())
}
