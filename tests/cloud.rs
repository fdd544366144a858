//! The cloud ingest end to end: devices → gateway → Mosquitto (mutual TLS 1.3) →
//! `cloud::run` with a real key store, replay state and JSON Lines sink. Receipts go
//! back down through the gateway.

mod common;

use std::path::Path;
use std::time::Duration;

use blindgate::cloud::sink::SinkLine;
use blindgate::cloud::{CloudMetrics, CloudRejection, CloudSettings};
use blindgate::gateway::Gateway;
use blindgate::keys::KeyStore;
use blindgate::pki::DevPki;
use common::mosquitto::{Mosquitto, TlsMode, require_mosquitto, start_cloud_broker};
use common::proxy::Proxy;
use rumqttc::{Event, EventLoop, Packet, QoS};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

struct Cloud {
    dir: tempfile::TempDir,
    pki: DevPki,
    broker: Mosquitto,
    link: Proxy,
    keys: KeyStore,
    metrics: CloudMetrics,
    stop: CancellationToken,
    /// The ingest task: it has let go of its files once this ends.
    ingest: Option<tokio::task::JoinHandle<()>>,
}

fn settings(dir: &Path, pki: &DevPki, port: u16) -> CloudSettings {
    CloudSettings::local(dir, pki, port, "ingest-1").expect("ingest settings")
}

