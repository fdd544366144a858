//! The cloud's device key store through its public API, on real directories and files:
//! provisioning, rotation with a grace period and a sealed `rekey` command, shredding,
//! the audit log, and downlink seq reservations across re-opens and threads.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blindgate::keys::{KeyStore, KeyStoreError};
use e3::{DeviceId, DeviceKey, KEY_LEN, Kind, Suite};

const HOUR_MS: u64 = 3_600_000;

fn store_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("keys");
    (dir, store)
}

fn key_path(store: &Path, device: &str, key_id: u32) -> PathBuf {
    store.join(format!("devices/{device}/{key_id}.key"))
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

fn reason(result: Result<DeviceKey, KeyStoreError>) -> &'static str {
    result.expect_err("lookup must fail").reason()
}

#[test]
fn provision_writes_a_private_key_file_that_opens_what_it_sealed_and_only_once() {
    let (_dir, store_dir) = store_dir();
    let store = KeyStore::open(&store_dir).expect("open");
    let key = store
        .provision("pump-17", Suite::ChaCha20Poly1305)
        .expect("provision");
    assert_eq!(key.key_id(), 1);

    let path = key_path(&store_dir, "pump-17", 1);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&store_dir.join("devices/pump-17")), 0o700);
    assert_eq!(mode(&store_dir), 0o700);
    let from_file = e3::read_key_file(&path).expect("E3-SPEC key file");
    assert_eq!(from_file.device_id().as_str(), "pump-17");
    assert_eq!(from_file.suite(), Suite::ChaCha20Poly1305);
    let envelope = key.seal(Kind::Uplink, 1, b"21.5 C").expect("seal");
    let (_, plaintext) = from_file.open(&envelope).expect("open");
    assert_eq!(plaintext, b"21.5 C");

    let again = store.provision("pump-17", Suite::Aes256Gcm);
    assert_eq!(again.expect_err("exists").reason(), "device_exists");
    assert_eq!(store.devices().expect("devices"), ["pump-17"]);
}

#[test]
fn old_key_opens_until_the_grace_period_ends_and_the_rekey_command_carries_the_new_key() {
    let (_dir, store_dir) = store_dir();
    let store = KeyStore::open(&store_dir).expect("open");
    let old = store
        .provision("pump-17", Suite::Aes256Gcm)
        .expect("provision");
    let sealed_with_old = old.seal(Kind::Uplink, 5, b"reading").expect("seal");
    let t0 = 1_800_000_000_000;

    let rotation = store
        .rotate("pump-17", Duration::from_secs(72 * 3600), t0)
        .expect("rotate");
    assert_eq!(rotation.old.key_id(), 1);
    assert_eq!(rotation.new.key_id(), 2);
    assert_eq!(rotation.new.suite(), Suite::Aes256Gcm);
    assert_eq!(store.current("pump-17").expect("current").key_id(), 2);
    assert_eq!(mode(&key_path(&store_dir, "pump-17", 2)), 0o600);

    for now in [t0, t0 + 72 * HOUR_MS - 1] {
        let key = store.key_for_open("pump-17", 1, now).expect("within grace");
        key.open(&sealed_with_old).expect("old envelope opens");
    }
    let after = store.key_for_open("pump-17", 1, t0 + 72 * HOUR_MS);
    assert_eq!(reason(after), "key_expired");
    assert!(
        store
            .key_for_open("pump-17", 2, t0 + 1000 * HOUR_MS)
            .is_ok()
    );
    assert_eq!(reason(store.key_for_open("pump-17", 3, t0)), "unknown_key");
    assert_eq!(
        reason(store.key_for_open("meter-9", 1, t0)),
        "unknown_device"
    );

    let (header, plaintext) = old
        .open(&rotation.command)
        .expect("command opens with the OLD key");
    assert_eq!(header.kind(), Kind::Command);
    assert_eq!(header.key_id(), 1);
    assert_eq!(header.seq(), rotation.command_seq);
    let device_side = rekey_key(&plaintext);
    assert_eq!(device_side.key_id(), 2);
    let uplink = device_side
        .seal(Kind::Uplink, 6, b"after rekey")
        .expect("seal");
    let cloud_side = store.key_for_open("pump-17", 2, t0).expect("new key");
    assert_eq!(cloud_side.open(&uplink).expect("opens").1, b"after rekey");
}

