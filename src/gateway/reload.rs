//! Reload without loss: on SIGHUP the config file is read and checked again; when the
//! certificate files change on disk they are loaded again. A new configuration is
//! applied whole or not at all: if anything in it is wrong, or it changes settings
//! that only a restart can change (listen addresses, the queue, limits), the running
//! configuration stays in force and the reason is logged, counted and shown on the
//! status page. The queue and connected devices are never touched by a reload.
//!
//! What a reload applies: the device listener's certificate, key and CA (from the next
//! handshake on), the whole `[cloud]` section (a changed section reconnects the uplink
//! at once; a certificate replaced on disk is used from the next connection on), and
//! the readiness age.

use std::path::PathBuf;

use super::{Gateway, GatewayPlan, certificates};
use crate::clock::now_ms;
use crate::config::{self, PortCheck, ValidConfig};
use crate::metrics::Metrics;

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new configuration (or the new certificates) is in use.
    Applied {
        /// True if the uplink reconnected because `[cloud]` changed.
        reconnected: bool,
    },
    /// Nothing changed.
    Unchanged,
    /// Refused; the running configuration stays. The text says why.
    Rejected(String),
}

/// The running configuration and how to replace it.
pub struct Reloader {
    path: PathBuf,
    current: ValidConfig,
    fingerprint: [u8; 32],
    metrics: Metrics,
}

impl Reloader {
    /// Starts from `config`, which `gateway` runs with (read from `path`), and
    /// publishes its certificates' expiry.
    pub fn new(path: PathBuf, config: ValidConfig, gateway: &Gateway) -> Self {
        let reloader = Self {
            fingerprint: certificates::fingerprint(&config),
            path,
            current: config,
            metrics: gateway.metrics().clone(),
        };
        reloader.publish_certificates(gateway);
        reloader
    }

    /// The configuration in force.
    pub fn current(&self) -> &ValidConfig {
        &self.current
    }

    /// SIGHUP: reads the config file again and applies it if it is entirely valid.
    pub fn reload_config(&mut self, gateway: &Gateway) -> ReloadOutcome {
        let outcome = self.try_reload_config(gateway);
        self.count("signal", &outcome);
        outcome
    }

    fn try_reload_config(&mut self, gateway: &Gateway) -> ReloadOutcome {
        // The same checks as `blindgate check-config --reload`: syntax, values,
        // certificate files, expiry, key/certificate pairs.
        let new = match config::load_checked(&self.path, PortCheck::Skip) {
            Ok(checked) => {
                for warning in &checked.warnings {
                    tracing::warn!("{}:{warning}", self.path.display());
                }
                checked.config
            }
            Err(err) => return ReloadOutcome::Rejected(err.to_string()),
        };
        let restart_only = restart_only_changes(&self.current, &new);
        self.metrics
            .config_restart_pending
            .set(i64::from(!restart_only.is_empty()));
        if !restart_only.is_empty() {
            return ReloadOutcome::Rejected(format!(
                "changes to {} take effect only on restart; nothing was applied (restart the service, or undo them to reload the rest)",
                restart_only.join(", ")
            ));
        }
        let files_changed = certificates::fingerprint(&new) != self.fingerprint;
        if new == self.current && !files_changed {
            return ReloadOutcome::Unchanged;
        }
        let reconnect = new.cloud != self.current.cloud;
        match self.apply(gateway, new, reconnect) {
            Ok(()) => ReloadOutcome::Applied {
                reconnected: reconnect,
            },
            Err(why) => ReloadOutcome::Rejected(why),
        }
    }

    /// Periodic check: if a certificate, key or CA file of the running configuration
    /// changed, loads them again; `None` when nothing changed.
    pub fn check_certificate_files(&mut self, gateway: &Gateway) -> Option<ReloadOutcome> {
        let fingerprint = certificates::fingerprint(&self.current);
        if fingerprint == self.fingerprint {
            return None;
        }
        // Remember what was seen even if it is refused: a half-copied file is retried
        // when it changes again, not every few seconds.
        self.fingerprint = fingerprint;
        let outcome = match self.apply(gateway, self.current.clone(), false) {
            Ok(()) => ReloadOutcome::Applied { reconnected: false },
            Err(why) => ReloadOutcome::Rejected(why),
        };
        self.count("certificate_files", &outcome);
        Some(outcome)
    }

    /// Logs certificates that expire within 30 days (called daily and after reloads).
    pub fn warn_expiring(&self) {
        certificates::warn_expiring(&certificates::inventory(&self.current), now_s());
    }

    /// Builds everything `new` needs (TLS configurations from the files as they are
    /// now) and only then puts it in use.
    fn apply(
        &mut self,
        gateway: &Gateway,
        new: ValidConfig,
        reconnect: bool,
    ) -> Result<(), String> {
        let plan = GatewayPlan::from_config(&new).map_err(|err| error_chain(&err))?;
        let expired = certificates::expired_own(&certificates::inventory(&new), now_s());
        if !expired.is_empty() {
            return Err(expired.join("; "));
        }
        gateway.apply(&plan, reconnect);
        self.fingerprint = certificates::fingerprint(&new);
        self.current = new;
        self.publish_certificates(gateway);
        Ok(())
    }

    fn publish_certificates(&self, gateway: &Gateway) {
        let list = certificates::inventory(&self.current);
        certificates::publish(&self.metrics, &list);
        certificates::warn_expiring(&list, now_s());
        gateway.health().set_certificates(list);
    }

    fn count(&self, trigger: &'static str, outcome: &ReloadOutcome) {
        let result = match outcome {
            ReloadOutcome::Applied { reconnected } => {
                tracing::info!(trigger, reconnected, "reload applied");
                "applied"
            }
            ReloadOutcome::Unchanged => {
                tracing::info!(trigger, "reload: nothing changed");
                return;
            }
            ReloadOutcome::Rejected(why) => {
                // One log line (journald splits lines into separate entries).
                let why_line = why.lines().collect::<Vec<_>>().join(" | ");
                tracing::error!(
                    trigger,
                    "reload rejected; the running configuration stays in force: {why_line}"
                );
                let first = why.lines().next().unwrap_or_default();
                self.metrics.problems.record("reload_rejected", first);
                "rejected"
            }
        };
        self.metrics
            .reloads
            .with_label_values(&[trigger, result])
            .inc();
    }
}

/// Sections (or keys) whose change needs a restart.
fn restart_only_changes(old: &ValidConfig, new: &ValidConfig) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.gateway != new.gateway {
        changed.push("[gateway]");
    }
    let mut devices = new.devices.clone();
    devices.ca.clone_from(&old.devices.ca);
    devices.cert.clone_from(&old.devices.cert);
    devices.key.clone_from(&old.devices.key);
    if devices != old.devices {
        changed.push("[devices] (other than ca, cert, key)");
    }
    if old.envelope != new.envelope {
        changed.push("[envelope]");
    }
    if old.queue != new.queue {
        changed.push("[queue]");
    }
    if old.metrics != new.metrics {
        changed.push("[metrics]");
    }
    if old.log != new.log {
        changed.push("[log]");
    }
    changed
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn now_s() -> i64 {
    i64::try_from(now_ms() / 1000).unwrap_or(i64::MAX)
}
