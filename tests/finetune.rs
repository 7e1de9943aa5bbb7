//! `ggmerge finetune` on the tiny random llama of `common/tiny_model.rs`: a few optimizer steps,
//! then the output must load in llama.cpp, give other logits than the base, and keep the base's
//! metadata and tensor layout; bad arguments are refused with one line (options, F32, paths
//! before the model is loaded, architectures ggml cannot differentiate), leaving no file
//! behind. Below the CLI, `runtime::train`: its events in order, a callback's panic carried
//! across llama.cpp, a quantized model and a Gemma model refused.

mod common;

use common::{ggmerge, s, text};

use std::path::Path;

use common::experts::llama_logits;
use common::tiny_model::TinyLlama;
use ggmerge::flows::facts;
use ggmerge::format::gguf::GgufModel;
use ggmerge::runtime::train::{self, TrainError, TrainEvent, TrainOptions};
use ggmerge::runtime::{Model, ModelOptions, RuntimeError};

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn finetune_trains_the_tiny_model_and_keeps_the_base_layout() {
    let dir = common::tempdir();
    let base = dir.path().join("tiny.gguf");
    TinyLlama::default().write(&common::smollm2(), &base);
    let [domain, _] = facts::domains(4, 1);
    let data = dir.path().join("capitals.txt");
    std::fs::write(&data, domain.train_text(3, 1)).unwrap();
    let questions = dir.path().join("questions.jsonl");
    std::fs::write(&questions, domain.questions_jsonl()).unwrap();
    let out = dir.path().join("expert.gguf");

    // ~800 tokens: 4 sequences of 256 every 128 tokens, one of them validation.
    let run = ggmerge(&[
        "finetune",
        "--base",
        s(&base),
        "--data",
        s(&data),
        "-o",
        s(&out),
        "--lr",
        "3e-3",
        "--lr-min",
        "1e-3",
        "--eval",
        s(&questions),
        "--epochs",
        "2",
        "--ctx",
        "200",
        "--stride",
        "128",
        "--val-split",
        "0.25",
        "-t",
        "1",
    ]);
    let (stdout, stderr) = (text(&run.stdout), text(&run.stderr));
    eprintln!("{stdout}\n{stderr}");
    assert!(run.status.success(), "{stderr}");
    for needle in [
        "--ctx 200 rounded up to 256",
        "sequences of 256 tokens (stride 128)",
        "epoch 1 train    1/",
        "epoch 2 val  ",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in\n{stderr}");
    }
    for needle in [
        "epoch 1/2: lr 3.00e-3, train loss",
        "epoch 2/2: lr 1.00e-3, train loss",
        "epoch 1/2: eval exact match ",
        "epoch 2/2: eval exact match ",
        "/4 (",
        ", val loss ",
        "train loss ",
        "20 of 21 tensors changed",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in\n{stdout}");
    }
    assert_eq!(
        listing(dir.path()),
        [
            "capitals.txt",
            "expert.gguf",
            "questions.jsonl",
            "tiny.gguf"
        ]
    );

    // Homologous to the base: same metadata (name, training context …), tensors and types;
    // every weight but the frozen token embedding changed.
    let (b, t) = (
        GgufModel::open(&base).unwrap(),
        GgufModel::open(&out).unwrap(),
    );
    assert_eq!(b.metadata(), t.metadata());
    assert_eq!(b.n_tensors(), t.n_tensors());
    for (x, y) in b.tensors().zip(t.tensors()) {
        assert_eq!(
            (&x.info.name, &x.info.shape, x.info.ty),
            (&y.info.name, &y.info.shape, y.info.ty)
        );
        let frozen = x.info.name == "token_embd.weight";
        assert_eq!(x.data == y.data, frozen, "{}", x.info.name);
    }
    drop((b, t));

    // llama.cpp loads it, and it predicts differently.
    let (lb, lt) = (llama_logits(&base), llama_logits(&out));
    assert_eq!(lb.len(), lt.len());
    assert!(lt.iter().all(|x| x.is_finite()));
    let max_diff = lb
        .iter()
        .zip(&lt)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_diff > 1e-3, "logits moved by at most {max_diff}");
}

