//! The segment log: the queue's records as frames appended to files, synced once per
//! group commit, and deleted a whole file at a time once every record in it is gone.
//!
//! Why not a record per key in sled: a store-and-forward queue writes every record once
//! and deletes it soon after, in the order it came. sled 0.34 stores values inside its
//! B-tree leaves and rewrites a whole leaf every few changes, so each record was written
//! many times over (13 bytes to disk per payload byte at 256 B), and every insert and
//! removal copied a leaf in memory. Here a record is written once, with a 40-byte frame
//! around it, and removing it costs no write at all: the log only counts the records
//! each segment still holds, and removes the file when that count reaches zero.
//!
//! - [`SegmentLog::append`] writes a batch of frames with one `pwritev` at the end of
//!   the active segment (`batch`) and one `fdatasync`; when it returns `Ok`, the frames
//!   survive a crash and a power cut. A failed append (a full disk) changes nothing
//!   that a later append can see: the next one writes at the same offset again.
//! - A segment is created `segment_size` bytes long, sparse (see `file`), and closed for
//!   writing once its frames fill it: it is cut to its frames, and a new one is created
//!   (with a synced header, size and directory entry) for the next batch.
//! - [`SegmentLog::open`] reads every segment front to back (`scan`), hands each valid
//!   frame to the caller, which says whether the record is still queued, and reports
//!   damaged ranges. The newest segment ends in its unwritten room (zeros, cut off
//!   silently), after a crash perhaps in a torn batch before it (cut off and logged). It
//!   never writes into an old segment: appends go to a new one.
//! - [`SegmentLog::read`] reads one frame back with `pread` and checks its CRC again.
//! - [`SegmentLog::release`] forgets one record; a closed segment with no records left
//!   is deleted, or kept as the spare file the next segment reuses (`file::reuse`): one
//!   at most, and none while the queue is idle ([`SegmentLog::drop_spare`]) or the disk
//!   is full. A reader that still holds the segment's file keeps it from reuse.
//!
//! The log knows nothing of devices or acknowledgements; the queue keeps those.

mod batch;
mod file;
mod scan;
mod spare;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use super::record::{self, Frame};

use batch::Batch;
use file::HEADER_LEN;
use spare::Spare;

/// The default size at which a segment is closed and the next one started.
pub const DEFAULT_SEGMENT_SIZE: u64 = 8 << 20;

/// Where a frame is: its segment, its offset in it and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    /// The segment's number.
    pub segment: u32,
    /// Byte offset of the frame's tag in the segment.
    pub offset: u32,
    /// The frame's whole length.
    pub len: u32,
}

/// One record to append.
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    /// The record's key (`record::encode_key`).
    pub key: &'a [u8],
    /// When the gateway received it, in ms since the epoch.
    pub arrival_ms: u64,
    /// The envelope.
    pub payload: &'a [u8],
}

/// A frame read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFrame {
    /// The record's key.
    pub key: Vec<u8>,
    /// When the gateway received it.
    pub arrival_ms: u64,
    /// The envelope, sharing the buffer the frame was read into.
    pub payload: Bytes,
}

/// Bytes of a damaged range kept in a [`Damage`] (for the quarantine).
const DAMAGE_KEEP: usize = 64 << 10;

/// A range of a segment that holds no valid frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment's number.
    pub segment: u32,
    /// Where the range starts.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// Its first bytes (up to 64 KiB), read before the segment may be deleted.
    pub bytes: Vec<u8>,
}

/// What [`SegmentLog::open`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Valid frames read.
    pub frames: u64,
    /// Frames the caller kept.
    pub kept: u64,
    /// Damaged ranges, not counting a torn tail.
    pub damaged: Vec<Damage>,
    /// Bytes after the last valid frame of the newest segment: a batch whose write a
    /// crash cut short (never acknowledged to a device), `(segment, offset, len)`. The
    /// segment is cut there.
    pub torn_tail: Option<(u32, u64, u64)>,
    /// Segments deleted because none of their frames was kept.
    pub deleted: u64,
}

/// One segment the log knows.
#[derive(Debug)]
struct Segment {
    file: Arc<File>,
    /// The seed of its frames' CRC (`file::Header`).
    seed: u32,
    /// Records appended or kept at open and not yet released.
    live: u64,
    /// Bytes of header and frames (the active segment's file is longer).
    len: u64,
}

