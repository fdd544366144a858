//! The device listener: MQTT 3.1.1 over TLS 1.3 with client certificates, optionally
//! also over WebSocket on TLS 1.3 (and, for the lab only, plain TCP), built on
//! `rumqttc::mqttbytes` (see docs/ARCHITECTURE.md for why not rumqttd). Every transport
//! ends in the same session code.
//!
//! # Layout
//!
//! - `session`: one connection's MQTT state machine; PUBACK only after the queue's fsync.
//! - `registry`: which device is connected where; downlink buffering.
//! - `validate`: the E3 header checks a keyless gateway can make.
//! - `websocket`: the WebSocket upgrade and the message-to-byte-stream adapter.

mod held;
pub mod registry;
mod session;
pub mod validate;
pub mod websocket;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::log_limit::LogLimiter;
use crate::metrics::{Metrics, Rejection};
use crate::queue::Queue;
use crate::tls::TlsServerStream;
use crate::topics::TopicTemplate;
pub use registry::DeviceRegistry;
pub use websocket::WebSocketListen;

/// Limits and topics of the device listener.
#[derive(Debug, Clone)]
pub struct IngressSettings {
    /// Where devices publish: `e3/{device_id}/up` by default.
    pub up_topic: TopicTemplate,
    /// Where devices receive commands and receipts: `e3/{device_id}/down`.
    pub down_topic: TopicTemplate,
    /// Largest E3 envelope accepted.
    pub max_envelope: usize,
    /// Largest MQTT packet read (envelope plus topic and header overhead); a larger
    /// one is refused from its fixed header, before its payload is buffered.
    pub max_packet: usize,
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// Publishes per connection waiting for the queue before reading pauses.
    pub max_inflight: usize,
    /// Messages per second per device (0: unlimited).
    pub rate_per_sec: u32,
    /// Burst allowance per device.
    pub rate_burst: u32,
    /// Deadline for the TLS handshake and the CONNECT.
    pub connect_timeout: Duration,
    /// Envelope bytes held in memory across all connections while waiting for the queue.
    pub inflight_bytes: usize,
}

/// A connection that passed its handshakes, and who is on the other end; `None` if it
/// did not (counted and logged).
type Accepted<S> = Option<(S, Identity)>;

/// Who is on the other end of a connection.
pub(crate) enum Identity {
    /// Identities from a verified client certificate (CN, then SAN DNS names).
    Certificate(Vec<String>),
    /// Plain listener (lab only): the MQTT client id is taken at its word.
    ClientId,
}

impl Identity {
    /// The device id for this connection: the client id if the certificate names it,
    /// else the certificate's first identity. Always a valid E3 device id.
    fn device_id(&self, client_id: &str) -> Option<String> {
        let valid = |id: &str| e3::DeviceId::new(id).is_ok();
        match self {
            Self::Certificate(ids) => ids
                .iter()
                .find(|id| *id == client_id && valid(id))
                .or_else(|| ids.iter().find(|id| valid(id)))
                .cloned(),
            Self::ClientId => valid(client_id).then(|| client_id.to_owned()),
        }
    }
}

/// State shared by every session.
pub(crate) struct Shared {
    queue: Queue,
    registry: Arc<DeviceRegistry>,
    metrics: Metrics,
    settings: IngressSettings,
    log: LogLimiter,
    inflight_bytes: Arc<Semaphore>,
}

impl Shared {
    /// Counts a refusal and logs it, at most once per reason every 10 s.
    fn reject(&self, reason: Rejection, what: impl Into<String> + std::fmt::Display) {
        self.metrics.reject(reason);
        if let Some(suppressed) = self.log.check(reason.as_str()) {
            tracing::warn!(reason = reason.as_str(), suppressed, "{what}");
            self.metrics.problems.record(reason.as_str(), what);
        }
    }
}

/// The device listener; serve one or more sockets with it.
#[derive(Clone)]
pub struct Ingress {
    shared: Arc<Shared>,
    connections: Arc<Semaphore>,
}

impl Ingress {
    /// Builds the listener's shared state.
    pub fn new(
        settings: IngressSettings,
        queue: Queue,
        registry: Arc<DeviceRegistry>,
        metrics: Metrics,
    ) -> Self {
        let connections = Arc::new(Semaphore::new(settings.max_connections.max(1)));
        let inflight = settings
            .inflight_bytes
            .clamp(settings.max_envelope, u32::MAX as usize);
        Self {
            shared: Arc::new(Shared {
                queue,
                registry,
                metrics,
                log: LogLimiter::new(Duration::from_secs(10)),
                inflight_bytes: Arc::new(Semaphore::new(inflight)),
                settings,
            }),
            connections,
        }
    }

    /// Accepts TLS connections until `shutdown`, then waits for every session to finish
    /// its pending queue writes (each session drains for at most a few seconds).
    ///
    /// Each new connection uses the TLS configuration `tls` holds at that moment, so
    /// a reloaded certificate serves the next handshake; sessions already running
    /// keep theirs.
    pub async fn serve_tls(
        &self,
        listener: TcpListener,
        tls: watch::Receiver<Arc<ServerConfig>>,
        shutdown: CancellationToken,
    ) {
        self.accept_loop(listener, shutdown, move |ingress, tcp, peer, stop| {
            let acceptor = Arc::clone(&tls.borrow());
            async move { ingress.handle_tls(acceptor, tcp, peer, stop).await }
        })
        .await;
    }

