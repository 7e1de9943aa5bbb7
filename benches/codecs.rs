//! Codec and quantize throughput on real tensors (not a test: prints numbers).
//!
//! `cargo bench --bench codecs` prints, for every type ggmerge can produce, quantize and
//! dequantize throughput on real SmolLM2 weights (dequantized from the Q4_1 fixture), and
//! `ggmerge quantize` of whole models next to llama.cpp's own `llama_model_quantize` run in the
//! same process with the same threads, as a ratio. Models: scripts/fetch-models.sh.

use std::path::PathBuf;
use std::time::Instant;

use ggmerge::format::gguf::GgufModel;
use ggmerge::format::GgmlType;
use ggmerge::quant::{self, QuantizeSupport, Target};
use ggmerge::{quantize_model, NoProgress, QuantizeOptions};
#[path = "../tests/common/llama.rs"]
mod llama;
use llama::llama_quantize;

fn models_dir() -> PathBuf {
    std::env::var_os("GGMERGE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models"))
}

/// Best of `reps` timings of `f`, in seconds.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let smol = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let gemma = models_dir().join("gemma-3-270m-q4_k_m.gguf");
    let model = GgufModel::open(&smol).expect("run scripts/fetch-models.sh first");

    // Real weights: the FFN and attention matrices of the first 4 layers, as f32.
    let mut rows: Vec<f32> = Vec::new();
    for t in model.tensors() {
        let n = &t.info.name;
        if t.info.ty == GgmlType::Q4_1
            && ["blk.0.", "blk.1.", "blk.2.", "blk.3."]
                .iter()
                .any(|p| n.starts_with(p))
        {
            let mut buf = vec![0f32; t.info.n_elements() as usize];
            quant::dequantize(t.info.ty, t.data, &mut buf, n).unwrap();
            rows.extend(buf);
        }
    }
    // 1536 divides every row length below; truncate to whole rows of 1536 (a multiple of 256).
    let n_per_row = 1536u64;
    rows.truncate(rows.len() / n_per_row as usize * n_per_row as usize);
    let n = rows.len();
    println!(
        "codec throughput on {:.1} M real SmolLM2 weights, {threads} threads (best of 3)",
        n as f64 / 1e6
    );
    println!(
        "{:<8} {:>14} {:>16}",
        "type", "quantize Mw/s", "dequantize Mw/s"
    );
    for ty in GgmlType::all() {
        if ty.traits().quantize != QuantizeSupport::Yes {
            continue;
        }
        let mut q = vec![0u8; ty.row_bytes(n_per_row).unwrap() as usize * (n / n_per_row as usize)];
        let tq = best_of(3, || {
            quant::quantize(ty, &rows, n_per_row, &mut q, "bench").unwrap()
        });
        let mut back = vec![0f32; n];
        let td = best_of(3, || quant::dequantize(ty, &q, &mut back, "bench").unwrap());
        println!(
            "{:<8} {:>14.1} {:>16.1}",
            ty.name(),
            n as f64 / tq / 1e6,
            n as f64 / td / 1e6
        );
    }

    println!();
    println!("whole-model quantize, {threads} threads, vs llama_model_quantize (same llama.cpp, same run; best of 2)");
    println!(
        "{:<34} {:>10} {:>12} {:>8}",
        "model -> mixture", "ggmerge s", "llama.cpp s", "ratio"
    );
    let dir = std::env::temp_dir().join(format!("ggmerge-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (path, label) in [(&smol, "SmolLM2 Q4_1"), (&gemma, "Gemma3 Q4_K_M")] {
        if !path.exists() {
            continue;
        }
        for mixture in ["Q4_K_M", "Q8_0", "F16"] {
            let target = Target::parse(mixture, false).unwrap();
            let ours = dir.join("ours.gguf");
            let theirs = dir.join("theirs.gguf");
            let opts = QuantizeOptions {
                target,
                threads: Some(threads),
            };
            let a = best_of(2, || {
                quantize_model(path, &ours, &opts, &NoProgress).unwrap();
            });
            let b = best_of(2, || {
                llama_quantize(path, &theirs, target.ftype.id, threads as i32)
            });
            println!(
                "{:<34} {:>10.2} {:>12.2} {:>8.2}",
                format!("{label} -> {mixture}"),
                a,
                b,
                a / b
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
