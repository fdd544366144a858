//! Reload without loss, on the real binary under a fake systemd (a real notify socket):
//! a bad config on SIGHUP is refused and the old one keeps serving the devices already
//! connected and new ones; a restart-only change is refused; a good one is applied.
//! Certificates replaced on disk are used for the next connection, on the device
//! listener and on the uplink; a certificate with the wrong key is refused.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blindgate::pki::DevPki;
use common::mosquitto::{TlsMode, require_mosquitto, start_cloud_broker};
use rumqttc::{Event, Packet, QoS};
use rustix::process::{Pid, Signal, kill_process};
use rustls::pki_types::CertificateDer;

const DEVICE: &str = "pump-17";

struct Ports {
    devices: u16,
    metrics: u16,
    cloud: u16,
}

/// The config text; `extra_devices` and `extra_cloud` are appended to those sections.
fn config_text(dir: &Path, ports: &Ports, extra_devices: &str, extra_cloud: &str) -> String {
    let p = |name: &str| dir.join(name).display().to_string();
    format!(
        r#"[gateway]
id = "gw-1"
data_dir = "{data}"

[devices]
listen = "127.0.0.1:{devices}"
ca = "{dca}"
cert = "{dcert}"
key = "{dkey}"
{extra_devices}

[cloud]
endpoints = ["mqtts://localhost:{cloud}"]
ca = "{cca}"
cert = "{ccert}"
key = "{ckey}"
backoff_min = "100ms"
backoff_max = "300ms"
keep_alive = "5s"
{extra_cloud}

[queue]
min_free_disk = "0B"

[metrics]
listen = "127.0.0.1:{metrics}"
"#,
        data = p("data"),
        devices = ports.devices,
        cloud = ports.cloud,
        metrics = ports.metrics,
        dca = p("live/device-ca.pem"),
        dcert = p("live/gateway-devices.pem"),
        dkey = p("live/gateway-devices.key"),
        cca = p("live/cloud-ca.pem"),
        ccert = p("live/gateway-client.pem"),
        ckey = p("live/gateway-client.key"),
    )
}

/// `pki`'s files the gateway uses, by the name the config gives them in `dir/live`.
fn tls_files(pki: &DevPki) -> [(&Path, &'static str); 6] {
    [
        (&pki.device_ca.cert, "device-ca.pem"),
        (&pki.gateway_devices.cert, "gateway-devices.pem"),
        (&pki.gateway_devices.key, "gateway-devices.key"),
        (&pki.cloud_ca.cert, "cloud-ca.pem"),
        (&pki.gateway_client.cert, "gateway-client.pem"),
        (&pki.gateway_client.key, "gateway-client.key"),
    ]
}

/// Copies `pki`'s files named in `names` (all if empty) into `dir/live`, each
/// replaced atomically (written aside, then renamed), as an operator should.
fn install_tls(dir: &Path, pki: &DevPki, names: &[&str]) {
    let live = dir.join("live");
    std::fs::create_dir_all(&live).expect("live dir");
    for (from, name) in tls_files(pki) {
        if names.is_empty() || names.contains(&name) {
            replace_file(&live.join(name), &std::fs::read(from).expect("read"));
        }
    }
}

fn replace_file(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    let aside = path.with_extension("new");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&aside)
        .expect("create");
    file.write_all(bytes).expect("write");
    std::fs::rename(&aside, path).expect("rename");
}

/// The gateway binary with a notify socket, like systemd runs it.
struct Gateway {
    child: Child,
    notify: std::sync::mpsc::Receiver<String>,
    log: PathBuf,
    metrics_port: u16,
}

