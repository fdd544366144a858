//! Where each queued record is: per device, its records in id order with their place in
//! the segment log (kept compactly, see [`records`]). In memory only; rebuilt at every
//! open from the log itself.

mod records;

use std::collections::{BTreeSet, HashMap};

use super::record::RecordId;
use super::segments::Location;

/// One queued record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) id: RecordId,
    pub(super) at: Location,
}

/// One device's records, and what its acknowledgement floor does not cover.
#[derive(Debug, Default)]
struct DeviceRecords {
    entries: records::Records,
    /// One above the largest id this device ever had in the queue (0: none).
    next: u64,
    /// Ids taken out while an older record stayed: above the floor, but gone.
    gone: BTreeSet<u64>,
}

/// What is gone of one device: every id below `floor`, and the ids in `gone`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Floor {
    pub(super) floor: u64,
    pub(super) gone: Vec<u64>,
}

impl Floor {
    /// Whether the record `id` is gone.
    pub(super) fn covers(&self, id: u64) -> bool {
        id < self.floor || self.gone.binary_search(&id).is_ok()
    }
}

/// The records of every device.
#[derive(Debug, Default)]
pub(super) struct Index {
    devices: HashMap<String, DeviceRecords>,
    /// A record came or went since [`Index::take_changed`]: the floors may differ from
    /// the saved ones.
    changed: bool,
}

impl Index {
    /// Adds a record; false if a record with its id is already there (a second copy of
    /// a frame, left by an interrupted migration). Ids of one device arrive in
    /// increasing order, except at open; then the entry is put in its place.
    pub(super) fn insert(&mut self, device: &str, entry: Entry) -> bool {
        let records = match self.devices.get_mut(device) {
            Some(records) => records,
            None => self.devices.entry(device.to_owned()).or_default(),
        };
        records.next = records.next.max(entry.id.0.saturating_add(1));
        if !records.entries.insert(entry) {
            return false;
        }
        self.changed = true;
        true
    }

    /// Up to `limit` records of `device` with ids above `after`, oldest first.
    pub(super) fn after(&self, device: &str, after: Option<RecordId>, limit: usize) -> Vec<Entry> {
        let Some(records) = self.devices.get(device) else {
            return Vec::new();
        };
        records.entries.after(after, limit)
    }

    /// Takes a record out; `None` if it is not queued (any more).
    pub(super) fn remove(&mut self, device: &str, id: RecordId) -> Option<Entry> {
        let records = self.devices.get_mut(device)?;
        let (entry, oldest) = records.entries.remove(id)?;
        if !oldest {
            records.gone.insert(id.0);
        } else {
            let floor = records.entries.oldest().map_or(records.next, |e| e.id.0);
            records.gone = records.gone.split_off(&floor);
        }
        self.changed = true;
        Some(entry)
    }

    /// The oldest record of `device`.
    pub(super) fn oldest(&self, device: &str) -> Option<Entry> {
        self.devices.get(device)?.entries.oldest()
    }

    /// What is gone, per device the index knows.
    pub(super) fn floors(&self) -> impl Iterator<Item = (&str, Floor)> {
        self.devices.iter().map(|(device, records)| {
            let floor = records.entries.oldest().map_or(records.next, |e| e.id.0);
            let gone = records.gone.iter().copied().collect();
            (device.as_str(), Floor { floor, gone })
        })
    }

    /// Carries what a saved floor says is gone above it into a device's records read
    /// at open, so that the next save still says it.
    pub(super) fn restore_gone(&mut self, device: &str, floor: &Floor) {
        let Some(records) = self.devices.get_mut(device) else {
            return;
        };
        let front = records.entries.oldest().map_or(records.next, |e| e.id.0);
        for &id in floor.gone.iter().filter(|&&id| id >= front) {
            records.gone.insert(id);
            records.next = records.next.max(id.saturating_add(1));
        }
    }

