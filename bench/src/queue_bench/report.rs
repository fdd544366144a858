//! The queue bench's output: an aligned table for people and JSON for scripts.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use crate::workload::{Append, Drain, Latency, quantile};

/// What was run, where.
pub(crate) struct RunInfo {
    pub(crate) store: String,
    pub(crate) dir: String,
    pub(crate) fs_type: String,
    pub(crate) fs_device: String,
    pub(crate) records: usize,
    pub(crate) size: usize,
    pub(crate) devices: usize,
    pub(crate) window: usize,
    pub(crate) latency_records: usize,
    pub(crate) rate: f64,
}

/// Everything measured.
pub(crate) struct Figures {
    pub(crate) append: Append,
    pub(crate) drain: Drain,
    pub(crate) latency: Latency,
    /// Apparent size of the queue's files after the append, bytes.
    pub(crate) disk_after_append: u64,
    pub(crate) rss_after_append_kib: u64,
    pub(crate) peak_rss_append_kib: u64,
    pub(crate) peak_rss_kib: u64,
}

/// The derived numbers, computed once for the table and the JSON.
struct Derived {
    append_rate: f64,
    append_mb_s: f64,
    append_cpu_us: f64,
    append_write_amp: f64,
    append_p50: Duration,
    append_p99: Duration,
    append_max: Duration,
    drain_rate: f64,
    drain_cpu_us: f64,
    drain_write_amp: f64,
    disk_per_byte: f64,
    latency_rate: f64,
    latency_p50: Duration,
    latency_p99: Duration,
    latency_p999: Duration,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

fn derive(info: &RunInfo, f: &Figures) -> Derived {
    let records = info.records as f64;
    let payload = records * info.size as f64;
    let mut append = f.append.latencies.clone();
    append.sort_unstable();
    let mut latency = f.latency.latencies.clone();
    latency.sort_unstable();
    let a = f.append.cost;
    let d = f.drain.cost;
    Derived {
        append_rate: ratio(records, a.seconds),
        append_mb_s: ratio(payload, a.seconds) / 1e6,
        append_cpu_us: ratio(a.cpu_seconds * 1e6, records),
        append_write_amp: ratio(a.write_bytes as f64, payload),
        append_p50: quantile(&append, 0.50),
        append_p99: quantile(&append, 0.99),
        append_max: append.last().copied().unwrap_or_default(),
        drain_rate: ratio(f.drain.records as f64, d.seconds),
        drain_cpu_us: ratio(d.cpu_seconds * 1e6, f.drain.records as f64),
        drain_write_amp: ratio(d.write_bytes as f64, f.drain.payload_bytes as f64),
        disk_per_byte: ratio(f.disk_after_append as f64, payload),
        latency_rate: ratio(latency.len() as f64, f.latency.seconds),
        latency_p50: quantile(&latency, 0.50),
        latency_p99: quantile(&latency, 0.99),
        latency_p999: quantile(&latency, 0.999),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The figures as an aligned two-column table.
pub(crate) fn render(info: &RunInfo, f: &Figures) -> String {
    let v = derive(info, f);
    let a = f.append.cost;
    let d = f.drain.cost;
    let rows: Vec<(&str, String)> = vec![
        ("store", info.store.clone()),
        (
            "dir",
            format!("{} ({} on {})", info.dir, info.fs_type, info.fs_device),
        ),
        (
            "workload",
            format!(
                "{} records x {} B, {} devices x window {}",
                info.records, info.size, info.devices, info.window
            ),
        ),
        ("append wall time", format!("{:.2} s", a.seconds)),
        ("append records/s", format!("{:.0}", v.append_rate)),
        ("append payload MB/s", format!("{:.2}", v.append_mb_s)),
        ("append CPU µs/record", format!("{:.1}", v.append_cpu_us)),
        (
            "append written B/payload B",
            format!("{:.2}", v.append_write_amp),
        ),
        ("append latency p50", ms(v.append_p50)),
        ("append latency p99", ms(v.append_p99)),
        ("append latency max", ms(v.append_max)),
        ("append input-full waits", f.append.busy.to_string()),
        (
            "queue on disk after append",
            format!(
                "{:.1} MiB, {:.2} B/payload B",
                f.disk_after_append as f64 / (1 << 20) as f64,
                v.disk_per_byte
            ),
        ),
        ("RSS at end of append", mib(f.rss_after_append_kib)),
        ("peak RSS during append", mib(f.peak_rss_append_kib)),
        ("peak RSS whole run", mib(f.peak_rss_kib)),
        ("drain wall time", format!("{:.2} s", d.seconds)),
        ("drain records/s", format!("{:.0}", v.drain_rate)),
        ("drain CPU µs/record", format!("{:.1}", v.drain_cpu_us)),
        (
            "drain written B/payload B",
            format!("{:.2}", v.drain_write_amp),
        ),
        (
            "latency run",
            format!(
                "{} records, 1 device, target {:.0}/s, achieved {:.0}/s",
                f.latency.latencies.len(),
                info.rate,
                v.latency_rate
            ),
        ),
        ("latency p50", ms(v.latency_p50)),
        ("latency p99", ms(v.latency_p99)),
        ("latency p99.9", ms(v.latency_p999)),
    ];
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (key, value) in rows {
        let pad = width - key.chars().count();
        let _ = writeln!(out, "{key}{:pad$}  {value}", "");
    }
    out
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The figures as JSON (durations in µs, sizes in bytes).
pub(crate) fn json(info: &RunInfo, f: &Figures) -> Value {
    let v = derive(info, f);
    json!({
        "run": {
            "store": info.store,
            "dir": info.dir,
            "fs_type": info.fs_type,
            "fs_device": info.fs_device,
            "records": info.records,
            "size": info.size,
            "devices": info.devices,
            "window": info.window,
            "latency_records": info.latency_records,
            "rate": info.rate,
        },
        "append": {
            "seconds": f.append.cost.seconds,
            "cpu_seconds": f.append.cost.cpu_seconds,
            "write_bytes": f.append.cost.write_bytes,
            "records_per_s": v.append_rate,
            "payload_mb_per_s": v.append_mb_s,
            "cpu_us_per_record": v.append_cpu_us,
            "written_per_payload_byte": v.append_write_amp,
            "latency_us": {"p50": us(v.append_p50), "p99": us(v.append_p99), "max": us(v.append_max)},
            "input_full_waits": f.append.busy,
        },
        "disk": {
            "bytes_after_append": f.disk_after_append,
            "per_payload_byte": v.disk_per_byte,
        },
        "memory_kib": {
            "rss_end_of_append": f.rss_after_append_kib,
            "peak_during_append": f.peak_rss_append_kib,
            "peak_whole_run": f.peak_rss_kib,
        },
        "drain": {
            "records": f.drain.records,
            "seconds": f.drain.cost.seconds,
            "cpu_seconds": f.drain.cost.cpu_seconds,
            "write_bytes": f.drain.cost.write_bytes,
            "records_per_s": v.drain_rate,
            "cpu_us_per_record": v.drain_cpu_us,
            "written_per_payload_byte": v.drain_write_amp,
        },
        "latency": {
            "records": f.latency.latencies.len(),
            "seconds": f.latency.seconds,
            "achieved_per_s": v.latency_rate,
            "latency_us": {"p50": us(v.latency_p50), "p99": us(v.latency_p99), "p999": us(v.latency_p999)},
        },
    })
}
