//! Delta packs on the real SmolLM2 fixture: extract → apply reproduces `merge` byte for byte,
//! pack sizes match the format, density 1 reproduces the fine-tune, and wrong bases are refused.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::experts::make_expert;
use ggmerge::flows::extract::{extract_delta, ExtractOptions};
use ggmerge::format::gguf::GgufModel;
use ggmerge::format::GgmlType;
use ggmerge::merge::config::{ConfigSource, MergeConfig, Method, ModelEntry, ParamValue};
use ggmerge::merge::method::Sparsifier;
use ggmerge::quant::Requant;
use ggmerge::{merge_models, MergeOptions, NoProgress};

fn experts() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static E: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    E.get_or_init(|| {
        let dir = common::shared_tempdir();
        let a = dir.path().join("math.f16.gguf");
        let b = dir.path().join("code.f16.gguf");
        make_expert(&common::smollm2(), &a, 11, 2e-2, GgmlType::F16, &[]);
        make_expert(&common::smollm2(), &b, 12, 2e-2, GgmlType::F16, &[]);
        (dir, a, b)
    })
}

fn merge_cfg(method: Method, models: &[(&Path, f64, Option<f64>)]) -> MergeConfig {
    let mut cfg = MergeConfig::new(method, ConfigSource::Cli);
    cfg.base_model = Some(common::smollm2().display().to_string());
    for (p, w, d) in models {
        let mut e = ModelEntry::new(p.display().to_string());
        e.parameters.set("weight", ParamValue::Number(*w));
        if let Some(d) = d {
            e.parameters.set("density", ParamValue::Number(*d));
        }
        cfg.models.push(e);
    }
    cfg.seed = Some(7);
    cfg
}

fn opts(out: &Path) -> MergeOptions {
    MergeOptions {
        output: out.to_path_buf(),
        threads: Some(2),
        ..Default::default()
    }
}

fn extract(
    ft: &Path,
    out: &Path,
    density: f64,
    values: GgmlType,
    stream: u32,
) -> ggmerge::flows::extract::ExtractReport {
    let o = ExtractOptions {
        density,
        values,
        seed: 7,
        stream,
        ..Default::default()
    };
    extract_delta(&common::smollm2(), ft, out, &o, &NoProgress).unwrap()
}

#[test]
fn apply_of_dare_packs_is_byte_identical_to_merge() {
    let (_d, a, b) = experts();
    let dir = common::tempdir();
    let pa = dir.path().join("a.dpk.gguf");
    let pb = dir.path().join("b.dpk.gguf");
    extract(a, &pa, 0.1, GgmlType::F32, 0);
    extract(b, &pb, 0.1, GgmlType::F32, 1);
    let mut outputs = Vec::new();
    for requant in Requant::ALL {
        for method in [Method::DareTies, Method::DareLinear] {
            let merged = dir.path().join("merged.gguf");
            let applied = dir.path().join("applied.gguf");
            let o = |out: &Path| MergeOptions {
                requant: Some(requant),
                ..opts(out)
            };
            let r = merge_models(
                &merge_cfg(method, &[(a, 0.6, Some(0.1)), (b, 0.4, Some(0.1))]),
                &o(&merged),
                &NoProgress,
            )
            .unwrap();
            assert_eq!(r.requant, requant);
            merge_models(
                &merge_cfg(method, &[(&pa, 0.6, None), (&pb, 0.4, None)]),
                &o(&applied),
                &NoProgress,
            )
            .unwrap();
            let bytes = std::fs::read(&merged).unwrap();
            assert!(
                bytes == std::fs::read(&applied).unwrap(),
                "{} {requant}",
                method.name()
            );
            outputs.push(bytes);
        }
    }
    // The modes give different files (the test compares three different things).
    assert!(outputs[0] != outputs[2] && outputs[2] != outputs[4] && outputs[0] != outputs[4]);
    // Through the command line: apply's --seed is the merge's, for stochastic rounding, and
    // the thread count does not matter.
    let cli = |args: &[&str], threads: &str, out: &Path| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend([
            "--requant",
            "grid-stochastic",
            "--seed",
            "7",
            "-t",
            threads,
            "-q",
            "-o",
            common::s(out),
        ]);
        let o = common::ggmerge(&all);
        assert!(o.status.success(), "{}", common::text(&o.stderr));
        common::text(&o.stdout)
    };
    let base = common::smollm2();
    let (merged, applied) = (dir.path().join("m.gguf"), dir.path().join("p.gguf"));
    #[rustfmt::skip]
    let summary = cli(&["merge", "--base", common::s(&base), "--method", "dare_ties",
        "--model", common::s(a), "--weight", "0.6", "--density", "0.1",
        "--model", common::s(b), "--weight", "0.4", "--density", "0.1"], "2", &merged);
    assert!(summary.contains("requant:    grid-stochastic"), "{summary}");
    let pa_w = format!("{}:0.6", pa.display());
    let pb_w = format!("{}:0.4", pb.display());
    #[rustfmt::skip]
    cli(&["apply", "--base", common::s(&base), "--method", "dare_ties",
        "--expert", &pa_w, "--expert", &pb_w], "1", &applied);
    assert!(std::fs::read(&merged).unwrap() == std::fs::read(&applied).unwrap());
}

