//! Interop with MQTT code we did not write: paho-mqtt (Python) and `mosquitto_pub`
//! devices publish envelopes sealed by `blindgate e3 seal` to the gateway; Mosquitto is
//! the cloud broker. The cloud subscriber must receive exactly the bytes each device
//! sealed, in order. A paho device subscribed to its downlink topic receives a command.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use blindgate::gateway::Gateway;
use blindgate::pki::{CertKeyPaths, DevPki};
use common::cloud_subscriber::CloudSubscriber;
use common::mosquitto::{MOSQUITTO_PUB, TlsMode, require_mosquitto, start_cloud_broker};

fn blindgate(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_blindgate"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("blindgate runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Seals `count` readings for `device` with the CLI into `dir`; returns the envelopes.
fn seal_with_cli(dir: &Path, device: &str, count: u64) -> Vec<PathBuf> {
    let key = dir.join(format!("{device}.key"));
    let key_arg = key.to_str().expect("utf-8");
    blindgate(&["e3", "keygen", "--device", device, "-o", key_arg]);
    let out_dir = dir.join(format!("{device}-envelopes"));
    std::fs::create_dir_all(&out_dir).expect("dir");
    (1..=count)
        .map(|seq| {
            let plain = dir.join(format!("{device}-{seq}.json"));
            std::fs::write(&plain, format!(r#"{{"device":"{device}","seq":{seq}}}"#)).expect("w");
            let sealed = out_dir.join(format!("{seq:06}.e3"));
            blindgate(&[
                "e3",
                "seal",
                "--key-file",
                key_arg,
                "--seq",
                &seq.to_string(),
                plain.to_str().expect("utf-8"),
                "-o",
                sealed.to_str().expect("utf-8"),
            ]);
            sealed
        })
        .collect()
}

fn device_paths<'a>(pki: &'a DevPki, device: &str) -> &'a CertKeyPaths {
    &pki.devices
        .iter()
        .find(|(id, _)| id == device)
        .expect("device")
        .1
}

fn paho(pki: &DevPki, port: u16, device: &str, extra: &[&str]) -> Command {
    let paths = device_paths(pki, device);
    let mut command = Command::new("python3");
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/paho_device.py"))
        .args(["--port", &port.to_string(), "--device", device])
        .arg("--ca")
        .arg(&pki.device_ca.cert)
        .arg("--cert")
        .arg(&paths.cert)
        .arg("--key")
        .arg(&paths.key)
        .args(extra);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_and_mosquitto_pub_devices_reach_a_mosquitto_cloud_through_the_gateway() {
    if !require_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &["pump-17", "meter-9", "cam-1"]);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let cloud = CloudSubscriber::connect(broker.port, &pki, "ingest-1", "gw/+/e3/+/up").await;
    let mut plan = common::gateway_plan(dir.path(), &pki, broker.port);
    plan.metrics_listen = None;
    let gateway = Gateway::start(plan).await.expect("gateway");
    let port = gateway.device_addr().port();

    // Two paho devices at once, with sealed files from the CLI.
    let pump = seal_with_cli(dir.path(), "pump-17", 40);
    let meter = seal_with_cli(dir.path(), "meter-9", 40);
    let pump_dir = pump[0]
        .parent()
        .expect("dir")
        .to_str()
        .expect("utf-8")
        .to_owned();
    let meter_dir = meter[0]
        .parent()
        .expect("dir")
        .to_str()
        .expect("utf-8")
        .to_owned();
    let spawn = |device: &str, envelopes: &str| {
        paho(&pki, port, device, &["--envelopes", envelopes])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs")
    };
    let running = [
        ("pump-17", spawn("pump-17", &pump_dir)),
        ("meter-9", spawn("meter-9", &meter_dir)),
    ];
    for (name, child) in running {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .expect("join")
            .expect("paho exits");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("done 40"), "{name}: {stdout}");
    }
    // And mosquitto_pub (Debian's mosquitto-clients) as a third device.
    let cam = seal_with_cli(dir.path(), "cam-1", 1);
    let cam_paths = device_paths(&pki, "cam-1");
    let status = Command::new(MOSQUITTO_PUB)
        .args([
            "-h",
            "localhost",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-i",
            "cam-1",
        ])
        .args(["--tls-version", "tlsv1.3", "-t", "e3/cam-1/up", "-f"])
        .arg(&cam[0])
        .arg("--cafile")
        .arg(&pki.device_ca.cert)
        .arg("--cert")
        .arg(&cam_paths.cert)
        .arg("--key")
        .arg(&cam_paths.key)
        .status()
        .expect("mosquitto_pub runs");
    assert!(status.success());

    let received = cloud.wait_for(81, Duration::from_secs(20)).await;
    for (device, files) in [("pump-17", &pump), ("meter-9", &meter), ("cam-1", &cam)] {
        let topic = format!("gw/gw-1/e3/{device}/up");
        let got: Vec<&Vec<u8>> = received
            .iter()
            .filter(|(t, _)| *t == topic)
            .map(|(_, p)| p)
            .collect();
        let sent: Vec<Vec<u8>> = files
            .iter()
            .map(|f| std::fs::read(f).expect("read"))
            .collect();
        assert_eq!(got.len(), sent.len(), "{device}");
        assert!(
            got.iter().zip(&sent).all(|(g, s)| *g == s),
            "{device}: bytes or order differ"
        );
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paho_device_receives_a_command_from_the_cloud() {
    if !require_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &["pump-17"]);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let cloud = CloudSubscriber::connect(broker.port, &pki, "ingest-1", "gw/+/e3/+/up").await;
    let gateway = Gateway::start(common::gateway_plan(dir.path(), &pki, broker.port))
        .await
        .expect("gateway");
    let device = paho(
        &pki,
        gateway.device_addr().port(),
        "pump-17",
        &["--subscribe", "--expect", "1", "--timeout", "20"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("paho device");
    // Send only once the device is subscribed and the uplink is connected.
    tokio::time::timeout(Duration::from_secs(20), async {
        while gateway.metrics().uplink_connected.get() == 0
            || gateway.metrics().connections.get() == 0
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    })
    .await
    .expect("device and uplink up");
    let key = common::device_key("pump-17", 1);
    let command = key
        .seal(e3::Kind::Command, 1, b"{\"cmd\":\"close\"}")
        .expect("seal");
    cloud
        .publish("gw/gw-1/e3/pump-17/down", command.clone())
        .await;
    let out = tokio::task::spawn_blocking(move || device.wait_with_output())
        .await
        .expect("join")
        .expect("paho exits");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("down {}", hex::encode(&command))),
        "{stdout}"
    );
    gateway.stop().await;
}
