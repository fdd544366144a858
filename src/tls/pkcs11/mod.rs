//! The gateway's private keys (the uplink's, optionally the device listener's) in a
//! PKCS#11 token (a TPM 2.0 through `tpm2-pkcs11`, a secure element, SoftHSM2): the
//! key signs inside the token and is never exported.
//!
//! - [`Pkcs11Key`]: what the config names (module, `pkcs11:` URI, where the PIN is).
//! - [`open_token_key`]: loads the module, finds the token, logs in, finds the key and
//!   proves it belongs to the certificate; the result is a rustls `SigningKey`.
//! - [`TokenError`]: every way that can fail, each with a hint for the operator; no
//!   error ever holds the PIN.
//!
//! Supported keys: EC P-256 (TLS scheme `ecdsa_secp256r1_sha256`) and EC P-384
//! (`ecdsa_secp384r1_sha384`), signed with the token's `CKM_ECDSA` over a digest
//! computed here. RSA keys are not supported.

mod pin;
mod signer;
mod token;
mod uri;

use std::path::PathBuf;

pub use pin::PinSource;
pub use signer::TokenSigningKey;
pub use token::{open_token_key, token_labels};
pub use uri::{Pkcs11Uri, UriError};

/// A private key in a PKCS#11 token, as the config names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Key {
    /// Which token and which key.
    pub uri: Pkcs11Uri,
    /// The PKCS#11 module (shared library) to load.
    pub module: PathBuf,
    /// Where the user PIN is read from (never the config itself).
    pub pin: PinSource,
}

/// How many PIN attempts the token says remain, from its token flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinTries {
    /// The token does not say.
    Unknown,
    /// CKF_USER_PIN_COUNT_LOW: an attempt failed; few remain.
    Low,
    /// CKF_USER_PIN_FINAL_TRY: the next wrong PIN locks it.
    FinalTry,
    /// CKF_USER_PIN_LOCKED.
    Locked,
}

/// Why the token's key cannot be used. The text never holds a PIN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The module file does not exist.
    #[error("PKCS#11 module {} not found", .path.display())]
    ModuleNotFound {
        /// The configured module.
        path: PathBuf,
    },
    /// The module exists but cannot be loaded or initialised.
    #[error("PKCS#11 module {} cannot be loaded: {reason}", .path.display())]
    ModuleNotLoadable {
        /// The configured module.
        path: PathBuf,
        /// What the loader or the module said.
        reason: String,
    },
    /// No token with the URI's label or serial.
    #[error("no PKCS#11 token {wanted} (tokens present: {})", list_or_none(.present))]
    TokenNotFound {
        /// `label "x"` or `serial "y"`.
        wanted: String,
        /// The labels of the tokens the module shows.
        present: Vec<String>,
    },
    /// The PIN could not be read.
    #[error("cannot read the PKCS#11 PIN: {0}")]
    Pin(String),
    /// The token refused the PIN.
    #[error("the token {token:?} refused the PIN{}", tries_text(*.tries))]
    WrongPin {
        /// The token's label.
        token: String,
        /// What the token says about the attempts left.
        tries: PinTries,
    },
    /// The user PIN is locked.
    #[error("the user PIN of token {token:?} is locked")]
    PinLocked {
        /// The token's label.
        token: String,
    },
    /// No private key matches the URI.
    #[error("no private key {uri} in the token (private keys present: {})", list_or_none(.present))]
    KeyNotFound {
        /// The URI as understood.
        uri: String,
        /// Labels of the private keys the token shows after login.
        present: Vec<String>,
    },
    /// More than one private key matches.
    #[error("{count} private keys match {uri}")]
    KeyAmbiguous {
        /// The URI as understood.
        uri: String,
        /// How many match.
        count: usize,
    },
    /// The key is not of a supported type.
    #[error("the token's key {uri} is {what}; only EC P-256 and P-384 keys are supported")]
    UnsupportedKey {
        /// The URI as understood.
        uri: String,
        /// What it is.
        what: String,
    },
    /// The certificate is not the key's.
    #[error("the certificate {} does not match the token's key {uri}", .cert.display())]
    CertificateMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The URI as understood.
        uri: String,
    },
    /// A PKCS#11 call failed.
    #[error("PKCS#11 {operation} failed: {reason}")]
    Token {
        /// What was being done.
        operation: &'static str,
        /// What the module said.
        reason: String,
    },
}

impl TokenError {
    /// True if trying again with the same PIN only uses up the token's retry limit (a
    /// refused or locked PIN): the gateway then exits so that systemd does not restart
    /// it (`RestartPreventExitStatus=`), and waits for the operator.
    pub fn uses_up_pin_tries(&self) -> bool {
        matches!(self, Self::WrongPin { .. } | Self::PinLocked { .. })
    }

    /// What the operator can do about it.
    pub fn hint(&self) -> String {
        match self {
            Self::ModuleNotFound { .. } => "install the module's package (softhsm2, libtpm2-pkcs11-1, your secure element's) or correct pkcs11_module".to_owned(),
            Self::ModuleNotLoadable { .. } => "is it a PKCS#11 module built for this architecture? `pkcs11-tool --module <path> -L` tests it".to_owned(),
            Self::TokenNotFound { present, .. } if present.is_empty() => "the module shows no initialised token: initialise one (softhsm2-util --init-token, tpm2_ptool addtoken), and check that the service user can reach the token's store".to_owned(),
            Self::TokenNotFound { .. } => "set token= in the pkcs11: URI to one of the labels present".to_owned(),
            Self::Pin(_) => "the PIN comes from pkcs11_pin_file (mode 0600, owned by the service user) or from the systemd credential pkcs11_pin_credential (LoadCredential=)".to_owned(),
            Self::WrongPin { tries: PinTries::FinalTry, .. } => "one try remains before the PIN locks: fix the PIN file, then start the service again (it is not restarted by itself after a refused PIN)".to_owned(),
            Self::WrongPin { .. } => "put the token's user PIN into the PIN file (only the PIN, one line), then start the service again: each wrong PIN counts against the token's retry limit, so the gateway is not restarted by itself after one".to_owned(),
            Self::PinLocked { .. } => "the security officer must unlock it (softhsm2-util/pkcs11-tool --init-pin with the SO PIN, tpm2_ptool changepin)".to_owned(),
            Self::KeyNotFound { .. } => "check object= (CKA_LABEL) and id= in the pkcs11: URI against `pkcs11-tool --module <path> --login -O`".to_owned(),
            Self::KeyAmbiguous { .. } => "add id= (or a more precise object=) to the pkcs11: URI".to_owned(),
            Self::UnsupportedKey { .. } => "generate an EC P-256 key in the token (see docs/PKCS11.md)".to_owned(),
            Self::CertificateMismatch { .. } => "the certificate was issued for another key: issue one for the token's public key (see docs/PKCS11.md), or correct the URI".to_owned(),
            Self::Token { .. } => "see the module's own logs; `pkcs11-tool --module <path> -L` shows what it sees".to_owned(),
        }
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items
            .iter()
            .map(|item| format!("{item:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn tries_text(tries: PinTries) -> &'static str {
    match tries {
        PinTries::Unknown => "",
        PinTries::Low => " (the token says few tries remain before it locks)",
        PinTries::FinalTry => " (the token says one try remains before it locks)",
        PinTries::Locked => " (the token says the PIN is now locked)",
    }
}
