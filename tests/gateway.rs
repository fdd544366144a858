//! The whole gateway end to end: rumqttc devices over TLS 1.3 → gateway (real sled
//! queue) → uplink over mutual TLS 1.3 → a real Mosquitto cloud broker → a cloud
//! subscriber. Outages are real network partitions (a TCP proxy that is cut), so the
//! broker and the subscriber's session stay up.

mod common;

use std::time::Duration;

use blindgate::gateway::Gateway;
use blindgate::pki::DevPki;
use common::cloud_subscriber::CloudSubscriber;
use common::mosquitto::{Mosquitto, TlsMode, require_mosquitto, start_cloud_broker};
use common::proxy::Proxy;
use rumqttc::{Event, Packet, QoS};

const WAIT: Duration = Duration::from_secs(20);

struct World {
    dir: tempfile::TempDir,
    pki: DevPki,
    _broker: Mosquitto,
    proxy: Proxy,
    cloud: CloudSubscriber,
}

async fn world(devices: &[&str]) -> Option<World> {
    if !require_mosquitto() {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), devices);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let proxy = Proxy::start(([127, 0, 0, 1], broker.port).into())
        .await
        .expect("link");
    let cloud = CloudSubscriber::connect(broker.port, &pki, "ingest-1", "gw/+/e3/+/up").await;
    Some(World {
        dir,
        pki,
        _broker: broker,
        proxy,
        cloud,
    })
}

impl World {
    async fn gateway(&self) -> Gateway {
        Gateway::start(common::gateway_plan(
            self.dir.path(),
            &self.pki,
            self.proxy.port,
        ))
        .await
        .expect("gateway starts")
    }
}

/// A device connected to `gateway` with its certificate from `pki`.
fn device(
    pki: &DevPki,
    gateway: &Gateway,
    device: &str,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (_, paths) = pki
        .devices
        .iter()
        .find(|(id, _)| id == device)
        .expect("device in PKI");
    let tls = common::client_tls(&pki.device_ca.cert, &paths.cert, &paths.key);
    common::mqtt_client(device, gateway.device_addr().port(), tls)
}

/// Publishes `envelopes` from `device` and returns once every one got its PUBACK.
async fn publish_all(pki: &DevPki, gateway: &Gateway, device_id: &str, envelopes: &[Vec<u8>]) {
    let (client, mut eventloop) = device(pki, gateway, device_id);
    let device = device_id;
    let topic = format!("e3/{device}/up");
    let to_send = envelopes.to_vec();
    tokio::spawn(async move {
        for envelope in to_send {
            client
                .publish(topic.as_str(), QoS::AtLeastOnce, false, envelope)
                .await
                .expect("publish");
        }
    });
    let mut acks = 0;
    tokio::time::timeout(WAIT, async {
        while acks < envelopes.len() {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = eventloop.poll().await {
                acks += 1;
            }
        }
    })
    .await
    .expect("every publish acknowledged by the gateway");
}

fn seal_many(device: &str, count: u64) -> Vec<Vec<u8>> {
    let key = common::device_key(device, 1);
    (1..=count)
        .map(|seq| {
            key.seal(
                e3::Kind::Uplink,
                seq,
                format!("{device} reading {seq}").as_bytes(),
            )
            .expect("seal")
        })
        .collect()
}

