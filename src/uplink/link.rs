//! One MQTT 3.1.1 connection to the cloud broker over mutual TLS 1.3: connecting
//! (TCP, TLS, CONNECT, CONNACK), packets encoded into one output (`outbound`), and
//! that output written in as few TLS records and syscalls as the socket allows.
//!
//! Packets are decoded, and all but PUBLISHes encoded, by `rumqttc::mqttbytes`; what
//! this module adds over rumqttc's event loop is the batching. rumqttc writes and
//! flushes each request on its own, so each 256-byte PUBLISH became its own TLS record
//! and `write(2)`, and the cloud broker decrypted and read each one separately. Here
//! every PUBLISH picked in one fill of the window (and every PUBACK owed for a downlink
//! command) goes into the output, and the output is written whole: under load, one TLS
//! record carries about 50 PUBLISHes.
//!
//! Every read and write here is cancel safe (`read_buf`, `write_vectored`, `flush`), so
//! the connection's `select!` loop may drop them at any await without losing a byte.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Disconnect, Packet, PingReq, PubAck, Subscribe,
};
use rumqttc::mqttbytes::{self, QoS};
use tokio::io::{AsyncReadExt as _, ReadHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::outbound::Outbound;
use super::{Endpoint, UplinkSettings};

/// TCP, TLS and the CONNACK must all complete within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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

/// The reading half: bytes read and not yet decoded.
pub(crate) struct Inbound {
    reader: ReadHalf<TlsStream<TcpStream>>,
    incoming: BytesMut,
    max_packet: usize,
    /// Bytes of an oversized PUBLISH still to discard as they arrive.
    skipping: usize,
}

/// What the broker sent, decoded.
pub(crate) enum Frame {
    /// A packet within the size limit.
    Packet(Packet),
    /// A PUBLISH larger than the limit: discarded as it arrives, never held whole.
    /// `pkid` is set if it was QoS 1 and must be acknowledged, or the broker would send
    /// it again at every reconnect and the uplink would never stay up.
    OversizePublish { pkid: Option<u16> },
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
            outbound: Outbound::new(writer, READ_CHUNK),
            inbound: Inbound {
                reader,
                incoming: BytesMut::with_capacity(READ_CHUNK),
                max_packet: settings.max_envelope + 1024,
                skipping: 0,
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

    /// Encodes a QoS 1 PUBLISH into the output.
    pub(crate) fn publish(&mut self, topic: &str, pkid: u16, payload: Bytes) {
        self.outbound.publish(topic, pkid, payload);
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
    pub(crate) fn decoded(&mut self) -> Result<Option<Frame>, LinkError> {
        self.inbound.decoded()
    }

    async fn next_packet(&mut self) -> Result<Packet, LinkError> {
        loop {
            match self.decoded()? {
                Some(Frame::Packet(packet)) => return Ok(packet),
                Some(Frame::OversizePublish { .. }) => {
                    return Err(LinkError::Protocol(
                        "a PUBLISH before the CONNACK".to_owned(),
                    ));
                }
                None => self.inbound.read_more().await?,
            }
        }
    }

    /// Sends what is pending and a DISCONNECT, within `limit`. Records in flight stay
    /// in the queue and go out again on the next connection.
    pub(crate) async fn close(mut self, limit: Duration) {
        let outbound = &mut self.outbound;
        let _ = Disconnect.write(&mut outbound.out);
        let _ = tokio::time::timeout(limit, async {
            outbound.send_all().await?;
            outbound.shutdown().await
        })
        .await;
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
    fn decoded(&mut self) -> Result<Option<Frame>, LinkError> {
        if self.skipping > 0 {
            let n = self.skipping.min(self.incoming.len());
            self.incoming.advance(n);
            self.skipping -= n;
            if self.skipping > 0 {
                return Ok(None);
            }
        }
        match Packet::read(&mut self.incoming, self.max_packet) {
            Ok(packet) => Ok(Some(Frame::Packet(packet))),
            Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(mqttbytes::Error::PayloadSizeLimitExceeded(_)) => self.oversize(),
            Err(err) => Err(err.into()),
        }
    }

    /// Starts skipping the oversized packet at the front of `incoming`, once its
    /// packet id (if any) has arrived; the next call to `decoded` discards its bytes.
    fn oversize(&mut self) -> Result<Option<Frame>, LinkError> {
        let Some(head) = OversizeHead::parse(&self.incoming)? else {
            return Ok(None);
        };
        self.skipping = head.frame_len;
        Ok(Some(Frame::OversizePublish { pkid: head.pkid }))
    }
}

/// The front of an oversized PUBLISH: its length and packet id.
struct OversizeHead {
    frame_len: usize,
    pkid: Option<u16>,
}

impl OversizeHead {
    /// `None` while the bytes up to the packet id have not all arrived.
    fn parse(bytes: &[u8]) -> Result<Option<Self>, LinkError> {
        let protocol = |what: &str| LinkError::Protocol(format!("oversized packet: {what}"));
        let Some(&byte1) = bytes.first() else {
            return Ok(None);
        };
        if byte1 >> 4 != 3 {
            return Err(protocol("not a PUBLISH"));
        }
        // The remaining length: up to four 7-bit groups, least significant first.
        let mut remaining = 0usize;
        let mut header_len = 1;
        loop {
            let Some(&b) = bytes.get(header_len) else {
                return Ok(None);
            };
            remaining |= usize::from(b & 0x7f) << (7 * (header_len - 1));
            header_len += 1;
            if b & 0x80 == 0 {
                break;
            }
            if header_len > 4 {
                return Err(protocol("malformed remaining length"));
            }
        }
        let qos = (byte1 >> 1) & 0b11;
        let pkid = match qos {
            0 => None,
            1 => {
                let at = |i: usize| bytes.get(header_len + i).copied();
                let (Some(t0), Some(t1)) = (at(0), at(1)) else {
                    return Ok(None);
                };
                let topic_len = usize::from(u16::from_be_bytes([t0, t1]));
                let (Some(p0), Some(p1)) = (at(2 + topic_len), at(3 + topic_len)) else {
                    return Ok(None);
                };
                Some(u16::from_be_bytes([p0, p1]))
            }
            _ => return Err(protocol("QoS 2 on a QoS 1 subscription")),
        };
        Ok(Some(Self {
            frame_len: header_len + remaining,
            pkid,
        }))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn publish_head(qos: u8, remaining: &[u8], topic: &str, pkid: u16) -> Vec<u8> {
        let mut bytes = vec![0x30 | (qos << 1)];
        bytes.extend_from_slice(remaining);
        bytes.extend_from_slice(&u16::try_from(topic.len()).expect("short").to_be_bytes());
        bytes.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            bytes.extend_from_slice(&pkid.to_be_bytes());
        }
        bytes
    }

    #[test]
    fn an_oversized_publish_head_gives_its_length_and_packet_id() {
        // Remaining length 2,097,152 = 0x80 0x80 0x80 0x01.
        let bytes = publish_head(1, &[0x80, 0x80, 0x80, 0x01], "gw/a/down", 7);
        let head = OversizeHead::parse(&bytes)
            .expect("valid")
            .expect("complete");
        assert_eq!(head.frame_len, 5 + 2_097_152);
        assert_eq!(head.pkid, Some(7));
        // Every shorter prefix is "not yet".
        for cut in 0..bytes.len() {
            assert!(OversizeHead::parse(&bytes[..cut]).expect("valid").is_none());
        }
        let qos0 = publish_head(0, &[0xff, 0x7f], "t", 0);
        let head = OversizeHead::parse(&qos0)
            .expect("valid")
            .expect("complete");
        assert_eq!((head.frame_len, head.pkid), (3 + 16_383, None));
    }

    #[test]
    fn an_oversized_packet_that_is_not_a_qos_0_or_1_publish_is_a_protocol_error() {
        let qos2 = publish_head(2, &[0x80, 0x01], "t", 1);
        assert!(OversizeHead::parse(&qos2).is_err());
        assert!(
            OversizeHead::parse(&[0x90, 0x80, 0x01]).is_err(),
            "a SUBACK"
        );
        let endless = [0x32, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert!(OversizeHead::parse(&endless).is_err());
    }
}
