//! Loads certificates, CA bundles and private keys from PEM files, with errors that
//! name the file.

use std::path::Path;

use rustls::RootCertStore;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsError;

/// Loads every certificate in a PEM file, in file order (a chain: end entity first;
/// a CA bundle: all of its certificates).
///
/// # Errors
/// [`TlsError::Read`] if the file cannot be read, [`TlsError::Pem`] if it is not valid
/// PEM, [`TlsError::NoCertificates`] if it holds no certificate.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| pem_error(path, source))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates { path: path.into() });
    }
    Ok(certs)
}

/// Loads the first private key (PKCS#8, SEC1 or PKCS#1) in a PEM file.
///
/// # Errors
/// [`TlsError::Read`], [`TlsError::Pem`], or [`TlsError::NoPrivateKey`] if the file
/// holds no private key.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey { path: path.into() },
        other => pem_error(path, other),
    })
}

/// Loads a CA bundle into a root store; every certificate in the file becomes a trust
/// anchor, and one that cannot is an error (never silently skipped).
///
/// # Errors
/// As [`load_certs`], plus [`TlsError::TrustAnchor`] for an unusable certificate.
pub fn load_root_store(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|source| TlsError::TrustAnchor {
            path: path.into(),
            source,
        })?;
    }
    Ok(roots)
}

/// Keeps I/O failures apart from PEM syntax errors.
fn pem_error(path: &Path, error: pem::Error) -> TlsError {
    match error {
        pem::Error::Io(source) => TlsError::Read {
            path: path.into(),
            source,
        },
        source => TlsError::Pem {
            path: path.into(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::pki::{DevPkiOptions, generate_dev_pki};

    fn dev_pki(dir: &Path) -> crate::pki::DevPki {
        let opts = DevPkiOptions {
            out_dir: dir.join("pki"),
            devices: vec!["pump-17".into()],
            ..DevPkiOptions::default()
        };
        generate_dev_pki(&opts).expect("dev PKI generates")
    }

    #[test]
    fn a_ca_bundle_loads_every_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dev_pki(dir.path());
        let bundle = dir.path().join("bundle.pem");
        let mut text = fs::read_to_string(&pki.cloud_ca.cert).expect("read cloud CA");
        text.push_str(&fs::read_to_string(&pki.device_ca.cert).expect("read device CA"));
        fs::write(&bundle, text).expect("write bundle");

        assert_eq!(load_certs(&bundle).expect("bundle loads").len(), 2);
        assert_eq!(load_root_store(&bundle).expect("roots load").len(), 2);
    }

    #[test]
    fn a_file_without_certificates_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dev_pki(dir.path());
        let err = load_certs(&pki.device_ca.key).expect_err("a key file has no certificate");
        assert!(matches!(err, TlsError::NoCertificates { .. }), "{err:?}");
        assert!(err.to_string().contains("device-ca.key"), "{err}");
    }

    #[test]
    fn a_missing_file_is_a_read_error_naming_it() {
        let err = load_certs(Path::new("/nonexistent/ca.pem")).expect_err("missing file");
        assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn a_file_without_a_private_key_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dev_pki(dir.path());
        let err = load_private_key(&pki.device_ca.cert).expect_err("a cert has no key");
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err:?}");
        assert!(err.to_string().contains("device-ca.pem"), "{err}");
        assert!(load_private_key(&pki.device_ca.key).is_ok());
    }

    #[test]
    fn broken_pem_is_a_pem_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("broken.pem");
        fs::write(&path, "-----BEGIN CERTIFICATE-----\nnot base64!\n").expect("write");
        let err = load_certs(&path).expect_err("broken PEM");
        assert!(matches!(err, TlsError::Pem { .. }), "{err:?}");
    }
}
