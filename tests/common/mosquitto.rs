//! A real Mosquitto broker (Debian's `/usr/sbin/mosquitto`, 2.0.x) as a child process,
//! playing the cloud broker: mutual TLS with the dev PKI's cloud CA, the client
//! certificate's CN as user name, no persistence. Tests can kill and restart it on the
//! same port to simulate a cloud outage.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blindgate::pki::DevPki;

/// Where Debian's `mosquitto` package installs the broker.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// Where Debian's `mosquitto-clients` package installs the publisher.
pub const MOSQUITTO_PUB: &str = "/usr/bin/mosquitto_pub";

/// How long a (re)started broker has to accept TCP connections.
const STARTUP_DEADLINE: Duration = Duration::from_secs(10);

/// Which TLS versions the broker offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS 1.3 only, client certificate required: what the gateway's uplink expects.
    Tls13MutualAuth,
    /// TLS 1.2 only (a TLS 1.3 ClientHello gets a `protocol_version` alert), client
    /// certificate required: a broker the gateway must refuse to talk to.
    Tls12Only,
}

/// A running Mosquitto child process; killed and reaped on drop.
#[derive(Debug)]
pub struct Mosquitto {
    /// The TLS listener's port on 127.0.0.1 (kept across [`Mosquitto::restart`]).
    pub port: u16,
    /// `None` while stopped.
    child: Option<Child>,
    /// Holds `mosquitto.conf`, `mosquitto.log` (stderr of every run, appended) and, for
    /// [`TlsMode::Tls12Only`], `openssl-tls12.cnf`.
    dir: PathBuf,
    tls: TlsMode,
}

/// True if the Mosquitto broker binary is installed.
pub fn mosquitto_available() -> bool {
    Path::new(MOSQUITTO).is_file()
}

/// Whether a test that needs Mosquitto and `mosquitto_pub` can run: true if both are
/// installed. Otherwise prints a skip message and returns false, or, when the `CI`
/// environment variable is set, panics: CI installs them (`.ci/install-test-deps`), so
/// a missing broker there is a broken setup, not a reason to skip.
pub fn require_mosquitto() -> bool {
    if mosquitto_available() && Path::new(MOSQUITTO_PUB).is_file() {
        return true;
    }
    let message = "mosquitto not installed; run .ci/install-test-deps";
    assert!(std::env::var_os("CI").is_none(), "{message} (CI is set)");
    eprintln!("{message}");
    false
}

/// Writes a Mosquitto configuration for `pki`'s cloud side into `dir`, starts the
/// broker on a free port of 127.0.0.1 and returns once it accepts TCP connections.
///
/// Both cloud-CA client certificates (the gateway's `gw-1` and `cloud-ingest`) may
/// connect; each connects as the user named by its certificate's CN. No ACL: every
/// client may publish and subscribe to every topic.
///
/// Panics (with the broker's log) if the broker does not come up within 10 s.
pub fn start_cloud_broker(dir: &Path, pki: &DevPki, tls: TlsMode) -> Mosquitto {
    fs::create_dir_all(dir).expect("create the broker's directory");
    if tls == TlsMode::Tls12Only {
        fs::write(dir.join("openssl-tls12.cnf"), OPENSSL_TLS12_ONLY).expect("write openssl.cnf");
    }
    let mut broker = Mosquitto {
        port: 0,
        child: None,
        dir: dir.to_owned(),
        tls,
    };
    // The free port may be taken by another test before Mosquitto binds it; then
    // Mosquitto exits at once and another port is tried.
    for _ in 0..3 {
        broker.port = super::free_port();
        fs::write(dir.join("mosquitto.conf"), config(broker.port, pki, tls))
            .expect("write mosquitto.conf");
        match broker.spawn() {
            Ok(()) => return broker,
            Err(log) if log.contains("Address already in use") => continue,
            Err(log) => panic!("mosquitto exited at start; its log:\n{log}"),
        }
    }
    panic!("mosquitto found no free port; its log:\n{}", broker.log());
}

/// An OpenSSL configuration capping every `SSL_CTX` of the process at TLS 1.2.
///
/// Mosquitto 2.0's `tls_version` is only a minimum (`tlsv1.2` still negotiates 1.3),
/// and `ciphers_tls1.3` cannot be set empty ("Empty ciphers_tls1.3 value"), so the cap
/// comes from OpenSSL itself: `OPENSSL_CONF` points the broker at this file, whose
/// `system_default` section `SSL_CTX_new` applies. It replaces the system's
/// `/etc/ssl/openssl.cnf` for the broker process only.
const OPENSSL_TLS12_ONLY: &str = "\
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MaxProtocol = TLSv1.2
";

