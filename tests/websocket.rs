//! MQTT over WebSocket for devices, end to end with real parts: a real TLS 1.3
//! WebSocket listener of the gateway, paho-mqtt (`transport="websockets"`) as a device
//! we did not write, Mosquitto as the cloud broker. Also what is refused, and that it
//! is refused exactly as on the TCP listener: another device's certificate, an
//! oversize packet, no client certificate, a wrong subprotocol, path or plain HTTP, a
//! text message; one connection limit for both transports; reloaded TLS material; the
//! config keys.

mod common;
#[path = "common/ws_device.rs"]
mod ws_device;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use blindgate::gateway::Gateway;
use blindgate::ingress::WebSocketListen;
use blindgate::pki::DevPki;
use bytes::BytesMut;
use common::cloud_subscriber::CloudSubscriber;
use common::mosquitto::{Mosquitto, TlsMode, require_mosquitto, start_cloud_broker};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite;
use ws_device::{Device, Ws, tls_connect, uplink_publish, ws_connect};

const PATH: &str = "/mqtt";

struct Setup {
    dir: tempfile::TempDir,
    pki: DevPki,
    gateway: Gateway,
    /// `None` when the test needs no cloud (the uplink then retries in the background).
    cloud: Option<(Mosquitto, CloudSubscriber)>,
}

impl Setup {
    async fn start(devices: &[&str], with_cloud: bool) -> Self {
        Self::start_tuned(devices, with_cloud, |_| {}).await
    }

    /// [`Setup::start`] with the gateway plan changed by `tune` first.
    async fn start_tuned(
        devices: &[&str],
        with_cloud: bool,
        tune: impl FnOnce(&mut blindgate::gateway::GatewayPlan),
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = common::dev_pki(dir.path(), devices);
        let (cloud_port, cloud) = if with_cloud {
            let broker =
                start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
            let sub = CloudSubscriber::connect(broker.port, &pki, "ingest-1", "gw/+/e3/+/up").await;
            (broker.port, Some((broker, sub)))
        } else {
            (common::free_port(), None)
        };
        let mut plan = common::gateway_plan(dir.path(), &pki, cloud_port);
        tune(&mut plan);
        let websocket = WebSocketListen {
            listen: "127.0.0.1:0".parse().expect("addr"),
            path: PATH.into(),
        };
        let gateway = Gateway::start_with(plan, Some(websocket))
            .await
            .expect("gateway");
        Self {
            dir,
            pki,
            gateway,
            cloud,
        }
    }

    fn ws_port(&self) -> u16 {
        self.gateway.websocket_addr().expect("websocket on").port()
    }

    fn subscriber(&self) -> &CloudSubscriber {
        &self.cloud.as_ref().expect("cloud").1
    }

    /// TLS 1.3 client settings with `device`'s certificate, or with none.
    fn tls(&self, device: Option<&str>) -> Arc<rustls::ClientConfig> {
        let ca = &self.pki.device_ca.cert;
        match device {
            Some(device) => {
                let paths = &self.pki.devices.iter().find(|(id, _)| id == device);
                let paths = &paths.expect("device in the PKI").1;
                common::client_tls(ca, &paths.cert, &paths.key)
            }
            None => {
                let mut roots = rustls::RootCertStore::empty();
                let pem = std::fs::read(ca).expect("read CA");
                for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
                    roots.add(cert.expect("CA PEM")).expect("add CA");
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .expect("TLS 1.3")
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Arc::new(config)
            }
        }
    }

    fn rejected(&self, reason: &str) -> u64 {
        self.gateway
            .metrics()
            .rejected
            .with_label_values(&[reason])
            .get()
    }

    /// Waits (bounded) until the `reason` refusal count reaches `n`.
    async fn wait_rejected(&self, reason: &str, n: u64) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while self.rejected(reason) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "{reason}: {} refusals, expected {n}",
            self.rejected(reason)
        );
    }
}

