//! The gateway's config file (TOML): what a field technician may write, its defaults,
//! and [`load`], which turns the file into a [`ValidConfig`] that later code uses
//! without checking anything again.
//!
//! Reading happens in two stages. First serde reads the file into `Raw*` structs
//! (every key optional, `#[serde(deny_unknown_fields)]`, each value with its span);
//! the `diagnostics` module collects every unknown key and wrongly typed value. Then each
//! section is checked key by key (ranges, syntax of addresses, topics, pins) and
//! across keys, and defaults fill what the file leaves out. Every problem is reported
//! at once with `file:line:column`; nothing falls back to a default silently.
//!
//! Only the file itself is checked by [`load`] and [`parse`]: whether certificate
//! files exist and fit together, ports are free and the disk is large enough is
//! checked by [`load_checked`] (the `check` module, used by `blindgate check-config`
//! and before a reload). Relative paths are resolved against the directory of the
//! config file. `config/gateway.toml` is the commented example (installed as
//! `/etc/blindgate/gateway.toml`); it and the `Default:` lines below must agree (a
//! test compares them).

mod check;
mod check_pkcs11;
mod diagnostics;
mod key_source;
pub mod units;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub use check::{
    CheckReport, Checked, ConfigKind, EXIT_DO_NOT_RESTART, EXIT_ERRORS, EXIT_OK, EXIT_UNREADABLE,
    EXPIRY_WARNING_DAYS, PortCheck, check_command, check_config_file, load_checked,
};
pub use diagnostics::{ConfigError, Diagnostic, Severity};
pub use key_source::KeySource;

use diagnostics::{Positions, Problem, Reporter, did_you_mean, field_names};
use units::{ByteSize, Count, HumanDuration, format_byte_size, format_duration};

pub use crate::logging::LogFormat;
pub use crate::queue::Overflow;
pub use crate::tls::CipherOrder;
pub use crate::topics::TopicTemplate;
pub use crate::uplink::Endpoint;

const DEVICE_PLACEHOLDER: &str = "{device_id}";
const GATEWAY_PLACEHOLDER: &str = "{gateway_id}";

/// Builds a template that passed [`check_topic`] (which is stricter than
/// [`TopicTemplate::new`] and reports problems with their position).
fn bind_topic(template: &str, gateway_id: &str) -> Option<TopicTemplate> {
    TopicTemplate::new(template, gateway_id).ok()
}

/// The checked configuration. Every field has its final type and value (defaults
/// applied, relative paths resolved), so nothing needs checking after [`load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidConfig {
    /// `[gateway]`: who this gateway is and where it keeps its state.
    pub gateway: GatewaySection,
    /// `[devices]`: the listener devices connect to.
    pub devices: DevicesSection,
    /// `[envelope]`: limits on E3 envelopes.
    pub envelope: EnvelopeSection,
    /// `[queue]`: the durable store-and-forward queue.
    pub queue: QueueSection,
    /// `[cloud]`: the uplink to the cloud broker.
    pub cloud: CloudSection,
    /// `[metrics]`: the Prometheus and health endpoint.
    pub metrics: MetricsSection,
    /// `[log]`: log output.
    pub log: LogSection,
}

/// `[gateway]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewaySection {
    /// The gateway's id: 1 to 64 of `[A-Za-z0-9._-]`, like an E3 device id. Required.
    /// It names the gateway in cloud topics and is the default MQTT client id.
    pub id: String,
    /// Where the queue and other state live. Default: `/var/lib/blindgate`.
    pub data_dir: PathBuf,
}

/// `[devices]`: MQTT over TLS 1.3 with client certificates required.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicesSection {
    /// TLS listener address. Default: `0.0.0.0:8883`.
    pub listen: SocketAddr,
    /// CA bundle device certificates must chain to. Required.
    pub ca: PathBuf,
    /// The gateway's certificate chain for the device listener. Required.
    pub cert: PathBuf,
    /// The private key of `cert`: a PEM file, or a `pkcs11:` URI with
    /// `pkcs11_module` and a PIN source, as in `[cloud]`. Required.
    pub key: KeySource,
    /// Plain MQTT listener for lab use. Default: none (off; `""` also means off).
    /// Only a loopback address unless `plaintext_allow_non_loopback`.
    pub plaintext_listen: Option<SocketAddr>,
    /// Allows `plaintext_listen` on a non-loopback address. Default: `false`.
    pub plaintext_allow_non_loopback: bool,
    /// MQTT over WebSocket (subprotocol `mqtt`) on TLS 1.3 with client certificates,
    /// with the same certificate, CA, limits and rules as `listen`. Default: none
    /// (off; `""` also means off).
    pub websocket_listen: Option<SocketAddr>,
    /// The HTTP path WebSocket devices upgrade on. Default: `/mqtt`.
    pub websocket_path: String,
    /// Most simultaneous device connections (1..=100000). Default: `1000`.
    pub max_connections: usize,
    /// Publishes awaiting PUBACK per connection (1..=65535). Default: `32`.
    pub max_inflight_per_device: u16,
    /// Sustained messages per second per device (token bucket rate). Default: `200`.
    pub rate_limit_per_device: u32,
    /// Token bucket size: messages a device may send at once. Default: `400`.
    pub rate_burst_per_device: u32,
    /// Deadline for the TLS handshake and the MQTT CONNECT. Default: `10s`.
    pub connect_timeout: Duration,
    /// Topic devices publish on. Default: `e3/{device_id}/up`.
    pub up_topic: TopicTemplate,
    /// Topic devices subscribe to. Default: `e3/{device_id}/down`.
    pub down_topic: TopicTemplate,
    /// Commands and receipts held for an offline device (1..=100000). Default: `100`.
    pub downlink_pending_per_device: usize,
}

/// `[envelope]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeSection {
    /// Largest E3 envelope in bytes (45..=16MiB); the MQTT packet limit is this plus
    /// the topic overhead. Default: `256KiB` (262144 bytes).
    pub max_size: u64,
}

/// `[queue]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSection {
    /// Cap on the queue's disk use, in bytes. Default: `256MiB`.
    pub max_bytes: u64,
    /// Free space kept for the OS on `data_dir`'s filesystem: new records are
    /// refused below it. Default: `64MiB`.
    pub min_free_disk: u64,
    /// Cap per device, in bytes; at most `max_bytes`, at least `envelope.max_size`.
    /// Default: `32MiB`.
    pub device_quota: u64,
    /// What happens at a cap. Default: [`Overflow::Refuse`].
    pub overflow: Overflow,
    /// sled page cache in bytes. Default: `8MiB`.
    pub cache_size: u64,
    /// Most records per group commit (1..=65536). Default: `1024`.
    pub max_batch: usize,
}

