//! The writing half of an uplink connection: packets encoded and not yet written.
//!
//! Small packets (PUBACKs, PINGREQ, the heads of PUBLISHes, small PUBLISHes whole) are
//! encoded into one buffer. A large payload is not copied into it: it is queued as it
//! came from the queue (a `Bytes` over the buffer the record was read into), after the
//! head encoded before it, and the whole sequence goes to TLS in vectored writes. A
//! 16 KiB envelope is then copied once in user space on its way out (by rustls, into
//! the record it encrypts), not twice.
//!
//! Writes and flushes are cancel safe: bytes leave the queue only once TLS took them.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use tokio::io::{AsyncWriteExt as _, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::link::LinkError;

/// Payloads this long or longer are queued as they are; shorter ones are copied after
/// their head, so a batch of small PUBLISHes stays one slice.
const QUEUE_FROM: usize = 1024;
/// Slices handed to TLS per write.
const MAX_SLICES: usize = 64;

/// Encoded output waiting for the socket.
pub(crate) struct Outbound {
    writer: WriteHalf<TlsStream<TcpStream>>,
    /// Bytes that go before `out`, in order: heads and the large payloads after them.
    queued: VecDeque<Bytes>,
    /// The newest encoded bytes, written after `queued`.
    pub(super) out: BytesMut,
    /// Bytes were written since the last flush.
    unflushed: bool,
}

impl Outbound {
    pub(super) fn new(writer: WriteHalf<TlsStream<TcpStream>>, capacity: usize) -> Self {
        Self {
            writer,
            queued: VecDeque::new(),
            out: BytesMut::with_capacity(capacity),
            unflushed: false,
        }
    }

    /// Encodes a QoS 1 PUBLISH of `payload` to `topic`.
    pub(super) fn publish(&mut self, topic: &str, pkid: u16, payload: Bytes) {
        encode_publish_head(&mut self.out, topic, pkid, payload.len());
        if payload.len() < QUEUE_FROM {
            self.out.extend_from_slice(&payload);
        } else {
            self.queued.push_back(self.out.split().freeze());
            self.queued.push_back(payload);
        }
    }

    /// True while encoded bytes wait to be written or flushed.
    pub(crate) fn has_output(&self) -> bool {
        !self.queued.is_empty() || !self.out.is_empty() || self.unflushed
    }

    /// Writes some of the output, or flushes once all is written. Cancel safe.
    pub(crate) async fn write_some(&mut self) -> Result<(), LinkError> {
        if self.queued.is_empty() && self.out.is_empty() {
            self.writer.flush().await.map_err(LinkError::Io)?;
            self.unflushed = false;
            return Ok(());
        }
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut count = 0;
        let pending = self.queued.iter().map(|bytes| &bytes[..]);
        for (slot, bytes) in slices.iter_mut().zip(pending.chain([&self.out[..]])) {
            *slot = IoSlice::new(bytes);
            count += 1;
        }
        let written = self
            .writer
            .write_vectored(slices.get(..count).unwrap_or_default())
            .await
            .map_err(LinkError::Io)?;
        if written == 0 {
            return Err(LinkError::Closed);
        }
        self.consume(written);
        self.unflushed = true;
        Ok(())
    }

    /// Writes and flushes everything encoded so far.
    pub(crate) async fn send_all(&mut self) -> Result<(), LinkError> {
        while self.has_output() {
            self.write_some().await?;
        }
        Ok(())
    }

    /// Closes the TLS stream (`close_notify`, then FIN).
    pub(super) async fn shutdown(&mut self) -> Result<(), LinkError> {
        self.writer.shutdown().await.map_err(LinkError::Io)
    }

    /// Drops the first `written` bytes of the output.
    fn consume(&mut self, mut written: usize) {
        while written > 0 {
            let Some(front) = self.queued.front_mut() else {
                self.out.advance(written.min(self.out.len()));
                return;
            };
            if written < front.len() {
                front.advance(written);
                return;
            }
            written -= front.len();
            self.queued.pop_front();
        }
    }
}

/// Encodes the fixed header, topic and packet id of an MQTT 3.1.1 QoS 1 PUBLISH whose
/// payload of `payload_len` bytes follows. Topics are ours (a rendered template, far
/// under 64 KiB) and envelopes are capped far under MQTT's 256 MiB.
fn encode_publish_head(out: &mut BytesMut, topic: &str, pkid: u16, payload_len: usize) {
    let topic_len = u16::try_from(topic.len()).unwrap_or(u16::MAX);
    let mut remaining = 2 + usize::from(topic_len) + 2 + payload_len;
    out.reserve(5 + remaining - payload_len);
    out.put_u8(0x32);
    loop {
        let byte = (remaining % 128) as u8;
        remaining /= 128;
        if remaining == 0 {
            out.put_u8(byte);
            break;
        }
        out.put_u8(byte | 0x80);
    }
    out.put_u16(topic_len);
    out.extend_from_slice(
        topic
            .as_bytes()
            .get(..usize::from(topic_len))
            .unwrap_or_default(),
    );
    out.put_u16(pkid);
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use rumqttc::mqttbytes::QoS;
    use rumqttc::mqttbytes::v4::Publish;

    use super::encode_publish_head;

    #[test]
    fn the_head_is_what_rumqttc_encodes() {
        for len in [
            0,
            1,
            100,
            127 - 12,
            128,
            1023,
            1024,
            16_383,
            16_384,
            2_097_152,
        ] {
            let payload = vec![0x5a; len];
            let mut publish =
                Publish::new("gw/gw-1/e3/dev-1/up", QoS::AtLeastOnce, payload.clone());
            publish.pkid = 4097;
            let mut expected = BytesMut::new();
            publish.write(&mut expected).expect("encodes");
            let mut ours = BytesMut::new();
            encode_publish_head(&mut ours, "gw/gw-1/e3/dev-1/up", 4097, len);
            ours.extend_from_slice(&payload);
            assert!(ours == expected, "payload of {len} bytes");
        }
    }
}
