//! The cloud side's device key store: provision, rotate and shred device keys, and
//! record every access in an audit log. Only the cloud ingest and `blindgate keys` use
//! it; the gateway never holds a device key.
//!
//! # Layout on disk
//!
//! ```text
//! <dir>/                         default /var/lib/blindgate-cloud/keys, 0700
//!   audit.log                    one JSON line per key access, append-only, 0600
//!   devices/<device_id>/         0700
//!     .lock                      flock'd for every change to this device
//!     state.json                 current key, retired keys, shredded, next downlink seq
//!     <key_id>.key               E3-SPEC device key files, 0600
//! ```
//!
//! `state.json`:
//!
//! ```json
//! {"current": 2, "current_created_ms": 1795000000000,
//!  "retired": [{"key_id": 1, "created_ms": 1794900000000, "until_ms": 1795259200000}],
//!  "shredded_at_ms": null, "next_downlink_seq": 1001}
//! ```
//!
//! Each key's creation time (`current_created_ms`, `created_ms`) is kept for
//! [`KeyStore::rotation_due`]. `retired` lists the keys whose grace period has not
//! ended; expired ones are dropped, and their files destroyed, at the next rotation.
//! Key ids are handed out in order, so an id below `current` that is not listed is an
//! expired key.
//!
//! # Durability and concurrency
//!
//! Every write of `state.json` is atomic and durable (temporary file, fsync, rename,
//! directory fsync); key files are written the same way by [`e3::write_key_file`]. A
//! power cut leaves the old state or the new one. The order of writes makes every
//! intermediate state safe: a new key file is durable before `state.json` names it,
//! and a device is marked shredded before its key files are destroyed, so a crash in
//! the middle of [`KeyStore::shred`] leaves a device that no lookup accepts (running
//! the shred again destroys what is left).
//!
//! Every change to one device runs under an exclusive `flock` on its `.lock`, so
//! `blindgate keys` and a running ingest can share the store. Lookups take no lock:
//! they read `state.json` on every call (a small file, replaced atomically), so a
//! rotation or shred done by another process is seen at the next call. Key material
//! is cached in memory once loaded; key files never change once written (key ids are
//! never reused), and the cache is consulted only after `state.json` said the key is
//! usable. A shredded device's cached keys are dropped (and zeroized) as soon as a call
//! sees the shred.
//!
//! # Audit log
//!
//! One line per key access, written with a single `write` on an `O_APPEND` descriptor
//! and fdatasync'd before the access proceeds: an access whose line cannot be written
//! does not happen. Lines never contain key material.
//!
//! ```json
//! {"ts_ms":1795000000000,"action":"rotate","device_id":"pump-17","key_id":2,"actor":"blindgate"}
//! ```
//!
//! `provision` and `rotate` name the new key; `export` is a key file written out for a
//! device; `shred` is logged once per key file destroyed (also for expired retired keys,
//! destroyed at the next rotation). `open` is logged when a key is first loaded into a
//! [`KeyStore`] to open or seal envelopes, so once per (device, key id) per process:
//! logging every message would cost a synchronous disk write per message.
//!
//! # Shredding
//!
//! Shredding overwrites each key file with zeros, fsyncs it, unlinks it and fsyncs the
//! directory. On journaling or copy-on-write file systems and on flash storage, old
//! blocks may survive an overwrite; the store should live on an encrypted file system
//! for shredding to mean erasure at the storage level.
//!
//! # Layout
//!
//! - `store`: [`KeyStore`], the public operations.
//! - `audit`: the append-only audit log.
//! - `seq`: downlink sequence number reservations.
//! - [`cli`]: `blindgate keys new|rotate|shred|list`.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// The wall clock in milliseconds since the Unix epoch, as the store's `now_ms`
/// parameters expect it.
pub use crate::clock::now_ms;

mod audit;
pub mod cli;
mod seq;
mod store;

pub use store::KeyStore;

/// The store directory used when none is given.
pub const DEFAULT_STORE_DIR: &str = "/var/lib/blindgate-cloud/keys";

/// A duration in whole milliseconds, saturating.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The result of [`KeyStore::rotate`]: both keys and the `rekey` command to publish.
#[derive(Debug)]
pub struct Rotation {
    /// The key that was current; it opens uplinks until the grace period ends.
    pub old: e3::DeviceKey,
    /// The new current key.
    pub new: e3::DeviceKey,
    /// The downlink seq the command is sealed with (reserved and persisted).
    pub command_seq: u64,
    /// The `rekey` command (docs/PAYLOADS.md), sealed with the old key as kind
    /// command: an E3 envelope ready to publish on the device's downlink topic.
    pub command: Vec<u8>,
}

