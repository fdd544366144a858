//! `blindgate device simulate`: runs simulated devices against a gateway, each with the
//! certificate `blindgate certs dev` wrote for it and its own E3 key file, until Ctrl-C
//! (or SIGTERM) or until every device's `--count` is sent and receipted; then prints one
//! summary line per device.

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{
    DEFAULT_IMAGE_SIZE, DEFAULT_MAX_ENVELOPE, DeviceConfig, DeviceError, DeviceReport,
    MIXED_IMAGE_EVERY, PayloadKind, run_device,
};
use crate::commands::{Schema, TypeCommands};
use crate::config::units::parse_duration;
use crate::logging::{self, LogFormat};
use crate::shutdown;

/// The `device` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Run simulated devices against a gateway until Ctrl-C or until all counts are done.
    Simulate(SimulateArgs),
}

/// Flags of `device simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The gateway's device listener.
    #[arg(long, value_name = "HOST:PORT")]
    gateway: String,
    /// Name the gateway's certificate must be valid for.
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    server_name: String,
    /// The device CA (PEM), which the gateway's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// Directory written by `blindgate certs dev`; each device uses `devices/<id>.pem`
    /// and `devices/<id>.key` in it.
    #[arg(long, value_name = "DIR")]
    certs_dir: PathBuf,
    /// Directory of the devices' initial E3 key files, `<id>.key`.
    #[arg(long, value_name = "DIR")]
    keys_dir: PathBuf,
    /// A device to simulate (repeat the flag for more).
    #[arg(
        long = "device",
        value_name = "ID",
        required_unless_present = "devices"
    )]
    device: Vec<String>,
    /// Simulate N devices named sim-1 .. sim-N.
    #[arg(long, value_name = "N", conflicts_with = "device")]
    devices: Option<u32>,
    /// Directory for the devices' state (seq counter, keys, outbox), one subdirectory each.
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// New messages per second per device.
    #[arg(long, value_name = "R", default_value_t = 1.0)]
    rate: f64,
    /// What the devices send.
    #[arg(long, value_enum, default_value_t = PayloadArg::Readings)]
    payload: PayloadArg,
    /// Size of each camera image.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_IMAGE_SIZE)]
    image_size: usize,
    /// With `--payload mixed`: one message in N is an image.
    #[arg(long, value_name = "N", default_value_t = MIXED_IMAGE_EVERY)]
    image_every: u32,
    /// Compress readings (BGZ1); the ciphertext length then leaks compressibility.
    #[arg(long)]
    compress: bool,
    /// Stop each device after N new messages, once they are all receipted.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Largest sealed envelope; images are chunked to fit.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_ENVELOPE)]
    max_envelope: usize,
    /// Resend an uplink no receipt named after this long (e.g. "10s", "500ms").
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    resend_after: Duration,
    /// The command schema (docs/COMMANDS.md): each device checks every command
    /// against its type's list, executes only allowed ones and sends back a sealed
    /// result. Without it no command but `rekey` is executed.
    #[arg(long, value_name = "FILE")]
    commands: Option<PathBuf>,
    /// The devices' type in the command schema (default: each device's entry under
    /// [device_types]).
    #[arg(long, value_name = "TYPE", requires = "commands")]
    device_type: Option<String>,
}

/// What `device simulate` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PayloadArg {
    /// Sensor readings (JSON).
    Readings,
    /// Camera images only.
    Images,
    /// Readings, and one message in `--image-every` an image.
    Mixed,
}

/// Why `device simulate` failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DeviceCliError {
    /// `--gateway` does not resolve to an address.
    #[error("cannot resolve gateway address {address:?}")]
    Gateway {
        /// The address as given.
        address: String,
        /// Why it did not resolve.
        #[source]
        source: std::io::Error,
    },
    /// The command schema is unusable.
    #[error("command schema")]
    Commands(#[source] crate::commands::SchemaError),
    /// A device has no type in the command schema, or its type is not in it.
    #[error("device {device}: {why} in the command schema")]
    DeviceType {
        /// The device.
        device: String,
        /// What is missing.
        why: String,
    },
    /// The async runtime could not be started.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    /// A device stopped with an error (the others were stopped too).
    #[error("device {device} failed")]
    Device {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: Box<DeviceError>,
    },
}

