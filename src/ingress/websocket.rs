//! MQTT over WebSocket for devices (RFC 6455, subprotocol `mqtt`, as MQTT 3.1.1
//! section 6 describes): the upgrade on an already verified TLS stream, and an adapter
//! that turns binary WebSocket messages back into the byte stream the one MQTT session
//! code (`session`) reads. Nothing MQTT-specific happens here: identity, limits,
//! metrics and "PUBACK means durable" are the TCP listener's, because it is the same
//! code.
//!
//! MQTT packets are not aligned with messages: one packet may span several messages
//! and one message may carry several packets. A text message is a protocol error
//! (MQTT 3.1.1 section 6: the connection is closed). Pings, pongs and the closing
//! handshake are answered by the WebSocket layer.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{WebSocketStream, accept_hdr_async_with_config};

use crate::metrics::Rejection;

/// Counts and logs a refusal (the ingress's `Shared::reject`).
pub(crate) type OnViolation = Arc<dyn Fn(Rejection, &'static str) + Send + Sync>;

/// The only WebSocket subprotocol served (MQTT 3.1.1 section 6).
pub const SUBPROTOCOL: &str = "mqtt";
/// The default request path devices upgrade on.
pub const DEFAULT_PATH: &str = "/mqtt";
/// Bytes the WebSocket layer reads from TLS at a time, per connection.
const READ_BUFFER: usize = 16 * 1024;
/// The largest MQTT fixed header (type byte and a four-byte remaining length), which
/// the packet limit (a limit on the remaining length) does not include.
const FIXED_HEADER_MAX: usize = 5;

/// Where the WebSocket device listener runs; absent in the plan means off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSocketListen {
    /// Address of the TLS listener that carries WebSocket upgrades.
    pub listen: SocketAddr,
    /// The request path devices upgrade on (`/mqtt` by default); other paths get 404.
    pub path: String,
}

/// Why an upgrade was refused (logged; counted as `websocket_handshake`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UpgradeRefusal {
    /// The request path is not the configured one.
    WrongPath,
    /// The client did not offer the `mqtt` subprotocol.
    NoMqttSubprotocol,
    /// Not a WebSocket upgrade at all (plain HTTP, bad headers, broken stream).
    NotWebSocket(String),
}

impl std::fmt::Display for UpgradeRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::WrongPath => f.write_str("request path is not the MQTT WebSocket path"),
            Self::NoMqttSubprotocol => {
                f.write_str("client did not offer the WebSocket subprotocol `mqtt`")
            }
            Self::NotWebSocket(why) => write!(f, "not a WebSocket upgrade: {why}"),
        }
    }
}

/// The WebSocket limits for a listener whose MQTT packets carry at most `max_packet`
/// bytes after their fixed header: no message or frame may be larger than the largest
/// such packet, so memory per connection stays bounded as on TCP.
pub(crate) fn config(max_packet: usize) -> WebSocketConfig {
    let max_message = max_packet.saturating_add(FIXED_HEADER_MAX);
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// Runs the server side of the upgrade on `stream`: a GET on `path` offering the
/// `mqtt` subprotocol, which is echoed. Anything else gets an HTTP error and is refused.
pub(crate) async fn upgrade<S>(
    stream: S,
    path: &str,
    max_packet: usize,
) -> Result<WebSocketStream<S>, UpgradeRefusal>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut refusal = None;
    #[allow(
        clippy::result_large_err,
        reason = "the error type is tungstenite's Callback contract"
    )]
    let check = |request: &Request, mut response: Response| {
        let refused = |why: UpgradeRefusal, status: StatusCode| {
            let mut error = ErrorResponse::new(Some(why.to_string()));
            *error.status_mut() = status;
            (why, error)
        };
        if request.uri().path() != path {
            let (why, error) = refused(UpgradeRefusal::WrongPath, StatusCode::NOT_FOUND);
            refusal = Some(why);
            return Err(error);
        }
        if !offers_mqtt(request) {
            let (why, error) = refused(UpgradeRefusal::NoMqttSubprotocol, StatusCode::BAD_REQUEST);
            refusal = Some(why);
            return Err(error);
        }
        response.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        Ok(response)
    };
    let accepted = accept_hdr_async_with_config(stream, check, Some(config(max_packet))).await;
    match accepted {
        Ok(ws) => Ok(ws),
        Err(err) => Err(refusal.unwrap_or_else(|| UpgradeRefusal::NotWebSocket(err.to_string()))),
    }
}

/// True if a `Sec-WebSocket-Protocol` header lists `mqtt` (case-sensitive, RFC 6455).
fn offers_mqtt(request: &Request) -> bool {
    request
        .headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|list| list.split(','))
        .any(|offered| offered.trim() == SUBPROTOCOL)
}

/// A WebSocket connection seen as a byte stream: reads yield the payloads of binary
/// messages in order; each write is sent as one binary message.
pub(crate) struct MessageStream<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the current binary message.
    pending: Bytes,
    /// Called once when the peer breaks a rule (a text message, an oversized message,
    /// bad framing), just before the stream reports the error; counted like the same
    /// fault on TCP (`malformed_packet`, `oversize`).
    on_violation: OnViolation,
}

impl<S> MessageStream<S> {
    /// Wraps an upgraded connection; `on_violation` counts and logs protocol errors.
    pub(crate) fn new(ws: WebSocketStream<S>, on_violation: OnViolation) -> Self {
        Self {
            ws,
            pending: Bytes::new(),
            on_violation,
        }
    }
}

fn io_error(err: WsError) -> io::Error {
    match err {
        WsError::Io(err) => err,
        other => io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MessageStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.pending = data,
                Some(Ok(Message::Text(_))) => {
                    (this.on_violation)(
                        Rejection::MalformedPacket,
                        "WebSocket text message (MQTT needs binary); closing",
                    );
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "WebSocket text message",
                    )));
                }
                // Answered (ping) or ignored (pong) by the WebSocket layer.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                // The peer closed, with or without the closing handshake: end of
                // stream, as a TCP FIN is on the TCP listener.
                Some(Ok(Message::Close(_)))
                | None
                | Some(Err(
                    WsError::ConnectionClosed
                    | WsError::AlreadyClosed
                    | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake),
                )) => {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(err)) => {
                    match &err {
                        WsError::Capacity(_) => (this.on_violation)(
                            Rejection::Oversize,
                            "WebSocket message larger than the MQTT packet limit; closing",
                        ),
                        WsError::Protocol(_) | WsError::Utf8(_) => (this.on_violation)(
                            Rejection::MalformedPacket,
                            "WebSocket protocol error; closing",
                        ),
                        // A broken connection, as on TCP: not the device's fault to count.
                        _ => {}
                    }
                    return Poll::Ready(Err(io_error(err)));
                }
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MessageStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let ws = &mut self.ws;
        ready!(Pin::new(&mut *ws).poll_ready(cx)).map_err(io_error)?;
        let message = Message::Binary(Bytes::copy_from_slice(buf));
        Pin::new(ws).start_send(message).map_err(io_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(io_error)
    }
}

#[cfg(test)]
#[path = "websocket_tests.rs"]
mod tests;
