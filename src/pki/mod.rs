//! Development PKI: generates the two CAs and every certificate a local gateway, cloud
//! broker, cloud ingest and simulated devices need (`blindgate certs dev`).
//!
//! There are two CAs because they have different owners in production: the **cloud
//! CA** (the cloud operator's: broker, gateway uplink clients, cloud ingest) and the
//! **device CA** (the site's: the gateway's device listener and the devices). All keys
//! are ECDSA P-256; every `.key` file is created with mode 0600. These certificates
//! are for development and tests only.
//!
//! [`LabConfigs`] are the lab versions of the installed example configs
//! (`config/gateway.toml`, `config/cloud.toml`, embedded here), with only the state
//! paths, endpoints, listener and certificate paths changed to point into the PKI's
//! directory; `blindgate certs dev` writes them beside the certificates.

pub mod cli;

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    Ia5String, IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use time::OffsetDateTime;

/// Longest validity accepted, in days (100 years).
pub const MAX_VALIDITY_DAYS: u32 = 36_500;

/// Mode of every private key file.
const KEY_MODE: u32 = 0o600;
/// Mode of every certificate file (public).
const CERT_MODE: u32 = 0o644;

/// What to generate, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPkiOptions {
    /// Directory for the PEM files (created if missing). The default is `certs/dev`.
    pub out_dir: PathBuf,
    /// The gateway's id: CN of its uplink client certificate and of its device-listener
    /// certificate. Same rules as a device id. The default is `gw-1`.
    pub gateway_id: String,
    /// One certificate per device, CN and SAN DNS name = the id (E3 device id rules).
    /// The default is `pump-17`, `meter-9`, `cam-1`.
    pub devices: Vec<String>,
    /// Host name (or IP address) the gateway dials for the cloud broker; the broker
    /// certificate is also valid for `localhost`, 127.0.0.1 and ::1. The default is
    /// `localhost`.
    pub cloud_host: String,
    /// Validity of every certificate from now, 1..=[`MAX_VALIDITY_DAYS`]. The default
    /// is 365.
    pub validity_days: u32,
    /// Replace files that already exist. The default is false: an existing file stops
    /// generation before anything is written.
    pub force: bool,
}

impl Default for DevPkiOptions {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("certs/dev"),
            gateway_id: "gw-1".into(),
            devices: ["pump-17", "meter-9", "cam-1"].map(String::from).to_vec(),
            cloud_host: "localhost".into(),
            validity_days: 365,
            force: false,
        }
    }
}

/// A certificate file and its private key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertKeyPaths {
    /// PEM certificate (mode 0644).
    pub cert: PathBuf,
    /// PEM PKCS#8 private key (mode 0600).
    pub key: PathBuf,
}

impl CertKeyPaths {
    fn new(dir: &Path, stem: &str) -> Self {
        Self {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        }
    }
}

/// The files of a generated dev PKI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPki {
    /// `cloud-ca.pem`/`.key`: trust anchor of the cloud side.
    pub cloud_ca: CertKeyPaths,
    /// `cloud-broker.pem`/`.key`: the cloud broker's server certificate (cloud CA).
    pub cloud_broker: CertKeyPaths,
    /// `gateway-client.pem`/`.key`: the gateway's uplink client certificate (cloud CA).
    pub gateway_client: CertKeyPaths,
    /// `cloud-ingest.pem`/`.key`: the cloud ingest's client certificate (cloud CA).
    pub cloud_ingest: CertKeyPaths,
    /// `device-ca.pem`/`.key`: trust anchor of the site's devices.
    pub device_ca: CertKeyPaths,
    /// `gateway-devices.pem`/`.key`: the device listener's server certificate (device CA).
    pub gateway_devices: CertKeyPaths,
    /// `devices/<id>.pem`/`.key` per device (device CA), in the order given.
    pub devices: Vec<(String, CertKeyPaths)>,
}

