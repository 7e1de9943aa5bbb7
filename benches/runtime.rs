//! Experts at run time vs. the conventional merge-then-load path (not a test: prints numbers).
//!
//! `cargo bench --bench runtime` makes, for each fixture, two synthetic F16 "fine-tunes" (the
//! tests' generator, tests/common/experts.rs), extracts them as delta packs (DARE, density 0.1,
//! F16 values), then measures in one process, with all threads:
//!
//! - base-only load: `Model::load` + the first session;
//! - base + 2 packs load: `Model::load` + `ExpertSession::new` with weights 0.5/0.5;
//! - cold switch: `set_mixture` to a mixture not yet cached ((1,0), then (0,1): the merge engine
//!   recomputes and requantizes every changed tensor);
//! - warm switch: back to a cached mixture (a copy of the cached bytes into the model);
//! - merge-then-load: `merge_models` of the mixture (1,0) from the packs to a GGUF (what
//!   `ggmerge apply` does) + `Model::load` of it + its first session.
//!
//! and prints the ratios warm / merge-then-load (target ≤ 5%) and cold / merge-then-load
//! (target ≤ 50%). Models: scripts/fetch-models.sh (`$GGMERGE_MODELS`, else `.cache/models`).
//!
//! `REQUANT=full,grid,grid-stochastic cargo bench --bench runtime` measures the switches and
//! merge-then-load once per requantization mode (`--requant`: the mixtures' and the merged
//! file's), one table each; default `full`.
//!
//! `FIXTURES=gemma` (or `smollm2`) measures one fixture only.
//!
//! `GGMERGE_BENCH_NGL=all` (or a number of layers) loads every model with that many layers
//! offloaded (`-ngl`), for GPU builds (`--features cuda`, `vulkan`, `dynamic-backends` with a
//! GPU backend library beside the executable); the default is 0, the CPU.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ggmerge::flows::extract::{extract_delta, ExtractOptions};
use ggmerge::format::GgmlType;
use ggmerge::merge::config::{ConfigSource, MergeConfig, Method, ModelEntry, ParamValue};
use ggmerge::quant::Requant;
use ggmerge::runtime::{Expert, ExpertSession};
use ggmerge::runtime::{Model, ModelOptions, SessionOptions};
use ggmerge::{merge_models, MergeOptions, NoProgress};

#[path = "../tests/common/experts.rs"]
mod experts;

/// Noise of the synthetic fine-tunes, relative to each tensor's RMS.
const REL: f32 = 2e-2;
/// Pack density.
const DENSITY: f64 = 0.1;
/// Context of every session (the CLI's default `-c`).
const N_CTX: u32 = 4096;
/// Mixture cache budget (the CLI's default `--cache-mib 1024`).
const CACHE_BYTES: u64 = 1 << 30;

fn models_dir() -> PathBuf {
    std::env::var_os("GGMERGE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models"))
}

fn session_opts(requant: Requant) -> SessionOptions {
    SessionOptions {
        n_ctx: N_CTX,
        threads: None,
        requant,
        ..Default::default()
    }
}

/// The modes of `$REQUANT` (names separated by commas or spaces; default `full`).
fn requant_modes() -> Vec<Requant> {
    let list = std::env::var("REQUANT").unwrap_or_else(|_| Requant::DEFAULT.name().into());
    let modes: Vec<Requant> = list
        .split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(|s| {
            Requant::from_name(s).unwrap_or_else(|| {
                eprintln!("REQUANT: unknown mode {s:?} (full, grid, grid-stochastic)");
                std::process::exit(2)
            })
        })
        .collect();
    if modes.is_empty() {
        vec![Requant::DEFAULT]
    } else {
        modes
    }
}

/// `$GGMERGE_BENCH_NGL`: `all` (-1), a number of layers, or 0 when unset.
fn gpu_layers() -> i32 {
    match std::env::var("GGMERGE_BENCH_NGL") {
        Err(_) => 0,
        Ok(v) if v == "all" => -1,
        Ok(v) => v.parse().unwrap_or_else(|_| {
            eprintln!("GGMERGE_BENCH_NGL: {v:?} is not a number of layers or `all`");
            std::process::exit(2)
        }),
    }
}

fn load(path: &Path) -> Model {
    let opts = ModelOptions {
        gpu_layers: gpu_layers(),
        ..Default::default()
    };
    Model::load(path, &opts).unwrap()
}

