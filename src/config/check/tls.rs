//! The TLS files a config names: certificates (parse, validity, CA, chain order,
//! issuer), private keys (parse, mode, match with their certificate) and keys in a
//! PKCS#11 token.

use super::*;

/// Which TLS role a certificate plays, for the issuer check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    /// The device listener's server certificate, checked against the device CA.
    DeviceListener,
    /// The gateway's uplink client certificate, checked against the cloud CA.
    GatewayClient,
    /// The cloud ingest's client certificate, checked against the cloud CA.
    IngestClient,
}

/// A CA file, a certificate chain and its key, each with its key in the file.
pub(super) struct TlsFiles<'a> {
    pub(super) ca: (&'a str, &'a Path),
    pub(super) cert: (&'a str, &'a Path),
    /// `None`: the key is in a PKCS#11 token (checked by `check_pkcs11`).
    pub(super) key: (&'a str, Option<&'a Path>),
    pub(super) side: Side,
}

/// Certificates read from one file.
pub(super) struct Certs {
    pub(super) ders: Vec<CertificateDer<'static>>,
    /// False if a certificate is expired or not yet valid (reported already).
    pub(super) in_time: bool,
}

impl Env<'_> {
    /// A key in a PKCS#11 token: opened and checked against the certificate, as at
    /// start (nothing for a key file).
    pub(super) fn token_key(
        &mut self,
        key_key: &str,
        cert_key: &str,
        key: &KeySource,
        cert: &Path,
    ) {
        if let KeySource::Pkcs11(token_key) = key
            && !self.skip(key_key)
            && !self.skip(cert_key)
            && let Some(problem) = crate::config::check_pkcs11::token_key_problem(token_key, cert)
        {
            self.error(key_key, problem);
        }
    }

    /// The CA, certificate and key checks of one TLS identity.
    pub(super) fn tls_files(&mut self, files: &TlsFiles<'_>) {
        let (ca_key, ca_path) = files.ca;
        let (cert_key, cert_path) = files.cert;
        let (key_key, key_path) = files.key;
        let ca = match self.skip(ca_key) {
            true => None,
            false => self.certificates(ca_key, ca_path, true),
        };
        let chain = match self.skip(cert_key) {
            true => None,
            false => self.certificates(cert_key, cert_path, false),
        };
        let signing_key = match (self.skip(key_key), key_path) {
            (false, Some(key_path)) => self
                .private_key(key_key, key_path)
                .map(|signing_key| (key_path, signing_key)),
            _ => None,
        };
        if let (Some(chain), Some((key_path, signing_key))) = (&chain, &signing_key) {
            self.key_matches(
                key_key,
                key_path,
                cert_key,
                cert_path,
                chain,
                signing_key.as_ref(),
            );
        }
        if let (Some(chain), Some(ca)) = (&chain, &ca)
            && chain.in_time
            && ca.in_time
        {
            self.issued_by(files, chain, ca);
        }
    }

    /// Reads and checks the certificates of a CA file (`is_ca`) or of a certificate
    /// chain file. `None` if the file is unusable (reported).
    pub(super) fn certificates(&mut self, key: &str, path: &Path, is_ca: bool) -> Option<Certs> {
        let bytes = self.read(key, path)?;
        let sections = match <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, pem::Error>>()
        {
            Ok(sections) => sections,
            Err(err) => {
                let problem = Problem::new(format!("{} is not valid PEM: {err}", path.display()));
                self.error(key, problem);
                return None;
            }
        };
        let ders: Vec<CertificateDer<'static>> = sections
            .iter()
            .filter(|(kind, _)| *kind == SectionKind::Certificate)
            .map(|(_, der)| CertificateDer::from(der.clone()))
            .collect();
        if ders.is_empty() {
            let problem = no_certificate_problem(path, &bytes, &sections);
            self.error(key, problem);
            return None;
        }
        let mut parsed = Vec::with_capacity(ders.len());
        for (index, der) in ders.iter().enumerate() {
            match parse_x509(der) {
                Ok(cert) => parsed.push(cert),
                Err(reason) => {
                    let which = ordinal(index, ders.len());
                    let problem = Problem::new(format!(
                        "{which} in {} is not a valid X.509 certificate: {reason}",
                        path.display()
                    ));
                    self.error(key, problem);
                }
            }
        }
        if parsed.len() != ders.len() {
            return None;
        }
        let in_time = self.validity(key, path, &parsed, is_ca);
        if is_ca {
            self.ca_file(key, path, &ders, &parsed);
        } else {
            self.chain_order(key, path, &parsed);
        }
        Some(Certs { ders, in_time })
    }

    /// Reports certificates that are expired, not yet valid or expire soon; false if
    /// one of them cannot be used now. In a CA bundle, an unusable certificate is only
    /// a warning while another one in it is valid.
    pub(super) fn validity(
        &mut self,
        key: &str,
        path: &Path,
        certs: &[X509Certificate<'_>],
        is_ca: bool,
    ) -> bool {
        let windows: Vec<(i64, i64)> = certs
            .iter()
            .map(|cert| {
                let validity = cert.validity();
                (
                    validity.not_before.timestamp(),
                    validity.not_after.timestamp(),
                )
            })
            .collect();
        let usable = |(from, until): &(i64, i64)| *from <= self.now && self.now <= *until;
        let some_usable = windows.iter().any(usable);
        let mut in_time = true;
        for (index, (cert, (from, until))) in certs.iter().zip(&windows).enumerate() {
            let which = describe(cert, index, certs.len());
            let file = path.display();
            if *until < self.now {
                let problem = Problem::new(format!(
                    "{which} in {file} expired on {} ({} ago)",
                    format_time(*until),
                    days_text(self.now - *until)
                ))
                .hint("renew it: a TLS peer refuses an expired certificate");
                match is_ca && some_usable {
                    true => self.warning(key, problem),
                    false => {
                        in_time = false;
                        self.error(key, problem);
                    }
                }
            } else if *from > self.now {
                let problem = Problem::new(format!(
                    "{which} in {file} is not valid before {} (in {})",
                    format_time(*from),
                    days_text(*from - self.now)
                ))
                .hint("check this machine's clock (`date -u`); with a correct clock, wait or reissue it");
                match is_ca && some_usable {
                    true => self.warning(key, problem),
                    false => {
                        in_time = false;
                        self.error(key, problem);
                    }
                }
            } else if *until - self.now < EXPIRY_WARNING_DAYS * DAY {
                let problem = Problem::new(format!(
                    "{which} in {file} expires on {}, in {}",
                    format_time(*until),
                    days_text(*until - self.now)
                ))
                .hint("renew it before then, and reload the gateway");
                self.warning(key, problem);
            }
        }
        in_time
    }

    /// A CA file must hold a CA certificate, and each must be a usable trust anchor.
    pub(super) fn ca_file(
        &mut self,
        key: &str,
        path: &Path,
        ders: &[CertificateDer<'static>],
        parsed: &[X509Certificate<'_>],
    ) {
        if !parsed.iter().any(|cert| cert.is_ca()) {
            let problem = Problem::new(format!(
                "{} holds no CA certificate (none has basicConstraints CA:TRUE)",
                path.display()
            ))
            .hint("this must be the CA certificate that issued the peers' certificates, not a certificate it issued");
            self.warning(key, problem);
        }
        for (index, der) in ders.iter().enumerate() {
            if let Err(err) = RootCertStore::empty().add(der.clone()) {
                let which = ordinal(index, ders.len());
                let problem = Problem::new(format!(
                    "{which} in {} cannot be a trust anchor: {err}",
                    path.display()
                ));
                self.error(key, problem);
            }
        }
    }

    /// In a chain file each certificate should be issued by the next one.
    pub(super) fn chain_order(&mut self, key: &str, path: &Path, certs: &[X509Certificate<'_>]) {
        for (index, pair) in certs.windows(2).enumerate() {
            if pair[0].issuer().as_raw() != pair[1].subject().as_raw() {
                let problem = Problem::new(format!(
                    "certificate {} in {} was not issued by certificate {} after it",
                    index + 1,
                    path.display(),
                    index + 2
                ))
                .hint("a chain file lists this program's certificate first, then each issuer in order (leave the root CA out)");
                self.warning(key, problem);
                return;
            }
        }
    }

    /// Reads a private key file: mode, encryption, PEM, and whether rustls can use
    /// it. `None` if unusable (reported).
    pub(super) fn private_key(&mut self, key: &str, path: &Path) -> Option<Arc<dyn SigningKey>> {
        let bytes = self.read(key, path)?;
        self.key_mode(key, path);
        let text = String::from_utf8_lossy(&bytes);
        if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
            let problem = Problem::new(format!(
                "the private key in {} is encrypted with a passphrase, which the gateway cannot ask for",
                path.display()
            ))
            .hint("store it unencrypted, readable only by root and group blindgate (`openssl pkey -in KEY -out KEY.new`, then chmod 0640)");
            self.error(key, problem);
            return None;
        }
        let der = match PrivateKeyDer::from_pem_slice(&bytes) {
            Ok(der) => der,
            Err(pem::Error::NoItemsFound) => {
                let holds_cert = <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes)
                    .any(|item| matches!(item, Ok((SectionKind::Certificate, _))));
                let problem = match holds_cert {
                    true => Problem::new(format!(
                        "{} holds a certificate, not a private key",
                        path.display()
                    ))
                    .hint("are the cert and key paths swapped?"),
                    false => Problem::new(format!("no private key in {}", path.display())).hint(
                        "a PEM private key starts with -----BEGIN PRIVATE KEY----- (or EC PRIVATE KEY, RSA PRIVATE KEY)",
                    ),
                };
                self.error(key, problem);
                return None;
            }
            Err(err) => {
                let problem = Problem::new(format!("{} is not valid PEM: {err}", path.display()));
                self.error(key, problem);
                return None;
            }
        };
        match rustls::crypto::ring::sign::any_supported_type(&der) {
            Ok(signing_key) => Some(signing_key),
            Err(err) => {
                let problem = Problem::new(format!(
                    "the private key in {} cannot be used: {err}",
                    path.display()
                ))
                .hint("use an ECDSA P-256 or P-384, Ed25519 or RSA key");
                self.error(key, problem);
                None
            }
        }
    }

    /// A key file must not be readable by others; group access is for the service's
    /// group only.
    pub(super) fn key_mode(&mut self, key: &str, path: &Path) {
        let Ok(meta) = fs::metadata(path) else {
            return;
        };
        let mode = meta.mode() & 0o777;
        let file = path.display();
        let fix = "chmod 0640 and chown root:blindgate (or 0600 owned by the gateway's user)";
        if mode & 0o007 != 0 {
            let problem = Problem::new(format!(
                "the private key {file} is accessible by every user (mode {mode:04o})"
            ))
            .hint(fix);
            self.error(key, problem);
        } else if mode & 0o030 != 0 {
            let problem = Problem::new(format!(
                "the private key {file} is writable by its group (mode {mode:04o})"
            ))
            .hint(fix);
            self.warning(key, problem);
        } else if mode & 0o040 != 0 && !group_may_read(meta.gid()) {
            let group = group_name(meta.gid()).unwrap_or_else(|| meta.gid().to_string());
            let problem = Problem::new(format!(
                "the private key {file} is readable by group {group} (mode {mode:04o})"
            ))
            .hint(format!(
                "only the gateway's group should read it: chgrp {SERVICE_GROUP}, or chmod 0600"
            ));
            self.warning(key, problem);
        }
    }

    /// The key must be the one of the chain's first certificate.
    pub(super) fn key_matches(
        &mut self,
        key: &str,
        key_path: &Path,
        cert_key: &str,
        cert_path: &Path,
        chain: &Certs,
        signing_key: &dyn SigningKey,
    ) {
        let (Some(leaf), Some(public)) = (chain.ders.first(), signing_key.public_key()) else {
            return;
        };
        let Ok(parsed) = parse_x509(leaf) else {
            return;
        };
        if parsed.public_key().raw != public.as_ref() {
            let problem = Problem::new(format!(
                "{} is not the private key of the certificate in {} (their public keys differ)",
                key_path.display(),
                cert_path.display()
            ))
            .hint(format!(
                "use the key that was generated with that certificate, or set {cert_key} to this key's certificate"
            ));
            self.error(key, problem);
        }
    }

    /// Warns if the certificate does not verify against the CA file of its section
    /// for its TLS role.
    pub(super) fn issued_by(&mut self, files: &TlsFiles<'_>, chain: &Certs, ca: &Certs) {
        let (ca_key, ca_path) = files.ca;
        let (cert_key, cert_path) = files.cert;
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(ca.ders.iter().cloned());
        let Some(leaf) = chain.ders.first() else {
            return;
        };
        if added == 0 {
            return;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let intermediates = &chain.ders[1..];
        let result = match files.side {
            Side::DeviceListener => verify_server(leaf, intermediates, roots, &provider),
            Side::GatewayClient | Side::IngestClient => {
                verify_client(leaf, intermediates, roots, provider)
            }
        };
        let Err(err) = result else {
            return;
        };
        let (who, role) = match files.side {
            Side::DeviceListener => ("devices that trust only", "a TLS server"),
            Side::GatewayClient | Side::IngestClient => {
                ("a broker that trusts only", "a TLS client")
            }
        };
        let problem = match &err {
            rustls::Error::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            ) => return,
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => Problem::new(format!(
                "the certificate in {} was not issued by a CA in {ca_key} ({})",
                cert_path.display(),
                ca_path.display()
            )),
            rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. },
            ) => Problem::new(format!(
                "the certificate in {} is not valid for {role} (extended key usage)",
                cert_path.display()
            )),
            other => Problem::new(format!(
                "the certificate in {} does not verify against {ca_key}: {other}",
                cert_path.display()
            )),
        };
        let hint = format!(
            "{who} {ca_key} will refuse it; in the usual layout one CA issues both (see `blindgate certs dev`)"
        );
        self.warning(cert_key, problem.hint(hint));
    }
}