impl DevPki {
    fn layout(opts: &DevPkiOptions) -> Self {
        let dir = opts.out_dir.as_path();
        let devices_dir = dir.join("devices");
        Self {
            cloud_ca: CertKeyPaths::new(dir, "cloud-ca"),
            cloud_broker: CertKeyPaths::new(dir, "cloud-broker"),
            gateway_client: CertKeyPaths::new(dir, "gateway-client"),
            cloud_ingest: CertKeyPaths::new(dir, "cloud-ingest"),
            device_ca: CertKeyPaths::new(dir, "device-ca"),
            gateway_devices: CertKeyPaths::new(dir, "gateway-devices"),
            devices: opts
                .devices
                .iter()
                .map(|id| (id.clone(), CertKeyPaths::new(&devices_dir, id)))
                .collect(),
        }
    }

    /// Every certificate/key pair, CAs first.
    pub fn pairs(&self) -> impl Iterator<Item = &CertKeyPaths> {
        [
            &self.cloud_ca,
            &self.cloud_broker,
            &self.gateway_client,
            &self.cloud_ingest,
            &self.device_ca,
            &self.gateway_devices,
        ]
        .into_iter()
        .chain(self.devices.iter().map(|(_, paths)| paths))
    }
}

/// The installed gateway config, the base of the lab one.
const GATEWAY_EXAMPLE: &str = include_str!("../../config/gateway.toml");
/// The installed cloud ingest config, the base of the lab one.
const CLOUD_EXAMPLE: &str = include_str!("../../config/cloud.toml");
/// The installed command allowlist, the base of the lab one.
const COMMANDS_EXAMPLE: &str = include_str!("../../config/commands.toml");
/// The device type every lab device gets in the lab command allowlist.
const LAB_DEVICE_TYPE: &str = "thermostat";
/// The commented-out schema line of the example cloud config, set in the lab one.
const SCHEMA_LINE: &str = "# schema = \"commands.toml\"";
/// Mode of the lab config files (no secrets in them).
const CONFIG_MODE: u32 = 0o644;
/// The cloud broker's port in the lab (8883 is the gateway's device listener).
pub const LAB_BROKER_PORT: u16 = 8884;

/// Lab configs for a dev PKI: `gateway.toml`, `cloud.toml`, `registry.toml` and
/// `commands.toml` in the PKI's directory, with paths relative to it (so the directory
/// can be moved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabConfigs {
    /// `DIR/gateway.toml`: state in `DIR/var/gateway`, devices on 127.0.0.1:8883, the
    /// broker at `mqtts://<cloud host>:8884`, metrics on 127.0.0.1:9464.
    pub gateway: (PathBuf, String),
    /// `DIR/cloud.toml`: the ingest's state under `DIR/var/cloud`, metrics on
    /// 127.0.0.1:9465.
    pub cloud: (PathBuf, String),
    /// `DIR/registry.toml`: one tenant, `lab`, with the gateway and every device.
    pub registry: (PathBuf, String),
    /// `DIR/commands.toml`: the example command allowlist, every lab device a
    /// `thermostat` (so `cloud send-command` works in the lab).
    pub commands: (PathBuf, String),
}