impl Gateway {
    fn spawn(dir: &Path, config: &Path, metrics_port: u16) -> Self {
        let socket = dir.join("notify.sock");
        let _ = std::fs::remove_file(&socket);
        let socket_rx = UnixDatagram::bind(&socket).expect("notify socket");
        // Read every notification at once, as systemd does (the watchdog sends five a
        // second here); the test then looks through them in order.
        let (tx, notify) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket_rx.recv(&mut buf) {
                if tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
                {
                    return;
                }
            }
        });
        let log = dir.join("gateway.log");
        let out = std::fs::File::create(&log).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_blindgate"))
            .args(["gateway", "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", &socket)
            .env("WATCHDOG_USEC", "400000")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("gateway starts");
        let gateway = Self {
            child,
            notify,
            log,
            metrics_port,
        };
        gateway.expect_notify("READY=1", Duration::from_secs(15));
        gateway
    }

    /// Waits for a notification starting with `prefix`; returns it whole.
    fn expect_notify(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {prefix:?} notification; log:\n{}",
                self.log()
            );
            if let Ok(message) = self.notify.recv_timeout(left)
                && message.starts_with(prefix)
            {
                return message;
            }
        }
    }

    fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid")).expect("pid");
        kill_process(pid, signal).expect("signal");
    }

    /// SIGHUP; returns the READY notification that ends the reload.
    fn reload(&self) -> String {
        self.signal(Signal::HUP);
        self.expect_notify("RELOADING=1", Duration::from_secs(10));
        self.expect_notify("READY=1", Duration::from_secs(10))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn metric(&self, series: &str) -> f64 {
        let text = http_get(self.metrics_port, "/metrics");
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    }

    fn stop(mut self) {
        self.signal(Signal::TERM);
        self.expect_notify("STOPPING=1", Duration::from_secs(10));
        let status = self.child.wait().expect("exit");
        assert!(status.success(), "gateway exited with {status}");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

fn seal(seq: u64) -> Vec<u8> {
    let key = common::device_key(DEVICE, 1);
    key.seal(e3::Kind::Uplink, seq, b"reading").expect("seal")
}

/// A device connection: publishes envelopes and waits for each PUBACK.
struct Device {
    client: rumqttc::AsyncClient,
    events: rumqttc::EventLoop,
}

impl Device {
    async fn connect(pki: &DevPki, port: u16) -> Self {
        let paths = &pki.devices[0].1;
        let tls = common::client_tls(&pki.device_ca.cert, &paths.cert, &paths.key);
        let (client, mut events) = common::mqtt_client(DEVICE, port, tls);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Self { client, events },
                Ok(Ok(_)) => {}
                other => panic!("device did not connect: {other:?}"),
            }
        }
    }

    async fn publish_acked(&mut self, seq: u64) {
        self.client
            .publish(
                format!("e3/{DEVICE}/up"),
                QoS::AtLeastOnce,
                false,
                seal(seq),
            )
            .await
            .expect("queued");
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => return,
                Ok(Ok(_)) => {}
                other => panic!("no PUBACK for seq {seq}: {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_keeps_the_old_config_and_the_connected_devices() {
    if !require_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &[DEVICE]);
    let mut broker = start_cloud_broker(dir.path(), &pki, TlsMode::Tls13MutualAuth);
    let ports = Ports {
        devices: common::free_port(),
        metrics: common::free_port(),
        cloud: broker.port,
    };
    install_tls(dir.path(), &pki, &[]);
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, config_text(dir.path(), &ports, "", "")).expect("config");
    let gateway = Gateway::spawn(dir.path(), &config, ports.metrics);
    gateway.expect_notify("WATCHDOG=1", Duration::from_secs(5));

    let mut device = Device::connect(&pki, ports.devices).await;
    device.publish_acked(1).await;

    // A misspelt key: refused with its line and column; nothing changes.
    let bad = config_text(dir.path(), &ports, "", "keep_alive_typo = \"1s\"");
    std::fs::write(&config, &bad).expect("bad config");
    let line = bad
        .lines()
        .position(|l| l.starts_with("keep_alive_typo"))
        .expect("line")
        + 1;
    let ready = gateway.reload();
    assert!(ready.contains("REJECTED"), "{ready}");
    let log = gateway.log();
    assert!(log.contains("reload rejected"), "{log}");
    assert!(
        log.contains(&format!("gateway.toml:{line}:1: cloud.keep_alive_typo")),
        "{log}"
    );
    let rejected = "blindgate_reloads_total{result=\"rejected\",trigger=\"signal\"}";
    assert_eq!(gateway.metric(rejected), 1.0);

    // The device connected before the reload still gets PUBACKs, and a new one connects.
    device.publish_acked(2).await;
    let mut second = Device::connect(&pki, ports.devices).await;
    second.publish_acked(3).await;
    let status = http_get(ports.metrics, "/status");
    assert!(status.contains("reload_rejected"), "{status}");

    // A change only a restart can make: refused, and flagged.
    let moved = config_text(dir.path(), &ports, "max_connections = 7", "");
    std::fs::write(&config, moved).expect("config");
    assert!(gateway.reload().contains("REJECTED"));
    assert_eq!(gateway.metric(rejected), 2.0);
    assert_eq!(gateway.metric("blindgate_config_restart_pending"), 1.0);
    assert!(gateway.log().contains("take effect only on restart"));

    // A valid change to [cloud]: applied, the uplink reconnects, forwarding goes on.
    let good = config_text(dir.path(), &ports, "", "inflight = 16");
    std::fs::write(&config, good).expect("config");
    let connects = gateway.metric("blindgate_uplink_connects_total");
    assert!(!gateway.reload().contains("REJECTED"));
    let applied = "blindgate_reloads_total{result=\"applied\",trigger=\"signal\"}";
    assert_eq!(gateway.metric(applied), 1.0);
    assert_eq!(gateway.metric("blindgate_config_restart_pending"), 0.0);
    second.publish_acked(4).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while gateway.metric("blindgate_uplink_forwarded_total") < 4.0
        || gateway.metric("blindgate_uplink_connects_total") <= connects
    {
        assert!(
            Instant::now() < deadline,
            "not forwarded after reload:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gateway.stop();
    broker.stop();
}

/// A TLS 1.3 server standing in for the cloud broker: records the client certificate
/// of every handshake, then hangs up (so the gateway keeps reconnecting).
fn recording_cloud(pki: &DevPki, client_cas: &Path) -> (u16, Arc<Mutex<Vec<Vec<u8>>>>) {
    let config = blindgate::tls::device_server_config(
        client_cas,
        &pki.cloud_broker.cert,
        &pki.cloud_broker.key,
    )
    .expect("server TLS");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut tcp) = stream else { continue };
            let Ok(mut conn) = rustls::ServerConnection::new(Arc::clone(&config)) else {
                continue;
            };
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
            while conn.is_handshaking() {
                if conn.complete_io(&mut tcp).is_err() {
                    break;
                }
            }
            if let Some(cert) = conn.peer_certificates().and_then(|c| c.first()) {
                record.lock().expect("lock").push(cert.to_vec());
            }
        }
    });
    (port, seen)
}

