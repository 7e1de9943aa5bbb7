//! `merge` and `apply` as library calls: open the inputs ([`crate::delta::open_inputs`] —
//! models, and delta packs checked against the base), plan ([`crate::merge::plan`]), run
//! ([`crate::merge::run`]) into the output the user named.

use std::time::Instant;

use crate::error::Result;
use crate::format::output::{Destination, FileFormat};
use crate::merge::config::MergeConfig;
use crate::merge::plan::{plan, PlanOptions};
use crate::merge::run::{write, RunOptions};
use crate::progress::Progress;
use crate::threads::with_threads;

pub use crate::merge::plan::{MergePlan, PlannedTensor, TensorAction};
pub use crate::merge::report::{GridReport, MergeReport, ModelReport, RetentionReport};
pub use crate::quant::grid::{GridCounts, Requant};

/// Options of [`merge_models`] beyond the config.
#[derive(Clone, Debug, Default)]
pub struct MergeOptions {
    /// Output path: `*.gguf` (GGUF), `*.safetensors` or a directory (safetensors with Hugging
    /// Face names); any other name needs [`MergeOptions::format`]
    /// ([`Destination::resolve`]).
    pub output: std::path::PathBuf,
    /// The output format, when the path does not say it.
    pub format: Option<FileFormat>,
    /// Replace existing files beside the named output (`config.json`, shards, the files
    /// inside an output directory); without it they are an error.
    pub force: bool,
    /// Output type: `None` keeps every tensor's base type; a ggml type name (`Q8_0`, `F16`)
    /// gives every weight matrix that type; a mixture name (`Q4_K_M`) applies llama.cpp's
    /// per-tensor rules. Overrides the config's `dtype`/`type`.
    pub out_type: Option<String>,
    /// Mask seed (overrides the config's); also seeds stochastic rounding.
    pub seed: Option<u64>,
    /// Worker threads (`None`: all cores).
    pub threads: Option<usize>,
    /// How merged tensors of the base's type are requantized (overrides the config's; `None`:
    /// the config's, else [`Requant::DEFAULT`]).
    pub requant: Option<Requant>,
}

/// Resolves a config into a plan without computing anything (`--dry-run` prints it). The
/// output path is checked first ([`Destination::check`]), so a path that cannot be written
/// fails before any input is opened; inputs open on the merge's own threads (`-t`).
pub fn plan_merge(config: &MergeConfig, opts: &MergeOptions) -> Result<MergePlan> {
    let dest = Destination::resolve(&opts.output, opts.format)?;
    dest.check(opts.force)?;
    with_threads(opts.threads, || {
        let inputs = crate::delta::open_inputs(config, &[])?;
        let plan_opts = PlanOptions {
            format: dest.format,
            out_type: opts.out_type.clone(),
            seed: opts.seed,
            threads: opts.threads,
            requant: opts.requant,
        };
        Ok(plan(config, inputs, &plan_opts)?)
    })
}

/// Merges according to `config` and writes `opts.output`.
///
/// ```no_run
/// use ggmerge::merge::config::MergeConfig;
/// use ggmerge::{merge_models, MergeOptions, NoProgress};
///
/// let config = MergeConfig::from_path("merge.yml".as_ref())?;
/// let opts = MergeOptions { output: "merged.gguf".into(), seed: Some(42), ..Default::default() };
/// let report = merge_models(&config, &opts, &NoProgress)?;
/// println!("{} tensors merged, {} copied", report.merged, report.copied);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn merge_models(
    config: &MergeConfig,
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<MergeReport> {
    let started = Instant::now();
    let merge_plan = plan_merge(config, opts)?;
    let dest = Destination::resolve(&opts.output, opts.format)?;
    let run = RunOptions {
        force: opts.force,
        threads: opts.threads,
    };
    Ok(write(&merge_plan, &dest, &run, progress, started)?)
}