#[test]
fn finetune_refuses_bad_inputs_leaving_no_file() {
    let dir = common::tempdir();
    let base = dir.path().join("tiny.gguf");
    TinyLlama::default().write(&common::smollm2(), &base);
    let data = dir.path().join("train.txt");
    std::fs::write(&data, "Too short to train on.\n").unwrap();
    let out = dir.path().join("out.gguf");
    let expect_error = |args: &[&str], needles: &[&str]| {
        let mut all = vec!["finetune"];
        all.extend_from_slice(args);
        let r = ggmerge(&all);
        let err = text(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{args:?}: {err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: missing {n:?} in {err}");
        }
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    };
    let smol = common::smollm2();
    let (b, d, o) = (s(&base), s(&data), s(&out));
    // A quantized model: the error says how to make an F32 copy.
    expect_error(
        &["--base", s(&smol), "--data", d, "-o", o],
        &["F32", "ggmerge quantize", "SmolLM2-135M-Instruct.Q4_1.gguf"],
    );
    expect_error(
        &["--base", b, "--data", d, "-o", o, "-t", "1"],
        &["the text has", "tokens", "smaller context"],
    );
    expect_error(
        &["--base", b, "--data", d, "-o", b],
        &["refusing to overwrite the input"],
    );
    expect_error(
        &["--base", b, "--data", d, "-o", o, "--lr", "0"],
        &["learning rate"],
    );
    expect_error(
        &["--base", b, "--data", d, "-o", o, "--val-split", "1"],
        &["validation split"],
    );
    expect_error(
        &["--base", b, "--data", d, "-o", o, "--epochs", "0"],
        &["epochs"],
    );
    let missing = dir.path().join("missing.txt");
    expect_error(
        &["--base", b, "--data", s(&missing), "-o", o],
        &["missing.txt", "cannot read"],
    );
    std::fs::write(&data, b"caf\xe9\n").unwrap();
    expect_error(&["--base", b, "--data", d, "-o", o], &["not UTF-8"]);
    // Gemma's GEGLU has no backward pass in ggml: llama.cpp would abort the process in the
    // first step (SIGABRT). Refused first, before the F32 check would send the user to make a
    // 1 GB copy that cannot be trained either.
    let gemma = common::gemma3();
    expect_error(
        &["--base", s(&gemma), "--data", d, "-o", o],
        &[
            "gemma-3-270m-q4_k_m.gguf",
            "gemma3",
            "GEGLU",
            "cannot be fine-tuned",
        ],
    );
    assert_eq!(listing(dir.path()), ["tiny.gguf", "train.txt"]);

    // --help teaches what training needs.
    let help = text(&ggmerge(&["finetune", "--help"]).stdout);
    for n in [
        "F32",
        "ggmerge quantize",
        "--val-split",
        "--stride",
        "token_embd",
        "Gemma",
    ] {
        assert!(help.contains(n), "missing {n:?} in\n{help}");
    }
}

/// The tiny base and a ~800-token text, in `dir`.
fn tiny_with_text(dir: &Path) -> (std::path::PathBuf, String) {
    let base = dir.join("tiny.gguf");
    TinyLlama::default().write(&common::smollm2(), &base);
    let [domain, _] = facts::domains(4, 1);
    (base, domain.train_text(3, 1))
}

fn load_for_training(path: &Path) -> Model {
    let opts = ModelOptions {
        repack: false,
        ..Default::default()
    };
    Model::load(path, &opts).unwrap()
}

#[test]
fn train_reports_its_plan_steps_and_epochs_in_order() {
    let dir = common::tempdir();
    let (base, text) = tiny_with_text(dir.path());
    let mut model = load_for_training(&base);
    let opts = TrainOptions {
        lr: 3e-3,
        epochs: 2,
        n_ctx: 256,
        stride: Some(128),
        val_split: 0.25,
        threads: Some(1),
        ..Default::default()
    };
    let mut log = Vec::new();
    let r = train::train(&mut model, &text, &opts, &mut |e| {
        log.push(match e {
            TrainEvent::Start(p) => format!("start {}+{}", p.train_sequences, p.val_sequences),
            TrainEvent::Step(s) => format!("{} {:?} {}/{}", s.epoch, s.phase, s.step, s.steps),
            TrainEvent::Epoch(e) => format!("epoch {}", e.epoch),
            TrainEvent::Trained { epoch, model } => {
                format!("trained {epoch} {}", model.n_params())
            }
        })
    })
    .unwrap();
    let p = &r.plan;
    assert_eq!((p.n_ctx, p.stride, p.threads), (256, 128, 1));
    assert_eq!(p.sequences, (p.text_tokens - 257) / 128);
    assert_eq!(p.train_sequences, (p.sequences as f64 * 0.75) as usize);
    assert!(p.train_sequences >= 2 && p.val_sequences >= 1, "{p:?}");
    let mut want = vec![format!("start {}+{}", p.train_sequences, p.val_sequences)];
    for epoch in 1..=2 {
        for i in 1..=p.train_sequences {
            want.push(format!("{epoch} Train {i}/{}", p.train_sequences));
        }
        for i in 1..=p.val_sequences {
            want.push(format!("{epoch} Validation {i}/{}", p.val_sequences));
        }
        want.push(format!("epoch {epoch}"));
        want.push(format!("trained {epoch} {}", model.n_params()));
    }
    assert_eq!(log, want);
    assert_eq!(r.epochs.len(), 2);
    for e in &r.epochs {
        let val = e.val.expect("validation stats");
        assert_eq!(e.train.tokens, 256 * p.train_sequences as u64);
        assert_eq!(val.tokens, 256 * p.val_sequences as u64);
        assert!(e.train.loss.is_finite() && (0.0..=1.0).contains(&e.train.accuracy));
        assert!(e.secs > 0.0 && e.secs_per_step > 0.0);
    }
    assert!(r.epochs[1].train.loss < r.epochs[0].train.loss, "{r:?}");
    // llama_opt_init set the model's training context to the training context's size.
    assert_eq!(model.n_ctx_train(), 256);

    // llama.cpp's own save loads back (its metadata differs from the base: that is why the
    // flow rewraps it).
    let saved = dir.path().join("saved.gguf");
    train::save(&model, &saved).unwrap();
    drop(model);
    let g = GgufModel::open(&saved).unwrap();
    assert_eq!(g.n_tensors(), 21);
}

#[test]
fn train_resumes_a_callback_panic_after_llama_cpp_returns() {
    let dir = common::tempdir();
    let (base, text) = tiny_with_text(dir.path());
    let mut model = load_for_training(&base);
    let opts = TrainOptions {
        epochs: 1,
        stride: Some(256),
        val_split: 0.0,
        threads: Some(1),
        ..Default::default()
    };
    let mut steps = 0;
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train::train(&mut model, &text, &opts, &mut |e| {
            if let TrainEvent::Step(_) = e {
                steps += 1;
                panic!("stop at step {steps}");
            }
        })
    }));
    let payload = caught.expect_err("the callback's panic reaches the caller");
    assert_eq!(payload.downcast_ref::<String>().unwrap(), "stop at step 1");
    // After a panic no more events were delivered.
    assert_eq!(steps, 1);
}