    /// Whether a record came or went since the last call.
    pub(super) fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Says the floors must be saved again (a save failed).
    pub(super) fn mark_changed(&mut self) {
        self.changed = true;
    }

    /// Forgets devices with no records (their floors were saved).
    pub(super) fn forget_empty(&mut self) {
        self.devices
            .retain(|_, records| !records.entries.is_empty());
    }

    /// Records in the index.
    pub(super) fn len(&self) -> usize {
        self.devices.values().map(|r| r.entries.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::{Entry, Floor, Index};
    use crate::queue::record::RecordId;
    use crate::queue::segments::Location;

    fn entry(id: u64) -> Entry {
        Entry {
            id: RecordId(id),
            at: Location {
                segment: 1,
                offset: u32::try_from(id).expect("small"),
                len: 1,
            },
        }
    }

    fn ids(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.id.0).collect()
    }

    #[test]
    fn per_device_order_reads_after_and_removal() {
        let mut index = Index::default();
        for id in [1, 3, 5, 7] {
            index.insert("a", entry(id));
        }
        index.insert("b", entry(2));
        assert!(index.insert("a", entry(4)));
        assert!(!index.insert("a", entry(4)));
        assert_eq!(ids(&index.after("a", None, 10)), [1, 3, 4, 5, 7]);
        assert_eq!(ids(&index.after("a", Some(RecordId(3)), 2)), [4, 5]);
        assert_eq!(index.remove("a", RecordId(4)), Some(entry(4)));
        assert_eq!(index.remove("a", RecordId(4)), None);
        assert_eq!(index.oldest("a"), Some(entry(1)));
        assert_eq!(index.len(), 5);
    }

    fn floor(floor: u64, gone: &[u64]) -> Floor {
        Floor {
            floor,
            gone: gone.to_vec(),
        }
    }

    #[test]
    fn floors_follow_the_oldest_record_and_survive_an_empty_device() {
        let mut index = Index::default();
        for id in [10, 11, 12, 13] {
            index.insert("a", entry(id));
        }
        index.remove("a", RecordId(12));
        index.remove("a", RecordId(11));
        let floors: Vec<(&str, Floor)> = index.floors().collect();
        assert_eq!(floors, [("a", floor(10, &[11, 12]))]);
        assert!(floors[0].1.covers(9) && floors[0].1.covers(11) && !floors[0].1.covers(13));
        index.remove("a", RecordId(10));
        let floors: Vec<(&str, Floor)> = index.floors().collect();
        assert_eq!(floors, [("a", floor(13, &[]))], "the floor passed them");
        index.remove("a", RecordId(13));
        let floors: Vec<(&str, Floor)> = index.floors().collect();
        assert_eq!(floors, [("a", floor(14, &[]))]);
        index.forget_empty();
        assert_eq!(index.floors().count(), 0);
    }

    #[test]
    fn a_change_is_reported_once() {
        let mut index = Index::default();
        assert!(!index.take_changed());
        index.insert("a", entry(1));
        assert!(index.take_changed());
        assert!(!index.take_changed());
        assert!(index.remove("a", RecordId(2)).is_none());
        assert!(!index.take_changed(), "nothing was removed");
        index.remove("a", RecordId(1));
        assert!(index.take_changed());
    }

    #[test]
    fn what_a_saved_floor_says_is_gone_is_said_again() {
        let mut index = Index::default();
        for id in [5, 9] {
            index.insert("a", entry(id));
        }
        index.restore_gone("a", &floor(5, &[3, 6, 7, 12]));
        let floors: Vec<(&str, Floor)> = index.floors().collect();
        assert_eq!(floors, [("a", floor(5, &[6, 7, 12]))]);
        index.remove("a", RecordId(5));
        index.remove("a", RecordId(9));
        let floors: Vec<(&str, Floor)> = index.floors().collect();
        assert_eq!(floors, [("a", floor(13, &[]))]);
    }
}
