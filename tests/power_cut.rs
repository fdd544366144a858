//! Power cuts, not just crashes: "nothing acknowledged is ever lost" must hold when the
//! machine loses power, which also discards every write the gateway made but did not
//! fsync.
//!
//! The gateway's `data_dir` is on a power-cut filesystem (`tools/powercut`: FUSE, served
//! by this test process over a backing directory). The real `blindgate gateway` binary
//! runs on it with the cloud unreachable (its link to Mosquitto is cut), so every record
//! stays in the queue; a device (MQTT 3.1.1 over TLS 1.3, its own certificate) publishes
//! E3 envelopes and counts the PUBACKs. At a random moment (seeded; replay with
//! `BLINDGATE_POWERCUT_SEED`) the power is cut: every write not yet fsync'd is dropped
//! and every later file operation fails with EIO; the gateway is killed with SIGKILL;
//! the filesystem is unmounted and mounted again over what was durable; the gateway
//! restarts. 12 rounds (`BLINDGATE_POWERCUT_ROUNDS=N` for a soak). Then the link comes
//! back and every envelope the device got a PUBACK for must reach the cloud subscriber.
//!
//! The model has teeth (second test): a child process writes with sled on the mount and
//! calls `Db::flush`; after a kill -9 alone the data is there, after a power cut it is
//! gone unless the file was fsync'd. So a gateway that PUBACKed before an fsync would
//! lose data in the first test.
//!
//! What the model covers: loss of every write, file extension and truncation that no
//! `fsync`/`fdatasync` of that file covered, at the moment of the cut, whoever made it;
//! `sync_file_range(2)`, `close`, `sync(2)` and `syncfs(2)` are not durability points
//! (none of them reaches a FUSE filesystem; `sync_file_range` persists no metadata
//! such as a grown file size and flushes no disk cache, per its man page); nothing gets
//! written back by itself with time (the kernel would, within about 30 s: this is the
//! worst case). What it does not cover: metadata (create, mkdir, rename, unlink) is
//! durable at once, as if every directory were fsync'd after each change; writes are
//! lost whole, never torn or reordered, and fsync'd data is never lost (no lying disk,
//! no bit rot, no misdirected writes); processes are killed just after the cut, not at
//! the same instant (their file operations in between fail with EIO).
//!
//! Needs root (or `fusermount3`), `/dev/fuse` and Mosquitto: skipped with a message
//! without them, failed when `CI` is set.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blindgate::pki::DevPki;
use common::cloud_subscriber::CloudSubscriber;
use common::gateway_config::GatewayConfig;
use common::mosquitto::{TlsMode, require_mosquitto, start_cloud_broker};
use common::proxy::Proxy;
use powercut::{PowerCutFs, Stats};
use rumqttc::{Event, Outgoing, Packet, QoS};

const DEVICE: &str = "pump-17";
/// Rounds in CI; `BLINDGATE_POWERCUT_ROUNDS` overrides.
const ROUNDS: u64 = 12;
/// The cut comes this long after the gateway listens (uniform, milliseconds).
const CUT_AFTER_MS: (u64, u64) = (150, 2500);
/// Deadline for the cloud to receive everything acknowledged.
const DRAIN: Duration = Duration::from_secs(90);
/// Seqs per round: round `r` publishes from `r * SEQS_PER_ROUND + 1` on.
const SEQS_PER_ROUND: u64 = 1_000_000;
/// The drain is over when nothing new arrived for this long.
const STALLED: Duration = Duration::from_secs(15);
/// Set in the child process of the negative control: the sled directory to write.
const CHILD_ENV: &str = "BLINDGATE_POWERCUT_SLED_CHILD";
const CHILD_READY: &str = "POWERCUT-CHILD-READY";

/// SplitMix64: a small seeded generator, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn millis(&mut self, (lo, hi): (u64, u64)) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
    )
}

/// Whether FUSE can be used here; skips (false) with a message, or fails in CI.
fn require_fuse() -> bool {
    match powercut::check_available() {
        Ok(()) => true,
        Err(why) => {
            let message =
                format!("power-cut tests need FUSE: {why}; see .ci/install-powercut-deps");
            assert!(std::env::var_os("CI").is_none(), "{message} (CI is set)");
            eprintln!("{message}");
            false
        }
    }
}

