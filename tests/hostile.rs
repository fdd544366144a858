//! Hostile input against the real `blindgate gateway` binary, over real TLS 1.3 with
//! real device certificates, with Mosquitto as the cloud broker and a cloud subscriber
//! on `#` that sees everything the gateway forwards.
//!
//! What it proves, each test with a well-behaved device publishing at the same time
//! (its PUBACK latency printed, every acknowledged envelope checked at the cloud):
//! - random and mutated MQTT streams (random bytes, valid CONNECT then garbage,
//!   truncated packets, huge remaining lengths, wrong packet types, bytes flipped in a
//!   valid session, publishing on another device's topic) never crash the gateway,
//!   every such connection is closed by the gateway, refusals are counted in
//!   `blindgate_ingress_rejected_total`, and nothing bogus reaches the cloud;
//! - mutated E3 envelopes (valid MQTT, damaged headers) are refused exactly when the
//!   header rules say so, counted one for one, and never forwarded; the ones still
//!   valid are forwarded byte for byte;
//! - floods: 500 connections at once against `max_connections = 32` (silent TCP,
//!   non-TLS garbage, TLS without CONNECT) are each refused or closed and counted once;
//!   a device sending oversize messages as fast as it can and a device announcing
//!   256 MiB packets keep the gateway's memory bounded (peak RSS printed);
//! - impersonation end to end: publishing on another device's topic, an envelope
//!   naming another device, TLS without a certificate or with one from another CA are
//!   refused and counted, and the cloud receives nothing but the legitimate markers.
//!
//! Seeded random generation on the stable toolchain (cargo-fuzz needs nightly).
//! `BLINDGATE_FUZZ_CASES=N` runs N cases per fuzz target (and a longer, larger flood)
//! for a soak run; `BLINDGATE_FUZZ_SEED` replays a run (the seed is printed).

mod common;
mod hostile_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use hostile_support::*;

/// The well-behaved device of every test.
const GOOD: &str = "good-1";
/// Devices the MQTT fuzzer connects as (one per worker, so they never take each
/// other's session over).
const FUZZ_WORKERS: usize = 12;
/// The gateway's id in the dev PKI and configs.
const GATEWAY: &str = "gw-1";

/// The tests share two cores: one at a time, so floods do not disturb the others'
/// latency figures.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------
// Target 1: hostile MQTT streams over TLS with valid device certificates

/// One generated connection.
struct Case {
    kind: &'static str,
    bytes: Vec<u8>,
    /// Certainly refused and counted (a rejection metric must rise for it); other
    /// kinds may end with a keep-alive timeout or a clean DISCONNECT.
    must_reject: bool,
}

const MQTT_KINDS: [&str; 10] = [
    "random bytes",
    "CONNECT then garbage",
    "truncated CONNECT",
    "CONNECT then truncated PUBLISH",
    "huge remaining length",
    "bad remaining length",
    "wrong packet type",
    "packet before CONNECT",
    "flipped bytes in a session",
    "publish on another device's topic",
];

