//! `ggmerge serve` against the same work done in one process (not a test: prints numbers).
//!
//! `cargo bench --bench serve` makes, per fixture, two synthetic fine-tunes and their DARE packs
//! (as `benches/runtime.rs`), then measures with every thread:
//!
//! - generation speed: 128 tokens of a counting prompt, in process (`Session::complete` on an
//!   `ExpertSession`, the prompt decoded too) vs. through `POST /v1/completions` of a server
//!   started on the same files with `--no-prompt-cache` (target: server ≥ 95%);
//! - latency added by a switch: a 64-token request for the loaded mixture, for the other
//!   mixture already cached (warm switch; target ≤ +5%), and for a mixture never seen (cold);
//! - 32 requests alternating between two mixtures, sent at once: total time and switches, with
//!   the scheduler (loaded mixture first) vs `--schedule fifo`;
//! - time to the first token of a follow-up turn whose prefix (a ~400-token conversation) is
//!   cached, vs. a server with `--no-prompt-cache`.
//!
//! Models: scripts/fetch-models.sh (`$GGMERGE_MODELS`, else `.cache/models`).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use ggmerge::flows::extract::{extract_delta, ExtractOptions};
use ggmerge::format::GgmlType;
use ggmerge::merge::method::Method;
use ggmerge::runtime::{
    Expert, ExpertSession, GenerateOptions, Model, ModelOptions, SessionOptions,
};
use ggmerge::NoProgress;
use serde_json::{json, Value};

#[path = "../tests/common/experts.rs"]
mod experts;

const N_CTX: u32 = 2048;
const COUNTING: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";

fn models_dir() -> PathBuf {
    std::env::var_os("GGMERGE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models"))
}

fn best<T: Copy + PartialOrd>(v: impl IntoIterator<Item = T>) -> T {
    v.into_iter()
        .reduce(|a, b| if b < a { b } else { a })
        .expect("at least one run")
}

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(base: &Path, packs: &[PathBuf], threads: usize, extra: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ggmerge"));
        cmd.args(["serve", "--base", base.to_str().unwrap(), "--port", "0"]);
        cmd.args(["-c", &N_CTX.to_string(), "-t", &threads.to_string()]);
        for (name, p) in ["math", "code"].iter().zip(packs) {
            cmd.arg("--expert").arg(format!("{name}={}", p.display()));
        }
        cmd.args(extra);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let url = loop {
            let line = lines.next().expect("server output").unwrap();
            if let Some(u) = line.strip_prefix("listening on ") {
                break u.trim().to_string();
            }
        };
        Server { child, url }
    }

    fn post(&self, path: &str, body: &Value) -> Value {
        let mut r = ureq::post(format!("{}{path}", self.url))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap();
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    }

    /// Seconds for a request, and its response.
    fn timed(&self, path: &str, body: &Value) -> (f64, Value) {
        let t = Instant::now();
        let v = self.post(path, body);
        (t.elapsed().as_secs_f64(), v)
    }

    fn metric(&self, name: &str) -> f64 {
        let mut r = ureq::get(format!("{}/metrics", self.url)).call().unwrap();
        let m = r.body_mut().read_to_string().unwrap();
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap()
    }

    /// Seconds until the first streamed chunk that carries text.
    fn first_token(&self, path: &str, mut body: Value) -> f64 {
        body["stream"] = json!(true);
        let t = Instant::now();
        let mut r = ureq::post(format!("{}{path}", self.url))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap();
        let mut reader = BufReader::new(r.body_mut().as_reader());
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap() == 0 {
                break;
            }
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(data.trim()) else {
                continue;
            };
            let c = &v["choices"][0];
            let text = c["delta"]["content"]
                .as_str()
                .or(c["text"].as_str())
                .unwrap_or("");
            if !text.is_empty() {
                let s = t.elapsed().as_secs_f64();
                let mut rest = Vec::new();
                let _ = reader.read_to_end(&mut rest);
                return s;
            }
        }
        t.elapsed().as_secs_f64()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn count(model: &str, n: u32, mixture: Option<Value>) -> Value {
    let mut b = json!({"model": model, "prompt": COUNTING, "max_tokens": n, "temperature": 0});
    if let Some(m) = mixture {
        b["experts"] = m;
    }
    b
}