impl LabConfigs {
    /// The lab configs for `opts` (nothing is written).
    ///
    /// # Errors
    /// [`PkiError::LabConfig`] if an embedded example lacks a key to rewrite (a bug
    /// caught by the tests).
    pub fn render(opts: &DevPkiOptions) -> Result<Self, PkiError> {
        let dir = opts.out_dir.as_path();
        let host = match opts.cloud_host.parse::<Ipv6Addr>() {
            Ok(_) => format!("[{}]", opts.cloud_host),
            Err(_) => opts.cloud_host.clone(),
        };
        let broker = format!("mqtts://{host}:{LAB_BROKER_PORT}");
        let q = |text: &str| format!("{text:?}");
        let header = |name: &str| {
            format!(
                "# Lab configuration written by `blindgate certs dev`: the installed\n\
                 # config/{name} with lab paths (relative to this directory), endpoints\n\
                 # and listeners. For development only.\n#\n"
            )
        };
        let gateway = rewrite(
            "gateway.toml",
            GATEWAY_EXAMPLE,
            &[
                ("gateway", "id", q(&opts.gateway_id)),
                ("gateway", "data_dir", q("var/gateway")),
                ("devices", "listen", q("127.0.0.1:8883")),
                ("devices", "ca", q("device-ca.pem")),
                ("devices", "cert", q("gateway-devices.pem")),
                ("devices", "key", q("gateway-devices.key")),
                ("cloud", "endpoints", format!("[{}]", q(&broker))),
                ("cloud", "ca", q("cloud-ca.pem")),
                ("cloud", "cert", q("gateway-client.pem")),
                ("cloud", "key", q("gateway-client.key")),
            ],
        )?;
        let cloud = rewrite(
            "cloud.toml",
            CLOUD_EXAMPLE,
            &[
                ("broker", "url", q(&broker)),
                ("broker", "ca", q("cloud-ca.pem")),
                ("broker", "cert", q("cloud-ingest.pem")),
                ("broker", "key", q("cloud-ingest.key")),
                ("store", "keys_dir", q("var/cloud/keys")),
                ("store", "state_dir", q("var/cloud/state")),
                ("store", "registry", q("registry.toml")),
                ("sink", "jsonl", q("var/cloud/messages.jsonl")),
                ("sink", "images_dir", q("var/cloud/images")),
            ],
        )?;
        let list = |items: &[String]| {
            let quoted: Vec<String> = items.iter().map(|item| q(item)).collect();
            format!("[{}]", quoted.join(", "))
        };
        let registry = format!(
            "# Lab registry written by `blindgate certs dev`: one tenant with the dev PKI's\n\
             # gateway and devices. The cloud ingest refuses a device arriving through a\n\
             # gateway its tenant does not list.\n\n\
             [[tenant]]\nname = \"lab\"\ngateways = {}\ndevices = {}\n",
            list(std::slice::from_ref(&opts.gateway_id)),
            list(&opts.devices),
        );
        if !cloud.contains(SCHEMA_LINE) {
            return Err(PkiError::LabConfig {
                file: "cloud.toml",
                key: "commands.schema".into(),
            });
        }
        let cloud = cloud.replacen(SCHEMA_LINE, "schema = \"commands.toml\"", 1);
        let commands = header("commands.toml") + &lab_commands(&opts.devices)?;
        Ok(Self {
            gateway: (dir.join("gateway.toml"), header("gateway.toml") + &gateway),
            cloud: (dir.join("cloud.toml"), header("cloud.toml") + &cloud),
            registry: (dir.join("registry.toml"), registry),
            commands: (dir.join("commands.toml"), commands),
        })
    }

    /// The four files and their contents.
    pub fn files(&self) -> [&(PathBuf, String); 4] {
        [&self.gateway, &self.cloud, &self.registry, &self.commands]
    }

    /// Refuses if one of the files exists (before anything is written).
    ///
    /// # Errors
    /// [`PkiError::Exists`] naming the first existing file.
    pub fn refuse_existing(&self) -> Result<(), PkiError> {
        match self
            .files()
            .into_iter()
            .find(|(path, _)| path.symlink_metadata().is_ok())
        {
            Some((path, _)) => Err(PkiError::Exists { path: path.clone() }),
            None => Ok(()),
        }
    }

    /// Writes the files (mode 0644, fsync'd); `force` replaces existing ones.
    ///
    /// # Errors
    /// [`PkiError::CreateDir`], [`PkiError::Write`].
    pub fn write(&self, force: bool) -> Result<(), PkiError> {
        if let Some(dir) = self.gateway.0.parent() {
            create_dir(dir)?;
        }
        for (path, text) in self.files() {
            write_file(path, text, CONFIG_MODE, force)?;
        }
        Ok(())
    }
}

/// The example allowlist with its `[device_types]` entries replaced by `devices`, each
/// a [`LAB_DEVICE_TYPE`].
fn lab_commands(devices: &[String]) -> Result<String, PkiError> {
    let missing = || PkiError::LabConfig {
        file: "commands.toml",
        key: "device_types".into(),
    };
    let (before, after) = COMMANDS_EXAMPLE
        .split_once("[device_types]\n")
        .ok_or_else(missing)?;
    // The example's own entries run up to the first blank line.
    let (_, rest) = after.split_once("\n\n").ok_or_else(missing)?;
    let mut out = format!("{before}[device_types]\n");
    for device in devices {
        out.push_str(&format!("{device:?} = {LAB_DEVICE_TYPE:?}\n"));
    }
    out.push('\n');
    out.push_str(rest);
    Ok(out)
}