fn config(port: u16, pki: &DevPki, tls: TlsMode) -> String {
    let version = match tls {
        TlsMode::Tls13MutualAuth => "tlsv1.3",
        TlsMode::Tls12Only => "tlsv1.2",
    };
    let mut conf = String::new();
    // Run as root (CI), Mosquitto drops to user `mosquitto` before it loads the TLS
    // files, and the dev PKI's keys are 0600 root: `user root` keeps the privileges.
    // As another user the setting is ignored.
    conf.push_str("user root\n");
    conf.push_str("persistence false\n");
    conf.push_str("log_dest stderr\n");
    conf.push_str("log_timestamp_format %H:%M:%S\n");
    // A drain of the gateway's queue may have thousands of messages in flight.
    conf.push_str("max_inflight_messages 0\n");
    conf.push_str("max_queued_messages 100000\n");
    conf.push_str("set_tcp_nodelay true\n");
    writeln!(conf, "listener {port} 127.0.0.1").expect("write to String");
    writeln!(conf, "cafile {}", pki.cloud_ca.cert.display()).expect("write to String");
    writeln!(conf, "certfile {}", pki.cloud_broker.cert.display()).expect("write to String");
    writeln!(conf, "keyfile {}", pki.cloud_broker.key.display()).expect("write to String");
    conf.push_str("require_certificate true\n");
    conf.push_str("use_identity_as_username true\n");
    writeln!(conf, "tls_version {version}").expect("write to String");
    conf
}

impl Mosquitto {
    /// The broker's log so far (its stderr, every run).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// Kills the broker (SIGKILL, no clean disconnects) and reaps it. Sessions and
    /// queued messages are lost (`persistence false`). Does nothing if stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An error means it already exited; `wait` reaps it either way.
            let _ = child.kill();
            child.wait().expect("reap mosquitto");
        }
    }

    /// Stops the broker if it runs, then starts it again on the same port with the
    /// same configuration; returns once it accepts TCP connections.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(log) = self.spawn() {
            panic!("mosquitto exited at restart; its log:\n{log}");
        }
    }

    /// Starts the broker and waits until it accepts TCP connections. If it exits
    /// first, returns its log.
    fn spawn(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))
            .expect("open mosquitto.log");
        let mut command = Command::new(MOSQUITTO);
        command
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        if self.tls == TlsMode::Tls12Only {
            command.env("OPENSSL_CONF", self.dir.join("openssl-tls12.cnf"));
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {MOSQUITTO}: {e}"));
        self.child = Some(child);
        self.wait_until_listening()
    }

    fn wait_until_listening(&mut self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                return Ok(());
            }
            let child = self.child.as_mut().expect("spawned");
            if child.try_wait().expect("poll mosquitto").is_some() {
                self.child = None;
                return Err(self.log());
            }
            if started.elapsed() > STARTUP_DEADLINE {
                self.stop();
                panic!(
                    "mosquitto did not listen on 127.0.0.1:{} within {STARTUP_DEADLINE:?}; \
                     its log:\n{}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `mosquitto_pub` once: publishes `payload` to `topic` with QoS 1 over TLS
/// (`tls_version`: `tlsv1.2` or `tlsv1.3`) to `localhost:port`, presenting `client`
/// and trusting `ca`. Returns whether it got its PUBACK (exit status 0) and its output.
pub fn mosquitto_pub(
    port: u16,
    ca: &Path,
    client: &blindgate::pki::CertKeyPaths,
    tls_version: &str,
    topic: &str,
    payload: &[u8],
) -> (bool, String) {
    let payload_dir = tempfile::tempdir().expect("tempdir");
    let payload_file = payload_dir.path().join("payload");
    File::create(&payload_file)
        .and_then(|mut f| std::io::Write::write_all(&mut f, payload))
        .expect("write payload");
    let output = Command::new(MOSQUITTO_PUB)
        .args(["-h", "localhost", "-p", &port.to_string(), "-q", "1", "-d"])
        .args(["--tls-version", tls_version, "-t", topic])
        .arg("--cafile")
        .arg(ca)
        .arg("--cert")
        .arg(&client.cert)
        .arg("--key")
        .arg(&client.key)
        .arg("-f")
        .arg(&payload_file)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {MOSQUITTO_PUB}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}
