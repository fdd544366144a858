//! The Prometheus endpoints as Prometheus sees them: a real gateway (real sled queue,
//! uplink over mutual TLS 1.3 to a real Mosquitto cloud broker) and the real cloud
//! ingest, each scraped over TCP at `/metrics`, and the text checked by Prometheus' own
//! linter (`promtool check metrics`, from Debian's `prometheus` package, installed by
//! `.ci/install-test-deps`). Also: every metric family of the contract
//! (docs/MONITORING.md) is there with its type and help, and the number of series does
//! not grow with the number of devices (labels come from closed enums only).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use blindgate::cloud::{CloudMetrics, CloudSettings};
use blindgate::gateway::{Gateway, GatewayPlan, Reloader};
use blindgate::keys::KeyStore;
use blindgate::pki::DevPki;
use common::mosquitto::{Mosquitto, TlsMode, require_mosquitto, start_cloud_broker};
use rumqttc::{Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// Where `.ci/install-test-deps` puts promtool.
const PROMTOOL: &str = "/usr/local/bin/promtool";

/// The gateway's metric families (the contract in docs/MONITORING.md) and their types.
const GATEWAY_FAMILIES: &[(&str, &str)] = &[
    ("blindgate_ingress_received_total", "counter"),
    ("blindgate_ingress_rejected_total", "counter"),
    ("blindgate_ingress_connections", "gauge"),
    ("blindgate_uplink_forwarded_total", "counter"),
    ("blindgate_uplink_connects_total", "counter"),
    ("blindgate_uplink_connection_failures_total", "counter"),
    ("blindgate_uplink_connected", "gauge"),
    ("blindgate_uplink_last_ack_timestamp_seconds", "gauge"),
    ("blindgate_downlink_delivered_total", "counter"),
    ("blindgate_downlink_dropped_total", "counter"),
    ("blindgate_queue_records", "gauge"),
    ("blindgate_queue_bytes", "gauge"),
    ("blindgate_queue_max_bytes", "gauge"),
    ("blindgate_queue_disk_bytes", "gauge"),
    ("blindgate_queue_devices", "gauge"),
    ("blindgate_queue_oldest_age_seconds", "gauge"),
    ("blindgate_queue_commits_total", "counter"),
    ("blindgate_queue_committed_total", "counter"),
    ("blindgate_queue_quarantined_total", "counter"),
    ("blindgate_queue_dropped_total", "counter"),
    ("blindgate_build_info", "gauge"),
    ("blindgate_certificate_not_after_timestamp_seconds", "gauge"),
    ("blindgate_reloads_total", "counter"),
    ("blindgate_config_restart_pending", "gauge"),
    ("blindgate_heap_returned_bytes_total", "counter"),
    ("blindgate_ready", "gauge"),
    ("process_cpu_seconds_total", "counter"),
    ("process_resident_memory_bytes", "gauge"),
    ("process_virtual_memory_bytes", "gauge"),
    ("process_open_fds", "gauge"),
    ("process_max_fds", "gauge"),
    ("process_start_time_seconds", "gauge"),
    ("process_threads", "gauge"),
];

/// The cloud ingest's metric families (src/cloud/metrics.rs) and their types.
const CLOUD_FAMILIES: &[(&str, &str)] = &[
    ("blindgate_cloud_accepted_total", "counter"),
    ("blindgate_cloud_rejected_total", "counter"),
    ("blindgate_cloud_receipts_total", "counter"),
    ("blindgate_cloud_images_completed_total", "counter"),
    ("blindgate_cloud_subscribed", "gauge"),
    ("blindgate_cloud_command_results_total", "counter"),
];

/// promtool's path if it is installed. Otherwise prints a skip message and returns
/// `None`, or, when the `CI` environment variable is set, panics: CI installs it
/// (`.ci/install-test-deps`), so a missing promtool there is a broken setup.
fn require_promtool() -> Option<PathBuf> {
    let found = std::iter::once(PathBuf::from(PROMTOOL))
        .chain(
            std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .map(|dir| dir.join("promtool")),
        )
        .find(|path| path.is_file());
    if found.is_none() {
        let message = "promtool not installed; run .ci/install-test-deps";
        assert!(std::env::var_os("CI").is_none(), "{message} (CI is set)");
        eprintln!("{message}");
    }
    found
}

/// `GET /metrics` over a real TCP connection; checks the status, the content type and
/// the length, and returns the body.
async fn scrape(addr: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: prometheus\r\nAccept: text/plain\r\n\r\n")
        .await
        .expect("send the request");
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .expect("read the response");
    let response = String::from_utf8(response).expect("the response is UTF-8");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("an HTTP head and body");
    let mut lines = head.lines();
    assert_eq!(lines.next(), Some("HTTP/1.1 200 OK"), "{head}");
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("text/plain; version=0.0.4"),
        "the content type Prometheus' text parser expects"
    );
    assert_eq!(
        headers.get("content-length"),
        Some(&body.len().to_string()),
        "Content-Length matches the body"
    );
    body.to_owned()
}

