//! The third-party peers of the interop tests, checked without the gateway: a real
//! Mosquitto as the cloud broker (TLS 1.3 mutual auth, or TLS 1.2 only), Mosquitto's
//! own `mosquitto_pub` as a publisher, and our rumqttc cloud subscriber.
//!
//! Needs Debian's `mosquitto` and `mosquitto-clients` (`.ci/install-test-deps`); without
//! them each test prints a skip message, unless `CI` is set, where it fails.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use blindgate::pki::DevPki;
use common::cloud_subscriber::CloudSubscriber;
use common::mosquitto::{TlsMode, mosquitto_pub, require_mosquitto, start_cloud_broker};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const UP_FILTER: &str = "gw/+/e3/+/up";
const UP_TOPIC: &str = "gw/gw-1/e3/pump-17/up";
const WAIT: Duration = Duration::from_secs(10);

struct Fixture {
    pki: DevPki,
    broker_dir: PathBuf,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &["pump-17"]);
    Fixture {
        pki,
        broker_dir: dir.path().join("broker"),
        _dir: dir,
    }
}

/// `mosquitto_pub` as the gateway (`gw-1` client certificate), off the runtime thread.
async fn publish_as_gateway(
    port: u16,
    pki: &DevPki,
    tls_version: &'static str,
    payload: &[u8],
) -> (bool, String) {
    let pki = pki.clone();
    let payload = payload.to_vec();
    tokio::task::spawn_blocking(move || {
        mosquitto_pub(
            port,
            &pki.cloud_ca.cert,
            &pki.gateway_client,
            tls_version,
            UP_TOPIC,
            &payload,
        )
    })
    .await
    .expect("mosquitto_pub task")
}

#[tokio::test]
async fn cloud_subscriber_receives_what_mosquitto_pub_publishes_over_mutual_tls13() {
    if !require_mosquitto() {
        return;
    }
    let f = fixture();
    let broker = start_cloud_broker(&f.broker_dir, &f.pki, TlsMode::Tls13MutualAuth);
    let subscriber = CloudSubscriber::connect(broker.port, &f.pki, "ingest-a", UP_FILTER).await;

    let payload = b"\x01sealed\x00bytes\xff";
    let (acked, output) = publish_as_gateway(broker.port, &f.pki, "tlsv1.3", payload).await;
    assert!(
        acked,
        "mosquitto_pub failed:\n{output}\nbroker:\n{}",
        broker.log()
    );

    let received = subscriber.wait_for(1, WAIT).await;
    assert_eq!(received, vec![(UP_TOPIC.to_owned(), payload.to_vec())]);
    // Both cloud-CA client certificates got in, each named by its CN.
    let log = broker.log();
    assert!(log.contains("u'gw-1'"), "{log}");
    assert!(log.contains("u'cloud-ingest'"), "{log}");
}

#[tokio::test]
async fn cloud_subscriber_resubscribes_after_the_broker_is_killed_and_restarted() {
    if !require_mosquitto() {
        return;
    }
    let f = fixture();
    let mut broker = start_cloud_broker(&f.broker_dir, &f.pki, TlsMode::Tls13MutualAuth);
    let subscriber = CloudSubscriber::connect(broker.port, &f.pki, "ingest-b", UP_FILTER).await;
    let (acked, output) = publish_as_gateway(broker.port, &f.pki, "tlsv1.3", b"before").await;
    assert!(acked, "{output}");
    subscriber.wait_for(1, WAIT).await;

    let subscriptions = subscriber.subscriptions();
    broker.stop();
    let (acked, _) = publish_as_gateway(broker.port, &f.pki, "tlsv1.3", b"during").await;
    assert!(!acked, "a stopped broker acknowledged a publish");
    broker.restart();
    // Without persistence the restarted broker forgot the session: a new SUBACK.
    subscriber.wait_subscribed(subscriptions + 1, WAIT).await;

    let (acked, output) = publish_as_gateway(broker.port, &f.pki, "tlsv1.3", b"after").await;
    assert!(acked, "{output}");
    let received = subscriber.wait_for(2, WAIT).await;
    let payloads: Vec<&[u8]> = received.iter().map(|(_, p)| p.as_slice()).collect();
    assert_eq!(payloads, [b"before".as_slice(), b"after"]);
}

#[tokio::test]
async fn cloud_subscriber_publish_returns_after_puback_and_reaches_other_subscribers() {
    if !require_mosquitto() {
        return;
    }
    let f = fixture();
    let broker = start_cloud_broker(&f.broker_dir, &f.pki, TlsMode::Tls13MutualAuth);
    let down_filter = "gw/+/e3/+/down";
    let gateway = CloudSubscriber::connect(broker.port, &f.pki, "gw-side", down_filter).await;
    let cloud = CloudSubscriber::connect(broker.port, &f.pki, "ingest-c", UP_FILTER).await;

    cloud
        .publish("gw/gw-1/e3/pump-17/down", b"command".to_vec())
        .await;
    let received = gateway.wait_for(1, WAIT).await;
    assert_eq!(
        received,
        vec![("gw/gw-1/e3/pump-17/down".to_owned(), b"command".to_vec())]
    );
}

#[tokio::test]
async fn tls12_only_broker_refuses_tls13_clients_and_accepts_tls12() {
    if !require_mosquitto() {
        return;
    }
    let f = fixture();
    let broker = start_cloud_broker(&f.broker_dir, &f.pki, TlsMode::Tls12Only);

    // The gateway's uplink TLS configuration (TLS 1.3 only) cannot connect.
    let tls = common::client_tls(
        &f.pki.cloud_ca.cert,
        &f.pki.gateway_client.cert,
        &f.pki.gateway_client.key,
    );
    let tcp = TcpStream::connect(("127.0.0.1", broker.port))
        .await
        .expect("tcp connect");
    let server_name = ServerName::try_from("localhost").expect("server name");
    let handshake = tokio::time::timeout(WAIT, TlsConnector::from(tls).connect(server_name, tcp))
        .await
        .expect("handshake finishes");
    let error = handshake.expect_err("TLS 1.3-only client connected to a TLS 1.2-only broker");
    assert!(
        error.to_string().contains("ProtocolVersion"),
        "expected a protocol_version alert, got: {error}"
    );

    // OpenSSL (mosquitto_pub) agrees: TLS 1.3 refused, TLS 1.2 works end to end.
    let (acked, output) = publish_as_gateway(broker.port, &f.pki, "tlsv1.3", b"x").await;
    assert!(!acked, "TLS 1.3 publish accepted:\n{output}");
    let (acked, output) = publish_as_gateway(broker.port, &f.pki, "tlsv1.2", b"x").await;
    assert!(
        acked,
        "TLS 1.2 publish failed:\n{output}\nbroker:\n{}",
        broker.log()
    );
}
