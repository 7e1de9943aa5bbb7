//! Writes a synthetic llama-architecture model of a chosen size with ggmerge's own GGUF writer:
//! random weights (normal, std 0.02; norms 1), F16 or F32 matrices, grouped-query attention,
//! tied embeddings, and every `tokenizer.*` key of a real llama GGUF (SmolLM2's, from the
//! fixtures) so that llama.cpp could load it. For benchmarks at sizes the fixtures do not have
//! (`scripts/bench-scale.sh`); nothing is downloaded.
//!
//! ```sh
//! cargo run --release --example make_llama -- --size 1.1b --tokenizer-from SMOL.gguf OUT.gguf
//! ```
//!
//! Sizes (with SmolLM2's 49152-token vocabulary):
//!
//! | size | layers | embedding | feed-forward | heads / kv heads | parameters | F16 file |
//! |---|---|---|---|---|---|---|
//! | 0.1b | 12 | 768 | 2048 | 12 / 4 | 113 M | 0.23 GB |
//! | 0.5b | 24 | 1024 | 5632 | 16 / 4 | 529 M | 1.06 GB |
//! | 1.1b | 22 | 2048 | 5632 | 32 / 4 | 1071 M | 2.14 GB |
//!
//! Data is generated in parallel, 1 Mi elements per task from a seed of its own, and written
//! slab by slab: the generator holds a few MiB whatever the size.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use ggmerge::format::gguf::{GgufModel, GgufWriter, Metadata, TensorSpec, Value};
use ggmerge::format::GgmlType;
use half::f16;
use rayon::prelude::*;

#[path = "../tests/common/experts.rs"]
mod experts;
use experts::Noise;

const USAGE: &str = "\
usage: make_llama --size 0.1b|0.5b|1.1b --tokenizer-from LLAMA.gguf OUT.gguf [--seed N] [--type F16|F32]
  --size S               one of the presets (see the example's docs)
  --tokenizer-from FILE  a llama GGUF whose tokenizer.* keys are copied (e.g. SmolLM2's)
  --seed N               weights seed (default 1)
  --type T               type of the weight matrices: F16 (default) or F32";

/// Elements generated per parallel task (each from its own seed).
const TASK_ELEMS: usize = 1 << 20;

/// A model shape.
#[derive(Clone, Copy, Debug)]
struct Shape {
    blocks: u64,
    n_embd: u64,
    n_ff: u64,
    heads: u64,
    heads_kv: u64,
}

fn preset(size: &str) -> Option<Shape> {
    let s = |blocks, n_embd, n_ff, heads, heads_kv| Shape {
        blocks,
        n_embd,
        n_ff,
        heads,
        heads_kv,
    };
    Some(match size {
        "0.1b" => s(12, 768, 2048, 12, 4),
        "0.5b" => s(24, 1024, 5632, 16, 4),
        "1.1b" => s(22, 2048, 5632, 32, 4),
        _ => return None,
    })
}

struct Args {
    shape: Shape,
    size: String,
    tokenizer_from: PathBuf,
    out: PathBuf,
    seed: u64,
    ty: GgmlType,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut size, mut tok, mut seed, mut ty, mut out) = (None, None, 1u64, GgmlType::F16, None);
    while let Some(a) = args.next() {
        let mut value = |flag: &str| args.next().ok_or_else(|| format!("{flag} needs a value"));
        match a.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--size" => size = Some(value("--size")?),
            "--tokenizer-from" => tok = Some(PathBuf::from(value("--tokenizer-from")?)),
            "--seed" => {
                let v = value("--seed")?;
                seed = v
                    .parse()
                    .map_err(|_| format!("--seed {v:?}: not an unsigned integer"))?;
            }
            "--type" => {
                let v = value("--type")?;
                ty = GgmlType::from_name(&v)
                    .filter(|t| matches!(*t, GgmlType::F16 | GgmlType::F32))
                    .ok_or_else(|| format!("--type {v:?}: F16 or F32"))?;
            }
            s if s.starts_with('-') && s.len() > 1 => return Err(format!("unknown option {s}")),
            _ if out.is_none() => out = Some(PathBuf::from(a)),
            _ => return Err(format!("unexpected argument {a:?}")),
        }
    }
    let size = size.ok_or("--size is required")?;
    let shape = preset(&size).ok_or_else(|| format!("--size {size:?}: 0.1b, 0.5b or 1.1b"))?;
    Ok(Args {
        shape,
        size,
        tokenizer_from: tok.ok_or("--tokenizer-from is required")?,
        out: out.ok_or("OUT.gguf is required")?,
        seed,
        ty,
    })
}

