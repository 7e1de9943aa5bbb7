//! Issue 5's experiments: do DARE's claims hold for a small model, quantized or not? Driven by
//! `scripts/experiments.sh`, which builds, makes the F32 base, fine-tunes the experts (cached
//! outside the repository) and runs the two subcommands:
//!
//! ```sh
//! cargo run --release --example experiments -- data DIR [--facts N] [--repeats N]  # into DIR/data
//! cargo run --release --example experiments -- run DIR [-t N]    # every table, into docs/
//! cargo run --release --example experiments -- run DIR [-t N] --only requant-modes  # one, printed
//! cargo run --release --example experiments -- tokens MODEL TEXT OUT.json [--ppl-ctx N]  # ids
//! ```
//!
//! `run` expects in DIR: `smollm2-135m-f32.gguf` (the base), `expert-capitals.gguf` and
//! `expert-birthplaces.gguf` (fine-tunes of it), `data/` (from `data`). Everything it makes
//! (packs, quantized models, merged files) goes to `DIR/work`, reused when present; results go
//! to `docs/results.md`, `docs/results.json` and the plots `docs/*.png`.
//!
//! Every ability is measured with ggmerge's own runtime: the base loaded by llama.cpp, the
//! expert deltas applied at load time ([`ExpertSession`]), answers scored by greedy decoding
//! (exact match, [`Session::score_answer`]) and by their log-likelihood. The datasets are the
//! library's invented facts ([`ggmerge::flows::facts`]).
//!
//! `run` is one function per experiment, in the order of docs/results.md — [`baselines`] (0),
//! [`drop_rate`] (1), [`merges`] (2), [`quantized`] (3), [`requantized`] (4), [`packs`] (5),
//! [`requant_modes`] (6), [`wall_times`] — each appending its table to a shared [`Lab`]
//! (paths, the loaded base, the report, timings).
//!
//! `run DIR --only NAME` runs one experiment that needs no other (`quantized`, `requantized`,
//! `requant-modes`) and prints its table instead of writing docs/ (with
//! `GGMERGE_EXPERIMENTS_QUICK=1`: a smoke test of that experiment).

mod plot;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{anyhow, Context as _, Result};
use ggmerge::flows::extract::{extract_delta, ExtractOptions, ExtractReport};
use ggmerge::flows::facts;
use ggmerge::flows::merge::MergeReport;
use ggmerge::format::gguf::GgufModel;
use ggmerge::format::GgmlType;
use ggmerge::merge::config::{ConfigSource, MergeConfig, Method, ModelEntry, ParamValue, Rescale};
use ggmerge::merge::method::Sparsifier;
use ggmerge::quant::mixture::Target;
use ggmerge::quant::Requant;
use ggmerge::runtime::{Expert, ExpertSession};
use ggmerge::runtime::{Model, ModelOptions, Session, SessionOptions};
use ggmerge::{merge_models, quantize_model, MergeOptions, NoProgress, QuantizeOptions};
use serde_json::json;

/// Facts per domain.
const FACTS: usize = 12;
/// Seed of the invented names.
const DATA_SEED: u64 = 2026;
/// Times each phrasing of each fact appears in the training text.
const REPEATS: usize = 3;
/// Densities of the drop-rate curve.
const DENSITIES: [f64; 6] = [1.0, 0.5, 0.3, 0.1, 0.05, 0.01];
/// Mask seeds wherever a result is random.
const SEEDS: [u64; 3] = [1, 2, 3];

/// Quantized bases of experiment 6 (the outputs keep their types).
const GRID_TYPES: [&str; 3] = ["Q4_1", "Q4_K_M", "Q8_0"];
/// Densities of experiment 6: 1 is task arithmetic, below it [`GRID_DARE`].
const GRID_DENSITIES: [f64; 4] = [1.0, 0.3, 0.1, 0.03];
/// The DARE method of experiment 6 (experiment 4's, for comparison).
const GRID_DARE: Method = Method::DareTies;

/// `GGMERGE_EXPERIMENTS_QUICK=1`: one seed, fewer densities, weights and types — a smoke test
/// of the whole pipeline, not results.
fn quick() -> bool {
    std::env::var_os("GGMERGE_EXPERIMENTS_QUICK").is_some_and(|v| v == "1")
}

fn seeds() -> &'static [u64] {
    if quick() {
        &SEEDS[..1]
    } else {
        &SEEDS
    }
}

fn densities() -> &'static [f64] {
    if quick() {
        &[1.0, 0.1]
    } else {
        &DENSITIES
    }
}

fn pick<T: Copy>(all: &'static [T]) -> &'static [T] {
    if quick() {
        &all[..1]
    } else {
        all
    }
}
/// Context of the evaluation sessions, also the chunk size of the held-out perplexity (the
/// held-out texts are short: ~180 tokens per domain; every question fits easily).
const N_CTX: u32 = 64;
/// Chunk size of the perplexity comparison of experiment 5.
const PPL_CTX: u32 = 64;

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes, per domain D: D.train.txt, D.heldout.txt, D.questions.jsonl.
/// `n_facts` facts per domain, each phrasing `repeats` times in the training text (the
/// experiments use [`FACTS`] and [`REPEATS`]; scripts/demo.sh fewer facts).
fn data(dir: &Path, n_facts: usize, repeats: usize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (i, d) in facts::domains(n_facts, DATA_SEED).iter().enumerate() {
        write(
            &dir.join(format!("{}.train.txt", d.name())),
            &d.train_text(repeats, DATA_SEED + 1 + i as u64),
        )?;
        write(
            &dir.join(format!("{}.heldout.txt", d.name())),
            &d.heldout_text(),
        )?;
        write(
            &dir.join(format!("{}.questions.jsonl", d.name())),
            &d.questions_jsonl(),
        )?;
    }
    Ok(())
}

/// One domain's scores under one configuration.
#[derive(Clone, Copy, Debug, Default)]
struct Score {
    /// Share of questions answered exactly (greedy).
    exact: f64,
    /// Mean log-likelihood per answer token, trained question format.
    logprob: f64,
    /// Mean log-likelihood per answer token in the held-out phrasing.
    heldout_logprob: f64,
    /// Perplexity of the held-out text.
    ppl: f64,
}

/// Scores `session` on `domain`.
fn score(session: &mut Session<'_>, domain: &facts::Domain) -> Result<Score> {
    let mut s = Score::default();
    let qs = domain.questions();
    let (mut tokens, mut lp) = (0usize, 0f64);
    for q in &qs {
        let a = session.score_answer(&q.prompt, &q.answer)?;
        s.exact += f64::from(u8::from(a.exact)) / qs.len() as f64;
        lp += a.logprob;
        tokens += a.tokens;
    }
    s.logprob = lp / tokens.max(1) as f64;
    let (mut tokens, mut lp) = (0usize, 0f64);
    for q in domain.heldout_questions() {
        let a = session.score_answer(&q.prompt, &q.answer)?;
        lp += a.logprob;
        tokens += a.tokens;
    }
    s.heldout_logprob = lp / tokens.max(1) as f64;
    s.ppl = session.perplexity(&domain.heldout_text(), &NoProgress)?.ppl;
    Ok(s)
}

/// Mean, min and max of some values.
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    (mean, lo, hi)
}

/// "m (lo–hi)" for a share in percent, or just "m" when all agree.
fn pct(v: &[f64]) -> String {
    let (m, lo, hi) = spread(v);
    if hi - lo < 1e-9 {
        format!("{:.0}%", 100.0 * m)
    } else {
        format!("{:.0}% ({:.0}–{:.0})", 100.0 * m, 100.0 * lo, 100.0 * hi)
    }
}

/// Mean (± half-range) with `d` decimals.
fn num(v: &[f64], d: usize) -> String {
    let (m, lo, hi) = spread(v);
    if hi - lo < 1e-9 {
        format!("{m:.d$}")
    } else {
        format!("{m:.d$} ± {:.d$}", (hi - lo) / 2.0)
    }
}

