//! The command line: one `blindgate` binary with subcommands (clap derive).

use clap::{Parser, Subcommand};

use crate::{e3_tool, pki};

/// Edge gateway for end-to-end encrypted device data.
#[derive(Debug, Parser)]
#[command(name = "blindgate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Seal, open and key E3 envelopes locally (testing and scripting).
    #[command(subcommand)]
    E3(e3_tool::E3Command),
    /// Certificates for development and tests.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Generate a development PKI (two CAs, broker, gateway, ingest and device certificates).
    Dev(pki::cli::CertsDevArgs),
}

/// Runs the parsed command line.
///
/// # Errors
/// Whatever the subcommand reports; `main` prints the error chain and exits non-zero.
pub fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match cli.command {
        Command::E3(cmd) => e3_tool::run(cmd).map_err(Into::into),
        Command::Certs(CertsCommand::Dev(args)) => pki::cli::run(args).map_err(Into::into),
    }
}
