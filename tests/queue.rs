//! The queue on a real sled directory: durability, order, caps, quarantine.

use std::sync::atomic::Ordering;

use blindgate::queue::{EnqueueError, Limit, Overflow, Queue, QueueConfig, RecordId};
use bytes::Bytes;

fn config(dir: &tempfile::TempDir) -> QueueConfig {
    let mut config = QueueConfig::new(dir.path().join("queue"));
    config.min_free_disk = 0;
    config
}

#[tokio::test]
async fn records_survive_reopen_until_acknowledged_in_per_device_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ids = Vec::new();
    {
        let queue = Queue::open(config(&dir)).expect("opens");
        for n in 0..10u8 {
            let device = if n % 2 == 0 { "pump-17" } else { "meter-9" };
            let id = queue
                .enqueue(device, Bytes::from(vec![n; 100]))
                .await
                .expect("stored");
            ids.push((device, id, n));
        }
        let (device, first, _) = ids[0];
        assert!(queue.ack(device, first).expect("acks"));
        assert!(
            !queue.ack(device, first).expect("acks"),
            "second ack is a no-op"
        );
        queue.close().await.expect("closes");
    }
    let queue = Queue::open(config(&dir)).expect("reopens");
    assert_eq!(
        queue.devices(),
        vec!["meter-9".to_owned(), "pump-17".to_owned()]
    );
    let pump = queue.read_device("pump-17", None, 100).expect("reads");
    let expected: Vec<u8> = vec![2, 4, 6, 8];
    assert_eq!(
        pump.iter().map(|r| r.payload[0]).collect::<Vec<_>>(),
        expected
    );
    assert!(pump.windows(2).all(|w| w[0].id < w[1].id));
    let after = queue
        .read_device("pump-17", Some(pump[1].id), 1)
        .expect("reads");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].id, pump[2].id);
    let stats = queue.stats();
    assert_eq!(stats.total.records, 9);
    assert_eq!(stats.devices, 2);
    assert!(stats.oldest_arrival_ms.is_some());
}

#[tokio::test]
async fn record_ids_keep_increasing_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = {
        let queue = Queue::open(config(&dir)).expect("opens");
        let id = queue
            .enqueue("d", Bytes::from_static(b"x"))
            .await
            .expect("stored");
        queue.ack("d", id).expect("acks");
        queue.close().await.expect("closes");
        id
    };
    let queue = Queue::open(config(&dir)).expect("reopens");
    let second = queue
        .enqueue("d", Bytes::from_static(b"y"))
        .await
        .expect("stored");
    assert!(second > first, "{second:?} after {first:?}");
}

#[tokio::test]
async fn concurrent_publishes_share_fsyncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(config(&dir)).expect("opens");
    let mut tasks = Vec::new();
    for t in 0..50 {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..20u32 {
                queue
                    .enqueue(&format!("dev-{t}"), Bytes::from(n.to_be_bytes().to_vec()))
                    .await
                    .expect("stored");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let counters = queue.counters();
    let commits = counters.commits.load(Ordering::Relaxed);
    assert_eq!(counters.committed.load(Ordering::Relaxed), 1000);
    assert!(commits < 500, "1000 records took {commits} fsyncs");
}

/// Devices whose data came in at the same moment share an fsync, even though the
/// writer, woken by the first of them, would run before the others (tokio runs a task
/// woken by the running one next). Without that, each round took two fsyncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn publishes_ready_at_the_same_moment_share_one_fsync() {
    const ROUNDS: u64 = 10;
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Queue::open(config(&dir)).expect("opens");
    let before = queue.counters().commits.load(Ordering::Relaxed);
    for _ in 0..ROUNDS {
        let gate = std::sync::Arc::new(tokio::sync::RwLock::new(()));
        let closed = gate.clone().write_owned().await;
        let waiting = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for t in 0..10 {
            let (queue, gate, waiting) = (queue.clone(), gate.clone(), waiting.clone());
            tasks.push(tokio::spawn(async move {
                waiting.fetch_add(1, Ordering::Relaxed);
                let _open = gate.read().await;
                queue
                    .enqueue(&format!("dev-{t}"), Bytes::from_static(b"reading"))
                    .await
                    .expect("stored");
            }));
        }
        // Every task waits at the gate; opening it (on the runtime's thread, as the I/O
        // driver would) makes all ten runnable at once.
        while waiting.load(Ordering::Relaxed) < 10 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        tokio::spawn(async move { drop(closed) });
        for task in tasks {
            task.await.expect("task");
        }
    }
    let commits = queue.counters().commits.load(Ordering::Relaxed) - before;
    assert_eq!(
        queue.counters().committed.load(Ordering::Relaxed),
        10 * ROUNDS
    );
    // Mostly one fsync a round; now and then (one in ten here) a round takes two.
    assert!(
        commits <= ROUNDS + ROUNDS / 2,
        "{ROUNDS} rounds of 10 records took {commits} fsyncs"
    );
}

