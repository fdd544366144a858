//! The gateway config file tests run the real binary with: the lab defaults (gateway
//! `gw-1`, the dev PKI's certificate files, devices on a given loopback port, the
//! cloud broker at `localhost:<port>` with a fast reconnect, no OS reserve, metrics
//! off, log level info), and whatever a test changes with [`GatewayConfig::set`].

use std::fmt::Display;
use std::path::{Path, PathBuf};

use blindgate::pki::DevPki;

/// A gateway config, section by section, in the order written.
pub struct GatewayConfig {
    sections: Vec<(&'static str, Vec<(String, String)>)>,
}

/// `text` as a TOML basic string.
pub fn toml_string(text: &str) -> String {
    format!("{text:?}")
}

fn path(path: &Path) -> String {
    toml_string(&path.display().to_string())
}

impl GatewayConfig {
    /// The defaults, with the queue in `data_dir`.
    pub fn new(data_dir: &Path, pki: &DevPki, device_port: u16, cloud_port: u16) -> Self {
        let pair = |key: &str, value: String| (key.to_owned(), value);
        Self {
            sections: vec![
                (
                    "gateway",
                    vec![
                        pair("id", toml_string("gw-1")),
                        pair("data_dir", path(data_dir)),
                    ],
                ),
                (
                    "devices",
                    vec![
                        pair("listen", toml_string(&format!("127.0.0.1:{device_port}"))),
                        pair("ca", path(&pki.device_ca.cert)),
                        pair("cert", path(&pki.gateway_devices.cert)),
                        pair("key", path(&pki.gateway_devices.key)),
                    ],
                ),
                (
                    "cloud",
                    vec![
                        pair(
                            "endpoints",
                            format!(
                                "[{}]",
                                toml_string(&format!("mqtts://localhost:{cloud_port}"))
                            ),
                        ),
                        pair("ca", path(&pki.cloud_ca.cert)),
                        pair("cert", path(&pki.gateway_client.cert)),
                        pair("key", path(&pki.gateway_client.key)),
                        pair("backoff_min", toml_string("100ms")),
                        pair("backoff_max", toml_string("500ms")),
                        pair("keep_alive", toml_string("5s")),
                    ],
                ),
                ("envelope", Vec::new()),
                ("queue", vec![pair("min_free_disk", toml_string("0B"))]),
                ("metrics", vec![pair("listen", toml_string(""))]),
                ("log", vec![pair("level", toml_string("info"))]),
            ],
        }
    }

    /// Sets `key` in `[section]` to `value`, a TOML value as written (quote strings
    /// with [`toml_string`]); replaces an earlier value of the key.
    ///
    /// # Panics
    /// On a section the config does not have (a typo in the test).
    pub fn set(mut self, section: &str, key: &str, value: impl Display) -> Self {
        let (_, entries) = self
            .sections
            .iter_mut()
            .find(|(name, _)| *name == section)
            .unwrap_or_else(|| panic!("no section [{section}] in the test config"));
        let value = value.to_string();
        match entries.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => entries.push((key.to_owned(), value)),
        }
        self
    }

    /// [`GatewayConfig::set`] with a string value.
    pub fn set_str(self, section: &str, key: &str, value: &str) -> Self {
        self.set(section, key, toml_string(value))
    }

    /// The metrics endpoint on 127.0.0.1:`port`.
    pub fn metrics_port(self, port: u16) -> Self {
        self.set_str("metrics", "listen", &format!("127.0.0.1:{port}"))
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut text = String::new();
        for (name, entries) in &self.sections {
            if entries.is_empty() {
                continue;
            }
            text.push_str(&format!("[{name}]\n"));
            for (key, value) in entries {
                text.push_str(&format!("{key} = {value}\n"));
            }
            text.push('\n');
        }
        text
    }

    /// Writes it to `file`; returns `file`.
    pub fn write(&self, file: &Path) -> PathBuf {
        std::fs::write(file, self.render()).expect("gateway config written");
        file.to_owned()
    }
}