fn first_cert_der(path: &Path) -> Vec<u8> {
    let certs: Vec<CertificateDer<'static>> =
        blindgate::tls::load_certs(path).expect("certificate");
    certs[0].to_vec()
}

/// The certificate the device listener shows to a client trusting `pki`'s device CA,
/// or `None` if the handshake fails.
fn listener_certificate(port: u16, pki: &DevPki) -> Option<Vec<u8>> {
    let paths = &pki.devices[0].1;
    let tls = common::client_tls(&pki.device_ca.cert, &paths.cert, &paths.key);
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut conn = rustls::ClientConnection::new(tls, name).expect("client");
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).ok()?;
    }
    conn.peer_certificates()?.first().map(|c| c.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_replaced_on_disk_are_used_for_the_next_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = common::dev_pki(&dir.path().join("old"), &[DEVICE]);
    let new = common::dev_pki(&dir.path().join("new"), &[DEVICE]);
    // The stand-in cloud accepts client certificates of either generation.
    let both_cas = dir.path().join("both-cloud-cas.pem");
    let mut cas = std::fs::read(&old.cloud_ca.cert).expect("ca");
    cas.extend(std::fs::read(&new.cloud_ca.cert).expect("ca"));
    std::fs::write(&both_cas, cas).expect("cas");
    let (cloud_port, seen) = recording_cloud(&old, &both_cas);
    let ports = Ports {
        devices: common::free_port(),
        metrics: common::free_port(),
        cloud: cloud_port,
    };
    install_tls(dir.path(), &old, &[]);
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, config_text(dir.path(), &ports, "", "")).expect("config");
    let gateway = Gateway::spawn(dir.path(), &config, ports.metrics);

    let old_listener = first_cert_der(&old.gateway_devices.cert);
    assert_eq!(
        listener_certificate(ports.devices, &old),
        Some(old_listener)
    );
    assert_eq!(listener_certificate(ports.devices, &new), None);
    let old_client = first_cert_der(&old.gateway_client.cert);
    wait_until(&gateway, "the uplink shows its first certificate", || {
        seen.lock().expect("lock").contains(&old_client)
    });

    // A certificate with a key that is not its own: refused, the old pair stays.
    let live = dir.path().join("live");
    replace_file(
        &live.join("gateway-client.pem"),
        &std::fs::read(&new.gateway_client.cert).expect("cert"),
    );
    let rejected = "blindgate_reloads_total{result=\"rejected\",trigger=\"certificate_files\"}";
    wait_until(&gateway, "the mismatched key is refused", || {
        gateway.metric(rejected) >= 1.0
    });
    seen.lock().expect("lock").clear();
    wait_until(&gateway, "the uplink reconnects", || {
        !seen.lock().expect("lock").is_empty()
    });
    assert!(seen.lock().expect("lock").iter().all(|c| *c == old_client));

    // New certificates and keys for both sides (and a new device CA), as an operator
    // rotates them; the cloud's CA stays. Used from the next connection on, without a
    // restart.
    install_tls(
        dir.path(),
        &new,
        &[
            "device-ca.pem",
            "gateway-devices.pem",
            "gateway-devices.key",
            "gateway-client.pem",
            "gateway-client.key",
        ],
    );
    let applied = "blindgate_reloads_total{result=\"applied\",trigger=\"certificate_files\"}";
    wait_until(&gateway, "the new files are applied", || {
        gateway.metric(applied) >= 1.0
    });
    let new_listener = first_cert_der(&new.gateway_devices.cert);
    assert_eq!(
        listener_certificate(ports.devices, &new),
        Some(new_listener)
    );
    assert_eq!(listener_certificate(ports.devices, &old), None);
    let new_client = first_cert_der(&new.gateway_client.cert);
    wait_until(&gateway, "the uplink shows the new certificate", || {
        seen.lock().expect("lock").contains(&new_client)
    });
    let expiry =
        "blindgate_certificate_not_after_timestamp_seconds{index=\"0\",role=\"uplink_client\"}";
    assert!(gateway.metric(expiry) > 0.0);
    gateway.stop();
}

fn wait_until(gateway: &Gateway, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; log:\n{}",
            gateway.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
