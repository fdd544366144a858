//! `blindgate demo`, shortened: the whole system on loopback (embedded rumqttd, cloud
//! ingest, gateway, simulated sensors and a camera) with a cloud outage; nothing may be
//! lost or stored twice, and the image must arrive with the right SHA-256.

use std::time::Duration;

use blindgate::demo::{DemoOptions, run_demo};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_loses_nothing_through_a_cloud_outage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = run_demo(DemoOptions {
        dir: Some(dir.path().to_owned()),
        sensors: 2,
        rate: 10.0,
        duration: Duration::from_secs(6),
        outage_at: Duration::from_secs(2),
        outage: Duration::from_secs(2),
        images: 1,
        image_size: 300_000,
    })
    .await
    .expect("demo runs");
    println!("{report}");
    assert!(report.ok(), "{report}");
    assert_eq!(report.lost, 0);
    assert_eq!(report.duplicates_in_sink, 0);
    assert_eq!(
        report.images, 1,
        "the camera image was reassembled and verified"
    );
    assert!(
        report.delivered >= 120,
        "2 sensors x 10/s x 6 s, plus image chunks"
    );
    assert!(
        report.queue_peak > 0,
        "the outage made the gateway queue records"
    );
}
