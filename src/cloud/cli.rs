//! `blindgate cloud run|send-command`: the ingest as a service (with scheduled key
//! rotation and a metrics endpoint), and sending one command to a device.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;

use super::commands::{publish_once, seal_command};
use super::config::{CloudConfig, load};
use super::{CloudMetrics, CloudSettings};
use crate::commands::check_outgoing;
use crate::keys::{KeyStore, now_ms};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The `cloud` subcommands.
#[derive(Debug, Subcommand)]
pub enum CloudCommand {
    /// Run the cloud ingest until SIGTERM.
    Run(RunArgs),
    /// Seal a command for a device and publish it down through its gateway.
    SendCommand(SendArgs),
}

/// Flags of `cloud run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The cloud config file.
    #[arg(
        long,
        short,
        value_name = "FILE",
        default_value = "/etc/blindgate/cloud.toml"
    )]
    config: PathBuf,
}

/// Flags of `cloud send-command`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The cloud config file.
    #[arg(
        long,
        short,
        value_name = "FILE",
        default_value = "/etc/blindgate/cloud.toml"
    )]
    config: PathBuf,
    /// The device the command is for.
    #[arg(long)]
    device: String,
    /// The gateway to send it through (default: the one the registry allows, if just one).
    #[arg(long)]
    gateway: Option<String>,
    /// The command: a JSON object with a `cmd` field and its parameters, checked
    /// against the command schema (docs/COMMANDS.md) before it is sealed.
    command: String,
}

/// Runs a `cloud` subcommand.
///
/// # Errors
/// Config, key store, broker or sink failures.
pub fn run(cmd: CloudCommand) -> Result<(), BoxError> {
    crate::logging::init(crate::logging::LogFormat::Human, "info");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cmd {
        CloudCommand::Run(args) => runtime.block_on(run_ingest(load(&args.config)?)),
        CloudCommand::SendCommand(args) => runtime.block_on(send(&args)),
    }
}

async fn run_ingest(config: CloudConfig) -> Result<(), BoxError> {
    let metrics = CloudMetrics::new();
    let stop = CancellationToken::new();
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tokio::spawn(crate::http::serve(
            listener,
            metrics.clone(),
            stop.child_token(),
        ));
    }
    tokio::spawn(rotate_on_schedule(config.clone(), stop.child_token()));
    let ingest = tokio::spawn(super::run_with_sink(
        config.settings,
        config.sink,
        metrics.clone(),
        stop.child_token(),
    ));
    serve_systemd(&metrics).await;
    stop.cancel();
    ingest.await??;
    Ok(())
}

/// Until SIGTERM/SIGINT: tells systemd the ingest is ready once it is subscribed, and
/// feeds the watchdog from this loop.
async fn serve_systemd(metrics: &CloudMetrics) {
    let notifier = crate::systemd::Notifier::from_env();
    let period = notifier.watchdog_interval();
    let mut watchdog = tokio::time::interval(period.unwrap_or(Duration::from_secs(3600)));
    let terminate = crate::shutdown::terminate_signal();
    tokio::pin!(terminate);
    let mut ready = std::pin::pin!(metrics.wait_subscribed(Duration::MAX));
    let mut announced = false;
    loop {
        tokio::select! {
            () = &mut terminate => break,
            _ = &mut ready, if !announced => {
                announced = true;
                notifier.ready("subscribed; ingesting");
            }
            _ = watchdog.tick(), if period.is_some() => notifier.watchdog(),
        }
    }
    notifier.stopping();
}

async fn send(args: &SendArgs) -> Result<(), BoxError> {
    let config = load(&args.config)?;
    let settings = &config.settings;
    check_against_schema(&config, &args.device, &args.command)?;
    let gateway = match &args.gateway {
        Some(gateway) => gateway.clone(),
        None => only_gateway(settings, &args.device)?,
    };
    let keys = KeyStore::open(&settings.keys_dir)?;
    let (seq, envelope) = seal_command(&keys, &args.device, args.command.as_bytes())?;
    let topic = settings.down_topic.render(&gateway, &args.device);
    let client_id = format!("{}-command", settings.client_id);
    publish_once(
        &settings.broker,
        Arc::clone(&settings.tls),
        &client_id,
        topic.clone(),
        envelope,
        Duration::from_secs(10),
    )
    .await?;
    println!("sent command seq {seq} to {} on {topic}", args.device);
    Ok(())
}

/// The allowlist check before sealing: a command that fails it is never sealed nor
/// published.
fn check_against_schema(config: &CloudConfig, device: &str, command: &str) -> Result<(), BoxError> {
    let refused =
        |why: String| -> BoxError { format!("command refused, nothing sent: {why}").into() };
    let json: serde_json::Value =
        serde_json::from_str(command).map_err(|err| refused(format!("not JSON: {err}")))?;
    let schema = config.commands.as_ref().ok_or_else(|| {
        refused("no command schema is configured (set [commands] schema in the cloud config; docs/COMMANDS.md)".into())
    })?;
    let allowed = schema.for_device(device).ok_or_else(|| {
        refused(format!(
            "device `{device}` has no type in the command schema (add it under [device_types])"
        ))
    })?;
    check_outgoing(allowed, &json).map_err(|refusal| refused(refusal.to_string()))?;
    Ok(())
}

fn only_gateway(settings: &CloudSettings, device: &str) -> Result<String, BoxError> {
    let registry = settings
        .registry
        .as_ref()
        .ok_or("no registry configured: name the gateway with --gateway")?;
    let gateways = registry.gateways_for(device);
    match gateways.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(format!("the registry lets no gateway carry {device}").into()),
        _ => {
            Err(format!("{device} may come through {gateways:?}: choose one with --gateway").into())
        }
    }
}

/// Rotates every device whose key is older than the interval and sends each its
/// `rekey` command through every gateway the registry allows for it (the device's
/// replay rule drops the extra copies).
async fn rotate_on_schedule(config: CloudConfig, stop: CancellationToken) {
    let settings = config.settings;
    let check_every =
        (config.rotation.interval / 10).clamp(Duration::from_secs(1), Duration::from_secs(300));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(check_every) => {}
        }
        let Ok(keys) = KeyStore::open(&settings.keys_dir) else {
            continue;
        };
        for device in keys.devices().unwrap_or_default() {
            if !keys.rotation_due(&device, config.rotation.interval, now_ms()) {
                continue;
            }
            let gateways = settings
                .registry
                .as_ref()
                .map(|r| r.gateways_for(&device))
                .unwrap_or_default();
            if gateways.is_empty() {
                tracing::warn!(
                    device,
                    "rotation due, but no gateway is known to carry the rekey command; skipped"
                );
                continue;
            }
            match keys.rotate(&device, config.rotation.grace, now_ms()) {
                Ok(rotation) => {
                    for gateway in &gateways {
                        let topic = settings.down_topic.render(gateway, &device);
                        let client_id = format!("{}-rotation", settings.client_id);
                        let sent = publish_once(
                            &settings.broker,
                            Arc::clone(&settings.tls),
                            &client_id,
                            topic,
                            rotation.command.clone(),
                            Duration::from_secs(10),
                        )
                        .await;
                        if let Err(err) = sent {
                            tracing::error!(device, gateway, error = %err, "rekey command not delivered to the broker");
                        }
                    }
                    tracing::info!(
                        device,
                        key_id = rotation.new.key_id(),
                        "key rotated; rekey command sent"
                    );
                }
                Err(err) => tracing::error!(device, error = %err, "scheduled rotation failed"),
            }
        }
    }
}
