//! `blindgate-queue-bench`: a microbenchmark of the gateway's durable queue alone
//! (`blindgate::queue::Queue`), in process, without network or TLS.
//!
//! Four figures per run, on a fresh queue in a fresh directory:
//! 1. append: `--devices` tokio tasks, each keeping `--window` records outstanding
//!    (handed over with `submit`, then awaited in order with `durable()`, as an MQTT
//!    session pipelining QoS 1 does), until `--records` records of `--size` bytes are
//!    durable (fsync'd). Records/s, payload MB/s, CPU µs per record (user + system of
//!    the whole process, from `/proc/self/stat`, 10 ms resolution), bytes written to
//!    storage per payload byte (`write_bytes` of `/proc/self/io`, every thread of the
//!    process), and p50/p99/max of submit → durable.
//! 2. drain: device by device, read batches of 256 and ack every record until empty,
//!    then one flush: records/s, CPU µs per record, bytes written per payload byte.
//! 3. the queue's files after the append (apparent size of every file under the queue
//!    directory) per payload byte; resident memory at the end of the append (`VmRSS`),
//!    its peak up to then and over the whole run (`VmHWM`).
//! 4. latency: on a second fresh queue, one device, one record at a time,
//!    `--latency-records` at `--rate` per second: p50/p99/p99.9 of submit → durable.
//!
//! The directory must be on a real disk (a queue on tmpfs measures nothing): the bench
//! prints the filesystem type and refuses tmpfs and ramfs.
//!
//! Run it (release build; defaults: 200 000 records of 256 bytes, 10 devices, window 64,
//! 2000 latency records at 2000/s):
//!
//! ```text
//! cargo build --release --locked -p blindgate-bench --bins
//! target/release/blindgate-queue-bench --dir /var/tmp --json queue-bench.json
//! target/release/blindgate-queue-bench --dir /var/tmp --size 16384 --records 20000
//! ```
//!
//! The workload runs against a small trait ([`store::Store`]), so that another storage
//! design can be measured beside the queue (on 2026-11-25 a prototype of the segment
//! log was measured so against the queue as it was then, with its records in sled:
//! `docs/performance.md`).
//!
//! Modules: [`store`] (the trait and the gateway's queue behind it), [`workload`] (the
//! runs), [`sys`] (`/proc` and the disk), [`report`] (the table and JSON).

#![forbid(unsafe_code)]

#[path = "../cpu.rs"]
mod cpu;
mod report;
mod store;
mod sys;
mod workload;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};

use crate::report::{Figures, RunInfo};
use crate::store::{GatewayQueue, Store};

/// The storage backends `--store` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// `blindgate::queue::Queue`, the gateway's queue (segment log, group commit,
    /// fdatasync).
    Queue,
}

#[derive(Debug, Parser)]
#[command(
    name = "blindgate-queue-bench",
    about = "Microbenchmark of blindgate's durable queue: append, drain, latency"
)]
struct Args {
    /// The directory in which a fresh temporary directory is made for the queues
    /// (removed at the end); must be on a real disk, not tmpfs. Default: $TMPDIR if
    /// set, else /var/tmp.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The storage backend.
    #[arg(long, value_enum, default_value = "queue")]
    store: Backend,
    /// Records in the append phase (all devices together).
    #[arg(long, default_value_t = 200_000)]
    records: usize,
    /// Payload bytes per record.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Devices appending concurrently, one tokio task each.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Records each device keeps outstanding (handed over, not yet durable).
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Records in the latency run (one at a time).
    #[arg(long, default_value_t = 2000)]
    latency_records: usize,
    /// Records per second in the latency run.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Records per drain batch.
const DRAIN_BATCH: usize = 256;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.records == 0 || args.size == 0 || args.devices == 0 || args.window == 0 {
        bail!("--records, --size, --devices and --window must be above 0");
    }
    let parent = args.dir.clone().unwrap_or_else(|| {
        std::env::var_os("TMPDIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from)
    });
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix("queue-bench-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot make a directory in {}", parent.display()))?;
    let root = scratch.path().canonicalize().context("canonical path")?;
    let (fs_type, fs_device) = sys::filesystem(&root);
    if matches!(fs_type.as_str(), "tmpfs" | "ramfs") {
        bail!(
            "{} is on {fs_type}: the queue must be on a real disk (pass --dir)",
            root.display()
        );
    }
    let info = RunInfo {
        store: format!("{:?}", args.store).to_lowercase(),
        dir: root.display().to_string(),
        fs_type,
        fs_device,
        records: args.records,
        size: args.size,
        devices: args.devices,
        window: args.window,
        latency_records: args.latency_records,
        rate: args.rate,
    };
    eprintln!(
        "queue bench: {} records x {} B, {} devices x window {}, in {} ({} on {})",
        info.records, info.size, info.devices, info.window, info.dir, info.fs_type, info.fs_device
    );
    // Keys and framing: room for several times the payload.
    let cap = (args.records as u64 * (args.size as u64 + 256)).saturating_mul(4) + (64 << 20);
    let figures = match args.store {
        Backend::Queue => run(&args, &root, |dir| GatewayQueue::open(dir, cap)).await?,
    };
    print!("{}", report::render(&info, &figures));
    if let Some(path) = &args.json {
        let json = report::json(&info, &figures);
        let text = serde_json::to_string_pretty(&json).context("JSON")?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    drop(scratch);
    Ok(())
}

/// All four measurements against stores `open` makes in fresh directories under `root`.
async fn run<S: Store>(
    args: &Args,
    root: &Path,
    open: impl Fn(&Path) -> Result<S>,
) -> Result<Figures> {
    let pool = workload::payload_pool(args.size);
    let dir = root.join("queue");
    let store = open(&dir)?;
    let append = workload::append(&store, &pool, args.records, args.devices, args.window).await?;
    let (rss_after_append_kib, peak_rss_append_kib) = sys::memory_kib();
    let disk_after_append = sys::tree_size(&dir);
    let drain = workload::drain(&store, DRAIN_BATCH).await?;
    if drain.records != args.records as u64 {
        bail!(
            "the drain found {} records, the append stored {}",
            drain.records,
            args.records
        );
    }
    store.close().await?;

    let latency_dir = root.join("latency");
    let store = open(&latency_dir)?;
    let latency = workload::latency(&store, &pool, args.latency_records, args.rate).await?;
    store.close().await?;
    let (_, peak_rss_kib) = sys::memory_kib();
    Ok(Figures {
        append,
        drain,
        latency,
        disk_after_append,
        rss_after_append_kib,
        peak_rss_append_kib,
        peak_rss_kib,
    })
}
