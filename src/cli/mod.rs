//! Command-line layer: argument definitions ([`args`]), progress bars ([`bars`]) and printing.
//! No logic of its own — every command calls one library flow.
//!
//! Process-wide behaviour lives here too: Ctrl-C / SIGTERM / SIGHUP remove the temporary
//! output files and exit with 128 + the signal number and one line on stderr; printing to a
//! closed pipe (`ggmerge inspect … | head -1`) ends the process quietly with exit 0; `-t`
//! larger than the machine can use is lowered with a warning.

mod args;
mod bars;
mod finetune;
mod merge;
mod print;
mod run;
mod serve;

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};

use args::{Cli, Command};

/// `println!` for the CLI: a closed standard output (a pipe whose reader exited) ends the
/// process quietly instead of panicking.
macro_rules! outln {
    () => { $crate::cli::stdout_fmt(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::stdout_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}
pub(crate) use outln;

/// Writes to standard output; on a closed pipe exits 0 (after removing any temporary file),
/// on another error exits 1 with a message.
pub fn stdout_fmt(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args) {
        stdout_failed(e);
    }
}

/// Writes bytes to standard output and flushes them (streamed generation), with
/// [`stdout_fmt`]'s handling of a closed pipe.
pub fn stdout_bytes(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        stdout_failed(e);
    }
}

fn stdout_failed(e: std::io::Error) -> ! {
    ggmerge::format::output::remove_temporary_files();
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    let _ = writeln!(
        std::io::stderr(),
        "error: cannot write to standard output: {e}"
    );
    std::process::exit(1);
}

/// Removes temporary outputs and exits on SIGINT, SIGTERM and SIGHUP, from a thread of its
/// own (no work in signal context).
fn handle_signals() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return;
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let removed = ggmerge::format::output::remove_temporary_files();
            let name = match sig {
                SIGINT => "interrupted",
                SIGTERM => "terminated",
                _ => "hung up",
            };
            let what = match removed {
                0 => String::new(),
                n => format!(
                    "; removed {n} unfinished output file{}",
                    if n == 1 { "" } else { "s" }
                ),
            };
            let _ = writeln!(std::io::stderr(), "\nggmerge: {name}{what}");
            std::process::exit(128 + sig);
        }
    });
}

/// `-t N` as the library will use it: lowered (with a warning) to what the machine can use.
pub fn threads(requested: Option<usize>) -> Option<usize> {
    let n = requested?;
    let max = ggmerge::threads::max_threads();
    if n > max {
        eprintln!(
            "warning: -t {n} is more threads than this machine can use ({} cores); using {max}",
            ggmerge::threads::cores()
        );
        return Some(max);
    }
    Some(n)
}

/// Runs the CLI; errors print as one line (`error: FILE: tensor …: what`) and exit 1.
pub fn main() -> ExitCode {
    let matches = Cli::command().get_matches_from(args::llama_cpp_spellings(std::env::args_os()));
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // The server shuts down gracefully on its own signals.
    if !matches!(cli.command, Command::Serve(_)) {
        handle_signals();
    }
    match run(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect(a) => {
            let summary = ggmerge::inspect(&a.file)?;
            if a.json {
                outln!("{}", serde_json::to_string_pretty(&summary)?);
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
        Command::Finetune(a) => finetune::run(&a),
        Command::Serve(a) => serve::run(&a),
        Command::Apply(a) => merge::apply(&a),
        Command::Convert(a) => {
            let opts = ggmerge::ConvertOptions {
                out_type: a.ty,
                metadata_from: a.metadata_from.clone(),
                max_shard_bytes: a.shard_mib.map(|m| m << 20),
                arch: a.arch.clone(),
                threads: threads(a.threads),
                force: a.force,
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
                threads: threads(a.threads),
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
