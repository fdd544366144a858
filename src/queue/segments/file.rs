//! Segment files: their names, their header, creating one durably, reusing a drained
//! one, listing them.
//!
//! A segment is `<number, 16 hex digits>.seg` in the queue directory:
//!
//! ```text
//! format 2: [magic "BGQSEG02" 8][segment number u32 BE][previous number u32 BE][frame]...
//! format 1: [magic "BGQSEG01" 8][segment number u64 BE][frame]...   (still read)
//! ```
//!
//! Frames are the queue's self-checking record frames (`record`), written back to back
//! and never changed in place. In format 2 their CRC is seeded with the segment's number.
//! `previous` is the number of the segment whose file this one reuses (0: a new file).
//!
//! A segment is created at its full size, as a sparse file: the zeros after its last
//! frame are room not yet written, not data. An append then writes inside the file and
//! its `fdatasync` has no file size to update, only, once per block, the block it
//! allocated: on ext4 that cut the CPU cost of a small append's sync by a third (57 to
//! 38 µs here). A segment closed for writing is cut to its frames.
//!
//! A drained segment's file may be kept as a spare ([`spare_name`]) and become the next
//! segment ([`reuse`]): its blocks are allocated and its pages are likely still in the page
//! cache, so appends overwrite them instead of allocating both (at 16 KiB per record,
//! about half the CPU of a write with its share of the sync). What follows the new
//! segment's frames is then the old segment's frames, not zeros; their seed is the old
//! number, so no scan takes them for the new segment's.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The first eight bytes of every segment this code writes (format 2).
pub(super) const MAGIC: [u8; 8] = *b"BGQSEG02";
/// The first eight bytes of a segment of format 1 (frames seeded with 0).
const MAGIC_1: [u8; 8] = *b"BGQSEG01";
/// The start of the name of a drained segment's file kept for reuse (never a segment's
/// name).
const SPARE_PREFIX: &str = "spare-";
/// Bytes before the first frame.
pub(super) const HEADER_LEN: u64 = 16;
const SUFFIX: &str = ".seg";

/// The file name of segment `number`.
pub(super) fn name(number: u32) -> String {
    format!("{number:016x}{SUFFIX}")
}

/// The name of segment `number`'s file while it is kept for reuse: its own, so that a
/// segment retired while another spare is being reused never takes that one's name.
pub(super) fn spare_name(number: u32) -> String {
    format!("{SPARE_PREFIX}{number:016x}")
}

/// Whether `file_name` is a spare's (see [`spare_name`]).
pub(super) fn is_spare(file_name: &str) -> bool {
    file_name.starts_with(SPARE_PREFIX)
}

/// Removes every spare in `dir` (at open: left by the last run, or by a crash during a
/// reuse).
///
/// # Errors
/// The OS error of reading the directory or removing a spare.
pub(super) fn remove_spares(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if is_spare(&entry.file_name().to_string_lossy()) {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// The segment number in a file name, if it is a segment's name.
pub(super) fn number_of(file_name: &str) -> Option<u32> {
    let hex = file_name.strip_suffix(SUFFIX)?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::try_from(u64::from_str_radix(hex, 16).ok()?).ok()
}

/// The header of segment `number`, in a file that segment `previous` used (0: none).
pub(super) fn header(number: u32, previous: u32) -> [u8; HEADER_LEN as usize] {
    let mut header = [0; HEADER_LEN as usize];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&number.to_be_bytes());
    header[12..].copy_from_slice(&previous.to_be_bytes());
    header
}

/// What a segment's header says about reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    /// The seed of its frames' CRC.
    pub(super) seed: u32,
    /// Its file was an earlier segment's: what follows its last frame is that segment's
    /// bytes, not zeros.
    pub(super) reused: bool,
}

/// Reads the header of segment `number`, `len` bytes long. A format 1 header seeds
/// with 0; anything else is read as format 2 of `number` (a damaged header does not
/// make the frames unreadable; the file name still gives the number).
///
/// # Errors
/// The OS error of the read.
pub(super) fn read_header(file: &File, number: u32, len: u64) -> io::Result<Header> {
    let mut bytes = [0; HEADER_LEN as usize];
    if len >= HEADER_LEN {
        file.read_exact_at(&mut bytes, 0)?;
    }
    if bytes[..8] == MAGIC_1 {
        return Ok(Header {
            seed: 0,
            reused: false,
        });
    }
    let previous = u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    Ok(Header {
        seed: number,
        reused: bytes[..8] == MAGIC && previous != 0,
    })
}

/// Creates segment `number`, `size` bytes long (sparse, at least its header), with its
/// header, and makes the file, its size and its directory entry durable, so a frame
/// synced into it later survives a power cut.
///
/// # Errors
/// The OS error; a half-created file is removed again (best effort).
pub(super) fn create(dir: &Path, number: u32, size: u64) -> io::Result<File> {
    let path = dir.join(name(number));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    let made = prepare(&file, number, 0, size).and_then(|()| sync_dir(dir));
    if let Err(err) = made {
        let _ = std::fs::remove_file(&path);
        return Err(err);
    }
    Ok(file)
}

