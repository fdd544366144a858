//! Salvage: finding records in the raw bytes of a damaged sled database.
//!
//! sled 0.34 replays its log only up to the first message that fails its checksum, and
//! then overwrites what follows; records written after the damage are gone for sled
//! although their bytes are intact on disk. Every record value is a self-describing
//! frame (`record`: a tag, a CRC-32, the key, the payload), stored by sled contiguously
//! in its log file or in a blob file. So a copy of the damaged database set aside
//! before sled opened it can be read byte by byte: every frame whose CRC holds is a
//! record exactly as it was written.
//!
//! Old versions of pages stay in sled's files after a record was removed, so a frame
//! found there may belong to a record the cloud acknowledged long ago; the caller
//! restores only what the clean-stop marker says was still queued.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::ledger::Ledger;
use super::marker::{CleanMarker, DeviceIds, files_under};
use super::record::{self, FRAME_TAG, FrameError, RecordId};
use super::store::{Store, copy_dir, damaged_aside_path, damaged_copies};
use super::{QueueConfig, QueueCounters};

/// How an open compares the queue with what the last clean stop left, and gets back
/// what sled's recovery could not.
pub(super) struct SalvagePlan {
    /// What the last clean stop left.
    pub(super) marker: CleanMarker,
    /// Copies of damaged databases that existed before this open (not searched again).
    before: BTreeSet<PathBuf>,
    /// The copy made because the files changed while stopped.
    copy: Option<PathBuf>,
}

impl SalvagePlan {
    /// Before sled opens the database: if its files changed since the clean stop, keeps
    /// a copy of them (sled's recovery overwrites what follows damage).
    pub(super) fn prepare(
        config: &QueueConfig,
        marker: CleanMarker,
        counters: &QueueCounters,
    ) -> Self {
        let before = damaged_copies(&config.path);
        let mut copy = None;
        if marker.files_changed(&config.path) {
            let aside = damaged_aside_path(&config.path);
            match copy_dir(&config.path, &aside) {
                Ok(()) => {
                    counters
                        .databases_moved_aside
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(aside = %aside.display(), "the queue's files changed while the gateway was stopped; kept a copy of them before recovery, to salvage what sled cannot read");
                    copy = Some(aside);
                }
                Err(err) => {
                    let _ = fs::remove_dir_all(&aside);
                    tracing::error!(error = %err, aside = %aside.display(), "the queue's files changed while the gateway was stopped, and no copy of them could be kept: what sled cannot read cannot be salvaged");
                }
            }
        }
        Self {
            marker,
            before,
            copy,
        }
    }

    /// After the open: the copy made because the files changed is deleted again if
    /// sled recovered everything the marker names by itself (the change was harmless,
    /// for example a copy of the directory without its timestamps).
    pub(super) fn discard_copy_if_unneeded(&self, lost: u64, counters: &QueueCounters) {
        let Some(copy) = &self.copy else {
            return;
        };
        if lost == 0 && counters.salvaged.load(Ordering::Relaxed) == 0 {
            if fs::remove_dir_all(copy).is_ok() {
                counters
                    .databases_moved_aside
                    .fetch_sub(1, Ordering::Relaxed);
            }
            tracing::info!(
                "the queue's files changed while stopped, but every record the last clean stop left is there; the copy kept for salvage was deleted"
            );
        }
    }

    /// Puts back every record the marker names that `records` lacks and a damaged copy
    /// made during this open holds intact. Returns how many.
    ///
    /// # Errors
    /// sled's, when reading or writing `records`.
    pub(super) fn restore(
        &self,
        records: &sled::Tree,
        path: &Path,
        counters: &QueueCounters,
    ) -> sled::Result<u64> {
        let missing = |device: &str, id: RecordId| {
            self.marker.names(device, id)
                && !records
                    .contains_key(record::encode_key(device, id))
                    .unwrap_or(true)
        };
        let mut restored = 0;
        for copy in damaged_copies(path).difference(&self.before) {
            let found = match carve(copy, &missing) {
                Ok(found) => found,
                Err(err) => {
                    tracing::error!(error = %err, copy = %copy.display(), "cannot read the damaged copy of the queue to salvage records");
                    continue;
                }
            };
            for (key, value) in found.records {
                if !records.contains_key(&key)? {
                    records.insert(key, value)?;
                    restored += 1;
                }
            }
            tracing::info!(copy = %copy.display(), bytes = found.bytes, frames = found.frames, restored, "searched a damaged copy of the queue for records sled could not recover");
        }
        if restored > 0 {
            counters.salvaged.fetch_add(restored, Ordering::Relaxed);
            tracing::warn!(
                restored,
                "salvaged records sled could not recover from its damaged files; they are queued again"
            );
        }
        Ok(restored)
    }

    /// How many records the marker names are neither in the queue nor in quarantine
    /// now (a lower bound where the marker has ranges).
    pub(super) fn count_lost(&self, store: &Store, ledger: &Ledger) -> u64 {
        let marker = &self.marker;
        let quarantined = store.quarantine.len() as u64;
        let expected = marker.records + marker.quarantined;
        if marker.devices.is_empty() {
            // A marker of an earlier release: totals only.
            return expected.saturating_sub(ledger.total().records + quarantined);
        }
        let mut found = 0;
        for (device, ids) in &marker.devices {
            found += match ids {
                DeviceIds::Exact(ids) => ids
                    .iter()
                    .filter(|id| {
                        let key = record::encode_key(device, RecordId(**id));
                        store.records.contains_key(key).unwrap_or(false)
                    })
                    .count() as u64,
                DeviceIds::Range { count, .. } => ledger.device(device).records.min(*count),
            };
        }
        expected.saturating_sub(found + quarantined)
    }
}

