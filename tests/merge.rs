//! `merge` end to end on the real fixtures: experts made by perturbing the real base with
//! realistic deltas, merged with every method, read back by gguf-py and evaluated by llama.cpp.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::experts::{llama_logits, make_expert};
use ggmerge::format::gguf::GgufModel;
use ggmerge::format::GgmlType;
use ggmerge::merge::config::{ConfigSource, MergeConfig, Method, ModelEntry, ParamValue, Params};
use ggmerge::{merge_models, MergeOptions, NoProgress};

/// Two SmolLM2 experts at F16 (every weight matrix perturbed by 1e-3·rms noise, different
/// seeds), made once per test run.
fn smol_experts() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static E: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    E.get_or_init(|| {
        let dir = common::shared_tempdir();
        let a = dir.path().join("math.f16.gguf");
        let b = dir.path().join("code.f16.gguf");
        make_expert(&common::smollm2(), &a, 1, 1e-3, GgmlType::F16, &[]);
        make_expert(&common::smollm2(), &b, 2, 1e-3, GgmlType::F16, &[]);
        (dir, a, b)
    })
}

fn config(method: Method, base: &Path, models: &[(&Path, f64, f64)]) -> MergeConfig {
    let mut cfg = MergeConfig::new(method, ConfigSource::Cli);
    cfg.base_model = Some(base.display().to_string());
    cfg.models = models
        .iter()
        .map(|(p, w, d)| {
            let mut parameters = Params::default();
            // The config refuses parameters a method does not read.
            if method.param_names().contains(&"weight") {
                parameters.set("weight", ParamValue::Number(*w));
            }
            if method.param_names().contains(&"density") {
                parameters.set("density", ParamValue::Number(*d));
            }
            ModelEntry {
                model: p.display().to_string(),
                parameters,
            }
        })
        .collect();
    cfg.seed = Some(7);
    cfg
}

fn opts(out: &Path, threads: usize) -> MergeOptions {
    MergeOptions {
        output: out.to_path_buf(),
        threads: Some(threads),
        ..Default::default()
    }
}

#[test]
fn weight_zero_reproduces_the_base_exactly() {
    let (_d, a, b) = smol_experts();
    let dir = common::tempdir();
    let out = dir.path().join("zero.gguf");
    let cfg = config(
        Method::TaskArithmetic,
        &common::smollm2(),
        &[(a, 0.0, 1.0), (b, 0.0, 1.0)],
    );
    let report = merge_models(&cfg, &opts(&out, 2), &NoProgress).unwrap();
    assert!(report.merged > 200, "{report:?}");
    let base = GgufModel::open(common::smollm2()).unwrap();
    let merged = GgufModel::open(&out).unwrap();
    for (x, y) in base.tensors().zip(merged.tensors()) {
        assert_eq!(x.info.ty, y.info.ty);
        assert!(x.data == y.data, "{} differs", x.info.name);
    }
}

#[test]
fn dare_ties_on_smollm2_loads_in_llama_cpp_and_is_thread_independent() {
    let (_d, a, b) = smol_experts();
    let dir = common::tempdir();
    let one = dir.path().join("t1.gguf");
    let two = dir.path().join("t2.gguf");
    let cfg = config(
        Method::DareTies,
        &common::smollm2(),
        &[(a, 0.5, 0.1), (b, 0.5, 0.1)],
    );
    let r1 = merge_models(&cfg, &opts(&one, 1), &NoProgress).unwrap();
    merge_models(&cfg, &opts(&two, 2), &NoProgress).unwrap();
    assert!(std::fs::read(&one).unwrap() == std::fs::read(&two).unwrap());
    // 1-D norms are unchanged in the experts: copied verbatim.
    assert_eq!(r1.copied, 61);
    for m in &r1.models {
        assert!((m.kept_share - 0.1).abs() < 0.01, "{m:?}");
    }
    assert_eq!(r1.retention.len(), 2, "{:?}", r1.retention); // Q4_1 and Q8_0 outputs
    let logits = llama_logits(&one);
    assert!(logits.iter().all(|v| v.is_finite()));
    // The merge changed the model, but not into something else entirely.
    let base = llama_logits(&common::smollm2());
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .unwrap()
            .0
    };
    assert_ne!(logits, base);
    assert_eq!(argmax(&logits), argmax(&base));
}

