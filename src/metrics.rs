//! Every Prometheus metric of the gateway, registered with its help text in one place.
//!
//! Label values come only from closed enums' `as_str()` (never a device id or a topic),
//! so cardinality stays bounded whatever the number of devices.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::queue::{QueueCounters, QueueStats};
use crate::status::RecentProblems;

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
    /// WebSocket listener: not an upgrade on the configured path offering the `mqtt`
    /// subprotocol (plain HTTP, wrong path, other subprotocol, deadline).
    WebSocketHandshake,
}

impl Rejection {
    /// Every value, for registering label values up front.
    pub const ALL: [Self; 14] = [
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
        Self::WebSocketHandshake,
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
            Self::WebSocketHandshake => "websocket_handshake",
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

/// Why an uplink connection attempt failed or a connection ended, from the error the
/// connection ended with (see `uplink::failure`). A closed set, registered up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UplinkFailure {
    /// No TCP connection (refused, unreachable, name not resolved), or no CONNACK
    /// within the connect timeout.
    Unreachable,
    /// The broker does not speak TLS 1.3 (it offered or demanded another version).
    TlsVersion,
    /// The broker's certificate does not chain to the configured cloud CA (an unknown
    /// issuer, or one with the CA's name whose signature does not verify).
    UnknownCa,
    /// The broker's certificate (or one in its chain) has expired.
    Expired,
    /// The broker's certificate (or one in its chain) is not valid yet.
    NotYetValid,
    /// The broker's certificate is not valid for the host name dialled.
    WrongName,
    /// The broker's public key matches none of the configured pins.
    PinMismatch,
    /// The broker refused the gateway's client certificate (a TLS alert about it).
    ClientCertRejected,
    /// Any other TLS failure.
    TlsOther,
    /// The broker answered CONNECT with a refusal code.
    Refused,
    /// The uplink ended the connection itself: an acknowledgement out of step.
    Protocol,
    /// An established connection broke (I/O error, keep-alive timeout, closed).
    Lost,
}

impl UplinkFailure {
    /// Every value, for registering label values up front.
    pub const ALL: [Self; 12] = [
        Self::Unreachable,
        Self::TlsVersion,
        Self::UnknownCa,
        Self::Expired,
        Self::NotYetValid,
        Self::WrongName,
        Self::PinMismatch,
        Self::ClientCertRejected,
        Self::TlsOther,
        Self::Refused,
        Self::Protocol,
        Self::Lost,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unreachable => "unreachable",
            Self::TlsVersion => "tls_version",
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongName => "wrong_name",
            Self::PinMismatch => "pin_mismatch",
            Self::ClientCertRejected => "client_cert_rejected",
            Self::TlsOther => "tls_other",
            Self::Refused => "refused",
            Self::Protocol => "protocol",
            Self::Lost => "lost",
        }
    }

    /// What it means, for the log line and the status page.
    pub const fn explain(self) -> &'static str {
        match self {
            Self::Unreachable => "the broker could not be reached or did not answer in time",
            Self::TlsVersion => "the broker does not offer TLS 1.3",
            Self::UnknownCa => "the broker's certificate is not issued by the configured cloud CA",
            Self::Expired => "the broker's certificate has expired",
            Self::NotYetValid => "the broker's certificate is not valid yet (check the clocks)",
            Self::WrongName => "the broker's certificate is not valid for the host name dialled",
            Self::PinMismatch => "the broker's public key matches none of the configured pins",
            Self::ClientCertRejected => "the broker refused the gateway's client certificate",
            Self::TlsOther => "the TLS handshake failed",
            Self::Refused => "the broker refused the MQTT connection",
            Self::Protocol => "the broker's acknowledgements were out of step",
            Self::Lost => "the connection was lost",
        }
    }
}

/// Uplink connection failures by reason (`blindgate_uplink_connection_failures_total`).
#[derive(Clone)]
pub struct UplinkFailures(IntCounterVec);

impl UplinkFailures {
    /// Counts one failure.
    pub fn inc(&self, reason: UplinkFailure) {
        self.0.with_label_values(&[reason.as_str()]).inc();
    }

    /// Failures counted for `reason`.
    pub fn count(&self, reason: UplinkFailure) -> u64 {
        self.0.with_label_values(&[reason.as_str()]).get()
    }

    /// Failures of every reason together.
    pub fn get(&self) -> u64 {
        UplinkFailure::ALL.iter().map(|r| self.count(*r)).sum()
    }
}

