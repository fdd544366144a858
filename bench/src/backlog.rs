//! The backlog scenario, against each gateway in turn (the direct ceiling has no queue):
//! a fresh gateway whose uplink points at a [`CloudGate`] that is closed (the cloud is
//! unreachable) gets `messages` envelopes of 256 B queued from a few devices; measured
//! on the way are its memory (at start, with many idle devices connected, with the
//! backlog queued, and with both), the bytes it wrote while queueing and the disk its
//! queue uses. Then it is restarted with the backlog queued (see [`crate::restart`]; the
//! last restart restores the cloud), and the drain is measured: the rate at which the
//! backlog reaches the counter while other devices keep publishing at a modest fixed
//! rate, and those live messages' end-to-end latency. Every acknowledged message, queued
//! or live, must reach the counter exactly once and in order.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use blindgate::pki::DevPki;

use crate::brokers::{BlindgateSpec, Proc, cpu_seconds, start_blindgate, start_bridge};
use crate::load::{DevResult, Phase, Target, connect_idle};
use crate::phase::{Bench, lost};
use crate::procfs::{Memory, disk_usage, write_bytes};
use crate::proxy::CloudGate;
use crate::report::percentiles;
use crate::restart::{NotifyListener, Restart, restart};

/// What the scenario is run with.
pub(crate) struct BacklogSpec<'a> {
    /// Messages to queue (split evenly over the backlog devices).
    pub(crate) messages: u64,
    /// Devices `0..backlog_devices` queue the backlog; the next `live_devices` publish
    /// the live traffic (`live_rate` msg/s in all) during the drain.
    pub(crate) backlog_devices: usize,
    pub(crate) live_devices: usize,
    pub(crate) live_rate: f64,
    /// Devices connected idle for the memory figures (the first ones).
    pub(crate) idle_devices: usize,
    pub(crate) window: usize,
    /// Pause before each memory and disk reading, for the gateway to finish what it was
    /// doing (flushes, handshakes).
    pub(crate) settle: Duration,
    pub(crate) dir: &'a Path,
    pub(crate) pki: &'a DevPki,
    pub(crate) cloud_port: u16,
    pub(crate) blindgate: &'a Path,
    pub(crate) mosquitto: &'a Path,
    pub(crate) log_level: &'a str,
}

/// The two gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gateway {
    Blindgate,
    Bridge,
}

impl Gateway {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Blindgate => "blindgate",
            Self::Bridge => "mosquitto bridge",
        }
    }

    /// The restarts: blindgate is stopped with SIGTERM (cloud still down), then killed
    /// (SIGKILL) and started with the cloud back. Mosquitto keeps its queue in memory
    /// and writes it to disk only at exit (or autosave), so SIGKILL would lose it: it is
    /// stopped with SIGTERM only, and started with the cloud back.
    fn restarts(self) -> &'static [(&'static str, bool)] {
        match self {
            Self::Blindgate => &[("TERM", false), ("KILL", true)],
            Self::Bridge => &[("TERM", true)],
        }
    }
}

/// The drain: backlog and live traffic after the cloud came back.
#[derive(Debug, Clone, Default)]
pub(crate) struct Drain {
    /// Backlog messages per second, from the first to the last to reach the counter.
    pub(crate) rate: f64,
    /// ... from the cloud's restore (just before the last restart) to the last.
    pub(crate) rate_from_restore: f64,
    pub(crate) seconds: f64,
    pub(crate) live_acked: u64,
    pub(crate) live_e2e_ms: [f64; 4],
    pub(crate) lost_backlog: u64,
    pub(crate) lost_live: u64,
    pub(crate) duplicates: u64,
    pub(crate) reordered: u64,
    pub(crate) bad: u64,
    pub(crate) pkid_mismatch: u64,
    /// Device connections the gateway reset after the DISCONNECT (backlog and live).
    pub(crate) reset_after_disconnect: u64,
    /// Gateway CPU per delivered message (backlog and live) during the drain, µs.
    pub(crate) gateway_cpu_us_per_msg: f64,
    pub(crate) memory_end: Memory,
}

