//! Downlink sequence numbers: one counter per device for the cloud-to-device direction,
//! shared by commands and receipts (docs/PAYLOADS.md), kept in `state.json` as
//! `next_downlink_seq`.
//!
//! A reservation advances the counter and is written (fsync'd) before the range is
//! handed out, so no seq is ever used twice, whatever crashes or restarts happen. A
//! range reserved but not used is a gap, which the device's replay rule tolerates as
//! long as reservations stay far below its 65536-wide window.

use std::ops::Range;

/// The first downlink seq of a device (E3-SPEC: seqs start at 1).
pub(super) const FIRST: u64 = 1;

/// Takes `count` seqs from the counter `next`: returns them and advances `next`.
/// `None` (and `next` unchanged) when the counter would overflow.
pub(super) fn reserve(next: &mut u64, count: u64) -> Option<Range<u64>> {
    let start = (*next).max(FIRST);
    let end = start.checked_add(count)?;
    *next = end;
    Some(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_reservations_are_adjacent_and_disjoint() {
        let mut next = FIRST;
        assert_eq!(reserve(&mut next, 10), Some(1..11));
        assert_eq!(reserve(&mut next, 1), Some(11..12));
        assert_eq!(reserve(&mut next, 0), Some(12..12));
        assert_eq!(next, 12);
    }

    #[test]
    fn a_zero_counter_starts_at_one() {
        let mut next = 0;
        assert_eq!(reserve(&mut next, 2), Some(1..3));
    }

    #[test]
    fn overflow_reserves_nothing() {
        let mut next = u64::MAX - 1;
        assert_eq!(reserve(&mut next, 2), None);
        assert_eq!(next, u64::MAX - 1);
    }
}
