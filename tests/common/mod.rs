//! Shared set-up for integration tests: a dev PKI in a temporary directory, device keys,
//! and MQTT clients with real TLS. Every test gets its own directory and port 0.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different subset"
)]

pub mod cloud_subscriber;
pub mod gateway_config;
pub mod mosquitto;
/// The cuttable link lives in the library (the demo uses it too).
pub mod proxy {
    #[allow(unused_imports, reason = "not every test binary cuts the link")]
    pub use blindgate::demo::link::Link as Proxy;
}

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blindgate::gateway::GatewayPlan;
use blindgate::ingress::IngressSettings;
use blindgate::pki::{DevPki, DevPkiOptions, generate_dev_pki};
use blindgate::queue::QueueConfig;
use blindgate::tls::{CipherOrder, UplinkTlsOptions, device_server_config, uplink_client_config};
use blindgate::topics::TopicTemplate;
use blindgate::uplink::{Endpoint, UplinkSettings};
use rumqttc::{AsyncClient, EventLoop, MqttOptions, TlsConfiguration, Transport};

/// A dev PKI for gateway `gw-1` with the given devices.
pub fn dev_pki(dir: &Path, devices: &[&str]) -> DevPki {
    generate_dev_pki(&DevPkiOptions {
        out_dir: dir.join("certs"),
        gateway_id: "gw-1".into(),
        devices: devices.iter().map(|d| (*d).to_owned()).collect(),
        cloud_host: "localhost".into(),
        validity_days: 30,
        force: false,
    })
    .expect("dev PKI")
}

/// A rustls client config presenting `cert`/`key`, trusting `ca`.
pub fn client_tls(ca: &Path, cert: &Path, key: &Path) -> Arc<rustls::ClientConfig> {
    uplink_client_config(&UplinkTlsOptions {
        ca: ca.to_owned(),
        cert: cert.to_owned(),
        key: key.to_owned(),
        pins_sha256: Vec::new(),
        cipher_order: CipherOrder::Auto,
    })
    .expect("client TLS config")
}

/// An MQTT 3.1.1 client (rumqttc) over TLS to 127.0.0.1:`port`, checking the server
/// certificate for `localhost`.
pub fn mqtt_client(
    client_id: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(client_id, "localhost", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    options.set_max_packet_size(1 << 20, 1 << 20);
    AsyncClient::new(options, 64)
}

/// The first device of `pki` stores one sealed record in `gateway` (its PUBACK means
/// durable); fails the test if no PUBACK comes within 30 s.
pub async fn store_one_record(pki: &DevPki, gateway: &blindgate::gateway::Gateway) {
    let (device, paths) = &pki.devices[0];
    let tls = client_tls(&pki.device_ca.cert, &paths.cert, &paths.key);
    let (client, mut eventloop) = mqtt_client(device, gateway.device_addr().port(), tls);
    let envelope = device_key(device, 1)
        .seal(e3::Kind::Uplink, 1, b"{\"t\":21.5}")
        .expect("seal");
    client
        .publish(
            format!("e3/{device}/up"),
            rumqttc::QoS::AtLeastOnce,
            false,
            envelope,
        )
        .await
        .expect("publish");
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                eventloop.poll().await.expect("device connection")
            {
                return;
            }
        }
    })
    .await
    .expect("the gateway acknowledged the record");
    let _ = client.disconnect().await;
}

/// The key of a device, as the device would hold it.
pub fn device_key(device: &str, key_id: u32) -> e3::DeviceKey {
    e3::DeviceKey::generate(
        e3::DeviceId::new(device).expect("valid device id"),
        key_id,
        e3::Suite::ChaCha20Poly1305,
        &mut e3::OsRng,
    )
}

/// A gateway plan for tests: devices on 127.0.0.1 port 0, the uplink to
/// `localhost:cloud_port` with the dev PKI, fast retries, queue in `dir/queue`.
pub fn gateway_plan(dir: &Path, pki: &DevPki, cloud_port: u16) -> GatewayPlan {
    let template = |t: &str| TopicTemplate::new(t, "gw-1").expect("template");
    let mut queue = QueueConfig::new(dir.join("queue"));
    queue.min_free_disk = 0;
    GatewayPlan {
        queue,
        ingress: IngressSettings {
            up_topic: template("e3/{device_id}/up"),
            down_topic: template("e3/{device_id}/down"),
            max_envelope: 4096,
            max_packet: 8192,
            max_connections: 16,
            max_inflight: 32,
            rate_per_sec: 0,
            rate_burst: 1,
            connect_timeout: Duration::from_secs(5),
            inflight_bytes: 1 << 20,
        },
        device_tls: device_server_config(
            &pki.device_ca.cert,
            &pki.gateway_devices.cert,
            &pki.gateway_devices.key,
        )
        .expect("device TLS"),
        device_listen: "127.0.0.1:0".parse().expect("addr"),
        plaintext_listen: None,
        uplink: UplinkSettings {
            endpoints: vec![Endpoint {
                host: "localhost".into(),
                port: cloud_port,
            }],
            tls: uplink_client_config(&UplinkTlsOptions {
                ca: pki.cloud_ca.cert.clone(),
                cert: pki.gateway_client.cert.clone(),
                key: pki.gateway_client.key.clone(),
                pins_sha256: Vec::new(),
                cipher_order: CipherOrder::Auto,
            })
            .expect("uplink TLS"),
            client_id: "gw-1".into(),
            keep_alive: Duration::from_secs(5),
            window: 32,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_millis(500),
            up_topic: template("gw/{gateway_id}/e3/{device_id}/up"),
            down_topic: template("gw/{gateway_id}/e3/{device_id}/down"),
            max_envelope: 4096,
            drain_rate: 0,
            drain_window: 32,
        },
        downlink_pending_per_device: 10,
        metrics_listen: None,
        ready_max_ack_age: Duration::from_secs(60),
    }
}

/// A port that was free on 127.0.0.1 a moment ago (bind port 0, read it, release it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Waits until `gateway`'s uplink is connected to the cloud; fails the test after 20 s.
pub async fn wait_uplink_connected(gateway: &blindgate::gateway::Gateway) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while gateway.metrics().uplink_connected.get() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("uplink connected");
}

/// Polls `condition` every 20 ms until it holds; fails the test, naming `what`, if it
/// does not within `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    tokio::time::timeout(limit, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not within {limit:?}"));
}

/// The number in environment variable `var`, if it is set and parses.
pub fn env_number<T: std::str::FromStr>(var: &str) -> Option<T> {
    std::env::var(var).ok().and_then(|v| v.parse().ok())
}

/// A seed for a randomised test: `var` if set, else one from the clock. The caller
/// prints it, so a failing run can be replayed.
pub fn seed_from_env(var: &str) -> u64 {
    env_number(var).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    })
}
