//! Cross-checks against gguf-py (the `gguf` Python package, llama.cpp's own reference reader):
//!
//! - every tensor of the test models, dequantized by ggmerge (ggml's `to_float`, `half`),
//!   equals gguf-py's numpy dequantization, compared bit for bit and measured in ulps per type;
//! - files ggmerge writes are read by gguf-py: an unchanged rewrite is byte-identical to its
//!   input, and requantized models keep metadata, tensor names, shapes and order, and dequantize
//!   to finite values.
//!
//! Both sides stream: the Python scripts (`tests/py/`) dequantize a slab of rows at a time and
//! this side compares slab by slab, so no whole model (nor Gemma 3's 168M-element embedding) is
//! ever held in f32.
//!
//! Needs `python3` with `gguf` and `numpy` (`$GGMERGE_PYTHON` picks another interpreter).

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Instant;

use ggmerge::format::gguf::{GgufFile, GgufModel, GgufWriter, TensorSpec};
use ggmerge::format::GgmlType;
use ggmerge::quant::Target;
use ggmerge::{quantize_model, NoProgress, QuantizeOptions, QuantizeReport};

/// Elements compared per slab (whole rows; at least one row).
const SLAB_ELEMS: u64 = 1 << 20;

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

/// A running Python script: stdout piped to us, stderr collected on a thread so that a failure
/// can be reported with it. Killed on drop if still running (e.g. when an assertion fails).
struct Python {
    what: String,
    child: Child,
    stdout: BufReader<ChildStdout>,
    stderr: Option<JoinHandle<String>>,
}

