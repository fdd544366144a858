//! Replay at the cloud, with real envelopes: a device seals them with the key the
//! cloud's key store provisioned, the gateway forwards them to a real Mosquitto, and
//! an eavesdropper on the broker captures the exact bytes. Those captured envelopes
//! are then delivered to the real ingest again, reordered, repeated and too old, and
//! the sink (the log of record) must hold each accepted one exactly once:
//!
//! - duplicates are refused (and counted), in the same run and after a restart;
//! - reordered ones inside the window (E3-SPEC: no more than 65536 below the highest
//!   accepted seq) are accepted once; one 65536 below is still accepted, one 65537
//!   below is stale;
//! - the replay state survives a clean restart of `cloud::run` and a kill -9 of the
//!   real `blindgate cloud run` in the middle of a stream (the broker redelivers what
//!   was not acknowledged; the repeats come out as duplicates, nothing twice).
//!
//! Time: E3-SPEC's replay rule has no clock in it (the header carries no timestamp;
//! the window is counted in seqs). The only time rule on the cloud's side is the key
//! store's grace period for a rotated key. The last test drives the same `Ingest`
//! that `cloud::run` drives with a simulated clock (`Ingest::process` takes the time):
//! a message delivered days later is accepted once and its duplicate refused, even
//! months later and after a restart; what expires is only an old key after its grace.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blindgate::cloud::images::ImageStore;
use blindgate::cloud::ingest::{Ingest, Outcome, Sink};
use blindgate::cloud::replay::ReplayStore;
use blindgate::cloud::sink::{JsonlSink, SinkLine};
use blindgate::cloud::{CloudMetrics, CloudRejection, CloudSettings};
use blindgate::gateway::Gateway;
use blindgate::keys::KeyStore;
use blindgate::pki::DevPki;
use blindgate::topics::GatewayTemplate;
use common::cloud_subscriber::CloudSubscriber;
use common::mosquitto::{Mosquitto, TlsMode, require_mosquitto, start_cloud_broker};
use rumqttc::{Event, Packet, QoS};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const DEVICE: &str = "pump-17";
const TOPIC: &str = "gw/gw-1/e3/pump-17/up";
/// E3-SPEC: stale when more than this below the highest accepted seq.
const SPAN: u64 = 65_536;
const HIGH: u64 = 70_000;
/// The seqs of the first phases: 1..=8, the two sides of the window's edge below
/// `HIGH`, and `HIGH`.
const EDGE_IN: u64 = HIGH - SPAN;
const EDGE_OUT: u64 = HIGH - SPAN - 1;
/// The stream the real binary is killed in the middle of.
const STREAM: std::ops::RangeInclusive<u64> = HIGH + 1..=HIGH + 300;
/// Sent last: once it is in the sink, everything delivered before it was processed
/// (one publisher, one topic: the broker keeps the order).
const SENTINEL: u64 = HIGH + 1000;

fn all_seqs() -> Vec<u64> {
    let mut seqs: Vec<u64> = (1..=8).collect();
    seqs.extend([EDGE_OUT, EDGE_IN, HIGH]);
    seqs.extend(STREAM);
    seqs.push(SENTINEL);
    seqs
}

/// The sink's complete lines (a torn last line, from a kill, is not counted).
fn sink_lines(path: &Path) -> Vec<SinkLine> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).expect("sink line parses"))
        .collect()
}

/// How often each seq is in the sink.
fn seq_counts(path: &Path) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for line in sink_lines(path) {
        assert_eq!(line.device, DEVICE);
        *counts.entry(line.seq).or_insert(0) += 1;
    }
    counts
}