/// Runs `promtool check metrics` on `text` (stdin): it must succeed and print nothing
/// (promtool prints one line per lint problem and exits 3).
fn promtool_check(promtool: &Path, text: &str, what: &str) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", promtool.display()));
    child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(text.as_bytes())
        .expect("write the scrape to promtool");
    let output = child.wait_with_output().expect("promtool finishes");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "promtool check metrics on the {what} scrape: {} \n{said}\nthe scrape:\n{text}",
        output.status
    );
}

/// What a scrape says about its families: name → (type, help).
fn families(text: &str) -> BTreeMap<String, (String, String)> {
    let mut out: BTreeMap<String, (String, String)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.entry(name.to_owned()).or_default().1 = help.to_owned();
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            out.entry(name.to_owned()).or_default().0 = kind.to_owned();
        }
    }
    out
}

/// Asserts that every family in `expected` is in `text` with that type and a help text.
fn assert_families(text: &str, expected: &[(&str, &str)], what: &str) {
    let found = families(text);
    for (name, kind) in expected {
        let Some((found_kind, help)) = found.get(*name) else {
            panic!("the {what} scrape has no family {name}:\n{text}");
        };
        assert_eq!(found_kind, kind, "type of {name}");
        assert!(!help.trim().is_empty(), "{name} has no help text");
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && !l.starts_with('#')),
            "{name} has no sample"
        );
    }
}

/// Every metric name the alert rules, their tests and the Grafana dashboard in
/// config/monitoring use (words starting `blindgate_` or `process_`), with the file.
fn names_used_in_monitoring_files() -> BTreeMap<String, &'static str> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/monitoring");
    let mut names = BTreeMap::new();
    for file in [
        "prometheus-alerts.yml",
        "prometheus-alerts.test.yml",
        "grafana-dashboard.json",
    ] {
        let text = std::fs::read_to_string(dir.join(file)).expect("read a monitoring file");
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        for (start, _) in text.match_indices(['b', 'p']) {
            let rest = &text[start..];
            let starts_word = text[..start].chars().next_back().is_none_or(|c| !word(c));
            if starts_word && (rest.starts_with("blindgate_") || rest.starts_with("process_")) {
                let end = rest.find(|c: char| !word(c)).unwrap_or(rest.len());
                names.insert(rest[..end].to_owned(), file);
            }
        }
    }
    names
}

/// Every series (name and labels) in a scrape.
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.rsplit_once(' ').expect("series value").0.to_owned())
        .collect()
}

/// The value of one series (`name` or `name{labels}` exactly as encoded).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(s, _)| *s == series)
        .map(|(_, v)| v.parse().expect("a number"))
}

/// A device's MQTT connection, polled by a task until dropped. `acked` resolves once
/// `expected_acks` PUBACKs arrived.
struct Session {
    task: JoinHandle<()>,
    acked: Option<oneshot::Receiver<()>>,
}

