//! `blindgate-bench`: blindgate against a Mosquitto bridge, side by side, in one run on
//! one machine, with the same cloud broker and the same device transport for both.
//!
//! What it proves (or disproves): that blindgate, which PUBACKs a device only after the
//! envelope is fsynced, delivers at least as many messages per second, with comparable
//! end-to-end latency, as Mosquitto bridging with `persistence true` (which PUBACKs from
//! memory), and how far both are from the ceiling (the same load published straight to
//! the cloud broker). Every message is a real E3 envelope whose sealed plaintext holds
//! the send time; the cloud-side counter holds the device keys, opens every envelope and
//! checks loss, duplicates, order and latency. The bench's own CPU (generator and
//! counter) is reported so a reader sees it is not the bottleneck.
//!
//! Set-up (all on 127.0.0.1, all TLS 1.3 with client certificates):
//! - cloud broker: Mosquitto, mTLS 1.3, shared by every target;
//! - `blindgate`: the real `blindgate gateway` binary, devices → it → cloud broker;
//! - `mosquitto bridge`: Mosquitto with a device listener (mTLS 1.3) and a bridge to the
//!   cloud broker (`persistence true`, QoS 1, `bridge_tls_version tlsv1.3`, client cert);
//! - `direct`: the devices publish straight to the cloud broker (the ceiling).

//!
//! Modules: [`brokers`] (the processes and their configurations), [`mqtt`] (the small
//! MQTT client), [`load`] (the device load generator), [`counter`] (the cloud-side
//! counter), [`phase`] (one scenario against one target), [`report`] (table and JSON).

#![forbid(unsafe_code)]

mod brokers;
mod counter;
mod load;
mod mqtt;
mod phase;
mod report;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, bail};
use blindgate::pki::{DevPki, DevPkiOptions, generate_dev_pki};
use clap::Parser;

use crate::brokers::{BlindgateSpec, Proc, start_blindgate, start_bridge, start_cloud};
use crate::counter::{Counter, run_counter};
use crate::load::{Phase, Target};
use crate::mqtt::tls_config;
use crate::phase::Bench;
use crate::report::{PhaseResult, RunInfo, render_table, results_json};

#[derive(Debug, Parser)]
#[command(
    name = "blindgate-bench",
    about = "blindgate vs a Mosquitto bridge vs direct, side by side"
)]
struct Args {
    /// The blindgate binary to run as the gateway.
    #[arg(long, default_value = "target/release/blindgate")]
    blindgate: PathBuf,
    /// The Mosquitto binary (cloud broker and bridge).
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto: PathBuf,
    /// Short run for CI: a few seconds per scenario, few devices, fails on any loss.
    #[arg(long)]
    smoke: bool,
    /// Seconds each scenario publishes for (default 10, smoke 3).
    #[arg(long)]
    seconds: Option<f64>,
    /// Device connections (default 10, smoke 4).
    #[arg(long)]
    devices: Option<usize>,
    /// Publishes awaiting PUBACK per connection.
    #[arg(long, default_value_t = 100)]
    window: usize,
    /// Total messages per second of the latency scenario (default 2000, smoke 500).
    #[arg(long)]
    latency_rate: Option<u32>,
    /// Where the machine-readable results go.
    #[arg(long, default_value = "target/bench/results.json")]
    json: PathBuf,
    /// blindgate's log level (its log is in the work directory).
    #[arg(long, default_value = "warn")]
    gateway_log_level: String,
    /// Keep the work directory (configs, logs, queues) instead of deleting it.
    #[arg(long)]
    keep: bool,
}

/// One row group of the table: a named phase run against every target.
pub(crate) struct Scenario {
    pub(crate) name: String,
    pub(crate) unit: &'static str,
    phase: Phase,
}

