//! The uplink's TLS configuration: TLS 1.3 only, client certificate, CA and host name
//! validation, optional SPKI SHA-256 pins checked on top, and a cipher suite order
//! chosen for the CPU.

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, CipherSuite, ClientConfig, DigitallySignedStruct, OtherError,
    SignatureScheme, SupportedCipherSuite,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::identity::spki_sha256;
use super::pem::{load_certs, load_private_key, load_root_store};
use super::pkcs11::{Pkcs11Key, open_token_key};
use super::{TlsError, ring_provider};

/// What the uplink's TLS configuration is built from.
///
/// The server's host name is not here: it is given per connection (the endpoint's
/// host), and it is always checked against the server certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkTlsOptions {
    /// CA bundle the cloud broker's certificate must chain to (every certificate in the
    /// file is trusted).
    pub ca: PathBuf,
    /// The gateway's client certificate chain, end entity first.
    pub cert: PathBuf,
    /// The private key of `cert`.
    pub key: PathBuf,
    /// SHA-256 of accepted server SubjectPublicKeyInfos (see [`parse_pin`]). Empty: no
    /// pinning. Non-empty: the end-entity key must match one of them, in addition to
    /// (never instead of) CA and host name validation. List the next key's pin before
    /// rotating the broker's key.
    pub pins_sha256: Vec<[u8; 32]>,
    /// Which AEAD the client offers first. The default is [`CipherOrder::Auto`].
    pub cipher_order: CipherOrder,
}

/// The order of TLS 1.3 cipher suites the client offers (the server picks the first
/// it supports, so this decides the AEAD in practice).
///
/// In the config file (`cloud.cipher_order`): `"auto"`, `"aes-first"`, `"chacha-first"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Deserialize)]
pub enum CipherOrder {
    /// ChaCha20-Poly1305 first if the CPU lacks AES instructions (as on the Raspberry
    /// Pi 4 and older), AES-GCM first otherwise.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// AES-256-GCM and AES-128-GCM first, ChaCha20-Poly1305 last.
    #[serde(rename = "aes-first")]
    AesFirst,
    /// ChaCha20-Poly1305 first, then the AES-GCM suites.
    #[serde(rename = "chacha-first")]
    ChaChaFirst,
}

impl CipherOrder {
    /// True if this order puts ChaCha20-Poly1305 first on the running CPU.
    pub fn chacha_first(self) -> bool {
        match self {
            Self::Auto => !cpu_has_aes(),
            Self::AesFirst => false,
            Self::ChaChaFirst => true,
        }
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
fn cpu_has_aes() -> bool {
    std::arch::is_x86_feature_detected!("aes")
}

#[cfg(target_arch = "aarch64")]
fn cpu_has_aes() -> bool {
    std::arch::is_aarch64_feature_detected!("aes")
}

#[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
fn cpu_has_aes() -> bool {
    false
}

/// Builds the uplink's client configuration.
///
/// - TLS 1.3 only, ring provider, its TLS 1.3 suites in [`CipherOrder`] order.
/// - The server certificate must chain to `ca` and be valid for the host name given
///   when connecting; then, if `pins_sha256` is non-empty, its public key must match a
///   pin.
/// - The client authenticates with `cert` and `key`.
/// - Session resumption: rustls's default in-memory session cache is kept (256
///   sessions). A resumed TLS 1.3 session presents no certificate; it was validated
///   and pinned in the full handshake that created it.
///
/// # Errors
/// Any file that cannot be loaded (the error names it), a CA bundle rustls refuses, or
/// a key that does not match the certificate.
pub fn uplink_client_config(opts: &UplinkTlsOptions) -> Result<Arc<ClientConfig>, TlsError> {
    build_client_config(opts, None, ClientKey::File)
}

/// As [`uplink_client_config`], but the private key is in a PKCS#11 token and signs
/// there (`opts.key` is not read). The token is opened, logged in to and checked
/// against the certificate now, so a problem stops the start.
///
/// # Errors
/// As [`uplink_client_config`], and [`TlsError::Token`] for the token.
pub fn uplink_client_config_with_token(
    opts: &UplinkTlsOptions,
    token_key: &Pkcs11Key,
) -> Result<Arc<ClientConfig>, TlsError> {
    build_client_config(opts, None, ClientKey::Token(token_key))
}

/// Where the client's private key is.
#[derive(Clone, Copy)]
enum ClientKey<'a> {
    /// The PEM file `UplinkTlsOptions::key`.
    File,
    /// A PKCS#11 token.
    Token(&'a Pkcs11Key),
}

/// As [`uplink_client_config`], but the server certificate is checked against
/// `server_name` whatever address is dialled. rumqttc uses one string both to dial and
/// to name the server; a client that dials an IP address but must check a DNS name
/// (as a device dialling its gateway does) uses this.
///
/// # Errors
/// As [`uplink_client_config`], and [`TlsError::ServerName`] for an invalid name.
pub fn client_config_for_server_name(
    opts: &UplinkTlsOptions,
    server_name: &str,
) -> Result<Arc<ClientConfig>, TlsError> {
    let name = ServerName::try_from(server_name.to_owned()).map_err(|_| TlsError::ServerName {
        name: server_name.to_owned(),
    })?;
    build_client_config(opts, Some(name), ClientKey::File)
}

fn build_client_config(
    opts: &UplinkTlsOptions,
    server_name: Option<ServerName<'static>>,
    client_key: ClientKey<'_>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(CryptoProvider {
        cipher_suites: ordered_tls13_suites(opts.cipher_order),
        ..ring_provider()
    });
    let verifier = server_verifier(opts, server_name, &provider)?;
    let chain = load_certs(&opts.cert)?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match client_key {
        ClientKey::File => {
            let key = load_private_key(&opts.key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|source| TlsError::CertifiedKey {
                    cert: opts.cert.clone(),
                    key: opts.key.clone(),
                    source,
                })?
        }
        ClientKey::Token(token_key) => {
            let leaf = chain.first().ok_or_else(|| TlsError::NoCertificates {
                path: opts.cert.clone(),
            })?;
            let signing_key = open_token_key(token_key, &opts.cert, leaf)
                .map_err(|error| TlsError::Token { error })?;
            tracing::info!(key = %token_key.uri, scheme = ?signing_key.scheme(), "uplink key is in a PKCS#11 token");
            let certified = CertifiedKey::new(chain, Arc::new(signing_key));
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)))
        }
    };
    Ok(Arc::new(config))
}

