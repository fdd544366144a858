//! Tests of the segment log on real files.

use std::collections::HashSet;
use std::path::Path;

use super::{Append, HEADER_LEN, Location, OpenReport, SegmentLog, file};
use crate::queue::record::{RecordId, decode_key, encode_key};

fn key(id: u64) -> Vec<u8> {
    encode_key("sensor-1", RecordId(id))
}

fn payload(id: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (id as usize + i) as u8).collect()
}

/// Appends records `ids` in batches of `batch`, each payload `len` bytes.
fn append(log: &SegmentLog, ids: std::ops::Range<u64>, len: usize, batch: usize) -> Vec<Location> {
    let ids: Vec<u64> = ids.collect();
    let mut locations = Vec::new();
    for chunk in ids.chunks(batch) {
        let keys: Vec<Vec<u8>> = chunk.iter().map(|&id| key(id)).collect();
        let payloads: Vec<Vec<u8>> = chunk.iter().map(|&id| payload(id, len)).collect();
        let frames: Vec<Append<'_>> = keys
            .iter()
            .zip(&payloads)
            .zip(chunk)
            .map(|((key, payload), &id)| Append {
                key,
                arrival_ms: id,
                payload,
            })
            .collect();
        locations.extend(log.append(&frames).expect("append"));
    }
    locations
}

/// Opens `dir`, keeping the records whose id `keep` accepts; returns the kept ids.
fn reopen(dir: &Path, keep: impl Fn(u64) -> bool) -> (SegmentLog, Vec<u64>, OpenReport) {
    let mut kept = Vec::new();
    let (log, report) = SegmentLog::open(dir, 64 << 10, |_, frame| {
        let (_, id) = decode_key(frame.key).expect("key");
        let keep = keep(id.0);
        if keep {
            kept.push(id.0);
        }
        keep
    })
    .expect("open");
    (log, kept, report)
}

#[test]
fn appended_records_read_back_and_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _, _) = reopen(dir.path(), |_| true);
    let locations = append(&log, 0..1000, 300, 37);
    for (id, at) in (0..1000).zip(&locations) {
        let frame = log.read(*at).expect("read");
        assert_eq!(frame.key, key(id));
        assert_eq!(frame.arrival_ms, id);
        assert_eq!(frame.payload.as_ref(), payload(id, 300).as_slice());
    }
    assert!(
        log.segment_count() > 3,
        "64 KiB segments: {}",
        log.segment_count()
    );
    drop(log);
    let (log, kept, report) = reopen(dir.path(), |_| true);
    assert_eq!(kept, (0..1000).collect::<Vec<_>>());
    assert_eq!(report.frames, 1000);
    assert!(report.damaged.is_empty());
    // Appends after a reopen go to a new segment; the old ones are only read.
    let more = append(&log, 1000..1010, 300, 10);
    assert!(more[0].segment > locations[999].segment);
}

#[test]
fn a_segment_is_deleted_when_its_last_record_is_released() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _, _) = reopen(dir.path(), |_| true);
    let locations = append(&log, 0..2000, 300, 50);
    let files = || file::list(dir.path()).expect("list").len();
    let before = files();
    let first = locations[0].segment;
    let in_first: Vec<Location> = locations
        .iter()
        .copied()
        .filter(|at| at.segment == first)
        .collect();
    for at in &in_first[1..] {
        log.release(*at);
    }
    assert_eq!(files(), before, "one record still holds the segment");
    log.release(in_first[0]);
    assert_eq!(files(), before - 1);
    assert!(log.read(in_first[0]).is_err());
    for at in &locations {
        log.release(*at);
    }
    assert_eq!(files(), 1, "only the active segment is left");
    assert!(
        log.disk_bytes() > log_len(&log),
        "and the spare, kept for reuse"
    );
    log.drop_spare();
    assert_eq!(log.disk_bytes(), log_len(&log));
}

fn log_len(log: &SegmentLog) -> u64 {
    super::lock(&log.active).len
}

