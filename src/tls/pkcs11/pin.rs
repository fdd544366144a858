//! Where the token's user PIN comes from: a file only the service user may read, or a
//! systemd credential (`LoadCredential=`, read from `$CREDENTIALS_DIRECTORY`). The PIN
//! is held in memory that is wiped when dropped and is never logged.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::TokenError;

/// Where the PIN is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file holding only the PIN (one trailing newline is ignored). It must not be
    /// readable by group or others.
    File(PathBuf),
    /// The systemd credential of this name: `$CREDENTIALS_DIRECTORY/<name>`.
    Credential(String),
}

impl PinSource {
    /// Checks a credential name: a plain file name.
    ///
    /// # Errors
    /// A description of what is wrong.
    pub fn credential_name(name: &str) -> Result<(), String> {
        let plain = !name.is_empty()
            && name != "."
            && name != ".."
            && !name.contains('/')
            && name.chars().all(|c| c.is_ascii_graphic());
        match plain {
            true => Ok(()),
            false => Err(format!(
                "`{name}` is not a credential name (a plain file name, as in LoadCredential=pkcs11-pin:/etc/blindgate/pin)"
            )),
        }
    }

    /// The file the PIN is read from now.
    ///
    /// # Errors
    /// [`TokenError::Pin`] for a credential when `$CREDENTIALS_DIRECTORY` is not set.
    pub fn path(&self) -> Result<PathBuf, TokenError> {
        match self {
            Self::File(path) => Ok(path.clone()),
            Self::Credential(name) => match std::env::var_os("CREDENTIALS_DIRECTORY") {
                Some(dir) => Ok(Path::new(&dir).join(name)),
                None => Err(TokenError::Pin(format!(
                    "the PIN is the systemd credential {name:?} but $CREDENTIALS_DIRECTORY is not set (add LoadCredential={name}:/path/to/pin to the unit)"
                ))),
            },
        }
    }

    /// Reads the PIN.
    ///
    /// # Errors
    /// [`TokenError::Pin`] if the file is missing, unreadable, readable by group or
    /// others, or empty. The message names the file, never its content.
    pub(super) fn read(&self) -> Result<AuthPin, TokenError> {
        self.read_text().map(|pin| AuthPin::from(pin.as_str()))
    }

    fn read_text(&self) -> Result<Zeroizing<String>, TokenError> {
        let path = self.path()?;
        let file = path.display();
        let meta = fs::metadata(&path).map_err(|err| TokenError::Pin(format!("{file}: {err}")))?;
        let mode = meta.mode() & 0o777;
        if matches!(self, Self::File(_)) && mode & 0o077 != 0 {
            return Err(TokenError::Pin(format!(
                "the PIN file {file} is accessible by group or others (mode {mode:04o}); chmod 0600 it, owned by the service user"
            )));
        }
        let bytes = Zeroizing::new(
            fs::read(&path).map_err(|err| TokenError::Pin(format!("{file}: {err}")))?,
        );
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| TokenError::Pin(format!("the PIN in {file} is not UTF-8 text")))?;
        let pin = text
            .strip_suffix('\n')
            .map_or(text, |t| t.strip_suffix('\r').unwrap_or(t));
        if pin.is_empty() {
            return Err(TokenError::Pin(format!("{file} is empty")));
        }
        Ok(Zeroizing::new(pin.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn pin_file(dir: &Path, content: &str, mode: u32) -> PinSource {
        let path = dir.join("pin");
        fs::write(&path, content).expect("write pin");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        PinSource::File(path)
    }

    #[test]
    fn a_private_pin_file_is_read_without_its_newline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pin = pin_file(dir.path(), "123456\r\n", 0o600);
        assert_eq!(pin.read_text().expect("reads").as_str(), "123456");
    }

    #[test]
    fn a_readable_empty_or_missing_pin_file_is_refused_without_its_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = pin_file(dir.path(), "654321", 0o640)
            .read()
            .expect_err("0640");
        assert!(err.to_string().contains("mode 0640"), "{err}");
        assert!(!err.to_string().contains("654321"));
        let err = pin_file(dir.path(), "\n", 0o600).read().expect_err("empty");
        assert!(err.to_string().contains("is empty"), "{err}");
        let err = PinSource::File(dir.path().join("absent"))
            .read()
            .expect_err("absent");
        assert!(err.to_string().contains("absent"), "{err}");
    }

    #[test]
    fn credential_names_are_plain_file_names() {
        assert!(PinSource::credential_name("pkcs11-pin").is_ok());
        for bad in ["", ".", "..", "a/b", "a b"] {
            assert!(PinSource::credential_name(bad).is_err(), "{bad:?}");
        }
    }
}
