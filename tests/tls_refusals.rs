//! "Nothing gets in", at the level of the running gateway: `Gateway::start` with its
//! metrics endpoint on, a device that stores a record, and a real Mosquitto cloud
//! broker that is wrong in exactly one way. For each way (TLS 1.2 only, a certificate
//! from another CA, expired, not yet valid, for another host name, a public key that
//! matches no pin, and the broker refusing the gateway's client certificate) the
//! uplink refuses to forward: the scraped `blindgate_uplink_connection_failures_total`
//! grows for that reason and for no other, a warning names the reason, nothing is
//! forwarded and the queue keeps the record. A control broker with a certificate made
//! the same way but correct shows that the refusals come from the one property that
//! was changed; killing that broker is counted as `lost`, then `unreachable`. Last,
//! the device listener of the same gateway refuses a device certificate from an
//! unknown CA and counts it as `tls_handshake`.
//!
//! `tests/tls.rs` covers the same refusals at the level of the rustls configurations;
//! this file checks what an operator sees of them.

mod common;

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use blindgate::gateway::{Gateway, GatewayPlan};
use blindgate::metrics::{Rejection, UplinkFailure};
use blindgate::pki::{CertKeyPaths, DevPki};
use blindgate::tls::{CipherOrder, UplinkTlsOptions, uplink_client_config};
use common::mosquitto::{Mosquitto, TlsMode, require_mosquitto, start_cloud_broker};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rumqttc::{Event, Packet};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Longest wait for anything that should happen.
const WAIT: Duration = Duration::from_secs(30);
/// Failed attempts to see before judging: more than one shows the reason is stable
/// across retries, not a first-attempt accident.
const ATTEMPTS: u64 = 3;

// ---------------------------------------------------------------------------------
// Log capture: every test in this binary logs into one buffer; lines are told apart
// by the broker's port, which is in each uplink line (`endpoint=localhost:PORT`).

fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUFFER: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUFFER.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&buffer);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Capture(Arc::clone(&writer)))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        buffer
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captured log lines that contain every one of `needles`.
fn log_lines(needles: &[&str]) -> Vec<String> {
    let bytes = log_buffer().lock().expect("log lock").clone();
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------
// Certificates: broker certificates made with rcgen, as src/pki makes them, with one
// property changed.

/// An issuer with the dev PKI's cloud CA key and name: what it signs chains to
/// `cloud-ca.pem` (webpki matches the issuer by name and checks the signature).
struct Issuer {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "blindgate");
    name.push(DnType::CommonName, common_name);
    name
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(30);
    params
}

impl Issuer {
    /// The dev PKI's own cloud CA.
    fn cloud_ca(pki: &DevPki) -> Self {
        let key = KeyPair::from_pem(&fs::read_to_string(&pki.cloud_ca.key).expect("CA key"))
            .expect("CA key parses");
        let cert = ca_params("blindgate dev cloud CA")
            .self_signed(&key)
            .expect("CA");
        Self { cert, key }
    }

    /// A CA the gateway has never heard of.
    fn other() -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = ca_params("some other cloud CA")
            .self_signed(&key)
            .expect("CA");
        Self { cert, key }
    }

    /// A broker certificate for `names` (DNS names or IP addresses), valid from
    /// `now + from_days` to `now + to_days`, written to `dir/<stem>.{pem,key}`.
    fn broker(
        &self,
        dir: &Path,
        stem: &str,
        names: &[&str],
        from_days: i64,
        to_days: i64,
    ) -> CertKeyPaths {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name("cloud-broker");
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into().expect("DNS name")),
            })
            .collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(from_days);
        params.not_after = now + time::Duration::days(to_days);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("broker certificate");
        fs::create_dir_all(dir).expect("certificate directory");
        let paths = CertKeyPaths {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        };
        fs::write(&paths.cert, cert.pem()).expect("write certificate");
        fs::write(&paths.key, key.serialize_pem()).expect("write key");
        paths
    }
}

// ---------------------------------------------------------------------------------
// The gateway under test and what it shows.

struct Setup {
    dir: tempfile::TempDir,
    pki: DevPki,
}

fn setup() -> Option<Setup> {
    log_buffer();
    if !require_mosquitto() {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &["pump-17"]);
    Some(Setup { dir, pki })
}

impl Setup {
    /// Mosquitto on the dev PKI, with `broker` as its certificate (if given).
    fn broker(&self, tls: TlsMode, broker: Option<CertKeyPaths>) -> Mosquitto {
        let mut pki = self.pki.clone();
        if let Some(paths) = broker {
            pki.cloud_broker = paths;
        }
        start_cloud_broker(&self.dir.path().join("broker"), &pki, tls)
    }

