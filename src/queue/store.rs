//! The sled database behind the queue, and how it is replaced while the gateway runs.
//!
//! - **Reopen.** After one failed write (for example `ENOSPC`), sled 0.34 refuses every
//!   later write and removal of that `Db` with the same error, for good: its "global
//!   error" is only reset by opening the database again. So after a storage failure the
//!   queue drops its handles and opens the directory again; sled's recovery then keeps
//!   everything that was flushed, as after a crash.
//! - **Rebuild.** sled does not give space back to the filesystem after a drain (its
//!   file keeps its size until later writes let it clean and truncate segments). When
//!   the OS reserve refuses new records while the file is mostly freed space, the queue
//!   dumps the live records into one flat file (synced, with a checksum), deletes the
//!   old database and creates a fresh one from the dump. A rebuild a crash interrupted
//!   is finished from the dump on the next open.
//! - **Record ids** must keep increasing across both, or a new record could sort before
//!   (or overwrite) an old one of the same device. A fresh database's id generator
//!   starts at 0 again, so every database stores an `id_base` in its `meta` tree; a
//!   record id is `id_base + generate_id()`, and on open the base is raised if a stored
//!   record already has an id at or above the next one.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::durable::DurableFiles;
use super::ledger::Ledger;
use super::marker;
use super::rebuild::{finish_interrupted_rebuild, keep_readable, rebuild_path};
use super::record::{self, RecordId};
use super::salvage::SalvagePlan;
use super::{QueueConfig, QueueCounters, QueueError, quarantine_record};

/// The key of the id base in the `meta` tree (u64, big endian).
pub(super) const ID_BASE: &[u8] = b"id_base";
/// How long a reopen waits for the last handles of the old database to be dropped
/// (sled's directory lock is released then).
pub(super) const LOCK_WAIT: Duration = Duration::from_secs(5);

/// An open database and its trees.
pub(super) struct Store {
    pub(super) db: sled::Db,
    pub(super) records: sled::Tree,
    pub(super) quarantine: sled::Tree,
    id_base: u64,
    /// What must be fsync'd after each flush (sled itself does not).
    files: DurableFiles,
}

