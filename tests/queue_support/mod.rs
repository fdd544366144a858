//! Shared by `tests/disk_full.rs` and `tests/corruption.rs`: the real `blindgate
//! gateway` binary with a config the test writes, its `/metrics` scraped over TCP, a
//! tmpfs mounted by the test (root), a seeded RNG, and simulated devices that publish
//! sealed envelopes and record which ones got a PUBACK.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different subset"
)]

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};

use crate::common::gateway_config::GatewayConfig;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blindgate::pki::DevPki;
use rumqttc::{Event, Outgoing, Packet, QoS};

/// True if this process runs as root. Otherwise prints a skip message and returns
/// false, or panics when `CI` is set (CI runs as root).
pub fn require_root(what: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    let message = format!("{what} needs root (to mount a tmpfs); skipped");
    assert!(std::env::var_os("CI").is_none(), "{message} (CI is set)");
    eprintln!("{message}");
    false
}

/// A tmpfs of a given size mounted on a fresh directory; unmounted on drop (also when
/// the test panics).
pub struct Tmpfs {
    pub path: PathBuf,
    pub size: u64,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes on `path` (created). Panics if `mount` fails.
    pub fn mount(path: &Path, size: u64) -> Self {
        std::fs::create_dir_all(path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0700"))
            .arg("tmpfs")
            .arg(path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs failed: {status}");
        Self {
            path: path.to_owned(),
            size,
        }
    }

    /// Free bytes for unprivileged users now.
    pub fn free(&self) -> u64 {
        rustix::fs::statvfs(&self.path).map_or(0, |s| s.f_bavail * s.f_frsize)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a gateway still holding files must not keep the mount alive.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// SplitMix64: a small seeded RNG, so a failing round can be replayed from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The seed for this run: `BLINDGATE_TEST_SEED` if set, else from the clock.
pub fn seed() -> u64 {
    crate::common::seed_from_env("BLINDGATE_TEST_SEED")
}

/// Settings of the `[queue]` section.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub max_bytes: &'static str,
    pub min_free_disk: &'static str,
    pub device_quota: &'static str,
}

/// Writes a gateway config into `dir/gateway.toml`.
pub fn write_config(
    dir: &Path,
    data_dir: &Path,
    pki: &DevPki,
    device_port: u16,
    cloud_port: u16,
    metrics_port: u16,
    queue: &QueueSettings,
) -> PathBuf {
    GatewayConfig::new(data_dir, pki, device_port, cloud_port)
        .set_str("queue", "max_bytes", queue.max_bytes)
        .set_str("queue", "min_free_disk", queue.min_free_disk)
        .set_str("queue", "device_quota", queue.device_quota)
        .set_str("queue", "cache_size", "2MiB")
        .metrics_port(metrics_port)
        .write(&dir.join("gateway.toml"))
}

/// The gateway binary as a child process; killed on drop if still running.
pub struct GatewayProcess {
    pub child: Child,
    pub log: PathBuf,
    pub device_port: u16,
    pub metrics_port: u16,
}

impl GatewayProcess {
    /// Starts `blindgate gateway --config config` and waits until it listens for
    /// devices and serves `/metrics`.
    pub fn spawn(config: &Path, device_port: u16, metrics_port: u16, log: &Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_blindgate"))
            .args(["gateway", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("gateway starts");
        let mut gateway = Self {
            child,
            log: log.to_owned(),
            device_port,
            metrics_port,
        };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", device_port)).is_err()
            || TcpStream::connect(("127.0.0.1", metrics_port)).is_err()
        {
            assert!(
                gateway.alive(),
                "gateway exited at start; log:\n{}",
                gateway.log_text()
            );
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "gateway did not listen; log:\n{}",
                gateway.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        gateway
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/metrics` as text (panics if it cannot be read).
    pub fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics")
    }

    /// One sample of `/metrics`, e.g. `blindgate_queue_records` or
    /// `blindgate_ingress_rejected_total{reason="queue_full"}`; 0 if absent.
    pub fn metric(&self, series: &str) -> u64 {
        metric_value(&self.metrics(), series)
    }

    /// SIGTERM, then waits up to 10 s for a clean exit; returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A plain HTTP/1.1 GET on 127.0.0.1; the body.
pub fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to /metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The value of `series` (name with its labels, exactly as exposed) in `text`.
pub fn metric_value(text: &str, series: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.strip_prefix(series))
        .filter_map(|rest| rest.strip_prefix(' '))
        .find_map(|value| value.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// The envelope number `seq` of `device`, padded to about `size` bytes.
pub fn seal(device: &str, seq: u64, size: usize) -> Vec<u8> {
    let key = e3::DeviceKey::new(
        e3::DeviceId::new(device).expect("valid"),
        1,
        e3::Suite::ChaCha20Poly1305,
        [0x17; 32],
    );
    let mut text = format!("{device} reading {seq} ").into_bytes();
    text.resize(size.saturating_sub(64).max(text.len()), b'.');
    key.seal(e3::Kind::Uplink, seq, &text).expect("seal")
}

/// `(device, seq)` of an envelope.
pub fn header_of(envelope: &[u8]) -> (String, u64) {
    let header = e3::Header::parse(envelope).expect("valid envelope");
    (header.device_id().to_owned(), header.seq())
}

/// A device publishing sealed envelopes with seq 1, 2, ... until stopped; records which
/// seqs the gateway acknowledged (by packet id, so a reconnect cannot confuse it).
pub struct Device {
    pub name: String,
    /// Seqs handed to the MQTT client so far (1..=published).
    published: Arc<AtomicU64>,
    acked: Arc<Mutex<BTreeSet<u64>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Device {
    /// Connects `name` (its certificate from `pki`) to the gateway on `port` and
    /// publishes envelopes of about `size` bytes until [`Device::stop_publishing`], or
    /// `limit` of them.
    pub fn start(pki: &DevPki, name: &str, port: u16, size: usize, limit: u64) -> Self {
        let (_, paths) = pki
            .devices
            .iter()
            .find(|(d, _)| d == name)
            .expect("device in the PKI");
        let tls = crate::common::client_tls(&pki.device_ca.cert, &paths.cert, &paths.key);
        let (client, mut eventloop) = crate::common::mqtt_client(name, port, tls);
        let published = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        // Seqs in the order rumqttc will send them; packet id -> seq once sent.
        let order: Arc<Mutex<VecDeque<u64>>> = Arc::default();
        let publisher = {
            let (published, stop, order, name) = (
                Arc::clone(&published),
                Arc::clone(&stop),
                Arc::clone(&order),
                name.to_owned(),
            );
            tokio::spawn(async move {
                for seq in 1..=limit {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    let envelope = seal(&name, seq, size);
                    order.lock().expect("order").push_back(seq);
                    // Counted when handed over: the call may wait for room in rumqttc's
                    // window for as long as the gateway holds PUBACKs.
                    published.store(seq, Ordering::Release);
                    if client
                        .publish(format!("e3/{name}/up"), QoS::AtLeastOnce, false, envelope)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            })
        };
        let poller = {
            let acked = Arc::clone(&acked);
            tokio::spawn(async move {
                let mut sent: HashMap<u16, u64> = HashMap::new();
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                            if let std::collections::hash_map::Entry::Vacant(e) = sent.entry(pkid)
                                && let Some(seq) = order.lock().expect("order").pop_front()
                            {
                                e.insert(seq);
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            if let Some(seq) = sent.remove(&ack.pkid) {
                                acked.lock().expect("acked").insert(seq);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            })
        };
        Self {
            name: name.to_owned(),
            published,
            acked,
            stop,
            tasks: vec![publisher, poller],
        }
    }

    pub fn stop_publishing(&self) {
        self.stop.store(true, Ordering::Release);
    }

    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    pub fn acked(&self) -> BTreeSet<u64> {
        self.acked.lock().expect("acked").clone()
    }

    pub fn acked_count(&self) -> u64 {
        self.acked.lock().expect("acked").len() as u64
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
