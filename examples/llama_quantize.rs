//! llama.cpp's own quantizer (`llama_model_quantize`, the engine of `llama-quantize`, from the
//! llama.cpp ggmerge links) as a command, so that benchmarks can time it and measure its memory
//! the way they measure `ggmerge quantize` (`scripts/bench-scale.sh`). Same call as the tests'
//! (tests/common/llama.rs): llama.cpp's default parameters, requantization allowed.
//!
//! ```sh
//! cargo run --release --example llama_quantize -- IN.gguf OUT.gguf Q4_K_M -t 2
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use ggmerge::quant::Target;

#[path = "../tests/common/llama.rs"]
mod llama;

const USAGE: &str = "usage: llama_quantize IN.gguf OUT.gguf TYPE [-t THREADS]
  TYPE     a llama.cpp file type (Q8_0, Q4_K_M, F16, ...), as `ggmerge quantize` takes it
  -t N     threads (default: all cores)";

fn main() -> ExitCode {
    let mut positional = Vec::new();
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "-t" => match args.next().and_then(|v| v.parse().ok()) {
                Some(n) => threads = n,
                None => {
                    eprintln!("llama_quantize: -t needs a number\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            _ => positional.push(a),
        }
    }
    let [input, output, ty]: [String; 3] = match positional.try_into() {
        Ok(p) => p,
        Err(_) => {
            eprintln!("llama_quantize: expected IN.gguf OUT.gguf TYPE\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let target = match Target::parse(&ty, false) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("llama_quantize: {e}");
            return ExitCode::from(2);
        }
    };
    llama::llama_quantize(
        &PathBuf::from(input),
        &PathBuf::from(output),
        target.ftype.id,
        threads as i32,
    );
    ExitCode::SUCCESS
}
