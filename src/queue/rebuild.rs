//! Rebuilding the queue's database from a flat dump of its live records: to give disk
//! space back after a drain (sled never shrinks its file), to keep what is readable of
//! a database with unreadable pages, and to finish either after a crash. The dump is
//! written and synced before the old database is touched, and deleted only after the
//! new one is durable, so every step can be repeated.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::durable::DurableFiles;
use super::ledger::Ledger;
use super::store::{
    ID_BASE, LOCK_WAIT, Store, damaged_aside_path, move_aside, sibling, sled_config, sync_parent,
};
use super::{QueueConfig, QueueCounters, QueueError};

/// Where a rebuild dumps the live data before the old database is deleted.
pub(crate) fn rebuild_path(path: &Path) -> PathBuf {
    sibling(path, "rebuild")
}

/// Where the old database is moved just before it is deleted.
pub(crate) fn replaced_path(path: &Path) -> PathBuf {
    sibling(path, "replaced")
}

/// Completes a rebuild a crash interrupted. The dump is written and synced before the
/// old database is touched, and deleted only after the new one is flushed, so: a
/// complete dump means "(re)create the database from it"; an incomplete one means the
/// old database was never touched.
pub(super) fn finish_interrupted_rebuild(config: &QueueConfig) -> std::io::Result<()> {
    let path = &config.path;
    let dump = rebuild_path(path);
    if dump.exists() {
        if Dump::is_complete(&dump)? {
            tracing::warn!(path = %path.display(), "finishing an interrupted queue rebuild");
            restore(config, &dump)?;
        } else {
            fs::remove_file(&dump)?;
            sync_parent(path)?;
        }
    }
    let replaced = replaced_path(path);
    if replaced.exists() {
        fs::remove_dir_all(&replaced)?;
    }
    Ok(())
}

/// Why a rebuild failed, with the old store if it had not been touched yet.
pub(super) type RebuildFailed = (Option<Arc<Store>>, QueueError);

/// Rebuilds the database to give disk space back: dumps the live records, the
/// quarantine and the next id base into one flat file next to the queue (it needs only
/// the live bytes, which matters on a full disk), deletes the old database, creates a
/// fresh one from the dump and opens it. Blocking. On failure before the old database
/// is deleted it is handed back untouched; after that, `None`: the caller reopens (and
/// the next open finishes the rebuild from the dump).
pub(super) fn rebuild(
    config: &QueueConfig,
    old: Arc<Store>,
    counters: &QueueCounters,
) -> Result<(Store, Ledger), RebuildFailed> {
    let path = &config.path;
    let dump = rebuild_path(path);
    let failed = |source: std::io::Error| QueueError::Rebuild {
        path: path.clone(),
        source,
    };
    let written = old
        .next_id()
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|next| Dump::write(&old.db, next.0, &dump, false));
    if let Err(err) = written {
        let _ = fs::remove_file(&dump);
        return Err((Some(old), failed(err)));
    }
    // Every handle to the old database must be gone first (other tasks hold one only
    // for the length of a call), so that nothing writes to it afterwards.
    let deadline = Instant::now() + LOCK_WAIT;
    let mut old = old;
    loop {
        match Arc::try_unwrap(old) {
            Ok(store) => {
                drop(store);
                break;
            }
            Err(shared) if Instant::now() < deadline => {
                old = shared;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(shared) => {
                let _ = fs::remove_file(&dump);
                let err = std::io::Error::other("the old queue database stayed in use");
                return Err((Some(shared), failed(err)));
            }
        }
    }
    if let Err(err) = restore(config, &dump) {
        return Err((None, failed(err)));
    }
    Store::reopen(config, counters).map_err(|err| (None, err))
}

/// A database sled opened but cannot fully read (a page failing its checksum): dumps
/// every record it can read, sets the damaged directory aside (for `queue inspect`)
/// and creates a fresh database from the dump. Blocking. A crash in between is
/// finished from the dump on the next open.
pub(super) fn keep_readable(
    config: &QueueConfig,
    db: sled::Db,
    error: &sled::Error,
    counters: &QueueCounters,
) -> Result<(), QueueError> {
    let path = &config.path;
    let failed = |source: std::io::Error| QueueError::Rebuild {
        path: path.clone(),
        source,
    };
    tracing::error!(error = %error, path = %path.display(), "queue database has unreadable parts; keeping what can be read and setting it aside");
    let dump = rebuild_path(path);
    let base = db
        .open_tree("meta")
        .ok()
        .and_then(|meta| meta.get(ID_BASE).ok().flatten())
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes);
    let next_id = db
        .generate_id()
        .map_err(|e| failed(std::io::Error::other(e.to_string())))?
        .saturating_add(base);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Dump::write(&db, next_id, &dump, true)
    }))
    .unwrap_or_else(|_| Err(std::io::Error::other("sled panicked reading")))
    .map_err(failed)?;
    drop(db);
    move_aside(path, &damaged_aside_path(path), counters)?;
    restore(config, &dump).map_err(failed)
}

/// Replaces the database at `config.path` with one made from `dump`, then deletes the
/// dump. Blocking; safe to repeat after a crash at any point.
pub(super) fn restore(config: &QueueConfig, dump: &Path) -> std::io::Result<()> {
    let path = &config.path;
    let io = |e: sled::Error| std::io::Error::other(e.to_string());
    if path.exists() {
        let replaced = replaced_path(path);
        if replaced.exists() {
            fs::remove_dir_all(&replaced)?;
        }
        fs::rename(path, &replaced)?;
        fs::remove_dir_all(&replaced)?;
    }
    {
        let db = sled_config(config, path).open().map_err(io)?;
        Dump::read_into(dump, &db)?;
        db.flush().map_err(io)?;
        // sled's flush alone is not durable; the dump is deleted below.
        DurableFiles::open(path)?.sync()?;
    }
    fs::File::open(path)?.sync_all()?;
    sync_parent(path)?;
    fs::remove_file(dump)?;
    sync_parent(path)
}

