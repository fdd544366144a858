//! Multi-tenant isolation: which devices belong to which tenant, and which gateways may
//! carry them. An envelope for a device arriving through a gateway that may not carry
//! it is rejected whatever its content (a stolen gateway cannot inject for other
//! tenants' devices even with their envelopes).
//!
//! File format (TOML):
//!
//! ```toml
//! [[tenant]]
//! name = "acme-water"
//! gateways = ["gw-1", "gw-2"]
//! devices = ["pump-17", "meter-9"]
//! ```

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    tenant: Vec<TenantEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    name: String,
    gateways: Vec<String>,
    devices: Vec<String>,
}

/// Why the registry could not be loaded.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The file could not be read.
    #[error("cannot read registry {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid registry.
    #[error("invalid registry {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        message: String,
    },
    /// A device is listed under two tenants.
    #[error("registry {path}: device {device} belongs to two tenants")]
    DeviceTwice {
        /// The file.
        path: PathBuf,
        /// The device.
        device: String,
    },
}

/// Who may carry whom.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// device -> tenant
    tenant_of: HashMap<String, String>,
    /// tenant -> gateways
    gateways_of: HashMap<String, HashSet<String>>,
}

impl Registry {
    /// Loads a registry file.
    ///
    /// # Errors
    /// [`RegistryError`].
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses registry text (`path` names it in errors).
    ///
    /// # Errors
    /// [`RegistryError`].
    pub fn parse(text: &str, path: &Path) -> Result<Self, RegistryError> {
        let file: RegistryFile = toml::from_str(text).map_err(|e| RegistryError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let mut registry = Self::default();
        for tenant in file.tenant {
            for device in tenant.devices {
                if registry
                    .tenant_of
                    .insert(device.clone(), tenant.name.clone())
                    .is_some()
                {
                    return Err(RegistryError::DeviceTwice {
                        path: path.to_owned(),
                        device,
                    });
                }
            }
            registry
                .gateways_of
                .entry(tenant.name)
                .or_default()
                .extend(tenant.gateways);
        }
        Ok(registry)
    }

    /// The gateways that may carry `device`, sorted.
    pub fn gateways_for(&self, device: &str) -> Vec<String> {
        let mut gateways: Vec<String> = self
            .tenant_of
            .get(device)
            .and_then(|tenant| self.gateways_of.get(tenant))
            .map(|g| g.iter().cloned().collect())
            .unwrap_or_default();
        gateways.sort_unstable();
        gateways
    }

    /// The tenant of `device`, if `gateway` may carry it.
    pub fn allowed(&self, gateway: &str, device: &str) -> Option<&str> {
        let tenant = self.tenant_of.get(device)?;
        self.gateways_of
            .get(tenant)
            .filter(|gateways| gateways.contains(gateway))
            .map(|_| tenant.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_only_through_their_tenants_gateways() {
        let text = r#"
[[tenant]]
name = "a"
gateways = ["gw-1"]
devices = ["pump-17"]

[[tenant]]
name = "b"
gateways = ["gw-2"]
devices = ["meter-9"]
"#;
        let registry = Registry::parse(text, Path::new("r.toml")).expect("valid");
        assert_eq!(registry.allowed("gw-1", "pump-17"), Some("a"));
        assert_eq!(registry.allowed("gw-2", "pump-17"), None);
        assert_eq!(registry.allowed("gw-1", "unknown"), None);
        let twice = "[[tenant]]\nname='a'\ngateways=[]\ndevices=['x']\n[[tenant]]\nname='b'\ngateways=[]\ndevices=['x']\n";
        assert!(matches!(
            Registry::parse(twice, Path::new("r.toml")),
            Err(RegistryError::DeviceTwice { .. })
        ));
    }
}
