//! Restart measurements of the backlog scenario: a gateway with the backlog queued is
//! stopped by a signal and started again; measured are the time it took to exit, and
//! from the start (just before exec) until it accepts device connections, until it
//! tells systemd `READY=1` (blindgate, through a `NOTIFY_SOCKET` the bench listens on),
//! and, when the cloud is reachable, until the first queued message reaches the cloud.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};

use crate::brokers::Proc;
use crate::counter::Counter;
use crate::procfs::Memory;
use crate::proxy::CloudGate;

/// A `NOTIFY_SOCKET` (Unix datagram socket) the gateway sends its `sd_notify` lines to.
pub(crate) struct NotifyListener {
    socket: UnixDatagram,
}

impl NotifyListener {
    pub(crate) fn bind(path: &Path) -> Result<Self> {
        Ok(Self {
            socket: UnixDatagram::bind(path)?,
        })
    }

    /// Forgets what was sent so far (e.g. the READY=1 of the first start).
    fn drain(&self) -> Result<()> {
        self.socket.set_nonblocking(true)?;
        let mut buf = [0_u8; 512];
        while self.socket.recv(&mut buf).is_ok() {}
        self.socket.set_nonblocking(false)?;
        Ok(())
    }

    /// A thread that returns the instant `READY=1` arrives (`None` after 120 s).
    fn wait_ready(&self) -> Result<JoinHandle<Option<Instant>>> {
        let socket = self.socket.try_clone()?;
        socket.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(std::thread::spawn(move || {
            let mut buf = [0_u8; 512];
            loop {
                let n = socket.recv(&mut buf).ok()?;
                let text = String::from_utf8_lossy(&buf[..n]);
                if text.lines().any(|l| l == "READY=1") {
                    return Some(Instant::now());
                }
            }
        }))
    }
}

/// One restart with the backlog queued.
#[derive(Debug, Clone)]
pub(crate) struct Restart {
    pub(crate) signal: &'static str,
    /// Whether the cloud was reachable when it started again.
    pub(crate) cloud_up: bool,
    /// From the signal until the process exited.
    pub(crate) stop_seconds: f64,
    /// From the start until it accepted a TCP connection on its device port.
    pub(crate) listen_seconds: f64,
    /// ... until `READY=1` (blindgate only).
    pub(crate) ready_seconds: Option<f64>,
    /// ... until the first queued message reached the counter (cloud up only).
    pub(crate) first_forward_seconds: Option<f64>,
    /// Disk used by its data directory once it had exited.
    pub(crate) disk_bytes_stopped: u64,
    pub(crate) memory_after: Memory,
}

impl Restart {
    pub(crate) fn to_json(&self) -> Value {
        json!({
            "signal": self.signal, "cloud_up": self.cloud_up,
            "stop_seconds": self.stop_seconds, "listen_seconds": self.listen_seconds,
            "ready_seconds": self.ready_seconds,
            "first_forward_seconds": self.first_forward_seconds,
            "disk_bytes_stopped": self.disk_bytes_stopped,
            "rss_mib_after": self.memory_after.rss_mib(),
        })
    }
}

/// Stops `proc` with `signal`, then (having restored the cloud through `gate` if
/// `cloud_up`) starts it again and measures the restart. The instant of the start (and
/// of the restore) is returned too.
pub(crate) async fn restart(
    proc: &mut Proc,
    (signal, cloud_up): (&'static str, bool),
    gate: &mut CloudGate,
    notify: Option<&NotifyListener>,
    data_dir: &Path,
    counter: &Counter,
) -> Result<(Restart, Instant)> {
    let stop_seconds = proc.stop(signal)?;
    let disk_bytes_stopped = crate::procfs::disk_usage(data_dir);
    if cloud_up {
        gate.open().await?;
    }
    let ready = match notify {
        Some(n) => {
            n.drain()?;
            Some(n.wait_ready()?)
        }
        None => None,
    };
    let started = proc.restart()?;
    let listen_seconds = started.elapsed().as_secs_f64();
    let first_forward_seconds = if cloud_up {
        first_forward(counter, started).await
    } else {
        None
    };
    let ready_seconds = match ready {
        Some(t) => t
            .join()
            .ok()
            .flatten()
            .map(|at| at.duration_since(started).as_secs_f64()),
        None => None,
    };
    let r = Restart {
        signal,
        cloud_up,
        stop_seconds,
        listen_seconds,
        ready_seconds,
        first_forward_seconds,
        disk_bytes_stopped,
        memory_after: Memory::of(proc.pid()),
    };
    Ok((r, started))
}

/// Seconds from `started` until the counter saw the first backlog message (at most
/// 120 s).
async fn first_forward(counter: &Counter, started: Instant) -> Option<f64> {
    let started_ns = started.duration_since(counter.epoch).as_nanos() as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let first = counter.lock().low_first_rx_ns;
        if first != 0 {
            return Some(first.saturating_sub(started_ns) as f64 / 1e9);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}
