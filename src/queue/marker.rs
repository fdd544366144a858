//! The clean-stop marker (`queue.clean`): what a clean stop left in the queue, so the
//! next open can tell whether anything was lost, and get it back.
//!
//! A clean stop closes sled first, then writes (synced, with a CRC of its own):
//!
//! - how many records and quarantined records it left;
//! - the id of every record, per device (above [`EXACT_LIMIT`] records: each device's
//!   first and last id instead, which a stop can read without loading the whole queue);
//! - a fingerprint of sled's files: path, length and modification time of each.
//!
//! On the next open the marker is read and deleted before sled touches anything. If a
//! file's fingerprint changed while the gateway was stopped, sled's recovery may stop
//! at the damage and overwrite what follows it, so the queue first copies the database
//! aside; afterwards every record the marker names that sled did not give back is
//! looked for in the copy (`salvage`). Whatever is still missing is counted as lost.
//!
//! The fingerprint sees changes made through the filesystem (a bad write, a partial
//! copy, a tool, a file cut off); bytes that rot on the medium without a write are
//! caught only by sled's and the records' checksums, and salvaged when sled refuses a
//! page. After a crash there is no marker: sled's recovery cannot tell damage from a
//! torn write, and nothing is compared.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use super::QueueConfig;
use super::record::{self, RecordId};
use super::store::{sibling, sync_parent};

/// Up to this many records the marker lists every id; above, per-device ranges.
pub(super) const EXACT_LIMIT: u64 = 200_000;
const HEADER: &str = "blindgate-queue-clean 2";

/// Which records of one device a clean stop left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum DeviceIds {
    /// Exactly these ids (sorted).
    Exact(Vec<u64>),
    /// `count` records with ids from `first` to `last` (ids in between may have been
    /// acknowledged already).
    Range {
        /// The lowest id.
        first: u64,
        /// The highest id.
        last: u64,
        /// How many records.
        count: u64,
    },
}

impl DeviceIds {
    /// True if a record with `id` may be one of these.
    pub(super) fn may_hold(&self, id: u64) -> bool {
        match self {
            Self::Exact(ids) => ids.binary_search(&id).is_ok(),
            Self::Range { first, last, .. } => (*first..=*last).contains(&id),
        }
    }

    fn count(&self) -> u64 {
        match self {
            Self::Exact(ids) => ids.len() as u64,
            Self::Range { count, .. } => *count,
        }
    }
}

/// A file's length and modification time (ns since the epoch).
pub(super) type Fingerprint = BTreeMap<PathBuf, (u64, u128)>;

/// What a clean stop left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct CleanMarker {
    /// Records in the `records` tree.
    pub(super) records: u64,
    /// Records in quarantine.
    pub(super) quarantined: u64,
    /// The records, per device; empty for a marker of an earlier release.
    pub(super) devices: BTreeMap<String, DeviceIds>,
    /// sled's files; empty for a marker of an earlier release.
    pub(super) files: Fingerprint,
}

impl CleanMarker {
    /// Reads the ids of every record (or each device's first and last) from a stopped
    /// queue's `records` tree. The fingerprint is left empty: it is taken once sled is
    /// closed ([`fingerprint`]).
    ///
    /// # Errors
    /// sled's error.
    pub(super) fn take_stock(
        records: &sled::Tree,
        quarantined: u64,
        devices: &[(String, u64)],
        total: u64,
    ) -> io::Result<Self> {
        let mut by_device = BTreeMap::new();
        if total <= EXACT_LIMIT {
            for key in records.iter().keys() {
                let key = key.map_err(io::Error::other)?;
                if let Ok((device, id)) = record::decode_key(&key) {
                    let ids = by_device
                        .entry(device.to_owned())
                        .or_insert_with(|| DeviceIds::Exact(Vec::new()));
                    if let DeviceIds::Exact(ids) = ids {
                        ids.push(id.0);
                    }
                }
            }
        } else {
            for (device, count) in devices {
                let prefix = record::device_prefix(device);
                let id = |item: Option<sled::Result<(sled::IVec, sled::IVec)>>| {
                    let (key, _) = item?.ok()?;
                    record::decode_key(&key).ok().map(|(_, id)| id.0)
                };
                let (Some(first), Some(last)) = (
                    id(records.scan_prefix(&prefix).next()),
                    id(records.scan_prefix(&prefix).next_back()),
                ) else {
                    continue;
                };
                let count = *count;
                by_device.insert(device.clone(), DeviceIds::Range { first, last, count });
            }
        }
        let records_total = by_device.values().map(DeviceIds::count).sum();
        Ok(Self {
            records: records_total,
            quarantined,
            devices: by_device,
            files: Fingerprint::new(),
        })
    }

