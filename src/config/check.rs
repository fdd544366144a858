//! `blindgate check-config`: the file, and then everything it points at.
//!
//! [`load_checked`] parses a gateway config like [`load`](super::load) and then checks
//! the environment it needs, reporting each problem as a [`Diagnostic`] at the
//! position of the key it is about:
//!
//! - every path key (`devices.ca/cert/key`, `cloud.ca/cert/key`) names a readable
//!   file (else the OS's reason);
//! - certificates parse, are valid now (error if expired or not yet valid; warning if
//!   they expire within [`EXPIRY_WARNING_DAYS`] days); a CA file holds a CA
//!   certificate (warning); a certificate file with several certificates is a chain in
//!   order (warning);
//! - `devices.cert` verifies as a TLS server certificate against `devices.ca`, and
//!   `cloud.cert` as a TLS client certificate against `cloud.ca` (warnings: devices and
//!   the broker may trust another CA, but in the documented layout the device CA
//!   issues the listener's certificate and the cloud CA the gateway's client
//!   certificate);
//! - each private key parses (an encrypted key is an error: the gateway cannot ask
//!   for a passphrase), belongs to its certificate (their public keys are compared),
//!   and is not readable by others (error) nor writable by its group or readable by a
//!   group other than `blindgate` or the caller's (warnings);
//! - the listeners can bind (`devices.listen`, `devices.plaintext_listen`,
//!   `devices.websocket_listen`, `metrics.listen`), unless [`PortCheck::Skip`] (a reload: the running gateway
//!   holds them);
//! - `gateway.data_dir` is a writable directory, or can be created (nothing is
//!   created here), and the file system holding it has room for `queue.max_bytes`
//!   plus `queue.min_free_disk` (warning: the queue also stops at the reserve at run
//!   time).
//!
//! The environment of each section that parsed is checked even if another section
//! has a mistake, so one run lists every problem.
//!
//! [`check_config_file`] also accepts a cloud ingest config (a file with a `[broker]`
//! section, see [`crate::cloud::config`]): its own loader's verdict plus the same
//! file, certificate and key checks for `broker.ca/cert/key`, the state directories,
//! the registry, the command schema (`commands.schema`, each of its problems quoted
//! with its own `file:line:column`) and `metrics.listen`. A command schema checked by
//! itself (a file with `[types...]` or `[device_types]`) gets its problems at their
//! own line and column.

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::sign::SigningKey;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::pem::{self, PemObject as _, SectionKind};
use toml::de::{DeTable, DeValue};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer as _;

use super::diagnostics::{Positions, Problem, line_column, sort};
use super::units::format_byte_size;
use super::{ConfigError, Diagnostic, KeySource, QueueSection, Sections, Severity, ValidConfig};

/// A certificate that expires within this many days gets a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// The group the packaged gateway runs as (systemd/blindgate.sysusers).
const SERVICE_GROUP: &str = "blindgate";

const DAY: i64 = 86_400;

/// Whether [`load_checked`] tries to bind the configured listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortCheck {
    /// Bind each listener address and release it at once: a port in use is an error.
    Bind,
    /// Do not bind (before a reload: the running gateway holds the ports).
    Skip,
}

/// A config that passed [`load_checked`], with what deserves attention.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The checked configuration, as [`load`](super::load) returns it.
    pub config: ValidConfig,
    /// Warnings (never errors), in file order.
    pub warnings: Vec<Diagnostic>,
}

/// Reads and parses the gateway config at `path`, then checks its environment
/// (files, certificates, keys, ports unless `ports` is [`PortCheck::Skip`], data
/// directory and disk).
///
/// # Errors
/// [`ConfigError`] if the file cannot be read ([`ConfigError::is_unreadable`]), or
/// holding every error and every warning found, in file order, if there is at least
/// one error.
pub fn load_checked(path: &Path, ports: PortCheck) -> Result<Checked, ConfigError> {
    let text = fs::read_to_string(path).map_err(|err| ConfigError::unreadable(path, err))?;
    let (config, diagnostics) = check_gateway_text(&text, path, ports);
    match config {
        Some(config) if !diagnostics.iter().any(Diagnostic::is_error) => Ok(Checked {
            config,
            warnings: diagnostics,
        }),
        _ => Err(ConfigError::found(path, diagnostics)),
    }
}