#[test]
fn train_refuses_an_architecture_ggml_cannot_differentiate() {
    // Refused before the F32 check and before any llama.cpp training call: the Q4_K_M file is
    // enough to see the architecture.
    let mut model = load_for_training(&common::gemma3());
    assert_eq!(model.architecture().as_deref(), Some("gemma3"));
    let err = train::train(&mut model, "text", &TrainOptions::default(), &mut |_| {})
        .expect_err("gemma3 cannot be trained by llama.cpp");
    let msg = err.to_string();
    assert!(
        matches!(&err, RuntimeError::Train(e)
            if matches!(**e, TrainError::UnsupportedArchitecture { .. })),
        "{msg}"
    );
    assert!(msg.contains("GEGLU") && msg.contains("gemma3"), "{msg}");
    // llama models pass the check (the F32 check follows).
    let smol = load_for_training(&common::smollm2());
    assert_eq!(smol.architecture().as_deref(), Some("llama"));
    train::check_trainable(smol.path(), smol.architecture().as_deref()).unwrap();
    assert_eq!(smol.meta_str("no.such.key"), None);
}

#[test]
fn train_refuses_a_model_that_is_not_f32() {
    let mut model = load_for_training(&common::smollm2());
    let err = train::train(&mut model, "text", &TrainOptions::default(), &mut |_| {})
        .expect_err("Q4_1 weights cannot be trained");
    let msg = err.to_string();
    assert!(
        matches!(&err, RuntimeError::Train(e) if matches!(**e, TrainError::NotF32 { .. })),
        "{msg}"
    );
    assert!(
        msg.contains("ggmerge quantize") && msg.contains("F32"),
        "{msg}"
    );
}
