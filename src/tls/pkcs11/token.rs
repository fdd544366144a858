//! Opening the token: load the module (once per process), find the token by label or
//! serial, log in with the PIN, find the private key, and prove with a test signature
//! that the certificate is this key's before TLS ever uses it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::UnparsedPublicKey;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::signer::{Curve, OpenKey, TokenSigningKey, sign_with};
use super::{PinTries, Pkcs11Key, TokenError};

/// Modules loaded and initialised in this process, by path. A module is initialised
/// once and never finalised: a second `C_Initialize` of the same library fails, and
/// finalising it would end the sessions of every other user of it (a reload, the
/// checks of `check-config --reload`).
fn modules() -> &'static Mutex<HashMap<std::path::PathBuf, Pkcs11>> {
    static MODULES: OnceLock<Mutex<HashMap<std::path::PathBuf, Pkcs11>>> = OnceLock::new();
    MODULES.get_or_init(|| Mutex::new(HashMap::new()))
}

fn load_module(path: &Path) -> Result<Pkcs11, TokenError> {
    let mut loaded = modules()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(module) = loaded.get(path) {
        return Ok(module.clone());
    }
    if !path.exists() {
        return Err(TokenError::ModuleNotFound {
            path: path.to_owned(),
        });
    }
    let not_loadable = |reason: String| TokenError::ModuleNotLoadable {
        path: path.to_owned(),
        reason,
    };
    let module = Pkcs11::new(path).map_err(|err| match err {
        CkError::MissingSymbol(symbol) => {
            not_loadable(format!("it has no {symbol}: not a PKCS#11 module"))
        }
        other => not_loadable(other.to_string()),
    })?;
    match module.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(err) => return Err(not_loadable(format!("C_Initialize: {err}"))),
    }
    loaded.insert(path.to_owned(), module.clone());
    Ok(module)
}

fn failed(operation: &'static str) -> impl FnOnce(CkError) -> TokenError {
    move |err| TokenError::Token {
        operation,
        reason: err.to_string(),
    }
}

/// The labels of the initialised tokens the module at `module` shows.
///
/// # Errors
/// [`TokenError`] if the module cannot be loaded or listed.
pub fn token_labels(module: &Path) -> Result<Vec<String>, TokenError> {
    let module = load_module(module)?;
    Ok(tokens(&module)?
        .into_iter()
        .map(|(_, label, _)| label)
        .collect())
}

/// Every slot with a token: (slot, label, serial).
fn tokens(module: &Pkcs11) -> Result<Vec<(Slot, String, String)>, TokenError> {
    let slots = module
        .get_slots_with_token()
        .map_err(failed("C_GetSlotList"))?;
    let mut out = Vec::new();
    for slot in slots {
        let info = module
            .get_token_info(slot)
            .map_err(failed("C_GetTokenInfo"))?;
        if info.token_initialized() {
            out.push((
                slot,
                info.label().to_owned(),
                info.serial_number().to_owned(),
            ));
        }
    }
    Ok(out)
}

/// Opens the key `key` names and checks that `leaf` (from the file `cert`) is its
/// certificate: the token signs a random challenge, the certificate's public key must
/// verify it.
///
/// # Errors
/// [`TokenError`]: module, token, PIN, key or certificate, each with its hint.
pub fn open_token_key(
    key: &Pkcs11Key,
    cert: &Path,
    leaf: &CertificateDer<'_>,
) -> Result<TokenSigningKey, TokenError> {
    let uri = key.uri.to_string();
    let open = open_key(key, &uri)?;
    let curve = key_curve(&open.session, open.key, &uri)?;
    let spki = check_certificate(&open.session, open.key, curve, cert, leaf, &uri)?;
    Ok(TokenSigningKey::new(open, key.clone(), curve, spki))
}

/// Opens the key again after the token lost the session or the login.
///
/// # Errors
/// As [`open_token_key`], without the certificate check (the key is found by the
/// same URI).
pub(super) fn reopen(key: &Pkcs11Key) -> Result<OpenKey, TokenError> {
    open_key(key, &key.uri.to_string())
}

/// Module, token, a new session, login, the key's handle.
fn open_key(key: &Pkcs11Key, uri: &str) -> Result<OpenKey, TokenError> {
    let module_path = key.uri.module_path.as_deref().unwrap_or(&key.module);
    let module = load_module(module_path)?;
    let (slot, label) = find_token(&module, key)?;
    let session = module
        .open_ro_session(slot)
        .map_err(failed("C_OpenSession"))?;
    log_in(&module, &session, slot, &label, key)?;
    let handle = find_key(&session, key, uri)?;
    Ok(OpenKey {
        session,
        key: handle,
    })
}

fn find_token(module: &Pkcs11, key: &Pkcs11Key) -> Result<(Slot, String), TokenError> {
    let present = tokens(module)?;
    let wanted = |label: &str, serial: &str| {
        key.uri.token.as_deref().is_none_or(|t| t == label)
            && key.uri.serial.as_deref().is_none_or(|s| s == serial)
    };
    if let Some((slot, label, _)) = present.iter().find(|(_, l, s)| wanted(l, s)) {
        return Ok((*slot, label.clone()));
    }
    let mut what = Vec::new();
    if let Some(token) = &key.uri.token {
        what.push(format!("label {token:?}"));
    }
    if let Some(serial) = &key.uri.serial {
        what.push(format!("serial {serial:?}"));
    }
    Err(TokenError::TokenNotFound {
        wanted: what.join(" "),
        present: present.into_iter().map(|(_, label, _)| label).collect(),
    })
}