/// `[cloud]`: MQTT over mutual TLS 1.3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudSection {
    /// Brokers tried in order, with failover. Required, at least one.
    pub endpoints: Vec<Endpoint>,
    /// CA bundle the cloud broker's certificate must chain to. Required.
    pub ca: PathBuf,
    /// The gateway's client certificate chain. Required.
    pub cert: PathBuf,
    /// The private key of `cert`: a PEM file, or a `pkcs11:` URI with
    /// `pkcs11_module` and a PIN source (the key then stays in the token). Required.
    pub key: KeySource,
    /// SHA-256 pins of accepted broker public keys (SPKI), checked on top of CA
    /// validation. Default: none (no pinning).
    pub pins: Vec<[u8; 32]>,
    /// Which AEAD is offered first. Default: [`CipherOrder::Auto`].
    pub cipher_order: CipherOrder,
    /// MQTT client id. Default: `""` in the file, which means `gateway.id`; this
    /// field always holds the id actually used.
    pub client_id: String,
    /// MQTT keep-alive (5s..=1h). Default: `30s`.
    pub keep_alive: Duration,
    /// Unacknowledged publishes (1..=65535). Default: `64`.
    pub inflight: u16,
    /// First reconnect delay. Default: `1s`.
    pub backoff_min: Duration,
    /// Longest reconnect delay; at least `backoff_min`. Default: `60s`.
    pub backoff_max: Duration,
    /// Topic records are published on. Default: `gw/{gateway_id}/e3/{device_id}/up`.
    pub up_topic: TopicTemplate,
    /// Topic commands and receipts arrive on. Default:
    /// `gw/{gateway_id}/e3/{device_id}/down`.
    pub down_topic: TopicTemplate,
    /// Most backlog records sent per second after an outage; live traffic is not
    /// limited by it. Default: `2000`.
    pub drain_rate: u32,
    /// Readiness fails if records wait and no cloud ack came for this long.
    /// Default: `60s`.
    pub ready_max_ack_age: Duration,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSection {
    /// Address of `/metrics`, `/healthz` and `/readyz`; `None` (`""` in the file) is
    /// off. Default: `127.0.0.1:9464`.
    pub listen: Option<SocketAddr>,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSection {
    /// Output format. Default: [`LogFormat::Human`].
    pub format: LogFormat,
    /// A tracing `EnvFilter` directive such as `info` or `info,blindgate::queue=debug`.
    /// Default: `info`.
    pub level: String,
}

impl ValidConfig {
    /// The topic `device_id` publishes on, e.g. `e3/dev-1/up`.
    pub fn device_up_topic(&self, device_id: &str) -> String {
        self.devices.up_topic.render(device_id)
    }

    /// The topic `device_id` receives commands and receipts on.
    pub fn device_down_topic(&self, device_id: &str) -> String {
        self.devices.down_topic.render(device_id)
    }

    /// The cloud topic records of `device_id` are published on.
    pub fn cloud_up_topic(&self, device_id: &str) -> String {
        self.cloud.up_topic.render(device_id)
    }

    /// The cloud topic downlink messages for `device_id` arrive on.
    pub fn cloud_down_topic(&self, device_id: &str) -> String {
        self.cloud.down_topic.render(device_id)
    }

    /// The uplink's subscription for all devices' downlink, e.g. `gw/gw-1/e3/+/down`.
    pub fn cloud_down_filter(&self) -> String {
        self.cloud.down_topic.filter()
    }

    /// The device id in a device's publish topic, or `None` if it is not one.
    pub fn parse_device_up_topic<'t>(&self, topic: &'t str) -> Option<&'t str> {
        self.devices.up_topic.device_of(topic)
    }

    /// The device id in a cloud downlink topic, or `None` if it is not one.
    pub fn parse_cloud_down_topic<'t>(&self, topic: &'t str) -> Option<&'t str> {
        self.cloud.down_topic.device_of(topic)
    }
}

/// Reads, parses and checks the config file at `path`.
///
/// # Errors
/// [`ConfigError`] if the file cannot be read ([`ConfigError::is_unreadable`]) or
/// with every problem found in it.
pub fn load(path: &Path) -> Result<ValidConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError::unreadable(path, err))?;
    parse(&text, path)
}

/// Parses and checks config `text`; `path` is used in messages and relative paths in
/// the file are resolved against its directory. Nothing is read from disk.
///
/// # Errors
/// [`ConfigError`] with every problem found: a TOML syntax error alone, or all unknown
/// keys, wrongly typed values and semantic problems together.
pub fn parse(text: &str, path: &Path) -> Result<ValidConfig, ConfigError> {
    parse_located(text, path).result
}

/// What [`parse_located`] found: the result of [`parse`], and for the checks after
/// parsing the sections that are valid on their own (even when others are not) and
/// where each key is.
pub(crate) struct Located {
    pub(crate) result: Result<ValidConfig, ConfigError>,
    pub(crate) sections: Sections,
    pub(crate) positions: Positions,
}

/// [`parse`], keeping the valid sections and the key positions.
pub(crate) fn parse_located(text: &str, path: &Path) -> Located {
    let mut reporter = Reporter::new(text);
    let sections = diagnostics::deserialize_collecting::<RawConfig>(&mut reporter, keys_of)
        .map(|raw| {
            let base_dir = path.parent().unwrap_or(Path::new(""));
            validate(raw, base_dir, &mut reporter)
        })
        .unwrap_or_default();
    let positions = reporter.positions();
    let result = reporter.finish(path, sections.clone().complete());
    Located {
        result,
        sections,
        positions,
    }
}

// The file as written: every key optional, each value with its span.