/// The segment appends go to.
#[derive(Debug)]
struct Active {
    /// Its number, also the seed of its frames' CRC (it is always of format 2).
    number: u32,
    file: Arc<File>,
    /// Where the next frame goes.
    len: u64,
    /// The file's size: `len` and the room after it.
    file_len: u64,
}

impl Active {
    /// Segment `number`, just made by `file::create` with `size` bytes of room.
    fn created(number: u32, file: Arc<File>, size: u64) -> Self {
        Self {
            number,
            file,
            len: HEADER_LEN,
            file_len: size.max(HEADER_LEN),
        }
    }
}

/// The append-only segment files of one queue directory.
#[derive(Debug)]
pub struct SegmentLog {
    dir: PathBuf,
    segment_size: u64,
    /// Held by the one appender (also during its `fdatasync`); nobody else takes it.
    active: Mutex<Active>,
    /// Frames are encoded here (large payloads only their heads: `batch`). Taken by the
    /// appender after `active`, reused from batch to batch.
    buffer: Mutex<Vec<u8>>,
    /// The active segment's number; changed and read with `segments` locked.
    active_number: AtomicU32,
    segments: Mutex<BTreeMap<u32, Segment>>,
    /// A drained segment's file, renamed to `file::spare_name`, for the next segment.
    spare: Mutex<Option<Spare>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Cuts a segment at `len` and syncs it.
fn truncate(path: &Path, len: u64) -> io::Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.set_len(len)?;
    file.sync_all()
}

/// A segment read at open.
struct Scanned {
    file: File,
    seed: u32,
    /// Bytes in the file.
    len: u64,
    /// Frames `keep` kept.
    live: u64,
    /// Where the newest segment's frames end, if bytes that are not frames follow.
    cut_at: Option<u64>,
}

/// Opens segment `number` at `path` and reads every frame of it into `report` and
/// `keep`. Damage ending the newest segment is its torn tail.
fn scan_segment(
    number: u32,
    path: &Path,
    newest: bool,
    report: &mut OpenReport,
    keep: &mut impl FnMut(Location, &Frame<'_>) -> bool,
) -> io::Result<Scanned> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let header = file::read_header(&file, number, len)?;
    let mut live = 0;
    let mut frames = 0;
    let mut cut_at = None;
    let range = (HEADER_LEN.min(len), len);
    let outcome = scan::scan(&file, range, header.seed, |offset, frame| {
        frames += 1;
        let at = Location {
            segment: number,
            offset: u32::try_from(offset).unwrap_or(u32::MAX),
            len: u32::try_from(frame.len).unwrap_or(u32::MAX),
        };
        if keep(at, frame) {
            live += 1;
        }
    })?;
    report.frames += frames;
    for (offset, damaged) in outcome.damaged {
        if newest && offset + damaged == len {
            cut_at = Some(offset);
            if header.reused {
                // The rest is the earlier segment's frames (and perhaps a torn batch
                // over some of them): nothing to tell apart, nothing to report.
                continue;
            }
            // The room never written is zeros; anything before it is a torn batch.
            let written_end = scan::zeros_from(&file, offset, len)?;
            if written_end > offset {
                report.torn_tail = Some((number, offset, written_end - offset));
            }
            continue;
        }
        let keep_len = usize::try_from(damaged)
            .unwrap_or(DAMAGE_KEEP)
            .min(DAMAGE_KEEP);
        let mut bytes = vec![0; keep_len];
        file.read_exact_at(&mut bytes, offset)?;
        report.damaged.push(Damage {
            segment: number,
            offset,
            len: damaged,
            bytes,
        });
    }
    Ok(Scanned {
        file,
        seed: header.seed,
        len,
        live,
        cut_at,
    })
}

/// Reads every frame of the log in `dir` without changing anything (for `queue
/// inspect`): `each` sees every valid frame; the report has the damage and the torn
/// tail (`kept` counts what `each` accepted).
///
/// # Errors
/// The OS error of reading the directory or a segment.
pub fn read_only(
    dir: &Path,
    mut each: impl FnMut(Location, &Frame<'_>) -> bool,
) -> io::Result<OpenReport> {
    let mut report = OpenReport::default();
    let listed = file::list(dir)?;
    let newest = listed.last().map(|(number, _)| *number);
    for (number, path) in listed {
        let newest = Some(number) == newest;
        report.kept += scan_segment(number, &path, newest, &mut report, &mut each)?.live;
    }
    Ok(report)
}

fn too_large(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what} too large for a segment"),
    )
}