#[test]
fn released_records_do_not_come_back_and_empty_segments_go_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _, _) = reopen(dir.path(), |_| true);
    append(&log, 0..1000, 300, 25);
    drop(log);
    let (log, kept, report) = reopen(dir.path(), |id| id >= 600);
    assert_eq!(kept, (600..1000).collect::<Vec<_>>());
    assert!(report.deleted > 0);
    drop(log);
    let (_, _, report) = reopen(dir.path(), |id| id >= 600);
    assert!(report.frames < 1000, "deleted segments are not read again");
}

#[test]
fn a_torn_batch_at_the_end_loses_only_that_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _, _) = reopen(dir.path(), |_| true);
    let locations = append(&log, 0..100, 300, 10);
    drop(log);
    // A crash in the middle of the next batch's write: part of a frame at the end.
    let last = locations[99];
    let path = dir.path().join(file::name(last.segment));
    let mut bytes = std::fs::read(&path).expect("read");
    let torn = crate::queue::record::encode_value(&key(100), 100, &payload(100, 300));
    bytes.extend_from_slice(&torn[..150]);
    std::fs::write(&path, &bytes).expect("write");
    let (_, kept, report) = reopen(dir.path(), |_| true);
    assert_eq!(kept.len(), 100);
    let end = u64::from(last.offset) + u64::from(last.len);
    assert!(report.damaged.is_empty());
    assert_eq!(report.torn_tail, Some((last.segment, end, 150)));
    assert_eq!(
        std::fs::metadata(&path).expect("metadata").len(),
        end,
        "cut off"
    );
}

#[test]
fn a_flipped_bit_costs_one_record_and_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _, _) = reopen(dir.path(), |_| true);
    let locations = append(&log, 0..300, 300, 30);
    let hit = locations[123];
    drop(log);
    let path = dir.path().join(file::name(hit.segment));
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[hit.offset as usize + 60] ^= 0x04;
    std::fs::write(&path, &bytes).expect("write");
    let (log, kept, report) = reopen(dir.path(), |_| true);
    let kept: HashSet<u64> = kept.into_iter().collect();
    assert_eq!(kept.len(), 299);
    assert!(!kept.contains(&123));
    let damage: Vec<(u32, u64, u64)> = report
        .damaged
        .iter()
        .map(|d| (d.segment, d.offset, d.len))
        .collect();
    assert_eq!(
        damage,
        [(hit.segment, u64::from(hit.offset), u64::from(hit.len))]
    );
    assert_eq!(report.damaged[0].bytes.len(), hit.len as usize);
    assert_eq!(report.torn_tail, None);
    assert_eq!(
        log.read(hit).map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::InvalidData),
        "a damaged frame is never handed out"
    );
}

#[test]
fn a_batch_larger_than_a_segment_gets_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _, _) = reopen(dir.path(), |_| true);
    let small = append(&log, 0..1, 100, 1);
    let big = append(&log, 1..11, 16 << 10, 10);
    assert!(big.iter().all(|at| at.segment == small[0].segment + 1));
    assert_eq!(u64::from(big[0].offset), HEADER_LEN);
    assert_eq!(log.read(big[9]).expect("read").payload.len(), 16 << 10);
}

#[test]
fn segment_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _, _) = reopen(dir.path(), |_| true);
    let at = append(&log, 0..1, 10, 1)[0];
    let mode = std::fs::metadata(dir.path().join(file::name(at.segment)))
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_drained_active_segment_is_replaced_so_its_space_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _, _) = reopen(dir.path(), |_| true);
    let locations = append(&log, 0..10, 300, 10);
    assert!(
        !log.rotate_if_drained(1).expect("rotate"),
        "records still queued"
    );
    for at in &locations {
        log.release(*at);
    }
    assert!(
        !log.rotate_if_drained(1 << 20).expect("rotate"),
        "too small to bother"
    );
    assert!(log.rotate_if_drained(1).expect("rotate"));
    let drained = u64::from(locations[9].offset + locations[9].len);
    assert_eq!(log.disk_bytes(), HEADER_LEN + drained, "the spare counts");
    // What the queue does when idle.
    log.drop_spare();
    assert_eq!(log.disk_bytes(), HEADER_LEN);
    assert_eq!(file::list(dir.path()).expect("list").len(), 1);
    assert!(
        !log.rotate_if_drained(1).expect("rotate"),
        "an empty segment stays"
    );
}

