//! The clear E3 header: zero-copy parsing and writing.
//!
//! The header is the only part of an envelope that a gateway (which holds no keys) may
//! look at. [`Header::parse`] applies every rejection rule of the spec, in the spec's
//! order, and never panics on any input: each byte is fetched with a checked access.

use core::fmt;

use crate::error::HeaderError;

/// The only envelope version this crate reads and writes.
pub const VERSION: u8 = 0x01;
/// Length of the random nonce that follows `seq`.
pub const NONCE_LEN: usize = 12;
/// Length of the AEAD tag that ends every envelope.
pub const TAG_LEN: usize = 16;
/// Longest device id the header can carry.
pub const MAX_DEVICE_ID_LEN: usize = 64;
/// Header bytes besides the device id: version, kind, suite, id_len, key_id, seq, nonce.
pub const FIXED_HEADER_LEN: usize = 4 + 4 + 8 + NONCE_LEN;
/// Envelope bytes besides the device id and the plaintext: `44 + L` in total.
pub const FIXED_OVERHEAD: usize = FIXED_HEADER_LEN + TAG_LEN;
/// The deployment default for the largest envelope, in bytes (see the spec).
pub const DEFAULT_MAX_ENVELOPE_LEN: usize = 262_144;

/// What an envelope carries, and so in which direction it travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// Device to cloud.
    Uplink,
    /// Cloud to device: a command.
    Command,
    /// Cloud to device: a receipt naming uplinks the cloud durably accepted.
    Receipt,
}

impl Kind {
    /// Decodes the wire byte; `None` for an unknown kind.
    pub const fn from_u8(byte: u8) -> Option<Self> {
        match byte {
            0x01 => Some(Self::Uplink),
            0x02 => Some(Self::Command),
            0x03 => Some(Self::Receipt),
            _ => None,
        }
    }

    /// The wire byte.
    pub const fn as_u8(self) -> u8 {
        match self {
            Self::Uplink => 0x01,
            Self::Command => 0x02,
            Self::Receipt => 0x03,
        }
    }

    /// A stable lower-case name, used on the command line and in metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Uplink => "uplink",
            Self::Command => "command",
            Self::Receipt => "receipt",
        }
    }

    /// Parses [`Kind::as_str`] names.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Uplink, Self::Command, Self::Receipt]
            .into_iter()
            .find(|kind| kind.as_str() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The AEAD that sealed an envelope. Both take the device's 32-byte key directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Suite {
    /// AES-256-GCM: fastest where the CPU has AES instructions.
    Aes256Gcm,
    /// ChaCha20-Poly1305: fastest on CPUs without them (many ARM boards).
    ChaCha20Poly1305,
}

impl Suite {
    /// Decodes the wire byte; `None` for an unknown suite.
    pub const fn from_u8(byte: u8) -> Option<Self> {
        match byte {
            0x01 => Some(Self::Aes256Gcm),
            0x02 => Some(Self::ChaCha20Poly1305),
            _ => None,
        }
    }

    /// The wire byte.
    pub const fn as_u8(self) -> u8 {
        match self {
            Self::Aes256Gcm => 0x01,
            Self::ChaCha20Poly1305 => 0x02,
        }
    }

    /// The name used in device key files: `aes-256-gcm` or `chacha20-poly1305`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Aes256Gcm => "aes-256-gcm",
            Self::ChaCha20Poly1305 => "chacha20-poly1305",
        }
    }

    /// Parses [`Suite::as_str`] names.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Aes256Gcm, Self::ChaCha20Poly1305]
            .into_iter()
            .find(|suite| suite.as_str() == name)
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// True for the bytes the spec allows in a device id: `[A-Za-z0-9._-]`.
pub const fn is_device_id_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-')
}

/// Checks a device id against the spec: 1..=64 bytes, each in `[A-Za-z0-9._-]`.
///
/// # Errors
/// [`HeaderError::IdLen`] for a bad length, [`HeaderError::DeviceId`] for a bad byte.
pub fn validate_device_id(id: &[u8]) -> Result<&str, HeaderError> {
    if id.is_empty() || id.len() > MAX_DEVICE_ID_LEN {
        return Err(HeaderError::IdLen(
            u8::try_from(id.len()).unwrap_or(u8::MAX),
        ));
    }
    if let Some(index) = id.iter().position(|&b| !is_device_id_byte(b)) {
        return Err(HeaderError::DeviceId { index });
    }
    // Every byte is ASCII, so this cannot fail; map it anyway rather than panic.
    core::str::from_utf8(id).map_err(|_| HeaderError::DeviceId { index: 0 })
}