/// Table cells "exact 0 | exact 1 | log-lik. 0 | log-lik. 1" of both domains' scores over
/// seeds, and the mean exact-match share of each.
fn both_domains(per: &[Vec<Score>; 2]) -> (String, [f64; 2]) {
    let ex = |i: usize| per[i].iter().map(|s| s.exact).collect::<Vec<_>>();
    let lp = |i: usize| per[i].iter().map(|s| s.logprob).collect::<Vec<_>>();
    let cells = format!(
        "{} | {} | {} | {}",
        pct(&ex(0)),
        pct(&ex(1)),
        num(&lp(0), 2),
        num(&lp(1), 2)
    );
    (cells, [spread(&ex(0)).0, spread(&ex(1)).0])
}

/// A test model the experiments run on: its F32 base and two facts experts in DIR.
struct Fixture {
    /// The model's name in the tables.
    label: &'static str,
    /// The F32 base, in DIR.
    base: &'static str,
    /// The capitals and birthplaces experts (F32 fine-tunes of the base), in DIR.
    experts: [&'static str; 2],
    /// Where its intermediate files go, under DIR (quantized bases are cached by type there).
    work: &'static str,
    /// What made the experts (experiment 6's Gemma subsection says it).
    trained_by: &'static str,
}

/// SmolLM2-135M-Instruct (the Q4_1 fixture dequantized), experts by `ggmerge finetune`: every
/// experiment.
const SMOLLM2: Fixture = Fixture {
    label: "SmolLM2-135M-Instruct",
    base: "smollm2-135m-f32.gguf",
    experts: ["expert-capitals.gguf", "expert-birthplaces.gguf"],
    work: "work",
    trained_by: "`ggmerge finetune`",
};

/// Gemma 3 270M (the Q4_K_M fixture dequantized), experts by scripts/train_gemma_expert.py
/// (llama.cpp cannot train Gemma: no backward pass for GEGLU): experiment 6.
const GEMMA: Fixture = Fixture {
    label: "Gemma 3 270M",
    base: "gemma3-270m-f32.gguf",
    experts: [
        "gemma-expert-capitals.gguf",
        "gemma-expert-birthplaces.gguf",
    ],
    work: "work/gemma",
    trained_by: "scripts/train_gemma_expert.py (JAX; llama.cpp has no backward pass for GEGLU)",
};

/// What every experiment shares: paths, the loaded F32 base, the report being written and
/// the timings.
struct Lab {
    fixture: &'static Fixture,
    dir: PathBuf,
    work: PathBuf,
    threads: Option<usize>,
    domains: [facts::Domain; 2],
    base: PathBuf,
    experts: [PathBuf; 2],
    /// The F32 base loaded by llama.cpp; packs are applied to it in memory.
    model: Model,
    /// The generated part of docs/results.md, one experiment after the other.
    md: String,
    timings: Vec<(String, f64)>,
    json: serde_json::Map<String, serde_json::Value>,
}

impl Lab {
    /// Checks DIR holds the fixture's base and both experts, creates its work directory and
    /// loads the base.
    fn open(dir: &Path, threads: Option<usize>, fixture: &'static Fixture) -> Result<Lab> {
        let work = dir.join(fixture.work);
        std::fs::create_dir_all(&work)?;
        let base = dir.join(fixture.base);
        let experts = fixture.experts.map(|e| dir.join(e));
        for p in std::iter::once(&base).chain(&experts) {
            if !p.exists() {
                return Err(anyhow!(
                    "{} is missing: run scripts/experiments.sh",
                    p.display()
                ));
            }
        }
        let model = Model::load(&base, &ModelOptions::default())?;
        Ok(Lab {
            fixture,
            dir: dir.to_path_buf(),
            work,
            threads,
            domains: facts::domains(FACTS, DATA_SEED),
            base,
            experts,
            model,
            md: String::new(),
            timings: Vec::new(),
            json: serde_json::Map::new(),
        })
    }

    /// The domains' names, in order.
    fn names(&self) -> [&'static str; 2] {
        [self.domains[0].name(), self.domains[1].name()]
    }

    fn session_opts(&self, n_ctx: u32) -> SessionOptions {
        SessionOptions {
            n_ctx,
            n_batch: n_ctx,
            threads: self.threads,
            ..Default::default()
        }
    }

    /// A delta pack of `expert` against `base` (cached in the work directory).
    #[allow(clippy::too_many_arguments)]
    fn pack(
        &self,
        base: &Path,
        expert: &Path,
        tag: &str,
        sparsify: Sparsifier,
        density: f64,
        rescale: Rescale,
        seed: u64,
        stream: u32,
    ) -> Result<(PathBuf, Option<ExtractReport>)> {
        let name = format!(
            "{tag}-{}-{density}-{}-s{seed}-{stream}.dpk.gguf",
            sparsify.name(),
            rescale.name()
        );
        let out = self.work.join(name);
        if out.exists() {
            return Ok((out, None));
        }
        let opts = ExtractOptions {
            density,
            sparsifier: sparsify,
            values: GgmlType::F16,
            seed,
            stream,
            rescale,
            threads: self.threads,
            ..Default::default()
        };
        let report = extract_delta(base, expert, &out, &opts, &NoProgress)
            .with_context(|| format!("extracting {}", out.display()))?;
        Ok((out, Some(report)))
    }

    /// `src` quantized to `ty` (a type or mixture) by `ggmerge quantize`, cached in the work
    /// directory as `{tag}-{ty}.gguf`.
    fn quantized(&self, src: &Path, tag: &str, ty: &str) -> Result<PathBuf> {
        let out = self.work.join(format!("{tag}-{ty}.gguf"));
        if !out.exists() {
            let opts = QuantizeOptions {
                target: Target::parse(ty, false)?,
                threads: self.threads,
            };
            quantize_model(src, &out, &opts, &NoProgress)
                .with_context(|| format!("quantizing {} to {ty}", src.display()))?;
        }
        Ok(out)
    }

    /// Scores both domains (or only `only`) with `packs` at `weights` applied to `model`.
    fn evaluate(
        &self,
        model: &Model,
        base: &Path,
        packs: &[PathBuf],
        weights: &[f64],
        method: Method,
        only: Option<usize>,
    ) -> Result<Scores> {
        let experts = packs.iter().map(Expert::from_path).collect();
        let mut s = ExpertSession::new(
            model,
            base,
            experts,
            weights,
            method,
            &self.session_opts(N_CTX),
            self.threads,
            0,
        )?;
        let mut out = [None, None];
        for (i, d) in self.domains.iter().enumerate() {
            if only.is_none_or(|o| o == i) {
                out[i] = Some(score(s.session(), d)?);
            }
        }
        // Back to the base weights for the next configuration.
        let zeros = vec![0.0; packs.len()];
        s.set_mixture(&zeros)?;
        Ok(out)
    }

    /// Scores of the plain model at `path` (a merged file), both domains.
    fn evaluate_file(&self, path: &Path) -> Result<[Score; 2]> {
        let model = Model::load(path, &ModelOptions::default())?;
        let mut s = model.session(&self.session_opts(N_CTX))?;
        let a = score(&mut s, &self.domains[0])?;
        let b = score(&mut s, &self.domains[1])?;
        Ok([a, b])
    }

