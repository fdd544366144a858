//! The uplink's own MQTT connection loop against a real Mosquitto and against a
//! scripted TLS 1.3 broker that goes silent.
//!
//! - Idle with a 2 s keep-alive for 7 s, the uplink keeps its one connection to
//!   Mosquitto (which drops a client silent for 1.5 keep-alive periods), and a record
//!   stored afterwards is forwarded on it.
//! - A broker that answers CONNECT and SUBSCRIBE, then nothing: the gateway's PINGREQ
//!   comes within a keep-alive period, the gateway ends the connection one period after
//!   that, counts it as `lost`, and connects again.
//! - A 64 KiB command (the limit is 5 KiB) is skipped as it arrives, acknowledged to
//!   the broker and counted as a dropped downlink message; the connection stays up and
//!   forwards, and the next connection of the same session is not sent it again.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use blindgate::gateway::Gateway;
use blindgate::metrics::{DownlinkDrop, UplinkFailure};
use bytes::BytesMut;
use common::mosquitto::{TlsMode, require_mosquitto, start_cloud_broker};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet, SubAck, SubscribeReasonCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const KEEP_ALIVE: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_uplink_pings_and_keeps_its_connection() {
    if !require_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &["pump-17"]);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let mut plan = common::gateway_plan(dir.path(), &pki, broker.port);
    plan.uplink.keep_alive = KEEP_ALIVE;
    let gateway = Gateway::start(plan).await.expect("gateway starts");
    common::wait_uplink_connected(&gateway).await;
    // Mosquitto closes a connection that sent nothing for 1.5 keep-alive periods.
    tokio::time::sleep(KEEP_ALIVE * 7 / 2).await;
    let metrics = gateway.metrics();
    assert_eq!(
        metrics.uplink_connection_failures.get(),
        0,
        "broker log:\n{}",
        broker.log()
    );
    assert_eq!(
        metrics.uplink_connects.get(),
        1,
        "one connection throughout"
    );
    common::store_one_record(&pki, &gateway).await;
    common::wait_until("forwarded on the same connection", WAIT, || {
        metrics.forwarded.get() >= 1
    })
    .await;
    assert_eq!(metrics.uplink_connects.get(), 1);
    gateway.stop().await;
}

/// What the scripted broker saw on one connection.
struct Seen {
    /// From the SUBACK to the first PINGREQ.
    first_ping: Option<Duration>,
    /// From the first PINGREQ to the gateway closing the connection.
    closed_after_ping: Option<Duration>,
}

