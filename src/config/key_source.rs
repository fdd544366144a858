//! `[cloud] key`: a PEM file, or a key in a PKCS#11 token named by a `pkcs11:` URI
//! together with `pkcs11_module` and the PIN's source (`pkcs11_pin_file` or
//! `pkcs11_pin_credential`; never the PIN itself).

use std::path::{Path, PathBuf};

use super::diagnostics::Problem;
use super::{Opt, Section, file_path};
use crate::tls::pkcs11::{PinSource, Pkcs11Key, Pkcs11Uri};

/// Where the uplink's private key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A PEM file.
    File(PathBuf),
    /// A PKCS#11 token; the key never leaves it.
    Pkcs11(Pkcs11Key),
}

impl KeySource {
    /// The key file, `None` for a token.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Self::File(path) => Some(path),
            Self::Pkcs11(_) => None,
        }
    }

    /// What to show for the key: the file, or the URI.
    pub fn describe(&self) -> String {
        match self {
            Self::File(path) => path.display().to_string(),
            Self::Pkcs11(key) => key.uri.to_string(),
        }
    }
}

/// `key` as written: a path, or a URI.
pub(super) enum KeyText {
    File(PathBuf),
    Uri(Pkcs11Uri),
}

/// Checks the `key` value alone.
pub(super) fn key_text(base: &Path, text: String) -> Result<KeyText, Problem> {
    if Pkcs11Uri::is_uri(&text) {
        return Pkcs11Uri::parse(&text)
            .map(KeyText::Uri)
            .map_err(|err| Problem::new(err.message).hint(err.hint));
    }
    file_path(base, text).map(KeyText::File)
}

/// The raw `pkcs11_*` keys of a section.
pub(super) struct RawTokenKeys {
    pub(super) module: Opt<String>,
    pub(super) pin_file: Opt<String>,
    pub(super) pin_credential: Opt<String>,
}

const MODULE_EXAMPLE: &str = r#"pkcs11_module = "/usr/lib/softhsm/libsofthsm2.so""#;

/// Combines `key` (already checked) with the `pkcs11_*` keys of the same section.
pub(super) fn key_source(
    s: &mut Section<'_, '_>,
    key: Option<KeyText>,
    raw: RawTokenKeys,
    base: &Path,
) -> Option<KeySource> {
    let path = |p: String| file_path(base, p);
    let present: Vec<&str> = [
        ("pkcs11_module", raw.module.is_some()),
        ("pkcs11_pin_file", raw.pin_file.is_some()),
        ("pkcs11_pin_credential", raw.pin_credential.is_some()),
    ]
    .into_iter()
    .filter_map(|(field, set)| set.then_some(field))
    .collect();
    let module = s.optional("pkcs11_module", raw.module, None, |p| path(p).map(Some));
    let pin_file = s.optional("pkcs11_pin_file", raw.pin_file, None, |p| path(p).map(Some));
    let pin_credential = s.optional("pkcs11_pin_credential", raw.pin_credential, None, |name| {
        PinSource::credential_name(&name)
            .map(|()| Some(name))
            .map_err(|why| Problem::new(why).hint(r#"e.g. pkcs11_pin_credential = "pkcs11-pin""#))
    });
    let uri = match key? {
        KeyText::File(file) => {
            for field in present {
                let problem =
                    Problem::new(format!("{field} is only used when key is a pkcs11: URI"))
                        .hint(r#"write key = "pkcs11:token=...;object=...", or remove it"#);
                s.conflict(field, problem);
            }
            return Some(KeySource::File(file));
        }
        KeyText::Uri(uri) => uri,
    };
    let (module, pin_file, pin_credential) = (module?, pin_file?, pin_credential?);
    let Some(module) = module.or_else(|| uri.module_path.clone()) else {
        let problem = Problem::new("the key is in a PKCS#11 token but no module is named").hint(
            format!("add {MODULE_EXAMPLE} (tpm2-pkcs11: /usr/lib/<arch>/pkcs11/libtpm2_pkcs11.so)"),
        );
        s.conflict("key", problem);
        return None;
    };
    let mut sources = Vec::new();
    if let Some(file) = pin_file {
        sources.push(("pkcs11_pin_file", PinSource::File(file)));
    }
    if let Some(name) = pin_credential {
        sources.push(("pkcs11_pin_credential", PinSource::Credential(name)));
    }
    if let Some(file) = uri.pin_source.clone() {
        sources.push(("key", PinSource::File(file)));
    }
    match sources.len() {
        1 => {
            let (_, pin) = sources.remove(0);
            Some(KeySource::Pkcs11(Pkcs11Key { uri, module, pin }))
        }
        0 => {
            let problem = Problem::new("the key is in a PKCS#11 token but no PIN source is named")
                .hint(r#"add pkcs11_pin_file = "/etc/blindgate/pkcs11-pin" (mode 0600) or pkcs11_pin_credential = "pkcs11-pin" (systemd LoadCredential=); never the PIN itself"#);
            s.conflict("key", problem);
            None
        }
        _ => {
            let names: Vec<&str> = sources.iter().map(|(field, _)| *field).collect();
            let problem = Problem::new(format!("more than one PIN source: {}", names.join(", ")))
                .hint(
                    "keep one of pkcs11_pin_file, pkcs11_pin_credential and the URI's pin-source",
                );
            s.conflict(names[1], problem);
            None
        }
    }
}