    fn time(&mut self, what: &str, started: Instant) {
        let s = started.elapsed().as_secs_f64();
        eprintln!("[{s:7.1} s] {what}");
        self.timings.push((what.to_string(), s));
    }
}

fn mixture_config(base: &Path, models: &[(&Path, f64)], method: Method) -> MergeConfig {
    let mut cfg = MergeConfig::new(method, ConfigSource::Cli);
    cfg.base_model = Some(base.display().to_string());
    for (p, w) in models {
        let mut e = ModelEntry::new(p.display().to_string());
        e.parameters.set("weight", ParamValue::Number(*w));
        cfg.models.push(e);
    }
    cfg
}

/// Both domains' scores of one configuration (`None` for a domain not scored).
type Scores = [Option<Score>; 2];

/// Domain `i`'s score (zeros when it was not scored).
fn sc(s: &Scores, i: usize) -> Score {
    s[i].unwrap_or_default()
}

/// A point of experiment 1's drop-rate curve: expert, rescale, density, scores over seeds,
/// pack bytes.
type CurvePoint = (usize, Rescale, f64, Vec<Score>, Option<u64>);

/// What experiment 0 measured that later ones use.
struct Baselines {
    /// Each expert as a density-1 pack (the exact fine-tune).
    dense: Vec<PathBuf>,
    /// Each expert alone at weight 1.
    alone: [Scores; 2],
}

/// Experiment 0: the base and each expert alone (density-1 packs: the exact fine-tune).
fn baselines(lab: &mut Lab) -> Result<Baselines> {
    let t = Instant::now();
    let base = lab.base.clone();
    let mut dense = Vec::new();
    for (i, e) in lab.experts.clone().iter().enumerate() {
        dense.push(
            lab.pack(
                &base,
                e,
                "f32",
                Sparsifier::Random,
                1.0,
                Rescale::Inverse,
                0,
                i as u32,
            )?
            .0,
        );
    }
    let on_base = |lab: &Lab, w: [f64; 2]| {
        lab.evaluate(&lab.model, &base, &dense, &w, Method::TaskArithmetic, None)
    };
    let base_scores = on_base(lab, [0.0, 0.0])?;
    let alone = [on_base(lab, [1.0, 0.0])?, on_base(lab, [0.0, 1.0])?];
    lab.time("baselines: base and each expert alone", t);
    let names = lab.names();
    let lab_label = lab.fixture.label;
    let md = &mut lab.md;
    writeln!(md, "## 0. The experts\n")?;
    writeln!(md, "| model | {} exact | {} exact | {} answer log-lik./token | {} answer log-lik./token | {} held-out log-lik. | {} held-out log-lik. | {} held-out ppl | {} held-out ppl |", names[0], names[1], names[0], names[1], names[0], names[1], names[0], names[1])?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|")?;
    let mut row0 = |label: &str, s: &Scores| -> Result<()> {
        let (a, b) = (sc(s, 0), sc(s, 1));
        writeln!(
            md,
            "| {label} | {:.0}% | {:.0}% | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} |",
            100.0 * a.exact,
            100.0 * b.exact,
            a.logprob,
            b.logprob,
            a.heldout_logprob,
            b.heldout_logprob,
            a.ppl,
            b.ppl
        )?;
        Ok(())
    };
    row0(&format!("base ({}, F32)", lab_label), &base_scores)?;
    row0(&format!("{} expert", names[0]), &alone[0])?;
    row0(&format!("{} expert", names[1]), &alone[1])?;
    writeln!(md)?;
    lab.json.insert(
        "baselines".into(),
        json!({
            "base": [sc(&base_scores, 0).exact, sc(&base_scores, 1).exact],
            names[0]: [sc(&alone[0], 0).exact, sc(&alone[0], 1).exact],
            names[1]: [sc(&alone[1], 0).exact, sc(&alone[1], 1).exact],
        }),
    );
    Ok(Baselines { dense, alone })
}

/// Experiment 1: drop-rate curve per expert, with and without rescale, its table and plot.
/// Returns the curve (experiment 5 reports its pack sizes).
fn drop_rate(lab: &mut Lab, dense: &[PathBuf]) -> Result<Vec<CurvePoint>> {
    let t = Instant::now();
    let base = lab.base.clone();
    let mut curve: Vec<CurvePoint> = Vec::new();
    for (i, e) in lab.experts.clone().iter().enumerate() {
        for rescale in [Rescale::Inverse, Rescale::None] {
            for &d in densities() {
                let seeds: &[u64] = if d >= 1.0 { &[0] } else { seeds() };
                let mut scores = Vec::new();
                let mut bytes = None;
                for &seed in seeds {
                    let (p, _) = lab.pack(
                        &base,
                        e,
                        "f32",
                        Sparsifier::Random,
                        d,
                        rescale,
                        seed,
                        i as u32,
                    )?;
                    bytes = Some(std::fs::metadata(&p)?.len());
                    let mut w = vec![0.0; 2];
                    w[i] = 1.0;
                    let mut packs = dense.to_vec();
                    packs[i] = p;
                    let s = lab.evaluate(
                        &lab.model,
                        &base,
                        &packs,
                        &w,
                        Method::TaskArithmetic,
                        Some(i),
                    )?;
                    scores.push(sc(&s, i));
                }
                curve.push((i, rescale, d, scores, bytes));
            }
        }
    }
    lab.time("1. drop-rate curves", t);
    let names = lab.names();
    let md = &mut lab.md;
    writeln!(
        md,
        "## 1. Drop rate: ability vs. density, with and without rescale\n"
    )?;
    writeln!(md, "Each expert's own domain, DARE pack (F16 values) of the F32 fine-tune applied at weight 1 to the F32 base; mean over seeds {SEEDS:?} with (min–max).\n")?;
    writeln!(md, "| expert | rescale | density | exact match | answer log-lik./token | held-out log-lik./token | held-out ppl |")?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    for (i, r, d, s, _) in &curve {
        let ex: Vec<f64> = s.iter().map(|x| x.exact).collect();
        let lp: Vec<f64> = s.iter().map(|x| x.logprob).collect();
        let hl: Vec<f64> = s.iter().map(|x| x.heldout_logprob).collect();
        let pp: Vec<f64> = s.iter().map(|x| x.ppl).collect();
        writeln!(
            md,
            "| {} | {} | {d} | {} | {} | {} | {} |",
            names[*i],
            r.name(),
            pct(&ex),
            num(&lp, 2),
            num(&hl, 2),
            num(&pp, 1)
        )?;
    }
    writeln!(
        md,
        "\n![exact match and answer log-likelihood vs. density](results-density.png)\n"
    )?;
    plot_drop_rate(&curve, names)?;
    Ok(curve)
}

/// Draws experiment 1's curves into docs/results-density.png (when a font is installed).
fn plot_drop_rate(curve: &[CurvePoint], names: [&str; 2]) -> Result<()> {
    let mut series_exact = Vec::new();
    let mut series_lp = Vec::new();
    for (i, name) in names.iter().enumerate() {
        for rescale in [Rescale::Inverse, Rescale::None] {
            let label = format!("{name} expert, rescale {}", rescale.name());
            let pts = |f: &dyn Fn(&Score) -> f64| -> Vec<(f64, f64, f64, f64)> {
                curve
                    .iter()
                    .filter(|c| c.0 == i && c.1 == rescale)
                    .map(|c| {
                        let v: Vec<f64> = c.3.iter().map(f).collect();
                        let (m, lo, hi) = spread(&v);
                        (c.2, m, lo, hi)
                    })
                    .collect()
            };
            series_exact.push(plot::Series {
                label: label.clone(),
                points: pts(&|s| 100.0 * s.exact),
            });
            series_lp.push(plot::Series {
                label,
                points: pts(&|s| s.logprob),
            });
        }
    }
    let lp_min = series_lp
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.2))
        .fold(0.0f64, f64::min);
    let Some(font) = plot::find_font() else {
        eprintln!(
            "no DejaVu Sans font found: the plot is not drawn (apt-get install fonts-dejavu-core)"
        );
        return Ok(());
    };
    plot::draw_png(
        &Path::new("docs").join("results-density.png"),
        &font,
        &[
            plot::Chart {
                title: "Exact match vs. DARE density",
                x_label: "density (kept fraction)",
                y_label: "exact match (%)",
                log_x: true,
                y_range: (0.0, 100.0),
                series: &series_exact,
            },
            plot::Chart {
                title: "Answer log-likelihood vs. DARE density",
                x_label: "density (kept fraction)",
                y_label: "log-likelihood per answer token",
                log_x: true,
                y_range: ((lp_min * 1.1).floor(), 0.0),
                series: &series_lp,
            },
        ],
    )?;
    Ok(())
}