impl Store {
    /// Opens the queue directory (finishing an interrupted rebuild first), recovers
    /// every intact record and quarantines damaged ones.
    ///
    /// # Errors
    /// [`QueueError`] if the directory cannot be opened even after moving a damaged
    /// database aside.
    pub(super) fn open(
        config: &QueueConfig,
        counters: &QueueCounters,
    ) -> Result<(Self, Ledger), QueueError> {
        finish_interrupted_rebuild(config).map_err(|source| QueueError::Rebuild {
            path: config.path.clone(),
            source,
        })?;
        let marker = marker::take(config);
        let plan = marker.map(|marker| SalvagePlan::prepare(config, marker, counters));
        let (store, ledger) = Self::open_recovered(config, counters, plan.as_ref())?;
        if let Some(plan) = &plan {
            let lost = plan.count_lost(&store, &ledger);
            plan.discard_copy_if_unneeded(lost, counters);
            if lost > 0 {
                counters
                    .lost_at_open
                    .fetch_add(lost, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(
                    lost,
                    expected = plan.marker.records + plan.marker.quarantined,
                    "records the last clean stop left in the queue are gone: damaged in sled's files and not found intact anywhere"
                );
            }
        }
        Ok((store, ledger))
    }

    fn open_recovered(
        config: &QueueConfig,
        counters: &QueueCounters,
        plan: Option<&SalvagePlan>,
    ) -> Result<(Self, Ledger), QueueError> {
        let db = open_db(config, counters)?;
        let storage = |source| QueueError::Storage {
            path: config.path.clone(),
            source: Arc::new(source),
        };
        // Reading damaged pages may panic inside sled: treated like a read error.
        let recovered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Self::recover(db.clone(), &config.path, counters, plan)
        }))
        .unwrap_or_else(|_| Err(sled::Error::ReportableBug("sled panicked reading".into())));
        match recovered {
            Ok(opened) => Ok(opened),
            Err(sled::Error::Io(err)) => Err(storage(sled::Error::Io(err))),
            // sled opened it but cannot read some of its pages: keep what it can read.
            Err(err) => {
                if let Err(failed) = keep_readable(config, db, &err, counters) {
                    // Not even that: set it aside whole and start a fresh one.
                    let cause = std::error::Error::source(&failed).map(ToString::to_string);
                    tracing::error!(error = %failed, cause, "cannot keep what is readable of the queue database; setting it aside whole");
                    if config.path.exists() {
                        move_aside(&config.path, &damaged_aside_path(&config.path), counters)?;
                    }
                    let _ = fs::remove_file(rebuild_path(&config.path));
                }
                let db = open_db(config, counters)?;
                Self::recover(db, &config.path, counters, plan).map_err(storage)
            }
        }
    }

    /// Like [`Store::open`], but retries for a while when the directory is still locked
    /// by handles of the database being replaced. Blocking.
    pub(super) fn reopen(
        config: &QueueConfig,
        counters: &QueueCounters,
    ) -> Result<(Self, Ledger), QueueError> {
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match Self::open(config, counters) {
                Err(QueueError::Storage { source, .. })
                    if is_lock_conflict(&source) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    fn recover(
        db: sled::Db,
        path: &Path,
        counters: &QueueCounters,
        plan: Option<&SalvagePlan>,
    ) -> sled::Result<(Self, Ledger)> {
        let records = db.open_tree("records")?;
        let quarantine = db.open_tree("quarantine")?;
        let meta = db.open_tree("meta")?;
        if let Some(plan) = plan {
            plan.restore(&records, path, counters)?;
        }
        let (ledger, max_id) = recover(&records, &quarantine, counters)?;
        let stored_base = meta
            .get(ID_BASE)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        // The next id must be above every stored one (a lost or damaged base, or ids
        // from a generator that was reset, would otherwise collide).
        let probe = db.generate_id()?;
        let mut id_base = stored_base;
        if let Some(max_id) = max_id
            && stored_base.saturating_add(probe) <= max_id
        {
            id_base = max_id.saturating_add(1).saturating_sub(probe);
            meta.insert(ID_BASE, &id_base.to_be_bytes())?;
            tracing::warn!(
                stored_base,
                id_base,
                "queue id base raised above the highest stored record id"
            );
        }
        db.flush()?;
        let files = DurableFiles::open(path)?;
        files.sync()?;
        let store = Self {
            db,
            records,
            quarantine,
            id_base,
            files,
        };
        Ok((store, ledger))
    }

    /// Flushes sled and then makes what it wrote durable (see [`super::durable`]):
    /// only after this returned `Ok` may a record be acknowledged. Returns the bytes
    /// sled flushed.
    ///
    /// # Errors
    /// sled's error, or the OS error of the sync as [`sled::Error::Io`].
    pub(super) async fn flush_durable(self: &Arc<Self>) -> sled::Result<usize> {
        let flushed = self.db.flush_async().await?;
        let store = Arc::clone(self);
        tokio::task::spawn_blocking(move || store.files.sync())
            .await
            .map_err(|join| sled::Error::Io(std::io::Error::other(join.to_string())))??;
        Ok(flushed)
    }

    /// A new record id, above every id this queue gave before.
    pub(super) fn next_id(&self) -> sled::Result<RecordId> {
        Ok(RecordId(
            self.id_base.saturating_add(self.db.generate_id()?),
        ))
    }
}

/// True if opening failed only because the directory is still locked.
fn is_lock_conflict(error: &sled::Error) -> bool {
    matches!(error, sled::Error::Io(e) if e.to_string().contains("could not acquire lock"))
}

/// Scans every record: counts the intact ones, quarantines the damaged ones. Also
/// returns the highest record id found in either tree.
fn recover(
    records: &sled::Tree,
    quarantine: &sled::Tree,
    counters: &QueueCounters,
) -> sled::Result<(Ledger, Option<u64>)> {
    let mut ledger = Ledger::default();
    let mut damaged = Vec::new();
    let mut max_id = None;
    let mut see = |key: &[u8]| {
        if let Ok((_, id)) = record::decode_key(key) {
            max_id = max_id.max(Some(id.0));
        }
    };
    for item in records.iter() {
        let (key, value) = item?;
        see(&key);
        match record::decode(&key, &value) {
            Ok(record) => ledger.add(&record.device_id, (key.len() + value.len()) as u64),
            Err(_) => damaged.push((key, value)),
        }
    }
    for item in quarantine.iter() {
        let (key, _) = item?;
        see(&key);
    }
    for (key, value) in damaged {
        quarantine_record(records, quarantine, &key, &value, counters);
    }
    Ok((ledger, max_id))
}

pub(super) fn sled_config(config: &QueueConfig, path: &Path) -> sled::Config {
    sled::Config::new()
        .path(path)
        .cache_capacity(config.cache_size)
        .flush_every_ms(Some(500))
}

/// Opens the database with sled, which recovers it from its log. If sled refuses it
/// (not for an I/O error), retries once with sled's small `conf` file set aside (sled
/// writes a fresh one; the queue always uses sled's default settings), then sets the
/// whole database aside and starts a fresh one.
fn open_db(config: &QueueConfig, counters: &QueueCounters) -> Result<sled::Db, QueueError> {
    let path = &config.path;
    let storage = |source| QueueError::Storage {
        path: path.clone(),
        source: Arc::new(source),
    };
    // sled's recovery reads bytes from disk; a panic on some damage would otherwise
    // take the gateway down at every start.
    let attempt = || match std::panic::catch_unwind(|| sled_config(config, path).open()) {
        Ok(Ok(db)) => Ok(Ok(db)),
        Ok(Err(sled::Error::Io(err))) => Err(storage(sled::Error::Io(err))),
        Ok(Err(err)) => Ok(Err(err.to_string())),
        Err(_) => Ok(Err("sled panicked while opening it".to_owned())),
    };
    let mut err = match attempt()? {
        Ok(db) => return Ok(db),
        Err(err) => err,
    };
    let conf = path.join("conf");
    let conf_aside = path.join(format!("conf.damaged-{}", crate::clock::now_ms() / 1000));
    if conf.is_file() && fs::rename(&conf, &conf_aside).is_ok() {
        match attempt()? {
            Ok(db) => {
                tracing::warn!(error = %err, aside = %conf_aside.display(), "the queue's sled conf file was damaged; set it aside and wrote a new one");
                return Ok(db);
            }
            Err(again) => {
                let _ = fs::remove_file(&conf);
                let _ = fs::rename(&conf_aside, &conf);
                err = again;
            }
        }
    }
    // sled's snapshot (written at every open) points into the log; damage there makes
    // sled refuse the database. Without it sled replays its whole log instead. A copy
    // of the damaged database is kept for offline inspection (`blindgate queue inspect`).
    let aside = damaged_aside_path(path);
    let copied = copy_dir(path, &aside);
    if copied.is_ok() {
        counters
            .databases_moved_aside
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let snapshots = fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("snap."));
        for snapshot in snapshots {
            let _ = fs::remove_file(snapshot.path());
        }
        match attempt()? {
            Ok(db) => {
                tracing::error!(error = %err, aside = %aside.display(), "queue database could not be opened; recovered it from its log without sled's snapshot (a copy of the damaged one is kept)");
                return Ok(db);
            }
            Err(again) => err = again,
        }
        // The copy is the damaged database; start a fresh one.
        fs::remove_dir_all(path).map_err(|source| QueueError::MoveAside {
            path: path.clone(),
            source,
        })?;
    } else {
        let _ = fs::remove_dir_all(&aside);
        move_aside(path, &aside, counters)?;
    }
    // Corrupt beyond sled's own recovery: keep the gateway running on a fresh queue.
    tracing::error!(error = %err, path = %path.display(), aside = %aside.display(), "queue database cannot be opened; set it aside and started a new one");
    sled_config(config, path).open().map_err(storage)
}

