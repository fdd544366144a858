//! Mutual TLS 1.3 over real loopback sockets: the device listener's and the uplink's
//! rustls configurations, with certificates from a dev PKI generated per test.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blindgate::pki::{DevPki, DevPkiOptions, generate_dev_pki};
use blindgate::tls::{
    CipherOrder, TlsError, TlsServerStream, UplinkTlsOptions, certificate_identities,
    cipher_order_names, device_server_config, identity_matches, load_certs, load_private_key,
    load_root_store, parse_pin, spki_sha256, uplink_client_config,
};
use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig, ProtocolVersion, ServerConfig};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

/// Every socket test must finish well within this.
const DEADLINE: Duration = Duration::from_secs(10);

/// A dev PKI in a temporary directory (removed on drop).
struct Fixture {
    _dir: TempDir,
    pki: DevPki,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = DevPkiOptions {
        out_dir: dir.path().join("pki"),
        devices: vec!["pump-17".into()],
        ..DevPkiOptions::default()
    };
    let pki = generate_dev_pki(&opts).expect("dev PKI generates");
    Fixture { _dir: dir, pki }
}

/// What the server saw of a completed handshake.
#[derive(Debug)]
struct Accepted {
    identities: Vec<String>,
    device_matches: bool,
}

/// What the client saw of a completed handshake and the server's reply.
#[derive(Debug)]
struct Connected {
    /// True if the handshake resumed an earlier session.
    resumed: bool,
    version: Option<ProtocolVersion>,
    suite: Option<&'static str>,
    reply: Vec<u8>,
}

fn device_listener(pki: &DevPki) -> Arc<ServerConfig> {
    let listener = &pki.gateway_devices;
    device_server_config(&pki.device_ca.cert, &listener.cert, &listener.key)
        .expect("device listener config")
}

/// A TLS 1.3 mTLS server with the broker's certificate that trusts the cloud CA.
fn cloud_broker(pki: &DevPki) -> Arc<ServerConfig> {
    let broker = &pki.cloud_broker;
    device_server_config(&pki.cloud_ca.cert, &broker.cert, &broker.key).expect("broker config")
}

/// How a device connects to the gateway: the same client builder, device CA and cert.
fn device_client(pki: &DevPki) -> UplinkTlsOptions {
    let device = &pki.devices[0].1;
    UplinkTlsOptions {
        ca: pki.device_ca.cert.clone(),
        cert: device.cert.clone(),
        key: device.key.clone(),
        pins_sha256: Vec::new(),
        cipher_order: CipherOrder::Auto,
    }
}

fn uplink(pki: &DevPki) -> UplinkTlsOptions {
    UplinkTlsOptions {
        ca: pki.cloud_ca.cert.clone(),
        cert: pki.gateway_client.cert.clone(),
        key: pki.gateway_client.key.clone(),
        pins_sha256: Vec::new(),
        cipher_order: CipherOrder::Auto,
    }
}

fn client(opts: &UplinkTlsOptions) -> Arc<ClientConfig> {
    uplink_client_config(opts).expect("client config")
}

fn pin_of(cert: &Path) -> [u8; 32] {
    let certs = load_certs(cert).expect("cert loads");
    spki_sha256(&certs[0]).expect("cert parses")
}

/// Accepts one connection as the gateway accepts a device's, completes the handshake,
/// replies "ok" and closes.
async fn serve_once(config: Arc<ServerConfig>) -> (SocketAddr, JoinHandle<io::Result<Accepted>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsServerStream::accept(config, tcp).await?;
        let peer = tls
            .peer_certificates()
            .and_then(|chain| chain.first().cloned())
            .ok_or_else(|| io::Error::other("no peer certificate"))?;
        let accepted = Accepted {
            identities: certificate_identities(&peer).map_err(io::Error::other)?,
            device_matches: identity_matches(&peer, "pump-17"),
        };
        tls.write_all(b"ok").await?;
        tls.shutdown().await?;
        Ok(accepted)
    });
    (addr, task)
}

async fn connect(config: Arc<ClientConfig>, addr: SocketAddr, name: &str) -> io::Result<Connected> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_owned()).map_err(io::Error::other)?;
    let mut tls = TlsConnector::from(config).connect(name, tcp).await?;
    let (_, conn) = tls.get_ref();
    let version = conn.protocol_version();
    let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let suite = conn
        .negotiated_cipher_suite()
        .and_then(|suite| suite.suite().as_str());
    let mut reply = Vec::new();
    tls.read_to_end(&mut reply).await?;
    Ok(Connected {
        resumed,
        version,
        suite,
        reply,
    })
}

/// Runs one client against one `serve_once` server; both results, within the deadline.
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: &str,
) -> (io::Result<Connected>, io::Result<Accepted>) {
    let run = async {
        let (addr, server_task) = serve_once(server).await;
        let client_result = connect(client, addr, name).await;
        let server_result = server_task.await.expect("server task does not panic");
        (client_result, server_result)
    };
    tokio::time::timeout(DEADLINE, run)
        .await
        .expect("handshake finishes in time")
}

