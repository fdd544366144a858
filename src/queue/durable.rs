//! Makes what sled flushed survive a power cut, not only a crash.
//!
//! sled 0.34's `flush` writes its log buffers with `pwrite` and then, on Linux, calls
//! `sync_file_range(2)`. That pushes the pages to the device but persists no metadata
//! (a grown file size) and flushes no disk cache: after a power cut the data can be
//! gone although `flush` returned. Only sled's background thread calls `fsync`, every
//! 500 ms. Large values (over a quarter of a segment) go to files in `blobs/`, written
//! without any sync at all.
//!
//! So after every flush the queue calls [`DurableFiles::sync`]: `fdatasync` of the log
//! file `db`, and `fdatasync` of every blob file not synced before, then of the `blobs`
//! directory. The power-cut test (`tests/power_cut.rs`) fails without this.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// sled's files under one queue directory that a flush must make durable.
pub(super) struct DurableFiles {
    /// sled's log and page file, opened read-only: `fdatasync` works on any descriptor.
    log: File,
    blobs_dir: PathBuf,
    /// Blob files already synced; a blob is written once and never changed.
    synced_blobs: Mutex<HashSet<OsString>>,
}

impl DurableFiles {
    /// Opens the log file of the sled database at `path` (which sled created).
    ///
    /// # Errors
    /// The OS error if `path/db` cannot be opened.
    pub(super) fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            log: File::open(path.join("db"))?,
            blobs_dir: path.join("blobs"),
            synced_blobs: Mutex::new(HashSet::new()),
        })
    }

    /// Makes everything sled wrote before this call durable. Blocking: call it on a
    /// blocking thread after `flush_async` returned.
    ///
    /// # Errors
    /// The first OS error; then nothing written since the last success may be assumed
    /// durable.
    pub(super) fn sync(&self) -> io::Result<()> {
        self.log.sync_data()?;
        self.sync_new_blobs()
    }

    fn sync_new_blobs(&self) -> io::Result<()> {
        let entries = match std::fs::read_dir(&self.blobs_dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(err),
        };
        let mut synced = self
            .synced_blobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut present = HashSet::with_capacity(synced.len());
        let mut any_new = false;
        for entry in entries {
            let name = entry?.file_name();
            if !synced.contains(&name) {
                match File::open(self.blobs_dir.join(&name)) {
                    Ok(file) => file.sync_data()?,
                    // sled removed it meanwhile (its page was rewritten): nothing to keep.
                    Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(err),
                }
                any_new = true;
            }
            present.insert(name);
        }
        if any_new {
            File::open(&self.blobs_dir)?.sync_all()?;
        }
        // Forget blobs sled removed, so the set stays as small as the directory.
        *synced = present;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::DurableFiles;

    #[test]
    fn syncs_the_log_and_each_new_blob_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("db"), b"log").expect("db");
        let files = DurableFiles::open(dir.path()).expect("open");
        files.sync().expect("sync without blobs");
        std::fs::create_dir(dir.path().join("blobs")).expect("blobs");
        std::fs::write(dir.path().join("blobs/7"), b"blob").expect("blob");
        files.sync().expect("sync with a blob");
        let synced = files.synced_blobs.lock().expect("lock").len();
        assert_eq!(synced, 1);
        std::fs::remove_file(dir.path().join("blobs/7")).expect("remove");
        files.sync().expect("sync after removal");
        assert!(files.synced_blobs.lock().expect("lock").is_empty());
    }

    #[test]
    fn a_missing_log_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(DurableFiles::open(dir.path()).is_err());
    }
}