/// `text` with the value of each `(section, key, value)` replaced; every key must be
/// set exactly once in its section, on a line of its own.
fn rewrite(
    file: &'static str,
    text: &str,
    values: &[(&str, &str, String)],
) -> Result<String, PkiError> {
    let mut hits = vec![0usize; values.len()];
    let mut section = String::new();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            section = name.trim().to_owned();
        }
        let key = trimmed
            .split_once('=')
            .map(|(key, _)| key.trim())
            .filter(|_| !trimmed.starts_with('#'));
        let found = values
            .iter()
            .position(|(s, k, _)| Some(*k) == key && *s == section);
        match found {
            Some(index) => {
                hits[index] += 1;
                let (_, key, value) = &values[index];
                out.push_str(&format!("{key} = {value}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    match hits.iter().position(|hits| *hits != 1) {
        Some(index) => Err(PkiError::LabConfig {
            file,
            key: format!("{}.{}", values[index].0, values[index].1),
        }),
        None => Ok(out),
    }
}

/// What can go wrong while generating a dev PKI.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// The gateway id breaks the id rules.
    #[error("invalid gateway id {id:?}")]
    GatewayId {
        /// The id as given.
        id: String,
        /// Which rule it breaks.
        #[source]
        source: e3::HeaderError,
    },
    /// A device id breaks the E3 device id rules.
    #[error("invalid device id {id:?}")]
    DeviceId {
        /// The id as given.
        id: String,
        /// Which rule it breaks.
        #[source]
        source: e3::HeaderError,
    },
    /// A device id is listed more than once.
    #[error("device id {id:?} is listed twice")]
    DuplicateDevice {
        /// The repeated id.
        id: String,
    },
    /// The cloud host is neither an IP address nor a DNS name a certificate can hold.
    #[error("invalid cloud host {host:?}")]
    CloudHost {
        /// The host as given.
        host: String,
        /// Why rcgen refused it.
        #[source]
        source: rcgen::Error,
    },
    /// The validity is zero or above [`MAX_VALIDITY_DAYS`].
    #[error("validity of {days} days is outside 1..={MAX_VALIDITY_DAYS}")]
    Validity {
        /// The validity asked for.
        days: u32,
    },
    /// A file already exists and `force` was not set; nothing was written.
    #[error("refusing to overwrite {} (force replaces the dev PKI)", .path.display())]
    Exists {
        /// The first existing file.
        path: PathBuf,
    },
    /// The output directory could not be created.
    #[error("cannot create directory {}", .path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file could not be written (or, with `force`, its old version removed).
    #[error("cannot write {}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An embedded example config lacks a key the lab config rewrites (a bug).
    #[error("the embedded config/{file} does not set {key} exactly once")]
    LabConfig {
        /// The example file.
        file: &'static str,
        /// The key, `section.key`.
        key: String,
    },
    /// rcgen could not generate a key or certificate.
    #[error("cannot generate {what}")]
    Generate {
        /// Which certificate (its file stem).
        what: String,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
}

/// Generates the dev PKI described by `opts` and writes it to `opts.out_dir`.
///
/// Everything is generated in memory and every target is checked before the first
/// file is written, so a refusal leaves the directory as it was. Each file is
/// fsync'd; with `force` an existing file is removed and created anew (so a key file
/// always gets mode 0600 at creation, never by a later chmod).
///
/// # Errors
/// See [`PkiError`].
pub fn generate_dev_pki(opts: &DevPkiOptions) -> Result<DevPki, PkiError> {
    validate(opts)?;
    let validity = Validity::from_now(opts.validity_days)?;
    let pki = DevPki::layout(opts);
    let files = issue_all(opts, &pki, &validity)?;
    if !opts.force {
        refuse_existing(&pki)?;
    }
    create_dir(&opts.out_dir)?;
    create_dir(&opts.out_dir.join("devices"))?;
    for (paths, pem) in files {
        write_file(&paths.cert, &pem.cert, CERT_MODE, opts.force)?;
        write_file(&paths.key, &pem.key, KEY_MODE, opts.force)?;
    }
    Ok(pki)
}

fn validate(opts: &DevPkiOptions) -> Result<(), PkiError> {
    e3::DeviceId::new(&opts.gateway_id).map_err(|source| PkiError::GatewayId {
        id: opts.gateway_id.clone(),
        source,
    })?;
    for (index, id) in opts.devices.iter().enumerate() {
        e3::DeviceId::new(id).map_err(|source| PkiError::DeviceId {
            id: id.clone(),
            source,
        })?;
        if opts
            .devices
            .get(..index)
            .is_some_and(|seen| seen.contains(id))
        {
            return Err(PkiError::DuplicateDevice { id: id.clone() });
        }
    }
    Ok(())
}

/// Certificate validity window; starts an hour ago to tolerate clock skew.
struct Validity {
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl Validity {
    fn from_now(days: u32) -> Result<Self, PkiError> {
        if !(1..=MAX_VALIDITY_DAYS).contains(&days) {
            return Err(PkiError::Validity { days });
        }
        let now = OffsetDateTime::now_utc();
        let not_before = now.checked_sub(time::Duration::HOUR);
        let not_after = now.checked_add(time::Duration::days(i64::from(days)));
        match (not_before, not_after) {
            (Some(not_before), Some(not_after)) => Ok(Self {
                not_before,
                not_after,
            }),
            _ => Err(PkiError::Validity { days }),
        }
    }
}

/// A certificate and its key, PEM encoded, not yet written.
struct Pem {
    cert: String,
    key: String,
}

/// Issues every certificate, paired with the files it goes to.
fn issue_all<'a>(
    opts: &DevPkiOptions,
    pki: &'a DevPki,
    validity: &Validity,
) -> Result<Vec<(&'a CertKeyPaths, Pem)>, PkiError> {
    let cloud_ca = Ca::new("cloud-ca", "blindgate dev cloud CA", validity)?;
    let device_ca = Ca::new("device-ca", "blindgate dev device CA", validity)?;
    let broker = broker_leaf(opts)?;
    let gateway_client = Leaf::client("gateway-client", &opts.gateway_id, &[])?;
    let ingest = Leaf::client("cloud-ingest", "cloud-ingest", &[])?;
    let listener = Leaf::server("gateway-devices", &opts.gateway_id, &["localhost"])?;
    let mut files = vec![
        (&pki.cloud_ca, cloud_ca.pem()),
        (&pki.cloud_broker, cloud_ca.issue(&broker, validity)?),
        (
            &pki.gateway_client,
            cloud_ca.issue(&gateway_client, validity)?,
        ),
        (&pki.cloud_ingest, cloud_ca.issue(&ingest, validity)?),
        (&pki.device_ca, device_ca.pem()),
        (&pki.gateway_devices, device_ca.issue(&listener, validity)?),
    ];
    for (id, paths) in &pki.devices {
        let leaf = Leaf::client(id, id, &[id.as_str()])?;
        files.push((paths, device_ca.issue(&leaf, validity)?));
    }
    Ok(files)
}

/// The broker's certificate: valid for `cloud_host` (a DNS name or an IP address).
fn broker_leaf(opts: &DevPkiOptions) -> Result<Leaf<'_>, PkiError> {
    let host = opts.cloud_host.as_str();
    let mut leaf = Leaf::server("cloud-broker", host, &["localhost"])?;
    let host_san = match host.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => dns_name(host).map_err(|source| PkiError::CloudHost {
            host: host.to_owned(),
            source,
        })?,
    };
    if !leaf.sans.contains(&host_san) {
        leaf.sans.insert(0, host_san);
    }
    Ok(leaf)
}