impl SegmentLog {
    /// Opens (creating if needed) the log in `dir`. Calls `keep(location, frame)` for
    /// every valid frame in order; it returns whether the record is still queued. Then
    /// deletes segments with nothing kept and starts a new active segment.
    ///
    /// # Errors
    /// The OS error of reading the directory or a segment, or of creating the new one.
    pub fn open(
        dir: &Path,
        segment_size: u64,
        mut keep: impl FnMut(Location, &Frame<'_>) -> bool,
    ) -> io::Result<(Self, OpenReport)> {
        std::fs::create_dir_all(dir)?;
        // Spares left by the last run (or by a crash while one was being reused).
        file::remove_spares(dir)?;
        let mut report = OpenReport::default();
        let mut segments = BTreeMap::new();
        let listed = file::list(dir)?;
        let newest = listed.last().map(|(number, _)| *number);
        let mut last = 0;
        for (number, path) in listed {
            last = number;
            let newest = Some(number) == newest;
            let Scanned {
                file,
                seed,
                mut len,
                live,
                cut_at,
            } = scan_segment(number, &path, newest, &mut report, &mut keep)?;
            if let Some(offset) = cut_at {
                // Cut off, so that it is not met again once this segment is no longer
                // the newest.
                truncate(&path, offset)?;
                len = offset;
            }
            if live == 0 {
                std::fs::remove_file(&path)?;
                report.deleted += 1;
                continue;
            }
            report.kept += live;
            let file = Arc::new(file);
            segments.insert(
                number,
                Segment {
                    file,
                    seed,
                    live,
                    len,
                },
            );
        }
        if report.deleted > 0 {
            file::sync_dir(dir)?;
        }
        let number = last
            .checked_add(1)
            .ok_or_else(|| too_large("segment number"))?;
        let active = Arc::new(file::create(dir, number, segment_size)?);
        segments.insert(
            number,
            Segment {
                file: Arc::clone(&active),
                seed: number,
                live: 0,
                len: HEADER_LEN,
            },
        );
        let log = Self {
            dir: dir.to_owned(),
            segment_size,
            active_number: AtomicU32::new(number),
            active: Mutex::new(Active::created(number, active, segment_size)),
            buffer: Mutex::new(Vec::new()),
            segments: Mutex::new(segments),
            spare: Mutex::new(None),
        };
        Ok((log, report))
    }

    /// Appends `frames` and makes them durable (`fdatasync`). The locations are in the
    /// order of `frames`.
    ///
    /// # Errors
    /// The OS error (a full disk, an I/O error). Nothing is counted as stored then; the
    /// next append overwrites whatever part of this one reached the file.
    pub fn append(&self, frames: &[Append<'_>]) -> io::Result<Vec<Location>> {
        let mut active = lock(&self.active);
        let active = &mut *active;
        let lens = self.write_batch(active, &mut lock(&self.buffer), frames)?;
        let mut offset = active.len;
        let mut locations = Vec::with_capacity(lens.len());
        for len in lens {
            locations.push(Location {
                segment: active.number,
                offset: u32::try_from(offset).unwrap_or(u32::MAX),
                len: u32::try_from(len).unwrap_or(u32::MAX),
            });
            offset += len as u64;
        }
        active.len = offset;
        active.file_len = active.file_len.max(offset);
        let mut segments = lock(&self.segments);
        if let Some(segment) = segments.get_mut(&active.number) {
            segment.live += locations.len() as u64;
            segment.len = offset;
        }
        Ok(locations)
    }

    /// Writes `frames` after the active segment's last frame, in the next segment if
    /// they do not fit, and syncs. Returns each frame's length. A full disk first costs
    /// the spare its space.
    fn write_batch(
        &self,
        active: &mut Active,
        buffer: &mut Vec<u8>,
        frames: &[Append<'_>],
    ) -> io::Result<Vec<usize>> {
        let len = Batch::len_of(frames);
        if active.len > HEADER_LEN && active.len + len > self.segment_size {
            self.start_segment(active)?;
        }
        if active.len + len > u64::from(u32::MAX) {
            return Err(too_large("batch"));
        }
        let batch = Batch::encode(buffer, active.number, frames);
        let written = batch
            .write_at(&active.file, active.len)
            .and_then(|()| active.file.sync_data());
        if let Err(err) = written {
            if err.kind() == io::ErrorKind::StorageFull {
                self.drop_spare();
            }
            return Err(err);
        }
        Ok(batch.lens)
    }

    /// Closes the active segment for writing and creates the next one.
    fn start_segment(&self, active: &mut Active) -> io::Result<()> {
        let number = active
            .number
            .checked_add(1)
            .ok_or_else(|| too_large("segment number"))?;
        // Cut to its frames before the next exists: only the newest segment has room.
        Self::cut_to_frames(active)?;
        let file = Arc::new(self.next_file(number)?);
        let closed = active.number;
        *active = Active::created(number, Arc::clone(&file), self.segment_size);
        let mut segments = lock(&self.segments);
        segments.insert(
            number,
            Segment {
                file,
                seed: number,
                live: 0,
                len: HEADER_LEN,
            },
        );
        self.active_number.store(number, Ordering::Relaxed);
        if segments.get(&closed).is_some_and(|s| s.live == 0)
            && let Some(segment) = segments.remove(&closed)
        {
            drop(segments);
            self.retire(closed, segment);
        }
        Ok(())
    }

    /// Cuts the active segment's file to its frames, durably.
    fn cut_to_frames(active: &mut Active) -> io::Result<()> {
        if active.file_len > active.len {
            active.file.set_len(active.len)?;
            active.file.sync_all()?;
            active.file_len = active.len;
        }
        Ok(())
    }

    /// If every record of the active segment is gone and it holds at least
    /// `min_len` bytes, starts the next segment, which deletes this one: the space of a
    /// drained queue comes back even when nothing new is appended. Returns whether it
    /// did.
    ///
    /// # Errors
    /// The OS error of creating the next segment.
    pub fn rotate_if_drained(&self, min_len: u64) -> io::Result<bool> {
        let mut active = lock(&self.active);
        let drained = lock(&self.segments)
            .get(&active.number)
            .is_some_and(|segment| segment.live == 0);
        if !drained || active.len < min_len.max(HEADER_LEN + 1) {
            return Ok(false);
        }
        self.start_segment(&mut active)?;
        Ok(true)
    }

    /// Reads the frame at `at` and checks it.
    ///
    /// # Errors
    /// `NotFound` if its segment is gone, `InvalidData` if the frame is damaged, or the
    /// OS error of the read.
    pub fn read(&self, at: Location) -> io::Result<StoredFrame> {
        let (file, seed) = lock(&self.segments)
            .get(&at.segment)
            .map(|segment| (Arc::clone(&segment.file), segment.seed))
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "segment deleted"))?;
        let mut bytes = vec![0; at.len as usize];
        file.read_exact_at(&mut bytes, u64::from(at.offset))?;
        let frame = record::read_frame_seeded(&bytes, seed)
            .ok()
            .filter(|frame| frame.len == bytes.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "damaged frame"))?;
        let key = frame.key.to_vec();
        let arrival_ms = frame.arrival_ms;
        let start = bytes.len() - frame.payload.len();
        Ok(StoredFrame {
            key,
            arrival_ms,
            payload: Bytes::from(bytes).slice(start..),
        })
    }