/// Seals `count` readings as `device` into `dir` (one file each, sorted by name).
fn seal_envelopes(dir: &Path, device: &str, count: u64) -> Vec<Vec<u8>> {
    std::fs::create_dir_all(dir).expect("dir");
    let key = common::device_key(device, 1);
    (1..=count)
        .map(|seq| {
            let reading = format!(r#"{{"device":"{device}","seq":{seq}}}"#);
            let envelope = key
                .seal(e3::Kind::Uplink, seq, reading.as_bytes())
                .expect("seal");
            std::fs::write(dir.join(format!("{seq:06}.e3")), &envelope).expect("write");
            envelope
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paho_websocket_device_reaches_the_cloud_byte_identical() {
    if !require_mosquitto() {
        return;
    }
    let setup = Setup::start(&["pump-17"], true).await;
    let envelopes_dir = setup.dir.path().join("pump-17-envelopes");
    let sent = seal_envelopes(&envelopes_dir, "pump-17", 25);
    let paths = &setup.pki.devices[0].1;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/paho_ws_device.py");
    let mut command = Command::new("python3");
    command
        .arg(script)
        .args(["--path", PATH, "--port", &setup.ws_port().to_string()])
        .args(["--device", "pump-17", "--timeout", "30", "--envelopes"])
        .arg(&envelopes_dir)
        .arg("--ca")
        .arg(&setup.pki.device_ca.cert)
        .arg("--cert")
        .arg(&paths.cert)
        .arg("--key")
        .arg(&paths.key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn().expect("python3 runs");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("paho exits");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every PUBACK arrived, and a PUBACK is sent only once the record is durable.
    assert!(stdout.contains("done 25"), "{stdout}");
    assert_eq!(stdout.matches("acked ").count(), 25, "{stdout}");
    assert_eq!(setup.gateway.metrics().received.get(), 25);

    let received = setup
        .subscriber()
        .wait_for(25, Duration::from_secs(20))
        .await;
    let got: Vec<&Vec<u8>> = received
        .iter()
        .filter(|(topic, _)| topic == "gw/gw-1/e3/pump-17/up")
        .map(|(_, payload)| payload)
        .collect();
    assert_eq!(got.len(), sent.len());
    assert!(
        got.iter().zip(&sent).all(|(g, s)| *g == s),
        "bytes or order differ"
    );
    // Once every session has ended: nothing paho did was refused, its leaving included.
    let metrics = setup.gateway.metrics().clone();
    setup.gateway.stop().await;
    for reason in blindgate::metrics::Rejection::ALL {
        let refused = metrics.rejected.with_label_values(&[reason.as_str()]).get();
        assert_eq!(refused, 0, "{}", reason.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_devices_certificate_is_refused_as_on_tcp() {
    if !require_mosquitto() {
        return;
    }
    let setup = Setup::start(&["pump-17", "meter-9"], true).await;
    let forged = common::device_key("pump-17", 1)
        .seal(e3::Kind::Uplink, 1, b"{\"forged\":true}")
        .expect("seal");
    let impostor = setup.tls(Some("meter-9"));
    let tcp_port = setup.gateway.device_addr().port();
    let tcp = tls_connect(tcp_port, Arc::clone(&impostor))
        .await
        .expect("tls");
    let ws = ws_connect(setup.ws_port(), impostor, PATH, Some("mqtt"))
        .await
        .expect("upgrade");
    // The same attempt on both transports, one after the other: meter-9's
    // certificate, pump-17's client id, a publish on pump-17's topic.
    let mut outcomes = Vec::new();
    for (n, mut device) in [
        Device::Tcp(Box::new(tcp), BytesMut::new()),
        Device::Ws(Box::new(ws), BytesMut::new()),
    ]
    .into_iter()
    .enumerate()
    {
        let code = device.connect("pump-17").await;
        device
            .send(uplink_publish("e3/pump-17/up", forged.clone(), 1))
            .await;
        let after = device.recv().await;
        setup.wait_rejected("topic_not_allowed", n as u64 + 1).await;
        outcomes.push((code, after));
    }
    // The certificate decides who the device is (meter-9), whatever the client id;
    // the publish outside meter-9's topic closes the connection without a PUBACK.
    assert_eq!(outcomes[0], (ConnectReturnCode::Success, None));
    assert_eq!(outcomes[0], outcomes[1], "TCP and WebSocket differ");
    assert_eq!(setup.rejected("topic_not_allowed"), 2);

    // Nothing of it reached the cloud: the real pump-17's next envelope is the first.
    let genuine = common::device_key("pump-17", 1)
        .seal(e3::Kind::Uplink, 2, b"{\"genuine\":true}")
        .expect("seal");
    let ws = ws_connect(
        setup.ws_port(),
        setup.tls(Some("pump-17")),
        PATH,
        Some("mqtt"),
    )
    .await
    .expect("upgrade");
    let mut device = Device::Ws(Box::new(ws), BytesMut::new());
    assert_eq!(device.connect("pump-17").await, ConnectReturnCode::Success);
    device
        .send(uplink_publish("e3/pump-17/up", genuine.clone(), 7))
        .await;
    match device.recv().await {
        Some(Packet::PubAck(ack)) => assert_eq!(ack.pkid, 7),
        other => panic!("expected a PUBACK, got {other:?}"),
    }
    let received = setup
        .subscriber()
        .wait_for(1, Duration::from_secs(20))
        .await;
    assert_eq!(
        received,
        vec![("gw/gw-1/e3/pump-17/up".to_owned(), genuine)]
    );
    assert_eq!(setup.gateway.metrics().received.get(), 1);
    setup.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_packet_closes_the_connection_as_on_tcp() {
    let setup = Setup::start(&["pump-17"], false).await;
    let tls = setup.tls(Some("pump-17"));
    let tcp = tls_connect(setup.gateway.device_addr().port(), Arc::clone(&tls));
    let ws = ws_connect(setup.ws_port(), tls, PATH, Some("mqtt"));
    // The test plan's packet limit is 8 KiB (envelopes up to 4 KiB).
    let huge = uplink_publish("e3/pump-17/up", vec![0; 16 * 1024], 1);
    let devices = [
        Device::Tcp(Box::new(tcp.await.expect("tls")), BytesMut::new()),
        Device::Ws(Box::new(ws.await.expect("upgrade")), BytesMut::new()),
    ];
    for (n, mut device) in devices.into_iter().enumerate() {
        assert_eq!(device.connect("pump-17").await, ConnectReturnCode::Success);
        let _sent = device.send_unchecked(huge.clone()).await;
        assert_eq!(device.recv().await, None, "closed without a PUBACK");
        setup.wait_rejected("oversize", n as u64 + 1).await;
    }
    assert_eq!(setup.gateway.metrics().received.get(), 0);
    setup.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_transports_share_one_connection_limit() {
    let setup = Setup::start_tuned(&["pump-17", "meter-9"], false, |plan| {
        plan.ingress.max_connections = 1;
    })
    .await;
    let tcp = tls_connect(
        setup.gateway.device_addr().port(),
        setup.tls(Some("pump-17")),
    );
    let mut tcp_device = Device::Tcp(Box::new(tcp.await.expect("tls")), BytesMut::new());
    assert_eq!(
        tcp_device.connect("pump-17").await,
        ConnectReturnCode::Success
    );
    let second = ws_connect(
        setup.ws_port(),
        setup.tls(Some("meter-9")),
        PATH,
        Some("mqtt"),
    );
    assert!(second.await.is_err(), "a second connection over WebSocket");
    setup.wait_rejected("connection_limit", 1).await;
    drop(tcp_device);
    setup.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_certificate_is_refused() {
    let setup = Setup::start(&["pump-17"], false).await;
    let upgraded = ws_connect(setup.ws_port(), setup.tls(None), PATH, Some("mqtt")).await;
    assert!(upgraded.is_err(), "upgrade without a client certificate");
    setup.wait_rejected("tls_handshake", 1).await;
    assert_eq!(setup.gateway.metrics().connections.get(), 0);
    setup.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_subprotocol_path_or_plain_http_is_refused_and_counted() {
    let setup = Setup::start(&["pump-17"], false).await;
    let port = setup.ws_port();
    let tls = setup.tls(Some("pump-17"));
    let http_status = |result: Result<Ws, tungstenite::Error>| match result {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("upgrade accepted"),
    };
    let other = ws_connect(port, Arc::clone(&tls), PATH, Some("wamp")).await;
    assert_eq!(http_status(other), 400);
    let none = ws_connect(port, Arc::clone(&tls), PATH, None).await;
    assert_eq!(http_status(none), 400);
    let path = ws_connect(port, Arc::clone(&tls), "/other", Some("mqtt")).await;
    assert_eq!(http_status(path), 404);
    setup.wait_rejected("websocket_handshake", 3).await;

    // Plain HTTP (no upgrade): the connection is closed, and it is counted.
    let mut stream = tls_connect(port, Arc::clone(&tls)).await.expect("tls");
    stream
        .write_all(b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("closed within 10 s");
    // tungstenite answers a request without the upgrade headers with nothing.
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    setup.wait_rejected("websocket_handshake", 4).await;

    // A text message after a good upgrade and CONNECT: closed, counted as malformed.
    let ws = ws_connect(port, tls, PATH, Some("mqtt"))
        .await
        .expect("upgrade");
    let mut device = Device::Ws(Box::new(ws), BytesMut::new());
    assert_eq!(device.connect("pump-17").await, ConnectReturnCode::Success);
    device.send_text("hello").await;
    assert_eq!(device.recv().await, None);
    setup.wait_rejected("malformed_packet", 1).await;
    assert_eq!(setup.gateway.metrics().received.get(), 0);
    setup.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_device_certificate_and_ca_serve_the_next_websocket_handshake() {
    let setup = Setup::start(&["pump-17"], false).await;
    // A new device PKI (new CA, new gateway certificate), as a reload would load it.
    let new_pki = common::dev_pki(&setup.dir.path().join("new"), &["pump-17"]);
    let mut plan = common::gateway_plan(setup.dir.path(), &new_pki, common::free_port());
    plan.device_tls = blindgate::tls::device_server_config(
        &new_pki.device_ca.cert,
        &new_pki.gateway_devices.cert,
        &new_pki.gateway_devices.key,
    )
    .expect("device TLS");
    setup.gateway.apply(&plan, false);

    // The old device certificate (trusting the new gateway certificate) is refused.
    let old_paths = &setup.pki.devices[0].1;
    let old_device = common::client_tls(&new_pki.device_ca.cert, &old_paths.cert, &old_paths.key);
    assert!(
        ws_connect(setup.ws_port(), old_device, PATH, Some("mqtt"))
            .await
            .is_err(),
        "a device of the old CA is refused"
    );
    setup.wait_rejected("tls_handshake", 1).await;
    let new_paths = &new_pki.devices[0].1;
    let new_tls = common::client_tls(&new_pki.device_ca.cert, &new_paths.cert, &new_paths.key);
    let ws = ws_connect(setup.ws_port(), new_tls, PATH, Some("mqtt"))
        .await
        .expect("upgrade with the new PKI");
    let mut device = Device::Ws(Box::new(ws), BytesMut::new());
    assert_eq!(device.connect("pump-17").await, ConnectReturnCode::Success);
    setup.gateway.stop().await;
}

#[test]
fn the_websocket_listener_is_off_by_default_and_checked_like_the_others() {
    let config = |devices: &str| {
        format!(
            "[gateway]\nid = \"gw-1\"\n[devices]\nca = \"/pki/ca.pem\"\ncert = \"/pki/gw.pem\"\n\
             key = \"/pki/gw.key\"\n{devices}\n[cloud]\nendpoints = [\"mqtts://cloud\"]\n\
             ca = \"/pki/cloud-ca.pem\"\ncert = \"/pki/gw-client.pem\"\nkey = \"/pki/gw-client.key\"\n"
        )
    };
    let parse = |devices: &str| {
        blindgate::config::parse(&config(devices), Path::new("/etc/blindgate/gateway.toml"))
    };
    let plan = |devices: &str| {
        let valid = parse(devices).unwrap_or_else(|err| panic!("{err}"));
        blindgate::gateway::GatewayPlan::websocket_from_config(&valid)
    };
    assert_eq!(plan(""), None);
    assert_eq!(plan("websocket_listen = \"\""), None);
    assert_eq!(
        plan("websocket_listen = \"0.0.0.0:8884\""),
        Some(WebSocketListen {
            listen: "0.0.0.0:8884".parse().expect("addr"),
            path: "/mqtt".into(),
        })
    );
    let custom = plan("websocket_listen = \"[::]:443\"\nwebsocket_path = \"/ws/mqtt\"");
    assert_eq!(custom.expect("on").path, "/ws/mqtt");
    let refused = |devices: &str, key: &str, says: &str| {
        let err = parse(devices).expect_err("refused");
        let text = err.to_string();
        assert!(
            err.diagnostics.iter().any(|d| d.key == key),
            "{key}: {text}"
        );
        assert!(text.contains(says), "{says}: {text}");
    };
    refused(
        "websocket_listen = \"0.0.0.0:8883\"",
        "devices.websocket_listen",
        "also used by devices.listen",
    );
    refused(
        "websocket_listen = \"0.0.0.0:8884\"\nwebsocket_path = \"mqtt\"",
        "devices.websocket_path",
        "not a WebSocket request path",
    );
    refused(
        "websocket_lisen = \"0.0.0.0:8884\"",
        "devices.websocket_lisen",
        "websocket_listen",
    );
}
