//! What the queue bench reads of its own process and of the disk: CPU time
//! (`/proc/self/stat`), bytes sent to storage (`/proc/self/io`), resident memory
//! (`/proc/self/status`), the filesystem a directory is on (`/proc/mounts`), and the
//! size of a directory tree.

use std::fs;
use std::path::Path;

/// CPU time (user + system, all threads) of this process so far, in seconds.
pub(crate) fn cpu_seconds() -> f64 {
    crate::cpu::cpu_seconds_of("self")
}

/// `write_bytes` of `/proc/self/io`: bytes this process (every thread, tokio's
/// blocking threads included) caused to be sent to storage; 0 if unreadable.
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
