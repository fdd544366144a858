//! Support for `tests/hostile.rs`: seeded randomness, the gateway binary under test
//! with its lab (PKI, Mosquitto, cloud subscriber), raw MQTT packets over TLS, and the
//! well-behaved device whose envelopes must keep arriving while the others attack.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "used from tests/hostile.rs, whose tests use different parts"
)]

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blindgate::pki::DevPki;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::common;
use crate::common::cloud_subscriber::CloudSubscriber;
use crate::common::gateway_config::GatewayConfig;
use crate::common::mosquitto::{Mosquitto, TlsMode, require_mosquitto, start_cloud_broker};
use crate::{GATEWAY, GOOD};

// ---------------------------------------------------------------------------------
// Seeded randomness

/// SplitMix64: small, seedable, good enough to generate test input.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub(crate) fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    pub(crate) fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Cases per fuzz target: `BLINDGATE_FUZZ_CASES`, else `default`.
pub(crate) fn fuzz_cases(default: usize) -> usize {
    common::env_number("BLINDGATE_FUZZ_CASES").unwrap_or(default)
}

/// True in a soak run (`BLINDGATE_FUZZ_CASES` set).
pub(crate) fn soak() -> bool {
    std::env::var_os("BLINDGATE_FUZZ_CASES").is_some()
}

/// `BLINDGATE_FUZZ_SEED`, else one from the clock; printed so a run can be replayed.
pub(crate) fn fuzz_rng(target: &str) -> Rng {
    let seed = common::seed_from_env("BLINDGATE_FUZZ_SEED");
    eprintln!("{target}: seed {seed} (replay with BLINDGATE_FUZZ_SEED={seed})");
    Rng(seed)
}

// ---------------------------------------------------------------------------------
// The lab: dev PKI, Mosquitto, the cloud's view, the gateway process

pub(crate) struct Lab {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) pki: DevPki,
    pub(crate) broker: Mosquitto,
    pub(crate) cloud: CloudSubscriber,
}

/// `None` (after a skip message) when Mosquitto is missing outside CI.
pub(crate) async fn lab(devices: &[&str]) -> Option<Lab> {
    if !require_mosquitto() {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), devices);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    // `#`: whatever the gateway publishes, on any topic, is seen.
    let cloud = CloudSubscriber::connect(broker.port, &pki, "cloud-view", "#").await;
    Some(Lab {
        dir,
        pki,
        broker,
        cloud,
    })
}

impl Lab {
    pub(crate) fn device_tls(&self, device: &str) -> Arc<rustls::ClientConfig> {
        let (_, paths) = self
            .pki
            .devices
            .iter()
            .find(|(id, _)| id == device)
            .expect("device in the dev PKI");
        common::client_tls(&self.pki.device_ca.cert, &paths.cert, &paths.key)
    }

    /// Everything the cloud received on `device`'s uplink topic, in arrival order.
    pub(crate) fn cloud_payloads(&self, device: &str) -> Vec<Vec<u8>> {
        let topic = format!("gw/{GATEWAY}/e3/{device}/up");
        self.cloud
            .received()
            .into_iter()
            .filter(|(t, _)| *t == topic)
            .map(|(_, p)| p)
            .collect()
    }

