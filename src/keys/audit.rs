//! The key store's audit log: one JSON line per key access, appended with a single
//! `write` on an `O_APPEND` descriptor and fdatasync'd before the access proceeds.
//!
//! A single `write` of a short line to a regular file opened with `O_APPEND` lands
//! whole at the end, so processes and threads sharing the log never interleave lines.
//! A short write is reported as an error rather than completed with a second `write`,
//! which another writer could split.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::KeyStoreError;

/// What was done with a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// A device's first key was created.
    Provision,
    /// A new key was created and the previous one retired.
    Rotate,
    /// A key was loaded to open or seal envelopes (once per key per process).
    Open,
    /// A key file was destroyed.
    Shred,
    /// A key file was written outside the store (for the device).
    Export,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Self::Provision => "provision",
            Self::Rotate => "rotate",
            Self::Open => "open",
            Self::Shred => "shred",
            Self::Export => "export",
        }
    }
}

/// One line of the log. Holds names only, never key material.
#[derive(Serialize)]
struct Line<'a> {
    ts_ms: u64,
    action: &'static str,
    device_id: &'a str,
    key_id: u32,
    actor: &'a str,
}

/// The open audit log.
#[derive(Debug)]
pub(super) struct AuditLog {
    path: PathBuf,
    /// Opened with `O_APPEND`: every write goes to the end, whoever else appends.
    file: File,
    /// Who is accessing keys: a process name or what `--actor` said.
    actor: String,
}

impl AuditLog {
    /// Opens (or creates, mode 0600) the log at `path`.
    pub(super) fn open(path: &Path, actor: String) -> Result<Self, KeyStoreError> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| audit_error(path, source))?;
        Ok(Self {
            path: path.to_owned(),
            file,
            actor,
        })
    }

    /// Who the lines name as actor.
    pub(super) fn actor(&self) -> &str {
        &self.actor
    }

    /// Replaces the actor named by later lines.
    pub(super) fn set_actor(&mut self, actor: String) {
        self.actor = actor;
    }

    /// Appends one line and makes it durable.
    pub(super) fn record(
        &self,
        action: Action,
        device: &str,
        key_id: u32,
    ) -> Result<(), KeyStoreError> {
        let line = Line {
            // Always the wall clock, whatever time the caller passed to the store.
            ts_ms: super::now_ms(),
            action: action.as_str(),
            device_id: device,
            key_id,
            actor: &self.actor,
        };
        let mut bytes =
            serde_json::to_vec(&line).map_err(|err| audit_error(&self.path, err.into()))?;
        bytes.push(b'\n');
        self.append(&bytes)
            .map_err(|source| audit_error(&self.path, source))
    }

    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        let written = (&self.file).write(bytes)?;
        if written != bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {written} of {} bytes", bytes.len()),
            ));
        }
        self.file.sync_data()
    }
}

fn audit_error(path: &Path, source: io::Error) -> KeyStoreError {
    KeyStoreError::Audit {
        path: path.to_owned(),
        source,
    }
}

/// The name of this process, the default actor: the file name of `argv[0]`.
pub(super) fn process_name() -> String {
    std::env::args_os()
        .next()
        .as_deref()
        .map(Path::new)
        .and_then(Path::file_name)
        .map_or_else(
            || "unknown".to_owned(),
            |name| name.to_string_lossy().into_owned(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_record_is_one_json_line_naming_action_device_key_and_actor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, "tester".to_owned()).expect("open");
        log.record(Action::Provision, "pump-17", 1).expect("record");
        log.record(Action::Open, "pump-17", 1).expect("record");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["action"], "provision");
        assert_eq!(lines[1]["action"], "open");
        assert_eq!(lines[1]["device_id"], "pump-17");
        assert_eq!(lines[1]["key_id"], 1);
        assert_eq!(lines[1]["actor"], "tester");
        assert!(lines[1]["ts_ms"].as_u64().expect("number") > 0);
    }

    #[test]
    fn a_reopened_log_appends_instead_of_truncating() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        for _ in 0..2 {
            let log = AuditLog::open(&path, "a".to_owned()).expect("open");
            log.record(Action::Shred, "d", 3).expect("record");
        }
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 2);
    }
}
