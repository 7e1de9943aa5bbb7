//! The inference thread and its queue. One thread owns the llama.cpp [`Model`] and the
//! [`ExpertSession`] (llama.cpp contexts are not shared across threads); HTTP handlers queue
//! [`Job`]s and read their [`Event`]s from a channel.
//!
//! **Scheduling.** A switch of mixture costs a recomputation (or a cache copy) of every changed
//! tensor, so queued requests for the mixture that is loaded go first — unless that would pass
//! over an older request more than [`MAX_PASSED_OVER`] times: a request waits behind at most
//! that many younger ones. With [`Scheduling::Fifo`] requests run in arrival order (for
//! comparison). Control commands (loading and removing experts) run before the next request.
//!
//! **Prompt cache.** The session keeps the keys and values of the last request and the next
//! one reuses the prefix they share ([`Session::complete`](crate::runtime::Session::complete)) — only under the same mixture:
//! every switch clears the memory, so nothing computed under one mixture is reused under
//! another.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

use axum::http::StatusCode;
use tokio::sync::{mpsc, oneshot};

use crate::merge::method::Method;
use crate::runtime::{
    ChatMessage, Expert, ExpertSession, GenerateOptions, Model, ModelOptions, RuntimeError,
    SessionOptions, StopReason, Token,
};
use crate::serve::api::ApiError;
use crate::serve::metrics::Metrics;
use crate::serve::stop::StopMatcher;

/// A queued request may be passed over by requests for the loaded mixture at most this many
/// times; then it runs next, whatever mixture it needs.
pub const MAX_PASSED_OVER: u32 = 4;

/// How queued requests are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Scheduling {
    /// Requests for the loaded mixture first, within [`MAX_PASSED_OVER`] (default).
    #[default]
    LoadedMixtureFirst,
    /// Arrival order.
    Fifo,
}

/// A mixture by expert name (weights of experts not named are 0; zero weights are dropped).
#[derive(Clone, Debug, PartialEq)]
pub struct Mixture {
    /// Expert name → weight, non-zero only.
    pub weights: BTreeMap<String, f64>,
    /// How the deltas combine.
    pub method: Method,
}

impl Mixture {
    /// The base alone.
    pub fn base(method: Method) -> Mixture {
        Mixture {
            weights: BTreeMap::new(),
            method,
        }
    }

    /// Whether two mixtures load the same weights.
    pub fn same_as(&self, other: &Mixture) -> bool {
        self.weights == other.weights && (self.weights.is_empty() || self.method == other.method)
    }

