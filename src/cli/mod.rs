//! Command-line layer: argument definitions ([`args`]), progress bars ([`bars`]) and printing.
//! No logic of its own — every command calls one library flow.

mod args;
mod bars;
mod merge;
mod print;
mod run;

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};

use args::{Cli, Command};

/// Runs the CLI; errors print as one line (`error: FILE: tensor …: what`) and exit 1.
pub fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(a) => {
            let summary = ggmerge::inspect(&a.file)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print::summary(&summary, a.tensors, a.metadata);
            }
            Ok(())
        }
        Command::Merge(a) => {
            let sub = matches.subcommand_matches("merge").unwrap_or(matches);
            merge::run(&a, sub)
        }
        Command::Extract(a) => merge::extract(&a),
        Command::Run(a) => run::run(&a),
        Command::Chat(a) => run::chat(&a),
        Command::Perplexity(a) => run::perplexity(&a),
        Command::Eval(a) => run::eval(&a),
        Command::Apply(a) => merge::apply(&a),
        Command::Convert(a) => {
            let out_type = match &a.ty {
                Some(t) => Some(
                    ggmerge::format::GgmlType::from_name(t)
                        .with_context(|| format!("unknown type {t:?} (F32, F16, BF16, Q8_0 …)"))?,
                ),
                None => None,
            };
            let opts = ggmerge::ConvertOptions {
                out_type,
                metadata_from: a.metadata_from.clone(),
                max_shard_bytes: a.shard_mib.map(|m| m << 20),
                arch: a.arch.clone(),
                threads: a.threads,
                ..Default::default()
            };
            let bar = bars::Bars::new(a.quiet);
            let r =
                ggmerge::convert_model(&a.input, &a.output, &opts, &bar).with_context(|| {
                    format!("converting {} to {}", a.input.display(), a.output.display())
                })?;
            if !a.quiet {
                print::convert_report(&r);
            }
            Ok(())
        }
        Command::Quantize(a) => {
            let target = ggmerge::quant::Target::parse(&a.ty, a.pure)?;
            let opts = ggmerge::QuantizeOptions {
                target,
                threads: a.threads,
            };
            let bar = bars::Bars::new(a.quiet);
            let report =
                ggmerge::quantize_model(&a.input, &a.output, &opts, &bar).with_context(|| {
                    format!("quantizing {} to {}", a.input.display(), target.describe())
                })?;
            if !a.quiet {
                print::quantize_report(&report, &a.output, &target);
            }
            Ok(())
        }
    }
}
