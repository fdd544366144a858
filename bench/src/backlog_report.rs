//! The backlog scenario's part of the report: a table (blindgate, the Mosquitto bridge,
//! and the target where it sets one) of memory, disk, restart and drain figures,
//! and the same in the JSON file.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::backlog::BacklogResult;
use crate::procfs::Memory;
use crate::restart::Restart;

const MIB: f64 = 1024.0 * 1024.0;

/// The table; `results` is blindgate then the bridge.
pub(crate) fn render_backlog(results: &[BacklogResult], idle_devices: usize) -> String {
    let mut t = String::new();
    let Some(first) = results.first() else {
        return t;
    };
    let _ = writeln!(
        t,
        "\nbacklog: {} messages of 256 B queued while the cloud was unreachable; {idle_devices} idle devices for memory",
        first.queued
    );
    let _ = writeln!(
        t,
        "| {:<52} | {:>12} | {:>16} | {:>14} |",
        "measure", "blindgate", "mosquitto bridge", "issue 8 target"
    );
    let _ = writeln!(t, "|{:-<54}|{:->14}|{:->18}|{:->16}|", "", "", "", "");
    let mut row =
        |label: &str, f: &dyn Fn(&BacklogResult) -> Option<f64>, prec: usize, goal: &str| {
            let cell = |r: Option<&BacklogResult>| {
                r.and_then(f)
                    .map_or_else(|| "-".to_owned(), |v| format!("{v:.prec$}"))
            };
            let _ = writeln!(
                t,
                "| {label:<52} | {:>12} | {:>16} | {goal:>14} |",
                cell(results.first()),
                cell(results.get(1))
            );
        };
    let mib = |m: Memory| Some(m.rss_mib());
    row("RSS at start (MiB)", &|r| mib(r.memory_start), 1, "");
    row(
        "RSS, idle devices connected (MiB)",
        &|r| mib(r.memory_idle),
        1,
        "",
    );
    row(
        "RSS, backlog queued (MiB)",
        &|r| mib(r.memory_backlog),
        1,
        "",
    );
    row(
        "RSS, backlog queued + idle devices (MiB)",
        &|r| mib(r.memory_idle_backlog),
        1,
        "<= 32",
    );
    row(
        "  of which file pages: code, libraries (MiB)",
        &|r| Some(r.memory_idle_backlog.file_mib()),
        1,
        "",
    );
    row(
        "peak RSS before the restarts, VmHWM (MiB)",
        &|r| Some(r.memory_idle_backlog.hwm_mib()),
        1,
        "",
    );
    row(
        "queueing rate, cloud down (msg/s)",
        &|r| Some(r.queued as f64 / r.queue_seconds),
        0,
        "",
    );
    row(
        "written while queueing per payload B",
        &|r| Some(r.queue_write_bytes as f64 / (r.queued.max(1) * 256) as f64),
        2,
        "<= 1.5",
    );
    row(
        "queue on disk while running (MiB)",
        &|r| Some(r.disk_bytes as f64 / MIB),
        1,
        "",
    );
    row(
        "  per queued payload B",
        &|r| Some(r.disk_bytes as f64 / (r.queued.max(1) * 256) as f64),
        2,
        "",
    );
    for (signal, label) in [("TERM", "SIGTERM"), ("KILL", "SIGKILL")] {
        let get = move |r: &BacklogResult| r.restarts.iter().find(|x| x.signal == signal).cloned();
        let f =
            |g: fn(&Restart) -> Option<f64>| move |r: &BacklogResult| get(r).and_then(|x| g(&x));
        row(
            &format!("{label}: time to exit (s)"),
            &f(|x| Some(x.stop_seconds)),
            3,
            "",
        );
        row(
            &format!("{label}: queue on disk after exit (MiB)"),
            &f(|x| Some(x.disk_bytes_stopped as f64 / MIB)),
            1,
            "",
        );
        row(
            &format!("{label}: restart, exec to listening (s)"),
            &f(|x| Some(x.listen_seconds)),
            3,
            "<= 2",
        );
        row(
            &format!("{label}: restart, exec to READY=1 (s)"),
            &f(|x| x.ready_seconds),
            3,
            "",
        );
        row(
            &format!("{label}: restart, exec to first forwarded (s)"),
            &f(|x| x.first_forward_seconds),
            3,
            "",
        );
    }
    row(
        "drain rate, first to last (msg/s)",
        &|r| Some(r.drain.rate),
        0,
        ">= 20000",
    );
    row(
        "drain rate, from the cloud's restore (msg/s)",
        &|r| Some(r.drain.rate_from_restore),
        0,
        "",
    );
    row(
        "live traffic during the drain, e2e p50 (ms)",
        &|r| Some(r.drain.live_e2e_ms[0]),
        2,
        "",
    );
    row(
        "live traffic during the drain, e2e p99 (ms)",
        &|r| Some(r.drain.live_e2e_ms[1]),
        2,
        "< 50",
    );
    row(
        "gateway CPU per message during the drain (µs)",
        &|r| Some(r.drain.gateway_cpu_us_per_msg),
        2,
        "",
    );
    row(
        "peak RSS during restart and drain (MiB)",
        &|r| Some(r.drain.memory_end.hwm_mib()),
        1,
        "",
    );
    row(
        "duplicates (queued + live)",
        &|r| Some(r.drain.duplicates as f64),
        0,
        "",
    );
    row(
        "reordered (queued + live)",
        &|r| Some(r.drain.reordered as f64),
        0,
        "",
    );
    row(
        "lost (queued + live)",
        &|r| Some((r.drain.lost_backlog + r.drain.lost_live) as f64),
        0,
        "0",
    );
    t
}

