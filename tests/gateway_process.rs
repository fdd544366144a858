//! The `blindgate gateway` binary as a process: killed with SIGKILL while the cloud is
//! unreachable, restarted, and stopped with SIGTERM. Every envelope a device got a
//! PUBACK for must reach the cloud subscriber (Mosquitto, mutual TLS 1.3).

mod common;

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blindgate::pki::DevPki;
use common::cloud_subscriber::CloudSubscriber;
use common::gateway_config::GatewayConfig;
use common::mosquitto::{TlsMode, require_mosquitto, start_cloud_broker};
use common::proxy::Proxy;
use rumqttc::{Event, Packet, QoS};

const DEVICE: &str = "pump-17";

fn write_config(dir: &Path, pki: &DevPki, device_port: u16, cloud_port: u16) -> PathBuf {
    GatewayConfig::new(&dir.join("data"), pki, device_port, cloud_port)
        .write(&dir.join("gateway.toml"))
}

fn spawn_gateway(config: &Path, device_port: u16, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_blindgate"))
        .args(["gateway", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("gateway starts");
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", device_port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "gateway did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Publishes envelopes with increasing seq from `next_seq` until the connection
/// breaks or `limit` is reached; returns the seqs that got a PUBACK.
async fn publish_until_broken(pki: &DevPki, port: u16, next_seq: &mut u64, limit: u64) -> Vec<u64> {
    let (_, paths) = &pki.devices[0];
    let tls = common::client_tls(&pki.device_ca.cert, &paths.cert, &paths.key);
    let (client, mut eventloop) = common::mqtt_client(DEVICE, port, tls);
    let first = *next_seq;
    let count = limit;
    *next_seq += count;
    tokio::spawn(async move {
        for seq in first..first + count {
            let envelope = seal(seq);
            if client
                .publish(format!("e3/{DEVICE}/up"), QoS::AtLeastOnce, false, envelope)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // rumqttc gives packet ids in publish order and the gateway acks in order, so the
    // n-th PUBACK is for the n-th publish.
    let mut acked = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => break,
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked.push(first + acked.len() as u64);
                    if acked.len() as u64 == count {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            },
        }
    }
    acked
}

/// The device's envelope number `seq`.
fn seal(seq: u64) -> Vec<u8> {
    let key = e3::DeviceKey::new(
        e3::DeviceId::new(DEVICE).expect("valid"),
        1,
        e3::Suite::ChaCha20Poly1305,
        [0x17; 32],
    );
    key.seal(e3::Kind::Uplink, seq, format!("reading {seq}").as_bytes())
        .expect("seal")
}

fn seq_of(envelope: &[u8]) -> u64 {
    e3::Header::parse(envelope).expect("valid envelope").seq()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_the_cloud_is_down_loses_nothing_that_was_acknowledged() {
    if !require_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &[DEVICE]);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let proxy = Proxy::start(([127, 0, 0, 1], broker.port).into())
        .await
        .expect("link");
    let cloud = CloudSubscriber::connect(broker.port, &pki, "ingest-1", "gw/+/e3/+/up").await;
    let device_port = common::free_port();
    let config = write_config(dir.path(), &pki, device_port, proxy.port);
    let log = dir.path().join("gateway.log");
    proxy.cut();

    let mut next_seq = 1;
    let mut acked = BTreeSet::new();
    let rounds = 5;
    for round in 0..rounds {
        let mut gateway = spawn_gateway(&config, device_port, &log);
        let kill_after = Duration::from_millis(200 + 150 * round);
        let publishing = publish_until_broken(&pki, device_port, &mut next_seq, 100_000);
        let killer = async {
            tokio::time::sleep(kill_after).await;
            gateway.kill().expect("SIGKILL");
            gateway.wait().expect("reaped");
        };
        let (round_acked, ()) = tokio::join!(publishing, killer);
        assert!(
            !round_acked.is_empty(),
            "round {round}: nothing acknowledged before the kill"
        );
        acked.extend(round_acked);
    }
    assert!(cloud.received().is_empty(), "the cloud was unreachable");

    let mut gateway = spawn_gateway(&config, device_port, &log);
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(30);
    let received: BTreeSet<u64> = loop {
        let seen: BTreeSet<u64> = cloud.received().iter().map(|(_, p)| seq_of(p)).collect();
        if acked.is_subset(&seen) || Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let lost: Vec<&u64> = acked.difference(&received).collect();
    println!(
        "gateway crash test: {rounds} kill -9 rounds, {} envelopes acknowledged, {} lost, {} received",
        acked.len(),
        lost.len(),
        received.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged but lost: {lost:?} (log: {})",
        log.display()
    );
    // Per-device order: first arrivals come in increasing seq order.
    let mut first_seen = BTreeSet::new();
    let firsts: Vec<u64> = cloud
        .received()
        .iter()
        .map(|(_, p)| seq_of(p))
        .filter(|seq| first_seen.insert(*seq))
        .collect();
    assert!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "order broken: {firsts:?}"
    );
    gateway.kill().expect("kill");
    gateway.wait().expect("reaped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_within_seconds_and_the_next_start_resumes() {
    if !require_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &[DEVICE]);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let proxy = Proxy::start(([127, 0, 0, 1], broker.port).into())
        .await
        .expect("link");
    let cloud = CloudSubscriber::connect(broker.port, &pki, "ingest-1", "gw/+/e3/+/up").await;
    let device_port = common::free_port();
    let config = write_config(dir.path(), &pki, device_port, proxy.port);
    let log = dir.path().join("gateway.log");
    proxy.cut();

    let gateway = spawn_gateway(&config, device_port, &log);
    let mut next_seq = 1;
    let acked = publish_until_broken(&pki, device_port, &mut next_seq, 50).await;
    assert_eq!(acked.len(), 50);
    let pid = rustix::process::Pid::from_child(&gateway);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    let stopping = Instant::now();
    let mut gateway = gateway;
    let status = loop {
        if let Some(status) = gateway.try_wait().expect("wait") {
            break status;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(5),
            "still running 5 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
    println!("gateway stopped {:?} after SIGTERM", stopping.elapsed());

    let mut gateway = spawn_gateway(&config, device_port, &log);
    proxy.restore();
    let received = cloud.wait_for(50, Duration::from_secs(20)).await;
    let seqs: Vec<u64> = received.iter().map(|(_, p)| seq_of(p)).collect();
    assert_eq!(seqs, (1..=50).collect::<Vec<u64>>());
    gateway.kill().expect("kill");
    gateway.wait().expect("reaped");
}