    /// The gateway's plan: the uplink to `localhost:port`, metrics on.
    fn plan(&self, port: u16) -> GatewayPlan {
        let mut plan = common::gateway_plan(self.dir.path(), &self.pki, port);
        plan.metrics_listen = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        plan
    }

    /// Uplink TLS with the dev PKI, `pins` and the client certificate `client`.
    fn uplink_tls(&self, pins: Vec<[u8; 32]>, client: &CertKeyPaths) -> Arc<rustls::ClientConfig> {
        uplink_client_config(&UplinkTlsOptions {
            ca: self.pki.cloud_ca.cert.clone(),
            cert: client.cert.clone(),
            key: client.key.clone(),
            pins_sha256: pins,
            cipher_order: CipherOrder::Auto,
        })
        .expect("uplink TLS")
    }
}

/// `GET /metrics` over TCP; the body.
async fn scrape(gateway: &Gateway) -> String {
    let addr = gateway.metrics_addr().expect("metrics endpoint on");
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to /metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("request");
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .expect("read the response");
    let response = String::from_utf8(response).expect("UTF-8");
    let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of the series written exactly as `series` (name and labels).
fn value(text: &str, series: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(s, _)| *s == series)
        .map(|(_, v)| v.parse::<f64>().expect("a number") as u64)
        .unwrap_or_else(|| panic!("no series {series} in the scrape:\n{text}"))
}

fn failures(text: &str, reason: UplinkFailure) -> u64 {
    value(
        text,
        &format!(
            "blindgate_uplink_connection_failures_total{{reason=\"{}\"}}",
            reason.as_str()
        ),
    )
}