#[tokio::test]
async fn refuse_policy_refuses_at_device_quota_and_queue_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(&dir);
    cfg.device_quota = 1100;
    cfg.max_bytes = 1500;
    let queue = Queue::open(cfg).expect("opens");
    let payload = Bytes::from(vec![0u8; 300]);
    let mut stored = 0;
    loop {
        match queue.enqueue("a", payload.clone()).await {
            Ok(_) => stored += 1,
            Err(EnqueueError::Full(Limit::DeviceQuota)) => break,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(stored, 3);
    queue
        .enqueue("b", payload.clone())
        .await
        .expect("b has room");
    let err = queue.enqueue("c", payload.clone()).await.expect_err("cap");
    assert!(
        matches!(err, EnqueueError::Full(Limit::QueueBytes)),
        "{err}"
    );
    // Acknowledging makes room again; refused records were never stored.
    let first = queue.read_device("a", None, 1).expect("reads")[0].id;
    queue.ack("a", first).expect("acks");
    queue.enqueue("c", payload).await.expect("room after ack");
    assert_eq!(queue.stats().total.records, 4);
}

#[tokio::test]
async fn drop_oldest_policy_drops_and_counts_each_drop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(&dir);
    cfg.device_quota = 1100;
    cfg.max_bytes = 10_000;
    cfg.overflow = Overflow::DropOldest;
    let queue = Queue::open(cfg).expect("opens");
    let mut ids: Vec<RecordId> = Vec::new();
    for n in 0..10u8 {
        ids.push(
            queue
                .enqueue("a", Bytes::from(vec![n; 300]))
                .await
                .expect("stored"),
        );
    }
    let left = queue.read_device("a", None, 100).expect("reads");
    assert_eq!(left.len(), 3);
    assert_eq!(
        left.iter().map(|r| r.payload[0]).collect::<Vec<_>>(),
        vec![7, 8, 9]
    );
    let dropped = queue
        .counters()
        .dropped_device_quota
        .load(Ordering::Relaxed);
    assert_eq!(dropped, 7);
}

#[tokio::test]
async fn damaged_records_are_quarantined_and_the_rest_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("queue");
    let mut kept = Vec::new();
    {
        let queue = Queue::open(config(&dir)).expect("opens");
        for n in 0..5u8 {
            kept.push(
                queue
                    .enqueue("d", Bytes::from(vec![n; 50]))
                    .await
                    .expect("stored"),
            );
        }
        queue.close().await.expect("closes");
    }
    // Damage one record's payload behind the queue's back, as a bad sector would: the
    // segment holding the five frames, the third payload (fifty bytes of 2).
    let segments: Vec<_> = std::fs::read_dir(path.join("log"))
        .expect("log dir")
        .map(|e| e.expect("entry").path())
        .collect();
    let mut damaged = 0;
    for segment in segments {
        let mut bytes = std::fs::read(&segment).expect("read");
        if let Some(at) = bytes.windows(50).position(|w| w.iter().all(|&b| b == 2)) {
            bytes[at + 49] ^= 0xFF;
            std::fs::write(&segment, &bytes).expect("write");
            damaged += 1;
        }
    }
    assert_eq!(damaged, 1, "the third payload is in one segment");
    let queue = Queue::open(config(&dir)).expect("reopens");
    let records = queue.read_device("d", None, 100).expect("reads");
    let payloads: Vec<u8> = records.iter().map(|r| r.payload[0]).collect();
    assert_eq!(payloads, vec![0, 1, 3, 4]);
    assert_eq!(queue.counters().quarantined.load(Ordering::Relaxed), 1);
    let stats = queue.stats();
    assert_eq!(stats.quarantine_records, 1);
    assert_eq!(stats.total.records, 4);
    // The last stop was clean and left five: the damaged one is counted as lost.
    assert_eq!(queue.counters().lost_at_open.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_queue_an_earlier_release_kept_in_sled_is_moved_into_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("queue");
    {
        let db = sled::open(&path).expect("sled opens");
        let records = db.open_tree("records").expect("tree");
        for (device, id) in [("a", 3u64), ("b", 4), ("a", 7)] {
            let key = blindgate::queue::record::encode_key(device, RecordId(id));
            let value = blindgate::queue::record::encode_value(&key, 1_000 + id, &[id as u8; 20]);
            records.insert(key, value).expect("insert");
        }
        db.flush().expect("flush");
    }
    wait_for_sled_lock(&path);
    let queue = Queue::open(config(&dir)).expect("opens and migrates");
    assert_eq!(queue.counters().migrated.load(Ordering::Relaxed), 3);
    assert!(!path.join("db").exists() && !path.join("conf").exists());
    let a: Vec<u64> = queue
        .read_device("a", None, 10)
        .expect("reads")
        .iter()
        .map(|r| r.id.0)
        .collect();
    assert_eq!(a, [3, 7]);
    let b = queue.read_device("b", None, 10).expect("reads");
    assert_eq!(
        (b[0].id.0, b[0].arrival_ms, b[0].payload.as_ref()),
        (4, 1_004, &[4u8; 20][..])
    );
    // New ids continue above the migrated ones.
    let next = queue
        .enqueue("b", Bytes::from_static(b"new"))
        .await
        .expect("stored");
    assert!(next.0 > 7);
    queue.close().await.expect("closes");
}

/// Waits until no sled handle holds the lock on `dir`'s database: sled's background
/// writes may keep it for a moment after the last `Db` was dropped.
fn wait_for_sled_lock(dir: &std::path::Path) {
    use std::time::{Duration, Instant};
    let db = std::fs::File::open(dir.join("db")).expect("sled's db file");
    let deadline = Instant::now() + Duration::from_secs(10);
    while rustix::fs::flock(&db, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        assert!(Instant::now() < deadline, "sled keeps its lock");
        std::thread::sleep(Duration::from_millis(10));
    }
}