/// The metadata: llama hyper-parameters and the tokenizer of `src`.
fn metadata(src: &GgufModel, shape: Shape, n_vocab: u64, size: &str, ty: GgmlType) -> Metadata {
    let mut meta = Metadata::new();
    let s = |v: &str| Value::String(v.into());
    let u = |v: u64| Value::U32(v as u32);
    meta.set("general.architecture", s("llama"));
    meta.set("general.type", s("model"));
    meta.set("general.name", s(&format!("synthetic-llama-{size}")));
    // llama.cpp's file types: ALL_F32 = 0, MOSTLY_F16 = 1.
    meta.set(
        "general.file_type",
        Value::U32(u32::from(ty == GgmlType::F16)),
    );
    let arch = |k: &str| format!("llama.{k}");
    meta.set(arch("vocab_size"), u(n_vocab));
    meta.set(arch("context_length"), u(2048));
    meta.set(arch("embedding_length"), u(shape.n_embd));
    meta.set(arch("block_count"), u(shape.blocks));
    meta.set(arch("feed_forward_length"), u(shape.n_ff));
    meta.set(arch("attention.head_count"), u(shape.heads));
    meta.set(arch("attention.head_count_kv"), u(shape.heads_kv));
    meta.set(arch("rope.dimension_count"), u(shape.n_embd / shape.heads));
    meta.set(arch("rope.freq_base"), Value::F32(10000.0));
    meta.set(arch("attention.layer_norm_rms_epsilon"), Value::F32(1e-5));
    for (k, v) in src.metadata().iter() {
        if k.starts_with("tokenizer.") {
            meta.set(k, v.clone());
        }
    }
    meta
}

/// The tensors, in llama.cpp's order (tied embeddings: no `output.weight`).
fn tensors(shape: Shape, n_vocab: u64, ty: GgmlType) -> Vec<TensorSpec> {
    let (e, f) = (shape.n_embd, shape.n_ff);
    let kv = e / shape.heads * shape.heads_kv;
    let mut specs = vec![(String::from("token_embd.weight"), vec![e, n_vocab])];
    for b in 0..shape.blocks {
        for (t, dims) in [
            ("attn_norm", vec![e]),
            ("attn_q", vec![e, e]),
            ("attn_k", vec![e, kv]),
            ("attn_v", vec![e, kv]),
            ("attn_output", vec![e, e]),
            ("ffn_norm", vec![e]),
            ("ffn_gate", vec![e, f]),
            ("ffn_up", vec![e, f]),
            ("ffn_down", vec![f, e]),
        ] {
            specs.push((format!("blk.{b}.{t}.weight"), dims));
        }
    }
    specs.push(("output_norm.weight".into(), vec![e]));
    specs
        .into_iter()
        .map(|(name, dims)| TensorSpec {
            ty: if dims.len() == 1 { GgmlType::F32 } else { ty },
            name,
            shape: dims,
        })
        .collect()
}

/// Fills `out` (elements `first..` of tensor `index`) with weights, in parallel; the values
/// depend only on (seed, tensor, element), never on the slab size or thread count.
fn generate(seed: u64, index: usize, first: usize, out: &mut [f32]) {
    debug_assert_eq!(first % TASK_ELEMS, 0);
    out.par_chunks_mut(TASK_ELEMS)
        .enumerate()
        .for_each(|(k, chunk)| {
            let task = (first / TASK_ELEMS + k) as u64;
            let mut noise = Noise::new(
                seed ^ (index as u64).wrapping_mul(0x2545_F491_4F6C_DD1D) ^ task.rotate_left(32),
            );
            for x in chunk {
                *x = 0.02 * noise.normal();
            }
        });
}

fn write(args: &Args) -> Result<(u64, u64), String> {
    let src = GgufModel::open(&args.tokenizer_from)
        .map_err(|e| format!("{}: {e}", args.tokenizer_from.display()))?;
    let n_vocab = match src.metadata().get("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) => a.len() as u64,
        _ => {
            return Err(format!(
                "{} has no tokenizer.ggml.tokens",
                args.tokenizer_from.display()
            ))
        }
    };
    let meta = metadata(&src, args.shape, n_vocab, &args.size, args.ty);
    let specs = tensors(args.shape, n_vocab, args.ty);
    let inputs: [&Path; 1] = [&args.tokenizer_from];
    let err = |e: ggmerge::format::FormatError| e.to_string();
    let mut w = GgufWriter::create(&args.out, 3, &meta, &specs, &inputs).map_err(err)?;
    let mut buf = vec![0f32; 8 * TASK_ELEMS];
    let mut bytes: Vec<u8> = Vec::new();
    let mut params = 0u64;
    for (index, spec) in specs.iter().enumerate() {
        let n: u64 = spec.shape.iter().product();
        params += n;
        let mut first = 0usize;
        while (first as u64) < n {
            let k = (n - first as u64).min(buf.len() as u64) as usize;
            let slab = &mut buf[..k];
            if spec.shape.len() == 1 {
                slab.fill(1.0);
            } else {
                generate(args.seed, index, first, slab);
            }
            bytes.clear();
            match spec.ty {
                GgmlType::F16 => {
                    bytes.extend(slab.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()))
                }
                _ => bytes.extend(slab.iter().flat_map(|x| x.to_le_bytes())),
            }
            w.write_part(&bytes).map_err(err)?;
            first += k;
        }
        w.end_tensor().map_err(err)?;
    }
    Ok((params, w.finish().map_err(err)?))
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("make_llama: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    match write(&args) {
        Ok((params, bytes)) => {
            eprintln!(
                "make_llama: wrote {} ({:.0} M parameters, {:.2} GB) in {:.1} s",
                args.out.display(),
                params as f64 / 1e6,
                bytes as f64 / 1e9,
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("make_llama: {e}");
            ExitCode::FAILURE
        }
    }
}