/// The flat file of a rebuild: `MAGIC`, the id base (u64 BE), entries `[tree u8][key
/// len u32 BE][key][value len u32 BE][value]`, then `[END][entries u64 BE][CRC-32 of
/// everything before]`.
pub(super) struct Dump;

impl Dump {
    const MAGIC: &'static [u8] = b"blindgate queue rebuild 1\n";
    const END: u8 = 0xFF;
    const TREES: [&'static str; 2] = ["records", "quarantine"];

    /// Dumps the trees of `db` with `next_id` as the new id base. `tolerant`: read
    /// around pages sled cannot read (forwards up to the first one, then backwards up to
    /// the last one) instead of failing; returns how many trees had unreadable parts.
    pub(super) fn write(
        db: &sled::Db,
        next_id: u64,
        dump: &Path,
        tolerant: bool,
    ) -> std::io::Result<u64> {
        use std::io::Write as _;
        let io = |e: sled::Error| std::io::Error::other(e.to_string());
        let file = fs::File::create(dump)?;
        let mut out = Crc32Writer::new(std::io::BufWriter::new(file));
        out.write_all(Self::MAGIC)?;
        out.write_all(&next_id.to_be_bytes())?;
        let mut entries = 0u64;
        let mut unreadable = 0;
        for (index, name) in (0u8..).zip(Self::TREES) {
            let tree = db.open_tree(name).map_err(io)?;
            let mut put = |key: &[u8], value: &[u8]| -> std::io::Result<()> {
                out.write_all(&[index])?;
                for part in [key, value] {
                    let len = u32::try_from(part.len()).map_err(std::io::Error::other)?;
                    out.write_all(&len.to_be_bytes())?;
                    out.write_all(part)?;
                }
                entries += 1;
                Ok(())
            };
            let mut last_forward: Option<sled::IVec> = None;
            let mut failed = false;
            for item in tree.iter() {
                match item {
                    Ok((key, value)) => {
                        put(&key, &value)?;
                        last_forward = Some(key);
                    }
                    Err(err) if tolerant => {
                        tracing::error!(tree = name, error = %err, "unreadable part of the queue database; reading on from its end");
                        failed = true;
                        break;
                    }
                    Err(err) => return Err(io(err)),
                }
            }
            if failed {
                unreadable += 1;
                for item in tree.iter().rev() {
                    let Ok((key, value)) = item else { break };
                    if last_forward.as_ref().is_some_and(|last| key <= *last) {
                        break;
                    }
                    put(&key, &value)?;
                }
            }
        }
        out.write_all(&[Self::END])?;
        out.write_all(&entries.to_be_bytes())?;
        let crc = out.crc();
        let mut inner = out.into_inner();
        inner.write_all(&crc.to_be_bytes())?;
        let file = inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        sync_parent(dump)?;
        Ok(unreadable)
    }

    /// True if the dump ends with a matching checksum.
    pub(super) fn is_complete(dump: &Path) -> std::io::Result<bool> {
        let bytes = fs::read(dump)?;
        let Some((body, crc)) = bytes.split_last_chunk::<4>() else {
            return Ok(false);
        };
        Ok(bytes.starts_with(Self::MAGIC)
            && crc32fast::hash(body) == u32::from_be_bytes(*crc)
            && body.len() >= 9
            && body[body.len() - 9] == Self::END)
    }

    pub(super) fn read_into(dump: &Path, db: &sled::Db) -> std::io::Result<()> {
        let io = |e: sled::Error| std::io::Error::other(e.to_string());
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad rebuild dump");
        if !Self::is_complete(dump)? {
            return Err(bad());
        }
        let bytes = fs::read(dump)?;
        let mut rest = bytes.get(Self::MAGIC.len()..).ok_or_else(bad)?;
        let mut take = |n: usize| -> std::io::Result<&[u8]> {
            let (head, tail) = rest.split_at_checked(n).ok_or_else(bad)?;
            rest = tail;
            Ok(head)
        };
        let id_base = take(8)?;
        let meta = db.open_tree("meta").map_err(io)?;
        meta.insert(ID_BASE, id_base).map_err(io)?;
        let trees = Self::TREES.map(|name| db.open_tree(name));
        loop {
            let tree = take(1)?[0];
            if tree == Self::END {
                return Ok(());
            }
            let mut part = || -> std::io::Result<Vec<u8>> {
                let len = u32::from_be_bytes(take(4)?.try_into().map_err(|_| bad())?);
                Ok(take(len as usize)?.to_vec())
            };
            let (key, value) = (part()?, part()?);
            let tree = trees
                .get(usize::from(tree))
                .ok_or_else(bad)?
                .as_ref()
                .map_err(|e| io(e.clone()))?;
            tree.insert(key, value).map_err(io)?;
        }
    }
}

/// A writer that keeps the CRC-32 of everything written through it.
struct Crc32Writer<W> {
    inner: W,
    hasher: crc32fast::Hasher,
}

impl<W: std::io::Write> Crc32Writer<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: crc32fast::Hasher::new(),
        }
    }

    fn crc(&self) -> u32 {
        self.hasher.clone().finalize()
    }

    fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: std::io::Write> std::io::Write for Crc32Writer<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