/// Which program a config file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    /// `blindgate gateway`.
    Gateway,
    /// `blindgate cloud run` (the file has a `[broker]` section).
    CloudIngest,
    /// A command schema (the file has a `[types...]` or `[device_types]` section and
    /// neither `[broker]` nor `[gateway]`).
    CommandSchema,
}

/// Everything [`check_config_file`] found.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// What the file was checked as.
    pub kind: ConfigKind,
    /// Every error and warning, in file order.
    pub diagnostics: Vec<Diagnostic>,
}

impl CheckReport {
    /// How many diagnostics are errors.
    pub fn errors(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }

    /// How many diagnostics are warnings.
    pub fn warnings(&self) -> usize {
        self.diagnostics.len() - self.errors()
    }
}

/// What `blindgate check-config` checks: a gateway config as [`load_checked`] does, or
/// a cloud ingest config (recognised by its `[broker]` section).
///
/// # Errors
/// [`ConfigError`] only if the file cannot be read; problems in it are in the report.
pub fn check_config_file(path: &Path, ports: PortCheck) -> Result<CheckReport, ConfigError> {
    let text = fs::read_to_string(path).map_err(|err| ConfigError::unreadable(path, err))?;
    let cloud = DeTable::parse(&text).ok().filter(|document| {
        document
            .get_ref()
            .iter()
            .any(|(section, _)| section.get_ref() == "broker")
    });
    let (kind, mut diagnostics) = match cloud {
        Some(document) => (
            ConfigKind::CloudIngest,
            check_cloud_ingest(&text, document.get_ref(), path, ports),
        ),
        None if is_command_schema(&text) => (ConfigKind::CommandSchema, check_schema(&text)),
        None => (
            ConfigKind::Gateway,
            check_gateway_text(&text, path, ports).1,
        ),
    };
    sort(&mut diagnostics);
    Ok(CheckReport { kind, diagnostics })
}

/// Exit status of `check-config`: no errors (warnings allowed).
pub const EXIT_OK: u8 = 0;
/// Exit status of `check-config`: errors in the file or its environment.
pub const EXIT_ERRORS: u8 = 1;
/// Exit status of `check-config`: the file cannot be read (clap uses 2 for bad usage).
pub const EXIT_UNREADABLE: u8 = 2;
/// Exit status of `blindgate gateway` when a restart would do harm (a PIN the token
/// refused: each try counts against its retry limit). 78 is `EX_CONFIG` of
/// sysexits.h; the systemd unit lists it in `RestartPreventExitStatus=`.
pub const EXIT_DO_NOT_RESTART: u8 = 78;

/// `blindgate check-config`: prints every diagnostic as
/// `file:line:column: [warning: ]key: message (hint: ...)` and a summary line on
/// stdout, and returns the exit status ([`EXIT_OK`], [`EXIT_ERRORS`],
/// [`EXIT_UNREADABLE`]; the reason for the last goes to stderr).
pub fn check_command(path: &Path, ports: PortCheck) -> u8 {
    let report = match check_config_file(path, ports) {
        Ok(report) => report,
        Err(err) => {
            eprintln!("error: {err}: {}", cause_chain(&err));
            return EXIT_UNREADABLE;
        }
    };
    let file = path.display();
    for diagnostic in &report.diagnostics {
        println!("{file}:{diagnostic}");
    }
    let (errors, warnings) = (report.errors(), report.warnings());
    let verdict = match (errors, warnings) {
        (0, 0) => "ok".to_owned(),
        (0, w) => format!("ok, {}", plural(w, "warning")),
        (e, 0) => plural(e, "error"),
        (e, w) => format!("{}, {}", plural(e, "error"), plural(w, "warning")),
    };
    let kind = match report.kind {
        ConfigKind::Gateway => "gateway config",
        ConfigKind::CloudIngest => "cloud ingest config",
        ConfigKind::CommandSchema => "command schema",
    };
    let ports_note = match ports {
        PortCheck::Bind => "",
        PortCheck::Skip => "; ports not checked (--reload)",
    };
    println!("{file}: {verdict} ({kind}{ports_note})");
    match errors {
        0 => EXIT_OK,
        _ => EXIT_ERRORS,
    }
}

