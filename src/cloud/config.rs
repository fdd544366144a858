//! The cloud ingest's config file (TOML), e.g. `config/cloud.toml`. Unknown keys are
//! errors; relative paths are resolved against the file's directory; the TOML parser's
//! message carries line and column.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use super::registry::{Registry, RegistryError};
use super::{CloudSettings, SinkChoice};
use crate::commands::{Schema, SchemaError};
use crate::config::units::{ByteSize, HumanDuration};
use crate::tls::{CipherOrder, TlsError, UplinkTlsOptions, uplink_client_config};
use crate::topics::{GatewayTemplate, TemplateError};
use crate::uplink::Endpoint;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    broker: BrokerSection,
    store: StoreSection,
    sink: SinkSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    rotation: RotationSection,
    #[serde(default)]
    metrics: MetricsSection,
    #[serde(default)]
    commands: CommandsSection,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BrokerSection {
    /// `mqtts://host:port`.
    url: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default = "default_client_id")]
    client_id: String,
    #[serde(default = "default_subscription")]
    subscription: String,
    #[serde(default = "default_up")]
    up_topic: String,
    #[serde(default = "default_down")]
    down_topic: String,
    #[serde(default = "default_keep_alive")]
    keep_alive: HumanDuration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreSection {
    keys_dir: PathBuf,
    state_dir: PathBuf,
    registry: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkSection {
    jsonl: PathBuf,
    images_dir: PathBuf,
    /// A PostgreSQL connection string: several instances share one database.
    postgres: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LimitsSection {
    max_envelope: ByteSize,
    batch_max: usize,
    batch_delay: HumanDuration,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_envelope: ByteSize(e3::DEFAULT_MAX_ENVELOPE_LEN as u64),
            batch_max: 256,
            batch_delay: HumanDuration(Duration::from_millis(20)),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RotationSection {
    interval: HumanDuration,
    grace: HumanDuration,
}

impl Default for RotationSection {
    fn default() -> Self {
        Self {
            interval: HumanDuration(Duration::from_secs(24 * 3600)),
            grace: HumanDuration(Duration::from_secs(72 * 3600)),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    listen: Option<SocketAddr>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CommandsSection {
    /// The command allowlist (`config/commands.toml`).
    schema: Option<PathBuf>,
}

fn default_client_id() -> String {
    "ingest-1".into()
}
fn default_subscription() -> String {
    "gw/+/e3/+/up".into()
}
fn default_up() -> String {
    "gw/{gateway_id}/e3/{device_id}/up".into()
}
fn default_down() -> String {
    "gw/{gateway_id}/e3/{device_id}/down".into()
}
fn default_keep_alive() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// Key rotation schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationPolicy {
    /// Rotate a device's key when it is this old (default 24 h).
    pub interval: Duration,
    /// How long the previous key still opens uplinks (default 72 h: a backlog can be
    /// days old).
    pub grace: Duration,
}

/// A checked cloud config.
#[derive(Debug, Clone)]
pub struct CloudConfig {
    /// What `cloud::run` needs.
    pub settings: CloudSettings,
    /// The rotation schedule.
    pub rotation: RotationPolicy,
    /// Where `/metrics` is served; `None`: off.
    pub metrics_listen: Option<SocketAddr>,
    /// JSON Lines (one instance) or PostgreSQL (several).
    pub sink: SinkChoice,
    /// The command allowlist `cloud send-command` checks against; `None`: no command
    /// may be sent.
    pub commands: Option<Schema>,
}

/// Why the cloud config is unusable.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CloudConfigError {
    /// The file could not be read.
    #[error("cannot read cloud config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid (the message names line and column).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// `broker.url` is not `mqtts://host:port`.
    #[error("{path}: broker.url must look like mqtts://host:8883")]
    Url {
        /// The file.
        path: PathBuf,
    },
    /// A topic template is invalid.
    #[error("{path}: invalid topic template")]
    Topic {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: TemplateError,
    },
    /// The TLS files are unusable.
    #[error("{path}: broker TLS (ca, cert, key)")]
    Tls {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<TlsError>,
    },
    /// The command schema is unusable.
    #[error("{path}: commands.schema")]
    Commands {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: SchemaError,
    },
    /// The registry is unusable.
    #[error("{path}: registry")]
    Registry {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: RegistryError,
    },
}

fn endpoint(url: &str) -> Option<Endpoint> {
    let rest = url.strip_prefix("mqtts://")?;
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().ok()?),
        None => (rest, 8883),
    };
    (!host.is_empty()).then(|| Endpoint {
        host: host.trim_matches(['[', ']']).to_owned(),
        port,
    })
}

/// Loads and checks a cloud config file.
///
/// # Errors
/// [`CloudConfigError`].
pub fn load(path: &Path) -> Result<CloudConfig, CloudConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| CloudConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file: File = toml::from_str(&text).map_err(|e| CloudConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let at = |p: &Path| base.join(p);
    let err_path = path.to_owned();
    let broker = endpoint(&file.broker.url).ok_or(CloudConfigError::Url {
        path: err_path.clone(),
    })?;
    let template = |t: &str| {
        GatewayTemplate::new(t).map_err(|source| CloudConfigError::Topic {
            path: err_path.clone(),
            source,
        })
    };
    let tls = uplink_client_config(&UplinkTlsOptions {
        ca: at(&file.broker.ca),
        cert: at(&file.broker.cert),
        key: at(&file.broker.key),
        pins_sha256: Vec::new(),
        cipher_order: CipherOrder::Auto,
    })
    .map_err(|source| CloudConfigError::Tls {
        path: err_path.clone(),
        source: Box::new(source),
    })?;
    let registry = match &file.store.registry {
        Some(r) => Some(
            Registry::load(&at(r)).map_err(|source| CloudConfigError::Registry {
                path: err_path.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let commands = match &file.commands.schema {
        Some(schema) => {
            Some(
                Schema::load(&at(schema)).map_err(|source| CloudConfigError::Commands {
                    path: err_path.clone(),
                    source,
                })?,
            )
        }
        None => None,
    };
    let settings = CloudSettings {
        broker,
        tls,
        client_id: file.broker.client_id,
        subscription: file.broker.subscription,
        up_topic: template(&file.broker.up_topic)?,
        down_topic: template(&file.broker.down_topic)?,
        keys_dir: at(&file.store.keys_dir),
        state_dir: at(&file.store.state_dir),
        sink_path: at(&file.sink.jsonl),
        images_dir: at(&file.sink.images_dir),
        registry,
        max_envelope: usize::try_from(file.limits.max_envelope.0).unwrap_or(usize::MAX),
        batch_max: file.limits.batch_max.max(1),
        batch_delay: file.limits.batch_delay.0,
        keep_alive: file.broker.keep_alive.0,
    };
    Ok(CloudConfig {
        settings,
        rotation: RotationPolicy {
            interval: file.rotation.interval.0,
            grace: file.rotation.grace.0,
        },
        metrics_listen: file.metrics.listen,
        sink: file
            .sink
            .postgres
            .map_or(SinkChoice::Jsonl, |url| SinkChoice::Postgres { url }),
        commands,
    })
}
