//! Simulated devices (`device::run_device`) against the real cloud ingest, through the
//! gateway and a Mosquitto cloud broker: resends without a receipt are delivered once;
//! a key rotation reaches the device inside an E3 command and later uplinks use the
//! new key.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use blindgate::cloud::sink::SinkLine;
use blindgate::cloud::{CloudMetrics, CloudRejection, CloudSettings};
use blindgate::device::{DeviceConfig, run_device};
use blindgate::gateway::Gateway;
use blindgate::keys::KeyStore;
use blindgate::pki::DevPki;
use common::mosquitto::{TlsMode, require_mosquitto, start_cloud_broker};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

fn ingest_settings(dir: &Path, pki: &DevPki, port: u16) -> CloudSettings {
    CloudSettings::local(dir, pki, port, "ingest-1").expect("ingest settings")
}

fn sink(dir: &Path) -> Vec<SinkLine> {
    std::fs::read_to_string(dir.join("messages.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("sink line"))
        .collect()
}

fn device_config(
    dir: &Path,
    pki: &DevPki,
    gateway: &Gateway,
    key_file: PathBuf,
    count: u64,
) -> DeviceConfig {
    let (id, paths) = &pki.devices[0];
    let mut config = DeviceConfig::new(
        id.clone(),
        paths.cert.clone(),
        paths.key.clone(),
        pki.device_ca.cert.clone(),
        key_file,
        gateway.device_addr(),
        dir.join("device-state"),
    );
    config.rate_per_sec = 20.0;
    config.count = Some(count);
    config.resend_after = Duration::from_millis(700);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_without_receipts_resends_and_the_cloud_delivers_once() {
    if !require_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &["pump-17"]);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let keys = KeyStore::open(&dir.path().join("keys")).expect("keys");
    let key = keys
        .provision("pump-17", e3::Suite::ChaCha20Poly1305)
        .expect("provision");
    let key_file = dir.path().join("pump-17.key");
    e3::write_key_file(&key_file, &key, false).expect("key file");

    // The ingest connects once (its session persists on the broker), then stops: while
    // it is away the broker keeps its messages, and no receipt reaches the device.
    let metrics = CloudMetrics::new();
    let first = CancellationToken::new();
    let settings = ingest_settings(dir.path(), &pki, broker.port);
    let ingest = tokio::spawn(blindgate::cloud::run(
        settings.clone(),
        metrics.clone(),
        first.clone(),
    ));
    assert!(
        metrics.wait_subscribed(WAIT).await,
        "ingest subscribed once"
    );
    first.cancel();
    ingest.await.expect("join").expect("ingest stopped cleanly");

    let gateway = Gateway::start(common::gateway_plan(dir.path(), &pki, broker.port))
        .await
        .expect("gateway");
    let device_stop = CancellationToken::new();
    let device = tokio::spawn(run_device(
        device_config(dir.path(), &pki, &gateway, key_file, 5),
        device_stop.clone(),
    ));
    // Long enough for every message to be sent and resent at least once.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let second = CancellationToken::new();
    tokio::spawn(blindgate::cloud::run(
        settings,
        metrics.clone(),
        second.clone(),
    ));
    let report = tokio::time::timeout(WAIT, device)
        .await
        .expect("device finished: every message receipted")
        .expect("join")
        .expect("device ran");
    assert_eq!(report.outbox_left, 0);
    assert!(report.resent >= 5, "resent {}", report.resent);
    let lines = sink(dir.path());
    let mut seqs: Vec<u64> = lines.iter().map(|l| l.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), lines.len(), "each message in the sink once");
    assert_eq!(lines.len() as u64, report.sent);
    for line in &lines {
        // The simulator's reading, intact: the device's JSON as it sealed it.
        let json = line.json.as_ref().expect("a JSON reading");
        assert_eq!(json["device_id"], "pump-17");
        assert!(json["ts_ms"].as_u64().is_some());
        let readings = json["readings"].as_array().expect("readings array");
        assert!(!readings.is_empty());
        assert!(
            readings.iter().all(|r| {
                r["type"].is_string() && r["value"].is_number() && r["unit"].is_string()
            })
        );
    }
    assert!(
        metrics.rejected(CloudRejection::Duplicate) >= 5,
        "resends recognised as duplicates"
    );
    second.cancel();
    device_stop.cancel();
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_reaches_the_device_in_a_command_and_later_uplinks_use_it() {
    if !require_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &["pump-17"]);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let keys = KeyStore::open(&dir.path().join("keys")).expect("keys");
    let key = keys
        .provision("pump-17", e3::Suite::Aes256Gcm)
        .expect("provision");
    let key_file = dir.path().join("pump-17.key");
    e3::write_key_file(&key_file, &key, false).expect("key file");
    let metrics = CloudMetrics::new();
    let stop = CancellationToken::new();
    let settings = ingest_settings(dir.path(), &pki, broker.port);
    tokio::spawn(blindgate::cloud::run(
        settings.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    assert!(metrics.wait_subscribed(WAIT).await, "ingest subscribed");
    let gateway = Gateway::start(common::gateway_plan(dir.path(), &pki, broker.port))
        .await
        .expect("gateway");

    // First run: 5 messages with key 1.
    let run = run_device(
        device_config(dir.path(), &pki, &gateway, key_file.clone(), 5),
        CancellationToken::new(),
    );
    let report = tokio::time::timeout(WAIT, run)
        .await
        .expect("in time")
        .expect("ran");
    assert_eq!(report.outbox_left, 0);

    // Rotate in the cloud; send the rekey command down through the gateway.
    let rotation = keys
        .rotate(
            "pump-17",
            Duration::from_secs(3600),
            blindgate::keys::now_ms(),
        )
        .expect("rotate");
    // The device must be connected and subscribed to receive it: run it again (same
    // state directory, so it continues its seqs) and send the command meanwhile.
    let device_stop = CancellationToken::new();
    let device = tokio::spawn(run_device(
        device_config(dir.path(), &pki, &gateway, key_file, 10),
        device_stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    blindgate::cloud::commands::publish_once(
        &settings.broker,
        settings.tls.clone(),
        "rotation-1",
        settings.down_topic.render("gw-1", "pump-17"),
        rotation.command,
        WAIT,
    )
    .await
    .expect("command published");
    let report = tokio::time::timeout(WAIT, device)
        .await
        .expect("in time")
        .expect("join")
        .expect("ran");
    assert_eq!(report.rekeys, 1, "the device applied the rekey command");
    assert_eq!(report.outbox_left, 0);
    let lines = sink(dir.path());
    assert_eq!(lines.first().map(|l| l.key_id), Some(1));
    assert_eq!(
        lines.last().map(|l| l.key_id),
        Some(2),
        "later uplinks sealed with the new key"
    );
    stop.cancel();
    gateway.stop().await;
}