/// Label values of `blindgate_queue_storage_events_total`, in the order of the
/// counters `refresh_queue` reads.
const QUEUE_STORAGE_EVENTS: [&str; 2] = ["failed_commit", "database_moved_aside"];

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
    /// Records in the queue.
    pub queue_records: IntGauge,
    /// Bytes of records in the queue (what the caps count).
    pub queue_bytes: IntGauge,
    /// Bytes of the queue's files on disk (segments, the spare, its state).
    pub queue_disk_bytes: IntGauge,
    /// Devices with records in the queue.
    pub queue_devices: IntGauge,
    /// Age of the oldest record in the queue (0 when empty).
    pub queue_oldest_age_seconds: IntGauge,
    /// Group commits (fsyncs) of the queue.
    pub queue_commits: IntCounter,
    /// Records made durable.
    pub queue_committed: IntCounter,
    /// Damaged records moved to quarantine.
    pub queue_quarantined: IntCounter,
    /// Records dropped by the drop-oldest policy, by limit.
    pub queue_dropped: IntCounterVec,
    /// Storage trouble the queue recovered from by itself, by event.
    pub queue_storage_events: IntCounterVec,
    /// Records a clean stop left that the next open did not find (damaged files).
    pub queue_lost_at_open: IntCounter,
    /// Records moved from an earlier release's sled queue into the log.
    pub queue_migrated: IntCounter,
    /// The queue's byte cap (`queue.max_bytes`).
    pub queue_max_bytes: IntGauge,
    /// Uplink connection attempts that failed, and connections lost, by reason.
    pub uplink_connection_failures: UplinkFailures,
    /// Resident bytes the daemon's heap trimmer gave back to the kernel.
    pub heap_returned_bytes: IntCounter,
    /// 1 when `/readyz` says ready, else 0 (updated at each scrape).
    pub ready: IntGauge,
    /// notAfter of each certificate in use, by role and position in its file.
    pub certificate_not_after: IntGaugeVec,
    /// Config and certificate reloads, by trigger and result.
    pub reloads: IntCounterVec,
    /// 1 when the config file has changes that take effect only after a restart.
    pub config_restart_pending: IntGauge,
    /// The newest problems, for the status page (not a Prometheus metric).
    pub problems: RecentProblems,
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
        let registry = Registry::new();
        let named = |name: &str| format!("blindgate_{name}");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(named(name), help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(named(name), help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("registered once");
            g
        };
        let counter_vec = |name: &str, help: &str, label: &str, values: &[&str]| {
            let c =
                IntCounterVec::new(Opts::new(named(name), help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            for value in values {
                c.with_label_values(&[value]);
            }
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(named(name), help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("registered once");
            g
        };
        let build_info = gauge_vec(
            "build_info",
            "Always 1; the version label says which blindgate is running.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        register_process_collector(&registry);
        let reasons: Vec<&str> = Rejection::ALL.iter().map(|r| r.as_str()).collect();
        let drops: Vec<&str> = DownlinkDrop::ALL.iter().map(|d| d.as_str()).collect();
        let uplink_failures: Vec<&str> = UplinkFailure::ALL.iter().map(|f| f.as_str()).collect();
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
            uplink_connected: gauge(
                "uplink_connected",
                "1 while the uplink is connected and subscribed to its commands.",
            ),
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
            queue_records: gauge("queue_records", "Records in the queue."),
            queue_bytes: gauge(
                "queue_bytes",
                "Bytes of records in the queue (keys and values; what the caps count).",
            ),
            queue_disk_bytes: gauge("queue_disk_bytes", "Bytes of the queue's files on disk."),
            queue_devices: gauge("queue_devices", "Devices with records in the queue."),
            queue_oldest_age_seconds: gauge(
                "queue_oldest_age_seconds",
                "Age of the oldest record waiting in the queue; 0 when it is empty.",
            ),
            queue_commits: counter(
                "queue_commits_total",
                "Group commits (fsyncs) of the queue.",
            ),
            queue_committed: counter(
                "queue_committed_total",
                "Records made durable in the queue.",
            ),
            queue_quarantined: counter(
                "queue_quarantined_total",
                "Damaged stretches of the queue's log (one or more records each) put in \
                 quarantine.",
            ),
            queue_dropped: counter_vec(
                "queue_dropped_total",
                "Records dropped by the drop-oldest overflow policy, by the limit reached.",
                "limit",
                &["device_quota", "queue_bytes"],
            ),
            queue_storage_events: counter_vec(
                "queue_storage_events_total",
                "Storage trouble the queue handled by itself: failed_commit (retried, no \
                 PUBACK meanwhile), database_moved_aside (sled could not open the queue's \
                 state database, or an earlier release's queue; kept next to it).",
                "event",
                &QUEUE_STORAGE_EVENTS,
            ),
            queue_lost_at_open: counter(
                "queue_lost_at_open_total",
                "Records the last clean stop left in the queue that the next open did not \
                 find: lost to damaged files (a lower bound).",
            ),
            queue_migrated: counter(
                "queue_migrated_total",
                "Records moved from an earlier release's sled queue into the segment log \
                 at start-up.",
            ),
            queue_max_bytes: gauge("queue_max_bytes", "The queue's byte cap (queue.max_bytes)."),
            uplink_connection_failures: UplinkFailures(counter_vec(
                "uplink_connection_failures_total",
                "Uplink connection attempts that failed and connections lost, by reason \
                 (each is followed by a backoff).",
                "reason",
                &uplink_failures,
            )),
            heap_returned_bytes: counter(
                "heap_returned_bytes_total",
                "Resident bytes given back to the kernel by the daemon's heap trimmer \
                 (freed memory the allocator had kept, every 10 s).",
            ),
            ready: gauge(
                "ready",
                "1 when forwarding works (the same verdict as /readyz), else 0.",
            ),
            certificate_not_after: gauge_vec(
                "certificate_not_after_timestamp_seconds",
                "Unix time after which each certificate in use is no longer valid.",
                &["role", "index"],
            ),
            reloads: {
                let c = IntCounterVec::new(
                    Opts::new(
                        named("reloads_total"),
                        "Config and certificate reloads, by what triggered them and whether they were applied.",
                    ),
                    &["trigger", "result"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("registered once");
                for trigger in ["signal", "certificate_files"] {
                    for result in ["applied", "rejected"] {
                        c.with_label_values(&[trigger, result]);
                    }
                }
                c
            },
            config_restart_pending: gauge(
                "config_restart_pending",
                "1 when the config file changed settings that apply only after a restart.",
            ),
            problems: RecentProblems::default(),
            registry,
        }
    }

    /// Copies the queue's state into the gauges and counters (at scrape time).
    pub fn refresh_queue(&self, stats: &QueueStats, counters: &QueueCounters, now_ms: u64) {
        let gauge = |g: &IntGauge, v: u64| g.set(i64::try_from(v).unwrap_or(i64::MAX));
        gauge(&self.queue_records, stats.total.records);
        gauge(&self.queue_bytes, stats.total.bytes);
        gauge(&self.queue_disk_bytes, stats.size_on_disk);
        gauge(&self.queue_devices, stats.devices as u64);
        let age_ms = stats
            .oldest_arrival_ms
            .map_or(0, |t| now_ms.saturating_sub(t));
        gauge(&self.queue_oldest_age_seconds, age_ms / 1000);
        // Only this function advances these counters, so catching up to the queue's
        // own atomic counters keeps them exact.
        let catch_up = |c: &IntCounter, v: &AtomicU64| {
            c.inc_by(v.load(Ordering::Relaxed).saturating_sub(c.get()));
        };
        catch_up(&self.queue_commits, &counters.commits);
        catch_up(&self.queue_committed, &counters.committed);
        catch_up(&self.queue_quarantined, &counters.quarantined);
        catch_up(
            &self.queue_dropped.with_label_values(&["device_quota"]),
            &counters.dropped_device_quota,
        );
        catch_up(
            &self.queue_dropped.with_label_values(&["queue_bytes"]),
            &counters.dropped_queue_bytes,
        );
        catch_up(&self.queue_lost_at_open, &counters.lost_at_open);
        catch_up(&self.queue_migrated, &counters.migrated);
        for (event, value) in QUEUE_STORAGE_EVENTS
            .iter()
            .zip([&counters.failed_commits, &counters.databases_moved_aside])
        {
            catch_up(
                &self.queue_storage_events.with_label_values(&[event]),
                value,
            );
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

/// Registers the standard `process_*` families (CPU, RSS, open files, threads) for
/// this process. Where /proc is not readable the families are simply absent.
fn register_process_collector(registry: &Registry) {
    let collector = prometheus::process_collector::ProcessCollector::for_self();
    if let Err(err) = registry.register(Box::new(collector)) {
        tracing::debug!(error = %err, "process metrics unavailable");
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
        let build = format!(
            "blindgate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
        assert!(text.contains(
            "blindgate_reloads_total{result=\"rejected\",trigger=\"certificate_files\"} 0"
        ));
        assert!(text.contains("# TYPE process_resident_memory_bytes gauge"));
        for failure in UplinkFailure::ALL {
            let series = format!(
                "blindgate_uplink_connection_failures_total{{reason=\"{}\"}} 0",
                failure.as_str()
            );
            assert!(text.contains(&series), "{series}");
        }
        metrics
            .uplink_connection_failures
            .inc(UplinkFailure::Expired);
        assert_eq!(metrics.uplink_connection_failures.get(), 1);
        assert_eq!(
            metrics
                .uplink_connection_failures
                .count(UplinkFailure::Expired),
            1
        );
    }
}