fn mqtt_case(rng: &mut Rng, device: &str, envelope: &[u8], forged: &[u8]) -> Case {
    let kind = MQTT_KINDS[rng.below(MQTT_KINDS.len())];
    // Keep-alive 1 s: the gateway closes an idle session after 1.5 s.
    let connect = connect_packet(device, 1);
    let own_topic = format!("e3/{device}/up");
    let valid_publish = publish_packet(&own_topic, 1, 7, envelope);
    let mut bytes = Vec::new();
    let must_reject = match kind {
        "random bytes" => {
            let n = rng.between(1, 3000);
            bytes = rng.bytes(n);
            if bytes[0] == 0x10 {
                bytes[0] = 0x11; // not a CONNECT: the first packet must be one
            }
            true
        }
        "CONNECT then garbage" => {
            bytes.extend_from_slice(&connect);
            let n = rng.between(1, 3000);
            bytes.extend(rng.bytes(n));
            false
        }
        "truncated CONNECT" => {
            let cut = rng.between(1, connect.len() - 1);
            bytes.extend_from_slice(&connect[..cut]);
            true
        }
        "CONNECT then truncated PUBLISH" => {
            bytes.extend_from_slice(&connect);
            let cut = rng.between(1, valid_publish.len() - 1);
            bytes.extend_from_slice(&valid_publish[..cut]);
            false
        }
        "huge remaining length" => {
            let with_connect = rng.percent(70);
            if with_connect {
                bytes.extend_from_slice(&connect);
            }
            // 0x30..0xf0: any packet type, remaining length up to 268435455.
            bytes.push(((rng.between(1, 14) as u8) << 4) | 2);
            let len = rng.between(1 << 21, 268_435_455);
            remaining_length(len, &mut bytes);
            let n = rng.between(0, 4096);
            bytes.extend(rng.bytes(n));
            true
        }
        "bad remaining length" => {
            bytes.extend_from_slice(&connect);
            bytes.push(0x32);
            bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x7f]);
            let n = rng.between(0, 64);
            bytes.extend(rng.bytes(n));
            true
        }
        "wrong packet type" => {
            bytes.extend_from_slice(&connect);
            let pkid = (rng.next() as u16).max(1).to_be_bytes();
            let choices: [Vec<u8>; 9] = [
                packet(0x50, &pkid),                        // PUBREC
                packet(0x62, &pkid),                        // PUBREL
                packet(0x70, &pkid),                        // PUBCOMP
                packet(0x20, &[0, 0]),                      // CONNACK
                packet(0x90, &[pkid[0], pkid[1], 0]),       // SUBACK
                packet(0xb0, &pkid),                        // UNSUBACK
                packet(0xd0, &[]),                          // PINGRESP
                connect.clone(),                            // a second CONNECT
                publish_packet(&own_topic, 2, 9, envelope), // QoS 2
            ];
            bytes.extend_from_slice(&choices[rng.below(choices.len())]);
            true
        }
        "packet before CONNECT" => {
            let choices = [
                valid_publish.clone(),
                subscribe_packet(1, &format!("e3/{device}/down")),
                packet(0xc0, &[]), // PINGREQ
                packet(0xe0, &[]), // DISCONNECT
            ];
            bytes.extend_from_slice(&choices[rng.below(choices.len())]);
            true
        }
        "flipped bytes in a session" => {
            bytes.extend_from_slice(&connect);
            let session_start = bytes.len();
            bytes.extend(subscribe_packet(3, &format!("e3/{device}/down")));
            bytes.extend_from_slice(&valid_publish);
            bytes.extend(packet(0xc0, &[]));
            bytes.extend(publish_packet(&own_topic, 0, 0, envelope));
            for _ in 0..rng.between(1, 4) {
                let at = rng.between(session_start, bytes.len() - 1);
                bytes[at] ^= 1 << rng.below(8);
            }
            false
        }
        _ => {
            // Another device's topic, with an envelope sealed for that device.
            bytes.extend_from_slice(&connect);
            bytes.extend(publish_packet(&format!("e3/{GOOD}/up"), 1, 5, forged));
            true
        }
    };
    Case {
        kind,
        bytes,
        must_reject,
    }
}

/// How one hostile connection ended.
struct Outcome {
    kind: &'static str,
    /// From the last byte written to the gateway closing the connection.
    closed_after: Option<Duration>,
}

