//! safetensors on the real models: GGUF → safetensors → back, value for value (llama q/k
//! permutation and Gemma's norm offset included), sharded output read back through its index,
//! the files checked with the `safetensors` crate's own reader, and hostile inputs.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use ggmerge::format::gguf::GgufModel;
use ggmerge::format::hf_names::{self, HfConfig};
use ggmerge::format::safetensors::SafetensorsModel;
use ggmerge::format::source::ModelSource;
use ggmerge::format::{FormatError, GgmlType};
use ggmerge::{convert_model, quant, ConvertOptions, NoProgress};
use safetensors::{Dtype, SafeTensors};

/// A tensor's values as f32 (any type ggmerge dequantizes).
fn values(ty: GgmlType, data: &[u8], n: u64, name: &str) -> Vec<f32> {
    let mut out = vec![0f32; n as usize];
    quant::dequantize(ty, data, &mut out, name).unwrap();
    out
}

fn gguf_values(m: &GgufModel, name: &str) -> Vec<f32> {
    let t = m.tensor_by_name(name).unwrap();
    values(t.info.ty, t.data, t.info.n_elements(), name)
}

fn source_values(m: &dyn ModelSource, name: &str) -> Vec<f32> {
    let t = m.tensor(name).unwrap().unwrap();
    let n = t.shape.iter().product();
    values(t.ty, &t.data, n, name)
}