impl Session {
    /// Connects with `options`, subscribes to `down`, publishes `publishes` (in order,
    /// QoS 1) on `up` and keeps the connection open.
    fn start(options: MqttOptions, up: String, down: String, publishes: Vec<Vec<u8>>) -> Self {
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
        let expected_acks = publishes.len();
        let (done, acked) = oneshot::channel();
        let task = tokio::spawn(async move {
            let publisher = client.clone();
            tokio::spawn(async move {
                publisher
                    .subscribe(down, QoS::AtLeastOnce)
                    .await
                    .expect("subscribe");
                for payload in publishes {
                    publisher
                        .publish(up.as_str(), QoS::AtLeastOnce, false, payload)
                        .await
                        .expect("publish");
                }
            });
            let mut done = Some(done);
            let mut acks = 0;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acks += 1;
                        if acks >= expected_acks
                            && let Some(done) = done.take()
                        {
                            let _ = done.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Self {
            task,
            acked: Some(acked),
        }
    }

    /// Waits until every publish got its PUBACK from the gateway.
    async fn wait_acked(&mut self) {
        let acked = self.acked.take().expect("waited once");
        tokio::time::timeout(WAIT, acked)
            .await
            .expect("every publish acknowledged by the gateway in time")
            .expect("session task alive");
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A dev PKI, a Mosquitto cloud broker, and a gateway built from
/// `common::gateway_plan` with its metrics endpoint on (and, if `plaintext`, the lab
/// listener). A `Reloader` puts the certificates' expiry into the metrics exactly as
/// `blindgate gateway` does at start.
struct World {
    dir: tempfile::TempDir,
    pki: DevPki,
    broker: Mosquitto,
    gateway: Gateway,
    _reloader: Reloader,
}

async fn world(devices: &[&str], plaintext: bool) -> Option<(World, PathBuf)> {
    let promtool = require_promtool()?;
    if !require_mosquitto() {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), devices);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let mut plan: GatewayPlan = common::gateway_plan(dir.path(), &pki, broker.port);
    plan.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    if plaintext {
        plan.plaintext_listen = Some("127.0.0.1:0".parse().expect("addr"));
        plan.ingress.max_connections = 64;
    }
    let gateway = Gateway::start(plan).await.expect("gateway starts");
    let config_path = dir.path().join("gateway.toml");
    let config =
        blindgate::config::parse(&config_text(dir.path(), &pki, broker.port), &config_path)
            .expect("the test's config is valid");
    let reloader = Reloader::new(config_path, config, &gateway);
    Some((
        World {
            dir,
            pki,
            broker,
            gateway,
            _reloader: reloader,
        },
        promtool,
    ))
}

/// The config file that names the plan's certificate files (the certificate metric
/// comes from the files a config names).
fn config_text(dir: &Path, pki: &DevPki, cloud_port: u16) -> String {
    let p = |path: &Path| path.display().to_string();
    format!(
        r#"[gateway]
id = "gw-1"
data_dir = "{data}"

[devices]
listen = "127.0.0.1:0"
ca = "{dca}"
cert = "{dcert}"
key = "{dkey}"

[cloud]
endpoints = ["mqtts://localhost:{cloud_port}"]
ca = "{cca}"
cert = "{ccert}"
key = "{ckey}"
"#,
        data = p(&dir.join("data")),
        dca = p(&pki.device_ca.cert),
        dcert = p(&pki.gateway_devices.cert),
        dkey = p(&pki.gateway_devices.key),
        cca = p(&pki.cloud_ca.cert),
        ccert = p(&pki.gateway_client.cert),
        ckey = p(&pki.gateway_client.key),
    )
}

/// MQTT options for `device` over TLS with its certificate from `pki`.
fn tls_device(pki: &DevPki, gateway: &Gateway, device: &str) -> MqttOptions {
    let (_, paths) = pki
        .devices
        .iter()
        .find(|(id, _)| id == device)
        .expect("device in PKI");
    let tls = common::client_tls(&pki.device_ca.cert, &paths.cert, &paths.key);
    let mut options = MqttOptions::new(device, "localhost", gateway.device_addr().port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_and_cloud_ingest_scrapes_pass_promtool_and_carry_every_family() {
    let Some((world, promtool)) = world(&["pump-17"], false).await else {
        return;
    };
    let gateway = &world.gateway;
    let metrics_addr = gateway.metrics_addr().expect("metrics endpoint on");

    // The cloud ingest, with its metrics endpoint served the way `blindgate cloud run`
    // serves it (`http::serve` on the ingest's `CloudMetrics`).
    let keys = KeyStore::open(&world.dir.path().join("cloud").join("keys")).expect("key store");
    let key = keys
        .provision("pump-17", e3::Suite::ChaCha20Poly1305)
        .expect("provision");
    let cloud_metrics = CloudMetrics::new();
    let stop_cloud = CancellationToken::new();
    let settings = CloudSettings::local(
        &world.dir.path().join("cloud"),
        &world.pki,
        world.broker.port,
        "ingest-1",
    )
    .expect("ingest settings");
    let ingest = tokio::spawn(blindgate::cloud::run(
        settings,
        cloud_metrics.clone(),
        stop_cloud.clone(),
    ));
    let cloud_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the ingest's metrics endpoint");
    let cloud_addr = cloud_listener.local_addr().expect("local addr");
    let cloud_http = tokio::spawn(blindgate::http::serve(
        cloud_listener,
        cloud_metrics.clone(),
        stop_cloud.clone(),
    ));
    assert!(
        cloud_metrics.wait_subscribed(WAIT).await,
        "ingest subscribed"
    );

    // Before any traffic: already lint-clean, every family present.
    let idle = scrape(metrics_addr).await;
    promtool_check(&promtool, &idle, "idle gateway");
    assert_families(&idle, GATEWAY_FAMILIES, "idle gateway");

    // One device: five readings, one of them sent twice (the cloud refuses the repeat
    // as a duplicate), and one malformed envelope the gateway refuses.
    let envelopes: Vec<Vec<u8>> = (1..=5)
        .map(|seq| {
            key.seal(e3::Kind::Uplink, seq, format!("{{\"n\":{seq}}}").as_bytes())
                .expect("seal")
        })
        .collect();
    let mut publishes = envelopes.clone();
    publishes.push(envelopes[0].clone());
    publishes.push(b"not an envelope".to_vec());
    let mut device = Session::start(
        tls_device(&world.pki, gateway, "pump-17"),
        "e3/pump-17/up".into(),
        "e3/pump-17/down".into(),
        publishes,
    );
    device.wait_acked().await;
    common::wait_until("the cloud acknowledged all six", WAIT, || {
        gateway.metrics().forwarded.get() == 6
    })
    .await;
    common::wait_until(
        "the ingest accepted five and refused one duplicate",
        WAIT,
        || {
            cloud_metrics.accepted.get() == 5
                && cloud_metrics.rejected(blindgate::cloud::CloudRejection::Duplicate) == 1
        },
    )
    .await;

    let text = scrape(metrics_addr).await;
    promtool_check(&promtool, &text, "gateway");
    assert_families(&text, GATEWAY_FAMILIES, "gateway");
    let v = |series: &str| value(&text, series).unwrap_or_else(|| panic!("no {series}:\n{text}"));
    assert_eq!(v("blindgate_ingress_received_total"), 6.0);
    assert_eq!(
        v(r#"blindgate_ingress_rejected_total{reason="malformed_envelope"}"#),
        1.0
    );
    assert_eq!(v("blindgate_uplink_forwarded_total"), 6.0);
    assert_eq!(v("blindgate_uplink_connected"), 1.0);
    assert_eq!(v("blindgate_ingress_connections"), 1.0);
    assert_eq!(v("blindgate_ready"), 1.0);
    assert!(v("blindgate_uplink_last_ack_timestamp_seconds") > 1.7e9);
    assert_eq!(
        v(&format!(
            r#"blindgate_build_info{{version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    assert!(v("blindgate_queue_max_bytes") > 0.0);
    // The dev PKI's certificates are valid for 30 days (common::dev_pki).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    for role in ["device_listener", "device_ca", "uplink_client", "uplink_ca"] {
        let not_after = v(&format!(
            r#"blindgate_certificate_not_after_timestamp_seconds{{index="0",role="{role}"}}"#
        ));
        let days = (not_after - now) / 86_400.0;
        assert!((25.0..=31.0).contains(&days), "{role}: {days} days left");
    }
    assert!(v("process_resident_memory_bytes") > 0.0);
    assert!(v("process_open_fds") > 0.0);

    let cloud_text = scrape(cloud_addr).await;
    promtool_check(&promtool, &cloud_text, "cloud ingest");
    assert_families(&cloud_text, CLOUD_FAMILIES, "cloud ingest");
    let c = |series: &str| {
        value(&cloud_text, series).unwrap_or_else(|| panic!("no {series}:\n{cloud_text}"))
    };
    assert_eq!(c("blindgate_cloud_accepted_total"), 5.0);
    assert_eq!(
        c(r#"blindgate_cloud_rejected_total{reason="duplicate"}"#),
        1.0
    );
    assert_eq!(c("blindgate_cloud_subscribed"), 1.0);
    assert!(c("blindgate_cloud_receipts_total") >= 1.0);

    // The dashboard and the alerts ask only for families these endpoints serve.
    let served: BTreeSet<String> = families(&text)
        .into_keys()
        .chain(families(&cloud_text).into_keys())
        .collect();
    let used = names_used_in_monitoring_files();
    assert!(used.len() > 20, "the scan found the names: {used:?}");
    for (name, file) in &used {
        assert!(
            served.contains(name),
            "config/monitoring/{file} uses {name}, which neither endpoint serves"
        );
    }

    drop(device);
    world.gateway.stop().await;
    stop_cloud.cancel();
    let _ = ingest.await;
    let _ = cloud_http.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_number_of_series_does_not_grow_with_the_number_of_devices() {
    const DEVICES: usize = 50;
    let Some((world, promtool)) = world(&["pump-17"], true).await else {
        return;
    };
    let gateway = &world.gateway;
    let metrics_addr = gateway.metrics_addr().expect("metrics endpoint on");
    let plain_port = gateway.plaintext_addr().expect("plain listener on").port();
    common::wait_uplink_connected(gateway).await;

    let baseline = scrape(metrics_addr).await;

    // Each device (the lab listener: its identity is its client id) subscribes, sends
    // two readings and one malformed envelope, and stays connected.
    let session = |i: usize| {
        let id = format!("sensor-{i:03}");
        let key = common::device_key(&id, 1);
        let mut publishes: Vec<Vec<u8>> = (1..=2)
            .map(|seq| key.seal(e3::Kind::Uplink, seq, b"{}").expect("seal"))
            .collect();
        publishes.push(b"garbage".to_vec());
        let mut options = MqttOptions::new(id.as_str(), "127.0.0.1", plain_port);
        options.set_keep_alive(Duration::from_secs(30));
        Session::start(
            options,
            format!("e3/{id}/up"),
            format!("e3/{id}/down"),
            publishes,
        )
    };
    let mut first = session(0);
    first.wait_acked().await;
    let one = scrape(metrics_addr).await;

    let mut sessions = vec![first];
    for i in 1..DEVICES {
        sessions.push(session(i));
    }
    for s in &mut sessions[1..] {
        s.wait_acked().await;
    }
    let many = scrape(metrics_addr).await;
    promtool_check(&promtool, &many, "gateway with 50 devices");

    let count = |series: &str| value(&many, series).expect("series present");
    assert_eq!(count("blindgate_ingress_connections"), DEVICES as f64);
    assert_eq!(
        count("blindgate_ingress_received_total"),
        2.0 * DEVICES as f64
    );
    assert_eq!(
        count(r#"blindgate_ingress_rejected_total{reason="malformed_envelope"}"#),
        DEVICES as f64
    );
    let (baseline, one, many) = (series(&baseline), series(&one), series(&many));
    assert_eq!(
        one, baseline,
        "one device added or removed series (labels must come from closed sets)"
    );
    assert_eq!(
        many, one,
        "{DEVICES} devices produce other series than one device"
    );
    assert!(
        many.iter().all(|s| !s.contains("sensor-")),
        "a device id appears in a label"
    );
    eprintln!(
        "{} series with 1 device and with {DEVICES} devices",
        many.len()
    );

    drop(sessions);
    world.gateway.stop().await;
}

#[test]
fn the_check_catches_what_promtool_lints() {
    let Some(promtool) = require_promtool() else {
        return;
    };
    let bad = "# HELP requests A counter without the _total suffix.\n# TYPE requests counter\nrequests 1\n";
    let caught = std::panic::catch_unwind(|| promtool_check(&promtool, bad, "bad example"));
    assert!(caught.is_err(), "promtool_check accepted a lint problem");
    let good = "# HELP requests_total Requests.\n# TYPE requests_total counter\nrequests_total 1\n";
    promtool_check(&promtool, good, "good example");
}