fn log_in(
    module: &Pkcs11,
    session: &Session,
    slot: Slot,
    label: &str,
    key: &Pkcs11Key,
) -> Result<(), TokenError> {
    let locked = || TokenError::PinLocked {
        token: label.to_owned(),
    };
    let info = module
        .get_token_info(slot)
        .map_err(failed("C_GetTokenInfo"))?;
    if info.user_pin_locked() {
        return Err(locked());
    }
    let pin = key.pin.read()?;
    match session.login(UserType::User, Some(&pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(locked()),
        Err(CkError::Pkcs11(
            RvError::PinIncorrect | RvError::PinLenRange | RvError::PinInvalid,
            _,
        )) => Err(TokenError::WrongPin {
            token: label.to_owned(),
            tries: pin_tries(module, slot),
        }),
        Err(err) => Err(failed("C_Login")(err)),
    }
}

/// What the token's flags say about the PIN attempts left (read after a failure).
fn pin_tries(module: &Pkcs11, slot: Slot) -> PinTries {
    match module.get_token_info(slot) {
        Ok(info) if info.user_pin_locked() => PinTries::Locked,
        Ok(info) if info.user_pin_final_try() => PinTries::FinalTry,
        Ok(info) if info.user_pin_count_low() => PinTries::Low,
        _ => PinTries::Unknown,
    }
}

fn find_key(session: &Session, key: &Pkcs11Key, uri: &str) -> Result<ObjectHandle, TokenError> {
    let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
    if let Some(object) = &key.uri.object {
        template.push(Attribute::Label(object.as_bytes().to_vec()));
    }
    if let Some(id) = &key.uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    let found = session
        .find_objects(&template)
        .map_err(failed("C_FindObjects"))?;
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(TokenError::KeyNotFound {
            uri: uri.to_owned(),
            present: private_key_labels(session),
        }),
        many => Err(TokenError::KeyAmbiguous {
            uri: uri.to_owned(),
            count: many.len(),
        }),
    }
}

/// Labels of the private keys visible in `session`, sorted (empty if they cannot be
/// listed).
fn private_key_labels(session: &Session) -> Vec<String> {
    let keys = session
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .unwrap_or_default();
    let mut labels: Vec<String> = keys
        .into_iter()
        .filter_map(|handle| session.get_attributes(handle, &[AttributeType::Label]).ok())
        .flatten()
        .filter_map(|attribute| match attribute {
            Attribute::Label(label) => Some(String::from_utf8_lossy(&label).into_owned()),
            _ => None,
        })
        .collect();
    labels.sort();
    labels
}

fn key_curve(session: &Session, handle: ObjectHandle, uri: &str) -> Result<Curve, TokenError> {
    let attributes = session
        .get_attributes(handle, &[AttributeType::KeyType, AttributeType::EcParams])
        .map_err(failed("C_GetAttributeValue"))?;
    let mut key_type = None;
    let mut params = None;
    for attribute in attributes {
        match attribute {
            Attribute::KeyType(kind) => key_type = Some(kind),
            Attribute::EcParams(p) => params = Some(p),
            _ => {}
        }
    }
    let unsupported = |what: String| TokenError::UnsupportedKey {
        uri: uri.to_owned(),
        what,
    };
    match (key_type, params) {
        (Some(KeyType::EC), Some(params)) => Curve::from_ec_params(&params)
            .ok_or_else(|| unsupported("an EC key on another curve".to_owned())),
        (Some(kind), _) => Err(unsupported(format!("a {kind} key"))),
        (None, _) => Err(unsupported("a key of unknown type".to_owned())),
    }
}

/// Signs a random challenge in the token and verifies it with the certificate's
/// public key; returns the certificate's SubjectPublicKeyInfo.
fn check_certificate(
    session: &Session,
    handle: ObjectHandle,
    curve: Curve,
    cert: &Path,
    leaf: &CertificateDer<'_>,
    uri: &str,
) -> Result<Vec<u8>, TokenError> {
    let mismatch = || TokenError::CertificateMismatch {
        cert: cert.to_owned(),
        uri: uri.to_owned(),
    };
    let (_, parsed) = X509Certificate::from_der(leaf.as_ref()).map_err(|_| mismatch())?;
    let spki = parsed.public_key();
    let mut challenge = *b"blindgate pkcs11 key check: ....................";
    let random_tail = challenge.len() - 20;
    SystemRandom::new()
        .fill(&mut challenge[random_tail..])
        .map_err(|_| TokenError::Token {
            operation: "challenge",
            reason: "no system randomness".to_owned(),
        })?;
    let signature =
        sign_with(session, handle, curve, &challenge).map_err(|reason| TokenError::Token {
            operation: "C_Sign",
            reason: reason.to_string(),
        })?;
    UnparsedPublicKey::new(curve.verifier(), spki.subject_public_key.data.as_ref())
        .verify(&challenge, &signature)
        .map_err(|_| mismatch())?;
    Ok(spki.raw.to_vec())
}
