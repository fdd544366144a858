//! One MQTT 3.1.1 connection to the cloud broker over mutual TLS 1.3: connecting
//! (TCP, TLS, CONNECT, CONNACK), packets encoded into one output buffer, and that
//! buffer written in as few TLS records and syscalls as the socket allows.
//!
//! Packets are encoded and decoded by `rumqttc::mqttbytes`; what this module adds over
//! rumqttc's event loop is the batching. rumqttc writes and flushes each request on its
//! own, so each 256-byte PUBLISH became its own TLS record and `write(2)`, and the cloud
//! broker decrypted and read each one separately. Here every PUBLISH picked in one fill
//! of the window (and every PUBACK owed for a downlink command) goes into `out`, and
//! `out` is written whole: under load, one TLS record carries about 50 PUBLISHes.
//!
//! Every read and write here is cancel safe (`read_buf`, `write_buf`, `flush`), so the
//! connection's `select!` loop may drop them at any await without losing a byte.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Disconnect, Packet, PingReq, PubAck, Publish, Subscribe,
};
use rumqttc::mqttbytes::{self, QoS};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::{Endpoint, UplinkSettings};

/// TCP, TLS and the CONNACK must all complete within this.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Read in chunks of at least this much.
const READ_CHUNK: usize = 64 * 1024;

/// Why a connection could not be made or could not go on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    /// Resolving the name or connecting the TCP socket failed.
    #[error("cannot reach the broker: {0}")]
    Unreachable(#[source] io::Error),
    /// TCP, TLS and CONNACK took longer than [`CONNECT_TIMEOUT`].
    #[error("no CONNACK within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
    /// The TLS handshake failed.
    #[error("TLS handshake: {0}")]
    Tls(#[source] io::Error),
    /// The broker answered CONNECT with a refusal.
    #[error("the broker refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    /// Reading or writing the established TLS stream failed.
    #[error("connection: {0}")]
    Io(#[source] io::Error),
    /// The broker closed the connection.
    #[error("the broker closed the connection")]
    Closed,
    /// The broker sent something that is not MQTT 3.1.1 as we speak it.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The broker did not answer a PINGREQ within a keep-alive period.
    #[error("no PINGRESP within the keep-alive period")]
    PingTimeout,
}

impl From<mqttbytes::Error> for LinkError {
    fn from(err: mqttbytes::Error) -> Self {
        match err {
            mqttbytes::Error::Io(io) => Self::Io(io),
            other => Self::Protocol(other.to_string()),
        }
    }
}

/// An established connection: CONNACK received.
pub(crate) struct Link {
    outbound: Outbound,
    inbound: Inbound,
    /// Whether the broker still had this gateway's session (commands kept for it).
    pub(crate) session_present: bool,
}

/// The writing half: packets encoded and not yet written.
pub(crate) struct Outbound {
    writer: WriteHalf<TlsStream<TcpStream>>,
    out: BytesMut,
    /// Bytes were written since the last flush.
    unflushed: bool,
}

/// The reading half: bytes read and not yet decoded.
pub(crate) struct Inbound {
    reader: ReadHalf<TlsStream<TcpStream>>,
    incoming: BytesMut,
    max_packet: usize,
}

impl Link {
    /// Connects to `endpoint` and completes the MQTT handshake (persistent session).
    pub(crate) async fn connect(
        settings: &UplinkSettings,
        endpoint: &Endpoint,
    ) -> Result<Self, LinkError> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::handshake(settings, endpoint))
            .await
            .unwrap_or(Err(LinkError::ConnectTimeout))
    }

    async fn handshake(settings: &UplinkSettings, endpoint: &Endpoint) -> Result<Self, LinkError> {
        let name = rustls_pki_types::ServerName::try_from(endpoint.host.as_str())
            .map_err(|err| LinkError::Tls(io::Error::new(io::ErrorKind::InvalidInput, err)))?
            .to_owned();
        let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(LinkError::Unreachable)?;
        // The batching is ours; Nagle's algorithm would only add delay.
        tcp.set_nodelay(true).map_err(LinkError::Unreachable)?;
        let tls = TlsConnector::from(Arc::clone(&settings.tls))
            .connect(name, tcp)
            .await
            .map_err(LinkError::Tls)?;
        let (reader, writer) = tokio::io::split(tls);
        let mut link = Self {
            outbound: Outbound {
                writer,
                out: BytesMut::with_capacity(READ_CHUNK),
                unflushed: false,
            },
            inbound: Inbound {
                reader,
                incoming: BytesMut::with_capacity(READ_CHUNK),
                max_packet: settings.max_envelope + 1024,
            },
            session_present: false,
        };
        let mut connect = Connect::new(settings.client_id.as_str());
        connect.keep_alive = u16::try_from(settings.keep_alive.as_secs()).unwrap_or(u16::MAX);
        // A persistent session keeps commands for the gateway while it is away. Our own
        // publishes are resent from the queue, never from the session.
        connect.clean_session = false;
        connect.write(&mut link.outbound.out)?;
        link.outbound.send_all().await?;
        let ConnAck {
            session_present,
            code,
        } = match link.next_packet().await? {
            Packet::ConnAck(ack) => ack,
            other => {
                return Err(LinkError::Protocol(format!(
                    "expected CONNACK, got {}",
                    packet_name(&other)
                )));
            }
        };
        if code != ConnectReturnCode::Success {
            return Err(LinkError::Refused(code));
        }
        link.session_present = session_present;
        Ok(link)
    }

    /// Encodes a QoS 1 PUBLISH into the output buffer.
    pub(crate) fn publish(&mut self, topic: String, pkid: u16, payload: Bytes) {
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic,
            pkid,
            payload,
        };
        // Only an empty topic or a payload over 256 MiB fails to encode; neither can
        // reach here (the topic template has text, envelopes are capped far lower).
        let _ = publish.write(&mut self.outbound.out);
    }

    /// Encodes a SUBSCRIBE (QoS 1) into the output buffer.
    pub(crate) fn subscribe(&mut self, filter: &str, pkid: u16) {
        let mut subscribe = Subscribe::new(filter, QoS::AtLeastOnce);
        subscribe.pkid = pkid;
        let _ = subscribe.write(&mut self.outbound.out);
    }

    /// Encodes a PUBACK for a message the broker sent.
    pub(crate) fn puback(&mut self, pkid: u16) {
        let _ = PubAck::new(pkid).write(&mut self.outbound.out);
    }

    /// Encodes a PINGREQ.
    pub(crate) fn ping(&mut self) {
        let _ = PingReq.write(&mut self.outbound.out);
    }

    /// The two halves, to wait on both at once.
    pub(crate) fn halves(&mut self) -> (&mut Outbound, &mut Inbound) {
        (&mut self.outbound, &mut self.inbound)
    }

    /// The next whole packet already read, if any.
    pub(crate) fn decoded(&mut self) -> Result<Option<Packet>, LinkError> {
        self.inbound.decoded()
    }

    async fn next_packet(&mut self) -> Result<Packet, LinkError> {
        loop {
            if let Some(packet) = self.decoded()? {
                return Ok(packet);
            }
            self.inbound.read_more().await?;
        }
    }

    /// Sends what is pending and a DISCONNECT, within `limit`. Records in flight stay
    /// in the queue and go out again on the next connection.
    pub(crate) async fn close(mut self, limit: Duration) {
        let outbound = &mut self.outbound;
        let _ = Disconnect.write(&mut outbound.out);
        let _ = tokio::time::timeout(limit, async {
            outbound.send_all().await?;
            outbound.writer.shutdown().await.map_err(LinkError::Io)
        })
        .await;
    }
}