#[test]
fn every_method_merges_and_ties_family_is_thread_independent() {
    let (_d, a, b) = smol_experts();
    let dir = common::tempdir();
    for method in [
        Method::Linear,
        Method::TaskArithmetic,
        Method::Ties,
        Method::DareLinear,
        Method::Breadcrumbs,
        Method::BreadcrumbsTies,
        Method::Della,
        Method::DellaLinear,
    ] {
        let mut cfg = config(method, &common::smollm2(), &[(a, 0.5, 0.3), (b, 0.5, 0.3)]);
        if method == Method::Linear {
            // Linear has no base: the first model is the reference for metadata and types.
            cfg.base_model = None;
        }
        if method == Method::Della || method == Method::DellaLinear {
            cfg.parameters.set("epsilon", ParamValue::Number(0.1));
        }
        let o1 = dir.path().join(format!("{}-1.gguf", method.name()));
        let o2 = dir.path().join(format!("{}-2.gguf", method.name()));
        let r = merge_models(&cfg, &opts(&o1, 2), &NoProgress).unwrap();
        // Methods with whole-tensor statistics (rank cuts) or per-row randomness: 2 threads
        // must give the same bytes as 1.
        if matches!(method, Method::Ties | Method::Breadcrumbs | Method::Della) {
            merge_models(&cfg, &opts(&o2, 1), &NoProgress).unwrap();
            assert!(
                std::fs::read(&o1).unwrap() == std::fs::read(&o2).unwrap(),
                "{}",
                method.name()
            );
            std::fs::remove_file(&o2).unwrap();
        }
        if matches!(
            method,
            Method::Ties | Method::Breadcrumbs | Method::BreadcrumbsTies
        ) {
            // Exact top-k: 30% of every tensor's delta kept (ties resolved by index).
            for m in &r.models {
                assert!(
                    (m.kept_share - 0.3).abs() < 0.002,
                    "{} {m:?}",
                    method.name()
                );
            }
        }
        let logits = llama_logits(&o1);
        assert!(logits.iter().all(|v| v.is_finite()), "{}", method.name());
        std::fs::remove_file(&o1).unwrap();
    }
    // SLERP: base and one model.
    let mut cfg = config(Method::Slerp, &common::smollm2(), &[(a, 1.0, 1.0)]);
    cfg.parameters.set("t", ParamValue::Number(0.5));
    let o = dir.path().join("slerp.gguf");
    merge_models(&cfg, &opts(&o, 2), &NoProgress).unwrap();
    assert!(llama_logits(&o).iter().all(|v| v.is_finite()));
}

#[test]
fn gemma3_q4_k_m_base_with_q8_0_experts_to_q4_k_m() {
    let dir = common::tempdir();
    let a = dir.path().join("a.q8.gguf");
    let b = dir.path().join("b.q8.gguf");
    // Perturb only the attention and FFN of a few layers, to keep the test quick; the rest of
    // each expert is the base requantized to Q8_0 (and so differs from the base by noise).
    make_expert(
        &common::gemma3(),
        &a,
        3,
        1e-3,
        GgmlType::Q8_0,
        &["blk.0.", "blk.1."],
    );
    make_expert(
        &common::gemma3(),
        &b,
        4,
        1e-3,
        GgmlType::Q8_0,
        &["blk.2.", "blk.3."],
    );
    let out = dir.path().join("merged.gguf");
    let cfg = config(
        Method::DareTies,
        &common::gemma3(),
        &[(&a, 0.5, 0.1), (&b, 0.5, 0.1)],
    );
    let mut o = opts(&out, 2);
    o.out_type = Some("Q4_K_M".into());
    let report = merge_models(&cfg, &o, &NoProgress).unwrap();
    // Quantized inputs: the noise report is there for both experts.
    for m in &report.models {
        assert!(m.signal_to_noise.is_some(), "{m:?}");
    }
    let merged = GgufModel::open(&out).unwrap();
    let base = GgufModel::open(common::gemma3()).unwrap();
    for (x, y) in base.tensors().zip(merged.tensors()) {
        assert_eq!(
            x.info.ty, y.info.ty,
            "{}: Q4_K_M plan of the base",
            x.info.name
        );
    }
    assert!(llama_logits(&out).iter().all(|v| v.is_finite()));
}

