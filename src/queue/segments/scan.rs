//! Reading every frame of a segment at open, past damage.
//!
//! A segment is read front to back through a window of at most about one frame plus
//! [`CHUNK`] bytes, so a large segment never sits in memory whole. Where the bytes are
//! not a valid frame (a torn write at the end, a flipped bit, zeros from a filesystem
//! that lost a block), the scan looks for the next frame tag from which a valid frame
//! reads, reports the bytes in between as damaged and goes on: one bad frame costs that
//! frame only.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::queue::record::{self, FRAME_TAG, Frame, FrameError};

/// Bytes read from the file at a time.
const CHUNK: usize = 1 << 20;

/// What [`scan`] met, besides the frames it handed over.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct ScanOutcome {
    /// Ranges `(offset, len)` of bytes that are not frames.
    pub(super) damaged: Vec<(u64, u64)>,
    /// Where the last valid frame ends.
    pub(super) valid_end: u64,
}

/// The bytes of `file` from `start` to `len` seen through a sliding buffer.
struct Window<'f> {
    file: &'f File,
    len: u64,
    /// File offset of `buf[0]`.
    at: u64,
    buf: Vec<u8>,
}

impl Window<'_> {
    /// Makes the buffer hold the file from `pos` on, at least `want` bytes of it where
    /// the file has them, and returns them (shorter only at the end of the file).
    fn get(&mut self, pos: u64, want: usize) -> io::Result<&[u8]> {
        let end = self.at + self.buf.len() as u64;
        let want_end = pos.saturating_add(want as u64).min(self.len);
        if pos < self.at || want_end > end {
            if pos >= self.at && pos <= end {
                self.buf
                    .drain(..usize::try_from(pos - self.at).unwrap_or(usize::MAX));
            } else {
                self.buf.clear();
            }
            self.at = pos;
            let have = self.at + self.buf.len() as u64;
            let read_to = want_end
                .max(have.saturating_add(CHUNK as u64))
                .min(self.len);
            let old = self.buf.len();
            self.buf
                .resize(old + usize::try_from(read_to - have).unwrap_or(0), 0);
            self.file.read_exact_at(&mut self.buf[old..], have)?;
        }
        let from = usize::try_from(pos - self.at).unwrap_or(usize::MAX);
        Ok(self.buf.get(from..).unwrap_or_default())
    }
}

/// Bytes of a frame up to and including its payload length field, with the longest key.
const LONGEST_PREFIX: usize = record::FRAME_OVERHEAD + 255;

/// Reads the frame at `pos`, its CRC seeded with `seed`: `Ok(Some)` a valid frame,
/// `Ok(None)` not one.
fn frame_at<'w>(window: &'w mut Window<'_>, pos: u64, seed: u32) -> io::Result<Option<Frame<'w>>> {
    let prefix = window.get(pos, LONGEST_PREFIX)?;
    let total = match record::read_frame_seeded(prefix, seed) {
        Ok(frame) => frame.len,
        Err(FrameError::Invalid(_)) => return Ok(None),
        Err(FrameError::Incomplete) => match announced_len(prefix) {
            Some(total) => total,
            None => return Ok(None),
        },
    };
    let bytes = window.get(pos, total)?;
    Ok(record::read_frame_seeded(bytes, seed).ok())
}

/// The whole length a frame prefix announces, if the prefix is long enough to say.
fn announced_len(prefix: &[u8]) -> Option<usize> {
    let key_len = usize::from(*prefix.get(8)?);
    let at = 9 + key_len + 8;
    let payload_len = u32::from_be_bytes(prefix.get(at..at + 4)?.try_into().ok()?) as usize;
    (payload_len <= record::MAX_FRAME_PAYLOAD).then_some(at + 4 + payload_len)
}

/// Zero bytes in whole blocks of 64 at the front of `bytes` (at the back with `rev`):
/// compared a block at a time, so that the room after a segment's frames (megabytes of
/// zeros after a crash) is crossed at memory speed.
fn zero_blocks(bytes: &[u8], rev: bool) -> usize {
    let zero = |block: &&[u8]| block.iter().fold(0, |acc, &b| acc | b) == 0;
    let blocks = if rev {
        bytes.rchunks_exact(64).take_while(zero).count()
    } else {
        bytes.chunks_exact(64).take_while(zero).count()
    };
    blocks * 64
}