#[test]
fn pack_sizes_follow_the_format() {
    let (_d, a, _b) = experts();
    let dir = common::tempdir();
    for density in [0.1, 0.01] {
        let p = dir.path().join(format!("a-{density}.dpk.gguf"));
        let r = extract(a, &p, density, GgmlType::F16, 0);
        // F16 values: 2 bytes per kept element, kept ≈ density × changed elements.
        let expected = density * r.elements as f64 * 2.0;
        let size = std::fs::metadata(&p).unwrap().len() as f64;
        assert!(
            (size / expected - 1.0).abs() < 0.10,
            "density {density}: {size} vs {expected}"
        );
        assert_eq!(r.pack_bytes as f64, size);
        // `inspect` understands packs: fingerprint, density, kept counts per tensor.
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_ggmerge"))
            .args(["inspect", p.to_str().unwrap(), "--tensors"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.contains(&format!("dare at density {density}")),
            "{text}"
        );
        assert!(
            text.contains("fingerprint") && text.contains(&format!("{} kept values", r.kept)),
            "{text}"
        );
        assert!(text.contains("blk.0.ffn_up.weight"), "{text}");
    }
}

#[test]
fn density_one_pack_reproduces_the_finetune() {
    let (_d, a, _b) = experts();
    let dir = common::tempdir();
    let p = dir.path().join("a-full.dpk.gguf");
    extract(a, &p, 1.0, GgmlType::F32, 0);
    let out = dir.path().join("restored.gguf");
    let mut o = opts(&out);
    o.out_type = Some("F16".into());
    merge_models(
        &merge_cfg(Method::TaskArithmetic, &[(&p, 1.0, None)]),
        &o,
        &NoProgress,
    )
    .unwrap();
    let ft = GgufModel::open(a).unwrap();
    let restored = GgufModel::open(&out).unwrap();
    let (mut same, mut total) = (0u64, 0u64);
    for (x, y) in ft.tensors().zip(restored.tensors()) {
        assert_eq!(x.info.ty, y.info.ty, "{}", x.info.name);
        if x.info.ty != GgmlType::F16 {
            // 1-D norms are unchanged: copied.
            assert!(x.data == y.data, "{}", x.info.name);
            continue;
        }
        // f16 bits → an integer line on which adjacent floats are 1 apart (±0 equal).
        let ord = |b: &[u8]| {
            let x = u16::from_le_bytes([b[0], b[1]]);
            let m = i32::from(x & 0x7fff);
            if x & 0x8000 != 0 {
                -m
            } else {
                m
            }
        };
        for (u, v) in x.data.chunks_exact(2).zip(y.data.chunks_exact(2)) {
            let (u, v) = (ord(u), ord(v));
            assert!((u - v).abs() <= 1, "{}: more than 1 ulp apart", x.info.name);
            same += u64::from(u == v);
            total += 1;
        }
    }
    // base + (ft − base) rounds back to ft's F16 value almost always.
    assert!(same as f64 / total as f64 > 0.999, "{same}/{total}");
}

#[test]
fn wrong_base_and_bad_packs_are_refused() {
    let (_d, a, _b) = experts();
    let dir = common::tempdir();
    let p = dir.path().join("a.dpk.gguf");
    extract(a, &p, 0.1, GgmlType::Q8_0, 0);
    let out = dir.path().join("out.gguf");
    // Another base (Gemma 3): refused by fingerprint.
    let mut cfg = merge_cfg(Method::TaskArithmetic, &[(&p, 1.0, None)]);
    cfg.base_model = Some(common::gemma3().display().to_string());
    let err = merge_models(&cfg, &opts(&out), &NoProgress)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("another base") && err.contains("a.dpk.gguf"),
        "{err}"
    );
    assert!(!out.exists());
    // A truncated pack.
    let bytes = std::fs::read(&p).unwrap();
    let cut = dir.path().join("cut.dpk.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = merge_models(
        &merge_cfg(Method::TaskArithmetic, &[(&cut, 1.0, None)]),
        &opts(&out),
        &NoProgress,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("cut.dpk.gguf"), "{err}");
    assert!(!out.exists());
    // A pack with a delta for a tensor the base does not have.
    let extra = dir.path().join("extra.dpk.gguf");
    {
        use ggmerge::format::gguf::{Array, GgufWriter, TensorSpec, Value};
        let m = GgufModel::open(&p).unwrap();
        let mut md = m.metadata().clone();
        let Some(Value::Array(Array::U64(mut kept))) = md.get("delta.kept").cloned() else {
            panic!("kept counts")
        };
        kept.push(32);
        md.set("delta.kept", Value::Array(Array::U64(kept)));
        // Hand-made: without the checksum of the original (an unverified pack, as older
        // ggmerge wrote), so the structural check is what refuses it.
        md.remove("delta.checksum");
        let mut specs: Vec<TensorSpec> = m
            .tensors()
            .map(|t| TensorSpec {
                name: t.info.name.clone(),
                shape: t.info.shape.clone(),
                ty: t.info.ty,
            })
            .collect();
        specs.push(TensorSpec {
            name: "blk.99.ffn_up.weight.dv".into(),
            shape: vec![32],
            ty: GgmlType::Q8_0,
        });
        let mut w = GgufWriter::create(&extra, 3, &md, &specs, &[p.as_path()]).unwrap();
        for t in m.tensors() {
            w.write_tensor(t.data).unwrap();
        }
        w.write_tensor(&[0u8; 34]).unwrap();
        w.finish().unwrap();
    }
    let err = merge_models(
        &merge_cfg(Method::TaskArithmetic, &[(&extra, 1.0, None)]),
        &opts(&out),
        &NoProgress,
    )
    .expect_err("unknown tensor")
    .to_string();
    assert!(err.contains("blk.99.ffn_up.weight"), "{err}");
    assert!(!out.exists());
    // The CLI: weight that is not a number.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ggmerge"))
        .args([
            "apply",
            "--base",
            common::smollm2().to_str().unwrap(),
            "--expert",
            &format!("{}:1.x", p.display()),
            "-o",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
}

#[test]
fn magnitude_packs_store_indices_and_apply() {
    let (_d, a, _b) = experts();
    let dir = common::tempdir();
    let p = dir.path().join("a-mag.dpk.gguf");
    let o = ExtractOptions {
        density: 0.05,
        sparsifier: Sparsifier::Magnitude,
        values: GgmlType::F32,
        seed: 7,
        ..Default::default()
    };
    let r = extract_delta(&common::smollm2(), a, &p, &o, &NoProgress).unwrap();
    assert!(
        (r.kept as f64 / r.elements as f64 - 0.05).abs() < 0.005,
        "{r:?}"
    );
    // Applying equals a TIES merge of the single model with weight 1 (magnitude trim, no rescale).
    let applied = dir.path().join("applied.gguf");
    let merged = dir.path().join("merged.gguf");
    merge_models(
        &merge_cfg(Method::TaskArithmetic, &[(&p, 1.0, None)]),
        &opts(&applied),
        &NoProgress,
    )
    .unwrap();
    merge_models(
        &merge_cfg(Method::Ties, &[(a, 1.0, Some(0.05))]),
        &opts(&merged),
        &NoProgress,
    )
    .unwrap();
    assert!(std::fs::read(&merged).unwrap() == std::fs::read(&applied).unwrap());
}

#[test]
fn cached_kept_indices_give_the_tensors_apply_writes() {
    use ggmerge::delta::pack::DeltaPack;
    use ggmerge::format::output::FileFormat;
    use ggmerge::merge::plan::{plan, MergePlan, PlanOptions};
    use ggmerge::merge::run::for_each_changed_tensor;
    use std::sync::Arc;

    let plan_with = |cfg: &MergeConfig, packs: &[Arc<DeltaPack>]| -> MergePlan {
        let inputs = ggmerge::delta::open_inputs(cfg, packs).unwrap();
        let o = PlanOptions {
            format: FileFormat::Gguf,
            out_type: None,
            seed: None,
            threads: Some(2),
            requant: None,
        };
        plan(cfg, inputs, &o).unwrap()
    };

    let (_d, a, b) = experts();
    let dir = common::tempdir();
    let pa = dir.path().join("a.dpk.gguf");
    let pb = dir.path().join("b.dpk.gguf");
    extract(a, &pa, 0.1, GgmlType::F16, 0);
    extract(b, &pb, 0.1, GgmlType::F16, 1);
    let cfg = merge_cfg(Method::DareTies, &[(&pa, 0.6, None), (&pb, 0.4, None)]);
    let applied = dir.path().join("applied.gguf");
    merge_models(&cfg, &opts(&applied), &NoProgress).unwrap();
    let collect = |plan: MergePlan| {
        let mut out = Vec::new();
        for_each_changed_tensor(&plan, Some(2), &mut |t, bytes| {
            out.push((t.name.clone(), bytes));
            Ok::<(), ggmerge::merge::MergeError>(())
        })
        .unwrap();
        out
    };
    // Regenerated masks (the runtime's path before caching) …
    let regenerated = collect(plan_with(&cfg, &[]));
    // … and cached kept indices give the same bytes, which are the applied file's tensors.
    let base = GgufModel::open(common::smollm2()).unwrap();
    let mut packs = Vec::new();
    for p in [&pa, &pb] {
        let mut pack = DeltaPack::open(p).unwrap();
        let kept: u64 = pack.tensors.iter().map(|t| t.1).sum();
        assert_eq!(pack.cache_kept_indices(&base).unwrap(), 4 * kept);
        packs.push(Arc::new(pack));
    }
    let cached = collect(plan_with(&cfg, &packs));
    assert_eq!(regenerated.len(), 211);
    assert!(regenerated == cached);
    let file = GgufModel::open(&applied).unwrap();
    for (name, bytes) in &cached {
        assert!(
            file.tensor_by_name(name).unwrap().data == &bytes[..],
            "{name}"
        );
    }
}

#[test]
fn tensors_that_keep_nothing_still_make_valid_packs() {
    // At a density this low most tensors keep no value at all: the pack stores one padding
    // value (a whole block for Q8_0) for each, and must open and apply.
    let (_d, a, _) = experts();
    let dir = common::tempdir();
    for values in [GgmlType::F16, GgmlType::Q8_0] {
        let pack = dir.path().join(format!("tiny-{values}.dpk.gguf"));
        let report = extract(a, &pack, 1e-6, values, 0);
        let opened = ggmerge::delta::pack::DeltaPack::open(&pack).unwrap();
        assert!(
            opened.tensors.iter().any(|t| t.1 == 0),
            "{values}: some tensor keeps nothing"
        );
        assert_eq!(opened.tensors.iter().map(|t| t.1).sum::<u64>(), report.kept);
        let out = dir.path().join("applied.gguf");
        merge_models(
            &merge_cfg(Method::TaskArithmetic, &[(&pack, 1.0, None)]),
            &opts(&out),
            &NoProgress,
        )
        .unwrap();
    }
}