fn rustls_error(err: &io::Error) -> &rustls::Error {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {err:?}"))
}

fn assert_connected(client: io::Result<Connected>) -> Connected {
    let connected = client.expect("client completes the handshake");
    assert_eq!(connected.version, Some(ProtocolVersion::TLSv1_3));
    assert_eq!(connected.reply, b"ok");
    connected
}

#[tokio::test]
async fn a_device_with_a_device_ca_certificate_completes_mutual_tls13_and_is_identified() {
    let f = fixture();
    let (client, server) = handshake(
        device_listener(&f.pki),
        client(&device_client(&f.pki)),
        "localhost",
    )
    .await;
    assert_connected(client);
    let accepted = server.expect("server accepts the device");
    assert_eq!(accepted.identities, ["pump-17"]);
    assert!(accepted.device_matches);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_by_the_device_listener() {
    let f = fixture();
    let roots = load_root_store(&f.pki.device_ca.cert).expect("roots");
    let anonymous =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
    let (client, server) =
        handshake(device_listener(&f.pki), Arc::new(anonymous), "localhost").await;
    let err = server.expect_err("server refuses");
    assert!(
        matches!(rustls_error(&err), rustls::Error::NoCertificatesPresented),
        "{err:?}"
    );
    // The listener tells the client why, with the alert rustls chose.
    let err = client.expect_err("the client never gets a reply");
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired)
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused_by_the_device_listener() {
    let f = fixture();
    let cloud_client = UplinkTlsOptions {
        ca: f.pki.device_ca.cert.clone(),
        ..uplink(&f.pki)
    };
    let (client, server) =
        handshake(device_listener(&f.pki), client(&cloud_client), "localhost").await;
    let err = server.expect_err("server refuses");
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        ),
        "{err:?}"
    );
    let err = client.expect_err("the client never gets a reply");
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA)
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_device_listener_trusts_every_ca_in_its_bundle() {
    let f = fixture();
    let bundle = f.pki.cloud_ca.cert.with_file_name("bundle.pem");
    let mut text = std::fs::read_to_string(&f.pki.device_ca.cert).expect("device CA");
    text.push_str(&std::fs::read_to_string(&f.pki.cloud_ca.cert).expect("cloud CA"));
    std::fs::write(&bundle, text).expect("write bundle");
    let listener = &f.pki.gateway_devices;
    let server = device_server_config(&bundle, &listener.cert, &listener.key).expect("config");
    let second_ca_client = UplinkTlsOptions {
        ca: f.pki.device_ca.cert.clone(),
        ..uplink(&f.pki)
    };
    let (client, server) = handshake(server, client(&second_ca_client), "localhost").await;
    assert_connected(client);
    assert_eq!(server.expect("accepted").identities, ["gw-1"]);
}

#[tokio::test]
async fn the_uplink_completes_mutual_tls13_with_the_cloud_broker() {
    let f = fixture();
    let (client, server) =
        handshake(cloud_broker(&f.pki), client(&uplink(&f.pki)), "localhost").await;
    assert_connected(client);
    assert_eq!(server.expect("broker accepts").identities, ["gw-1"]);
}

#[tokio::test]
async fn the_uplink_connects_with_the_ip_address_in_the_broker_certificate() {
    let f = fixture();
    let (client, _) = handshake(cloud_broker(&f.pki), client(&uplink(&f.pki)), "127.0.0.1").await;
    assert_connected(client);
}

#[tokio::test]
async fn the_uplink_negotiates_chacha20_when_it_offers_it_first() {
    let f = fixture();
    let opts = UplinkTlsOptions {
        cipher_order: CipherOrder::ChaChaFirst,
        ..uplink(&f.pki)
    };
    let (client, _) = handshake(cloud_broker(&f.pki), client(&opts), "localhost").await;
    let connected = assert_connected(client);
    assert_eq!(connected.suite, Some("TLS13_CHACHA20_POLY1305_SHA256"));
}

#[tokio::test]
async fn the_uplink_connects_when_the_broker_key_matches_a_pin() {
    let f = fixture();
    let opts = UplinkTlsOptions {
        pins_sha256: vec![[7; 32], pin_of(&f.pki.cloud_broker.cert)],
        ..uplink(&f.pki)
    };
    let (client, server) = handshake(cloud_broker(&f.pki), client(&opts), "localhost").await;
    assert_connected(client);
    server.expect("broker accepts");
}

