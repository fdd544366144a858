//! What a simulated device says, in the plaintext formats of `docs/PAYLOADS.md`: sensor
//! readings as JSON (optionally `BGZ1`, raw DEFLATE), and camera images split into
//! `BGIMG1` chunks sized so that each sealed chunk fits the envelope limit.
//!
//! Values come from a small non-cryptographic generator seeded from the OS: they only
//! have to look plausible. The images are pseudo-JPEGs (`FF D8` ... `FF D9` around
//! random bytes), which is all the cloud checks.

use std::io;

use ring::digest::{SHA256, digest};
use serde::Serialize;
use thiserror::Error;

use super::PayloadKind;

/// Magic of a compressed reading.
pub use crate::payload::COMPRESSED_MAGIC;
/// Bytes of an image chunk header: magic, image id, index, count, total length, SHA-256.
pub use crate::payload::IMAGE_HEADER_LEN as IMAGE_CHUNK_HEADER;
/// Magic of an image chunk.
pub use crate::payload::IMAGE_MAGIC;

/// Why a payload could not be made.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// The envelope limit leaves no room for image data.
    #[error(
        "max_envelope {max_envelope} leaves no room for image chunk data (needs more than {overhead})"
    )]
    EnvelopeTooSmall {
        /// The configured limit.
        max_envelope: usize,
        /// Envelope overhead plus the chunk header.
        overhead: usize,
    },
    /// The image needs more chunks than a `u32` counts.
    #[error("image of {size} bytes needs too many chunks")]
    TooManyChunks {
        /// The image size.
        size: usize,
    },
    /// Serialising a reading failed.
    #[error("cannot encode a reading as JSON")]
    Json(#[source] serde_json::Error),
    /// Compressing a reading failed.
    #[error("cannot compress a reading")]
    Compress(#[source] io::Error),
}

/// A small, fast generator (xorshift64*). Not for secrets.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    /// Seeded from the OS; a fixed fallback if the OS refuses (values are only simulated).
    pub(crate) fn from_os() -> Self {
        let mut seed = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
        Self::new(u64::from_le_bytes(seed))
    }

    pub(crate) fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        // The top 53 bits fill an f64 mantissa exactly.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(bytes.get(..chunk.len()).unwrap_or_default());
        }
    }
}

/// A sensor type a device may carry: what it measures, its unit, and how its value moves.
struct SensorKind {
    name: &'static str,
    unit: &'static str,
    /// The value it drifts around.
    mean: f64,
    /// Largest change per reading.
    step: f64,
    min: f64,
    max: f64,
}

#[rustfmt::skip]
const SENSOR_KINDS: [SensorKind; 6] = [
    SensorKind { name: "temperature", unit: "C", mean: 21.0, step: 0.3, min: -20.0, max: 60.0 },
    SensorKind { name: "pressure", unit: "bar", mean: 3.2, step: 0.05, min: 0.0, max: 10.0 },
    SensorKind { name: "humidity", unit: "%", mean: 45.0, step: 1.0, min: 0.0, max: 100.0 },
    SensorKind { name: "flow", unit: "l/min", mean: 12.0, step: 0.4, min: 0.0, max: 50.0 },
    SensorKind { name: "vibration", unit: "mm/s", mean: 2.0, step: 0.2, min: 0.0, max: 20.0 },
    SensorKind { name: "voltage", unit: "V", mean: 230.0, step: 0.8, min: 200.0, max: 250.0 },
];

struct Sensor {
    kind: &'static SensorKind,
    value: f64,
}

/// A device's sensors (two or three kinds, chosen at random) and their drifting values.
pub(crate) struct Readings {
    device_id: String,
    sensors: Vec<Sensor>,
    rng: Rng,
}

#[derive(Serialize)]
struct ReadingJson<'a> {
    device_id: &'a str,
    ts_ms: u64,
    readings: Vec<ValueJson>,
}

#[derive(Serialize)]
struct ValueJson {
    #[serde(rename = "type")]
    kind: &'static str,
    value: f64,
    unit: &'static str,
}

impl Readings {
    pub(crate) fn new(device_id: &str, mut rng: Rng) -> Self {
        let first = rng.next_u64() as usize % SENSOR_KINDS.len();
        let count = 2 + rng.next_u64() as usize % 2;
        let sensors = (0..count)
            .filter_map(|i| SENSOR_KINDS.get((first + i) % SENSOR_KINDS.len()))
            .map(|kind| Sensor {
                kind,
                value: kind.mean,
            })
            .collect();
        Self {
            device_id: device_id.to_owned(),
            sensors,
            rng,
        }
    }