/// Runs a `device` subcommand.
///
/// # Errors
/// See [`DeviceCliError`]; the first device error stops every device.
pub fn run(command: DeviceCommand) -> Result<(), DeviceCliError> {
    let DeviceCommand::Simulate(args) = command;
    logging::init(LogFormat::Human, "info");
    let configs = args.device_configs()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blindgate-device")
        .build()
        .map_err(DeviceCliError::Runtime)?;
    runtime.block_on(simulate(configs))
}

impl SimulateArgs {
    fn device_ids(&self) -> Vec<String> {
        match self.devices {
            Some(n) => (1..=n).map(|i| format!("sim-{i}")).collect(),
            None => self.device.clone(),
        }
    }

    fn payload_kind(&self) -> PayloadKind {
        match self.payload {
            PayloadArg::Readings => PayloadKind::Readings,
            PayloadArg::Images => PayloadKind::Images {
                size: self.image_size,
                every: 1,
            },
            PayloadArg::Mixed => PayloadKind::Images {
                size: self.image_size,
                every: self.image_every,
            },
        }
    }

    fn device_configs(&self) -> Result<Vec<DeviceConfig>, DeviceCliError> {
        let gateway = resolve(&self.gateway)?;
        let devices_dir = self.certs_dir.join("devices");
        let schema = match &self.commands {
            Some(path) => Some(Schema::load(path).map_err(DeviceCliError::Commands)?),
            None => None,
        };
        let allowed = |id: &str| -> Result<Option<TypeCommands>, DeviceCliError> {
            let Some(schema) = &schema else {
                return Ok(None);
            };
            let missing = |why: String| DeviceCliError::DeviceType {
                device: id.to_owned(),
                why,
            };
            let device_type = match &self.device_type {
                Some(device_type) => device_type.as_str(),
                None => schema
                    .device_type(id)
                    .ok_or_else(|| missing("no entry under [device_types]".into()))?,
            };
            let commands = schema
                .type_commands(device_type)
                .ok_or_else(|| missing(format!("type `{device_type}` is not defined")))?;
            Ok(Some(commands.clone()))
        };
        let configs = self
            .device_ids()
            .into_iter()
            .map(|id| {
                Ok(DeviceConfig {
                    commands: allowed(&id)?,
                    cert: devices_dir.join(format!("{id}.pem")),
                    key: devices_dir.join(format!("{id}.key")),
                    ca: self.ca.clone(),
                    initial_key_file: self.keys_dir.join(format!("{id}.key")),
                    gateway,
                    server_name: self.server_name.clone(),
                    state_dir: self.state_dir.clone(),
                    rate_per_sec: self.rate,
                    payload: self.payload_kind(),
                    compress: self.compress,
                    max_envelope: self.max_envelope,
                    resend_after: self.resend_after,
                    count: self.count,
                    device_id: id,
                })
            })
            .collect::<Result<Vec<_>, DeviceCliError>>()?;
        Ok(configs)
    }
}

fn resolve(address: &str) -> Result<SocketAddr, DeviceCliError> {
    let error = |source| DeviceCliError::Gateway {
        address: address.to_owned(),
        source,
    };
    address
        .to_socket_addrs()
        .map_err(error)?
        .next()
        .ok_or_else(|| error(std::io::ErrorKind::NotFound.into()))
}

/// Runs every device until the signal or until all are done; prints one line each.
async fn simulate(configs: Vec<DeviceConfig>) -> Result<(), DeviceCliError> {
    let stop = CancellationToken::new();
    let signal = {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown::terminate_signal().await;
            stop.cancel();
        })
    };
    let mut devices = JoinSet::new();
    for config in configs {
        let (id, stop) = (config.device_id.clone(), stop.clone());
        devices.spawn(async move { (id, run_device(config, stop).await) });
    }
    let mut first_error = None;
    while let Some(joined) = devices.join_next().await {
        let Ok((device, result)) = joined else {
            continue;
        };
        match result {
            Ok(report) => println!("{}", summary(&device, &report)),
            Err(source) => {
                println!("{device}: failed: {source}");
                stop.cancel();
                first_error.get_or_insert(DeviceCliError::Device {
                    device,
                    source: Box::new(source),
                });
            }
        }
    }
    signal.abort();
    first_error.map_or(Ok(()), Err)
}

