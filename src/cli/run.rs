//! `ggmerge run`, `chat`, `perplexity` and `eval`: llama.cpp with expert packs applied in memory.

use std::io::{BufRead, Write};

use anyhow::Context;

use ggmerge::flows::run::{Expert, ExpertSession};
use ggmerge::merge::config::Method;
use ggmerge::runtime::{GenerateOptions, Model, ModelOptions, SessionOptions};

use super::args::{ChatArgs, EvalArgs, ExpertArgs, PerplexityArgs, RunArgs};
use super::merge::parse_expert;

fn load(a: &ExpertArgs) -> anyhow::Result<(Model, Vec<Expert>, Vec<f64>, Method)> {
    let method = Method::from_name(&a.method)
        .filter(|m| {
            matches!(
                m,
                Method::TaskArithmetic | Method::Ties | Method::DareTies | Method::DareLinear
            )
        })
        .with_context(|| {
            format!(
                "--method must be task_arithmetic, ties, dare_ties or dare_linear, not {:?}",
                a.method
            )
        })?;
    let mut experts = Vec::new();
    let mut weights = Vec::new();
    for e in &a.experts {
        let (path, w) = parse_expert(e)?;
        experts.push(Expert::from_path(path));
        weights.push(w);
    }
    let started = std::time::Instant::now();
    // Weight discovery runs on one thread (ModelOptions' default); -t is for decoding.
    let model = Model::load(&a.base, &ModelOptions::default())?;
    eprintln!(
        "loaded {} in {:.2} s",
        a.base.display(),
        started.elapsed().as_secs_f64()
    );
    Ok((model, experts, weights, method))
}

fn open<'m>(
    model: &'m Model,
    a: &ExpertArgs,
    experts: Vec<Expert>,
    weights: &[f64],
    method: Method,
) -> anyhow::Result<ExpertSession<'m>> {
    let started = std::time::Instant::now();
    let opts = SessionOptions {
        n_ctx: a.ctx,
        threads: a.threads,
        ..Default::default()
    };
    let s = ExpertSession::new(
        model,
        &a.base,
        experts,
        weights,
        method,
        &opts,
        a.threads,
        a.cache_mib << 20,
    )?;
    if !s.experts().is_empty() {
        eprintln!(
            "applied {} in {:.2} s",
            s.describe(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(s)
}

pub fn run(a: &RunArgs) -> anyhow::Result<()> {
    let (model, experts, weights, method) = load(&a.experts)?;
    let mut s = open(&model, &a.experts, experts, &weights, method)?;
    let opts = GenerateOptions {
        n_predict: a.n,
        temp: a.temp,
        seed: a.seed,
        chat: a.chat,
        ..Default::default()
    };
    let mut out = std::io::stdout();
    let g = s.session().generate_with(&a.prompt, &opts, |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    println!();
    eprintln!(
        "{} prompt tokens, {} generated ({:?})",
        g.n_prompt,
        g.tokens.len(),
        g.stop
    );
    Ok(())
}

pub fn chat(a: &ChatArgs) -> anyhow::Result<()> {
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
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/quit" || line == "/exit" {
            break;
        }
        if let Some(rest) = line.strip_prefix("/experts") {
            let rest = rest.trim();
            if rest.is_empty() {
                println!("experts: {}", s.describe());
                continue;
            }
            // A bad line is reported and the session goes on with the old mixture.
            match s.parse_mixture(rest).and_then(|w| s.set_mixture(&w)) {
                Ok(r) => println!(
                    "experts: {} ({} tensors, {:.3} s{})",
                    s.describe(),
                    r.tensors,
                    r.seconds,
                    if r.cached { ", cached" } else { "" }
                ),
                Err(e) => println!("error: {e:#}"),
            }
            continue;
        }
        match s.session().generate_with(line, &opts, |piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }) {
            Ok(_) => println!(),
            Err(e) => println!("error: {e:#}"),
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
    println!(
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
    let r = ggmerge::flows::eval::evaluate(s.session(), &questions, &bar)?;
    if a.verbose {
        for (q, sc) in questions.iter().zip(&r.scores) {
            println!(
                "{} {:?} -> {:?} (log-lik. {:.2})",
                if sc.exact { "ok  " } else { "miss" },
                q.prompt,
                q.answer,
                sc.logprob
            );
        }
    }
    println!(
        "exact match: {}/{} ({:.1}%), answer log-likelihood {:.3} per token",
        r.exact,
        questions.len(),
        100.0 * r.exact_share(),
        r.logprob_per_token
    );
    Ok(())
}
