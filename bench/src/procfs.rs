//! What the bench reads of a process and of the disk besides CPU time (which is in
//! [`crate::brokers::cpu_seconds`]): bytes written to storage (`/proc/PID/io`), resident
//! memory now and at its peak (`/proc/PID/status`), the size of a data directory on
//! disk (`du`), and the open-file limit a run needs.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

/// `write_bytes` of `/proc/<pid>/io`: bytes the process caused to be sent to storage
/// (0 if unreadable).
pub(crate) fn write_bytes(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| field(&s, "write_bytes:"))
        .unwrap_or(0)
}

/// Resident memory of a process, KiB: now (`VmRSS`), at its peak so far (`VmHWM`), and
/// the part of now that is mapped from files (`RssFile`: the binary's code and data
/// pages, shared libraries) rather than anonymous (heap, stacks).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Memory {
    pub(crate) rss_kib: u64,
    pub(crate) hwm_kib: u64,
    pub(crate) file_kib: u64,
}

impl Memory {
    pub(crate) fn of(pid: u32) -> Self {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        Self {
            rss_kib: field(&status, "VmRSS:").unwrap_or(0),
            hwm_kib: field(&status, "VmHWM:").unwrap_or(0),
            file_kib: field(&status, "RssFile:").unwrap_or(0),
        }
    }

    pub(crate) fn rss_mib(self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    pub(crate) fn file_mib(self) -> f64 {
        self.file_kib as f64 / 1024.0
    }

    pub(crate) fn hwm_mib(self) -> f64 {
        self.hwm_kib as f64 / 1024.0
    }
}

/// The number after `key` on the line starting with it.
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Disk space used by `path` (allocated blocks, `du -s -B1`), in bytes (0 on error).
pub(crate) fn disk_usage(path: &Path) -> u64 {
    Command::new("du")
        .args(["-s", "-B1"])
        .arg(path)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// Fails unless this process may open `needed` files (soft `RLIMIT_NOFILE`, read from
/// `/proc/self/limits`); the gateways inherit the limit. Raise it with `ulimit -n`
/// (bench/smoke does) rather than from here, which would need unsafe code.
pub(crate) fn check_open_files(needed: u64) -> Result<()> {
    let limits = fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok());
    match soft {
        Some(n) if n < needed => bail!(
            "the open-file limit is {n}, the run needs about {needed}: run `ulimit -n {needed}` first"
        ),
        _ => Ok(()),
    }
}
