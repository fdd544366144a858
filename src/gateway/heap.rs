//! Gives the heap's free pages back to the kernel while the gateway daemon runs.
//!
//! glibc's allocator keeps what the program frees and returns memory to the kernel only
//! from the top of an arena. After a burst (1,000 devices sending at full rate, each
//! session's buffers growing and then given back when it waits), the freed buffers lie
//! between live allocations, so the daemon stayed at its peak (122 MiB resident,
//! measured) with no device left connected, until restarted. `malloc_trim(0)` returns
//! every free page inside the arenas too: 122 MiB went to 43 MiB.
//!
//! A thread of its own (`blindgate-heap`) calls it every [`PERIOD`], off the runtime's
//! worker so that the sessions never wait on it, and counts what came back in
//! `blindgate_heap_returned_bytes_total`. This is the crate's only `unsafe`: one call
//! into the C library, on glibc only (elsewhere the thread is not started).

use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// How often the free pages are returned.
const PERIOD: Duration = Duration::from_secs(10);

/// Starts the thread that returns the heap's free pages every [`PERIOD`] for the life of
/// the process. Does nothing where the C library has no `malloc_trim`.
pub(super) fn spawn_trimmer(metrics: Metrics) {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("blindgate-heap".into())
        .spawn(move || {
            loop {
                std::thread::sleep(PERIOD);
                trim_once(&metrics);
            }
        });
    if let Err(err) = spawned {
        tracing::warn!(error = %err, "cannot start the heap trimmer; freed memory stays with the process");
    }
}

/// Returns the free pages once; counts and logs (debug) how much resident memory left.
fn trim_once(metrics: &Metrics) {
    let before = resident_bytes();
    let started = Instant::now();
    let released = release_free_pages();
    let took = started.elapsed();
    let after = resident_bytes();
    let returned = before.zip(after).map_or(0, |(b, a)| b.saturating_sub(a));
    metrics.heap_returned_bytes.inc_by(returned);
    tracing::debug!(
        released,
        returned_kib = returned / 1024,
        resident_kib = after.unwrap_or(0) / 1024,
        took_us = took.as_micros() as u64,
        "heap trimmed"
    );
}

/// Resident bytes of this process (`VmRSS` in `/proc/self/status`, in KiB there, so
/// that the page size, 16 KiB on some ARM kernels, does not matter).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// `malloc_trim(0)`: true if it gave memory back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_pages() -> bool {
    // SAFETY: `malloc_trim` takes no pointers and only walks the allocator's own state
    // under the allocator's locks; it is safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_pages() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frees 128 MiB of small buffers, each one between two live allocations so that
    /// the allocator can give none of it back by itself, and checks that a trim does.
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn a_trim_returns_the_pages_of_buffers_freed_between_live_ones() {
        let metrics = Metrics::new();
        let mut buffers = Vec::with_capacity(8192);
        let mut pins = Vec::with_capacity(8192);
        for i in 0..8192_usize {
            buffers.push(vec![i as u8 | 1; 16 * 1024]);
            pins.push(vec![1_u8; 1024]);
        }
        drop(buffers);
        let before = resident_bytes().expect("VmRSS");
        trim_once(&metrics);
        let after = resident_bytes().expect("VmRSS");
        assert!(
            after + 32 * 1024 * 1024 < before,
            "resident {} KiB before the trim, {} KiB after",
            before / 1024,
            after / 1024
        );
        assert!(metrics.heap_returned_bytes.get() >= 32 * 1024 * 1024);
        drop(pins);
    }
}