type Opt<T> = Option<Spanned<T>>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    gateway: Opt<RawGateway>,
    devices: Opt<RawDevices>,
    envelope: Opt<RawEnvelope>,
    queue: Opt<RawQueue>,
    cloud: Opt<RawCloud>,
    metrics: Opt<RawMetrics>,
    log: Opt<RawLog>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    id: Opt<String>,
    data_dir: Opt<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevices {
    listen: Opt<String>,
    ca: Opt<String>,
    cert: Opt<String>,
    key: Opt<String>,
    pkcs11_module: Opt<String>,
    pkcs11_pin_file: Opt<String>,
    pkcs11_pin_credential: Opt<String>,
    plaintext_listen: Opt<String>,
    plaintext_allow_non_loopback: Opt<bool>,
    websocket_listen: Opt<String>,
    websocket_path: Opt<String>,
    max_connections: Opt<Count>,
    max_inflight_per_device: Opt<Count>,
    rate_limit_per_device: Opt<Count>,
    rate_burst_per_device: Opt<Count>,
    connect_timeout: Opt<HumanDuration>,
    up_topic: Opt<String>,
    down_topic: Opt<String>,
    downlink_pending_per_device: Opt<Count>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvelope {
    max_size: Opt<ByteSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    max_bytes: Opt<ByteSize>,
    min_free_disk: Opt<ByteSize>,
    device_quota: Opt<ByteSize>,
    overflow: Opt<Overflow>,
    cache_size: Opt<ByteSize>,
    max_batch: Opt<Count>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCloud {
    endpoints: Opt<Vec<Spanned<String>>>,
    ca: Opt<String>,
    cert: Opt<String>,
    key: Opt<String>,
    pkcs11_module: Opt<String>,
    pkcs11_pin_file: Opt<String>,
    pkcs11_pin_credential: Opt<String>,
    pins: Opt<Vec<Spanned<String>>>,
    cipher_order: Opt<CipherOrder>,
    client_id: Opt<String>,
    keep_alive: Opt<HumanDuration>,
    inflight: Opt<Count>,
    backoff_min: Opt<HumanDuration>,
    backoff_max: Opt<HumanDuration>,
    up_topic: Opt<String>,
    down_topic: Opt<String>,
    drain_rate: Opt<Count>,
    ready_max_ack_age: Opt<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Opt<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Opt<LogFormat>,
    level: Opt<String>,
}

/// The keys of each section, for "did you mean" (`""`: the section names).
fn keys_of(section: &str) -> &'static [&'static str] {
    match section {
        "" => field_names::<RawConfig>(),
        "gateway" => field_names::<RawGateway>(),
        "devices" => field_names::<RawDevices>(),
        "envelope" => field_names::<RawEnvelope>(),
        "queue" => field_names::<RawQueue>(),
        "cloud" => field_names::<RawCloud>(),
        "metrics" => field_names::<RawMetrics>(),
        "log" => field_names::<RawLog>(),
        _ => &[],
    }
}

// Defaults: each is documented on its `ValidConfig` field and shown in
// `config/gateway.toml`.

const MIB: u64 = 1 << 20;
const DEFAULT_DATA_DIR: &str = "/var/lib/blindgate";
const DEFAULT_DEVICES_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8883));
const DEFAULT_MAX_CONNECTIONS: usize = 1000;
const DEFAULT_MAX_INFLIGHT_PER_DEVICE: u16 = 32;
const DEFAULT_RATE_LIMIT_PER_DEVICE: u32 = 200;
const DEFAULT_RATE_BURST_PER_DEVICE: u32 = 400;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_DEVICE_UP_TOPIC: &str = "e3/{device_id}/up";
const DEFAULT_DEVICE_DOWN_TOPIC: &str = "e3/{device_id}/down";
const DEFAULT_DOWNLINK_PENDING_PER_DEVICE: usize = 100;
/// 256 KiB, E3's own default limit.
const DEFAULT_ENVELOPE_MAX_SIZE: u64 = e3::DEFAULT_MAX_ENVELOPE_LEN as u64;
const DEFAULT_QUEUE_MAX_BYTES: u64 = 256 * MIB;
const DEFAULT_MIN_FREE_DISK: u64 = 64 * MIB;
const DEFAULT_DEVICE_QUOTA: u64 = 32 * MIB;
const DEFAULT_OVERFLOW: Overflow = Overflow::Refuse;
const DEFAULT_CACHE_SIZE: u64 = 8 * MIB;
const DEFAULT_MAX_BATCH: usize = 1024;
const DEFAULT_CIPHER_ORDER: CipherOrder = CipherOrder::Auto;
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
const DEFAULT_INFLIGHT: u16 = 64;
const DEFAULT_BACKOFF_MIN: Duration = Duration::from_secs(1);
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);
const DEFAULT_CLOUD_UP_TOPIC: &str = "gw/{gateway_id}/e3/{device_id}/up";
const DEFAULT_CLOUD_DOWN_TOPIC: &str = "gw/{gateway_id}/e3/{device_id}/down";
const DEFAULT_DRAIN_RATE: u32 = 2000;
const DEFAULT_READY_MAX_ACK_AGE: Duration = Duration::from_secs(60);
const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9464));
const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Human;
const DEFAULT_LOG_LEVEL: &str = "info";
const DEFAULT_CLOUD_PORT: u16 = 8883;

/// E3's smallest envelope: fixed header and tag plus a one-byte device id.
const MIN_ENVELOPE_SIZE: u64 = e3::FIXED_OVERHEAD as u64 + 1;

// Checking.

/// Each section of the file that is valid on its own; `None` for one with a problem.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sections {
    pub(crate) gateway: Option<GatewaySection>,
    pub(crate) devices: Option<DevicesSection>,
    pub(crate) envelope: Option<EnvelopeSection>,
    pub(crate) queue: Option<QueueSection>,
    pub(crate) cloud: Option<CloudSection>,
    pub(crate) metrics: Option<MetricsSection>,
    pub(crate) log: Option<LogSection>,
}

impl Sections {
    /// The whole configuration, if every section is valid.
    fn complete(self) -> Option<ValidConfig> {
        Some(ValidConfig {
            gateway: self.gateway?,
            devices: self.devices?,
            envelope: self.envelope?,
            queue: self.queue?,
            cloud: self.cloud?,
            metrics: self.metrics?,
            log: self.log?,
        })
    }
}

fn validate(raw: RawConfig, base_dir: &Path, reporter: &mut Reporter<'_>) -> Sections {
    let gateway = gateway_section(reporter, raw.gateway, base_dir);
    let devices = devices_section(reporter, raw.devices, base_dir);
    let envelope = envelope_section(reporter, raw.envelope);
    let queue = queue_section(reporter, raw.queue);
    let gateway_id = gateway.as_ref().map(|gateway| gateway.id.as_str());
    let cloud = cloud_section(reporter, raw.cloud, base_dir, gateway_id);
    let metrics = metrics_section(reporter, raw.metrics);
    let log = log_section(reporter, raw.log);
    if let (Some(queue), Some(envelope)) = (&queue, &envelope) {
        check_quota_fits_envelope(reporter, queue, envelope);
    }
    if let (Some(devices), Some(metrics)) = (&devices, &metrics) {
        check_listeners_distinct(reporter, devices, metrics);
    }
    Sections {
        gateway,
        devices,
        envelope,
        queue,
        cloud,
        metrics,
        log,
    }
}

/// Checks the keys of one section and reports problems under `section.key`.
struct Section<'r, 't> {
    /// Where problems go; it also knows which keys already failed.
    reporter: &'r mut Reporter<'t>,
    /// The section's name: the prefix of every key reported.
    name: &'static str,
}

impl<'r, 't> Section<'r, 't> {
    /// Starts on section `name`; an absent section is an empty one.
    fn open<T: Default>(
        reporter: &'r mut Reporter<'t>,
        name: &'static str,
        raw: Opt<T>,
    ) -> (Self, T) {
        let raw = raw.map_or_else(T::default, |raw| {
            reporter.locate(name, raw.span().start);
            raw.into_inner()
        });
        (Self { reporter, name }, raw)
    }

    fn key(&self, field: &str) -> String {
        format!("{}.{field}", self.name)
    }

    /// The checked value of an optional key, or `default` when it is absent; `None`
    /// if the value is wrong (reported here or while reading the file).
    fn optional<T, U>(
        &mut self,
        field: &str,
        raw: Opt<T>,
        default: U,
        check: impl FnOnce(T) -> Result<U, Problem>,
    ) -> Option<U> {
        let key = self.key(field);
        match raw {
            _ if self.reporter.is_reported(&key) => None,
            None => Some(default),
            Some(value) => self.checked(&key, value, check),
        }
    }