    /// The next reading as JSON, stamped `ts_ms`.
    ///
    /// # Errors
    /// [`PayloadError::Json`] (not expected: every field is a plain value).
    pub(crate) fn next_json(&mut self, ts_ms: u64) -> Result<Vec<u8>, PayloadError> {
        let readings = self
            .sensors
            .iter_mut()
            .map(|sensor| {
                let kind = sensor.kind;
                // A random walk pulled back towards the mean, kept in the sensor's range.
                let pull = (kind.mean - sensor.value) * 0.05;
                let jitter = kind.step * (self.rng.unit() * 2.0 - 1.0);
                sensor.value = (sensor.value + pull + jitter).clamp(kind.min, kind.max);
                ValueJson {
                    kind: kind.name,
                    value: (sensor.value * 100.0).round() / 100.0,
                    unit: kind.unit,
                }
            })
            .collect();
        let json = ReadingJson {
            device_id: &self.device_id,
            ts_ms,
            readings,
        };
        serde_json::to_vec(&json).map_err(PayloadError::Json)
    }
}

/// One new message, in plaintext.
pub(crate) enum Message {
    /// A reading: JSON, or `BGZ1` when compression is on.
    Reading(Vec<u8>),
    /// A whole camera image, to be cut into chunks.
    Image(Vec<u8>),
}

/// Decides what each new message is and makes it.
pub(crate) struct Producer {
    /// Image size and period, if the device sends images.
    images: Option<(usize, u32)>,
    compress: bool,
    readings: Readings,
    rng: Rng,
    /// Messages until the next image (1: the next one); the first image comes after
    /// `every - 1` readings.
    until_image: u32,
}

impl Producer {
    pub(crate) fn new(device_id: &str, kind: PayloadKind, compress: bool) -> Self {
        let mut rng = Rng::from_os();
        let readings = Readings::new(device_id, Rng::new(rng.next_u64()));
        Self {
            images: kind.images(),
            compress,
            readings,
            rng,
            until_image: kind.images().map_or(0, |(_, every)| every.max(1)),
        }
    }

    /// The next message; readings are stamped `ts_ms`.
    ///
    /// # Errors
    /// As [`Readings::next_json`] and [`compress`].
    pub(crate) fn next(&mut self, ts_ms: u64) -> Result<Message, PayloadError> {
        self.until_image = self.until_image.saturating_sub(1);
        match self.images {
            Some((size, every)) if self.until_image == 0 => {
                self.until_image = every.max(1);
                Ok(Message::Image(fake_jpeg(size, &mut self.rng)))
            }
            _ => {
                let json = self.readings.next_json(ts_ms)?;
                let plaintext = if self.compress {
                    compress(&json)?
                } else {
                    json
                };
                Ok(Message::Reading(plaintext))
            }
        }
    }
}

/// `BGZ1` followed by `json` compressed with raw DEFLATE (RFC 1951).
///
/// # Errors
/// [`PayloadError::Compress`] (not expected: it writes to memory).
pub(crate) fn compress(json: &[u8]) -> Result<Vec<u8>, PayloadError> {
    crate::payload::compress(json).map_err(PayloadError::Compress)
}

/// A pseudo-JPEG of `size` bytes (at least 4): SOI, a JFIF APP0 segment, random bytes, EOI.
pub(crate) fn fake_jpeg(size: usize, rng: &mut Rng) -> Vec<u8> {
    const APP0: [u8; 20] = [
        0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0x00, 0x01, 0x01, 0x00, 0x00,
        0x01, 0x00, 0x01, 0x00, 0x00,
    ];
    let size = size.max(4);
    let mut image = vec![0u8; size];
    rng.fill(&mut image);
    let head = APP0.len().min(size - 2);
    if let (Some(start), Some(src)) = (image.get_mut(..head), APP0.get(..head)) {
        start.copy_from_slice(src);
    }
    if let Some(end) = image.get_mut(size - 2..) {
        end.copy_from_slice(&[0xFF, 0xD9]);
    }
    image
}

/// A camera image cut into `BGIMG1` chunk plaintexts.
pub(crate) struct ImageChunks {
    image_id: u64,
    image: Vec<u8>,
    sha256: [u8; 32],
    data_per_chunk: usize,
    count: u32,
}

