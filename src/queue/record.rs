//! The on-disk record format.
//!
//! Key: `[id_len u8][device id][record id u64 BE]`, so records sort by device and, within
//! a device, by arrival.
//!
//! Value, version 2 (written): a self-describing frame that can be found and checked in
//! raw bytes without sled, so records that sled's recovery cannot reach can still be
//! salvaged from its files (`salvage`):
//!
//! ```text
//! [tag "\x02bgq" 4][crc32 u32 BE][key_len u8][key][arrival ms u64 BE][payload_len u32 BE][payload]
//! ```
//!
//! The CRC-32 covers everything after it. The key inside the value must equal sled's key.
//! It starts from a seed: 0 in sled values and in segments of format 1, the segment's
//! number in segments of format 2 (`segments::file`). A frame left in a reused segment
//! file by the segment it belonged to before then never reads as one of the new
//! segment's: with another seed, the same bytes give another CRC.
//!
//! Value, version 1 (still read, from queues written by earlier releases):
//! `[0x01][crc32 u32 BE][arrival ms u64 BE][payload]`, the CRC-32 over key, arrival and
//! payload.
//!
//! A record whose CRC does not match, or whose key or value does not decode, is damaged:
//! recovery moves it to quarantine instead of forwarding it or stopping.

use bytes::Bytes;
use thiserror::Error;

/// The first four bytes of a version 2 value: the version, then `bgq`.
pub const FRAME_TAG: [u8; 4] = *b"\x02bgq";
/// Bytes of a version 2 value besides the key and the payload.
pub const FRAME_OVERHEAD: usize = 4 + 4 + 1 + 8 + 4;
/// The largest payload a frame may announce (`envelope.max_size` is at most 16 MiB);
/// anything larger is not a frame.
pub const MAX_FRAME_PAYLOAD: usize = 16 << 20;
/// The record format this code writes.
pub const RECORD_VERSION: u8 = 2;
const RECORD_VERSION_1: u8 = 1;

/// Globally increasing record id (sled's persistent monotonic id generator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId(pub u64);

/// One stored message: a device's E3 envelope, exactly as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Where it sits in the queue.
    pub id: RecordId,
    /// The device that sent it (from its certificate, checked against the envelope).
    pub device_id: String,
    /// When the gateway received it, in milliseconds since the Unix epoch.
    pub arrival_ms: u64,
    /// The envelope bytes, untouched.
    pub payload: Bytes,
}

/// Why stored bytes are not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The key is not `[len][device id][u64]`.
    #[error("record key is malformed")]
    Key,
    /// The value is shorter than its fixed fields.
    #[error("record value is truncated")]
    Truncated,
    /// The value names a format this code does not read.
    #[error("record has unknown format version {0}")]
    Version(u8),
    /// The checksum does not match: the bytes changed after they were written.
    #[error("record checksum mismatch")]
    Checksum,
}

/// The key prefix shared by all records of one device.
pub fn device_prefix(device_id: &str) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(1 + device_id.len());
    // Device ids are at most 64 bytes (checked at ingress), so the length fits a u8.
    prefix.push(u8::try_from(device_id.len()).unwrap_or(u8::MAX));
    prefix.extend_from_slice(device_id.as_bytes());
    prefix
}

/// The key of record `id` of `device_id`.
pub fn encode_key(device_id: &str, id: RecordId) -> Vec<u8> {
    let mut key = device_prefix(device_id);
    key.extend_from_slice(&id.0.to_be_bytes());
    key
}

/// Splits a key into device id and record id.
///
/// # Errors
/// [`RecordError::Key`] if the key does not have the layout above.
pub fn decode_key(key: &[u8]) -> Result<(&str, RecordId), RecordError> {
    let (&len, rest) = key.split_first().ok_or(RecordError::Key)?;
    let (device, id) = rest
        .split_at_checked(usize::from(len))
        .ok_or(RecordError::Key)?;
    let id: [u8; 8] = id.try_into().map_err(|_| RecordError::Key)?;
    let device = std::str::from_utf8(device).map_err(|_| RecordError::Key)?;
    if device.is_empty() {
        return Err(RecordError::Key);
    }
    Ok((device, RecordId(u64::from_be_bytes(id))))
}