/// Accepts one connection, answers CONNECT and SUBSCRIBE, then only reads.
async fn silent_broker(listener: &TcpListener, acceptor: &TlsAcceptor) -> Seen {
    let (tcp, _) = listener.accept().await.expect("accept");
    let mut tls = acceptor.accept(tcp).await.expect("TLS handshake");
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    let mut subscribed_at = None;
    let mut pinged_at = None;
    let mut seen = Seen {
        first_ping: None,
        closed_after_ping: None,
    };
    loop {
        let packet = match Packet::read(&mut buf, 1 << 20) {
            Ok(packet) => packet,
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                match tls.read_buf(&mut buf).await {
                    Ok(n) if n > 0 => continue,
                    _ => {
                        seen.closed_after_ping = pinged_at.map(|at: Instant| at.elapsed());
                        return seen;
                    }
                }
            }
            Err(err) => panic!("the gateway sent bad MQTT: {err:?}"),
        };
        match packet {
            Packet::Connect(connect) => {
                assert!(!connect.clean_session, "a persistent session");
                assert_eq!(connect.keep_alive, 2);
                let ack = ConnAck::new(ConnectReturnCode::Success, false);
                ack.write(&mut out).expect("encode");
            }
            Packet::Subscribe(subscribe) => {
                assert_eq!(subscribe.filters[0].qos, QoS::AtLeastOnce);
                let ack = SubAck::new(
                    subscribe.pkid,
                    vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
                );
                ack.write(&mut out).expect("encode");
                subscribed_at = Some(Instant::now());
            }
            Packet::PingReq if pinged_at.is_none() => {
                pinged_at = Some(Instant::now());
                seen.first_ping = subscribed_at.map(|at| at.elapsed());
            }
            _ => {}
        }
        if !out.is_empty() {
            tls.write_all(&out).await.expect("answer");
            tls.flush().await.expect("flush");
            out.clear();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_answering_is_left_after_a_keep_alive_period_and_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &["pump-17"]);
    let server = blindgate::tls::device_server_config(
        &pki.cloud_ca.cert,
        &pki.cloud_broker.cert,
        &pki.cloud_broker.key,
    )
    .expect("broker TLS");
    let acceptor = TlsAcceptor::from(Arc::clone(&server));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut plan = common::gateway_plan(dir.path(), &pki, port);
    plan.uplink.keep_alive = KEEP_ALIVE;
    let gateway = Gateway::start(plan).await.expect("gateway starts");

    let seen = tokio::time::timeout(WAIT, silent_broker(&listener, &acceptor))
        .await
        .expect("the gateway ends the silent connection");
    let first_ping = seen.first_ping.expect("a PINGREQ");
    let closed = seen.closed_after_ping.expect("closed after the PINGREQ");
    eprintln!("first PINGREQ {first_ping:?} after the SUBACK; closed {closed:?} after it");
    assert!(
        first_ping <= KEEP_ALIVE + Duration::from_millis(500),
        "{first_ping:?}"
    );
    assert!(
        closed >= KEEP_ALIVE - Duration::from_millis(100)
            && closed <= KEEP_ALIVE + Duration::from_millis(1500),
        "{closed:?}"
    );
    let metrics = gateway.metrics();
    common::wait_until("counted as lost", WAIT, || {
        metrics
            .uplink_connection_failures
            .count(UplinkFailure::Lost)
            >= 1
    })
    .await;
    assert_eq!(
        metrics.uplink_connection_failures.get(),
        1,
        "lost, and nothing else"
    );
    // And it comes back.
    let (tcp, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("the gateway connects again")
        .expect("accept");
    drop(tcp);
    gateway.stop().await;
}

/// Failures of any reason, connects, and downlink messages dropped as invalid.
fn uplink_counts(gateway: &Gateway) -> (u64, u64, u64) {
    let m = gateway.metrics();
    let dropped = m
        .downlink_dropped
        .with_label_values(&[DownlinkDrop::Invalid.as_str()])
        .get();
    (
        m.uplink_connection_failures.get(),
        m.uplink_connects.get(),
        dropped,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_command_is_acknowledged_counted_and_skipped_on_the_same_connection() {
    if !require_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &["pump-17"]);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let plan = common::gateway_plan(dir.path(), &pki, broker.port);
    let limit = plan.uplink.max_envelope + 1024;
    let gateway = Gateway::start(plan).await.expect("gateway starts");
    common::wait_uplink_connected(&gateway).await;

    // 64 KiB, QoS 1, for a device of this gateway: far over the limit.
    let big = vec![0x5a; 64 * 1024];
    assert!(big.len() > limit);
    let (ok, out) = common::mosquitto::mosquitto_pub(
        broker.port,
        &pki.cloud_ca.cert,
        &pki.cloud_ingest,
        "tlsv1.3",
        "gw/gw-1/e3/pump-17/down",
        &big,
    );
    assert!(ok, "mosquitto_pub: {out}");
    common::wait_until("the oversized command is counted as dropped", WAIT, || {
        uplink_counts(&gateway).2 >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        uplink_counts(&gateway),
        (0, 1, 1),
        "no failure, one connection, dropped once; broker log:\n{}",
        broker.log()
    );
    common::store_one_record(&pki, &gateway).await;
    common::wait_until("forwarded after the oversized command", WAIT, || {
        gateway.metrics().forwarded.get() >= 1
    })
    .await;
    gateway.stop().await;

    // The broker got its PUBACK: the gateway's next connection (same session) is not
    // sent the message again.
    let plan = common::gateway_plan(dir.path(), &pki, broker.port);
    let gateway = Gateway::start(plan).await.expect("gateway starts again");
    common::wait_uplink_connected(&gateway).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(uplink_counts(&gateway), (0, 1, 0), "nothing redelivered");
    gateway.stop().await;
}
