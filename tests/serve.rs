//! `ggmerge serve` driven over HTTP the way apps use it: the real binary on a free loopback
//! port, real requests (ureq), SmolLM2 with two DARE packs of synthetic fine-tunes. Answers
//! are compared with `ggmerge run` for the same mixture; the prompt cache, the scheduler, the
//! errors, disconnects and shutdown are checked from the outside. The `openai` Python client
//! and the chat page in headless Chromium are at the end.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{s, text};
use ggmerge::format::GgmlType;
use serde_json::{json, Value};

/// Two packs of SmolLM2 (density 0.1, DARE): `math` and `code`.
struct Packs {
    dir: tempfile::TempDir,
    math: PathBuf,
    code: PathBuf,
}

fn packs() -> &'static Packs {
    static P: OnceLock<Packs> = OnceLock::new();
    P.get_or_init(|| {
        let dir = common::shared_tempdir();
        let smol = common::smollm2();
        let mut out = Vec::new();
        for (name, seed) in [("math", 1), ("code", 2)] {
            let ft = dir.path().join(format!("{name}.ft.gguf"));
            common::experts::make_expert(&smol, &ft, seed, 2e-2, GgmlType::Q8_0, &[]);
            let pack = dir.path().join(format!("{name}.dpk.gguf"));
            let o = common::ggmerge(&[
                "extract",
                "--base",
                s(&smol),
                "--finetuned",
                s(&ft),
                "--density",
                "0.1",
                "--seed",
                "7",
                "-o",
                s(&pack),
                "-q",
            ]);
            assert!(o.status.success(), "{}", text(&o.stderr));
            std::fs::remove_file(&ft).unwrap();
            out.push(pack);
        }
        let code = out.pop().unwrap();
        let math = out.pop().unwrap();
        Packs { dir, math, code }
    })
}

/// A running server, stopped (SIGTERM) when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    /// `ggmerge serve` on SmolLM2 with both packs, a preset and `extra` arguments.
    fn start(extra: &[&str]) -> Server {
        let p = packs();
        let math = format!("math={}", s(&p.math));
        let code = format!("code={}", s(&p.code));
        let smol = common::smollm2();
        let mut args = vec![
            "serve",
            "--base",
            s(&smol),
            "--expert",
            &math,
            "--expert",
            &code,
            "--preset",
            "coder=math:0.3,code:0.7",
            "--port",
            "0",
            "-t",
            "2",
        ];
        if !extra.contains(&"-c") {
            args.extend(["-c", "1024"]);
        }
        args.extend_from_slice(extra);
        Server::spawn(&args)
    }

    fn spawn(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ggmerge"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ggmerge serve");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let url = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(u) = line.strip_prefix("listening on ") {
                        break u.trim().to_string();
                    }
                }
                _ => {
                    let mut err = String::new();
                    child
                        .stderr
                        .take()
                        .unwrap()
                        .read_to_string(&mut err)
                        .unwrap();
                    panic!("the server did not start: {err}");
                }
            }
        };
        Server { child, url }
    }

    fn get(&self, path: &str) -> (u16, String) {
        call(ureq::get(format!("{}{path}", self.url)).call())
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = call(
            ureq::post(format!("{}{path}", self.url))
                .header("Content-Type", "application/json")
                .send(body.to_string()),
        );
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A chat request's answer text (status 200 required).
    fn chat(&self, body: Value) -> Value {
        let (status, v) = self.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{v}");
        v
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, m) = self.get("/metrics");
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{m}"))
    }

    fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Status and body of a response, whatever its status.
fn call(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, String) {
    match r {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            (status, resp.body_mut().read_to_string().unwrap_or_default())
        }
        Err(ureq::Error::StatusCode(code)) => (code, String::new()),
        Err(e) => panic!("request failed: {e}"),
    }
}

/// A request whose non-2xx statuses come back as responses (to read their bodies).
fn post_raw(url: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.post(url).header("Content-Type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (status, text) = call(req.send(body.to_string()));
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {v}"))
        .to_string()
}

/// A text completion that runs to its token limit (the model keeps counting).
fn count(model: &str, max: u32) -> Value {
    json!({
        "model": model,
        "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
        "max_tokens": max,
        "temperature": 0,
    })
}

fn ask(model: &str, question: &str, max: u32) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max,
        "temperature": 0,
        "seed": 1,
    })
}

