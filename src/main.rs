//! The `blindgate` command: parses flags and hands over to the library.
//!
//! Exit status: 0 success; 1 failure (the error and its causes are printed), or the
//! status a subcommand chose ([`blindgate::cli::ExitStatus`], e.g. `check-config`: 1
//! errors found, 2 file unreadable); 2 bad usage (clap).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = blindgate::cli::Cli::parse();
    match blindgate::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(blindgate::cli::ExitStatus(code)) = err.downcast_ref() {
                return ExitCode::from(*code);
            }
            eprintln!("error: {err}");
            let mut source = err.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}