/// Waits until the sink holds as many lines as `expected` (the ingest counts an
/// envelope when it processes it, and writes its batch a moment later), then checks
/// that it holds exactly those seqs, each once.
async fn assert_each_once(path: &Path, expected: &[u64]) {
    let _ = tokio::time::timeout(WAIT, async {
        while sink_lines(path).len() < expected.len() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let counts = seq_counts(path);
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    let mut expected = expected.to_vec();
    expected.sort_unstable();
    assert_eq!(counts.keys().copied().collect::<Vec<_>>(), expected);
}

/// Everything delivered to one ingest process, as its counters say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Tally {
    accepted: u64,
    duplicate: u64,
    stale: u64,
}

impl Tally {
    fn of(metrics: &CloudMetrics) -> Self {
        Self {
            accepted: metrics.accepted.get(),
            duplicate: metrics.rejected(CloudRejection::Duplicate),
            stale: metrics.rejected(CloudRejection::Stale),
        }
    }

    /// From a `/metrics` scrape of the binary.
    fn scraped(text: &str) -> Self {
        let value = |series: &str| {
            text.lines()
                .filter_map(|l| l.rsplit_once(' '))
                .find(|(s, _)| *s == series)
                .map_or(0, |(_, v)| v.parse::<f64>().expect("number") as u64)
        };
        Self {
            accepted: value("blindgate_cloud_accepted_total"),
            duplicate: value("blindgate_cloud_rejected_total{reason=\"duplicate\"}"),
            stale: value("blindgate_cloud_rejected_total{reason=\"stale\"}"),
        }
    }

    fn total(self) -> u64 {
        self.accepted + self.duplicate + self.stale
    }
}

struct World {
    dir: tempfile::TempDir,
    pki: DevPki,
    broker: Mosquitto,
    /// Captured on the broker: seq → the exact bytes the gateway forwarded.
    captured: HashMap<u64, Vec<u8>>,
    /// Publishes captured bytes on the gateway's uplink topic, and receives what the
    /// ingest sends down to the device (receipts).
    replayer: CloudSubscriber,
    /// The device's key (from the key store), to open the receipts.
    key: e3::DeviceKey,
}

impl World {
    fn sink(&self) -> PathBuf {
        self.dir.path().join("messages.jsonl")
    }

    /// Delivers the captured envelopes of `seqs`, in that order, through the broker.
    async fn deliver(&self, seqs: &[u64]) {
        for seq in seqs {
            self.replayer
                .publish(TOPIC, self.captured[seq].clone())
                .await;
        }
    }

    /// Every seq the ingest's receipts named so far, in arrival order. Each envelope it
    /// accepted or found a duplicate is named once; stale ones are not.
    fn receipted(&self) -> Vec<u64> {
        let mut seqs = Vec::new();
        for (_, envelope) in self.replayer.received() {
            let (header, plaintext) = self.key.open(&envelope).expect("a receipt opens");
            assert_eq!(header.kind(), e3::Kind::Receipt);
            seqs.extend(
                e3::decode_receipt(&plaintext)
                    .expect("receipt")
                    .map(|e| e.seq),
            );
        }
        seqs
    }

    /// Waits until the receipts named `n` seqs in all. The ingest acknowledges a batch
    /// to the broker before it publishes the batch's receipts, on the same connection:
    /// once the receipt of the last envelope delivered is here, the broker has every
    /// PUBACK, and stopping the ingest cannot make the broker deliver any of them again.
    async fn wait_receipted(&self, n: usize) -> Vec<u64> {
        tokio::time::timeout(WAIT, async {
            loop {
                let seqs = self.receipted();
                if seqs.len() >= n {
                    return seqs;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} receipt entries; have {:?}", self.receipted()))
    }

    /// `cloud::run` in this process, with the ingest's files under the test's dir.
    async fn start_ingest(&self) -> (CloudMetrics, CancellationToken, JoinHandle<()>) {
        let settings =
            CloudSettings::local(self.dir.path(), &self.pki, self.broker.port, "ingest-1")
                .expect("ingest settings");
        let metrics = CloudMetrics::new();
        let stop = CancellationToken::new();
        let (m, s) = (metrics.clone(), stop.clone());
        let task = tokio::spawn(async move {
            blindgate::cloud::run(settings, m, s)
                .await
                .expect("ingest runs");
        });
        assert!(metrics.wait_subscribed(WAIT).await, "ingest subscribed");
        (metrics, stop, task)
    }
}

/// A device seals every seq of [`all_seqs`] with the key store's key and sends it
/// through a real gateway to Mosquitto, where an eavesdropper records the bytes. No
/// ingest is subscribed yet: nothing is consumed.
async fn capture() -> Option<World> {
    if !require_mosquitto() {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &[DEVICE]);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let keys = KeyStore::open(&dir.path().join("keys")).expect("key store");
    let key = keys
        .provision(DEVICE, e3::Suite::ChaCha20Poly1305)
        .expect("provision");
    let eavesdropper =
        CloudSubscriber::connect(broker.port, &pki, "eavesdropper", "gw/+/e3/+/up").await;

    let gateway = Gateway::start(common::gateway_plan(dir.path(), &pki, broker.port))
        .await
        .expect("gateway");
    let paths = &pki.devices[0].1;
    let tls = common::client_tls(&pki.device_ca.cert, &paths.cert, &paths.key);
    let (client, mut eventloop) = common::mqtt_client(DEVICE, gateway.device_addr().port(), tls);
    let sealed: HashMap<u64, Vec<u8>> = all_seqs()
        .into_iter()
        .map(|seq| {
            let reading = format!("{{\"device_id\":\"{DEVICE}\",\"ts_ms\":{seq},\"readings\":[{{\"type\":\"temperature\",\"value\":21.5,\"unit\":\"C\"}}]}}");
            (seq, key.seal(e3::Kind::Uplink, seq, reading.as_bytes()).expect("seal"))
        })
        .collect();
    let order = all_seqs();
    let to_send: Vec<Vec<u8>> = order.iter().map(|seq| sealed[seq].clone()).collect();
    tokio::spawn(async move {
        for envelope in to_send {
            client
                .publish(format!("e3/{DEVICE}/up"), QoS::AtLeastOnce, false, envelope)
                .await
                .expect("publish");
        }
    });
    let mut acks = 0;
    tokio::time::timeout(WAIT, async {
        while acks < order.len() {
            if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.expect("device") {
                acks += 1;
            }
        }
    })
    .await
    .expect("the gateway acknowledged every envelope");
    let received = eavesdropper.wait_for(order.len(), WAIT).await;
    gateway.stop().await;
    drop(eavesdropper);

    let mut captured = HashMap::new();
    for (topic, bytes) in received {
        assert_eq!(topic, TOPIC);
        let seq = e3::Header::parse(&bytes).expect("an E3 header").seq();
        assert_eq!(bytes, sealed[&seq], "forwarded byte for byte");
        captured.insert(seq, bytes);
    }
    assert_eq!(captured.len(), order.len());
    let replayer =
        CloudSubscriber::connect(broker.port, &pki, "replayer", "gw/gw-1/e3/pump-17/down").await;
    Some(World {
        dir,
        pki,
        broker,
        captured,
        replayer,
        key,
    })
}

/// The real `blindgate cloud run` on a config file pointing at the same files.
struct Binary {
    child: Child,
    metrics: std::net::SocketAddr,
    log: PathBuf,
}

impl Binary {
    fn config(world: &World, metrics_port: u16) -> PathBuf {
        let dir = world.dir.path();
        let pki = &world.pki;
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let text = format!(
            "[broker]\nurl = \"mqtts://localhost:{port}\"\nca = {ca}\ncert = {cert}\nkey = {key}\n\
             client_id = \"ingest-1\"\n\n[store]\nkeys_dir = {keys}\nstate_dir = {state}\n\n\
             [sink]\njsonl = {sink}\nimages_dir = {images}\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
            port = world.broker.port,
            ca = q(&pki.cloud_ca.cert),
            cert = q(&pki.cloud_ingest.cert),
            key = q(&pki.cloud_ingest.key),
            keys = q(&dir.join("keys")),
            state = q(&dir.join("state")),
            sink = q(&world.sink()),
            images = q(&dir.join("images")),
        );
        let path = dir.join("cloud.toml");
        std::fs::write(&path, text).expect("write cloud.toml");
        path
    }

    async fn start(world: &World, run: usize) -> Self {
        let port = common::free_port();
        let config = Self::config(world, port);
        let log = world.dir.path().join(format!("ingest-{run}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_blindgate"))
            .args(["cloud", "run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start blindgate cloud run");
        let mut binary = Self {
            child,
            metrics: ([127, 0, 0, 1], port).into(),
            log,
        };
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(text) = binary.scrape().await
                    && text.contains("blindgate_cloud_subscribed 1")
                {
                    return;
                }
                if let Some(status) = binary.child.try_wait().expect("poll child") {
                    panic!("the ingest exited ({status}): {}", binary.log_text());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the ingest subscribed: {}", binary.log_text()));
        binary
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn scrape(&self) -> Option<String> {
        let mut stream = tokio::net::TcpStream::connect(self.metrics).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .ok()?;
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
            .await
            .ok()?
            .ok()?;
        let response = String::from_utf8(response).ok()?;
        response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
    }

    async fn tally(&self) -> Tally {
        Tally::scraped(&self.scrape().await.expect("scrape the ingest"))
    }

    /// SIGKILL: no flush, no clean disconnect, no acknowledgement of what is pending.
    fn kill_9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_envelopes_replayed_reordered_and_too_old_are_stored_once_across_restarts() {
    let Some(world) = capture().await else {
        return;
    };
    let started = Instant::now();
    let sink = world.sink();

    // 1. Reordered, with repeats: each of 1..=5 once.
    let (metrics, stop, task) = world.start_ingest().await;
    let first = [5, 2, 5, 1, 4, 3, 2, 3];
    world.deliver(&first).await;
    let receipted = world.wait_receipted(first.len()).await;
    let tally = Tally::of(&metrics);
    assert_eq!(
        tally,
        Tally {
            accepted: 5,
            duplicate: 3,
            stale: 0
        }
    );
    assert_each_once(&sink, &[1, 2, 3, 4, 5]).await;
    eprintln!("1. reordered with repeats {first:?}: {tally:?}; receipts named {receipted:?}");

    // 2. A clean restart of cloud::run: 1..=5 again are duplicates; 6..=8, reordered
    //    and repeated, are accepted once.
    stop.cancel();
    task.await.expect("ingest stopped");
    let (metrics, stop, task) = world.start_ingest().await;
    let second = [3, 1, 5, 2, 4, 8, 6, 7, 7];
    world.deliver(&second).await;
    world.wait_receipted(first.len() + second.len()).await;
    let tally = Tally::of(&metrics);
    assert_eq!(
        tally,
        Tally {
            accepted: 3,
            duplicate: 6,
            stale: 0
        }
    );
    assert_each_once(&sink, &[1, 2, 3, 4, 5, 6, 7, 8]).await;
    eprintln!("2. after a clean restart {second:?}: {tally:?}");

    // 3. The window: far ahead, then the edge (65536 below: accepted), one beyond it
    //    (65537 below: stale, twice), an old one now far below (stale: not stored
    //    again either way) and a repeat of the newest (duplicate).
    let third = [HIGH, EDGE_IN, EDGE_OUT, EDGE_OUT, 6, HIGH];
    world.deliver(&third).await;
    // Stale envelopes get no receipt: 3 of the 6 are named.
    world.wait_receipted(first.len() + second.len() + 3).await;
    let tally = Tally::of(&metrics);
    assert_eq!(
        tally,
        Tally {
            accepted: 5,
            duplicate: 7,
            stale: 3
        }
    );
    let stored = [1, 2, 3, 4, 5, 6, 7, 8, EDGE_IN, HIGH];
    assert_each_once(&sink, &stored).await;
    eprintln!(
        "3. window {third:?}: {EDGE_IN} (65536 below {HIGH}) accepted, {EDGE_OUT} (65537 \
         below) and 6 stale; since the restart {tally:?}"
    );
    stop.cancel();
    task.await.expect("ingest stopped");

    // 4. The real binary (another process, the state read from disk): all 11 again,
    //    oldest window-edge first, the newest last.
    let again = [EDGE_OUT, 8, 7, 6, 5, 4, 3, 2, 1, EDGE_IN, HIGH];
    let binary = Binary::start(&world, 1).await;
    world.deliver(&again).await;
    let receipted = world
        .wait_receipted(first.len() + second.len() + 3 + 2)
        .await
        .len();
    let tally = binary.tally().await;
    assert_eq!(
        tally,
        Tally {
            accepted: 0,
            duplicate: 2,
            stale: 9
        },
        "state read by another process: {again:?}"
    );
    assert_each_once(&sink, &stored).await;
    eprintln!("4. the real binary, all 11 again {again:?}: {tally:?}");

    //    Then a stream of 300 new ones, and kill -9 once a quarter is in the sink.
    let stream: Vec<u64> = STREAM.collect();
    let before = sink_lines(&sink).len();
    let publisher = {
        let replayer =
            CloudSubscriber::connect(world.broker.port, &world.pki, "stream", "stream/nothing")
                .await;
        let envelopes: Vec<Vec<u8>> = stream.iter().map(|s| world.captured[s].clone()).collect();
        tokio::spawn(async move {
            for envelope in envelopes {
                replayer.publish(TOPIC, envelope).await;
            }
        })
    };
    tokio::time::timeout(WAIT, async {
        while sink_lines(&sink).len() - before < stream.len() / 4 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the stream reaches the sink");
    binary.kill_9();
    let at_kill = sink_lines(&sink).len() - before;
    let receipted_at_kill = world.receipted().len() - receipted;
    publisher.await.expect("the broker took the whole stream");
    eprintln!(
        "   kill -9 with {at_kill} of {} in the sink, {receipted_at_kill} of them receipted",
        stream.len()
    );

    // 5. Started again: the broker delivers what the killed process had not
    //    acknowledged, then the whole stream, all 11 once more, and a sentinel.
    let binary = Binary::start(&world, 2).await;
    let mut last: Vec<u64> = stream.clone();
    last.extend(again);
    last.push(SENTINEL);
    world.deliver(&last).await;
    tokio::time::timeout(WAIT, async {
        while !seq_counts(&sink).contains_key(&SENTINEL) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the sentinel arrived: {}", binary.log_text()));
    let tally = binary.tally().await;
    let mut expected: Vec<u64> = stored.to_vec();
    expected.extend(&stream);
    expected.push(SENTINEL);
    assert_each_once(&sink, &expected).await;
    // Accepted: exactly the stream's envelopes not stored before the kill, and the
    // sentinel. Stale: 10 of `again`: the stream moved the window's top to
    // `HIGH + 300`, so `EDGE_IN` is now more than 65536 below it too; only `HIGH`
    // is still a duplicate. Every other delivery is a duplicate: the explicit ones
    // and the broker's redeliveries of what the killed process had received but not
    // acknowledged (its last batch may have been in the sink already: killed between
    // the fsync and the PUBACKs).
    assert_eq!(
        tally.accepted,
        (stream.len() - at_kill) as u64 + 1,
        "{tally:?}"
    );
    assert_eq!(tally.stale, 10, "{tally:?}");
    assert!(tally.duplicate >= (at_kill + 1) as u64, "{tally:?}");
    let redelivered = tally.total() - last.len() as u64;
    drop(binary);
    eprintln!(
        "5. after the kill -9 and a restart: {tally:?}; the broker delivered {redelivered} \
         unacknowledged ones again; sink {} lines, each seq once; whole test {} ms",
        sink_lines(&sink).len(),
        started.elapsed().as_millis()
    );
}

/// [`open_ingest`] again in the same process: sled's background writer can hold the
/// replay database's file lock for a moment after the last handle is dropped (a
/// restarted process does not meet this: the lock goes with the old process).
async fn reopen_ingest(dir: &Path) -> Ingest {
    let deadline = Instant::now() + Duration::from_secs(5);
    while ReplayStore::open(&dir.join("state/replay")).is_err() {
        assert!(Instant::now() < deadline, "the replay state stays locked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    open_ingest(dir)
}

/// The `Ingest` `cloud::run` drives, opened on its files like `cloud::run` opens it.
fn open_ingest(dir: &Path) -> Ingest {
    let keys = KeyStore::open(&dir.join("keys")).expect("key store");
    let (replay, checkpoint) = ReplayStore::open(&dir.join("state/replay")).expect("replay state");
    let (sink, tail) = JsonlSink::open(&dir.join("messages.jsonl"), checkpoint).expect("sink");
    Ingest::new(
        keys,
        None,
        Sink::jsonl(sink, replay, tail),
        ImageStore::open(&dir.join("images")).expect("images"),
        GatewayTemplate::new("gw/{gateway_id}/e3/{device_id}/up").expect("template"),
        131_072,
        CloudMetrics::new(),
    )
}

/// One delivery at `at_ms` (simulated), committed like a batch of `cloud::run`.
async fn deliver_at(ingest: &mut Ingest, envelope: &[u8], at_ms: u64) -> Outcome {
    let mut outcome = ingest.process(TOPIC, envelope, at_ms);
    ingest
        .commit(std::iter::once(&mut outcome))
        .await
        .expect("commit");
    outcome
}

fn verdict(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Accepted(_) => "accepted",
        Outcome::Duplicate(_) => "duplicate",
        Outcome::Rejected(reason) => reason.as_str(),
        Outcome::Pending(_) => "pending",
    }
}

#[tokio::test]
async fn a_message_delivered_days_later_is_accepted_once_and_only_an_old_key_expires() {
    const DAY: u64 = 24 * 3600 * 1000;
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = KeyStore::open(&dir.path().join("keys")).expect("key store");
    let key1 = keys
        .provision(DEVICE, e3::Suite::Aes256Gcm)
        .expect("provision");
    let t0 = blindgate::clock::now_ms();
    // Sealed at t0 with key 1; the device (or a gateway's queue) holds 2..=3 for days.
    let seal = |key: &e3::DeviceKey, seq: u64| {
        key.seal(
            e3::Kind::Uplink,
            seq,
            format!("{{\"seq\":{seq}}}").as_bytes(),
        )
        .expect("seal")
    };
    let (m1, m2, m3) = (seal(&key1, 1), seal(&key1, 2), seal(&key1, 3));
    let mut ingest = open_ingest(dir.path());
    let mut seen = Vec::new();
    let mut at = |what: &str, outcome: &Outcome, when: u64| {
        seen.push(format!(
            "t0+{:.1}d {what}: {}",
            (when - t0) as f64 / DAY as f64,
            verdict(outcome)
        ));
        verdict(outcome)
    };

    assert_eq!(
        at("seq 1", &deliver_at(&mut ingest, &m1, t0).await, t0),
        "accepted"
    );
    // No rotation yet: seq 2 arrives 3 days late, its repeat a month later.
    let late = t0 + 3 * DAY;
    assert_eq!(
        at(
            "seq 2 (3 days late)",
            &deliver_at(&mut ingest, &m2, late).await,
            late
        ),
        "accepted"
    );
    let month = t0 + 30 * DAY;
    assert_eq!(
        at(
            "seq 2 again",
            &deliver_at(&mut ingest, &m2, month).await,
            month
        ),
        "duplicate"
    );

    // The cloud rotates at t0+31d with a 72 h grace (the default): key 1 still opens
    // until t0+34d. Seq 3, sealed with key 1 at t0, is delivered inside the grace, its
    // repeat after it: the repeat is refused for its key, not as a replay.
    let rotated = t0 + 31 * DAY;
    let rotation = keys
        .rotate(DEVICE, Duration::from_secs(72 * 3600), rotated)
        .expect("rotate");
    let key2 = rotation.new;
    let within = t0 + 33 * DAY;
    assert_eq!(
        at(
            "seq 3 (key 1, in grace)",
            &deliver_at(&mut ingest, &m3, within).await,
            within
        ),
        "accepted"
    );
    let after = t0 + 40 * DAY;
    assert_eq!(
        at(
            "seq 3 again (key 1, grace over)",
            &deliver_at(&mut ingest, &m3, after).await,
            after
        ),
        "key_expired"
    );
    let m4 = seal(&key2, 4);
    assert_eq!(
        at(
            "seq 4 (key 2)",
            &deliver_at(&mut ingest, &m4, after).await,
            after
        ),
        "accepted"
    );

    // A restart (state from disk), half a year later: seq 4 is still a duplicate;
    // seq 2 (key 1) is refused for its key before the replay rule is even asked.
    drop(ingest);
    let mut ingest = reopen_ingest(dir.path()).await;
    let later = t0 + 180 * DAY;
    assert_eq!(
        at(
            "seq 4 again, after a restart",
            &deliver_at(&mut ingest, &m4, later).await,
            later
        ),
        "duplicate"
    );
    assert_eq!(
        at(
            "seq 2 again, after a restart",
            &deliver_at(&mut ingest, &m2, later).await,
            later
        ),
        "key_expired"
    );

    let lines = sink_lines(&dir.path().join("messages.jsonl"));
    let stored: Vec<(u64, u64)> = lines
        .iter()
        .map(|l| (l.seq, (l.received_ms - t0) / DAY))
        .collect();
    assert_eq!(
        stored,
        [(1, 0), (2, 3), (3, 33), (4, 40)],
        "each once, with its (simulated) arrival day"
    );
    for line in &seen {
        eprintln!("{line}");
    }
}