impl Cloud {
    async fn start(devices: &[&str]) -> Option<Self> {
        if !require_mosquitto() {
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = common::dev_pki(dir.path(), devices);
        let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
        let link = Proxy::start(([127, 0, 0, 1], broker.port).into())
            .await
            .expect("link");
        let keys = KeyStore::open(&dir.path().join("keys")).expect("key store");
        let mut cloud = Self {
            dir,
            pki,
            broker,
            link,
            keys,
            metrics: CloudMetrics::new(),
            stop: CancellationToken::new(),
            ingest: None,
        };
        cloud.run_ingest();
        assert!(
            cloud.metrics.wait_subscribed(WAIT).await,
            "ingest subscribed"
        );
        Some(cloud)
    }

    /// Starts (or restarts) the ingest; its session on the broker persists.
    fn run_ingest(&mut self) {
        let settings = settings(self.dir.path(), &self.pki, self.broker.port);
        let (metrics, stop) = (self.metrics.clone(), self.stop.clone());
        self.ingest = Some(tokio::spawn(async move {
            if let Err(err) = blindgate::cloud::run(settings, metrics, stop).await {
                eprintln!("cloud ingest ended: {err:?}");
            }
        }));
    }

    async fn gateway(&self) -> Gateway {
        Gateway::start(common::gateway_plan(
            self.dir.path(),
            &self.pki,
            self.link.port,
        ))
        .await
        .expect("gateway")
    }

    fn sink(&self) -> Vec<SinkLine> {
        std::fs::read_to_string(self.dir.path().join("messages.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("sink line parses"))
            .collect()
    }

    async fn wait_sink(&self, n: usize) -> Vec<SinkLine> {
        tokio::time::timeout(WAIT, async {
            loop {
                let lines = self.sink();
                if lines.len() >= n {
                    return lines;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the sink holds {} of {n} messages after {WAIT:?}",
                self.sink().len()
            )
        })
    }
}

/// A device connected to the gateway and subscribed to its downlink topic.
async fn device(cloud: &Cloud, gateway: &Gateway, id: &str) -> (rumqttc::AsyncClient, EventLoop) {
    let paths = &cloud
        .pki
        .devices
        .iter()
        .find(|(d, _)| d == id)
        .expect("device")
        .1;
    let tls = common::client_tls(&cloud.pki.device_ca.cert, &paths.cert, &paths.key);
    let (client, mut eventloop) = common::mqtt_client(id, gateway.device_addr().port(), tls);
    client
        .subscribe(format!("e3/{id}/down"), QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        if let Ok(Event::Incoming(Packet::SubAck(_))) = eventloop.poll().await {
            break;
        }
    }
    (client, eventloop)
}

/// Publishes and collects downlink envelopes until `n` arrived.
async fn publish_and_collect(
    client: &rumqttc::AsyncClient,
    eventloop: &mut EventLoop,
    id: &str,
    envelopes: &[Vec<u8>],
    n: usize,
) -> Vec<Vec<u8>> {
    for envelope in envelopes {
        client
            .publish(
                format!("e3/{id}/up"),
                QoS::AtLeastOnce,
                false,
                envelope.clone(),
            )
            .await
            .expect("publish");
    }
    let mut down = Vec::new();
    tokio::time::timeout(WAIT, async {
        while down.len() < n {
            if let Ok(Event::Incoming(Packet::Publish(p))) = eventloop.poll().await {
                down.push(p.payload.to_vec());
            }
        }
    })
    .await
    .expect("downlink arrived");
    down
}

fn receipt_seqs(key: &e3::DeviceKey, envelopes: &[Vec<u8>]) -> Vec<u64> {
    let mut seqs = Vec::new();
    for envelope in envelopes {
        let (header, plaintext) = key
            .open(envelope)
            .expect("receipt opens with the device key");
        assert_eq!(header.kind(), e3::Kind::Receipt);
        seqs.extend(
            e3::decode_receipt(&plaintext)
                .expect("valid receipt")
                .map(|e| e.seq),
        );
    }
    seqs.sort_unstable();
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_arrives_intact_and_the_device_gets_an_authenticated_receipt() {
    let Some(cloud) = Cloud::start(&["pump-17"]).await else {
        return;
    };
    let key = cloud
        .keys
        .provision("pump-17", e3::Suite::ChaCha20Poly1305)
        .expect("provision");
    let gateway = cloud.gateway().await;
    let (client, mut eventloop) = device(&cloud, &gateway, "pump-17").await;
    let reading = br#"{"device_id":"pump-17","ts_ms":1,"readings":[{"type":"temperature","value":21.5,"unit":"C"}]}"#;
    let envelope = key.seal(e3::Kind::Uplink, 1, reading).expect("seal");
    let down = publish_and_collect(&client, &mut eventloop, "pump-17", &[envelope], 1).await;
    let lines = cloud.wait_sink(1).await;
    assert_eq!(lines[0].device, "pump-17");
    assert_eq!(lines[0].gateway, "gw-1");
    assert_eq!(lines[0].seq, 1);
    let expected: serde_json::Value = serde_json::from_slice(reading).expect("json");
    assert_eq!(lines[0].json.as_ref(), Some(&expected));
    assert_eq!(receipt_seqs(&key, &down), vec![1]);
    gateway.stop().await;
    cloud.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_envelope_is_stored_once_counted_and_receipted_again() {
    let Some(cloud) = Cloud::start(&["pump-17"]).await else {
        return;
    };
    let key = cloud
        .keys
        .provision("pump-17", e3::Suite::Aes256Gcm)
        .expect("provision");
    let gateway = cloud.gateway().await;
    let (client, mut eventloop) = device(&cloud, &gateway, "pump-17").await;
    let envelope = key.seal(e3::Kind::Uplink, 7, b"{\"v\":1}").expect("seal");
    let down = publish_and_collect(
        &client,
        &mut eventloop,
        "pump-17",
        std::slice::from_ref(&envelope),
        1,
    )
    .await;
    let again = publish_and_collect(&client, &mut eventloop, "pump-17", &[envelope], 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cloud.sink().len(), 1, "stored once");
    assert_eq!(cloud.metrics.rejected(CloudRejection::Duplicate), 1);
    assert_eq!(receipt_seqs(&key, &down), vec![7]);
    assert_eq!(
        receipt_seqs(&key, &again),
        vec![7],
        "the repeat is receipted too"
    );
    gateway.stop().await;
    cloud.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_rotate_queued_old_key_messages_still_open_and_after_shred_they_do_not() {
    let Some(cloud) = Cloud::start(&["pump-17", "meter-9"]).await else {
        return;
    };
    let pump = cloud
        .keys
        .provision("pump-17", e3::Suite::ChaCha20Poly1305)
        .expect("provision");
    let meter = cloud
        .keys
        .provision("meter-9", e3::Suite::ChaCha20Poly1305)
        .expect("provision");
    let gateway = cloud.gateway().await;
    cloud.link.cut();
    // Sealed with key 1 and queued in the gateway during the outage.
    let (pump_client, mut pump_loop) = device(&cloud, &gateway, "pump-17").await;
    let (meter_client, mut meter_loop) = device(&cloud, &gateway, "meter-9").await;
    for seq in 1..=3 {
        let e = pump
            .seal(e3::Kind::Uplink, seq, b"{\"old\":true}")
            .expect("seal");
        pump_client
            .publish("e3/pump-17/up", QoS::AtLeastOnce, false, e)
            .await
            .expect("publish");
        let e = meter
            .seal(e3::Kind::Uplink, seq, b"{\"old\":true}")
            .expect("seal");
        meter_client
            .publish("e3/meter-9/up", QoS::AtLeastOnce, false, e)
            .await
            .expect("publish");
    }
    tokio::time::timeout(WAIT, async {
        while gateway.queue().stats().total.records < 6 {
            let _ = tokio::time::timeout(Duration::from_millis(20), pump_loop.poll()).await;
            let _ = tokio::time::timeout(Duration::from_millis(20), meter_loop.poll()).await;
        }
    })
    .await
    .expect("queued during the outage");
    let now = blindgate_now_ms();
    let rotation = cloud
        .keys
        .rotate("pump-17", Duration::from_secs(3600), now)
        .expect("rotate");
    assert_eq!(rotation.new.key_id(), 2);
    cloud.keys.shred("meter-9", now).expect("shred");
    cloud.link.restore();

    let lines = cloud.wait_sink(3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lines = if cloud.sink().len() > lines.len() {
        cloud.sink()
    } else {
        lines
    };
    assert!(
        lines.iter().all(|l| l.device == "pump-17" && l.key_id == 1),
        "{lines:?}"
    );
    assert_eq!(
        lines.len(),
        3,
        "pump-17's old-key messages open within the grace period"
    );
    assert_eq!(
        cloud.metrics.rejected(CloudRejection::Shredded),
        3,
        "meter-9's cannot be opened"
    );
    gateway.stop().await;
    cloud.stop.cancel();
}

fn blindgate_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_through_a_gateway_not_allowed_to_carry_the_device_is_refused() {
    let Some(cloud) = Cloud::start(&["pump-17"]).await else {
        return;
    };
    let key = cloud
        .keys
        .provision("pump-17", e3::Suite::ChaCha20Poly1305)
        .expect("provision");
    // A second ingest with a registry that lets only gw-2 carry pump-17.
    let registry = blindgate::cloud::registry::Registry::parse(
        "[[tenant]]\nname = 't'\ngateways = ['gw-2']\ndevices = ['pump-17']\n",
        Path::new("registry.toml"),
    )
    .expect("registry");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut strict = settings(dir.path(), &cloud.pki, cloud.broker.port);
    strict.keys_dir = cloud.dir.path().join("keys");
    strict.client_id = "ingest-strict".into();
    strict.registry = Some(registry);
    let metrics = CloudMetrics::new();
    let stop = CancellationToken::new();
    tokio::spawn(blindgate::cloud::run(strict, metrics.clone(), stop.clone()));
    assert!(
        metrics.wait_subscribed(WAIT).await,
        "strict ingest subscribed"
    );

    let gateway = cloud.gateway().await; // gw-1
    let (client, mut eventloop) = device(&cloud, &gateway, "pump-17").await;
    let envelope = key.seal(e3::Kind::Uplink, 1, b"{}").expect("seal");
    publish_and_collect(&client, &mut eventloop, "pump-17", &[envelope], 1).await;
    tokio::time::timeout(WAIT, async {
        while metrics.rejected(CloudRejection::NotAllowed) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the strict ingest refused it");
    assert!(
        !dir.path().join("messages.jsonl").exists()
            || std::fs::read_to_string(dir.path().join("messages.jsonl"))
                .expect("read")
                .is_empty()
    );
    stop.cancel();
    gateway.stop().await;
    cloud.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_from_the_cloud_reaches_and_opens_on_the_device() {
    let Some(cloud) = Cloud::start(&["pump-17"]).await else {
        return;
    };
    let key = cloud
        .keys
        .provision("pump-17", e3::Suite::Aes256Gcm)
        .expect("provision");
    let gateway = cloud.gateway().await;
    let (_client, mut eventloop) = device(&cloud, &gateway, "pump-17").await;
    common::wait_uplink_connected(&gateway).await;
    let (seq, envelope) = blindgate::cloud::commands::seal_command(
        &cloud.keys,
        "pump-17",
        br#"{"cmd":"open-valve"}"#,
    )
    .expect("sealed");
    let s = settings(cloud.dir.path(), &cloud.pki, cloud.broker.port);
    blindgate::cloud::commands::publish_once(
        &s.broker,
        s.tls,
        "cmd-1",
        "gw/gw-1/e3/pump-17/down".into(),
        envelope,
        WAIT,
    )
    .await
    .expect("broker took it");
    let publish = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = eventloop.poll().await {
                return p;
            }
        }
    })
    .await
    .expect("command arrived");
    let (header, plaintext) = key
        .open(&publish.payload)
        .expect("opens with the device key");
    assert_eq!(header.kind(), e3::Kind::Command);
    assert_eq!(header.seq(), seq);
    assert_eq!(plaintext, br#"{"cmd":"open-valve"}"#);
    gateway.stop().await;
    cloud.stop.cancel();
}

#[test]
fn the_example_cloud_config_works_with_the_output_of_certs_dev() {
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(root.path().join("config")).expect("dir");
    for name in ["cloud.toml", "registry.toml"] {
        let from = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name);
        std::fs::copy(from, root.path().join("config").join(name)).expect("copy");
    }
    // The installed layout: certificates in certs/ beside the config.
    blindgate::pki::generate_dev_pki(&blindgate::pki::DevPkiOptions {
        out_dir: root.path().join("config/certs"),
        ..Default::default()
    })
    .expect("dev PKI");
    let config =
        blindgate::cloud::config::load(&root.path().join("config/cloud.toml")).expect("loads");
    assert_eq!(config.settings.subscription, "gw/+/e3/+/up");
    assert_eq!(config.rotation.interval, Duration::from_secs(24 * 3600));
    assert!(config.settings.registry.is_some());
}

/// A clean stop of the ingest acknowledges everything it stored before it goes: the
/// broker then has nothing stored to deliver again, so a restarted ingest sees no
/// duplicate. (The ingest used to abort its event loop right after queuing the last
/// acks; the broker redelivered those messages and the restart counted them as
/// duplicates.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_acknowledges_everything_stored_so_a_restart_sees_no_duplicate() {
    const N: u64 = 600;
    let Some(mut cloud) = Cloud::start(&["pump-17"]).await else {
        return;
    };
    let key = cloud
        .keys
        .provision("pump-17", e3::Suite::ChaCha20Poly1305)
        .expect("provision");
    let gateway = cloud.gateway().await;
    let (client, mut eventloop) = device(&cloud, &gateway, "pump-17").await;
    // The device's session is polled (PUBACKs, receipts) until the test ends.
    let session = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    tokio::spawn(async move {
        for seq in 1..=N {
            let envelope = key.seal(e3::Kind::Uplink, seq, b"{}").expect("seal");
            client
                .publish("e3/pump-17/up", QoS::AtLeastOnce, false, envelope)
                .await
                .expect("publish");
        }
    });
    // Stop in the middle of the stream, while batches are being committed and acked.
    let stored_before = cloud.wait_sink(50).await.len();
    cloud.stop.cancel();
    // Stopped means the task ended: it holds its state files (the replay database's
    // lock) until then, and a restart before that could not open them.
    let first = cloud.ingest.take().expect("the ingest runs");
    tokio::time::timeout(WAIT, first)
        .await
        .expect("the ingest stopped")
        .expect("the ingest task");
    assert_eq!(cloud.metrics.subscribed.get(), 0);
    let stored_at_stop = cloud.sink().len();
    assert!(stored_at_stop >= stored_before);

    let restart = CancellationToken::new();
    let metrics = CloudMetrics::new();
    tokio::spawn(blindgate::cloud::run(
        settings(cloud.dir.path(), &cloud.pki, cloud.broker.port),
        metrics.clone(),
        restart.clone(),
    ));
    let lines = cloud.wait_sink(N as usize).await;
    let mut seqs: Vec<u64> = lines.iter().map(|l| l.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), lines.len(), "nothing stored twice");
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>(), "everything stored");
    let duplicates = metrics.rejected(CloudRejection::Duplicate);
    eprintln!(
        "clean stop after {stored_at_stop} of {N} stored; duplicates after the restart: {duplicates}"
    );
    assert_eq!(
        duplicates, 0,
        "the broker redelivered messages the stopped ingest had stored (acks lost at the stop)"
    );
    session.abort();
    gateway.stop().await;
    restart.cancel();
}