async fn run_case(port: u16, tls: Arc<rustls::ClientConfig>, case: &Case) -> Outcome {
    let mut stream = match tls_connect(port, tls).await {
        Ok(stream) => stream,
        Err(e) => panic!("{}: a valid device could not complete TLS: {e}", case.kind),
    };
    let sent = match send(&mut stream, &case.bytes).await {
        Ok(()) => Instant::now(),
        // The gateway closed while we were still writing: closed.
        Err(_) => {
            return Outcome {
                kind: case.kind,
                closed_after: Some(Duration::ZERO),
            };
        }
    };
    // Connect deadline 1 s, idle deadline 1.5 s; the rest is slack for a busy CI.
    let closed = until_closed(&mut stream, Duration::from_secs(20)).await;
    Outcome {
        kind: case.kind,
        closed_after: closed.map(|at| at.saturating_duration_since(sent)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_mqtt_streams_are_closed_and_counted_while_a_good_device_keeps_forwarding() {
    let _serial = SERIAL.lock().await;
    let fuzz_devices: Vec<String> = (1..=FUZZ_WORKERS).map(|i| format!("fuzz-{i}")).collect();
    let mut devices: Vec<&str> = fuzz_devices.iter().map(String::as_str).collect();
    devices.push(GOOD);
    let Some(lab) = lab(&devices).await else {
        return;
    };
    let mut gateway = GatewayProcess::start(
        &lab,
        &Tuning {
            max_connections: 32,
            connect_timeout: "1s",
            max_size: "4KiB",
        },
    )
    .await;
    let n = fuzz_cases(300);
    let mut rng = fuzz_rng("MQTT over TLS");
    // A valid envelope per fuzz device, and one forged for the good device with a key
    // the gateway cannot tell from the real one.
    let forged = common::device_key(GOOD, 1)
        .seal(e3::Kind::Uplink, 1, b"forged")
        .expect("seal");
    let cases: Vec<(usize, Case)> = (0..n)
        .map(|i| {
            let worker = i % FUZZ_WORKERS;
            let device = &fuzz_devices[worker];
            let envelope = common::device_key(device, 1)
                .seal(e3::Kind::Uplink, i as u64 + 1, b"fuzz")
                .expect("seal");
            (worker, mqtt_case(&mut rng, device, &envelope, &forged))
        })
        .collect();
    let must_reject = cases.iter().filter(|(_, c)| c.must_reject).count() as u64;

    let before = gateway.rejected().await;
    let good = GoodDevice::start(&lab, gateway.device_port).await;
    let started = Instant::now();
    let cases = Arc::new(cases);
    let workers: Vec<JoinHandle<Vec<Outcome>>> = (0..FUZZ_WORKERS)
        .map(|w| {
            let cases = Arc::clone(&cases);
            let tls = lab.device_tls(&fuzz_devices[w]);
            let port = gateway.device_port;
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for (_, case) in cases.iter().filter(|(worker, _)| *worker == w) {
                    outcomes.push(run_case(port, Arc::clone(&tls), case).await);
                }
                outcomes
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for worker in workers {
        outcomes.extend(worker.await.expect("fuzz worker"));
    }
    let elapsed = started.elapsed();
    gateway.assert_alive();
    let report = {
        eprintln!(
            "MQTT over TLS: {n} hostile connections in {:.1} s",
            elapsed.as_secs_f64()
        );
        good.finish(&lab, &["the MQTT fuzz"]).await
    };

    // Every hostile connection was closed by the gateway.
    let open: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.closed_after.is_none())
        .map(|o| o.kind)
        .collect();
    assert!(
        open.is_empty(),
        "connections the gateway never closed: {open:?}"
    );
    let mut by_kind: BTreeMap<&str, (usize, Duration)> = BTreeMap::new();
    for o in &outcomes {
        let entry = by_kind.entry(o.kind).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(o.closed_after.unwrap_or_default());
    }
    for (kind, (count, slowest)) in &by_kind {
        eprintln!(
            "  {kind:<34} {count:>5} inputs, all closed by the gateway, slowest after {:.0} ms",
            ms(*slowest)
        );
    }

    // Refusals counted: at least one per case that is certainly refused. Counting
    // ends when the gateway closed, so the counters are final now.
    let after = gateway.rejected().await;
    let (by_reason, total) = delta(&before, &after);
    eprintln!("  rejections counted: {total} (at least {must_reject} required) {by_reason:?}");
    assert!(
        total >= must_reject,
        "{total} rejections counted for {must_reject} connections that must be refused"
    );
    gateway.assert_log_rate_limited(total);

    // Nothing bogus reached the cloud: the good device's topic holds exactly its own
    // envelopes (checked in finish); a fuzz device's topic only envelopes whose header
    // is a valid uplink naming that device (bytes flipped in a ciphertext cannot be
    // told apart by a keyless gateway, and are forwarded for the cloud to refuse).
    let mut forwarded_fuzz = 0;
    for device in &fuzz_devices {
        for payload in lab.cloud_payloads(device) {
            assert!(
                header_accepts(&payload, device, 4096),
                "forwarded for {device}: an envelope the header rules refuse"
            );
            forwarded_fuzz += 1;
        }
    }
    lab.assert_cloud_topics(&devices);
    eprintln!(
        "  cloud: {} good envelopes, {forwarded_fuzz} fuzz envelopes with a valid header, \
         nothing else; the gateway never crashed",
        report.acked.len()
    );
    gateway.assert_alive();
}

// ---------------------------------------------------------------------------------
// Target 2: mutated E3 envelopes in valid MQTT

/// What the E3 header rules (E3-SPEC "Who checks what") say a gateway must accept.
fn header_accepts(envelope: &[u8], device: &str, max: usize) -> bool {
    envelope.len() <= max
        && matches!(e3::Header::parse(envelope),
            Ok(h) if h.kind() == e3::Kind::Uplink && h.device_id() == device)
}

/// A mutated envelope, and whether the mutation certainly breaks a header rule (the
/// header oracle must agree: a check of the check).
fn e3_mutation(rng: &mut Rng, valid: &[u8], other_device: &[u8], max: usize) -> (Vec<u8>, bool) {
    let id_len = usize::from(valid[3]);
    let header_len = 28 + id_len;
    let mut m = valid.to_vec();
    let certain = match rng.below(12) {
        0 => {
            // Flip bits in the clear header.
            for _ in 0..rng.between(1, 3) {
                let at = rng.below(header_len);
                m[at] ^= 1 << rng.below(8);
            }
            false
        }
        1 => {
            let at = rng.below(header_len);
            m[at] = rng.next() as u8;
            false
        }
        2 => {
            m[0] = (rng.next() as u8).max(2); // version
            true
        }
        3 => {
            m[1] = [0, 2, 3, 4, 0x81, 0xff][rng.below(6)]; // kind: not uplink
            true
        }
        4 => {
            m[2] = (rng.next() as u8).max(3); // no such suite
            m[2] = if m[2] < 3 { 0 } else { m[2] };
            true
        }
        5 => {
            m[3] = [0, 65, 0xff][rng.below(3)]; // id length out of range
            true
        }
        6 => {
            // A character outside the device id alphabet.
            m[4 + rng.below(id_len)] = [b' ', b'/', b'+', b'#', 0, 0xc3, b'*'][rng.below(7)];
            true
        }
        7 => {
            m[header_len - 20..header_len - 12].fill(0); // seq 0
            true
        }
        8 => {
            let keep = rng.below(header_len + 16);
            m.truncate(keep); // too short for header and tag
            true
        }
        9 => {
            // Over the size limit (but inside the MQTT packet limit).
            let extra = max + 1 - m.len() + rng.below(500);
            m.extend(rng.bytes(extra));
            true
        }
        10 => {
            // Sealed for another device, sent on this device's topic.
            m = other_device.to_vec();
            true
        }
        _ => {
            let n = rng.between(0, 200);
            m = rng.bytes(n);
            if m.first() == Some(&1) {
                m[0] = 0; // keep it certainly invalid
            }
            true
        }
    };
    (m, certain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_e3_envelopes_are_refused_counted_and_never_forwarded() {
    let _serial = SERIAL.lock().await;
    const DEVICE: &str = "sensor-e3";
    const MAX: usize = 8192;
    let Some(lab) = lab(&[DEVICE, GOOD]).await else {
        return;
    };
    let mut gateway = GatewayProcess::start(
        &lab,
        &Tuning {
            max_connections: 32,
            connect_timeout: "5s",
            max_size: "8KiB",
        },
    )
    .await;
    let n = fuzz_cases(3000);
    let mut rng = fuzz_rng("E3 headers");
    let key = common::device_key(DEVICE, 1);
    let other = common::device_key(GOOD, 1);
    let mut envelopes = Vec::with_capacity(n + 1);
    let mut expect_forwarded = Vec::new();
    let mut expect_refused = 0u64;
    let mut certain = 0;
    for i in 0..n {
        let seq = i as u64 + 1;
        let body_len = rng.between(0, 300);
        let body = rng.bytes(body_len);
        let valid = key.seal(e3::Kind::Uplink, seq, &body).expect("seal");
        let forged = other.seal(e3::Kind::Uplink, seq, &body).expect("seal");
        let (mutated, must_refuse) = e3_mutation(&mut rng, &valid, &forged, MAX);
        let accepted = header_accepts(&mutated, DEVICE, MAX);
        assert!(
            !(must_refuse && accepted),
            "header oracle accepts an envelope whose mutation breaks a rule: {mutated:02x?}"
        );
        certain += usize::from(must_refuse);
        if accepted {
            expect_forwarded.push(mutated.clone());
        } else {
            expect_refused += 1;
        }
        envelopes.push(mutated);
    }
    // The marker: once it is at the cloud, everything before it was forwarded
    // (per-device order).
    let marker = key
        .seal(e3::Kind::Uplink, n as u64 + 1, b"marker")
        .expect("seal");
    envelopes.push(marker.clone());
    expect_forwarded.push(marker);

    let before = gateway.rejected().await;
    let good = GoodDevice::start(&lab, gateway.device_port).await;
    let started = Instant::now();
    let stream = mqtt_session(gateway.device_port, lab.device_tls(DEVICE), DEVICE)
        .await
        .expect("device connects");
    let (mut reader, mut writer) = tokio::io::split(stream);
    let total = envelopes.len();
    let topic = format!("e3/{DEVICE}/up");
    let sender = tokio::spawn(async move {
        for (i, envelope) in envelopes.iter().enumerate() {
            let pkid = (i % 65_535 + 1) as u16;
            send(&mut writer, &publish_packet(&topic, 1, pkid, envelope))
                .await
                .expect("the gateway keeps reading a device that sends valid MQTT");
        }
        writer
    });
    // Every publish gets its PUBACK, in order: refused envelopes are acknowledged and
    // dropped so a poison message cannot block the device.
    for i in 0..total {
        let expected = (i % 65_535 + 1) as u16;
        let read = tokio::time::timeout(Duration::from_secs(30), read_packet(&mut reader)).await;
        let Ok(read) = read else {
            panic!(
                "no PUBACK for publish {i} within 30 s; metrics:\n{}\nlog:\n{}",
                gateway.metrics_text().await.unwrap_or_default(),
                gateway.log_text()
            );
        };
        let (first, body) = read.unwrap_or_else(|e| panic!("connection lost at publish {i}: {e}"));
        assert_eq!(
            (first, body),
            (0x40, expected.to_be_bytes().to_vec()),
            "publish {i}"
        );
    }
    let _writer = sender.await.expect("sender");
    lab.wait_cloud(DEVICE, &expect_forwarded).await;
    let elapsed = started.elapsed();
    let after = gateway.rejected().await;
    let (by_reason, counted) = delta(&before, &after);
    eprintln!(
        "E3 headers: {n} mutated envelopes in valid MQTT ({certain} with a certainly broken \
         rule) in {:.1} s: {} PUBACKs, {expect_refused} refused by the header rules, {counted} \
         counted {by_reason:?}, {} forwarded byte for byte (header still valid), none of the \
         refused forwarded",
        elapsed.as_secs_f64(),
        total,
        expect_forwarded.len() - 1
    );
    assert_eq!(
        counted, expect_refused,
        "every refused envelope counted once, nothing else"
    );
    let report = good.finish(&lab, &["the E3 fuzz"]).await;
    lab.assert_cloud_topics(&[DEVICE, GOOD]);
    assert_eq!(
        gateway.metric("blindgate_ingress_received_total").await,
        Some((expect_forwarded.len() + report.acked.len()) as f64),
        "stored: exactly the accepted envelopes"
    );
    gateway.assert_alive();
}

// ---------------------------------------------------------------------------------
// Target 3: floods

/// Samples the gateway's VmRSS every 20 ms until stopped; returns the peak in KiB.
fn rss_sampler(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let rss = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0);
            peak = peak.max(rss);
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    })
}

/// How a flood connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FloodEnd {
    /// The gateway closed it (or refused the handshake).
    Closed,
    /// Still open after the deadline.
    Open,
    /// Could not even connect at TCP level.
    NoTcp,
}

/// One flood connection: `style` 0 silent TCP, 1 non-TLS garbage, 2 TLS with a valid
/// certificate and no CONNECT, 3 TLS and half a CONNECT.
async fn flood_connection(
    port: u16,
    style: usize,
    tls: Arc<rustls::ClientConfig>,
    id: String,
) -> FloodEnd {
    let limit = Duration::from_secs(30);
    let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)).await else {
        return FloodEnd::NoTcp;
    };
    match style {
        0 => {}
        1 => {
            let _ = tcp
                .write_all(b"GET / HTTP/1.0\r\n\r\n\x16\x03\x01\x00\x05hello")
                .await;
        }
        _ => {
            let name = ServerName::try_from("localhost").expect("valid name");
            let Ok(mut stream) = TlsConnector::from(tls).connect(name, tcp).await else {
                return FloodEnd::Closed;
            };
            if style == 3 {
                let connect = connect_packet(&id, 60);
                let _ = send(&mut stream, &connect[..connect.len() / 2]).await;
            }
            return match until_closed(&mut stream, limit).await {
                Some(_) => FloodEnd::Closed,
                None => FloodEnd::Open,
            };
        }
    }
    match until_closed(&mut tcp, limit).await {
        Some(_) => FloodEnd::Closed,
        None => FloodEnd::Open,
    }
}

