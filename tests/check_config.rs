//! `check-config` beyond the file: missing files, broken and expired certificates,
//! keys of other certificates, key file modes, ports in use, the data directory and
//! the disk; with real files (dev PKI, rcgen), real sockets and the real binary for
//! the output and the exit codes.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use blindgate::config::{self, Diagnostic, PortCheck, Severity};
use blindgate::pki::{DevPki, DevPkiOptions, LabConfigs, generate_dev_pki};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use time::{Duration, OffsetDateTime};

/// A dev PKI in a temporary directory and a gateway config pointing at it; each field
/// is a value of the config and may be changed before [`Setup::write`].
struct Setup {
    dir: tempfile::TempDir,
    pki: DevPki,
    data_dir: String,
    listen: String,
    dca: String,
    dcert: String,
    dkey: String,
    cca: String,
    ccert: String,
    ckey: String,
    metrics: String,
    queue: String,
}

// Where the values are in the file `Setup::write` produces: (line, column).
const DATA_DIR: (usize, usize) = (3, 12);
const DEVICES_LISTEN: (usize, usize) = (6, 10);
const DEVICES_CA: (usize, usize) = (7, 6);
const DEVICES_CERT: (usize, usize) = (8, 8);
const DEVICES_KEY: (usize, usize) = (9, 7);
const CLOUD_CA: (usize, usize) = (13, 6);
const CLOUD_CERT: (usize, usize) = (14, 8);
const CLOUD_KEY: (usize, usize) = (15, 7);
const METRICS_LISTEN: (usize, usize) = (18, 10);
const MAX_BYTES: (usize, usize) = (21, 13);

fn p(path: &Path) -> String {
    path.display().to_string()
}

impl Setup {
    fn new() -> Self {
        Self::with_validity(365)
    }

