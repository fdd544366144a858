//! The operator's HTTP endpoint (loopback by default): `/metrics` for Prometheus,
//! `/healthz` (the process answers) and `/readyz` (forwarding works: nothing waits, or
//! the cloud acknowledged something recently). A deliberately small HTTP/1.1 responder:
//! GET only, one request per connection, bounded request size and time.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::metrics::Metrics;
use crate::queue::Queue;

/// What an HTTP endpoint reports: the gateway's [`Health`], or the cloud ingest's
/// metrics.
pub trait Report: Clone + Send + Sync + 'static {
    /// The Prometheus text for `/metrics`.
    fn metrics_text(&self) -> String;
    /// `Ok` when ready; otherwise why not (for `/readyz`).
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

impl Report for crate::cloud::CloudMetrics {
    fn metrics_text(&self) -> String {
        let mut out = String::new();
        if prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .is_err()
        {
            out.clear();
        }
        out
    }
}

/// What the gateway's endpoint reports on.
#[derive(Clone)]
pub struct Health {
    queue: Queue,
    metrics: Metrics,
    max_ack_age: Duration,
}

impl Health {
    /// Health of `queue` and the uplink whose acks `metrics` records.
    pub fn new(queue: Queue, metrics: Metrics, max_ack_age: Duration) -> Self {
        Self {
            queue,
            metrics,
            max_ack_age,
        }
    }
}

impl Report for Health {
    /// Ready unless records have waited longer than `max_ack_age` and the cloud has not
    /// acknowledged anything for that long: "connected but stuck" is not ready.
    fn ready(&self) -> Result<(), String> {
        let stats = self.queue.stats();
        let now = now_ms();
        let Some(oldest) = stats.oldest_arrival_ms else {
            return Ok(());
        };
        let max_ms = u64::try_from(self.max_ack_age.as_millis()).unwrap_or(u64::MAX);
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

    fn metrics_text(&self) -> String {
        self.metrics
            .refresh_queue(&self.queue.stats(), &self.queue.counters(), now_ms());
        self.metrics.encode()
    }
}

/// Serves until `shutdown`.
pub async fn serve(listener: TcpListener, health: impl Report, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let health = health.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), respond(stream, &health)).await;
        });
    }
}

async fn respond(mut stream: TcpStream, health: &impl Report) -> std::io::Result<()> {
    let mut request = [0u8; 2048];
    let mut len = 0;
    while len < request.len() {
        let n = stream.read(&mut request[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
        if request[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&request[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", health.metrics_text()),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", "/readyz") => match health.ready() {
            Ok(()) => ("200 OK", "text/plain", "ready\n".to_owned()),
            Err(why) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
