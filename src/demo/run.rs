//! The demo's script: PKI and device keys, cloud broker, cloud ingest, gateway (from a
//! written config file, through the real config path), simulated sensors and a camera;
//! a cloud outage in the middle; then a count of what arrived.

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio_util::sync::CancellationToken;

use super::broker::{BrokerError, start_cloud_broker};
use super::link::Link;
use super::report::{DemoReport, tally, timeline};
use crate::clock::now_ms;
use crate::cloud::{CloudMetrics, CloudSettings};
use crate::device::{DeviceConfig, DeviceReport, PayloadKind};
use crate::gateway::{Gateway, GatewayPlan};
use crate::keys::KeyStore;
use crate::pki::{DevPki, DevPkiOptions, generate_dev_pki};

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where everything goes; a new directory under the system's temp dir if `None`.
    pub dir: Option<PathBuf>,
    /// Sensor devices.
    pub sensors: usize,
    /// Readings per second per sensor.
    pub rate: f64,
    /// How long devices produce new messages.
    pub duration: Duration,
    /// When the cloud link is cut, from the start.
    pub outage_at: Duration,
    /// How long it stays cut.
    pub outage: Duration,
    /// Camera images to send, and their size.
    pub images: u32,
    /// Bytes per image.
    pub image_size: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            dir: None,
            sensors: 3,
            rate: 5.0,
            duration: Duration::from_secs(30),
            outage_at: Duration::from_secs(10),
            outage: Duration::from_secs(6),
            images: 2,
            image_size: 1_600_000,
        }
    }
}

/// Why the demo could not run.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DemoError {
    /// Setting up files failed.
    #[error("demo setup failed: {what}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The cloud broker did not start.
    #[error("cloud broker")]
    Broker(#[from] BrokerError),
}

fn setup<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> DemoError {
    move |source| DemoError::Setup {
        what,
        source: Box::new(source),
    }
}

const GATEWAY: &str = "gw-1";
const CAMERA: &str = "cam-1";
/// The smaller of common cloud brokers' message limits (E3-SPEC).
const MAX_ENVELOPE: usize = 131_072;

/// Runs the demo and returns what it observed.
///
/// # Errors
/// [`DemoError`] if the system could not be set up (not for lost messages: those are
/// in the report).
pub async fn run_demo(options: DemoOptions) -> Result<DemoReport, DemoError> {
    let dir = match &options.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("blindgate-demo-{}", now_ms())),
    };
    std::fs::create_dir_all(&dir).map_err(setup("demo directory"))?;
    let sensors: Vec<String> = (1..=options.sensors)
        .map(|n| format!("sensor-{n}"))
        .collect();
    let mut devices = sensors.clone();
    devices.push(CAMERA.to_owned());

    let pki = generate_dev_pki(&DevPkiOptions {
        out_dir: dir.join("certs"),
        gateway_id: GATEWAY.into(),
        devices: devices.clone(),
        cloud_host: "localhost".into(),
        validity_days: 2,
        force: true,
    })
    .map_err(setup("dev PKI"))?;
    let key_files = provision(&dir, &devices)?;
    write_registry(&dir, &devices)?;

    let broker = start_cloud_broker(
        &pki.cloud_ca.cert,
        &pki.cloud_broker.cert,
        &pki.cloud_broker.key,
    )?;
    let link = Link::start(broker).await.map_err(setup("cloud link"))?;
    let stop = CancellationToken::new();
    let cloud_metrics = CloudMetrics::new();
    let cloud = tokio::spawn(crate::cloud::run(
        cloud_settings(&dir, &pki, broker.port())?,
        cloud_metrics.clone(),
        stop.child_token(),
    ));
    if !cloud_metrics.wait_subscribed(Duration::from_secs(30)).await {
        tracing::warn!(
            "the cloud ingest is not subscribed yet; devices will resend what it misses"
        );
    }
    let config = write_gateway_config(&dir, &pki, link.port)?;
    let valid = crate::config::load(&config).map_err(setup("gateway config"))?;
    let plan = GatewayPlan::from_config(&valid).map_err(setup("gateway plan"))?;
    let gateway = Gateway::start(plan).await.map_err(setup("gateway"))?;

    let device_stop = stop.child_token();
    let mut running = Vec::new();
    for (device, key_file) in devices.iter().zip(&key_files) {
        let config = device_config(&options, &dir, &pki, device, key_file, &gateway);
        running.push(tokio::spawn(crate::device::run_device(
            config,
            device_stop.clone(),
        )));
    }
    let deadline = options.duration + options.outage + Duration::from_secs(90);
    let finished = CancellationToken::new();
    let (reports, queue_peak) = tokio::join!(
        async {
            let reports = collect(running, deadline, &device_stop).await;
            finished.cancel();
            reports
        },
        timeline(
            gateway.queue().clone(),
            &link,
            options.outage_at,
            options.outage,
            finished.clone()
        ),
    );
    // Let the last receipts' batch reach the sink before counting.
    gateway.stop().await;
    stop.cancel();
    let _ = cloud.await;
    let outage = (options.outage_at, options.outage);
    Ok(tally(&dir, &reports, queue_peak, outage, &cloud_metrics))
}