/// An end-entity certificate to issue.
struct Leaf<'a> {
    /// File stem, for error messages.
    what: &'a str,
    common_name: &'a str,
    sans: Vec<SanType>,
    purpose: ExtendedKeyUsagePurpose,
}

impl<'a> Leaf<'a> {
    /// A TLS client certificate with the given SAN DNS names.
    fn client(what: &'a str, common_name: &'a str, dns: &[&str]) -> Result<Self, PkiError> {
        Ok(Self {
            what,
            common_name,
            sans: dns_names(what, dns)?,
            purpose: ExtendedKeyUsagePurpose::ClientAuth,
        })
    }

    /// A TLS server certificate for the given DNS names plus 127.0.0.1 and ::1.
    fn server(what: &'a str, common_name: &'a str, dns: &[&str]) -> Result<Self, PkiError> {
        let mut sans = dns_names(what, dns)?;
        sans.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        sans.push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        Ok(Self {
            what,
            common_name,
            sans,
            purpose: ExtendedKeyUsagePurpose::ServerAuth,
        })
    }
}

fn dns_names(what: &str, names: &[&str]) -> Result<Vec<SanType>, PkiError> {
    names
        .iter()
        .map(|name| dns_name(name).map_err(|source| generate_error(what, source)))
        .collect()
}

