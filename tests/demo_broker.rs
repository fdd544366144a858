//! The demo's embedded rumqttd cloud broker with the dev PKI: the gateway's uplink and
//! the cloud subscriber connect with client certificates; a client without one is
//! refused.

mod common;

use std::sync::Arc;
use std::time::Duration;

use blindgate::demo::broker::start_cloud_broker;
use blindgate::gateway::Gateway;
use common::cloud_subscriber::CloudSubscriber;
use rumqttc::{Event, Packet, QoS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_forwards_through_the_embedded_rumqttd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &["pump-17"]);
    let addr = start_cloud_broker(
        &pki.cloud_ca.cert,
        &pki.cloud_broker.cert,
        &pki.cloud_broker.key,
    )
    .expect("rumqttd starts");
    let cloud = CloudSubscriber::connect(addr.port(), &pki, "ingest-1", "gw/+/e3/+/up").await;
    let gateway = Gateway::start(common::gateway_plan(dir.path(), &pki, addr.port()))
        .await
        .expect("gateway");
    let (_, paths) = &pki.devices[0];
    let tls = common::client_tls(&pki.device_ca.cert, &paths.cert, &paths.key);
    let (client, mut eventloop) = common::mqtt_client("pump-17", gateway.device_addr().port(), tls);
    let key = common::device_key("pump-17", 1);
    for seq in 1..=20u64 {
        let envelope = key.seal(e3::Kind::Uplink, seq, b"reading").expect("seal");
        client
            .publish("e3/pump-17/up", QoS::AtLeastOnce, false, envelope)
            .await
            .expect("publish");
    }
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let received = cloud.wait_for(20, Duration::from_secs(20)).await;
    assert_eq!(received.len(), 20);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_rumqttd_refuses_a_client_without_a_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &["pump-17"]);
    let addr = start_cloud_broker(
        &pki.cloud_ca.cert,
        &pki.cloud_broker.cert,
        &pki.cloud_broker.key,
    )
    .expect("rumqttd starts");
    let roots = blindgate::tls::load_root_store(&pki.cloud_ca.cert).expect("roots");
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let (_client, mut eventloop) =
        common::mqtt_client("intruder", addr.port(), Arc::new(anonymous));
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
                Err(_) => return false,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("an answer within 10 s");
    assert!(!outcome, "connected without a client certificate");
}