/// What a device does with a `rekey` plaintext (docs/PAYLOADS.md).
fn rekey_key(plaintext: &[u8]) -> DeviceKey {
    let json: serde_json::Value = serde_json::from_slice(plaintext).expect("rekey JSON");
    assert_eq!(json["cmd"], "rekey");
    let key_id = u32::try_from(json["key_id"].as_u64().expect("key_id")).expect("u32");
    let suite = Suite::from_name(json["suite"].as_str().expect("suite")).expect("known suite");
    let mut secret = [0u8; KEY_LEN];
    hex::decode_to_slice(json["key"].as_str().expect("key"), &mut secret).expect("64 hex");
    DeviceKey::new(DeviceId::new("pump-17").expect("id"), key_id, suite, secret)
}

#[test]
fn shred_zeroes_and_removes_every_key_refuses_the_device_for_good_and_the_audit_log_holds_no_key() {
    let (dir, store_dir) = store_dir();
    let store = KeyStore::open(&store_dir)
        .expect("open")
        .with_actor("test-ops");
    let first = store
        .provision("pump-17", Suite::Aes256Gcm)
        .expect("provision");
    let other = store
        .provision("meter-9", Suite::Aes256Gcm)
        .expect("provision");
    let rotation = store
        .rotate("pump-17", Duration::from_secs(3600), 1_000)
        .expect("rotate");
    store
        .key_for_open("pump-17", 1, 1_001)
        .expect("open old key");
    let mut hexes: Vec<String> = [&first, &other, &rotation.new]
        .iter()
        .map(|k| hex::encode(k.secret_bytes()))
        .collect();

    let links: Vec<(PathBuf, u64)> = [1, 2]
        .into_iter()
        .map(|key_id| {
            let path = key_path(&store_dir, "pump-17", key_id);
            let link = dir.path().join(format!("link-{key_id}"));
            fs::hard_link(&path, &link).expect("hard link");
            let len = fs::metadata(&link).expect("metadata").len();
            (link, len)
        })
        .collect();

    assert_eq!(store.shred("pump-17", 2_000).expect("shred"), 2);
    for key_id in [1, 2] {
        assert!(!key_path(&store_dir, "pump-17", key_id).exists());
    }
    for (link, len) in &links {
        let bytes = fs::read(link).expect("read through the hard link");
        assert_eq!(bytes.len() as u64, *len, "overwritten in place");
        assert!(
            bytes.iter().all(|&b| b == 0),
            "{} was not zeroed",
            link.display()
        );
    }

    assert_eq!(reason(store.current("pump-17")), "shredded");
    assert_eq!(reason(store.key_for_open("pump-17", 2, 1_500)), "shredded");
    let reserve = store.reserve_downlink_seqs("pump-17", 1);
    assert_eq!(reserve.expect_err("shredded").reason(), "shredded");
    let provision = store.provision("pump-17", Suite::Aes256Gcm);
    assert_eq!(provision.expect_err("refused").reason(), "shredded");
    let reopened = KeyStore::open(&store_dir).expect("reopen");
    assert_eq!(
        reason(reopened.key_for_open("pump-17", 1, 1_500)),
        "shredded"
    );
    assert_eq!(reopened.shred("pump-17", 3_000).expect("shred again"), 0);
    assert!(
        store.current("meter-9").is_ok(),
        "other devices are untouched"
    );
    let status = store.status("pump-17").expect("status");
    assert_eq!(status.shredded_at_ms, Some(2_000));

    let audit = fs::read_to_string(store_dir.join("audit.log")).expect("audit log");
    assert_eq!(mode(&store_dir.join("audit.log")), 0o600);
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    for action in ["provision", "rotate", "open", "shred"] {
        assert!(
            lines
                .iter()
                .any(|l| l["action"] == action && l["device_id"] == "pump-17"),
            "no {action} line in {audit}"
        );
    }
    assert!(lines.iter().all(|l| l["actor"] == "test-ops"), "{audit}");
    hexes.push(hex::encode(rotation.old.secret_bytes()));
    for hex in &hexes {
        assert!(
            !audit.to_lowercase().contains(hex),
            "key material in the audit log"
        );
        assert!(!audit.to_lowercase().contains(&hex[..16]));
    }
}

