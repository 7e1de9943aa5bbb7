//! What the README's "Reliability" section promises, tried the way a hostile user (or an
//! unlucky machine) would, through the `ggmerge` binary: outputs that cannot hurt the system,
//! no temporary file after an error, a full disk or a signal, inputs that change under a run,
//! parameters that would poison a model, damaged packs, absurd thread counts, closed pipes.

mod common;

use common::{ggmerge, s, text};

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ggmerge::format::gguf::{GgufModel, GgufWriter, TensorSpec, Value};
use ggmerge::format::GgmlType;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ggmerge")
}

/// Files in `dir` (names), sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn temp_files(dir: &Path) -> Vec<String> {
    listing(dir)
        .into_iter()
        .filter(|n| n.contains(".ggmerge-"))
        .collect()
}

/// An error run: exit 1, exactly one line on stderr (besides progress), no panic.
fn assert_one_line_error(out: &Output) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{err}");
    lines[0].to_string()
}

/// Two Q8_0 "fine-tunes" of SmolLM2 (small perturbations of the real base) and their DARE
/// packs, made once for the tests of this file.
struct Fixture {
    _dir: tempfile::TempDir,
    e1: PathBuf,
    e2: PathBuf,
    pack1: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = common::shared_tempdir();
        let smol = common::smollm2();
        let e1 = dir.path().join("math.gguf");
        let e2 = dir.path().join("code.gguf");
        common::experts::make_expert(&smol, &e1, 1, 2e-2, GgmlType::Q8_0, &[]);
        common::experts::make_expert(&smol, &e2, 2, 2e-2, GgmlType::Q8_0, &[]);
        let pack1 = dir.path().join("math.dpk.gguf");
        let out = ggmerge(&[
            "extract",
            "--base",
            s(&smol),
            "--finetuned",
            s(&e1),
            "--density",
            "0.1",
            "-o",
            s(&pack1),
            "-q",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        Fixture {
            _dir: dir,
            e1,
            e2,
            pack1,
        }
    })
}

