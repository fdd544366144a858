//! The device listener's TLS configuration: TLS 1.3 only, client certificate required.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;

use super::pem::{load_certs, load_private_key, load_root_store};
use super::{TlsError, ring_provider};

/// Builds the device listener's configuration.
///
/// - TLS 1.3 only, ring provider.
/// - Every client must present a certificate that chains to a CA in the `ca` bundle
///   (all certificates of the bundle are trusted); the device id is then read from it
///   with [`super::certificate_identities`].
/// - `cert` is the listener's chain (end entity first), `key` its private key.
/// - No ALPN; rustls's default in-memory session storage for resumption.
///
/// # Errors
/// Any file that cannot be loaded (the error names it), a CA bundle rustls refuses, or
/// a key that does not match the certificate.
pub fn device_server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(ring_provider());
    let roots = Arc::new(load_root_store(ca)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider))
        .build()
        .map_err(TlsError::Verifier)?;
    let chain = load_certs(cert)?;
    let private_key = load_private_key(key)?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, private_key)
        .map_err(|source| TlsError::CertifiedKey {
            cert: cert.into(),
            key: key.into(),
            source,
        })?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{DevPkiOptions, generate_dev_pki};

    #[test]
    fn a_key_that_does_not_match_the_certificate_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = DevPkiOptions {
            out_dir: dir.path().join("pki"),
            ..DevPkiOptions::default()
        };
        let pki = generate_dev_pki(&opts).expect("dev PKI generates");
        let listener = &pki.gateway_devices;
        let err = device_server_config(&pki.device_ca.cert, &listener.cert, &pki.device_ca.key)
            .expect_err("mismatched key");
        assert!(matches!(err, TlsError::CertifiedKey { .. }), "{err:?}");
        assert!(device_server_config(&pki.device_ca.cert, &listener.cert, &listener.key).is_ok());
    }
}