/// Starts the gateway on `plan`, stores a record, waits for `ATTEMPTS` failures of
/// the uplink and checks that they all have `reason`, that the warning names it, and
/// that nothing was forwarded.
async fn assert_refused(
    case: &str,
    setup: &Setup,
    broker: &Mosquitto,
    plan: GatewayPlan,
    reason: UplinkFailure,
) {
    let started = Instant::now();
    let gateway = Gateway::start(plan).await.expect("gateway starts");
    common::store_one_record(&setup.pki, &gateway).await;
    let text = tokio::time::timeout(WAIT, async {
        loop {
            let text = scrape(&gateway).await;
            let total: u64 = UplinkFailure::ALL.iter().map(|r| failures(&text, *r)).sum();
            if total >= ATTEMPTS {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{case}: fewer than {ATTEMPTS} uplink failures within {WAIT:?}; broker log:\n{}",
            broker.log()
        )
    });
    let elapsed = started.elapsed();
    let counted: Vec<(&str, u64)> = UplinkFailure::ALL
        .iter()
        .map(|r| (r.as_str(), failures(&text, *r)))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(
        counted,
        [(reason.as_str(), failures(&text, reason))],
        "{case}: every failure has reason {} and no other; broker log:\n{}",
        reason.as_str(),
        broker.log()
    );
    assert_eq!(value(&text, "blindgate_uplink_connects_total"), 0, "{case}");
    assert_eq!(
        value(&text, "blindgate_uplink_forwarded_total"),
        0,
        "{case}"
    );
    assert_eq!(value(&text, "blindgate_queue_records"), 1, "{case}: kept");
    assert_eq!(gateway.queue().stats().total.records, 1, "{case}: kept");

    let endpoint = format!("endpoint=localhost:{}", broker.port);
    let lines = log_lines(&[&endpoint, "uplink connection failed", reason.as_str()]);
    assert!(
        !lines.is_empty(),
        "{case}: a warning names the reason {}; the uplink's lines:\n{}",
        reason.as_str(),
        log_lines(&[&endpoint]).join("\n")
    );
    assert!(lines[0].contains("WARN"), "{}", lines[0]);
    assert!(lines[0].contains(reason.explain()), "{}", lines[0]);
    // Rate-limited: the failures keep coming (every retry), the warning does not.
    let allowed = 1 + started.elapsed().as_secs() / 10;
    assert!(
        lines.len() as u64 <= allowed,
        "{case}: logged once per 10 s: {lines:?}"
    );
    eprintln!(
        "{case}: refused, reason {} counted {} time(s), 0 connects, 0 forwarded, \
         1 record kept; first refusal logged, verdict after {} ms\n  log: {}",
        reason.as_str(),
        failures(&text, reason),
        elapsed.as_millis(),
        lines[0].trim()
    );
    gateway.stop().await;
}

// ---------------------------------------------------------------------------------
// The cases.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_offering_only_tls12_is_refused_as_tls_version() {
    let Some(s) = setup() else { return };
    let broker = s.broker(TlsMode::Tls12Only, None);
    let plan = s.plan(broker.port);
    assert_refused("TLS 1.2 only", &s, &broker, plan, UplinkFailure::TlsVersion).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_another_ca_is_refused_as_unknown_ca() {
    let Some(s) = setup() else { return };
    let certs = s.dir.path().join("broker-certs");
    let cert = Issuer::other().broker(&certs, "other-ca", &["localhost", "127.0.0.1"], -1, 30);
    let broker = s.broker(TlsMode::Tls13MutualAuth, Some(cert));
    let plan = s.plan(broker.port);
    assert_refused("another CA", &s, &broker, plan, UplinkFailure::UnknownCa).await;
}

/// Another lab's broker: its dev PKI's cloud CA has the same name as ours but another
/// key, so webpki finds the issuer by name and the signature fails (`BadSignature`).
/// For the operator it is the same verdict: not issued by the configured CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_a_ca_with_our_ca_name_but_another_key_is_unknown_ca() {
    let Some(s) = setup() else { return };
    let other_lab = common::dev_pki(&s.dir.path().join("other-lab"), &[]);
    let broker = s.broker(TlsMode::Tls13MutualAuth, Some(other_lab.cloud_broker));
    let plan = s.plan(broker.port);
    assert_refused(
        "another lab's CA (same name, other key)",
        &s,
        &broker,
        plan,
        UplinkFailure::UnknownCa,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_broker_certificate_is_refused_as_expired() {
    let Some(s) = setup() else { return };
    let certs = s.dir.path().join("broker-certs");
    let cert = Issuer::cloud_ca(&s.pki).broker(&certs, "expired", &["localhost"], -30, -1);
    let broker = s.broker(TlsMode::Tls13MutualAuth, Some(cert));
    let plan = s.plan(broker.port);
    assert_refused("expired", &s, &broker, plan, UplinkFailure::Expired).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_not_valid_yet_is_refused_as_not_yet_valid() {
    let Some(s) = setup() else { return };
    let certs = s.dir.path().join("broker-certs");
    let cert = Issuer::cloud_ca(&s.pki).broker(&certs, "future", &["localhost"], 1, 30);
    let broker = s.broker(TlsMode::Tls13MutualAuth, Some(cert));
    let plan = s.plan(broker.port);
    assert_refused(
        "not yet valid",
        &s,
        &broker,
        plan,
        UplinkFailure::NotYetValid,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_for_another_host_is_refused_as_wrong_name() {
    let Some(s) = setup() else { return };
    let certs = s.dir.path().join("broker-certs");
    let cert = Issuer::cloud_ca(&s.pki).broker(&certs, "elsewhere", &["cloud.example"], -1, 30);
    let broker = s.broker(TlsMode::Tls13MutualAuth, Some(cert));
    let plan = s.plan(broker.port);
    assert_refused("wrong name", &s, &broker, plan, UplinkFailure::WrongName).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_key_matching_no_pin_is_refused_as_pin_mismatch() {
    let Some(s) = setup() else { return };
    let broker = s.broker(TlsMode::Tls13MutualAuth, None);
    let mut plan = s.plan(broker.port);
    plan.uplink.tls = s.uplink_tls(vec![[7; 32]], &s.pki.gateway_client);
    assert_refused(
        "pin mismatch",
        &s,
        &broker,
        plan,
        UplinkFailure::PinMismatch,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_refusing_the_gateway_certificate_is_counted_as_client_cert_rejected() {
    let Some(s) = setup() else { return };
    let broker = s.broker(TlsMode::Tls13MutualAuth, None);
    let mut plan = s.plan(broker.port);
    // A client certificate from the device CA, which the broker does not trust.
    plan.uplink.tls = s.uplink_tls(Vec::new(), &s.pki.devices[0].1);
    assert_refused(
        "client certificate refused by the broker",
        &s,
        &broker,
        plan,
        UplinkFailure::ClientCertRejected,
    )
    .await;
}

/// The control: a broker certificate made by the same code as the refused ones, but
/// correct (cloud CA, valid now, for localhost), with the right pin. The record is
/// forwarded and no failure is counted. Then the broker is killed: the connection is
/// counted as `lost`, the attempts after it as `unreachable`, and no TLS reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_broker_is_accepted_and_its_death_counted_as_lost_then_unreachable() {
    let Some(s) = setup() else { return };
    let certs = s.dir.path().join("broker-certs");
    let cert = Issuer::cloud_ca(&s.pki).broker(&certs, "good", &["localhost"], -1, 30);
    let pin = blindgate::tls::spki_sha256(
        &blindgate::tls::load_certs(&cert.cert).expect("certificate")[0],
    )
    .expect("pin");
    let mut broker = s.broker(TlsMode::Tls13MutualAuth, Some(cert));
    let mut plan = s.plan(broker.port);
    plan.uplink.tls = s.uplink_tls(vec![pin], &s.pki.gateway_client);
    let gateway = Gateway::start(plan).await.expect("gateway starts");
    common::store_one_record(&s.pki, &gateway).await;
    tokio::time::timeout(WAIT, async {
        while gateway.metrics().forwarded.get() < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("forwarded; broker log:\n{}", broker.log()));
    let text = scrape(&gateway).await;
    for reason in UplinkFailure::ALL {
        assert_eq!(failures(&text, reason), 0, "{}", reason.as_str());
    }
    assert_eq!(value(&text, "blindgate_uplink_connects_total"), 1);
    assert_eq!(value(&text, "blindgate_uplink_forwarded_total"), 1);
    assert_eq!(value(&text, "blindgate_queue_records"), 0);

    broker.stop();
    let killed = Instant::now();
    let text = tokio::time::timeout(WAIT, async {
        loop {
            let text = scrape(&gateway).await;
            if failures(&text, UplinkFailure::Lost) >= 1
                && failures(&text, UplinkFailure::Unreachable) >= 2
            {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the lost connection and the failed reconnects are counted");
    assert_eq!(failures(&text, UplinkFailure::Lost), 1, "lost once");
    for reason in UplinkFailure::ALL {
        if !matches!(reason, UplinkFailure::Lost | UplinkFailure::Unreachable) {
            assert_eq!(failures(&text, reason), 0, "{}", reason.as_str());
        }
    }
    let endpoint = format!("endpoint=localhost:{}", broker.port);
    for reason in [UplinkFailure::Lost, UplinkFailure::Unreachable] {
        let lines = log_lines(&[&endpoint, "uplink connection failed", reason.as_str()]);
        let allowed = 1 + killed.elapsed().as_secs() as usize / 10;
        assert!(
            (1..=allowed).contains(&lines.len()),
            "{}: logged once per 10 s: {lines:?}",
            reason.as_str()
        );
    }
    eprintln!(
        "control: same certificate code, correct properties, pinned: connected, \
         1 forwarded, 0 failures; broker killed: lost {}, unreachable {}",
        failures(&text, UplinkFailure::Lost),
        failures(&text, UplinkFailure::Unreachable)
    );
    gateway.stop().await;
}

/// A device certificate with the right device id from a CA the gateway does not trust
/// (another dev PKI's device CA, which has the same name as ours: rustls reports
/// `BadSignature`): refused at the handshake, counted once as `tls_handshake`,
/// logged, and nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_listener_refuses_a_device_certificate_from_an_unknown_ca() {
    let Some(s) = setup() else { return };
    let broker = s.broker(TlsMode::Tls13MutualAuth, None);
    let gateway = Gateway::start(s.plan(broker.port))
        .await
        .expect("gateway starts");
    let tls_handshake = format!(
        "blindgate_ingress_rejected_total{{reason=\"{}\"}}",
        Rejection::TlsHandshake.as_str()
    );
    let before = value(&scrape(&gateway).await, &tls_handshake);
    let stranger = common::dev_pki(&s.dir.path().join("stranger"), &["pump-17"]);
    let paths = &stranger.devices[0].1;
    // It trusts our listener (so the refusal is the gateway's, not the device's).
    let tls = common::client_tls(&s.pki.device_ca.cert, &paths.cert, &paths.key);
    let (_client, mut eventloop) =
        common::mqtt_client("pump-17", gateway.device_addr().port(), tls);
    let outcome = tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Err(err) => return err,
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    panic!("the gateway accepted a device from an unknown CA: {ack:?}")
                }
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the connection fails");
    let text = tokio::time::timeout(WAIT, async {
        loop {
            let text = scrape(&gateway).await;
            if value(&text, &tls_handshake) > before {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the refusal is counted");
    assert_eq!(value(&text, &tls_handshake), before + 1, "counted once");
    assert_eq!(value(&text, "blindgate_ingress_connections"), 0);
    assert_eq!(value(&text, "blindgate_ingress_received_total"), 0);
    assert_eq!(gateway.queue().stats().total.records, 0);
    // The counter is incremented just before the line is written: wait for it.
    let lines = tokio::time::timeout(WAIT, async {
        loop {
            let lines = log_lines(&["device TLS handshake from", "invalid peer certificate"]);
            if !lines.is_empty() {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the refusal is logged with its cause; device lines:\n{}",
            log_lines(&["device"]).join("\n")
        )
    });
    eprintln!(
        "device from an unknown CA: refused ({outcome}), tls_handshake {before} -> {}, \
         0 stored\n  log: {}",
        value(&text, &tls_handshake),
        lines[0].trim()
    );
    gateway.stop().await;
}
