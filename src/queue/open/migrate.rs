//! Moving a queue an earlier release kept in sled (sled's `conf`, `db`, `blobs/` and
//! `snap.*` in the queue directory, one key per record) into the segment log.
//!
//! Every record sled gives back is appended to the log with its key (its id) and
//! arrival time, the log is synced, and only then are sled's files removed. A crash in
//! between migrates again at the next open; the second copy of a record in the log has
//! the same id and the index keeps one (`Index::insert`). Records that fail their
//! checksum are counted as quarantined. A database sled cannot open at all is moved
//! aside (`sled.damaged-<time>`) and counted, so the gateway starts.

use std::path::Path;
use std::sync::atomic::Ordering;

use super::super::record;
use super::super::segments::{Append, DEFAULT_SEGMENT_SIZE, SegmentLog};
use super::super::{QueueConfig, QueueCounters, QueueError};
use super::log_path;

/// Records appended to the log per write.
const BATCH: usize = 1024;

/// True if the queue directory holds an earlier release's sled database.
fn has_sled(path: &Path) -> bool {
    path.join("conf").exists() || path.join("db").exists()
}

/// Removes what an earlier release kept next to its queue that means nothing now (its
/// clean-stop marker `queue.clean`, its 2 MiB emergency reserve `queue.reserve`), and
/// warns about an interrupted rebuild it left (`queue.rebuild`, `queue.replaced`: they
/// may hold records; an earlier release finishes the rebuild when it starts), which is
/// kept.
pub(in crate::queue) fn tidy_earlier_release(path: &Path) {
    for suffix in ["clean", "reserve"] {
        let leftover = sibling(path, suffix);
        match std::fs::remove_file(&leftover) {
            Ok(()) => {
                tracing::info!(file = %leftover.display(), "removed a file an earlier release kept next to its queue")
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(error = %err, file = %leftover.display(), "cannot remove a file an earlier release kept next to its queue")
            }
        }
    }
    for suffix in ["rebuild", "replaced"] {
        let leftover = sibling(path, suffix);
        if leftover.exists() {
            tracing::error!(
                path = %leftover.display(),
                "an earlier release's interrupted queue rebuild left this; it may hold records this release does not read: start the earlier release once to finish it, or keep it for inspection"
            );
        }
    }
}

/// `<queue>.<suffix>`, next to the queue directory.
fn sibling(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    path.with_file_name(name)
}

/// Migrates the sled queue at `config.path`, if there is one.
///
/// # Errors
/// [`QueueError`] if the log cannot be written or sled's files cannot be removed or
/// moved aside; then nothing was lost (sled's files are still there).
pub(in crate::queue) fn from_sled(
    config: &QueueConfig,
    counters: &QueueCounters,
) -> Result<(), QueueError> {
    let path = &config.path;
    if !has_sled(path) {
        return Ok(());
    }
    let storage = |source| QueueError::storage(path, source);
    let db = match sled::Config::new().path(path).open() {
        Ok(db) => db,
        Err(sled::Error::Io(err)) => return Err(storage(err)),
        Err(err) => {
            tracing::error!(error = %err, "the queue of an earlier release cannot be opened by sled; moving it aside");
            return move_sled_aside(path, counters);
        }
    };
    let records = db
        .open_tree("records")
        .map_err(|e| storage(std::io::Error::other(e)))?;
    let (log, _) =
        SegmentLog::open(&log_path(path), DEFAULT_SEGMENT_SIZE, |_, _| true).map_err(storage)?;
    let mut batch: Vec<record::Record> = Vec::with_capacity(BATCH);
    let mut moved = 0u64;
    for item in records.iter() {
        let Ok((key, value)) = item else {
            counters.quarantined.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        match record::decode(&key, &value) {
            Ok(record) => batch.push(record),
            Err(_) => {
                counters.quarantined.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        }
        if batch.len() == BATCH {
            moved += append(&log, &mut batch).map_err(storage)?;
        }
    }
    moved += append(&log, &mut batch).map_err(storage)?;
    drop(log);
    drop(records);
    drop(db);
    remove_sled_files(path).map_err(storage)?;
    counters.migrated.fetch_add(moved, Ordering::Relaxed);
    tracing::info!(
        records = moved,
        "moved the queue of an earlier release from sled into the log"
    );
    Ok(())
}

/// Appends and syncs `batch`, then empties it; returns how many it held.
fn append(log: &SegmentLog, batch: &mut Vec<record::Record>) -> std::io::Result<u64> {
    if batch.is_empty() {
        return Ok(0);
    }
    let keys: Vec<Vec<u8>> = batch
        .iter()
        .map(|r| record::encode_key(&r.device_id, r.id))
        .collect();
    let frames: Vec<Append<'_>> = batch
        .iter()
        .zip(&keys)
        .map(|(r, key)| Append {
            key,
            arrival_ms: r.arrival_ms,
            payload: &r.payload,
        })
        .collect();
    log.append(&frames)?;
    let count = batch.len() as u64;
    batch.clear();
    Ok(count)
}

/// sled's files of a database at `path`, and the earlier release's clean-stop marker.
fn sled_files(path: &Path) -> Vec<std::path::PathBuf> {
    let mut files = vec![path.join("conf"), path.join("db"), path.join("blobs")];
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("snap.") {
                files.push(entry.path());
            }
        }
    }
    files
}