/// Sends oversize envelopes (inside the packet limit) as fast as TCP takes them until
/// `deadline`; returns (sent, PUBACKs, bytes).
async fn oversize_sender(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    device: &'static str,
    size: usize,
    deadline: Instant,
) -> (u64, u64, u64) {
    let stream = mqtt_session(port, tls, device).await.expect("hog connects");
    let (mut reader, mut writer) = tokio::io::split(stream);
    let acks = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&acks);
    let ack_reader = tokio::spawn(async move {
        while let Ok((first, _)) = read_packet(&mut reader).await {
            if first == 0x40 {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    // Sealed once: sealing 256 KiB per message would slow the hog, not the gateway.
    let envelope = common::device_key(device, 1)
        .seal(e3::Kind::Uplink, 1, &vec![0x5a; size])
        .expect("seal");
    let topic = format!("e3/{device}/up");
    let (mut sent, mut bytes) = (0u64, 0u64);
    while Instant::now() < deadline {
        let publish = publish_packet(&topic, 1, (sent % 65_535 + 1) as u16, &envelope);
        if send(&mut writer, &publish).await.is_err() {
            break;
        }
        sent += 1;
        bytes += publish.len() as u64;
    }
    // The last PUBACKs are on their way.
    let settle = Instant::now() + Duration::from_secs(10);
    while acks.load(Ordering::Relaxed) < sent && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ack_reader.abort();
    (sent, acks.load(Ordering::Relaxed), bytes)
}

/// Connects again and again, each time announcing a 256 MiB PUBLISH and streaming
/// until the gateway closes; returns (connections, most bytes one got written).
async fn huge_announcer(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    device: &'static str,
    deadline: Instant,
) -> (u64, u64) {
    let (mut connections, mut most, mut failed) = (0u64, 0u64, 0);
    let chunk = vec![0xa5u8; 64 * 1024];
    while Instant::now() < deadline {
        let Ok(mut stream) = mqtt_session(port, Arc::clone(&tls), device).await else {
            failed += 1;
            assert!(failed < 10, "hog-2 cannot connect at all");
            continue;
        };
        connections += 1;
        let mut header = vec![0x32];
        remaining_length(268_435_455, &mut header);
        mqtt_string(format!("e3/{device}/up").as_bytes(), &mut header);
        let mut written = 0u64;
        if send(&mut stream, &header).await.is_ok() {
            // Stop at the gateway's close, or after 64 MiB (the gateway is then
            // buffering what it should have refused: the RSS check will say so).
            let write = async {
                while written < 64 << 20 {
                    if send(&mut stream, &chunk).await.is_err() {
                        break;
                    }
                    written += chunk.len() as u64;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), write).await;
        }
        most = most.max(written);
    }
    (connections, most)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_connections_and_oversize_messages_keep_memory_bounded_and_others_forwarding() {
    let _serial = SERIAL.lock().await;
    const FLOOD_CERTS: usize = 8;
    let flood_ids: Vec<String> = (1..=FLOOD_CERTS).map(|i| format!("flood-{i}")).collect();
    let mut devices: Vec<&str> = flood_ids.iter().map(String::as_str).collect();
    devices.extend([GOOD, "late-1", "hog-1", "hog-2"]);
    let Some(lab) = lab(&devices).await else {
        return;
    };
    let max_connections = 32;
    let mut gateway = GatewayProcess::start(
        &lab,
        &Tuning {
            max_connections,
            connect_timeout: "2s",
            max_size: "256KiB",
        },
    )
    .await;
    let port = gateway.device_port;
    let (baseline_rss, _) = gateway.rss_kib();
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let sampler = rss_sampler(gateway.pid, Arc::clone(&stop_sampler));
    let before = gateway.rejected().await;
    let good = GoodDevice::start(&lab, port).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // (a) Many connections at once, far over max_connections.
    good.set_phase(1);
    let attempts = fuzz_cases(500).clamp(500, 5000);
    let started = Instant::now();
    let floods: Vec<JoinHandle<FloodEnd>> = (0..attempts)
        .map(|i| {
            let tls = lab.device_tls(&flood_ids[i % FLOOD_CERTS]);
            let id = flood_ids[i % FLOOD_CERTS].clone();
            tokio::spawn(flood_connection(port, i % 4, tls, id))
        })
        .collect();
    let mut ends = Vec::new();
    for flood in floods {
        ends.push(flood.await.expect("flood task"));
    }
    let flood_time = started.elapsed();
    gateway.assert_alive();
    let closed = ends.iter().filter(|e| **e == FloodEnd::Closed).count();
    let no_tcp = ends.iter().filter(|e| **e == FloodEnd::NoTcp).count();
    assert_eq!(
        closed, attempts,
        "every flood connection closed by the gateway ({no_tcp} could not connect, the rest stayed open)"
    );
    // Each flood connection is refused once: at the limit, in the TLS handshake, or
    // for no CONNECT in time. The gateway counts the last ones at its deadline.
    let flood_reasons = ["connection_limit", "tls_handshake", "bad_connect"];
    let counted = async {
        loop {
            let (by_reason, _) = delta(&before, &gateway.rejected().await);
            let sum: u64 = flood_reasons
                .iter()
                .map(|r| by_reason.get(*r).copied().unwrap_or(0))
                .sum();
            if sum >= attempts as u64 {
                return by_reason;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let by_reason = tokio::time::timeout(Duration::from_secs(30), counted)
        .await
        .expect("every flood connection counted as a rejection");
    let (_, total) = delta(&before, &gateway.rejected().await);
    assert_eq!(
        total, attempts as u64,
        "one rejection per flood connection, no more: {by_reason:?}"
    );
    eprintln!(
        "connection flood: {attempts} connections at once against max_connections = \
         {max_connections} (silent TCP, non-TLS bytes, TLS without CONNECT, half a CONNECT) \
         in {:.1} s: {attempts} attempted, {attempts} closed by the gateway, refused {by_reason:?}",
        flood_time.as_secs_f64()
    );
    // The slots are free again: only the good device is connected, a new one gets in.
    assert_eq!(
        gateway.metric("blindgate_ingress_connections").await,
        Some(1.0)
    );
    let mut late = mqtt_session(port, lab.device_tls("late-1"), "late-1")
        .await
        .expect("a device connects after the flood");
    let late_envelope = common::device_key("late-1", 1)
        .seal(e3::Kind::Uplink, 1, b"after the flood")
        .expect("seal");
    publish_acked(&mut late, "e3/late-1/up", 1, &late_envelope)
        .await
        .expect("PUBACK after the flood");
    drop(late);

    // (b) A device sending oversize envelopes as fast as it can, and one announcing
    // 256 MiB packets over and over.
    good.set_phase(2);
    let flood_for = if soak() {
        Duration::from_secs((fuzz_cases(0) as u64 / 100).clamp(8, 600))
    } else {
        Duration::from_secs(8)
    };
    let before_b = gateway.rejected().await;
    let deadline = Instant::now() + flood_for;
    // Separate tasks: one must not wait while the other writes.
    let oversize = tokio::spawn(oversize_sender(
        port,
        lab.device_tls("hog-1"),
        "hog-1",
        256 * 1024 + 200,
        deadline,
    ));
    let huge = tokio::spawn(huge_announcer(
        port,
        lab.device_tls("hog-2"),
        "hog-2",
        deadline,
    ));
    let (sent, acked, bytes) = oversize.await.expect("hog-1");
    let (connections, most_written) = huge.await.expect("hog-2");
    good.set_phase(3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_sampler.store(true, Ordering::Relaxed);
    let peak_sampled = sampler.join().expect("sampler");
    gateway.assert_alive();
    let (rss_now, hwm) = gateway.rss_kib();
    let (by_reason_b, _) = delta(&before_b, &gateway.rejected().await);
    eprintln!(
        "oversize flood for {:.0} s: hog-1 sent {sent} envelopes of 256 KiB + 200 B ({:.1} MiB, \
         {:.1} MiB/s), {acked} acknowledged and dropped; hog-2 announced 256 MiB in \
         {connections} connections, at most {:.2} MiB written before the gateway closed; \
         refused {by_reason_b:?}",
        flood_for.as_secs_f64(),
        bytes as f64 / 1048576.0,
        bytes as f64 / 1048576.0 / flood_for.as_secs_f64(),
        most_written as f64 / 1048576.0
    );
    eprintln!(
        "gateway memory: RSS at start {:.1} MiB, peak {:.1} MiB sampled / {:.1} MiB VmHWM, \
         now {:.1} MiB",
        baseline_rss as f64 / 1024.0,
        peak_sampled as f64 / 1024.0,
        hwm as f64 / 1024.0,
        rss_now as f64 / 1024.0
    );
    gateway.assert_log_rate_limited(by_reason_b.values().sum::<u64>() + attempts as u64);
    let report = good
        .finish(
            &lab,
            &[
                "warm-up",
                "the connection flood",
                "the oversize flood",
                "cool-down",
            ],
        )
        .await;
    assert!(sent > 10, "hog-1 could send only {sent} envelopes");
    assert_eq!(
        acked, sent,
        "each oversize envelope acknowledged and dropped"
    );
    assert!(
        by_reason_b.get("oversize").copied().unwrap_or(0) >= sent + connections,
        "every oversize envelope and every huge packet counted"
    );
    assert!(connections >= 2, "hog-2 got only {connections} connections");
    assert!(
        most_written < 32 << 20,
        "the gateway read {most_written} bytes of a packet it should have refused from its header"
    );
    // Memory: 32 connections of at most 257 KiB buffered each, 16 MiB in flight to the
    // queue, 8 MiB of sled cache: 96 MiB over the start leaves room for the allocator.
    let bound = baseline_rss + 96 * 1024;
    assert!(
        hwm.max(peak_sampled) < bound,
        "peak RSS {hwm} KiB over the bound {bound} KiB"
    );
    lab.assert_cloud_topics(&[GOOD, "late-1"]);
    assert_eq!(lab.cloud_payloads("late-1"), vec![late_envelope]);
    assert!(lab.cloud_payloads("hog-1").is_empty() && lab.cloud_payloads("hog-2").is_empty());
    eprintln!(
        "floods: {} good envelopes forwarded throughout; the gateway never crashed",
        report.acked.len()
    );
    gateway.assert_alive();
}

// ---------------------------------------------------------------------------------
// Target 4: impersonation, end to end (tests/ingress.rs and tests/tls.rs check the
// refusals on the listener alone; this adds the binary, the cloud and the proof that
// nothing was forwarded)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonation_is_refused_counted_and_nothing_reaches_the_cloud() {
    let _serial = SERIAL.lock().await;
    const PUMP: &str = "pump-17";
    const METER: &str = "meter-9";
    let Some(lab) = lab(&[PUMP, METER, GOOD]).await else {
        return;
    };
    let mut gateway = GatewayProcess::start(
        &lab,
        &Tuning {
            max_connections: 32,
            connect_timeout: "5s",
            max_size: "4KiB",
        },
    )
    .await;
    let port = gateway.device_port;
    let before = gateway.rejected().await;
    let good = GoodDevice::start(&lab, port).await;
    let meter_key = common::device_key(METER, 1);
    let pump_key = common::device_key(PUMP, 1);

    // 1. pump-17, with its own valid certificate, publishes as meter-9.
    let mut pump = mqtt_session(port, lab.device_tls(PUMP), PUMP)
        .await
        .expect("pump connects");
    let forged = meter_key
        .seal(e3::Kind::Uplink, 1, b"forged by pump")
        .expect("seal");
    send(
        &mut pump,
        &publish_packet(&format!("e3/{METER}/up"), 1, 1, &forged),
    )
    .await
    .expect("write");
    assert!(
        until_closed(&mut pump, Duration::from_secs(10))
            .await
            .is_some(),
        "publishing on another device's topic closes the connection"
    );

    // 2. On its own topic, an envelope whose header names meter-9: acknowledged,
    // dropped. Then its own marker.
    let mut pump = mqtt_session(port, lab.device_tls(PUMP), PUMP)
        .await
        .expect("pump reconnects");
    let mismatched = meter_key
        .seal(e3::Kind::Uplink, 2, b"names meter")
        .expect("seal");
    publish_acked(&mut pump, &format!("e3/{PUMP}/up"), 2, &mismatched)
        .await
        .expect("a mismatched envelope is acknowledged and dropped");
    let pump_marker = pump_key
        .seal(e3::Kind::Uplink, 1, b"pump marker")
        .expect("seal");
    publish_acked(&mut pump, &format!("e3/{PUMP}/up"), 3, &pump_marker)
        .await
        .expect("pump marker");

    // 3. TLS without a client certificate, and with a certificate from another CA.
    let roots = blindgate::tls::load_root_store(&lab.pki.device_ca.cert).expect("roots");
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let foreign = common::client_tls(
        &lab.pki.device_ca.cert,
        &lab.pki.gateway_client.cert,
        &lab.pki.gateway_client.key,
    );
    for (what, tls) in [
        ("no certificate", Arc::new(anonymous)),
        ("another CA", foreign),
    ] {
        // TLS 1.3: the client finishes before the server checks its certificate, so
        // the refusal shows on the first read.
        if let Ok(mut stream) = tls_connect(port, tls).await {
            let _ = send(&mut stream, &connect_packet(METER, 60)).await;
            match tokio::time::timeout(Duration::from_secs(10), read_packet(&mut stream)).await {
                Ok(Ok(packet)) => panic!("{what}: the gateway answered {packet:?}"),
                Ok(Err(_)) => {}
                Err(_) => panic!("{what}: the gateway neither answered nor closed"),
            }
        }
    }

    // 4. meter-9's own marker.
    let mut meter = mqtt_session(port, lab.device_tls(METER), METER)
        .await
        .expect("meter connects");
    let meter_marker = meter_key
        .seal(e3::Kind::Uplink, 3, b"meter marker")
        .expect("seal");
    publish_acked(&mut meter, &format!("e3/{METER}/up"), 1, &meter_marker)
        .await
        .expect("meter marker");

    // Per-device order: once the markers are at the cloud, anything stored before
    // them would be there too.
    lab.wait_cloud(PUMP, std::slice::from_ref(&pump_marker))
        .await;
    lab.wait_cloud(METER, std::slice::from_ref(&meter_marker))
        .await;
    let (by_reason, total) = delta(&before, &gateway.rejected().await);
    eprintln!("impersonation: refused {by_reason:?}");
    for reason in ["topic_not_allowed", "device_mismatch"] {
        assert_eq!(by_reason.get(reason), Some(&1), "{reason}: {by_reason:?}");
    }
    assert_eq!(by_reason.get("tls_handshake"), Some(&2), "{by_reason:?}");
    assert_eq!(total, 4, "nothing else refused: {by_reason:?}");
    let report = good.finish(&lab, &["the impersonation attempts"]).await;
    lab.assert_cloud_topics(&[PUMP, METER, GOOD]);
    let everything = lab.cloud.received();
    assert_eq!(
        everything.len(),
        report.acked.len() + 2,
        "the cloud got the good device's envelopes and the two markers, nothing else"
    );
    assert!(
        everything
            .iter()
            .all(|(_, p)| *p != forged && *p != mismatched),
        "a refused envelope reached the cloud"
    );
    eprintln!(
        "impersonation: 4 attempts refused and counted, 0 forwarded; the cloud holds the \
         {} good envelopes and the 2 markers only",
        report.acked.len()
    );
    gateway.assert_alive();
}