#[tokio::test]
async fn the_uplink_refuses_a_broker_whose_key_matches_no_pin() {
    let f = fixture();
    let opts = UplinkTlsOptions {
        pins_sha256: vec![[7; 32]],
        ..uplink(&f.pki)
    };
    let (client, _) = handshake(cloud_broker(&f.pki), client(&opts), "localhost").await;
    let err = client.expect_err("client refuses");
    let rustls::Error::InvalidCertificate(CertificateError::Other(other)) = rustls_error(&err)
    else {
        panic!("not a certificate error: {err:?}");
    };
    assert!(
        matches!(
            other.0.downcast_ref::<TlsError>(),
            Some(TlsError::PinMismatch)
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_uplink_refuses_a_server_certificate_from_another_ca() {
    let f = fixture();
    let (client, _) = handshake(
        device_listener(&f.pki),
        client(&uplink(&f.pki)),
        "localhost",
    )
    .await;
    let err = client.expect_err("client refuses");
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_matching_pin_does_not_replace_ca_validation() {
    let f = fixture();
    let opts = UplinkTlsOptions {
        pins_sha256: vec![pin_of(&f.pki.gateway_devices.cert)],
        ..uplink(&f.pki)
    };
    let (client, _) = handshake(device_listener(&f.pki), client(&opts), "localhost").await;
    let err = client.expect_err("client refuses");
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_uplink_refuses_a_broker_certificate_for_another_host_name() {
    let f = fixture();
    let opts = UplinkTlsOptions {
        pins_sha256: vec![pin_of(&f.pki.cloud_broker.cert)],
        ..uplink(&f.pki)
    };
    let (client, _) = handshake(cloud_broker(&f.pki), client(&opts), "cloud.example").await;
    let err = client.expect_err("client refuses");
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_uplink_refuses_a_server_that_offers_only_tls12() {
    let f = fixture();
    let broker = &f.pki.cloud_broker;
    let tls12_only =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .expect("TLS 1.2")
            .with_no_client_auth()
            .with_single_cert(
                load_certs(&broker.cert).expect("chain"),
                load_private_key(&broker.key).expect("key"),
            )
            .expect("server config");
    let (client, server) =
        handshake(Arc::new(tls12_only), client(&uplink(&f.pki)), "localhost").await;
    let err = client.expect_err("client refuses");
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion)
        ),
        "{err:?}"
    );
    assert!(server.is_err(), "no TLS 1.2 session is established");
}

#[test]
fn chacha_first_puts_chacha20_poly1305_first_and_aes_first_puts_aes_first() {
    let f = fixture();
    let order = |cipher_order| {
        let opts = UplinkTlsOptions {
            cipher_order,
            ..uplink(&f.pki)
        };
        cipher_order_names(&client(&opts))
    };
    let chacha = order(CipherOrder::ChaChaFirst);
    assert_eq!(chacha[0], "TLS13_CHACHA20_POLY1305_SHA256", "{chacha:?}");
    let aes = order(CipherOrder::AesFirst);
    assert!(aes[0].starts_with("TLS13_AES_"), "{aes:?}");
    for names in [&chacha, &aes, &order(CipherOrder::Auto)] {
        assert_eq!(names.len(), 3, "TLS 1.3 suites only: {names:?}");
        assert!(names.iter().all(|n| n.starts_with("TLS13_")), "{names:?}");
    }
}

#[test]
fn dev_pki_key_files_have_mode_0600() {
    let f = fixture();
    for paths in f.pki.pairs() {
        let mode = std::fs::metadata(&paths.key)
            .expect("key file exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}", paths.key.display());
    }
}

#[test]
fn parse_pin_accepts_curl_and_hex_forms_and_rejects_garbage() {
    let hex = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let curl = "sha256//n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=";
    assert_eq!(parse_pin(hex).expect("hex"), parse_pin(curl).expect("curl"));
    for garbage in [
        "",
        "sha256//",
        "sha256//abc",
        "md5//n4bQgYhMfWWaL+qgxVrQFaO",
        "xyz",
        &hex[1..],
    ] {
        assert!(
            matches!(parse_pin(garbage), Err(TlsError::InvalidPin { .. })),
            "{garbage:?}"
        );
    }
}

#[test]
fn the_pin_of_a_certificate_is_the_sha256_of_its_public_key_info() {
    let f = fixture();
    let broker = &f.pki.cloud_broker;
    let key_pem = std::fs::read_to_string(&broker.key).expect("key");
    let key = rcgen::KeyPair::from_pem(&key_pem).expect("key parses");
    let from_key = ring::digest::digest(&ring::digest::SHA256, &key.public_key_der());
    assert_eq!(pin_of(&broker.cert).as_slice(), from_key.as_ref());
    assert_ne!(pin_of(&broker.cert), pin_of(&f.pki.gateway_client.cert));
}

#[tokio::test]
async fn the_uplink_resumes_its_tls_session_on_reconnect() {
    let f = fixture();
    let server = cloud_broker(&f.pki);
    let uplink_config = client(&uplink(&f.pki));
    let (first, _) = handshake(Arc::clone(&server), Arc::clone(&uplink_config), "localhost").await;
    assert!(
        !assert_connected(first).resumed,
        "first handshake is a full one"
    );
    let (second, _) = handshake(server, uplink_config, "localhost").await;
    assert!(
        assert_connected(second).resumed,
        "the reconnect resumed the session"
    );
}