/// `ggmerge run` with these packs and weights: the reference answer.
fn run(weights: &[(&Path, f64)], method: &str, prompt: &str, chat: bool, n: u32) -> String {
    let smol = common::smollm2();
    let n = n.to_string();
    let mut args = vec![
        "run",
        "--base",
        s(&smol),
        "-p",
        prompt,
        "-n",
        &n,
        "-c",
        "1024",
        "-t",
        "2",
        "--method",
        method,
    ];
    let specs: Vec<String> = weights
        .iter()
        .map(|(p, w)| format!("{}:{w}", s(p)))
        .collect();
    for spec in &specs {
        args.extend(["--expert", spec.as_str()]);
    }
    if chat {
        args.push("--chat");
    }
    let o = common::ggmerge(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    text(&o.stdout).trim_end_matches('\n').to_string()
}

#[test]
fn every_endpoint_answers() {
    let srv = Server::start(&[]);
    let (status, health) = srv.get("/health");
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["experts"], 2);
    let (_, models) = srv.get("/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["base", "math", "code", "coder"]);
    assert_eq!(
        models["data"][3]["mixture"],
        json!({"math": 0.3, "code": 0.7})
    );
    let (_, experts) = srv.get("/experts");
    let experts: Value = serde_json::from_str(&experts).unwrap();
    assert_eq!(experts["experts"][0]["name"], "math");
    assert!(experts["experts"][0]["kept"].as_u64().unwrap() > 0);
    let (status, page) = srv.get("/");
    assert_eq!(status, 200);
    assert!(page.contains("<title>ggmerge") && page.contains("chat/completions"));
    srv.chat(ask("math", "Hi", 4));
    assert_eq!(srv.metric("ggmerge_requests_total"), 1.0);
    assert!(srv.metric("ggmerge_completion_tokens_total") >= 1.0);
    let (status, _) = srv.get("/nowhere");
    assert_eq!(status, 404);
    assert!(srv.stop().success());
}

#[test]
fn answers_equal_ggmerge_run_for_the_same_mixture() {
    let p = packs();
    let srv = Server::start(&[]);
    let q = "What is the capital of France?";
    // A preset (task arithmetic, the server's default) …
    let got = content(&srv.chat(ask("coder", q, 16)));
    assert_eq!(
        got,
        run(
            &[(&p.math, 0.3), (&p.code, 0.7)],
            "task_arithmetic",
            q,
            true,
            16
        )
    );
    // … an experts field with another method …
    let mut body = ask("custom", q, 16);
    body["experts"] = json!({"math": 0.6, "code": 0.4});
    body["merge_method"] = json!("dare_ties");
    let v = srv.chat(body);
    assert_eq!(v["ggmerge"]["mixture"], json!({"math": 0.6, "code": 0.4}));
    assert_eq!(v["ggmerge"]["merge_method"], "dare_ties");
    assert_eq!(
        content(&v),
        run(&[(&p.math, 0.6), (&p.code, 0.4)], "dare_ties", q, true, 16)
    );
    // … and a text completion, without the chat template.
    let (status, v) = srv.post(
        "/v1/completions",
        &json!({"model": "math", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let got = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(
        got,
        run(
            &[(&p.math, 1.0)],
            "task_arithmetic",
            "The capital of France is",
            false,
            12
        )
    );
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

/// The data lines of a server-sent event stream.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|block| {
            block
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn streaming_sends_the_same_text_then_usage_then_done() {
    let srv = Server::start(&[]);
    let q = "Name three colors.";
    let whole = content(&srv.chat(ask("code", q, 20)));
    let mut body = ask("code", q, 20);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, raw) = call(
        ureq::post(format!("{}/v1/chat/completions", srv.url))
            .header("Content-Type", "application/json")
            .send(body.to_string()),
    );
    assert_eq!(status, 200);
    let events = sse_events(&raw);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{raw}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["ggmerge"]["mixture"], json!({"code": 1.0}));
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, whole);
    let finish = chunks
        .iter()
        .rev()
        .find_map(|c| c["choices"].get(0)?["finish_reason"].as_str());
    assert!(matches!(finish, Some("stop" | "length")), "{raw}");
    let usage = &chunks.last().unwrap()["usage"];
    assert!(chunks.last().unwrap()["choices"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(usage["completion_tokens"].as_u64().unwrap() >= 1);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );
    // Stop strings: the text up to the stop, never the stop itself.
    let stop_at = whole
        .chars()
        .nth(whole.len().min(8) / 2)
        .map(String::from)
        .unwrap();
    let mut body = ask("code", q, 20);
    body["stop"] = json!([stop_at]);
    let v = srv.chat(body);
    let cut = content(&v);
    assert!(
        whole.starts_with(&cut) && !cut.contains(&stop_at),
        "{cut:?} / {whole:?} / {stop_at:?}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[test]
fn a_prefix_computed_under_one_mixture_is_never_reused_under_another() {
    let srv = Server::start(&[]);
    let q = "Tell me about the sea.";
    let a1 = srv.chat(ask("math", q, 16));
    let b = srv.chat(ask("code", q, 16));
    let a2 = srv.chat(ask("math", q, 16));
    // Each switch cleared the memory: nothing was reused, and A answers as it did fresh.
    for v in [&a1, &b, &a2] {
        assert_eq!(
            v["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
            "{v}"
        );
    }
    assert_eq!(content(&a1), content(&a2));
    assert_ne!(
        content(&a1),
        content(&b),
        "the experts should answer differently"
    );
    // The switch back to A was a copy from the mixture cache.
    assert_eq!(a2["ggmerge"]["switch_cached"], true);
    // Under the same mixture, the shared prefix is reused and the answer is the same.
    let a3 = srv.chat(ask("math", q, 16));
    assert!(
        a3["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(content(&a3), content(&a1));
}

#[test]
fn a_follow_up_turn_reuses_its_prefix_and_answers_as_a_fresh_request() {
    let srv = Server::start(&[]);
    let first = ask("coder", "What is 2 + 2?", 12);
    let answer = content(&srv.chat(first));
    let follow = json!({
        "model": "coder",
        "messages": [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And 3 + 3?"},
        ],
        "max_tokens": 12,
        "temperature": 0,
    });
    let cached = srv.chat(follow.clone());
    let reused = cached["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(reused > 10, "{cached}");
    // Fresh: after a switch away and back, the memory is empty.
    srv.chat(ask("base", "x", 1));
    let fresh = srv.chat(follow);
    assert_eq!(fresh["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(content(&cached), content(&fresh));
    assert!(srv.metric("ggmerge_prompt_tokens_cached_total") >= reused as f64);
}

#[test]
fn eight_concurrent_clients_with_mixed_mixtures_all_get_their_answers() {
    let srv = Server::start(&[]);
    let q = "Write one word.";
    let models = ["math", "code", "coder", "base"];
    let expected: Vec<String> = models
        .iter()
        .map(|m| content(&srv.chat(ask(m, q, 10))))
        .collect();
    let url = srv.url.clone();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let m = ["math", "code", "coder", "base"][i % 4];
                let (status, v) = post_raw(
                    &format!("{url}/v1/chat/completions"),
                    &ask(m, "Write one word.", 10).to_string(),
                    &[],
                );
                assert_eq!(status, 200, "{v}");
                (i % 4, content(&v))
            })
        })
        .collect();
    for h in handles {
        let (m, got) = h.join().unwrap();
        assert_eq!(got, expected[m], "client for {}", models[m]);
    }
}

#[test]
fn the_loaded_mixture_goes_first_but_no_request_is_passed_over_more_than_four_times() {
    for (schedule, b_served_after) in [("mixture-first", 4), ("fifo", 0)] {
        let srv = Server::start(&["--schedule", schedule]);
        let url = srv.url.clone();
        // A long request for `math` holds the inference thread while the queue fills: first
        // one for `code` (B), then six more for `math`, in that order.
        let blocker = {
            let url = url.clone();
            std::thread::spawn(move || {
                post_raw(
                    &format!("{url}/v1/completions"),
                    &count("math", 150).to_string(),
                    &[],
                )
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        let mut clients = Vec::new();
        for i in 0..7 {
            let url = url.clone();
            let model = if i == 0 { "code" } else { "math" };
            clients.push(std::thread::spawn(move || {
                let (status, v) = post_raw(
                    &format!("{url}/v1/chat/completions"),
                    &ask(model, "Hi", 2).to_string(),
                    &[],
                );
                assert_eq!(status, 200, "{v}");
                (model, v["ggmerge"]["served"].as_u64().unwrap())
            }));
            std::thread::sleep(Duration::from_millis(150));
        }
        let (status, v) = blocker.join().unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["ggmerge"]["served"], 1, "the blocker ran first");
        let served: Vec<(&str, u64)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        let b = served.iter().find(|(m, _)| *m == "code").unwrap().1;
        // After the blocker (1): with mixture-first, four `math` requests pass B; with fifo, none.
        assert_eq!(b, 2 + b_served_after, "{schedule}: {served:?}");
    }
}

#[test]
fn errors_come_in_openai_shape_with_the_right_status() {
    let srv = Server::start(&["--api-key", "sekret", "--max-body-kib", "4", "-c", "256"]);
    let chat = format!("{}/v1/chat/completions", srv.url);
    let auth = [("Authorization", "Bearer sekret")];
    let check = |status: u16, v: &Value, want_status: u16, code: Option<&str>| {
        assert_eq!(status, want_status, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert!(v["error"]["type"].is_string(), "{v}");
        if let Some(c) = code {
            assert_eq!(v["error"]["code"], c, "{v}");
        }
    };
    let ok = ask("math", "Hi", 2).to_string();
    // Missing and wrong keys.
    let (st, v) = post_raw(&chat, &ok, &[]);
    check(st, &v, 401, Some("invalid_api_key"));
    let (st, v) = post_raw(&chat, &ok, &[("Authorization", "Bearer nope")]);
    check(st, &v, 401, Some("invalid_api_key"));
    let (st, v) = post_raw(&chat, &ok, &auth);
    assert_eq!(st, 200, "{v}");
    // Malformed JSON, unknown model, unknown expert, unusable weights, n > 1.
    let (st, v) = post_raw(&chat, "{\"model\": ", &auth);
    check(st, &v, 400, Some("invalid_json"));
    let (st, v) = post_raw(&chat, &ask("gpt-4", "Hi", 2).to_string(), &auth);
    check(st, &v, 404, Some("model_not_found"));
    for experts in [json!({"nobody": 1}), json!({"math": 1e39})] {
        let mut b = ask("math", "Hi", 2);
        b["experts"] = experts;
        let (st, v) = post_raw(&chat, &b.to_string(), &auth);
        check(st, &v, 400, None);
        assert_eq!(v["error"]["param"], "experts");
    }
    let mut b = ask("math", "Hi", 2);
    b["merge_method"] = json!("slerp");
    let (st, v) = post_raw(&chat, &b.to_string(), &auth);
    check(st, &v, 400, None);
    let mut b = ask("math", "Hi", 2);
    b["n"] = json!(2);
    let (st, v) = post_raw(&chat, &b.to_string(), &auth);
    check(st, &v, 400, None);
    // A prompt longer than the context (256 tokens) fits the body limit (4 KiB) but not the
    // context.
    let long = ask("math", &"word ".repeat(600), 2).to_string();
    let (st, v) = post_raw(&chat, &long, &auth);
    check(st, &v, 400, Some("context_length_exceeded"));
    // A body over the limit.
    let huge = ask("math", &"x".repeat(10_000), 2).to_string();
    let (st, v) = post_raw(&chat, &huge, &auth);
    check(st, &v, 413, Some("request_too_large"));
    // The server is still fine.
    let (st, _) = post_raw(&chat, &ok, &auth);
    assert_eq!(st, 200);
}

#[test]
fn a_full_queue_answers_503() {
    let srv = Server::start(&["--queue", "1"]);
    let url = format!("{}/v1/chat/completions", srv.url);
    let url = url.replace("chat/completions", "completions");
    let handles: Vec<_> = (0..5)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || post_raw(&url, &count("math", 60).to_string(), &[]))
        })
        .collect();
    let results: Vec<(u16, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let full = results.iter().filter(|(s, _)| *s == 503).count();
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    assert!(full >= 1 && ok >= 1, "{results:?}");
    for (s, v) in &results {
        if *s == 503 {
            assert_eq!(v["error"]["code"], "queue_full", "{v}");
        }
    }
}

#[test]
fn a_client_that_disconnects_mid_stream_stops_its_generation() {
    let srv = Server::start(&["-c", "2048"]);
    {
        let mut body = count("math", 1500);
        body["stream"] = json!(true);
        let mut resp = ureq::post(format!("{}/v1/completions", srv.url))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap();
        let mut reader = resp.body_mut().as_reader();
        let mut first = [0u8; 256];
        let n = reader.read(&mut first).unwrap();
        assert!(n > 0);
        // The response (and its connection) is dropped here, mid-stream.
    }
    let started = Instant::now();
    while srv.metric("ggmerge_requests_cancelled_total") < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "generation did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(srv.metric("ggmerge_completion_tokens_total") < 1500.0);
    // The server keeps serving.
    let v = srv.chat(ask("code", "Hi", 3));
    assert!(!content(&v).is_empty());
}

#[test]
fn experts_are_loaded_from_the_expert_dir_by_name_only_and_removed() {
    let p = packs();
    let dir = common::tempdir();
    std::fs::copy(&p.math, dir.path().join("extra.dpk.gguf")).unwrap();
    std::fs::write(dir.path().join("junk.dpk.gguf"), b"not a pack").unwrap();
    let outside = p.dir.path().join("outside.dpk.gguf");
    std::fs::copy(&p.code, &outside).unwrap();
    let srv = Server::start(&["--expert-dir", s(dir.path())]);
    let (st, v) = srv.post("/experts", &json!({"file": "extra.dpk.gguf"}));
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["expert"]["name"], "extra");
    let (_, models) = srv.get("/v1/models");
    assert!(models.contains("\"extra\""), "{models}");
    // It answers like math (the same pack).
    assert_eq!(
        content(&srv.chat(ask("extra", "Hi there", 8))),
        content(&srv.chat(ask("math", "Hi there", 8)))
    );
    // Never a path: not upwards, not absolute, not into a subdirectory, not a damaged pack.
    let agent = format!("{}/experts", srv.url);
    for file in [
        "../outside.dpk.gguf",
        s(&outside),
        "sub/extra.dpk.gguf",
        "..",
        "missing.dpk.gguf",
    ] {
        let (st, v) = post_raw(
            &agent,
            &json!({"file": file, "name": "evil"}).to_string(),
            &[],
        );
        assert_eq!(st, 400, "{file}: {v}");
        assert_eq!(v["error"]["param"], "file");
    }
    let (st, v) = post_raw(&agent, &json!({"file": "junk.dpk.gguf"}).to_string(), &[]);
    assert_eq!(st, 400, "{v}");
    // Remove it; a second time it is unknown.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let (st, _) = call(agent.delete(format!("{}/experts/extra", srv.url)).call());
    assert_eq!(st, 200);
    let (st, _) = call(agent.delete(format!("{}/experts/extra", srv.url)).call());
    assert_eq!(st, 404);
    let (st, v) = post_raw(
        &format!("{}/v1/chat/completions", srv.url),
        &ask("extra", "Hi", 2).to_string(),
        &[],
    );
    assert_eq!(st, 404, "{v}");
    // Without --expert-dir nothing is loaded from the network.
    let srv2 = Server::start(&[]);
    let (st, v) = post_raw(
        &format!("{}/experts", srv2.url),
        &json!({"file": "extra.dpk.gguf"}).to_string(),
        &[],
    );
    assert_eq!(st, 403, "{v}");
}

#[test]
fn sigterm_lets_the_request_in_flight_finish_and_exits() {
    let srv = Server::start(&[]);
    let url = format!("{}/v1/completions", srv.url);
    let inflight = std::thread::spawn(move || post_raw(&url, &count("math", 30).to_string(), &[]));
    std::thread::sleep(Duration::from_millis(400));
    let started = Instant::now();
    let status = srv.stop();
    assert!(status.success(), "{status}");
    // No hang: the request in flight finishes (30 tokens), then the process exits.
    assert!(started.elapsed() < Duration::from_secs(120));
    let (st, v) = inflight.join().unwrap();
    assert!(st == 200 || st == 503, "{st}: {v}");
}

/// Runs a Python client script against a server; the script prints what it checked.
fn python(script: &str, args: &[&str]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script);
    let o = Command::new(common::python())
        .arg(&path)
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        o.status.success(),
        "{script} failed (the README's test command installs its Python packages):\n{}\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    eprintln!("{}", text(&o.stdout));
}

#[test]
fn the_openai_python_client_works() {
    let srv = Server::start(&[]);
    python("openai_client.py", &[&format!("{}/v1", srv.url)]);
}

#[test]
fn the_chat_page_works_in_a_real_browser() {
    let srv = Server::start(&[]);
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("serve-chat-page.png");
    let _ = std::fs::remove_file(&shot);
    python("chat_page.py", &[&srv.url, s(&shot)]);
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "screenshot written"
    );
}
