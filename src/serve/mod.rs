//! `ggmerge serve`: an OpenAI-compatible HTTP server where every request picks its own expert
//! mixture. Apps that speak the OpenAI API to a local server (Open WebUI, editors, the
//! `openai` Python package) reach the experts through a model id (`base`, an expert, a preset)
//! or an `experts` field; the base plus that mixture answers, computed in memory by the
//! runtime ([`crate::runtime::ExpertSession`]) and cached.
//!
//! The top library layer beside `flows`: it uses the runtime and the merge vocabulary.
//!
//! - [`api`] — request and response shapes, [`api::ApiError`] (OpenAI's error shape).
//! - [`worker`] — the inference thread: it owns the model, schedules queued requests (the
//!   loaded mixture first, within a bound), reuses prompt prefixes under the same mixture.
//! - [`http`] — the axum routes: `/v1/models`, `/v1/chat/completions`, `/v1/completions`,
//!   `/experts`, `/health`, `/metrics`, and the chat page at `/`.
//! - [`stop`] — stop strings over streamed text.
//! - [`metrics`] — counters in Prometheus' format.
//!
//! ```no_run
//! use ggmerge::serve::{serve, ServeOptions};
//!
//! let opts = ServeOptions::new("base.gguf".into());
//! // Blocks until Ctrl-C or SIGTERM.
//! serve(opts, |addr| println!("listening on http://{addr}"))?;
//! # Ok::<(), ggmerge::serve::ServeError>(())
//! ```

pub mod api;
pub mod http;
pub mod metrics;
pub mod stop;
pub mod worker;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use crate::merge::method::Method;
use crate::runtime::{Expert, ModelOptions, SessionOptions};
use crate::serve::http::AppState;
use crate::serve::metrics::Metrics;
use crate::serve::worker::{Catalog, Queue, Scheduling, WorkerConfig};

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The base model (GGUF).
    pub base: PathBuf,
    /// The experts at start.
    pub experts: Vec<Expert>,
    /// Named mixtures listed as models (`--preset coder=math:0.3,code:0.7`).
    pub presets: Vec<(String, BTreeMap<String, f64>)>,
    /// Default combination of the experts' deltas.
    pub method: Method,
    /// Address to listen on (default 127.0.0.1).
    pub host: String,
    /// Port (0: any free port).
    pub port: u16,
    /// Context size and threads.
    pub session: SessionOptions,
    /// How llama.cpp loads the base (GPU offload: `gpu_layers`, `main_gpu`).
    pub model: ModelOptions,
    /// Bytes of cached mixtures.
    pub cache_bytes: u64,
    /// Required `Authorization: Bearer` key.
    pub api_key: Option<String>,
    /// Where `POST /experts` loads packs from.
    pub expert_dir: Option<PathBuf>,
    /// Most waiting requests (more get 503).
    pub queue: usize,
    /// Largest request body in bytes (larger get 413).
    pub max_body: usize,
    /// Request order.
    pub scheduling: Scheduling,
    /// Reuse prompt prefixes between requests of the same mixture.
    pub prefix_cache: bool,
}

impl ServeOptions {
    /// Defaults for serving `base`: 127.0.0.1:8080, context 4096, 1 GiB of cached mixtures,
    /// 64 waiting requests, 1 MiB bodies.
    pub fn new(base: PathBuf) -> ServeOptions {
        ServeOptions {
            base,
            experts: Vec::new(),
            presets: Vec::new(),
            method: Method::TaskArithmetic,
            host: "127.0.0.1".into(),
            port: 8080,
            session: SessionOptions::default(),
            model: ModelOptions::default(),
            cache_bytes: 1 << 30,
            api_key: None,
            expert_dir: None,
            queue: 64,
            max_body: 1 << 20,
            scheduling: Scheduling::default(),
            prefix_cache: true,
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// An option is unusable.
    #[error("{0}")]
    Options(String),
    /// The model or an expert could not be loaded.
    #[error("cannot load the model and experts: {0}")]
    Load(String),
    /// The address cannot be listened on.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The async runtime or the HTTP server failed.
    #[error("the HTTP server failed")]
    Io(#[from] std::io::Error),
}

/// Loads the model and experts, listens, calls `on_ready` with the address, and serves until
/// SIGINT or SIGTERM: then new connections are refused, requests in flight finish, waiting ones
/// get a 503, and the function returns.
pub fn serve(opts: ServeOptions, on_ready: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    if opts.queue == 0 {
        return Err(ServeError::Options(
            "the queue must hold at least 1 request".into(),
        ));
    }
    for (name, mixture) in &opts.presets {
        if let Some(unknown) = mixture
            .keys()
            .find(|k| !opts.experts.iter().any(|e| &e.name == *k))
        {
            return Err(ServeError::Options(format!(
                "preset {name} uses the expert {unknown:?}, which is not loaded"
            )));
        }
    }
    let queue = Arc::new(Queue::new(opts.queue));
    let catalog = Arc::new(RwLock::new(Catalog::default()));
    let metrics = Arc::new(Metrics::default());
    let worker = worker::start(
        WorkerConfig {
            base: opts.base.clone(),
            experts: opts.experts.clone(),
            method: opts.method,
            session: opts.session.clone(),
            model: opts.model.clone(),
            cache_bytes: opts.cache_bytes,
            scheduling: opts.scheduling,
            prefix_cache: opts.prefix_cache,
        },
        queue.clone(),
        catalog.clone(),
        metrics.clone(),
    )
    .map_err(ServeError::Load)?;
    let state = Arc::new(AppState {
        queue: queue.clone(),
        catalog,
        metrics,
        presets: opts.presets.clone(),
        method: opts.method,
        api_key: opts.api_key.clone(),
        expert_dir: opts.expert_dir.clone(),
        next_id: AtomicU64::new(1),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let addr = format!("{}:{}", opts.host, opts.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        on_ready(listener.local_addr()?);
        let app = http::router(state, opts.max_body);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal(queue.clone()))
            .await?;
        Ok(())
    });
    queue.close();
    let _ = worker.join();
    result
}

/// Resolves on SIGINT or SIGTERM, and closes the queue (waiting requests get a 503 at once,
/// so their connections end and the graceful shutdown does not wait on them).
async fn shutdown_signal(queue: Arc<Queue>) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    queue.close();
}
