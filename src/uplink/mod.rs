//! The E4 uplink: MQTT over mutual TLS 1.3 to the cloud broker (rumqttc's MQTT codec,
//! rustls through tokio-rustls).
//!
//! The queue, not rumqttc, owns resending: every connection starts from the oldest
//! unacknowledged record of each device, and a record is deleted only on the cloud's
//! PUBACK for it. Connections are retried with exponential backoff and full jitter; a
//! connection that never got a CONNACK moves on to the next endpoint (failover).
//!
//! # Layout
//!
//! - `link`: connecting, and packets batched into few TLS records and writes.
//! - `connection`: one connection's loop (publish, settle, downlink, keep-alive).
//! - `flight`: the window of records in flight and the fair, paced choice of the next.
//! - `failure`: why a connection failed, as a label value of the failure metric.

mod connection;
mod failure;
mod flight;
mod link;
mod outbound;

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::ingress::DeviceRegistry;
use crate::log_limit::LogLimiter;
use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::topics::TopicTemplate;
use connection::{Connection, Ended};

/// A cloud broker address (`mqtts://host:port` in the config file). The host is also
/// the name its certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// DNS name (or IP address) of the broker.
    pub host: String,
    /// TCP port, usually 8883.
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// How the uplink connects and paces itself.
#[derive(Debug, Clone)]
pub struct UplinkSettings {
    /// Brokers in order of preference; at least one.
    pub endpoints: Vec<Endpoint>,
    /// TLS 1.3 client configuration (see `tls::uplink_client_config`).
    pub tls: Arc<rustls::ClientConfig>,
    /// MQTT client id (the gateway id by default).
    pub client_id: String,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Records in flight (sent, not yet acknowledged) at most.
    pub window: usize,
    /// First retry delay.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Where records go: `gw/{gateway_id}/e3/{device_id}/up`.
    pub up_topic: TopicTemplate,
    /// Where commands and receipts come from: `gw/{gateway_id}/e3/{device_id}/down`.
    pub down_topic: TopicTemplate,
    /// Largest envelope in either direction.
    pub max_envelope: usize,
    /// Backlog records per second after an outage (0: unpaced). Records that arrived
    /// while connected are never held back by it.
    pub drain_rate: u32,
    /// Of `window`, how many records in flight may be backlog: live records are then
    /// queued behind at most this many.
    pub drain_window: usize,
}

/// Exponential backoff with full jitter, so many gateways that lost the same cloud do
/// not come back in the same second.
struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    random: RandomState,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
            random: RandomState::new(),
        }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay: uniform in [ceiling / 2, ceiling], ceiling = min * 2^attempt <= max.
    fn next(&mut self) -> Duration {
        let ceiling = self
            .min
            .saturating_mul(1 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let unit = (self.random.hash_one(self.attempt) % 1000) as f64 / 1000.0;
        ceiling.mul_f64(0.5 + unit / 2.0)
    }
}

/// What a reload may change while the uplink runs: the settings each new connection
/// uses (a replaced certificate is used from the next connection on), and a signal to
/// close the current connection at once and reconnect with them (new endpoints or
/// client id).
#[derive(Clone)]
pub struct UplinkControl {
    /// The settings for the next connection.
    pub settings: watch::Receiver<UplinkSettings>,
    /// Notified to reconnect now with the latest settings.
    pub reconnect: Arc<Notify>,
}

/// Runs the uplink until `shutdown`; then closes the connection cleanly.
pub async fn run(
    control: UplinkControl,
    queue: Queue,
    registry: Arc<DeviceRegistry>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut settings_rx = control.settings;
    let mut settings = settings_rx.borrow_and_update().clone();
    let mut backoff = Backoff::new(settings.backoff_min, settings.backoff_max);
    let mut current = 0;
    // Each reason is logged at most once per 10 s (with the count of the others);
    // every failure is counted in the metric.
    let log = LogLimiter::new(Duration::from_secs(10));
    loop {
        if settings_rx.has_changed().unwrap_or(false) {
            let next = settings_rx.borrow_and_update().clone();
            if next.endpoints != settings.endpoints {
                current = 0;
            }
            backoff = Backoff::new(next.backoff_min, next.backoff_max);
            settings = next;
        }
        if settings.endpoints.is_empty() {
            tracing::error!("no cloud endpoint configured; the uplink is off");
            return;
        }
        current %= settings.endpoints.len();
        let connection = Connection {
            settings: &settings,
            endpoint: &settings.endpoints[current],
            queue: &queue,
            registry: &registry,
            metrics: &metrics,
        };
        let ended = connection.run(&shutdown, &control.reconnect).await;
        if let Ended::Lost {
            failure, detail, ..
        } = &ended
        {
            let endpoint = &settings.endpoints[current];
            metrics.uplink_connection_failures.inc(*failure);
            if let Some(suppressed) = log.check(failure.as_str()) {
                tracing::warn!(
                    endpoint = %endpoint,
                    reason = failure.as_str(),
                    error = %detail,
                    suppressed,
                    "uplink connection failed: {}",
                    failure.explain()
                );
            }
            metrics.problems.record(
                failure.as_str(),
                format!("uplink to {endpoint}: {} ({detail})", failure.explain()),
            );
        }
        match ended {
            Ended::Shutdown => return,
            Ended::Reconfigured => {
                backoff.reset();
                continue;
            }
            Ended::Lost {
                was_connected: true,
                ..
            } => backoff.reset(),
            Ended::Lost {
                was_connected: false,
                ..
            } => current = (current + 1) % settings.endpoints.len(),
        }
        let delay = backoff.next();
        tracing::info!(next = %settings.endpoints[current], ?delay, "uplink retrying");
        tokio::select! {
            () = shutdown.cancelled() => return,
            // A reload during the backoff: connect now, with the new settings.
            () = control.reconnect.notified() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_stays_under_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[3] >= Duration::from_millis(400));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(100));
    }
}
