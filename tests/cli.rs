//! The `ggmerge` binary: output shapes, exit codes and one-line errors.

mod common;

use common::{ggmerge, text};

#[test]
fn inspect_prints_a_summary_and_json() {
    let smol = common::smollm2();
    let out = ggmerge(&["inspect", smol.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    for needle in [
        "architecture:  llama",
        "134.5M",
        "Q4_1",
        "Q8_0",
        "tokenizer.ggml.tokens",
        "49152 items",
    ] {
        assert!(s.contains(needle), "missing {needle:?} in\n{s}");
    }

    let out = ggmerge(&["inspect", common::gemma3().to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["architecture"], "gemma3");
    assert_eq!(v["tensors"].as_array().unwrap().len(), 236);
    let types: Vec<&str> = v["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["ty"].as_str().unwrap())
        .collect();
    for t in ["Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"] {
        assert!(types.contains(&t), "{types:?}");
    }
}

#[test]
fn quantize_writes_a_model_and_reports_it() {
    let dir = common::tempdir();
    let out_path = dir.path().join("smol-q8.gguf");
    let out = ggmerge(&[
        "quantize",
        common::smollm2().to_str().unwrap(),
        out_path.to_str().unwrap(),
        "q8_0",
        "-t",
        "2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(s.contains("272 (210 converted, 62 copied)"), "{s}");
    assert!(
        text(&out.stderr).contains("rounding error compounds"),
        "{}",
        text(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&ggmerge(&["inspect", out_path.to_str().unwrap(), "--json"]).stdout)
            .unwrap();
    assert_eq!(v["types"][0]["ty"], "Q8_0");
}

#[test]
fn errors_are_one_line_and_exit_nonzero() {
    let dir = common::tempdir();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(
        &junk,
        b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff",
    )
    .unwrap();
    let out = ggmerge(&["inspect", junk.to_str().unwrap()]);
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(e.starts_with("error: ") && e.contains("junk.gguf"), "{e}");

    let out = ggmerge(&[
        "quantize",
        common::smollm2().to_str().unwrap(),
        dir.path().join("x.gguf").to_str().unwrap(),
        "Q4_K_X",
    ]);
    assert!(!out.status.success());
    let e = text(&out.stderr);
    // A usage error (clap's: exit 2), listing the types and the nearest one.
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(
        e.starts_with("error: invalid value 'Q4_K_X'") && e.contains("Q4_K_M"),
        "{e}"
    );
    assert!(!dir.path().join("x.gguf").exists());
}