    /// Accepts plain MQTT connections (lab use; identity is the client id).
    pub async fn serve_plain(&self, listener: TcpListener, shutdown: CancellationToken) {
        self.accept_loop(listener, shutdown, |ingress, tcp, _peer, stop| async move {
            session::run(ingress.shared, tcp, Identity::ClientId, stop).await;
        })
        .await;
    }

    /// Accepts MQTT over WebSocket on TLS: the same TLS configuration, handshake
    /// deadline and connection limit as [`Ingress::serve_tls`], then the WebSocket
    /// upgrade on `path` (subprotocol `mqtt`), then the same session code.
    pub async fn serve_websocket(
        &self,
        listener: TcpListener,
        tls: watch::Receiver<Arc<ServerConfig>>,
        path: String,
        shutdown: CancellationToken,
    ) {
        let path: Arc<str> = path.into();
        self.accept_loop(listener, shutdown, move |ingress, tcp, peer, stop| {
            let acceptor = Arc::clone(&tls.borrow());
            let path = Arc::clone(&path);
            async move {
                ingress
                    .handle_websocket(acceptor, tcp, peer, &path, stop)
                    .await;
            }
        })
        .await;
    }

    async fn accept_loop<F, Fut>(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
        handle: F,
    ) where
        F: Fn(Self, TcpStream, SocketAddr, CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let tracker = TaskTracker::new();
        loop {
            let (tcp, peer) = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = Arc::clone(&self.connections).try_acquire_owned() else {
                self.shared.reject(
                    Rejection::ConnectionLimit,
                    "connection limit reached; closing new connection",
                );
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let task = handle(self.clone(), tcp, peer, shutdown.clone());
            tracker.spawn(async move {
                task.await;
                drop(permit);
            });
        }
        tracker.close();
        tracker.wait().await;
    }

    async fn handle_tls(
        self,
        acceptor: Arc<ServerConfig>,
        tcp: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) {
        let deadline = Instant::now() + self.shared.settings.connect_timeout;
        // The stream's scope ends before the session runs: a local's room in the task's
        // future lasts until its scope ends, even once it has been moved.
        let session = {
            let handshake = self.tls_handshake(acceptor, tcp, peer, deadline).await;
            let Some((stream, identity)) = handshake else {
                return;
            };
            session::run(self.shared, stream, identity, shutdown)
        };
        session.await;
    }

    async fn handle_websocket(
        self,
        acceptor: Arc<ServerConfig>,
        tcp: TcpStream,
        peer: SocketAddr,
        path: &str,
        shutdown: CancellationToken,
    ) {
        // One deadline for the TLS handshake and the upgrade together, as TCP has for
        // its handshake; the CONNECT then has the session's own deadline.
        let deadline = Instant::now() + self.shared.settings.connect_timeout;
        let session = {
            let upgraded = self.websocket_handshake(acceptor, tcp, peer, path, deadline);
            let Some((ws, identity)) = upgraded.await else {
                return;
            };
            let shared = Arc::clone(&self.shared);
            let on_violation = Arc::new(move |reason, what: &'static str| {
                shared.reject(reason, what);
            });
            let stream = websocket::MessageStream::new(ws, on_violation);
            session::run(self.shared, stream, identity, shutdown)
        };
        session.await;
    }

    /// The TLS handshake then the WebSocket upgrade, both by `deadline`; `None`
    /// (counted, logged) if either fails. Boxed, as [`Ingress::tls_handshake`].
    fn websocket_handshake<'a>(
        &'a self,
        acceptor: Arc<ServerConfig>,
        tcp: TcpStream,
        peer: SocketAddr,
        path: &'a str,
        deadline: Instant,
    ) -> Pin<Box<impl Future<Output = Accepted<WebSocketStream<TlsServerStream>>> + Send + 'a>>
    {
        Box::pin(async move {
            let (stream, identity) = self.tls_handshake(acceptor, tcp, peer, deadline).await?;
            let upgrade = websocket::upgrade(stream, path, self.shared.settings.max_packet);
            match tokio::time::timeout_at(deadline, upgrade).await {
                Ok(Ok(ws)) => Some((ws, identity)),
                Ok(Err(refusal)) => {
                    self.shared.reject(
                        Rejection::WebSocketHandshake,
                        format!("device WebSocket upgrade from {peer} refused: {refusal}"),
                    );
                    None
                }
                Err(_) => {
                    self.shared.reject(
                        Rejection::WebSocketHandshake,
                        "device WebSocket upgrade timed out",
                    );
                    None
                }
            }
        })
    }

    /// The TLS handshake by `deadline`, and the identities of the verified client
    /// certificate; `None` (counted, logged) if it fails. Boxed, for the reason
    /// [`session::run`] is: with the TLS state inline it is about 1.5 KiB.
    fn tls_handshake(
        &self,
        acceptor: Arc<ServerConfig>,
        tcp: TcpStream,
        peer: SocketAddr,
        deadline: Instant,
    ) -> Pin<Box<impl Future<Output = Accepted<TlsServerStream>> + Send + '_>> {
        Box::pin(async move {
            let stream =
                match tokio::time::timeout_at(deadline, TlsServerStream::accept(acceptor, tcp))
                    .await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(err)) => {
                        self.shared.reject(
                            Rejection::TlsHandshake,
                            format!("device TLS handshake from {peer} failed: {err}"),
                        );
                        return None;
                    }
                    Err(_) => {
                        self.shared
                            .reject(Rejection::TlsHandshake, "device TLS handshake timed out");
                        return None;
                    }
                };
            let identities = stream
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| crate::tls::certificate_identities(cert).ok())
                .unwrap_or_default();
            Some((stream, Identity::Certificate(identities)))
        })
    }
}