    /// True if record `id` of `device` may be one the stop left.
    pub(super) fn names(&self, device: &str, id: RecordId) -> bool {
        self.devices
            .get(device)
            .is_some_and(|ids| ids.may_hold(id.0))
    }

    /// True if sled's files changed since the marker was written (or the marker has no
    /// fingerprint, being from an earlier release: then nothing is known).
    pub(super) fn files_changed(&self, dir: &Path) -> bool {
        !self.files.is_empty() && fingerprint(dir).map_or(true, |now| now != self.files)
    }

    /// The marker as text, its last line a CRC-32 of the lines before.
    pub(super) fn encode(&self) -> String {
        let mut text = format!(
            "{HEADER}\nrecords {}\nquarantined {}\n",
            self.records, self.quarantined
        );
        for (path, (len, mtime)) in &self.files {
            let _ = writeln!(
                text,
                "file {len} {mtime} {}",
                hex(path.as_os_str().as_encoded_bytes())
            );
        }
        for (device, ids) in &self.devices {
            let device = hex(device.as_bytes());
            match ids {
                DeviceIds::Exact(ids) => {
                    let _ = write!(text, "ids {device}");
                    let mut previous = 0;
                    for id in ids {
                        let _ = write!(text, " {}", id - previous);
                        previous = *id;
                    }
                    text.push('\n');
                }
                DeviceIds::Range { first, last, count } => {
                    let _ = writeln!(text, "range {device} {first} {last} {count}");
                }
            }
        }
        let crc = crc32fast::hash(text.as_bytes());
        let _ = writeln!(text, "crc {crc:08x}");
        text
    }

    /// Parses a marker; `None` if it is damaged. A marker of an earlier release (two
    /// lines, no CRC) gives the counts only.
    pub(super) fn decode(text: &str) -> Option<Self> {
        if !text.starts_with(HEADER) {
            return Self::decode_legacy(text);
        }
        let body_end = text.rfind("crc ")?;
        let (body, crc) = text.split_at(body_end);
        let crc = u32::from_str_radix(crc.strip_prefix("crc ")?.trim(), 16).ok()?;
        if crc32fast::hash(body.as_bytes()) != crc {
            return None;
        }
        let mut marker = Self::default();
        for line in body.lines().skip(1) {
            let mut words = line.split(' ');
            match words.next()? {
                "records" => marker.records = words.next()?.parse().ok()?,
                "quarantined" => marker.quarantined = words.next()?.parse().ok()?,
                "file" => {
                    let len = words.next()?.parse().ok()?;
                    let mtime = words.next()?.parse().ok()?;
                    let path = unhex(words.next()?)?;
                    let path = PathBuf::from(String::from_utf8(path).ok()?);
                    marker.files.insert(path, (len, mtime));
                }
                "ids" => {
                    let device = String::from_utf8(unhex(words.next()?)?).ok()?;
                    let mut ids = Vec::new();
                    let mut id = 0u64;
                    for delta in words {
                        id = id.checked_add(delta.parse().ok()?)?;
                        ids.push(id);
                    }
                    marker.devices.insert(device, DeviceIds::Exact(ids));
                }
                "range" => {
                    let device = String::from_utf8(unhex(words.next()?)?).ok()?;
                    let mut number = || words.next()?.parse::<u64>().ok();
                    let (first, last, count) = (number()?, number()?, number()?);
                    marker
                        .devices
                        .insert(device, DeviceIds::Range { first, last, count });
                }
                _ => return None,
            }
        }
        Some(marker)
    }

    fn decode_legacy(text: &str) -> Option<Self> {
        // Exactly the two lines earlier releases wrote.
        if text.lines().count() != 2 {
            return None;
        }
        let number = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        Some(Self {
            records: number("records ")?,
            quarantined: number("quarantined ")?,
            ..Self::default()
        })
    }
}

/// The file a clean stop writes, next to the queue (`queue.clean`).
pub(crate) fn path_of(queue: &Path) -> PathBuf {
    sibling(queue, "clean")
}

