//! E3: the device-to-cloud envelope of blindgate.
//!
//! A device seals each message with one of its own 32-byte keys (AES-256-GCM or
//! ChaCha20-Poly1305); the gateway, which holds no key, parses only the clear header and
//! forwards the exact bytes; the cloud opens the envelope and applies the replay rule.
//! This crate implements the wire contract `E3-SPEC.md` version 1 and passes its
//! independent test vectors (`tests/data/e3-vectors.json`).
//!
//! # Layout
//!
//! - [`header`]: the clear header, zero-copy [`Header::parse`] with one error per rule.
//! - [`key`]: [`DeviceId`] and [`DeviceKey`] (zeroized on drop).
//! - [`envelope`]: [`DeviceKey::seal_into`] / [`DeviceKey::open_in_place`], and the
//!   allocating `seal` / `open`.
//! - [`receipt`]: receipt plaintexts (which uplinks the cloud accepted).
//! - `replay` (feature `alloc`): the [`ReplayWindow`], saved and restored as bytes.
//! - `key_file` (feature `std`): the device key file, JSON, mode 0600.
//!
//! # Features
//!
//! The core is `no_std` and allocation-free. `alloc` adds the allocating helpers and
//! the replay window; `std` (default) adds the OS random source and key files.
//!
//! # Example
//!
//! ```
//! use e3::{DeviceId, DeviceKey, Kind, Suite};
//!
//! let key = DeviceKey::new(DeviceId::new("pump-17")?, 1, Suite::Aes256Gcm, [7; 32]);
//! let envelope = key.seal(Kind::Uplink, 1, b"21.5 C")?;
//! let header = e3::Header::parse(&envelope)?; // what a gateway may look at
//! assert_eq!(header.device_id(), "pump-17");
//! let (_, plaintext) = key.open(&envelope)?; // what only the cloud can do
//! assert_eq!(plaintext, b"21.5 C");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(not(any(feature = "std", test)), no_std)]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
// Parsing untrusted bytes must never panic: no unchecked indexing outside tests.
#![cfg_attr(not(test), deny(clippy::indexing_slicing))]
#![deny(clippy::cast_possible_truncation)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod envelope;
mod error;
pub mod header;
pub mod key;
#[cfg(feature = "std")]
pub mod key_file;
pub mod receipt;
#[cfg(feature = "alloc")]
pub mod replay;

/// The operating system's CSPRNG, for [`DeviceKey::generate`].
#[cfg(feature = "std")]
pub use aead::OsRng;
pub use envelope::{Opened, envelope_len};
pub use error::{HeaderError, KeyMismatch, OpenError, ReceiptError, SealError};
pub use header::{DEFAULT_MAX_ENVELOPE_LEN, FIXED_OVERHEAD, Header, Kind, Suite};
pub use key::{DeviceId, DeviceKey, KEY_LEN};
#[cfg(feature = "std")]
pub use key_file::{KeyFileError, read_key_file, write_key_file};
#[cfg(feature = "alloc")]
pub use receipt::encode_receipt_vec;
pub use receipt::{ReceiptEntry, decode_receipt, encode_receipt};
#[cfg(feature = "alloc")]
pub use replay::{ReplayStateError, ReplayWindow, Verdict};