/// `merge --base SMOL --model e1 --weight W … -o OUT` plus `extra`.
fn merge_args(out: &Path, weight: &str, extra: &[&str]) -> Vec<String> {
    let f = fixture();
    let mut v: Vec<String> = [
        "merge",
        "--base",
        s(&common::smollm2()),
        "--model",
        s(&f.e1),
        "--weight",
        weight,
        "--method",
        "task_arithmetic",
        "-o",
        s(out),
        "-q",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

fn run_strings(args: &[String]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run ggmerge")
}

// ---------------------------------------------------------------------------------------------
// Output paths and formats
// ---------------------------------------------------------------------------------------------

#[test]
fn outputs_that_are_not_regular_files_are_refused_before_any_work() {
    let dir = common::tempdir();
    let before = fs::metadata("/dev/null").unwrap();
    for target in ["/dev/null", "-"] {
        for fmt in [None, Some("gguf")] {
            let mut args = merge_args(Path::new(target), "0.5", &[]);
            if let Some(f) = fmt {
                args.extend(["--format".to_string(), f.to_string()]);
            }
            let started = Instant::now();
            let out = run_strings(&args);
            let line = assert_one_line_error(&out);
            assert!(
                line.contains("not a regular file")
                    || line.contains("standard output")
                    || line.contains("--format"),
                "{line}"
            );
            // Refused before the inputs are even opened.
            assert!(started.elapsed() < Duration::from_secs(3), "{line}");
        }
    }
    let after = fs::metadata("/dev/null").unwrap();
    assert!(after.file_type() == before.file_type() && !after.is_file());
    assert!(!Path::new("/dev/config.json").exists());

    // A FIFO and a directory named as the GGUF output.
    let fifo = dir.path().join("pipe.gguf");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let line = assert_one_line_error(&run_strings(&merge_args(&fifo, "0.5", &[])));
    assert!(line.contains("FIFO"), "{line}");
    let subdir = dir.path().join("d.gguf");
    fs::create_dir(&subdir).unwrap();
    let line = assert_one_line_error(&run_strings(&merge_args(&subdir, "0.5", &[])));
    assert!(line.contains("directory"), "{line}");
    // quantize and extract refuse the same way.
    let q = ggmerge(&["quantize", s(&common::smollm2()), "/dev/null", "Q8_0"]);
    assert!(assert_one_line_error(&q).contains("character device"));
    let f = fixture();
    let e = ggmerge(&[
        "extract",
        "--base",
        s(&common::smollm2()),
        "--finetuned",
        s(&f.e1),
        "-o",
        "/dev/null",
    ]);
    assert!(assert_one_line_error(&e).contains("character device"));
    assert_eq!(listing(dir.path()), ["d.gguf", "pipe.gguf"]);
}

#[test]
fn the_output_format_is_explicit_and_other_files_are_never_overwritten_silently() {
    let dir = common::tempdir();
    let c = dir.path().join("c");
    fs::create_dir(&c).unwrap();
    fs::write(c.join("config.json"), "{\"mine\": true}\n").unwrap();

    // No extension: an error asking for --format, nothing written.
    let line = assert_one_line_error(&run_strings(&merge_args(&c.join("merged"), "0.5", &[])));
    assert!(line.contains("--format"), "{line}");
    assert_eq!(listing(&c), ["config.json"]);

    // .safetensors next to someone's config.json: refused without --force …
    let st = c.join("merged.safetensors");
    let line = assert_one_line_error(&run_strings(&merge_args(&st, "0.5", &[])));
    assert!(
        line.contains("config.json") && line.contains("--force"),
        "{line}"
    );
    assert_eq!(listing(&c), ["config.json"]);
    assert_eq!(
        fs::read_to_string(c.join("config.json")).unwrap(),
        "{\"mine\": true}\n"
    );
    // … replaced with it, and the summary says the format.
    let mut args = merge_args(&st, "0.5", &["--force"]);
    args.retain(|a| a != "-q");
    let out = run_strings(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("safetensors file"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(listing(&c), ["config.json", "merged.safetensors"]);
    assert_ne!(
        fs::read_to_string(c.join("config.json")).unwrap(),
        "{\"mine\": true}\n"
    );

    // --format gguf on a name without extension: a GGUF file that llama.cpp can read.
    let mut args = merge_args(&c.join("merged"), "0.5", &["--format", "gguf"]);
    args.retain(|a| a != "-q");
    let out = run_strings(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("GGUF file"));
    GgufModel::open(c.join("merged")).unwrap();

    // A new directory (trailing slash): model.safetensors + config.json inside; a failed run
    // into a new directory leaves no directory behind.
    let hf = dir.path().join("hf/");
    let out = run_strings(&merge_args(&hf, "0.5", &[]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(listing(&hf), ["config.json", "model.safetensors"]);
    let bad = dir.path().join("new/deeper/");
    let out = run_strings(&merge_args(&bad, "1e30", &[]));
    assert_one_line_error(&out);
    assert!(!dir.path().join("new").exists());
    // Into an existing directory that has them: refused without --force.
    let line = assert_one_line_error(&run_strings(&merge_args(&hf, "0.5", &[])));
    assert!(line.contains("--force"), "{line}");

    // convert onto its own input.
    let smol = common::smollm2();
    let line = assert_one_line_error(&ggmerge(&["convert", s(&smol), s(&smol)]));
    assert!(line.contains("refusing to overwrite the input"), "{line}");
}

// ---------------------------------------------------------------------------------------------
// No temporary file survives
// ---------------------------------------------------------------------------------------------

/// Runs `args` with the size of any file it writes limited to `limit` bytes (the kernel refuses
/// writes past it with EFBIG: a disk that fills up at that point).
fn with_file_size_limit(args: &[String], limit: u64) -> Output {
    let blocks = limit / 1024; // bash's ulimit -f counts 1024-byte blocks
    Command::new("bash")
        .arg("-c")
        .arg(format!("trap '' XFSZ; ulimit -f {blocks}; exec \"$@\""))
        .arg("ggmerge")
        .arg(bin())
        .args(args)
        .output()
        .expect("run bash")
}

#[test]
fn a_full_disk_leaves_no_temporary_file_and_says_so_once() {
    let dir = common::tempdir();
    let out_path = dir.path().join("m.gguf");
    let ok = run_strings(&merge_args(&out_path, "0.5", &[]));
    assert!(ok.status.success());
    let size = fs::metadata(&out_path).unwrap().len();
    fs::remove_file(&out_path).unwrap();
    // Early (the header), in the middle, and within the last MiB: the final flush.
    for limit in [4096, size / 2, size - 100_000] {
        let out = with_file_size_limit(&merge_args(&out_path, "0.5", &[]), limit);
        let line = assert_one_line_error(&out);
        assert!(line.contains("disk full"), "{line}");
        assert_eq!(
            line.matches("os error").count(),
            1,
            "OS error repeated: {line}"
        );
        assert!(
            listing(dir.path()).is_empty(),
            "{limit}: {:?}",
            listing(dir.path())
        );
    }
    // The same for quantize and extract (its spill file too).
    let q = dir.path().join("q.gguf");
    let args: Vec<String> = ["quantize", s(&common::smollm2()), s(&q), "Q8_0", "-q"]
        .iter()
        .map(|x| x.to_string())
        .collect();
    assert_one_line_error(&with_file_size_limit(&args, 10 << 20));
    let f = fixture();
    let p = dir.path().join("p.dpk.gguf");
    let args: Vec<String> = [
        "extract",
        "--base",
        s(&common::smollm2()),
        "--finetuned",
        s(&f.e1),
        "-o",
        s(&p),
        "-q",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    assert_one_line_error(&with_file_size_limit(&args, 1 << 20));
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
}

/// Starts `args`, waits for its temporary output file to appear in `dir`, sends `signal`, and
/// returns the finished process's output.
fn signal_when_writing(args: &[String], dir: &Path, signal: i32) -> Output {
    let mut child: Child = Command::new(bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ggmerge");
    let started = Instant::now();
    loop {
        if !temp_files(dir).is_empty() {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("finished ({status}) before it wrote anything: {err}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no temporary file appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    child.wait_with_output().unwrap()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn ctrl_c_and_sigterm_remove_the_temporary_file_of_every_writing_command() {
    let dir = common::tempdir();
    let gemma = common::gemma3();
    let smol = common::smollm2();
    let f = fixture();
    let out = |name: &str| dir.path().join(name);
    // One thread each: long enough to be caught while writing.
    let commands: Vec<(Vec<String>, PathBuf)> = vec![
        (
            strings(&[
                "quantize",
                s(&gemma),
                s(&out("q.gguf")),
                "Q4_K_M",
                "-t",
                "1",
                "-q",
            ]),
            out("q.gguf"),
        ),
        (
            {
                let mut a = merge_args(&out("m.gguf"), "0.5", &["-t", "1", "--type", "Q4_K_M"]);
                a.retain(|x| x != "-q");
                a.push("-q".into());
                a
            },
            out("m.gguf"),
        ),
        (
            strings(&[
                "extract",
                "--base",
                s(&smol),
                "--finetuned",
                s(&f.e2),
                "-o",
                s(&out("x.dpk.gguf")),
                "-t",
                "1",
                "-q",
            ]),
            out("x.dpk.gguf"),
        ),
        (
            strings(&[
                "apply",
                "--base",
                s(&smol),
                "--expert",
                s(&f.pack1),
                "--type",
                "Q4_K_M",
                "-o",
                s(&out("a.gguf")),
                "-t",
                "1",
                "-q",
            ]),
            out("a.gguf"),
        ),
        (
            strings(&[
                "convert",
                s(&gemma),
                s(&out("hf.safetensors")),
                "--type",
                "F32",
                "-t",
                "1",
                "-q",
            ]),
            out("hf.safetensors"),
        ),
    ];
    for (i, (args, target)) in commands.iter().enumerate() {
        let (signal, code) = if i % 2 == 0 {
            (libc::SIGINT, 130)
        } else {
            (libc::SIGTERM, 143)
        };
        let done = signal_when_writing(args, dir.path(), signal);
        let err = text(&done.stderr);
        assert_eq!(done.status.code(), Some(code), "{}: {err}", args[0]);
        let last = err.trim_end().lines().last().unwrap_or("");
        assert!(
            last.starts_with("ggmerge: interrupted") || last.starts_with("ggmerge: terminated"),
            "{}: {err}",
            args[0]
        );
        assert!(
            temp_files(dir.path()).is_empty(),
            "{}: {:?}",
            args[0],
            listing(dir.path())
        );
        assert!(!target.exists(), "{}: output written", args[0]);
    }
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
}

#[test]
fn a_killed_run_leaves_a_temporary_file_that_the_next_run_removes() {
    let dir = common::tempdir();
    let target = dir.path().join("q.gguf");
    let args = strings(&[
        "quantize",
        s(&common::gemma3()),
        s(&target),
        "Q4_K_M",
        "-t",
        "1",
        "-q",
    ]);
    let done = signal_when_writing(&args, dir.path(), libc::SIGKILL);
    assert_eq!(done.status.code(), None);
    let stale = temp_files(dir.path());
    assert_eq!(stale.len(), 1, "SIGKILL cannot clean up: {stale:?}");
    // Any later run writing into the directory removes it (its process is gone).
    let other = dir.path().join("small.gguf");
    let ok = ggmerge(&["quantize", s(&common::smollm2()), s(&other), "Q8_0", "-q"]);
    assert!(ok.status.success());
    assert_eq!(listing(dir.path()), ["small.gguf"]);
}

#[test]
fn an_input_truncated_while_read_is_an_error_not_a_crash() {
    let dir = common::tempdir();
    let input = dir.path().join("input.gguf");
    fs::copy(common::gemma3(), &input).unwrap();
    let len = fs::metadata(&input).unwrap().len();
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let target = out_dir.join("q.gguf");
    let mut child = Command::new(bin())
        .args(["quantize", s(&input), s(&target), "Q4_K_M", "-t", "1", "-q"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while temp_files(&out_dir).is_empty() {
        assert!(child.try_wait().unwrap().is_none(), "finished too early");
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(2));
    }
    fs::OpenOptions::new()
        .write(true)
        .open(&input)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let done = child.wait_with_output().unwrap();
    let line = assert_one_line_error(&done);
    assert!(
        line.contains("input.gguf") && line.contains("changed while"),
        "{line}"
    );
    assert!(listing(&out_dir).is_empty(), "{:?}", listing(&out_dir));
}

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

#[test]
fn huge_parameters_are_errors_that_name_the_parameter() {
    let dir = common::tempdir();
    let out = dir.path().join("m.gguf");
    // Fits f32 but overflows the merge: named at the tensor, with the weight.
    let line = assert_one_line_error(&run_strings(&merge_args(&out, "1e30", &[])));
    assert!(
        line.contains("weight 1e30") && line.contains("math.gguf"),
        "{line}"
    );
    assert!(!line.contains("corrupt"), "{line}");
    // Does not fit f32: refused where it is parsed.
    let line = assert_one_line_error(&run_strings(&merge_args(&out, "1e39", &[])));
    assert!(
        line.contains("`weight`") && line.contains("out of range"),
        "{line}"
    );
    // lambda likewise.
    let line = assert_one_line_error(&run_strings(&merge_args(&out, "1", &["--lambda=-1e300"])));
    assert!(line.contains("`lambda`"), "{line}");
    // The same in a mergekit YAML config.
    let f = fixture();
    let yml = dir.path().join("m.yml");
    fs::write(
        &yml,
        format!(
            "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n    parameters:\n      weight: -1e300\n",
            s(&common::smollm2()),
            s(&f.e1)
        ),
    )
    .unwrap();
    let line = assert_one_line_error(&ggmerge(&["merge", s(&yml), "-o", s(&out)]));
    assert!(
        line.contains("weight") && line.contains("out of range"),
        "{line}"
    );
    // apply's PATH:WEIGHT.
    let a = ggmerge(&[
        "apply",
        "--base",
        s(&common::smollm2()),
        "--expert",
        &format!("{}:1e39", s(&f.pack1)),
        "-o",
        s(&out),
    ]);
    assert!(assert_one_line_error(&a).contains("1e39"));
    assert!(listing(dir.path()) == ["m.yml"]);
}

#[test]
fn absurd_thread_counts_are_lowered_with_a_warning() {
    let dir = common::tempdir();
    let target = dir.path().join("q.gguf");
    let mut child = Command::new(bin())
        .args([
            "quantize",
            s(&common::gemma3()),
            s(&target),
            "Q4_K_M",
            "-t",
            "100000",
            "-q",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut most = 0;
    while child.try_wait().unwrap().is_none() {
        if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
            most = most.max(tasks.count());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let done = child.wait_with_output().unwrap();
    assert!(done.status.success());
    let err = text(&done.stderr);
    let max = ggmerge::threads::max_threads();
    assert!(
        err.contains("warning: -t 100000") && err.contains(&format!("using {max}")),
        "{err}"
    );
    // Workers, the main thread and a few helpers (signals, writer).
    assert!(most <= max + 8, "{most} threads for a limit of {max}");
}

// ---------------------------------------------------------------------------------------------
// Delta packs
// ---------------------------------------------------------------------------------------------

/// Rewrites a pack with each values tensor changed by `f`, recomputing its checksum (a pack
/// that is internally consistent but says something absurd).
fn rewrite_pack(src: &Path, dst: &Path, f: impl Fn(&mut [f32])) {
    let pack = GgufModel::open(src).unwrap();
    let ty = GgmlType::from_name(
        pack.metadata()
            .get("delta.values")
            .and_then(Value::as_str)
            .unwrap(),
    )
    .unwrap();
    let specs: Vec<TensorSpec> = pack
        .tensors()
        .map(|t| TensorSpec {
            name: t.info.name.clone(),
            shape: t.info.shape.clone(),
            ty: t.info.ty,
        })
        .collect();
    let mut datas = Vec::new();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for t in pack.tensors() {
        let mut data = t.data.to_vec();
        if t.info.name.ends_with(".dv") {
            assert_eq!(t.info.ty, ty);
            let mut v = vec![0f32; t.info.n_elements() as usize];
            ggmerge::quant::dequantize(ty, t.data, &mut v, &t.info.name).unwrap();
            f(&mut v);
            if ty == GgmlType::F16 {
                // Raw F16 (NaN included, which the quantizer refuses to write).
                data = v
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect();
            } else {
                ggmerge::quant::quantize(ty, &v, v.len() as u64, &mut data, &t.info.name).unwrap();
            }
        }
        h.update(&data);
        datas.push(data);
    }
    let mut md = pack.metadata().clone();
    md.set(
        "delta.checksum",
        Value::String(format!("{:016x}", h.digest())),
    );
    let mut w = GgufWriter::create(dst, 3, &md, &specs, &[]).unwrap();
    for d in datas {
        w.write_tensor(&d).unwrap();
    }
    w.finish().unwrap();
}

fn apply(pack: &Path, out: &Path) -> Output {
    ggmerge(&[
        "apply",
        "--base",
        s(&common::smollm2()),
        "--expert",
        s(pack),
        "-o",
        s(out),
    ])
}

#[test]
fn damaged_packs_are_named_and_absurd_ones_warned_about() {
    let dir = common::tempdir();
    let f = fixture();
    let out = dir.path().join("m.gguf");

    // Bytes flipped in the data: the checksum names the pack.
    let flipped = dir.path().join("flipped.dpk.gguf");
    let mut bytes = fs::read(&f.pack1).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 1000..n - 990] {
        *b ^= 0x5a;
    }
    fs::write(&flipped, &bytes).unwrap();
    let line = assert_one_line_error(&apply(&flipped, &out));
    assert!(
        line.contains("flipped.dpk.gguf") && line.contains("checksum"),
        "{line}"
    );

    // NaN values behind a valid checksum: the pack is the culprit, not the base.
    let nan = dir.path().join("nan.dpk.gguf");
    rewrite_pack(&f.pack1, &nan, |v| v[0] = f32::NAN);
    let line = assert_one_line_error(&apply(&nan, &out));
    assert!(
        line.contains("nan.dpk.gguf: tensor") && line.contains("NaN"),
        "{line}"
    );

    // Values of 60000 behind a valid checksum: merged, with a warning.
    let huge = dir.path().join("huge.dpk.gguf");
    rewrite_pack(&f.pack1, &huge, |v| v.iter_mut().for_each(|x| *x = 60000.0));
    let done = apply(&huge, &out);
    let err = text(&done.stderr);
    assert!(
        err.contains("warning: ") && err.contains("huge.dpk.gguf"),
        "{err}"
    );
    assert!(
        err.contains("times the size of the base's weights"),
        "{err}"
    );

    // A good pack gives no such warning, and inspect shows its checksum.
    let done = apply(&f.pack1, &out);
    assert!(done.status.success());
    assert!(
        !text(&done.stderr).contains("times the size"),
        "{}",
        text(&done.stderr)
    );
    let inspect = ggmerge(&["inspect", s(&f.pack1)]);
    assert!(
        text(&inspect.stdout).contains("checksum:      verified"),
        "{}",
        text(&inspect.stdout)
    );
}

// ---------------------------------------------------------------------------------------------
// Runtime arguments and chat
// ---------------------------------------------------------------------------------------------

#[test]
fn runtime_arguments_are_checked_before_loading_and_chat_refuses_bad_commands() {
    let smol = common::smollm2();
    let f = fixture();
    // Bad arguments: refused without loading the model (no "loaded" line).
    for bad in [
        vec!["--method", "bogus"],
        vec!["--temp=-1"],
        vec!["-t", "0"],
        vec!["--expert", "/nonexistent/x.dpk.gguf"],
    ] {
        let mut args = vec!["run", "--base", s(&smol), "-p", "Hi", "-n", "1"];
        args.extend(bad.iter().copied());
        let out = ggmerge(&args);
        let err = text(&out.stderr);
        // Usage errors are clap's (exit 2, with the accepted values); the rest one line.
        if out.status.code() != Some(2) {
            assert_one_line_error(&out);
        }
        assert!(err.starts_with("error: "), "{bad:?}: {err}");
        assert!(!err.contains("loaded"), "{bad:?}: {err}");
    }
    // -c 0: the model's training context, as in llama.cpp.
    let out = ggmerge(&["run", "--base", s(&smol), "-p", "Hi", "-n", "2", "-c", "0"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let expert = format!("{}:0", s(&f.pack1));
    let mut child = Command::new(bin())
        .args([
            "chat",
            "--base",
            s(&smol),
            "--expert",
            &expert,
            "-n",
            "4",
            "-c",
            "256",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"/experts math=1e39\n/experts math=1 math=2\n/expert math=1\n/experts math=0.5\n/quit\n")
            .unwrap();
    }
    let done = child.wait_with_output().unwrap();
    assert!(done.status.success(), "{}", text(&done.stderr));
    let out = text(&done.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("error:") && lines[0].contains("1e39"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("error:") && lines[1].contains("twice"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("error: unknown command /expert"),
        "{out}"
    );
    assert!(lines[3].starts_with("experts: math=0.5"), "{out}");
}

#[test]
fn eval_names_the_line_of_a_question_that_does_not_fit() {
    let dir = common::tempdir();
    let q = dir.path().join("q.jsonl");
    let long = " word".repeat(80);
    fs::write(
        &q,
        format!(
            "{{\"prompt\": \"Q: capital of France?\\nA:\", \"answer\": \" Paris\"}}\n\n{{\"prompt\": \"Q: x\\nA:\", \"answer\": \"{long}\"}}\n"
        ),
    )
    .unwrap();
    let out = ggmerge(&[
        "eval",
        "--base",
        s(&common::smollm2()),
        "-f",
        s(&q),
        "-c",
        "32",
    ]);
    let line = assert_one_line_error(&out);
    assert!(line.contains("q.jsonl: line 3"), "{line}");
}

#[test]
fn a_closed_pipe_ends_printing_quietly() {
    let smol = common::smollm2();
    for args in [
        vec!["inspect", s(&smol), "--json"],
        vec!["inspect", s(&smol), "--metadata", "--tensors"],
    ] {
        let mut child = Command::new(bin())
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away at once: every write the child makes meets a closed pipe.
        drop(child.stdout.take());
        let done = child.wait_with_output().unwrap();
        assert_eq!(done.status.code(), Some(0), "{}", text(&done.stderr));
        assert!(done.stderr.is_empty(), "{}", text(&done.stderr));
    }
}

#[test]
fn a_non_gguf_file_named_gguf_is_reported_as_not_gguf() {
    let dir = common::tempdir();
    let fake = dir.path().join("fake.gguf");
    fs::write(&fake, b"this is not a model at all").unwrap();
    let out = dir.path().join("m.gguf");
    let f = fixture();
    let o = ggmerge(&[
        "merge",
        "--base",
        s(&common::smollm2()),
        "--model",
        s(&fake),
        "--weight",
        "1",
        "--model",
        s(&f.e1),
        "--weight",
        "1",
        "--method",
        "task_arithmetic",
        "-o",
        s(&out),
    ]);
    let line = assert_one_line_error(&o);
    assert!(
        line.contains("fake.gguf") && line.contains("not a GGUF file"),
        "{line}"
    );
    assert!(!line.contains("safetensors"), "{line}");
}