impl Python {
    fn spawn(script_name: &str, args: &[&Path]) -> Python {
        let what = format!(
            "{} {script_name} {}",
            common::python(),
            args.iter()
                .map(|a| a.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut child = Command::new(common::python())
            .arg(script(script_name))
            .args(args)
            // Keep tests/py free of __pycache__.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
        let stdout = BufReader::with_capacity(1 << 20, child.stdout.take().expect("piped stdout"));
        let mut err = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Python {
            what,
            child,
            stdout,
            stderr: Some(stderr),
        }
    }

    /// Waits for the process and returns (success, stderr).
    fn wait(&mut self) -> (bool, String) {
        let status = self.child.wait();
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        match status {
            Ok(s) => (s.success(), format!("{s}; stderr:\n{stderr}")),
            Err(e) => (false, format!("wait failed: {e}; stderr:\n{stderr}")),
        }
    }

    /// Panics with `msg` and the script's stderr (after it exits).
    fn fail(&mut self, msg: &str) -> ! {
        let _ = self.child.kill();
        let (_, status) = self.wait();
        panic!("`{}`: {msg}\nexit: {status}", self.what)
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) {
        if let Err(e) = self.stdout.read_exact(buf) {
            // Let the script finish writing its error before killing it.
            let (_, status) = self.wait();
            panic!("`{}`: reading {what}: {e}\nexit: {status}", self.what)
        }
    }

    fn read_u32(&mut self, what: &str) -> u32 {
        let mut b = [0u8; 4];
        self.read_exact(&mut b, what);
        u32::from_le_bytes(b)
    }

    fn read_u64(&mut self, what: &str) -> u64 {
        let mut b = [0u8; 8];
        self.read_exact(&mut b, what);
        u64::from_le_bytes(b)
    }

    /// Checks stdout is at its end and the script exited successfully.
    fn expect_end(mut self) {
        let mut extra = [0u8; 1];
        match self.stdout.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => self.fail("more output than the model has tensors"),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => self.fail(&format!("reading the end of the stream: {e}")),
        }
        let (ok, status) = self.wait();
        assert!(ok, "`{}` failed: {status}", self.what);
    }

    /// Reads all of stdout and checks the script exited successfully.
    fn output(mut self) -> String {
        let mut out = String::new();
        if let Err(e) = self.stdout.read_to_string(&mut out) {
            self.fail(&format!("reading stdout: {e}"));
        }
        let (ok, status) = self.wait();
        assert!(ok, "`{}` failed: {status}", self.what);
        out
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        if self.stderr.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `x`'s bit pattern as an integer ordered like the floats (−0 and +0 both map to 0), so that
/// the difference of two is their distance in ulps.
fn ordered(x: f32) -> i64 {
    let b = x.to_bits();
    let magnitude = i64::from(b & 0x7fff_ffff);
    if b & 0x8000_0000 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// Distance in ulps; identical NaNs are equal, a NaN against anything else is infinitely far.
fn ulps(a: f32, b: f32) -> u64 {
    if a.to_bits() == b.to_bits() {
        0
    } else if a.is_nan() || b.is_nan() {
        u64::MAX
    } else {
        (ordered(a) - ordered(b)).unsigned_abs()
    }
}

/// What was measured for one ggml type over all its tensors.
#[derive(Default, Debug)]
struct TypeStats {
    tensors: usize,
    elements: u64,
    /// Elements whose bits differ (±0 counted equal).
    differing: u64,
    max_ulp: u64,
    /// (tensor, element index, ggmerge, gguf-py) of the worst element.
    worst: Option<(String, u64, f32, f32)>,
}

/// Dequantizes every tensor of `path` with ggmerge and with gguf-py (`dequant_stream.py`), slab
/// by slab, and returns the per-type differences.
fn compare_dequantization(path: &Path) -> BTreeMap<String, TypeStats> {
    let started = Instant::now();
    let model = GgufModel::open(path).expect("ggmerge opens the model");
    let mut py = Python::spawn("dequant_stream.py", &[path]);
    let mut stats: BTreeMap<String, TypeStats> = BTreeMap::new();
    let mut ours = Vec::<f32>::new();
    let mut theirs = Vec::<u8>::new();
    for t in model.tensors() {
        let info = t.info;
        let name_len = py.read_u32("a name length") as usize;
        assert!(
            name_len <= 64,
            "name length {name_len} before {:?}",
            info.name
        );
        let mut name = vec![0u8; name_len];
        py.read_exact(&mut name, "a name");
        let name = String::from_utf8_lossy(&name).into_owned();
        assert_eq!(
            name, info.name,
            "gguf-py and ggmerge list tensors in different orders"
        );
        let count = py.read_u64("an element count");
        assert_eq!(count, info.n_elements(), "{name}: element count");

        let ty = info.ty;
        let row_len = info.row_len();
        let row_bytes = ty.row_bytes(row_len).expect("row size") as usize;
        let slab_rows = (SLAB_ELEMS / row_len).max(1) as usize;
        let n_rows = info.n_rows() as usize;
        assert_eq!(t.data.len(), n_rows * row_bytes, "{name}: data size");
        let s = stats.entry(ty.name().to_string()).or_default();
        s.tensors += 1;
        s.elements += count;
        let mut base = 0u64;
        for r0 in (0..n_rows).step_by(slab_rows) {
            let r1 = (r0 + slab_rows).min(n_rows);
            let n = (r1 - r0) * row_len as usize;
            ours.clear();
            ours.resize(n, 0.0);
            ggmerge::quant::dequantize(
                ty,
                &t.data[r0 * row_bytes..r1 * row_bytes],
                &mut ours,
                &name,
            )
            .unwrap_or_else(|e| panic!("ggmerge cannot dequantize {name}: {e}"));
            theirs.resize(n * 4, 0);
            py.read_exact(&mut theirs, &format!("values of {name}"));
            for (i, (&a, b)) in ours.iter().zip(theirs.chunks_exact(4)).enumerate() {
                let b = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                let d = ulps(a, b);
                if d != 0 {
                    s.differing += 1;
                    if d > s.max_ulp {
                        s.max_ulp = d;
                        s.worst = Some((name.clone(), base + i as u64, a, b));
                    }
                }
            }
            base += n as u64;
        }
    }
    py.expect_end();
    eprintln!(
        "{}: {} tensors compared with gguf-py in {:.1} s",
        path.display(),
        model.n_tensors(),
        started.elapsed().as_secs_f64()
    );
    for (ty, s) in &stats {
        eprintln!(
            "  {ty:>5}: {:>3} tensors, {:>10} elements, {:>9} differ, max {} ulp{}",
            s.tensors,
            s.elements,
            s.differing,
            s.max_ulp,
            s.worst
                .as_ref()
                .map(|(t, i, a, b)| format!(" ({t}[{i}]: ggmerge {a:e}, gguf-py {b:e})"))
                .unwrap_or_default()
        );
    }
    stats
}

/// The largest difference from gguf-py allowed for `ty`, in ulps.
///
/// The issue allows 1 ulp where the math differs. For every type the test models hold (and
/// F16/BF16, tested via conversions), it does not: gguf-py's numpy code (`gguf/quants.py`) and
/// ggml's `dequantize_row_*` (`ggml-quants.c`) evaluate the same f32 expressions in the same
/// order — Q4_1 `q*d + m`, Q4_K `(d*sc)*q - dmin*m`, Q6_K `(d*sc)*q`, Q5_0/Q8_0 `q*d` — and
/// the products are mostly exact anyway: an f16 scale has 11 significant bits, times a
/// 4/5/8-bit quant or a 6-bit sub-scale and a 4-bit quant stays within f32's 24 bits. Only
/// Q6_K's `(d*sc)*q` can round, and both sides round the same two products. Should the C
/// compiler contract `q*d + m` into an FMA, the exact product makes no difference. F32 is a
/// copy and F16/BF16 an exact widening. So these types are held to exact equality (measured:
/// 0 ulp, 0 differing elements, everywhere); other types get the 1 ulp.
fn allowed_ulps(ty: &str) -> u64 {
    match ty {
        "F32" | "F16" | "BF16" | "Q4_0" | "Q4_1" | "Q5_0" | "Q5_1" | "Q8_0" | "Q4_K" | "Q5_K"
        | "Q6_K" => 0,
        _ => 1,
    }
}

fn assert_within_bounds(model: &str, stats: &BTreeMap<String, TypeStats>) {
    let over: Vec<String> = stats
        .iter()
        .filter(|(ty, s)| s.max_ulp > allowed_ulps(ty))
        .map(|(ty, s)| {
            format!(
                "{ty}: {} of {} elements differ, max {} ulp (allowed {}), worst {:?}",
                s.differing,
                s.elements,
                s.max_ulp,
                allowed_ulps(ty),
                s.worst
            )
        })
        .collect();
    assert!(
        over.is_empty(),
        "{model}: ggmerge and gguf-py disagree:\n{}",
        over.join("\n")
    );
}

fn type_names(stats: &BTreeMap<String, TypeStats>) -> Vec<&str> {
    stats.keys().map(String::as_str).collect()
}

#[test]
fn dequantize_matches_gguf_py_smollm2() {
    let stats = compare_dequantization(&common::smollm2());
    assert_eq!(type_names(&stats), ["F32", "Q4_1", "Q8_0"]);
    assert_within_bounds("SmolLM2", &stats);
}

#[test]
fn dequantize_matches_gguf_py_gemma3() {
    let stats = compare_dequantization(&common::gemma3());
    assert_eq!(type_names(&stats), ["F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"]);
    assert_within_bounds("Gemma 3", &stats);
}

/// F16 and BF16 are in neither test model: ggmerge converts SmolLM2 to each (the norms stay
/// F32), and the result is compared the same way.
#[test]
fn dequantize_matches_gguf_py_f16_bf16() {
    let dir = common::tempdir();
    for (target, ty) in [("F16", "F16"), ("BF16", "BF16")] {
        let out = dir.path().join(format!("smollm2-{target}.gguf"));
        quantize(&common::smollm2(), &out, target);
        let stats = compare_dequantization(&out);
        assert!(
            stats.contains_key(ty),
            "{target}: no {ty} tensor: {:?}",
            type_names(&stats)
        );
        assert_within_bounds(&format!("SmolLM2 {target}"), &stats);
        std::fs::remove_file(&out).expect("remove the converted model");
    }
}

fn quantize(input: &Path, output: &Path, target: &str) -> QuantizeReport {
    let opts = QuantizeOptions {
        target: Target::parse(target, false).expect("known target"),
        threads: None,
    };
    quantize_model(input, output, &opts, &NoProgress)
        .unwrap_or_else(|e| panic!("quantize {} to {target}: {e}", input.display()))
}

/// Asserts two files have the same bytes, reading both in chunks.
fn assert_same_bytes(a: &Path, b: &Path) {
    let (la, lb) = (
        std::fs::metadata(a).expect("stat").len(),
        std::fs::metadata(b).expect("stat").len(),
    );
    assert_eq!(
        la,
        lb,
        "{} and {} differ in length",
        a.display(),
        b.display()
    );
    let mut fa = BufReader::new(File::open(a).expect("open"));
    let mut fb = BufReader::new(File::open(b).expect("open"));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut offset = 0u64;
    while offset < la {
        let n = ((la - offset) as usize).min(ba.len());
        fa.read_exact(&mut ba[..n]).expect("read");
        fb.read_exact(&mut bb[..n]).expect("read");
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            panic!(
                "{} and {} first differ at byte {}",
                a.display(),
                b.display(),
                offset + i as u64
            );
        }
        offset += n as u64;
    }
}

/// Rewrites `input` unchanged with [`GgufWriter`] and checks the copy is byte-identical.
fn assert_rewrite_is_identical(input: &Path, dir: &Path) {
    let file = GgufFile::open(input).expect("ggmerge opens the model");
    let specs: Vec<TensorSpec> = file
        .tensors()
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            shape: t.shape.clone(),
            ty: t.ty,
        })
        .collect();
    let out = dir.join("rewrite.gguf");
    let mut w = GgufWriter::create(
        &out,
        file.header().version,
        file.metadata(),
        &specs,
        &[input],
    )
    .expect("create the writer");
    for i in 0..specs.len() {
        w.write_tensor(file.tensor_data(i)).expect("write a tensor");
    }
    let size = w.finish().expect("finish the file");
    assert_eq!(size, file.len(), "{}: rewritten size", input.display());
    assert_same_bytes(input, &out);
    std::fs::remove_file(&out).expect("remove the rewrite");
}

/// Requantizes `input` to `target` and has gguf-py compare the result with the input.
fn assert_gguf_py_reads_requantized(input: &Path, target: &str, dir: &Path) {
    let out = dir.join(format!("requantized-{target}.gguf"));
    let report = quantize(input, &out, target);
    let source = GgufFile::open(input).expect("ggmerge opens the input");
    let written = GgufFile::open(&out).expect("ggmerge opens its output");

    let json = Python::spawn("compare_gguf.py", &[input, &out]).output();
    let v: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("compare_gguf.py printed no JSON ({e}): {json}"));
    let ctx = format!("{} -> {target}: {v}", input.display());
    let strings = |key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} missing: {ctx}"))
            .iter()
            .map(|s| s.as_str().map_or_else(|| s.to_string(), str::to_string))
            .collect()
    };
    let version = u64::from(source.header().version);
    assert_eq!(v["version"], serde_json::json!([version, version]), "{ctx}");

    // Metadata: the same keys, in ggmerge's order, with equal values but general.file_type.
    assert_eq!(
        v["keys"].as_u64(),
        Some(source.metadata().len() as u64),
        "{ctx}"
    );
    let our_order: Vec<String> = written
        .metadata()
        .iter()
        .map(|(k, _)| k.to_string())
        .collect();
    assert_eq!(
        strings("key_order"),
        our_order,
        "gguf-py reads other keys: {ctx}"
    );
    assert!(strings("missing_in_b").is_empty(), "{ctx}");
    assert!(strings("extra_in_b").is_empty(), "{ctx}");
    assert_eq!(v["order_matches"], true, "{ctx}");
    assert_eq!(v["value_mismatches"], serde_json::json!([]), "{ctx}");
    assert_eq!(
        written.metadata().get_u64("general.file_type"),
        Some(u64::from(Target::parse(target, false).unwrap().ftype.id)),
        "{ctx}"
    );

    // Tensors: same names and shapes in the same order, the types ggmerge planned, and
    // gguf-py dequantizes each to the right number of finite values.
    assert_eq!(
        v["tensors"].as_u64(),
        Some(source.tensors().len() as u64),
        "{ctx}"
    );
    assert!(strings("tensor_mismatches").is_empty(), "{ctx}");
    let planned: Vec<String> = report
        .tensors
        .iter()
        .map(|t| t.to.name().to_string())
        .collect();
    let read: Vec<String> = strings("tensor_types_b");
    assert_eq!(read.len(), planned.len(), "{ctx}");
    for (i, (r, p)) in read.iter().zip(&planned).enumerate() {
        assert!(
            r.eq_ignore_ascii_case(p),
            "tensor #{i} {}: gguf-py reads {r}, ggmerge wrote {p}",
            report.tensors[i].name
        );
    }
    let mut input_types = BTreeMap::<String, u64>::new();
    for t in source.tensors() {
        *input_types.entry(t.ty.name().to_string()).or_default() += 1;
    }
    let read_input_types: BTreeMap<String, u64> =
        serde_json::from_value(v["types"]["a"].clone()).expect("types.a");
    assert_eq!(read_input_types, input_types, "{ctx}");
    assert!(strings("count_mismatches").is_empty(), "{ctx}");
    assert!(strings("nonfinite").is_empty(), "{ctx}");

    let converted = report.converted();
    let types_b: BTreeMap<String, u64> =
        serde_json::from_value(v["types"]["b"].clone()).expect("types.b");
    eprintln!(
        "{} -> {target}: {converted} of {} tensors converted; gguf-py reads {:?}",
        input.display(),
        report.tensors.len(),
        types_b
    );
    let default_type: GgmlType = Target::parse(target, false).unwrap().ftype.default_type;
    assert!(
        types_b.contains_key(default_type.name()),
        "no {default_type} tensor: {ctx}"
    );
    std::fs::remove_file(&out).expect("remove the requantized model");
}

#[test]
fn gguf_py_reads_our_files_smollm2() {
    let dir = common::tempdir();
    assert_rewrite_is_identical(&common::smollm2(), dir.path());
    assert_gguf_py_reads_requantized(&common::smollm2(), "Q8_0", dir.path());
}

#[test]
fn gguf_py_reads_our_files_gemma3() {
    let dir = common::tempdir();
    assert_rewrite_is_identical(&common::gemma3(), dir.path());
    assert_gguf_py_reads_requantized(&common::gemma3(), "Q4_K_M", dir.path());
}

#[test]
fn ulp_distance_orders_floats() {
    assert_eq!(ulps(0.0, -0.0), 0);
    assert_eq!(ulps(1.0, f32::from_bits(1.0f32.to_bits() + 1)), 1);
    assert_eq!(ulps(f32::from_bits(1), -f32::from_bits(1)), 2);
    assert_eq!(ulps(-1.0, -f32::from_bits(1.0f32.to_bits() + 3)), 3);
    assert_eq!(ulps(f32::NAN, 1.0), u64::MAX);
    assert_eq!(ulps(f32::NAN, f32::NAN), 0);
}
