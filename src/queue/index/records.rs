//! One device's queued records, compactly: 6 to 12 bytes a record instead of the 24 of
//! an `(id, Location)` pair in a `VecDeque` that doubles as it grows.
//!
//! Records sit in chunks of up to [`CHUNK_LEN`], all in one segment, ids ascending. A
//! chunk keeps each id as its distance from the chunk's first id (2 bytes while those
//! fit, else 4; ids are the queue's, so a device's are further apart the more devices
//! share the queue) and each frame's offset (4 bytes), and the frames' length once while
//! they are all the same (a sensor's readings are), else 4 bytes each. A record taken
//! out is marked gone in a bitmap until its whole chunk is gone, so removal never moves
//! the others; with acknowledgements arriving about in order, such slots are few and
//! short-lived.

use std::collections::VecDeque;

use super::Entry;
use crate::queue::record::RecordId;
use crate::queue::segments::Location;

/// Records per chunk: 1.5 to 3 KiB of slots when full; a chunk's own overhead is then
/// under 1 byte a record. (1,024 saved 0.3 MiB of 32 for 1,000,000 records, within the
/// runs' spread; the rebuild of a chunk for an out-of-order record moves 4 times more.)
const CHUNK_LEN: usize = 256;

/// The capacity for `n` slots when an array starts part way: the next power of two, as
/// the chunk's other arrays have grown to, so that a full chunk holds no spare room.
fn room_for(n: usize) -> usize {
    n.next_power_of_two().min(CHUNK_LEN)
}

/// The frames' lengths of a chunk.
#[derive(Debug)]
enum Lens {
    /// Every frame so far has this length.
    Same(u32),
    /// Each slot's.
    Each(Vec<u32>),
}

impl Lens {
    fn get(&self, slot: usize) -> u32 {
        match self {
            Self::Same(len) => *len,
            Self::Each(lens) => lens[slot],
        }
    }

    /// Adds the length of slot `slot` (the chunk's `slot + 1`th).
    fn push(&mut self, slot: usize, len: u32) {
        match self {
            Self::Same(same) if *same == len => {}
            Self::Same(same) => {
                let mut lens = Vec::with_capacity(room_for(slot + 1));
                lens.resize(slot, *same);
                lens.push(len);
                *self = Self::Each(lens);
            }
            Self::Each(lens) => lens.push(len),
        }
    }
}

/// The ids of a chunk, each as its distance from the chunk's first id: 2 bytes while the
/// distances fit (a few devices sharing the queue), else 4.
#[derive(Debug)]
enum Ids {
    Narrow(Vec<u16>),
    Wide(Vec<u32>),
}

impl Ids {
    fn len(&self) -> usize {
        match self {
            Self::Narrow(ids) => ids.len(),
            Self::Wide(ids) => ids.len(),
        }
    }

    fn get(&self, slot: usize) -> u32 {
        match self {
            Self::Narrow(ids) => u32::from(ids[slot]),
            Self::Wide(ids) => ids[slot],
        }
    }

    fn last(&self) -> Option<u32> {
        self.len().checked_sub(1).map(|slot| self.get(slot))
    }

    fn push(&mut self, delta: u32) {
        match self {
            Self::Narrow(ids) => match u16::try_from(delta) {
                Ok(narrow) => ids.push(narrow),
                Err(_) => {
                    let mut wide = Vec::with_capacity(room_for(ids.len() + 1));
                    wide.extend(ids.iter().map(|&d| u32::from(d)));
                    wide.push(delta);
                    *self = Self::Wide(wide);
                }
            },
            Self::Wide(ids) => ids.push(delta),
        }
    }

    /// The slot holding `delta`.
    fn find(&self, delta: u32) -> Option<usize> {
        match self {
            Self::Narrow(ids) => ids.binary_search(&u16::try_from(delta).ok()?).ok(),
            Self::Wide(ids) => ids.binary_search(&delta).ok(),
        }
    }

    /// The first slot whose distance is above `delta`.
    fn after(&self, delta: u32) -> usize {
        match self {
            Self::Narrow(ids) => ids.partition_point(|&d| u32::from(d) <= delta),
            Self::Wide(ids) => ids.partition_point(|&d| d <= delta),
        }
    }

    /// Bytes held.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        match self {
            Self::Narrow(ids) => 2 * ids.capacity(),
            Self::Wide(ids) => 4 * ids.capacity(),
        }
    }
}