/// The JSON of the scenario (one object per gateway, by name).
pub(crate) fn backlog_json(results: &[BacklogResult]) -> Value {
    let mem = |m: Memory| json!({"rss_mib": m.rss_mib(), "hwm_mib": m.hwm_mib(), "file_mib": m.file_mib()});
    results
        .iter()
        .map(|r| {
            let d = &r.drain;
            let pct = |p: [f64; 4]| json!({"p50": p[0], "p99": p[1], "p999": p[2], "max": p[3]});
            (
                r.gateway.name().to_owned(),
                json!({
                    "queued": r.queued, "queue_seconds": r.queue_seconds,
                    "queue_write_bytes": r.queue_write_bytes,
                    "written_per_payload_byte_queueing": r.queue_write_bytes as f64 / (r.queued.max(1) * 256) as f64,
                    "memory_start": mem(r.memory_start), "memory_idle": mem(r.memory_idle),
                    "memory_backlog": mem(r.memory_backlog),
                    "memory_idle_backlog": mem(r.memory_idle_backlog),
                    "queue_disk_bytes": r.disk_bytes,
                    "queue_disk_per_payload_byte": r.disk_bytes as f64 / (r.queued.max(1) * 256) as f64,
                    "restarts": r.restarts.iter().map(Restart::to_json).collect::<Vec<_>>(),
                    "drain": {
                        "rate_msg_per_s": d.rate, "rate_from_restore_msg_per_s": d.rate_from_restore,
                        "seconds": d.seconds, "live_acked": d.live_acked,
                        "live_end_to_end_ms": pct(d.live_e2e_ms),
                        "lost_backlog": d.lost_backlog, "lost_live": d.lost_live,
                        "duplicates": d.duplicates, "reordered": d.reordered, "bad": d.bad,
                        "pkid_mismatch": d.pkid_mismatch, "reset_after_disconnect": d.reset_after_disconnect,
                        "gateway_cpu_us_per_msg": d.gateway_cpu_us_per_msg,
                        "memory_end": mem(d.memory_end),
                    },
                    "ok": r.ok(),
                }),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}