    fn with_validity(days: u32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = generate_dev_pki(&DevPkiOptions {
            out_dir: dir.path().join("pki"),
            devices: vec!["pump-17".into()],
            validity_days: days,
            ..DevPkiOptions::default()
        })
        .expect("dev PKI");
        Self {
            data_dir: p(&dir.path().join("data")),
            listen: "127.0.0.1:0".into(),
            dca: p(&pki.device_ca.cert),
            dcert: p(&pki.gateway_devices.cert),
            dkey: p(&pki.gateway_devices.key),
            cca: p(&pki.cloud_ca.cert),
            ccert: p(&pki.gateway_client.cert),
            ckey: p(&pki.gateway_client.key),
            metrics: "127.0.0.1:0".into(),
            queue: "max_bytes = \"64MiB\"\nmin_free_disk = \"1MiB\"".into(),
            dir,
            pki,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self) -> PathBuf {
        let text = format!(
            r#"[gateway]
id = "gw-1"
data_dir = "{}"

[devices]
listen = "{}"
ca = "{}"
cert = "{}"
key = "{}"

[cloud]
endpoints = ["mqtts://localhost:8884"]
ca = "{}"
cert = "{}"
key = "{}"

[metrics]
listen = "{}"

[queue]
{}
"#,
            self.data_dir,
            self.listen,
            self.dca,
            self.dcert,
            self.dkey,
            self.cca,
            self.ccert,
            self.ckey,
            self.metrics,
            self.queue
        );
        let path = self.path("gateway.toml");
        fs::write(&path, text).expect("write config");
        path
    }

    /// Every diagnostic of the config as written now (ports bound).
    fn diagnostics(&self) -> Vec<Diagnostic> {
        let path = self.write();
        config::check_config_file(&path, PortCheck::Bind)
            .expect("the config is readable")
            .diagnostics
    }
}

/// (line, column, key, severity) of each diagnostic.
fn places(diagnostics: &[Diagnostic]) -> Vec<(usize, usize, String, Severity)> {
    diagnostics
        .iter()
        .map(|d| (d.line, d.column, d.key.clone(), d.severity))
        .collect()
}

fn error_at(at: (usize, usize), key: &str) -> (usize, usize, String, Severity) {
    (at.0, at.1, key.to_owned(), Severity::Error)
}

fn warning_at(at: (usize, usize), key: &str) -> (usize, usize, String, Severity) {
    (at.0, at.1, key.to_owned(), Severity::Warning)
}

/// The only diagnostic, which must be at `expected`; returns its message.
fn only(diagnostics: &[Diagnostic], expected: (usize, usize, String, Severity)) -> String {
    assert_eq!(places(diagnostics), [expected], "{diagnostics:#?}");
    diagnostics[0].message.clone()
}

fn write_private(path: &Path, text: &str) {
    fs::write(path, text).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// A self-signed certificate for `gw-1` valid from `from` to `until` days from now,
/// and its key; returns the paths.
fn self_signed(dir: &Path, stem: &str, from: i64, until: i64) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::new(vec!["gw-1".to_owned()]).expect("params");
    let now = OffsetDateTime::now_utc();
    params.not_before = now + Duration::days(from);
    params.not_after = now + Duration::days(until);
    let cert = params.self_signed(&key).expect("self-signed");
    let (cert_path, key_path) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    fs::write(&cert_path, cert.pem()).expect("write cert");
    write_private(&key_path, &key.serialize_pem());
    (cert_path, key_path)
}

fn blindgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blindgate"))
        .args(args)
        .output()
        .expect("run blindgate")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn a_config_with_a_good_environment_has_no_diagnostics() {
    let setup = Setup::new();
    assert_eq!(setup.diagnostics(), []);
    let checked = config::load_checked(&setup.write(), PortCheck::Bind).expect("passes");
    assert!(checked.warnings.is_empty());
    assert_eq!(checked.config.gateway.id, "gw-1");
    assert!(
        !setup.path("data").exists(),
        "check-config does not create data_dir"
    );
}

#[test]
fn a_missing_file_is_an_error_at_its_key_with_the_os_reason() {
    let mut setup = Setup::new();
    setup.dca = p(&setup.path("nowhere/device-ca.pem"));
    let message = only(&setup.diagnostics(), error_at(DEVICES_CA, "devices.ca"));
    assert!(message.contains("nowhere/device-ca.pem"), "{message}");
    assert!(message.contains("No such file or directory"), "{message}");
}

#[test]
fn a_directory_instead_of_a_file_is_an_error_with_the_os_reason() {
    let mut setup = Setup::new();
    setup.cca = p(setup.dir.path());
    let message = only(&setup.diagnostics(), error_at(CLOUD_CA, "cloud.ca"));
    assert!(message.contains("Is a directory"), "{message}");
}

#[test]
fn a_certificate_that_does_not_parse_is_an_error() {
    let mut setup = Setup::new();
    let garbage = setup.path("garbage.pem");
    fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    setup.ccert = p(&garbage);
    let diagnostics = setup.diagnostics();
    let message = only(&diagnostics, error_at(CLOUD_CERT, "cloud.cert"));
    assert!(
        message.contains("is not a valid X.509 certificate"),
        "{message}"
    );

    let text = setup.path("text.pem");
    fs::write(&text, "hello\n").expect("write");
    setup.ccert = p(&text);
    let message = only(&setup.diagnostics(), error_at(CLOUD_CERT, "cloud.cert"));
    assert!(message.starts_with("no certificate in"), "{message}");
}

#[test]
fn a_key_file_given_as_certificate_is_named_as_such() {
    let mut setup = Setup::new();
    setup.dcert = setup.dkey.clone();
    let diagnostics = setup.diagnostics();
    let message = only(&diagnostics, error_at(DEVICES_CERT, "devices.cert"));
    assert!(message.contains("holds a private key"), "{message}");
    assert_eq!(
        diagnostics[0].hint.as_deref(),
        Some("are the cert and key paths swapped?")
    );
}

#[test]
fn an_expired_certificate_is_an_error_with_its_date() {
    let mut setup = Setup::new();
    let (cert, key) = self_signed(setup.dir.path(), "expired", -400, -35);
    setup.dcert = p(&cert);
    setup.dkey = p(&key);
    let message = only(&setup.diagnostics(), error_at(DEVICES_CERT, "devices.cert"));
    assert!(message.contains("expired on"), "{message}");
    assert!(message.contains("(35 days ago)"), "{message}");
}

#[test]
fn a_certificate_not_yet_valid_is_an_error() {
    let mut setup = Setup::new();
    let (cert, key) = self_signed(setup.dir.path(), "future", 3, 300);
    setup.ccert = p(&cert);
    setup.ckey = p(&key);
    let message = only(&setup.diagnostics(), error_at(CLOUD_CERT, "cloud.cert"));
    assert!(message.contains("is not valid before"), "{message}");
}

#[test]
fn certificates_expiring_within_30_days_are_warnings_with_days_left() {
    let setup = Setup::with_validity(10);
    let diagnostics = setup.diagnostics();
    assert_eq!(
        places(&diagnostics),
        [
            warning_at(DEVICES_CA, "devices.ca"),
            warning_at(DEVICES_CERT, "devices.cert"),
            warning_at(CLOUD_CA, "cloud.ca"),
            warning_at(CLOUD_CERT, "cloud.cert"),
        ]
    );
    for diagnostic in &diagnostics {
        assert!(
            diagnostic.message.contains("expires on")
                && (diagnostic.message.contains("in 9 days")
                    || diagnostic.message.contains("in 10 days")),
            "{}",
            diagnostic.message
        );
    }
    let checked = config::load_checked(&setup.write(), PortCheck::Bind).expect("only warnings");
    assert_eq!(checked.warnings, diagnostics);
}

#[test]
fn a_key_of_another_certificate_is_an_error_at_the_key() {
    let mut setup = Setup::new();
    setup.dkey = p(&setup.pki.gateway_client.key);
    let diagnostics = setup.diagnostics();
    let message = only(&diagnostics, error_at(DEVICES_KEY, "devices.key"));
    assert!(message.contains("is not the private key of the certificate in"));
    assert!(message.contains("their public keys differ"), "{message}");
}

#[test]
fn a_key_readable_by_others_is_an_error_and_by_a_foreign_group_a_warning() {
    let setup = Setup::new();
    let key = setup.pki.gateway_client.key.clone();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
    let message = only(&setup.diagnostics(), error_at(CLOUD_KEY, "cloud.key"));
    assert!(
        message.contains("accessible by every user (mode 0644)"),
        "{message}"
    );

    fs::set_permissions(&key, fs::Permissions::from_mode(0o660)).expect("chmod");
    let message = only(&setup.diagnostics(), warning_at(CLOUD_KEY, "cloud.key"));
    assert!(message.contains("writable by its group"), "{message}");

    // Group read for a group that is neither blindgate nor the caller's: only root
    // can give a file away to such a group.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).expect("chmod");
    if std::os::unix::fs::chown(&key, None, Some(54_321)).is_ok() {
        let message = only(&setup.diagnostics(), warning_at(CLOUD_KEY, "cloud.key"));
        assert!(message.contains("readable by group 54321"), "{message}");
    }
}

#[test]
fn an_encrypted_key_is_an_error() {
    let mut setup = Setup::new();
    let encrypted = setup.path("encrypted.key");
    write_private(
        &encrypted,
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAh3\n-----END ENCRYPTED PRIVATE KEY-----\n",
    );
    setup.ckey = p(&encrypted);
    let message = only(&setup.diagnostics(), error_at(CLOUD_KEY, "cloud.key"));
    assert!(message.contains("encrypted with a passphrase"), "{message}");
}

#[test]
fn a_ca_file_without_a_ca_certificate_is_a_warning() {
    let mut setup = Setup::new();
    // The listener's own certificate as "CA": not a CA, and it did not issue itself.
    setup.dca = setup.dcert.clone();
    let diagnostics = setup.diagnostics();
    assert_eq!(
        places(&diagnostics),
        [
            warning_at(DEVICES_CA, "devices.ca"),
            warning_at(DEVICES_CERT, "devices.cert"),
        ]
    );
    assert!(
        diagnostics[0].message.contains("holds no CA certificate"),
        "{}",
        diagnostics[0].message
    );
}

#[test]
fn a_certificate_not_issued_by_the_configured_ca_is_a_warning() {
    let mut setup = Setup::new();
    std::mem::swap(&mut setup.dca, &mut setup.cca);
    let diagnostics = setup.diagnostics();
    assert_eq!(
        places(&diagnostics),
        [
            warning_at(DEVICES_CERT, "devices.cert"),
            warning_at(CLOUD_CERT, "cloud.cert"),
        ]
    );
    assert!(
        diagnostics[0]
            .message
            .contains("was not issued by a CA in devices.ca"),
        "{}",
        diagnostics[0].message
    );
    assert!(
        diagnostics[1]
            .message
            .contains("was not issued by a CA in cloud.ca"),
        "{}",
        diagnostics[1].message
    );
}

#[test]
fn ports_in_use_are_errors_unless_reloading() {
    let devices = TcpListener::bind("127.0.0.1:0").expect("bind");
    let metrics = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut setup = Setup::new();
    setup.listen = devices.local_addr().expect("addr").to_string();
    setup.metrics = metrics.local_addr().expect("addr").to_string();
    let diagnostics = setup.diagnostics();
    assert_eq!(
        places(&diagnostics),
        [
            error_at(DEVICES_LISTEN, "devices.listen"),
            error_at(METRICS_LISTEN, "metrics.listen"),
        ]
    );
    assert!(
        diagnostics[0].message.contains("Address already in use"),
        "{}",
        diagnostics[0].message
    );

    let path = setup.write();
    let output = blindgate(&["check-config", "--reload", &p(&path)]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    assert_eq!(
        stdout(&output),
        format!(
            "{}: ok (gateway config; ports not checked (--reload))\n",
            path.display()
        )
    );
    let checked = config::load_checked(&path, PortCheck::Skip).expect("ports skipped");
    assert!(checked.warnings.is_empty());
}

#[test]
fn a_data_dir_that_cannot_be_a_directory_is_an_error() {
    let mut setup = Setup::new();
    let file = setup.path("a-file");
    fs::write(&file, "").expect("write");
    setup.data_dir = p(&file);
    let message = only(&setup.diagnostics(), error_at(DATA_DIR, "gateway.data_dir"));
    assert!(
        message.contains("exists and is not a directory"),
        "{message}"
    );

    setup.data_dir = p(&file.join("data"));
    let message = only(&setup.diagnostics(), error_at(DATA_DIR, "gateway.data_dir"));
    assert!(message.contains("is not a directory"), "{message}");

    setup.data_dir = p(&setup.path("one/two/three"));
    assert_eq!(setup.diagnostics(), [], "a creatable data_dir is fine");
    assert!(!setup.path("one").exists(), "nothing created");
}

#[test]
fn a_queue_larger_than_the_disk_is_a_warning() {
    let mut setup = Setup::new();
    setup.queue = "max_bytes = \"1000000TiB\"\nmin_free_disk = \"1MiB\"".into();
    let message = only(
        &setup.diagnostics(),
        warning_at(MAX_BYTES, "queue.max_bytes"),
    );
    assert!(message.contains("do not fit"), "{message}");
    assert!(message.contains("free"), "{message}");
}

#[test]
fn every_problem_of_a_file_is_reported_at_once() {
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut setup = Setup::new();
    setup.dca = p(&setup.path("missing-ca.pem"));
    setup.ckey = p(&setup.pki.gateway_devices.key);
    setup.metrics = busy.local_addr().expect("addr").to_string();
    // A mistake in the file itself, in another section.
    setup.queue = "max_byte = \"64MiB\"".into();
    let diagnostics = setup.diagnostics();
    assert_eq!(
        places(&diagnostics),
        [
            error_at(DEVICES_CA, "devices.ca"),
            error_at(CLOUD_KEY, "cloud.key"),
            error_at(METRICS_LISTEN, "metrics.listen"),
            error_at((21, 1), "queue.max_byte"),
        ]
    );
    let err = config::load_checked(&setup.write(), PortCheck::Bind).expect_err("errors");
    assert_eq!(err.diagnostics, diagnostics);
    assert_eq!(err.errors(), 4);
}

#[test]
fn the_binary_prints_positions_and_a_summary_and_exits_0_1_or_2() {
    let mut setup = Setup::new();
    let path = setup.write();
    let ok = blindgate(&["check-config", &p(&path)]);
    assert_eq!(ok.status.code(), Some(0));
    assert_eq!(
        stdout(&ok),
        format!("{}: ok (gateway config)\n", path.display())
    );

    setup.dkey = p(&setup.pki.gateway_client.key);
    let path = setup.write();
    let bad = blindgate(&["check-config", &p(&path)]);
    assert_eq!(bad.status.code(), Some(1));
    let printed = stdout(&bad);
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 2, "{printed}");
    let prefix = format!("{}:9:7: devices.key: ", path.display());
    assert!(lines[0].starts_with(&prefix), "{printed}");
    assert!(lines[0].contains("(hint: "), "{printed}");
    assert_eq!(
        lines[1],
        format!("{}: 1 error (gateway config)", path.display())
    );
    assert!(
        bad.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    let warned = Setup::with_validity(10);
    let path = warned.write();
    let output = blindgate(&["check-config", &p(&path)]);
    assert_eq!(output.status.code(), Some(0), "warnings do not fail");
    let printed = stdout(&output);
    assert!(
        printed.contains(&format!("{}:7:6: warning: devices.ca: ", path.display())),
        "{printed}"
    );
    assert!(
        printed.ends_with("ok, 4 warnings (gateway config)\n"),
        "{printed}"
    );

    let missing = blindgate(&["check-config", &p(&setup.path("missing.toml"))]);
    assert_eq!(missing.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("No such file or directory"), "{stderr}");

    assert_eq!(blindgate(&["check-config"]).status.code(), Some(2));
    assert_eq!(
        blindgate(&["check-config", "--bogus", &p(&path)])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn the_help_documents_the_exit_codes() {
    let help = stdout(&blindgate(&["check-config", "--help"]));
    assert!(help.contains("Exit status:"), "{help}");
    assert!(help.contains("--reload"), "{help}");
}

#[test]
fn the_lab_configs_of_certs_dev_pass_check_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = dir.path().join("lab");
    let output = blindgate(&["certs", "dev", "--out", &p(&lab)]);
    assert!(output.status.success(), "{output:?}");
    let listed = stdout(&output);
    for name in ["gateway.toml", "cloud.toml", "registry.toml"] {
        assert!(listed.contains(&p(&lab.join(name))), "{listed}");
    }
    // --reload: the lab's fixed ports (8883, 9464, 9465) may be in use on this
    // machine; binding is tested above with free ports.
    for name in ["gateway.toml", "cloud.toml"] {
        let config = p(&lab.join(name));
        let output = blindgate(&["check-config", "--reload", &config]);
        assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
        assert_eq!(stdout(&output).lines().count(), 1, "{}", stdout(&output));
        // With the ports, nothing but a port in use may be reported.
        let output = blindgate(&["check-config", &config]);
        for line in stdout(&output)
            .lines()
            .filter(|l| l.contains(": error") || l.contains("listen"))
        {
            assert!(line.contains("cannot listen"), "{line}");
        }
    }
    let checked =
        config::load_checked(&lab.join("gateway.toml"), PortCheck::Skip).expect("lab config");
    assert_eq!(checked.config.gateway.data_dir, lab.join("var/gateway"));
    assert!(checked.warnings.is_empty(), "{:#?}", checked.warnings);

    let again = blindgate(&["certs", "dev", "--out", &p(&lab)]);
    assert!(!again.status.success(), "existing files are kept");
    let forced = blindgate(&["certs", "dev", "--out", &p(&lab), "--force"]);
    assert!(forced.status.success(), "{forced:?}");
}

#[test]
fn a_cloud_ingest_config_is_checked_as_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = DevPkiOptions {
        out_dir: dir.path().join("lab"),
        ..DevPkiOptions::default()
    };
    let lab = LabConfigs::render(&opts).expect("lab configs");
    generate_dev_pki(&opts).expect("dev PKI");
    lab.write(false).expect("write lab configs");
    let report = config::check_config_file(&lab.cloud.0, PortCheck::Skip).expect("readable");
    assert_eq!(report.kind, config::ConfigKind::CloudIngest);
    assert_eq!(report.diagnostics, []);

    // The ingest's key replaced by the gateway's: the key no longer matches.
    let text = lab
        .cloud
        .1
        .replace("key = \"cloud-ingest.key\"", "key = \"gateway-client.key\"");
    let line = text
        .lines()
        .position(|l| l == "key = \"gateway-client.key\"")
        .expect("the key line")
        + 1;
    fs::write(&lab.cloud.0, &text).expect("rewrite");
    let report = config::check_config_file(&lab.cloud.0, PortCheck::Skip).expect("readable");
    assert_eq!(
        places(&report.diagnostics),
        [error_at((line, 7), "broker.key")],
        "{:#?}",
        report.diagnostics
    );
}