/// A power-cut filesystem over `dir/disk`, mounted on `dir/mnt`.
fn mount(dir: &Path) -> PowerCutFs {
    let backing = dir.join("disk");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&backing).expect("backing directory");
    std::fs::create_dir_all(&mnt).expect("mount point");
    PowerCutFs::mount(&backing, &mnt).expect("FUSE mount")
}

fn add(total: &mut Stats, round: &Stats) {
    total.writes += round.writes;
    total.bytes_written += round.bytes_written;
    total.fsyncs += round.fsyncs;
    total.bytes_synced += round.bytes_synced;
    total.dir_fsyncs += round.dir_fsyncs;
    total.writes_dropped += round.writes_dropped;
    total.bytes_dropped += round.bytes_dropped;
    total.files_dropped += round.files_dropped;
    total.refused_after_cut += round.refused_after_cut;
}

fn write_config(
    dir: &Path,
    data_dir: &Path,
    pki: &DevPki,
    device_port: u16,
    cloud_port: u16,
) -> PathBuf {
    GatewayConfig::new(data_dir, pki, device_port, cloud_port).write(&dir.join("gateway.toml"))
}

/// The gateway process; killed (SIGKILL) and reaped on drop too, so that a failing
/// test leaves no process holding files on the mount.
struct Gateway(Child);