/// Writes segment `number`'s header into `file` (segment `previous`'s before, 0: none),
/// makes it `size` bytes long (at least its header) and syncs both.
fn prepare(file: &File, number: u32, previous: u32, size: u64) -> io::Result<()> {
    file.write_all_at(&header(number, previous), 0)?;
    file.set_len(size.max(HEADER_LEN))?;
    file.sync_all()
}

/// Makes `spare` (segment `previous` before, at [`spare_name`]) segment `number`,
/// `size` bytes long: writes its header, syncs the file, renames it and syncs the
/// directory. A crash before the rename leaves the spare, which the next open removes.
///
/// # Errors
/// The OS error; the file is then removed under either name (best effort), so that
/// segment `number` can still be created new.
pub(super) fn reuse(
    dir: &Path,
    spare: &File,
    previous: u32,
    number: u32,
    size: u64,
) -> io::Result<()> {
    let spare_path = dir.join(spare_name(previous));
    let path = dir.join(name(number));
    let renamed =
        prepare(spare, number, previous, size).and_then(|()| std::fs::rename(&spare_path, &path));
    if let Err(err) = renamed {
        let _ = std::fs::remove_file(&spare_path);
        return Err(err);
    }
    sync_dir(dir).inspect_err(|_| {
        let _ = std::fs::remove_file(&path);
    })
}

/// Every segment in `dir`, by number. Other files are not the log's.
///
/// # Errors
/// The OS error of reading the directory.
pub(super) fn list(dir: &Path) -> io::Result<Vec<(u32, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(number) = entry.file_name().to_str().and_then(number_of) {
            found.push((number, entry.path()));
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// `fsync` of a directory: makes a created, renamed or removed entry durable.
///
/// # Errors
/// The OS error.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::{Header, header, list, name, number_of, read_header};

    #[test]
    fn names_round_trip_and_other_files_are_not_segments() {
        assert_eq!(name(26), "000000000000001a.seg");
        assert_eq!(number_of("000000000000001a.seg"), Some(26));
        for other in [
            "1a.seg",
            "000000000000001a.sg",
            "00000000000000zz.seg",
            "conf",
        ] {
            assert_eq!(number_of(other), None, "{other}");
        }
        assert_eq!(&header(26, 3)[..8], b"BGQSEG02");
        assert_eq!(&header(26, 3)[8..], &[0, 0, 0, 26, 0, 0, 0, 3]);
    }

    #[test]
    fn creates_and_lists_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        for number in [3, 1, 2] {
            super::create(dir.path(), number, 4096).expect("create");
        }
        std::fs::write(dir.path().join("db"), b"not a segment").expect("write");
        let numbers: Vec<u32> = list(dir.path())
            .expect("list")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(numbers, [1, 2, 3]);
        assert!(
            super::create(dir.path(), 2, 4096).is_err(),
            "a segment is never overwritten"
        );
    }

    #[test]
    fn headers_say_how_frames_are_seeded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fresh = super::create(dir.path(), 5, 4096).expect("create");
        let expect = |seed, reused| Header { seed, reused };
        let header_of = |file: &std::fs::File, number| {
            let len = file.metadata().expect("len").len();
            read_header(file, number, len).expect("read")
        };
        assert_eq!(header_of(&fresh, 5), expect(5, false));
        let path = dir.path().join("old");
        let mut old = b"BGQSEG01".to_vec();
        old.extend_from_slice(&9u64.to_be_bytes());
        std::fs::write(&path, &old).expect("write");
        let old = std::fs::File::open(&path).expect("open");
        assert_eq!(header_of(&old, 9), expect(0, false));
        std::fs::write(&path, [0xEE; 16]).expect("write");
        let damaged = std::fs::File::open(&path).expect("open");
        assert_eq!(header_of(&damaged, 9), expect(9, false));
        let spare_path = dir.path().join(super::spare_name(5));
        let spare = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&spare_path)
            .expect("spare");
        super::reuse(dir.path(), &spare, 5, 6, 4096).expect("reuse");
        assert!(!spare_path.exists());
        assert_eq!(header_of(&spare, 6), expect(6, true));
        assert_eq!(spare.metadata().expect("len").len(), 4096);
        // A reuse that fails leaves no file behind: the segment can still be created.
        let spare_path = dir.path().join(super::spare_name(6));
        std::fs::write(&spare_path, b"drained").expect("write");
        let read_only = std::fs::File::open(&spare_path).expect("open");
        assert!(super::reuse(dir.path(), &read_only, 6, 7, 4096).is_err());
        assert!(!spare_path.exists());
        super::create(dir.path(), 7, 4096).expect("created new");
        assert_eq!(super::spare_name(6), "spare-0000000000000006");
        assert_eq!(number_of(&super::spare_name(6)), None, "not a segment");
        assert!(super::is_spare(&super::spare_name(6)) && !super::is_spare(&name(6)));
    }
}
