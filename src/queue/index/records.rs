//! One device's queued records, compactly: 8 bytes a record (12 where a device's frames
//! differ in length) instead of the 24 of an `(id, Location)` pair in a `VecDeque` that
//! doubles as it grows.
//!
//! Records sit in chunks of up to [`CHUNK_LEN`], all in one segment, ids ascending. A
//! chunk keeps each id as its distance from the chunk's first id and each frame's offset,
//! in two arrays, and the frames' length once while they are all the same (a sensor's
//! readings are), else a third array. A record taken out is marked gone in a bitmap until
//! its whole chunk is gone, so removal never moves the others; with acknowledgements
//! arriving about in order, such slots are few and short-lived.

use std::collections::VecDeque;

use super::Entry;
use crate::queue::record::RecordId;
use crate::queue::segments::Location;

/// Records per chunk: 2 to 3 KiB of slots; a chunk's own overhead is under 1 byte a
/// record.
const CHUNK_LEN: usize = 256;

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
                let mut lens = Vec::with_capacity(CHUNK_LEN);
                lens.resize(slot, *same);
                lens.push(len);
                *self = Self::Each(lens);
            }
            Self::Each(lens) => lens.push(len),
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
    ids: Vec<u32>,
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
            ids: Vec::new(),
            offsets: Vec::new(),
            lens: Lens::Same(entry.at.len),
            gone: [0; CHUNK_LEN / 64],
        };
        chunk.push(entry);
        chunk
    }

    fn last_id(&self) -> u64 {
        self.base + u64::from(*self.ids.last().expect("a chunk is never empty"))
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
            id: RecordId(self.base + u64::from(self.ids[slot])),
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
        self.ids.binary_search(&delta).ok()
    }

    /// The first slot whose id is above `id`.
    fn slot_after(&self, id: u64) -> usize {
        match id.checked_sub(self.base).map(u32::try_from) {
            None => 0,
            Some(Err(_)) => self.ids.len(),
            Some(Ok(delta)) => self.ids.partition_point(|&d| d <= delta),
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
        /// Insert the id this far above the newest (0: a random earlier id).
        Append(u64, u32),
        Earlier(u64, u32),
        Remove(u64),
        After(u64, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (1..3_000u64, 0..3u32).prop_map(|(d, s)| Op::Append(d, s)),
            1 => (0..200_000u64, 0..3u32).prop_map(|(i, s)| Op::Earlier(i, s)),
            4 => (0..200_000u64).prop_map(Op::Remove),
            2 => (0..200_000u64, 0..600usize).prop_map(|(i, l)| Op::After(i, l)),
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
                        segment += bump / 2;
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
                        let id = i % (newest + 1);
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

    /// Bytes held by a million records of ten devices interleaved, and the chunks.
    fn a_million(len: impl Fn(u64) -> u32) -> (usize, usize) {
        let mut records = Records::default();
        for n in 0..1_000_000u64 {
            let segment = 1 + u32::try_from(n / 200_000).expect("small");
            let mut e = entry(n * 10, segment);
            e.at.len = len(n);
            records.insert(e);
        }
        let mut bytes = records.chunks.len() * size_of::<super::Chunk>();
        for chunk in &records.chunks {
            bytes += 4 * (chunk.ids.capacity() + chunk.offsets.capacity());
            if let super::Lens::Each(lens) = &chunk.lens {
                bytes += 4 * lens.capacity();
            }
        }
        (bytes, records.chunks.len())
    }

    #[test]
    fn a_record_takes_8_bytes_or_12_if_lengths_differ() {
        // One more chunk at each of the four changes of segment, at most.
        let most_chunks = 1_000_000usize.div_ceil(CHUNK_LEN) + 4;
        let (same, chunks) = a_million(|_| 301);
        assert!(
            same < 8_600_000 && chunks <= most_chunks,
            "{same} B, {chunks}"
        );
        let (each, chunks) = a_million(|n| 300 + u32::try_from(n % 7).expect("small"));
        assert!(
            each < 12_600_000 && chunks <= most_chunks,
            "{each} B, {chunks}"
        );
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
