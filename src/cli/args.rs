//! Every command and option, with its help text, in one place. Choices (methods, sparsifiers,
//! rescale rules, types and mixtures) come from the library's tables, so `--help` lists them
//! and a typo is refused with the list — never from a list typed here.

use std::path::PathBuf;

use anyhow::bail;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};

use ggmerge::format::ggml_type::{QuantizeSupport, TYPES};
use ggmerge::format::GgmlType;
use ggmerge::merge::method::{Method, Rescale, Sparsifier};
use ggmerge::quant::{Requant, FTYPES};
use ggmerge::runtime::{backend, ModelOptions};

/// A parser accepting `methods` by their mergekit names.
fn methods(methods: &'static [Method]) -> impl TypedValueParser<Value = Method> {
    PossibleValuesParser::new(methods.iter().map(|m| PossibleValue::new(m.name())))
        .try_map(|s| Method::from_name(&s).ok_or("unknown method"))
}

fn all_methods() -> impl TypedValueParser<Value = Method> {
    methods(&Method::ALL)
}

pub(super) fn pack_methods() -> impl TypedValueParser<Value = Method> {
    methods(&Method::COMBINING_PACKS)
}

fn pack_sparsifiers() -> impl TypedValueParser<Value = Sparsifier> {
    let names = ggmerge::flows::extract::PACK_SPARSIFIERS.map(|s| PossibleValue::new(s.name()));
    PossibleValuesParser::new(names).try_map(|s| Sparsifier::from_name(&s).ok_or("unknown"))
}

fn rescales() -> impl TypedValueParser<Value = Rescale> {
    PossibleValuesParser::new(Rescale::ALL.map(|r| PossibleValue::new(r.name())))
        .try_map(|s| Rescale::from_name(&s).ok_or("unknown rescale"))
}

/// Requantization modes, each with its help line.
pub(super) fn requants() -> impl TypedValueParser<Value = Requant> {
    let help = |r: Requant| {
        match r {
        Requant::Full => "ggml's quantizer on every changed chunk (new scales, every element rounded again)",
        Requant::Grid => "the base's scales kept: unchanged blocks keep their bytes, changed elements move to the nearest code",
        Requant::GridStochastic => "as grid, changed elements rounded up or down at random so the expected change equals the delta (seeded by --seed; 0 at run time)",
    }
    };
    PossibleValuesParser::new(Requant::ALL.map(|r| PossibleValue::new(r.name()).help(help(r))))
        .try_map(|s| Requant::from_name(&s).ok_or("unknown requantization mode"))
}

/// What `--requant` says, shared by every command that has it.
macro_rules! requant_help {
    () => {
        "How merged tensors that keep the base's type are requantized: full, grid (on the \
         base's own grid: untouched blocks keep their bytes) or grid-stochastic. Blocks where a \
         changed value does not fit on the grid are requantized in full (merge and apply count \
         them in their summary); types without a grid are always requantized in full."
    };
}
pub(super) const REQUANT_HELP: &str = requant_help!();
/// `merge`'s `--requant`, whose default comes from the config.
const MERGE_REQUANT_HELP: &str = concat!(
    requant_help!(),
    " Default: the config's `requant`, else grid-stochastic."
);

/// The value types of a pack.
fn pack_values() -> impl TypedValueParser<Value = GgmlType> {
    let types = [GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::F32];
    PossibleValuesParser::new(types.map(|t| PossibleValue::new(t.name())))
        .try_map(|s| GgmlType::from_name(&s).ok_or("unknown type"))
}

/// ggml types ggmerge can produce (convert's `--type`).
fn ggml_types() -> impl TypedValueParser<Value = GgmlType> {
    let names = TYPES
        .iter()
        .filter(|t| t.quantize == QuantizeSupport::Yes)
        .map(|t| PossibleValue::new(t.name));
    PossibleValuesParser::new(names).try_map(|s| GgmlType::from_name(&s).ok_or("unknown type"))
}

/// llama.cpp's file types (`llama-quantize` names, with its short aliases).
fn mixtures() -> PossibleValuesParser {
    PossibleValuesParser::new(FTYPES.iter().map(|f| {
        let v = PossibleValue::new(f.name);
        match ggmerge::quant::mixture::alias_of(f.name) {
            Some(a) => v.alias(a),
            None => v,
        }
    }))
}

