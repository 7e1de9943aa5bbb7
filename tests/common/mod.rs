//! Shared helpers of the integration tests: where the real test models are.
//!
//! The models are fetched by `scripts/fetch-models.sh` (the README's test command runs it);
//! a missing model is a test failure with that advice, never a silent skip.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod experts;
pub mod llama;
pub mod tiny_model;

/// The model cache: `$GGMERGE_MODELS`, else `.cache/models` in the repository.
pub fn models_dir() -> PathBuf {
    std::env::var_os("GGMERGE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models"))
}

fn model(name: &str) -> PathBuf {
    let p = models_dir().join(name);
    assert!(
        p.is_file(),
        "test model {} is missing: run scripts/fetch-models.sh (the README's test command does)",
        p.display()
    );
    p
}

/// SmolLM2-135M-Instruct, Q4_1 (llama arch, 272 tensors, tied embeddings).
pub fn smollm2() -> PathBuf {
    model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Gemma 3 270M, Q4_K_M as written by llama-quantize (gemma3 arch, 236 tensors).
pub fn gemma3() -> PathBuf {
    model("gemma-3-270m-q4_k_m.gguf")
}

/// Layers the runtime tests offload to a GPU: `$GGMERGE_TEST_NGL` (a number or `all`), else 0.
/// scripts/test-vulkan.sh sets it to run the runtime suites on a Vulkan device.
pub fn test_gpu_layers() -> i32 {
    match std::env::var("GGMERGE_TEST_NGL").as_deref() {
        Ok("all") => -1,
        Ok(n) => n
            .parse()
            .expect("GGMERGE_TEST_NGL: a number of layers or `all`"),
        Err(_) => 0,
    }
}

/// The Python interpreter with gguf-py installed (`$GGMERGE_PYTHON`, else `python3`).
pub fn python() -> String {
    std::env::var("GGMERGE_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// An error with its sources, as the CLI prints it (`error: A: B: C`): library errors carry
/// their cause as a source, not in their own message.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A fresh temporary directory for a test's outputs.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

/// A temporary directory for files shared by a test binary's tests (kept in a `static`, whose
/// `TempDir` is never dropped): removed when the test process exits.
pub fn shared_tempdir() -> tempfile::TempDir {
    use std::sync::{Mutex, Once};
    static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static REGISTER: Once = Once::new();
    extern "C" fn remove_shared() {
        if let Ok(dirs) = DIRS.lock() {
            for d in dirs.iter() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
    // SAFETY: `remove_shared` is a plain function that neither unwinds nor needs anything but
    // `DIRS`, a static that outlives every exit handler.
    REGISTER.call_once(|| unsafe {
        libc::atexit(remove_shared);
    });
    let dir = tempdir();
    DIRS.lock()
        .expect("shared directories")
        .push(dir.path().to_path_buf());
    dir
}

/// Runs the `ggmerge` binary built for these tests with `args`.
pub fn ggmerge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ggmerge"))
        .args(args)
        .output()
        .expect("run ggmerge")
}

/// Bytes of a process's output as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Two packs, `math` and `code` (F16 values, density 0.2), of two synthetic SmolLM2
/// fine-tunes, made once per test binary: (their directory, math, code).
pub fn smollm2_pack_pair() -> &'static (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    use std::sync::OnceLock;
    static P: OnceLock<(tempfile::TempDir, std::path::PathBuf, std::path::PathBuf)> =
        OnceLock::new();
    P.get_or_init(|| {
        let dir = shared_tempdir();
        let base = smollm2();
        let mut p = experts::packs_of(&base, dir.path(), &[(21, "math"), (22, "code")], 0.2, 5);
        let code = p.pop().unwrap();
        let math = p.pop().unwrap();
        (dir, math, code)
    })
}