/// Up to [`CHUNK_LEN`] records of one segment, ids ascending.
#[derive(Debug)]
struct Chunk {
    /// The id of slot 0.
    base: u64,
    segment: u32,
    /// Every slot before it is gone; the slot at it is live (while any is).
    head: u32,
    /// Slots still live.
    live: u32,
    /// Each slot's id, as its distance from `base`.
    ids: Ids,
    offsets: Vec<u32>,
    lens: Lens,
    /// One bit a slot: the record is gone.
    gone: [u64; CHUNK_LEN / 64],
}

impl Chunk {
    fn new(entry: Entry) -> Self {
        let mut chunk = Self {
            base: entry.id.0,
            segment: entry.at.segment,
            head: 0,
            live: 0,
            ids: Ids::Narrow(Vec::new()),
            offsets: Vec::new(),
            lens: Lens::Same(entry.at.len),
            gone: [0; CHUNK_LEN / 64],
        };
        chunk.push(entry);
        chunk
    }

    fn last_id(&self) -> u64 {
        self.base + u64::from(self.ids.last().expect("a chunk is never empty"))
    }

    /// Whether `entry`, with an id above every id here, can go at the end.
    fn takes(&self, entry: &Entry) -> bool {
        self.ids.len() < CHUNK_LEN
            && entry.at.segment == self.segment
            && entry.id.0 - self.base <= u64::from(u32::MAX)
    }

    fn push(&mut self, entry: Entry) {
        let delta = u32::try_from(entry.id.0 - self.base).expect("checked by takes");
        self.lens.push(self.ids.len(), entry.at.len);
        self.ids.push(delta);
        self.offsets.push(entry.at.offset);
        self.live += 1;
    }

    fn is_gone(&self, slot: usize) -> bool {
        self.gone[slot / 64] & (1 << (slot % 64)) != 0
    }

    fn mark_gone(&mut self, slot: usize) {
        self.gone[slot / 64] |= 1 << (slot % 64);
    }

    fn entry(&self, slot: usize) -> Entry {
        Entry {
            id: RecordId(self.base + u64::from(self.ids.get(slot))),
            at: Location {
                segment: self.segment,
                offset: self.offsets[slot],
                len: self.lens.get(slot),
            },
        }
    }

    /// The slot holding `id`, live or gone.
    fn slot_of(&self, id: u64) -> Option<usize> {
        let delta = u32::try_from(id.checked_sub(self.base)?).ok()?;
        self.ids.find(delta)
    }

    /// The first slot whose id is above `id`.
    fn slot_after(&self, id: u64) -> usize {
        match id.checked_sub(self.base).map(u32::try_from) {
            None => 0,
            Some(Err(_)) => self.ids.len(),
            Some(Ok(delta)) => self.ids.after(delta),
        }
    }

    fn live_entries(&self) -> impl Iterator<Item = Entry> + '_ {
        (self.head as usize..self.ids.len())
            .filter(|&slot| !self.is_gone(slot))
            .map(|slot| self.entry(slot))
    }
}

/// One device's records, oldest first.
#[derive(Debug, Default)]
pub(super) struct Records {
    chunks: VecDeque<Chunk>,
    len: usize,
}

impl Records {
    /// Live records.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The oldest live record.
    pub(super) fn oldest(&self) -> Option<Entry> {
        let chunk = self.chunks.front()?;
        Some(chunk.entry(chunk.head as usize))
    }

    /// Adds a record; false if one with its id is already here. Ids arrive in increasing
    /// order, except at open; then the record is put in its place.
    pub(super) fn insert(&mut self, entry: Entry) -> bool {
        match self.chunks.back_mut() {
            Some(last) if last.last_id() >= entry.id.0 => return self.insert_before(entry),
            Some(last) if last.takes(&entry) => last.push(entry),
            _ => self.chunks.push_back(Chunk::new(entry)),
        }
        self.len += 1;
        true
    }

