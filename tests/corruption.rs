//! Damaged queue files: records are written, the queue is closed (or the gateway
//! stopped), then bytes of its files are flipped, scribbled over, zeroed or cut off at
//! seeded random places (the seed is printed; `BLINDGATE_TEST_SEED` replays it) and the
//! queue is opened again. The files are the segment log (`log/*.seg`) and the state
//! database (`state/`, sled).
//!
//! Proves: opening never panics and never fails (a state database sled cannot open is
//! set aside and a fresh one started); every record the queue gives out is
//! byte-identical to what was written; a record whose bytes changed is quarantined,
//! counted (`blindgate_queue_quarantined_total`) and never forwarded; every record
//! whose frame the damage did not touch comes back (the test finds each record's frame
//! in the undamaged files by its payload and checks this against the damaged byte
//! ranges, independently of the queue's code); every record lost is counted against
//! the clean stop (`blindgate_queue_lost_at_open_total`), never silent; an acknowledged
//! record comes back only when the damage hit the state database (its floors), and then
//! only as a duplicate the cloud drops; the queue stays writable; and with the real
//! gateway binary, everything the queue kept arrives at a real Mosquitto cloud broker,
//! exactly as `blindgate queue inspect` predicted (and inspect reads a clean queue, a
//! damaged one, a missing one, and refuses one a running gateway holds, without
//! changing a byte). The figures print how many. `BLINDGATE_SOAK=1` runs 10x more
//! rounds.

mod common;
mod queue_support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blindgate::queue::record::{FRAME_OVERHEAD, encode_key, read_frame_seeded};
use blindgate::queue::{Queue, QueueConfig, RecordId};
use bytes::Bytes;
use common::cloud_subscriber::CloudSubscriber;
use common::mosquitto::{TlsMode, require_mosquitto, start_cloud_broker};
use common::proxy::Proxy;
use queue_support::{Device, GatewayProcess, QueueSettings, Rng, header_of, seed, write_config};

const DEVICES: [&str; 3] = ["pump-17", "meter-9", "valve-3"];
/// Bytes before the first frame of a segment.
const SEGMENT_HEADER: usize = 16;

fn soak() -> bool {
    std::env::var_os("BLINDGATE_SOAK").is_some()
}

