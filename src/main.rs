//! The `ggmerge` command line: parses arguments, calls the library, prints results.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