fn summary(device: &str, r: &DeviceReport) -> String {
    format!(
        "{device}: sent {}, resent {}, receipted {}, outbox {}, commands {} (executed {}, \
         refused {}), rekeys {}, replays rejected {}, invalid downlink {}",
        r.sent,
        r.resent,
        r.receipted,
        r.outbox_left,
        r.commands,
        r.commands_executed,
        r.commands_refused,
        r.rekeys,
        r.replays_rejected,
        r.downlink_invalid
    )
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Harness {
        #[command(subcommand)]
        command: DeviceCommand,
    }

    fn parse(extra: &[&str]) -> SimulateArgs {
        let base = [
            "device",
            "simulate",
            "--gateway",
            "127.0.0.1:8883",
            "--ca",
            "ca.pem",
            "--certs-dir",
            "certs",
            "--keys-dir",
            "keys",
            "--state-dir",
            "state",
        ];
        let argv = base.iter().chain(extra).copied();
        let DeviceCommand::Simulate(args) = Harness::parse_from(argv).command;
        args
    }

    #[test]
    fn devices_n_names_sim_1_to_sim_n_with_their_files() {
        let configs = parse(&[
            "--devices",
            "3",
            "--payload",
            "mixed",
            "--resend-after",
            "2s",
        ])
        .device_configs()
        .expect("configs");
        let ids: Vec<_> = configs.iter().map(|c| c.device_id.as_str()).collect();
        assert_eq!(ids, ["sim-1", "sim-2", "sim-3"]);
        let sim2 = &configs[1];
        assert_eq!(sim2.cert, PathBuf::from("certs/devices/sim-2.pem"));
        assert_eq!(sim2.key, PathBuf::from("certs/devices/sim-2.key"));
        assert_eq!(sim2.initial_key_file, PathBuf::from("keys/sim-2.key"));
        assert_eq!(sim2.resend_after, Duration::from_secs(2));
        assert_eq!(
            sim2.payload,
            PayloadKind::Images {
                size: DEFAULT_IMAGE_SIZE,
                every: MIXED_IMAGE_EVERY
            }
        );
        assert_eq!(sim2.server_name, "localhost");
        assert_eq!(sim2.max_envelope, DEFAULT_MAX_ENVELOPE);
    }

    #[test]
    fn repeated_device_flags_name_the_devices() {
        let args = parse(&["--device", "pump-17", "--device", "cam-1", "--compress"]);
        assert_eq!(args.device_ids(), ["pump-17", "cam-1"]);
        assert!(args.compress);
        assert_eq!(args.payload_kind(), PayloadKind::Readings);
    }

    #[test]
    fn commands_give_each_device_its_types_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        let schema = dir.path().join("commands.toml");
        std::fs::write(
            &schema,
            "[device_types]\nthermostat-1 = \"thermostat\"\n[types.thermostat.reboot]\n",
        )
        .expect("schema written");
        let schema = schema.to_str().expect("UTF-8 path");
        let configs = parse(&["--device", "thermostat-1", "--commands", schema])
            .device_configs()
            .expect("configs");
        let allowed = configs[0].commands.as_ref().expect("an allowlist");
        assert_eq!(allowed.device_type, "thermostat");
        assert!(allowed.commands.contains_key("reboot"));
        let untyped = parse(&["--device", "pump-17", "--commands", schema]).device_configs();
        assert!(
            matches!(untyped, Err(DeviceCliError::DeviceType { ref device, .. }) if device == "pump-17")
        );
        let forced = parse(&[
            "--device",
            "pump-17",
            "--commands",
            schema,
            "--device-type",
            "thermostat",
        ])
        .device_configs()
        .expect("configs");
        assert!(forced[0].commands.is_some());
        let unknown = parse(&[
            "--device",
            "x",
            "--commands",
            schema,
            "--device-type",
            "pump",
        ]);
        assert!(unknown.device_configs().is_err());
        assert!(
            parse(&["--device", "x"]).device_configs().expect("configs")[0]
                .commands
                .is_none()
        );
    }
}
