//! Output hashes pinned: merge, apply, extract, quantize and convert on both fixtures must keep
//! producing exactly these bytes. A change to any of them is either a bug or a deliberate
//! format change — then update the hash here in the same commit and say why. (Merge and apply
//! hashes changed once on purpose, when grid-stochastic requantization became the default; the
//! `--requant full` merge keeps the hash it had before.)
//!
//! The experts are the tests' deterministic synthetic fine-tunes (`common::experts`), so the
//! hashes depend only on ggmerge's code (and the pinned ggml for quantization).

mod common;

use common::s;

use std::path::Path;

use ggmerge::format::GgmlType;

fn ggmerge(args: &[&str]) {
    let out = common::ggmerge(args);
    assert!(
        out.status.success(),
        "ggmerge {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// xxh3-64 of a file, hex.
fn hash(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes))
}

/// Runs the pinned pipeline on `base` and returns (output name, hash) pairs.
fn pipeline(base: &Path, dir: &Path, with_convert: bool) -> Vec<(String, String)> {
    let e1 = dir.join("e1.gguf");
    let e2 = dir.join("e2.gguf");
    common::experts::make_expert(base, &e1, 1, 2e-2, GgmlType::F16, &[]);
    common::experts::make_expert(base, &e2, 2, 2e-2, GgmlType::Q8_0, &["attn", "ffn_down"]);
    let mut out = Vec::new();
    let mut record = |name: &str, path: &Path| out.push((name.to_string(), hash(path)));

    // dare_ties into the base's types, once with full requantization (the default before
    // grid-stochastic; its bytes are unchanged since) and once with the default.
    for (name, requant) in [
        ("merge dare_ties --requant full", Some("full")),
        ("merge dare_ties", None),
    ] {
        let merged = dir.join("merged.gguf");
        let (e1, e2) = (s(&e1), s(&e2));
        let mut args = vec![
            "merge",
            "--base",
            s(base),
            "--model",
            e1,
            "--weight",
            "0.6",
            "--density",
            "0.2",
            "--model",
            e2,
            "--weight",
            "0.4",
            "--density",
            "0.3",
            "--method",
            "dare_ties",
            "--seed",
            "7",
            "-o",
            s(&merged),
            "-q",
        ];
        if let Some(r) = requant {
            args.extend(["--requant", r]);
        }
        ggmerge(&args);
        record(name, &merged);
        std::fs::remove_file(&merged).unwrap();
    }
    let ties = dir.join("ties.gguf");
    ggmerge(&[
        "merge",
        "--base",
        s(base),
        "--model",
        s(&e1),
        "--weight",
        "1",
        "--density",
        "0.5",
        "--model",
        s(&e2),
        "--weight",
        "1",
        "--density",
        "0.5",
        "--method",
        "breadcrumbs_ties",
        "--type",
        "Q8_0",
        "-o",
        s(&ties),
        "-q",
    ]);
    record("merge breadcrumbs_ties Q8_0", &ties);

    let p1 = dir.join("e1.dpk.gguf");
    let p2 = dir.join("e2.dpk.gguf");
    ggmerge(&[
        "extract",
        "--base",
        s(base),
        "--finetuned",
        s(&e1),
        "--density",
        "0.1",
        "--seed",
        "3",
        "-o",
        s(&p1),
        "-q",
    ]);
    ggmerge(&[
        "extract",
        "--base",
        s(base),
        "--finetuned",
        s(&e2),
        "--sparsify",
        "magnitude",
        "--density",
        "0.2",
        "--values",
        "q8_0",
        "-o",
        s(&p2),
        "-q",
    ]);
    record("extract dare f16", &p1);
    record("extract magnitude q8_0", &p2);

    let applied = dir.join("applied.gguf");
    ggmerge(&[
        "apply",
        "--base",
        s(base),
        "--expert",
        &format!("{}:0.7", s(&p1)),
        "--expert",
        &format!("{}:0.5", s(&p2)),
        "--method",
        "dare_ties",
        "-o",
        s(&applied),
        "-q",
    ]);
    record("apply dare_ties", &applied);

    let q = dir.join("q.gguf");
    ggmerge(&["quantize", s(base), s(&q), "Q4_K_M", "-q"]);
    record("quantize Q4_K_M", &q);

    if with_convert {
        let hf = dir.join("hf.safetensors");
        ggmerge(&["convert", s(base), s(&hf), "--type", "BF16", "-q"]);
        record("convert to safetensors BF16", &hf);
        let back = dir.join("back.gguf");
        ggmerge(&[
            "convert",
            s(&hf),
            s(&back),
            "--metadata-from",
            s(base),
            "--force",
            "-q",
        ]);
        record("convert back to GGUF", &back);
    }
    out
}

fn check(got: Vec<(String, String)>, want: &[(&str, &str)]) {
    let got_ref: Vec<(&str, &str)> = got.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(got_ref, want, "outputs changed (see the module doc)");
}

#[test]
fn smollm2_outputs_are_pinned() {
    let dir = common::tempdir();
    let got = pipeline(&common::smollm2(), dir.path(), true);
    check(
        got,
        &[
            ("merge dare_ties --requant full", "f7e154cd19b177ee"),
            ("merge dare_ties", "3e67168e4e17b62d"),
            ("merge breadcrumbs_ties Q8_0", "0d491cd84e1dbc5f"),
            ("extract dare f16", "b7fae22bb1c40089"),
            ("extract magnitude q8_0", "cb7286495fed2580"),
            ("apply dare_ties", "1d4a68961ce61b3d"),
            ("quantize Q4_K_M", "89805822061d8b63"),
            ("convert to safetensors BF16", "069e1fb3fc9dbae3"),
            ("convert back to GGUF", "1dca7e13b829c9a8"),
        ],
    );
}

#[test]
fn gemma3_outputs_are_pinned() {
    let dir = common::tempdir();
    let got = pipeline(&common::gemma3(), dir.path(), false);
    check(
        got,
        &[
            ("merge dare_ties --requant full", "1a7668570873235c"),
            ("merge dare_ties", "eac059ed302f8638"),
            ("merge breadcrumbs_ties Q8_0", "35b6b550b3705f60"),
            ("extract dare f16", "b75164492a9252d1"),
            ("extract magnitude q8_0", "e860a3f4d5c5b582"),
            ("apply dare_ties", "0babd1b43c12affd"),
            ("quantize Q4_K_M", "9334a390523ab4e2"),
        ],
    );
}
