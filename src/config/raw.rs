//! The config file as written: every key optional, each value with its span, unknown
//! keys refused (`#[serde(deny_unknown_fields)]`). `sections` checks these.

use super::*;

pub(super) type Opt<T> = Option<Spanned<T>>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) gateway: Opt<RawGateway>,
    pub(super) devices: Opt<RawDevices>,
    pub(super) envelope: Opt<RawEnvelope>,
    pub(super) queue: Opt<RawQueue>,
    pub(super) cloud: Opt<RawCloud>,
    pub(super) metrics: Opt<RawMetrics>,
    pub(super) log: Opt<RawLog>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGateway {
    pub(super) id: Opt<String>,
    pub(super) data_dir: Opt<String>,
    pub(super) threads: Opt<Count>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDevices {
    pub(super) listen: Opt<String>,
    pub(super) ca: Opt<String>,
    pub(super) cert: Opt<String>,
    pub(super) key: Opt<String>,
    pub(super) pkcs11_module: Opt<String>,
    pub(super) pkcs11_pin_file: Opt<String>,
    pub(super) pkcs11_pin_credential: Opt<String>,
    pub(super) plaintext_listen: Opt<String>,
    pub(super) plaintext_allow_non_loopback: Opt<bool>,
    pub(super) websocket_listen: Opt<String>,
    pub(super) websocket_path: Opt<String>,
    pub(super) max_connections: Opt<Count>,
    pub(super) max_inflight_per_device: Opt<Count>,
    pub(super) rate_limit_per_device: Opt<Count>,
    pub(super) rate_burst_per_device: Opt<Count>,
    pub(super) connect_timeout: Opt<HumanDuration>,
    pub(super) up_topic: Opt<String>,
    pub(super) down_topic: Opt<String>,
    pub(super) downlink_pending_per_device: Opt<Count>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEnvelope {
    pub(super) max_size: Opt<ByteSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueue {
    pub(super) max_bytes: Opt<ByteSize>,
    pub(super) min_free_disk: Opt<ByteSize>,
    pub(super) device_quota: Opt<ByteSize>,
    pub(super) overflow: Opt<Overflow>,
    pub(super) cache_size: Opt<ByteSize>,
    pub(super) max_batch: Opt<Count>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCloud {
    pub(super) endpoints: Opt<Vec<Spanned<String>>>,
    pub(super) ca: Opt<String>,
    pub(super) cert: Opt<String>,
    pub(super) key: Opt<String>,
    pub(super) pkcs11_module: Opt<String>,
    pub(super) pkcs11_pin_file: Opt<String>,
    pub(super) pkcs11_pin_credential: Opt<String>,
    pub(super) pins: Opt<Vec<Spanned<String>>>,
    pub(super) cipher_order: Opt<CipherOrder>,
    pub(super) client_id: Opt<String>,
    pub(super) keep_alive: Opt<HumanDuration>,
    pub(super) inflight: Opt<Count>,
    pub(super) backoff_min: Opt<HumanDuration>,
    pub(super) backoff_max: Opt<HumanDuration>,
    pub(super) up_topic: Opt<String>,
    pub(super) down_topic: Opt<String>,
    pub(super) drain_rate: Opt<Count>,
    pub(super) drain_inflight: Opt<Count>,
    pub(super) ready_max_ack_age: Opt<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: Opt<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Opt<LogFormat>,
    pub(super) level: Opt<String>,
}

/// The keys of each section, for "did you mean" (`""`: the section names).
pub(super) fn keys_of(section: &str) -> &'static [&'static str] {
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
