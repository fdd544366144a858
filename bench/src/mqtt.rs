//! The bench's small MQTT 3.1.1 client over TLS 1.3 with a client certificate: the TLS
//! client configuration, connecting (CONNECT/CONNACK) and reading packets. Shared by the
//! load generator and the cloud-side counter; writes are batched by the callers.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, bail};
use blindgate::tls::{CipherOrder, UplinkTlsOptions, uplink_client_config};
use bytes::BytesMut;
use rumqttc::mqttbytes::Error as MqttError;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, Packet};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Largest MQTT packet read (16 KiB envelopes plus topic fit easily).
pub(crate) const MAX_PACKET: usize = 1 << 20;

/// A client TLS configuration: trust `ca`, present `cert`/`key` (TLS 1.3, as blindgate's
/// uplink does).
pub(crate) fn tls_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<rustls::ClientConfig>> {
    Ok(uplink_client_config(&UplinkTlsOptions {
        ca: ca.to_owned(),
        cert: cert.to_owned(),
        key: key.to_owned(),
        pins_sha256: Vec::new(),
        cipher_order: CipherOrder::Auto,
    })?)
}

pub(crate) type Stream = TlsStream<TcpStream>;

/// Connects, sends CONNECT (clean session) and waits for a successful CONNACK.
pub(crate) async fn mqtt_connect(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    client_id: &str,
) -> Result<(Stream, BytesMut)> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let mut stream = TlsConnector::from(tls).connect(name, tcp).await?;
    let mut connect = Connect::new(client_id);
    connect.keep_alive = 600;
    let mut out = BytesMut::new();
    connect.write(&mut out)?;
    stream.write_all(&out).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        match read_packet(&mut stream, &mut buf).await? {
            Some(Packet::ConnAck(ConnAck { code, .. })) => {
                if code != rumqttc::mqttbytes::v4::ConnectReturnCode::Success {
                    bail!("CONNACK {code:?} for {client_id}");
                }
                return Ok((stream, buf));
            }
            Some(_) => {}
            None => bail!("connection closed before CONNACK for {client_id}"),
        }
    }
}

/// The next packet, reading more as needed; `None` at end of stream.
pub(crate) async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<Packet>> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(packet) => return Ok(Some(packet)),
            Err(MqttError::InsufficientBytes(_)) => {}
            Err(e) => bail!("bad MQTT packet: {e:?}"),
        }
        match r.read_buf(buf).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            // A peer closing after our DISCONNECT may skip TLS close_notify.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}
