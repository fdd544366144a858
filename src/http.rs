//! The operator's HTTP endpoint (loopback by default): `/metrics` for Prometheus,
//! `/healthz` (the process answers), `/readyz` (forwarding works: nothing waits, or
//! the cloud acknowledged something recently) and `/status`, a read-only page for a
//! technician. A deliberately small HTTP/1.1 responder:
//! GET only, one request per connection, bounded request size and time.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What an HTTP endpoint reports: the gateway's [`Health`], or the cloud ingest's
/// metrics.
pub trait Report: Clone + Send + Sync + 'static {
    /// The Prometheus text for `/metrics`.
    fn metrics_text(&self) -> String;
    /// `Ok` when ready; otherwise why not (for `/readyz`).
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
    /// The HTML for `/status`, if this endpoint has one.
    fn status_page(&self) -> Option<String> {
        None
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
        ("GET", "/status" | "/") => match health.status_page() {
            Some(page) => ("200 OK", "text/html; charset=utf-8", page),
            None => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        },
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