fn f32_opts() -> ConvertOptions {
    ConvertOptions {
        out_type: Some(GgmlType::F32),
        ..ConvertOptions::default()
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Bit-exact equality, with the first difference in the message.
fn assert_same(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        panic!("{what}: element {i}: {} vs {}", a[i], b[i]);
    }
}

/// GGUF → safetensors (F32) → `SafetensorsModel`: every tensor equals the GGUF model's
/// dequantized values exactly; names, shapes and the skipped list are right.
fn round_trip_through_safetensors(gguf: &Path, dir: &Path) -> (GgufModel, SafetensorsModel) {
    let report = convert_model(gguf, dir, &f32_opts(), &NoProgress).unwrap();
    let g = GgufModel::open(gguf).unwrap();
    assert!(dir.join("model.safetensors").is_file());
    assert!(dir.join("config.json").is_file());
    assert_eq!(report.tensors + report.skipped.len(), g.n_tensors());
    let st = SafetensorsModel::open(dir).unwrap();
    assert_eq!(st.architecture(), g.metadata().architecture());
    assert_eq!(st.block_count(), g.metadata().arch_u64("block_count"));
    assert!(st.metadata().is_none());
    let expected: Vec<String> = g
        .tensors()
        .map(|t| t.info.name.clone())
        .filter(|n| !report.skipped.contains(n))
        .collect();
    let mut names = st.tensor_names();
    let mut sorted = expected.clone();
    names.sort();
    sorted.sort();
    assert_eq!(names, sorted);
    for name in &expected {
        let t = g.tensor_by_name(name).unwrap();
        let (shape, ty) = st.tensor_info(name).unwrap();
        assert_eq!(shape, t.info.shape, "{name}");
        assert_eq!(ty, GgmlType::F32, "{name}");
        assert_same(&source_values(&st, name), &gguf_values(&g, name), name);
    }
    (g, st)
}

#[test]
fn smollm2_gguf_to_safetensors_f32_is_exact_and_unpermutes_q_k() {
    let tmp = common::tempdir();
    let dir = tmp.path().join("hf");
    let (g, st) = round_trip_through_safetensors(&common::smollm2(), &dir);

    // The file itself, read with the safetensors crate: HF names, HF shapes, and q/k rows in
    // HF order (row s of HF is row gguf_row_of_hf_row(s) of GGUF).
    let bytes = fs::read(dir.join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(file.len(), 272);
    assert!(file.tensor("lm_head.weight").is_err(), "tied embeddings");
    let emb = file.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!(emb.shape(), [49152, 576]);
    assert_eq!(emb.dtype(), Dtype::F32);
    for (gguf, hf, heads) in [
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
            9,
        ),
        (
            "blk.29.attn_k.weight",
            "model.layers.29.self_attn.k_proj.weight",
            3,
        ),
    ] {
        let view = file.tensor(hf).unwrap();
        let rows = view.shape()[0] as u64;
        let ne0 = view.shape()[1];
        let hf_vals = f32s(view.data());
        let gguf_vals = gguf_values(&g, gguf);
        let hd = hf_names::head_dim(rows, heads).unwrap();
        assert!(hf_vals != gguf_vals, "{hf} was not permuted");
        for s in 0..rows {
            let r = hf_names::gguf_row_of_hf_row(s, hd) as usize;
            let s = s as usize;
            assert_same(
                &hf_vals[s * ne0..(s + 1) * ne0],
                &gguf_vals[r * ne0..(r + 1) * ne0],
                hf,
            );
        }
        assert_eq!(st.hf_name(gguf), Some(hf));
    }
    let config = HfConfig::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(config.arch, "llama");
    assert_eq!(config.hf_architecture.as_deref(), Some("LlamaForCausalLM"));
    assert_eq!(
        (
            config.n_layers,
            config.n_head,
            config.n_head_kv,
            config.hidden_size
        ),
        (Some(30), Some(9), Some(3), Some(576))
    );
    assert_eq!(config.vocab_size, Some(49152));
    assert_eq!(config.tie_word_embeddings, Some(true));
}

#[test]
fn gemma3_gguf_to_safetensors_and_back_is_exact_with_norm_offset() {
    let tmp = common::tempdir();
    let dir = tmp.path().join("hf");
    let (g, _st) = round_trip_through_safetensors(&common::gemma3(), &dir);

    // The HF norms are the GGUF ones minus 1 (computed in f32).
    let bytes = fs::read(dir.join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    for (gguf, hf) in [
        ("output_norm.weight", "model.norm.weight"),
        (
            "blk.3.attn_q_norm.weight",
            "model.layers.3.self_attn.q_norm.weight",
        ),
        (
            "blk.17.post_ffw_norm.weight",
            "model.layers.17.post_feedforward_layernorm.weight",
        ),
    ] {
        let hf_vals = f32s(file.tensor(hf).unwrap().data());
        let want: Vec<f32> = gguf_values(&g, gguf).iter().map(|x| x - 1.0).collect();
        assert_same(&hf_vals, &want, hf);
    }
    // q is not permuted for Gemma.
    assert_same(
        &f32s(
            file.tensor("model.layers.0.self_attn.q_proj.weight")
                .unwrap()
                .data(),
        ),
        &gguf_values(&g, "blk.0.attn_q.weight"),
        "gemma q_proj",
    );

    // ... and back to GGUF with the base's metadata: same values, same order, same metadata.
    let out = tmp.path().join("back.gguf");
    let opts = ConvertOptions {
        metadata_from: Some(common::gemma3()),
        ..ConvertOptions::default()
    };
    let report = convert_model(&dir, &out, &opts, &NoProgress).unwrap();
    assert_eq!(report.tensors, g.n_tensors());
    let back = GgufModel::open(&out).unwrap();
    let order: Vec<&str> = back.tensors().map(|t| t.info.name.as_str()).collect();
    let base_order: Vec<&str> = g.tensors().map(|t| t.info.name.as_str()).collect();
    assert_eq!(order, base_order);
    for t in g.tensors() {
        let name = &t.info.name;
        let b = back.tensor_by_name(name).unwrap();
        assert_eq!(b.info.ty, GgmlType::F32, "{name}");
        assert_same(&gguf_values(&back, name), &gguf_values(&g, name), name);
    }
    for (k, v) in g.metadata().iter() {
        if k != "general.file_type" {
            assert_eq!(back.metadata().get(k), Some(v), "{k}");
        }
    }
    assert_eq!(back.metadata().get_u64("general.file_type"), Some(0));
}

#[test]
fn smollm2_safetensors_to_gguf_with_base_metadata_is_exact() {
    let tmp = common::tempdir();
    let st_file = tmp.path().join("w.safetensors");
    convert_model(&common::smollm2(), &st_file, &f32_opts(), &NoProgress).unwrap();
    assert!(tmp.path().join("config.json").is_file());

    // Without a base: a clear error, nothing written.
    let out = tmp.path().join("back.gguf");
    let e = convert_model(&st_file, &out, &ConvertOptions::default(), &NoProgress).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("metadata") && msg.contains("tokenizer"),
        "{msg}"
    );
    assert!(!out.exists());

    let opts = ConvertOptions {
        metadata_from: Some(common::smollm2()),
        ..ConvertOptions::default()
    };
    convert_model(&st_file, &out, &opts, &NoProgress).unwrap();
    let g = GgufModel::open(common::smollm2()).unwrap();
    let back = GgufModel::open(&out).unwrap();
    assert_eq!(back.n_tensors(), g.n_tensors());
    for t in g.tensors() {
        let name = &t.info.name;
        assert_eq!(back.tensor_by_name(name).unwrap().info.shape, t.info.shape);
        assert_same(&gguf_values(&back, name), &gguf_values(&g, name), name);
    }
    assert_eq!(
        back.metadata().get("tokenizer.ggml.tokens"),
        g.metadata().get("tokenizer.ggml.tokens")
    );

    // Q8_0 output for matrices, F32 for 1-D tensors.
    let q8 = tmp.path().join("q8.gguf");
    let opts = ConvertOptions {
        metadata_from: Some(common::smollm2()),
        out_type: Some(GgmlType::Q8_0),
        ..ConvertOptions::default()
    };
    convert_model(&st_file, &q8, &opts, &NoProgress).unwrap();
    let q = GgufModel::open(&q8).unwrap();
    for t in q.tensors() {
        let want = if t.info.shape.len() == 1 {
            GgmlType::F32
        } else {
            GgmlType::Q8_0
        };
        assert_eq!(t.info.ty, want, "{}", t.info.name);
    }
    assert_eq!(q.metadata().get_u64("general.file_type"), Some(7));
}

#[test]
fn default_output_is_f16_matrices_and_f32_vectors() {
    let tmp = common::tempdir();
    let dir = tmp.path().join("hf");
    convert_model(
        &common::smollm2(),
        &dir,
        &ConvertOptions::default(),
        &NoProgress,
    )
    .unwrap();
    let bytes = fs::read(dir.join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    for (name, view) in file.tensors() {
        let want = if view.shape().len() == 1 {
            Dtype::F32
        } else {
            Dtype::F16
        };
        assert_eq!(view.dtype(), want, "{name}");
    }
    let st = SafetensorsModel::open(&dir).unwrap();
    assert_eq!(st.stored_type("blk.0.attn_q.weight"), Some(GgmlType::F16));
    // F16 of dequantized Q4_1 values: within F16 rounding of the GGUF values.
    let g = GgufModel::open(common::smollm2()).unwrap();
    let a = source_values(&st, "blk.0.attn_q.weight");
    let b = gguf_values(&g, "blk.0.attn_q.weight");
    assert!(a
        .iter()
        .zip(&b)
        .all(|(x, y)| (x - y).abs() <= y.abs() * 1e-3 + 1e-7));
}

#[test]
fn sharded_output_reads_back_through_the_index() {
    let tmp = common::tempdir();
    let one = tmp.path().join("one");
    let many = tmp.path().join("many");
    let opts = ConvertOptions {
        out_type: Some(GgmlType::BF16),
        ..ConvertOptions::default()
    };
    convert_model(&common::smollm2(), &one, &opts, &NoProgress).unwrap();
    let sharded = ConvertOptions {
        max_shard_bytes: Some(50 << 20),
        ..opts
    };
    let report = convert_model(&common::smollm2(), &many, &sharded, &NoProgress).unwrap();
    let shards: Vec<&PathBuf> = report
        .outputs
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    assert!(shards.len() >= 3, "{shards:?}");
    assert_eq!(
        shards[0].file_name().unwrap().to_str().unwrap(),
        format!("model-00001-of-{:05}.safetensors", shards.len())
    );
    assert!(!many.join("model.safetensors").exists());
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(many.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    assert_eq!(index["weight_map"].as_object().unwrap().len(), 272);
    // Every shard is a valid safetensors file on its own, each at most 50 MiB of data unless a
    // single tensor is bigger.
    for s in &shards {
        let bytes = fs::read(s).unwrap();
        let f = SafeTensors::deserialize(&bytes).unwrap();
        let data: usize = f.tensors().iter().map(|(_, v)| v.data().len()).sum();
        assert!(data <= 50 << 20 || f.len() == 1, "{s:?}");
    }

    let a = SafetensorsModel::open(&one).unwrap();
    for opened in [
        SafetensorsModel::open(&many).unwrap(),
        SafetensorsModel::open(many.join("model.safetensors.index.json")).unwrap(),
        SafetensorsModel::open(shards[1]).unwrap(),
    ] {
        assert_eq!(opened.files().len(), shards.len());
        assert_eq!(opened.tensor_names().len(), 272);
        for name in a.tensor_names() {
            let x = a.tensor(&name).unwrap().unwrap();
            let y = opened.tensor(&name).unwrap().unwrap();
            assert_eq!((x.shape, x.ty), (y.shape, y.ty), "{name}");
            assert!(x.data == y.data, "{name}");
        }
    }
}

/// A safetensors file from a header JSON and data bytes.
fn st_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

fn write_model(dir: &Path, bytes: &[u8]) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    fs::write(
        dir.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"num_attention_heads":2,"num_hidden_layers":1}"#,
    )
    .unwrap();
    let p = dir.join("model.safetensors");
    fs::write(&p, bytes).unwrap();
    p
}

fn open_err(path: &Path) -> FormatError {
    match SafetensorsModel::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e,
    }
}