/// Writes the marker (synced with its directory); false if it could not be written.
pub(super) fn write(config: &QueueConfig, marker: &CleanMarker) -> bool {
    let path = path_of(&config.path);
    let written = fs::write(&path, marker.encode())
        .and_then(|()| fs::File::open(&path)?.sync_all())
        .and_then(|()| sync_parent(&path));
    written.is_ok()
}

/// Deletes the marker (the queue changed after it was written).
pub(super) fn withdraw(config: &QueueConfig) {
    let _ = fs::remove_file(path_of(&config.path));
}

/// Reads and deletes the marker. Deleted before the database is touched, so a crash
/// later never leaves a stale one.
pub(super) fn take(config: &QueueConfig) -> Option<CleanMarker> {
    let path = path_of(&config.path);
    let text = fs::read_to_string(&path).ok()?;
    fs::remove_file(&path).ok()?;
    let _ = sync_parent(&path);
    let marker = CleanMarker::decode(&text);
    if marker.is_none() {
        tracing::warn!(path = %path.display(), "the queue's clean-stop marker is damaged; ignored (nothing can be compared at this start)");
    }
    marker
}

/// Length and modification time of every file under `dir`, by path relative to it.
///
/// # Errors
/// The directory walk's.
pub(super) fn fingerprint(dir: &Path) -> io::Result<Fingerprint> {
    let mut files = BTreeMap::new();
    for (path, meta) in files_under(dir)? {
        let mtime = meta
            .modified()?
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let relative = path.strip_prefix(dir).map(Path::to_owned);
        files.insert(relative.unwrap_or(path), (meta.len(), mtime));
    }
    Ok(files)
}

/// Every regular file under `dir`, with its metadata (links are not followed).
///
/// # Errors
/// The first error of the walk.
pub(super) fn files_under(dir: &Path) -> io::Result<Vec<(PathBuf, fs::Metadata)>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(at) = pending.pop() {
        for entry in fs::read_dir(&at)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                files.push((entry.path(), meta));
            }
        }
    }
    Ok(files)
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CleanMarker {
        let mut marker = CleanMarker {
            records: 5,
            quarantined: 1,
            ..CleanMarker::default()
        };
        marker
            .devices
            .insert("pump 17".into(), DeviceIds::Exact(vec![3, 9, 10]));
        marker.devices.insert(
            "valve-3".into(),
            DeviceIds::Range {
                first: 4,
                last: 40,
                count: 2,
            },
        );
        marker
            .files
            .insert("db".into(), (4096, 1_700_000_000_123_456_789));
        marker.files.insert("blobs/12".into(), (300, 5));
        marker
    }

    #[test]
    fn a_marker_reads_back_as_written() {
        let marker = sample();
        assert_eq!(CleanMarker::decode(&marker.encode()), Some(marker));
    }

    #[test]
    fn a_damaged_marker_is_refused() {
        let text = sample().encode();
        for at in 0..text.len() {
            let mut bytes = text.clone().into_bytes();
            bytes[at] ^= 0x01;
            if let Ok(damaged) = String::from_utf8(bytes) {
                let decoded = CleanMarker::decode(&damaged);
                assert!(decoded.is_none() || decoded == Some(sample()), "byte {at}");
            }
        }
        assert_eq!(CleanMarker::decode(&text[..text.len() - 4]), None);
    }

    #[test]
    fn an_earlier_releases_marker_gives_the_counts() {
        let marker = CleanMarker::decode("records 12\nquarantined 2\n").expect("legacy");
        assert_eq!((marker.records, marker.quarantined), (12, 2));
        assert!(marker.devices.is_empty() && marker.files.is_empty());
    }

    #[test]
    fn ids_and_ranges_say_which_records_names() {
        let marker = sample();
        assert!(marker.names("pump 17", RecordId(9)));
        assert!(!marker.names("pump 17", RecordId(8)));
        assert!(marker.names("valve-3", RecordId(17)));
        assert!(!marker.names("valve-3", RecordId(41)));
        assert!(!marker.names("other", RecordId(9)));
    }

    #[test]
    fn any_change_to_a_file_changes_the_fingerprint() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("blobs")).expect("mkdir");
        fs::write(dir.path().join("db"), b"log").expect("write");
        fs::write(dir.path().join("blobs/1"), b"blob").expect("write");
        let marker = CleanMarker {
            files: fingerprint(dir.path()).expect("fingerprint"),
            ..CleanMarker::default()
        };
        assert!(!marker.files_changed(dir.path()));
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(dir.path().join("blobs/1"), b"bloB").expect("write");
        assert!(marker.files_changed(dir.path()));
    }
}