fn config(path: &Path) -> QueueConfig {
    let mut config = QueueConfig::new(path);
    config.min_free_disk = 0;
    // Small segments, so that the records spread over several files.
    config.max_bytes = 8 << 20;
    config
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// The segment files of the queue at `queue` that hold frames, oldest first.
fn segments(queue: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(queue.join("log"))
        .expect("log dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .filter(|p| std::fs::metadata(p).map_or(0, |m| m.len()) > SEGMENT_HEADER as u64)
        .collect();
    found.sort();
    found
}

/// What one damage did to the files.
#[derive(Debug, Clone)]
struct Damage {
    kind: &'static str,
    /// Bytes changed (flipped, scribbled, zeroed) or cut off.
    bytes: u64,
    detail: String,
    /// The segment it changed, and the byte ranges (start, end) it changed or cut off;
    /// `None` for damage to the state database.
    segment: Option<(PathBuf, Vec<(usize, usize)>)>,
}

impl Damage {
    fn hit_state(&self) -> bool {
        self.segment.is_none()
    }
}

/// Damages the queue at `queue` in one seeded way (its state database too if
/// `with_state`).
fn damage(queue: &Path, rng: &mut Rng, with_state: bool) -> Damage {
    let kind = rng.below(if with_state { 8 } else { 5 });
    if kind >= 5 {
        return damage_state(queue, kind, rng);
    }
    let files = segments(queue);
    // "flip near the end" hits the newest segment, as a torn write would.
    let file = if kind == 4 {
        files.last().expect("a segment").clone()
    } else {
        files[rng.below(files.len() as u64) as usize].clone()
    };
    let mut bytes = std::fs::read(&file).expect("read segment");
    let len = bytes.len() as u64;
    let at = |rng: &mut Rng| rng.below(len) as usize;
    let (kind, n, detail, ranges) = match kind {
        0 => {
            let n = 1 + rng.below(4);
            let mut places = Vec::new();
            for _ in 0..n {
                let i = at(rng);
                bytes[i] ^= 1 << rng.below(8);
                places.push(i);
            }
            let ranges = places.iter().map(|&i| (i, i + 1)).collect();
            ("flip bits", n, format!("at {places:?} of {len}"), ranges)
        }
        1 => {
            let cut = at(rng);
            bytes.truncate(cut);
            let ranges = vec![(cut, len as usize)];
            (
                "truncate",
                len - cut as u64,
                format!("at {cut} of {len}"),
                ranges,
            )
        }
        2 => {
            let start = at(rng);
            let n = (1 + rng.below(64) as usize).min(bytes.len() - start);
            for b in &mut bytes[start..start + n] {
                *b = rng.next_u64() as u8;
            }
            let detail = format!("{n} bytes at {start} of {len}");
            ("scribble", n as u64, detail, vec![(start, start + n)])
        }
        3 => {
            let start = at(rng) & !4095;
            let n = 4096.min(bytes.len() - start);
            bytes[start..start + n].fill(0);
            let detail = format!("{n} bytes at {start} of {len}");
            ("zero a page", n as u64, detail, vec![(start, start + n)])
        }
        _ => {
            let start = len.saturating_sub(1 + rng.below(len / 8 + 1)) as usize;
            let n = (1 + rng.below(16) as usize).min(bytes.len() - start);
            for b in &mut bytes[start..start + n] {
                *b ^= 0xFF;
            }
            let detail = format!("{n} bytes at {start} of {len}");
            (
                "flip near the end",
                n as u64,
                detail,
                vec![(start, start + n)],
            )
        }
    };
    std::fs::write(&file, &bytes).expect("write segment");
    let name = file
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    Damage {
        kind,
        bytes: n,
        detail: format!("{name}: {detail}"),
        segment: Some((file, ranges)),
    }
}

/// Damages the state database (sled's `conf` or its log `db`).
fn damage_state(queue: &Path, kind: u64, rng: &mut Rng) -> Damage {
    let (name, kind) = match kind {
        5 => ("conf", "flip a bit of state/conf"),
        6 => ("conf", "truncate state/conf"),
        _ => ("db", "flip bits of state/db"),
    };
    let file = queue.join("state").join(name);
    let mut bytes = std::fs::read(&file).expect("read state");
    let (n, detail) = if kind.starts_with("truncate") {
        let keep = rng.below(bytes.len() as u64) as usize;
        let cut = bytes.len() - keep;
        bytes.truncate(keep);
        (cut as u64, format!("at {keep}"))
    } else {
        let n = 1 + rng.below(4);
        let mut places = Vec::new();
        for _ in 0..n {
            let i = rng.below(bytes.len() as u64) as usize;
            bytes[i] ^= 1 << rng.below(8);
            places.push(i);
        }
        (n, format!("at {places:?}"))
    };
    std::fs::write(&file, &bytes).expect("write state");
    Damage {
        kind,
        bytes: n,
        detail,
        segment: None,
    }
}

/// Where each record's frame sits in the undamaged segments, found by its payload
/// (unique per record): the segment and the frame's byte range.
fn frame_spans(
    queue: &Path,
    records: &BTreeSet<(String, u64)>,
    written: &HashMap<(String, u64), Bytes>,
) -> BTreeMap<(String, u64), (PathBuf, std::ops::Range<usize>)> {
    let files: Vec<(PathBuf, Vec<u8>)> = segments(queue)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read");
            (p, bytes)
        })
        .collect();
    let mut spans = BTreeMap::new();
    for key in records {
        let payload = &written[key];
        let head = FRAME_OVERHEAD + encode_key(&key.0, RecordId(key.1)).len();
        let finder = memchr::memmem::Finder::new(payload.as_ref());
        for (path, bytes) in &files {
            if let Some(at) = finder.find_iter(bytes).find(|&at| at >= head) {
                spans.insert(key.clone(), (path.clone(), at - head..at + payload.len()));
            }
        }
    }
    spans
}

/// Records whose frame no damaged range touches.
fn still_intact_on_disk(
    spans: &BTreeMap<(String, u64), (PathBuf, std::ops::Range<usize>)>,
    damage: &Damage,
) -> BTreeSet<(String, u64)> {
    spans
        .iter()
        .filter(|(_, (path, span))| match &damage.segment {
            Some((hit, ranges)) if hit.file_name() == path.file_name() => !ranges
                .iter()
                .any(|&(start, end)| start < span.end && span.start < end),
            _ => true,
        })
        .map(|(key, _)| key.clone())
        .collect()
}

