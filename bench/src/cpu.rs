//! CPU time of a process from `/proc/<pid>/stat`, shared by both bench binaries.

use std::fs;
use std::process::Command;
use std::sync::OnceLock;

/// CPU seconds (user + system, all threads) used so far by process `pid` (`"self"`
/// for this one). `/proc` counts in clock ticks, so the resolution is 10 ms.
pub(crate) fn cpu_seconds_of(pid: &str) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at field 3.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime is field 14, stime field 15: index 11 and 12 after the command name.
    (ticks(11) + ticks(12)) as f64 / clock_ticks_per_second()
}

/// `/proc`'s clock tick (USER_HZ), from `getconf CLK_TCK` once; 100 (Linux's value on
/// every common architecture) if that fails. Asked of `getconf` rather than rustix so
/// the bench adds no rustix feature: with one, building it beside blindgate would build
/// a second, differently featured blindgate in release.
fn clock_ticks_per_second() -> f64 {
    static HZ: OnceLock<f64> = OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|&hz| hz > 0.0)
            .unwrap_or(100.0)
    })
}