fn says(e: &FormatError, parts: &[&str]) {
    let msg = e.to_string();
    for p in parts {
        assert!(msg.contains(p), "{msg:?} lacks {p:?}");
    }
}

#[test]
fn hostile_inputs_are_clear_errors() {
    let tmp = common::tempdir();
    let norm = r#"{"model.norm.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let good = st_bytes(norm, &[0u8; 16]);
    let p = write_model(&tmp.path().join("good"), &good);
    let m = SafetensorsModel::open(&p).unwrap();
    assert_eq!(m.tensor_names(), ["output_norm.weight"]);

    // Truncated data: names the tensor and the file.
    let p = write_model(&tmp.path().join("cut"), &good[..good.len() - 3]);
    let e = open_err(&p);
    assert!(matches!(e, FormatError::DataOutOfBounds { .. }), "{e:?}");
    says(&e, &["model.safetensors", "model.norm.weight", "truncated"]);

    // Every prefix of the file fails cleanly.
    for cut in 0..good.len() {
        let p = write_model(&tmp.path().join(format!("prefix{cut}")), &good[..cut]);
        let e = open_err(&p);
        says(&e, &["model.safetensors"]);
    }

    // Trailing bytes.
    let mut long = good.clone();
    long.extend_from_slice(&[0; 5]);
    let p = write_model(&tmp.path().join("long"), &long);
    says(&open_err(&p), &["5 bytes after"]);

    // Header length past the end of the file.
    let mut past = good.clone();
    past[..8].copy_from_slice(&1_000u64.to_le_bytes());
    let p = write_model(&tmp.path().join("past"), &past);
    let e = open_err(&p);
    assert!(matches!(e, FormatError::Truncated { .. }), "{e:?}");
    says(&e, &["header", "1000"]);

    // Absurd header length.
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let p = write_model(&tmp.path().join("huge"), &huge);
    says(&open_err(&p), &["limit"]);

    // Unknown dtype string, and a known dtype ggmerge does not read.
    let x = r#"{"model.norm.weight":{"dtype":"X99","shape":[4],"data_offsets":[0,16]}}"#;
    let p = write_model(&tmp.path().join("x99"), &st_bytes(x, &[0; 16]));
    let e = open_err(&p);
    assert!(matches!(e, FormatError::UnsupportedDtype { .. }), "{e:?}");
    says(&e, &["model.norm.weight", "X99", "F32, F16 and BF16"]);
    let i64 = r#"{"model.norm.weight":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#;
    let p = write_model(&tmp.path().join("i64"), &st_bytes(i64, &[0; 16]));
    let e = open_err(&p);
    assert!(matches!(e, FormatError::UnsupportedDtype { .. }), "{e:?}");
    says(&e, &["model.norm.weight", "I64"]);

    // Offsets that do not match the shape; overlapping offsets; bad JSON; not UTF-8.
    let wrong = r#"{"model.norm.weight":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#;
    let p = write_model(&tmp.path().join("wrong"), &st_bytes(wrong, &[0; 16]));
    says(&open_err(&p), &["model.norm.weight", "12"]);
    let overlap = r#"{"model.norm.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},
        "lm_head.weight":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#;
    let p = write_model(&tmp.path().join("overlap"), &st_bytes(overlap, &[0; 24]));
    says(&open_err(&p), &["not contiguous"]);
    let p = write_model(&tmp.path().join("json"), &st_bytes("{\"a\":", &[]));
    says(&open_err(&p), &["model.safetensors"]);
    let mut not_utf8 = 5u64.to_le_bytes().to_vec();
    not_utf8.extend_from_slice(b"{\"\xff\"}");
    let p = write_model(&tmp.path().join("utf8"), &not_utf8);
    says(&open_err(&p), &["model.safetensors"]);

    // A GGUF file given as safetensors.
    let e = open_err(&common::smollm2());
    says(&e, &["GGUF"]);

    // Unknown tensor names for the architecture; q_proj rows that do not split into heads.
    let odd =
        r#"{"model.layers.0.mystery.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let p = write_model(&tmp.path().join("odd"), &st_bytes(odd, &[0; 16]));
    let e = open_err(&p);
    assert!(matches!(e, FormatError::UnmappedTensor { .. }), "{e:?}");
    says(&e, &["model.layers.0.mystery.weight", "llama"]);
    let q = r#"{"model.layers.0.self_attn.q_proj.weight":{"dtype":"F32","shape":[6,1],"data_offsets":[0,24]}}"#;
    let p = write_model(&tmp.path().join("q"), &st_bytes(q, &[0; 24]));
    says(&open_err(&p), &["q_proj", "heads"]);

    // No config.json: the architecture is unknown unless given.
    let bare = tmp.path().join("bare.safetensors");
    fs::write(&bare, &good).unwrap();
    let e = open_err(&bare);
    assert!(matches!(e, FormatError::Config { .. }), "{e:?}");
    says(&e, &["config.json", "architecture"]);
    let m = SafetensorsModel::open_with_arch(&bare, "gemma3").unwrap();
    assert_eq!(m.architecture(), Some("gemma3"));
    // Gemma norm: + 1 and exposed as F32.
    assert_eq!(source_values(&m, "output_norm.weight"), [1.0; 4]);
    assert!(SafetensorsModel::open_with_arch(&bare, "phi3").is_err());

    // An unsupported architecture in config.json.
    let d = tmp.path().join("phi");
    write_model(&d, &good);
    fs::write(
        d.join("config.json"),
        r#"{"architectures":["Phi3ForCausalLM"]}"#,
    )
    .unwrap();
    says(&open_err(&d), &["config.json", "Phi3ForCausalLM"]);

    // Index problems: a missing shard, a path outside the directory, a tensor not in its shard.
    for (name, index) in [
        (
            "missing",
            r#"{"weight_map":{"model.norm.weight":"nope.safetensors"}}"#,
        ),
        (
            "escape",
            r#"{"weight_map":{"model.norm.weight":"../good/model.safetensors"}}"#,
        ),
        (
            "absent",
            r#"{"weight_map":{"lm_head.weight":"model.safetensors"}}"#,
        ),
        ("nomap", r#"{"metadata":{}}"#),
    ] {
        let d = tmp.path().join(format!("index-{name}"));
        write_model(&d, &good);
        fs::write(d.join("model.safetensors.index.json"), index).unwrap();
        let e = open_err(&d);
        let msg = e.to_string();
        assert!(
            msg.contains("nope.safetensors") || msg.contains("index.json"),
            "{name}: {msg}"
        );
    }

    // An empty directory.
    let d = tmp.path().join("empty");
    fs::create_dir_all(&d).unwrap();
    says(&open_err(&d), &["model.safetensors"]);
}

#[test]
fn conversion_refuses_bad_requests_before_writing() {
    let tmp = common::tempdir();
    let out = tmp.path().join("x");
    let opts = ConvertOptions {
        out_type: Some(GgmlType::Q8_0),
        ..ConvertOptions::default()
    };
    let e = convert_model(&common::smollm2(), &out, &opts, &NoProgress).unwrap_err();
    assert!(e.to_string().contains("F32, F16 and BF16"), "{e}");

    // Mismatched architectures between safetensors and base.
    let hf = tmp.path().join("hf");
    convert_model(
        &common::smollm2(),
        &hf,
        &ConvertOptions::default(),
        &NoProgress,
    )
    .unwrap();
    let opts = ConvertOptions {
        metadata_from: Some(common::gemma3()),
        ..ConvertOptions::default()
    };
    let bad = tmp.path().join("bad.gguf");
    let e = convert_model(&hf, &bad, &opts, &NoProgress).unwrap_err();
    assert!(e.to_string().contains("gemma3"), "{e}");
    assert!(!bad.exists());
}
