//! Command allowlists at both ends, with real parts: a Mosquitto cloud broker (mutual
//! TLS 1.3), the cloud ingest, the gateway, a simulated device, real E3 sealing, and
//! the `blindgate cloud send-command` binary.
//!
//! - An unknown or out-of-range command is refused at send time: nonzero exit, a
//!   message that names the problem, and nothing published.
//! - A command crafted past the cloud's check (sealed directly with the device key and
//!   published on the device's downlink path) is refused by the device, never executed,
//!   and its sealed refusal reaches the cloud sink and the metric; an allowed command
//!   in range is executed and its result reaches the sink too.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use blindgate::cloud::sink::SinkLine;
use blindgate::cloud::{CloudMetrics, CloudSettings};
use blindgate::commands::{CommandOutcome, Schema};
use blindgate::device::{DeviceConfig, run_device};
use blindgate::gateway::Gateway;
use blindgate::keys::KeyStore;
use blindgate::pki::DevPki;
use common::cloud_subscriber::CloudSubscriber;
use common::mosquitto::{TlsMode, require_mosquitto, start_cloud_broker};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const DEVICE: &str = "thermostat-1";

const SCHEMA: &str = r#"
[device_types]
thermostat-1 = "thermostat"

[types.thermostat.set_temp]
celsius = { type = "number", min = 10, max = 35 }

[types.thermostat.reboot]
"#;

/// The cloud side's files in `dir`: the command schema, a cloud config naming it
/// (the ingest's own files, as `CloudSettings::local` lays them out), the key store
/// with the device's key, and the device's copy of that key.
struct Cloud {
    config: PathBuf,
    keys: KeyStore,
    device_key_file: PathBuf,
}

fn cloud_files(dir: &Path, pki: &DevPki, port: u16) -> Cloud {
    std::fs::write(dir.join("commands.toml"), SCHEMA).expect("schema written");
    let config = dir.join("cloud.toml");
    let text = format!(
        "[broker]\nurl = \"mqtts://localhost:{port}\"\nca = {ca:?}\ncert = {cert:?}\n\
         key = {key:?}\nclient_id = \"ingest-cli\"\n\n[store]\nkeys_dir = \"keys\"\n\
         state_dir = \"state\"\n\n[sink]\njsonl = \"messages.jsonl\"\nimages_dir = \"images\"\n\n\
         [commands]\nschema = \"commands.toml\"\n",
        ca = pki.cloud_ca.cert,
        cert = pki.cloud_ingest.cert,
        key = pki.cloud_ingest.key,
    );
    std::fs::write(&config, text).expect("cloud config written");
    let keys = KeyStore::open(&dir.join("keys")).expect("key store");
    let key = keys
        .provision(DEVICE, e3::Suite::Aes256Gcm)
        .expect("provision");
    let device_key_file = dir.join("thermostat-1.key");
    e3::write_key_file(&device_key_file, &key, false).expect("device key file");
    Cloud {
        config,
        keys,
        device_key_file,
    }
}

/// `blindgate cloud send-command --config CONFIG --device thermostat-1 --gateway gw-1 COMMAND`.
async fn send_command(config: &Path, command: &str) -> Output {
    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_blindgate"));
    cli.args(["cloud", "send-command", "--config"])
        .arg(config)
        .args(["--device", DEVICE, "--gateway", "gw-1", command]);
    tokio::task::spawn_blocking(move || cli.output())
        .await
        .expect("join")
        .expect("blindgate runs")
}

