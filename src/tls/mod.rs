//! TLS 1.3 configurations (rustls 0.23, ring provider) for both sides of the gateway.
//!
//! The public interface is:
//!
//! - [`device_server_config`]: the device listener; a client certificate chaining to
//!   the device CA is required.
//! - [`uplink_client_config`] with [`UplinkTlsOptions`]: the cloud connection; client
//!   certificate, CA and host name validation, optional SPKI SHA-256 pins on top.
//! - [`certificate_identities`], [`identity_matches`], [`not_after`], [`spki_sha256`]:
//!   what the gateway reads from a certificate.
//! - [`TlsServerStream`]: a device's connection, on rustls's unbuffered API so that an
//!   idle one holds no buffer.
//! - [`load_certs`], [`load_private_key`], [`load_root_store`]: PEM files.
//! - [`pkcs11`] and [`uplink_client_config_with_token`]: the uplink's key in a PKCS#11
//!   token instead of a file.
//!
//! Only TLS 1.3 is ever enabled, and only the ring crypto provider is used (aws-lc is
//! hard to build for ARM).

mod client;
mod identity;
mod pem;
pub mod pkcs11;
mod server;
mod server_stream;

use std::io;
use std::path::PathBuf;

pub use client::{
    CipherOrder, UplinkTlsOptions, cipher_order_names, client_config_for_server_name, parse_pin,
    uplink_client_config, uplink_client_config_with_token,
};
pub use identity::{certificate_identities, identity_matches, not_after, spki_sha256};
pub use pem::{load_certs, load_private_key, load_root_store};
pub use server::{device_server_config, device_server_config_with_token};
pub use server_stream::TlsServerStream;

/// What can go wrong while loading TLS material or building a configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: io::Error,
    },
    /// A certificate or key file is not valid PEM.
    #[error("cannot parse PEM in {}", .path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with the PEM.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("no certificate found in {}", .path.display())]
    NoCertificates {
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no private key.
    #[error("no private key found in {}", .path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// A certificate in a CA bundle cannot be used as a trust anchor.
    #[error("CA certificate in {} is not a usable trust anchor", .path.display())]
    TrustAnchor {
        /// The CA bundle.
        path: PathBuf,
        /// Why rustls refused it.
        #[source]
        source: rustls::Error,
    },
    /// A certificate and a private key do not belong together or are unsupported.
    #[error("certificate {} and key {} cannot be used together", .cert.display(), .key.display())]
    CertifiedKey {
        /// The certificate chain file.
        cert: PathBuf,
        /// The private key file.
        key: PathBuf,
        /// Why rustls refused them.
        #[source]
        source: rustls::Error,
    },
    /// A certificate verifier could not be built (for example, an empty CA bundle).
    #[error("cannot build certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// rustls refused the configuration.
    #[error("invalid TLS configuration")]
    Rustls(#[source] rustls::Error),
    /// A configured public key pin is malformed. A pin is a public value, so it is shown.
    #[error("invalid SHA-256 public key pin {pin:?} (expected sha256//<base64> or 64 hex digits)")]
    InvalidPin {
        /// The pin as written.
        pin: String,
    },
    /// The server's public key matches none of the configured pins.
    /// A server name that is not a valid DNS name or IP address.
    #[error("invalid server name {name:?}")]
    ServerName {
        /// The name.
        name: String,
    },
    #[error("server certificate public key matches none of the configured SHA-256 pins")]
    PinMismatch,
    /// The private key is in a PKCS#11 token that cannot be used; the text ends with
    /// the hint.
    #[error("{error}; hint: {}", .error.hint())]
    Token {
        /// What went wrong.
        error: pkcs11::TokenError,
    },
    /// A certificate is not valid X.509 DER.
    #[error("cannot parse X.509 certificate")]
    Certificate(#[source] x509_parser::error::X509Error),
    /// A certificate's notAfter cannot be represented as a `SystemTime`.
    #[error("certificate notAfter {unix_seconds} is out of range")]
    NotAfterOutOfRange {
        /// notAfter in seconds since the Unix epoch.
        unix_seconds: i64,
    },
}

/// The one crypto provider every configuration uses: ring, with rustls's defaults.
fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}
