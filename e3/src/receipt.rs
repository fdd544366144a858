//! Receipt plaintexts: 1..=256 entries of `key_id` (u32) and `seq` (u64), big-endian.
//!
//! A receipt names uplinks the cloud has durably accepted, authenticated end to end by
//! the device's own key, so a device can drop its copy even through a gateway that
//! might lie.

use crate::error::ReceiptError;
#[cfg(feature = "alloc")]
use alloc::vec::Vec;

/// Bytes per receipt entry.
pub const ENTRY_LEN: usize = 12;
/// Most entries one receipt may carry.
pub const MAX_ENTRIES: usize = 256;

/// One accepted uplink, named by the key that sealed it and its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReceiptEntry {
    /// Key that sealed the uplink.
    pub key_id: u32,
    /// The uplink's sequence number.
    pub seq: u64,
}

impl ReceiptEntry {
    fn from_bytes(bytes: &[u8; ENTRY_LEN]) -> Self {
        let [k0, k1, k2, k3, s @ ..] = *bytes;
        Self {
            key_id: u32::from_be_bytes([k0, k1, k2, k3]),
            seq: u64::from_be_bytes(s),
        }
    }

    fn to_bytes(self) -> [u8; ENTRY_LEN] {
        let mut out = [0u8; ENTRY_LEN];
        let (key_id, seq) = out.split_at_mut(4);
        key_id.copy_from_slice(&self.key_id.to_be_bytes());
        seq.copy_from_slice(&self.seq.to_be_bytes());
        out
    }
}

/// The entries of a validated receipt, in order.
#[derive(Debug, Clone)]
pub struct ReceiptEntries<'a> {
    chunks: core::slice::ChunksExact<'a, u8>,
}

impl Iterator for ReceiptEntries<'_> {
    type Item = ReceiptEntry;

    fn next(&mut self) -> Option<ReceiptEntry> {
        // `chunks_exact` yields only ENTRY_LEN-byte chunks, so the conversion holds.
        let chunk = self.chunks.next()?;
        <&[u8; ENTRY_LEN]>::try_from(chunk)
            .ok()
            .map(ReceiptEntry::from_bytes)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.chunks.size_hint()
    }
}

impl ExactSizeIterator for ReceiptEntries<'_> {}

/// Validates a receipt plaintext and returns its entries.
///
/// # Errors
/// [`ReceiptError::Length`], [`ReceiptError::EntryCount`] or [`ReceiptError::ZeroSeq`].
pub fn decode_receipt(plaintext: &[u8]) -> Result<ReceiptEntries<'_>, ReceiptError> {
    if !plaintext.len().is_multiple_of(ENTRY_LEN) {
        return Err(ReceiptError::Length(plaintext.len()));
    }
    let count = plaintext.len() / ENTRY_LEN;
    if !(1..=MAX_ENTRIES).contains(&count) {
        return Err(ReceiptError::EntryCount(count));
    }
    let entries = ReceiptEntries {
        chunks: plaintext.chunks_exact(ENTRY_LEN),
    };
    if let Some(index) = entries.clone().position(|entry| entry.seq == 0) {
        return Err(ReceiptError::ZeroSeq(index));
    }
    Ok(entries)
}

/// Encodes `entries` into `out`; returns the number of bytes written.
///
/// # Errors
/// [`ReceiptError::EntryCount`], [`ReceiptError::ZeroSeq`] or
/// [`ReceiptError::BufferTooSmall`].
pub fn encode_receipt(entries: &[ReceiptEntry], out: &mut [u8]) -> Result<usize, ReceiptError> {
    if !(1..=MAX_ENTRIES).contains(&entries.len()) {
        return Err(ReceiptError::EntryCount(entries.len()));
    }
    if let Some(index) = entries.iter().position(|entry| entry.seq == 0) {
        return Err(ReceiptError::ZeroSeq(index));
    }
    let needed = entries.len() * ENTRY_LEN;
    let out = out
        .get_mut(..needed)
        .ok_or(ReceiptError::BufferTooSmall { needed })?;
    for (chunk, entry) in out.chunks_exact_mut(ENTRY_LEN).zip(entries) {
        chunk.copy_from_slice(&entry.to_bytes());
    }
    Ok(needed)
}

/// Encodes `entries` into a new buffer.
///
/// # Errors
/// [`ReceiptError::EntryCount`] or [`ReceiptError::ZeroSeq`].
#[cfg(feature = "alloc")]
pub fn encode_receipt_vec(entries: &[ReceiptEntry]) -> Result<Vec<u8>, ReceiptError> {
    let mut out = alloc::vec![0u8; entries.len().min(MAX_ENTRIES) * ENTRY_LEN];
    let len = encode_receipt(entries, &mut out)?;
    out.truncate(len);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let entries = [
            ReceiptEntry { key_id: 1, seq: 1 },
            ReceiptEntry {
                key_id: u32::MAX,
                seq: u64::MAX,
            },
        ];
        let bytes = encode_receipt_vec(&entries).expect("valid");
        assert_eq!(bytes.len(), 24);
        let back: Vec<_> = decode_receipt(&bytes).expect("valid").collect();
        assert_eq!(back, entries);
    }

    #[test]
    fn rejects_zero_seq_and_bad_counts() {
        let zero = [ReceiptEntry { key_id: 1, seq: 0 }];
        assert_eq!(encode_receipt_vec(&zero), Err(ReceiptError::ZeroSeq(0)));
        assert_eq!(encode_receipt_vec(&[]), Err(ReceiptError::EntryCount(0)));
        let mut one = [0u8; ENTRY_LEN];
        one[11] = 0;
        assert_eq!(decode_receipt(&one).err(), Some(ReceiptError::ZeroSeq(0)));
        let too_many = vec![ReceiptEntry { key_id: 1, seq: 1 }; MAX_ENTRIES + 1];
        assert_eq!(
            encode_receipt_vec(&too_many),
            Err(ReceiptError::EntryCount(MAX_ENTRIES + 1))
        );
    }
}
