//! What a run reports: each phase's result, latency percentiles, the side-by-side table
//! (blindgate, the Mosquitto bridge, their ratio, the direct ceiling) and the
//! machine-readable JSON file.

use std::fmt::Write as _;
use std::process::Command;

use serde_json::{Value, json};

use crate::phase::GatewayUse;
use crate::procfs::Memory;
use crate::scenarios::Scenario;

/// One phase against one target, from the devices' side and the counter's side.
#[derive(Debug, Clone, Default)]
pub(crate) struct PhaseResult {
    pub(crate) sent: u64,
    pub(crate) acked: u64,
    pub(crate) received: u64,
    pub(crate) lost: u64,
    pub(crate) duplicates: u64,
    pub(crate) reordered: u64,
    pub(crate) bad: u64,
    pub(crate) stray: u64,
    pub(crate) pkid_mismatch: u64,
    /// Device connections the gateway reset after the DISCONNECT (see `load.rs`).
    pub(crate) reset_after_disconnect: u64,
    pub(crate) publish_seconds: f64,
    /// From the first send to the last envelope checked at the counter.
    pub(crate) delivery_seconds: f64,
    /// Acknowledged at the device side per second of publishing.
    pub(crate) accepted_per_sec: f64,
    /// Unique envelopes checked at the counter per second (first send to last receipt).
    pub(crate) delivered_per_sec: f64,
    pub(crate) e2e_ms: [f64; 4],
    pub(crate) ack_ms: [f64; 4],
    pub(crate) bench_cpu: f64,
    pub(crate) gateway_cpu: f64,
    pub(crate) cloud_cpu: f64,
    /// Gateway CPU seconds per delivered message, in µs (NaN for direct).
    pub(crate) gateway_cpu_us_per_msg: f64,
    /// Bytes the gateway wrote to storage (`/proc/PID/io`) during the phase.
    pub(crate) gateway_write_bytes: u64,
    /// ... per delivered message, and per delivered payload (envelope) byte (NaN: direct).
    pub(crate) written_per_msg: f64,
    pub(crate) written_per_payload_byte: f64,
    /// The gateway's resident memory at the end of the phase, and its peak so far (MiB).
    pub(crate) gateway_rss_mib: f64,
    pub(crate) gateway_hwm_mib: f64,
}

impl PhaseResult {
    /// Records what the gateway process used (`None`: no gateway, the direct ceiling).
    pub(crate) fn set_gateway(&mut self, g: Option<(GatewayUse, Memory)>, envelope_size: usize) {
        let Some((g, memory)) = g else {
            self.gateway_cpu_us_per_msg = f64::NAN;
            self.written_per_msg = f64::NAN;
            self.written_per_payload_byte = f64::NAN;
            self.gateway_rss_mib = f64::NAN;
            self.gateway_hwm_mib = f64::NAN;
            return;
        };
        let n = self.received.max(1) as f64;
        self.gateway_cpu_us_per_msg = g.cpu_seconds / n * 1e6;
        self.gateway_write_bytes = g.write_bytes;
        self.written_per_msg = g.write_bytes as f64 / n;
        self.written_per_payload_byte = self.written_per_msg / envelope_size as f64;
        self.gateway_rss_mib = memory.rss_mib();
        self.gateway_hwm_mib = memory.hwm_mib();
    }

    fn to_json(&self) -> Value {
        let pct = |p: [f64; 4]| json!({"p50": p[0], "p99": p[1], "p999": p[2], "max": p[3]});
        json!({
            "sent": self.sent, "acked": self.acked, "received": self.received,
            "lost": self.lost, "duplicates": self.duplicates, "reordered": self.reordered,
            "bad": self.bad, "stray": self.stray, "pkid_mismatch": self.pkid_mismatch,
            "reset_after_disconnect": self.reset_after_disconnect,
            "publish_seconds": self.publish_seconds, "delivery_seconds": self.delivery_seconds,
            "accepted_per_sec": self.accepted_per_sec, "delivered_per_sec": self.delivered_per_sec,
            "end_to_end_ms": pct(self.e2e_ms), "puback_ms": pct(self.ack_ms),
            "bench_cpu_cores": self.bench_cpu, "gateway_cpu_cores": self.gateway_cpu,
            "cloud_broker_cpu_cores": self.cloud_cpu,
            "gateway_cpu_us_per_msg": self.gateway_cpu_us_per_msg,
            "gateway_write_bytes": self.gateway_write_bytes,
            "gateway_written_per_msg": self.written_per_msg,
            "gateway_written_per_payload_byte": self.written_per_payload_byte,
            "gateway_rss_mib_end": self.gateway_rss_mib, "gateway_hwm_mib": self.gateway_hwm_mib,
        })
    }

    /// One line for the progress log on stderr.
    pub(crate) fn summary(&self) -> String {
        format!(
            "  sent {} acked {} received {} lost {} dup {} reordered {} bad {} resets after DISCONNECT {} | {:.0} msg/s delivered, e2e p50 {:.2} ms p99 {:.2} ms | CPU bench {:.0}% gateway {:.0}% cloud {:.0}%",
            self.sent,
            self.acked,
            self.received,
            self.lost,
            self.duplicates,
            self.reordered,
            self.bad,
            self.reset_after_disconnect,
            self.delivered_per_sec,
            self.e2e_ms[0],
            self.e2e_ms[1],
            self.bench_cpu * 100.0,
            self.gateway_cpu * 100.0,
            self.cloud_cpu * 100.0
        )
    }
}

