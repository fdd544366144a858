//! Damaged queue files: records are written, the queue is closed (or the gateway
//! stopped), then bytes of its files are flipped, scribbled over, zeroed or cut off at
//! seeded random places (the seed is printed; `BLINDGATE_TEST_SEED` replays it) and the
//! queue is opened again.
//!
//! Proves: opening never panics and never fails (a database sled cannot open is set
//! aside and a fresh one started); every record the queue gives out is byte-identical
//! to what was written; a record whose bytes changed behind sled's checksum is
//! quarantined, counted (`blindgate_queue_quarantined_total`) and never forwarded;
//! the queue stays writable; and with the real gateway binary, everything the queue
//! kept arrives at a real Mosquitto cloud broker, exactly as `blindgate queue inspect`
//! predicted (and inspect reads a clean queue, a damaged one, a missing one, and
//! refuses one a running gateway holds, without changing a byte).
//!
//! And every record with at least one copy of its bytes that the damage did not touch
//! comes back: sled 0.34 replays its log only up to the first message that fails its
//! own checksum (and then overwrites the rest), so the queue copies files that changed
//! since the clean stop aside before sled opens them, and salvages the records the
//! clean-stop marker names from the copy's raw bytes (every value is a self-checking
//! frame). The test finds each record's frames in the undamaged log by its payload and
//! checks the claim against the damaged byte ranges, independently of the salvage
//! code. What is lost (every copy damaged) is counted, never silent. The figures print
//! how many. `BLINDGATE_SOAK=1` runs 10x more rounds.

mod common;
mod queue_support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blindgate::queue::{Queue, QueueConfig, RecordId};
use bytes::Bytes;
use common::cloud_subscriber::CloudSubscriber;
use common::mosquitto::{TlsMode, require_mosquitto, start_cloud_broker};
use common::proxy::Proxy;
use queue_support::{Device, GatewayProcess, QueueSettings, Rng, header_of, seed, write_config};

const DEVICES: [&str; 3] = ["pump-17", "meter-9", "valve-3"];

fn soak() -> bool {
    std::env::var_os("BLINDGATE_SOAK").is_some()
}