/// Experiment 2: merging both experts into the base, by method and weight.
fn merges(lab: &mut Lab, alone: &[Scores; 2]) -> Result<()> {
    let t = Instant::now();
    let base = lab.base.clone();
    let names = lab.names();
    writeln!(lab.md, "## 2. Merging the two experts into the base\n")?;
    writeln!(lab.md, "Both experts at the same weight w (λ = 1), F32; each ability of the merged model. DARE/DELLA at density 0.1 (mean over seeds {SEEDS:?}), TIES trims to the top 20% magnitudes. Alone: {} {} / {} {}.\n", names[0], pct(&[sc(&alone[0], 0).exact]), names[1], pct(&[sc(&alone[1], 1).exact]))?;
    writeln!(
        lab.md,
        "| method | w | {} exact | {} exact | {} log-lik. | {} log-lik. |",
        names[0], names[1], names[0], names[1]
    )?;
    writeln!(lab.md, "|---|---|---|---|---|---|")?;
    let mut merged_json = Vec::new();
    let methods: [(&str, Sparsifier, f64, Method, bool); 5] = [
        (
            "task_arithmetic",
            Sparsifier::Random,
            1.0,
            Method::TaskArithmetic,
            false,
        ),
        ("ties", Sparsifier::Magnitude, 0.2, Method::Ties, false),
        (
            "dare_linear",
            Sparsifier::Random,
            0.1,
            Method::TaskArithmetic,
            true,
        ),
        ("dare_ties", Sparsifier::Random, 0.1, Method::DareTies, true),
        ("della", Sparsifier::Della, 0.1, Method::DareTies, true),
    ];
    for &(label, sparsify, density, method, random) in &methods {
        for &w in pick(&[0.75, 0.5, 1.0]) {
            let seeds: &[u64] = if random { seeds() } else { &[0] };
            let mut per = [Vec::new(), Vec::new()];
            for &seed in seeds {
                let mut packs = Vec::new();
                for (i, e) in lab.experts.iter().enumerate() {
                    packs.push(
                        lab.pack(
                            &base,
                            e,
                            "f32",
                            sparsify,
                            density,
                            Rescale::Inverse,
                            seed,
                            i as u32,
                        )?
                        .0,
                    );
                }
                let s = lab.evaluate(&lab.model, &base, &packs, &[w, w], method, None)?;
                per[0].push(sc(&s, 0));
                per[1].push(sc(&s, 1));
            }
            let (cells, exact) = both_domains(&per);
            writeln!(lab.md, "| {label} | {w} | {cells} |")?;
            merged_json.push(json!({"method": label, "w": w, "exact": exact}));
        }
    }
    writeln!(lab.md)?;
    lab.json
        .insert("merge".into(), serde_json::Value::Array(merged_json));
    lab.time("2. merges", t);
    Ok(())
}

/// Experiment 3: base and experts quantized before merging; packs of the quantized pair
/// applied to the quantized base.
fn quantized(lab: &mut Lab) -> Result<()> {
    let t = Instant::now();
    let base = lab.base.clone();
    let names = lab.names();
    writeln!(lab.md, "## 3. Quantized before merging\n")?;
    writeln!(lab.md, "Base and experts quantized with `ggmerge quantize` first; packs extracted from the quantized pair and applied to the quantized base (w = 1 alone, the merge at w = 0.75; DARE density 0.1, mean over seeds).\n")?;
    writeln!(
        lab.md,
        "| type | configuration | {} exact | {} exact | {} log-lik. | {} log-lik. |",
        names[0], names[1], names[0], names[1]
    )?;
    writeln!(lab.md, "|---|---|---|---|---|---|")?;
    for &ty in pick(&["F32", "Q8_0", "Q4_K_M"]) {
        let (qbase, qexperts) = if ty == "F32" {
            (base.clone(), lab.experts.clone())
        } else {
            (
                lab.quantized(&base, "base", ty)?,
                [
                    lab.quantized(&lab.experts[0], "capitals", ty)?,
                    lab.quantized(&lab.experts[1], "birthplaces", ty)?,
                ],
            )
        };
        let qmodel = if ty == "F32" {
            None
        } else {
            Some(Model::load(&qbase, &ModelOptions::default())?)
        };
        let m = qmodel.as_ref().unwrap_or(&lab.model);
        let tag = if ty == "F32" {
            "f32".to_string()
        } else {
            format!("q{ty}")
        };
        let mut qdense = Vec::new();
        for (i, e) in qexperts.iter().enumerate() {
            qdense.push(
                lab.pack(
                    &qbase,
                    e,
                    &tag,
                    Sparsifier::Random,
                    1.0,
                    Rescale::Inverse,
                    0,
                    i as u32,
                )?
                .0,
            );
        }
        let configs: [(&str, [f64; 2], Method, bool); 4] = [
            ("capitals alone", [1.0, 0.0], Method::TaskArithmetic, false),
            (
                "birthplaces alone",
                [0.0, 1.0],
                Method::TaskArithmetic,
                false,
            ),
            (
                "task_arithmetic w = 0.75",
                [0.75, 0.75],
                Method::TaskArithmetic,
                false,
            ),
            ("dare_ties w = 0.75", [0.75, 0.75], Method::DareTies, true),
        ];
        for (label, w, method, random) in configs {
            let seeds: &[u64] = if random { seeds() } else { &[0] };
            let mut per = [Vec::new(), Vec::new()];
            for &seed in seeds {
                let packs = if random {
                    let mut v = Vec::new();
                    for (i, e) in qexperts.iter().enumerate() {
                        v.push(
                            lab.pack(
                                &qbase,
                                e,
                                &tag,
                                Sparsifier::Random,
                                0.1,
                                Rescale::Inverse,
                                seed,
                                i as u32,
                            )?
                            .0,
                        );
                    }
                    v
                } else {
                    qdense.clone()
                };
                let s = lab.evaluate(m, &qbase, &packs, &w, method, None)?;
                per[0].push(sc(&s, 0));
                per[1].push(sc(&s, 1));
            }
            writeln!(lab.md, "| {ty} | {label} | {} |", both_domains(&per).0)?;
        }
    }
    writeln!(lab.md)?;
    lab.time("3. quantized merges", t);
    Ok(())
}

/// Experiment 4: the merged F32 model written quantized (`--type`), its delta retention and
/// abilities.
fn requantized(lab: &mut Lab) -> Result<()> {
    let t = Instant::now();
    let names = lab.names();
    writeln!(lab.md, "## 4. Requantizing the merge\n")?;
    writeln!(lab.md, "`ggmerge merge` of the F32 base and experts (w = 0.75 each) written as a quantized model (`--type`); retention = ⟨q(merged) − base, Δ⟩ / ⟨Δ, Δ⟩ over all merged tensors (weighted by tensor); seed 1.\n")?;
    writeln!(lab.md, "| output type | method | density | retention | {} exact | {} exact | {} log-lik. | {} log-lik. |", names[0], names[1], names[0], names[1])?;
    writeln!(lab.md, "|---|---|---|---|---|---|---|---|")?;
    for &ty in pick(&["Q8_0", "Q4_1", "Q4_K_M"]) {
        for &(method, density) in pick(&[
            (Method::TaskArithmetic, 1.0),
            (Method::DareTies, 0.1),
            (Method::DareTies, 0.3),
            (Method::DareTies, 0.03),
        ]) {
            let mut cfg = mixture_config(
                &lab.base,
                &[(&lab.experts[0], 0.75), (&lab.experts[1], 0.75)],
                method,
            );
            if density < 1.0 {
                cfg.parameters.set("density", ParamValue::Number(density));
            }
            cfg.seed = Some(1);
            let out = lab
                .work
                .join(format!("merged-{ty}-{}-{density}.gguf", method.name()));
            let opts = MergeOptions {
                output: out.clone(),
                out_type: Some(ty.to_string()),
                threads: lab.threads,
                ..Default::default()
            };
            let report = merge_models(&cfg, &opts, &NoProgress)?;
            let total = retention(&report);
            let s = lab.evaluate_file(&out)?;
            writeln!(
                lab.md,
                "| {ty} | {} | {density} | {:.0}% | {:.0}% | {:.0}% | {:.2} | {:.2} |",
                method.name(),
                100.0 * total,
                100.0 * s[0].exact,
                100.0 * s[1].exact,
                s[0].logprob,
                s[1].logprob
            )?;
            std::fs::remove_file(&out).ok();
        }
    }
    writeln!(lab.md)?;
    lab.time("4. requantized merges", t);
    Ok(())
}