/// The targets in table order (blindgate, the bridge, direct), each with the pid of its
/// gateway process (none for direct).
type Targets = [(Arc<Target>, Option<u32>); 3];

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blindgate-bench: tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let work = match tempfile::Builder::new()
        .prefix("blindgate-bench-")
        .tempdir()
    {
        Ok(w) => w,
        Err(e) => {
            eprintln!("blindgate-bench: work directory: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let keep = args.keep;
    let outcome = runtime.block_on(run(args, work.path()));
    // Configurations and logs of a failed run are kept: they say why.
    if keep || !matches!(outcome, Ok(true)) {
        eprintln!(
            "work directory (configs, logs, queues) kept: {}",
            work.keep().display()
        );
    }
    match outcome {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("blindgate-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs everything; `Ok(false)` if a check failed: for any target and scenario, an
/// acknowledged message never reached the counter, an envelope did not open or did not
/// match its header, a PUBACK came out of publish order, or nothing was acknowledged.
async fn run(args: Args, work: &Path) -> Result<bool> {
    let load_before = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let seconds = args.seconds.unwrap_or(if args.smoke { 3.0 } else { 10.0 });
    let n_devices = args.devices.unwrap_or(if args.smoke { 4 } else { 10 });
    let latency_rate = args
        .latency_rate
        .unwrap_or(if args.smoke { 500 } else { 2000 });
    check_binaries(&args)?;
    let dir = work.to_owned();

    let names: Vec<String> = (0..n_devices).map(|i| format!("bench-{i}")).collect();
    let pki = generate_dev_pki(&DevPkiOptions {
        out_dir: dir.join("certs"),
        gateway_id: "gw-1".into(),
        devices: names.clone(),
        cloud_host: "localhost".into(),
        validity_days: 30,
        force: false,
    })?;
    let devices = load::devices(&pki)?;

    // The cloud broker, shared by all targets, and the counter on it.
    let (mut cloud, cloud_port) = start_cloud(&args.mosquitto, &dir, &pki)?;
    let counter = Arc::new(Counter::new(&names)?);
    let ingest_tls = tls_config(
        &pki.cloud_ca.cert,
        &pki.cloud_ingest.cert,
        &pki.cloud_ingest.key,
    )?;
    let counter_task = tokio::spawn(run_counter(counter.clone(), cloud_port, ingest_tls));

    let spec = BlindgateSpec {
        binary: &args.blindgate,
        window: args.window,
        log_level: &args.gateway_log_level,
    };
    let (mut blindgate, bg_port) = start_blindgate(&spec, &dir, cloud_port, &pki)?;
    let (mut bridge, br_port) = start_bridge(&args.mosquitto, &dir, cloud_port, &pki)?;
    let targets = targets(&pki, [&blindgate, &bridge], [bg_port, br_port], cloud_port)?;
    let mut bench = Bench {
        epoch: counter.epoch,
        devices,
        counter: counter.clone(),
        next_seq: vec![0; n_devices],
        next_run: 0,
        self_pid: std::process::id(),
        cloud_pid: cloud.pid(),
    };

    warm_up(&mut bench, &targets, args.window).await?;
    let scenarios = scenarios(seconds, latency_rate, n_devices, args.window);
    let (ok, all) = run_scenarios(&mut bench, &targets, &scenarios, seconds, n_devices).await?;
    for p in [&mut cloud, &mut blindgate, &mut bridge] {
        p.check_alive()?;
    }
    counter_task.abort();

    println!("{}", render_table(&scenarios, &all, n_devices, args.window));
    let info = RunInfo {
        loadavg_before: &load_before,
        devices: n_devices,
        window: args.window,
        seconds,
        smoke: args.smoke,
        ok,
    };
    let names = targets.each_ref().map(|(t, _)| t.name);
    let results = results_json(&info, &scenarios, &names, &all);
    if let Some(parent) = args.json.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&args.json, serde_json::to_string_pretty(&results)?)?;
    eprintln!("results written to {}", args.json.display());
    Ok(ok)
}

fn check_binaries(args: &Args) -> Result<()> {
    if !args.blindgate.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release` or pass --blindgate",
            args.blindgate.display()
        );
    }
    if !args.mosquitto.is_file() {
        bail!(
            "{} not found: install Debian's mosquitto or pass --mosquitto",
            args.mosquitto.display()
        );
    }
    Ok(())
}

/// blindgate, the Mosquitto bridge (`gateways`, on `ports`) and the direct ceiling (the
/// cloud broker on `cloud_port`, with the gateway's client certificate).
fn targets(
    pki: &DevPki,
    gateways: [&Proc; 2],
    ports: [u16; 2],
    cloud_port: u16,
) -> Result<Targets> {
    let cloud_client = tls_config(
        &pki.cloud_ca.cert,
        &pki.gateway_client.cert,
        &pki.gateway_client.key,
    )?;
    Ok([
        (
            Arc::new(Target {
                name: "blindgate",
                port: ports[0],
                topic_prefix: "e3/",
                tls_override: None,
            }),
            Some(gateways[0].pid()),
        ),
        (
            Arc::new(Target {
                name: "mosquitto bridge",
                port: ports[1],
                topic_prefix: "e3/",
                tls_override: None,
            }),
            Some(gateways[1].pid()),
        ),
        (
            Arc::new(Target {
                name: "direct",
                port: cloud_port,
                topic_prefix: "gw/gw-1/e3/",
                tls_override: Some(cloud_client),
            }),
            None,
        ),
    ])
}

/// Warm-up: a few messages per device through every target, all must arrive (this
/// also waits for both uplinks to the cloud broker to be connected).
async fn warm_up(bench: &mut Bench, targets: &Targets, window: usize) -> Result<()> {
    for (target, pid) in targets {
        let warm = Phase {
            run: 0,
            envelope_size: 256,
            seconds: 1.0,
            rate_per_device: Some(20.0),
            window,
        };
        let r = bench.run_phase(target, *pid, warm).await?;
        if r.lost > 0 || r.acked == 0 {
            bail!(
                "warm-up through {}: {} acked, {} lost",
                target.name,
                r.acked,
                r.lost
            );
        }
    }
    Ok(())
}

/// Throughput at 256 B and 16 KiB, and latency at a fixed total rate.
fn scenarios(seconds: f64, latency_rate: u32, n_devices: usize, window: usize) -> [Scenario; 3] {
    let phase = |envelope_size, rate_per_device| Phase {
        run: 0,
        envelope_size,
        seconds,
        rate_per_device,
        window,
    };
    [
        Scenario {
            name: "throughput QoS 1, 256 B".into(),
            unit: "msg/s",
            phase: phase(256, None),
        },
        Scenario {
            name: "throughput QoS 1, 16 KiB".into(),
            unit: "msg/s",
            phase: phase(16 * 1024, None),
        },
        Scenario {
            name: format!("latency at {latency_rate} msg/s, 256 B"),
            unit: "ms",
            phase: phase(256, Some(f64::from(latency_rate) / n_devices as f64)),
        },
    ]
}

/// Every scenario against every target; `false` if a check failed (see [`run`]).
async fn run_scenarios(
    bench: &mut Bench,
    targets: &Targets,
    scenarios: &[Scenario],
    seconds: f64,
    n_devices: usize,
) -> Result<(bool, Vec<Vec<PhaseResult>>)> {
    let mut ok = true;
    let mut all = Vec::new();
    for sc in scenarios {
        let mut row = Vec::new();
        for (target, pid) in targets {
            eprintln!(
                "running: {} against {} ({seconds} s, {n_devices} devices)",
                sc.name, target.name
            );
            let r = bench.run_phase(target, *pid, sc.phase).await?;
            eprintln!("{}", r.summary());
            if r.lost > 0 || r.bad > 0 || r.pkid_mismatch > 0 || r.acked == 0 {
                eprintln!(
                    "  CHECK FAILED for {}: lost {} bad {} pkid mismatches {}",
                    target.name, r.lost, r.bad, r.pkid_mismatch
                );
                ok = false;
            }
            row.push(r);
        }
        all.push(row);
    }
    Ok((ok, all))
}