#[test]
fn bad_inputs_are_clear_errors_without_output() {
    let (_d, a, _b) = smol_experts();
    let dir = common::tempdir();
    let out = dir.path().join("out.gguf");
    let check = |cfg: MergeConfig, needle: &str| {
        let err = merge_models(&cfg, &opts(&out, 2), &NoProgress).expect_err("must fail");
        let err = common::chain(&err);
        assert!(err.contains(needle), "{needle:?} not in {err}");
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "output left behind"
        );
    };
    // Mismatched architecture.
    check(
        config(
            Method::DareTies,
            &common::smollm2(),
            &[(&common::gemma3(), 1.0, 0.5)],
        ),
        "architecture",
    );
    // Missing base.
    let mut cfg = config(Method::DareTies, &common::smollm2(), &[(a, 1.0, 0.5)]);
    cfg.base_model = None;
    check(cfg, "base");
    // Density outside (0, 1].
    check(
        config(Method::DareTies, &common::smollm2(), &[(a, 1.0, 1.5)]),
        "density",
    );
    // NaN in a model's tensor: named file, tensor and element; no output left.
    let nan = dir.path().join("nan.gguf");
    {
        use ggmerge::format::gguf::{GgufWriter, TensorSpec};
        let m = GgufModel::open(a).unwrap();
        let specs: Vec<TensorSpec> = m
            .tensors()
            .map(|t| TensorSpec {
                name: t.info.name.clone(),
                shape: t.info.shape.clone(),
                ty: t.info.ty,
            })
            .collect();
        let mut w = GgufWriter::create(&nan, 3, m.metadata(), &specs, &[a.as_path()]).unwrap();
        for t in m.tensors() {
            let mut bytes = t.data.to_vec();
            if t.info.name == "blk.3.ffn_up.weight" {
                // Element 700000: chunk 21, piece 44 of it, index 96 in the piece.
                bytes[1_400_000..1_400_002].copy_from_slice(&half::f16::NAN.to_le_bytes());
            }
            w.write_tensor(&bytes).unwrap();
        }
        w.finish().unwrap();
    }
    let err = merge_models(
        &config(Method::DareTies, &common::smollm2(), &[(&nan, 1.0, 0.5)]),
        &opts(&out, 2),
        &NoProgress,
    )
    .expect_err("NaN must fail");
    let err = common::chain(&err);
    assert!(
        err.contains("nan.gguf")
            && err.contains("blk.3.ffn_up.weight")
            && err.contains("element 700000"),
        "{err}"
    );
    std::fs::remove_file(&nan).unwrap();
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "output left behind"
    );
    // A model file that does not exist.
    check(
        config(
            Method::DareTies,
            &common::smollm2(),
            &[(Path::new("/nonexistent/x.gguf"), 1.0, 0.5)],
        ),
        "x.gguf",
    );
}

fn to_safetensors(input: &Path, out: &Path, ty: GgmlType) {
    let opts = ggmerge::ConvertOptions {
        out_type: Some(ty),
        ..Default::default()
    };
    ggmerge::convert_model(input, out, &opts, &NoProgress).unwrap();
}