/// The next offset after `pos` where the tag starts, or the file's end.
fn next_tag(window: &mut Window<'_>, pos: u64) -> io::Result<u64> {
    const _: () = assert!(FRAME_TAG[0] != 0, "no tag starts in a run of zeros");
    let mut from = pos + 1;
    loop {
        let bytes = window.get(from, CHUNK)?;
        if bytes.len() < FRAME_TAG.len() {
            return Ok(window.len);
        }
        let zeros = zero_blocks(bytes, false);
        let rest = &bytes[zeros..];
        if let Some(i) = rest.windows(FRAME_TAG.len()).position(|w| w == FRAME_TAG) {
            return Ok(from + (zeros + i) as u64);
        }
        // The tag may straddle the window's end: keep its last three bytes.
        from += (bytes.len() - (FRAME_TAG.len() - 1)) as u64;
    }
}

/// Calls `each(offset, frame)` for every valid frame of `file` between `start` and
/// `len` (CRC seeded with `seed`), in order.
///
/// # Errors
/// The OS error of a read; `each`'s own verdicts are its business.
pub(super) fn scan(
    file: &File,
    (start, len): (u64, u64),
    seed: u32,
    mut each: impl FnMut(u64, &Frame<'_>),
) -> io::Result<ScanOutcome> {
    let mut window = Window {
        file,
        len,
        at: start,
        buf: Vec::new(),
    };
    let mut outcome = ScanOutcome {
        valid_end: start,
        ..ScanOutcome::default()
    };
    let mut pos = start;
    while pos < len {
        if let Some(frame) = frame_at(&mut window, pos, seed)? {
            each(pos, &frame);
            pos += frame.len as u64;
            outcome.valid_end = pos;
            continue;
        }
        let mut next = next_tag(&mut window, pos)?;
        while next < len && frame_at(&mut window, next, seed)?.is_none() {
            next = next_tag(&mut window, next)?;
        }
        outcome.damaged.push((pos, next - pos));
        pos = next;
    }
    Ok(outcome)
}

/// Where the run of zero bytes that ends `file` at `to` starts, looking no further back
/// than `from`: the room a segment was created with and nobody wrote yet.
///
/// # Errors
/// The OS error of a read.
pub(super) fn zeros_from(file: &File, from: u64, to: u64) -> io::Result<u64> {
    let mut buf = vec![0; CHUNK];
    let mut end = to;
    while end > from {
        let start = end.saturating_sub(CHUNK as u64).max(from);
        let chunk = &mut buf[..usize::try_from(end - start).unwrap_or(CHUNK)];
        file.read_exact_at(chunk, start)?;
        let written = chunk.len() - zero_blocks(chunk, true);
        if let Some(last) = chunk[..written].iter().rposition(|&b| b != 0) {
            return Ok(start + last as u64 + 1);
        }
        end = start;
    }
    Ok(from)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::{CHUNK, scan, zeros_from};
    use crate::queue::record::{RecordId, encode_frame_into, encode_key};

    /// A 16-byte header, then `count` frames seeded with 7.
    fn frames(count: u64, payload_len: usize) -> (Vec<u8>, Vec<u64>) {
        let mut bytes = vec![0xAA; 16];
        let offsets = append_frames(&mut bytes, 0..count, payload_len, SEED);
        (bytes, offsets)
    }

    const SEED: u32 = 7;

    fn append_frames(
        bytes: &mut Vec<u8>,
        ids: std::ops::Range<u64>,
        payload_len: usize,
        seed: u32,
    ) -> Vec<u64> {
        let mut offsets = Vec::new();
        for id in ids {
            offsets.push(bytes.len() as u64);
            let key = encode_key("dev", RecordId(id));
            let payload = vec![(id % 251) as u8; payload_len];
            encode_frame_into(bytes, seed, &key, id, &payload);
        }
        offsets
    }

    fn scanned(bytes: &[u8]) -> (Vec<u64>, super::ScanOutcome) {
        let mut file = tempfile::tempfile().expect("tempfile");
        file.write_all(bytes).expect("write");
        let mut seen = Vec::new();
        let outcome = scan(&file, (16, bytes.len() as u64), SEED, |_, frame| {
            seen.push(frame.arrival_ms);
        })
        .expect("scan");
        (seen, outcome)
    }

    #[test]
    fn reads_every_frame_across_window_boundaries() {
        // Frames of 70 KiB straddle the 1 MiB chunks at many offsets.
        let (bytes, _) = frames(40, 70_000);
        assert!(bytes.len() > 2 * CHUNK);
        let (seen, outcome) = scanned(&bytes);
        assert_eq!(seen, (0..40).collect::<Vec<_>>());
        assert!(outcome.damaged.is_empty());
        assert_eq!(outcome.valid_end, bytes.len() as u64);
    }

    #[test]
    fn a_damaged_frame_costs_only_itself() {
        let (mut bytes, offsets) = frames(100, 300);
        let hit = usize::try_from(offsets[40]).expect("offset") + 50;
        bytes[hit] ^= 0x10;
        let (seen, outcome) = scanned(&bytes);
        let expected: Vec<u64> = (0..100).filter(|&id| id != 40).collect();
        assert_eq!(seen, expected);
        assert_eq!(outcome.damaged, [(offsets[40], offsets[41] - offsets[40])]);
    }

    #[test]
    fn a_torn_tail_is_reported_and_the_frames_before_it_kept() {
        let (bytes, offsets) = frames(10, 300);
        let cut = usize::try_from(offsets[9]).expect("offset") + 100;
        let (seen, outcome) = scanned(&bytes[..cut]);
        assert_eq!(seen, (0..9).collect::<Vec<_>>());
        assert_eq!(outcome.valid_end, offsets[9]);
        assert_eq!(outcome.damaged, [(offsets[9], 100)]);
    }

    #[test]
    fn frames_of_another_seed_are_not_frames() {
        // A reused file: this segment's frames, then the end of an earlier segment's.
        let (mut bytes, offsets) = frames(10, 300);
        let end = bytes.len() as u64;
        let mut earlier = Vec::new();
        append_frames(&mut earlier, 100..140, 300, SEED + 1);
        bytes.extend_from_slice(&earlier[150..]);
        let (seen, outcome) = scanned(&bytes);
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(outcome.valid_end, end);
        assert_eq!(outcome.damaged, [(end, bytes.len() as u64 - end)]);
        assert_eq!(offsets.len(), 10);
    }

    #[test]
    fn zeroed_blocks_in_the_middle_are_skipped() {
        let (mut bytes, offsets) = frames(200, 1000);
        let from = usize::try_from(offsets[50]).expect("offset") + 7;
        bytes[from..from + 8192].fill(0);
        let (seen, outcome) = scanned(&bytes);
        assert!(seen.contains(&49) && seen.contains(&60));
        let lost = 200 - seen.len();
        assert!((8..=10).contains(&lost), "lost {lost}");
        assert_eq!(outcome.damaged.len(), 1);
    }

    #[test]
    fn the_zeros_ending_a_file_are_found_across_chunks() {
        let mut bytes = vec![0u8; 3 * CHUNK];
        bytes[100] = 7;
        let mut file = tempfile::tempfile().expect("tempfile");
        file.write_all(&bytes).expect("write");
        let len = bytes.len() as u64;
        assert_eq!(zeros_from(&file, 0, len).expect("scan"), 101);
        assert_eq!(zeros_from(&file, 101, len).expect("scan"), 101);
        assert_eq!(
            zeros_from(&file, 200, len).expect("scan"),
            200,
            "not before from"
        );
        file.set_len(len + 10).expect("grow");
        assert_eq!(
            zeros_from(&file, 0, len + 10).expect("scan"),
            101,
            "a hole reads as zeros"
        );
    }
}
