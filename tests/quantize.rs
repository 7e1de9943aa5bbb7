//! `quantize` on real models and synthetic data: error bounds per type, the Gemma 3 fixture's
//! Q4_K_M plan, thread-count independence, split models, and bad requests.

mod common;

use std::path::Path;

use ggmerge::format::gguf::{GgufModel, GgufWriter, Metadata, TensorSpec, Value};
use ggmerge::format::GgmlType;
use ggmerge::quant::{self, QuantizeSupport, Target};
use ggmerge::{quantize_model, NoProgress, QuantizeOptions};

fn opts(mixture: &str, threads: usize) -> QuantizeOptions {
    QuantizeOptions {
        target: Target::parse(mixture, false).unwrap(),
        threads: Some(threads),
    }
}

/// ggml's `test-quantize-fns` bound on the total quantization error of each type
/// (rmse as ggml computes it: sqrt(Σ d²) / n over `0.1 + 2 cos(i)`).
fn ggml_error_bound(ty: GgmlType) -> f64 {
    match ty.name() {
        "Q1_0" => 0.025,
        "TQ1_0" | "TQ2_0" | "Q2_0" => 0.01,
        "Q2_K" | "IQ2_S" => 0.0075,
        "Q3_K" | "IQ3_S" => 0.0040,
        "IQ3_XXS" => 0.0050,
        "NVFP4" => 0.0030,
        _ => 0.002,
    }
}

#[test]
fn f32_to_each_type_and_back_stays_within_ggml_error_bounds() {
    let n = 32 * 128;
    let data: Vec<f32> = (0..n).map(|i| 0.1 + 2.0 * (i as f32).cos()).collect();
    let mut checked = Vec::new();
    for ty in GgmlType::all() {
        if ty.traits().quantize != QuantizeSupport::Yes {
            continue;
        }
        let mut q = vec![0u8; ty.row_bytes(n as u64).unwrap() as usize];
        quant::quantize(ty, &data, n as u64, &mut q, "synthetic").unwrap();
        let mut back = vec![0f32; n];
        quant::dequantize(ty, &q, &mut back, "synthetic").unwrap();
        let sum: f64 = data
            .iter()
            .zip(&back)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum();
        let err = sum.sqrt() / n as f64;
        assert!(
            err < ggml_error_bound(ty),
            "{ty}: error {err} >= {}",
            ggml_error_bound(ty)
        );
        checked.push(ty.name());
    }
    // Every type ggmerge claims to produce was checked.
    assert_eq!(checked.len(), 22, "{checked:?}");
}

#[test]
fn q4_k_m_plan_reproduces_the_gemma3_fixture() {
    // The fixture was written by llama-quantize as Q4_K_M; planning Q4_K_M for it must give
    // each tensor the type it already has (Q4_K → Q5_0 fallbacks for 640-wide rows included).
    let model = GgufModel::open(common::gemma3()).unwrap();
    let plan =
        ggmerge::flows::quantize::plan_model(&model, Target::parse("Q4_K_M", false).unwrap());
    let mut diffs = Vec::new();
    for (t, planned) in model.tensors().zip(&plan) {
        if t.info.ty != *planned {
            diffs.push(format!(
                "{}: file {} plan {planned}",
                t.info.name, t.info.ty
            ));
        }
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    let kinds: std::collections::BTreeSet<_> = plan.iter().map(|t| t.name()).collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        ["F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"]
    );
}

#[test]
fn output_is_byte_identical_for_1_and_2_threads() {
    let dir = common::tempdir();
    let a = dir.path().join("t1.gguf");
    let b = dir.path().join("t2.gguf");
    quantize_model(&common::smollm2(), &a, &opts("Q4_K_M", 1), &NoProgress).unwrap();
    quantize_model(&common::smollm2(), &b, &opts("Q4_K_M", 2), &NoProgress).unwrap();
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
}

