//! Replay state of the ingest: one [`ReplayWindow`] per device (uplink direction),
//! checkpointed in sled together with the sink offset it covers. The checkpoint may lag
//! behind the sink; on start the sink's tail is replayed into the windows (see
//! `sink`), so the two never disagree after a crash.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use e3::{ReplayWindow, Verdict};

const OFFSET_KEY: &[u8] = b"sink_offset";

/// Replay windows with their checkpoint.
pub struct ReplayStore {
    windows_tree: sled::Tree,
    db: sled::Db,
    windows: HashMap<String, ReplayWindow>,
    dirty: HashSet<String>,
}

impl ReplayStore {
    /// Opens the store; returns it and the sink offset its checkpoint covers.
    ///
    /// # Errors
    /// sled errors.
    pub fn open(path: &Path) -> Result<(Self, u64), sled::Error> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(16 << 20)
            .open()?;
        let windows_tree = db.open_tree("windows")?;
        let offset = db
            .get(OFFSET_KEY)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        let store = Self {
            windows_tree,
            db,
            windows: HashMap::new(),
            dirty: HashSet::new(),
        };
        Ok((store, offset))
    }

    fn window(&mut self, device: &str) -> &mut ReplayWindow {
        if !self.windows.contains_key(device) {
            let saved = self
                .windows_tree
                .get(device.as_bytes())
                .ok()
                .flatten()
                .and_then(|bytes| ReplayWindow::from_bytes(&bytes).ok())
                .unwrap_or_default();
            self.windows.insert(device.to_owned(), saved);
        }
        self.windows.entry(device.to_owned()).or_default()
    }

    /// What the replay rule says about `device`'s `seq`, without recording it.
    pub fn check(&mut self, device: &str, seq: u64) -> Verdict {
        self.window(device).check(seq)
    }

    /// Applies the replay rule to `device`'s `seq` and records it if fresh.
    pub fn accept(&mut self, device: &str, seq: u64) -> Verdict {
        let verdict = self.window(device).accept(seq);
        if verdict == Verdict::Fresh {
            self.dirty.insert(device.to_owned());
        }
        verdict
    }

    /// Writes every changed window, then `sink_offset`, then flushes. In that order a
    /// crash can only leave windows ahead of the offset, and replaying the sink tail
    /// into them again is harmless (those seqs come out as duplicates).
    ///
    /// # Errors
    /// sled errors.
    pub fn checkpoint(&mut self, sink_offset: u64) -> Result<(), sled::Error> {
        let mut batch = sled::Batch::default();
        for device in self.dirty.drain() {
            if let Some(window) = self.windows.get(&device) {
                batch.insert(device.as_bytes(), window.to_bytes());
            }
        }
        self.windows_tree.apply_batch(batch)?;
        self.db.insert(OFFSET_KEY, &sink_offset.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }
}
