//! The device side's TLS stream ([`TlsServerStream`], rustls's unbuffered API) against
//! tokio-rustls clients over real loopback sockets: data of every size both ways, a
//! key update, both ways of closing, a resumed session that keeps the device's
//! identity, and no buffer held while idle.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use blindgate::pki::{DevPkiOptions, generate_dev_pki};
use blindgate::tls::{
    CipherOrder, TlsServerStream, UplinkTlsOptions, certificate_identities, device_server_config,
    uplink_client_config,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, HandshakeKind, ServerConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const DEADLINE: Duration = Duration::from_secs(20);

/// The device listener's and a device's TLS configurations from a fresh dev PKI.
struct Configs {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    _dir: tempfile::TempDir,
}

fn configs() -> Configs {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = generate_dev_pki(&DevPkiOptions {
        out_dir: dir.path().join("pki"),
        devices: vec!["pump-17".into()],
        ..DevPkiOptions::default()
    })
    .expect("dev PKI");
    let listener = &pki.gateway_devices;
    let server = device_server_config(&pki.device_ca.cert, &listener.cert, &listener.key)
        .expect("device listener config");
    let device = &pki.devices[0].1;
    let client = uplink_client_config(&UplinkTlsOptions {
        ca: pki.device_ca.cert.clone(),
        cert: device.cert.clone(),
        key: device.key.clone(),
        pins_sha256: Vec::new(),
        cipher_order: CipherOrder::Auto,
    })
    .expect("client config");
    Configs {
        server,
        client,
        _dir: dir,
    }
}

/// A server stream and the client connected to it, both past the handshake; the
/// server has the client's certificate.
async fn connect(configs: &Configs) -> (TlsServerStream, TlsStream<TcpStream>) {
    let tcp_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = tcp_listener.local_addr().expect("addr");
    let server_config = Arc::clone(&configs.server);
    let server = tokio::spawn(async move {
        let (tcp, _) = tcp_listener.accept().await?;
        TlsServerStream::accept(server_config, tcp).await
    });
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let client = TlsConnector::from(Arc::clone(&configs.client))
        .connect(name, tcp)
        .await
        .expect("client handshake");
    let server = server
        .await
        .expect("server task")
        .expect("server handshake");
    let identities = server
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| certificate_identities(cert).expect("identities"));
    assert_eq!(identities, Some(vec!["pump-17".to_owned()]));
    (server, client)
}

