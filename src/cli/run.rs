//! `ggmerge run`, `chat`, `perplexity` and `eval`: llama.cpp with expert packs applied in memory.

use std::io::BufRead;

use anyhow::{bail, Context};

use ggmerge::merge::method::Method;
use ggmerge::runtime::{backend, Expert, ExpertSession, GenerateOptions, Model, SessionOptions};

use super::args::{parse_expert, ChatArgs, EvalArgs, ExpertArgs, PerplexityArgs, RunArgs};
use super::{outln, stdout_bytes};

/// The session options of the command line, checked.
fn session_options(a: &ExpertArgs) -> anyhow::Result<SessionOptions> {
    let opts = SessionOptions {
        n_ctx: a.ctx,
        threads: super::threads(a.threads),
        requant: a.requant,
        ..Default::default()
    };
    opts.validate()?;
    Ok(opts)
}

/// Checks every argument, then loads the base: a mistyped option costs nothing.
fn load(a: &ExpertArgs) -> anyhow::Result<(Model, Vec<Expert>, Vec<f64>, Method)> {
    let method = a.method;
    session_options(a)?;
    let mut experts: Vec<Expert> = Vec::new();
    let mut weights = Vec::new();
    for e in &a.experts {
        let (path, w) = parse_expert(e)?;
        let expert = Expert::from_path(path);
        if !expert.path.is_file() {
            bail!("{}: no such expert pack", expert.path.display());
        }
        if let Some(other) = experts.iter().find(|o| o.name == expert.name) {
            bail!(
                "two experts are named {:?} ({} and {}): rename one file",
                expert.name,
                other.path.display(),
                expert.path.display()
            );
        }
        experts.push(expert);
        weights.push(w);
    }
    if !a.base.is_file() {
        bail!("{}: no such model file", a.base.display());
    }
    let started = std::time::Instant::now();
    // Weight discovery runs on one thread (ModelOptions' default); -t is for decoding.
    let model = Model::load(&a.base, &a.gpu.model_options())?;
    eprintln!(
        "loaded {} in {:.2} s",
        a.base.display(),
        started.elapsed().as_secs_f64()
    );
    if a.verbose {
        print_placement(&model)?;
    }
    Ok((model, experts, weights, method))
}

/// `-v`: the devices and, per layer, the buffers holding its weights (stderr).
fn print_placement(model: &Model) -> anyhow::Result<()> {
    for d in backend::devices() {
        let mem = match d.memory_total {
            0 => String::new(),
            t => format!(
                ", {:.1} of {:.1} GiB free",
                d.memory_free as f64 / GIB,
                t as f64 / GIB
            ),
        };
        eprintln!("device {} ({:?}): {}{mem}", d.name, d.kind, d.description);
    }
    let mut lines: Vec<(String, Vec<String>)> = Vec::new();
    for p in model.placement()? {
        let layer = p
            .layer
            .map_or("outside layers".to_string(), |l| format!("layer {l}"));
        let here = format!(
            "{} ({} tensors, {:.1} MiB)",
            p.buffer,
            p.tensors,
            p.bytes as f64 / MIB
        );
        match lines.last_mut() {
            Some((l, parts)) if *l == layer => parts.push(here),
            _ => lines.push((layer, vec![here])),
        }
    }
    for (layer, parts) in lines {
        eprintln!("{layer}: {}", parts.join(", "));
    }
    Ok(())
}

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

