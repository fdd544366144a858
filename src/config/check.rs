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
//!
//! Submodules: `tls` (certificates and keys), `host` (ports, data directory, disk),
//! `cloud` (the cloud ingest's config and command schemas).

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

mod cloud;
mod host;
mod tls;

use cloud::*;
use host::*;
use tls::*;

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

/// Collects the diagnostics of the environment checks (its methods are in `tls`,
/// `host` and `cloud`).
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
