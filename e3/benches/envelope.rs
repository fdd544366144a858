//! Seal and open throughput of the E3 envelope beside the raw AEAD on the same buffers.
//!
//! `raw` encrypts (or decrypts) the payload in place with no associated data: the AEAD
//! alone. `raw+aad` adds a header-sized associated data (the AEAD work the format itself
//! requires). `envelope` does everything `seal_into` / `open_in_place` do: write and
//! parse the header, copy the plaintext, authenticate the header. After the run a table
//! prints envelope throughput as a share of both (goal: >= 90% of raw from 256 B up).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use aead::{AeadInPlace, KeyInit};
use aes_gcm::Aes256Gcm;
use chacha20poly1305::ChaCha20Poly1305;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use e3::{DeviceId, DeviceKey, Kind, Suite, envelope_len};

const SIZES: [usize; 4] = [64, 256, 1024, 16 * 1024];
const SUITES: [Suite; 2] = [Suite::Aes256Gcm, Suite::ChaCha20Poly1305];
const KEY: [u8; 32] = [0x42; 32];
const NONCE: [u8; 12] = [0x24; 12];
/// As long as the header of an envelope for "pump-17": `28 + 7` bytes.
const HEADER: [u8; 35] = [0x11; 35];

#[allow(clippy::large_enum_variant, reason = "two values per run")]
enum Raw {
    Aes(Aes256Gcm),
    ChaCha(ChaCha20Poly1305),
}

impl Raw {
    fn new(suite: Suite) -> Self {
        match suite {
            Suite::Aes256Gcm => Self::Aes(Aes256Gcm::new(&KEY.into())),
            _ => Self::ChaCha(ChaCha20Poly1305::new(&KEY.into())),
        }
    }

    fn seal(&self, aad: &[u8], buf: &mut [u8]) -> [u8; 16] {
        let tag = match self {
            Self::Aes(c) => c.encrypt_in_place_detached(&NONCE.into(), aad, buf),
            Self::ChaCha(c) => c.encrypt_in_place_detached(&NONCE.into(), aad, buf),
        };
        tag.expect("payload within AEAD limits").into()
    }

    fn open(&self, aad: &[u8], buf: &mut [u8], tag: &[u8; 16]) {
        let ok = match self {
            Self::Aes(c) => c.decrypt_in_place_detached(&NONCE.into(), aad, buf, tag.into()),
            Self::ChaCha(c) => c.decrypt_in_place_detached(&NONCE.into(), aad, buf, tag.into()),
        };
        ok.expect("tag verifies");
    }
}

fn device_key(suite: Suite) -> DeviceKey {
    DeviceKey::new(DeviceId::new("pump-17").expect("valid id"), 1, suite, KEY)
}

fn bench_seal(c: &mut Criterion) {
    for suite in SUITES {
        let mut group = c.benchmark_group(format!("seal/{suite}"));
        let raw = Raw::new(suite);
        let key = device_key(suite);
        for size in SIZES {
            group.throughput(Throughput::Bytes(size as u64));
            let plaintext = vec![0xA5u8; size];
            let mut buf = plaintext.clone();
            group.bench_function(BenchmarkId::new("raw", size), |b| {
                b.iter(|| black_box(raw.seal(b"", black_box(&mut buf))))
            });
            group.bench_function(BenchmarkId::new("raw+aad", size), |b| {
                b.iter(|| black_box(raw.seal(&HEADER, black_box(&mut buf))))
            });
            let mut out = vec![0u8; envelope_len(7, size)];
            group.bench_function(BenchmarkId::new("envelope", size), |b| {
                b.iter(|| {
                    key.seal_into(Kind::Uplink, 1, &NONCE, black_box(&plaintext), &mut out)
                        .expect("seals")
                })
            });
        }
        group.finish();
    }
}

fn bench_open(c: &mut Criterion) {
    for suite in SUITES {
        let mut group = c.benchmark_group(format!("open/{suite}"));
        let raw = Raw::new(suite);
        let key = device_key(suite);
        for size in SIZES {
            group.throughput(Throughput::Bytes(size as u64));
            let mut sealed = vec![0xA5u8; size];
            let tag = raw.seal(b"", &mut sealed);
            group.bench_function(BenchmarkId::new("raw", size), |b| {
                b.iter_batched_ref(
                    || sealed.clone(),
                    |buf| raw.open(b"", buf, &tag),
                    BatchSize::SmallInput,
                )
            });
            let mut sealed_aad = vec![0xA5u8; size];
            let tag_aad = raw.seal(&HEADER, &mut sealed_aad);
            group.bench_function(BenchmarkId::new("raw+aad", size), |b| {
                b.iter_batched_ref(
                    || sealed_aad.clone(),
                    |buf| raw.open(&HEADER, buf, &tag_aad),
                    BatchSize::SmallInput,
                )
            });
            let envelope = key
                .seal(Kind::Uplink, 1, &vec![0xA5u8; size])
                .expect("seals");
            group.bench_function(BenchmarkId::new("envelope", size), |b| {
                b.iter_batched_ref(
                    || envelope.clone(),
                    |buf| {
                        key.open_in_place(buf).expect("opens");
                    },
                    BatchSize::SmallInput,
                )
            });
        }
        group.finish();
    }
}

/// Criterion's output directory: `<target>/criterion`, found from this executable.
fn criterion_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return Some(home.into());
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.join("criterion"))
}

fn mean_ns(dir: &std::path::Path, group: &str, id: &str, size: usize) -> Option<f64> {
    let path = dir
        .join(group.replace('/', "_"))
        .join(id)
        .join(size.to_string())
        .join("new/estimates.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

fn print_ratio_table() {
    let Some(dir) = criterion_dir() else { return };
    println!(
        "\nop    suite              size  raw MB/s  raw+aad MB/s  envelope MB/s  env/raw  env/raw+aad"
    );
    for op in ["seal", "open"] {
        for suite in SUITES {
            let group = format!("{op}/{suite}");
            for size in SIZES {
                let (Some(raw), Some(aad), Some(env)) = (
                    mean_ns(&dir, &group, "raw", size),
                    mean_ns(&dir, &group, "raw+aad", size),
                    mean_ns(&dir, &group, "envelope", size),
                ) else {
                    continue;
                };
                let mbps = |ns: f64| size as f64 / ns * 1e3;
                println!(
                    "{op:<5} {:<18} {size:>5} {:>9.0} {:>13.0} {:>14.0} {:>7.1}% {:>11.1}%",
                    suite.as_str(),
                    mbps(raw),
                    mbps(aad),
                    mbps(env),
                    raw / env * 100.0,
                    aad / env * 100.0
                );
            }
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench_seal(&mut c);
    bench_open(&mut c);
    c.final_summary();
    print_ratio_table();
}