impl Gateway {
    fn kill(&mut self) {
        self.0.kill().expect("SIGKILL");
        self.0.wait().expect("reaped");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Already dead and reaped after `kill`: both calls then do nothing harmful.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_gateway(config: &Path, device_port: u16, log: &Path) -> Gateway {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_blindgate"))
        .args(["gateway", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file)
        .spawn()
        .expect("gateway starts");
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", device_port)).is_err() {
        if let Some(status) = child.try_wait().expect("poll gateway") {
            panic!("gateway exited at start ({status}); log: {}", log.display());
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "gateway did not listen within 20 s; log: {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Gateway(child)
}

/// The device's envelope number `seq`.
fn seal(seq: u64) -> Vec<u8> {
    let key = e3::DeviceKey::new(
        e3::DeviceId::new(DEVICE).expect("valid"),
        1,
        e3::Suite::ChaCha20Poly1305,
        [0x17; 32],
    );
    key.seal(e3::Kind::Uplink, seq, format!("reading {seq}").as_bytes())
        .expect("seal")
}

fn seq_of(envelope: &[u8]) -> u64 {
    e3::Header::parse(envelope).expect("valid envelope").seq()
}

/// Publishes envelopes with increasing seq from `next_seq` until the connection
/// breaks (or 60 s pass); returns the seqs that got a PUBACK. Packet ids are mapped to
/// seqs as rumqttc sends them (`Outgoing::Publish`, in request order).
async fn publish_until_broken(pki: &DevPki, port: u16, next_seq: &mut u64) -> Vec<u64> {
    let (_, paths) = &pki.devices[0];
    let tls = common::client_tls(&pki.device_ca.cert, &paths.cert, &paths.key);
    let (client, mut eventloop) = common::mqtt_client(DEVICE, port, tls);
    let first = *next_seq;
    *next_seq += SEQS_PER_ROUND;
    tokio::spawn(async move {
        for seq in first..first + SEQS_PER_ROUND {
            if client
                .publish(
                    format!("e3/{DEVICE}/up"),
                    QoS::AtLeastOnce,
                    false,
                    seal(seq),
                )
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut sent = first;
    let mut in_flight: HashMap<u16, u64> = HashMap::new();
    let mut acked = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => break,
            event = eventloop.poll() => match event {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    in_flight.insert(pkid, sent);
                    sent += 1;
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    let seq = in_flight.remove(&ack.pkid).expect("PUBACK for a publish in flight");
                    acked.push(seq);
                }
                Ok(_) => {}
                Err(_) => break,
            },
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_while_the_cloud_is_down_lose_nothing_that_was_acknowledged() {
    if !require_mosquitto() || !require_fuse() {
        return;
    }
    let seed = env_u64("BLINDGATE_POWERCUT_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos() as u64
    });
    let rounds = env_u64("BLINDGATE_POWERCUT_ROUNDS").unwrap_or(ROUNDS);
    eprintln!("power cut: seed {seed} (BLINDGATE_POWERCUT_SEED={seed} replays), {rounds} rounds");
    let mut rng = Rng(seed);

    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &[DEVICE]);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let proxy = Proxy::start(([127, 0, 0, 1], broker.port).into())
        .await
        .expect("link");
    let cloud = CloudSubscriber::connect(broker.port, &pki, "ingest-1", "gw/+/e3/+/up").await;
    let device_port = common::free_port();
    let data_dir = dir.path().join("mnt").join("data");
    let config = write_config(dir.path(), &data_dir, &pki, device_port, proxy.port);
    let log = dir.path().join("gateway.log");
    proxy.cut();

    let mut next_seq = 1;
    let mut acked = BTreeSet::new();
    let mut total = Stats::default();
    let mut rounds_with_loss_of_unsynced_data = 0;
    for round in 0..rounds {
        let fs = mount(dir.path());
        let mut gateway = spawn_gateway(&config, device_port, &log);
        let cut_after = rng.millis(CUT_AFTER_MS);
        let publishing = publish_until_broken(&pki, device_port, &mut next_seq);
        let cutter = async {
            tokio::time::sleep(cut_after).await;
            // The disk loses what was not fsync'd, then the machine stops.
            let cut = fs.cut_power();
            gateway.kill();
            cut
        };
        let (round_acked, cut) = tokio::join!(publishing, cutter);
        let stats = tokio::task::block_in_place(|| fs.unmount()).expect("unmount");
        eprintln!(
            "round {round:>2}: cut after {cut_after:>4?}: {:>5} acknowledged, {:>6} writes ({} B), \
             {:>4} fsyncs; the cut dropped {} writes ({} B) in {} files",
            round_acked.len(),
            stats.writes,
            stats.bytes_written,
            stats.fsyncs,
            cut.writes_dropped,
            cut.bytes_dropped,
            cut.files_dropped
        );
        assert!(
            !round_acked.is_empty(),
            "round {round}: nothing acknowledged before the cut (log: {})",
            log.display()
        );
        if cut.bytes_dropped > 0 {
            rounds_with_loss_of_unsynced_data += 1;
        }
        add(&mut total, &stats);
        acked.extend(round_acked);
    }
    assert!(cloud.received().is_empty(), "the cloud was unreachable");

    // Power back for good: the cloud link too. Everything acknowledged must arrive.
    let fs = mount(dir.path());
    let mut gateway = spawn_gateway(&config, device_port, &log);
    proxy.restore();
    // Done when everything acknowledged arrived, or when nothing new arrived for
    // STALLED (the queue is drained and the rest is lost), or after DRAIN.
    let started = Instant::now();
    let mut last_growth = (0, Instant::now());
    let received: BTreeSet<u64> = loop {
        let seen: BTreeSet<u64> = cloud.received().iter().map(|(_, p)| seq_of(p)).collect();
        if seen.len() > last_growth.0 {
            last_growth = (seen.len(), Instant::now());
        }
        let stalled = !seen.is_empty() && last_growth.1.elapsed() > STALLED;
        if acked.is_subset(&seen) || stalled || started.elapsed() > DRAIN {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    gateway.kill();
    let last = tokio::task::block_in_place(|| fs.unmount()).expect("unmount");
    add(&mut total, &last);

    let lost: Vec<&u64> = acked.difference(&received).collect();
    let mut lost_per_round = vec![0; usize::try_from(rounds).expect("rounds") + 1];
    for seq in &lost {
        lost_per_round[usize::try_from(**seq / SEQS_PER_ROUND).expect("round")] += 1;
    }
    eprintln!(
        "power cut: {rounds} rounds (seed {seed}), {} envelopes acknowledged, {} lost, {} received; \
         the gateway wrote {} B in {} writes, {} fsyncs made {} B durable; the cuts dropped \
         {} writes, {} B (unsynced data lost in {rounds_with_loss_of_unsynced_data} of {rounds} rounds)",
        acked.len(),
        lost.len(),
        received.len(),
        total.bytes_written,
        total.writes,
        total.fsyncs,
        total.bytes_synced,
        total.writes_dropped,
        total.bytes_dropped,
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged envelopes lost to power cuts (seed {seed}; per round {lost_per_round:?}): \
         {:?}{} (log: {})",
        lost.len(),
        &lost[..lost.len().min(20)],
        if lost.len() > 20 { " ..." } else { "" },
        log.display()
    );
}

/// The sled keys `prefix-0000..` written by the child.
fn keys(prefix: &str) -> impl Iterator<Item = String> + '_ {
    (0..200).map(move |i| format!("{prefix}-{i:04}"))
}

/// The child process of the negative control: sled on the mount. Writes "fsynced"
/// keys, flushes sled and fsyncs its `db` file; then writes "flushed" keys and only
/// calls `Db::flush` (sled 0.34: `pwrite` + `sync_file_range` on Linux, no fsync); then
/// says it is ready and waits for its SIGKILL.
fn sled_child(path: &Path) -> ! {
    let db = sled::Config::new()
        .path(path)
        .flush_every_ms(None)
        .open()
        .expect("child: sled opens");
    for key in keys("fsynced") {
        db.insert(key.as_bytes(), vec![0x5a; 100]).expect("insert");
    }
    db.flush().expect("flush");
    std::fs::File::open(path.join("db"))
        .and_then(|f| f.sync_all())
        .expect("fsync of sled's db file");
    for key in keys("flushed") {
        db.insert(key.as_bytes(), vec![0xa5; 100]).expect("insert");
    }
    db.flush().expect("flush");
    println!("{CHILD_READY}");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Runs the child on `fs`, kills it (after a power cut if `cut`), unmounts and returns
/// how many "fsynced" and "flushed" keys the durable state has, and the cut's counters.
fn run_child(dir: &Path, cut: bool, name: &str) -> (usize, usize, Stats) {
    let fs = mount(dir);
    let sled_dir = fs.path().join(name);
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "a_gateway_that_acknowledged_before_fsync_would_lose_data",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &sled_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("child starts");
    let stdout = child.stdout.take().expect("piped");
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains(CHILD_READY));
    assert!(
        ready,
        "the sled child did not get ready: {:?}",
        child.wait()
    );
    let stats = if cut {
        let stats = fs.cut_power();
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        stats
    } else {
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        // No power cut: the kernel writes the page cache back in its own time.
        fs.sync_all().expect("writeback")
    };
    fs.unmount().expect("unmount");

    // What the disk holds: open it without the model (sled may repair its tail).
    let durable = dir.join("disk").join(name);
    let db = sled::open(&durable).expect("sled opens what was durable");
    let count = |prefix: &str| {
        keys(prefix)
            .filter(|k| db.contains_key(k.as_bytes()).expect("read"))
            .count()
    };
    (count("fsynced"), count("flushed"), stats)
}

#[test]
fn a_gateway_that_acknowledged_before_fsync_would_lose_data() {
    if let Some(path) = std::env::var_os(CHILD_ENV) {
        sled_child(Path::new(&path));
    }
    if !require_fuse() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");

    let (fsynced, flushed, _) = run_child(dir.path(), false, "kill-only");
    eprintln!(
        "negative control, kill -9 only: {fsynced}/200 fsynced keys, {flushed}/200 flushed keys"
    );
    assert_eq!(
        (fsynced, flushed),
        (200, 200),
        "after a kill -9 alone, everything sled wrote to the filesystem is there"
    );

    let (fsynced, flushed, cut) = run_child(dir.path(), true, "power-cut");
    eprintln!(
        "negative control, power cut: {fsynced}/200 fsynced keys, {flushed}/200 keys written \
         with Db::flush but no fsync; the cut dropped {} writes ({} B) in {} files",
        cut.writes_dropped, cut.bytes_dropped, cut.files_dropped
    );
    assert_eq!(fsynced, 200, "fsync'd data survives a power cut");
    assert!(
        cut.bytes_dropped > 0,
        "the cut dropped nothing: the model has no teeth"
    );
    assert_eq!(
        flushed, 0,
        "data that was written but not fsync'd must vanish at a power cut"
    );
}