async fn wait_until_empty(gateway: &Gateway) {
    tokio::time::timeout(WAIT, async {
        while gateway.queue().stats().total.records > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("queue drained after the cloud acknowledged everything");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_reach_the_cloud_byte_for_byte_in_order_and_then_leave_the_queue() {
    let Some(world) = world(&["pump-17"]).await else {
        return;
    };
    let gateway = world.gateway().await;
    // A malformed envelope and another device's envelope go first: neither may reach
    // the cloud.
    let other = common::device_key("meter-9", 1)
        .seal(e3::Kind::Uplink, 1, b"not pump-17's")
        .expect("seal");
    publish_all(
        &world.pki,
        &gateway,
        "pump-17",
        &[b"garbage".to_vec(), other],
    )
    .await;
    let envelopes = seal_many("pump-17", 100);
    publish_all(&world.pki, &gateway, "pump-17", &envelopes).await;
    world.cloud.wait_for(100, WAIT).await;
    // Give anything that should not arrive the time to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = world.cloud.received();
    assert!(
        received
            .iter()
            .all(|(topic, _)| topic == "gw/gw-1/e3/pump-17/up")
    );
    let payloads: Vec<Vec<u8>> = received.into_iter().map(|(_, p)| p).collect();
    assert!(payloads == envelopes, "cloud got different bytes or order");
    wait_until_empty(&gateway).await;
    assert_eq!(gateway.metrics().forwarded.get(), 100);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_outage_loses_nothing_and_keeps_each_devices_order() {
    let Some(world) = world(&["pump-17", "meter-9"]).await else {
        return;
    };
    let gateway = world.gateway().await;
    world.proxy.cut();
    let pump = seal_many("pump-17", 150);
    let meter = seal_many("meter-9", 150);
    publish_all(&world.pki, &gateway, "pump-17", &pump).await;
    publish_all(&world.pki, &gateway, "meter-9", &meter).await;
    assert_eq!(
        gateway.queue().stats().total.records,
        300,
        "all stored during the outage"
    );
    assert!(
        world.cloud.received().is_empty(),
        "nothing crossed the cut link"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    world.proxy.restore();
    let received = world.cloud.wait_for(300, WAIT).await;
    let of = |device: &str| -> Vec<Vec<u8>> {
        let topic = format!("gw/gw-1/e3/{device}/up");
        received
            .iter()
            .filter(|(t, _)| *t == topic)
            .map(|(_, p)| p.clone())
            .collect()
    };
    assert!(
        of("pump-17") == pump,
        "pump-17 lost, duplicated or reordered records"
    );
    assert!(
        of("meter-9") == meter,
        "meter-9 lost, duplicated or reordered records"
    );
    wait_until_empty(&gateway).await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_broker_offering_only_tls_1_2_is_refused() {
    if !require_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &["pump-17"]);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls12Only);
    let gateway = Gateway::start(common::gateway_plan(dir.path(), &pki, broker.port))
        .await
        .expect("gateway starts");
    let envelopes = seal_many("pump-17", 3);
    publish_all(&pki, &gateway, "pump-17", &envelopes).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        gateway.metrics().uplink_connects.get(),
        0,
        "never connected"
    );
    assert_eq!(gateway.queue().stats().total.records, 3, "kept, not lost");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_from_the_cloud_reaches_its_device_through_the_gateway() {
    let Some(world) = world(&["pump-17"]).await else {
        return;
    };
    let gateway = world.gateway().await;
    let (client, mut eventloop) = device(&world.pki, &gateway, "pump-17");
    client
        .subscribe("e3/pump-17/down", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    // Wait for the device's SUBACK and the gateway's uplink before the cloud sends.
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = eventloop.poll().await {
                break;
            }
        }
    })
    .await
    .expect("SUBACK");
    common::wait_uplink_connected(&gateway).await;
    let key = common::device_key("pump-17", 1);
    let command = key
        .seal(e3::Kind::Command, 1, b"close valve")
        .expect("seal");
    let forged = key
        .seal(e3::Kind::Uplink, 1, b"not a command")
        .expect("seal");
    world.cloud.publish("gw/gw-1/e3/pump-17/down", forged).await;
    world
        .cloud
        .publish("gw/gw-1/e3/pump-17/down", command.clone())
        .await;
    let publish = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = eventloop.poll().await {
                return p;
            }
        }
    })
    .await
    .expect("command delivered");
    assert_eq!(publish.topic, "e3/pump-17/down");
    assert_eq!(
        publish.payload.to_vec(),
        command,
        "only the valid command arrives, untouched"
    );
    let invalid = gateway
        .metrics()
        .downlink_dropped
        .with_label_values(&["invalid"])
        .get();
    assert_eq!(invalid, 1);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_first_endpoint_fails_over_to_the_next() {
    let Some(world) = world(&["pump-17"]).await else {
        return;
    };
    let dead = common::free_port();
    let mut plan = common::gateway_plan(world.dir.path(), &world.pki, world.proxy.port);
    plan.uplink.endpoints.insert(
        0,
        blindgate::uplink::Endpoint {
            host: "localhost".into(),
            port: dead,
        },
    );
    let gateway = Gateway::start(plan).await.expect("gateway starts");
    let envelopes = seal_many("pump-17", 10);
    publish_all(&world.pki, &gateway, "pump-17", &envelopes).await;
    let received = world.cloud.wait_for(10, WAIT).await;
    assert_eq!(received.len(), 10);
    assert_eq!(gateway.metrics().uplink_connects.get(), 1);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_the_drain_is_paced_fair_between_devices_and_live_data_gets_through() {
    let Some(world) = world(&["pump-17", "meter-9", "cam-1"]).await else {
        return;
    };
    let mut plan = common::gateway_plan(world.dir.path(), &world.pki, world.proxy.port);
    plan.uplink.drain_rate = 100;
    let gateway = Gateway::start(plan).await.expect("gateway starts");
    world.proxy.cut();
    let big = seal_many("pump-17", 200);
    let small = seal_many("meter-9", 5);
    publish_all(&world.pki, &gateway, "pump-17", &big).await;
    publish_all(&world.pki, &gateway, "meter-9", &small).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    world.proxy.restore();
    common::wait_uplink_connected(&gateway).await;
    let restored = std::time::Instant::now();
    // Live data from a device without backlog, published while the backlog drains.
    let live = seal_many("cam-1", 3);
    publish_all(&world.pki, &gateway, "cam-1", &live).await;
    let received = world.cloud.wait_for(208, WAIT).await;
    let drained_in = restored.elapsed();

    let position = |device: &str, n: usize| {
        let topic = format!("gw/gw-1/e3/{device}/up");
        received
            .iter()
            .enumerate()
            .filter(|(_, (t, _))| *t == topic)
            .nth(n)
            .map(|(i, _)| i)
            .expect("arrived")
    };
    // 205 backlog records at 100 per second (burst 100) take over a second.
    assert!(
        drained_in >= Duration::from_millis(900),
        "drain not paced: {drained_in:?}"
    );
    // Fairness: meter-9's last backlog record is not queued behind pump-17's 200.
    assert!(
        position("meter-9", 4) < 50,
        "meter-9 starved: {}",
        position("meter-9", 4)
    );
    // Live records are not held back by the pacing of the backlog.
    assert!(
        position("cam-1", 2) < position("pump-17", 199),
        "live data waited for the backlog"
    );
    gateway.stop().await;
}