/// Always a DNS SAN, even for text that looks like an IP address (a device id may).
fn dns_name(name: &str) -> Result<SanType, rcgen::Error> {
    Ok(SanType::DnsName(Ia5String::try_from(name)?))
}

/// A CA certificate with its key, able to issue leaves.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(what: &str, common_name: &str, validity: &Validity) -> Result<Self, PkiError> {
        let fail = |source| generate_error(what, source);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.self_signed(&key).map_err(fail)?;
        Ok(Self { cert, key })
    }

    fn pem(&self) -> Pem {
        Pem {
            cert: self.cert.pem(),
            key: self.key.serialize_pem(),
        }
    }

    fn issue(&self, leaf: &Leaf<'_>, validity: &Validity) -> Result<Pem, PkiError> {
        let fail = |source| generate_error(leaf.what, source);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(leaf.common_name);
        params.subject_alt_names = leaf.sans.clone();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![leaf.purpose.clone()];
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(fail)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    // Alphanumeric: rumqttd takes O as a tenant id and refuses anything else.
    name.push(DnType::OrganizationName, "blindgate");
    name.push(DnType::CommonName, common_name);
    name
}

fn generate_error(what: &str, source: rcgen::Error) -> PkiError {
    PkiError::Generate {
        what: what.to_owned(),
        source,
    }
}

fn refuse_existing(pki: &DevPki) -> Result<(), PkiError> {
    let existing = pki
        .pairs()
        .flat_map(|paths| [&paths.cert, &paths.key])
        .find(|path| path.symlink_metadata().is_ok());
    match existing {
        Some(path) => Err(PkiError::Exists { path: path.clone() }),
        None => Ok(()),
    }
}

fn create_dir(path: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(path).map_err(|source| PkiError::CreateDir {
        path: path.into(),
        source,
    })
}