#[test]
fn gguf_base_with_a_safetensors_expert_equals_the_gguf_expert() {
    // GGUF → safetensors (F16, q/k rows un-permuted to HF order) → merged into the GGUF base:
    // the result must be byte-identical to merging the GGUF expert itself.
    let (_d, a, b) = smol_experts();
    let dir = common::tempdir();
    let a_st = dir.path().join("math-hf");
    to_safetensors(a, &a_st, GgmlType::F16);
    let via_gguf = dir.path().join("via-gguf.gguf");
    let via_st = dir.path().join("via-st.gguf");
    merge_models(
        &config(
            Method::DareTies,
            &common::smollm2(),
            &[(a, 0.6, 0.2), (b, 0.4, 0.2)],
        ),
        &opts(&via_gguf, 2),
        &NoProgress,
    )
    .unwrap();
    merge_models(
        &config(
            Method::DareTies,
            &common::smollm2(),
            &[(&a_st, 0.6, 0.2), (b, 0.4, 0.2)],
        ),
        &opts(&via_st, 2),
        &NoProgress,
    )
    .unwrap();
    assert!(std::fs::read(&via_gguf).unwrap() == std::fs::read(&via_st).unwrap());
}

#[test]
fn safetensors_to_safetensors_merge_matches_the_gguf_route() {
    use ggmerge::format::safetensors::SafetensorsModel;
    use ggmerge::format::source::ModelSource;
    let (_d, a, b) = smol_experts();
    let dir = common::tempdir();
    let base_st = dir.path().join("base-hf");
    let a_st = dir.path().join("a-hf");
    let b_st = dir.path().join("b-hf");
    to_safetensors(&common::smollm2(), &base_st, GgmlType::F32);
    to_safetensors(a, &a_st, GgmlType::F16);
    to_safetensors(b, &b_st, GgmlType::F16);
    // safetensors in, safetensors out (HF names, F32).
    let out_st = dir.path().join("merged-hf");
    let mut o = opts(&out_st, 2);
    o.format = Some(ggmerge::format::output::FileFormat::Safetensors);
    o.out_type = Some("F32".into());
    merge_models(
        &config(
            Method::DareTies,
            &base_st,
            &[(&a_st, 0.5, 0.3), (&b_st, 0.5, 0.3)],
        ),
        &o,
        &NoProgress,
    )
    .unwrap();
    // The same merge through GGUF with F32 output.
    let out_gguf = dir.path().join("merged.gguf");
    let mut o = opts(&out_gguf, 2);
    o.out_type = Some("F32".into());
    merge_models(
        &config(
            Method::DareTies,
            &common::smollm2(),
            &[(a, 0.5, 0.3), (b, 0.5, 0.3)],
        ),
        &o,
        &NoProgress,
    )
    .unwrap();
    let st = SafetensorsModel::open(&out_st).unwrap();
    let gg = GgufModel::open(&out_gguf).unwrap();
    assert_eq!(ModelSource::tensor_names(&st).len(), gg.n_tensors());
    for t in gg.tensors() {
        let s = ModelSource::tensor(&st, &t.info.name).unwrap().unwrap();
        assert_eq!(s.ty, GgmlType::F32, "{}", t.info.name);
        assert!(s.data.as_ref() == t.data, "{} differs", t.info.name);
    }
}

