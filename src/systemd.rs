//! The systemd service protocol (`sd_notify`): `READY=1` once serving, `RELOADING=1`
//! and `READY=1` around a reload, `STOPPING=1` on the way out, `WATCHDOG=1` from the
//! main event loop, and a one-line `STATUS=` for `systemctl status`.
//!
//! Implemented directly on a Unix datagram socket (the protocol is one datagram of
//! `KEY=value` lines to `$NOTIFY_SOCKET`), so no C library and no unsafe code. Outside
//! systemd (`NOTIFY_SOCKET` unset) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where and how to notify the service manager.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` (and `WATCHDOG_PID`, which must be this
    /// process if set). Never fails: a socket that cannot be used only disables the
    /// notifications, with one warning.
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            match connect_target(&path) {
                Ok(pair) => Some(pair),
                Err(err) => {
                    tracing::warn!(error = %err, "NOTIFY_SOCKET unusable; no systemd notifications");
                    None
                }
            }
        });
        let ours = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|usec| *usec > 0 && ours)
            .map(Duration::from_micros);
        Self { socket, watchdog }
    }

    /// How often to send `WATCHDOG=1`: half the manager's timeout, if it set one.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.socket.as_ref()?;
        self.watchdog.map(|timeout| timeout / 2)
    }

    /// Startup finished; `status` is shown by `systemctl status`.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// A reload began (systemd 252 shows the unit as reloading until `ready`).
    pub fn reloading(&self) {
        self.send("RELOADING=1");
    }

    /// Shutdown began.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    /// The main loop is alive.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// Updates the status line.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.socket
            && let Err(err) = socket.send_to_addr(message.as_bytes(), addr)
        {
            tracing::debug!(error = %err, "sd_notify failed");
        }
    }
}

/// An unbound datagram socket and the manager's address: a path, or an abstract
/// name when it starts with `@`.
fn connect_target(
    path: &std::ffi::OsStr,
) -> std::io::Result<(UnixDatagram, std::os::unix::net::SocketAddr)> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_bytes();
    let addr = match bytes.split_first() {
        Some((b'@', name)) => abstract_addr(name)?,
        _ => std::os::unix::net::SocketAddr::from_pathname(path)?,
    };
    let socket = UnixDatagram::unbound()?;
    // Never let a slow manager block the main loop: a full socket drops the message.
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &[u8]) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_name: &[u8]) -> std::io::Result<std::os::unix::net::SocketAddr> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).expect("bind");
        let notifier = Notifier {
            socket: Some(connect_target(path.as_os_str()).expect("target")),
            watchdog: Some(Duration::from_secs(30)),
        };
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(15)));
        notifier.ready("serving");
        notifier.watchdog();
        let mut buf = [0u8; 256];
        let n = manager.recv(&mut buf).expect("ready");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        let n = manager.recv(&mut buf).expect("watchdog");
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn abstract_names_are_supported() {
        let manager =
            UnixDatagram::bind_addr(&abstract_addr(b"blindgate-notify-test").expect("addr"))
                .expect("bind");
        let notifier = Notifier {
            socket: Some(connect_target("@blindgate-notify-test".as_ref()).expect("target")),
            watchdog: None,
        };
        assert_eq!(notifier.watchdog_interval(), None);
        notifier.stopping();
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).expect("stopping");
        assert_eq!(&buf[..n], b"STOPPING=1\nSTATUS=stopping");
    }

    #[test]
    fn without_a_socket_nothing_happens() {
        let notifier = Notifier {
            socket: None,
            watchdog: Some(Duration::from_secs(1)),
        };
        assert_eq!(notifier.watchdog_interval(), None);
        notifier.ready("x");
    }
}
