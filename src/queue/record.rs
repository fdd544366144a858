//! The on-disk record format, version 1.
//!
//! Key: `[id_len u8][device id][record id u64 BE]`, so records sort by device and, within
//! a device, by arrival. Value: `[version u8][crc32 u32 BE][arrival ms u64 BE][payload]`,
//! where the CRC-32 covers the key, the arrival time and the payload. A record whose CRC
//! does not match, or whose key or value does not decode, is damaged: recovery moves it
//! to quarantine instead of forwarding it or stopping.

use bytes::Bytes;
use thiserror::Error;

/// The record format this code writes.
pub const RECORD_VERSION: u8 = 1;
/// Bytes of a value besides the payload.
pub const VALUE_OVERHEAD: usize = 1 + 4 + 8;

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

fn checksum(key: &[u8], arrival: &[u8; 8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(key);
    hasher.update(arrival);
    hasher.update(payload);
    hasher.finalize()
}

/// Encodes a record's value for `key`.
pub fn encode_value(key: &[u8], arrival_ms: u64, payload: &[u8]) -> Vec<u8> {
    let arrival = arrival_ms.to_be_bytes();
    let crc = checksum(key, &arrival, payload);
    let mut value = Vec::with_capacity(VALUE_OVERHEAD + payload.len());
    value.push(RECORD_VERSION);
    value.extend_from_slice(&crc.to_be_bytes());
    value.extend_from_slice(&arrival);
    value.extend_from_slice(payload);
    value
}

/// Decodes and verifies a stored record.
///
/// # Errors
/// A [`RecordError`] for any damage.
pub fn decode(key: &[u8], value: &[u8]) -> Result<Record, RecordError> {
    let (device_id, id) = decode_key(key)?;
    let (&version, rest) = value.split_first().ok_or(RecordError::Truncated)?;
    if version != RECORD_VERSION {
        return Err(RecordError::Version(version));
    }
    let (crc, rest) = rest.split_at_checked(4).ok_or(RecordError::Truncated)?;
    let (arrival, payload) = rest.split_at_checked(8).ok_or(RecordError::Truncated)?;
    let crc = u32::from_be_bytes(crc.try_into().map_err(|_| RecordError::Truncated)?);
    let arrival: [u8; 8] = arrival.try_into().map_err(|_| RecordError::Truncated)?;
    if checksum(key, &arrival, payload) != crc {
        return Err(RecordError::Checksum);
    }
    Ok(Record {
        id,
        device_id: device_id.to_owned(),
        arrival_ms: u64::from_be_bytes(arrival),
        payload: Bytes::copy_from_slice(payload),
    })
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
        for len in 0..VALUE_OVERHEAD {
            assert!(decode(&key, &value[..len]).is_err());
        }
        assert_eq!(decode_key(&[]), Err(RecordError::Key));
        assert_eq!(decode_key(&[5, b'a']), Err(RecordError::Key));
        assert_eq!(
            decode_key(&[0, 0, 0, 0, 0, 0, 0, 0, 1]),
            Err(RecordError::Key)
        );
    }
}