/// A parsed, valid E3 header borrowing the envelope it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    bytes: &'a [u8],
    kind: Kind,
    suite: Suite,
    device_id: &'a str,
    key_id: u32,
    seq: u64,
    nonce: &'a [u8; NONCE_LEN],
}

impl<'a> Header<'a> {
    /// Parses the header of a whole envelope and checks the envelope is long enough to
    /// hold a tag. Rules are applied in the spec's order, so the error names the first
    /// rule the input breaks.
    ///
    /// # Errors
    /// A [`HeaderError`] naming the broken rule.
    #[inline]
    pub fn parse(envelope: &'a [u8]) -> Result<Self, HeaderError> {
        let header = Self::parse_prefix(envelope)?;
        let needed = header.len() + TAG_LEN;
        if envelope.len() < needed {
            return Err(HeaderError::Truncated {
                needed,
                got: envelope.len(),
            });
        }
        Ok(header)
    }

    /// Parses just the header at the start of `bytes`, without requiring a tag after it.
    #[inline]
    pub(crate) fn parse_prefix(bytes: &'a [u8]) -> Result<Self, HeaderError> {
        let mut cursor = Cursor { bytes, at: 0 };
        let version = cursor.byte()?;
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        let kind_byte = cursor.byte()?;
        let kind = Kind::from_u8(kind_byte).ok_or(HeaderError::Kind(kind_byte))?;
        let suite_byte = cursor.byte()?;
        let suite = Suite::from_u8(suite_byte).ok_or(HeaderError::Suite(suite_byte))?;
        let id_len = cursor.byte()?;
        if id_len == 0 || usize::from(id_len) > MAX_DEVICE_ID_LEN {
            return Err(HeaderError::IdLen(id_len));
        }
        let device_id = validate_device_id(cursor.take(usize::from(id_len))?)?;
        let key_id = u32::from_be_bytes(cursor.array()?);
        let seq = u64::from_be_bytes(cursor.array()?);
        if seq == 0 {
            return Err(HeaderError::ZeroSeq);
        }
        let nonce = cursor.array_ref()?;
        let (header_bytes, _) = bytes
            .split_at_checked(cursor.at)
            .ok_or(cursor.truncated(0))?;
        Ok(Self {
            bytes: header_bytes,
            kind,
            suite,
            device_id,
            key_id,
            seq,
            nonce,
        })
    }

    /// The header's fields without the borrow, to rebuild it over another slice.
    #[inline]
    pub(crate) fn layout(&self) -> Layout {
        Layout {
            len: self.bytes.len(),
            id_len: self.device_id.len(),
            kind: self.kind,
            suite: self.suite,
            key_id: self.key_id,
            seq: self.seq,
        }
    }

    /// The header's bytes, `[0, 28 + L)`: the AEAD associated data.
    pub const fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Length of the header in bytes, `28 + L`.
    #[allow(clippy::len_without_is_empty, reason = "a header is never empty")]
    pub const fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Direction and meaning of the envelope.
    pub const fn kind(&self) -> Kind {
        self.kind
    }

    /// The AEAD that sealed it.
    pub const fn suite(&self) -> Suite {
        self.suite
    }

    /// The device the envelope belongs to (its sender for uplinks, its recipient otherwise).
    pub const fn device_id(&self) -> &'a str {
        self.device_id
    }

    /// Which of the device's keys sealed it.
    pub const fn key_id(&self) -> u32 {
        self.key_id
    }

    /// Per-device, per-direction sequence number; never 0.
    pub const fn seq(&self) -> u64 {
        self.seq
    }

    /// The AEAD nonce.
    pub const fn nonce(&self) -> &'a [u8; NONCE_LEN] {
        self.nonce
    }
}

/// A parsed header's fields, detached from the envelope so that the envelope can be
/// split mutably (decrypt in place) and the header re-borrowed from the shared half.
#[derive(Clone, Copy)]
pub(crate) struct Layout {
    pub(crate) len: usize,
    id_len: usize,
    kind: Kind,
    suite: Suite,
    key_id: u32,
    seq: u64,
}

impl Layout {
    /// The header over `bytes`, which must start with the bytes this layout was taken
    /// from. Skips re-validation of what `parse` already checked.
    #[inline]
    pub(crate) fn header<'b>(&self, bytes: &'b [u8]) -> Option<Header<'b>> {
        let id_end = 4 + self.id_len;
        let nonce_at = id_end + 12;
        Some(Header {
            bytes: bytes.get(..self.len)?,
            kind: self.kind,
            suite: self.suite,
            device_id: core::str::from_utf8(bytes.get(4..id_end)?).ok()?,
            key_id: self.key_id,
            seq: self.seq,
            nonce: bytes.get(nonce_at..nonce_at + NONCE_LEN)?.try_into().ok()?,
        })
    }
}