/// p50, p99, p99.9 and max of nanosecond samples, in milliseconds (NaN if none).
pub(crate) fn percentiles(mut v: Vec<u64>) -> [f64; 4] {
    if v.is_empty() {
        return [f64::NAN; 4];
    }
    v.sort_unstable();
    let at = |q: f64| {
        let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
        v[i] as f64 / 1e6
    };
    [at(0.50), at(0.99), at(0.999), at(1.0)]
}

/// The settings of a run, as recorded in the JSON file.
pub(crate) struct RunInfo<'a> {
    pub(crate) loadavg_before: &'a str,
    pub(crate) devices: usize,
    pub(crate) window: usize,
    pub(crate) seconds: f64,
    pub(crate) smoke: bool,
    pub(crate) ok: bool,
}

/// The machine-readable results: settings, load, and every phase per scenario and target.
pub(crate) fn results_json(
    info: &RunInfo<'_>,
    scenarios: &[Scenario],
    target_names: &[&str],
    all: &[Vec<PhaseResult>],
) -> Value {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "date_utc": Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default(),
        "loadavg_before": info.loadavg_before.trim(),
        "loadavg_after": load.trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "devices": info.devices, "window": info.window, "seconds": info.seconds,
        "smoke": info.smoke,
        "ok": info.ok,
        "scenarios": scenarios.iter().zip(all).map(|(sc, row)| json!({
            "name": sc.name,
            "targets": target_names.iter().zip(row)
                .map(|(t, r)| ((*t).to_owned(), r.to_json()))
                .collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
    })
}

/// The side-by-side table; each row of `all` is blindgate, the bridge, direct.
pub(crate) fn render_table(
    scenarios: &[Scenario],
    all: &[Vec<PhaseResult>],
    window: usize,
) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nwindow {window}, TLS 1.3 + client certificates everywhere; ratio = blindgate / mosquitto bridge (msg/s: higher is better; ms, CPU: lower is better)"
    );
    let _ = writeln!(
        t,
        "| {:<48} | {:>10} | {:>16} | {:>6} | {:>14} | {:>22} | {:>17} |",
        "scenario",
        "blindgate",
        "mosquitto bridge",
        "ratio",
        "direct ceiling",
        "bench CPU (bg/mq/dir)",
        "lost (bg/mq/dir)"
    );
    let _ = writeln!(
        t,
        "|{:-<50}|{:->12}|{:->18}|{:->8}|{:->16}|{:->24}|{:->19}|",
        "", "", "", "", "", "", ""
    );
    for (sc, row) in scenarios.iter().zip(all) {
        render_scenario(&mut t, sc, row);
    }
    t
}

/// `a / b` with two decimals, or "-" when it means nothing (`b` is 0 or not a number).
fn ratio(a: f64, b: f64) -> String {
    let r = a / b;
    if r.is_finite() {
        format!("{r:.2}")
    } else {
        "-".to_owned()
    }
}

/// The table's lines of one scenario (`row`: blindgate, the bridge, direct).
fn render_scenario(t: &mut String, sc: &Scenario, row: &[PhaseResult]) {
    let [bg, mq, dir] = row else {
        return;
    };
    let cpu = format!(
        "{:.0}%/{:.0}%/{:.0}%",
        bg.bench_cpu * 100.0,
        mq.bench_cpu * 100.0,
        dir.bench_cpu * 100.0
    );
    let lost = format!("{}/{}/{}", bg.lost, mq.lost, dir.lost);
    let mut line = |label: String,
                    f: &dyn Fn(&PhaseResult) -> f64,
                    prec: usize,
                    cpu: &str,
                    lost: &str| {
        let (a, b, c) = (f(bg), f(mq), f(dir));
        let _ = writeln!(
            t,
            "| {label:<48} | {a:>10.prec$} | {b:>16.prec$} | {:>6} | {c:>14.prec$} | {cpu:>22} | {lost:>17} |",
            ratio(a, b)
        );
    };
    if sc.unit == "msg/s" {
        line(
            format!("{} ({})", sc.name, sc.unit),
            &|r| r.delivered_per_sec,
            0,
            &cpu,
            &lost,
        );
        line(
            "  accepted: device PUBACKs (msg/s)".into(),
            &|r| r.accepted_per_sec,
            0,
            "",
            "",
        );
        line(
            "  device PUBACK p50 (ms)".into(),
            &|r| r.ack_ms[0],
            2,
            "",
            "",
        );
        line("  end to end p50 (ms)".into(), &|r| r.e2e_ms[0], 2, "", "");
    } else {
        line(
            format!("{} p50 (ms)", sc.name),
            &|r| r.e2e_ms[0],
            2,
            &cpu,
            &lost,
        );
        line(format!("{} p99 (ms)", sc.name), &|r| r.e2e_ms[1], 2, "", "");
        line(
            format!("{} p99.9 (ms)", sc.name),
            &|r| r.e2e_ms[2],
            2,
            "",
            "",
        );
    }
    line(
        "  gateway CPU (cores)".into(),
        &|r| r.gateway_cpu,
        2,
        "",
        "",
    );
    line(
        "  gateway CPU per message (µs)".into(),
        &|r| r.gateway_cpu_us_per_msg,
        2,
        "",
        "",
    );
    line(
        "  gateway disk written per payload B".into(),
        &|r| r.written_per_payload_byte,
        2,
        "",
        "",
    );
    line(
        "  connections reset after DISCONNECT".into(),
        &|r| r.reset_after_disconnect as f64,
        0,
        "",
        "",
    );
    line(
        "  gateway peak RSS (MiB)".into(),
        &|r| r.gateway_hwm_mib,
        1,
        "",
        "",
    );
}