    /// Waits until the cloud holds `expected` (in this order) on `device`'s topic;
    /// panics after 60 s naming what is missing.
    pub(crate) async fn wait_cloud(&self, device: &str, expected: &[Vec<u8>]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = self.cloud_payloads(device);
            if got.len() >= expected.len() || Instant::now() > deadline {
                assert!(
                    got.as_slice() == expected,
                    "cloud holds {} envelopes for {device}, expected the {} acknowledged ones \
                     byte for byte and in order",
                    got.len(),
                    expected.len()
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every topic the cloud saw must be a known device's uplink topic.
    pub(crate) fn assert_cloud_topics(&self, devices: &[&str]) {
        let allowed: HashSet<String> = devices
            .iter()
            .map(|d| format!("gw/{GATEWAY}/e3/{d}/up"))
            .collect();
        for (topic, _) in self.cloud.received() {
            assert!(allowed.contains(&topic), "unexpected cloud topic {topic}");
        }
    }
}

/// Settings a test changes in the gateway's config.
pub(crate) struct Tuning {
    pub(crate) max_connections: u32,
    pub(crate) connect_timeout: &'static str,
    pub(crate) max_size: &'static str,
}

/// `blindgate gateway` as a child process; killed and reaped on drop.
pub(crate) struct GatewayProcess {
    pub(crate) child: Child,
    pub(crate) started: Instant,
    pub(crate) pid: u32,
    pub(crate) device_port: u16,
    pub(crate) metrics: SocketAddr,
    pub(crate) log: PathBuf,
}

impl GatewayProcess {
    /// Writes a config, starts the binary, waits until its uplink is connected.
    pub(crate) async fn start(lab: &Lab, tuning: &Tuning) -> Self {
        let dir = lab.dir.path();
        let pki = &lab.pki;
        let device_port = common::free_port();
        let metrics_port = common::free_port();
        // The hostile devices go as fast as they can: no rate limit in the way.
        let config = GatewayConfig::new(&dir.join("data"), pki, device_port, lab.broker.port)
            .set_str("gateway", "id", GATEWAY)
            .set("devices", "max_connections", tuning.max_connections)
            .set_str("devices", "connect_timeout", tuning.connect_timeout)
            .set("devices", "rate_limit_per_device", 1_000_000)
            .set("devices", "rate_burst_per_device", 1_000_000)
            .set_str("envelope", "max_size", tuning.max_size)
            .metrics_port(metrics_port)
            .write(&dir.join("gateway.toml"));
        let log = dir.join("gateway.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_blindgate"))
            .args(["gateway", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("gateway starts");
        let mut gateway = Self {
            started: Instant::now(),
            pid: child.id(),
            child,
            device_port,
            metrics: ([127, 0, 0, 1], metrics_port).into(),
            log,
        };
        // Probe the metrics port, not the device port: a probe there would be a
        // refused TLS handshake. The device listener is bound before it.
        let started = Instant::now();
        loop {
            if gateway.metric("blindgate_uplink_connected").await == Some(1.0) {
                break;
            }
            gateway.assert_alive();
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "gateway not connected to the cloud within 30 s; log:\n{}",
                gateway.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        gateway
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process runs and has not panicked anywhere (a task's panic is printed by
    /// the default hook even when the runtime survives it).
    pub(crate) fn assert_alive(&mut self) {
        let status = self.child.try_wait().expect("poll the gateway");
        assert!(
            status.is_none(),
            "the gateway exited ({status:?}); log:\n{}",
            self.log_text()
        );
        let log = self.log_text();
        assert!(
            !log.contains("panicked"),
            "the gateway panicked; log:\n{log}"
        );
    }

    /// `/metrics` as text; `None` if the endpoint does not answer.
    pub(crate) async fn metrics_text(&self) -> Option<String> {
        let exchange = async {
            let mut tcp = TcpStream::connect(self.metrics).await?;
            tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
                .await?;
            let mut response = Vec::new();
            tcp.read_to_end(&mut response).await?;
            io::Result::Ok(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let (_, body) = text.split_once("\r\n\r\n")?;
        Some(body.to_owned())
    }

    /// One sample's value (`name` with its labels, e.g. `x{reason="y"}`).
    pub(crate) async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.metrics_text().await?;
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// `blindgate_ingress_rejected_total` by reason.
    pub(crate) async fn rejected(&self) -> BTreeMap<String, u64> {
        let text = self.metrics_text().await.expect("metrics endpoint answers");
        let prefix = "blindgate_ingress_rejected_total{reason=\"";
        text.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(prefix)?;
                let (reason, value) = rest.split_once("\"} ")?;
                Some((reason.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    /// (VmRSS, VmHWM) in KiB from `/proc/<pid>/status`.
    pub(crate) fn rss_kib(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Refusals are logged at most once per reason every 10 s, whatever their number:
    /// the WARN lines stay within 13 reasons times the 10 s periods the gateway ran.
    pub(crate) fn assert_log_rate_limited(&self, rejections: u64) {
        let warns = self
            .log_text()
            .lines()
            .filter(|l| l.contains("WARN"))
            .count();
        let periods = self.started.elapsed().as_secs() as usize / 10 + 1;
        let bound = blindgate::metrics::Rejection::ALL.len() * periods;
        eprintln!(
            "  gateway log: {warns} WARN lines for {rejections} rejections (at most {bound}: \
             one per reason per 10 s)"
        );
        assert!(warns <= bound, "refusals are not rate-limited in the log");
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `after - before` per reason, and the total.
pub(crate) fn delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> (BTreeMap<String, u64>, u64) {
    let diff: BTreeMap<String, u64> = after
        .iter()
        .map(|(reason, n)| (reason.clone(), n - before.get(reason).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let total = diff.values().sum();
    (diff, total)
}

// ---------------------------------------------------------------------------------
// MQTT 3.1.1 by hand: hostile input must be writable, so no codec builds it

pub(crate) fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return;
        }
    }
}

pub(crate) fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

pub(crate) fn mqtt_string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

pub(crate) fn connect_packet(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_string(b"MQTT", &mut body);
    body.push(4); // protocol level 3.1.1
    body.push(0x02); // clean session
    body.extend_from_slice(&keep_alive.to_be_bytes());
    mqtt_string(client_id.as_bytes(), &mut body);
    packet(0x10, &body)
}

pub(crate) fn publish_packet(topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_string(topic.as_bytes(), &mut body);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

pub(crate) fn subscribe_packet(pkid: u16, filter: &str) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    mqtt_string(filter.as_bytes(), &mut body);
    body.push(1);
    packet(0x82, &body)
}

/// Writes all of `bytes` and flushes: tokio-rustls may keep the last TLS records in
/// its buffer until a flush.
pub(crate) async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Reads one packet: (first byte, body).
pub(crate) async fn read_packet<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<(u8, Vec<u8>)> {
    let first = stream.read_u8().await?;
    let mut len = 0usize;
    for shift in 0..4 {
        let byte = stream.read_u8().await?;
        len |= usize::from(byte & 0x7f) << (7 * shift);
        if byte & 0x80 == 0 {
            let mut body = vec![0; len];
            stream.read_exact(&mut body).await?;
            return Ok((first, body));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "bad remaining length",
    ))
}

type Tls = TlsStream<TcpStream>;

pub(crate) async fn tls_connect(port: u16, tls: Arc<rustls::ClientConfig>) -> io::Result<Tls> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("localhost").expect("valid name");
    TlsConnector::from(tls).connect(name, tcp).await
}

/// TLS, CONNECT, CONNACK accepted.
pub(crate) async fn mqtt_session(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    id: &str,
) -> io::Result<Tls> {
    let mut stream = tls_connect(port, tls).await?;
    send(&mut stream, &connect_packet(id, 60)).await?;
    let (first, body) = read_packet(&mut stream).await?;
    if first != 0x20 || body.get(1) != Some(&0) {
        return Err(io::Error::other(format!(
            "CONNACK refused: {first:#x} {body:?}"
        )));
    }
    Ok(stream)
}

/// Publishes QoS 1 and waits for the PUBACK with this packet id (other packets are
/// skipped); returns how long it took.
pub(crate) async fn publish_acked(
    stream: &mut Tls,
    topic: &str,
    pkid: u16,
    payload: &[u8],
) -> io::Result<Duration> {
    let sent = Instant::now();
    send(stream, &publish_packet(topic, 1, pkid, payload)).await?;
    loop {
        let (first, body) = read_packet(stream).await?;
        if first == 0x40 && body == pkid.to_be_bytes() {
            return Ok(sent.elapsed());
        }
    }
}

/// Reads and discards until the peer closes (EOF, reset or TLS error); returns when.
pub(crate) async fn until_closed<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Option<Instant> {
    let mut buf = vec![0u8; 16 * 1024];
    let wait = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, wait).await.ok()
}

// ---------------------------------------------------------------------------------
// The well-behaved device

pub(crate) struct GoodDevice {
    /// The phase its latencies are attributed to (set by the test).
    pub(crate) phase: Arc<AtomicU64>,
    pub(crate) stop: CancellationToken,
    pub(crate) task: JoinHandle<GoodReport>,
}

#[derive(Default)]
pub(crate) struct GoodReport {
    /// Envelopes acknowledged, in order.
    pub(crate) acked: Vec<Vec<u8>>,
    /// PUBACK latency of each, with the phase it was measured in.
    pub(crate) latencies: Vec<(usize, Duration)>,
    pub(crate) error: Option<String>,
}

impl GoodDevice {
    /// Connects `GOOD` and publishes a fresh envelope every 20 ms, each after the
    /// previous one's PUBACK, until stopped.
    pub(crate) async fn start(lab: &Lab, port: u16) -> Self {
        let mut stream = mqtt_session(port, lab.device_tls(GOOD), GOOD)
            .await
            .expect("the good device connects");
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let key = common::device_key(GOOD, 1);
        let phase = Arc::new(AtomicU64::new(0));
        let current = Arc::clone(&phase);
        let task = tokio::spawn(async move {
            let mut report = GoodReport::default();
            let topic = format!("e3/{GOOD}/up");
            for seq in 1u64.. {
                if stopped.is_cancelled() {
                    break;
                }
                let envelope = key
                    .seal(
                        e3::Kind::Uplink,
                        seq,
                        format!("good reading {seq}").as_bytes(),
                    )
                    .expect("seal");
                let pkid = (seq % 65_535 + 1) as u16;
                let phase = current.load(Ordering::Relaxed) as usize;
                let publish = publish_acked(&mut stream, &topic, pkid, &envelope);
                match tokio::time::timeout(Duration::from_secs(20), publish).await {
                    Ok(Ok(latency)) => {
                        report.acked.push(envelope);
                        report.latencies.push((phase, latency));
                    }
                    Ok(Err(e)) => {
                        report.error = Some(format!("seq {seq}: {e}"));
                        break;
                    }
                    Err(_) => {
                        report.error = Some(format!("seq {seq}: no PUBACK within 20 s"));
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            report
        });
        Self { phase, stop, task }
    }

    /// Attributes the latencies measured from now on to phase `phase`.
    pub(crate) fn set_phase(&self, phase: u64) {
        self.phase.store(phase, Ordering::Relaxed);
    }

    /// Stops, checks it never failed, and checks every acknowledged envelope reached
    /// the cloud byte for byte, in order, and nothing else on its topic.
    pub(crate) async fn finish(self, lab: &Lab, phases: &[&str]) -> GoodReport {
        self.stop.cancel();
        let report = self.task.await.expect("good device task");
        assert!(
            report.error.is_none(),
            "the good device failed: {:?}",
            report.error
        );
        for (i, phase) in phases.iter().enumerate() {
            let mut during: Vec<Duration> = report
                .latencies
                .iter()
                .filter(|(p, _)| *p == i)
                .map(|(_, l)| *l)
                .collect();
            assert!(
                !during.is_empty(),
                "the good device got no PUBACK during {phase}"
            );
            during.sort();
            let at = |q: usize| during[(during.len() * q / 100).min(during.len() - 1)];
            eprintln!(
                "  good device during {phase}: {} PUBACKs, latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                during.len(),
                ms(at(50)),
                ms(at(99)),
                ms(at(100))
            );
        }
        lab.wait_cloud(GOOD, &report.acked).await;
        eprintln!(
            "  good device: all {} acknowledged envelopes reached the cloud, in order",
            report.acked.len()
        );
        report
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