/// Seconds since `t`.
fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Best of `reps` timings of `f`, in seconds.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            secs(t)
        })
        .fold(f64::INFINITY, f64::min)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

struct Fixture {
    label: &'static str,
    file: &'static str,
    /// Tensors perturbed in the fine-tunes (name substrings; empty: every 2-D weight).
    only: &'static [&'static str],
    only_label: &'static str,
}

/// Best timings of the expert path over `reps` fresh loads.
#[derive(Default)]
struct ExpertTimes {
    load: f64,
    cold: f64,
    warm: f64,
    cold_tensors: usize,
    warm_tensors: usize,
}

fn expert_path(base: &Path, packs: &[PathBuf], reps: usize, requant: Requant) -> ExpertTimes {
    let mut best = ExpertTimes {
        load: f64::INFINITY,
        cold: f64::INFINITY,
        warm: f64::INFINITY,
        ..Default::default()
    };
    for _ in 0..reps {
        let t = Instant::now();
        let model = load(base);
        let experts: Vec<Expert> = packs.iter().map(Expert::from_path).collect();
        let mut s = ExpertSession::new(
            &model,
            base,
            experts,
            &[0.5, 0.5],
            Method::TaskArithmetic,
            &session_opts(requant),
            None,
            CACHE_BYTES,
        )
        .unwrap();
        best.load = best.load.min(secs(t));
        for (w, cached) in [
            ([1.0, 0.0], false),
            ([0.0, 1.0], false),
            ([1.0, 0.0], true),
            ([0.0, 1.0], true),
        ] {
            let r = s.set_mixture(&w).unwrap();
            assert_eq!(r.cached, cached, "mixture {w:?}: {r:?}");
            if cached {
                best.warm = best.warm.min(r.seconds);
                best.warm_tensors = r.tensors;
            } else {
                best.cold = best.cold.min(r.seconds);
                best.cold_tensors = r.tensors;
            }
        }
    }
    best
}

/// `ggmerge apply --expert P:W … --requant R` (task arithmetic) to `out`, then load it and open
/// a session.
fn merge_then_load(base: &Path, mixture: &[(&PathBuf, f64)], out: &Path, requant: Requant) -> f64 {
    let t = Instant::now();
    let mut config = MergeConfig::new(Method::TaskArithmetic, ConfigSource::Cli);
    config.base_model = Some(base.display().to_string());
    for (pack, w) in mixture {
        let mut entry = ModelEntry::new(pack.display().to_string());
        entry.parameters.set("weight", ParamValue::Number(*w));
        config.models.push(entry);
    }
    let opts = MergeOptions {
        output: out.to_path_buf(),
        threads: None,
        requant: Some(requant),
        ..Default::default()
    };
    merge_models(&config, &opts, &NoProgress).unwrap();
    let model = load(out);
    let session = model.session(&session_opts(requant)).unwrap();
    let s = secs(t);
    drop(session);
    drop(model);
    std::fs::remove_file(out).unwrap();
    s
}