/// Checked reads from the front of a byte slice; every miss is [`HeaderError::Truncated`].
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn truncated(&self, wanted: usize) -> HeaderError {
        HeaderError::Truncated {
            needed: self.at.saturating_add(wanted),
            got: self.bytes.len(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], HeaderError> {
        let end = self.at.checked_add(n).ok_or(self.truncated(n))?;
        let field = self.bytes.get(self.at..end).ok_or(self.truncated(n))?;
        self.at = end;
        Ok(field)
    }

    fn byte(&mut self) -> Result<u8, HeaderError> {
        let [byte] = self.array::<1>()?;
        Ok(byte)
    }

    fn array_ref<const N: usize>(&mut self) -> Result<&'a [u8; N], HeaderError> {
        let field = self.take(N)?;
        field.try_into().map_err(|_| self.truncated(N))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], HeaderError> {
        self.array_ref().copied()
    }
}

/// Writes a header for the given fields into the front of `out`; returns its length.
///
/// The caller has checked `device_id` (it comes from a [`crate::DeviceId`]) and `seq`.
pub(crate) fn write_header(
    out: &mut [u8],
    fields: &HeaderFields<'_>,
    nonce: &[u8; NONCE_LEN],
) -> Option<usize> {
    let id = fields.device_id.as_bytes();
    let len = FIXED_HEADER_LEN + id.len();
    let head = out.get_mut(..len)?;
    let (fixed, rest) = head.split_at_mut(4);
    fixed.copy_from_slice(&[
        VERSION,
        fields.kind.as_u8(),
        fields.suite.as_u8(),
        u8::try_from(id.len()).ok()?,
    ]);
    let (id_out, rest) = rest.split_at_mut(id.len());
    id_out.copy_from_slice(id);
    let (key_id_out, rest) = rest.split_at_mut(4);
    key_id_out.copy_from_slice(&fields.key_id.to_be_bytes());
    let (seq_out, nonce_out) = rest.split_at_mut(8);
    seq_out.copy_from_slice(&fields.seq.to_be_bytes());
    nonce_out.copy_from_slice(nonce);
    Some(len)
}

/// The header fields a sealer chooses (everything but the nonce).
pub(crate) struct HeaderFields<'a> {
    pub(crate) kind: Kind,
    pub(crate) suite: Suite,
    pub(crate) device_id: &'a str,
    pub(crate) key_id: u32,
    pub(crate) seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_header_parses_back() {
        let fields = HeaderFields {
            kind: Kind::Command,
            suite: Suite::ChaCha20Poly1305,
            device_id: "valve.B_2",
            key_id: 7,
            seq: 42,
        };
        let mut buf = [0u8; 128];
        let len = write_header(&mut buf, &fields, &[9; NONCE_LEN]).expect("fits");
        let header = Header::parse_prefix(&buf[..len]).expect("valid");
        assert_eq!(header.len(), len);
        assert_eq!(header.kind(), Kind::Command);
        assert_eq!(header.suite(), Suite::ChaCha20Poly1305);
        assert_eq!(header.device_id(), "valve.B_2");
        assert_eq!(header.key_id(), 7);
        assert_eq!(header.seq(), 42);
        assert_eq!(header.nonce(), &[9; NONCE_LEN]);
    }

    #[test]
    fn header_without_room_for_a_tag_is_truncated() {
        let fields = HeaderFields {
            kind: Kind::Uplink,
            suite: Suite::Aes256Gcm,
            device_id: "a",
            key_id: 1,
            seq: 1,
        };
        let mut buf = [0u8; 29 + TAG_LEN - 1];
        let len = write_header(&mut buf, &fields, &[0; NONCE_LEN]).expect("fits");
        assert_eq!(len, 29);
        assert_eq!(
            Header::parse(&buf),
            Err(HeaderError::Truncated {
                needed: 45,
                got: 44
            })
        );
    }

    #[test]
    fn names_round_trip() {
        for kind in [Kind::Uplink, Kind::Command, Kind::Receipt] {
            assert_eq!(Kind::from_name(kind.as_str()), Some(kind));
            assert_eq!(Kind::from_u8(kind.as_u8()), Some(kind));
        }
        for suite in [Suite::Aes256Gcm, Suite::ChaCha20Poly1305] {
            assert_eq!(Suite::from_name(suite.as_str()), Some(suite));
            assert_eq!(Suite::from_u8(suite.as_u8()), Some(suite));
        }
    }
}
