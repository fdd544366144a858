//! Shared set-up for integration tests: a dev PKI in a temporary directory, device keys,
//! and MQTT clients with real TLS. Every test gets its own directory and port 0.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different subset"
)]

pub mod cloud_subscriber;
pub mod mosquitto;
pub mod proxy;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blindgate::pki::{DevPki, DevPkiOptions, generate_dev_pki};
use blindgate::tls::{CipherOrder, UplinkTlsOptions, uplink_client_config};
use rumqttc::{AsyncClient, EventLoop, MqttOptions, TlsConfiguration, Transport};

/// A dev PKI for gateway `gw-1` with the given devices.
pub fn dev_pki(dir: &Path, devices: &[&str]) -> DevPki {
    generate_dev_pki(&DevPkiOptions {
        out_dir: dir.join("certs"),
        gateway_id: "gw-1".into(),
        devices: devices.iter().map(|d| (*d).to_owned()).collect(),
        cloud_host: "localhost".into(),
        validity_days: 30,
        force: false,
    })
    .expect("dev PKI")
}

/// A rustls client config presenting `cert`/`key`, trusting `ca`.
pub fn client_tls(ca: &Path, cert: &Path, key: &Path) -> Arc<rustls::ClientConfig> {
    uplink_client_config(&UplinkTlsOptions {
        ca: ca.to_owned(),
        cert: cert.to_owned(),
        key: key.to_owned(),
        pins_sha256: Vec::new(),
        cipher_order: CipherOrder::Auto,
    })
    .expect("client TLS config")
}

/// An MQTT 3.1.1 client (rumqttc) over TLS to 127.0.0.1:`port`, checking the server
/// certificate for `localhost`.
pub fn mqtt_client(
    client_id: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(client_id, "localhost", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    options.set_max_packet_size(1 << 20, 1 << 20);
    AsyncClient::new(options, 64)
}

/// The key of a device, as the device would hold it.
pub fn device_key(device: &str, key_id: u32) -> e3::DeviceKey {
    e3::DeviceKey::generate(
        e3::DeviceId::new(device).expect("valid device id"),
        key_id,
        e3::Suite::ChaCha20Poly1305,
        &mut e3::OsRng,
    )
}