/// Renames a damaged database to `aside` (kept for `blindgate queue inspect`) and
/// counts it.
pub(super) fn move_aside(
    path: &Path,
    aside: &Path,
    counters: &QueueCounters,
) -> Result<(), QueueError> {
    fs::rename(path, aside).map_err(|source| QueueError::MoveAside {
        path: path.to_owned(),
        source,
    })?;
    counters
        .databases_moved_aside
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Copies a database directory, keeping each file's modification time (so the copy has
/// the fingerprint of the original, see `marker`).
pub(super) fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new().mode(0o700).create(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
            let modified = entry.metadata()?.modified()?;
            fs::File::options()
                .write(true)
                .open(&target)?
                .set_modified(modified)?;
        }
    }
    Ok(())
}

/// `queue` → `queue.<suffix>`, in the same directory.
pub(super) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    path.with_file_name(name)
}

/// The copies of damaged databases kept next to the queue (`queue.damaged-*`).
pub(crate) fn damaged_copies(path: &Path) -> BTreeSet<PathBuf> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return BTreeSet::new();
    };
    let prefix = format!("{}.damaged-", name.to_string_lossy());
    fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// A new name for a damaged database kept for inspection: `queue.damaged-<unix
/// time>`, with `-2`, `-3`, ... if that exists already.
pub(super) fn damaged_aside_path(path: &Path) -> PathBuf {
    let base = format!("damaged-{}", crate::clock::now_ms() / 1000);
    let mut candidate = sibling(path, &base);
    let mut n = 2;
    while candidate.exists() {
        candidate = sibling(path, &format!("{base}-{n}"));
        n += 1;
    }
    candidate
}

/// The file holding the queue's emergency reserve of disk space.
pub(crate) fn emergency_reserve_path(path: &Path) -> PathBuf {
    sibling(path, "reserve")
}