/// Flips the last payload byte of the records `keys` in the segments of the queue at
/// `queue` (a bad write, a bit flip in RAM): only the frame's CRC can tell.
fn tamper(queue: &Path, keys: &BTreeSet<Vec<u8>>) {
    for path in segments(queue) {
        let mut bytes = std::fs::read(&path).expect("read");
        let hits: Vec<usize> = frames(&bytes)
            .into_iter()
            .filter(|(_, _, key)| keys.contains(key))
            .map(|(at, len, _)| at + len - 1)
            .collect();
        for hit in &hits {
            bytes[*hit] ^= 0x01;
        }
        if !hits.is_empty() {
            std::fs::write(&path, &bytes).expect("write");
        }
    }
}

/// The keys of every record in the segments of the queue at `queue`.
fn keys_in_log(queue: &Path) -> Vec<Vec<u8>> {
    segments(queue)
        .iter()
        .flat_map(|path| frames(&std::fs::read(path).expect("read")))
        .map(|(_, _, key)| key)
        .collect()
}

/// The frames of an undamaged segment's bytes, in order: offset, length, key. In a
/// segment of format 2 (`BGQSEG02`, then its number) the frames' CRC is seeded with the
/// segment's number.
fn frames(bytes: &[u8]) -> Vec<(usize, usize, Vec<u8>)> {
    let seed = match (bytes.get(..8), bytes.get(8..12)) {
        (Some(b"BGQSEG02"), Some(number)) => {
            u32::from_be_bytes(number.try_into().expect("four bytes"))
        }
        _ => 0,
    };
    let mut found = Vec::new();
    let mut at = SEGMENT_HEADER;
    while let Ok(frame) = read_frame_seeded(&bytes[at..], seed) {
        found.push((at, frame.len, frame.key.to_vec()));
        at += frame.len;
    }
    found
}

/// Reads every record the queue gives out.
fn read_all(queue: &Queue) -> BTreeMap<(String, u64), Bytes> {
    let mut out = BTreeMap::new();
    for device in queue.devices() {
        for record in queue.read_device(&device, None, usize::MAX).expect("read") {
            out.insert((record.device_id, record.id.0), record.payload);
        }
    }
    out
}

#[derive(Debug, Default)]
struct Totals {
    rounds: u64,
    damaged_bytes: u64,
    expected: u64,
    recovered: u64,
    quarantined: u64,
    resurrected: u64,
    lost: u64,
    /// Intact records whose frame the damage touched.
    unrecoverable: u64,
    set_aside: u64,
    rounds_with_loss: u64,
    detected: u64,
    unnoticed: u64,
    by_kind: BTreeMap<&'static str, (u64, u64, u64)>,
}