/// The scenario's figures for one gateway.
#[derive(Debug, Clone)]
pub(crate) struct BacklogResult {
    pub(crate) gateway: Gateway,
    /// Backlog messages acknowledged to the devices, and how long queueing them took.
    pub(crate) queued: u64,
    pub(crate) queue_seconds: f64,
    /// Bytes the gateway wrote to storage while queueing.
    pub(crate) queue_write_bytes: u64,
    pub(crate) memory_start: Memory,
    pub(crate) memory_idle: Memory,
    pub(crate) memory_backlog: Memory,
    pub(crate) memory_idle_backlog: Memory,
    /// Disk used by its queue with the backlog queued, while running.
    pub(crate) disk_bytes: u64,
    pub(crate) restarts: Vec<Restart>,
    pub(crate) drain: Drain,
}

impl BacklogResult {
    /// Every acknowledged message arrived intact, and PUBACKs came in publish order
    /// (duplicates and reordering are reported but, as in the other scenarios, do not
    /// fail the run).
    pub(crate) fn ok(&self) -> bool {
        let d = &self.drain;
        self.queued > 0
            && d.lost_backlog == 0
            && d.lost_live == 0
            && d.bad == 0
            && d.pkid_mismatch == 0
    }
}

/// A gateway of the scenario: its process, its queue's path, its `NOTIFY_SOCKET`.
struct Instance {
    proc: Proc,
    queue: PathBuf,
    notify: Option<NotifyListener>,
}

fn start(spec: &BacklogSpec<'_>, gw: Gateway, gate: &CloudGate) -> Result<Instance> {
    match gw {
        Gateway::Blindgate => {
            let sock = spec.dir.join("backlog-blindgate.notify");
            let notify = NotifyListener::bind(&sock)?;
            let bg = BlindgateSpec {
                binary: spec.blindgate,
                window: spec.window,
                log_level: spec.log_level,
                subdir: "backlog-blindgate",
                client_id: "gw-1-backlog",
                notify_socket: Some(&sock),
            };
            let (proc, queue) = start_blindgate(&bg, spec.dir, gate.port, spec.pki)?;
            Ok(Instance {
                proc,
                queue,
                notify: Some(notify),
            })
        }
        Gateway::Bridge => {
            let names = ("backlog-bridge", "gw-1-bridge-backlog");
            let (proc, home) = start_bridge(spec.mosquitto, spec.dir, names, gate.port, spec.pki)?;
            Ok(Instance {
                proc,
                queue: home.join("mosquitto.db"),
                notify: None,
            })
        }
    }
}

/// Runs the scenario against `gw` (a fresh instance, stopped at the end).
pub(crate) async fn run_backlog(
    bench: &mut Bench,
    spec: &BacklogSpec<'_>,
    gw: Gateway,
) -> Result<BacklogResult> {
    let mut gate = CloudGate::closed(spec.cloud_port)?;
    let mut inst = start(spec, gw, &gate)?;
    let target = Arc::new(Target {
        name: gw.name(),
        port: inst.proc.port(),
        topic_prefix: "e3/",
        tls_override: None,
    });
    let pid = inst.proc.pid();
    tokio::time::sleep(spec.settle).await;
    let memory_start = Memory::of(pid);
    let memory_idle = idle_memory(bench, &target, spec, pid).await?;

    // Queue the backlog.
    let per_device = spec.messages.div_ceil(spec.backlog_devices.max(1) as u64);
    let mut phase = Phase::new(256, 86_400.0, None, spec.window, spec.backlog_devices);
    phase.count = Some(per_device);
    let phase = bench.begin(phase, spec.backlog_devices);
    eprintln!(
        "running: backlog of {} messages into {} (cloud unreachable)",
        per_device * spec.backlog_devices as u64,
        gw.name()
    );
    let (io0, t0) = (write_bytes(pid), Instant::now());
    let tasks = bench.spawn_devices(&target, phase);
    let backlog = bench.collect(&target, phase, tasks).await?;
    let queue_seconds = t0.elapsed().as_secs_f64();
    let queued: u64 = backlog.iter().map(|r| r.acked).sum();
    tokio::time::sleep(spec.settle).await;
    let queue_write_bytes = write_bytes(pid).saturating_sub(io0);
    let memory_backlog = Memory::of(pid);
    let disk_bytes = disk_usage(&inst.queue);
    let memory_idle_backlog = idle_memory(bench, &target, spec, pid).await?;
    eprintln!(
        "  queued {queued} in {queue_seconds:.1} s; RSS {:.1} MiB; queue on disk {:.1} MiB",
        memory_backlog.rss_mib(),
        disk_bytes as f64 / 1048576.0
    );

    let mut restarts = Vec::new();
    let mut restored = Instant::now();
    for &step in gw.restarts() {
        let (r, started) = restart(
            &mut inst.proc,
            step,
            &mut gate,
            inst.notify.as_ref(),
            &inst.queue,
            &bench.counter,
        )
        .await?;
        eprintln!("  restart after SIG{}: {r:?}", step.0);
        restarts.push(r);
        restored = started;
    }
    let drain = drain(
        bench,
        spec,
        &target,
        (&backlog, queued),
        restored,
        &mut inst.proc,
    )
    .await?;
    Ok(BacklogResult {
        gateway: gw,
        queued,
        queue_seconds,
        queue_write_bytes,
        memory_start,
        memory_idle,
        memory_backlog,
        memory_idle_backlog,
        disk_bytes,
        restarts,
        drain,
    })
}

