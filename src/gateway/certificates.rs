//! The certificates the gateway uses: their `notAfter` for the metric and the status
//! page, warnings weeks before expiry, and a fingerprint of the TLS files so a
//! certificate replaced on disk is noticed without a restart.

use std::path::{Path, PathBuf};

use ring::digest;

use crate::config::ValidConfig;
use crate::metrics::Metrics;
use crate::status::CertificateStatus;
use crate::tls::{certificate_identities, load_certs, not_after};

/// Warn in the log when a certificate expires within this many days.
pub const WARN_DAYS: i64 = 30;

/// The TLS files of `config` by role: (role, certificate file).
fn certificate_files(config: &ValidConfig) -> [(&'static str, &Path); 4] {
    [
        ("device_listener", config.devices.cert.as_path()),
        ("device_ca", config.devices.ca.as_path()),
        ("uplink_client", config.cloud.cert.as_path()),
        ("uplink_ca", config.cloud.ca.as_path()),
    ]
}

/// Every certificate in the files `config` names. A file that cannot be read is
/// skipped here: loading the TLS configuration reports it with its cause.
pub fn inventory(config: &ValidConfig) -> Vec<CertificateStatus> {
    let mut list = Vec::new();
    for (role, path) in certificate_files(config) {
        let Ok(certs) = load_certs(path) else {
            continue;
        };
        for (index, cert) in certs.iter().enumerate() {
            let Ok(expiry) = not_after(cert) else {
                continue;
            };
            let not_after = expiry
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            let subject = certificate_identities(cert)
                .ok()
                .and_then(|names| names.into_iter().next())
                .unwrap_or_default();
            list.push(CertificateStatus {
                role,
                index,
                subject,
                not_after,
            });
        }
    }
    list
}

/// Sets `blindgate_certificate_not_after_timestamp_seconds` to exactly `list` (series of
/// certificates no longer in use disappear).
pub fn publish(metrics: &Metrics, list: &[CertificateStatus]) {
    metrics.certificate_not_after.reset();
    for cert in list {
        metrics
            .certificate_not_after
            .with_label_values(&[cert.role, &cert.index.to_string()])
            .set(cert.not_after);
    }
}

/// The gateway's own certificates (listener and uplink client) that are expired at
/// `now_s`: a reload that would put one of them in use is refused.
pub fn expired_own(list: &[CertificateStatus], now_s: i64) -> Vec<String> {
    list.iter()
        .filter(|c| c.index == 0 && matches!(c.role, "device_listener" | "uplink_client"))
        .filter(|c| c.not_after < now_s)
        .map(|c| format!("{} certificate {:?} expired", c.role, c.subject))
        .collect()
}

/// Logs a warning for each certificate that expires within [`WARN_DAYS`] (or has).
pub fn warn_expiring(list: &[CertificateStatus], now_s: i64) {
    for cert in list {
        let days = cert.days_left(now_s);
        if days < 0 {
            tracing::error!(role = cert.role, index = cert.index, subject = %cert.subject, "certificate has expired");
        } else if days < WARN_DAYS {
            tracing::warn!(role = cert.role, index = cert.index, subject = %cert.subject, days_left = days, "certificate expires soon; replace it (no restart needed)");
        }
    }
}

/// SHA-256 over the contents of every TLS file `config` names (certificates, keys and
/// CA bundles), so any change, including `cp -p` that keeps the mtime, is seen.
pub fn fingerprint(config: &ValidConfig) -> [u8; 32] {
    let mut context = digest::Context::new(&digest::SHA256);
    for path in [
        &config.devices.ca,
        &config.devices.cert,
        &config.cloud.ca,
        &config.cloud.cert,
    ]
    .into_iter()
    .map(PathBuf::as_path)
    .chain(config.devices.key.file())
    .chain(config.cloud.key.file())
    {
        match std::fs::read(path) {
            Ok(bytes) => {
                context.update(&(bytes.len() as u64).to_be_bytes());
                context.update(&bytes);
            }
            Err(_) => context.update(&u64::MAX.to_be_bytes()),
        }
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}
