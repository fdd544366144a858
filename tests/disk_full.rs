//! A full disk, with the real `blindgate gateway` binary: its data directory on a small
//! tmpfs (mounted by the test, as root) that the queue fills during a cloud outage.
//!
//! - (a) `queue.min_free_disk` (the OS reserve) refuses new records first;
//! - (b) no reserve and a queue cap above the filesystem's size, so the queue's own
//!   writes get `ENOSPC`.
//!
//! Both prove: the gateway keeps running; a publish that was not stored gets no PUBACK
//! (MQTT 3.1.1 has no negative PUBACK: the session holds it and stops reading from
//! that device, so TCP pushes back); every refusal is counted in
//! `blindgate_ingress_rejected_total{reason="queue_full"}`; nothing acknowledged is
//! lost; and once the cloud is back and space is free again, forwarding resumes and the
//! held publishes are stored and acknowledged, without a restart or anyone deleting
//! anything: acknowledgements write nothing, and the drained segment files go, which
//! gives the space back. In (b) the disk also holds 1 MiB of someone else's data.

mod common;
mod queue_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cloud_subscriber::CloudSubscriber;
use common::mosquitto::{TlsMode, require_mosquitto, start_cloud_broker};
use common::proxy::Proxy;
use queue_support::{
    Device, GatewayProcess, QueueSettings, Tmpfs, header_of, require_root, write_config,
};

