//! Errors, one enum per operation. Header errors are specific (the header is public);
//! an AEAD failure is a single opaque [`OpenError::Decrypt`].

use thiserror::Error;

/// A rule of the spec's header that an input breaks. Parsing stops at the first one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The input ends before a field, or is shorter than `44 + L` bytes.
    #[error("envelope truncated: needs at least {needed} bytes, has {got}")]
    Truncated {
        /// Bytes the rule needs.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// The version byte is not `0x01`.
    #[error("unknown envelope version {0:#04x}")]
    Version(u8),
    /// The kind byte is not uplink, command or receipt.
    #[error("unknown envelope kind {0:#04x}")]
    Kind(u8),
    /// The suite byte is not AES-256-GCM or ChaCha20-Poly1305.
    #[error("unknown cipher suite {0:#04x}")]
    Suite(u8),
    /// The device id length is 0 or more than 64.
    #[error("device id length {0} is outside 1..=64")]
    IdLen(u8),
    /// A device id byte is outside `[A-Za-z0-9._-]`.
    #[error("device id byte {index} is outside [A-Za-z0-9._-]")]
    DeviceId {
        /// Position of the first bad byte within the device id.
        index: usize,
    },
    /// The sequence number is 0 (sequences start at 1).
    #[error("sequence number 0 is not allowed")]
    ZeroSeq,
}

impl HeaderError {
    /// The spec's name of the broken rule: `version`, `kind`, `suite`, `id_len`,
    /// `device_id`, `seq` or `truncated`. Stable, so usable as a metric label value.
    pub const fn rule(&self) -> &'static str {
        match self {
            Self::Truncated { .. } => "truncated",
            Self::Version(_) => "version",
            Self::Kind(_) => "kind",
            Self::Suite(_) => "suite",
            Self::IdLen(_) => "id_len",
            Self::DeviceId { .. } => "device_id",
            Self::ZeroSeq => "seq",
        }
    }
}

/// Which header field names a key other than the one given to `open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyMismatch {
    /// The envelope is for another device.
    DeviceId,
    /// The envelope was sealed with another of the device's keys.
    KeyId,
    /// The envelope names a suite other than the key's.
    Suite,
}

impl KeyMismatch {
    /// The header field's name.
    pub const fn field(self) -> &'static str {
        match self {
            Self::DeviceId => "device_id",
            Self::KeyId => "key_id",
            Self::Suite => "suite",
        }
    }
}

/// Why an envelope could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The clear header breaks a rule of the spec.
    #[error("envelope header is invalid")]
    Header(#[source] HeaderError),
    /// The header names a different device, key or suite than the key given.
    #[error("envelope was sealed for a different {} than this key's", .0.field())]
    WrongKey(KeyMismatch),
    /// The AEAD tag did not verify: wrong key material or a tampered envelope.
    /// Deliberately carries no detail.
    #[error("decryption failed: wrong key or tampered envelope")]
    Decrypt,
}

impl From<HeaderError> for OpenError {
    fn from(err: HeaderError) -> Self {
        Self::Header(err)
    }
}

impl OpenError {
    /// A stable name for the reason, usable as a metric label value:
    /// the header rule, `wrong_key` or `auth`.
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::Header(err) => err.rule(),
            Self::WrongKey(_) => "wrong_key",
            Self::Decrypt => "auth",
        }
    }
}

/// Why an envelope could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SealError {
    /// Sequence numbers start at 1.
    #[error("sequence number 0 is not allowed")]
    ZeroSeq,
    /// The output buffer cannot hold the envelope.
    #[error("output buffer too small: envelope needs {needed} bytes")]
    BufferTooSmall {
        /// Bytes the envelope needs.
        needed: usize,
    },
    /// The plaintext is longer than the AEAD can seal.
    #[error("plaintext too long to seal")]
    TooLong,
}

/// Why a receipt plaintext was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ReceiptError {
    /// The length is not a multiple of 12 bytes.
    #[error("receipt length {0} is not a multiple of 12 bytes")]
    Length(usize),
    /// A receipt carries 1..=256 entries.
    #[error("receipt has {0} entries; 1..=256 allowed")]
    EntryCount(usize),
    /// An entry names sequence number 0, which no uplink can have.
    #[error("receipt entry {0} names sequence number 0")]
    ZeroSeq(usize),
    /// The output buffer cannot hold the encoded receipt.
    #[error("output buffer too small: receipt needs {needed} bytes")]
    BufferTooSmall {
        /// Bytes the receipt needs.
        needed: usize,
    },
}