async fn pair() -> (TlsServerStream, TlsStream<TcpStream>, Configs) {
    let configs = configs();
    let (server, client) = connect(&configs).await;
    (server, client, configs)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// The server echoes `total` bytes, reading `read_size` at most at a time: small
/// pieces as a session's first reads do (most of a record waits in the stream), or
/// more than a record (records are decrypted straight into the reader's buffer).
async fn echo(server: &mut TlsServerStream, total: usize, read_size: usize) -> io::Result<()> {
    let mut buf = vec![0u8; read_size];
    let mut done = 0;
    while done < total {
        let n = server.read(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        server.write_all(&buf[..n]).await?;
        server.flush().await?;
        done += n;
    }
    Ok(())
}

#[tokio::test]
async fn data_of_every_size_crosses_both_ways_intact() {
    let run = async {
        let (mut server, client, _configs) = pair().await;
        let (mut rd, mut wr) = tokio::io::split(client);
        let lens = [1, 100, 16_383, 16_384, 16_385, 100_000, 300_001];
        let reads = [512, 5000, 70_000];
        let cases = reads
            .iter()
            .flat_map(|&r| lens.iter().map(move |&len| (r, len)));
        for (i, (read_size, len)) in cases.enumerate() {
            let sent = pattern(len, i as u8);
            let to_send = sent.clone();
            let writer = tokio::spawn(async move {
                wr.write_all(&to_send).await.expect("client writes");
                wr.flush().await.expect("client flushes");
                wr
            });
            let (echoed, mut back) = tokio::join!(echo(&mut server, len, read_size), async {
                let mut back = vec![0u8; len];
                rd.read_exact(&mut back).await.map(|_| back)
            });
            echoed.expect("server echoes");
            wr = writer.await.expect("writer");
            assert!(
                back.as_mut().expect("client reads the echo") == &sent,
                "{len} bytes, read {read_size} at a time"
            );
        }
    };
    tokio::time::timeout(DEADLINE, run).await.expect("in time");
}

#[tokio::test]
async fn data_keeps_flowing_after_the_client_updates_its_keys() {
    let run = async {
        let (mut server, mut client, _configs) = pair().await;
        for round in 0..3u8 {
            client
                .get_mut()
                .1
                .refresh_traffic_keys()
                .expect("key update queued");
            let sent = pattern(40_000, round);
            client.write_all(&sent).await.expect("client writes");
            client.flush().await.expect("client flushes");
            echo(&mut server, sent.len(), 512)
                .await
                .expect("server echoes");
            let mut back = vec![0u8; sent.len()];
            client.read_exact(&mut back).await.expect("client reads");
            assert!(back == sent, "round {round}");
        }
    };
    tokio::time::timeout(DEADLINE, run).await.expect("in time");
}

#[tokio::test]
async fn close_notify_reads_as_end_of_file_and_a_bare_fin_as_an_error() {
    let run = async {
        let (mut server, mut client, _configs) = pair().await;
        client.write_all(b"last words").await.expect("write");
        client.shutdown().await.expect("close_notify");
        let mut got = Vec::new();
        server
            .read_to_end(&mut got)
            .await
            .expect("a clean end of file");
        assert_eq!(got, b"last words");
        // Our side closes too: the client sees a clean end of file.
        server.shutdown().await.expect("server close_notify");
        let mut rest = Vec::new();
        client
            .read_to_end(&mut rest)
            .await
            .expect("client clean EOF");
        assert!(rest.is_empty());

        let (mut server, client, _configs) = pair().await;
        // FIN without close_notify (the socket stays open, so no reset).
        let mut tcp = client.into_inner().0;
        tcp.shutdown().await.expect("FIN");
        let err = server
            .read(&mut [0u8; 16])
            .await
            .expect_err("TCP closed without close_notify");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    };
    tokio::time::timeout(DEADLINE, run).await.expect("in time");
}

#[tokio::test]
async fn a_connection_waiting_for_data_holds_no_buffer() {
    let run = async {
        let (mut server, mut client, _configs) = pair().await;
        let sent = pattern(70_000, 7);
        client.write_all(&sent).await.expect("write");
        client.flush().await.expect("flush");
        echo(&mut server, sent.len(), 512).await.expect("echo");
        let mut back = vec![0u8; sent.len()];
        client.read_exact(&mut back).await.expect("read");
        // The next read finds nothing and waits: the buffers go back.
        let waited =
            tokio::time::timeout(Duration::from_millis(50), server.read(&mut [0u8; 64])).await;
        assert!(waited.is_err(), "nothing was sent, so the read waits");
        assert_eq!(server.buffer_capacity(), 0);
        // And the connection still works.
        client.write_all(b"again").await.expect("write");
        client.flush().await.expect("flush");
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.expect("read again");
        assert_eq!(&got, b"again");
    };
    tokio::time::timeout(DEADLINE, run).await.expect("in time");
}

#[tokio::test]
async fn a_resumed_session_still_identifies_the_device() {
    let run = async {
        let configs = configs();
        for round in 0..3 {
            let (mut server, mut client) = connect(&configs).await;
            let kind = client.get_ref().1.handshake_kind();
            let expected = if round == 0 {
                HandshakeKind::Full
            } else {
                HandshakeKind::Resumed
            };
            assert_eq!(kind, Some(expected), "round {round}");
            // The session tickets arrive with the first data the client reads.
            server.write_all(b"hi").await.expect("write");
            server.flush().await.expect("flush");
            let mut got = [0u8; 2];
            client.read_exact(&mut got).await.expect("read");
            client.shutdown().await.expect("close");
        }
    };
    tokio::time::timeout(DEADLINE, run).await.expect("in time");
}
