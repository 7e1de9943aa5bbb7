//! Every command and option, with its help text, in one place.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Merge fine-tuned models directly on GGUF (quantized or not), requantize, inspect.
#[derive(Parser, Debug)]
#[command(name = "ggmerge", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show a GGUF model: architecture, parameters, size, types with bits per weight, metadata
    /// and tensors.
    ///
    /// Example: ggmerge inspect SmolLM2-135M-Instruct.Q4_1.gguf --tensors
    Inspect(InspectArgs),
    /// Requantize a GGUF model to a type or llama.cpp mixture (same rules as llama-quantize).
    ///
    /// TYPE is a llama.cpp file type: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K,
    /// Q2_K_S, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M (alias Q4_K), Q5_K_S, Q5_K_M (alias Q5_K),
    /// Q6_K, IQ4_NL, IQ4_XS, IQ3_S, IQ3_M, IQ3_XS, TQ1_0, TQ2_0, Q1_0, Q2_0. Mixtures give some
    /// tensors more bits (attn_v, some ffn_down layers, the output) and fall back to a
    /// compatible type where a row length is not a multiple of the block size (Q4_K → Q5_0,
    /// Q6_K → Q8_0 …); norms and other 1-D tensors keep their type. Use --pure for one type
    /// everywhere. Requantizing an already quantized model compounds the rounding error: start
    /// from F16/BF16/F32 when you can.
    ///
    /// Example: ggmerge quantize model-f16.gguf model-Q4_K_M.gguf Q4_K_M -t 8
    Quantize(QuantizeArgs),
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The GGUF file (for a split model, any of its shards).
    pub file: PathBuf,
    /// Print machine-readable JSON (everything, tensors and metadata included).
    #[arg(long)]
    pub json: bool,
    /// List every tensor (name, type, shape, size).
    #[arg(long)]
    pub tensors: bool,
    /// List all metadata (long arrays are summarized); by default tokenizer arrays are hidden.
    #[arg(long)]
    pub metadata: bool,
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Input GGUF model (any type; split models: any shard).
    pub input: PathBuf,
    /// Output GGUF file (written to a temporary file, renamed when complete).
    pub output: PathBuf,
    /// Target type or mixture, e.g. Q4_K_M, Q8_0, F16 (case-insensitive).
    #[arg(value_name = "TYPE")]
    pub ty: String,
    /// Threads (default: all cores). Output is byte-identical for any count.
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Quantize every quantizable tensor to TYPE's base type, without per-tensor rules
    /// (llama-quantize --pure).
    #[arg(long)]
    pub pure: bool,
    /// No progress bar or summary.
    #[arg(short, long)]
    pub quiet: bool,
}