const DEVICES: [&str; 2] = ["pump-17", "meter-9"];
/// The tmpfs holding `data_dir`.
const DISK: u64 = 6 << 20;
/// Bytes per envelope.
const ENVELOPE: usize = 400;
const QUEUE_FULL: &str = r#"blindgate_ingress_rejected_total{reason="queue_full"}"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// The OS reserve refuses first.
    Reserve,
    /// No reserve: the queue's writes hit ENOSPC.
    Enospc,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_os_reserve_refuses_first_and_the_queue_gives_space_back_after_the_drain() {
    disk_full(Variant::Reserve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_hits_enospc_and_recovers_once_space_is_free() {
    disk_full(Variant::Enospc).await;
}

async fn disk_full(variant: Variant) {
    if !require_mosquitto() || !require_root("disk_full") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::dev_pki(dir.path(), &DEVICES);
    let disk = Tmpfs::mount(&dir.path().join("disk"), DISK);
    // (b): 1 MiB of someone else's data on the same disk (logs, say).
    if variant == Variant::Enospc {
        std::fs::write(disk.path.join("other-data"), vec![0x5a; 1 << 20]).expect("other file");
    }
    let mut broker = start_cloud_broker(&dir.path().join("broker"), &pki, TlsMode::Tls13MutualAuth);
    let proxy = Proxy::start(([127, 0, 0, 1], broker.port).into())
        .await
        .expect("link");
    let cloud = CloudSubscriber::connect(broker.port, &pki, "ingest-1", "gw/+/e3/+/up").await;
    let (device_port, metrics_port) = (common::free_port(), common::free_port());
    let queue = match variant {
        Variant::Reserve => QueueSettings {
            max_bytes: "64MiB",
            min_free_disk: "1MiB",
            device_quota: "32MiB",
        },
        Variant::Enospc => QueueSettings {
            max_bytes: "64MiB",
            min_free_disk: "0B",
            device_quota: "64MiB",
        },
    };
    let config = write_config(
        dir.path(),
        &disk.path.join("data"),
        &pki,
        device_port,
        proxy.port,
        metrics_port,
        &queue,
    );
    proxy.cut();
    let mut gateway = GatewayProcess::spawn(
        &config,
        device_port,
        metrics_port,
        &dir.path().join("gateway.log"),
    );
    let free_at_start = disk.free();

    // 1. The cloud is unreachable; devices publish until the disk refuses: refusals are
    // counted and no PUBACK has come for 2 s.
    let devices: Vec<Device> = DEVICES
        .iter()
        .map(|d| Device::start(&pki, d, device_port, ENVELOPE, 1_000_000))
        .collect();
    let acked_total = |devices: &[Device]| devices.iter().map(Device::acked_count).sum::<u64>();
    let fill_started = Instant::now();
    let (mut last_acked, mut last_change) = (0, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let acked = acked_total(&devices);
        if acked != last_acked {
            (last_acked, last_change) = (acked, Instant::now());
        }
        if gateway.metric(QUEUE_FULL) > 0 && last_change.elapsed() > Duration::from_secs(2) {
            break;
        }
        assert!(
            gateway.alive(),
            "gateway died; log:\n{}",
            gateway.log_text()
        );
        assert!(
            fill_started.elapsed() < Duration::from_secs(120),
            "the disk did not fill within 120 s ({acked} acknowledged); log:\n{}",
            gateway.log_text()
        );
    }
    let fill_time = fill_started.elapsed();
    for device in &devices {
        device.stop_publishing();
    }

    // 2. Held: still running, no PUBACK for what was not stored, the refusals counted,
    // every acknowledged record in the queue.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stored_before_full = acked_total(&devices);
    assert_eq!(
        stored_before_full, last_acked,
        "a PUBACK arrived while the disk was full"
    );
    assert!(
        gateway.alive(),
        "gateway died; log:\n{}",
        gateway.log_text()
    );
    let metrics = gateway.metrics();
    let metric = |series: &str| queue_support::metric_value(&metrics, series);
    let refusals = metric(QUEUE_FULL);
    let published: u64 = devices.iter().map(Device::published).sum();
    let held = published - stored_before_full;
    assert!(refusals > 0, "no refusal counted");
    assert!(held > 0, "nothing was held");
    assert_eq!(
        metric("blindgate_ingress_received_total"),
        stored_before_full,
        "received_total counts exactly the acknowledged publishes"
    );
    // The queue counts the held records it admitted too (at most a batch per device).
    let queued = metric("blindgate_queue_records");
    assert!(
        queued >= stored_before_full && queued <= published,
        "every acknowledged record is in the queue: {queued} queued, {stored_before_full} acknowledged"
    );
    assert!(cloud.received().is_empty(), "the cloud was unreachable");
    let free_when_full = disk.free();
    let log = gateway.log_text();
    let storage_errors = log.matches("queue write failed").count();
    match variant {
        Variant::Reserve => assert!(
            free_when_full >= 512 << 10,
            "the reserve should have kept space free ({free_when_full} bytes left)"
        ),
        Variant::Enospc => assert!(
            storage_errors > 0,
            "the queue should have hit ENOSPC; log:\n{log}"
        ),
    }

    // 3. The cloud comes back; nobody deletes anything.
    let restored = Instant::now();
    proxy.restore();
    // 4. Every publish gets its PUBACK (the held ones too) and reaches the cloud once
    // stored; nothing acknowledged is lost.
    let deadline = Instant::now() + Duration::from_secs(120);
    let all_acked = |devices: &[Device]| devices.iter().all(|d| d.acked_count() == d.published());
    let arrived = |cloud: &CloudSubscriber| -> BTreeSet<(String, u64)> {
        cloud.received().iter().map(|(_, p)| header_of(p)).collect()
    };
    let expected: BTreeSet<(String, u64)> = devices
        .iter()
        .flat_map(|d| (1..=d.published()).map(|seq| (d.name.clone(), seq)))
        .collect();
    assert_eq!(expected.len() as u64, published, "publishing stopped");
    let mut held_done_after = None;
    loop {
        if held_done_after.is_none() && all_acked(&devices) {
            held_done_after = Some(restored.elapsed());
        }
        if held_done_after.is_some() && arrived(&cloud).is_superset(&expected) {
            break;
        }
        assert!(
            gateway.alive(),
            "gateway died; log:\n{}",
            gateway.log_text()
        );
        if Instant::now() > deadline {
            let got = arrived(&cloud);
            let acked: u64 = acked_total(&devices);
            panic!(
                "not done 120 s after the cloud came back: {acked}/{published} acknowledged, \
                 {}/{} at the cloud, {} forwarded; log:\n{}",
                got.intersection(&expected).count(),
                expected.len(),
                gateway.metric("blindgate_uplink_forwarded_total"),
                gateway.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained_after = restored.elapsed();
    let acked: BTreeSet<(String, u64)> = devices
        .iter()
        .flat_map(|d| d.acked().into_iter().map(|seq| (d.name.clone(), seq)))
        .collect();
    let got = arrived(&cloud);
    let lost = acked.difference(&got).count();
    assert_eq!(lost, 0, "acknowledged but lost");
    let metrics = gateway.metrics();
    let metric = |series: &str| queue_support::metric_value(&metrics, series);
    let log = gateway.log_text();
    // The drained segments are gone: the space is back (the state database and the
    // active segment stay).
    let space_back = Instant::now() + Duration::from_secs(10);
    let mut free_after = disk.free();
    while free_after + (1 << 20) < free_at_start && Instant::now() < space_back {
        tokio::time::sleep(Duration::from_millis(200)).await;
        free_after = disk.free();
    }
    assert!(
        free_after + (1 << 20) >= free_at_start,
        "the queue should have given its space back: {free_after} bytes free, {free_at_start} at start; files: {:?}",
        std::process::Command::new("du")
            .arg("-ab")
            .arg(disk.path.join("data"))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    );
    eprintln!(
        "disk full ({variant:?}): disk {} KiB ({} KiB free at start{}; {} KiB when full, {} KiB \
         now); {stored_before_full} records stored before full in {:.1} s; {refusals} \
         refusals (queue_full), {held} publishes held without PUBACK, {storage_errors} \
         storage failures logged; after the cloud came back: held publishes acknowledged \
         after {:.1} s, all {} at the cloud after {:.1} s ({} duplicates); lost {lost}",
        disk.size >> 10,
        free_at_start >> 10,
        if variant == Variant::Enospc {
            " and 1 MiB of other data"
        } else {
            ""
        },
        free_when_full >> 10,
        free_after >> 10,
        fill_time.as_secs_f64(),
        held_done_after.unwrap_or_default().as_secs_f64(),
        expected.len(),
        drained_after.as_secs_f64(),
        cloud.received().len() - got.len(),
    );
    assert_eq!(
        metric("blindgate_ingress_received_total"),
        published,
        "metrics:\n{metrics}\nlog:\n{log}"
    );
    assert!(gateway.stop(), "gateway did not stop cleanly after SIGTERM");
    broker.stop();
    drop(disk);
}
