//! A hand-written MQTT 3.1.1 device for the WebSocket tests (`tests/websocket.rs`):
//! TLS 1.3 to the gateway, then either raw MQTT bytes (the TCP listener) or binary
//! WebSocket messages after an upgrade (the WebSocket listener), so one test can make
//! the same attempt on both transports and compare what the gateway does.

#![allow(
    unreachable_pub,
    reason = "included with #[path] by the test binaries that use it"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet, Publish};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{WebSocketStream, client_async};

/// TLS to 127.0.0.1:`port`, checking the server certificate for `localhost`.
pub async fn tls_connect(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    TlsConnector::from(tls).connect(name, tcp).await
}

pub type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// A WebSocket upgrade on `path`, offering `subprotocol` if any.
pub async fn ws_connect(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
    subprotocol: Option<&str>,
) -> Result<Ws, tungstenite::Error> {
    let stream = tls_connect(port, tls).await?;
    let mut request = format!("wss://localhost:{port}{path}")
        .into_client_request()
        .expect("request");
    if let Some(protocol) = subprotocol {
        let value = protocol.parse().expect("header value");
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", value);
    }
    client_async(request, stream).await.map(|(ws, _)| ws)
}

/// A hand-written MQTT client over either transport: one packet per write, packets
/// read from whatever arrives. `None` from `recv` means the gateway closed.
pub enum Device {
    Tcp(Box<TlsStream<TcpStream>>, BytesMut),
    Ws(Box<Ws>, BytesMut),
}

impl Device {
    pub async fn send(&mut self, packet: Packet) {
        assert!(self.send_unchecked(packet).await, "send failed");
    }

    /// Sends `packet`; false if the gateway had already closed (it may, mid-write).
    pub async fn send_unchecked(&mut self, packet: Packet) -> bool {
        let mut bytes = BytesMut::new();
        packet.write(&mut bytes, usize::MAX).expect("encode");
        match self {
            Self::Tcp(tls, _) => tls.write_all(&bytes).await.is_ok() && tls.flush().await.is_ok(),
            Self::Ws(ws, _) => ws.send(Message::Binary(bytes.freeze())).await.is_ok(),
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        let Self::Ws(ws, _) = self else {
            panic!("text messages exist only on WebSocket")
        };
        ws.send(Message::Text(text.into())).await.expect("send");
    }

    pub async fn recv(&mut self) -> Option<Packet> {
        let fut = async {
            loop {
                let inbuf = match self {
                    Self::Tcp(_, inbuf) | Self::Ws(_, inbuf) => inbuf,
                };
                match Packet::read(inbuf, 1 << 20) {
                    Ok(packet) => return Some(packet),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(err) => panic!("undecodable packet from the gateway: {err:?}"),
                }
                match self {
                    Self::Tcp(tls, inbuf) => match tls.read_buf(inbuf).await {
                        Ok(n) if n > 0 => {}
                        _ => return None,
                    },
                    Self::Ws(ws, inbuf) => match ws.next().await {
                        Some(Ok(Message::Binary(data))) => inbuf.extend_from_slice(&data),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        _ => return None,
                    },
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .expect("the gateway answers or closes within 10 s")
    }

    /// CONNECT with `client_id`; returns the CONNACK's code.
    pub async fn connect(&mut self, client_id: &str) -> ConnectReturnCode {
        self.send(Packet::Connect(Connect::new(client_id))).await;
        match self.recv().await {
            Some(Packet::ConnAck(ack)) => ack.code,
            other => panic!("expected a CONNACK, got {other:?}"),
        }
    }
}

/// A QoS 1 PUBLISH.
pub fn uplink_publish(topic: &str, envelope: Vec<u8>, pkid: u16) -> Packet {
    let mut publish = Publish::new(topic, QoS::AtLeastOnce, envelope);
    publish.pkid = pkid;
    Packet::Publish(publish)
}