#[test]
fn mergekit_yaml_and_short_form_cli() {
    let (_d, a, b) = smol_experts();
    let dir = common::tempdir();
    let bin = env!("CARGO_BIN_EXE_ggmerge");
    let yaml = dir.path().join("merge.yml");
    std::fs::write(
        &yaml,
        format!(
            "merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\n    parameters:\n      weight: 0.5\n      density: [0.1, 0.3]\n  - model: {b}\n    parameters:\n      weight:\n        - filter: attn\n          value: 0.3\n        - value: 0.5\n      density: 0.2\nparameters:\n  normalize: false\ndtype: float16\ntokenizer_source: base\n",
            base = common::smollm2().display(),
            a = a.display(),
            b = b.display()
        ),
    )
    .unwrap();
    let out_yaml = dir.path().join("yaml.gguf");
    let o = std::process::Command::new(bin)
        .args([
            "merge",
            yaml.to_str().unwrap(),
            "-o",
            out_yaml.to_str().unwrap(),
            "--seed",
            "3",
            "-t",
            "2",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("merged") && s.contains("retention"), "{s}");
    // dtype: float16 → every weight matrix F16.
    let m = GgufModel::open(&out_yaml).unwrap();
    assert_eq!(
        m.tensor_by_name("blk.0.attn_q.weight").unwrap().info.ty,
        GgmlType::F16
    );

    // Short form: per-model options follow their --model; --dry-run writes nothing.
    let out_cli = dir.path().join("cli.gguf");
    let base = common::smollm2();
    let args = [
        "merge",
        "--base",
        base.to_str().unwrap(),
        "--model",
        a.to_str().unwrap(),
        "--weight",
        "0.7",
        "--density",
        "0.1",
        "--model",
        b.to_str().unwrap(),
        "--weight",
        "0.3",
        "--density",
        "0.5",
        "--method",
        "dare_linear",
        "-o",
        out_cli.to_str().unwrap(),
        "--dry-run",
    ];
    let o = std::process::Command::new(bin).args(args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("0.7/0.1 0.3/0.5"), "{s}");
    assert!(
        s.contains("estimated output size") && s.contains("estimated peak memory"),
        "{s}"
    );
    assert!(!out_cli.exists());

    // Unsupported mergekit keys are named.
    std::fs::write(&yaml, "merge_method: ties\nslices:\n  - sources: []\n").unwrap();
    let o = std::process::Command::new(bin)
        .args([
            "merge",
            yaml.to_str().unwrap(),
            "-o",
            out_cli.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("slices"));
}

/// A general English text of ~230 tokens, for perplexity at a context of 64 (three chunks).
const PPL_TEXT: &str = "The history of the city begins with a small settlement on the river. Over \
the centuries, merchants built warehouses along the banks, and the town grew into a busy port. \
Bridges were added, then a cathedral, a university and wide avenues lined with trees. Today the \
city is known for its museums, its food markets and its music, and visitors come from all over \
the world to walk its streets, to sit in its cafes and to watch the boats on the river at sunset. \
In winter the squares fill with lights and small stalls selling warm drinks, and in summer the \
parks are crowded with families, students and musicians playing for passers-by. The first \
printing presses in Europe were built in the fifteenth century, and within fifty years books \
were printed in more than two hundred cities. The price of books fell sharply, and the number of \
people who could afford to own them grew just as quickly. Scholars were able to compare \
identical copies of a text, which made it easier to correct errors and to build on the work of \
others. Pamphlets and broadsheets carried news, advertisements and political arguments to \
readers who had never held a manuscript.";

/// Perplexity of [`PPL_TEXT`] under llama.cpp with the model at `path` (context 64).
fn perplexity(path: &Path) -> f64 {
    use ggmerge::runtime::{Model, ModelOptions, SessionOptions};
    let model = Model::load(path, &ModelOptions::default()).unwrap();
    let mut s = model
        .session(&SessionOptions {
            n_ctx: 64,
            n_batch: 64,
            threads: Some(2),
            ..Default::default()
        })
        .unwrap();
    s.perplexity(PPL_TEXT, &NoProgress).unwrap().ppl
}

/// Merges `cfg` with `requant` on `threads` threads into `out`; checks what the report says
/// about the grid (every merged tensor on it, blocks counted) and returns it.
fn grid_merge(
    cfg: &MergeConfig,
    out: &Path,
    requant: ggmerge::quant::Requant,
    threads: usize,
) -> ggmerge::flows::merge::MergeReport {
    let o = MergeOptions {
        requant: Some(requant),
        ..opts(out, threads)
    };
    let r = merge_models(cfg, &o, &NoProgress).unwrap();
    assert_eq!(r.requant, requant);
    let g = r.grid.clone().expect("grid report");
    // Every type these fixtures merge (Q4_1, Q8_0; Q4_K, Q6_K, Q5_0) has a grid.
    assert_eq!(g.tensors, r.merged, "{g:?}");
    assert!(
        g.full_types.is_empty() && g.other_type_tensors == 0,
        "{g:?}"
    );
    assert!(g.blocks.moved > 0, "{g:?}");
    r
}

/// A quantized merge measured against the exact merge (the same merge written as F32), over
/// the tensors the merge changed (exact ≠ base somewhere).
#[derive(Debug, Default)]
struct Against {
    /// Changed tensors.
    tensors: usize,
    /// Blocks of the changed tensors byte-identical to the base's.
    same_blocks: u64,
    /// Σ (q(merged) − exact)²: the requantization error.
    sq_err: f64,
    /// Σ Δ² with Δ = exact − base: the merged delta.
    sq_delta: f64,
    /// Σ (q(merged) − base) · Δ.
    dot: f64,
    /// Elements the merge left unchanged (Δ = 0) …
    unchanged: u64,
    /// … whose decoded value is not the base's any more.
    unchanged_moved: u64,
}

impl Against {
    /// ⟨q(merged) − base, Δ⟩ / ⟨Δ, Δ⟩, as the report computes it.
    fn retention(&self) -> f64 {
        self.dot / self.sq_delta
    }
    /// RMS error of the merged weights relative to the merged delta's RMS.
    fn rel_err(&self) -> f64 {
        (self.sq_err / self.sq_delta).sqrt()
    }
}

/// Measures `out` (the base's types) against `exact` (the same merge at F32) and `base`.
/// Tensors the merge did not change must be the base's bytes.
fn against_exact(base: &Path, exact: &Path, out: &Path) -> Against {
    let deq = |t: &ggmerge::format::gguf::TensorRef<'_>| {
        let mut v = vec![0f32; t.info.n_elements() as usize];
        ggmerge::quant::dequantize(t.info.ty, t.data, &mut v, &t.info.name).unwrap();
        v
    };
    let (base, exact, out) = (
        GgufModel::open(base).unwrap(),
        GgufModel::open(exact).unwrap(),
        GgufModel::open(out).unwrap(),
    );
    let mut a = Against::default();
    for ((b, x), y) in base.tensors().zip(exact.tensors()).zip(out.tensors()) {
        assert_eq!(b.info.ty, y.info.ty, "{}", b.info.name);
        let (vb, vx) = (deq(&b), deq(&x));
        if vb == vx {
            assert!(
                b.data == y.data,
                "{}: unchanged, not the base's bytes",
                b.info.name
            );
            continue;
        }
        a.tensors += 1;
        let bytes = b.info.ty.type_size() as usize;
        a.same_blocks += b
            .data
            .chunks_exact(bytes)
            .zip(y.data.chunks_exact(bytes))
            .filter(|(p, q)| p == q)
            .count() as u64;
        for ((&vb, &vx), vy) in vb.iter().zip(&vx).zip(deq(&y)) {
            let d = f64::from(vx - vb);
            a.sq_err += f64::from(vy - vx).powi(2);
            a.sq_delta += d * d;
            a.dot += f64::from(vy - vb) * d;
            if vx == vb {
                a.unchanged += 1;
                a.unchanged_moved += u64::from(vy != vb);
            }
        }
    }
    a
}

/// Retention on the grid: stochastic rounding keeps the delta in expectation, over millions of
/// elements within a few percent (measured 0.99–1.00); nearest rounding loses what is below
/// half a step. The report (per type, weighted by tensor) says the same within a few percent.
fn check_retention(
    requant: ggmerge::quant::Requant,
    m: &Against,
    r: &ggmerge::flows::merge::MergeReport,
) {
    let n: usize = r.retention.iter().map(|t| t.tensors).sum();
    let reported = r
        .retention
        .iter()
        .map(|t| t.retention * t.tensors as f64)
        .sum::<f64>()
        / n as f64;
    if requant == ggmerge::quant::Requant::GridStochastic {
        assert!((m.retention() - 1.0).abs() < 0.05, "{m:?}");
        assert!((reported - 1.0).abs() < 0.05, "{reported}");
    } else {
        assert!(m.retention() < 0.9, "{m:?}");
    }
}

#[test]
fn grid_merges_of_smollm2_keep_untouched_weights_load_in_llama_cpp_and_are_thread_independent() {
    use ggmerge::quant::Requant;
    let (_d, a, b) = smol_experts();
    let dir = common::tempdir();
    let base = common::smollm2();
    // DARE at density 0.1: 90% of the delta elements are zero, the rest rescaled ×10 (still
    // ~1/30 of a Q4_1 step: the experts' deltas are 1e-3 of each tensor's RMS).
    let cfg = config(Method::DareTies, &base, &[(a, 0.5, 0.1), (b, 0.5, 0.1)]);
    let base_ppl = perplexity(&base);
    let base_logits = llama_logits(&base);
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .unwrap()
            .0
    };
    let exact = dir.path().join("exact.gguf");
    let o = MergeOptions {
        out_type: Some("F32".into()),
        ..opts(&exact, 2)
    };
    merge_models(&cfg, &o, &NoProgress).unwrap();
    let full = dir.path().join("full.gguf");
    let full_opts = MergeOptions {
        requant: Some(Requant::Full),
        ..opts(&full, 2)
    };
    let r = merge_models(&cfg, &full_opts, &NoProgress).unwrap();
    assert_eq!(r.requant, Requant::Full);
    assert!(r.grid.is_none());
    let vs_full = against_exact(&base, &exact, &full);
    // Full requantization rounds weights the merge left alone again (a fifth of them, measured)
    // and rounds most of the small delta away.
    assert!(
        vs_full.unchanged_moved * 10 > vs_full.unchanged,
        "{vs_full:?}"
    );
    assert!(vs_full.retention() < 0.5, "{vs_full:?}");
    for requant in [Requant::Grid, Requant::GridStochastic] {
        let one = dir.path().join(format!("{requant}-1.gguf"));
        let two = dir.path().join(format!("{requant}-2.gguf"));
        let r = grid_merge(&cfg, &one, requant, 1);
        grid_merge(&cfg, &two, requant, 2);
        let bytes = std::fs::read(&one).unwrap();
        assert!(bytes == std::fs::read(&two).unwrap(), "{requant}: threads");
        std::fs::remove_file(&two).unwrap();
        assert!(
            bytes != std::fs::read(&full).unwrap(),
            "{requant}: same as full"
        );
        drop(bytes);
        let g = r.grid.clone().unwrap();
        let m = against_exact(&base, &exact, &one);
        assert_eq!(m.tensors, g.tensors, "{requant}");
        // Blocks with no change keep the base's bytes (others may too, by chance); elements
        // the merge left alone keep their values except in blocks requantized in full.
        assert!(
            m.same_blocks >= g.blocks.kept && g.blocks.kept > 0,
            "{requant}: {g:?} {m:?}"
        );
        assert!(
            m.unchanged_moved <= 32 * g.blocks.fallback,
            "{requant}: {g:?} {m:?}"
        );
        assert!(
            m.unchanged_moved * 50 < vs_full.unchanged_moved,
            "{requant}: {m:?}"
        );
        check_retention(requant, &m, &r);
        if requant == Requant::Grid {
            // Measured: 0.99 of the delta's RMS against full's 1.22.
            assert!(m.rel_err() < 0.9 * vs_full.rel_err(), "{m:?} {vs_full:?}");
        }
        // Loaded by llama.cpp; a small delta leaves its next-token choice and perplexity.
        let logits = llama_logits(&one);
        assert!(logits.iter().all(|v| v.is_finite()), "{requant}");
        assert_ne!(logits, base_logits);
        assert_eq!(argmax(&logits), argmax(&base_logits), "{requant}");
        let ppl = perplexity(&one);
        assert!(
            ppl.is_finite() && (ppl / base_ppl - 1.0).abs() < 0.1,
            "{requant}: perplexity {ppl} against the base's {base_ppl}"
        );
    }
}

