//! The power-cut model itself, through the kernel: on a real FUSE mount, data written
//! and fsync'd survives a cut; data written without fsync (closed or not) is gone
//! after the cut and a remount; metadata (a created file, a rename) survives.
//! (`sync_file_range(2)` never reaches a FUSE filesystem; `tests/power_cut.rs` in the
//! root crate shows what that means for sled.) Needs root (or `fusermount3`) and
//! `/dev/fuse`: skipped with a message without them, failed when `CI` is set.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use powercut::PowerCutFs;

fn fuse_usable() -> bool {
    match powercut::check_available() {
        Ok(()) => true,
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "FUSE unavailable in CI: {why}"
            );
            eprintln!("skipped: {why}");
            false
        }
    }
}

#[test]
fn unsynced_writes_vanish_and_synced_writes_survive_a_cut() {
    if !fuse_usable() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("disk");
    let mnt = dir.path().join("mnt");
    fs::create_dir_all(&backing).expect("backing");
    fs::create_dir_all(&mnt).expect("mountpoint");

    let fs1 = PowerCutFs::mount(&backing, &mnt).expect("mount");
    fs::create_dir(mnt.join("sub")).expect("mkdir");
    let mut synced = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .open(mnt.join("sub/synced"))
        .expect("create");
    synced.write_all(b"durable").expect("write");
    synced.sync_data().expect("fdatasync");
    synced.write_all(b" and lost").expect("write");
    let mut reread = String::new();
    std::io::Read::read_to_string(
        &mut fs::File::open(mnt.join("sub/synced")).expect("open"),
        &mut reread,
    )
    .expect("read back");
    assert_eq!(
        reread, "durable and lost",
        "readers see unsynced data before the cut"
    );

    let range = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(mnt.join("range"))
        .expect("create");
    range
        .write_all_at(b"written, closed, never fsync'd", 0)
        .expect("write");
    drop(range);
    fs::write(mnt.join("never-synced"), b"gone").expect("write");
    fs::rename(mnt.join("never-synced"), mnt.join("renamed")).expect("rename");

    let cut = fs1.cut_power();
    assert!(
        synced.write_all(b"x").is_err(),
        "writes after the cut fail (EIO)"
    );
    drop(synced);
    fs1.unmount().expect("unmount");
    eprintln!(
        "model: {} writes ({} B), {} fsyncs ({} B durable); the cut dropped {} writes, {} B in {} files",
        cut.writes,
        cut.bytes_written,
        cut.fsyncs,
        cut.bytes_synced,
        cut.writes_dropped,
        cut.bytes_dropped,
        cut.files_dropped
    );
    assert_eq!(cut.bytes_dropped, (" and lost".len() + 30 + 4) as u64);

    let fs2 = PowerCutFs::mount(&backing, &mnt).expect("remount");
    assert_eq!(fs::read(mnt.join("sub/synced")).expect("read"), b"durable");
    assert_eq!(
        fs::read(mnt.join("range")).expect("read"),
        b"",
        "close is no fsync"
    );
    assert_eq!(
        fs::read(mnt.join("renamed")).expect("read"),
        b"",
        "metadata durable, data not"
    );
    assert!(!mnt.join("never-synced").exists());
    fs2.unmount().expect("unmount");
}
