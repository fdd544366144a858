//! What devices put inside their envelopes (docs/PAYLOADS.md): JSON readings,
//! compressed readings (`BGZ1`), image chunks (`BGIMG1`), or opaque bytes. Devices
//! encode with this module and the cloud decodes with it, so the format has one
//! definition.

use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::DeflateDecoder;
use flate2::write::DeflateEncoder;
use thiserror::Error;

/// Magic of a compressed reading.
pub const COMPRESSED_MAGIC: &[u8; 4] = b"BGZ1";
/// Magic of an image chunk.
pub const IMAGE_MAGIC: &[u8; 6] = b"BGIMG1";
/// Bytes of an image chunk's header.
pub const IMAGE_HEADER_LEN: usize = 62;
/// Largest inflated reading accepted (a bound against decompression bombs).
const MAX_INFLATED: usize = 1 << 20;

/// `BGZ1` followed by `json` compressed with raw DEFLATE (RFC 1951).
///
/// # Errors
/// An I/O error from the encoder (not expected: it writes to memory).
pub fn compress(json: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = DeflateEncoder::new(COMPRESSED_MAGIC.to_vec(), Compression::default());
    encoder.write_all(json)?;
    encoder.finish()
}

/// One chunk of a camera image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageChunk<'a> {
    /// Unique per device.
    pub image_id: u64,
    /// From 0.
    pub index: u32,
    /// Chunks in the image.
    pub count: u32,
    /// Length of the whole image.
    pub total_len: u64,
    /// SHA-256 of the whole image.
    pub sha256: [u8; 32],
    /// This chunk's bytes.
    pub data: &'a [u8],
}

impl ImageChunk<'_> {
    /// The chunk as a plaintext: header, then data.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(IMAGE_HEADER_LEN + self.data.len());
        out.extend_from_slice(IMAGE_MAGIC);
        out.extend_from_slice(&self.image_id.to_be_bytes());
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(&self.total_len.to_be_bytes());
        out.extend_from_slice(&self.sha256);
        out.extend_from_slice(self.data);
        out
    }
}

/// What a plaintext is.
#[derive(Debug, PartialEq)]
pub enum Content<'a> {
    /// A JSON reading (inflated if it was compressed).
    Json(serde_json::Value),
    /// A chunk of an image.
    Image(ImageChunk<'a>),
    /// Anything else.
    Opaque,
}

/// A plaintext that claims a known format but breaks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ContentError {
    /// `BGZ1` data that does not inflate (or inflates too large).
    #[error("compressed reading does not inflate")]
    Inflate,
    /// `BGIMG1` with a short or inconsistent header.
    #[error("image chunk header is malformed")]
    ImageHeader,
}

/// Classifies and decodes a plaintext.
///
/// # Errors
/// [`ContentError`] for a known format that is broken.
pub fn decode(plaintext: &[u8]) -> Result<Content<'_>, ContentError> {
    if let Some(rest) = plaintext.strip_prefix(COMPRESSED_MAGIC) {
        let mut inflated = Vec::new();
        DeflateDecoder::new(rest)
            .take(MAX_INFLATED as u64 + 1)
            .read_to_end(&mut inflated)
            .map_err(|_| ContentError::Inflate)?;
        if inflated.len() > MAX_INFLATED {
            return Err(ContentError::Inflate);
        }
        return Ok(serde_json::from_slice(&inflated).map_or(Content::Opaque, Content::Json));
    }
    if plaintext.starts_with(IMAGE_MAGIC) {
        return image_chunk(plaintext).map(Content::Image);
    }
    if plaintext.first() == Some(&b'{')
        && let Ok(value) = serde_json::from_slice(plaintext)
    {
        return Ok(Content::Json(value));
    }
    Ok(Content::Opaque)
}

fn image_chunk(bytes: &[u8]) -> Result<ImageChunk<'_>, ContentError> {
    let (header, data) = bytes
        .split_at_checked(IMAGE_HEADER_LEN)
        .ok_or(ContentError::ImageHeader)?;
    let field = |range: std::ops::Range<usize>| header.get(range).ok_or(ContentError::ImageHeader);
    let u64_at = |at: usize| -> Result<u64, ContentError> {
        Ok(u64::from_be_bytes(
            field(at..at + 8)?
                .try_into()
                .map_err(|_| ContentError::ImageHeader)?,
        ))
    };
    let u32_at = |at: usize| -> Result<u32, ContentError> {
        Ok(u32::from_be_bytes(
            field(at..at + 4)?
                .try_into()
                .map_err(|_| ContentError::ImageHeader)?,
        ))
    };
    let chunk = ImageChunk {
        image_id: u64_at(6)?,
        index: u32_at(14)?,
        count: u32_at(18)?,
        total_len: u64_at(22)?,
        sha256: field(30..62)?
            .try_into()
            .map_err(|_| ContentError::ImageHeader)?,
        data,
    };
    if chunk.count == 0 || chunk.index >= chunk.count || data.len() as u64 > chunk.total_len {
        return Err(ContentError::ImageHeader);
    }
    Ok(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_each_format() {
        assert_eq!(
            decode(br#"{"a":1}"#),
            Ok(Content::Json(serde_json::json!({"a": 1})))
        );
        let compressed = compress(br#"{"b":2}"#).expect("compresses");
        assert_eq!(
            decode(&compressed),
            Ok(Content::Json(serde_json::json!({"b": 2})))
        );
        let chunk = ImageChunk {
            image_id: 7,
            index: 1,
            count: 2,
            total_len: 10,
            sha256: [9; 32],
            data: b"hello",
        }
        .to_bytes();
        let Ok(Content::Image(image)) = decode(&chunk) else {
            panic!("image chunk expected");
        };
        assert_eq!((image.image_id, image.index, image.count), (7, 1, 2));
        assert_eq!(image.data, b"hello");
        assert_eq!(decode(b"\x00\x01"), Ok(Content::Opaque));
        assert_eq!(decode(b"BGZ1garbage"), Err(ContentError::Inflate));
        assert_eq!(decode(&chunk[..40]), Err(ContentError::ImageHeader));
    }
}