fn plural(n: usize, word: &str) -> String {
    match n {
        1 => format!("1 {word}"),
        n => format!("{n} {word}s"),
    }
}

/// `": "`-joined sources of `err` (the OS reason of an unreadable file).
fn cause_chain(err: &dyn StdError) -> String {
    let mut out = String::new();
    let mut source = err.source();
    while let Some(cause) = source {
        if !out.is_empty() {
            out.push_str(": ");
        }
        let _ = write!(out, "{cause}");
        source = cause.source();
    }
    out
}

/// Parses a gateway config and checks the environment of every valid section.
fn check_gateway_text(
    text: &str,
    path: &Path,
    ports: PortCheck,
) -> (Option<ValidConfig>, Vec<Diagnostic>) {
    let located = super::parse_located(text, path);
    let mut env = Env::new(&located.positions);
    check_sections(&mut env, &located.sections, ports);
    let (config, mut diagnostics) = match located.result {
        Ok(config) => (Some(config), Vec::new()),
        Err(err) => (None, err.diagnostics),
    };
    diagnostics.extend(env.out);
    sort(&mut diagnostics);
    (config, diagnostics)
}

fn check_sections(env: &mut Env<'_>, sections: &Sections, ports: PortCheck) {
    if let Some(devices) = &sections.devices {
        let pair = TlsFiles {
            ca: ("devices.ca", &devices.ca),
            cert: ("devices.cert", &devices.cert),
            key: ("devices.key", devices.key.file()),
            side: Side::DeviceListener,
        };
        env.tls_files(&pair);
        env.token_key("devices.key", "devices.cert", &devices.key, &devices.cert);
        if ports == PortCheck::Bind {
            env.listener("devices.listen", devices.listen);
            if let Some(addr) = devices.plaintext_listen {
                env.listener("devices.plaintext_listen", addr);
            }
            if let Some(addr) = devices.websocket_listen {
                env.listener("devices.websocket_listen", addr);
            }
        }
    }
    if let Some(cloud) = &sections.cloud {
        let pair = TlsFiles {
            ca: ("cloud.ca", &cloud.ca),
            cert: ("cloud.cert", &cloud.cert),
            key: ("cloud.key", cloud.key.file()),
            side: Side::GatewayClient,
        };
        env.tls_files(&pair);
        env.token_key("cloud.key", "cloud.cert", &cloud.key, &cloud.cert);
    }
    if let (Some(metrics), PortCheck::Bind) = (&sections.metrics, ports)
        && let Some(addr) = metrics.listen
    {
        env.listener("metrics.listen", addr);
    }
    if let Some(gateway) = &sections.gateway
        && let Some(existing) = env.state_dir("gateway.data_dir", &gateway.data_dir)
        && let Some(queue) = &sections.queue
    {
        env.queue_fits(&gateway.data_dir, &existing, queue);
    }
}

/// Which TLS role a certificate plays, for the issuer check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The device listener's server certificate, checked against the device CA.
    DeviceListener,
    /// The gateway's uplink client certificate, checked against the cloud CA.
    GatewayClient,
    /// The cloud ingest's client certificate, checked against the cloud CA.
    IngestClient,
}

/// A CA file, a certificate chain and its key, each with its key in the file.
struct TlsFiles<'a> {
    ca: (&'a str, &'a Path),
    cert: (&'a str, &'a Path),
    /// `None`: the key is in a PKCS#11 token (checked by `check_pkcs11`).
    key: (&'a str, Option<&'a Path>),
    side: Side,
}