impl Outbound {
    /// True while encoded bytes wait to be written or flushed.
    pub(crate) fn has_output(&self) -> bool {
        !self.out.is_empty() || self.unflushed
    }

    /// Writes some of the output, or flushes once all is written. Cancel safe: bytes
    /// leave `out` only once the TLS layer took them.
    pub(crate) async fn write_some(&mut self) -> Result<(), LinkError> {
        if self.out.is_empty() {
            self.writer.flush().await.map_err(LinkError::Io)?;
            self.unflushed = false;
        } else {
            self.writer
                .write_buf(&mut self.out)
                .await
                .map_err(LinkError::Io)?;
            self.unflushed = true;
        }
        Ok(())
    }

    /// Writes and flushes everything encoded so far.
    pub(crate) async fn send_all(&mut self) -> Result<(), LinkError> {
        while self.has_output() {
            self.write_some().await?;
        }
        Ok(())
    }
}

impl Inbound {
    /// Reads more bytes from the broker. Cancel safe.
    pub(crate) async fn read_more(&mut self) -> Result<(), LinkError> {
        self.incoming.reserve(READ_CHUNK);
        match self.reader.read_buf(&mut self.incoming).await {
            Ok(0) => Err(LinkError::Closed),
            Ok(_) => Ok(()),
            Err(err) => Err(LinkError::Io(err)),
        }
    }

    /// The next whole packet already read, if any.
    fn decoded(&mut self) -> Result<Option<Packet>, LinkError> {
        match Packet::read(&mut self.incoming, self.max_packet) {
            Ok(packet) => Ok(Some(packet)),
            Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }
}

/// The packet's type, for errors and logs (never its payload).
pub(crate) fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}
