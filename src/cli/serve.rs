//! `ggmerge serve`: from its arguments ([`ServeArgs`]) to [`ggmerge::serve::serve`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};

use ggmerge::runtime::{Expert, SessionOptions};
use ggmerge::serve::worker::Scheduling;
use ggmerge::serve::{serve, ServeOptions};

use super::args::ServeArgs;

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
        requant: a.requant,
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
        model: a.gpu.model_options(),
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