/// ggml types ggmerge can produce, and llama.cpp's file types (a merge output type).
fn types_and_mixtures() -> PossibleValuesParser {
    let mut values: Vec<PossibleValue> = FTYPES
        .iter()
        .map(|f| {
            let v = PossibleValue::new(f.name);
            match ggmerge::quant::mixture::alias_of(f.name) {
                Some(a) => v.alias(a),
                None => v,
            }
        })
        .collect();
    for t in TYPES.iter().filter(|t| t.quantize == QuantizeSupport::Yes) {
        if !values.iter().any(|v| v.matches(t.name, true)) {
            values.push(PossibleValue::new(t.name));
        }
    }
    PossibleValuesParser::new(values)
}

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
    /// TYPE is a llama.cpp file type (Q4_K means Q4_K_M, as in llama-quantize; those that need
    /// an importance matrix are refused with an explanation). Mixtures give some tensors more
    /// bits (attn_v, some ffn_down layers, the output) and fall back to a
    /// compatible type where a row length is not a multiple of the block size (Q4_K → Q5_0,
    /// Q6_K → Q8_0 …); norms and other 1-D tensors keep their type. Use --pure for one type
    /// everywhere. Requantizing an already quantized model compounds the rounding error: start
    /// from F16/BF16/F32 when you can.
    ///
    /// Example: ggmerge quantize model-f16.gguf model-Q4_K_M.gguf Q4_K_M -t 8
    Quantize(QuantizeArgs),
    /// Merge fine-tuned models into a base: DARE, TIES, task arithmetic, breadcrumbs, DELLA,
    /// SLERP, linear — directly on GGUF (any quantization) and safetensors.
    ///
    /// Either give a mergekit YAML (or native TOML) config, or the short form: --base, then
    /// each --model followed by its own --weight/--density/--gamma/--epsilon (values given
    /// before the first --model apply to every model).
    ///
    /// Examples:
    ///   ggmerge merge --base base.Q4_K_M.gguf --model math.gguf --weight 0.5 --density 0.1
    ///       --model code.gguf --weight 0.5 --density 0.1 --method dare_ties -o merged.gguf
    ///   ggmerge merge merge.yml -o merged.gguf --type Q4_K_M --seed 42
    ///
    /// Output tensors keep the base's types unless --type is given (a ggml type such as Q8_0
    /// for every weight matrix, or a llama.cpp mixture such as Q4_K_M). Tensors no model
    /// changes are copied verbatim. Same inputs and seed give byte-identical output for any
    /// thread count.
    Merge(MergeArgs),
    /// Convert between GGUF and safetensors (Hugging Face names, with llama.cpp's q/k
    /// permutation and Gemma norm offset undone or applied) for llama, mistral, qwen2, qwen3,
    /// gemma2 and gemma3.
    ///
    /// GGUF → safetensors: OUTPUT is a .safetensors file or a directory (gets
    /// model.safetensors, or shards and an index, plus config.json). safetensors → GGUF: INPUT
    /// is a .safetensors file, an index or an HF directory; --metadata-from names the GGUF whose
    /// metadata and tokenizer the output gets.
    ///
    /// Examples:
    ///   ggmerge convert SmolLM2-135M-Instruct.Q4_1.gguf smol-hf/ --type F32
    ///   ggmerge convert smol-hf/ smol.gguf --metadata-from SmolLM2-135M-Instruct.Q4_1.gguf
    Convert(ConvertArgs),
    /// Extract a fine-tune as a sparse delta pack (.dpk.gguf) against its base: DARE keeps
    /// each delta element with probability DENSITY and rescales survivors, and the mask is
    /// regenerated from the seed, so a pack at density 0.1 with F16 values is ~0.2 byte per
    /// parameter.
    ///
    /// To reproduce `ggmerge merge` exactly with `ggmerge apply`, extract with the merge's
    /// --seed, --density, --values f32, and --stream set to the model's position (0, 1, …).
    ///
    /// Example: ggmerge extract --base base.gguf --finetuned math.gguf --density 0.1 -o math.dpk.gguf
    Extract(ExtractArgs),
    /// Merge delta packs into their base offline (the same engine as `merge`).
    ///
    /// Example: ggmerge apply --base base.gguf --expert math.dpk.gguf:0.6 --expert code.dpk.gguf:0.4
    ///     --method dare_ties -o merged.gguf
    Apply(ApplyArgs),
    /// Generate text with llama.cpp from the base plus weighted expert packs applied in memory
    /// at load time (no merged file is written).
    ///
    /// Example: ggmerge run --base base.gguf --expert math.dpk.gguf:0.6 -p "What is 12*7?" --chat
    Run(RunArgs),
    /// Interactive chat with the base plus experts. Commands: `/experts math=1 code=0.3`
    /// switches the mixture in place (unnamed experts get 0), `/experts` shows it, `/quit`.
    Chat(ChatArgs),
    /// Perplexity of a text under the base plus experts, chunked like llama.cpp's
    /// llama-perplexity (each window of -c tokens scores its second half).
    Perplexity(PerplexityArgs),
    /// Score question/answer pairs under the base plus experts: greedy exact match and the
    /// answers' log-likelihood. QUESTIONS is JSON Lines, one {"prompt": …, "answer": …} per
    /// line, the answer with its leading space (it must be followed by a newline to count).
    ///
    /// Example: ggmerge eval --base base.gguf --expert geo.dpk.gguf -f geo.questions.jsonl
    Eval(EvalArgs),
    // Help text on the struct, in cli/finetune.rs.
    Finetune(super::finetune::FinetuneArgs),
    // Help text on the struct, in cli/serve.rs.
    Serve(ServeArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ExpertArgs {
    /// The base model (GGUF), loaded by llama.cpp.
    #[arg(long)]
    pub base: PathBuf,
    /// An expert pack and its weight, PATH:WEIGHT (weight 1 when omitted); repeat for each.
    #[arg(long = "expert")]
    pub experts: Vec<String>,
    /// How expert deltas combine.
    #[arg(long, default_value = "task_arithmetic", value_parser = pack_methods())]
    pub method: Method,
    /// Context size in tokens (0: the model's training context, as in llama.cpp).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    pub ctx: u32,
    /// Threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Memory for cached mixtures, MiB (switching back to a cached mixture is a copy).
    #[arg(long, default_value_t = 1024)]
    pub cache_mib: u64,
    #[arg(long, help = REQUANT_HELP, default_value = Requant::DEFAULT.name(),
          value_parser = requants(), ignore_case = true)]
    pub requant: Requant,
    #[command(flatten)]
    pub gpu: GpuArgs,
    /// Say more: the devices, where each layer's weights live (CPU, CPU_REPACK, a GPU), and
    /// for eval every question with its result.
    #[arg(short = 'v', long)]
    pub verbose: bool,
}

