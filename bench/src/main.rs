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
//! Then the backlog scenario runs against fresh instances of both gateways (the direct
//! ceiling has no queue): memory, disk, restart and drain figures (see [`backlog`]).
//!
//! Modules: [`brokers`] (the processes and their configurations), [`mqtt`] (the small
//! MQTT client), [`load`] (the device load generator), [`counter`] (the cloud-side
//! counter), [`phase`] (one scenario against one target), [`scenarios`] (the scenarios
//! run against all three targets), [`backlog`], [`proxy`] and [`restart`] (the backlog
//! scenario), [`procfs`] (memory, disk), [`report`] and [`backlog_report`] (tables and
//! JSON), [`svg`] (the plots).

#![forbid(unsafe_code)]

mod backlog;
mod backlog_report;
mod brokers;
mod counter;
mod cpu;
mod load;
mod mqtt;
mod phase;
mod procfs;
mod proxy;
mod report;
mod restart;
mod scenarios;
mod svg;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Result, bail};
use blindgate::pki::{DevPkiOptions, generate_dev_pki};
use clap::Parser;

use crate::backlog::{BacklogSpec, Gateway, run_backlog};
use crate::backlog_report::{backlog_json, render_backlog};
use crate::brokers::{BlindgateSpec, start_blindgate, start_bridge, start_cloud};
use crate::counter::{Counter, run_counter};
use crate::mqtt::tls_config;
use crate::phase::Bench;
use crate::report::{RunInfo, render_table, results_json};
use crate::scenarios::{run_scenarios, scenarios, targets, warm_up};

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
    /// Device connections of the many-devices throughput scenario, and idle devices of
    /// the memory figures (default 1000, smoke 50).
    #[arg(long)]
    many_devices: Option<usize>,
    /// Messages queued in the backlog scenario (default 1000000, smoke 20000; 0 skips it).
    #[arg(long)]
    backlog: Option<u64>,
    /// Live traffic during the drain, msg/s in all (default 500, smoke 200).
    #[arg(long)]
    live_rate: Option<f64>,
    /// Publishes awaiting PUBACK per connection.
    #[arg(long, default_value_t = 100)]
    window: usize,
    /// Total messages per second of the latency scenario (default 2000, smoke 500).
    #[arg(long)]
    latency_rate: Option<u32>,
    /// Where the machine-readable results go (the SVG plots go next to it).
    #[arg(long, default_value = "target/bench/results.json")]
    json: PathBuf,
    /// blindgate's log level (its log is in the work directory).
    #[arg(long, default_value = "warn")]
    gateway_log_level: String,
    /// Keep the work directory (configs, logs, queues) instead of deleting it.
    #[arg(long)]
    keep: bool,
    /// Run only the scenarios whose name contains this text, or one of several
    /// separated by `|` (e.g. "latency" or "16 KiB|latency"), to repeat or profile
    /// them; the backlog scenario runs if one of them is part of "backlog".
    #[arg(long)]
    only: Option<String>,
}