    /// The checked value of a required key; its absence is reported at the section
    /// header (or line 1 if the section is missing), with `example` as the fix.
    fn required<T, U>(
        &mut self,
        field: &str,
        raw: Opt<T>,
        example: &str,
        check: impl FnOnce(T) -> Result<U, Problem>,
    ) -> Option<U> {
        let key = self.key(field);
        match raw {
            _ if self.reporter.is_reported(&key) => None,
            None => self.missing(field, example),
            Some(value) => self.checked(&key, value, check),
        }
    }

    /// Reports a missing required key, unless its whole section was already reported.
    fn missing<U>(&mut self, field: &str, example: &str) -> Option<U> {
        if !self.reporter.is_reported(self.name) {
            let at = self.reporter.location(self.name, self.name);
            let hint = format!("add `{field} = {example}` under [{}]", self.name);
            let key = self.key(field);
            self.reporter
                .report(at, &key, Problem::new("missing required key").hint(hint));
        }
        None
    }

    /// Checks each element of a list (absent: empty), reporting each bad one at its
    /// own position.
    fn list<U>(
        &mut self,
        field: &str,
        raw: Opt<Vec<Spanned<String>>>,
        check: impl Fn(&str) -> Result<U, Problem>,
    ) -> Option<Vec<U>> {
        let key = self.key(field);
        let raw = match raw {
            _ if self.reporter.is_reported(&key) => return None,
            None => return Some(Vec::new()),
            Some(raw) => raw,
        };
        self.reporter.locate(&key, raw.span().start);
        let checked: Vec<Option<U>> = raw
            .into_inner()
            .into_iter()
            .enumerate()
            .map(|(index, item)| self.checked(&format!("{key}[{index}]"), item, |s| check(&s)))
            .collect();
        checked.into_iter().collect()
    }

    fn checked<T, U>(
        &mut self,
        key: &str,
        value: Spanned<T>,
        check: impl FnOnce(T) -> Result<U, Problem>,
    ) -> Option<U> {
        let at = value.span().start;
        self.reporter.locate(key, at);
        check(value.into_inner())
            .map_err(|problem| self.reporter.report(at, key, problem))
            .ok()
    }

    /// Reports a problem between keys at `field` (or the section header if `field`
    /// was left at its default).
    fn conflict(&mut self, field: &str, problem: Problem) {
        let key = self.key(field);
        let at = self.reporter.location(&key, self.name);
        self.reporter.report(at, &key, problem);
    }
}

/// `optional!(s, raw.field, default, check)`: [`Section::optional`] with the key
/// named after the field, so the reported key cannot drift from the schema.
macro_rules! optional {
    ($section:ident, $raw:ident . $field:ident, $default:expr, $check:expr $(,)?) => {
        $section.optional(stringify!($field), $raw.$field, $default, $check)
    };
}

/// `required!(s, raw.field, example, check)`: [`Section::required`], likewise.
macro_rules! required {
    ($section:ident, $raw:ident . $field:ident, $example:expr, $check:expr $(,)?) => {
        $section.required(stringify!($field), $raw.$field, $example, $check)
    };
}