/// llama.cpp's GPU offload options (`-ngl` is accepted as llama.cpp spells it).
#[derive(Args, Debug, Clone)]
pub struct GpuArgs {
    /// Layers to offload to the GPU, as llama.cpp's -ngl: a number, or `all` (also -1) for
    /// every layer and the output. Needs a build with a GPU backend (cargo features cuda,
    /// vulkan, metal, rocm); 0 keeps everything on the CPU.
    #[arg(
        long = "n-gpu-layers",
        visible_alias = "gpu-layers",
        value_name = "N|all",
        default_value = "0",
        value_parser = gpu_layers,
        allow_negative_numbers = true
    )]
    pub gpu_layers: i32,
    /// The GPU that holds the model when several are present (llama.cpp's --main-gpu).
    #[arg(long, default_value_t = 0)]
    pub main_gpu: i32,
}

impl GpuArgs {
    /// The model options of `-ngl` / `--main-gpu`; warns, as llama.cpp does, when the build
    /// cannot offload.
    pub fn model_options(&self) -> ModelOptions {
        if self.gpu_layers != 0 && !backend::gpu_offload_supported() {
            eprintln!(
                "warning: no usable GPU found, --n-gpu-layers is ignored (this build of ggmerge \
                 has no GPU backend: build with --features cuda, vulkan, metal or rocm)"
            );
        }
        ModelOptions {
            gpu_layers: self.gpu_layers,
            main_gpu: self.main_gpu,
            ..Default::default()
        }
    }
}

/// `-ngl`'s value: a number of layers ≥ -1, or `all` (-1: every layer and the output).
fn gpu_layers(s: &str) -> Result<i32, String> {
    match s {
        "all" => Ok(-1),
        "auto" => {
            Err("ggmerge does not size the offload itself: give a number of layers or `all`".into())
        }
        _ => s
            .parse::<i32>()
            .ok()
            .filter(|n| *n >= -1)
            .ok_or_else(|| format!("{s:?} is not a number of layers (≥ 0), -1 or `all`")),
    }
}

