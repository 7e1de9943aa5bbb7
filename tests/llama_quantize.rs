//! ggmerge's `quantize` against llama.cpp's own `llama_model_quantize` (the engine behind
//! `llama-quantize`), linked from the same pinned llama.cpp: for each mixture, every tensor must
//! get the same type and byte-identical data.

mod common;

use std::path::Path;

use common::llama::llama_quantize;
use ggmerge::format::gguf::GgufModel;
use ggmerge::quant::Target;
use ggmerge::{quantize_model, NoProgress, QuantizeOptions};

fn assert_same_as_llama(model: &Path, mixture: &str) {
    let dir = common::tempdir();
    let ours = dir.path().join("ours.gguf");
    let theirs = dir.path().join("theirs.gguf");
    let target = Target::parse(mixture, false).unwrap();
    let opts = QuantizeOptions {
        target,
        threads: Some(2),
    };
    quantize_model(model, &ours, &opts, &NoProgress).unwrap();
    llama_quantize(model, &theirs, target.ftype.id, 2);

    let a = GgufModel::open(&ours).unwrap();
    let b = GgufModel::open(&theirs).unwrap();
    assert_eq!(a.n_tensors(), b.n_tensors());
    let mut mismatched = Vec::new();
    for t in a.tensors() {
        let u = b.tensor_by_name(&t.info.name).unwrap();
        assert_eq!(t.info.shape, u.info.shape, "{}", t.info.name);
        if t.info.ty != u.info.ty {
            mismatched.push(format!(
                "{}: ours {} llama {}",
                t.info.name, t.info.ty, u.info.ty
            ));
        } else if t.data != u.data {
            mismatched.push(format!("{}: {} bytes differ", t.info.name, t.info.ty));
        }
    }
    assert!(
        mismatched.is_empty(),
        "{mixture} on {}: {} tensors differ from llama-quantize:\n{}",
        model.display(),
        mismatched.len(),
        mismatched.join("\n")
    );
    // Metadata: same keys and values (llama.cpp may order the two keys it sets differently).
    for (k, v) in a.metadata().iter() {
        assert_eq!(Some(v), b.metadata().get(k), "metadata {k}");
    }
    assert_eq!(a.metadata().len(), b.metadata().len());
}

#[test]
fn smollm2_mixtures_match_llama_quantize() {
    let m = common::smollm2();
    for mixture in [
        "Q4_K_M", "Q3_K_M", "Q2_K", "Q5_K_S", "IQ4_XS", "Q4_0", "Q8_0", "F16", "BF16",
    ] {
        assert_same_as_llama(&m, mixture);
    }
}

#[test]
fn gemma3_mixtures_match_llama_quantize() {
    let m = common::gemma3();
    for mixture in ["Q4_K_M", "Q3_K_L", "Q5_K_M", "Q6_K"] {
        assert_same_as_llama(&m, mixture);
    }
}