/// Certificates read from one file.
struct Certs {
    ders: Vec<CertificateDer<'static>>,
    /// False if a certificate is expired or not yet valid (reported already).
    in_time: bool,
}

/// Collects the diagnostics of the environment checks.
struct Env<'p> {
    positions: &'p Positions,
    out: Vec<Diagnostic>,
    /// Seconds since the Unix epoch.
    now: i64,
}

impl<'p> Env<'p> {
    fn new(positions: &'p Positions) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Self {
            positions,
            out: Vec::new(),
            now,
        }
    }

    fn report(&mut self, key: &str, severity: Severity, problem: Problem) {
        let (line, column) = self.positions.of(key);
        self.out.push(Diagnostic {
            line,
            column,
            key: key.to_owned(),
            message: problem.message,
            hint: problem.hint,
            severity,
            restarting_is_harmful: problem.restarting_is_harmful,
        });
    }

    fn error(&mut self, key: &str, problem: Problem) {
        self.report(key, Severity::Error, problem);
    }

    fn warning(&mut self, key: &str, problem: Problem) {
        self.report(key, Severity::Warning, problem);
    }

    /// True if the parser already reported `key` (its value is not usable).
    fn skip(&self, key: &str) -> bool {
        self.positions.is_reported(key)
    }

    /// Reads a file a path key names; a failure is reported with the OS's reason.
    fn read(&mut self, key: &str, path: &Path) -> Option<Vec<u8>> {
        match fs::read(path) {
            Ok(bytes) => Some(bytes),
            Err(err) => {
                let problem = Problem::new(format!("cannot read {}: {err}", path.display()));
                self.error(key, unreadable_hint(problem, &err));
                None
            }
        }
    }

    /// A key in a PKCS#11 token: opened and checked against the certificate, as at
    /// start (nothing for a key file).
    fn token_key(&mut self, key_key: &str, cert_key: &str, key: &KeySource, cert: &Path) {
        if let KeySource::Pkcs11(token_key) = key
            && !self.skip(key_key)
            && !self.skip(cert_key)
            && let Some(problem) = super::check_pkcs11::token_key_problem(token_key, cert)
        {
            self.error(key_key, problem);
        }
    }

    /// The CA, certificate and key checks of one TLS identity.
    fn tls_files(&mut self, files: &TlsFiles<'_>) {
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
    fn certificates(&mut self, key: &str, path: &Path, is_ca: bool) -> Option<Certs> {
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
    fn validity(
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
    fn ca_file(
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
    fn chain_order(&mut self, key: &str, path: &Path, certs: &[X509Certificate<'_>]) {
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
    fn private_key(&mut self, key: &str, path: &Path) -> Option<Arc<dyn SigningKey>> {
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
    fn key_mode(&mut self, key: &str, path: &Path) {
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
    fn key_matches(
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
    fn issued_by(&mut self, files: &TlsFiles<'_>, chain: &Certs, ca: &Certs) {
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

    /// Binds `addr` and releases it at once.
    fn listener(&mut self, key: &str, addr: SocketAddr) {
        if self.skip(key) {
            return;
        }
        let Err(err) = TcpListener::bind(addr) else {
            return;
        };
        let problem = Problem::new(format!("cannot listen on {addr}: {err}"));
        let problem = match err.kind() {
            io::ErrorKind::AddrInUse => problem.hint(format!(
                "another process listens on port {} (`ss -ltnp 'sport = :{}'` names it); before a reload of the running gateway use --reload",
                addr.port(),
                addr.port()
            )),
            io::ErrorKind::AddrNotAvailable => problem.hint(format!(
                "{} is not an address of this machine (`ip -brief address`)",
                addr.ip()
            )),
            io::ErrorKind::PermissionDenied => problem
                .hint("ports below 1024 need privileges the gateway does not have: use e.g. 8883"),
            _ => problem,
        };
        self.error(key, problem);
    }

    /// A directory the program creates when missing: it is a writable directory, or
    /// its nearest existing ancestor is (nothing is created here). Returns the
    /// existing path that will hold it, for the disk check.
    fn state_dir(&mut self, key: &str, dir: &Path) -> Option<PathBuf> {
        if self.skip(key) {
            return None;
        }
        let shown = dir.display();
        let install = format!("install -d -o blindgate -g blindgate -m 0700 {shown}");
        match fs::metadata(dir) {
            Ok(meta) if !meta.is_dir() => {
                let problem = Problem::new(format!("{shown} exists and is not a directory"));
                self.error(key, problem);
                None
            }
            Ok(_) => match writable(dir) {
                Ok(()) => Some(dir.to_owned()),
                Err(err) => {
                    let problem = Problem::new(format!("{shown} is not writable: {err}"))
                        .hint(format!("the gateway's user must own it: {install}"));
                    self.error(key, problem);
                    None
                }
            },
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                let ancestor = dir.ancestors().skip(1).find(|p| p.exists())?;
                let above = ancestor.display();
                if !ancestor.is_dir() {
                    let problem = Problem::new(format!(
                        "{shown} cannot be created: {above} is not a directory"
                    ));
                    self.error(key, problem);
                    return None;
                }
                match writable(ancestor) {
                    Ok(()) => Some(ancestor.to_owned()),
                    Err(err) => {
                        let problem = Problem::new(format!(
                            "{shown} does not exist and cannot be created: {above} is not writable ({err})"
                        ))
                        .hint(format!("create it: {install}"));
                        self.error(key, problem);
                        None
                    }
                }
            }
            Err(err) => {
                let problem = Problem::new(format!("cannot inspect {shown}: {err}"));
                self.error(key, problem);
                None
            }
        }
    }

    /// Warns if the queue at its cap plus the free-disk reserve does not fit the file
    /// system that holds (or will hold) `data_dir` today.
    fn queue_fits(&mut self, data_dir: &Path, existing: &Path, queue: &QueueSection) {
        let key = "queue.max_bytes";
        if self.skip(key) || self.skip("queue.min_free_disk") {
            return;
        }
        let Ok(stat) = rustix::fs::statvfs(existing) else {
            return;
        };
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        let used = disk_usage(&data_dir.join("queue"));
        let needed = queue.max_bytes.saturating_add(queue.min_free_disk);
        if needed <= free.saturating_add(used) {
            return;
        }
        let already = match used {
            0 => String::new(),
            used => format!(", besides the {} the queue already uses", approx_size(used)),
        };
        let problem = Problem::new(format!(
            "max_bytes {} plus min_free_disk {} do not fit: the file system holding {} has {} free{already}",
            format_byte_size(queue.max_bytes),
            format_byte_size(queue.min_free_disk),
            data_dir.display(),
            approx_size(free),
        ))
        .hint("the queue will refuse new messages before max_bytes (at the min_free_disk reserve); lower max_bytes or give data_dir a larger file system");
        self.warning(key, problem);
    }
}

fn verify_server(
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

fn verify_client(
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

fn parse_x509<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    match X509Certificate::from_der(der.as_ref()) {
        Ok((_, cert)) => Ok(cert),
        Err(err) => Err(err.to_string()),
    }
}

/// "the certificate (CN=gw-1)" or "certificate 2 of 3 (CN=...)".
fn describe(cert: &X509Certificate<'_>, index: usize, count: usize) -> String {
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map_or_else(|| cert.subject().to_string(), |cn| format!("CN={cn}"));
    format!("{} ({name})", ordinal(index, count))
}

fn ordinal(index: usize, count: usize) -> String {
    match count {
        1 => "the certificate".to_owned(),
        count => format!("certificate {} of {count}", index + 1),
    }
}

/// Why a file meant to hold certificates holds none.
fn no_certificate_problem(
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

/// Adds what to do about a file that cannot be read.
fn unreadable_hint(problem: Problem, err: &io::Error) -> Problem {
    match err.kind() {
        io::ErrorKind::NotFound => problem.hint(
            "put the file there or correct the path (a relative path starts at the config file's directory)",
        ),
        io::ErrorKind::PermissionDenied => problem.hint(format!(
            "the gateway's user must be able to read it: chgrp {SERVICE_GROUP} and chmod 0640 (and the directories must be searchable)"
        )),
        _ => problem,
    }
}

/// `access(W_OK | X_OK)` for the calling user (a reload runs as the service's user).
fn writable(dir: &Path) -> io::Result<()> {
    use rustix::fs::{Access, access};
    access(dir, Access::WRITE_OK | Access::EXEC_OK).map_err(io::Error::from)
}

/// Whether group read on a key file is for the service's group (or the caller's).
fn group_may_read(gid: u32) -> bool {
    gid == rustix::process::getegid().as_raw()
        || group_name(gid).is_some_and(|name| name == SERVICE_GROUP)
}

/// The name of group `gid` from /etc/group, if listed there.
fn group_name(gid: u32) -> Option<String> {
    let groups = fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?;
        (id.parse::<u32>().ok()? == gid).then(|| name.to_owned())
    })
}

/// Disk blocks used by the files under `path` (0 if it does not exist).
fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks().saturating_mul(512);
    if !meta.is_dir() {
        return own;
    }
    let entries = fs::read_dir(path).into_iter().flatten().flatten();
    entries.fold(own, |sum, entry| {
        sum.saturating_add(disk_usage(&entry.path()))
    })
}

/// "1.4GiB", "312MiB", "20KiB", "512B": an approximate size for messages.
fn approx_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (unit, name) in UNITS {
        if bytes >= unit {
            let tenths = bytes.saturating_mul(10) / unit;
            return match tenths {
                t if t >= 100 => format!("{}{name}", t / 10),
                t => format!("{}.{}{name}", t / 10, t % 10),
            };
        }
    }
    format!("{bytes}B")
}

/// `2025-03-01 12:00 UTC`.
fn format_time(unix: i64) -> String {
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
fn days_text(seconds: i64) -> String {
    match seconds / DAY {
        0 => "less than a day".to_owned(),
        1 => "1 day".to_owned(),
        days => format!("{days} days"),
    }
}

// The cloud ingest's config.

/// Checks a cloud ingest config: its loader's verdict, then the files, directories
/// and listener its keys name.
fn check_cloud_ingest(
    text: &str,
    document: &DeTable<'_>,
    path: &Path,
    ports: PortCheck,
) -> Vec<Diagnostic> {
    let base = path.parent().unwrap_or(Path::new(""));
    let mut positions = Positions::default();
    let mut values: Vec<(String, String)> = Vec::new();
    for (section, value) in document {
        let section_name = section.get_ref().to_string();
        let (line, column) = line_column(text, section.span().start);
        positions.insert(&section_name, line, column);
        let DeValue::Table(entries) = value.get_ref() else {
            continue;
        };
        for (key, value) in entries {
            let full = format!("{section_name}.{}", key.get_ref());
            let (line, column) = line_column(text, value.span().start);
            positions.insert(&full, line, column);
            if let DeValue::String(string) = value.get_ref() {
                values.push((full, string.to_string()));
            }
        }
    }
    let value = |key: &str| {
        values
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let at = |key: &str| value(key).map(|v| base.join(v));
    let mut env = Env::new(&positions);

    if let (Some(ca), Some(cert), Some(key)) =
        (at("broker.ca"), at("broker.cert"), at("broker.key"))
    {
        env.tls_files(&TlsFiles {
            ca: ("broker.ca", &ca),
            cert: ("broker.cert", &cert),
            key: ("broker.key", Some(&key)),
            side: Side::IngestClient,
        });
    }
    for key in ["broker.up_topic", "broker.down_topic"] {
        if let Some(template) = value(key)
            && let Err(err) = crate::topics::GatewayTemplate::new(template)
        {
            env.error(key, Problem::new(format!("invalid topic template: {err}")));
        }
    }
    let postgres = value("sink.postgres").is_some();
    let mut dirs = vec!["store.keys_dir", "sink.images_dir"];
    if !postgres {
        dirs.push("store.state_dir");
    }
    for key in dirs {
        if let Some(dir) = at(key) {
            env.state_dir(key, &dir);
        }
    }
    if let Some(keys_dir) = at("store.keys_dir") {
        env.secret_dir("store.keys_dir", &keys_dir);
    }
    if !postgres && let Some(jsonl) = at("sink.jsonl") {
        env.output_file("sink.jsonl", &jsonl);
    }
    if let Some(registry) = at("store.registry")
        && env.read("store.registry", &registry).is_some()
        && let Err(err) = crate::cloud::registry::Registry::load(&registry)
    {
        let problem = Problem::new(format!("{err}: {}", cause_chain(&err)));
        env.error("store.registry", problem);
    }
    if let Some(schema) = at("commands.schema")
        && let Some(bytes) = env.read("commands.schema", &schema)
    {
        env.command_schema("commands.schema", &schema, &bytes);
    }
    if ports == PortCheck::Bind
        && let Some(listen) = value("metrics.listen")
    {
        match listen.parse::<SocketAddr>() {
            Ok(addr) => env.listener("metrics.listen", addr),
            Err(_) => env.error(
                "metrics.listen",
                Problem::new(format!("`{listen}` is not an IP address and port"))
                    .hint(r#"write e.g. "127.0.0.1:9465""#),
            ),
        }
    }
    let found_errors = env.out.iter().any(Diagnostic::is_error);
    let mut diagnostics = env.out;
    if let Err(err) = crate::cloud::config::load(path)
        && let Some(diagnostic) = loader_diagnostic(&err, &positions, found_errors)
    {
        diagnostics.push(diagnostic);
    }
    diagnostics
}

impl Env<'_> {
    /// Each problem of the command schema `file` (read into `text`) as an error at
    /// `key`, quoting the schema's own `file:line:column`.
    fn command_schema(&mut self, key: &str, file: &Path, bytes: &[u8]) {
        let Ok(text) = std::str::from_utf8(bytes) else {
            let problem = Problem::new(format!("{} is not UTF-8 text", file.display()));
            self.error(key, problem);
            return;
        };
        if let Err(problems) = crate::commands::Schema::parse(text) {
            for problem in problems {
                let message = format!("{}:{problem}", file.display());
                self.error(key, Problem::new(message).hint("docs/COMMANDS.md"));
            }
        }
    }

    /// The key store is a secret: nobody but its owner may enter it.
    fn secret_dir(&mut self, key: &str, dir: &Path) {
        let Ok(meta) = fs::metadata(dir) else {
            return;
        };
        let mode = meta.mode() & 0o777;
        if meta.is_dir() && mode & 0o077 != 0 {
            let problem = Problem::new(format!(
                "{} holds device keys and is accessible by group or others (mode {mode:04o})",
                dir.display()
            ))
            .hint("chmod 0700 it");
            self.warning(key, problem);
        }
    }

    /// A file the program appends to: writable if it exists, else creatable.
    fn output_file(&mut self, key: &str, file: &Path) {
        match fs::metadata(file) {
            Ok(meta) if meta.is_dir() => {
                let problem =
                    Problem::new(format!("{} is a directory", file.display())).hint("name a file");
                self.error(key, problem);
            }
            Ok(_) => {
                if let Err(err) = fs::OpenOptions::new().append(true).open(file) {
                    let problem = Problem::new(format!("cannot write {}: {err}", file.display()));
                    self.error(key, problem);
                }
            }
            Err(_) => {
                if let Some(parent) = file.parent() {
                    self.state_dir(key, parent);
                }
            }
        }
    }
}

/// A command schema file: top-level `types` or `device_types`, and no `gateway`.
fn is_command_schema(text: &str) -> bool {
    DeTable::parse(text).is_ok_and(|document| {
        let has = |name: &str| {
            document
                .get_ref()
                .iter()
                .any(|(section, _)| section.get_ref() == name)
        };
        (has("types") || has("device_types")) && !has("gateway")
    })
}

/// Every problem of a command schema, at its own line and column.
fn check_schema(text: &str) -> Vec<Diagnostic> {
    let Err(problems) = crate::commands::Schema::parse(text) else {
        return Vec::new();
    };
    problems
        .into_iter()
        .map(|problem| Diagnostic {
            line: problem.line,
            column: problem.column,
            key: problem.key,
            message: problem.message,
            hint: None,
            severity: Severity::Error,
            restarting_is_harmful: false,
        })
        .collect()
}

/// The cloud loader's own complaint, unless the checks above already explain it.
fn loader_diagnostic(
    err: &crate::cloud::config::CloudConfigError,
    positions: &Positions,
    found_errors: bool,
) -> Option<Diagnostic> {
    use crate::cloud::config::CloudConfigError as E;
    let diagnostic = |key: &str, message: String, hint: Option<&str>| {
        let (line, column) = positions.of(key);
        Diagnostic {
            line,
            column,
            key: key.to_owned(),
            message,
            hint: hint.map(str::to_owned),
            severity: Severity::Error,
            restarting_is_harmful: false,
        }
    };
    match err {
        E::Parse { message, .. } => Some(toml_message(message)),
        E::Url { .. } => Some(diagnostic(
            "broker.url",
            "must look like mqtts://host:port".into(),
            Some(r#"e.g. "mqtts://cloud.example.com:8883""#),
        )),
        // Reported per template above.
        E::Topic { .. } => None,
        // The file checks above say which file and why; otherwise show rustls's word.
        E::Tls { source, .. } if !found_errors => Some(diagnostic(
            "broker.cert",
            format!("{source}: {}", cause_chain(source.as_ref())),
            None,
        )),
        E::Tls { .. } | E::Registry { .. } | E::Commands { .. } => None,
        other => Some(diagnostic(
            "",
            format!("{other}: {}", cause_chain(other)),
            None,
        )),
    }
}

/// A toml error's text (`TOML parse error at line L, column C`, a source excerpt,
/// then the message) as a diagnostic at that position.
fn toml_message(text: &str) -> Diagnostic {
    let mut lines = text.lines();
    let position = lines
        .next()
        .and_then(|first| first.strip_prefix("TOML parse error at line "))
        .and_then(|rest| rest.split_once(", column "))
        .and_then(|(line, column)| Some((line.parse().ok()?, column.trim().parse().ok()?)));
    let message = match position {
        // Skip the excerpt: the lines up to the caret line.
        Some(_) => text
            .lines()
            .skip_while(|line| !line.contains('^'))
            .skip(1)
            .filter(|line| !line.trim().is_empty())
            .collect::<Vec<_>>()
            .join(" "),
        None => text.lines().collect::<Vec<_>>().join(" "),
    };
    let (line, column) = position.unwrap_or((1, 1));
    Diagnostic {
        line,
        column,
        key: String::new(),
        message,
        hint: None,
        severity: Severity::Error,
        restarting_is_harmful: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_times_are_written_for_people() {
        assert_eq!(approx_size(512), "512B");
        assert_eq!(approx_size(1536), "1.5KiB");
        assert_eq!(approx_size(300 << 20), "300MiB");
        assert_eq!(approx_size((3 << 30) + (1 << 29)), "3.5GiB");
        assert_eq!(format_time(0), "1970-01-01 00:00 UTC");
        assert_eq!(days_text(3 * DAY + 5), "3 days");
        assert_eq!(days_text(DAY), "1 day");
        assert_eq!(days_text(60), "less than a day");
    }

    #[test]
    fn a_toml_error_keeps_its_position_and_message() {
        let err = toml::from_str::<toml::Table>("a = 1\nb = \n").expect_err("syntax error");
        let diagnostic = toml_message(&err.to_string());
        assert_eq!((diagnostic.line, diagnostic.column), (2, 5));
        assert!(!diagnostic.message.is_empty());
        assert!(!diagnostic.message.contains('^'), "{}", diagnostic.message);
    }
}