    /// The out-of-order case: the chunk whose ids span `entry`'s (or the one before it,
    /// or the first) is rebuilt with it. At most [`CHUNK_LEN`] records move.
    fn insert_before(&mut self, entry: Entry) -> bool {
        let id = entry.id.0;
        let k = self
            .chunks
            .partition_point(|chunk| chunk.base <= id)
            .saturating_sub(1);
        let chunk = &self.chunks[k];
        if chunk.slot_of(id).is_some_and(|slot| !chunk.is_gone(slot)) {
            return false;
        }
        let mut entries: Vec<Entry> = chunk.live_entries().collect();
        let at = entries.partition_point(|e| e.id.0 < id);
        entries.insert(at, entry);
        let mut rebuilt = Self::default();
        for e in entries {
            rebuilt.insert(e);
        }
        let tail = self.chunks.split_off(k + 1);
        self.chunks.pop_back();
        self.chunks.extend(rebuilt.chunks);
        self.chunks.extend(tail);
        self.len += 1;
        true
    }

    /// Up to `limit` live records with ids above `after`, oldest first.
    pub(super) fn after(&self, after: Option<RecordId>, limit: usize) -> Vec<Entry> {
        let Some(after) = after else {
            return self.iter_from(0, 0).take(limit).collect();
        };
        let k = self
            .chunks
            .partition_point(|chunk| chunk.last_id() <= after.0);
        let slot = self
            .chunks
            .get(k)
            .map_or(0, |chunk| chunk.slot_after(after.0));
        self.iter_from(k, slot).take(limit).collect()
    }