fn remove_sled_files(path: &Path) -> std::io::Result<()> {
    // `conf` last: while it exists, the next open migrates again.
    let mut files = sled_files(path);
    files.rotate_left(1);
    for file in files {
        let removed = if file.is_dir() {
            std::fs::remove_dir_all(&file)
        } else {
            std::fs::remove_file(&file)
        };
        match removed {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn move_sled_aside(path: &Path, counters: &QueueCounters) -> Result<(), QueueError> {
    let aside = path.join(format!("sled.damaged-{}", crate::clock::now_ms()));
    let moved = std::fs::create_dir(&aside).and_then(|()| {
        for file in sled_files(path) {
            if file.exists() {
                let name = file.file_name().map(ToOwned::to_owned).unwrap_or_default();
                std::fs::rename(&file, aside.join(name))?;
            }
        }
        Ok(())
    });
    moved.map_err(|source| QueueError::MoveAside {
        path: path.to_owned(),
        source,
    })?;
    counters
        .databases_moved_aside
        .fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::super::{QueueConfig, QueueCounters, record};
    use super::from_sled;
    use std::sync::atomic::Ordering;

    #[test]
    fn an_earlier_release_s_marker_and_reserve_are_removed_and_a_rebuild_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = dir.path().join("queue");
        for name in ["queue.clean", "queue.reserve", "queue.rebuild"] {
            std::fs::write(dir.path().join(name), b"x").expect("write");
        }
        super::tidy_earlier_release(&queue);
        assert!(!dir.path().join("queue.clean").exists());
        assert!(!dir.path().join("queue.reserve").exists());
        assert!(
            dir.path().join("queue.rebuild").exists(),
            "may hold records"
        );
    }

    #[test]
    fn every_record_of_a_sled_queue_moves_into_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = sled::open(dir.path()).expect("sled");
            let records = db.open_tree("records").expect("tree");
            for id in 1..=3000u64 {
                let key = record::encode_key("dev", record::RecordId(id));
                records
                    .insert(&key, record::encode_value(&key, id, b"payload"))
                    .expect("insert");
            }
            let key = record::encode_key("dev", record::RecordId(9999));
            records.insert(&key, b"damaged".as_slice()).expect("insert");
            db.flush().expect("flush");
        }
        wait_for_sled_lock(dir.path());
        let counters = QueueCounters::default();
        from_sled(&QueueConfig::new(dir.path()), &counters).expect("migrate");
        assert_eq!(counters.migrated.load(Ordering::Relaxed), 3000);
        assert_eq!(counters.quarantined.load(Ordering::Relaxed), 1);
        assert!(!dir.path().join("conf").exists() && !dir.path().join("db").exists());
        let mut ids = Vec::new();
        super::SegmentLog::open(&super::log_path(dir.path()), 1 << 20, |_, frame| {
            ids.push(record::decode_key(frame.key).expect("key").1.0);
            true
        })
        .expect("log");
        assert_eq!(ids, (1..=3000).collect::<Vec<_>>());
    }

    /// Waits until no sled handle holds the lock on `dir`'s database: sled's background
    /// writes may keep it for a moment after the last `Db` was dropped.
    fn wait_for_sled_lock(dir: &std::path::Path) {
        use std::time::{Duration, Instant};
        let db = std::fs::File::open(dir.join("db")).expect("sled's db file");
        let deadline = Instant::now() + Duration::from_secs(10);
        while rustix::fs::flock(&db, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err()
        {
            assert!(Instant::now() < deadline, "sled keeps its lock");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
