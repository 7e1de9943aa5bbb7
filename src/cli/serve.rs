//! `ggmerge serve`: its arguments and the call to [`ggmerge::serve::serve`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use ggmerge::merge::method::Method;
use ggmerge::runtime::{Expert, SessionOptions};
use ggmerge::serve::worker::Scheduling;
use ggmerge::serve::{serve, ServeOptions};

/// Serve the base and its experts over the OpenAI API (chat and text completions, streaming),
/// with the expert mixture chosen per request.
///
/// Every request picks its mixture: through `model` — `base`, an expert's name (that expert
/// alone at weight 1) or a preset (GET /v1/models lists them) — or, overriding it, an
/// `experts` field ({"math": 0.6, "code": 0.4}; with the openai Python package:
/// extra_body={"experts": …}), optionally with `merge_method`. Switching is done in memory and
/// recent mixtures are cached; queued requests for the loaded mixture go first, but a request
/// is passed over at most 4 times. A prompt that starts like the previous request's (a
/// follow-up chat turn) reuses its computed prefix — only under the same mixture.
///
/// Endpoints: /v1/models, /v1/chat/completions, /v1/completions, GET/POST /experts,
/// DELETE /experts/NAME, /health, /metrics (Prometheus), and a chat page at /.
///
/// Examples:
///   ggmerge serve --base base.gguf --expert math=math.dpk.gguf --expert code.dpk.gguf
///       --preset coder=math:0.3,code:0.7 --port 8080
///   curl localhost:8080/v1/chat/completions -H 'Content-Type: application/json'
///       -d '{"model": "coder", "messages": [{"role": "user", "content": "Hi"}]}'
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct ServeArgs {
    /// The base model (GGUF).
    #[arg(long)]
    pub base: PathBuf,
    /// An expert pack: NAME=PATH, or PATH (named after its file: math.dpk.gguf → math).
    /// Repeat for each.
    #[arg(long = "expert")]
    pub experts: Vec<String>,
    /// A named mixture listed as a model: NAME=EXPERT:WEIGHT,EXPERT:WEIGHT… Repeat for each.
    #[arg(long = "preset")]
    pub presets: Vec<String>,
    /// How expert deltas combine unless a request says (merge_method).
    #[arg(long, default_value = "task_arithmetic", value_parser = super::args::pack_methods())]
    pub method: Method,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Context size in tokens (0: the model's training context).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    pub ctx: u32,
    /// Threads for generation (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Memory for cached mixtures, MiB (switching back to a cached mixture is a copy).
    #[arg(long, default_value_t = 1024)]
    pub cache_mib: u64,
    /// Require `Authorization: Bearer KEY` on the API (also from GGMERGE_API_KEY).
    #[arg(long, env = "GGMERGE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Directory POST /experts may load packs from (by file name only).
    #[arg(long)]
    pub expert_dir: Option<PathBuf>,
    #[command(flatten)]
    pub gpu: super::args::GpuArgs,
    /// Most requests waiting (more get 503 queue_full).
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Largest request body, KiB (larger get 413).
    #[arg(long, default_value_t = 1024)]
    pub max_body_kib: usize,
    /// Request order: mixture-first (the loaded mixture's requests first, within a bound) or
    /// fifo.
    #[arg(long, default_value = "mixture-first", value_parser = ["mixture-first", "fifo"])]
    pub schedule: String,
    /// Decode every prompt whole (no reuse of a previous request's prefix).
    #[arg(long)]
    pub no_prompt_cache: bool,
}

/// `NAME=PATH` or `PATH` → an expert.
fn expert(spec: &str) -> anyhow::Result<Expert> {
    if let Some((name, path)) = spec.split_once('=') {
        if !name.is_empty() && !name.contains('/') {
            return Ok(Expert {
                name: name.to_string(),
                path: PathBuf::from(path),
            });
        }
    }
    Ok(Expert::from_path(spec))
}

/// `NAME=EXPERT:WEIGHT,…` → a preset.
fn preset(spec: &str) -> anyhow::Result<(String, BTreeMap<String, f64>)> {
    let (name, rest) = spec
        .split_once('=')
        .with_context(|| format!("--preset {spec:?}: write NAME=EXPERT:WEIGHT,EXPERT:WEIGHT"))?;
    let mut m = BTreeMap::new();
    for part in rest.split(',').filter(|p| !p.is_empty()) {
        let (e, w) = part
            .rsplit_once(':')
            .with_context(|| format!("--preset {name}: {part:?} is not EXPERT:WEIGHT"))?;
        let w: f64 = w
            .parse()
            .ok()
            .filter(|w| ggmerge::merge::config::number_fits_f32(*w))
            .with_context(|| format!("--preset {name}: the weight of {e} is not a number"))?;
        if m.insert(e.to_string(), w).is_some() {
            bail!("--preset {name}: {e} is given twice");
        }
    }
    Ok((name.to_string(), m))
}

pub fn run(a: &ServeArgs) -> anyhow::Result<()> {
    let mut experts: Vec<Expert> = Vec::new();
    for e in &a.experts {
        let e = expert(e)?;
        if !e.path.is_file() {
            bail!("{}: no such expert pack", e.path.display());
        }
        if experts.iter().any(|o| o.name == e.name) {
            bail!("two experts are named {:?}: name them (NAME=PATH)", e.name);
        }
        experts.push(e);
    }
    let presets = a
        .presets
        .iter()
        .map(|p| preset(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !a.base.is_file() {
        bail!("{}: no such model file", a.base.display());
    }
    if let Some(d) = &a.expert_dir {
        if !d.is_dir() {
            bail!("--expert-dir {}: no such directory", d.display());
        }
    }
    let session = SessionOptions {
        n_ctx: a.ctx,
        threads: super::threads(a.threads),
        ..Default::default()
    };
    session.validate()?;
    let opts = ServeOptions {
        base: a.base.clone(),
        experts,
        presets,
        method: a.method,
        host: a.host.clone(),
        port: a.port,
        session,
        model: super::run::model_options(&a.gpu),
        cache_bytes: a.cache_mib << 20,
        api_key: a.api_key.clone(),
        expert_dir: a.expert_dir.clone(),
        queue: a.queue,
        max_body: a.max_body_kib << 10,
        scheduling: if a.schedule == "fifo" {
            Scheduling::Fifo
        } else {
            Scheduling::LoadedMixtureFirst
        },
        prefix_cache: !a.no_prompt_cache,
    };
    let started = std::time::Instant::now();
    eprintln!("loading {} …", a.base.display());
    serve(opts, |addr| {
        eprintln!("ready in {:.2} s", started.elapsed().as_secs_f64());
        super::outln!("listening on http://{addr}");
    })?;
    eprintln!("ggmerge: stopped");
    Ok(())
}