fn open<'m>(
    model: &'m Model,
    a: &ExpertArgs,
    experts: Vec<Expert>,
    weights: &[f64],
    method: Method,
) -> anyhow::Result<ExpertSession<'m>> {
    let started = std::time::Instant::now();
    let opts = session_options(a)?;
    let s = ExpertSession::new(
        model,
        &a.base,
        experts,
        weights,
        method,
        &opts,
        opts.threads,
        a.cache_mib << 20,
    )?;
    for w in s.warnings() {
        eprintln!("warning: {w}");
    }
    if !s.experts().is_empty() {
        eprintln!(
            "applied {} in {:.2} s",
            s.describe(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(s)
}

/// The sampling temperature, checked.
fn temperature(t: f32) -> anyhow::Result<f32> {
    if !t.is_finite() || t < 0.0 {
        bail!("--temp must be a finite number ≥ 0, not {t}");
    }
    Ok(t)
}

pub fn run(a: &RunArgs) -> anyhow::Result<()> {
    temperature(a.temp)?;
    let (model, experts, weights, method) = load(&a.experts)?;
    let mut s = open(&model, &a.experts, experts, &weights, method)?;
    let opts = GenerateOptions {
        n_predict: a.n,
        temp: a.temp,
        seed: a.seed,
        chat: a.chat,
        ..Default::default()
    };
    let g = s
        .session()
        .generate_with(&a.prompt, &opts, |piece| stdout_bytes(piece.as_bytes()))?;
    outln!();
    eprintln!(
        "{} prompt tokens, {} generated ({:?})",
        g.n_prompt,
        g.tokens.len(),
        g.stop
    );
    Ok(())
}

pub fn chat(a: &ChatArgs) -> anyhow::Result<()> {
    temperature(a.temp)?;
    let (model, experts, weights, method) = load(&a.experts)?;
    let mut s = open(&model, &a.experts, experts, &weights, method)?;
    let opts = GenerateOptions {
        n_predict: a.n,
        temp: a.temp,
        chat: true,
        ..Default::default()
    };
    eprintln!(
        "chat: type a message; /experts NAME=W … switches experts, /experts shows them, /quit ends"
    );
    let stdin = std::io::stdin();
    for raw in stdin.lock().lines() {
        let raw = raw?;
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/quit" || line == "/exit" {
            break;
        }
        if let Some(rest) = line.strip_prefix("/experts") {
            let rest = rest.trim();
            if rest.is_empty() {
                outln!("experts: {}", s.describe());
                continue;
            }
            // A bad line is reported and the session goes on with the old mixture.
            match s
                .parse_mixture(rest)
                .map_err(anyhow::Error::from)
                .and_then(|w| Ok(s.set_mixture(&w)?))
            {
                Ok(r) => outln!(
                    "experts: {} ({} tensors, {:.3} s{})",
                    s.describe(),
                    r.tensors,
                    r.seconds,
                    if r.cached { ", cached" } else { "" }
                ),
                Err(e) => outln!("error: {e:#}"),
            }
            continue;
        }
        if raw.starts_with('/') {
            let command = line.split_whitespace().next().unwrap_or(line);
            outln!(
                "error: unknown command {command}; commands: /experts [NAME=WEIGHT …], /quit \
                 (to send a message that starts with /, start it with a space)"
            );
            continue;
        }
        match s
            .session()
            .generate_with(line, &opts, |piece| stdout_bytes(piece.as_bytes()))
        {
            Ok(_) => outln!(),
            Err(e) => outln!("error: {e:#}"),
        }
    }
    Ok(())
}

pub fn perplexity(a: &PerplexityArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let (model, experts, weights, method) = load(&a.experts)?;
    let mut s = open(&model, &a.experts, experts, &weights, method)?;
    let bar = super::bars::Bars::new(false);
    let p = s.session().perplexity(&text, &bar)?;
    outln!(
        "perplexity: {:.4} ± {:.4} ({} chunks of {} tokens, {} tokens scored)",
        p.ppl,
        p.ppl_err,
        p.chunk_ppl.len(),
        p.n_ctx,
        p.n_scored
    );
    Ok(())
}

pub fn eval(a: &EvalArgs) -> anyhow::Result<()> {
    let questions = ggmerge::flows::eval::read_questions(&a.file)?;
    let (model, experts, weights, method) = load(&a.experts)?;
    let mut s = open(&model, &a.experts, experts, &weights, method)?;
    let bar = super::bars::Bars::new(false);
    let r = ggmerge::flows::eval::evaluate(s.session(), &questions, &bar)
        .with_context(|| a.file.display().to_string())?;
    if a.experts.verbose {
        for (q, sc) in questions.iter().zip(&r.scores) {
            outln!(
                "{} {:?} -> {:?} (log-lik. {:.2})",
                if sc.exact { "ok  " } else { "miss" },
                q.prompt,
                q.answer,
                sc.logprob
            );
        }
    }
    outln!(
        "exact match: {}/{} ({:.1}%), answer log-likelihood {:.3} per token",
        r.exact,
        questions.len(),
        100.0 * r.exact_share(),
        r.logprob_per_token
    );
    Ok(())
}
