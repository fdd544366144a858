//! The demo's cloud broker: rumqttd embedded in the process, TLS with client
//! certificates from the cloud CA. rumqttd runs its own threads and has no stop; it
//! ends with the process. (It cannot be restricted to TLS 1.3; the gateway and the
//! ingest only speak TLS 1.3, so that is what they negotiate.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};
use thiserror::Error;

/// Why the broker did not come up.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// No free port on loopback.
    #[error("cannot find a free port on 127.0.0.1")]
    Port(#[source] std::io::Error),
    /// The broker did not accept connections in time.
    #[error("embedded rumqttd did not listen on {0} within 10 s")]
    NotListening(SocketAddr),
    /// A path is not valid UTF-8 (rumqttd takes paths as strings).
    #[error("path {0} is not valid UTF-8")]
    Path(String),
}

fn path_str(path: &Path) -> Result<String, BrokerError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| BrokerError::Path(path.display().to_string()))
}

/// Starts rumqttd on a free loopback port; returns its address once it listens.
///
/// # Errors
/// [`BrokerError`].
pub fn start_cloud_broker(ca: &Path, cert: &Path, key: &Path) -> Result<SocketAddr, BrokerError> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(BrokerError::Port)?;
    let server = ServerSettings {
        name: "cloud-tls".into(),
        listen: addr,
        tls: Some(TlsConfig::Rustls {
            capath: Some(path_str(ca)?),
            certpath: path_str(cert)?,
            keypath: path_str(key)?,
        }),
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 500,
            max_segment_size: 64 << 20,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        ..Config::default()
    };
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(err) = rumqttd::Broker::new(config).start() {
                tracing::error!(error = %err, "embedded rumqttd stopped");
            }
        })
        .map_err(BrokerError::Port)?;
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            return Err(BrokerError::NotListening(addr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(addr)
}
