//! One group commit's frames, laid out for one vectored write.
//!
//! Small frames are encoded whole into a buffer the log reuses. A large payload is not
//! copied there: the buffer holds its frame's head, and the write (`pwritev`) takes the
//! payload from where the device's publish left it. A 16 KiB envelope is then copied
//! once on its way into the file (by the kernel), not twice, and the buffer stays the
//! size of the heads instead of growing to the largest batch ever written.

use std::fs::File;
use std::io::{self, IoSlice};

use super::Append;
use crate::queue::record;

/// Payloads this long or longer are written from where they are; shorter ones are
/// copied into the buffer, so many small frames make one slice of the write.
const COPY_BELOW: usize = 1024;
/// Slices per `pwritev` call (Linux's `IOV_MAX`).
const MAX_SLICES: usize = 1024;

/// A batch of frames, encoded, ready to be written at one offset.
pub(super) struct Batch<'a> {
    buffer: &'a [u8],
    /// Payloads written from where they are, each after the buffer's bytes up to the
    /// position it is paired with.
    payloads: Vec<(usize, &'a [u8])>,
    /// Each frame's length, in order.
    pub(super) lens: Vec<usize>,
}

impl<'a> Batch<'a> {
    /// Bytes `frames` will take in the file (known before the segment, and so the seed,
    /// is chosen).
    pub(super) fn len_of(frames: &[Append<'_>]) -> u64 {
        frames
            .iter()
            .map(|f| (record::FRAME_OVERHEAD + f.key.len() + f.payload.len()) as u64)
            .sum()
    }

    /// Encodes `frames` with their CRC seeded with `seed` (clearing `buffer` first).
    pub(super) fn encode(buffer: &'a mut Vec<u8>, seed: u32, frames: &[Append<'a>]) -> Self {
        buffer.clear();
        let mut payloads = Vec::new();
        let mut lens = Vec::with_capacity(frames.len());
        for frame in frames {
            let (key, arrival_ms, payload) = (frame.key, frame.arrival_ms, frame.payload);
            if payload.len() < COPY_BELOW {
                lens.push(record::encode_frame_into(
                    buffer, seed, key, arrival_ms, payload,
                ));
            } else {
                let head = record::encode_frame_head_into(buffer, seed, key, arrival_ms, payload);
                payloads.push((buffer.len(), payload));
                lens.push(head + payload.len());
            }
        }
        Self {
            buffer,
            payloads,
            lens,
        }
    }

    /// Writes the whole batch at `offset` of `file` (not synced).
    pub(super) fn write_at(&self, file: &File, offset: u64) -> io::Result<()> {
        let mut slices = Vec::with_capacity(2 * self.payloads.len() + 1);
        let mut from = 0;
        for &(at, payload) in &self.payloads {
            slices.push(IoSlice::new(self.buffer.get(from..at).unwrap_or_default()));
            slices.push(IoSlice::new(payload));
            from = at;
        }
        slices.push(IoSlice::new(self.buffer.get(from..).unwrap_or_default()));
        slices.retain(|slice| !slice.is_empty());
        write_all_vectored_at(file, &mut slices, offset)
    }
}

/// `pwritev` until every slice is written: a call may write less than asked, and one
/// call takes at most [`MAX_SLICES`] slices.
fn write_all_vectored_at(
    file: &File,
    mut slices: &mut [IoSlice<'_>],
    mut offset: u64,
) -> io::Result<()> {
    while !slices.is_empty() {
        let take = slices.len().min(MAX_SLICES);
        match rustix::io::pwritev(file, slices.get(..take).unwrap_or_default(), offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the file took no bytes of the batch",
                ));
            }
            Ok(written) => {
                offset += written as u64;
                IoSlice::advance_slices(&mut slices, written);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::{Batch, COPY_BELOW, MAX_SLICES};
    use crate::queue::record::{self, RecordId};
    use crate::queue::segments::Append;

    const SEED: u32 = 0x5EED;

    /// Payloads around the copy threshold, and more large ones than one call takes.
    fn payloads() -> Vec<Vec<u8>> {
        let mut sizes = vec![0, 1, COPY_BELOW - 1, COPY_BELOW, COPY_BELOW + 1, 16 << 10];
        sizes.extend(std::iter::repeat_n(COPY_BELOW, MAX_SLICES));
        sizes.extend([3, 70_000, 5]);
        sizes
            .iter()
            .enumerate()
            .map(|(n, &size)| (0..size).map(|i| (i * 31 + n) as u8).collect())
            .collect()
    }

    #[test]
    fn the_file_gets_the_same_bytes_as_frames_encoded_whole() {
        let payloads = payloads();
        let keys: Vec<Vec<u8>> = (0..payloads.len())
            .map(|n| record::encode_key(&format!("device-{}", n % 7), RecordId(n as u64)))
            .collect();
        let frames: Vec<Append<'_>> = payloads
            .iter()
            .zip(&keys)
            .enumerate()
            .map(|(n, (payload, key))| Append {
                key,
                arrival_ms: 1_700_000_000_000 + n as u64,
                payload,
            })
            .collect();
        let mut expected = Vec::new();
        let mut expected_lens = Vec::new();
        for frame in &frames {
            let len = record::encode_frame_into(
                &mut expected,
                SEED,
                frame.key,
                frame.arrival_ms,
                frame.payload,
            );
            expected_lens.push(len);
        }

        let dir = tempfile::tempdir().expect("temp dir");
        let file = std::fs::File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.path().join("segment"))
            .expect("file");
        let mut buffer = vec![7; 100];
        let batch = Batch::encode(&mut buffer, SEED, &frames);
        assert_eq!(batch.lens, expected_lens);
        assert_eq!(Batch::len_of(&frames), expected.len() as u64);
        batch.write_at(&file, 16).expect("written");

        let mut written = vec![0; expected.len()];
        file.read_exact_at(&mut written, 16).expect("read back");
        assert!(written == expected, "the file differs from the frames");
        let mut at = 0;
        for (payload, key) in payloads.iter().zip(&keys) {
            let frame = record::read_frame_seeded(&written[at..], SEED).expect("a valid frame");
            assert_eq!(
                (frame.key, frame.payload),
                (key.as_slice(), payload.as_slice())
            );
            at += frame.len;
        }
        assert_eq!(at, written.len());
    }
}