/// A merge's delta retention over all its output types, weighted by tensor.
fn retention(report: &MergeReport) -> f64 {
    let tensors = report.retention.iter().map(|r| r.tensors as f64);
    report
        .retention
        .iter()
        .map(|r| r.retention * r.tensors as f64)
        .sum::<f64>()
        / tensors.sum::<f64>().max(1.0)
}

/// Experiment 5: delta packs, their size (from experiment 1's `curve`), and run-time
/// application against the merged file.
fn packs(lab: &mut Lab, curve: &[CurvePoint]) -> Result<()> {
    let t = Instant::now();
    let base = lab.base.clone();
    let names = lab.names();
    writeln!(lab.md, "## 5. Delta packs\n")?;
    let expert_bytes = std::fs::metadata(&lab.experts[0])?.len();
    writeln!(lab.md, "Pack size (F16 values, DARE, rescale inverse) of the {} expert; the fine-tune itself is {:.1} MiB (F32).\n", names[0], expert_bytes as f64 / 1048576.0)?;
    writeln!(lab.md, "| density | pack | pack / fine-tune |")?;
    writeln!(lab.md, "|---|---|---|")?;
    for (i, r, d, _, bytes) in curve {
        if *i == 0 && *r == Rescale::Inverse {
            if let Some(b) = bytes {
                writeln!(
                    lab.md,
                    "| {d} | {:.1} MiB | {:.1}% |",
                    *b as f64 / 1048576.0,
                    100.0 * *b as f64 / expert_bytes as f64
                )?;
            }
        }
    }
    let mut packs = Vec::new();
    for (i, e) in lab.experts.iter().enumerate() {
        packs.push(
            lab.pack(
                &base,
                e,
                "f32",
                Sparsifier::Random,
                0.1,
                Rescale::Inverse,
                1,
                i as u32,
            )?
            .0,
        );
    }
    let mut es = ExpertSession::new(
        &lab.model,
        &base,
        packs.iter().map(Expert::from_path).collect(),
        &[0.75, 0.75],
        Method::DareTies,
        &lab.session_opts(PPL_CTX),
        lab.threads,
        0,
    )?;
    let text = format!(
        "{}\n{}",
        lab.domains[0].heldout_text(),
        lab.domains[1].heldout_text()
    );
    let run_ppl = es.session().perplexity(&text, &NoProgress)?.ppl;
    es.set_mixture(&[0.0, 0.0])?;
    drop(es);
    let out = lab.work.join("applied.gguf");
    let cfg = mixture_config(
        &base,
        &[(&packs[0], 0.75), (&packs[1], 0.75)],
        Method::DareTies,
    );
    merge_models(
        &cfg,
        &MergeOptions {
            output: out.clone(),
            threads: lab.threads,
            ..Default::default()
        },
        &NoProgress,
    )?;
    let applied = Model::load(&out, &ModelOptions::default())?;
    let file_ppl = applied
        .session(&lab.session_opts(PPL_CTX))?
        .perplexity(&text, &NoProgress)?
        .ppl;
    drop(applied);
    std::fs::remove_file(&out).ok();
    writeln!(lab.md, "\nBoth experts at 0.75 (dare_ties packs, density 0.1): perplexity of the held-out texts with `run --expert` (applied at load time) {run_ppl:.4}, with the `apply`-ed file loaded by llama.cpp {file_ppl:.4} (relative difference {:.1e}).\n", (run_ppl - file_ppl).abs() / file_ppl)?;
    lab.json.insert(
        "packs".into(),
        json!({"run_ppl": run_ppl, "file_ppl": file_ppl}),
    );
    lab.time("5. packs", t);
    Ok(())
}

/// RMS of q(merged) − exact over RMS of exact − base, over the tensors the merge changed
/// (exact ≠ base somewhere): the requantization error relative to the merged delta. `exact` is
/// the same merge written as F32; `out` and `base` have the base's types.
fn relative_rms_error(base: &Path, exact: &Path, out: &Path) -> Result<f64> {
    let open = |p: &Path| GgufModel::open(p).with_context(|| format!("reading {}", p.display()));
    let (base, exact, out) = (open(base)?, open(exact)?, open(out)?);
    let decode = |t: &ggmerge::format::gguf::TensorRef<'_>| -> Result<Vec<f32>> {
        let mut v = vec![0f32; usize::try_from(t.info.n_elements())?];
        ggmerge::quant::dequantize(t.info.ty, t.data, &mut v, &t.info.name)?;
        Ok(v)
    };
    let (mut err, mut delta) = (0f64, 0f64);
    for b in base.tensors() {
        let name = &b.info.name;
        let (Some(x), Some(y)) = (exact.tensor_by_name(name), out.tensor_by_name(name)) else {
            return Err(anyhow!("{name}: missing from a merged file"));
        };
        let (vb, vx) = (decode(&b)?, decode(&x)?);
        if vb == vx {
            continue;
        }
        for ((b, x), y) in vb.iter().zip(&vx).zip(decode(&y)?) {
            err += f64::from(y - x).powi(2);
            delta += f64::from(x - b).powi(2);
        }
    }
    Ok((err / delta.max(f64::MIN_POSITIVE)).sqrt())
}

/// `expert` re-based onto the quantized base `qbase`: qbase's values plus the fine-tune's exact
/// delta (expert − F32 base), as F32 (task arithmetic of both against the F32 base, weight 1
/// each). Merging it into `qbase` merges exactly the F32 experiment's delta.
fn rebase(lab: &Lab, expert: &Path, qbase: &Path, out: &Path) -> Result<()> {
    let cfg = mixture_config(
        &lab.base,
        &[(expert, 1.0), (qbase, 1.0)],
        Method::TaskArithmetic,
    );
    let opts = MergeOptions {
        output: out.to_path_buf(),
        out_type: Some("F32".into()),
        threads: lab.threads,
        force: true,
        ..Default::default()
    };
    merge_models(&cfg, &opts, &NoProgress)
        .with_context(|| format!("re-basing {} onto {}", expert.display(), qbase.display()))?;
    Ok(())
}

/// Experiment 6's heading.
const REQUANT_HEADING: &str =
    "## 6. Merging into a quantized base: full, grid and grid-stochastic requantization";
/// Heading of experiment 6's Gemma subsection.
const GEMMA_HEADING: &str = "### Gemma 3 270M";

