//! The queue's small state, in sled (`<queue>/state`): per device the acknowledgement
//! floor (every record of the device below it is gone, and the ids above it taken out
//! out of order), how many records the last clean stop left, and the bytes of damaged
//! frames (quarantine).
//!
//! None of it has to be durable at the moment it changes. A floor saved late means that
//! records the cloud already acknowledged are sent again after a crash, and the cloud's
//! replay check drops them. So floors are saved in one batch every second and handed to
//! the kernel (sled's `flush`), and only a clean stop syncs the file. sled's own
//! background flush is off: its `fsync` every 500 ms made the segment log's
//! `fdatasync`s wait behind it (the p99 of a PUBACK).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::index::Floor;
use super::segments::Location;

const FLOORS: &str = "floors";
const QUARANTINE: &str = "quarantine";
const CLEAN_STOP: &[u8] = b"clean_stop_records";
/// At most this many bytes of one damaged range are kept in the quarantine.
const QUARANTINE_KEEP: usize = 64 << 10;

/// The open state database.
pub(super) struct State {
    db: sled::Db,
    floors: sled::Tree,
    quarantine: sled::Tree,
}

/// The state directory of the queue at `queue_dir`.
pub(super) fn path_of(queue_dir: &Path) -> PathBuf {
    queue_dir.join("state")
}

impl State {
    /// Opens (creating) the state database.
    ///
    /// # Errors
    /// sled's error.
    pub(super) fn open(queue_dir: &Path, cache: u64) -> sled::Result<Self> {
        let db = sled::Config::new()
            .path(path_of(queue_dir))
            .cache_capacity(cache)
            .flush_every_ms(None)
            .open()?;
        Ok(Self {
            floors: db.open_tree(FLOORS)?,
            quarantine: db.open_tree(QUARANTINE)?,
            db,
        })
    }

    /// Every saved floor, by device.
    pub(super) fn floors(&self) -> HashMap<String, Floor> {
        self.floors
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(device, value)| {
                let device = String::from_utf8(device.to_vec()).ok()?;
                Some((device, decode_floor(&value)?))
            })
            .collect()
    }

    /// Saves the floors that changed, then asks sled to write them out.
    ///
    /// # Errors
    /// sled's error (a full disk); the floors are saved again next time.
    pub(super) fn save_floors<'a>(
        &self,
        floors: impl Iterator<Item = (&'a str, &'a Floor)>,
    ) -> sled::Result<()> {
        let mut batch = sled::Batch::default();
        let mut any = false;
        for (device, floor) in floors {
            let value = encode_floor(floor);
            if self
                .floors
                .get(device)?
                .is_none_or(|saved| *saved != *value)
            {
                batch.insert(device.as_bytes(), value);
                any = true;
            }
        }
        if any {
            self.floors.apply_batch(batch)?;
            self.db.flush()?;
        }
        Ok(())
    }

    /// How many records the last clean stop left, if the last stop was clean; forgets it
    /// (a crash after this open must not be taken for a clean stop).
    ///
    /// # Errors
    /// sled's error.
    pub(super) fn take_clean_stop(&self) -> sled::Result<Option<u64>> {
        let value = self.db.remove(CLEAN_STOP)?;
        self.db.flush()?;
        Ok(value.and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// Notes a clean stop that leaves `records`, and makes the state durable (sled's
    /// `flush` alone is not: `sync_file_range`, no `fsync`).
    ///
    /// # Errors
    /// sled's error, or the OS error of the sync.
    pub(super) fn mark_clean_stop(&self, records: u64, queue_dir: &Path) -> sled::Result<()> {
        self.db.insert(CLEAN_STOP, &records.to_be_bytes())?;
        self.db.flush()?;
        std::fs::File::open(path_of(queue_dir).join("db"))
            .and_then(|file| file.sync_all())
            .map_err(sled::Error::Io)
    }

    /// Keeps (the start of) the bytes of a damaged range for `queue inspect`.
    ///
    /// # Errors
    /// sled's error.
    pub(super) fn quarantine(&self, at: Location, bytes: &[u8]) -> sled::Result<()> {
        let mut key = Vec::with_capacity(8);
        key.extend_from_slice(&at.segment.to_be_bytes());
        key.extend_from_slice(&at.offset.to_be_bytes());
        let kept = bytes.get(..QUARANTINE_KEEP).unwrap_or(bytes);
        self.quarantine.insert(key, kept)?;
        Ok(())
    }

    /// Damaged ranges kept.
    pub(super) fn quarantined(&self) -> usize {
        self.quarantine.len()
    }

    /// Bytes of the state database on disk.
    pub(super) fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

/// `[floor u64 BE][gone id u64 BE]...`
fn encode_floor(floor: &Floor) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 * (1 + floor.gone.len()));
    value.extend_from_slice(&floor.floor.to_be_bytes());
    for id in &floor.gone {
        value.extend_from_slice(&id.to_be_bytes());
    }
    value
}

fn decode_floor(value: &[u8]) -> Option<Floor> {
    if !value.len().is_multiple_of(8) {
        return None;
    }
    let mut ids = value
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()));
    let floor = ids.next()?;
    let mut gone: Vec<u64> = ids.collect();
    gone.sort_unstable();
    Some(Floor { floor, gone })
}

#[cfg(test)]
mod tests {
    use super::{Floor, State};

    #[test]
    fn floors_only_rise_and_the_clean_stop_is_read_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let state = State::open(dir.path(), 1 << 20).expect("open");
            let a = Floor {
                floor: 10,
                gone: vec![12, 15],
            };
            let b = Floor {
                floor: 3,
                gone: Vec::new(),
            };
            state
                .save_floors([("a", &a), ("b", &b)].into_iter())
                .expect("save");
            state.mark_clean_stop(42, dir.path()).expect("mark");
        }
        let state = State::open(dir.path(), 1 << 20).expect("reopen");
        let floors = state.floors();
        assert_eq!(floors["a"].floor, 10);
        assert_eq!(floors["a"].gone, [12, 15]);
        assert_eq!(floors["b"].floor, 3);
        assert_eq!(state.take_clean_stop().expect("take"), Some(42));
        assert_eq!(state.take_clean_stop().expect("take"), None);
    }
}
