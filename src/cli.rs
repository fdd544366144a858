//! The command line: one `blindgate` binary with subcommands (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::gateway::{self, GatewayPlan};
use crate::{config, demo, device, e3_tool, keys, logging, manpage, pki};

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
    /// Check a config file and what it points at; print every problem with file:line:column.
    ///
    /// A gateway config, or a cloud ingest config (a file with a [broker] section).
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
    /// The gateway's durable queue, offline (`queue inspect`).
    #[command(subcommand)]
    Queue(crate::queue::inspect::QueueCommand),
    /// Write the man pages (packaging; docs/PACKAGING.md).
    #[command(hide = true)]
    Manpage(manpage::ManpageArgs),
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
#[command(after_help = "\
Checks the file (unknown keys, values, ranges) and its environment: every certificate \
and key file is readable, certificates parse and are valid now (warning within 30 days \
of expiry), each key belongs to its certificate and is not readable by others, the \
listeners can bind (not with --reload), data_dir is or can be a writable directory \
with room for the queue. A file with a [broker] section is checked as a cloud ingest \
config.

Prints one line per problem, `FILE:LINE:COLUMN: [warning: ]KEY: MESSAGE (hint: ...)`, \
then a summary line.

Exit status:
  0  no errors (warnings allowed)
  1  errors in the file or its environment
  2  the file cannot be read, or bad usage")]
struct CheckConfigArgs {
    /// Do not try to bind the listeners: the running gateway holds them (for
    /// ExecReload before a SIGHUP).
    #[arg(long)]
    reload: bool,
    /// The config file to check.
    #[arg(value_name = "FILE")]
    config: PathBuf,
}

/// A subcommand's chosen exit status; it has printed its own output, so `main`
/// exits with this status and prints nothing more.
#[derive(Debug)]
pub struct ExitStatus(pub u8);

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for ExitStatus {}

/// Runs the parsed command line.
///
/// # Errors
/// Whatever the subcommand reports; `main` prints the error chain and exits non-zero.
pub fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    match cli.command {
        Command::Demo(args) => demo::cli::run(args),
        Command::Gateway(args) => run_gateway(&args),
        Command::CheckConfig(args) => {
            let ports = match args.reload {
                true => config::PortCheck::Skip,
                false => config::PortCheck::Bind,
            };
            match config::check_command(&args.config, ports) {
                config::EXIT_OK => Ok(()),
                code => Err(Box::new(ExitStatus(code))),
            }
        }
        Command::E3(cmd) => e3_tool::run(cmd).map_err(Into::into),
        Command::Certs(CertsCommand::Dev(args)) => pki::cli::run(args).map_err(Into::into),
        Command::Device(cmd) => device::cli::run(cmd).map_err(Into::into),
        Command::Queue(cmd) => crate::queue::inspect::run(cmd),
        Command::Keys(cmd) => keys::cli::run(cmd).map_err(Into::into),
        Command::Cloud(cmd) => crate::cloud::cli::run(cmd),
        Command::Manpage(args) => manpage::run(&args).map_err(Into::into),
    }
}

fn run_gateway(args: &GatewayArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // The checks of `check-config` (but not the ports: binding them reports that).
    let checked = match config::load_checked(&args.config, config::PortCheck::Skip) {
        Ok(checked) => checked,
        Err(err) if err.restarting_is_harmful() => {
            // A refused PIN: a restart would only use up the token's tries. The unit's
            // RestartPreventExitStatus= names this status.
            eprintln!("error: {err}");
            eprintln!(
                "error: not retrying: start the service again once the problem above is fixed (exit status {})",
                config::EXIT_DO_NOT_RESTART
            );
            return Err(Box::new(ExitStatus(config::EXIT_DO_NOT_RESTART)));
        }
        Err(err) => return Err(err.into()),
    };
    let config = checked.config;
    logging::init(config.log.format, &config.log.level);
    for warning in &checked.warnings {
        tracing::warn!("{}:{warning}", args.config.display());
    }
    let plan = GatewayPlan::from_config(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(config.gateway.threads))
        .enable_all()
        .thread_name("blindgate")
        .build()?;
    runtime.block_on(gateway::run_service(args.config.clone(), config, plan))?;
    Ok(())
}