/// The gateway's memory with the spec's idle devices connected.
async fn idle_memory(
    bench: &Bench,
    target: &Target,
    spec: &BacklogSpec<'_>,
    pid: u32,
) -> Result<Memory> {
    let n = spec.idle_devices.min(bench.devices.len());
    let conns = connect_idle(target, &bench.devices[..n]).await?;
    tokio::time::sleep(spec.settle).await;
    let m = Memory::of(pid);
    eprintln!(
        "  {} idle devices connected to {}: RSS {:.1} MiB ({:.1} MiB of it file pages)",
        conns.len(),
        target.name,
        m.rss_mib(),
        m.file_mib()
    );
    drop(conns);
    Ok(m)
}

/// The drain, the cloud restored at `restored`: live devices publish at the spec's rate
/// from the first backlog message's arrival until the whole `backlog` (`queued`
/// acknowledged) arrived; then the counts are checked.
async fn drain(
    bench: &mut Bench,
    spec: &BacklogSpec<'_>,
    target: &Arc<Target>,
    (backlog, queued): (&[DevResult], u64),
    restored: Instant,
    proc: &mut Proc,
) -> Result<Drain> {
    let pid = proc.pid();
    let cpu0 = cpu_seconds(pid);
    let live_per_device = spec.live_rate / spec.live_devices.max(1) as f64;
    let mut live = Phase::new(
        256,
        86_400.0,
        Some(live_per_device),
        spec.window,
        spec.live_devices,
    );
    live.first_device = spec.backlog_devices;
    live.run = bench.next_run;
    eprintln!(
        "running: drain of {} with {} msg/s of live traffic",
        target.name, spec.live_rate
    );
    let tasks = bench.spawn_devices(target, live);
    // Until the whole backlog arrived, or nothing more arrived for 30 s.
    let (mut last, mut since) = (0, Instant::now());
    loop {
        let now = bench.counter.lock().low_received;
        if now >= queued {
            break;
        }
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() > Duration::from_secs(30) {
            eprintln!("  drain stalled at {now} of {queued}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bench.stop.store(true, Ordering::Relaxed);
    let live_results = bench.collect(target, live, tasks).await;
    bench.stop.store(false, Ordering::Relaxed);
    let live_results = live_results?;
    let live_acked: u64 = live_results.iter().map(|r| r.acked).sum();
    bench.wait_for_counter(queued + live_acked).await;
    let cpu = cpu_seconds(pid) - cpu0;
    proc.check_alive()?;
    let s = std::mem::take(&mut *bench.counter.lock());
    let restored_ns = restored.duration_since(bench.epoch).as_nanos() as u64;
    let span = s.low_last_rx_ns.saturating_sub(s.low_first_rx_ns) as f64 / 1e9;
    let from_restore = s.low_last_rx_ns.saturating_sub(restored_ns) as f64 / 1e9;
    let d = Drain {
        rate: s.low_received as f64 / span.max(1e-9),
        rate_from_restore: s.low_received as f64 / from_restore.max(1e-9),
        seconds: span,
        live_acked,
        lost_backlog: lost(backlog, &s, 0),
        lost_live: lost(&live_results, &s, spec.backlog_devices),
        duplicates: s.duplicates,
        reordered: s.reordered,
        bad: s.bad,
        pkid_mismatch: backlog
            .iter()
            .chain(&live_results)
            .map(|r| r.pkid_mismatch)
            .sum(),
        reset_after_disconnect: backlog
            .iter()
            .chain(&live_results)
            .map(|r| r.reset_after_disconnect)
            .sum(),
        gateway_cpu_us_per_msg: cpu / s.received.max(1) as f64 * 1e6,
        memory_end: Memory::of(pid),
        live_e2e_ms: percentiles(s.live_latencies_ns),
    };
    eprintln!("  {d:?}");
    Ok(d)
}