    /// Live records from chunk `k`'s slot `slot` on.
    fn iter_from(&self, k: usize, slot: usize) -> impl Iterator<Item = Entry> + '_ {
        self.chunks
            .range(k..)
            .enumerate()
            .flat_map(move |(i, chunk)| {
                let from = if i == 0 { slot } else { 0 }.max(chunk.head as usize);
                (from..chunk.ids.len())
                    .filter(|&s| !chunk.is_gone(s))
                    .map(|s| chunk.entry(s))
            })
    }

    /// Takes a record out: the record and whether it was the oldest; `None` if it is not
    /// here (any more).
    pub(super) fn remove(&mut self, id: RecordId) -> Option<(Entry, bool)> {
        let k = self
            .chunks
            .partition_point(|chunk| chunk.base <= id.0)
            .checked_sub(1)?;
        let chunk = &mut self.chunks[k];
        let slot = chunk.slot_of(id.0)?;
        if chunk.is_gone(slot) {
            return None;
        }
        let entry = chunk.entry(slot);
        let oldest = k == 0 && slot == chunk.head as usize;
        chunk.mark_gone(slot);
        chunk.live -= 1;
        while (chunk.head as usize) < chunk.ids.len() && chunk.is_gone(chunk.head as usize) {
            chunk.head += 1;
        }
        if chunk.live == 0 {
            self.chunks.remove(k);
        }
        self.len -= 1;
        Some((entry, oldest))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::{CHUNK_LEN, Entry, Records};
    use crate::queue::record::RecordId;
    use crate::queue::segments::Location;

    fn entry(id: u64, segment: u32) -> Entry {
        Entry {
            id: RecordId(id),
            at: Location {
                segment,
                offset: u32::try_from(id % 1_000_000).expect("small") * 7,
                // Mostly one length, now and then another: both kinds of chunk.
                len: 300 + u32::from(id.is_multiple_of(97)),
            },
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Insert the id this far above the newest; a new segment if the second is 0.
        Append(u64, u32),
        /// Insert an id at or below the newest (if it is not there), in segment 1 to 3.
        Earlier(u64, u32),
        Remove(u64),
        After(u64, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            // Mostly close ids (few devices), sometimes far apart (many), and now and
            // then a new segment: chunks fill up, widen their ids, and end.
            12 => (1..40u64, 0..60u32).prop_map(|(d, s)| Op::Append(d, s)),
            1 => (1..300_000u64, 0..60u32).prop_map(|(d, s)| Op::Append(d, s)),
            1 => (0..2_000_000u64, 0..3u32).prop_map(|(i, s)| Op::Earlier(i, s)),
            6 => (0..2_000_000u64).prop_map(Op::Remove),
            2 => (0..2_000_000u64, 0..600usize).prop_map(|(i, l)| Op::After(i, l)),
        ]
    }

    proptest! {
        /// Against a sorted map: the same records, the same answers, whatever the order
        /// of inserts and removals.
        #[test]
        fn behaves_as_a_sorted_map(ops in proptest::collection::vec(op(), 1..1500)) {
            let mut records = Records::default();
            let mut model: BTreeMap<u64, Entry> = BTreeMap::new();
            let mut newest = 0u64;
            let mut segment = 1u32;
            for op in ops {
                match op {
                    Op::Append(delta, bump) => {
                        newest += delta;
                        segment += u32::from(bump == 0);
                        let e = entry(newest, segment);
                        prop_assert!(records.insert(e));
                        model.insert(newest, e);
                    }
                    Op::Earlier(i, s) => {
                        let id = i % (newest + 1);
                        let e = entry(id, s + 1);
                        let fresh = !model.contains_key(&id);
                        prop_assert_eq!(records.insert(e), fresh);
                        model.entry(id).or_insert(e);
                        newest = newest.max(id);
                    }
                    Op::Remove(i) => {
                        let nth = |n: u64| {
                            let n = usize::try_from(n).expect("small");
                            model.keys().nth(n).copied().unwrap_or(0)
                        };
                        let len = model.len().max(1) as u64;
                        let id = match i % 3 {
                            // Any id, often not queued.
                            0 => i / 3 % (newest + 1),
                            // Any record.
                            1 => nth(i / 3 % len),
                            // One of the oldest, as acknowledgements come.
                            _ => nth(i / 3 % len.min(8)),
                        };
                        let oldest = model.keys().next().copied();
                        let want = model.remove(&id).map(|e| (e, oldest == Some(id)));
                        prop_assert_eq!(records.remove(RecordId(id)), want);
                    }
                    Op::After(i, limit) => {
                        let after = i % (newest + 2);
                        let want: Vec<Entry> =
                            model.range(after + 1..).map(|(_, e)| *e).take(limit).collect();
                        prop_assert_eq!(records.after(Some(RecordId(after)), limit), want);
                        let all: Vec<Entry> = model.values().copied().take(limit).collect();
                        prop_assert_eq!(records.after(None, limit), all);
                    }
                }
                prop_assert_eq!(records.len(), model.len());
                prop_assert_eq!(records.oldest(), model.values().next().copied());
            }
        }
    }

    /// Bytes held by a million records of one of `devices` devices whose records
    /// alternate, and the chunks.
    fn a_million(devices: u64, len: impl Fn(u64) -> u32) -> (usize, usize) {
        let mut records = Records::default();
        for n in 0..1_000_000u64 {
            let segment = 1 + u32::try_from(n / 200_000).expect("small");
            let mut e = entry(n * devices, segment);
            e.at.len = len(n);
            records.insert(e);
        }
        let mut bytes = records.chunks.len() * size_of::<super::Chunk>();
        for chunk in &records.chunks {
            bytes += chunk.ids.bytes() + 4 * chunk.offsets.capacity();
            if let super::Lens::Each(lens) = &chunk.lens {
                bytes += 4 * lens.capacity();
            }
        }
        (bytes, records.chunks.len())
    }

    #[test]
    fn a_record_takes_6_to_12_bytes() {
        // One more chunk at each of the four changes of segment, at most.
        let most_chunks = 1_000_000usize.div_ceil(CHUNK_LEN) + 4;
        let varied = |n: u64| 300 + u32::try_from(n % 7).expect("small");
        for (devices, same_len, most) in [
            (10, true, 6_600_000),
            (10, false, 10_600_000),
            (1000, true, 8_600_000),
            (1000, false, 12_600_000),
        ] {
            let (bytes, chunks) = if same_len {
                a_million(devices, |_| 301)
            } else {
                a_million(devices, varied)
            };
            assert!(
                bytes < most && chunks <= most_chunks,
                "{devices} devices, same length {same_len}: {bytes} B, {chunks} chunks"
            );
        }
    }

    #[test]
    fn a_removal_in_the_middle_leaves_the_order() {
        let mut records = Records::default();
        for id in 1..=600 {
            records.insert(entry(id, 1));
        }
        assert_eq!(records.remove(RecordId(300)).map(|r| r.1), Some(false));
        assert_eq!(records.remove(RecordId(1)).map(|r| r.1), Some(true));
        assert_eq!(records.remove(RecordId(1)), None);
        let ids: Vec<u64> = records
            .after(Some(RecordId(298)), 3)
            .iter()
            .map(|e| e.id.0)
            .collect();
        assert_eq!(ids, [299, 301, 302]);
        assert_eq!(records.oldest().map(|e| e.id.0), Some(2));
    }
}
