//! Crash test of the queue: a child process stores records as fast as it can (many
//! concurrent publishers, one acknowledging consumer) and prints each record the moment
//! `enqueue` says it is durable. The parent SIGKILLs it at a random moment, reopens the
//! queue, and checks that every record reported durable and not acknowledged is there,
//! intact and in per-device order. Rounds: 20, or `BLINDGATE_CRASH_ROUNDS`.
//!
//! Two consumers: one acknowledges every third record (segments never drain), the other
//! every record, [`LAG`] records behind, with 256 KiB segments: segments drain all the
//! time and their files are reused, so kills land in every step of a reuse.
//!
//! The child is this same test binary, re-run with `--ignored --exact crash_child`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use blindgate::queue::{Queue, QueueConfig, RecordId};
use bytes::Bytes;

const CHILD_DIR: &str = "BLINDGATE_CRASH_CHILD_DIR";
const CHILD_LAGS: &str = "BLINDGATE_CRASH_CHILD_LAGS";
const DEVICES: u32 = 8;
/// Records the lagging consumer leaves unacknowledged behind the newest.
const LAG: usize = 500;

/// The queue's settings; `small_segments`: 256 KiB segments (an 8 MiB cap).
fn config(path: &Path, small_segments: bool) -> QueueConfig {
    let mut config = QueueConfig::new(path);
    config.min_free_disk = 0;
    config.max_bytes = if small_segments { 8 << 20 } else { 1 << 30 };
    config.device_quota = config.max_bytes;
    config
}

fn payload(device: u32, n: u64) -> Vec<u8> {
    let mut bytes = format!("device {device} message {n} ").into_bytes();
    bytes.resize(200, u8::try_from(n % 251).unwrap_or(0));
    bytes
}

/// The child: runs until killed.
#[test]
#[ignore = "child process of queue_survives_kill_9_at_random_moments"]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let lags = std::env::var_os(CHILD_LAGS).is_some();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let queue = Queue::open(config(Path::new(&dir), lags)).expect("queue opens in child");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u32, RecordId)>();
        for device in 0..DEVICES {
            let queue = queue.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                for n in 0.. {
                    let id = queue
                        .enqueue(&format!("dev-{device}"), Bytes::from(payload(device, n)))
                        .await
                        .expect("enqueue in child");
                    println!("durable {device} {} {n}", id.0);
                    let _ = tx.send((device, id));
                }
            });
        }
        // The consumer acknowledges every third record, or every record LAG behind,
        // as the uplink would.
        let mut seen = 0u64;
        let mut behind = std::collections::VecDeque::new();
        while let Some(stored) = rx.recv().await {
            seen += 1;
            let due = if lags {
                behind.push_back(stored);
                if behind.len() > LAG {
                    behind.pop_front()
                } else {
                    None
                }
            } else {
                seen.is_multiple_of(3).then_some(stored)
            };
            if let Some((device, id)) = due {
                println!("acking {device} {}", id.0);
                queue
                    .ack(&format!("dev-{device}"), id)
                    .expect("ack in child");
            }
        }
    });
}

#[derive(Default)]
struct Reported {
    /// (device, record id) -> message number, for every record reported durable.
    durable: BTreeMap<(u32, u64), u64>,
    /// Records the child started to acknowledge: they may or may not remain.
    acked: BTreeSet<(u32, u64)>,
}

fn run_round(dir: &Path, kill_after: Duration, lags: bool) -> Reported {
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    if lags {
        command.env(CHILD_LAGS, "1");
    }
    let mut child = command
        .args([
            "--ignored",
            "--exact",
            "crash_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("child starts");
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut reported = Reported::default();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            match (fields.first().copied(), num(1), num(2), num(3)) {
                (Some("durable"), Some(d), Some(id), Some(n)) => {
                    reported.durable.insert((d as u32, id), n);
                }
                (Some("acking"), Some(d), Some(id), _) => {
                    reported.acked.insert((d as u32, id));
                }
                _ => {}
            }
        }
        reported
    });
    std::thread::sleep(kill_after);
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    reader.join().expect("reader")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_survives_kill_9_at_random_moments() {
    kill_rounds(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_reusing_drained_segment_files_survives_kill_9() {
    kill_rounds(true).await;
}

/// Kills and checks, round after round; `lags`: the consumer that drains segments.
async fn kill_rounds(lags: bool) {
    let rounds: u32 = std::env::var("BLINDGATE_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("queue");
    let mut expected: BTreeMap<(u32, u64), u64> = BTreeMap::new();
    let (mut total_durable, mut total_lost) = (0usize, 0usize);
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id());
    for round in 0..rounds {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let kill_after = Duration::from_millis(150 + seed % 600);
        let path_for_round = path.clone();
        let reported =
            tokio::task::spawn_blocking(move || run_round(&path_for_round, kill_after, lags))
                .await
                .expect("round");
        total_durable += reported.durable.len();
        for key in &reported.acked {
            expected.remove(key);
        }
        for (key, n) in &reported.durable {
            if !reported.acked.contains(key) {
                expected.insert(*key, *n);
            }
        }

        let queue = Queue::open(config(&path, lags)).expect("queue reopens after kill -9");
        let mut present: BTreeMap<(u32, u64), Vec<u8>> = BTreeMap::new();
        for device in 0..DEVICES {
            let records = queue
                .read_device(&format!("dev-{device}"), None, usize::MAX)
                .expect("reads");
            assert!(
                records.windows(2).all(|w| w[0].id < w[1].id),
                "round {round}: dev-{device} out of order"
            );
            for record in records {
                present.insert((device, record.id.0), record.payload.to_vec());
            }
        }
        let lost: Vec<_> = expected
            .iter()
            .filter(|(key, n)| present.get(key) != Some(&payload(key.0, **n)))
            .collect();
        total_lost += lost.len();
        assert!(
            lost.is_empty(),
            "round {round} (killed after {kill_after:?}): {} durable records lost or damaged, first {:?}",
            lost.len(),
            lost.first()
        );
        assert_eq!(queue.stats().quarantine_records, 0, "round {round}: damage");
        queue.close().await.expect("closes");
        drop(queue);
    }
    let (segments, reused) = log_files(&path.join("log"));
    let summary = format!(
        "queue crash test (lagging consumer: {lags}): {rounds} rounds, {total_durable} records reported durable, {total_lost} lost; the log has {segments} segments, {reused} in reused files"
    );
    // Written past the test harness's capture, so CI logs show the figures.
    writeln!(std::io::stdout(), "{summary}").expect("stdout");
    assert!(
        total_durable > 0,
        "the child never reported a durable record"
    );
    if lags {
        assert!(reused > 0, "no segment file was reused: {summary}");
    }
}

/// Segments in the log directory `dir`, and how many of them reuse an earlier segment's
/// file (format 2 header: magic, number, previous number not 0).
fn log_files(dir: &Path) -> (usize, usize) {
    let (mut segments, mut reused) = (0, 0);
    for entry in std::fs::read_dir(dir).expect("log directory") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "seg") {
            continue;
        }
        segments += 1;
        let bytes = std::fs::read(&path).expect("segment");
        if bytes.get(..8) == Some(b"BGQSEG02") && bytes.get(12..16) != Some(&[0; 4]) {
            reused += 1;
        }
    }
    (segments, reused)
}
