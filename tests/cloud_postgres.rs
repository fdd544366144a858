//! Scale-out: two cloud ingest instances behind one MQTT shared subscription
//! (`$share/ingest/...`) on a real Mosquitto, sharing one PostgreSQL database that the
//! test starts itself (Debian's `postgresql`). Devices publish through a gateway,
//! duplicates included; every message must be in the table exactly once, both
//! instances must have worked, and every device must get receipts for everything.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blindgate::cloud::{CloudMetrics, CloudRejection, CloudSettings, SinkChoice};
use blindgate::gateway::Gateway;
use blindgate::keys::KeyStore;
use blindgate::pki::DevPki;
use common::cloud_subscriber::CloudSubscriber;
use common::mosquitto::{TlsMode, require_mosquitto, start_cloud_broker};
use rumqttc::{Event, Packet, QoS};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const DEVICES: [&str; 3] = ["pump-17", "meter-9", "valve-3"];
/// Distinct envelopes per device.
const PER_DEVICE: u64 = 100;
/// The database superuser `initdb` creates (trust authentication, loopback only).
const DB_USER: &str = "blindgate";

/// A PostgreSQL server in a temporary directory; stopped (fast shutdown) on drop.
struct Postgres {
    port: u16,
    child: Option<Child>,
    /// Holds `data/` (the cluster), the socket and `postgres.log`.
    dir: tempfile::TempDir,
}

/// The newest `/usr/lib/postgresql/<version>/bin` with `initdb` and `postgres`.
fn postgres_bin() -> Option<PathBuf> {
    let mut bins: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").is_file() && bin.join("postgres").is_file())
        .collect();
    bins.sort();
    bins.pop().map(|(_, bin)| bin)
}

/// The PostgreSQL server binaries, or `None` after a skip message; when `CI` is set a
/// missing server fails the test instead (CI installs it: `.ci/install-test-deps`).
fn require_postgres() -> Option<PathBuf> {
    if let Some(bin) = postgres_bin() {
        return Some(bin);
    }
    let message = "postgresql not installed (no /usr/lib/postgresql/*/bin/initdb); \
                   run .ci/install-test-deps";
    assert!(std::env::var_os("CI").is_none(), "{message} (CI is set)");
    eprintln!("{message}");
    None
}

/// PostgreSQL refuses to run as root: as root, run it as the `postgres` OS user that
/// Debian's package creates (uid and gid from /etc/passwd).
fn server_user() -> Option<(u32, u32)> {
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let fields: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("user postgres exists (created by Debian's postgresql package)")
        .split(':')
        .collect();
    let id = |i: usize| fields.get(i).and_then(|f| f.parse().ok()).expect("uid/gid");
    Some((id(2), id(3)))
}