/// Experiment 6: both experts merged into a quantized base, the output in the base's types,
/// with each requantization mode (`--requant full|grid|grid-stochastic`) against the exact
/// (F32) merge: SmolLM2's table ([`requant_table`]), then Gemma's ([`gemma_requant_modes`]).
fn requant_modes(lab: &mut Lab) -> Result<()> {
    let t = Instant::now();
    let mut md = String::new();
    writeln!(md, "{REQUANT_HEADING}\n")?;
    writeln!(md, "The F32 base quantized with `ggmerge quantize`; each expert re-based onto it (the quantized base's values plus the fine-tune's exact delta, as F32), so that merging both into the quantized base (w = 0.75 each, output in the base's types) merges exactly the deltas of the F32 experiments and only the requantization differs. Density 1 is task_arithmetic, below it {} (seed 1). Per `--requant` mode: retention as in experiment 4; the RMS error of the merged weights against the exact merge (the same merge written as F32), relative to the merged delta's RMS, over the tensors the merge changed; of the blocks on the base's grid, the share that moved and the share requantized in full (a value beyond the grid's range); the facts' exact match and answer log-likelihood; the perplexity of the two held-out texts (mean). Rows `exact (F32)`: the merge without requantization; rows `base`: the quantized base alone.\n", GRID_DARE.name())?;
    writeln!(md, "### {}\n", lab.fixture.label)?;
    let rows = requant_table(lab, &mut md)?;
    lab.md.push_str(&md);
    lab.json
        .insert("requant_modes".into(), serde_json::Value::Array(rows));
    lab.time("6. requantization modes", t);
    Ok(())
}

/// Experiment 6 on the Gemma fixture (DIR's Gemma base and experts, their own work
/// directory), after a table of the F32 base and experts alone (experiment 0 runs on SmolLM2
/// only): its subsection of docs/results.md, its results for results.json (`alone`, `rows`)
/// and its wall time.
fn gemma_requant_modes(
    dir: &Path,
    threads: Option<usize>,
) -> Result<(String, serde_json::Value, f64)> {
    let t = Instant::now();
    let mut lab = Lab::open(dir, threads, &GEMMA)?;
    let mut md = String::new();
    writeln!(md, "{GEMMA_HEADING}\n")?;
    writeln!(md, "The same experiment on the Gemma fixture (a base model, no chat template; 18 layers of 640), its F32 base the Q4_K_M fixture dequantized. Q4_K_M keeps real K-quant blocks where rows are a multiple of 256 wide — `ffn_down` (2048: Q4_K or Q6_K) and `attn_output` (1024: Q4_K) — and falls back to Q5_0 or Q8_0 for the 640-wide rows of the other matrices, as llama.cpp's rules say. The experts were trained by {} on the same facts and text with the same recipe as SmolLM2's (AdamW, lr 1e-4 decaying to 1e-5 over 8 epochs, windows of 256 tokens, the token embedding frozen).\n", lab.fixture.trained_by)?;
    // The experts alone first (experiment 0 runs on SmolLM2 only).
    writeln!(
        md,
        "| F32 model | {n0} exact | {n1} exact | {n0} log-lik. | {n1} log-lik. | held-out ppl |",
        n0 = lab.names()[0],
        n1 = lab.names()[1]
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    let models = [
        ("base".to_string(), lab.base.clone()),
        (format!("{} expert", lab.names()[0]), lab.experts[0].clone()),
        (format!("{} expert", lab.names()[1]), lab.experts[1].clone()),
    ];
    let mut alone = Vec::new();
    for (label, path) in &models {
        let s = lab.evaluate_file(path)?;
        writeln!(
            md,
            "| {label} | {:.0}% | {:.0}% | {:.2} | {:.2} | {:.2} |",
            100.0 * s[0].exact,
            100.0 * s[1].exact,
            s[0].logprob,
            s[1].logprob,
            (s[0].ppl + s[1].ppl) / 2.0
        )?;
        alone.push(json!({
            "model": label, "exact": [s[0].exact, s[1].exact],
            "logprob": [s[0].logprob, s[1].logprob], "heldout_ppl": [s[0].ppl, s[1].ppl],
        }));
    }
    writeln!(md)?;
    let rows = requant_table(&mut lab, &mut md)?;
    lab.time("6. requantization modes (Gemma 3 270M)", t);
    Ok((
        md,
        json!({ "alone": alone, "rows": rows }),
        t.elapsed().as_secs_f64(),
    ))
}

/// Experiment 6's table for `lab`'s fixture, appended to `md`; returns its rows for
/// results.json.
fn requant_table(lab: &mut Lab, md: &mut String) -> Result<Vec<serde_json::Value>> {
    let names = lab.names();
    let types: &[&str] = pick(&GRID_TYPES);
    let densities: &[f64] = if quick() {
        &[1.0, 0.1]
    } else {
        &GRID_DENSITIES
    };
    writeln!(md, "| base type | density | requant | retention | RMS error / delta RMS | blocks moved / full | {} exact | {} exact | {} log-lik. | {} log-lik. | held-out ppl |", names[0], names[1], names[0], names[1])?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    let mut rows = Vec::new();
    let base = lab.base.clone();
    for &ty in types {
        let qbase = lab.quantized(&base, "base", ty)?;
        let row = |md: &mut String, density: &str, mode: &str, cells: &str, s: &[Score; 2]| {
            writeln!(
                md,
                "| {ty} | {density} | {mode} | {cells} | {:.0}% | {:.0}% | {:.2} | {:.2} | {:.2} |",
                100.0 * s[0].exact,
                100.0 * s[1].exact,
                s[0].logprob,
                s[1].logprob,
                (s[0].ppl + s[1].ppl) / 2.0
            )
        };
        let s = lab.evaluate_file(&qbase)?;
        row(md, "—", "base", "— | — | —", &s)?;
        // The re-based experts are F32 models (~0.5 GiB each here): made per type, removed
        // after it.
        let rebased = [
            lab.work.join(format!("rebased-capitals-{ty}.gguf")),
            lab.work.join(format!("rebased-birthplaces-{ty}.gguf")),
        ];
        for (e, out) in lab.experts.iter().zip(&rebased) {
            rebase(lab, e, &qbase, out)?;
        }
        for &density in densities {
            let method = if density >= 1.0 {
                Method::TaskArithmetic
            } else {
                GRID_DARE
            };
            let mut cfg =
                mixture_config(&qbase, &[(&rebased[0], 0.75), (&rebased[1], 0.75)], method);
            if density < 1.0 {
                cfg.parameters.set("density", ParamValue::Number(density));
            }
            cfg.seed = Some(1);
            let merge = |out: &Path, out_type: Option<&str>, requant| {
                let opts = MergeOptions {
                    output: out.to_path_buf(),
                    out_type: out_type.map(str::to_string),
                    threads: lab.threads,
                    requant: Some(requant),
                    force: true,
                    ..Default::default()
                };
                merge_models(&cfg, &opts, &NoProgress)
                    .with_context(|| format!("merging into {}", out.display()))
            };
            let exact = lab.work.join(format!("grid-exact-{ty}.gguf"));
            merge(&exact, Some("F32"), Requant::Full)?;
            let s = lab.evaluate_file(&exact)?;
            row(md, &density.to_string(), "exact (F32)", "— | 0 | —", &s)?;
            for requant in Requant::ALL {
                let out = lab.work.join(format!("grid-{requant}-{ty}.gguf"));
                let report = merge(&out, None, requant)?;
                let kept = retention(&report);
                let err = relative_rms_error(&qbase, &exact, &out)?;
                let blocks = match &report.grid {
                    Some(g) => {
                        let b = &g.blocks;
                        let all = (b.kept + b.moved + b.fallback).max(1) as f64;
                        format!(
                            "{:.0}% / {:.2}%",
                            100.0 * b.moved as f64 / all,
                            100.0 * b.fallback as f64 / all
                        )
                    }
                    None => "—".into(),
                };
                let s = lab.evaluate_file(&out)?;
                let cells = format!("{:.0}% | {err:.3} | {blocks}", 100.0 * kept);
                row(md, &density.to_string(), requant.name(), &cells, &s)?;
                rows.push(json!({
                    "type": ty, "method": method.name(), "density": density,
                    "requant": requant.name(), "retention": kept, "relative_rms_error": err,
                    "grid": report.grid.as_ref().map(|g| json!({
                        "kept": g.blocks.kept, "moved": g.blocks.moved,
                        "fallback": g.blocks.fallback,
                    })),
                    "exact": [s[0].exact, s[1].exact],
                    "logprob": [s[0].logprob, s[1].logprob],
                    "heldout_ppl": [s[0].ppl, s[1].ppl],
                    "merge_seconds": report.seconds,
                }));
                std::fs::remove_file(&out).ok();
            }
            std::fs::remove_file(&exact).ok();
        }
        for p in &rebased {
            std::fs::remove_file(p).ok();
        }
    }
    writeln!(md)?;
    Ok(rows)
}

/// The wall time of each step, fine-tuning included (from scripts/experiments.sh's files).
fn wall_times(lab: &mut Lab) -> Result<()> {
    let md = &mut lab.md;
    writeln!(md, "## Wall time of each step\n")?;
    writeln!(md, "| step | seconds |")?;
    writeln!(md, "|---|---|")?;
    for (what, s) in &lab.timings {
        writeln!(md, "| {what} | {s:.0} |")?;
    }
    for d in ["capitals", "birthplaces"] {
        if let Ok(s) = std::fs::read_to_string(lab.dir.join(format!("finetune-{d}.seconds"))) {
            writeln!(md, "| fine-tuning the {d} expert | {} |", s.trim())?;
        }
    }
    md.push_str(&gemma_finetune_rows(&lab.dir));
    writeln!(md)?;
    Ok(())
}

/// Wall-time rows of the Gemma experts' training (from scripts/experiments.sh's files).
fn gemma_finetune_rows(dir: &Path) -> String {
    let mut rows = String::new();
    for d in ["capitals", "birthplaces"] {
        if let Ok(s) = std::fs::read_to_string(dir.join(format!("gemma-finetune-{d}.seconds"))) {
            rows.push_str(&format!(
                "| {GEMMA_TRAIN_ROW} {d} expert (scripts/train_gemma_expert.py) | {} |\n",
                s.trim()
            ));
        }
    }
    rows
}

/// Start of the wall-time rows of the Gemma experts' training.
const GEMMA_TRAIN_ROW: &str = "fine-tuning the Gemma";
/// Wall-time row of experiment 6 on Gemma.
const GEMMA_REQUANT_ROW: &str = "6. requantization modes (Gemma 3 270M)";

/// Every experiment in order; the tables go to docs/results.md (its generated part) and
/// docs/results.json.
fn run(dir: &Path, threads: Option<usize>) -> Result<()> {
    let mut lab = Lab::open(dir, threads, &SMOLLM2)?;
    let Baselines { dense, alone } = baselines(&mut lab)?;
    let curve = drop_rate(&mut lab, &dense)?;
    merges(&mut lab, &alone)?;
    quantized(&mut lab)?;
    requantized(&mut lab)?;
    packs(&mut lab, &curve)?;
    requant_modes(&mut lab)?;
    let (md, rows, secs) = gemma_requant_modes(dir, threads)?;
    lab.md.push_str(&md);
    lab.json.insert("requant_modes_gemma".into(), rows);
    lab.timings.push((GEMMA_REQUANT_ROW.into(), secs));
    wall_times(&mut lab)?;
    write_generated(Path::new("docs/results.md"), &lab.md)?;
    write(
        Path::new("docs/results.json"),
        &serde_json::to_string_pretty(&serde_json::Value::Object(lab.json))?,
    )?;
    Ok(())
}

/// Experiments `run --only` accepts: those that need no other's results.
/// `gemma-requant-modes` writes into docs/ (see [`run_gemma_only`]); the others print.
const ALONE: [&str; 4] = [
    "quantized",
    "requantized",
    "requant-modes",
    "gemma-requant-modes",
];

/// One experiment of [`ALONE`], its table printed (docs/ untouched).
fn run_only(dir: &Path, threads: Option<usize>, name: &str) -> Result<()> {
    if name == "gemma-requant-modes" {
        return run_gemma_only(dir, threads);
    }
    let mut lab = Lab::open(dir, threads, &SMOLLM2)?;
    match name {
        "quantized" => quantized(&mut lab)?,
        "requantized" => requantized(&mut lab)?,
        "requant-modes" => requant_modes(&mut lab)?,
        _ => return Err(anyhow!("--only {name:?}: one of {ALONE:?}")),
    }
    print!("{}", lab.md);
    Ok(())
}

/// `run --only gemma-requant-modes`: experiment 6 on Gemma alone, written into the generated
/// part of docs/results.md (its subsection of experiment 6 and its wall-time rows replaced or
/// added, the rest kept: SmolLM2's experiments need not run again) and into docs/results.json
/// (`requant_modes_gemma`).
fn run_gemma_only(dir: &Path, threads: Option<usize>) -> Result<()> {
    let (md, rows, secs) = gemma_requant_modes(dir, threads)?;
    // Kept beside the work files too, should the splice below fail.
    write(&dir.join(GEMMA.work).join("requant-modes.md"), &md)?;
    let path = Path::new("docs/results.md");
    let old = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {} (run every experiment first)",
            path.display()
        )
    })?;
    let timing = format!("| {GEMMA_REQUANT_ROW} | {secs:.0} |\n");
    let new = splice_gemma(&old, &md, &timing, &gemma_finetune_rows(dir))?;
    write(path, &new)?;
    let json_path = Path::new("docs/results.json");
    let mut json = match std::fs::read_to_string(json_path) {
        Ok(text) => serde_json::from_str::<serde_json::Value>(&text)
            .with_context(|| format!("{}: not JSON", json_path.display()))?,
        Err(_) => json!({}),
    };
    let obj = json
        .as_object_mut()
        .ok_or_else(|| anyhow!("{}: not a JSON object", json_path.display()))?;
    obj.insert("requant_modes_gemma".into(), rows);
    write(json_path, &serde_json::to_string_pretty(&json)?)
}