#[test]
fn open_is_audited_once_per_key_not_per_message() {
    let (_dir, store_dir) = store_dir();
    let store = KeyStore::open(&store_dir).expect("open");
    store
        .provision("pump-17", Suite::Aes256Gcm)
        .expect("provision");
    for _ in 0..5 {
        store.key_for_open("pump-17", 1, 0).expect("open");
    }
    let audit = fs::read_to_string(store_dir.join("audit.log")).expect("audit log");
    let opens = audit
        .lines()
        .filter(|l| l.contains(r#""action":"open""#))
        .count();
    assert_eq!(opens, 1, "{audit}");
}

#[test]
fn a_rotation_by_another_store_instance_is_seen_at_the_next_lookup() {
    let (_dir, store_dir) = store_dir();
    let ingest = KeyStore::open(&store_dir).expect("open");
    let operator = KeyStore::open(&store_dir).expect("open");
    operator
        .provision("pump-17", Suite::Aes256Gcm)
        .expect("provision");
    assert_eq!(ingest.current("pump-17").expect("current").key_id(), 1);
    operator
        .rotate("pump-17", Duration::ZERO, 10)
        .expect("rotate");
    assert_eq!(ingest.current("pump-17").expect("current").key_id(), 2);
    assert_eq!(reason(ingest.key_for_open("pump-17", 1, 10)), "key_expired");
    operator.shred("pump-17", 20).expect("shred");
    assert_eq!(reason(ingest.current("pump-17")), "shredded");
}

#[test]
fn downlink_seq_reservations_never_overlap_across_reopens() {
    let (_dir, store_dir) = store_dir();
    let mut taken = Vec::new();
    {
        let store = KeyStore::open(&store_dir).expect("open");
        store
            .provision("pump-17", Suite::Aes256Gcm)
            .expect("provision");
        taken.push(
            store
                .reserve_downlink_seqs("pump-17", 100)
                .expect("reserve"),
        );
        let rotation = store.rotate("pump-17", Duration::ZERO, 1).expect("rotate");
        taken.push(rotation.command_seq..rotation.command_seq + 1);
    }
    for _ in 0..3 {
        let store = KeyStore::open(&store_dir).expect("reopen");
        taken.push(store.reserve_downlink_seqs("pump-17", 10).expect("reserve"));
    }
    assert_eq!(taken[0], 1..101, "downlink seqs start at 1");
    assert_disjoint(taken.into_iter().flatten().collect());
}

#[test]
fn downlink_seq_reservations_never_overlap_across_threads() {
    let (_dir, store_dir) = store_dir();
    let shared = Arc::new(KeyStore::open(&store_dir).expect("open"));
    shared
        .provision("pump-17", Suite::Aes256Gcm)
        .expect("provision");
    let threads: Vec<_> = (0..2)
        .map(|i| {
            // One thread shares the instance, the other has its own: both must be
            // serialised by the flock.
            let store = if i == 0 {
                Arc::clone(&shared)
            } else {
                Arc::new(KeyStore::open(&store_dir).expect("open"))
            };
            std::thread::spawn(move || {
                (0..25)
                    .flat_map(|_| store.reserve_downlink_seqs("pump-17", 3).expect("reserve"))
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let seqs: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect();
    assert_eq!(seqs.len(), 150);
    assert_disjoint(seqs);
    let next = shared.reserve_downlink_seqs("pump-17", 1).expect("reserve");
    assert_eq!(next, 151..152, "no seq was skipped or handed out twice");
}

fn assert_disjoint(mut seqs: Vec<u64>) {
    let count = seqs.len();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), count, "a downlink seq was reserved twice");
}
