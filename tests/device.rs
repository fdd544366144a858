//! Simulated devices end to end: `run_device` → the real gateway (in-process, real sled
//! queue) → a real Mosquitto cloud broker → a stand-in cloud ingest played by the test.
//! The stand-in opens uplinks with the device keys, applies the replay rule (one copy
//! per seq), and publishes receipts and commands on the downlink topic, as the real
//! cloud ingest will.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blindgate::device::{
    COMPRESSED_MAGIC, DeviceConfig, DeviceReport, IMAGE_CHUNK_HEADER, IMAGE_MAGIC, PayloadKind,
    SEQ_BLOCK, outbox_len, run_device,
};
use blindgate::gateway::Gateway;
use blindgate::pki::DevPki;
use common::cloud_subscriber::CloudSubscriber;
use common::mosquitto::{Mosquitto, TlsMode, require_mosquitto, start_cloud_broker};
use e3::{DeviceKey, Header, Kind, ReceiptEntry, ReplayWindow, Verdict};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
/// How often the stand-in cloud looks at what the broker delivered.
const CLOUD_TICK: Duration = Duration::from_millis(20);

/// One uplink the stand-in cloud accepted.
#[derive(Debug, Clone)]
struct Delivered {
    device: String,
    key_id: u32,
    seq: u64,
    envelope: Vec<u8>,
    plaintext: Vec<u8>,
}

/// What the stand-in cloud knows and has seen.
#[derive(Default)]
struct CloudState {
    keys: HashMap<(String, u32), DeviceKey>,
    /// The key id downlink is sealed with, per device.
    current: HashMap<String, u32>,
    uplink_replay: HashMap<String, ReplayWindow>,
    /// The cloud-to-device seq counter, shared by commands and receipts.
    down_seq: HashMap<String, u64>,
    /// Fresh uplinks, in arrival order.
    delivered: Vec<Delivered>,
    /// Every uplink envelope as it arrived, duplicates included.
    arrived: Vec<(String, Vec<u8>)>,
    duplicates: u64,
    /// Answer each uplink (fresh or duplicate) with a receipt.
    receipts: bool,
}

impl CloudState {
    fn delivered(&self, device: &str) -> Vec<Delivered> {
        self.delivered
            .iter()
            .filter(|d| d.device == device)
            .cloned()
            .collect()
    }

    /// Opens one uplink; returns the receipt entry it deserves (fresh or duplicate).
    fn accept(&mut self, envelope: &[u8]) -> Option<(String, ReceiptEntry)> {
        let header = Header::parse(envelope).expect("the gateway forwards valid headers");
        let device = header.device_id().to_owned();
        self.arrived.push((device.clone(), envelope.to_vec()));
        let key = self.keys.get(&(device.clone(), header.key_id()))?;
        let (header, plaintext) = key
            .open(envelope)
            .expect("uplink opens with the device key");
        let entry = ReceiptEntry {
            key_id: header.key_id(),
            seq: header.seq(),
        };
        match self
            .uplink_replay
            .entry(device.clone())
            .or_default()
            .accept(entry.seq)
        {
            Verdict::Fresh => self.delivered.push(Delivered {
                device: device.clone(),
                key_id: entry.key_id,
                seq: entry.seq,
                envelope: envelope.to_vec(),
                plaintext,
            }),
            Verdict::Duplicate | Verdict::Stale => self.duplicates += 1,
        }
        self.receipts.then_some((device, entry))
    }

    /// Seals a downlink message for `device` with its current key and the next seq.
    fn seal_down(&mut self, device: &str, kind: Kind, plaintext: &[u8]) -> Vec<u8> {
        let seq = self.down_seq.entry(device.to_owned()).or_default();
        *seq += 1;
        let key_id = self.current[device];
        self.keys[&(device.to_owned(), key_id)]
            .seal(kind, *seq, plaintext)
            .expect("seal")
    }
}

/// The stand-in cloud ingest: a task reads what the cloud broker delivered and answers
/// with receipts; the test sends commands.
struct Cloud {
    subscriber: Arc<CloudSubscriber>,
    state: Arc<Mutex<CloudState>>,
    task: JoinHandle<()>,
}