/// The names of the cipher suites `config` offers, in order (for logs and tests).
pub fn cipher_order_names(config: &ClientConfig) -> Vec<&'static str> {
    config
        .crypto_provider()
        .cipher_suites
        .iter()
        .map(|suite| suite.suite().as_str().unwrap_or("unknown"))
        .collect()
}

/// Parses an SPKI SHA-256 pin written as `sha256//<base64>` (curl's
/// `--pinnedpubkey` form) or as 64 hex digits.
///
/// # Errors
/// [`TlsError::InvalidPin`] for anything else, or a digest that is not 32 bytes.
pub fn parse_pin(s: &str) -> Result<[u8; 32], TlsError> {
    let text = s.trim();
    let bytes = match text.strip_prefix("sha256//") {
        Some(b64) => BASE64.decode(b64).ok(),
        None if text.len() == 64 => hex::decode(text).ok(),
        None => None,
    };
    bytes
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| TlsError::InvalidPin { pin: s.to_owned() })
}

/// The ring provider's TLS 1.3 suites, ChaCha20-Poly1305 moved first or last; the AES
/// suites keep rustls's order (AES-256 before AES-128).
fn ordered_tls13_suites(order: CipherOrder) -> Vec<SupportedCipherSuite> {
    let chacha_first = order.chacha_first();
    let mut suites: Vec<SupportedCipherSuite> = ring_provider()
        .cipher_suites
        .into_iter()
        .filter(|suite| suite.tls13().is_some())
        .collect();
    // A stable sort on one bool moves ChaCha and keeps everything else in place.
    suites.sort_by_key(|suite| {
        (suite.suite() == CipherSuite::TLS13_CHACHA20_POLY1305_SHA256) != chacha_first
    });
    suites
}

fn server_verifier(
    opts: &UplinkTlsOptions,
    server_name: Option<ServerName<'static>>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let roots = Arc::new(load_root_store(&opts.ca)?);
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(provider))
        .build()
        .map_err(TlsError::Verifier)?;
    if opts.pins_sha256.is_empty() && server_name.is_none() {
        return Ok(webpki);
    }
    Ok(Arc::new(CheckedVerifier {
        webpki,
        pins: opts.pins_sha256.clone(),
        server_name,
    }))
}

/// WebPKI validation (chain, validity, host name), optionally against a fixed server
/// name instead of the dialled one, then an SPKI pin check if there are pins.
#[derive(Debug)]
struct CheckedVerifier {
    /// Does all the normal validation; the pin check runs only after it succeeded.
    webpki: Arc<WebPkiServerVerifier>,
    /// Empty: no pinning.
    pins: Vec<[u8; 32]>,
    /// `Some`: the name the certificate must carry, whatever was dialled.
    server_name: Option<ServerName<'static>>,
}

impl ServerCertVerifier for CheckedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = self.server_name.as_ref().unwrap_or(server_name);
        let verified =
            self.webpki
                .verify_server_cert(end_entity, intermediates, name, ocsp_response, now)?;
        if self.pins.is_empty() {
            return Ok(verified);
        }
        let spki = spki_sha256(end_entity).map_err(certificate_error)?;
        if self.pins.contains(&spki) {
            Ok(verified)
        } else {
            Err(certificate_error(TlsError::PinMismatch))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Wraps our error so it travels through rustls to whoever reads the handshake error.
fn certificate_error(error: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tls13_suites_are_offered_in_either_order() {
        for order in [CipherOrder::AesFirst, CipherOrder::ChaChaFirst] {
            let suites = ordered_tls13_suites(order);
            assert_eq!(suites.len(), 3, "{order:?}");
            assert!(suites.iter().all(|s| s.tls13().is_some()), "{order:?}");
        }
    }

    #[test]
    fn aes_first_keeps_aes_256_before_aes_128_and_chacha_last() {
        let names: Vec<_> = ordered_tls13_suites(CipherOrder::AesFirst)
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            names,
            [
                CipherSuite::TLS13_AES_256_GCM_SHA384,
                CipherSuite::TLS13_AES_128_GCM_SHA256,
                CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            ]
        );
    }

    #[test]
    fn auto_follows_the_cpu() {
        assert_eq!(CipherOrder::Auto.chacha_first(), !cpu_has_aes());
    }

    #[test]
    fn pins_parse_in_both_forms_and_agree() {
        let hex_pin = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let from_hex = parse_pin(hex_pin).expect("hex pin");
        let from_b64 =
            parse_pin(&format!("sha256//{}", BASE64.encode(from_hex))).expect("base64 pin");
        assert_eq!(from_hex, from_b64);
        assert_eq!(from_hex[1], 0x11);
    }

    #[test]
    fn malformed_pins_are_refused_and_shown() {
        for bad in [
            "",
            "sha256//",
            "sha256//not base64",
            "sha256//AAAA",
            "sha1//AAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "zz112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
            "0011",
        ] {
            let err = parse_pin(bad).expect_err(bad);
            assert!(matches!(err, TlsError::InvalidPin { .. }), "{bad}: {err:?}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }
}
