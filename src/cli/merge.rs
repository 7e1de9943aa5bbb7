//! `ggmerge merge`: builds a merge config from a file or the short form and runs the flow.

use anyhow::{bail, Context};
use clap::ArgMatches;

use ggmerge::merge::config::{ConfigSource, MergeConfig, ModelEntry, ParamValue, Params};
use ggmerge::{merge_models, MergeOptions};

use super::args::{parse_expert, MergeArgs};
use super::{bars, print};

/// For each occurrence of a per-model option, the index of the `--model` it follows (`None`
/// when it comes before the first `--model`: then it applies to all models).
fn owners(m: &ArgMatches, id: &str) -> Vec<Option<usize>> {
    let models: Vec<usize> = m
        .indices_of("models")
        .map(|i| i.collect())
        .unwrap_or_default();
    m.indices_of(id)
        .map(|idx| idx.map(|i| models.iter().rposition(|&mi| mi < i)).collect())
        .unwrap_or_default()
}

fn short_form(a: &MergeArgs, m: &ArgMatches) -> anyhow::Result<MergeConfig> {
    let method = a.method;
    if a.models.is_empty() {
        bail!("no models: give a config file, or --base and one or more --model");
    }
    let mut models: Vec<ModelEntry> = a
        .models
        .iter()
        .map(|p| ModelEntry {
            model: p.display().to_string(),
            parameters: Params::default(),
        })
        .collect();
    let mut global = Params::default();
    for (id, values) in [
        ("weight", &a.weight),
        ("density", &a.density),
        ("gamma", &a.gamma),
        ("epsilon", &a.epsilon),
    ] {
        for (owner, v) in owners(m, id).into_iter().zip(values) {
            let target = match owner {
                Some(i) => &mut models[i].parameters,
                None => &mut global,
            };
            target.set(id, ParamValue::Number(*v));
        }
    }
    if let Some(l) = a.lambda {
        global.set("lambda", ParamValue::Number(l));
    }
    if let Some(t) = a.slerp_t {
        global.set("t", ParamValue::Number(t));
    }
    if let Some(n) = a.normalize {
        global.set("normalize", ParamValue::Bool(n));
    }
    let mut config = MergeConfig::new(method, ConfigSource::Cli);
    config.base_model = a.base.as_ref().map(|b| b.display().to_string());
    config.models = models;
    config.parameters = global;
    config.seed = a.seed;
    Ok(config)
}

pub fn run(a: &MergeArgs, m: &ArgMatches) -> anyhow::Result<()> {
    let mut config = match &a.config {
        Some(path) => {
            if a.base.is_some() || !a.models.is_empty() {
                bail!("give either a config file or --base/--model, not both");
            }
            MergeConfig::from_path(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => short_form(a, m)?,
    };
    if let Some(r) = a.rescale {
        config.rescale_setting = Some(r);
    }
    let opts = MergeOptions {
        output: a.output.clone(),
        format: a.format,
        force: a.force,
        out_type: a.ty.clone(),
        seed: a.seed,
        threads: super::threads(a.threads.or(config.threads)),
        requant: a.requant,
    };
    if a.dry_run {
        let plan = ggmerge::flows::merge::plan_merge(&config, &opts)?;
        print::merge_plan(&plan);
        return Ok(());
    }
    let bar = bars::Bars::new(a.quiet);
    let report = merge_models(&config, &opts, &bar)
        .with_context(|| format!("merging into {}", a.output.display()))?;
    print::merge_report(&report, config.method.name());
    Ok(())
}

pub fn apply(a: &super::args::ApplyArgs) -> anyhow::Result<()> {
    let mut config = MergeConfig::new(a.method, ConfigSource::Cli);
    config.base_model = Some(a.base.display().to_string());
    for e in &a.experts {
        let (path, weight) = parse_expert(e)?;
        let mut entry = ModelEntry::new(path);
        entry.parameters.set("weight", ParamValue::Number(weight));
        config.models.push(entry);
    }
    if let Some(l) = a.lambda {
        config.parameters.set("lambda", ParamValue::Number(l));
    }
    let opts = MergeOptions {
        output: a.output.clone(),
        format: a.format,
        force: a.force,
        out_type: a.ty.clone(),
        seed: Some(a.seed),
        threads: super::threads(a.threads),
        requant: Some(a.requant),
    };
    let bar = bars::Bars::new(a.quiet);
    let report = merge_models(&config, &opts, &bar)
        .with_context(|| format!("applying packs to {}", a.base.display()))?;
    print::merge_report(&report, config.method.name());
    Ok(())
}

pub fn extract(a: &super::args::ExtractArgs) -> anyhow::Result<()> {
    use ggmerge::flows::extract::{extract_delta, ExtractOptions};
    let opts = ExtractOptions {
        density: a.density,
        sparsifier: a.sparsify,
        values: a.values,
        seed: a.seed,
        stream: a.stream,
        rescale: a.rescale,
        epsilon: a.epsilon,
        threads: super::threads(a.threads),
    };
    let bar = bars::Bars::new(a.quiet);
    let r = extract_delta(&a.base, &a.finetuned, &a.output, &opts, &bar).with_context(|| {
        format!(
            "extracting {} against {}",
            a.finetuned.display(),
            a.base.display()
        )
    })?;
    if !a.quiet {
        print::extract_report(&r, &a.output);
    }
    Ok(())
}
