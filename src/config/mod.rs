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
mod raw;
mod sections;
pub mod units;
mod values;

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
use raw::*;
use sections::*;
use units::{ByteSize, Count, HumanDuration, format_byte_size, format_duration};
use values::*;

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
    /// Threads that serve devices, the uplink and the metrics endpoint (1 to 64; the
    /// queue's fsync runs on a thread of its own beside them). Default: 1. One thread
    /// used less CPU per message than two and was as fast or faster in every throughput
    /// scenario of the bench on a 2-core machine: work that moves between threads costs
    /// a wake-up each time.
    pub threads: u16,
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
    /// Of `inflight`, how many may be backlog records (1..=inflight), so live records
    /// are not queued behind a whole window of them. Default: `inflight`.
    pub drain_inflight: u16,
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

// Defaults: each is documented on its `ValidConfig` field and shown in
// `config/gateway.toml`.

const MIB: u64 = 1 << 20;
const DEFAULT_DATA_DIR: &str = "/var/lib/blindgate";
const DEFAULT_THREADS: u16 = 1;
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
        assert_eq!(keys_of("cloud").len(), 19);
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
