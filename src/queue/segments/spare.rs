//! The spare: a drained segment's file, kept to become the next segment.
//!
//! Its blocks are allocated and its pages are likely still in the page cache, so the
//! next segment's appends overwrite them instead of allocating both (`file::reuse`; why
//! that is safe: segment format 2 in `file`). One spare at most, under a name of its own
//! (`file::spare_name`); a file that a reader still holds is deleted instead; an idle
//! queue and a full disk delete the spare.

use std::fs::File;
use std::io;
use std::sync::Arc;

use super::{Segment, SegmentLog, file, lock};

/// The file of a drained segment, kept for reuse.
#[derive(Debug)]
pub(super) struct Spare {
    pub(super) file: File,
    /// The segment it was.
    pub(super) number: u32,
    /// Its bytes (counted in the log's disk bytes).
    pub(super) len: u64,
}

impl SegmentLog {
    /// The file of new segment `number`: the spare, if there is one and it can be
    /// reused, else a new file.
    pub(super) fn next_file(&self, number: u32) -> io::Result<File> {
        let spare = lock(&self.spare).take();
        if let Some(spare) = spare {
            match file::reuse(
                &self.dir,
                &spare.file,
                spare.number,
                number,
                self.segment_size,
            ) {
                Ok(()) => return Ok(spare.file),
                Err(err) => {
                    tracing::warn!(error = %err, segment = number, "could not reuse a drained queue segment's file; creating a new one");
                }
            }
        }
        file::create(&self.dir, number, self.segment_size)
    }

    /// A segment no longer written to and with no record left goes: kept as the spare
    /// if there is none yet and nobody still reads it, else deleted. A failure leaves a
    /// file the next open deletes (none of its records is still queued), so it is
    /// logged, not returned.
    pub(super) fn retire(&self, number: u32, segment: Segment) {
        let Segment { file, len, .. } = segment;
        let path = self.dir.join(file::name(number));
        let mut spare = lock(&self.spare);
        if spare.is_none()
            && let Ok(file) = Arc::try_unwrap(file)
        {
            match std::fs::rename(&path, self.dir.join(file::spare_name(number))) {
                Ok(()) => {
                    *spare = Some(Spare { file, number, len });
                    return;
                }
                Err(err) => {
                    tracing::warn!(error = %err, segment = number, "could not keep a drained queue segment for reuse; deleting it");
                }
            }
        }
        drop(spare);
        if let Err(err) = std::fs::remove_file(&path) {
            tracing::warn!(error = %err, segment = number, "could not delete an emptied queue segment");
        }
    }

    /// Deletes the spare, if any: an idle queue keeps no disk space it does not need,
    /// and a full disk gets it back.
    pub fn drop_spare(&self) {
        let spare = lock(&self.spare).take();
        if let Some(spare) = spare
            && let Err(err) = std::fs::remove_file(self.dir.join(file::spare_name(spare.number)))
        {
            tracing::warn!(error = %err, "could not delete the spare queue segment");
        }
    }
}