/// Splits `src` into `n` shards named like llama.cpp's gguf-split does.
fn write_split(src: &Path, prefix: &Path, n: usize) -> Vec<std::path::PathBuf> {
    let model = GgufModel::open(src).unwrap();
    let total = model.n_tensors();
    let per = total.div_ceil(n);
    let mut paths = Vec::new();
    for s in 0..n {
        let path = ggmerge::format::gguf::split_path(prefix, s as u32 + 1, n as u32);
        let range = s * per..((s + 1) * per).min(total);
        let mut md = if s == 0 {
            model.metadata().clone()
        } else {
            Metadata::new()
        };
        md.set("split.no", Value::U16(s as u16));
        md.set("split.count", Value::U16(n as u16));
        md.set("split.tensors.count", Value::I32(total as i32));
        let specs: Vec<TensorSpec> = range
            .clone()
            .map(|i| {
                let t = model.tensor(i).info;
                TensorSpec {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    ty: t.ty,
                }
            })
            .collect();
        let mut w = GgufWriter::create(&path, 3, &md, &specs, &[src]).unwrap();
        for i in range {
            w.write_tensor(model.tensor(i).data).unwrap();
        }
        w.finish().unwrap();
        paths.push(path);
    }
    paths
}

#[test]
fn split_models_read_as_one_and_quantize_like_the_whole() {
    let dir = common::tempdir();
    let shards = write_split(&common::smollm2(), &dir.path().join("smol"), 3);
    let whole = GgufModel::open(common::smollm2()).unwrap();
    // Any shard opens the whole model.
    for shard in &shards {
        let split = GgufModel::open(shard).unwrap();
        assert_eq!(split.shards().len(), 3);
        assert_eq!(split.n_tensors(), whole.n_tensors());
        for (a, b) in split.tensors().zip(whole.tensors()) {
            assert_eq!(a.info.name, b.info.name);
            assert!(a.data == b.data, "{}", a.info.name);
        }
    }
    let from_split = dir.path().join("from-split.gguf");
    let from_whole = dir.path().join("from-whole.gguf");
    quantize_model(&shards[0], &from_split, &opts("Q8_0", 2), &NoProgress).unwrap();
    quantize_model(
        &common::smollm2(),
        &from_whole,
        &opts("Q8_0", 2),
        &NoProgress,
    )
    .unwrap();
    assert!(std::fs::read(&from_split).unwrap() == std::fs::read(&from_whole).unwrap());

    // A missing shard is a clear error naming it.
    std::fs::remove_file(&shards[2]).unwrap();
    let err = GgufModel::open(&shards[0]).err().unwrap().to_string();
    assert!(err.contains("smol-00003-of-00003.gguf"), "{err}");
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn bad_requests_fail_cleanly_and_leave_no_output() {
    let dir = common::tempdir();
    let out = dir.path().join("out.gguf");
    // A type that needs an importance matrix.
    let err = quantize_model(&common::smollm2(), &out, &opts("IQ2_XXS", 2), &NoProgress)
        .err()
        .unwrap();
    let err = common::chain(&err);
    assert!(
        err.contains("importance matrix") && err.contains("SmolLM2"),
        "{err}"
    );
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );

    // Writing onto the input.
    let copy = dir.path().join("in.gguf");
    std::fs::copy(common::smollm2(), &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    let err = quantize_model(&copy, &copy, &opts("Q8_0", 2), &NoProgress)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert!(std::fs::read(&copy).unwrap() == before);

    // NaN weights: named tensor and element, no partial output, no temporary file.
    let nan_model = dir.path().join("nan.gguf");
    let mut md = Metadata::new();
    md.set("general.architecture", Value::String("llama".into()));
    let specs = [TensorSpec {
        name: "blk.0.ffn_up.weight".into(),
        shape: vec![64, 4],
        ty: GgmlType::F32,
    }];
    let mut values = vec![0.5f32; 256];
    values[77] = f32::NAN;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut w = GgufWriter::create(&nan_model, 3, &md, &specs, &[]).unwrap();
    w.write_tensor(&bytes).unwrap();
    w.finish().unwrap();
    let err = quantize_model(&nan_model, &out, &opts("Q8_0", 2), &NoProgress)
        .err()
        .unwrap();
    let err = common::chain(&err);
    assert!(
        err.contains("blk.0.ffn_up.weight") && err.contains("element 77"),
        "{err}"
    );
    assert!(!out.exists());
    let mut left = leftovers(dir.path());
    left.sort();
    assert_eq!(left, ["in.gguf", "nan.gguf"]);
}