fn config(path: &Path) -> QueueConfig {
    let mut config = QueueConfig::new(path);
    config.min_free_disk = 0;
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

/// What one damage did to the files.
#[derive(Debug, Clone)]
struct Damage {
    kind: &'static str,
    /// Bytes changed (flipped, scribbled, zeroed) or cut off.
    bytes: u64,
    detail: String,
    /// The byte ranges (start, end) of the log file (`db`) it changed or cut off.
    ranges: Vec<(usize, usize)>,
}

/// Damages the sled files of the queue at `queue` in one seeded way.
fn damage(queue: &Path, rng: &mut Rng) -> Damage {
    let db = queue.join("db");
    let conf = queue.join("conf");
    let mut bytes = std::fs::read(&db).expect("read db");
    let len = bytes.len() as u64;
    let at = |rng: &mut Rng| rng.below(len) as usize;
    let damage = match rng.below(7) {
        0 => {
            let n = 1 + rng.below(4);
            let mut places = Vec::new();
            for _ in 0..n {
                let i = at(rng);
                bytes[i] ^= 1 << rng.below(8);
                places.push(i);
            }
            Damage {
                kind: "flip bits",
                bytes: n,
                detail: format!("at {places:?} of {len}"),
                ranges: places.iter().map(|&i| (i, i + 1)).collect(),
            }
        }
        1 => {
            let cut = at(rng);
            bytes.truncate(cut);
            Damage {
                kind: "truncate",
                bytes: len - cut as u64,
                detail: format!("at {cut} of {len}"),
                ranges: vec![(cut, len as usize)],
            }
        }
        2 => {
            let start = at(rng);
            let n = (1 + rng.below(64) as usize).min(bytes.len() - start);
            for b in &mut bytes[start..start + n] {
                *b = rng.next_u64() as u8;
            }
            Damage {
                kind: "scribble",
                bytes: n as u64,
                detail: format!("{n} bytes at {start} of {len}"),
                ranges: vec![(start, start + n)],
            }
        }
        3 => {
            let start = at(rng) & !4095;
            let n = 4096.min(bytes.len() - start);
            bytes[start..start + n].fill(0);
            Damage {
                kind: "zero a page",
                bytes: n as u64,
                detail: format!("{n} bytes at {start} of {len}"),
                ranges: vec![(start, start + n)],
            }
        }
        4 => {
            // The last stretch of the log: the newest writes, as a torn write would.
            let start = len.saturating_sub(1 + rng.below(len / 8 + 1)) as usize;
            let n = (1 + rng.below(16) as usize).min(bytes.len() - start);
            for b in &mut bytes[start..start + n] {
                *b ^= 0xFF;
            }
            Damage {
                kind: "flip near the end",
                bytes: n as u64,
                detail: format!("{n} bytes at {start} of {len}"),
                ranges: vec![(start, start + n)],
            }
        }
        5 => {
            let mut c = std::fs::read(&conf).expect("read conf");
            let i = rng.below(c.len() as u64) as usize;
            c[i] ^= 1 << rng.below(8);
            std::fs::write(&conf, c).expect("write conf");
            Damage {
                kind: "flip a bit of conf",
                bytes: 1,
                detail: format!("at {i}"),
                ranges: Vec::new(),
            }
        }
        _ => {
            let c = std::fs::read(&conf).expect("read conf");
            let keep = rng.below(c.len() as u64) as usize;
            std::fs::write(&conf, &c[..keep]).expect("write conf");
            Damage {
                kind: "truncate conf",
                bytes: (c.len() - keep) as u64,
                detail: format!("at {keep} of {}", c.len()),
                ranges: Vec::new(),
            }
        }
    };
    std::fs::write(&db, &bytes).expect("write db");
    damage
}

/// Where each record's frame (`record` format version 2: fixed fields, key, payload)
/// sits in the undamaged log file, found by its payload, which is unique per record.
/// sled may keep several copies (page rewrites); an old copy is as good as the last.
fn frame_spans(
    db: &[u8],
    records: &BTreeSet<(String, u64)>,
    written: &HashMap<(String, u64), Bytes>,
) -> BTreeMap<(String, u64), Vec<std::ops::Range<usize>>> {
    let mut spans = BTreeMap::new();
    for key in records {
        let payload = &written[key];
        let head = blindgate::queue::record::FRAME_OVERHEAD
            + blindgate::queue::record::encode_key(&key.0, RecordId(key.1)).len();
        let mut found = Vec::new();
        let finder = memchr::memmem::Finder::new(payload.as_ref());
        for at in finder.find_iter(db) {
            if at >= head {
                found.push(at - head..at + payload.len());
            }
        }
        spans.insert(key.clone(), found);
    }
    spans
}

/// Records with at least one copy of their frame that no damaged range touches.
fn still_intact_on_disk(
    spans: &BTreeMap<(String, u64), Vec<std::ops::Range<usize>>>,
    damage: &Damage,
) -> BTreeSet<(String, u64)> {
    let touches = |span: &std::ops::Range<usize>| {
        damage
            .ranges
            .iter()
            .any(|&(start, end)| start < span.end && span.start < end)
    };
    spans
        .iter()
        .filter(|(_, copies)| copies.iter().any(|span| !touches(span)))
        .map(|(key, _)| key.clone())
        .collect()
}

/// Changes a stored value behind the queue's back, through sled, so that sled's own
/// checksums hold and only the record's CRC can tell (a bad write, a bit flip in RAM).
fn tamper(path: &Path, keys: &[Vec<u8>]) {
    let db = sled::open(path).expect("sled opens");
    let records = db.open_tree("records").expect("tree");
    for key in keys {
        let mut value = records.get(key).expect("get").expect("present").to_vec();
        let last = value.len() - 1;
        value[last] ^= 0x01;
        records.insert(key.as_slice(), value).expect("insert");
    }
    db.flush().expect("flush");
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
    /// Intact records whose every copy on disk the damage touched.
    unrecoverable: u64,
    set_aside: u64,
    salvaged: u64,
    rounds_with_loss: u64,
    lost_without_copy: u64,
    detected: u64,
    unnoticed: u64,
    by_kind: BTreeMap<&'static str, (u64, u64, u64)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_queue_files_open_keep_what_is_intact_and_quarantine_the_rest() {
    let seed = seed();
    eprintln!("corruption (library): seed {seed} (BLINDGATE_TEST_SEED={seed} replays it)");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base");

    // 900 records of three devices, every 7th acknowledged, in two gateway sessions:
    // 5 of the first 450 tampered with between them (quarantined when the second one
    // opens). sled writes a snapshot when it
    // opens a database, so the second half lives only in the log after the last
    // snapshot, as everything a running gateway stored since its start does.
    let mut written: HashMap<(String, u64), Bytes> = HashMap::new();
    let mut acked = BTreeSet::new();
    let mut tampered = BTreeSet::new();
    for session in 0..2u64 {
        let queue = Queue::open(config(&base)).expect("opens");
        // The tampered records were found and quarantined on this open.
        assert_eq!(
            queue.counters().quarantined.load(Ordering::Relaxed),
            tampered.len() as u64
        );
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
            let keys: Vec<Vec<u8>> = tampered
                .iter()
                .map(|(d, id)| blindgate::queue::record::encode_key(d, RecordId(*id)))
                .collect();
            tamper(&base, &keys);
        }
    }
    let intact: BTreeSet<(String, u64)> = written
        .keys()
        .filter(|k| !acked.contains(*k) && !tampered.contains(*k))
        .cloned()
        .collect();

    let base_log = std::fs::read(base.join("db")).expect("read the log");
    let spans = frame_spans(&base_log, &intact, &written);
    assert!(
        spans.values().all(|copies| !copies.is_empty()),
        "every queued record's frame is in the log file"
    );

    let rounds = if soak() { 2000 } else { 200 };
    let mut totals = Totals::default();
    let started = Instant::now();
    for round in 0..rounds {
        let path = dir.path().join(format!("round-{round}"));
        copy_dir(&base, &path);
        // The marker a clean stop leaves next to the queue (`queue.clean`).
        std::fs::copy(
            dir.path().join("base.clean"),
            dir.path().join(format!("round-{round}.clean")),
        )
        .expect("clean-stop marker");
        let damage = damage(&path, &mut rng);
        let opened = std::panic::catch_unwind(|| Queue::open(config(&path)));
        let queue = match opened {
            Ok(Ok(queue)) => queue,
            Ok(Err(err)) => panic!("round {round} ({damage:?}, seed {seed}): open failed: {err:?}"),
            Err(_) => panic!("round {round} ({damage:?}, seed {seed}): open panicked"),
        };
        let counters = queue.counters();
        let got = read_all(&queue);
        // Byte-identical to what was written: a tampered record never comes out with
        // its changed bytes (it may come back whole if the damage cut the log before
        // the tampering).
        for (key, payload) in &got {
            assert_eq!(
                written.get(key),
                Some(payload),
                "round {round} ({damage:?}, seed {seed}): record {key:?} changed or unknown"
            );
        }
        // In quarantine: the tampered records (unless the damage took them), never
        // given out.
        let quarantined = queue.stats().quarantine_records as u64;
        assert!(quarantined <= tampered.len() as u64);
        let recovered = got.keys().filter(|k| intact.contains(*k)).count() as u64;
        let resurrected = got.keys().filter(|k| acked.contains(*k)).count() as u64;
        let lost = intact.len() as u64 - recovered;
        let detected = counters.lost_at_open.load(Ordering::Relaxed);
        assert!(
            detected <= lost + tampered.len() as u64,
            "round {round}: {detected} reported lost, {lost} lost"
        );
        // Every loss is counted (a record quarantined at this open is counted there).
        let newly_quarantined = quarantined.saturating_sub(tampered.len() as u64);
        assert!(
            detected + newly_quarantined >= lost,
            "round {round} ({damage:?}): {lost} lost, {detected} counted"
        );
        // Every record with an undamaged copy of its bytes on disk comes back.
        let on_disk = still_intact_on_disk(&spans, &damage);
        let missed: Vec<_> = on_disk.iter().filter(|k| !got.contains_key(*k)).collect();
        assert!(
            missed.is_empty(),
            "round {round} ({damage:?}, seed {seed}): {} records intact on disk not recovered, e.g. {:?}",
            missed.len(),
            missed.first()
        );
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
        let set_aside = counters.databases_moved_aside.load(Ordering::Relaxed);
        totals.set_aside += set_aside;
        totals.salvaged += counters.salvaged.load(Ordering::Relaxed);
        if set_aside == 0 {
            totals.lost_without_copy += lost;
        }
        totals.detected += detected;
        if lost > 0 && set_aside == 0 && detected == 0 {
            totals.unnoticed += lost;
        }
        totals.rounds_with_loss += u64::from(lost > 0);
        let kind = totals.by_kind.entry(damage.kind).or_default();
        *kind = (kind.0 + 1, kind.1 + lost, kind.2 + u64::from(lost > 0));
        if lost > 0 && (round < 12 || std::env::var_os("SHOW_ALL").is_some()) {
            eprintln!(
                "  round {round}: {} {}: {recovered}/{} intact records recovered, {quarantined} quarantined, set aside {}",
                damage.kind,
                damage.detail,
                intact.len(),
                counters.databases_moved_aside.load(Ordering::Relaxed)
            );
        }
        std::fs::remove_dir_all(&path).expect("clean up");
    }
    eprintln!(
        "corruption (library): {} rounds in {:.1} s, {} bytes damaged; intact records \
         {} expected, {} recovered, {} not recovered ({} of them had every copy on disk \
         damaged; every record with an undamaged copy came back) ({} rounds with loss; {} of \
         them lost without a copy of the damaged database set aside); {} counted as lost at \
         open against the clean-stop marker, {} lost with neither a copy nor a count; {} \
         in quarantine (of {} tampered), {} acknowledged ones back, {} damaged databases \
         set aside, {} records salvaged from them",
        totals.rounds,
        started.elapsed().as_secs_f64(),
        totals.damaged_bytes,
        totals.expected,
        totals.recovered,
        totals.lost,
        totals.unrecoverable,
        totals.rounds_with_loss,
        totals.lost_without_copy,
        totals.detected,
        totals.unnoticed,
        totals.quarantined,
        tampered.len(),
        totals.resurrected,
        totals.set_aside,
        totals.salvaged,
    );
    for (kind, (rounds, lost, with_loss)) in &totals.by_kind {
        eprintln!(
            "  {kind:<20} {rounds:>5} rounds, {with_loss:>5} with loss, {lost:>7} records lost"
        );
    }
    // Damage outside the log (sled's `conf`) loses nothing.
    for kind in ["flip a bit of conf", "truncate conf"] {
        if let Some((_, lost, _)) = totals.by_kind.get(kind) {
            assert_eq!(*lost, 0, "{kind} lost records");
        }
    }
    assert!(
        totals.quarantined > 0,
        "no tampered record was ever quarantined"
    );
    assert_eq!(
        totals.unnoticed, 0,
        "records were lost with neither a copy set aside nor a count"
    );
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
/// behind sled's checksum, then one seeded raw damage of the log.
fn damage_for_gateway(queue: &Path, rng: &mut Rng, tampered: usize) -> String {
    let keys: Vec<Vec<u8>> = {
        let db = sled::open(queue).expect("sled opens");
        let keys = db
            .open_tree("records")
            .expect("tree")
            .iter()
            .keys()
            .map(|k| k.expect("key").to_vec())
            .collect();
        db.flush().expect("flush");
        keys
    };
    let chosen: BTreeSet<Vec<u8>> = (0..tampered)
        .map(|_| keys[rng.below(keys.len() as u64) as usize].clone())
        .collect();
    tamper(queue, &chosen.iter().cloned().collect::<Vec<_>>());
    let raw = damage(queue, rng);
    format!(
        "{} records changed behind sled's checksum, then {} ({} bytes, {})",
        chosen.len(),
        raw.kind,
        raw.bytes,
        raw.detail
    )
}

/// A change that is not damage (the files rewritten with the same bytes, as a copy
/// without timestamps does) costs a copy and a search, and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_touched_but_not_damaged_lose_nothing_and_leave_no_copy() {
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
    std::thread::sleep(Duration::from_millis(20));
    let log = std::fs::read(base.join("db")).expect("read");
    std::fs::write(base.join("db"), log).expect("rewrite");

    let queue = Queue::open(config(&base)).expect("opens");
    let counters = queue.counters();
    assert_eq!(read_all(&queue).len(), 50);
    assert_eq!(counters.lost_at_open.load(Ordering::Relaxed), 0);
    assert_eq!(counters.salvaged.load(Ordering::Relaxed), 0);
    assert_eq!(counters.databases_moved_aside.load(Ordering::Relaxed), 0);
    let copies = std::fs::read_dir(dir.path())
        .expect("list")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("damaged"))
        .count();
    assert_eq!(copies, 0, "a copy was left behind");
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
        let lost = stored.saturating_sub(kept + damaged);
        // The clean stop left a marker: what cannot be recovered is counted, not silent.
        assert_eq!(
            predicted["lost_since_clean_stop"].as_u64(),
            Some(lost),
            "round {round} ({what}): {predicted}"
        );
        eprintln!(
            "  round {round}: {what}: {kept} kept and forwarded (all arrived, AEAD-verified), \
             {damaged} quarantined, {lost} not recovered (counted by inspect and the gateway \
             against the clean-stop marker){}",
            if predicted["recovery"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                " (a copy of the damaged database set aside)"
            } else {
                ""
            }
        );
        kept_total += kept;
        quarantined_total += damaged;
        lost_total += lost;
    }
    eprintln!(
        "corruption (gateway): {rounds} rounds of {stored} stored records: {kept_total} intact \
         records kept and forwarded to Mosquitto, {quarantined_total} quarantined \
         (blindgate_queue_quarantined_total), {lost_total} not recovered"
    );
    broker.stop();
}
