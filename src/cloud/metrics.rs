//! The cloud ingest's Prometheus metrics; label values from closed enums only.

use crate::commands::CommandOutcome;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Why the ingest did not deliver an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloudRejection {
    /// The topic is not an uplink topic of a valid gateway and device.
    Topic,
    /// Larger than the envelope limit.
    Oversize,
    /// The clear header breaks a spec rule.
    Header,
    /// The header's device id is not the topic's.
    DeviceMismatch,
    /// The registry does not let this gateway carry this device.
    NotAllowed,
    /// No such device in the key store.
    UnknownDevice,
    /// The device has no key with this id.
    UnknownKey,
    /// The key was rotated out and its grace period is over.
    KeyExpired,
    /// The device's keys were destroyed (crypto-shredding).
    Shredded,
    /// The AEAD tag does not verify.
    Auth,
    /// Not an uplink envelope.
    WrongKind,
    /// Already accepted (answered with a receipt again).
    Duplicate,
    /// More than 65536 below the highest accepted seq.
    Stale,
    /// All chunks of an image arrived but the SHA-256 does not match.
    ImageCorrupt,
    /// Storing it failed.
    Storage,
}

impl CloudRejection {
    /// Every value.
    pub const ALL: [Self; 15] = [
        Self::Topic,
        Self::Oversize,
        Self::Header,
        Self::DeviceMismatch,
        Self::NotAllowed,
        Self::UnknownDevice,
        Self::UnknownKey,
        Self::KeyExpired,
        Self::Shredded,
        Self::Auth,
        Self::WrongKind,
        Self::Duplicate,
        Self::Stale,
        Self::ImageCorrupt,
        Self::Storage,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Topic => "topic",
            Self::Oversize => "oversize",
            Self::Header => "header",
            Self::DeviceMismatch => "device_mismatch",
            Self::NotAllowed => "not_allowed",
            Self::UnknownDevice => "unknown_device",
            Self::UnknownKey => "unknown_key",
            Self::KeyExpired => "key_expired",
            Self::Shredded => "shredded",
            Self::Auth => "auth",
            Self::WrongKind => "wrong_kind",
            Self::Duplicate => "duplicate",
            Self::Stale => "stale",
            Self::ImageCorrupt => "image_corrupt",
            Self::Storage => "storage",
        }
    }

    /// Maps the key store's reason names onto this closed set.
    pub fn from_key_error(reason: &str) -> Self {
        match reason {
            "unknown_device" => Self::UnknownDevice,
            "unknown_key" => Self::UnknownKey,
            "key_expired" => Self::KeyExpired,
            "shredded" => Self::Shredded,
            _ => Self::Storage,
        }
    }
}

/// The ingest's metrics.
#[derive(Clone)]
pub struct CloudMetrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Envelopes opened, checked and stored.
    pub accepted: IntCounter,
    /// Envelopes not delivered, by reason.
    pub rejected: IntCounterVec,
    /// Receipts published.
    pub receipts: IntCounter,
    /// Images reassembled with a matching SHA-256.
    pub images_completed: IntCounter,
    /// 1 while the ingest is connected and its subscription is acknowledged.
    pub subscribed: IntGauge,
    /// Command results devices sent back, by `result` (`executed`, `refused`).
    pub command_results: IntCounterVec,
}

impl CloudMetrics {
    /// Creates and registers every metric.
    #[allow(
        clippy::expect_used,
        reason = "static metric definitions, checked by test"
    )]
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("blindgate_cloud".into()), None)
            .expect("static prefix is valid");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        let rejected = IntCounterVec::new(
            Opts::new(
                "rejected_total",
                "Envelopes not delivered to the sink, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(rejected.clone()))
            .expect("registered once");
        for reason in CloudRejection::ALL {
            rejected.with_label_values(&[reason.as_str()]);
        }
        let command_results = IntCounterVec::new(
            Opts::new(
                "command_results_total",
                "Command results sent back by devices, by result (executed, refused).",
            ),
            &["result"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(command_results.clone()))
            .expect("registered once");
        for outcome in CommandOutcome::ALL {
            command_results.with_label_values(&[outcome.as_str()]);
        }
        Self {
            accepted: counter(
                "accepted_total",
                "Envelopes opened, checked and stored durably.",
            ),
            receipts: counter("receipts_total", "Receipts published to devices."),
            images_completed: counter(
                "images_completed_total",
                "Camera images reassembled with a matching SHA-256.",
            ),
            subscribed: {
                let g = IntGauge::new(
                    "subscribed",
                    "1 while connected to the broker with the subscription acknowledged.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("registered once");
                g
            },
            rejected,
            command_results,
            registry,
        }
    }

    /// Counts one rejection.
    pub fn reject(&self, reason: CloudRejection) {
        self.rejected.with_label_values(&[reason.as_str()]).inc();
    }

    /// Waits until the ingest is subscribed (for start-up ordering in tests and the
    /// demo: a broker drops messages nobody has subscribed to yet); false on timeout.
    pub async fn wait_subscribed(&self, timeout: std::time::Duration) -> bool {
        tokio::time::timeout(timeout, async {
            while self.subscribed.get() == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await
        .is_ok()
    }

    /// Counts one command result.
    pub fn command_result(&self, outcome: CommandOutcome) {
        self.command_results
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    /// Command results counted with `outcome`.
    pub fn command_results(&self, outcome: CommandOutcome) -> u64 {
        self.command_results
            .with_label_values(&[outcome.as_str()])
            .get()
    }

    /// Rejections counted for `reason`.
    pub fn rejected(&self, reason: CloudRejection) -> u64 {
        self.rejected.with_label_values(&[reason.as_str()]).get()
    }
}

impl Default for CloudMetrics {
    fn default() -> Self {
        Self::new()
    }
}