/// Tokens per second generating 128 tokens in process (prompt decoding included).
fn in_process(base: &Path, packs: &[PathBuf], threads: usize) -> f64 {
    let model = Model::load(base, &ModelOptions::default()).unwrap();
    let experts = ["math", "code"]
        .iter()
        .zip(packs)
        .map(|(n, p)| Expert {
            name: n.to_string(),
            path: p.clone(),
        })
        .collect();
    let opts = SessionOptions {
        n_ctx: N_CTX,
        threads: Some(threads),
        ..Default::default()
    };
    let mut s = ExpertSession::new(
        &model,
        base,
        experts,
        &[1.0, 0.0],
        Method::TaskArithmetic,
        &opts,
        Some(threads),
        1 << 30,
    )
    .unwrap();
    let tokens = model.prompt_tokens(COUNTING, false).unwrap();
    let gen = GenerateOptions {
        n_predict: 128,
        ..Default::default()
    };
    best((0..3).map(|_| {
        s.session().clear_memory();
        let t = Instant::now();
        let g = s.session().complete(&tokens, &gen, &mut |_| true).unwrap();
        assert_eq!(g.tokens.len(), 128);
        -(128.0 / t.elapsed().as_secs_f64())
    }))
    .abs()
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = tempfile::Builder::new()
        .prefix("ggmerge-bench-serve-")
        .tempdir()
        .unwrap();
    println!(
        "ggmerge serve vs in process, {threads} threads, context {N_CTX}; load average {}",
        loadavg()
    );
    for (label, file, chat) in [
        ("SmolLM2 Q4_1", "SmolLM2-135M-Instruct.Q4_1.gguf", true),
        ("Gemma3 Q4_K_M", "gemma-3-270m-q4_k_m.gguf", false),
    ] {
        let base = models_dir().join(file);
        if !base.is_file() {
            println!(
                "\n{label}: {} missing (run scripts/fetch-models.sh)",
                base.display()
            );
            continue;
        }
        let mut packs = Vec::new();
        for seed in [1u64, 2] {
            let ft = dir.path().join(format!("e{seed}.gguf"));
            experts::make_expert(&base, &ft, seed, 2e-2, GgmlType::F16, &[]);
            let pack = dir.path().join(format!("e{seed}.dpk.gguf"));
            let opts = ExtractOptions {
                seed,
                ..Default::default()
            };
            extract_delta(&base, &ft, &pack, &opts, &NoProgress).unwrap();
            std::fs::remove_file(&ft).unwrap();
            packs.push(pack);
        }
        println!("\n{label}");

        // Generation speed.
        let local = in_process(&base, &packs, threads);
        let srv = Server::start(&base, &packs, threads, &["--no-prompt-cache"]);
        srv.post("/v1/completions", &count("math", 4, None));
        let served = best((0..3).map(|_| {
            let (s, v) = srv.timed("/v1/completions", &count("math", 128, None));
            assert_eq!(v["usage"]["completion_tokens"], 128, "{v}");
            -(128.0 / s)
        }))
        .abs();
        println!(
            "generation, 128 tokens: in process {local:.1} tok/s, server {served:.1} tok/s: {:.1}% (target >= 95%)",
            100.0 * served / local
        );

        // Latency added by switches (64 tokens): the same request for `math`, once after a
        // request for `math` (no switch) and once after a short one for `code` (a warm switch,
        // both mixtures cached), interleaved so that drifts in machine load hit both alike.
        srv.post("/v1/completions", &count("code", 4, None)); // both mixtures cached now
        let mut same = Vec::new();
        let mut warm = Vec::new();
        let mut warm_switch = Vec::new();
        for _ in 0..5 {
            srv.post("/v1/completions", &count("math", 4, None));
            same.push(srv.timed("/v1/completions", &count("math", 64, None)).0);
            srv.post("/v1/completions", &count("code", 4, None));
            let (s, v) = srv.timed("/v1/completions", &count("math", 64, None));
            assert_eq!(v["ggmerge"]["switch_cached"], true);
            warm.push(s);
            warm_switch.push(v["ggmerge"]["switch_seconds"].as_f64().unwrap());
        }
        let same = median(same);
        let mut cold = Vec::new();
        let mut cold_switch = Vec::new();
        for i in 0..3 {
            let w = 0.5 + 0.1 * i as f64;
            let (s, v) = srv.timed(
                "/v1/completions",
                &count("mix", 64, Some(json!({"math": w, "code": 1.0 - w}))),
            );
            assert_eq!(v["ggmerge"]["switch_cached"], false);
            cold.push(s);
            cold_switch.push(v["ggmerge"]["switch_seconds"].as_f64().unwrap());
        }
        let (warm, cold) = (median(warm), median(cold));
        println!(
            "64-token request (medians): no switch {same:.3} s; after a warm switch {warm:.3} s (+{:.1}%, switch {:.3} s; target <= +5%); after a cold switch {cold:.3} s (+{:.1}%, switch {:.3} s)",
            100.0 * (warm - same) / same,
            median(warm_switch),
            100.0 * (cold - same) / same,
            median(cold_switch)
        );
        drop(srv);

        // 32 requests alternating between two mixtures, sent at once.
        for schedule in ["mixture-first", "fifo"] {
            let srv = Server::start(&base, &packs, threads, &["--schedule", schedule]);
            srv.post("/v1/completions", &count("math", 2, None));
            srv.post("/v1/completions", &count("code", 2, None));
            let before = srv.metric("ggmerge_mixture_switches_total")
                + srv.metric("ggmerge_mixture_cache_hits_total");
            let t = Instant::now();
            let handles: Vec<_> = (0..32)
                .map(|i| {
                    let url = srv.url.clone();
                    let m = if i % 2 == 0 { "math" } else { "code" };
                    std::thread::spawn(move || {
                        let mut r = ureq::post(format!("{url}/v1/completions"))
                            .header("Content-Type", "application/json")
                            .send(count(m, 16, None).to_string())
                            .unwrap();
                        let _ = r.body_mut().read_to_string();
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            let total = t.elapsed().as_secs_f64();
            let switches = srv.metric("ggmerge_mixture_switches_total")
                + srv.metric("ggmerge_mixture_cache_hits_total")
                - before;
            println!("32 alternating requests, {schedule}: {total:.2} s, {switches} switches");
        }

        // Time to first token of a follow-up turn.
        let context: String = (1..=60)
            .map(|i| {
                format!(
                    "Note {i}: the meeting in room {i} starts at {}:00. ",
                    8 + i % 10
                )
            })
            .collect();
        let ttft = |srv: &Server| -> f64 {
            if chat {
                let first = json!({"model": "math", "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "system", "content": context}, {"role": "user", "content": "When does the meeting in room 3 start?"}]});
                let answer = srv.post("/v1/chat/completions", &first)["choices"][0]["message"]
                    ["content"]
                    .as_str()
                    .unwrap()
                    .to_string();
                let follow = json!({"model": "math", "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "system", "content": context}, {"role": "user", "content": "When does the meeting in room 3 start?"},
                                 {"role": "assistant", "content": answer}, {"role": "user", "content": "And in room 4?"}]});
                srv.first_token("/v1/chat/completions", follow)
            } else {
                let first = json!({"model": "math", "prompt": format!("{context}Room 3:"), "max_tokens": 8, "temperature": 0});
                let answer = srv.post("/v1/completions", &first)["choices"][0]["text"]
                    .as_str()
                    .unwrap()
                    .to_string();
                let follow = json!({"model": "math", "prompt": format!("{context}Room 3:{answer} Room 4:"), "max_tokens": 8, "temperature": 0});
                srv.first_token("/v1/completions", follow)
            }
        };
        let cached = {
            let srv = Server::start(&base, &packs, threads, &[]);
            best((0..3).map(|_| ttft(&srv)))
        };
        let uncached = {
            let srv = Server::start(&base, &packs, threads, &["--no-prompt-cache"]);
            best((0..3).map(|_| ttft(&srv)))
        };
        println!(
            "follow-up turn, time to first token: prefix cached {cached:.3} s, not cached {uncached:.3} s ({:.1}x)",
            uncached / cached
        );
        for p in packs {
            std::fs::remove_file(p).unwrap();
        }
    }
    println!("\nload average at the end: {}", loadavg());
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
