//! From a checked config file to a [`GatewayPlan`]: loads and checks the TLS material
//! (so a bad certificate stops the start with a clear error, before anything listens)
//! and fills in the settings the file does not expose.

use std::path::PathBuf;

use thiserror::Error;

use super::GatewayPlan;
use crate::config::{KeySource, ValidConfig};
use crate::ingress::{IngressSettings, WebSocketListen};
use crate::queue::QueueConfig;
use crate::tls::{
    TlsError, UplinkTlsOptions, device_server_config, device_server_config_with_token,
    uplink_client_config, uplink_client_config_with_token,
};
use crate::uplink::UplinkSettings;

/// Bytes of MQTT framing and topic allowed on top of the largest envelope.
const PACKET_OVERHEAD: usize = 1024;
/// Envelope bytes all device connections together may hold while the queue is busy.
const INGRESS_INFLIGHT_BYTES: usize = 16 << 20;

/// Why a config could not become a plan.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The device listener's TLS material is unusable.
    #[error("device listener TLS ([devices] ca, cert, key, pkcs11_*)")]
    DeviceTls(#[source] TlsError),
    /// The uplink's TLS material is unusable.
    #[error("uplink TLS ([cloud] ca, cert, key, pkcs11_*)")]
    UplinkTls(#[source] TlsError),
    /// The data directory cannot be created.
    #[error("cannot create data directory {path}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl GatewayPlan {
    /// Builds the plan for `config`, creating `gateway.data_dir` (mode 0700) if needed.
    ///
    /// # Errors
    /// [`PlanError`] naming the part that is unusable.
    pub fn from_config(config: &ValidConfig) -> Result<Self, PlanError> {
        let data_dir = &config.gateway.data_dir;
        create_private_dir(data_dir).map_err(|source| PlanError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
        let devices = &config.devices;
        let cloud = &config.cloud;
        let max_envelope = usize::try_from(config.envelope.max_size).unwrap_or(usize::MAX);
        let device_tls = match &devices.key {
            KeySource::File(key) => device_server_config(&devices.ca, &devices.cert, key),
            KeySource::Pkcs11(token_key) => {
                device_server_config_with_token(&devices.ca, &devices.cert, token_key)
            }
        }
        .map_err(PlanError::DeviceTls)?;
        let uplink_options = UplinkTlsOptions {
            ca: cloud.ca.clone(),
            cert: cloud.cert.clone(),
            key: PathBuf::from(cloud.key.describe()),
            pins_sha256: cloud.pins.clone(),
            cipher_order: cloud.cipher_order,
        };
        let uplink_tls = match &cloud.key {
            KeySource::File(_) => uplink_client_config(&uplink_options),
            KeySource::Pkcs11(token_key) => {
                uplink_client_config_with_token(&uplink_options, token_key)
            }
        }
        .map_err(PlanError::UplinkTls)?;
        let q = &config.queue;
        Ok(Self {
            queue: QueueConfig {
                path: data_dir.join("queue"),
                max_bytes: q.max_bytes,
                min_free_disk: q.min_free_disk,
                device_quota: q.device_quota,
                overflow: q.overflow,
                cache_size: q.cache_size,
                max_batch: q.max_batch,
            },
            ingress: IngressSettings {
                up_topic: devices.up_topic.clone(),
                down_topic: devices.down_topic.clone(),
                max_envelope,
                max_packet: max_envelope.saturating_add(PACKET_OVERHEAD),
                max_connections: devices.max_connections,
                max_inflight: usize::from(devices.max_inflight_per_device),
                rate_per_sec: devices.rate_limit_per_device,
                rate_burst: devices.rate_burst_per_device,
                connect_timeout: devices.connect_timeout,
                inflight_bytes: INGRESS_INFLIGHT_BYTES.max(max_envelope),
            },
            device_tls,
            device_listen: devices.listen,
            plaintext_listen: devices.plaintext_listen,
            uplink: UplinkSettings {
                endpoints: cloud.endpoints.clone(),
                tls: uplink_tls,
                client_id: if cloud.client_id.is_empty() {
                    config.gateway.id.clone()
                } else {
                    cloud.client_id.clone()
                },
                keep_alive: cloud.keep_alive,
                window: usize::from(cloud.inflight),
                backoff_min: cloud.backoff_min,
                backoff_max: cloud.backoff_max,
                up_topic: cloud.up_topic.clone(),
                down_topic: cloud.down_topic.clone(),
                max_envelope,
                drain_rate: cloud.drain_rate,
                drain_window: usize::from(cloud.drain_inflight),
            },
            downlink_pending_per_device: devices.downlink_pending_per_device,
            metrics_listen: config.metrics.listen,
            ready_max_ack_age: cloud.ready_max_ack_age,
        })
    }
}

impl GatewayPlan {
    /// The WebSocket device listener `config` asks for (`[devices] websocket_listen`),
    /// `None` when it is off (the default). It shares the TLS listener's certificate,
    /// CA, limits and sessions; only the address and the path are its own.
    pub fn websocket_from_config(config: &ValidConfig) -> Option<WebSocketListen> {
        let devices = &config.devices;
        devices.websocket_listen.map(|listen| WebSocketListen {
            listen,
            path: devices.websocket_path.clone(),
        })
    }
}

fn create_private_dir(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}