/// What `state.json` says about a device; never key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    /// The device id.
    pub device: String,
    /// The key id new messages are sealed with.
    pub current_key_id: u32,
    /// When the current key was created, ms since the Unix epoch.
    pub current_created_ms: u64,
    /// Older keys still accepted for opening, with the end of their grace period.
    pub retired: Vec<RetiredKey>,
    /// When the device was shredded, if it was.
    pub shredded_at_ms: Option<u64>,
    /// The first downlink seq not yet reserved.
    pub next_downlink_seq: u64,
}

/// A retired key: it opens uplinks until `until_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetiredKey {
    /// The key id.
    pub key_id: u32,
    /// End of the grace period, ms since the Unix epoch (exclusive).
    pub until_ms: u64,
}

/// Why a key store operation failed. Messages never contain key material.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KeyStoreError {
    /// The device was never provisioned.
    #[error("unknown device {device}")]
    UnknownDevice {
        /// The device id.
        device: String,
    },
    /// The device has no key with this id (zero, or newer than its current key).
    #[error("device {device} has no key {key_id}")]
    UnknownKey {
        /// The device id.
        device: String,
        /// The key id asked for.
        key_id: u32,
    },
    /// The key was retired and its grace period has ended.
    #[error("key {key_id} of device {device} has expired")]
    KeyExpired {
        /// The device id.
        device: String,
        /// The key id asked for.
        key_id: u32,
    },
    /// The device's keys were destroyed; it cannot be used or provisioned again.
    #[error("device {device} was shredded at {at_ms} ms")]
    Shredded {
        /// The device id.
        device: String,
        /// When, ms since the Unix epoch.
        at_ms: u64,
    },
    /// Provisioning a device that already exists.
    #[error("device {device} is already provisioned")]
    DeviceExists {
        /// The device id.
        device: String,
    },
    /// The device id breaks E3-SPEC's rules.
    #[error("invalid device id")]
    InvalidDeviceId(#[source] e3::HeaderError),
    /// `.` and `..` are valid E3 device ids but name directories; the store refuses them.
    #[error("device id {device} is reserved by the key store")]
    ReservedDeviceId {
        /// The device id.
        device: String,
    },
    /// Key ids or downlink seqs of this device are used up.
    #[error("device {device} has no {what} left")]
    Exhausted {
        /// The device id.
        device: String,
        /// `key ids` or `downlink seqs`.
        what: &'static str,
    },
    /// A file or directory of the store could not be read, written, synced or locked.
    #[error("cannot access {}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A key file could not be read or written.
    #[error("device key file problem")]
    KeyFile(#[source] e3::KeyFileError),
    /// A key file holds another device's key or another key id than its name says.
    #[error("key file {} is not key {key_id} of device {device}", .path.display())]
    ForeignKey {
        /// The key file.
        path: PathBuf,
        /// The device it should belong to.
        device: String,
        /// The key id its name says.
        key_id: u32,
    },
    /// `state.json` is not a valid state file.
    #[error("malformed state file {}", .path.display())]
    State {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: serde_json::Error,
    },
    /// The audit log could not be written; the access it would record did not happen.
    #[error("cannot append to audit log {}", .path.display())]
    Audit {
        /// The audit log.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Sealing the `rekey` command failed.
    #[error("cannot seal the rekey command")]
    Seal(#[source] e3::SealError),
}

impl KeyStoreError {
    /// A stable snake_case name for the kind of failure, for metrics and counters:
    /// `unknown_device`, `unknown_key`, `key_expired`, `shredded`, `device_exists`,
    /// `invalid_device_id`, `exhausted`, `seal` or `storage`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownDevice { .. } => "unknown_device",
            Self::UnknownKey { .. } => "unknown_key",
            Self::KeyExpired { .. } => "key_expired",
            Self::Shredded { .. } => "shredded",
            Self::DeviceExists { .. } => "device_exists",
            Self::InvalidDeviceId(_) | Self::ReservedDeviceId { .. } => "invalid_device_id",
            Self::Exhausted { .. } => "exhausted",
            Self::Seal(_) => "seal",
            Self::Io { .. }
            | Self::KeyFile(_)
            | Self::ForeignKey { .. }
            | Self::State { .. }
            | Self::Audit { .. } => "storage",
        }
    }

    fn io(path: &std::path::Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_failures_have_the_reasons_the_ingest_counts() {
        let device = || "d".to_owned();
        let cases = [
            (
                KeyStoreError::UnknownDevice { device: device() },
                "unknown_device",
            ),
            (
                KeyStoreError::UnknownKey {
                    device: device(),
                    key_id: 9,
                },
                "unknown_key",
            ),
            (
                KeyStoreError::KeyExpired {
                    device: device(),
                    key_id: 1,
                },
                "key_expired",
            ),
            (
                KeyStoreError::Shredded {
                    device: device(),
                    at_ms: 5,
                },
                "shredded",
            ),
        ];
        for (err, reason) in cases {
            assert_eq!(err.reason(), reason, "{err}");
        }
    }
}