pub(super) fn verify_server(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: RootCertStore,
    provider: &CryptoProvider,
) -> Result<(), rustls::Error> {
    let parsed = rustls::server::ParsedCertificate::try_from(leaf)?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        intermediates,
        UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
}

pub(super) fn verify_client(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: RootCertStore,
    provider: Arc<CryptoProvider>,
) -> Result<(), rustls::Error> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|err| rustls::Error::General(err.to_string()))?;
    verifier
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .map(|_| ())
}

pub(super) fn parse_x509<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    match X509Certificate::from_der(der.as_ref()) {
        Ok((_, cert)) => Ok(cert),
        Err(err) => Err(err.to_string()),
    }
}

/// "the certificate (CN=gw-1)" or "certificate 2 of 3 (CN=...)".
pub(super) fn describe(cert: &X509Certificate<'_>, index: usize, count: usize) -> String {
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map_or_else(|| cert.subject().to_string(), |cn| format!("CN={cn}"));
    format!("{} ({name})", ordinal(index, count))
}

pub(super) fn ordinal(index: usize, count: usize) -> String {
    match count {
        1 => "the certificate".to_owned(),
        count => format!("certificate {} of {count}", index + 1),
    }
}

/// Why a file meant to hold certificates holds none.
pub(super) fn no_certificate_problem(
    path: &Path,
    bytes: &[u8],
    sections: &[(SectionKind, Vec<u8>)],
) -> Problem {
    let file = path.display();
    let holds_key = sections.iter().any(|(kind, _)| {
        matches!(
            kind,
            SectionKind::PrivateKey | SectionKind::EcPrivateKey | SectionKind::RsaPrivateKey
        )
    });
    if holds_key {
        return Problem::new(format!("{file} holds a private key, not a certificate"))
            .hint("are the cert and key paths swapped?");
    }
    if bytes.first() == Some(&0x30) {
        return Problem::new(format!(
            "{file} holds no PEM certificate (it looks like DER)"
        ))
        .hint("convert it: openssl x509 -inform der -in FILE -out FILE.pem");
    }
    Problem::new(format!("no certificate in {file}"))
        .hint("a PEM certificate starts with -----BEGIN CERTIFICATE-----")
}

/// `2025-03-01 12:00 UTC`.
pub(super) fn format_time(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        ),
        Err(_) => format!("{unix} (Unix time)"),
    }
}

/// "12 days", "1 day", "less than a day".
pub(super) fn days_text(seconds: i64) -> String {
    match seconds / DAY {
        0 => "less than a day".to_owned(),
        1 => "1 day".to_owned(),
        days => format!("{days} days"),
    }
}
