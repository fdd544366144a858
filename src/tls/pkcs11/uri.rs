//! RFC 7512 `pkcs11:` URIs naming the gateway's private key in a token: which token
//! (`token`, `serial`), which key (`object`, `id`, `type=private`), and optionally the
//! module (`?module-path=`) and the PIN file (`?pin-source=`). A PIN written into the
//! URI (`pin-value`) is refused: the PIN never sits in the config.

use std::fmt;
use std::path::PathBuf;

/// A parsed `pkcs11:` URI. Every value is percent-decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `token=`: the token's label.
    pub token: Option<String>,
    /// `serial=`: the token's serial number.
    pub serial: Option<String>,
    /// `object=`: the key's label (CKA_LABEL).
    pub object: Option<String>,
    /// `id=`: the key's CKA_ID, as bytes (written percent-encoded, e.g. `%01%02`).
    pub id: Option<Vec<u8>>,
    /// `?module-path=`: the module, when the config does not name it.
    pub module_path: Option<PathBuf>,
    /// `?pin-source=`: a file holding the PIN (a path or a `file:` URI).
    pub pin_source: Option<PathBuf>,
}

/// Why a `pkcs11:` URI was refused; the text is safe to show (it never holds a PIN).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct UriError {
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: String,
}

fn refuse(message: impl Into<String>, hint: impl Into<String>) -> UriError {
    UriError {
        message: message.into(),
        hint: hint.into(),
    }
}

const EXAMPLE: &str = r#"e.g. key = "pkcs11:token=blindgate;object=gateway-key;type=private""#;

impl Pkcs11Uri {
    /// True if `text` is meant as a PKCS#11 URI (starts with `pkcs11:`, any case).
    pub fn is_uri(text: &str) -> bool {
        text.trim()
            .get(..7)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("pkcs11:"))
    }

    /// Parses `pkcs11:path-attributes[?query-attributes]`.
    ///
    /// # Errors
    /// [`UriError`] for a PIN in the URI, an unknown or repeated attribute, bad
    /// percent-encoding, a `type` other than `private`, or a URI that names no token or
    /// no key.
    pub fn parse(text: &str) -> Result<Self, UriError> {
        let text = text.trim();
        if !Self::is_uri(text) {
            return Err(refuse("not a pkcs11: URI", EXAMPLE));
        }
        let rest = &text[7..];
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut uri = Self {
            token: None,
            serial: None,
            object: None,
            id: None,
            module_path: None,
            pin_source: None,
        };
        for attribute in path.split(';').filter(|a| !a.is_empty()) {
            uri.path_attribute(attribute)?;
        }
        for attribute in query.split('&').filter(|a| !a.is_empty()) {
            uri.query_attribute(attribute)?;
        }
        if uri.token.is_none() && uri.serial.is_none() {
            return Err(refuse(
                "the pkcs11: URI names no token",
                format!(
                    "add token=<label> (see `softhsm2-util --show-slots` or `pkcs11-tool -L`); {EXAMPLE}"
                ),
            ));
        }
        if uri.object.is_none() && uri.id.is_none() {
            return Err(refuse(
                "the pkcs11: URI names no key",
                format!("add object=<key label> or id=<%xx bytes>; {EXAMPLE}"),
            ));
        }
        Ok(uri)
    }

    fn path_attribute(&mut self, attribute: &str) -> Result<(), UriError> {
        let (name, raw) = split_attribute(attribute)?;
        let value = decode(name, raw)?;
        let text = || text_value(name, &value);
        match name {
            "token" => set(name, &mut self.token, text()?),
            "serial" => set(name, &mut self.serial, text()?),
            "object" => set(name, &mut self.object, text()?),
            "id" => set(name, &mut self.id, value),
            "type" => match text()?.as_str() {
                "private" => Ok(()),
                other => Err(refuse(
                    format!("type={other} in the pkcs11: URI: the gateway needs its private key"),
                    "write type=private, or leave type out",
                )),
            },
            "pin-value" => Err(pin_in_uri()),
            _ => Err(unknown(name, "token, serial, object, id, type")),
        }
    }

    fn query_attribute(&mut self, attribute: &str) -> Result<(), UriError> {
        let (name, raw) = split_attribute(attribute)?;
        let value = decode(name, raw)?;
        let text = text_value(name, &value)?;
        match name {
            "module-path" => set(name, &mut self.module_path, PathBuf::from(text)),
            "pin-source" => {
                let path = text.strip_prefix("file://").unwrap_or(&text);
                if !path.starts_with('/') {
                    return Err(refuse(
                        format!("pin-source={text} is not an absolute file path"),
                        "write pin-source=/etc/blindgate/pin (or file:///etc/blindgate/pin)",
                    ));
                }
                set(name, &mut self.pin_source, PathBuf::from(path))
            }
            "pin-value" => Err(pin_in_uri()),
            _ => Err(unknown(name, "module-path, pin-source")),
        }
    }
}