/// Creates `path` with `mode` (never widened afterwards), writes and fsyncs it.
fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> Result<(), PkiError> {
    let fail = |source| PkiError::Write {
        path: path.into(),
        source,
    };
    if force {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(fail(e)),
            _ => {}
        }
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(fail)?;
    file.write_all(contents.as_bytes()).map_err(fail)?;
    file.sync_all().map_err(fail)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn options(dir: &Path) -> DevPkiOptions {
        DevPkiOptions {
            out_dir: dir.join("pki"),
            ..DevPkiOptions::default()
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn every_file_is_written_keys_private_and_certs_public() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = generate_dev_pki(&options(dir.path())).expect("generates");
        assert_eq!(pki.pairs().count(), 9);
        assert_eq!(
            pki.devices[0].1.cert,
            dir.path().join("pki/devices/pump-17.pem")
        );
        for paths in pki.pairs() {
            assert_eq!(mode(&paths.key), 0o600, "{}", paths.key.display());
            assert_eq!(mode(&paths.cert) & 0o600, 0o600, "{}", paths.cert.display());
        }
    }

    #[test]
    fn existing_files_are_kept_unless_forced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = options(dir.path());
        let first = generate_dev_pki(&opts).expect("generates");
        let before = fs::read(&first.cloud_ca.key).expect("read key");

        let err = generate_dev_pki(&opts).expect_err("refuses to overwrite");
        assert!(matches!(err, PkiError::Exists { .. }), "{err:?}");
        assert_eq!(fs::read(&first.cloud_ca.key).expect("read key"), before);

        fs::set_permissions(&first.cloud_ca.key, fs::Permissions::from_mode(0o644)).expect("chmod");
        let forced = DevPkiOptions {
            force: true,
            ..opts
        };
        generate_dev_pki(&forced).expect("force overwrites");
        assert_ne!(fs::read(&first.cloud_ca.key).expect("read key"), before);
        assert_eq!(mode(&first.cloud_ca.key), 0o600);
    }

    #[test]
    fn ids_that_could_escape_the_directory_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        for bad in ["../evil", "a/b", "", "x y"] {
            let opts = DevPkiOptions {
                devices: vec![bad.into()],
                ..options(dir.path())
            };
            let err = generate_dev_pki(&opts).expect_err(bad);
            assert!(matches!(err, PkiError::DeviceId { .. }), "{bad}: {err:?}");
        }
        assert!(!dir.path().join("pki").exists(), "nothing written");
    }

    #[test]
    fn a_device_listed_twice_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = DevPkiOptions {
            devices: vec!["a".into(), "b".into(), "a".into()],
            ..options(dir.path())
        };
        let err = generate_dev_pki(&opts).expect_err("duplicate");
        assert!(matches!(err, PkiError::DuplicateDevice { .. }), "{err:?}");
    }

    #[test]
    fn validity_must_be_between_one_day_and_the_maximum() {
        let dir = tempfile::tempdir().expect("tempdir");
        for days in [0, MAX_VALIDITY_DAYS + 1, u32::MAX] {
            let opts = DevPkiOptions {
                validity_days: days,
                ..options(dir.path())
            };
            let err = generate_dev_pki(&opts).expect_err("out of range");
            assert!(matches!(err, PkiError::Validity { .. }), "{days}: {err:?}");
        }
    }

    #[test]
    fn lab_configs_rewrite_each_key_once_and_bracket_ipv6_hosts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = DevPkiOptions {
            cloud_host: "::1".into(),
            gateway_id: "gw-lab".into(),
            ..options(dir.path())
        };
        let lab = LabConfigs::render(&opts).expect("renders");
        assert!(
            lab.gateway
                .1
                .contains("endpoints = [\"mqtts://[::1]:8884\"]")
        );
        assert!(lab.gateway.1.contains("id = \"gw-lab\""));
        assert!(lab.cloud.1.contains("url = \"mqtts://[::1]:8884\""));
        assert!(lab.registry.1.contains("gateways = [\"gw-lab\"]"));
        assert!(lab.cloud.1.contains("\nschema = \"commands.toml\"\n"));
        assert!(
            !lab.commands.1.contains("thermostat-1 ="),
            "the example's devices are gone"
        );
        for device in &opts.devices {
            assert!(
                lab.commands
                    .1
                    .contains(&format!("{device:?} = \"thermostat\""))
            );
        }
        assert_eq!(lab.gateway.0, dir.path().join("pki/gateway.toml"));

        let missing = rewrite("x.toml", "[a]\nb = 1\n", &[("a", "c", "2".into())]);
        assert!(
            matches!(missing, Err(PkiError::LabConfig { .. })),
            "{missing:?}"
        );
        let commented = rewrite("x.toml", "[a]\n# b = 1\nb = 1\n", &[("a", "b", "2".into())]);
        assert_eq!(commented.expect("one b"), "[a]\n# b = 1\nb = 2\n");
    }

    #[test]
    fn an_ip_address_cloud_host_becomes_an_ip_san() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = DevPkiOptions {
            cloud_host: "10.0.0.5".into(),
            devices: Vec::new(),
            ..options(dir.path())
        };
        let leaf = broker_leaf(&opts).expect("valid host");
        assert_eq!(
            leaf.sans[0],
            SanType::IpAddress("10.0.0.5".parse().expect("ip"))
        );
        generate_dev_pki(&opts).expect("generates");
    }
}