/// llama.cpp's multi-letter short option `-ngl N` (and `-ngl=N`) as clap's
/// `--n-gpu-layers N`; every other argument unchanged.
pub fn llama_cpp_spellings(
    args: impl Iterator<Item = std::ffi::OsString>,
) -> Vec<std::ffi::OsString> {
    args.map(|a| match a.to_str() {
        Some("-ngl") => "--n-gpu-layers".into(),
        Some(s) if s.starts_with("-ngl=") => format!("--n-gpu-layers={}", &s[5..]).into(),
        _ => a,
    })
    .collect()
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub experts: ExpertArgs,
    /// The prompt.
    #[arg(short = 'p', long)]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    pub n: usize,
    /// Temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    /// Sampling seed.
    #[arg(long)]
    pub seed: Option<u32>,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    pub chat: bool,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub experts: ExpertArgs,
    /// Tokens per answer.
    #[arg(short = 'n', long = "n-predict", default_value_t = 256)]
    pub n: usize,
    /// Temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
}

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub experts: ExpertArgs,
    /// The text file.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub experts: ExpertArgs,
    /// The questions (JSON Lines).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
}

#[derive(Args, Debug)]
pub struct ExtractArgs {
    /// The base the fine-tune was made from (GGUF).
    #[arg(long)]
    pub base: PathBuf,
    /// The fine-tuned model (GGUF of any type, or safetensors).
    #[arg(long)]
    pub finetuned: PathBuf,
    /// Output pack (.dpk.gguf).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Kept fraction of the delta, in (0, 1].
    #[arg(long, default_value_t = 0.1)]
    pub density: f64,
    /// Sparsifier: dare (random mask, no indices stored), magnitude (top-k), della.
    #[arg(long, default_value = "dare", value_parser = pack_sparsifiers())]
    pub sparsify: Sparsifier,
    /// Value type (f32 is exact; needed to reproduce `merge` bit for bit).
    #[arg(long, default_value = "f16", value_parser = pack_values(), ignore_case = true)]
    pub values: GgmlType,
    /// Mask seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Mask stream: the model's index among a merge's models, to reproduce that merge.
    #[arg(long, default_value_t = 0)]
    pub stream: u32,
    /// Rescale of kept values: inverse (÷ density), l1 (match the L1 norm), none.
    #[arg(long, default_value = "inverse", value_parser = rescales())]
    pub rescale: Rescale,
    /// DELLA: half-width of the keep-probability range.
    #[arg(long, default_value_t = 0.15)]
    pub epsilon: f64,
    /// Threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// No progress bar or summary.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// The base the packs were extracted from (GGUF).
    #[arg(long)]
    pub base: PathBuf,
    /// A pack and its weight, PATH:WEIGHT (weight 1 when omitted); repeat for each.
    #[arg(long = "expert", required = true)]
    pub experts: Vec<String>,
    /// How the deltas are combined: task_arithmetic (sum), ties / dare_ties (sign election),
    /// dare_linear.
    #[arg(long, default_value = "task_arithmetic", value_parser = pack_methods())]
    pub method: Method,
    /// Scale of the combined delta.
    #[arg(long)]
    pub lambda: Option<f64>,
    /// Output: NAME.gguf, NAME.safetensors or a directory DIR/ (as for merge).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Output format when the name does not say it: gguf or safetensors.
    #[arg(long, value_parser = parse_format)]
    pub format: Option<ggmerge::format::output::FileFormat>,
    /// Replace existing files other than the named output (config.json, shards).
    #[arg(long)]
    pub force: bool,
    /// Output type (default: the base's types); a ggml type or a llama.cpp mixture.
    #[arg(long = "type", value_parser = types_and_mixtures(), ignore_case = true)]
    pub ty: Option<String>,
    #[arg(long, help = REQUANT_HELP, default_value = Requant::DEFAULT.name(),
          value_parser = requants(), ignore_case = true)]
    pub requant: Requant,
    /// Seed of grid-stochastic rounding (the merge's --seed reproduces its output).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Input model (GGUF, or safetensors file / index / directory).
    pub input: PathBuf,
    /// Output: for a GGUF input a .safetensors file or a directory (created if needed); for a
    /// safetensors input the GGUF file.
    pub output: PathBuf,
    /// Replace existing files other than the named output (config.json, shards, files inside
    /// an output directory).
    #[arg(long)]
    pub force: bool,
    /// Type of matrices: F32, F16 (default for safetensors), BF16; for GGUF output also any
    /// ggml type (Q8_0 …). 1-D tensors are always F32.
    #[arg(long = "type", value_parser = ggml_types(), ignore_case = true)]
    pub ty: Option<GgmlType>,
    /// GGUF output: take metadata and tokenizer from this GGUF (required for safetensors → GGUF).
    #[arg(long)]
    pub metadata_from: Option<PathBuf>,
    /// safetensors output: largest shard in MiB (default: one file).
    #[arg(long)]
    pub shard_mib: Option<u64>,
    /// safetensors input without config.json: its architecture (llama, qwen2, gemma3 …).
    #[arg(long)]
    pub arch: Option<String>,
    /// Threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// No progress bar or summary.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// A mergekit YAML (.yml/.yaml) or native TOML (.toml) merge config. Options below
    /// override its output type and seed.
    pub config: Option<PathBuf>,
    /// Output: NAME.gguf (GGUF with the base's metadata and tokenizer), NAME.safetensors or a
    /// directory DIR/ (Hugging Face safetensors + config.json). Other names need --format.
    /// Written to a hidden temporary file and renamed when complete.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Output format when the name does not say it: gguf or safetensors (a path without
    /// .safetensors is then a directory).
    #[arg(long, value_parser = parse_format)]
    pub format: Option<ggmerge::format::output::FileFormat>,
    /// Replace existing files other than the named output (config.json, shards, files inside
    /// an output directory). The named output itself is always replaced when complete.
    #[arg(long)]
    pub force: bool,
    /// Base model (GGUF; its metadata and tokenizer go into the output).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// A fine-tuned model (GGUF or safetensors); repeat for each.
    #[arg(long = "model", action = clap::ArgAction::Append)]
    pub models: Vec<PathBuf>,
    /// Weight of the preceding --model.
    #[arg(long, action = clap::ArgAction::Append, allow_negative_numbers = true)]
    pub weight: Vec<f64>,
    /// Density (kept fraction, 1 − drop rate) of the preceding --model, in (0, 1].
    #[arg(long, action = clap::ArgAction::Append)]
    pub density: Vec<f64>,
    /// Breadcrumbs: fraction of the largest deltas removed (preceding --model).
    #[arg(long, action = clap::ArgAction::Append)]
    pub gamma: Vec<f64>,
    /// DELLA: half-width of the keep-probability range (preceding --model).
    #[arg(long, action = clap::ArgAction::Append)]
    pub epsilon: Vec<f64>,
    /// Merge method (mergekit's names).
    #[arg(long, default_value = "dare_ties", value_parser = all_methods())]
    pub method: Method,
    /// Scale of the merged delta.
    #[arg(long)]
    pub lambda: Option<f64>,
    /// SLERP interpolation factor (0 = base, 1 = model).
    #[arg(long = "t")]
    pub slerp_t: Option<f64>,
    /// Divide by the sum of weights (of agreeing models for TIES-style methods). Default: as mergekit per method.
    #[arg(long)]
    pub normalize: Option<bool>,
    /// Rescale after dropping: inverse (÷ density, the DARE paper), l1 (match the L1 norm,
    /// mergekit's rescale: true), none.
    #[arg(long, value_parser = rescales())]
    pub rescale: Option<Rescale>,
    /// Output type: a ggml type (Q8_0, Q4_K, F16 …) for every weight matrix, or a llama.cpp
    /// mixture (Q4_K_M …). Default: every tensor keeps the base's type.
    #[arg(long = "type", value_parser = types_and_mixtures(), ignore_case = true)]
    pub ty: Option<String>,
    /// Mask seed (DARE/DELLA) and grid-stochastic rounding seed: same seed, same output.
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, help = MERGE_REQUANT_HELP, value_parser = requants(), ignore_case = true)]
    pub requant: Option<Requant>,
    /// Threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Print the per-tensor plan, output size and peak memory, without merging.
    #[arg(long)]
    pub dry_run: bool,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
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
    #[arg(value_name = "TYPE", value_parser = mixtures(), ignore_case = true)]
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