/// `doc` (docs/results.md) with experiment 6's Gemma subsection set to `section` (replacing
/// the one there, else added at the end of experiment 6; SmolLM2's table gets its subheading
/// if it lacks one), and the wall-time table's Gemma rows set to `timing` (after experiment
/// 6's row) and `train_rows` (at the end). Only the generated part changes.
fn splice_gemma(doc: &str, section: &str, timing: &str, train_rows: &str) -> Result<String> {
    let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) else {
        return Err(anyhow!(
            "docs/results.md has no generated part: run every experiment first"
        ));
    };
    let (head, gen, tail) = (&doc[..b], &doc[b..e], &doc[e..]);
    let s6 = gen.find(REQUANT_HEADING).ok_or_else(|| {
        anyhow!("docs/results.md has no experiment 6: run every experiment first")
    })?;
    let end6 = gen[s6..].find("\n## ").map_or(gen.len(), |i| s6 + i + 1);
    let mut exp6 = gen[s6..end6].to_string();
    if let Some(g) = exp6.find(GEMMA_HEADING) {
        exp6.truncate(g);
    }
    let smol = format!("### {}\n\n", SMOLLM2.label);
    if !exp6.contains(&smol) {
        if let Some(t) = exp6.find("\n| base type") {
            exp6.insert_str(t + 1, &smol);
        }
    }
    exp6.push_str(section);
    let mut rest = String::new();
    let mut in_times = false;
    for line in gen[end6..].lines() {
        if line.starts_with("## ") {
            in_times = line.starts_with("## Wall time");
        }
        let gemma_row = line.starts_with(&format!("| {GEMMA_REQUANT_ROW}"))
            || line.starts_with(&format!("| {GEMMA_TRAIN_ROW}"));
        if in_times && gemma_row {
            continue;
        }
        if in_times && line.is_empty() && rest.ends_with("|\n") {
            rest.push_str(train_rows);
            in_times = false;
        }
        rest.push_str(line);
        rest.push('\n');
        if in_times && line.starts_with("| 6. requantization modes |") {
            rest.push_str(timing);
        }
    }
    Ok(format!("{head}{}{exp6}{rest}{tail}", &gen[..s6]))
}