/// Writes 900 records of three devices in two sessions, every 7th acknowledged (so the
/// floors carry ids taken out of order), and 5 live records of the first session
/// tampered with between them (quarantined when the second one opens).
async fn fill(
    base: &Path,
    rng: &mut Rng,
) -> (
    HashMap<(String, u64), Bytes>,
    BTreeSet<(String, u64)>,
    BTreeSet<(String, u64)>,
) {
    let mut written: HashMap<(String, u64), Bytes> = HashMap::new();
    let mut acked = BTreeSet::new();
    let mut tampered = BTreeSet::new();
    for session in 0..2u64 {
        let queue = Queue::open(config(base)).expect("opens");
        // The tampered records are found and quarantined on this open (records next to
        // each other make one damaged stretch).
        let quarantined = queue.counters().quarantined.load(Ordering::Relaxed);
        assert!(quarantined <= tampered.len() as u64);
        assert_eq!(quarantined == 0, tampered.is_empty());
        for n in session * 450..(session + 1) * 450 {
            let device = DEVICES[(n % 3) as usize];
            let payload = Bytes::from(format!(
                "{device} reading {n} {}",
                "x".repeat(100 + (n as usize * 37) % 300)
            ));
            let id = queue
                .enqueue(device, payload.clone())
                .await
                .expect("stored");
            written.insert((device.to_owned(), id.0), payload);
            if n % 7 == 3 {
                assert!(queue.ack(device, id).expect("ack"));
                acked.insert((device.to_owned(), id.0));
            }
        }
        queue.close().await.expect("closes");
        drop(queue);
        if session == 0 {
            let live: Vec<&(String, u64)> =
                written.keys().filter(|k| !acked.contains(*k)).collect();
            tampered = (0..5)
                .map(|_| live[rng.below(live.len() as u64) as usize].clone())
                .collect();
            let keys = tampered
                .iter()
                .map(|(d, id)| encode_key(d, RecordId(*id)))
                .collect();
            tamper(base, &keys);
        }
    }
    (written, acked, tampered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_queue_files_open_keep_what_is_intact_and_quarantine_the_rest() {
    let seed = seed();
    eprintln!("corruption (library): seed {seed} (BLINDGATE_TEST_SEED={seed} replays it)");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base");
    let (written, acked, tampered) = fill(&base, &mut rng).await;
    let intact: BTreeSet<(String, u64)> = written
        .keys()
        .filter(|k| !acked.contains(*k) && !tampered.contains(*k))
        .cloned()
        .collect();
    let spans = frame_spans(&base, &intact, &written);
    assert_eq!(
        spans.len(),
        intact.len(),
        "every queued record's frame is in a segment"
    );
    assert!(
        segments(&base).len() > 1,
        "the records span several segments"
    );

    let rounds = if soak() { 2000 } else { 200 };
    let mut totals = Totals::default();
    let started = Instant::now();
    for round in 0..rounds {
        let path = dir.path().join(format!("round-{round}"));
        copy_dir(&base, &path);
        let damage = damage(&path, &mut rng, true);
        let opened = std::panic::catch_unwind(|| Queue::open(config(&path)));
        let queue = match opened {
            Ok(Ok(queue)) => queue,
            Ok(Err(err)) => panic!("round {round} ({damage:?}, seed {seed}): open failed: {err:?}"),
            Err(_) => panic!("round {round} ({damage:?}, seed {seed}): open panicked"),
        };
        let counters = queue.counters();
        let got = read_all(&queue);
        // Byte-identical to what was written.
        for (key, payload) in &got {
            assert_eq!(
                written.get(key),
                Some(payload),
                "round {round} ({damage:?}, seed {seed}): record {key:?} changed or unknown"
            );
        }
        assert!(
            got.keys().all(|k| !tampered.contains(k)),
            "round {round}: a tampered record came out"
        );
        let quarantined = queue.stats().quarantine_records as u64;
        let recovered = got.keys().filter(|k| intact.contains(*k)).count() as u64;
        let resurrected = got.keys().filter(|k| acked.contains(*k)).count() as u64;
        let lost = intact.len() as u64 - recovered;
        let detected = counters.lost_at_open.load(Ordering::Relaxed);
        let set_aside = counters.databases_moved_aside.load(Ordering::Relaxed);
        // Every record whose frame the damage did not touch comes back.
        let on_disk = still_intact_on_disk(&spans, &damage);
        let missed: Vec<_> = on_disk.iter().filter(|k| !got.contains_key(*k)).collect();
        assert!(
            missed.is_empty(),
            "round {round} ({damage:?}, seed {seed}): {} records intact on disk not recovered, e.g. {:?}",
            missed.len(),
            missed.first()
        );
        if damage.hit_state() {
            // The segments are whole: nothing lost; acknowledged records may come back
            // if the floors went with the state (the cloud drops them as replays).
            assert_eq!(
                lost, 0,
                "round {round} ({damage:?}): state damage lost records"
            );
        } else {
            // Every loss is counted against the clean stop, exactly.
            assert_eq!(
                detected, lost,
                "round {round} ({damage:?}, seed {seed}): {lost} lost, {detected} counted"
            );
            assert_eq!(
                resurrected, 0,
                "round {round} ({damage:?}): acknowledged records came back"
            );
        }
        totals.unrecoverable += intact.len() as u64 - on_disk.len() as u64;
        // Still a working queue.
        let id = queue
            .enqueue("pump-17", Bytes::from_static(b"after the damage"))
            .await
            .unwrap_or_else(|e| panic!("round {round} ({damage:?}): not writable: {e}"));
        let after = queue
            .read_device("pump-17", Some(RecordId(id.0 - 1)), 1)
            .expect("read");
        assert_eq!(after.len(), 1);
        queue.close().await.expect("closes");
        drop(queue);

        totals.rounds += 1;
        totals.damaged_bytes += damage.bytes;
        totals.expected += intact.len() as u64;
        totals.recovered += recovered;
        totals.quarantined += quarantined;
        totals.resurrected += resurrected;
        totals.lost += lost;
        totals.set_aside += set_aside;
        totals.detected += detected;
        if lost > detected {
            totals.unnoticed += lost - detected;
        }
        totals.rounds_with_loss += u64::from(lost > 0);
        let kind = totals.by_kind.entry(damage.kind).or_default();
        *kind = (kind.0 + 1, kind.1 + lost, kind.2 + u64::from(lost > 0));
        if lost > 0 && (round < 12 || std::env::var_os("SHOW_ALL").is_some()) {
            eprintln!(
                "  round {round}: {} {}: {recovered}/{} intact records recovered, {quarantined} in quarantine",
                damage.kind,
                damage.detail,
                intact.len(),
            );
        }
        std::fs::remove_dir_all(&path).expect("clean up");
    }
    eprintln!(
        "corruption (library): {} rounds in {:.1} s, {} bytes damaged; intact records {} \
         expected, {} recovered, {} not recovered (all {} had their frame damaged; every \
         record with an undamaged frame came back) ({} rounds with loss); {} counted as lost \
         at open against the clean stop, {} lost uncounted; {} damaged stretches in \
         quarantine over all rounds ({} records tampered each), {} acknowledged ones back (only after damage to the state \
         database), {} state databases set aside",
        totals.rounds,
        started.elapsed().as_secs_f64(),
        totals.damaged_bytes,
        totals.expected,
        totals.recovered,
        totals.lost,
        totals.unrecoverable,
        totals.rounds_with_loss,
        totals.detected,
        totals.unnoticed,
        totals.quarantined,
        tampered.len(),
        totals.resurrected,
        totals.set_aside,
    );
    for (kind, (rounds, lost, with_loss)) in &totals.by_kind {
        eprintln!(
            "  {kind:<24} {rounds:>5} rounds, {with_loss:>5} with loss, {lost:>7} records lost"
        );
    }
    assert_eq!(
        totals.lost, totals.unrecoverable,
        "only damaged frames are lost"
    );
    assert!(
        totals.quarantined > 0,
        "no damaged record was ever quarantined"
    );
    assert_eq!(totals.unnoticed, 0, "records were lost without a count");
}

/// Files rewritten with the same bytes (a copy without timestamps) lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_touched_but_not_damaged_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("queue");
    let queue = Queue::open(config(&base)).expect("opens");
    for n in 0..50u32 {
        queue
            .enqueue(DEVICES[0], Bytes::from(format!("reading {n}")))
            .await
            .expect("stored");
    }
    queue.close().await.expect("closes");
    drop(queue);
    for path in segments(&base) {
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, bytes).expect("rewrite");
    }
    let queue = Queue::open(config(&base)).expect("opens");
    let counters = queue.counters();
    assert_eq!(read_all(&queue).len(), 50);
    assert_eq!(counters.lost_at_open.load(Ordering::Relaxed), 0);
    assert_eq!(counters.quarantined.load(Ordering::Relaxed), 0);
    assert_eq!(counters.databases_moved_aside.load(Ordering::Relaxed), 0);
}