/// The frames' end of the segment a location is in, and that segment's file size.
fn sizes(dir: &Path, at: Location) -> (u64, u64) {
    let path = dir.join(file::name(at.segment));
    let frames_end = u64::from(at.offset) + u64::from(at.len);
    (frames_end, std::fs::metadata(path).expect("metadata").len())
}

#[test]
fn segments_have_room_while_written_and_only_frames_once_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _, _) = reopen(dir.path(), |_| true);
    let locations = append(&log, 0..400, 300, 20);
    let (first, last) = (locations[0], locations[399]);
    assert!(last.segment > first.segment, "several segments");
    let first_end = locations
        .iter()
        .rfind(|at| at.segment == first.segment)
        .copied()
        .expect("first segment");
    let (end, file_len) = sizes(dir.path(), first_end);
    assert_eq!(file_len, end, "a closed segment is cut to its frames");
    let (end, file_len) = sizes(dir.path(), last);
    assert_eq!(file_len, 64 << 10, "the active one has its room");
    assert!(end < file_len);
    assert_eq!(
        log.disk_bytes(),
        locations.iter().map(|at| u64::from(at.len)).sum::<u64>()
            + HEADER_LEN * u64::from(last.segment - first.segment + 1)
    );
    drop(log);
    assert_eq!(sizes(dir.path(), last).1, end, "closing cuts the room off");
}

#[test]
fn after_a_crash_the_room_is_cut_off_silently_and_a_torn_batch_in_it_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _, _) = reopen(dir.path(), |_| true);
    let locations = append(&log, 0..10, 300, 10);
    // A crash: the log is never closed, the active segment keeps its room.
    std::mem::forget(log);
    let last = locations[9];
    let (end, file_len) = sizes(dir.path(), last);
    assert!(file_len > end);
    let (log, kept, report) = reopen(dir.path(), |_| true);
    assert_eq!(kept, (0..10).collect::<Vec<_>>());
    assert!(report.damaged.is_empty());
    assert_eq!(report.torn_tail, None, "unwritten room is not a torn write");
    assert_eq!(sizes(dir.path(), last).1, end, "cut off");

    // Now a batch the crash cut short, written into the room of the next segment.
    let more = append(&log, 10..20, 300, 10);
    std::mem::forget(log);
    let at = more[9];
    let frames_end = u64::from(at.offset) + u64::from(at.len);
    let torn = crate::queue::record::encode_value(&key(20), 20, &payload(20, 300));
    let path = dir.path().join(file::name(at.segment));
    let segment = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&segment, &torn[..150], frames_end).expect("write");
    let (_, kept, report) = reopen(dir.path(), |_| true);
    assert_eq!(kept, (0..20).collect::<Vec<_>>());
    assert!(report.damaged.is_empty());
    assert_eq!(report.torn_tail, Some((at.segment, frames_end, 150)));
    assert_eq!(sizes(dir.path(), at).1, frames_end);
}

/// Releases every record of segment `number` among `locations`.
fn release_segment(log: &SegmentLog, locations: &[Location], number: u32) -> HashSet<u64> {
    let mut released = HashSet::new();
    for (id, at) in (0u64..).zip(locations) {
        if at.segment == number {
            log.release(*at);
            released.insert(id);
        }
    }
    released
}

