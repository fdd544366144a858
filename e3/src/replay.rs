//! The replay rule: per device and direction, an envelope whose `seq` was already
//! accepted is a duplicate, and one more than [`ReplayWindow::SPAN`] below the highest
//! accepted `seq` is stale. Everything else is fresh, in any order, so a backlog that
//! arrives days late and out of order is still accepted exactly once.
//!
//! State is a ring of bits over the last `SPAN + 1` sequence numbers (about 8 KiB per
//! device and direction). [`ReplayWindow::to_bytes`] saves it compactly (a list of the
//! gaps when there are few, else the bitmap) and [`ReplayWindow::from_bytes`] restores it.

use alloc::vec::Vec;

use thiserror::Error;

/// What the replay rule says about a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Not seen before and inside the window: deliver it.
    Fresh,
    /// Already accepted: drop it.
    Duplicate,
    /// More than `SPAN` below the highest accepted: drop it.
    Stale,
}

impl Verdict {
    /// A stable lower-case name, usable as a metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::Duplicate => "duplicate",
            Self::Stale => "stale",
        }
    }
}

/// Saved replay state that cannot be restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ReplayStateError {
    /// The bytes do not start with the expected magic and version.
    #[error("replay state has an unknown format")]
    Format,
    /// The bytes end early or have trailing garbage.
    #[error("replay state has the wrong length")]
    Length,
    /// A listed gap lies outside the window.
    #[error("replay state lists a gap outside the window")]
    Gap,
}

/// Bits in the ring: enough for `SPAN + 1` consecutive sequence numbers, rounded to words.
const RING_WORDS: usize = 1025;
const RING_BITS: u64 = RING_WORDS as u64 * 64;
const MAGIC: &[u8; 4] = b"E3RW";
const FORMAT_GAPS: u8 = 1;
const FORMAT_BITMAP: u8 = 2;

/// Replay state for one device and direction.
#[derive(Clone)]
pub struct ReplayWindow {
    /// Highest accepted seq; 0 while nothing has been accepted.
    highest: u64,
    /// Bit `seq % RING_BITS` is set when `seq` (within the window) was accepted.
    ring: Vec<u64>,
}

impl core::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ReplayWindow")
            .field("highest", &self.highest)
            .finish_non_exhaustive()
    }
}

/// Two windows are equal when they give the same verdict for every seq.
impl PartialEq for ReplayWindow {
    fn eq(&self, other: &Self) -> bool {
        self.highest == other.highest && self.gaps().eq(other.gaps())
    }
}

