//! Checking each section of the file key by key, and the rules across keys; defaults
//! fill what the file leaves out. The single values are read by `values`.

use super::*;

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
    pub(super) fn complete(self) -> Option<ValidConfig> {
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

pub(super) fn validate(raw: RawConfig, base_dir: &Path, reporter: &mut Reporter<'_>) -> Sections {
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
pub(super) struct Section<'r, 't> {
    /// Where problems go; it also knows which keys already failed.
    pub(super) reporter: &'r mut Reporter<'t>,
    /// The section's name: the prefix of every key reported.
    pub(super) name: &'static str,
}

impl<'r, 't> Section<'r, 't> {
    /// Starts on section `name`; an absent section is an empty one.
    pub(super) fn open<T: Default>(
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

    pub(super) fn key(&self, field: &str) -> String {
        format!("{}.{field}", self.name)
    }

    /// The checked value of an optional key, or `default` when it is absent; `None`
    /// if the value is wrong (reported here or while reading the file).
    pub(super) fn optional<T, U>(
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
    pub(super) fn required<T, U>(
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
    pub(super) fn missing<U>(&mut self, field: &str, example: &str) -> Option<U> {
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
    pub(super) fn list<U>(
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

    pub(super) fn checked<T, U>(
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
    pub(super) fn conflict(&mut self, field: &str, problem: Problem) {
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

pub(super) fn gateway_section(
    reporter: &mut Reporter<'_>,
    raw: Opt<RawGateway>,
    base: &Path,
) -> Option<GatewaySection> {
    let (mut s, raw) = Section::open(reporter, "gateway", raw);
    let id = required!(s, raw.id, r#""gw-1""#, gateway_id);
    let data_dir = optional!(s, raw.data_dir, PathBuf::from(DEFAULT_DATA_DIR), |p| {
        file_path(base, p)
    });
    let threads = optional!(s, raw.threads, DEFAULT_THREADS, count_in(1..=64));
    Some(GatewaySection {
        id: id?,
        data_dir: data_dir?,
        threads: threads?,
    })
}

pub(super) fn devices_section(
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

pub(super) fn check_plaintext_loopback(s: &mut Section<'_, '_>, addr: SocketAddr) {
    if addr.ip().is_loopback() {
        return;
    }
    let problem = Problem::new(format!(
        "plain MQTT on {addr} would let anyone on the network connect without TLS"
    ))
    .hint("use a 127.0.0.1 address, or set plaintext_allow_non_loopback = true (lab use only)");
    s.conflict("plaintext_listen", problem);
}

pub(super) fn check_topics_differ(s: &mut Section<'_, '_>, up: &str, down: &str) {
    if up == down {
        let problem = Problem::new(format!("`{down}` is also the up_topic"))
            .hint("the up and down topics must differ");
        s.conflict("down_topic", problem);
    }
}

pub(super) fn envelope_section(
    reporter: &mut Reporter<'_>,
    raw: Opt<RawEnvelope>,
) -> Option<EnvelopeSection> {
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

pub(super) fn queue_section(
    reporter: &mut Reporter<'_>,
    raw: Opt<RawQueue>,
) -> Option<QueueSection> {
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

pub(super) fn cloud_section(
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
    // 0 stands for "not given": the whole window.
    let drain_inflight = optional!(s, raw.drain_inflight, 0, count_in(1..=65_535));
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
    let drain_inflight = match (drain_inflight, inflight) {
        (Some(0), Some(window)) => Some(window),
        (Some(drain), Some(window)) => check_drain_inflight(&mut s, drain, window),
        _ => None,
    };
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
        drain_inflight: drain_inflight?,
        ready_max_ack_age: ready_max_ack_age?,
    })
}

/// `cloud.endpoints`: required, non-empty, each one checked.
pub(super) fn cloud_endpoints(
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

/// `drain_inflight` is a share of `inflight`, so at most it.
fn check_drain_inflight(s: &mut Section<'_, '_>, drain: u16, window: u16) -> Option<u16> {
    if drain > window {
        let problem = Problem::new(format!(
            "drain_inflight {drain} is more than inflight {window}"
        ))
        .hint("drain_inflight is the part of inflight backlog records may take");
        s.conflict("drain_inflight", problem);
        return None;
    }
    Some(drain)
}

pub(super) fn check_backoff_order(s: &mut Section<'_, '_>, min: Duration, max: Duration) {
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

pub(super) fn metrics_section(
    reporter: &mut Reporter<'_>,
    raw: Opt<RawMetrics>,
) -> Option<MetricsSection> {
    let (mut s, raw) = Section::open(reporter, "metrics", raw);
    let listen = optional!(
        s,
        raw.listen,
        Some(DEFAULT_METRICS_LISTEN),
        optional_socket_addr,
    );
    Some(MetricsSection { listen: listen? })
}

pub(super) fn log_section(reporter: &mut Reporter<'_>, raw: Opt<RawLog>) -> Option<LogSection> {
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
pub(super) fn check_quota_fits_envelope(
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
pub(super) fn check_listeners_distinct(
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

pub(super) fn listeners_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}