fn checksum_v1(key: &[u8], arrival: &[u8; 8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(key);
    hasher.update(arrival);
    hasher.update(payload);
    hasher.finalize()
}

/// Encodes a record's value (version 2) for `key`.
pub fn encode_value(key: &[u8], arrival_ms: u64, payload: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(FRAME_OVERHEAD + key.len() + payload.len());
    encode_frame_into(&mut value, 0, key, arrival_ms, payload);
    value
}

/// Appends the version 2 frame of a record, its CRC seeded with `seed`, to `out` (the
/// segment log writes many frames into one buffer) and returns the frame's length.
pub fn encode_frame_into(
    out: &mut Vec<u8>,
    seed: u32,
    key: &[u8],
    arrival_ms: u64,
    payload: &[u8],
) -> usize {
    let head = encode_frame_head_into(out, seed, key, arrival_ms, payload);
    out.extend_from_slice(payload);
    head + payload.len()
}

/// Appends all of a frame but its payload to `out`, its CRC covering `payload` too, and
/// returns the length of what it appended. The payload follows in the file straight
/// after: the segment log writes it from where it already is, with no copy here.
pub fn encode_frame_head_into(
    out: &mut Vec<u8>,
    seed: u32,
    key: &[u8],
    arrival_ms: u64,
    payload: &[u8],
) -> usize {
    let start = out.len();
    out.reserve(FRAME_OVERHEAD + key.len());
    out.extend_from_slice(&FRAME_TAG);
    out.extend_from_slice(&[0; 4]);
    // Keys are at most 1 + 64 + 8 bytes (device ids are checked at ingress).
    out.push(u8::try_from(key.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(key);
    out.extend_from_slice(&arrival_ms.to_be_bytes());
    // Payloads are far below 4 GiB (the gateway's limit is a few MiB).
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    let mut crc = crc32fast::Hasher::new_with_initial(seed);
    crc.update(out.get(start + 8..).unwrap_or_default());
    crc.update(payload);
    if let Some(field) = out.get_mut(start + 4..start + 8) {
        field.copy_from_slice(&crc.finalize().to_be_bytes());
    }
    out.len() - start
}

/// A version 2 frame read from raw bytes: its key, arrival time and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// sled's key of the record.
    pub key: &'a [u8],
    /// When the gateway received it.
    pub arrival_ms: u64,
    /// The envelope bytes.
    pub payload: &'a [u8],
    /// Bytes the whole frame takes, from its tag.
    pub len: usize,
}

/// Why bytes that start with [`FRAME_TAG`] are not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The bytes end before the frame says it does: more bytes may complete it.
    Incomplete,
    /// Not a frame, or a damaged one.
    Invalid(RecordError),
}

/// Reads the version 2 frame at the start of `bytes` (which may go on after it) and
/// checks its CRC (seeded with 0) and its key's layout.
///
/// # Errors
/// [`FrameError::Incomplete`] if `bytes` ends inside the frame, else
/// [`FrameError::Invalid`].
pub fn read_frame(bytes: &[u8]) -> Result<Frame<'_>, FrameError> {
    read_frame_seeded(bytes, 0)
}

/// [`read_frame`] for a frame whose CRC was seeded with `seed`.
///
/// # Errors
/// As [`read_frame`]; a frame written with another seed is
/// `Invalid(RecordError::Checksum)`.
pub fn read_frame_seeded(bytes: &[u8], seed: u32) -> Result<Frame<'_>, FrameError> {
    let invalid = |e| Err(FrameError::Invalid(e));
    let fixed = |range: std::ops::Range<usize>| bytes.get(range).ok_or(FrameError::Incomplete);
    if fixed(0..4)? != FRAME_TAG {
        return invalid(RecordError::Version(bytes.first().copied().unwrap_or(0)));
    }
    let crc = u32::from_be_bytes(
        fixed(4..8)?
            .try_into()
            .map_err(|_| FrameError::Incomplete)?,
    );
    let key_len = usize::from(*fixed(8..9)?.first().ok_or(FrameError::Incomplete)?);
    let key_end = 9 + key_len;
    let arrival: [u8; 8] = fixed(key_end..key_end + 8)?
        .try_into()
        .map_err(|_| FrameError::Incomplete)?;
    let len_at = key_end + 8;
    let payload_len: [u8; 4] = fixed(len_at..len_at + 4)?
        .try_into()
        .map_err(|_| FrameError::Incomplete)?;
    let payload_len = u32::from_be_bytes(payload_len) as usize;
    if payload_len > MAX_FRAME_PAYLOAD {
        return invalid(RecordError::Truncated);
    }
    let end = len_at + 4 + payload_len;
    let covered = fixed(8..end)?;
    let mut hasher = crc32fast::Hasher::new_with_initial(seed);
    hasher.update(covered);
    if hasher.finalize() != crc {
        return invalid(RecordError::Checksum);
    }
    let key = fixed(9..key_end)?;
    decode_key(key).map_err(FrameError::Invalid)?;
    Ok(Frame {
        key,
        arrival_ms: u64::from_be_bytes(arrival),
        payload: fixed(len_at + 4..end)?,
        len: end,
    })
}