impl Cloud {
    fn start(subscriber: CloudSubscriber) -> Self {
        let subscriber = Arc::new(subscriber);
        let state = Arc::new(Mutex::new(CloudState {
            receipts: true,
            ..CloudState::default()
        }));
        let task = tokio::spawn(ingest(Arc::clone(&subscriber), Arc::clone(&state)));
        Self {
            subscriber,
            state,
            task,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CloudState> {
        self.state.lock().expect("cloud state lock")
    }

    fn add_key(&self, key: DeviceKey, current: bool) {
        let device = key.device_id().to_string();
        let mut state = self.state();
        if current || !state.current.contains_key(&device) {
            state.current.insert(device.clone(), key.key_id());
        }
        state.keys.insert((device, key.key_id()), key);
    }

    fn set_current(&self, device: &str, key_id: u32) {
        self.state().current.insert(device.to_owned(), key_id);
    }

    fn set_receipts(&self, on: bool) {
        self.state().receipts = on;
    }

    fn delivered(&self, device: &str) -> Vec<Delivered> {
        self.state().delivered(device)
    }

    /// Waits until `done` holds for the cloud's state; panics after [`WAIT`].
    async fn wait_until(&self, what: &str, done: impl Fn(&CloudState) -> bool) {
        let waited = tokio::time::timeout(WAIT, async {
            while !done(&self.state()) {
                tokio::time::sleep(CLOUD_TICK).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "cloud: {what} did not happen within {WAIT:?}"
        );
    }

    /// Seals `plaintext` as a command to `device` and publishes it; returns the envelope.
    async fn command(&self, device: &str, plaintext: &[u8]) -> Vec<u8> {
        let envelope = self.state().seal_down(device, Kind::Command, plaintext);
        self.publish_down(device, envelope.clone()).await;
        envelope
    }

    /// A receipt naming every uplink of `device` delivered so far.
    async fn receipt_for_delivered(&self, device: &str) {
        let envelope = {
            let mut state = self.state();
            let entries: Vec<ReceiptEntry> = state
                .delivered(device)
                .iter()
                .map(|d| ReceiptEntry {
                    key_id: d.key_id,
                    seq: d.seq,
                })
                .collect();
            let plaintext = e3::encode_receipt_vec(&entries).expect("receipt");
            state.seal_down(device, Kind::Receipt, &plaintext)
        };
        self.publish_down(device, envelope).await;
    }

    async fn publish_down(&self, device: &str, envelope: Vec<u8>) {
        self.subscriber
            .publish(&format!("gw/gw-1/e3/{device}/down"), envelope)
            .await;
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The stand-in cloud's loop: accept new uplinks, then answer them with receipts (one
/// receipt per device per round, at most 256 entries each).
async fn ingest(subscriber: Arc<CloudSubscriber>, state: Arc<Mutex<CloudState>>) {
    let mut seen = 0;
    loop {
        let received = subscriber.received();
        let mut answers: BTreeMap<String, Vec<ReceiptEntry>> = BTreeMap::new();
        let receipts = {
            let mut state = state.lock().expect("cloud state lock");
            for (_, envelope) in received.iter().skip(seen) {
                if let Some((device, entry)) = state.accept(envelope) {
                    answers.entry(device).or_default().push(entry);
                }
            }
            seen = received.len();
            let mut receipts = Vec::new();
            for (device, entries) in answers {
                for batch in entries.chunks(256) {
                    let plaintext = e3::encode_receipt_vec(batch).expect("receipt");
                    receipts.push((
                        device.clone(),
                        state.seal_down(&device, Kind::Receipt, &plaintext),
                    ));
                }
            }
            receipts
        };
        for (device, envelope) in receipts {
            subscriber
                .publish(&format!("gw/gw-1/e3/{device}/down"), envelope)
                .await;
        }
        tokio::time::sleep(CLOUD_TICK).await;
    }
}

struct World {
    dir: tempfile::TempDir,
    pki: DevPki,
    _broker: Mosquitto,
    gateway: Gateway,
    cloud: Cloud,
}

/// Mosquitto, the gateway (envelopes up to `max_envelope`), the stand-in cloud, and an
/// initial key file (key id 1, known to the cloud) per device.
async fn world(devices: &[&str], max_envelope: usize) -> Option<World> {
    if !require_mosquitto() {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), devices);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let subscriber = CloudSubscriber::connect(broker.port, &pki, "ingest-1", "gw/+/e3/+/up").await;
    let mut plan = common::gateway_plan(dir.path(), &pki, broker.port);
    plan.ingress.max_envelope = max_envelope;
    plan.ingress.max_packet = max_envelope + 1024;
    plan.uplink.max_envelope = max_envelope;
    let gateway = Gateway::start(plan).await.expect("gateway starts");
    let cloud = Cloud::start(subscriber);
    std::fs::create_dir_all(dir.path().join("keys")).expect("keys dir");
    for device in devices {
        let key = common::device_key(device, 1);
        let path = dir.path().join("keys").join(format!("{device}.key"));
        e3::write_key_file(&path, &key, false).expect("key file");
        cloud.add_key(key, true);
    }
    Some(World {
        dir,
        pki,
        _broker: broker,
        gateway,
        cloud,
    })
}

impl World {
    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `device` with its dev PKI certificate and key file, 50 messages per second, and a
    /// resend timeout long enough not to fire unless a test shortens it.
    fn device(&self, device: &str) -> DeviceConfig {
        let (_, paths) = self
            .pki
            .devices
            .iter()
            .find(|(id, _)| id == device)
            .expect("device in PKI");
        let mut config = DeviceConfig::new(
            device,
            paths.cert.clone(),
            paths.key.clone(),
            self.pki.device_ca.cert.clone(),
            self.dir.path().join("keys").join(format!("{device}.key")),
            self.gateway.device_addr(),
            self.state_dir(),
        );
        config.rate_per_sec = 50.0;
        config.resend_after = Duration::from_secs(60);
        config
    }
}

/// Runs a device that has a `count` to completion.
async fn run_to_completion(config: DeviceConfig) -> DeviceReport {
    tokio::time::timeout(WAIT, run_device(config, CancellationToken::new()))
        .await
        .expect("the device finishes: all its messages receipted")
        .expect("the device runs without error")
}

/// Starts a device in the background; cancel `stop` to end it.
fn spawn_device(
    config: DeviceConfig,
    stop: &CancellationToken,
) -> JoinHandle<Result<DeviceReport, blindgate::device::DeviceError>> {
    tokio::spawn(run_device(config, stop.clone()))
}

async fn report_of(
    run: JoinHandle<Result<DeviceReport, blindgate::device::DeviceError>>,
) -> DeviceReport {
    tokio::time::timeout(WAIT, run)
        .await
        .expect("the device stops")
        .expect("the device task does not panic")
        .expect("the device runs without error")
}

fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    u64::try_from(since.as_millis()).expect("ms fit u64")
}

/// Checks a reading against docs/PAYLOADS.md.
fn assert_reading(json: &[u8], device: &str) {
    let reading: serde_json::Value = serde_json::from_slice(json).expect("a reading is JSON");
    assert_eq!(reading["device_id"], device);
    let ts_ms = reading["ts_ms"].as_u64().expect("ts_ms is a number");
    assert!(
        ts_ms.abs_diff(now_ms()) < 60_000,
        "ts_ms is the device clock"
    );
    let values = reading["readings"]
        .as_array()
        .expect("readings is an array");
    assert!(!values.is_empty());
    for value in values {
        assert!(value["type"].is_string(), "{value}");
        assert!(value["value"].is_number(), "{value}");
        assert!(value["unit"].is_string(), "{value}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_reach_the_cloud_as_json_and_receipts_empty_the_outbox() {
    let Some(world) = world(&["pump-17"], 4096).await else {
        return;
    };
    let mut config = world.device("pump-17");
    config.count = Some(5);
    let report = run_to_completion(config).await;
    assert_eq!(report.sent, 5);
    assert_eq!(report.receipted, 5);
    assert_eq!(report.outbox_left, 0);
    assert_eq!(
        outbox_len(&world.state_dir(), "pump-17").expect("outbox"),
        0
    );
    let delivered = world.cloud.delivered("pump-17");
    let seqs: Vec<u64> = delivered.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    for uplink in &delivered {
        assert_eq!(uplink.key_id, 1);
        assert_reading(&uplink.plaintext, "pump-17");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_without_a_receipt_resends_the_same_bytes_and_the_cloud_keeps_one_copy() {
    let Some(world) = world(&["meter-9"], 4096).await else {
        return;
    };
    world.cloud.set_receipts(false);
    let mut config = world.device("meter-9");
    config.count = Some(1);
    config.resend_after = Duration::from_millis(300);
    let stop = CancellationToken::new();
    let run = spawn_device(config, &stop);
    world
        .cloud
        .wait_until("a second copy of the uplink", |s| s.arrived.len() >= 2)
        .await;
    let arrived = world.cloud.state().arrived.clone();
    assert_eq!(
        arrived[0].1, arrived[1].1,
        "a resend is the exact sealed bytes"
    );
    world.cloud.set_receipts(true);
    let report = report_of(run).await;
    assert_eq!(report.sent, 1);
    assert!(report.resent >= 1, "{report:?}");
    assert_eq!(report.receipted, 1);
    assert_eq!(report.outbox_left, 0);
    let state = world.cloud.state();
    assert_eq!(
        state.delivered("meter-9").len(),
        1,
        "the cloud keeps one copy"
    );
    assert!(state.duplicates >= 1, "later copies are duplicates by seq");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_device_resends_its_outbox_and_never_reuses_a_seq() {
    let Some(world) = world(&["pump-17"], 4096).await else {
        return;
    };
    world.cloud.set_receipts(false);
    let mut config = world.device("pump-17");
    config.count = Some(3);
    let stop = CancellationToken::new();
    let first = spawn_device(config.clone(), &stop);
    world
        .cloud
        .wait_until("three uplinks", |s| s.delivered("pump-17").len() >= 3)
        .await;
    stop.cancel();
    let report = report_of(first).await;
    assert_eq!((report.sent, report.outbox_left), (3, 3));
    assert_eq!(
        outbox_len(&world.state_dir(), "pump-17").expect("outbox"),
        3
    );

    world.cloud.set_receipts(true);
    config.count = Some(2);
    let report = run_to_completion(config).await;
    assert_eq!(report.sent, 2);
    assert!(
        report.resent >= 3,
        "the old outbox is sent again: {report:?}"
    );
    assert_eq!(report.receipted, 5);
    assert_eq!(
        outbox_len(&world.state_dir(), "pump-17").expect("outbox"),
        0
    );
    let seqs: Vec<u64> = world
        .cloud
        .delivered("pump-17")
        .iter()
        .map(|d| d.seq)
        .collect();
    assert_eq!(seqs[..3], [1, 2, 3]);
    assert_eq!(
        seqs[3..],
        [SEQ_BLOCK + 1, SEQ_BLOCK + 2],
        "the restart continues after the reserved block"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekey_command_switches_the_key_for_later_uplinks() {
    let Some(world) = world(&["cam-1"], 4096).await else {
        return;
    };
    let stop = CancellationToken::new();
    let mut config = world.device("cam-1");
    config.rate_per_sec = 20.0;
    let run = spawn_device(config, &stop);
    world
        .cloud
        .wait_until("two uplinks", |s| s.delivered("cam-1").len() >= 2)
        .await;
    let new_key = common::device_key("cam-1", 2);
    let command = serde_json::json!({
        "cmd": "rekey",
        "key_id": 2,
        "suite": new_key.suite().as_str(),
        "key": hex::encode(new_key.secret_bytes()),
    });
    let copy = DeviceKey::new(
        new_key.device_id().clone(),
        2,
        new_key.suite(),
        *new_key.secret_bytes(),
    );
    world.cloud.add_key(copy, false);
    // Sealed with the current key 1; receipts after it with key 2.
    world
        .cloud
        .command("cam-1", command.to_string().as_bytes())
        .await;
    world.cloud.set_current("cam-1", 2);
    world
        .cloud
        .wait_until("an uplink sealed with key 2", |s| {
            s.delivered("cam-1").iter().any(|d| d.key_id == 2)
        })
        .await;
    stop.cancel();
    let report = report_of(run).await;
    assert_eq!((report.commands, report.rekeys), (1, 1));
    assert_eq!(report.downlink_invalid, 0, "receipts with either key open");
    let mut delivered = world.cloud.delivered("cam-1");
    delivered.sort_by_key(|d| d.seq);
    let key_ids: Vec<u32> = delivered.iter().map(|d| d.key_id).collect();
    assert!(
        key_ids.is_sorted(),
        "never back to the old key: {key_ids:?}"
    );
    let keys = world.state_dir().join("cam-1/keys");
    assert!(keys.join("1.key").exists(), "the old key is kept");
    let mode = std::fs::metadata(keys.join("2.key"))
        .expect("the new key is stored")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_command_is_rejected_once_and_again_after_a_restart() {
    let Some(world) = world(&["meter-9"], 4096).await else {
        return;
    };
    world.cloud.set_receipts(false);
    let mut config = world.device("meter-9");
    config.count = Some(1);
    let stop = CancellationToken::new();
    let first = spawn_device(config.clone(), &stop);
    world
        .cloud
        .wait_until("an uplink", |s| !s.delivered("meter-9").is_empty())
        .await;
    let command = world
        .cloud
        .command("meter-9", br#"{"cmd": "reboot", "delay_s": 5}"#)
        .await;
    world.cloud.publish_down("meter-9", command.clone()).await;
    // Downlink reaches the device in order: the receipt that ends the run comes last.
    world.cloud.receipt_for_delivered("meter-9").await;
    let report = report_of(first).await;
    assert_eq!((report.commands, report.replays_rejected), (1, 1));

    let second = spawn_device(config, &stop);
    world
        .cloud
        .wait_until("a second uplink", |s| s.delivered("meter-9").len() >= 2)
        .await;
    world.cloud.publish_down("meter-9", command).await;
    world.cloud.receipt_for_delivered("meter-9").await;
    let report = report_of(second).await;
    assert_eq!(
        (report.commands, report.replays_rejected),
        (0, 1),
        "the replay window survived the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_arrives_in_chunks_that_reassemble_to_its_sha256() {
    const MAX_ENVELOPE: usize = 16384;
    const SIZE: usize = 300_000;
    let Some(world) = world(&["cam-1"], MAX_ENVELOPE).await else {
        return;
    };
    let mut config = world.device("cam-1");
    config.payload = PayloadKind::Images {
        size: SIZE,
        every: 1,
    };
    config.max_envelope = MAX_ENVELOPE;
    config.count = Some(1);
    let report = run_to_completion(config).await;
    let delivered = world.cloud.delivered("cam-1");
    assert_eq!(report.sent, delivered.len() as u64);
    assert!(
        delivered.len() > SIZE / MAX_ENVELOPE,
        "{} chunks",
        delivered.len()
    );
    let mut chunks = BTreeMap::new();
    let mut header = None;
    for uplink in &delivered {
        assert!(uplink.envelope.len() <= MAX_ENVELOPE);
        let chunk = &uplink.plaintext;
        assert_eq!(chunk[..6], *IMAGE_MAGIC);
        let index = u32::from_be_bytes(chunk[14..18].try_into().expect("4 bytes"));
        // Image id, chunk count, total length and SHA-256 are the same in every chunk.
        let common = (
            chunk[6..14].to_vec(),
            chunk[18..IMAGE_CHUNK_HEADER].to_vec(),
        );
        assert_eq!(header.get_or_insert_with(|| common.clone()), &common);
        chunks.insert(index, chunk[IMAGE_CHUNK_HEADER..].to_vec());
    }
    let (_, rest) = header.expect("at least one chunk");
    let count = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes"));
    let total = u64::from_be_bytes(rest[4..12].try_into().expect("8 bytes"));
    assert_eq!(chunks.len(), count as usize);
    assert_eq!(
        chunks.keys().copied().collect::<Vec<_>>(),
        (0..count).collect::<Vec<_>>()
    );
    let image: Vec<u8> = chunks.into_values().flatten().collect();
    assert_eq!(image.len() as u64, total);
    assert_eq!(image.len(), SIZE);
    assert_eq!(image[..2], [0xFF, 0xD8]);
    assert_eq!(image[SIZE - 2..], [0xFF, 0xD9]);
    let sha256 = ring::digest::digest(&ring::digest::SHA256, &image);
    assert_eq!(sha256.as_ref(), &rest[12..44]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_readings_inflate_to_the_json() {
    let Some(world) = world(&["pump-17"], 4096).await else {
        return;
    };
    let mut config = world.device("pump-17");
    config.compress = true;
    config.count = Some(3);
    let report = run_to_completion(config).await;
    assert_eq!(report.receipted, 3);
    let delivered = world.cloud.delivered("pump-17");
    assert_eq!(delivered.len(), 3);
    for uplink in delivered {
        let packed = uplink.plaintext;
        assert_eq!(packed[..4], *COMPRESSED_MAGIC);
        let mut json = Vec::new();
        flate2::read::DeflateDecoder::new(&packed[4..])
            .read_to_end(&mut json)
            .expect("raw DEFLATE");
        assert_reading(&json, "pump-17");
    }
}
