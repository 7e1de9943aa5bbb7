//! Writes a synthetic "fine-tune" of a GGUF model: every 2-D weight perturbed by Gaussian noise
//! of RMS `rel` × the tensor's RMS, stored as `--type`; 1-D tensors copied unchanged. The same
//! generator as the tests' (tests/common/experts.rs), for benchmarks and manual experiments.
//!
//! ```sh
//! cargo run --release --example make_expert -- BASE.gguf OUT.gguf --seed 1 --rel 1e-3 --type F16
//! cargo run --release --example make_expert -- BASE.gguf OUT.gguf --only blk.0.,blk.1.
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use ggmerge::format::GgmlType;

#[path = "../tests/common/experts.rs"]
mod experts;

const USAGE: &str = "\
usage: make_expert BASE.gguf OUT.gguf [--seed N] [--rel X] [--type TYPE] [--only LIST]
  --seed N     noise seed (default 1)
  --rel X      noise RMS relative to each tensor's RMS (default 1e-3)
  --type TYPE  ggml type of the 2-D weights, e.g. F16, BF16, Q8_0 (default F16)
  --only LIST  perturb only tensors whose name contains one of these comma-separated strings
               (the others are still written as TYPE, unchanged); default: all";

struct Args {
    base: PathBuf,
    out: PathBuf,
    seed: u64,
    rel: f32,
    ty: GgmlType,
    only: Vec<String>,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut positional = Vec::new();
    let (mut seed, mut rel, mut ty, mut only) = (1u64, 1e-3f32, GgmlType::F16, Vec::new());
    while let Some(a) = args.next() {
        let mut value = |flag: &str| args.next().ok_or_else(|| format!("{flag} needs a value"));
        match a.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--seed" => {
                let v = value("--seed")?;
                seed = v
                    .parse()
                    .map_err(|_| format!("--seed {v:?}: not an unsigned integer"))?;
            }
            "--rel" => {
                let v = value("--rel")?;
                rel = v
                    .parse()
                    .ok()
                    .filter(|x: &f32| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| format!("--rel {v:?}: not a non-negative number"))?;
            }
            "--type" => {
                let v = value("--type")?;
                ty = GgmlType::from_name(&v)
                    .ok_or_else(|| format!("--type {v:?}: unknown ggml type"))?;
            }
            "--only" => {
                only = value("--only")?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
            }
            s if s.starts_with('-') && s.len() > 1 => return Err(format!("unknown option {s}")),
            _ => positional.push(a),
        }
    }
    let [base, out]: [String; 2] = positional
        .try_into()
        .map_err(|p: Vec<String>| format!("expected BASE.gguf OUT.gguf, got {} paths", p.len()))?;
    Ok(Args {
        base: base.into(),
        out: out.into(),
        seed,
        rel,
        ty,
        only,
    })
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("make_expert: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if !args.base.is_file() {
        eprintln!("make_expert: {}: no such file", args.base.display());
        return ExitCode::from(2);
    }
    let started = Instant::now();
    let only: Vec<&str> = args.only.iter().map(String::as_str).collect();
    experts::make_expert(&args.base, &args.out, args.seed, args.rel, args.ty, &only);
    eprintln!(
        "make_expert: wrote {} (seed {}, rel {}, {}) in {:.1} s",
        args.out.display(),
        args.seed,
        args.rel,
        args.ty.name(),
        started.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}