/// Devices that queue the backlog, and devices that publish live during the drain.
const BACKLOG_DEVICES: usize = 10;
const LIVE_DEVICES: usize = 10;

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
    let smoke = args.smoke;
    let seconds = args.seconds.unwrap_or(if smoke { 3.0 } else { 10.0 });
    let n_devices = args.devices.unwrap_or(if smoke { 4 } else { 10 });
    let many = args.many_devices.unwrap_or(if smoke { 50 } else { 1000 });
    let backlog = match &args.only {
        Some(only) if !only.split('|').any(|part| "backlog".contains(part)) => 0,
        _ => args
            .backlog
            .unwrap_or(if smoke { 20_000 } else { 1_000_000 }),
    };
    let live_rate = args.live_rate.unwrap_or(if smoke { 200.0 } else { 500.0 });
    let latency_rate = args.latency_rate.unwrap_or(if smoke { 500 } else { 2000 });
    check_binaries(&args)?;
    // Each device connection is a file in the bench and one in the gateway (which
    // inherits the limit), plus queue files, logs and the cloud side.
    procfs::check_open_files(2 * many as u64 + 256)?;
    let dir = work.to_owned();

    let n_total = n_devices.max(many).max(BACKLOG_DEVICES + LIVE_DEVICES);
    let names: Vec<String> = (0..n_total).map(|i| format!("bench-{i}")).collect();
    let pki_started = std::time::Instant::now();
    let pki = generate_dev_pki(&DevPkiOptions {
        out_dir: dir.join("certs"),
        gateway_id: "gw-1".into(),
        devices: names.clone(),
        cloud_host: "localhost".into(),
        validity_days: 30,
        force: false,
    })?;
    eprintln!(
        "dev PKI for {n_total} devices generated in {:.2} s",
        pki_started.elapsed().as_secs_f64()
    );
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
        subdir: "blindgate",
        client_id: "",
        notify_socket: None,
    };
    let (mut blindgate, _) = start_blindgate(&spec, &dir, cloud_port, &pki)?;
    let bridge_names = ("bridge", "gw-1-bridge");
    let (mut bridge, _) = start_bridge(&args.mosquitto, &dir, bridge_names, cloud_port, &pki)?;
    let ports = [blindgate.port(), bridge.port()];
    let targets = targets(&pki, [&blindgate, &bridge], ports, cloud_port)?;
    let mut bench = Bench {
        epoch: counter.epoch,
        devices,
        counter: counter.clone(),
        next_seq: vec![0; n_total],
        next_run: 0,
        self_pid: std::process::id(),
        cloud_pid: cloud.pid(),
        stop: Arc::new(AtomicBool::new(false)),
    };

    warm_up(&mut bench, &targets, args.window, n_devices).await?;
    let mut scenarios = scenarios(seconds, latency_rate, (n_devices, many), args.window);
    if let Some(only) = &args.only {
        scenarios.retain(|sc| only.split('|').any(|part| sc.name.contains(part)));
    }
    let (mut ok, all) = run_scenarios(&mut bench, &targets, &scenarios).await?;
    for p in [&mut cloud, &mut blindgate, &mut bridge] {
        p.check_alive()?;
    }
    // The backlog scenario runs on fresh instances: these would only compete for CPU.
    drop((blindgate, bridge));

    let mut backlog_results = Vec::new();
    if backlog > 0 {
        let spec = BacklogSpec {
            messages: backlog,
            backlog_devices: BACKLOG_DEVICES,
            live_devices: LIVE_DEVICES,
            live_rate,
            idle_devices: many,
            window: args.window,
            settle: std::time::Duration::from_millis(if smoke { 300 } else { 1500 }),
            dir: &dir,
            pki: &pki,
            cloud_port,
            blindgate: &args.blindgate,
            mosquitto: &args.mosquitto,
            log_level: &args.gateway_log_level,
        };
        for gw in [Gateway::Blindgate, Gateway::Bridge] {
            let r = run_backlog(&mut bench, &spec, gw).await?;
            if !r.ok() {
                eprintln!(
                    "  CHECK FAILED for the backlog of {}: {:?}",
                    gw.name(),
                    r.drain
                );
                ok = false;
            }
            backlog_results.push(r);
        }
    }
    cloud.check_alive()?;
    counter_task.abort();

    println!("{}", render_table(&scenarios, &all, args.window));
    println!("{}", render_backlog(&backlog_results, many));
    let info = RunInfo {
        loadavg_before: &load_before,
        devices: n_devices,
        window: args.window,
        seconds,
        smoke,
        ok,
    };
    let names = targets.each_ref().map(|(t, _)| t.name);
    let mut results = results_json(&info, &scenarios, &names, &all);
    results["backlog"] = backlog_json(&backlog_results);
    results["many_devices"] = many.into();
    let out = args.json.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(out)?;
    fs::write(&args.json, serde_json::to_string_pretty(&results)?)?;
    // results.json → results-throughput.svg, results-latency.svg (smoke.json → smoke-…).
    let stem = args
        .json
        .file_stem()
        .map_or("results".into(), |s| s.to_string_lossy());
    for (name, svg) in svg::plots(&scenarios, &names, &all, &backlog_results) {
        fs::write(out.join(format!("{stem}-{name}.svg")), svg)?;
    }
    eprintln!(
        "results written to {} (plots next to it); load average now {}",
        args.json.display(),
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
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