#[test]
fn grid_merges_of_gemma3_q4_k_m_keep_its_types_and_untouched_weights_load_and_evaluate() {
    use ggmerge::quant::Requant;
    let dir = common::tempdir();
    let a = dir.path().join("a.q8.gguf");
    let b = dir.path().join("b.q8.gguf");
    // Real K-quant blocks (Q4_K, Q6_K) and Q5_0/Q8_0: every type of the mixture on the grid.
    make_expert(
        &common::gemma3(),
        &a,
        3,
        2e-2,
        GgmlType::Q8_0,
        &["blk.0.", "blk.1."],
    );
    make_expert(
        &common::gemma3(),
        &b,
        4,
        2e-2,
        GgmlType::Q8_0,
        &["blk.2.", "blk.3."],
    );
    let base = common::gemma3();
    let cfg = config(Method::DareTies, &base, &[(&a, 0.5, 0.1), (&b, 0.5, 0.1)]);
    let base_ppl = perplexity(&base);
    let exact = dir.path().join("exact.gguf");
    let o = MergeOptions {
        out_type: Some("F32".into()),
        ..opts(&exact, 2)
    };
    merge_models(&cfg, &o, &NoProgress).unwrap();
    let full = dir.path().join("full.gguf");
    let full_opts = MergeOptions {
        requant: Some(Requant::Full),
        ..opts(&full, 2)
    };
    merge_models(&cfg, &full_opts, &NoProgress).unwrap();
    let vs_full = against_exact(&base, &exact, &full);
    // ggml's K-quant scale search moves a third of the weights the merge left alone.
    assert!(
        vs_full.unchanged_moved * 10 > vs_full.unchanged,
        "{vs_full:?}"
    );
    std::fs::remove_file(&full).unwrap();
    for requant in [Requant::Grid, Requant::GridStochastic] {
        let out = dir.path().join(format!("{requant}.gguf"));
        let r = grid_merge(&cfg, &out, requant, 2);
        let g = r.grid.clone().unwrap();
        let types: Vec<&str> = r.retention.iter().map(|t| t.ty.as_str()).collect();
        for ty in ["Q4_K", "Q6_K", "Q5_0", "Q8_0"] {
            assert!(types.contains(&ty), "{ty} not merged: {types:?}");
        }
        let m = against_exact(&base, &exact, &out);
        assert_eq!(m.tensors, g.tensors, "{requant}");
        // Hardly a 256-element block escapes a 10% mask: kept blocks are rare here, but
        // untouched weights move only in the blocks requantized in full (1.5%, measured).
        assert!(m.same_blocks >= g.blocks.kept, "{requant}: {g:?} {m:?}");
        assert!(
            m.unchanged_moved <= 256 * g.blocks.fallback,
            "{requant}: {g:?} {m:?}"
        );
        assert!(
            m.unchanged_moved * 10 < vs_full.unchanged_moved,
            "{requant}: {m:?}"
        );
        check_retention(requant, &m, &r);
        if requant == Requant::Grid {
            // Measured: 0.700 of the delta's RMS against full's 0.720.
            assert!(m.rel_err() < vs_full.rel_err(), "{m:?} {vs_full:?}");
        }
        assert!(
            llama_logits(&out).iter().all(|v| v.is_finite()),
            "{requant}"
        );
        let ppl = perplexity(&out);
        assert!(
            ppl.is_finite() && ppl < 2.0 * base_ppl,
            "{requant}: perplexity {ppl} against the base's {base_ppl}"
        );
        std::fs::remove_file(&out).unwrap();
    }
}
#[test]
fn out_of_range_blocks_are_counted_in_the_cli_summary() {
    // A large delta (rescaled ×10 by DARE) pushes some values past their block's range: those
    // blocks are requantized in full, and the summary says how many.
    let (_d, a, _b) = smol_experts();
    let dir = common::tempdir();
    let out = dir.path().join("big.gguf");
    let base = common::smollm2();
    #[rustfmt::skip]
    let o = common::ggmerge(&["merge", "--base", common::s(&base), "--method", "dare_linear",
        "--model", common::s(a), "--weight", "30", "--density", "0.1", "--requant", "grid",
        "-t", "2", "-q", "-o", common::s(&out)]);
    assert!(o.status.success(), "{}", common::text(&o.stderr));
    let s = common::text(&o.stdout);
    let line = s
        .lines()
        .find(|l| l.contains("requant:"))
        .unwrap_or_default();
    let fallback: u64 = line
        .split(" moved, ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line:?}"));
    assert!(
        fallback > 0 && line.contains("out of the grid's range"),
        "{s}"
    );
}