/// Decodes and verifies a stored record (either version).
///
/// # Errors
/// A [`RecordError`] for any damage.
pub fn decode(key: &[u8], value: &[u8]) -> Result<Record, RecordError> {
    let (device_id, id, arrival_ms, payload) = parse(key, value)?;
    Ok(Record {
        id,
        device_id: device_id.to_owned(),
        arrival_ms,
        payload: Bytes::copy_from_slice(payload),
    })
}

/// Like [`decode`], but the payload shares `value`'s buffer (sled's `IVec`) instead of
/// being copied: the forwarding path reads every record once.
///
/// # Errors
/// A [`RecordError`] for any damage.
pub fn decode_shared<V>(key: &[u8], value: V) -> Result<Record, RecordError>
where
    V: AsRef<[u8]> + Send + 'static,
{
    let bytes = value.as_ref();
    let (device_id, id, arrival_ms, payload) = parse(key, bytes)?;
    let start = payload.as_ptr() as usize - bytes.as_ptr() as usize;
    let range = start..start + payload.len();
    let device_id = device_id.to_owned();
    Ok(Record {
        id,
        device_id,
        arrival_ms,
        payload: Bytes::from_owner(value).slice(range),
    })
}

/// Checks a stored record: device, id, arrival time and the payload within `value`.
fn parse<'v>(
    key: &'v [u8],
    value: &'v [u8],
) -> Result<(&'v str, RecordId, u64, &'v [u8]), RecordError> {
    let (device_id, id) = decode_key(key)?;
    let (arrival_ms, payload) = match value.first() {
        Some(&RECORD_VERSION_1) => decode_v1(key, value)?,
        Some(_) => {
            let frame = read_frame(value).map_err(|e| match e {
                FrameError::Incomplete => RecordError::Truncated,
                FrameError::Invalid(e) => e,
            })?;
            if frame.key != key || frame.len != value.len() {
                return Err(RecordError::Checksum);
            }
            (frame.arrival_ms, frame.payload)
        }
        None => return Err(RecordError::Truncated),
    };
    Ok((device_id, id, arrival_ms, payload))
}