impl ImageChunks {
    /// Cuts `image` so that each chunk, sealed for a device id of `device_id_len` bytes,
    /// is at most `max_envelope` bytes.
    ///
    /// # Errors
    /// [`PayloadError::EnvelopeTooSmall`] or [`PayloadError::TooManyChunks`].
    pub(crate) fn new(
        image_id: u64,
        image: Vec<u8>,
        max_envelope: usize,
        device_id_len: usize,
    ) -> Result<Self, PayloadError> {
        let overhead = e3::envelope_len(device_id_len, IMAGE_CHUNK_HEADER);
        let data_per_chunk = max_envelope.saturating_sub(overhead);
        if data_per_chunk == 0 {
            return Err(PayloadError::EnvelopeTooSmall {
                max_envelope,
                overhead,
            });
        }
        let count = u32::try_from(image.len().div_ceil(data_per_chunk).max(1))
            .map_err(|_| PayloadError::TooManyChunks { size: image.len() })?;
        let sha256 = digest(&SHA256, &image)
            .as_ref()
            .try_into()
            .expect("SHA-256 digests are 32 bytes");
        Ok(Self {
            image_id,
            image,
            sha256,
            data_per_chunk,
            count,
        })
    }

    /// How many chunks the image has.
    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    /// Chunk `index` (0..count) as plaintext; an index past the end yields a chunk with
    /// no data.
    pub(crate) fn chunk(&self, index: u32) -> Vec<u8> {
        let start = (index as usize).saturating_mul(self.data_per_chunk);
        let end = start
            .saturating_add(self.data_per_chunk)
            .min(self.image.len());
        crate::payload::ImageChunk {
            image_id: self.image_id,
            index,
            count: self.count,
            total_len: self.image.len() as u64,
            sha256: self.sha256,
            data: self.image.get(start..end).unwrap_or_default(),
        }
        .to_bytes()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    #[test]
    fn readings_are_json_in_the_documented_shape() {
        let mut readings = Readings::new("pump-17", Rng::new(7));
        for _ in 0..100 {
            let json: serde_json::Value =
                serde_json::from_slice(&readings.next_json(1_795_000_000_000).expect("json"))
                    .expect("valid JSON");
            assert_eq!(json["device_id"], "pump-17");
            assert_eq!(json["ts_ms"], 1_795_000_000_000u64);
            let values = json["readings"].as_array().expect("array");
            assert!((2..=3).contains(&values.len()));
            for value in values {
                let kind = SENSOR_KINDS
                    .iter()
                    .find(|k| value["type"] == k.name)
                    .expect("known type");
                assert_eq!(value["unit"], kind.unit);
                let v = value["value"].as_f64().expect("number");
                assert!((kind.min..=kind.max).contains(&v));
            }
        }
    }

    #[test]
    fn compressed_readings_inflate_to_the_json() {
        let json = Readings::new("d", Rng::new(1)).next_json(5).expect("json");
        let packed = compress(&json).expect("compressed");
        assert_eq!(packed.get(..4), Some(&COMPRESSED_MAGIC[..]));
        let mut inflated = Vec::new();
        flate2::read::DeflateDecoder::new(&packed[4..])
            .read_to_end(&mut inflated)
            .expect("raw DEFLATE");
        assert_eq!(inflated, json);
    }

    #[test]
    fn chunks_fit_the_envelope_and_reassemble() {
        let image = fake_jpeg(100_000, &mut Rng::new(3));
        assert_eq!(image[..2], [0xFF, 0xD8]);
        assert_eq!(image[image.len() - 2..], [0xFF, 0xD9]);
        let chunks = ImageChunks::new(42, image.clone(), 4096, 7).expect("chunks");
        let mut joined = Vec::new();
        for index in 0..chunks.count() {
            let chunk = chunks.chunk(index);
            assert!(e3::envelope_len(7, chunk.len()) <= 4096);
            assert_eq!(chunk[..6], *IMAGE_MAGIC);
            assert_eq!(chunk[6..14], 42u64.to_be_bytes());
            assert_eq!(chunk[14..18], index.to_be_bytes());
            assert_eq!(chunk[18..22], chunks.count().to_be_bytes());
            assert_eq!(chunk[22..30], 100_000u64.to_be_bytes());
            assert_eq!(chunk[30..62], *digest(&SHA256, &image).as_ref());
            joined.extend_from_slice(&chunk[62..]);
        }
        assert_eq!(joined, image);
        assert!(ImageChunks::new(1, image, 100, 7).is_err());
    }
}
