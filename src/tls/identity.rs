//! What the gateway reads from a certificate: its identities (subject CN, SAN DNS
//! names), its expiry, and the SHA-256 of its public key (for pins).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::digest;
use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use super::TlsError;

/// The names a certificate vouches for: every subject CN first, then every SAN DNS
/// name, in certificate order, without duplicates. CN values that are not text are
/// skipped (they can never equal a device id).
///
/// # Errors
/// [`TlsError::Certificate`] if the certificate or its SAN extension does not parse.
pub fn certificate_identities(cert: &CertificateDer<'_>) -> Result<Vec<String>, TlsError> {
    let parsed = parse(cert)?;
    let common_names = parsed
        .subject()
        .iter_common_name()
        .filter_map(|attr| attr.as_str().ok());
    let san = parsed
        .subject_alternative_name()
        .map_err(TlsError::Certificate)?;
    let dns_names = san.into_iter().flat_map(|ext| {
        ext.value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some(*dns),
                _ => None,
            })
    });
    let mut identities: Vec<String> = Vec::new();
    for name in common_names.chain(dns_names) {
        if !identities.iter().any(|known| known == name) {
            identities.push(name.to_owned());
        }
    }
    Ok(identities)
}

/// True if `device_id` is exactly (case-sensitively) one of the certificate's
/// [identities](certificate_identities). A certificate that does not parse matches
/// nothing.
pub fn identity_matches(cert: &CertificateDer<'_>, device_id: &str) -> bool {
    certificate_identities(cert).is_ok_and(|ids| ids.iter().any(|id| id == device_id))
}

/// The certificate's notAfter: the last instant it is valid.
///
/// # Errors
/// [`TlsError::Certificate`] if it does not parse, [`TlsError::NotAfterOutOfRange`] if
/// the date cannot be a `SystemTime` on this platform.
pub fn not_after(cert: &CertificateDer<'_>) -> Result<SystemTime, TlsError> {
    let unix_seconds = parse(cert)?.validity().not_after.timestamp();
    let offset = Duration::from_secs(unix_seconds.unsigned_abs());
    let time = if unix_seconds >= 0 {
        UNIX_EPOCH.checked_add(offset)
    } else {
        UNIX_EPOCH.checked_sub(offset)
    };
    time.ok_or(TlsError::NotAfterOutOfRange { unix_seconds })
}

/// SHA-256 of the certificate's DER SubjectPublicKeyInfo: the value an SPKI pin holds
/// (as `curl --pinnedpubkey sha256//...` and HPKP compute it).
///
/// # Errors
/// [`TlsError::Certificate`] if the certificate does not parse.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Result<[u8; 32], TlsError> {
    let parsed = parse(cert)?;
    let hash = digest::digest(&digest::SHA256, parsed.public_key().raw);
    Ok(<[u8; 32]>::try_from(hash.as_ref()).expect("a SHA-256 digest is 32 bytes"))
}

fn parse<'a>(cert: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, TlsError> {
    match X509Certificate::from_der(cert.as_ref()) {
        Ok((_, parsed)) => Ok(parsed),
        Err(x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e)) => {
            Err(TlsError::Certificate(e))
        }
        Err(x509_parser::nom::Err::Incomplete(_)) => {
            Err(TlsError::Certificate(X509Error::InvalidCertificate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{DevPki, DevPkiOptions, generate_dev_pki};
    use crate::tls::load_certs;

    fn dev_pki(dir: &std::path::Path) -> DevPki {
        let opts = DevPkiOptions {
            out_dir: dir.join("pki"),
            devices: vec!["pump-17".into()],
            validity_days: 30,
            ..DevPkiOptions::default()
        };
        generate_dev_pki(&opts).expect("dev PKI generates")
    }

    fn first_cert(path: &std::path::Path) -> CertificateDer<'static> {
        load_certs(path)
            .expect("cert loads")
            .into_iter()
            .next()
            .expect("one cert")
    }

    #[test]
    fn a_device_certificate_names_its_device_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dev_pki(dir.path());
        let cert = first_cert(&pki.devices[0].1.cert);
        assert_eq!(certificate_identities(&cert).expect("parses"), ["pump-17"]);
        assert!(identity_matches(&cert, "pump-17"));
        assert!(!identity_matches(&cert, "pump-1"));
        assert!(!identity_matches(&cert, "PUMP-17"));
    }

    #[test]
    fn identities_list_the_cn_before_the_san_dns_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dev_pki(dir.path());
        let cert = first_cert(&pki.gateway_devices.cert);
        assert_eq!(
            certificate_identities(&cert).expect("parses"),
            ["gw-1", "localhost"]
        );
    }

    #[test]
    fn not_after_is_the_validity_asked_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dev_pki(dir.path());
        let expiry = not_after(&first_cert(&pki.cloud_broker.cert)).expect("parses");
        let left = expiry
            .duration_since(SystemTime::now())
            .expect("in the future");
        let days = left.as_secs() / 86_400;
        assert!((29..=30).contains(&days), "{days} days left");
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x01, 0x01, 0xff]);
        assert!(matches!(
            certificate_identities(&garbage),
            Err(TlsError::Certificate(_))
        ));
        assert!(!identity_matches(&garbage, "pump-17"));
    }
}