/// Makes sure the emergency reserve file exists with `size` bytes really allocated
/// (zeros written, synced). False if it could not be written (no room).
pub(super) fn keep_emergency_reserve(config: &QueueConfig, size: u64) -> bool {
    use std::io::Write as _;
    let file = emergency_reserve_path(&config.path);
    if fs::metadata(&file).is_ok_and(|m| m.len() == size) {
        return true;
    }
    let written = (|| -> std::io::Result<()> {
        let mut out = fs::File::create(&file)?;
        let zeros = vec![0u8; 64 << 10];
        let mut left = size;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            out.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        out.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&file);
    }
    written.is_ok()
}

/// Deletes the emergency reserve file; true if there was one.
pub(super) fn release_emergency_reserve(config: &QueueConfig) -> bool {
    fs::remove_file(emergency_reserve_path(&config.path)).is_ok()
}

pub(super) fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => fs::File::open(parent)?.sync_all(),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::rebuild::{Dump, rebuild, replaced_path};

    #[allow(clippy::unwrap_used, reason = "test")]
    fn filled(dir: &Path) -> (QueueConfig, QueueCounters, Store, u64) {
        let mut config = QueueConfig::new(dir.join("queue"));
        config.min_free_disk = 0;
        let counters = QueueCounters::default();
        let (store, _) = Store::open(&config, &counters).unwrap();
        let mut max = 0;
        for n in 0..50u8 {
            let id = store.next_id().unwrap();
            max = id.0;
            let key = record::encode_key(if n % 2 == 0 { "a" } else { "b" }, id);
            store
                .records
                .insert(&key, record::encode_value(&key, 7, &[n; 40]))
                .unwrap();
        }
        store.quarantine.insert(b"\x01zjunk", &b"bad"[..]).unwrap();
        store.db.flush().unwrap();
        (config, counters, store, max)
    }

    #[test]
    #[allow(clippy::unwrap_used, reason = "test")]
    fn an_interrupted_rebuild_is_finished_or_undone_at_every_step() {
        for step in 0..6 {
            let dir = tempfile::tempdir().unwrap();
            let (config, counters, store, max) = filled(dir.path());
            let dump = rebuild_path(&config.path);
            let next = store.next_id().unwrap().0;
            Dump::write(&store.db, next, &dump, false).unwrap();
            drop(store);
            match step {
                // Crash right after the dump: the old database is still there.
                0 => {}
                // Crash while writing the dump: it is incomplete.
                1 => {
                    let bytes = fs::read(&dump).unwrap();
                    fs::write(&dump, &bytes[..bytes.len() - 3]).unwrap();
                }
                // Crash between renaming the old database and deleting it.
                2 => fs::rename(&config.path, replaced_path(&config.path)).unwrap(),
                // Crash after deleting it.
                3 => fs::remove_dir_all(&config.path).unwrap(),
                // Crash while importing: a fresh database with part of the data.
                4 => {
                    fs::remove_dir_all(&config.path).unwrap();
                    let db = sled_config(&config, &config.path).open().unwrap();
                    db.open_tree("records").unwrap().insert(b"x", b"y").unwrap();
                    db.flush().unwrap();
                }
                // The whole rebuild, then open.
                _ => fs::remove_file(&dump).unwrap(),
            }
            let (store, ledger) = Store::open(&config, &counters).unwrap();
            assert_eq!(ledger.total().records, 50, "step {step}");
            assert_eq!(store.records.len(), 50, "step {step}");
            assert_eq!(store.quarantine.len(), 1, "step {step}");
            assert!(!dump.exists() && !replaced_path(&config.path).exists());
            assert!(store.next_id().unwrap().0 > max, "step {step}: ids go on");
        }
    }

    #[test]
    #[allow(clippy::unwrap_used, reason = "test")]
    fn a_rebuild_keeps_every_record_and_the_ids_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let (config, counters, store, max) = filled(dir.path());
        let before: Vec<_> = store.records.iter().map(Result::unwrap).collect();
        let (store, ledger) = rebuild(&config, Arc::new(store), &counters)
            .map_err(|(_, e)| e)
            .unwrap();
        let after: Vec<_> = store.records.iter().map(Result::unwrap).collect();
        assert_eq!(before, after);
        assert_eq!(ledger.total().records, 50);
        assert_eq!(store.quarantine.len(), 1);
        assert!(store.next_id().unwrap().0 > max);
        assert!(!rebuild_path(&config.path).exists());
    }

    #[test]
    #[allow(clippy::unwrap_used, reason = "test")]
    fn a_damaged_conf_file_is_rewritten_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (config, counters, store, _) = filled(dir.path());
        drop(store);
        let conf = config.path.join("conf");
        let mut bytes = fs::read(&conf).unwrap();
        bytes.truncate(30);
        fs::write(&conf, bytes).unwrap();
        let (store, _) = Store::open(&config, &counters).unwrap();
        assert_eq!(store.records.len(), 50);
        assert_eq!(
            counters
                .databases_moved_aside
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
}
