//! The device listener's TLS configuration: TLS 1.3 only, client certificate required;
//! the listener's key in a PEM file or in a PKCS#11 token.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;

use rustls::sign::{CertifiedKey, SingleCertAndKey};

use super::pem::{load_certs, load_private_key, load_root_store};
use super::pkcs11::{Pkcs11Key, open_token_key};
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
    let chain = load_certs(cert)?;
    let private_key = load_private_key(key)?;
    let config = builder(ca)?
        .with_single_cert(chain, private_key)
        .map_err(|source| TlsError::CertifiedKey {
            cert: cert.into(),
            key: key.into(),
            source,
        })?;
    Ok(Arc::new(config))
}

/// As [`device_server_config`], but the private key is in a PKCS#11 token and signs
/// there. The token is opened and checked against the certificate now.
///
/// # Errors
/// As [`device_server_config`], and [`TlsError::Token`] for the token.
pub fn device_server_config_with_token(
    ca: &Path,
    cert: &Path,
    token_key: &Pkcs11Key,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = builder(ca)?;
    let chain = load_certs(cert)?;
    let leaf = chain.first().ok_or_else(|| TlsError::NoCertificates {
        path: cert.to_owned(),
    })?;
    let signing_key =
        open_token_key(token_key, cert, leaf).map_err(|error| TlsError::Token { error })?;
    tracing::info!(key = %token_key.uri, scheme = ?signing_key.scheme(), "device listener key is in a PKCS#11 token");
    let certified = CertifiedKey::new(chain, Arc::new(signing_key));
    let config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    Ok(Arc::new(config))
}

/// TLS 1.3, ring, client certificates chaining to `ca` required.
fn builder(
    ca: &Path,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::server::WantsServerCert>, TlsError> {
    let provider = Arc::new(ring_provider());
    let roots = Arc::new(load_root_store(ca)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider))
        .build()
        .map_err(TlsError::Verifier)?;
    Ok(ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_client_cert_verifier(verifier))
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
