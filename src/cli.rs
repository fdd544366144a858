//! The command line: one `blindgate` binary with subcommands (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::gateway::{self, GatewayPlan};
use crate::{config, demo, device, e3_tool, keys, logging, pki, shutdown};

/// Edge gateway for end-to-end encrypted device data.
#[derive(Debug, Parser)]
#[command(name = "blindgate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole system on loopback (devices, gateway, cloud) with a cloud outage,
    /// and report what arrived. Exits non-zero if anything was lost.
    Demo(demo::cli::DemoArgs),
    /// Run the gateway: device listener, durable queue, uplink to the cloud.
    Gateway(GatewayArgs),
    /// Check a gateway config file; print every problem with file:line:column.
    CheckConfig(CheckConfigArgs),
    /// Seal, open and key E3 envelopes locally (testing and scripting).
    #[command(subcommand)]
    E3(e3_tool::E3Command),
    /// Certificates for development and tests.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Cloud side: the ingest, and commands to devices.
    #[command(subcommand)]
    Cloud(crate::cloud::cli::CloudCommand),
    /// Cloud side: the device key store (provision, rotate, shred, list).
    #[command(subcommand)]
    Keys(keys::cli::KeysCommand),
    /// Simulated devices (`device simulate`).
    #[command(subcommand)]
    Device(device::cli::DeviceCommand),
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Generate a development PKI (two CAs, broker, gateway, ingest and device certificates).
    Dev(pki::cli::CertsDevArgs),
}

/// Flags of `gateway`.
#[derive(Debug, Args)]
struct GatewayArgs {
    /// The gateway's config file.
    #[arg(
        long,
        short,
        value_name = "FILE",
        default_value = "/etc/blindgate/gateway.toml"
    )]
    config: PathBuf,
}

/// Flags of `check-config`.
#[derive(Debug, Args)]
struct CheckConfigArgs {
    /// The config file to check.
    #[arg(value_name = "FILE")]
    config: PathBuf,
}

/// Runs the parsed command line.
///
/// # Errors
/// Whatever the subcommand reports; `main` prints the error chain and exits non-zero.
pub fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match cli.command {
        Command::Demo(args) => demo::cli::run(args),
        Command::Gateway(args) => run_gateway(&args),
        Command::CheckConfig(args) => {
            config::load(&args.config)?;
            println!("{}: ok", args.config.display());
            Ok(())
        }
        Command::E3(cmd) => e3_tool::run(cmd).map_err(Into::into),
        Command::Certs(CertsCommand::Dev(args)) => pki::cli::run(args).map_err(Into::into),
        Command::Device(cmd) => device::cli::run(cmd).map_err(Into::into),
        Command::Keys(cmd) => keys::cli::run(cmd).map_err(Into::into),
        Command::Cloud(cmd) => crate::cloud::cli::run(cmd),
    }
}

fn run_gateway(args: &GatewayArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let config = config::load(&args.config)?;
    logging::init(config.log.format, &config.log.level);
    let plan = GatewayPlan::from_config(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blindgate")
        .build()?;
    runtime.block_on(gateway::run(plan, shutdown::terminate_signal()))?;
    Ok(())
}