    /// Forgets the record at `at`. A segment that is no longer written to and holds no
    /// record any more is deleted.
    pub fn release(&self, at: Location) {
        let mut segments = lock(&self.segments);
        let active = self.active_number.load(Ordering::Relaxed);
        let Some(segment) = segments.get_mut(&at.segment) else {
            return;
        };
        segment.live = segment.live.saturating_sub(1);
        if segment.live == 0
            && at.segment != active
            && let Some(segment) = segments.remove(&at.segment)
        {
            drop(segments);
            self.retire(at.segment, segment);
        }
    }

    /// Bytes in the log's files, the spare's included.
    pub fn disk_bytes(&self) -> u64 {
        let spare = lock(&self.spare).as_ref().map_or(0, |spare| spare.len);
        lock(&self.segments).values().map(|s| s.len).sum::<u64>() + spare
    }

    /// Segment files the log has open.
    pub fn segment_count(&self) -> usize {
        lock(&self.segments).len()
    }
}

impl Drop for SegmentLog {
    /// A log closed in order leaves no room behind, so its files hold frames only (a
    /// crash leaves the room, which the next open cuts off).
    fn drop(&mut self) {
        let active = self
            .active
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if let Err(err) = Self::cut_to_frames(active) {
            tracing::warn!(error = %err, segment = active.number, "could not cut the active queue segment to its frames; the next start does");
        }
    }
}

#[cfg(test)]
mod tests;