impl Postgres {
    /// `initdb` into a temporary directory, then the server on a free port of
    /// 127.0.0.1; returns once it accepts logins.
    async fn start(bin: &Path) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let user = server_user();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        let mut db = Self {
            port: 0,
            child: None,
            dir,
        };
        let status = db
            .command(&bin.join("initdb"), user)
            .args(["-D", "data", "-U", DB_USER, "-A", "trust", "-E", "UTF8"])
            .args(["--no-locale", "--no-sync", "--no-instructions"])
            .status()
            .expect("run initdb");
        assert!(status.success(), "initdb failed; its log:\n{}", db.log());
        // Another test may take the free port before the server binds it.
        for _ in 0..3 {
            db.port = common::free_port();
            db.child = Some(
                db.command(&bin.join("postgres"), user)
                    .args(["-D", "data", "-p", &db.port.to_string()])
                    .arg("-k")
                    .arg(db.dir.path())
                    .args(["-c", "listen_addresses=127.0.0.1"])
                    // Nothing here tests power loss; skip the WAL fsyncs.
                    .args(["-c", "fsync=off"])
                    .spawn()
                    .expect("start postgres"),
            );
            if db.wait_ready().await {
                return db;
            }
        }
        panic!("postgres did not start; its log:\n{}", db.log());
    }

    fn command(&self, program: &Path, user: Option<(u32, u32)>) -> Command {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .expect("open postgres.log");
        let mut command = Command::new(program);
        command
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        if let Some((uid, gid)) = user {
            std::os::unix::process::CommandExt::uid(&mut command, uid);
            std::os::unix::process::CommandExt::gid(&mut command, gid);
        }
        command
    }

    /// True once a login works; false if the server exited (e.g. port taken).
    async fn wait_ready(&mut self) -> bool {
        let started = Instant::now();
        while started.elapsed() < WAIT {
            if self.connect().await.is_ok() {
                return true;
            }
            let child = self.child.as_mut().expect("spawned");
            if child.try_wait().expect("poll postgres").is_some() {
                self.child = None;
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "postgres not ready within {WAIT:?}; its log:\n{}",
            self.log()
        );
    }

    fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={DB_USER} dbname=postgres",
            self.port
        )
    }

    async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGINT is PostgreSQL's fast shutdown: it ends the sessions and stops.
        let pid = rustix::process::Pid::from_child(&child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Starts an ingest instance with the PostgreSQL sink behind the shared subscription;
/// its own state directory, the shared key store.
fn start_ingest(
    dir: &Path,
    pki: &DevPki,
    port: u16,
    n: usize,
    url: String,
    stop: &CancellationToken,
) -> CloudMetrics {
    let name = format!("ingest-{n}");
    let mut settings =
        CloudSettings::local(&dir.join(&name), pki, port, &name).expect("ingest settings");
    settings.keys_dir = dir.join("keys");
    settings.subscription = "$share/ingest/gw/+/e3/+/up".into();
    let metrics = CloudMetrics::new();
    tokio::spawn(blindgate::cloud::run_with_sink(
        settings,
        SinkChoice::Postgres { url },
        metrics.clone(),
        stop.clone(),
    ));
    metrics
}

/// Publishes garbage on an uplink topic until each instance refused one: then both
/// have their shared subscription (the broker drops what no subscriber takes).
async fn wait_subscribed(injector: &CloudSubscriber, metrics: &[CloudMetrics]) {
    tokio::time::timeout(WAIT, async {
        while metrics
            .iter()
            .any(|m| m.rejected(CloudRejection::Header) == 0)
        {
            injector
                .publish("gw/probe/e3/probe/up", b"probe".to_vec())
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("both ingest instances subscribed");
}

/// A device on the gateway; a task records the seqs its receipts name.
struct Device {
    id: &'static str,
    client: rumqttc::AsyncClient,
    receipted: Arc<Mutex<BTreeSet<u64>>>,
}

impl Device {
    async fn connect(
        pki: &DevPki,
        gateway: &Gateway,
        id: &'static str,
        key: e3::DeviceKey,
    ) -> Self {
        let paths = &pki.devices.iter().find(|(d, _)| d == id).expect("device").1;
        let tls = common::client_tls(&pki.device_ca.cert, &paths.cert, &paths.key);
        let (client, mut eventloop) = common::mqtt_client(id, gateway.device_addr().port(), tls);
        client
            .subscribe(format!("e3/{id}/down"), QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = eventloop.poll().await {
                break;
            }
        }
        let receipted = Arc::new(Mutex::new(BTreeSet::new()));
        let seqs = Arc::clone(&receipted);
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let (header, plaintext) = key
                            .open(&p.payload)
                            .expect("receipt opens with the device key");
                        assert_eq!(header.kind(), e3::Kind::Receipt);
                        let entries = e3::decode_receipt(&plaintext).expect("valid receipt");
                        seqs.lock().expect("lock").extend(entries.map(|e| e.seq));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Self {
            id,
            client,
            receipted,
        }
    }

    async fn publish(&self, envelope: &[u8]) {
        self.client
            .publish(
                format!("e3/{}/up", self.id),
                QoS::AtLeastOnce,
                false,
                envelope.to_vec(),
            )
            .await
            .expect("publish");
    }

    fn receipted(&self) -> BTreeSet<u64> {
        self.receipted.lock().expect("lock").clone()
    }
}

fn reading(device: &str, seq: u64) -> Vec<u8> {
    format!(
        r#"{{"device_id":"{device}","ts_ms":{seq},"readings":[{{"type":"temperature","value":{seq},"unit":"C"}}]}}"#
    )
    .into_bytes()
}

/// A device's envelopes, sealed up front (the key then moves into its receipt task).
struct Sealed {
    /// Seqs 1..=PER_DEVICE.
    envelopes: Vec<Vec<u8>>,
    /// Seq 200000, which moves the window.
    high: Vec<u8>,
    /// Seq 101, then more than 65536 below the highest: stale.
    stale: Vec<u8>,
}

impl Sealed {
    fn new(id: &str, key: &e3::DeviceKey) -> Self {
        let seal =
            |seq, plaintext: &[u8]| key.seal(e3::Kind::Uplink, seq, plaintext).expect("seal");
        Self {
            envelopes: (1..=PER_DEVICE)
                .map(|seq| seal(seq, &reading(id, seq)))
                .collect(),
            high: seal(200_000, b"{}"),
            stale: seal(101, b"{}"),
        }
    }
}

/// Publishes every envelope, every tenth one twice through the gateway and every
/// 25th again straight to the broker (a second path for the same bytes); returns how
/// many repeats it sent.
async fn publish_with_duplicates(devices: &[(Device, Sealed)], injector: &CloudSubscriber) -> u64 {
    let mut repeats = 0;
    for (device, sealed) in devices {
        for (i, envelope) in sealed.envelopes.iter().enumerate() {
            device.publish(envelope).await;
            if i % 10 == 9 {
                device.publish(envelope).await;
                repeats += 1;
            }
        }
    }
    for (device, sealed) in devices {
        for envelope in sealed.envelopes.iter().step_by(25) {
            let topic = format!("gw/gw-1/e3/{}/up", device.id);
            injector.publish(&topic, envelope.clone()).await;
            repeats += 1;
        }
    }
    repeats
}

/// Every `(device, seq)` in the table, in order.
async fn stored(db: &tokio_postgres::Client) -> Vec<(String, i64)> {
    db.query("SELECT device, seq FROM messages ORDER BY device, seq", &[])
        .await
        .expect("query")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// A stored row holds the gateway and the reading as `jsonb`.
async fn assert_row_content(db: &tokio_postgres::Client, device: &str, seq: u64) {
    let row = db
        .query_one(
            "SELECT gateway, json::text, $3::text::jsonb::text FROM messages \
             WHERE device = $1 AND seq = $2",
            &[
                &device,
                &i64::try_from(seq).expect("small seq"),
                &String::from_utf8(reading(device, seq)).expect("utf-8"),
            ],
        )
        .await
        .expect("query");
    assert_eq!(row.get::<_, String>(0), "gw-1");
    assert_eq!(row.get::<_, String>(1), row.get::<_, String>(2));
}

/// Dropped in field order: servers before the directory that holds their files.
struct Setup {
    stop: CancellationToken,
    injector: CloudSubscriber,
    metrics: Vec<CloudMetrics>,
    broker: common::mosquitto::Mosquitto,
    db: Postgres,
    pki: DevPki,
    dir: tempfile::TempDir,
}

/// Database, broker, and two ingest instances subscribed; `None` to skip.
async fn setup() -> Option<Setup> {
    let bin = require_postgres()?;
    if !require_mosquitto() {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &DEVICES);
    let broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let db = Postgres::start(&bin).await;
    let stop = CancellationToken::new();
    let metrics: Vec<CloudMetrics> = (0..2)
        .map(|n| start_ingest(dir.path(), &pki, broker.port, n, db.url(), &stop))
        .collect();
    let injector = CloudSubscriber::connect(broker.port, &pki, "injector", "probe/none").await;
    wait_subscribed(&injector, &metrics).await;
    Some(Setup {
        stop,
        injector,
        metrics,
        broker,
        db,
        pki,
        dir,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_one_database_store_every_message_exactly_once() {
    let Some(s) = setup().await else {
        return;
    };
    let started = Instant::now();
    let mut plan = common::gateway_plan(s.dir.path(), &s.pki, s.broker.port);
    // Receipts for a busy device may queue up in the gateway; drop none.
    plan.downlink_pending_per_device = 10_000;
    let gateway = Gateway::start(plan).await.expect("gateway");
    let keys = KeyStore::open(&s.dir.path().join("keys")).expect("key store");
    let mut devices = Vec::new();
    for id in DEVICES {
        let key = keys
            .provision(id, e3::Suite::ChaCha20Poly1305)
            .expect("provision");
        let sealed = Sealed::new(id, &key);
        devices.push((Device::connect(&s.pki, &gateway, id, key).await, sealed));
    }
    let repeats = publish_with_duplicates(&devices, &s.injector).await;
    let all: BTreeSet<u64> = (1..=PER_DEVICE).collect();
    for (device, _) in &devices {
        common::wait_until(
            &format!("receipts for every {} message", device.id),
            WAIT,
            || device.receipted().is_superset(&all),
        )
        .await;
    }

    // Seq 101 after seq 200000 is stale: refused, not stored, no receipt.
    let (first, sealed) = &devices[0];
    first.publish(&sealed.high).await;
    common::wait_until("receipt for seq 200000", WAIT, || {
        first.receipted().contains(&200_000)
    })
    .await;
    first.publish(&sealed.stale).await;
    let stale = || {
        s.metrics
            .iter()
            .map(|m| m.rejected(CloudRejection::Stale))
            .sum::<u64>()
    };
    common::wait_until("the stale envelope refused", WAIT, || stale() == 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let db = s.db.connect().await.expect("connect to the database");
    let mut expected: Vec<(String, i64)> = DEVICES
        .iter()
        .flat_map(|d| (1..=100).map(|seq| ((*d).to_owned(), seq)))
        .chain([(first.id.to_owned(), 200_000)])
        .collect();
    expected.sort();
    assert_eq!(
        stored(&db).await,
        expected,
        "every message once, the stale one not"
    );
    assert_row_content(&db, "meter-9", 42).await;

    let accepted: Vec<u64> = s.metrics.iter().map(|m| m.accepted.get()).collect();
    assert!(
        accepted.iter().all(|&n| n > 0),
        "both instances stored some: {accepted:?}"
    );
    assert_eq!(accepted.iter().sum::<u64>(), expected.len() as u64);
    let duplicates: u64 = s
        .metrics
        .iter()
        .map(|m| m.rejected(CloudRejection::Duplicate))
        .sum();
    assert!(
        duplicates >= repeats,
        "{duplicates} duplicates counted, {repeats} sent"
    );
    assert_eq!(
        first.receipted(),
        all.iter().copied().chain([200_000]).collect()
    );
    for (device, _) in &devices[1..] {
        assert_eq!(device.receipted(), all);
    }
    let per_instance: Vec<u64> = s
        .metrics
        .iter()
        .map(|m| m.rejected(CloudRejection::Duplicate))
        .collect();
    eprintln!(
        "{} messages and {repeats} repeats in {:?} (set-up excluded); \
         accepted per instance {accepted:?}, duplicates {per_instance:?}",
        expected.len(),
        started.elapsed()
    );
    gateway.stop().await;
    s.stop.cancel();
}