/// `run`'s options after DIR: `-t N` and `--only NAME`.
fn run_args(args: &[String]) -> Result<(Option<usize>, Option<String>)> {
    let (mut threads, mut only) = (None, None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| anyhow!("{flag}: needs a value"))?;
        match flag.as_str() {
            "-t" => {
                threads = Some(
                    value
                        .parse()
                        .map_err(|_| anyhow!("-t {value:?}: not a number"))?,
                )
            }
            "--only" if ALONE.contains(&value.as_str()) => only = Some(value.clone()),
            "--only" => return Err(anyhow!("--only {value:?}: one of {ALONE:?}")),
            _ => return Err(anyhow!("unknown option {flag:?} (-t N, --only NAME)")),
        }
    }
    Ok((threads, only))
}

/// Marks the generated part of docs/results.md; the text around it is written by hand.
const BEGIN: &str = "<!-- BEGIN GENERATED by scripts/experiments.sh: do not edit -->";
const END: &str = "<!-- END GENERATED -->";

/// Replaces the generated part of `path` (between [`BEGIN`] and [`END`]) with `tables`, keeping
/// the hand-written text around it; creates the file if needed.
fn write_generated(path: &Path, tables: &str) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let (head, tail) = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => (old[..b].to_string(), old[e + END.len()..].to_string()),
        _ => ("# Results\n\n".to_string(), "\n".to_string()),
    };
    write(path, &format!("{head}{BEGIN}\n\n{tables}{END}{tail}"))
}

/// `tokens MODEL TEXT OUT [--ppl-ctx N]`: the token ids of TEXT as `ggmerge finetune` and
/// `perplexity` see them (`Model::tokenize(text, add_special = true, parse_special = false)`:
/// BOS first when the vocabulary adds it), written to OUT as JSON `{"bos": …, "adds_bos": …,
/// "n_vocab": …, "tokens": […]}`. scripts/train_gemma_expert.py trains on these ids, so its
/// windows are exactly llama.cpp's. With `--ppl-ctx N` also llama.cpp's perplexity of TEXT in
/// chunks of N (`"ppl"`, `"chunk_ppl"`), to check the script's forward pass against.
fn tokens(model: &Path, text: &Path, out: &Path, ppl_ctx: Option<u32>) -> Result<()> {
    let text =
        std::fs::read_to_string(text).with_context(|| format!("cannot read {}", text.display()))?;
    let model = Model::load(model, &ModelOptions::default())?;
    let ids = model.tokenize(&text, true, false)?;
    let mut doc = json!({
        "bos": model.bos(),
        "adds_bos": model.adds_bos(),
        "n_vocab": model.n_vocab(),
        "tokens": ids,
    });
    if let Some(n_ctx) = ppl_ctx {
        let opts = SessionOptions {
            n_ctx,
            n_batch: n_ctx,
            ..Default::default()
        };
        let p = model.session(&opts)?.perplexity(&text, &NoProgress)?;
        doc["ppl_ctx"] = json!(n_ctx);
        doc["ppl"] = json!(p.ppl);
        doc["chunk_ppl"] = json!(p.chunk_ppl);
    }
    write(out, &serde_json::to_string(&doc)?)
}

/// `data`'s options: `--facts N` (default [`FACTS`]) and `--repeats N` (default [`REPEATS`]).
fn data_args(args: &[String]) -> Result<(usize, usize)> {
    let (mut n_facts, mut repeats) = (FACTS, REPEATS);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| anyhow!("{flag}: needs a number"))?;
        let n: usize = value
            .parse()
            .ok()
            .filter(|&n| (1..=1000).contains(&n))
            .ok_or_else(|| anyhow!("{flag} {value:?}: not a number in 1..=1000"))?;
        match flag.as_str() {
            "--facts" => n_facts = n,
            "--repeats" => repeats = n,
            _ => return Err(anyhow!("unknown option {flag:?} (--facts N, --repeats N)")),
        }
    }
    Ok((n_facts, repeats))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [cmd, dir, rest @ ..] if cmd == "data" => {
            data_args(rest).and_then(|(n, r)| data(&PathBuf::from(dir).join("data"), n, r))
        }
        [cmd, model, text, out, rest @ ..] if cmd == "tokens" => {
            let ppl_ctx = match rest {
                [] => Ok(None),
                [flag, n] if flag == "--ppl-ctx" => n
                    .parse::<u32>()
                    .map(Some)
                    .map_err(|_| anyhow!("--ppl-ctx {n:?}: not a number")),
                _ => Err(anyhow!("tokens: unknown options {rest:?} (--ppl-ctx N)")),
            };
            ppl_ctx.and_then(|c| tokens(Path::new(model), Path::new(text), Path::new(out), c))
        }
        [cmd, dir, rest @ ..] if cmd == "run" => {
            run_args(rest).and_then(|(threads, only)| match only {
                Some(name) => run_only(&PathBuf::from(dir), threads, &name),
                None => run(&PathBuf::from(dir), threads),
            })
        }
        _ => Err(anyhow!(
            "usage: experiments data DIR [--facts N] [--repeats N] | \
             experiments run DIR [-t N] [--only NAME] | \
             experiments tokens MODEL TEXT OUT.json [--ppl-ctx N]"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("experiments: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(gemma: &str, rows: &str) -> String {
        format!(
            "# Results\n\n{BEGIN}\n\n## 5. Packs\n\ntext\n\n{REQUANT_HEADING}\n\nIntro.\n\n\
             | base type | x |\n|---|---|\n| Q4_1 | 1 |\n\n{gemma}## Wall time of each step\n\n\
             | step | seconds |\n|---|---|\n| 5. packs | 6 |\n| 6. requantization modes | 249 |\n\
             {rows}| fine-tuning the capitals expert | 1370 |\n\n{END}\n\n## Hand-written\n"
        )
    }

    /// `run --only gemma-requant-modes` re-reads docs/results.json and writes it back: the
    /// other experiments' numbers must come back digit for digit (serde_json's
    /// `float_roundtrip`; without it these three changed in their last digit).
    #[test]
    fn results_json_round_trips() -> Result<()> {
        let text = "[0.9954613917308969,3.2092486299140646,-1.7652621280990775]";
        let v: serde_json::Value = serde_json::from_str(text)?;
        assert_eq!(serde_json::to_string(&v)?, text);
        Ok(())
    }

    #[test]
    fn splice_adds_then_replaces_the_gemma_parts() -> Result<()> {
        let section = format!("{GEMMA_HEADING}\n\nGemma.\n\n| base type | x |\n|---|---|\n\n");
        let timing = format!("| {GEMMA_REQUANT_ROW} | 700 |\n");
        let train = format!("| {GEMMA_TRAIN_ROW} capitals expert (script) | 900 |\n");
        let once = splice_gemma(&doc("", ""), &section, &timing, &train)?;
        let smol = format!("### {}\n\n| base type", SMOLLM2.label);
        let expected = doc(&section, &timing)
            .replacen("| base type", &smol, 1)
            .replace("| 1370 |\n\n", &format!("| 1370 |\n{train}\n"));
        assert_eq!(once, expected);
        // Again with other numbers: replaced, not added twice.
        let timing2 = timing.replace("700", "650");
        let twice = splice_gemma(&once, &section, &timing2, &train)?;
        assert_eq!(twice, expected.replace(&timing, &timing2));
        assert!(splice_gemma("# no generated part\n", &section, &timing, &train).is_err());
        Ok(())
    }
}