fn decode_v1<'v>(key: &[u8], value: &'v [u8]) -> Result<(u64, &'v [u8]), RecordError> {
    let rest = value.get(1..).ok_or(RecordError::Truncated)?;
    let (crc, rest) = rest.split_at_checked(4).ok_or(RecordError::Truncated)?;
    let (arrival, payload) = rest.split_at_checked(8).ok_or(RecordError::Truncated)?;
    let crc = u32::from_be_bytes(crc.try_into().map_err(|_| RecordError::Truncated)?);
    let arrival: [u8; 8] = arrival.try_into().map_err(|_| RecordError::Truncated)?;
    if checksum_v1(key, &arrival, payload) != crc {
        return Err(RecordError::Checksum);
    }
    Ok((u64::from_be_bytes(arrival), payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let key = encode_key("pump-17", RecordId(42));
        let value = encode_value(&key, 1_700_000_000_000, b"envelope");
        let record = decode(&key, &value).expect("valid");
        assert_eq!(record.id, RecordId(42));
        assert_eq!(record.device_id, "pump-17");
        assert_eq!(record.arrival_ms, 1_700_000_000_000);
        assert_eq!(&record.payload[..], b"envelope");
    }

    #[test]
    fn keys_sort_by_device_then_id() {
        let a1 = encode_key("a", RecordId(2));
        let a2 = encode_key("a", RecordId(256));
        let b1 = encode_key("b", RecordId(1));
        assert!(a1 < a2 && a2 < b1);
        assert!(a1.starts_with(&device_prefix("a")));
    }

    #[test]
    fn any_flipped_bit_is_detected() {
        let key = encode_key("pump-17", RecordId(7));
        let value = encode_value(&key, 5, b"some envelope bytes");
        for i in 0..value.len() * 8 {
            let mut damaged = value.clone();
            damaged[i / 8] ^= 1 << (i % 8);
            assert!(decode(&key, &damaged).is_err(), "value bit {i}");
        }
        for i in 0..key.len() * 8 {
            let mut damaged = key.clone();
            damaged[i / 8] ^= 1 << (i % 8);
            assert!(decode(&damaged, &value).is_err(), "key bit {i}");
        }
    }

    #[test]
    fn truncated_values_and_bad_keys_are_errors() {
        let key = encode_key("d", RecordId(1));
        let value = encode_value(&key, 5, b"x");
        for len in 0..value.len() {
            assert!(decode(&key, &value[..len]).is_err(), "{len} bytes");
        }
        let mut longer = value.clone();
        longer.push(0);
        assert!(decode(&key, &longer).is_err());
        assert_eq!(decode_key(&[]), Err(RecordError::Key));
        assert_eq!(decode_key(&[5, b'a']), Err(RecordError::Key));
        assert_eq!(
            decode_key(&[0, 0, 0, 0, 0, 0, 0, 0, 1]),
            Err(RecordError::Key)
        );
    }

    /// A value of version 1, as earlier releases wrote it.
    fn encode_v1(key: &[u8], arrival_ms: u64, payload: &[u8]) -> Vec<u8> {
        let arrival = arrival_ms.to_be_bytes();
        let mut value = vec![RECORD_VERSION_1];
        value.extend_from_slice(&checksum_v1(key, &arrival, payload).to_be_bytes());
        value.extend_from_slice(&arrival);
        value.extend_from_slice(payload);
        value
    }

    #[test]
    fn a_shared_payload_is_the_same_bytes_without_a_copy() {
        let key = encode_key("pump-17", RecordId(3));
        let value = encode_value(&key, 8, b"envelope bytes");
        let copied = decode(&key, &value).expect("valid");
        let owner = Bytes::from(value.clone());
        let shared = decode_shared(&key, owner.clone()).expect("valid");
        assert_eq!(shared, copied);
        let inside = owner.as_ptr_range();
        assert!(inside.contains(&shared.payload.as_ptr()));
        let mut damaged = value;
        damaged[30] ^= 1;
        assert!(decode_shared(&key, damaged).is_err());
    }

    #[test]
    fn version_1_records_are_still_read() {
        let key = encode_key("pump-17", RecordId(9));
        let value = encode_v1(&key, 77, b"old envelope");
        let record = decode(&key, &value).expect("valid");
        assert_eq!(
            (record.arrival_ms, &record.payload[..]),
            (77, &b"old envelope"[..])
        );
        let mut damaged = value;
        damaged[14] ^= 1;
        assert_eq!(decode(&key, &damaged), Err(RecordError::Checksum));
    }

    #[test]
    fn a_value_under_another_key_is_damaged() {
        let key = encode_key("pump-17", RecordId(9));
        let value = encode_value(&key, 1, b"envelope");
        let other = encode_key("pump-17", RecordId(10));
        assert_eq!(decode(&other, &value), Err(RecordError::Checksum));
    }

    #[test]
    fn frames_are_found_in_raw_bytes_with_their_length() {
        let key = encode_key("valve-3", RecordId(1234));
        let value = encode_value(&key, 99, b"payload bytes");
        assert_eq!(value.len(), FRAME_OVERHEAD + key.len() + 13);
        let mut raw = value.clone();
        raw.extend_from_slice(b"whatever sled wrote next");
        let frame = read_frame(&raw).expect("a frame");
        assert_eq!(frame.key, &key[..]);
        assert_eq!(
            (frame.arrival_ms, frame.payload),
            (99, &b"payload bytes"[..])
        );
        assert_eq!(frame.len, value.len());
        for len in 0..value.len() {
            assert_eq!(
                read_frame(&raw[..len]),
                Err(FrameError::Incomplete),
                "{len}"
            );
        }
        let mut damaged = raw;
        damaged[20] ^= 0x10;
        assert_eq!(
            read_frame(&damaged),
            Err(FrameError::Invalid(RecordError::Checksum))
        );
    }

    #[test]
    fn a_frame_reads_only_with_the_seed_it_was_written_with() {
        let key = encode_key("valve-3", RecordId(5));
        for (seed, other) in [(0, 1), (7, 8), (u32::MAX, 0), (1, u32::MAX)] {
            let mut raw = Vec::new();
            let len = encode_frame_into(&mut raw, seed, &key, 3, b"envelope");
            assert_eq!(read_frame_seeded(&raw, seed).map(|f| f.len), Ok(len));
            assert_eq!(
                read_frame_seeded(&raw, other),
                Err(FrameError::Invalid(RecordError::Checksum)),
                "written with {seed}, read with {other}"
            );
        }
        let value = encode_value(&key, 3, b"envelope");
        assert_eq!(read_frame(&value), read_frame_seeded(&value, 0));
    }
}
