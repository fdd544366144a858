//! Every Prometheus metric of the gateway, registered with its help text in one place.
//!
//! Label values come only from closed enums' `as_str()` (never a device id or a topic),
//! so cardinality stays bounded whatever the number of devices.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Why the ingress refused a publish, a subscription or a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// The publish topic is not the device's own uplink topic.
    TopicNotAllowed,
    /// A subscription to something other than the device's own downlink topic.
    SubscribeNotAllowed,
    /// The E3 header does not parse (any spec rule).
    MalformedEnvelope,
    /// The header's kind is not uplink.
    WrongKind,
    /// The header's device id is not the topic's.
    DeviceMismatch,
    /// The envelope is larger than the configured limit.
    Oversize,
    /// QoS 2 is not supported.
    Qos2,
    /// The queue refused the record (cap, quota, disk reserve, storage error).
    QueueFull,
    /// The MQTT packet could not be decoded.
    MalformedPacket,
    /// The TLS handshake failed (bad or missing client certificate, wrong version).
    TlsHandshake,
    /// The certificate carries no usable device identity.
    NoIdentity,
    /// The connection limit was reached.
    ConnectionLimit,
    /// The first packet was not a valid CONNECT in time.
    BadConnect,
}

impl Rejection {
    /// Every value, for registering label values up front.
    pub const ALL: [Self; 13] = [
        Self::TopicNotAllowed,
        Self::SubscribeNotAllowed,
        Self::MalformedEnvelope,
        Self::WrongKind,
        Self::DeviceMismatch,
        Self::Oversize,
        Self::Qos2,
        Self::QueueFull,
        Self::MalformedPacket,
        Self::TlsHandshake,
        Self::NoIdentity,
        Self::ConnectionLimit,
        Self::BadConnect,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::TopicNotAllowed => "topic_not_allowed",
            Self::SubscribeNotAllowed => "subscribe_not_allowed",
            Self::MalformedEnvelope => "malformed_envelope",
            Self::WrongKind => "wrong_kind",
            Self::DeviceMismatch => "device_mismatch",
            Self::Oversize => "oversize",
            Self::Qos2 => "qos2",
            Self::QueueFull => "queue_full",
            Self::MalformedPacket => "malformed_packet",
            Self::TlsHandshake => "tls_handshake",
            Self::NoIdentity => "no_identity",
            Self::ConnectionLimit => "connection_limit",
            Self::BadConnect => "bad_connect",
        }
    }
}

/// Why a downlink message was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DownlinkDrop {
    /// The envelope's header is malformed, of kind uplink, or names another device.
    Invalid,
    /// The device was offline and its pending buffer was full (oldest dropped).
    PendingFull,
}

impl DownlinkDrop {
    /// Every value.
    pub const ALL: [Self; 2] = [Self::Invalid, Self::PendingFull];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::PendingFull => "pending_full",
        }
    }
}

/// The gateway's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Envelopes stored durably and acknowledged to their device.
    pub received: IntCounter,
    /// Refusals by reason.
    pub rejected: IntCounterVec,
    /// Devices connected now.
    pub connections: IntGauge,
    /// Envelopes the cloud acknowledged.
    pub forwarded: IntCounter,
    /// Uplink connections established (the first one included).
    pub uplink_connects: IntCounter,
    /// 1 while the uplink is connected, else 0.
    pub uplink_connected: IntGauge,
    /// Unix time of the last cloud PUBACK.
    pub last_cloud_ack_seconds: IntGauge,
    /// Commands and receipts delivered to devices.
    pub downlink_delivered: IntCounter,
    /// Downlink messages dropped, by reason.
    pub downlink_dropped: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    ///
    /// # Panics
    /// Never in practice: names are static and registered once per registry; a clash
    /// would be a programming error caught by the unit test.
    #[allow(
        clippy::expect_used,
        reason = "static metric definitions, checked by test"
    )]
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("blindgate".into()), None).expect("static prefix is valid");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("registered once");
            g
        };
        let counter_vec = |name: &str, help: &str, label: &str, values: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            for value in values {
                c.with_label_values(&[value]);
            }
            c
        };
        let reasons: Vec<&str> = Rejection::ALL.iter().map(|r| r.as_str()).collect();
        let drops: Vec<&str> = DownlinkDrop::ALL.iter().map(|d| d.as_str()).collect();
        Self {
            received: counter(
                "ingress_received_total",
                "Envelopes stored durably and acknowledged to their device.",
            ),
            rejected: counter_vec(
                "ingress_rejected_total",
                "Publishes, subscriptions and connections refused by the device listener.",
                "reason",
                &reasons,
            ),
            connections: gauge("ingress_connections", "Devices connected now."),
            forwarded: counter(
                "uplink_forwarded_total",
                "Envelopes the cloud broker acknowledged (and the queue then deleted).",
            ),
            uplink_connects: counter(
                "uplink_connects_total",
                "Uplink connections established to a cloud endpoint.",
            ),
            uplink_connected: gauge("uplink_connected", "1 while the uplink is connected."),
            last_cloud_ack_seconds: gauge(
                "uplink_last_ack_timestamp_seconds",
                "Unix time of the last PUBACK from the cloud broker.",
            ),
            downlink_delivered: counter(
                "downlink_delivered_total",
                "Commands and receipts delivered to devices (device PUBACK received).",
            ),
            downlink_dropped: counter_vec(
                "downlink_dropped_total",
                "Commands and receipts not delivered, by reason.",
                "reason",
                &drops,
            ),
            registry,
        }
    }

    /// Counts one refusal.
    pub fn reject(&self, reason: Rejection) {
        self.rejected.with_label_values(&[reason.as_str()]).inc();
    }

    /// Encodes the registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let families = self.registry.gather();
        if prometheus::TextEncoder::new()
            .encode_utf8(&families, &mut out)
            .is_err()
        {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_and_encodes_with_help() {
        let metrics = Metrics::new();
        metrics.reject(Rejection::Oversize);
        let text = metrics.encode();
        assert!(text.contains("# HELP blindgate_ingress_rejected_total"));
        assert!(text.contains("blindgate_ingress_rejected_total{reason=\"oversize\"} 1"));
        assert!(text.contains("blindgate_ingress_rejected_total{reason=\"qos2\"} 0"));
        assert!(text.contains("# TYPE blindgate_uplink_connected gauge"));
    }
}
