//! What the demo observed: the outage timeline with queue sampling while it runs, and
//! the count at the end, taken from the cloud's sink (not from what components say
//! about themselves).

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::link::Link;
use crate::cloud::sink::SinkLine;
use crate::cloud::{CloudMetrics, CloudRejection};
use crate::device::DeviceReport;
use crate::queue::Queue;

/// The demo's result.
#[derive(Debug, Clone, Default)]
pub struct DemoReport {
    /// Where the run's files are.
    pub dir: PathBuf,
    /// Devices that ran.
    pub devices: usize,
    /// New messages the devices sealed.
    pub sent: u64,
    /// Messages devices sent again (no receipt in time).
    pub resent: u64,
    /// Distinct messages in the cloud's sink.
    pub delivered: u64,
    /// Messages no receipt ever confirmed (left in device outboxes).
    pub lost: u64,
    /// Lines in the sink that repeat a (device, seq): must be 0.
    pub duplicates_in_sink: u64,
    /// Repeats the cloud recognised and dropped (answered with a receipt).
    pub duplicates_suppressed: u64,
    /// Receipts the cloud sent.
    pub receipts: u64,
    /// Images reassembled with a matching SHA-256.
    pub images: u64,
    /// End-to-end latency of readings (device seal to cloud sink), median and p99.
    pub latency_ms: (u64, u64),
    /// Most records waiting in the gateway's queue at once.
    pub queue_peak: u64,
    /// The outage: when it started and how long, from the start.
    pub outage: (Duration, Duration),
}

impl DemoReport {
    /// True if nothing was lost or stored twice.
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicates_in_sink == 0 && self.delivered > 0
    }
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "blindgate demo: {} devices -> gateway -> cloud",
            self.devices
        )?;
        writeln!(
            f,
            "  cloud outage          {:.0?} to {:.0?}",
            self.outage.0,
            self.outage.0 + self.outage.1
        )?;
        writeln!(f, "  sent                  {}", self.sent)?;
        writeln!(f, "  delivered (in sink)   {}", self.delivered)?;
        writeln!(f, "  lost                  {}", self.lost)?;
        writeln!(f, "  stored twice          {}", self.duplicates_in_sink)?;
        writeln!(
            f,
            "  duplicates suppressed {} (resent by devices: {})",
            self.duplicates_suppressed, self.resent
        )?;
        writeln!(f, "  receipts              {}", self.receipts)?;
        writeln!(
            f,
            "  images reassembled    {} (SHA-256 verified)",
            self.images
        )?;
        writeln!(
            f,
            "  latency p50 / p99     {} ms / {} ms (seal to sink, outage included)",
            self.latency_ms.0, self.latency_ms.1
        )?;
        writeln!(f, "  gateway queue peak    {} records", self.queue_peak)?;
        writeln!(f, "  output                {}", self.dir.display())?;
        writeln!(
            f,
            "    cloud/messages.jsonl  the sink (one JSON line per message)"
        )?;
        writeln!(f, "    cloud/images/         reassembled camera images")?;
        writeln!(
            f,
            "    gateway.toml          the gateway's config for this run"
        )?;
        write!(
            f,
            "  result                {}",
            if self.ok() {
                "OK: nothing lost"
            } else {
                "FAILED"
            }
        )
    }
}

/// Cuts and restores the link on schedule and samples the queue until `finished`.
pub(crate) async fn timeline(
    queue: Queue,
    link: &Link,
    outage_at: Duration,
    outage: Duration,
    finished: CancellationToken,
) -> u64 {
    let start = tokio::time::Instant::now();
    let mut peak = 0;
    let mut cut = false;
    let mut restored = false;
    while !finished.is_cancelled() {
        let elapsed = start.elapsed();
        if !cut && elapsed >= outage_at {
            tracing::warn!("demo: cutting the cloud link");
            link.cut();
            cut = true;
        }
        if cut && !restored && elapsed >= outage_at + outage {
            tracing::warn!("demo: restoring the cloud link");
            link.restore();
            restored = true;
        }
        peak = peak.max(queue.stats().total.records);
        tokio::select! {
            () = finished.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    if !restored {
        link.restore();
    }
    peak
}

/// Counts what arrived, from the sink and the devices' own reports.
pub(crate) fn tally(
    dir: &Path,
    devices: &[DeviceReport],
    queue_peak: u64,
    outage: (Duration, Duration),
    metrics: &CloudMetrics,
) -> DemoReport {
    let lines = read_sink(&dir.join("cloud/messages.jsonl"));
    let mut seen = HashSet::new();
    let mut duplicates_in_sink = 0;
    let mut latencies = Vec::new();
    for line in &lines {
        if !seen.insert((line.device.clone(), line.seq)) {
            duplicates_in_sink += 1;
        }
        let sealed = line
            .json
            .as_ref()
            .and_then(|j| j.get("ts_ms"))
            .and_then(serde_json::Value::as_u64);
        if let Some(sealed) = sealed {
            latencies.push(line.received_ms.saturating_sub(sealed));
        }
    }
    latencies.sort_unstable();
    let percentile = |p: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "index into a small vec"
        )]
        let i = ((latencies.len() as f64 - 1.0) * p).round().max(0.0) as usize;
        latencies.get(i).copied().unwrap_or(0)
    };
    DemoReport {
        dir: dir.to_owned(),
        devices: devices.len(),
        sent: devices.iter().map(|d| d.sent).sum(),
        resent: devices.iter().map(|d| d.resent).sum(),
        delivered: seen.len() as u64,
        lost: devices.iter().map(|d| d.outbox_left).sum(),
        duplicates_in_sink,
        duplicates_suppressed: metrics.rejected(CloudRejection::Duplicate),
        receipts: metrics.receipts.get(),
        images: metrics.images_completed.get(),
        latency_ms: (percentile(0.5), percentile(0.99)),
        queue_peak,
        outage,
    }
}

fn read_sink(path: &Path) -> Vec<SinkLine> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}