/// Runs `blindgate queue inspect --data-dir DIR --json`; exit code and parsed output.
fn inspect(data_dir: &Path) -> (i32, serde_json::Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_blindgate"))
        .args(["queue", "inspect", "--json", "--data-dir"])
        .arg(data_dir)
        .output()
        .expect("run blindgate queue inspect");
    let code = output.status.code().expect("exit code");
    let json = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "inspect printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (code, json)
}

fn inspect_text(data_dir: &Path) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_blindgate"))
        .args(["queue", "inspect", "--data-dir"])
        .arg(data_dir)
        .output()
        .expect("run blindgate queue inspect");
    (
        output.status.code().expect("exit code"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// Every file under `dir` with its bytes, to show inspect changed nothing.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        if entry.file_type().expect("type").is_dir() {
            out.extend(snapshot(&entry.path()));
        } else {
            out.insert(entry.path(), std::fs::read(entry.path()).expect("read"));
        }
    }
    out
}

fn per_device(json: &serde_json::Value) -> BTreeMap<String, u64> {
    json["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| {
            (
                d["device"].as_str().expect("device").to_owned(),
                d["records"].as_u64().expect("records"),
            )
        })
        .collect()
}

/// Damages the copy of a stopped gateway's queue at `queue`: `tampered` records changed
/// in place (only their CRC can tell), then one seeded raw damage of a segment.
fn damage_for_gateway(queue: &Path, rng: &mut Rng, tampered: usize) -> String {
    let keys = keys_in_log(queue);
    let chosen: BTreeSet<Vec<u8>> = (0..tampered)
        .map(|_| keys[rng.below(keys.len() as u64) as usize].clone())
        .collect();
    tamper(queue, &chosen);
    let raw = damage(queue, rng, false);
    format!(
        "{} records changed in place, then {} ({} bytes, {})",
        chosen.len(),
        raw.kind,
        raw.bytes,
        raw.detail
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_forwards_what_a_damaged_queue_kept_as_inspect_predicted() {
    if !require_mosquitto() {
        return;
    }
    let seed = seed();
    eprintln!("corruption (gateway): seed {seed} (BLINDGATE_TEST_SEED={seed} replays it)");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &DEVICES);
    let mut broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let proxy = Proxy::start(([127, 0, 0, 1], broker.port).into())
        .await
        .expect("link");
    let cloud = CloudSubscriber::connect(broker.port, &pki, "ingest-1", "gw/+/e3/+/up").await;
    let (device_port, metrics_port) = (common::free_port(), common::free_port());
    let settings = QueueSettings {
        max_bytes: "64MiB",
        min_free_disk: "0B",
        device_quota: "32MiB",
    };
    let base = dir.path().join("base");
    std::fs::create_dir_all(&base).expect("mkdir");
    let config = write_config(
        &base,
        &base.join("data"),
        &pki,
        device_port,
        proxy.port,
        metrics_port,
        &settings,
    );

    // A missing queue cannot be opened.
    let (code, json) = inspect(&base.join("data"));
    assert_eq!(code, 2, "missing queue: {json}");
    assert_eq!(json["status"], "unopenable");

    // 1. Records stored while the cloud is unreachable, then the gateway stopped.
    proxy.cut();
    let mut gateway = GatewayProcess::spawn(
        &config,
        device_port,
        metrics_port,
        &base.join("gateway.log"),
    );
    let per = 200;
    let devices: Vec<Device> = DEVICES
        .iter()
        .map(|d| Device::start(&pki, d, device_port, 300, per))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while devices.iter().any(|d| d.acked_count() < per) {
        assert!(Instant::now() < deadline, "publishing took over 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A running gateway holds the database: inspect refuses.
    let (code, json) = inspect(&base.join("data"));
    assert_eq!(code, 2, "inspect on a running gateway: {json}");
    assert!(
        json["error"].as_str().is_some_and(|e| e.contains("in use")),
        "{json}"
    );
    drop(devices);
    assert!(gateway.stop(), "gateway did not stop cleanly");
    drop(gateway);

    // 2. A clean queue: inspect says what is there, exit 0, and changes nothing.
    let before = snapshot(&base.join("data"));
    let (code, json) = inspect(&base.join("data"));
    assert_eq!(code, 0, "clean queue: {json}");
    assert_eq!(json["records"].as_u64(), Some(per * DEVICES.len() as u64));
    assert!(per_device(&json).values().all(|n| *n == per), "{json}");
    assert_eq!(
        snapshot(&base.join("data")),
        before,
        "inspect changed the queue's files"
    );
    let (code, text) = inspect_text(&base.join("data"));
    assert_eq!(code, 0);
    assert!(
        text.contains("pump-17") && text.contains("status: clean"),
        "{text}"
    );

    // 3. Rounds: a copy of the stopped queue damaged at seeded places; inspect predicts
    // what a gateway keeps; the gateway starts on it, quarantines and counts the
    // damaged records, and forwards the rest to the cloud.
    let rounds = if soak() { 30 } else { 4 };
    let stored = per * DEVICES.len() as u64;
    let (mut kept_total, mut quarantined_total, mut lost_total) = (0, 0, 0);
    for round in 0..rounds {
        let round_dir = dir.path().join(format!("round-{round}"));
        copy_dir(&base.join("data"), &round_dir.join("data"));
        let what = damage_for_gateway(&round_dir.join("data/queue"), &mut rng, 3);
        let config = write_config(
            &round_dir,
            &round_dir.join("data"),
            &pki,
            device_port,
            proxy.port,
            metrics_port,
            &settings,
        );

        let before = snapshot(&round_dir.join("data"));
        let (code, predicted) = inspect(&round_dir.join("data"));
        assert_eq!(
            snapshot(&round_dir.join("data")),
            before,
            "inspect changed the damaged files"
        );
        assert!(
            code == 0 || code == 1,
            "round {round} ({what}): inspect could not open: {predicted}"
        );
        let damaged = predicted["damaged_total"].as_u64().expect("damaged_total");
        let kept = predicted["records"].as_u64().expect("records");
        assert_eq!(
            code == 1,
            damaged > 0
                || !predicted["recovery"]
                    .as_array()
                    .expect("recovery")
                    .is_empty()
        );

        proxy.cut();
        let arrived_before = cloud.received().len();
        let mut gateway = GatewayProcess::spawn(
            &config,
            device_port,
            metrics_port,
            &round_dir.join("gateway.log"),
        );
        assert_eq!(
            gateway.metric("blindgate_queue_quarantined_total"),
            damaged,
            "round {round} ({what}): quarantined as inspect predicted"
        );
        assert_eq!(
            gateway.metric("blindgate_queue_records"),
            kept,
            "round {round} ({what}): kept as inspect predicted"
        );
        proxy.restore();
        cloud
            .wait_for(arrived_before + kept as usize, Duration::from_secs(60))
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let received = cloud.received();
        let mut arrived: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
        for (_, envelope) in &received[arrived_before..] {
            let (device, seq) = header_of(envelope);
            e3::DeviceKey::new(
                e3::DeviceId::new(&device).expect("id"),
                1,
                e3::Suite::ChaCha20Poly1305,
                [0x17; 32],
            )
            .open(envelope)
            .unwrap_or_else(|e| panic!("round {round}: {device} #{seq} arrived damaged: {e:?}"));
            assert!(
                arrived.entry(device).or_default().insert(seq),
                "round {round}: a record arrived twice"
            );
        }
        let per_device_arrived: BTreeMap<String, u64> = arrived
            .iter()
            .map(|(d, s)| (d.clone(), s.len() as u64))
            .collect();
        assert_eq!(
            per_device_arrived,
            per_device(&predicted),
            "round {round} ({what}): every intact record arrives, as inspect predicted"
        );
        assert!(gateway.alive());
        assert!(gateway.stop(), "gateway did not stop cleanly");
        drop(gateway);

        // After the start the damaged records sit in quarantine: inspect lists them.
        let (code, after) = inspect(&round_dir.join("data"));
        assert_eq!(after["damaged_total"].as_u64(), Some(0), "{after}");
        assert_eq!(
            after["quarantined_total"].as_u64(),
            Some(damaged),
            "{after}"
        );
        assert_eq!(after["records"].as_u64(), Some(0), "all forwarded: {after}");
        assert!(code <= 1, "{after}");
        let lost = stored.saturating_sub(kept);
        // The clean stop left its count: what cannot be recovered is counted, not silent.
        assert_eq!(
            predicted["lost_since_clean_stop"].as_u64(),
            Some(lost),
            "round {round} ({what}): {predicted}"
        );
        eprintln!(
            "  round {round}: {what}: {kept} kept and forwarded (all arrived, AEAD-verified), \
             {damaged} damaged ranges quarantined, {lost} records not recovered (counted by \
             inspect and the gateway against the clean stop)"
        );
        kept_total += kept;
        quarantined_total += damaged;
        lost_total += lost;
    }
    eprintln!(
        "corruption (gateway): {rounds} rounds of {stored} stored records: {kept_total} intact \
         records kept and forwarded to Mosquitto, {quarantined_total} damaged ranges \
         quarantined (blindgate_queue_quarantined_total), {lost_total} records not recovered"
    );
    broker.stop();
}
