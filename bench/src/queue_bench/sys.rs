//! What the queue bench reads of its own process and of the disk: CPU time
//! (`/proc/self/stat`), bytes sent to storage (`/proc/self/io`), resident memory
//! (`/proc/self/status`), the filesystem a directory is on (`/proc/mounts`), and the
//! size of a directory tree.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// CPU time (user + system, all threads) of this process so far, in seconds.
/// `/proc` counts in clock ticks, so the resolution is 10 ms.
pub(crate) fn cpu_seconds() -> f64 {
    let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) may hold spaces: count fields after its `)`.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime is field 14, stime field 15: index 11 and 12 after the command name.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / clock_ticks_per_second()
}

/// USER_HZ from `getconf CLK_TCK`, once; 100 (Linux's value everywhere) if that fails.
fn clock_ticks_per_second() -> f64 {
    static HZ: OnceLock<f64> = OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|hz| *hz > 0.0)
            .unwrap_or(100.0)
    })
}

/// `write_bytes` of `/proc/self/io`: bytes this process (every thread, sled's and
/// tokio's blocking threads included) caused to be sent to storage; 0 if unreadable.
pub(crate) fn write_bytes() -> u64 {
    let io = fs::read_to_string("/proc/self/io").unwrap_or_default();
    field(&io, "write_bytes:").unwrap_or(0)
}

/// Resident memory now (`VmRSS`) and at its peak so far (`VmHWM`), in KiB.
pub(crate) fn memory_kib() -> (u64, u64) {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    (
        field(&status, "VmRSS:").unwrap_or(0),
        field(&status, "VmHWM:").unwrap_or(0),
    )
}

/// The number after `key` on the line starting with it.
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The filesystem type and device of the mount `path` (canonical) is on, from
/// `/proc/mounts`: the longest mount point that is a prefix of it.
pub(crate) fn filesystem(path: &Path) -> (String, String) {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let device = parts.next()?;
            // Spaces in mount points are written as \040.
            let mount_point = parts.next()?.replace("\\040", " ");
            let fs_type = parts.next()?;
            path.starts_with(&mount_point)
                .then(|| (mount_point.len(), fs_type.to_owned(), device.to_owned()))
        })
        .max_by_key(|(len, _, _)| *len)
        .map_or_else(
            || ("unknown".to_owned(), "unknown".to_owned()),
            |(_, fs_type, device)| (fs_type, device),
        )
}

/// Sum of the sizes of the regular files under `dir`, recursively (apparent size).
pub(crate) fn tree_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => tree_size(&entry.path()),
            Ok(meta) if meta.is_file() => meta.len(),
            _ => 0,
        })
        .sum()
}
