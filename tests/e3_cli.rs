//! `blindgate e3 keygen|seal|open` driven as a user would: the real binary, real files,
//! stdin and stdout.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn blindgate(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_blindgate"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("blindgate runs");
    child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(stdin)
        .expect("stdin written");
    child.wait_with_output().expect("blindgate exits")
}

fn keygen(dir: &Path, device: &str, suite: &str, key_id: &str) -> String {
    let path = dir.join(format!("{device}-{key_id}.key"));
    let path = path.to_str().expect("utf-8 path").to_owned();
    let out = blindgate(
        &[
            "e3", "keygen", "--device", device, "--suite", suite, "--key-id", key_id, "-o", &path,
        ],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn open_of_seal_returns_the_input_byte_for_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    for suite in ["aes-256-gcm", "chacha20-poly1305"] {
        let key = keygen(dir.path(), "pump-17", suite, "1");
        let mode = std::fs::metadata(&key).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "key file mode");

        let sealed = blindgate(&["e3", "seal", "--key-file", &key, "--seq", "7"], &input);
        assert!(sealed.status.success(), "{}", stderr(&sealed));
        assert_eq!(sealed.stdout.len(), input.len() + 44 + "pump-17".len());

        let opened = blindgate(&["e3", "open", "--key-file", &key], &sealed.stdout);
        assert!(opened.status.success(), "{}", stderr(&opened));
        assert!(opened.stdout == input, "plaintext differs from input");
        std::fs::remove_file(&key).expect("removed");
    }
}

#[test]
fn files_in_and_out_and_kind_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = keygen(dir.path(), "valve.B_2", "chacha20-poly1305", "7");
    let plain = dir.path().join("cmd.json");
    let sealed = dir.path().join("cmd.e3");
    let back = dir.path().join("cmd.out");
    std::fs::write(&plain, br#"{"cmd":"close"}"#).expect("written");
    let path = |p: &Path| p.to_str().expect("utf-8").to_owned();
    let out = blindgate(
        &[
            "e3",
            "seal",
            "--key-file",
            &key,
            "--seq",
            "42",
            "--kind",
            "command",
            &path(&plain),
            "-o",
            &path(&sealed),
        ],
        b"",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = blindgate(
        &[
            "e3",
            "open",
            "--key-file",
            &key,
            "--show-header",
            &path(&sealed),
            "-o",
            &path(&back),
        ],
        b"",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(&back).expect("read"),
        br#"{"cmd":"close"}"#.to_vec()
    );
    assert!(
        stderr(&out)
            .contains("kind=command suite=chacha20-poly1305 device_id=valve.B_2 key_id=7 seq=42")
    );
}

#[test]
fn flipped_bytes_fail_with_a_named_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = keygen(dir.path(), "pump-17", "aes-256-gcm", "1");
    let sealed = blindgate(&["e3", "seal", "--key-file", &key, "--seq", "1"], b"21.5 C");
    assert!(sealed.status.success());
    // Layout for "pump-17": version 0, kind 1, suite 2, id_len 3, device id 4..11,
    // key id 11..15, seq 15..23 (seq 1's low bit flips it to 0), nonce 23..35, then
    // ciphertext and tag. One flip per region, each with the problem it must name.
    let cases: [(usize, &str); 6] = [
        (0, "unknown envelope version"),
        (1, "unknown envelope kind"),
        (6, "different device_id"),
        (4 + 7 + 4 + 7, "sequence number 0"),
        (4 + 7 + 12 + 3, "decryption failed"),
        (sealed.stdout.len() - 1, "decryption failed"),
    ];
    for (at, problem) in cases {
        let mut tampered = sealed.stdout.clone();
        tampered[at] ^= 0x01;
        let out = blindgate(&["e3", "open", "--key-file", &key], &tampered);
        assert!(!out.status.success(), "byte {at} flipped yet opened");
        assert!(out.stdout.is_empty(), "no plaintext on failure");
        assert!(
            stderr(&out).contains(problem),
            "byte {at}: expected {problem:?} in {}",
            stderr(&out)
        );
    }
}

#[test]
fn wrong_key_and_malformed_key_file_are_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = keygen(dir.path(), "pump-17", "aes-256-gcm", "1");
    let same_name_other_bytes = dir.path().join("other");
    std::fs::create_dir(&same_name_other_bytes).expect("dir");
    let other = keygen(&same_name_other_bytes, "pump-17", "aes-256-gcm", "1");
    let other_device = keygen(dir.path(), "meter-9", "aes-256-gcm", "1");
    let sealed = blindgate(&["e3", "seal", "--key-file", &key, "--seq", "1"], b"x");

    let out = blindgate(&["e3", "open", "--key-file", &other], &sealed.stdout);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("decryption failed: wrong key or tampered envelope"));

    let out = blindgate(&["e3", "open", "--key-file", &other_device], &sealed.stdout);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("sealed for a different device_id"));

    let bad = dir.path().join("bad.key");
    std::fs::write(
        &bad,
        r#"{"device_id": "pump-17", "key_id": 1, "suite": "aes-256-gcm"}"#,
    )
    .expect("written");
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = blindgate(
        &["e3", "open", "--key-file", bad.to_str().expect("utf-8")],
        &sealed.stdout,
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("malformed key file") && err.contains("missing field `key`"),
        "{err}"
    );

    let out = blindgate(
        &[
            "e3",
            "keygen",
            "--device",
            "pump/17",
            "-o",
            bad.to_str().expect("utf-8"),
        ],
        b"",
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("invalid device id"));
}