fn provision(dir: &Path, devices: &[String]) -> Result<Vec<PathBuf>, DemoError> {
    let store = KeyStore::open(&dir.join("cloud/keys")).map_err(setup("key store"))?;
    let out = dir.join("device-keys");
    std::fs::create_dir_all(&out).map_err(setup("device key directory"))?;
    let mut files = Vec::new();
    for (n, device) in devices.iter().enumerate() {
        // Both suites in one run: odd devices AES-256-GCM, even ChaCha20-Poly1305.
        let suite = if n % 2 == 0 {
            e3::Suite::ChaCha20Poly1305
        } else {
            e3::Suite::Aes256Gcm
        };
        let key = store
            .provision(device, suite)
            .map_err(setup("device key"))?;
        let path = out.join(format!("{device}.key"));
        e3::write_key_file(&path, &key, true).map_err(setup("device key file"))?;
        files.push(path);
    }
    Ok(files)
}

fn write_registry(dir: &Path, devices: &[String]) -> Result<(), DemoError> {
    let list = |items: &[String]| {
        items
            .iter()
            .map(|d| format!("\"{d}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = format!(
        "[[tenant]]\nname = \"demo\"\ngateways = [\"{GATEWAY}\"]\ndevices = [{}]\n",
        list(devices)
    );
    std::fs::write(dir.join("cloud/registry.toml"), text).map_err(setup("registry"))
}

fn cloud_settings(dir: &Path, pki: &DevPki, port: u16) -> Result<CloudSettings, DemoError> {
    let mut settings =
        CloudSettings::local(&dir.join("cloud"), pki, port, "ingest-1").map_err(setup("ingest"))?;
    let registry = crate::cloud::registry::Registry::load(&dir.join("cloud/registry.toml"))
        .map_err(setup("registry"))?;
    settings.registry = Some(registry);
    settings.max_envelope = MAX_ENVELOPE;
    settings.batch_max = 256;
    settings.batch_delay = Duration::from_millis(20);
    Ok(settings)
}

fn write_gateway_config(dir: &Path, pki: &DevPki, cloud_port: u16) -> Result<PathBuf, DemoError> {
    let p = |path: &Path| path.display().to_string();
    let text = format!(
        r#"# Written by `blindgate demo`; a working gateway config for this run.
[gateway]
id = "{GATEWAY}"
data_dir = "{data}"

[devices]
listen = "127.0.0.1:0"
ca = "{dca}"
cert = "{dcert}"
key = "{dkey}"

[envelope]
max_size = "128KiB"

[cloud]
endpoints = ["mqtts://localhost:{cloud_port}"]
ca = "{cca}"
cert = "{ccert}"
key = "{ckey}"
backoff_min = "200ms"
backoff_max = "2s"
keep_alive = "5s"
drain_rate = 500

[queue]
max_bytes = "64MiB"
min_free_disk = "16MiB"

[metrics]
listen = "127.0.0.1:0"

[log]
level = "warn"
"#,
        data = p(&dir.join("gateway")),
        dca = p(&pki.device_ca.cert),
        dcert = p(&pki.gateway_devices.cert),
        dkey = p(&pki.gateway_devices.key),
        cca = p(&pki.cloud_ca.cert),
        ccert = p(&pki.gateway_client.cert),
        ckey = p(&pki.gateway_client.key),
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).map_err(setup("gateway config"))?;
    Ok(path)
}

fn device_config(
    options: &DemoOptions,
    dir: &Path,
    pki: &DevPki,
    device: &str,
    key_file: &Path,
    gateway: &Gateway,
) -> DeviceConfig {
    let paths = pki
        .devices
        .iter()
        .find(|(id, _)| id == device)
        .map(|(_, p)| p.clone())
        .unwrap_or_else(|| pki.gateway_devices.clone());
    let mut config = DeviceConfig::new(
        device,
        paths.cert,
        paths.key,
        pki.device_ca.cert.clone(),
        key_file.to_owned(),
        gateway.device_addr(),
        dir.join("device-state"),
    );
    config.max_envelope = MAX_ENVELOPE;
    config.resend_after = Duration::from_secs(8);
    let seconds = options.duration.as_secs_f64();
    if device == CAMERA {
        config.payload = PayloadKind::Images {
            size: options.image_size,
            every: 1,
        };
        config.rate_per_sec = f64::from(options.images.max(1)) / seconds.max(1.0);
        config.count = Some(u64::from(options.images));
    } else {
        config.rate_per_sec = options.rate;
        // Truncation is intended: whole messages.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "small positive counts"
        )]
        let count = (options.rate * seconds) as u64;
        config.count = Some(count.max(1));
    }
    config
}

async fn collect(
    running: Vec<tokio::task::JoinHandle<Result<DeviceReport, crate::device::DeviceError>>>,
    deadline: Duration,
    stop: &CancellationToken,
) -> Vec<DeviceReport> {
    let give_up = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            tracing::warn!("demo deadline reached; stopping devices");
            stop.cancel();
        })
    };
    let mut reports = Vec::new();
    for task in running {
        match task.await {
            Ok(Ok(report)) => reports.push(report),
            Ok(Err(err)) => tracing::error!(error = %err, "a simulated device failed"),
            Err(err) => tracing::error!(error = %err, "a simulated device panicked"),
        }
    }
    give_up.abort();
    reports
}
