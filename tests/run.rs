//! Experts at run time on SmolLM2: packs applied in memory behave exactly like the offline
//! merged file, mixtures switch back bit-identically, bad input is a clear error.

mod common;

use std::path::{Path, PathBuf};

use common::experts::apply_packs;
use common::smollm2_pack_pair;
use ggmerge::merge::config::Method;
use ggmerge::runtime::{Expert, ExpertSession};
use ggmerge::runtime::{GenerateOptions, Model, ModelOptions, SessionOptions};
use ggmerge::NoProgress;

const TEXT: &str = "The history of the city begins with a small settlement on the river. Over the \
centuries, merchants built warehouses along the banks, and the town grew into a busy port. \
Bridges were added, then a cathedral, a university and wide avenues lined with trees. Today the \
city is known for its museums, its food markets and its music, and visitors come from all over \
the world to walk its streets, to sit in its cafes and to watch the boats on the river at \
sunset. In winter the squares fill with lights and small stalls selling warm drinks, and in \
summer the parks are crowded with families, students and musicians playing for passers-by.";

fn packs() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    smollm2_pack_pair()
}

fn model(path: &Path) -> Model {
    Model::load(
        path,
        &ModelOptions {
            threads: Some(1),
            gpu_layers: common::test_gpu_layers(),
            ..Default::default()
        },
    )
    .unwrap()
}

fn session_opts() -> SessionOptions {
    SessionOptions {
        n_ctx: 128,
        threads: Some(1),
        ..Default::default()
    }
}

fn experts() -> Vec<Expert> {
    let (_d, a, b) = packs();
    vec![Expert::from_path(a), Expert::from_path(b)]
}

#[test]
fn packs_in_memory_equal_the_applied_file() {
    let (_d, a, b) = packs();
    let dir = common::tempdir();
    let applied = dir.path().join("applied.gguf");
    apply_packs(&common::smollm2(), &[(a, 0.7), (b, 0.3)], &applied);

    let gen = GenerateOptions {
        n_predict: 24,
        ..Default::default()
    };
    let base = model(&common::smollm2());
    let mut live = ExpertSession::new(
        &base,
        &common::smollm2(),
        experts(),
        &[0.7, 0.3],
        Method::TaskArithmetic,
        &session_opts(),
        Some(2),
        1 << 30,
    )
    .unwrap();
    let g_live = live.session().generate("Once upon a time", &gen).unwrap();
    let p_live = live
        .session()
        .perplexity(&TEXT.repeat(3), &NoProgress)
        .unwrap();

    let file = model(&applied);
    let mut plain = file.session(&session_opts()).unwrap();
    let g_file = plain.generate("Once upon a time", &gen).unwrap();
    let p_file = plain.perplexity(&TEXT.repeat(3), &NoProgress).unwrap();

    assert_eq!(g_live.tokens, g_file.tokens);
    assert!(
        ((p_live.ppl - p_file.ppl) / p_file.ppl).abs() < 1e-4,
        "{} vs {}",
        p_live.ppl,
        p_file.ppl
    );
}

#[test]
fn switching_a_b_a_restores_bit_identical_logits() {
    let base = model(&common::smollm2());
    let mut s = ExpertSession::new(
        &base,
        &common::smollm2(),
        experts(),
        &[1.0, 0.0],
        Method::TaskArithmetic,
        &session_opts(),
        Some(2),
        1 << 30,
    )
    .unwrap();
    let tokens = base
        .tokenize("The capital of France is", true, false)
        .unwrap();
    let a1 = s.session().logits_for(&tokens).unwrap();
    let r = s.set_mixture(&[0.0, 1.0]).unwrap();
    assert!(!r.cached && r.tensors > 200, "{r:?}");
    let b = s.session().logits_for(&tokens).unwrap();
    assert_ne!(a1, b);
    let r = s.set_mixture(&[1.0, 0.0]).unwrap();
    assert!(r.cached, "{r:?}");
    let a2 = s.session().logits_for(&tokens).unwrap();
    assert!(a1 == a2, "A → B → A changed the logits");
    // Weights 0 everywhere restore the base itself.
    s.set_mixture(&[0.0, 0.0]).unwrap();
    let zero = s.session().logits_for(&tokens).unwrap();
    drop(s);
    let plain_model = model(&common::smollm2());
    let mut plain = plain_model.session(&session_opts()).unwrap();
    assert!(zero == plain.logits_for(&tokens).unwrap());
}

#[test]
fn bad_input_is_a_clear_error() {
    let (_d, a, _b) = packs();
    let base = model(&common::smollm2());
    // Missing pack.
    let missing = vec![Expert::from_path("/nonexistent/x.dpk.gguf")];
    let err = ExpertSession::new(
        &base,
        &common::smollm2(),
        missing,
        &[1.0],
        Method::TaskArithmetic,
        &session_opts(),
        Some(1),
        1 << 20,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("x.dpk.gguf"), "{err}");
    // Pack for another base: the Gemma base refuses a SmolLM2 pack.
    let gemma = model(&common::gemma3());
    let err = ExpertSession::new(
        &gemma,
        &common::gemma3(),
        vec![Expert::from_path(a)],
        &[1.0],
        Method::TaskArithmetic,
        &session_opts(),
        Some(1),
        1 << 20,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("another base"), "{err}");
    drop(gemma);
    // Weight not a number, unknown expert name: the session survives.
    let mut s = ExpertSession::new(
        &base,
        &common::smollm2(),
        experts(),
        &[1.0, 0.0],
        Method::TaskArithmetic,
        &session_opts(),
        Some(1),
        1 << 30,
    )
    .unwrap();
    assert!(s.set_mixture(&[f64::NAN, 0.0]).is_err());
    assert!(s.parse_mixture("math=abc").is_err());
    assert!(s
        .parse_mixture("nobody=1")
        .unwrap_err()
        .to_string()
        .contains("known: math, code"));
    assert_eq!(s.describe(), "math=1 code=0");
    // Prompt longer than the context.
    let long = "word ".repeat(400);
    let err = s
        .session()
        .generate(&long, &GenerateOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("128") || err.contains("context"), "{err}");
    // Still usable.
    assert!(!s
        .session()
        .generate(
            "Hi",
            &GenerateOptions {
                n_predict: 4,
                ..Default::default()
            }
        )
        .unwrap()
        .tokens
        .is_empty());
}

#[test]
fn chat_cli_survives_a_bad_experts_line() {
    let (_d, a, b) = packs();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ggmerge"))
        .args([
            "chat",
            "--base",
            common::smollm2().to_str().unwrap(),
            "--expert",
            a.to_str().unwrap(),
            "--expert",
            &format!("{}:0", b.display()),
            "-t",
            "1",
            "-c",
            "256",
            "-n",
            "8",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"/experts math=x\n/experts nobody=1\n/experts code=1\n/experts\nHello\n/quit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("error: weight \"x\""), "{s}");
    assert!(s.contains("unknown expert \"nobody\""), "{s}");
    assert!(s.contains("experts: math=0 code=1"), "{s}");
}