impl fmt::Display for Pkcs11Uri {
    /// The URI as the gateway understood it (re-encoded; never with a PIN).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(token) = &self.token {
            parts.push(format!("token={}", encode(token.as_bytes())));
        }
        if let Some(serial) = &self.serial {
            parts.push(format!("serial={}", encode(serial.as_bytes())));
        }
        if let Some(object) = &self.object {
            parts.push(format!("object={}", encode(object.as_bytes())));
        }
        if let Some(id) = &self.id {
            let hex: String = id.iter().map(|b| format!("%{b:02x}")).collect();
            parts.push(format!("id={hex}"));
        }
        parts.push("type=private".to_owned());
        write!(f, "pkcs11:{}", parts.join(";"))
    }
}

fn pin_in_uri() -> UriError {
    refuse(
        "the pkcs11: URI holds a PIN (pin-value); a PIN never goes into the config",
        "remove pin-value and set pkcs11_pin_file (mode 0600) or pkcs11_pin_credential (systemd LoadCredential=) in the same section",
    )
}

fn unknown(name: &str, known: &str) -> UriError {
    refuse(
        format!("unknown attribute `{name}` in the pkcs11: URI"),
        format!("the gateway understands {known}"),
    )
}

fn set<T>(name: &str, slot: &mut Option<T>, value: T) -> Result<(), UriError> {
    if slot.is_some() {
        return Err(refuse(
            format!("`{name}` appears twice in the pkcs11: URI"),
            "keep one",
        ));
    }
    *slot = Some(value);
    Ok(())
}

fn split_attribute(attribute: &str) -> Result<(&str, &str), UriError> {
    attribute.split_once('=').ok_or_else(|| {
        refuse(
            format!("`{attribute}` in the pkcs11: URI is not name=value"),
            EXAMPLE,
        )
    })
}

fn text_value(name: &str, value: &[u8]) -> Result<String, UriError> {
    String::from_utf8(value.to_vec()).map_err(|_| {
        refuse(
            format!("`{name}` in the pkcs11: URI is not UTF-8 text"),
            "only id= may hold arbitrary bytes",
        )
    })
}

/// Percent-decodes one attribute value (RFC 3986 `%xx`).
fn decode(name: &str, raw: &str) -> Result<Vec<u8>, UriError> {
    let bad = || {
        refuse(
            format!("`{name}` in the pkcs11: URI has a bad %-escape"),
            "a byte is written %xx with two hex digits, e.g. id=%01%a2",
        )
    };
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        if byte == b'%' {
            let digits = raw.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(digits, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(byte);
            i += 1;
        }
    }
    Ok(out)
}

fn encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02x}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_uri_parses_and_decodes() {
        let uri = Pkcs11Uri::parse(
            "pkcs11:token=blind%20gate;object=gateway-key;id=%01%A2;type=private?module-path=/usr/lib/x.so&pin-source=file:///etc/pin",
        )
        .expect("parses");
        assert_eq!(uri.token.as_deref(), Some("blind gate"));
        assert_eq!(uri.object.as_deref(), Some("gateway-key"));
        assert_eq!(uri.id.as_deref(), Some(&[0x01, 0xa2][..]));
        assert_eq!(uri.module_path, Some(PathBuf::from("/usr/lib/x.so")));
        assert_eq!(uri.pin_source, Some(PathBuf::from("/etc/pin")));
        assert_eq!(
            uri.to_string(),
            "pkcs11:token=blind%20gate;object=gateway-key;id=%01%a2;type=private"
        );
    }

    #[test]
    fn a_pin_in_the_uri_is_refused_without_echoing_it() {
        for text in [
            "pkcs11:token=t;object=k;pin-value=123456",
            "pkcs11:token=t;object=k?pin-value=123456",
        ] {
            let err = Pkcs11Uri::parse(text).expect_err(text);
            assert!(err.message.contains("pin-value"), "{err}");
            assert!(!err.message.contains("123456") && !err.hint.contains("123456"));
        }
    }

    #[test]
    fn bad_uris_are_refused_with_a_hint() {
        for (text, expect) in [
            ("pkcs11:object=k", "names no token"),
            ("pkcs11:token=t", "names no key"),
            ("pkcs11:token=t;object=k;type=cert", "type=cert"),
            ("pkcs11:token=t;object=k;slot=1", "unknown attribute `slot`"),
            ("pkcs11:token=t;token=u;object=k", "twice"),
            ("pkcs11:token=t;id=%zz", "bad %-escape"),
            ("pkcs11:token=t;id=%1", "bad %-escape"),
            ("pkcs11:token=t;object", "not name=value"),
            ("pkcs11:token=t;object=k?pin-source=pin", "absolute"),
        ] {
            let err = Pkcs11Uri::parse(text).expect_err(text);
            assert!(err.message.contains(expect), "{text}: {err}");
            assert!(!err.hint.is_empty());
        }
    }

    #[test]
    fn only_pkcs11_scheme_is_a_uri() {
        assert!(Pkcs11Uri::is_uri("PKCS11:token=a"));
        assert!(!Pkcs11Uri::is_uri("/etc/blindgate/gateway-client.key"));
        assert!(!Pkcs11Uri::is_uri("pkcs1"));
    }
}