fn sink(dir: &Path) -> Vec<SinkLine> {
    std::fs::read_to_string(dir.join("messages.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("sink line"))
        .collect()
}

/// The `command_result` objects in the sink, in sink order.
fn results(dir: &Path) -> Vec<serde_json::Value> {
    sink(dir)
        .into_iter()
        .filter_map(|line| line.json?.get("command_result").cloned())
        .collect()
}

/// Polls the sink (the ingest appends to it) until `done` holds; fails after [`WAIT`].
async fn wait_sink(dir: &Path, what: &str, done: impl Fn(&[SinkLine]) -> bool) {
    tokio::time::timeout(WAIT, async {
        while !done(&sink(dir)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the sink never held {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_command_refuses_what_the_schema_does_not_allow_and_publishes_nothing() {
    if !require_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &[DEVICE]);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let cloud = cloud_files(dir.path(), &pki, broker.port);
    let downlink =
        CloudSubscriber::connect(broker.port, &pki, "watch-down", "gw/+/e3/+/down").await;

    for (command, says) in [
        (
            r#"{"cmd":"reboot_all"}"#,
            "unknown command `reboot_all` for device type `thermostat`",
        ),
        (
            r#"{"cmd":"set_temp","celsius":40}"#,
            "celsius out of range 10..35: 40",
        ),
        (
            r#"{"cmd":"set_temp","celsius":20,"force":true}"#,
            "unknown parameter `force` for command `set_temp`",
        ),
        (r#"{"cmd":"set_temp"}"#, "missing parameter `celsius`"),
        (r#"{"cmd":"rekey","key_id":9}"#, "key rotation only"),
    ] {
        let out = send_command(&cloud.config, command).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command} was accepted");
        assert!(
            stderr.contains("command refused, nothing sent") && stderr.contains(says),
            "{command}: {stderr}"
        );
    }

    // An allowed command goes out; the subscriber then holds it and nothing before it.
    let allowed = r#"{"cmd":"set_temp","celsius":21.5}"#;
    let out = send_command(&cloud.config, allowed).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let received = downlink.wait_for(1, WAIT).await;
    assert_eq!(received.len(), 1, "only the allowed command was published");
    let (topic, envelope) = &received[0];
    assert_eq!(topic, "gw/gw-1/e3/thermostat-1/down");
    let key = cloud.keys.current(DEVICE).expect("device key");
    let (header, plaintext) = key.open(envelope).expect("opens with the device key");
    assert_eq!(header.kind(), e3::Kind::Command);
    assert_eq!(plaintext, allowed.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_refuses_a_crafted_command_executes_an_allowed_one_and_both_results_reach_the_sink()
 {
    if !require_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &[DEVICE]);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let cloud = cloud_files(dir.path(), &pki, broker.port);
    let settings =
        CloudSettings::local(dir.path(), &pki, broker.port, "ingest-1").expect("settings");
    let metrics = CloudMetrics::new();
    let ingest_stop = CancellationToken::new();
    tokio::spawn(blindgate::cloud::run(
        settings.clone(),
        metrics.clone(),
        ingest_stop.clone(),
    ));
    assert!(metrics.wait_subscribed(WAIT).await, "ingest subscribed");
    let gateway = Gateway::start(common::gateway_plan(dir.path(), &pki, broker.port))
        .await
        .expect("gateway");
    common::wait_uplink_connected(&gateway).await;

    // The device holds its type's part of the schema.
    let schema = Schema::load(&dir.path().join("commands.toml")).expect("schema");
    let (id, paths) = &pki.devices[0];
    let mut config = DeviceConfig::new(
        id.clone(),
        paths.cert.clone(),
        paths.key.clone(),
        pki.device_ca.cert.clone(),
        cloud.device_key_file.clone(),
        gateway.device_addr(),
        dir.path().join("device-state"),
    );
    config.rate_per_sec = 5.0;
    config.resend_after = Duration::from_secs(2);
    config.commands = schema.for_device(DEVICE).cloned();
    let device_stop = CancellationToken::new();
    let device = tokio::spawn(run_device(config, device_stop.clone()));
    // The device subscribes before it publishes, on one connection: once a reading of
    // its reached the sink, the gateway has its downlink subscription.
    wait_sink(dir.path(), "a reading", |lines| !lines.is_empty()).await;

    // Crafted past the cloud's check: sealed here with the device's key and published
    // straight to its downlink path.
    for crafted in [
        br#"{"cmd":"reboot_all"}"#.as_slice(),
        br#"{"cmd":"set_temp","celsius":40}"#.as_slice(),
    ] {
        let key = cloud.keys.current(DEVICE).expect("device key");
        let seq = cloud
            .keys
            .reserve_downlink_seqs(DEVICE, 1)
            .expect("downlink seq")
            .start;
        let envelope = key.seal(e3::Kind::Command, seq, crafted).expect("sealed");
        blindgate::cloud::commands::publish_once(
            &settings.broker,
            settings.tls.clone(),
            "crafter",
            settings.down_topic.render("gw-1", DEVICE),
            envelope,
            WAIT,
        )
        .await
        .expect("broker took the crafted command");
    }
    // And one the cloud's check lets through, sent the operator's way.
    let out = send_command(&cloud.config, r#"{"cmd":"set_temp","celsius":21.5}"#).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    wait_sink(dir.path(), "three command results", |_| {
        results(dir.path()).len() >= 3
    })
    .await;
    let results = results(dir.path());
    assert_eq!(results.len(), 3, "{results:?}");
    let summary: Vec<(&str, &str, &str)> = results
        .iter()
        .map(|r| {
            (
                r["cmd"].as_str().expect("cmd"),
                r["result"].as_str().expect("result"),
                r["message"].as_str().expect("message"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "reboot_all",
                "refused",
                "refused: unknown command `reboot_all` for device type `thermostat`"
            ),
            (
                "set_temp",
                "refused",
                "refused: celsius out of range 10..35: 40"
            ),
            ("set_temp", "executed", "executed"),
        ]
    );
    // Each result names its command's downlink seq, all distinct.
    let mut seqs: Vec<u64> = results
        .iter()
        .map(|r| r["seq"].as_u64().expect("seq"))
        .collect();
    seqs.dedup();
    assert_eq!(seqs.len(), 3);
    assert_eq!(metrics.command_results(CommandOutcome::Refused), 2);
    assert_eq!(metrics.command_results(CommandOutcome::Executed), 1);
    let mut exposition = String::new();
    prometheus::TextEncoder::new()
        .encode_utf8(&metrics.registry.gather(), &mut exposition)
        .expect("metrics encode");
    assert!(
        exposition.contains("blindgate_cloud_command_results_total{result=\"refused\"} 2"),
        "{exposition}"
    );

    device_stop.cancel();
    let report = tokio::time::timeout(WAIT, device)
        .await
        .expect("device stopped")
        .expect("join")
        .expect("device ran");
    assert_eq!(report.commands, 3);
    assert_eq!((report.commands_refused, report.commands_executed), (2, 1));
    ingest_stop.cancel();
    gateway.stop().await;
}

#[test]
fn check_config_points_at_each_schema_mistake_by_file_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &[DEVICE]);
    let cloud = cloud_files(dir.path(), &pki, 8883);
    let schema = dir.path().join("commands.toml");
    std::fs::write(
        &schema,
        "[device_types]\nthermostat-1 = \"heater\"\n\n[types.thermostat.set_temp]\n\
         celsius = { type = \"number\", min = 35, max = 10 }\n",
    )
    .expect("schema written");
    let check = |file: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_blindgate"))
            .arg("check-config")
            .arg(file)
            .output()
            .expect("blindgate runs")
    };
    let out = check(&schema);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let s = schema.display();
    assert!(
        stdout.contains(&format!(
            "{s}:2:16: device_types.thermostat-1: unknown device type `heater`"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "{s}:5:36: types.thermostat.set_temp.celsius: empty range: min 35 is greater than max 10"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("2 errors (command schema)"), "{stdout}");

    // Through the cloud config: each problem at `commands.schema`, quoting the schema's
    // own position.
    let out = check(&cloud.config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("commands.schema: {s}:5:36: ")),
        "{stdout}"
    );

    std::fs::write(&schema, SCHEMA).expect("schema written");
    let out = check(&schema);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
