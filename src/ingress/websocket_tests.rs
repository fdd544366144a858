//! Unit tests of the WebSocket adapter: MQTT packets split across messages, several
//! packets in one message, text messages refused, writes as binary messages.

use std::sync::Mutex;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
use tokio_tungstenite::tungstenite::protocol::Role;

use super::*;

const MAX_PACKET: usize = 4096;

/// A server-side adapter and the raw client end of the same WebSocket connection, plus
/// what the adapter reported as violations.
async fn pair() -> (
    MessageStream<DuplexStream>,
    WebSocketStream<DuplexStream>,
    Arc<Mutex<Vec<Rejection>>>,
) {
    let (server_io, client_io) = duplex(64 * 1024);
    let server =
        WebSocketStream::from_raw_socket(server_io, Role::Server, Some(config(MAX_PACKET))).await;
    let client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let on_violation = Arc::new(move |reason: Rejection, _what: &'static str| {
        record.lock().expect("lock").push(reason);
    });
    (MessageStream::new(server, on_violation), client, seen)
}

fn encode(packets: &[Packet]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for packet in packets {
        packet.write(&mut out, usize::MAX).expect("encode");
    }
    out.to_vec()
}

fn publish(payload: &[u8], pkid: u16) -> Packet {
    let mut publish = Publish::new("e3/pump-17/up", QoS::AtLeastOnce, payload.to_vec());
    publish.pkid = pkid;
    Packet::Publish(publish)
}

/// Reads packets from the adapter as the session does, until `count` are decoded.
async fn read_packets(stream: &mut MessageStream<DuplexStream>, count: usize) -> Vec<Packet> {
    let mut inbuf = BytesMut::new();
    let mut packets = Vec::new();
    while packets.len() < count {
        match Packet::read(&mut inbuf, MAX_PACKET) {
            Ok(packet) => packets.push(packet),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                let n = stream.read_buf(&mut inbuf).await.expect("read");
                assert!(n > 0, "stream ended after {} packets", packets.len());
            }
            Err(err) => panic!("decode: {err:?}"),
        }
    }
    packets
}

#[tokio::test]
async fn a_packet_split_across_messages_is_read_whole() {
    let (mut server, mut client, seen) = pair().await;
    let bytes = encode(&[publish(&[7; 1000], 1)]);
    for chunk in [&bytes[..1], &bytes[1..3], &bytes[3..500], &bytes[500..]] {
        client
            .send(Message::Binary(Bytes::copy_from_slice(chunk)))
            .await
            .expect("send");
    }
    let packets = read_packets(&mut server, 1).await;
    assert_eq!(packets, vec![publish(&[7; 1000], 1)]);
    assert!(seen.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn several_packets_in_one_message_are_all_read() {
    let (mut server, mut client, _) = pair().await;
    let sent = vec![publish(b"one", 1), Packet::PingReq, publish(b"two", 2)];
    client
        .send(Message::Binary(encode(&sent).into()))
        .await
        .expect("send");
    assert_eq!(read_packets(&mut server, 3).await, sent);
}

#[tokio::test]
async fn a_text_message_is_refused_and_reported() {
    let (mut server, mut client, seen) = pair().await;
    client
        .send(Message::Text("CONNECT".into()))
        .await
        .expect("send");
    let mut buf = BytesMut::new();
    let err = server.read_buf(&mut buf).await.expect_err("text refused");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(buf.is_empty());
    assert_eq!(*seen.lock().expect("lock"), [Rejection::MalformedPacket]);
}

#[tokio::test]
async fn pings_are_answered_and_close_ends_the_stream() {
    let (mut server, mut client, _) = pair().await;
    client
        .send(Message::Ping(Bytes::from_static(b"hi")))
        .await
        .expect("ping");
    client
        .send(Message::Binary(encode(&[publish(b"x", 3)]).into()))
        .await
        .expect("send");
    assert_eq!(read_packets(&mut server, 1).await, vec![publish(b"x", 3)]);
    let pong = client.next().await.expect("message").expect("ok");
    assert_eq!(pong, Message::Pong(Bytes::from_static(b"hi")));
    client.close(None).await.expect("close");
    let mut buf = BytesMut::new();
    assert_eq!(server.read_buf(&mut buf).await.expect("eof"), 0);
}

#[tokio::test]
async fn a_peer_gone_without_the_closing_handshake_is_an_end_not_a_fault() {
    let (mut server, client, seen) = pair().await;
    drop(client);
    let mut buf = BytesMut::new();
    assert_eq!(server.read_buf(&mut buf).await.expect("eof"), 0);
    assert!(seen.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn each_write_goes_out_as_one_binary_message() {
    let (mut server, mut client, _) = pair().await;
    let acks = encode(&[
        Packet::PubAck(PubAck::new(1)),
        Packet::PubAck(PubAck::new(2)),
    ]);
    server.write_all(&acks).await.expect("write");
    server.flush().await.expect("flush");
    let message = client.next().await.expect("message").expect("ok");
    assert_eq!(message, Message::Binary(acks.into()));
}

#[tokio::test]
async fn the_largest_packet_fits_one_message_and_a_larger_message_is_oversize() {
    let (mut server, mut client, seen) = pair().await;
    // A publish whose remaining length is exactly the packet limit.
    let topic_overhead = 2 + "e3/pump-17/up".len() + 2;
    let largest = publish(&vec![1; MAX_PACKET - topic_overhead], 9);
    let bytes = encode(std::slice::from_ref(&largest));
    client
        .send(Message::Binary(bytes.clone().into()))
        .await
        .expect("send");
    assert_eq!(read_packets(&mut server, 1).await, vec![largest]);
    // One byte over the largest packet with the largest (five-byte) fixed header.
    let _ = client
        .send(Message::Binary(vec![0; MAX_PACKET + 6].into()))
        .await;
    let mut buf = BytesMut::new();
    assert!(server.read_buf(&mut buf).await.is_err());
    assert!(buf.is_empty());
    assert_eq!(*seen.lock().expect("lock"), [Rejection::Oversize]);
}
