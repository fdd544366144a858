//! Runs every vector of `tests/data/e3-vectors.json`, produced by an independent Python
//! implementation of E3-SPEC.md (see the file's `generator` field). A failing case
//! names its index and name. A second test fails if this copy drifts from the shared
//! original (`../shared/e3-vectors.json` next to the repository), when that exists.

use std::path::{Path, PathBuf};

use e3::{
    DeviceId, DeviceKey, Header, HeaderError, Kind, OpenError, Suite, decode_receipt,
    encode_receipt_vec,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Vectors {
    positive: Vec<Positive>,
    negative: Vec<Negative>,
    receipt_negative: Vec<ReceiptNegative>,
}

#[derive(Deserialize)]
struct Positive {
    name: String,
    suite: u8,
    kind: u8,
    device_id: String,
    key_id: u32,
    seq: u64,
    key_hex: String,
    nonce_hex: String,
    plaintext_hex: String,
    envelope_hex: String,
    receipt_entries: Option<Vec<(u32, u64)>>,
}

#[derive(Deserialize)]
struct Negative {
    name: String,
    envelope_hex: String,
    reject: String,
    key_hex: Option<String>,
}

#[derive(Deserialize)]
struct ReceiptNegative {
    name: String,
    plaintext_hex: String,
    reject: String,
}

fn data_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/e3-vectors.json")
}

fn load() -> Vectors {
    let bytes = std::fs::read(data_path()).expect("vector file present");
    serde_json::from_slice(&bytes).expect("vector file parses")
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("vector hex is valid")
}

fn key_bytes(s: &str) -> [u8; 32] {
    unhex(s).try_into().expect("32-byte key")
}

#[test]
fn positive_vectors_seal_exactly_and_open() {
    let vectors = load();
    assert_eq!(vectors.positive.len(), 18, "vector count changed");
    for (i, v) in vectors.positive.iter().enumerate() {
        let case = format!("positive[{i}] {}", v.name);
        let suite = Suite::from_u8(v.suite).expect(&case);
        let kind = Kind::from_u8(v.kind).expect(&case);
        let device = DeviceId::new(&v.device_id).expect(&case);
        let key = DeviceKey::new(device, v.key_id, suite, key_bytes(&v.key_hex));
        let nonce: [u8; 12] = unhex(&v.nonce_hex).try_into().expect(&case);
        let plaintext = unhex(&v.plaintext_hex);
        let expected = unhex(&v.envelope_hex);

        let mut out = vec![0u8; expected.len()];
        let len = key
            .seal_into(kind, v.seq, &nonce, &plaintext, &mut out)
            .expect(&case);
        assert_eq!(len, expected.len(), "{case}: length");
        assert_eq!(hex::encode(&out), v.envelope_hex, "{case}: sealed bytes");

        let header = Header::parse(&expected).expect(&case);
        assert_eq!(
            (header.kind(), header.suite(), header.device_id()),
            (kind, suite, v.device_id.as_str()),
            "{case}: header"
        );
        assert_eq!((header.key_id(), header.seq()), (v.key_id, v.seq), "{case}");
        assert_eq!(header.nonce(), &nonce, "{case}: nonce");

        let (_, opened) = key.open(&expected).expect(&case);
        assert_eq!(opened, plaintext, "{case}: open");
        let mut in_place = expected.clone();
        let opened = key.open_in_place(&mut in_place).expect(&case);
        assert_eq!(opened.plaintext, plaintext, "{case}: open_in_place");

        if let Some(entries) = &v.receipt_entries {
            let decoded: Vec<(u32, u64)> = decode_receipt(&plaintext)
                .expect(&case)
                .map(|e| (e.key_id, e.seq))
                .collect();
            assert_eq!(&decoded, entries, "{case}: receipt entries");
            let entries: Vec<_> = decode_receipt(&plaintext).expect(&case).collect();
            assert_eq!(
                encode_receipt_vec(&entries).expect(&case),
                plaintext,
                "{case}"
            );
        }
    }
}

fn parse_rule(err: HeaderError) -> &'static str {
    err.rule()
}

#[test]
fn negative_vectors_are_rejected_for_the_stated_rule() {
    let vectors = load();
    assert_eq!(vectors.negative.len(), 41, "vector count changed");
    for (i, v) in vectors.negative.iter().enumerate() {
        let case = format!("negative[{i}] {}", v.name);
        let envelope = unhex(&v.envelope_hex);
        let parsed = Header::parse(&envelope);
        if v.reject == "auth" {
            // The header parses; only a key holder can see the problem.
            let header = parsed.unwrap_or_else(|e| panic!("{case}: header should parse: {e}"));
            let device = DeviceId::new(header.device_id()).expect(&case);
            let key_hex = v.key_hex.as_deref().expect("auth vectors carry a key");
            let key = DeviceKey::new(device, header.key_id(), header.suite(), key_bytes(key_hex));
            assert_eq!(
                key.open(&envelope).err(),
                Some(OpenError::Decrypt),
                "{case}"
            );
            let mut buf = envelope.clone();
            assert_eq!(
                key.open_in_place(&mut buf).err(),
                Some(OpenError::Decrypt),
                "{case}"
            );
        } else {
            let err = parsed
                .err()
                .unwrap_or_else(|| panic!("{case}: parsed but must not"));
            assert_eq!(parse_rule(err), v.reject, "{case}: {err}");
            if let Some(key_hex) = &v.key_hex {
                // Opening must fail on the header too, before any key material is used.
                let key = DeviceKey::new(
                    DeviceId::new("pump-17").expect("valid"),
                    1,
                    Suite::Aes256Gcm,
                    key_bytes(key_hex),
                );
                assert_eq!(
                    key.open(&envelope).err(),
                    Some(OpenError::Header(err)),
                    "{case}"
                );
            }
        }
    }
}

#[test]
fn receipt_negative_vectors_are_rejected() {
    let vectors = load();
    assert_eq!(vectors.receipt_negative.len(), 4, "vector count changed");
    for (i, v) in vectors.receipt_negative.iter().enumerate() {
        let case = format!("receipt_negative[{i}] {}", v.name);
        assert_eq!(v.reject, "receipt", "{case}");
        assert!(decode_receipt(&unhex(&v.plaintext_hex)).is_err(), "{case}");
    }
}

#[test]
fn vector_copy_matches_the_shared_original() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/e3-vectors.json");
    let Ok(original) = std::fs::read(&shared) else {
        eprintln!("{} not present; drift check skipped", shared.display());
        return;
    };
    let copy = std::fs::read(data_path()).expect("vector copy present");
    assert!(
        copy == original,
        "tests/data/e3-vectors.json differs from {}: copy the shared file again",
        shared.display()
    );
}
