//! The device key file: the one format in which a device key moves between tools.
//!
//! ```json
//! {"device_id": "pump-17", "key_id": 1, "suite": "aes-256-gcm", "key": "<64 hex chars>"}
//! ```
//!
//! A key file is a secret. It is written with mode 0600 (atomically, and fsync'd with its
//! directory, so a power cut leaves either the old file or the new one), a file that
//! group or others can read is refused, and no error message ever quotes its contents.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use zeroize::{Zeroize, Zeroizing};

use crate::error::HeaderError;
use crate::header::Suite;
use crate::key::{DeviceId, DeviceKey, KEY_LEN};

/// Why a key file could not be read or written. Messages never contain key material.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Reading, writing or syncing the file failed.
    #[error("cannot access key file {path}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is readable or writable by group or others.
    #[error("key file {path} has mode {mode:o}; it must be 0600 (run: chmod 600 {path})")]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a JSON key file object.
    #[error("malformed key file {path} at line {line}, column {column}: {problem}")]
    Json {
        /// The key file.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
        /// What is wrong, without quoting any value.
        problem: String,
    },
    /// `device_id` breaks the spec's rules.
    #[error("key file {path}: invalid device_id")]
    DeviceId {
        /// The key file.
        path: PathBuf,
        /// The rule it breaks.
        #[source]
        source: HeaderError,
    },
    /// `suite` is not a known suite name.
    #[error("key file {path}: unknown suite; expected aes-256-gcm or chacha20-poly1305")]
    Suite {
        /// The key file.
        path: PathBuf,
    },
    /// `key` is not exactly 64 hex characters.
    #[error("key file {path}: key must be exactly 64 hex characters")]
    Key {
        /// The key file.
        path: PathBuf,
    },
    /// The target exists and overwriting was not asked for.
    #[error("key file {path} already exists; refusing to overwrite it")]
    Exists {
        /// The key file.
        path: PathBuf,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileJson {
    device_id: String,
    key_id: u32,
    suite: String,
    key: String,
}

impl Drop for KeyFileJson {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

/// Reads a device key file.
///
/// # Errors
/// A [`KeyFileError`] naming the file and the problem.
pub fn read_key_file(path: &Path) -> Result<DeviceKey, KeyFileError> {
    let io_err = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let mode = file.metadata().map_err(io_err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut bytes = Zeroizing::new(Vec::new());
    file.read_to_end(&mut bytes).map_err(io_err)?;
    parse_key_file(path, &bytes)
}

fn parse_key_file(path: &Path, bytes: &[u8]) -> Result<DeviceKey, KeyFileError> {
    let json: KeyFileJson = serde_json::from_slice(bytes).map_err(|err| KeyFileError::Json {
        path: path.to_owned(),
        line: err.line(),
        column: err.column(),
        problem: describe_json_error(&err),
    })?;
    let device_id = DeviceId::new(&json.device_id).map_err(|source| KeyFileError::DeviceId {
        path: path.to_owned(),
        source,
    })?;
    let suite = Suite::from_name(&json.suite).ok_or_else(|| KeyFileError::Suite {
        path: path.to_owned(),
    })?;
    let mut secret = Zeroizing::new([0u8; KEY_LEN]);
    hex::decode_to_slice(json.key.as_bytes(), &mut *secret).map_err(|_| KeyFileError::Key {
        path: path.to_owned(),
    })?;
    Ok(DeviceKey::new(device_id, json.key_id, suite, *secret))
}

/// serde_json quotes offending values ("invalid type: string \"…\""); a misplaced key
/// would end up in a log. Keep the structural messages, drop the quoted ones.
fn describe_json_error(err: &serde_json::Error) -> String {
    let text = err.to_string();
    let text = text.split(" at line ").next().unwrap_or_default();
    if text.starts_with("invalid type") || text.starts_with("invalid value") {
        "a field has the wrong type or value".to_owned()
    } else {
        text.to_owned()
    }
}

/// Writes `key` as a key file with mode 0600. With `overwrite`, an existing file is
/// replaced atomically; without, an existing file is an error.
///
/// # Errors
/// [`KeyFileError::Exists`] or [`KeyFileError::Io`].
pub fn write_key_file(path: &Path, key: &DeviceKey, overwrite: bool) -> Result<(), KeyFileError> {
    let io_err = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let json = KeyFileJson {
        device_id: key.device_id().as_str().to_owned(),
        key_id: key.key_id(),
        suite: key.suite().as_str().to_owned(),
        key: hex::encode(key.secret_bytes()),
    };
    let mut text = Zeroizing::new(serde_json::to_vec(&json).map_err(|e| io_err(e.into()))?);
    text.push(b'\n');
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !overwrite && path.exists() {
        return Err(KeyFileError::Exists {
            path: path.to_owned(),
        });
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = write_synced(&temp, &text).and_then(|()| {
        if overwrite {
            fs::rename(&temp, path)
        } else {
            // hard_link fails if the target appeared meanwhile: never clobber.
            fs::hard_link(&temp, path).and_then(|()| fs::remove_file(&temp))
        }
    });
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => KeyFileError::Exists {
            path: path.to_owned(),
        },
        _ => io_err(source),
    })?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_key() -> DeviceKey {
        DeviceKey::new(
            DeviceId::new("pump-17").expect("valid"),
            3,
            Suite::ChaCha20Poly1305,
            [0x5a; KEY_LEN],
        )
    }

    #[test]
    fn write_then_read_round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pump-17.key");
        write_key_file(&path, &sample_key(), false).expect("written");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let key = read_key_file(&path).expect("read");
        assert_eq!(key.device_id().as_str(), "pump-17");
        assert_eq!(key.key_id(), 3);
        assert_eq!(key.suite(), Suite::ChaCha20Poly1305);
        assert_eq!(key.secret_bytes(), &[0x5a; KEY_LEN]);
        assert!(matches!(
            write_key_file(&path, &sample_key(), false),
            Err(KeyFileError::Exists { .. })
        ));
        write_key_file(&path, &sample_key(), true).expect("overwrite");
        assert_eq!(fs::read_dir(dir.path()).expect("dir").count(), 1);
    }

    #[test]
    fn group_readable_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k");
        write_key_file(&path, &sample_key(), false).expect("written");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = read_key_file(&path).expect_err("refused");
        assert!(matches!(err, KeyFileError::Permissions { mode: 0o640, .. }));
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn malformed_files_get_errors_without_secrets() {
        let path = Path::new("k.json");
        let secret = "ab".repeat(32);
        let cases = [
            format!(
                r#"{{"device_id": "{secret}/", "key_id": 1, "suite": "aes-256-gcm", "key": "{secret}"}}"#
            ),
            format!(
                r#"{{"device_id": "d", "key_id": "{secret}", "suite": "aes-256-gcm", "key": "{secret}"}}"#
            ),
            format!(
                r#"{{"device_id": "d", "key_id": 1, "suite": "aes-256-gcm", "key": "{secret}0"}}"#
            ),
            format!(r#"{{"device_id": "d", "key_id": 1, "suite": "rot13", "key": "{secret}"}}"#),
            format!(r#"{{"device_id": "d", "key_id": 1, "key": "{secret}"}}"#),
            format!(
                r#"{{"device_id": "d", "key_id": 1, "suite": "aes-256-gcm", "key": "{secret}", "x": 1}}"#
            ),
            "not json".to_owned(),
        ];
        for case in &cases {
            let err = parse_key_file(path, case.as_bytes()).expect_err(case);
            let mut shown = err.to_string();
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                shown.push_str(&cause.to_string());
                source = cause.source();
            }
            assert!(!shown.contains(&secret[..16]), "{shown}");
            assert!(shown.contains("k.json"), "{shown}");
        }
    }
}