impl Eq for ReplayWindow {}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// How far below the highest accepted seq an envelope may still be accepted.
    pub const SPAN: u64 = 65_536;

    /// A window that has accepted nothing.
    pub fn new() -> Self {
        Self {
            highest: 0,
            ring: alloc::vec![0; RING_WORDS],
        }
    }

    /// The highest accepted seq, or 0 if none.
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// What the rule says about `seq`, without recording it.
    pub fn check(&self, seq: u64) -> Verdict {
        if seq > self.highest {
            return Verdict::Fresh;
        }
        if self.highest - seq > Self::SPAN {
            return Verdict::Stale;
        }
        if self.bit(seq) {
            Verdict::Duplicate
        } else {
            Verdict::Fresh
        }
    }

    /// Applies the rule and records `seq` if it is fresh. Call this only once the
    /// message is durably delivered, so a crash before delivery lets a resend through.
    pub fn accept(&mut self, seq: u64) -> Verdict {
        let verdict = self.check(seq);
        if verdict == Verdict::Fresh && seq != 0 {
            self.advance_to(seq);
            self.set_bit(seq);
        }
        verdict
    }

    fn advance_to(&mut self, seq: u64) {
        if seq <= self.highest {
            return;
        }
        if seq - self.highest >= RING_BITS {
            self.ring.fill(0);
        } else {
            for skipped in self.highest + 1..seq {
                self.clear_bit(skipped);
            }
        }
        self.highest = seq;
    }

    fn slot(seq: u64) -> (usize, u64) {
        let bit = seq % RING_BITS;
        // bit / 64 < RING_WORDS, which fits any usize.
        (usize::try_from(bit / 64).unwrap_or(0), 1 << (bit % 64))
    }

    fn bit(&self, seq: u64) -> bool {
        let (word, mask) = Self::slot(seq);
        self.ring.get(word).is_some_and(|w| w & mask != 0)
    }

    fn set_bit(&mut self, seq: u64) {
        let (word, mask) = Self::slot(seq);
        if let Some(w) = self.ring.get_mut(word) {
            *w |= mask;
        }
    }

    fn clear_bit(&mut self, seq: u64) {
        let (word, mask) = Self::slot(seq);
        if let Some(w) = self.ring.get_mut(word) {
            *w &= !mask;
        }
    }

    /// Sequence numbers inside the window that have not been accepted, highest first.
    fn gaps(&self) -> impl Iterator<Item = u64> + '_ {
        let lowest = self.highest.saturating_sub(Self::SPAN).max(1);
        (lowest..self.highest).rev().filter(|&seq| !self.bit(seq))
    }

    /// Serialises the state; restores with [`ReplayWindow::from_bytes`].
    ///
    /// Layout: `"E3RW"`, a format byte, the highest seq (u64 BE), then either the gaps
    /// as u16 BE offsets below the highest (format 1, when that is smaller) or the
    /// window as a bitmap of `SPAN` bits, bit `i` for `highest - 1 - i` (format 2).
    pub fn to_bytes(&self) -> Vec<u8> {
        let bitmap_len = usize::try_from(Self::SPAN / 8).unwrap_or(usize::MAX);
        let gap_count = self.gaps().take(bitmap_len / 2 + 1).count();
        let mut out = Vec::with_capacity(13 + (gap_count * 2).min(bitmap_len));
        out.extend_from_slice(MAGIC);
        if gap_count * 2 <= bitmap_len {
            out.push(FORMAT_GAPS);
            out.extend_from_slice(&self.highest.to_be_bytes());
            for seq in self.gaps() {
                // Offsets are 1..=SPAN; store offset - 1, which fits a u16.
                let offset = u16::try_from(self.highest - seq - 1).unwrap_or(u16::MAX);
                out.extend_from_slice(&offset.to_be_bytes());
            }
        } else {
            out.push(FORMAT_BITMAP);
            out.extend_from_slice(&self.highest.to_be_bytes());
            let mut bitmap = alloc::vec![0u8; bitmap_len];
            for offset in 1..=Self::SPAN.min(self.highest.saturating_sub(1)) {
                if self.bit(self.highest - offset) {
                    let i = usize::try_from(offset - 1).unwrap_or(0);
                    if let Some(byte) = bitmap.get_mut(i / 8) {
                        *byte |= 1 << (i % 8);
                    }
                }
            }
            out.extend_from_slice(&bitmap);
        }
        out
    }

    /// Restores state saved by [`ReplayWindow::to_bytes`].
    ///
    /// # Errors
    /// A [`ReplayStateError`] if the bytes are not a saved window.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ReplayStateError> {
        let (magic, rest) = bytes.split_at_checked(4).ok_or(ReplayStateError::Length)?;
        if magic != MAGIC {
            return Err(ReplayStateError::Format);
        }
        let (&format, rest) = rest.split_first().ok_or(ReplayStateError::Length)?;
        let (highest, body) = rest.split_at_checked(8).ok_or(ReplayStateError::Length)?;
        let highest = u64::from_be_bytes(highest.try_into().map_err(|_| ReplayStateError::Length)?);
        let mut window = Self::new();
        if highest == 0 {
            return if body.is_empty() && format == FORMAT_GAPS {
                Ok(window)
            } else {
                Err(ReplayStateError::Length)
            };
        }
        window.highest = highest;
        match format {
            FORMAT_GAPS => window.restore_from_gaps(body)?,
            FORMAT_BITMAP => window.restore_from_bitmap(body)?,
            _ => return Err(ReplayStateError::Format),
        }
        Ok(window)
    }

    fn restore_from_gaps(&mut self, body: &[u8]) -> Result<(), ReplayStateError> {
        if !body.len().is_multiple_of(2) {
            return Err(ReplayStateError::Length);
        }
        let lowest = self.highest.saturating_sub(Self::SPAN).max(1);
        for seq in lowest..=self.highest {
            self.set_bit(seq);
        }
        for pair in body.chunks_exact(2) {
            let offset = u64::from(u16::from_be_bytes([
                pair.first().copied().unwrap_or(0),
                pair.get(1).copied().unwrap_or(0),
            ])) + 1;
            let seq = self.highest.checked_sub(offset).filter(|&s| s >= lowest);
            self.clear_bit(seq.ok_or(ReplayStateError::Gap)?);
        }
        Ok(())
    }

    fn restore_from_bitmap(&mut self, body: &[u8]) -> Result<(), ReplayStateError> {
        if body.len() as u64 != Self::SPAN / 8 {
            return Err(ReplayStateError::Length);
        }
        self.set_bit(self.highest);
        for offset in 1..=Self::SPAN.min(self.highest - 1) {
            let i = usize::try_from(offset - 1).unwrap_or(0);
            if body
                .get(i / 8)
                .is_some_and(|byte| byte & (1 << (i % 8)) != 0)
            {
                self.set_bit(self.highest - offset);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_then_duplicate() {
        let mut w = ReplayWindow::new();
        for seq in 1..=10 {
            assert_eq!(w.accept(seq), Verdict::Fresh);
        }
        assert_eq!(w.accept(5), Verdict::Duplicate);
        assert_eq!(w.accept(10), Verdict::Duplicate);
        assert_eq!(w.highest(), 10);
    }

    #[test]
    fn out_of_order_inside_window_is_fresh_once() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.accept(100), Verdict::Fresh);
        assert_eq!(w.accept(3), Verdict::Fresh);
        assert_eq!(w.accept(3), Verdict::Duplicate);
        assert_eq!(w.accept(99), Verdict::Fresh);
    }

    #[test]
    fn stale_boundary_is_exactly_span() {
        let mut w = ReplayWindow::new();
        let top = 1_000_000;
        w.accept(top);
        assert_eq!(w.check(top - ReplayWindow::SPAN), Verdict::Fresh);
        assert_eq!(w.check(top - ReplayWindow::SPAN - 1), Verdict::Stale);
        assert_eq!(w.accept(top - ReplayWindow::SPAN), Verdict::Fresh);
        assert_eq!(w.accept(top - ReplayWindow::SPAN), Verdict::Duplicate);
    }

    #[test]
    fn slot_reuse_after_advance_does_not_leak_old_bits() {
        let mut w = ReplayWindow::new();
        w.accept(5);
        // 5 + RING_BITS shares 5's slot; once the window moves past, that seq is fresh.
        assert_eq!(w.accept(5 + RING_BITS), Verdict::Fresh);
        assert_eq!(w.check(5 + RING_BITS - 1), Verdict::Fresh);
        assert_eq!(w.check(5), Verdict::Stale);
    }

    #[test]
    fn save_and_restore_both_formats() {
        let mut sparse = ReplayWindow::new();
        for seq in (1..=200_000).filter(|s| s % 1000 != 0) {
            sparse.accept(seq);
        }
        let bytes = sparse.to_bytes();
        assert_eq!(bytes[4], FORMAT_GAPS);
        let back = ReplayWindow::from_bytes(&bytes).expect("restores");
        assert_eq!(back, sparse);

        let mut dense_gaps = ReplayWindow::new();
        for seq in (1..=100_000).step_by(2) {
            dense_gaps.accept(seq);
        }
        let bytes = dense_gaps.to_bytes();
        assert_eq!(bytes[4], FORMAT_BITMAP);
        let back = ReplayWindow::from_bytes(&bytes).expect("restores");
        for seq in 1..=100_001 {
            assert_eq!(back.check(seq), dense_gaps.check(seq), "seq {seq}");
        }
    }

    #[test]
    fn empty_window_round_trips_and_garbage_is_rejected() {
        let empty = ReplayWindow::new();
        assert_eq!(ReplayWindow::from_bytes(&empty.to_bytes()), Ok(empty));
        assert_eq!(
            ReplayWindow::from_bytes(b"nope"),
            Err(ReplayStateError::Format)
        );
        assert_eq!(
            ReplayWindow::from_bytes(b"E3RW\x01\0\0\0\0\0\0\0\x05\xff"),
            Err(ReplayStateError::Length)
        );
        // A gap at offset 10 below highest 5 lies outside the window.
        assert_eq!(
            ReplayWindow::from_bytes(b"E3RW\x01\0\0\0\0\0\0\0\x05\0\x09"),
            Err(ReplayStateError::Gap)
        );
    }
}