#[test]
fn a_drained_segment_file_is_reused_and_its_frames_never_come_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _, _) = reopen(dir.path(), |_| true);
    let mut locations = append(&log, 0..400, 300, 20);
    let first = locations[0].segment;
    let spare = dir.path().join(file::spare_name(first));
    let released = release_segment(&log, &locations, first);
    assert!(spare.exists(), "the drained segment is kept");
    assert!(!dir.path().join(file::name(first)).exists());
    // Append until a batch starts a new segment: it is written into the spare.
    let active = locations[399].segment;
    let mut next = 400;
    while locations.last().expect("some").segment == active {
        locations.extend(append(&log, next..next + 20, 300, 20));
        next += 20;
    }
    let reused = locations.last().expect("some").segment;
    assert!(!spare.exists(), "the spare became segment {reused}");
    let header = std::fs::read(dir.path().join(file::name(reused))).expect("read");
    assert_eq!(
        &header[8..16],
        &[reused.to_be_bytes(), first.to_be_bytes()].concat()[..]
    );
    for (id, at) in (0u64..).zip(&locations).skip(400) {
        assert_eq!(log.read(*at).expect("read").key, key(id));
    }
    // A crash: the reused file keeps the first segment's frames after the new ones.
    std::mem::forget(log);
    let (log, kept, report) = reopen(dir.path(), |_| true);
    let expected: Vec<u64> = (0..next).filter(|id| !released.contains(id)).collect();
    assert_eq!(kept, expected, "no frame of the first segment comes back");
    assert!(report.damaged.is_empty());
    assert_eq!(report.torn_tail, None);
    let at = *locations.last().expect("some");
    assert_eq!(
        sizes(dir.path(), at).1,
        u64::from(at.offset + at.len),
        "cut"
    );
    drop(log);
}

#[test]
fn a_segment_still_being_read_is_deleted_not_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _, _) = reopen(dir.path(), |_| true);
    let locations = append(&log, 0..400, 300, 20);
    let first = locations[0].segment;
    let held = std::sync::Arc::clone(&super::lock(&log.segments)[&first].file);
    release_segment(&log, &locations, first);
    assert_eq!(spares(dir.path()), 0);
    assert!(!dir.path().join(file::name(first)).exists());
    drop(held);
    // The next drained segment is kept; an idle queue gives its space back.
    release_segment(&log, &locations, first + 1);
    assert!(dir.path().join(file::spare_name(first + 1)).exists());
    log.drop_spare();
    assert_eq!(spares(dir.path()), 0);
}

/// Spare files in `dir`.
fn spares(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .expect("read dir")
        .filter(|e| file::is_spare(&e.as_ref().expect("entry").file_name().to_string_lossy()))
        .count()
}

#[test]
fn a_segment_retired_while_a_spare_is_being_reused_keeps_its_own_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _, _) = reopen(dir.path(), |_| true);
    let locations = append(&log, 0..600, 300, 20);
    let first = locations[0].segment;
    release_segment(&log, &locations, first);
    // The next segment takes the spare, as the writer does before its header is
    // written; meanwhile the uplink drains another segment.
    let taken = super::lock(&log.spare).take().expect("a spare");
    release_segment(&log, &locations, first + 1);
    let number = locations[599].segment + 1;
    file::reuse(dir.path(), &taken.file, first, number, 64 << 10).expect("reuse");
    let header = std::fs::read(dir.path().join(file::name(number))).expect("read");
    assert_eq!(
        &header[8..16],
        &[number.to_be_bytes(), first.to_be_bytes()].concat()[..]
    );
    assert!(
        dir.path().join(file::spare_name(first + 1)).exists(),
        "the second spare is still there, under its own name"
    );
}

#[test]
fn segments_of_format_1_are_still_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = b"BGQSEG01".to_vec();
    bytes.extend_from_slice(&3u64.to_be_bytes());
    for id in 0..5 {
        crate::queue::record::encode_frame_into(&mut bytes, 0, &key(id), id, &payload(id, 40));
    }
    std::fs::write(dir.path().join(file::name(3)), &bytes).expect("write");
    // A spare left by a crash is removed at open.
    std::fs::write(dir.path().join(file::spare_name(2)), b"BGQSEG02 leftover").expect("write");
    let (log, kept, report) = reopen(dir.path(), |_| true);
    assert_eq!(kept, (0..5).collect::<Vec<_>>());
    assert!(report.damaged.is_empty() && report.torn_tail.is_none());
    assert_eq!(spares(dir.path()), 0);
    let at = Location {
        segment: 3,
        offset: u32::try_from(HEADER_LEN).expect("small"),
        len: u32::try_from(bytes.len() - 16).expect("small") / 5,
    };
    assert_eq!(log.read(at).expect("read").key, key(0));
}
