//! What the gateway's HTTP endpoint reports: Prometheus metrics, readiness ("forwarding
//! works", not merely "connected") and the technician's status page.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::now_ms;
use crate::config::units::{format_byte_size, format_duration};
use crate::http::Report;
use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::status::{self, CertificateStatus, StatusView};

/// The gateway's health, shared with the reload path (which updates the readiness age
/// and the certificate list).
#[derive(Clone)]
pub struct Health {
    queue: Queue,
    metrics: Metrics,
    max_ack_age_ms: Arc<AtomicU64>,
    certificates: Arc<Mutex<Vec<CertificateStatus>>>,
    endpoints: Arc<Mutex<String>>,
}

impl Health {
    /// Health of `queue` and the uplink whose acks `metrics` records.
    pub fn new(queue: Queue, metrics: Metrics, max_ack_age: Duration) -> Self {
        let health = Self {
            queue,
            metrics,
            max_ack_age_ms: Arc::default(),
            certificates: Arc::default(),
            endpoints: Arc::default(),
        };
        health.set_max_ack_age(max_ack_age);
        health
    }

    /// Readiness fails when records wait and the cloud has not acked for this long.
    pub fn set_max_ack_age(&self, age: Duration) {
        let ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        self.max_ack_age_ms.store(ms, Ordering::Relaxed);
    }

    /// The certificates in use, for the status page.
    pub fn set_certificates(&self, list: Vec<CertificateStatus>) {
        *self.certificates.lock().unwrap_or_else(|p| p.into_inner()) = list;
    }

    /// The configured cloud endpoints, for the status page.
    pub fn set_endpoints(&self, endpoints: String) {
        *self.endpoints.lock().unwrap_or_else(|p| p.into_inner()) = endpoints;
    }

    fn refresh(&self) -> Result<(), String> {
        self.metrics
            .refresh_queue(&self.queue.stats(), &self.queue.counters(), now_ms());
        let ready = self.verdict();
        self.metrics.ready.set(i64::from(ready.is_ok()));
        ready
    }

    /// Ready unless records have waited longer than the configured age and the cloud
    /// has not acknowledged anything for that long: "connected but stuck" is not ready.
    fn verdict(&self) -> Result<(), String> {
        let stats = self.queue.stats();
        let now = now_ms();
        let Some(oldest) = stats.oldest_arrival_ms else {
            return Ok(());
        };
        let max_ms = self.max_ack_age_ms.load(Ordering::Relaxed);
        let waited = now.saturating_sub(oldest);
        let last_ack_ms =
            u64::try_from(self.metrics.last_cloud_ack_seconds.get()).unwrap_or(0) * 1000;
        let since_ack = now.saturating_sub(last_ack_ms);
        if waited > max_ms && since_ack > max_ms {
            return Err(format!(
                "{} records waiting, oldest for {} s; no cloud acknowledgement for {} s",
                stats.total.records,
                waited / 1000,
                since_ack / 1000
            ));
        }
        Ok(())
    }

    fn view(&self) -> StatusView {
        let not_ready = self.refresh().err();
        let stats = self.queue.stats();
        let m = &self.metrics;
        let now_s = i64::try_from(now_ms() / 1000).unwrap_or(i64::MAX);
        let last_ack = m.last_cloud_ack_seconds.get();
        let age = stats
            .oldest_arrival_ms
            .map_or(0, |t| now_ms().saturating_sub(t));
        StatusView {
            queue: vec![
                ("records", stats.total.records.to_string()),
                ("bytes", format_byte_size(stats.total.bytes)),
                (
                    "cap",
                    format_byte_size(u64::try_from(m.queue_max_bytes.get()).unwrap_or(0)),
                ),
                ("devices with records", stats.devices.to_string()),
                (
                    "oldest record waiting",
                    format_duration(Duration::from_millis(age)),
                ),
                ("on disk", format_byte_size(stats.size_on_disk)),
                ("quarantined (total)", m.queue_quarantined.get().to_string()),
            ],
            uplink: vec![
                (
                    "endpoints",
                    self.endpoints
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone(),
                ),
                (
                    "connected",
                    if m.uplink_connected.get() == 1 {
                        "yes"
                    } else {
                        "no"
                    }
                    .to_owned(),
                ),
                ("connections made", m.uplink_connects.get().to_string()),
                (
                    "connections failed or lost",
                    m.uplink_connection_failures.get().to_string(),
                ),
                ("forwarded", m.forwarded.get().to_string()),
                (
                    "last cloud ack",
                    if last_ack == 0 {
                        "never".to_owned()
                    } else {
                        format!(
                            "{} UTC ({} s ago)",
                            status::format_utc(last_ack),
                            now_s - last_ack
                        )
                    },
                ),
                ("devices connected", m.connections.get().to_string()),
            ],
            certificates: self
                .certificates
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            problems: m.problems.list(),
            not_ready,
        }
    }
}

impl Report for Health {
    fn ready(&self) -> Result<(), String> {
        self.refresh()
    }

    fn metrics_text(&self) -> String {
        let _ = self.refresh();
        self.metrics.encode()
    }

    fn status_page(&self) -> Option<String> {
        Some(status::render(&self.view()))
    }
}