fn parse_format(s: &str) -> Result<ggmerge::format::output::FileFormat, String> {
    ggmerge::format::output::FileFormat::from_name(s)
        .ok_or_else(|| format!("{s:?} is not a format: gguf or safetensors"))
}

/// `PATH:WEIGHT` → (PATH, WEIGHT); a suffix that is not a number is part of the path.
pub fn parse_expert(s: &str) -> anyhow::Result<(String, f64)> {
    if let Some((path, w)) = s.rsplit_once(':') {
        if let Ok(w) = w.parse::<f64>() {
            if !ggmerge::merge::config::number_fits_f32(w) {
                bail!(
                    "weight {w:?} of expert {path:?} is not a finite number of at most 3.4e38 in \
                     magnitude"
                );
            }
            return Ok((path.to_string(), w));
        }
        if w.chars().all(|c| c.is_ascii_digit() || ".-+eE".contains(c)) && !w.is_empty() {
            bail!("weight {w:?} of expert {path:?} is not a number");
        }
    }
    Ok((s.to_string(), 1.0))
}

/// Serve the base and its experts over the OpenAI API (chat and text completions, streaming),
/// with the expert mixture chosen per request.
///
/// Every request picks its mixture: through `model` — `base`, an expert's name (that expert
/// alone at weight 1) or a preset (GET /v1/models lists them) — or, overriding it, an
/// `experts` field ({"math": 0.6, "code": 0.4}; with the openai Python package:
/// extra_body={"experts": …}), optionally with `merge_method`. Switching is done in memory and
/// recent mixtures are cached; queued requests for the loaded mixture go first, but a request
/// is passed over at most 4 times. A prompt that starts like the previous request's (a
/// follow-up chat turn) reuses its computed prefix — only under the same mixture.
///
/// Endpoints: /v1/models, /v1/chat/completions, /v1/completions, GET/POST /experts,
/// DELETE /experts/NAME, /health, /metrics (Prometheus), and a chat page at /.
///
/// Examples:
///   ggmerge serve --base base.gguf --expert math=math.dpk.gguf --expert code.dpk.gguf
///       --preset coder=math:0.3,code:0.7 --port 8080
///   curl localhost:8080/v1/chat/completions -H 'Content-Type: application/json'
///       -d '{"model": "coder", "messages": [{"role": "user", "content": "Hi"}]}'
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct ServeArgs {
    /// The base model (GGUF).
    #[arg(long)]
    pub base: PathBuf,
    /// An expert pack: NAME=PATH, or PATH (named after its file: math.dpk.gguf → math).
    /// Repeat for each.
    #[arg(long = "expert")]
    pub experts: Vec<String>,
    /// A named mixture listed as a model: NAME=EXPERT:WEIGHT,EXPERT:WEIGHT… Repeat for each.
    #[arg(long = "preset")]
    pub presets: Vec<String>,
    /// How expert deltas combine unless a request says (merge_method).
    #[arg(long, default_value = "task_arithmetic", value_parser = pack_methods())]
    pub method: Method,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Context size in tokens (0: the model's training context).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    pub ctx: u32,
    /// Threads for generation (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Memory for cached mixtures, MiB (switching back to a cached mixture is a copy).
    #[arg(long, default_value_t = 1024)]
    pub cache_mib: u64,
    /// Require `Authorization: Bearer KEY` on the API (also from GGMERGE_API_KEY).
    #[arg(long, env = "GGMERGE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Directory POST /experts may load packs from (by file name only).
    #[arg(long)]
    pub expert_dir: Option<PathBuf>,
    #[command(flatten)]
    pub gpu: GpuArgs,
    /// Most requests waiting (more get 503 queue_full).
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Largest request body, KiB (larger get 413).
    #[arg(long, default_value_t = 1024)]
    pub max_body_kib: usize,
    /// Request order: mixture-first (the loaded mixture's requests first, within a bound) or
    /// fifo.
    #[arg(long, default_value = "mixture-first", value_parser = ["mixture-first", "fifo"])]
    pub schedule: String,
    /// Decode every prompt whole (no reuse of a previous request's prefix).
    #[arg(long)]
    pub no_prompt_cache: bool,
    #[arg(long, help = REQUANT_HELP, default_value = Requant::DEFAULT.name(),
          value_parser = requants(), ignore_case = true)]
    pub requant: Requant,
}