fn verdict(ratio: f64, target: f64) -> &'static str {
    if ratio <= target {
        "met"
    } else {
        "NOT met"
    }
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let modes = requant_modes();
    let fixtures = [
        Fixture {
            label: "SmolLM2 Q4_1",
            file: "SmolLM2-135M-Instruct.Q4_1.gguf",
            only: &[],
            only_label: "every 2-D weight",
        },
        Fixture {
            label: "Gemma3 Q4_K_M",
            file: "gemma-3-270m-q4_k_m.gguf",
            only: &[],
            only_label: "every 2-D weight",
        },
    ];
    let dir = tempfile::Builder::new()
        .prefix("ggmerge-bench-runtime-")
        .tempdir()
        .unwrap();
    println!(
        "experts at run time vs merge-then-load, {threads} threads, context {N_CTX}, \
         2 synthetic F16 experts per fixture (rel {REL}), DARE packs at density {DENSITY} \
         with F16 values; requantization {}; gpu layers {}; load average {}",
        modes
            .iter()
            .map(|r| r.name())
            .collect::<Vec<_>>()
            .join(", "),
        match gpu_layers() {
            -1 => "all".to_string(),
            n => n.to_string(),
        },
        loadavg()
    );
    // `$FIXTURES`: only the fixtures whose label contains one of these words (case-insensitive,
    // separated by commas or spaces), e.g. `FIXTURES=gemma`.
    let wanted: Vec<String> = std::env::var("FIXTURES")
        .unwrap_or_default()
        .split([',', ' '])
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    for fx in &fixtures {
        let label = fx.label.to_lowercase();
        if !wanted.is_empty() && !wanted.iter().any(|w| label.contains(w)) {
            continue;
        }
        let base = models_dir().join(fx.file);
        if !base.is_file() {
            println!(
                "\n{}: {} missing (run scripts/fetch-models.sh)",
                fx.label,
                base.display()
            );
            continue;
        }
        let base_bytes = std::fs::metadata(&base).unwrap().len();

        // Two experts → two packs (the fine-tunes are deleted once extracted).
        let mut packs = Vec::new();
        let mut sizes = Vec::new();
        let mut ft_bytes = 0;
        for (seed, name) in [(1u64, "expert1"), (2, "expert2")] {
            let ft = dir.path().join(format!("{name}.gguf"));
            let t = Instant::now();
            experts::make_expert(&base, &ft, seed, REL, GgmlType::F16, fx.only);
            let made = secs(t);
            let pack = dir.path().join(format!("{name}.dpk.gguf"));
            let opts = ExtractOptions {
                density: DENSITY,
                values: GgmlType::F16,
                seed,
                threads: None,
                ..Default::default()
            };
            let t = Instant::now();
            let r = extract_delta(&base, &ft, &pack, &opts, &NoProgress).unwrap();
            eprintln!(
                "{}: {name}: fine-tune made in {made:.1} s, pack extracted in {:.1} s \
                 ({} of {} tensors changed)",
                fx.label,
                secs(t),
                r.changed,
                r.tensors
            );
            ft_bytes = r.finetuned_bytes;
            sizes.push(r.pack_bytes);
            std::fs::remove_file(&ft).unwrap();
            packs.push(pack);
        }

        let base_only = best_of(3, || {
            let model = load(&base);
            let session = model.session(&session_opts(Requant::DEFAULT)).unwrap();
            drop(session);
        });
        for &requant in &modes {
            let ex = expert_path(&base, &packs, 2, requant);
            let merged = dir.path().join("merged.gguf");
            let mtl = best_of(2, || {
                merge_then_load(&base, &[(&packs[0], 1.0)], &merged, requant);
            });
            let mtl_both = best_of(2, || {
                merge_then_load(
                    &base,
                    &[(&packs[0], 0.5), (&packs[1], 0.5)],
                    &merged,
                    requant,
                );
            });

            println!();
            println!(
                "{} (base {:.1} MiB; fine-tunes perturb {}, {:.1} MiB each as F16; packs {:.1} + \
             {:.1} MiB), --requant {requant}",
                fx.label,
                mib(base_bytes),
                fx.only_label,
                mib(ft_bytes),
                mib(sizes[0]),
                mib(sizes[1])
            );
            println!("{:<58} {:>9}", "step (best of 2-3)", "seconds");
            let row = |name: &str, s: f64| println!("{name:<58} {s:>9.3}");
            row("load, base only (Model::load + session)", base_only);
            row(
                "load, base + 2 packs at 0.5/0.5 (+ ExpertSession::new)",
                ex.load,
            );
            row(
                &format!("cold switch to (1,0) / (0,1) ({} tensors)", ex.cold_tensors),
                ex.cold,
            );
            row(
                &format!("warm switch, cached ({} tensors)", ex.warm_tensors),
                ex.warm,
            );
            row(
                "merge-then-load: apply (1,0) to a GGUF + load + session",
                mtl,
            );
            row(
                "merge-then-load: apply 0.5/0.5 to a GGUF + load + session",
                mtl_both,
            );
            let (w, c) = (ex.warm / mtl, ex.cold / mtl);
            println!(
                "warm / merge-then-load {:>6.1}%  (target <= 5%: {})",
                100.0 * w,
                verdict(w, 0.05)
            );
            println!(
                "cold / merge-then-load {:>6.1}%  (target <= 50%: {})",
                100.0 * c,
                verdict(c, 0.50)
            );
        }
        for p in packs {
            std::fs::remove_file(p).unwrap();
        }
    }
    println!("\nload average at the end: {}", loadavg());
}

/// `/proc/loadavg`'s first three fields (other work on the machine skews the timings).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