/// Bytes read at a time.
const CHUNK: usize = 4 << 20;

/// What was found in a damaged copy.
#[derive(Debug, Default)]
pub(super) struct Found {
    /// Frames that passed their CRC and were wanted, by key: the value to store.
    pub(super) records: HashMap<Vec<u8>, Vec<u8>>,
    /// Frames that passed their CRC, wanted or not.
    pub(super) frames: u64,
    /// Bytes read.
    pub(super) bytes: u64,
}

/// Reads every file under `dir` and keeps the frames `wanted` accepts.
///
/// # Errors
/// The first I/O error of the directory walk or a read.
pub(super) fn carve(dir: &Path, wanted: &dyn Fn(&str, RecordId) -> bool) -> io::Result<Found> {
    let mut found = Found::default();
    for (file, _) in files_under(dir)? {
        carve_file(&file, wanted, &mut found)?;
    }
    Ok(found)
}

/// Scans one file in chunks; a frame that crosses a chunk's end is read whole before
/// it is checked.
fn carve_file(
    path: &Path,
    wanted: &dyn Fn(&str, RecordId) -> bool,
    found: &mut Found,
) -> io::Result<()> {
    let mut file = fs::File::open(path)?;
    let finder = memchr::memmem::Finder::new(&FRAME_TAG);
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
    let mut at_eof = false;
    loop {
        if !at_eof {
            let start = buf.len();
            buf.resize(start + CHUNK, 0);
            let n = read_full(&mut file, &mut buf[start..])?;
            buf.truncate(start + n);
            found.bytes += n as u64;
            at_eof = n < CHUNK;
        }
        let mut pos = 0;
        // Where the unread rest starts: kept for the next round.
        let mut keep_from = None;
        while let Some(offset) = finder.find(buf.get(pos..).unwrap_or_default()) {
            let start = pos + offset;
            match record::read_frame(buf.get(start..).unwrap_or_default()) {
                Ok(frame) => {
                    found.frames += 1;
                    if let Ok((device, id)) = record::decode_key(frame.key)
                        && wanted(device, id)
                    {
                        let value = buf.get(start..start + frame.len).unwrap_or_default();
                        found.records.insert(frame.key.to_vec(), value.to_vec());
                    }
                    pos = start + frame.len;
                }
                Err(FrameError::Incomplete) if !at_eof => {
                    keep_from = Some(start);
                    break;
                }
                Err(_) => pos = start + 1,
            }
        }
        if at_eof {
            return Ok(());
        }
        // Keep a frame cut by the chunk's end, or the last bytes a tag may start in.
        let keep =
            keep_from.unwrap_or_else(|| buf.len().saturating_sub(FRAME_TAG.len() - 1).max(pos));
        buf.drain(..keep);
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(file: &mut fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::record::encode_key;

    fn frame(device: &str, id: u64, payload: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let key = encode_key(device, RecordId(id));
        let value = record::encode_value(&key, 1, payload);
        (key, value)
    }

    #[test]
    fn frames_are_found_across_chunks_and_damage_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut raw = Vec::new();
        let mut expected = HashMap::new();
        let mut n = 0u64;
        // Enough frames (some large) that several cross the 4 MiB chunk boundaries.
        while raw.len() < 3 * CHUNK {
            let payload = vec![b'a' + (n % 26) as u8; 100 + (n as usize * 7919) % 200_000];
            let (key, value) = frame("pump-17", n, &payload);
            raw.extend_from_slice(b"sled header bytes \x02bg");
            raw.extend_from_slice(&value);
            expected.insert(key, value);
            n += 1;
        }
        // One frame damaged: not found.
        let (damaged_key, damaged) = frame("pump-17", 1_000_000, b"damaged");
        let mut bytes = damaged.clone();
        bytes[12] ^= 4;
        raw.extend_from_slice(&bytes);
        // A frame cut off at the end of the file: not found.
        let (_, cut) = frame("pump-17", 1_000_001, b"cut");
        raw.extend_from_slice(&cut[..cut.len() - 1]);
        fs::create_dir(dir.path().join("blobs")).expect("mkdir");
        fs::write(dir.path().join("db"), &raw).expect("write");
        let (blob_key, blob) = frame("valve-3", 7, b"in a blob");
        fs::write(
            dir.path().join("blobs/7"),
            [b"xx".as_slice(), &blob].concat(),
        )
        .expect("write");

        let found = carve(dir.path(), &|_, _| true).expect("carve");
        assert_eq!(found.frames, n + 1);
        assert_eq!(found.records.get(&blob_key), Some(&blob));
        assert!(!found.records.contains_key(&damaged_key));
        for (key, value) in &expected {
            assert_eq!(found.records.get(key), Some(value));
        }

        let only_valve = carve(dir.path(), &|device, _| device == "valve-3").expect("carve");
        assert_eq!(only_valve.records.len(), 1);
    }
}