    /// `name=weight …` (or `base`), for messages.
    pub fn describe(&self) -> String {
        if self.weights.is_empty() {
            return "base".into();
        }
        self.weights
            .iter()
            .map(|(n, w)| format!("{n}={w}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What to complete.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// A text, continued as is (`/v1/completions`).
    Text(String),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// A generation request.
pub struct Job {
    /// The mixture to answer with.
    pub mixture: Mixture,
    /// The prompt.
    pub prompt: Prompt,
    /// Most tokens to generate (`None`: up to the context).
    pub max_tokens: Option<usize>,
    /// Sampling (its `n_predict` is set from `max_tokens` and the context).
    pub sampling: GenerateOptions,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Where events go; a closed channel (the client left) stops the job.
    pub events: mpsc::Sender<Event>,
    /// When it was queued.
    pub queued: Instant,
    passed_over: u32,
}

impl Job {
    /// A job ready to queue.
    pub fn new(
        mixture: Mixture,
        prompt: Prompt,
        max_tokens: Option<usize>,
        sampling: GenerateOptions,
        stop: Vec<String>,
        events: mpsc::Sender<Event>,
    ) -> Job {
        Job {
            mixture,
            prompt,
            max_tokens,
            sampling,
            stop,
            events,
            queued: Instant::now(),
            passed_over: 0,
        }
    }
}

/// How a request started: sent before any text.
#[derive(Clone, Debug)]
pub struct Started {
    /// Prompt tokens (after the chat template).
    pub prompt_tokens: usize,
    /// Of those, reused from the previous request's memory.
    pub cached_tokens: usize,
    /// The mixture that answers.
    pub mixture: Mixture,
    /// Seconds the mixture switch took (0 when it was loaded already).
    pub switch_seconds: f64,
    /// Whether the switch was a copy from the mixture cache (or no switch at all).
    pub switch_cached: bool,
    /// Seconds the request waited in the queue.
    pub queue_seconds: f64,
    /// Its place in the order the inference thread ran requests (1 for the first).
    pub served: u64,
}

/// How a request ended.
#[derive(Clone, Debug)]
pub struct Done {
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prompt tokens reused from the memory (not decoded).
    pub cached_tokens: usize,
    /// `stop` (end of generation or a stop string) or `length`.
    pub finish_reason: &'static str,
    /// Seconds of generation (prompt decoding included).
    pub seconds: f64,
}

/// What a job reports, in order: `Started`, any number of `Text`, `Done` — or one `Error`.
#[derive(Clone, Debug)]
pub enum Event {
    /// The request runs.
    Started(Started),
    /// Generated text.
    Text(String),
    /// Finished.
    Done(Done),
    /// Failed.
    Error(ApiError),
}

/// An expert as the server lists it.
#[derive(Clone, Debug, serde::Serialize, PartialEq)]
pub struct ExpertInfo {
    /// Its name.
    pub name: String,
    /// Its pack file.
    pub file: String,
    /// Changed tensors.
    pub tensors: usize,
    /// Kept values.
    pub kept: u64,
    /// Its weight in the loaded mixture.
    pub weight: f64,
}

/// What HTTP handlers may read without asking the inference thread.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    /// The experts, in order.
    pub experts: Vec<ExpertInfo>,
    /// The loaded mixture.
    pub loaded: Option<Mixture>,
    /// The context size.
    pub n_ctx: usize,
    /// Whether the model has a chat template.
    pub chat_template: bool,
    /// The model's description (`llama_model_desc`).
    pub description: String,
}

/// A command for the inference thread, run before the next request.
pub enum Control {
    /// Opens a pack as an expert (weight 0).
    AddExpert {
        /// The pack.
        path: PathBuf,
        /// Its name.
        name: String,
        /// The outcome.
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// Removes an expert (switching away from it first if it is loaded).
    RemoveExpert {
        /// Its name.
        name: String,
        /// The outcome.
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    controls: VecDeque<Control>,
    closing: bool,
}

/// The queue between HTTP handlers and the inference thread.
pub struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
    capacity: usize,
}

impl Queue {
    /// A queue holding at most `capacity` waiting requests.
    pub fn new(capacity: usize) -> Queue {
        Queue {
            state: Mutex::new(QueueState::default()),
            wake: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a request: 503 `queue_full` when full, 503 `shutting_down` when closing.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        let mut s = self.lock();
        if s.closing {
            return Err(ApiError::shutting_down());
        }
        if s.jobs.len() >= self.capacity {
            return Err(ApiError::server(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_full",
                format!(
                    "{} requests are waiting already (the queue holds {}): try again later",
                    s.jobs.len(),
                    self.capacity
                ),
            ));
        }
        s.jobs.push_back(job);
        self.wake.notify_one();
        Ok(())
    }

    /// Queues a control command (before any waiting request).
    pub fn control(&self, c: Control) -> Result<(), ApiError> {
        let mut s = self.lock();
        if s.closing {
            return Err(ApiError::shutting_down());
        }
        s.controls.push_back(c);
        self.wake.notify_one();
        Ok(())
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Whether no request waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops taking work: waiting requests get a 503 and the inference thread ends after the
    /// request it is running.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closing = true;
        for job in s.jobs.drain(..) {
            let _ = job.events.try_send(Event::Error(ApiError::shutting_down()));
        }
        for c in s.controls.drain(..) {
            match c {
                Control::AddExpert { reply, .. } | Control::RemoveExpert { reply, .. } => {
                    let _ = reply.send(Err(ApiError::shutting_down()));
                }
            }
        }
        self.wake.notify_all();
    }

    /// The next thing to do, waiting for one; `None` once closed.
    fn next(&self, loaded: Option<&Mixture>, scheduling: Scheduling) -> Option<Work> {
        let mut s = self.lock();
        loop {
            if s.closing {
                return None;
            }
            if let Some(c) = s.controls.pop_front() {
                return Some(Work::Control(c));
            }
            // Requests whose client left are dropped unseen.
            s.jobs.retain(|j| !j.events.is_closed());
            if let Some(i) = pick(&mut s.jobs, loaded, scheduling) {
                return s.jobs.remove(i).map(Work::Job);
            }
            s = self.wake.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

enum Work {
    Job(Job),
    Control(Control),
}

/// The index of the job to run next (see the module docs), updating pass-over counts.
fn pick(
    jobs: &mut VecDeque<Job>,
    loaded: Option<&Mixture>,
    scheduling: Scheduling,
) -> Option<usize> {
    if jobs.is_empty() {
        return None;
    }
    let (Scheduling::LoadedMixtureFirst, Some(loaded)) = (scheduling, loaded) else {
        return Some(0);
    };
    let Some(i) = jobs.iter().position(|j| j.mixture.same_as(loaded)) else {
        return Some(0);
    };
    if jobs
        .iter()
        .take(i)
        .any(|j| j.passed_over >= MAX_PASSED_OVER)
    {
        return Some(0);
    }
    for j in jobs.iter_mut().take(i) {
        j.passed_over += 1;
    }
    Some(i)
}

/// What the inference thread is started with.
pub struct WorkerConfig {
    /// The base model.
    pub base: PathBuf,
    /// The experts at start.
    pub experts: Vec<Expert>,
    /// Default combination.
    pub method: Method,
    /// Context, threads.
    pub session: SessionOptions,
    /// How the base is loaded (GPU offload).
    pub model: ModelOptions,
    /// Bytes of cached mixtures.
    pub cache_bytes: u64,
    /// Request order.
    pub scheduling: Scheduling,
    /// Reuse a shared prompt prefix between requests of the same mixture.
    pub prefix_cache: bool,
}

/// Starts the inference thread: loads the model and opens the experts, then serves the
/// queue. Returns once the model is ready (or failed to load).
pub fn start(
    cfg: WorkerConfig,
    queue: Arc<Queue>,
    catalog: Arc<RwLock<Catalog>>,
    metrics: Arc<Metrics>,
) -> Result<std::thread::JoinHandle<()>, String> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let handle = std::thread::Builder::new()
        .name("ggmerge-inference".into())
        .spawn(move || {
            let model = match Model::load(&cfg.base, &cfg.model) {
                Ok(m) => m,
                Err(e) => {
                    let _ = ready_tx.send(Err(chain(&e)));
                    return;
                }
            };
            let weights = vec![0.0; cfg.experts.len()];
            let session = ExpertSession::new(
                &model,
                &cfg.base,
                cfg.experts,
                &weights,
                cfg.method,
                &cfg.session,
                cfg.session.threads,
                cfg.cache_bytes,
            );
            let mut session = match session {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(chain(&e)));
                    return;
                }
            };
            let mut worker = Worker {
                session: &mut session,
                model: &model,
                catalog,
                metrics,
                loaded: Mixture::base(cfg.method),
                scheduling: cfg.scheduling,
                prefix_cache: cfg.prefix_cache,
                served: 0,
            };
            worker.publish();
            let _ = ready_tx.send(Ok(()));
            worker.serve(&queue);
        })
        .map_err(|e| format!("cannot start the inference thread: {e}"))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => Err("the inference thread stopped while loading the model".into()),
    }
}

/// An error with its sources, one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

struct Worker<'s, 'm> {
    session: &'s mut ExpertSession<'m>,
    model: &'m Model,
    catalog: Arc<RwLock<Catalog>>,
    metrics: Arc<Metrics>,
    loaded: Mixture,
    scheduling: Scheduling,
    prefix_cache: bool,
    /// Requests run so far.
    served: u64,
}

impl Worker<'_, '_> {
    /// Publishes the experts and the loaded mixture for the HTTP side.
    fn publish(&self) {
        let experts = self
            .session
            .experts()
            .iter()
            .zip(self.session.weights())
            .zip(self.session.packs())
            .map(|((e, w), p)| ExpertInfo {
                name: e.name.clone(),
                file: e.path.display().to_string(),
                tensors: p.tensors.len(),
                kept: p.tensors.iter().map(|t| t.1).sum(),
                weight: *w,
            })
            .collect();
        let mut c = self.catalog.write().unwrap_or_else(|e| e.into_inner());
        c.experts = experts;
        c.loaded = Some(self.loaded.clone());
        c.n_ctx = self.session_n_ctx();
        c.chat_template = self.model.has_chat_template();
        c.description = self.model.description();
    }

    fn session_n_ctx(&self) -> usize {
        self.session.session_ref().n_ctx() as usize
    }

    fn serve(&mut self, queue: &Queue) {
        while let Some(work) = queue.next(Some(&self.loaded), self.scheduling) {
            self.metrics
                .queue_length
                .store(queue.len() as u64, Ordering::Relaxed);
            match work {
                Work::Control(c) => self.control(c),
                Work::Job(job) => self.run(job),
            }
        }
    }

    fn control(&mut self, c: Control) {
        let (reply, result) = match c {
            Control::AddExpert { path, name, reply } => {
                let r = self.session.add_expert(Expert { name, path });
                (reply, r.map(|_| ()))
            }
            Control::RemoveExpert { name, reply } => {
                let r = self.session.remove_expert(&name);
                if r.is_ok() {
                    self.loaded.weights.remove(&name);
                }
                (reply, r.map(|_| ()))
            }
        };
        self.publish();
        let _ = reply.send(result.map_err(|e| {
            let status = match e {
                RuntimeError::UnknownExpert { .. } => StatusCode::NOT_FOUND,
                _ => StatusCode::BAD_REQUEST,
            };
            ApiError {
                status,
                message: chain(&e),
                kind: "invalid_request_error",
                param: None,
                code: None,
            }
        }));
    }

    /// The session's weights for `m` (an expert removed since the request was checked is an
    /// error).
    fn weights_of(&self, m: &Mixture) -> Result<Vec<f64>, ApiError> {
        let names: Vec<&str> = self
            .session
            .experts()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        if let Some(unknown) = m.weights.keys().find(|n| !names.contains(&n.as_str())) {
            return Err(ApiError::invalid(
                "experts",
                format!("unknown expert {unknown:?}; known: {}", names.join(", ")),
            ));
        }
        Ok(names
            .iter()
            .map(|n| m.weights.get(*n).copied().unwrap_or(0.0))
            .collect())
    }

    fn run(&mut self, job: Job) {
        let events = job.events.clone();
        let started = Instant::now();
        if let Err(e) = self.try_run(job, started) {
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
            let _ = events.blocking_send(Event::Error(e));
        }
    }

    fn try_run(&mut self, mut job: Job, started: Instant) -> Result<(), ApiError> {
        let queue_seconds = started.duration_since(job.queued).as_secs_f64();
        self.served += 1;
        let served = self.served;
        let weights = self.weights_of(&job.mixture)?;
        let switch = self
            .session
            .set_mixture_with(&weights, job.mixture.method)
            .map_err(|e| internal(&e))?;
        if switch.tensors > 0 || !self.loaded.same_as(&job.mixture) {
            self.metrics.record_switch(switch.cached, switch.seconds);
            self.loaded = job.mixture.clone();
            self.publish();
        }
        let tokens: Vec<Token> = match &job.prompt {
            Prompt::Text(t) => self.model.prompt_tokens(t, false),
            Prompt::Chat(m) => self.model.chat_tokens(m),
        }
        .map_err(|e| match e {
            RuntimeError::NoChatTemplate => ApiError::invalid(
                "messages",
                "the model has no chat template: use /v1/completions with a prompt",
            ),
            e => ApiError::invalid("messages", chain(&e)),
        })?;
        let n_ctx = self.session_n_ctx();
        if tokens.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt has no tokens"));
        }
        if tokens.len() >= n_ctx {
            let param = match job.prompt {
                Prompt::Text(_) => "prompt",
                Prompt::Chat(_) => "messages",
            };
            return Err(ApiError::invalid(
                param,
                format!(
                    "this model's context holds {n_ctx} tokens, but the prompt is {} tokens (one more is needed to answer): shorten it",
                    tokens.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let room = n_ctx - tokens.len();
        job.sampling.n_predict = job.max_tokens.unwrap_or(room).min(room);
        if !self.prefix_cache {
            self.session.session().clear_memory();
        }
        let gen_started = Instant::now();
        let mut stop = StopMatcher::new(job.stop.clone());
        let mut gone = false;
        let mut hit_stop = false;
        let events = job.events.clone();
        let session = self.session.session();
        // `Started` precedes any text: the client learns the mixture, the switch and the
        // prompt (the prefix the memory will reuse) before decoding begins.
        let started_event = Event::Started(Started {
            prompt_tokens: tokens.len(),
            cached_tokens: session.shared_prefix(&tokens),
            mixture: job.mixture.clone(),
            switch_seconds: if switch.tensors > 0 {
                switch.seconds
            } else {
                0.0
            },
            switch_cached: switch.cached,
            queue_seconds,
            served,
        });
        if events.blocking_send(started_event).is_err() {
            self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let result = session.complete(&tokens, &job.sampling, &mut |piece| {
            let (emit, hit) = stop.push(piece);
            if !emit.is_empty() && events.blocking_send(Event::Text(emit)).is_err() {
                gone = true;
                return false;
            }
            hit_stop |= hit;
            !hit
        });
        let generation = result.map_err(|e| internal(&e))?;
        if gone {
            self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if !hit_stop {
            let rest = stop.finish();
            if !rest.is_empty() && job.events.blocking_send(Event::Text(rest)).is_err() {
                return Ok(());
            }
        }
        let finish_reason = match generation.stop {
            StopReason::EndOfGeneration | StopReason::Stopped => "stop",
            StopReason::Length | StopReason::ContextFull => "length",
        };
        let seconds = gen_started.elapsed().as_secs_f64();
        self.metrics.record_generation(
            tokens.len(),
            generation.n_cached,
            generation.tokens.len(),
            seconds,
        );
        let _ = job.events.blocking_send(Event::Done(Done {
            completion_tokens: generation.tokens.len(),
            cached_tokens: generation.n_cached,
            finish_reason,
            seconds,
        }));
        Ok(())
    }
}

fn internal(e: &(dyn std::error::Error + 'static)) -> ApiError {
    ApiError::server(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        chain(e),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(weights: &[(&str, f64)]) -> (Job, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(4);
        let m = Mixture {
            weights: weights.iter().map(|(n, w)| (n.to_string(), *w)).collect(),
            method: Method::TaskArithmetic,
        };
        (
            Job::new(
                m,
                Prompt::Text("x".into()),
                None,
                GenerateOptions::default(),
                vec![],
                tx,
            ),
            rx,
        )
    }

    #[test]
    fn loaded_mixture_first_but_nobody_waits_forever() {
        let a = Mixture {
            weights: [("a".to_string(), 1.0)].into(),
            method: Method::TaskArithmetic,
        };
        let mut keep = Vec::new();
        let mut jobs = VecDeque::new();
        let (b, rb) = job(&[("b", 1.0)]);
        jobs.push_back(b);
        keep.push(rb);
        for _ in 0..10 {
            let (j, r) = job(&[("a", 1.0)]);
            jobs.push_back(j);
            keep.push(r);
        }
        // The B request is passed over MAX_PASSED_OVER times, then runs.
        let mut order = Vec::new();
        while let Some(i) = pick(&mut jobs, Some(&a), Scheduling::LoadedMixtureFirst) {
            let j = jobs.remove(i).unwrap();
            order.push(j.mixture.describe());
        }
        let b_at = order.iter().position(|m| m == "b=1").unwrap();
        assert_eq!(b_at, MAX_PASSED_OVER as usize, "{order:?}");
        // FIFO: arrival order.
        let (b, _rb) = job(&[("b", 1.0)]);
        let (a1, _ra) = job(&[("a", 1.0)]);
        let mut jobs: VecDeque<Job> = [b, a1].into();
        assert_eq!(pick(&mut jobs, Some(&a), Scheduling::Fifo), Some(0));
        assert_eq!(
            pick(&mut jobs, Some(&a), Scheduling::LoadedMixtureFirst),
            Some(1)
        );
    }
}