fn gateway_section(
    reporter: &mut Reporter<'_>,
    raw: Opt<RawGateway>,
    base: &Path,
) -> Option<GatewaySection> {
    let (mut s, raw) = Section::open(reporter, "gateway", raw);
    let id = required!(s, raw.id, r#""gw-1""#, gateway_id);
    let data_dir = optional!(s, raw.data_dir, PathBuf::from(DEFAULT_DATA_DIR), |p| {
        file_path(base, p)
    });
    Some(GatewaySection {
        id: id?,
        data_dir: data_dir?,
    })
}

fn devices_section(
    reporter: &mut Reporter<'_>,
    raw: Opt<RawDevices>,
    base: &Path,
) -> Option<DevicesSection> {
    let (mut s, raw) = Section::open(reporter, "devices", raw);
    let path = |p: String| file_path(base, p);
    let listen = optional!(s, raw.listen, DEFAULT_DEVICES_LISTEN, socket_addr);
    let ca = required!(s, raw.ca, r#""/etc/blindgate/device-ca.pem""#, path);
    let cert = required!(s, raw.cert, r#""/etc/blindgate/gateway-devices.pem""#, path);
    let key = required!(s, raw.key, r#""/etc/blindgate/gateway-devices.key""#, |k| {
        key_source::key_text(base, k)
    });
    let token_keys = key_source::RawTokenKeys {
        module: raw.pkcs11_module,
        pin_file: raw.pkcs11_pin_file,
        pin_credential: raw.pkcs11_pin_credential,
    };
    let key = key_source::key_source(&mut s, key, token_keys, base);
    let plaintext_listen = optional!(s, raw.plaintext_listen, None, optional_socket_addr);
    let plaintext_allow_non_loopback = optional!(s, raw.plaintext_allow_non_loopback, false, Ok);
    let websocket_listen = optional!(s, raw.websocket_listen, None, optional_socket_addr);
    let websocket_path = optional!(
        s,
        raw.websocket_path,
        crate::ingress::websocket::DEFAULT_PATH.to_owned(),
        websocket_path,
    );
    let max_connections = optional!(
        s,
        raw.max_connections,
        DEFAULT_MAX_CONNECTIONS,
        count_in(1..=100_000),
    );
    let max_inflight_per_device = optional!(
        s,
        raw.max_inflight_per_device,
        DEFAULT_MAX_INFLIGHT_PER_DEVICE,
        count_in(1..=65_535),
    );
    let rate_limit_per_device = optional!(
        s,
        raw.rate_limit_per_device,
        DEFAULT_RATE_LIMIT_PER_DEVICE,
        count_in(1..=1_000_000),
    );
    let rate_burst_per_device = optional!(
        s,
        raw.rate_burst_per_device,
        DEFAULT_RATE_BURST_PER_DEVICE,
        count_in(1..=1_000_000),
    );
    let connect_timeout = optional!(
        s,
        raw.connect_timeout,
        DEFAULT_CONNECT_TIMEOUT,
        duration_in(millis(1)..=secs(3600)),
    );
    let up_topic = optional!(
        s,
        raw.up_topic,
        DEFAULT_DEVICE_UP_TOPIC.to_owned(),
        device_topic,
    );
    let down_topic = optional!(
        s,
        raw.down_topic,
        DEFAULT_DEVICE_DOWN_TOPIC.to_owned(),
        device_topic,
    );
    let downlink_pending_per_device = optional!(
        s,
        raw.downlink_pending_per_device,
        DEFAULT_DOWNLINK_PENDING_PER_DEVICE,
        count_in(1..=100_000),
    );
    if let (Some(Some(addr)), Some(false)) = (plaintext_listen, plaintext_allow_non_loopback) {
        check_plaintext_loopback(&mut s, addr);
    }
    if let (Some(up), Some(down)) = (&up_topic, &down_topic) {
        check_topics_differ(&mut s, up, down);
    }
    Some(DevicesSection {
        listen: listen?,
        ca: ca?,
        cert: cert?,
        key: key?,
        plaintext_listen: plaintext_listen?,
        plaintext_allow_non_loopback: plaintext_allow_non_loopback?,
        websocket_listen: websocket_listen?,
        websocket_path: websocket_path?,
        max_connections: max_connections?,
        max_inflight_per_device: max_inflight_per_device?,
        rate_limit_per_device: rate_limit_per_device?,
        rate_burst_per_device: rate_burst_per_device?,
        connect_timeout: connect_timeout?,
        up_topic: bind_topic(&up_topic?, "")?,
        down_topic: bind_topic(&down_topic?, "")?,
        downlink_pending_per_device: downlink_pending_per_device?,
    })
}

fn check_plaintext_loopback(s: &mut Section<'_, '_>, addr: SocketAddr) {
    if addr.ip().is_loopback() {
        return;
    }
    let problem = Problem::new(format!(
        "plain MQTT on {addr} would let anyone on the network connect without TLS"
    ))
    .hint("use a 127.0.0.1 address, or set plaintext_allow_non_loopback = true (lab use only)");
    s.conflict("plaintext_listen", problem);
}

fn check_topics_differ(s: &mut Section<'_, '_>, up: &str, down: &str) {
    if up == down {
        let problem = Problem::new(format!("`{down}` is also the up_topic"))
            .hint("the up and down topics must differ");
        s.conflict("down_topic", problem);
    }
}

fn envelope_section(reporter: &mut Reporter<'_>, raw: Opt<RawEnvelope>) -> Option<EnvelopeSection> {
    let (mut s, raw) = Section::open(reporter, "envelope", raw);
    let max_size = optional!(
        s,
        raw.max_size,
        DEFAULT_ENVELOPE_MAX_SIZE,
        size_in(MIN_ENVELOPE_SIZE..=16 * MIB),
    );
    Some(EnvelopeSection {
        max_size: max_size?,
    })
}

fn queue_section(reporter: &mut Reporter<'_>, raw: Opt<RawQueue>) -> Option<QueueSection> {
    let (mut s, raw) = Section::open(reporter, "queue", raw);
    let any_size = |ByteSize(bytes): ByteSize| Ok::<_, Problem>(bytes);
    let max_bytes = optional!(s, raw.max_bytes, DEFAULT_QUEUE_MAX_BYTES, any_size);
    let min_free_disk = optional!(s, raw.min_free_disk, DEFAULT_MIN_FREE_DISK, any_size);
    let device_quota = optional!(s, raw.device_quota, DEFAULT_DEVICE_QUOTA, any_size);
    let overflow = optional!(s, raw.overflow, DEFAULT_OVERFLOW, Ok);
    let cache_size = optional!(s, raw.cache_size, DEFAULT_CACHE_SIZE, size_in(1..=u64::MAX));
    let max_batch = optional!(s, raw.max_batch, DEFAULT_MAX_BATCH, count_in(1..=65_536));
    if let (Some(quota), Some(max)) = (device_quota, max_bytes)
        && quota > max
    {
        let problem = Problem::new(format!(
            "device_quota {} is larger than max_bytes {}",
            format_byte_size(quota),
            format_byte_size(max)
        ))
        .hint("one device cannot use more than the whole queue: lower device_quota or raise max_bytes");
        s.conflict("device_quota", problem);
    }
    Some(QueueSection {
        max_bytes: max_bytes?,
        min_free_disk: min_free_disk?,
        device_quota: device_quota?,
        overflow: overflow?,
        cache_size: cache_size?,
        max_batch: max_batch?,
    })
}

fn cloud_section(
    reporter: &mut Reporter<'_>,
    raw: Opt<RawCloud>,
    base: &Path,
    gateway_id: Option<&str>,
) -> Option<CloudSection> {
    let (mut s, raw) = Section::open(reporter, "cloud", raw);
    let path = |p: String| file_path(base, p);
    let endpoints = cloud_endpoints(&mut s, raw.endpoints);
    let ca = required!(s, raw.ca, r#""/etc/blindgate/cloud-ca.pem""#, path);
    let cert = required!(s, raw.cert, r#""/etc/blindgate/gateway-client.pem""#, path);
    let key = required!(s, raw.key, r#""/etc/blindgate/gateway-client.key""#, |k| {
        key_source::key_text(base, k)
    });
    let token_keys = key_source::RawTokenKeys {
        module: raw.pkcs11_module,
        pin_file: raw.pkcs11_pin_file,
        pin_credential: raw.pkcs11_pin_credential,
    };
    let key = key_source::key_source(&mut s, key, token_keys, base);
    let pins = s.list("pins", raw.pins, pin);
    let cipher_order = optional!(s, raw.cipher_order, DEFAULT_CIPHER_ORDER, Ok);
    let client_id = optional!(s, raw.client_id, String::new(), client_id);
    let keep_alive = optional!(
        s,
        raw.keep_alive,
        DEFAULT_KEEP_ALIVE,
        duration_in(secs(5)..=secs(3600)),
    );
    let inflight = optional!(s, raw.inflight, DEFAULT_INFLIGHT, count_in(1..=65_535));
    let backoff = duration_in(millis(1)..=secs(3600));
    let backoff_min = optional!(s, raw.backoff_min, DEFAULT_BACKOFF_MIN, backoff.clone());
    let backoff_max = optional!(s, raw.backoff_max, DEFAULT_BACKOFF_MAX, backoff);
    let up_topic = optional!(
        s,
        raw.up_topic,
        DEFAULT_CLOUD_UP_TOPIC.to_owned(),
        cloud_topic,
    );
    let down_topic = optional!(
        s,
        raw.down_topic,
        DEFAULT_CLOUD_DOWN_TOPIC.to_owned(),
        cloud_topic,
    );
    let drain_rate = optional!(
        s,
        raw.drain_rate,
        DEFAULT_DRAIN_RATE,
        count_in(1..=1_000_000),
    );
    let ready_max_ack_age = optional!(
        s,
        raw.ready_max_ack_age,
        DEFAULT_READY_MAX_ACK_AGE,
        duration_in(secs(1)..=secs(86_400)),
    );
    if let (Some(min), Some(max)) = (backoff_min, backoff_max) {
        check_backoff_order(&mut s, min, max);
    }
    if let (Some(up), Some(down)) = (&up_topic, &down_topic) {
        check_topics_differ(&mut s, up, down);
    }
    let gateway_id = gateway_id?;
    let client_id = client_id.map(|id| {
        if id.is_empty() {
            gateway_id.to_owned()
        } else {
            id
        }
    });
    Some(CloudSection {
        endpoints: endpoints?,
        ca: ca?,
        cert: cert?,
        key: key?,
        pins: pins?,
        cipher_order: cipher_order?,
        client_id: client_id?,
        keep_alive: keep_alive?,
        inflight: inflight?,
        backoff_min: backoff_min?,
        backoff_max: backoff_max?,
        up_topic: bind_topic(&up_topic?, gateway_id)?,
        down_topic: bind_topic(&down_topic?, gateway_id)?,
        drain_rate: drain_rate?,
        ready_max_ack_age: ready_max_ack_age?,
    })
}

/// `cloud.endpoints`: required, non-empty, each one checked.
fn cloud_endpoints(
    s: &mut Section<'_, '_>,
    raw: Opt<Vec<Spanned<String>>>,
) -> Option<Vec<Endpoint>> {
    let example = r#"["mqtts://cloud.example.com:8883"]"#;
    match &raw {
        None if !s.reporter.is_reported(&s.key("endpoints")) => s.missing("endpoints", example),
        Some(list) if list.get_ref().is_empty() => {
            let problem = Problem::new("at least one endpoint is required")
                .hint(format!("write e.g. endpoints = {example}"));
            s.reporter
                .report(list.span().start, &s.key("endpoints"), problem);
            None
        }
        _ => s.list("endpoints", raw, endpoint),
    }
}

fn check_backoff_order(s: &mut Section<'_, '_>, min: Duration, max: Duration) {
    if max < min {
        let problem = Problem::new(format!(
            "backoff_max {} is shorter than backoff_min {}",
            format_duration(max),
            format_duration(min)
        ))
        .hint("backoff_max must be at least backoff_min");
        s.conflict("backoff_max", problem);
    }
}

fn metrics_section(reporter: &mut Reporter<'_>, raw: Opt<RawMetrics>) -> Option<MetricsSection> {
    let (mut s, raw) = Section::open(reporter, "metrics", raw);
    let listen = optional!(
        s,
        raw.listen,
        Some(DEFAULT_METRICS_LISTEN),
        optional_socket_addr,
    );
    Some(MetricsSection { listen: listen? })
}

fn log_section(reporter: &mut Reporter<'_>, raw: Opt<RawLog>) -> Option<LogSection> {
    let (mut s, raw) = Section::open(reporter, "log", raw);
    let format = optional!(s, raw.format, DEFAULT_LOG_FORMAT, Ok);
    let level = optional!(s, raw.level, DEFAULT_LOG_LEVEL.to_owned(), log_level);
    Some(LogSection {
        format: format?,
        level: level?,
    })
}

/// Every device envelope must fit one device's quota, or a device could never store
/// its largest message.
fn check_quota_fits_envelope(
    reporter: &mut Reporter<'_>,
    queue: &QueueSection,
    envelope: &EnvelopeSection,
) {
    if queue.device_quota >= envelope.max_size {
        return;
    }
    let key = "queue.device_quota";
    let problem = Problem::new(format!(
        "device_quota {} is smaller than envelope.max_size {}",
        format_byte_size(queue.device_quota),
        format_byte_size(envelope.max_size)
    ))
    .hint("a device could never store its largest envelope: raise device_quota");
    reporter.report(reporter.location(key, "queue"), key, problem);
}

/// Two of the gateway's own listeners on one port would fail at startup.
fn check_listeners_distinct(
    reporter: &mut Reporter<'_>,
    devices: &DevicesSection,
    metrics: &MetricsSection,
) {
    let listeners = [
        ("devices.listen", Some(devices.listen)),
        ("devices.plaintext_listen", devices.plaintext_listen),
        ("devices.websocket_listen", devices.websocket_listen),
        ("metrics.listen", metrics.listen),
    ];
    let present: Vec<(&str, SocketAddr)> = listeners
        .into_iter()
        .filter_map(|(key, addr)| addr.map(|addr| (key, addr)))
        .collect();
    for (index, (key, addr)) in present.iter().enumerate() {
        let clash = present[..index]
            .iter()
            .find(|(_, earlier)| listeners_overlap(*earlier, *addr));
        if let Some((earlier_key, _)) = clash {
            let section = key.split('.').next().unwrap_or(key);
            let problem = Problem::new(format!("{addr} is also used by {earlier_key}"))
                .hint("each listener needs its own port");
            reporter.report(reporter.location(key, section), key, problem);
        }
    }
}

fn listeners_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

// Single-value checks: each turns what the file says into the typed value or says
// what is wrong.

fn gateway_id(id: String) -> Result<String, Problem> {
    if e3::header::validate_device_id(id.as_bytes()).is_ok() {
        return Ok(id);
    }
    let rule = "1 to 64 characters, each a letter, a digit, '.', '_' or '-'";
    let allowed = |c: char| u8::try_from(c).is_ok_and(e3::header::is_device_id_byte);
    let problem = match id.chars().find(|c| !allowed(*c)) {
        Some(bad) => Problem::new(format!("{bad:?} is not allowed in an id")),
        None if id.is_empty() => Problem::new("the id is empty"),
        None => Problem::new(format!("the id is {} characters long", id.len())),
    };
    Err(problem.hint(format!("an id is {rule}, e.g. \"gw-1\"")))
}

fn file_path(base: &Path, path: String) -> Result<PathBuf, Problem> {
    if path.trim().is_empty() {
        return Err(Problem::new("the path is empty")
            .hint("write a file path; a relative path is relative to this file's directory"));
    }
    Ok(base.join(path))
}

fn socket_addr(text: String) -> Result<SocketAddr, Problem> {
    text.trim().parse().map_err(|_| {
        Problem::new(format!("`{text}` is not an IP address and port")).hint(
            r#"write e.g. "0.0.0.0:8883", "127.0.0.1:8883" or "[::]:8883"; host names such as localhost are not accepted"#,
        )
    })
}

/// An absolute HTTP path without query or fragment, e.g. `/mqtt`.
fn websocket_path(path: String) -> Result<String, Problem> {
    let valid_char = |c: char| c.is_ascii_graphic() && !matches!(c, '?' | '#' | '%');
    if path.starts_with('/') && path.len() <= 256 && path.chars().all(valid_char) {
        return Ok(path);
    }
    Err(Problem::new(format!("`{path}` is not a WebSocket request path"))
        .hint(r#"write an absolute path of visible ASCII characters without '?', '#' or '%', e.g. "/mqtt""#))
}

/// `""` means off.
fn optional_socket_addr(text: String) -> Result<Option<SocketAddr>, Problem> {
    match text.trim() {
        "" => Ok(None),
        _ => socket_addr(text).map(Some),
    }
}

fn count_in<U: TryFrom<i64>>(
    range: RangeInclusive<i64>,
) -> impl FnOnce(Count) -> Result<U, Problem> {
    move |Count(n)| {
        let out_of_range = || {
            Problem::new(format!(
                "must be between {} and {}, not {n}",
                range.start(),
                range.end()
            ))
        };
        if !range.contains(&n) {
            return Err(out_of_range());
        }
        U::try_from(n).map_err(|_| out_of_range())
    }
}

fn duration_in(
    range: RangeInclusive<Duration>,
) -> impl FnOnce(HumanDuration) -> Result<Duration, Problem> + Clone {
    move |HumanDuration(duration)| match range.contains(&duration) {
        true => Ok(duration),
        false => Err(Problem::new(format!(
            "must be between {} and {}, not {}",
            format_duration(*range.start()),
            format_duration(*range.end()),
            format_duration(duration)
        ))),
    }
}

const fn secs(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

const fn millis(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

fn size_in(range: RangeInclusive<u64>) -> impl FnOnce(ByteSize) -> Result<u64, Problem> {
    move |ByteSize(bytes)| match range.contains(&bytes) {
        true => Ok(bytes),
        false if *range.end() == u64::MAX => Err(Problem::new(format!(
            "must be at least {}",
            format_byte_size(*range.start())
        ))),
        false => Err(Problem::new(format!(
            "must be between {} and {}, not {}",
            format_byte_size(*range.start()),
            format_byte_size(*range.end()),
            format_byte_size(bytes)
        ))),
    }
}

fn device_topic(template: String) -> Result<String, Problem> {
    check_topic(&template, false)
        .map(|()| template)
        .map_err(|problem| with_example(problem, DEFAULT_DEVICE_UP_TOPIC))
}

fn cloud_topic(template: String) -> Result<String, Problem> {
    check_topic(&template, true)
        .map(|()| template)
        .map_err(|problem| with_example(problem, DEFAULT_CLOUD_UP_TOPIC))
}

/// Adds `example` as the hint unless the problem has a more specific one.
fn with_example(problem: Problem, example: &str) -> Problem {
    match problem.hint {
        Some(_) => problem,
        None => problem.hint(format!("e.g. \"{example}\"")),
    }
}

/// A topic template: a valid MQTT topic name whose levels may be exactly
/// `{device_id}` (once) and, if `with_gateway`, `{gateway_id}` (once).
fn check_topic(template: &str, with_gateway: bool) -> Result<(), Problem> {
    if template.is_empty() {
        return Err(Problem::new("the topic is empty"));
    }
    if template.contains(['+', '#', '\0']) {
        return Err(Problem::new(
            "`+` and `#` are wildcards and cannot be part of a topic",
        ));
    }
    if template.starts_with('$') {
        return Err(Problem::new(
            "topics starting with `$` are reserved for the broker",
        ));
    }
    let (mut devices, mut gateways) = (0, 0);
    for level in template.split('/') {
        match level {
            DEVICE_PLACEHOLDER => devices += 1,
            GATEWAY_PLACEHOLDER => gateways += 1,
            level if level.contains(['{', '}']) => return Err(placeholder_problem(level)),
            _ => {}
        }
    }
    match (devices, gateways, with_gateway) {
        (1, 1, true) | (1, 0, false) => Ok(()),
        (_, _, false) if gateways > 0 => Err(Problem::new(
            "`{gateway_id}` can only be used in [cloud] topics",
        )),
        (1, _, true) => Err(Problem::new(format!(
            "must contain `{{gateway_id}}` exactly once, not {gateways} times"
        ))),
        _ => Err(Problem::new(format!(
            "must contain `{{device_id}}` exactly once, not {devices} times"
        ))),
    }
}

fn placeholder_problem(level: &str) -> Problem {
    let known = [DEVICE_PLACEHOLDER, GATEWAY_PLACEHOLDER];
    if known.iter().any(|placeholder| level.contains(placeholder)) {
        return Problem::new(format!(
            "`{level}`: a placeholder must be a whole topic level, between slashes"
        ));
    }
    let problem = Problem::new(format!("`{level}` is not a known placeholder"));
    match did_you_mean(level, &known) {
        Some(close) => problem.hint(format!("did you mean `{close}`?")),
        None => problem.hint("the placeholders are `{device_id}` and `{gateway_id}`"),
    }
}

/// `mqtts://host[:port]`.
fn endpoint(text: &str) -> Result<Endpoint, Problem> {
    let form = r#"write "mqtts://host:port", e.g. "mqtts://cloud.example.com:8883""#;
    let rest = match text.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("mqtts") => rest,
        Some((scheme, _)) => {
            return Err(Problem::new(format!(
                "`{scheme}://` is not allowed: the uplink always uses TLS"
            ))
            .hint("use mqtts://"));
        }
        None => return Err(Problem::new(format!("`{text}` has no mqtts:// scheme")).hint(form)),
    };
    if rest.contains(['/', '?', '#', '@']) {
        return Err(Problem::new("only a host and a port may follow mqtts://").hint(form));
    }
    let (host, port) = split_host_port(rest).map_err(|problem| problem.hint(form))?;
    Ok(Endpoint { host, port })
}

fn split_host_port(text: &str) -> Result<(String, u16), Problem> {
    if let Some(bracketed) = text.strip_prefix('[') {
        let (ip, after) = bracketed
            .split_once(']')
            .ok_or_else(|| Problem::new("missing `]` after the IPv6 address"))?;
        ip.parse::<Ipv6Addr>()
            .map_err(|_| Problem::new(format!("`{ip}` is not an IPv6 address")))?;
        let port = match after {
            "" => DEFAULT_CLOUD_PORT,
            after => port(after.strip_prefix(':').unwrap_or(after))?,
        };
        return Ok((ip.to_owned(), port));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, digits)) => (host, port(digits)?),
        None => (text, DEFAULT_CLOUD_PORT),
    };
    if host.contains(':') {
        return Err(Problem::new(
            "an IPv6 address must be in brackets, e.g. [2001:db8::1]:8883",
        ));
    }
    check_host(host)?;
    Ok((host.to_owned(), port))
}

fn port(digits: &str) -> Result<u16, Problem> {
    match digits.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(Problem::new(format!(
            "`{digits}` is not a port (1 to 65535)"
        ))),
    }
}

/// A DNS name or an IPv4 address.
fn check_host(host: &str) -> Result<(), Problem> {
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let is_ipv4_like = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let valid = match is_ipv4_like {
        true => host.parse::<Ipv4Addr>().is_ok(),
        false => host.len() <= 253 && host.split('.').all(label_ok),
    };
    match valid {
        true => Ok(()),
        false => Err(Problem::new(format!(
            "`{host}` is not a valid host name or IP address"
        ))),
    }
}

/// An SPKI SHA-256 pin: `sha256//<base64>` (curl's form) or 64 hex digits.
fn pin(text: &str) -> Result<[u8; 32], Problem> {
    crate::tls::parse_pin(text).map_err(|_| {
            Problem::new(format!("`{text}` is not a SHA-256 public key pin")).hint(
                r#"write "sha256//" and the base64 of the 32-byte digest (44 characters), or 64 hex digits"#,
            )
        })
}

fn client_id(id: String) -> Result<String, Problem> {
    if id.len() > 256 || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(
            Problem::new("a client id is at most 256 characters without spaces")
                .hint(r#"leave it "" to use gateway.id"#),
        );
    }
    Ok(id)
}

const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// A comma-separated `EnvFilter` directive list where every directive ends in a
/// level: `level` or `target=level`. (A bare target, which `EnvFilter` would accept,
/// is refused: it is far more often a misspelt level.)
fn log_level(text: String) -> Result<String, Problem> {
    let form = r#"write a level (trace, debug, info, warn, error, off), optionally followed by target=level pairs, e.g. "info,blindgate::queue=debug""#;
    for directive in text.split(',') {
        let directive = directive.trim();
        if directive.is_empty() {
            return Err(Problem::new("a log directive is empty").hint(form));
        }
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            let problem = Problem::new(format!("`{level}` is not a log level"));
            return Err(match did_you_mean(level, &LOG_LEVELS) {
                Some(close) => problem.hint(format!("did you mean `{close}`?")),
                None => problem.hint(form),
            });
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use base64::Engine as _;

    use super::*;

    fn loopback(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
    }

    #[test]
    fn endpoints_accept_names_ipv4_ipv6_and_default_port() {
        let ep = |host: &str, port| Endpoint {
            host: host.into(),
            port,
        };
        assert_eq!(
            endpoint("mqtts://cloud.example.com:8884"),
            Ok(ep("cloud.example.com", 8884))
        );
        assert_eq!(
            endpoint("mqtts://cloud.example.com"),
            Ok(ep("cloud.example.com", 8883))
        );
        assert_eq!(endpoint("MQTTS://10.0.0.1:1"), Ok(ep("10.0.0.1", 1)));
        assert_eq!(endpoint("mqtts://[::1]:8884"), Ok(ep("::1", 8884)));
        assert_eq!(
            endpoint("mqtts://[2001:db8::1]"),
            Ok(ep("2001:db8::1", 8883))
        );
    }

    #[test]
    fn endpoints_without_tls_or_with_junk_are_rejected() {
        for bad in [
            "mqtt://cloud:1883",
            "cloud.example.com:8883",
            "mqtts://cloud/path",
            "mqtts://user@cloud",
            "mqtts://cloud:0",
            "mqtts://cloud:99999",
            "mqtts://::1:8883",
            "mqtts://[::1",
            "mqtts://",
            "mqtts://bad_host-:1",
            "mqtts://300.1.1.1",
        ] {
            assert!(endpoint(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn pins_accept_base64_and_hex_of_32_bytes() {
        let hex_pin = "ab".repeat(32);
        assert_eq!(pin(&hex_pin), Ok([0xab; 32]));
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(pin(&format!("sha256//{b64}")), Ok([7; 32]));
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 31]);
        assert!(pin(&format!("sha256//{short}")).is_err());
        assert!(pin(&"zz".repeat(32)).is_err());
        assert!(pin("sha1//AAAA").is_err());
    }

    #[test]
    fn topic_placeholders_must_be_whole_levels_and_appear_once() {
        assert_eq!(check_topic("e3/{device_id}/up", false), Ok(()));
        assert_eq!(
            check_topic("gw/{gateway_id}/e3/{device_id}/up", true),
            Ok(())
        );
        assert_eq!(check_topic("{device_id}", false), Ok(()));
        for (bad, with_gateway) in [
            ("e3/up", false),
            ("e3/{device_id}/{device_id}", false),
            ("e3/dev-{device_id}/up", false),
            ("e3/{device}/up", false),
            ("gw/{gateway_id}/{device_id}", false),
            ("gw/e3/{device_id}/up", true),
            ("e3/+/up/{device_id}", false),
            ("$SYS/{device_id}", false),
            ("", false),
        ] {
            assert!(
                check_topic(bad, with_gateway).is_err(),
                "{bad} was accepted"
            );
        }
        let hint = placeholder_problem("{devce_id}").hint;
        assert_eq!(hint.as_deref(), Some("did you mean `{device_id}`?"));
    }

    #[test]
    fn templates_render_filter_and_parse_back() {
        let template = bind_topic("gw/{gateway_id}/e3/{device_id}/down", "gw-1").expect("valid");
        assert_eq!(template.render("dev-7"), "gw/gw-1/e3/dev-7/down");
        assert_eq!(template.filter(), "gw/gw-1/e3/+/down");
        assert_eq!(template.device_of("gw/gw-1/e3/dev-7/down"), Some("dev-7"));
        assert_eq!(template.device_of("gw/gw-2/e3/dev-7/down"), None);
        assert_eq!(template.device_of("gw/gw-1/e3/a/b/down"), None);
        assert_eq!(template.device_of("gw/gw-1/e3//down"), None);
        assert_eq!(template.as_str(), "gw/{gateway_id}/e3/{device_id}/down");
    }

    #[test]
    fn log_levels_must_end_every_directive_in_a_level() {
        assert!(log_level("info".into()).is_ok());
        assert!(log_level("WARN,blindgate::queue=debug".into()).is_ok());
        assert!(log_level("info,rumqttc[conn{id=1}]=trace".into()).is_ok());
        let typo = log_level("inf".into());
        assert_eq!(
            typo.err().and_then(|p| p.hint),
            Some("did you mean `info`?".into())
        );
        assert!(log_level("".into()).is_err());
        assert!(log_level("info,".into()).is_err());
        assert!(log_level("blindgate=loud".into()).is_err());
    }

    #[test]
    fn gateway_ids_follow_the_device_id_rules() {
        assert_eq!(gateway_id("gw-1.site_2".into()), Ok("gw-1.site_2".into()));
        assert!(gateway_id(String::new()).is_err());
        assert!(gateway_id("a".repeat(65)).is_err());
        let bad = gateway_id("gw 1".into());
        assert_eq!(
            bad.map_err(|p| p.message),
            Err("' ' is not allowed in an id".into())
        );
    }

    #[test]
    fn listeners_overlap_on_the_same_port_unless_one_is_port_zero() {
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8883);
        assert!(listeners_overlap(any, loopback(8883)));
        assert!(listeners_overlap(loopback(8883), loopback(8883)));
        assert!(!listeners_overlap(loopback(8883), loopback(1883)));
        assert!(!listeners_overlap(loopback(0), loopback(0)));
    }

    #[test]
    fn every_section_has_its_keys_listed() {
        assert_eq!(
            keys_of(""),
            [
                "gateway", "devices", "envelope", "queue", "cloud", "metrics", "log"
            ]
        );
        assert!(keys_of("queue").contains(&"max_bytes"));
        assert_eq!(keys_of("cloud").len(), 18);
        assert_eq!(keys_of("devices").len(), 19);
    }

    #[test]
    fn a_websocket_path_is_absolute_visible_ascii_without_query() {
        assert_eq!(websocket_path("/mqtt".into()), Ok("/mqtt".to_owned()));
        assert_eq!(websocket_path("/a/b-c".into()), Ok("/a/b-c".to_owned()));
        for bad in ["mqtt", "", "/a b", "/mqtt?x=1", "/m#", "/%20", "/é"] {
            assert!(websocket_path(bad.into()).is_err(), "{bad}");
        }
    }
}
