//! A rustls `SigningKey` whose private key stays in the token: TLS hands over the
//! handshake transcript, the digest is computed here (SHA-256 or SHA-384), the token
//! signs it with `CKM_ECDSA`, and its raw `r || s` is re-encoded as the DER
//! `ECDSA-Sig-Value` TLS 1.3 carries. One logged-in session, behind a mutex (signing
//! happens once per handshake). If the token lost the session or the login (a TPM
//! resource manager restarted, a token reset), the session is opened again once and
//! the signature retried.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use ring::digest;
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use rustls_pki_types::SubjectPublicKeyInfoDer;

use super::Pkcs11Key;
use crate::log_limit::LogLimiter;

/// A failing token is logged at most once a minute per kind of failure.
const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The EC curves the token key may be on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Curve {
    /// secp256r1: `ecdsa_secp256r1_sha256`.
    P256,
    /// secp384r1: `ecdsa_secp384r1_sha384`.
    P384,
}

impl Curve {
    /// The curve named by a DER `CKA_EC_PARAMS` (an OID), if supported.
    pub(super) fn from_ec_params(params: &[u8]) -> Option<Self> {
        const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
        match params {
            P256 => Some(Self::P256),
            P384 => Some(Self::P384),
            _ => None,
        }
    }

    pub(super) fn scheme(self) -> SignatureScheme {
        match self {
            Self::P256 => SignatureScheme::ECDSA_NISTP256_SHA256,
            Self::P384 => SignatureScheme::ECDSA_NISTP384_SHA384,
        }
    }

    fn digest(self) -> &'static digest::Algorithm {
        match self {
            Self::P256 => &digest::SHA256,
            Self::P384 => &digest::SHA384,
        }
    }

    /// ring's verifier for this curve's DER signatures (the certificate check).
    pub(super) fn verifier(self) -> &'static ring::signature::EcdsaVerificationAlgorithm {
        match self {
            Self::P256 => &ring::signature::ECDSA_P256_SHA256_ASN1,
            Self::P384 => &ring::signature::ECDSA_P384_SHA384_ASN1,
        }
    }

    /// Bytes of `r` (and of `s`) in the token's raw signature.
    fn scalar_len(self) -> usize {
        match self {
            Self::P256 => 32,
            Self::P384 => 48,
        }
    }
}

/// The token's private key, logged in, ready to sign handshakes.
#[derive(Clone)]
pub struct TokenSigningKey {
    inner: Arc<Inner>,
}

struct Inner {
    open: Mutex<OpenKey>,
    /// What to open again if the session is lost.
    source: Pkcs11Key,
    curve: Curve,
    /// The certificate's SubjectPublicKeyInfo (proven to be this key's).
    spki: Vec<u8>,
    /// The URI, for logs.
    uri: String,
    logs: LogLimiter,
}

impl fmt::Debug for TokenSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigningKey")
            .field("uri", &self.inner.uri)
            .field("curve", &self.inner.curve)
            .finish_non_exhaustive()
    }
}

/// A logged-in session and the key's handle in it.
pub(super) struct OpenKey {
    pub(super) session: Session,
    pub(super) key: ObjectHandle,
}

impl TokenSigningKey {
    pub(super) fn new(open: OpenKey, source: Pkcs11Key, curve: Curve, spki: Vec<u8>) -> Self {
        Self {
            inner: Arc::new(Inner {
                open: Mutex::new(open),
                uri: source.uri.to_string(),
                source,
                curve,
                spki,
                logs: LogLimiter::new(LOG_INTERVAL),
            }),
        }
    }

    /// The TLS signature scheme this key signs with.
    pub fn scheme(&self) -> SignatureScheme {
        self.inner.curve.scheme()
    }

    /// Signs `message` in the token; the DER `ECDSA-Sig-Value`.
    ///
    /// # Errors
    /// The module's error, as text.
    pub fn sign_message(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let inner = &self.inner;
        let mut open = inner
            .open
            .lock()
            .map_err(|_| "the token session is unusable after a panic".to_owned())?;
        match sign_with(&open.session, open.key, inner.curve, message) {
            Err(SignError::Token(err)) if session_lost(&err) => {
                if let Some(suppressed) = inner.logs.check("session_lost") {
                    tracing::warn!(key = %inner.uri, suppressed, "the PKCS#11 session was lost ({err}); opening it again");
                }
                *open = super::token::reopen(&inner.source).map_err(|err| err.to_string())?;
                sign_with(&open.session, open.key, inner.curve, message)
                    .map_err(|err| err.to_string())
            }
            other => other.map_err(|err| err.to_string()),
        }
    }
}

/// Errors the token gives when the session or the login is gone, not the key.
fn session_lost(err: &CkError) -> bool {
    matches!(
        err,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::CryptokiNotInitialized,
            _
        )
    )
}

/// Why a signature failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum SignError {
    /// The token refused.
    #[error("{0}")]
    Token(CkError),
    /// The token's answer is not `r || s` for the curve.
    #[error("the token returned a {0}-byte signature")]
    Length(usize),
}

/// Signs `message` with `key` in `session`: digest here, `CKM_ECDSA` in the token.
pub(super) fn sign_with(
    session: &Session,
    key: ObjectHandle,
    curve: Curve,
    message: &[u8],
) -> Result<Vec<u8>, SignError> {
    let hash = digest::digest(curve.digest(), message);
    let raw = session
        .sign(&Mechanism::Ecdsa, key, hash.as_ref())
        .map_err(SignError::Token)?;
    raw_to_der(&raw, curve.scalar_len()).ok_or(SignError::Length(raw.len()))
}

impl SigningKey for TokenSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&self.scheme())
            .then(|| Box::new(self.clone()) as Box<dyn Signer>)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.inner.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

impl Signer for TokenSigningKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.sign_message(message).map_err(|reason| {
            if let Some(suppressed) = self.inner.logs.check("sign_failed") {
                tracing::error!(key = %self.inner.uri, suppressed, "the PKCS#11 token did not sign the handshake: {reason}");
            }
            rustls::Error::General(format!("PKCS#11 token did not sign: {reason}"))
        })
    }

    fn scheme(&self) -> SignatureScheme {
        TokenSigningKey::scheme(self)
    }
}

/// `r || s` (each `len` bytes, as PKCS#11 returns them) to DER
/// `SEQUENCE { INTEGER r, INTEGER s }`; `None` if `raw` is not `2 * len` bytes.
pub(super) fn raw_to_der(raw: &[u8], len: usize) -> Option<Vec<u8>> {
    if raw.len() != 2 * len {
        return None;
    }
    let (r, s) = raw.split_at(len);
    let mut body = der_integer(r);
    body.extend(der_integer(s));
    let mut out = vec![0x30];
    push_len(&mut out, body.len());
    out.extend(body);
    Some(out)
}

/// A DER INTEGER from unsigned big-endian bytes: leading zeros dropped, a zero
/// prepended if the top bit is set.
fn der_integer(bytes: &[u8]) -> Vec<u8> {
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    let digits = match &bytes[first..] {
        [] => &[0u8][..],
        rest => rest,
    };
    let pad = digits.first().is_some_and(|&b| b & 0x80 != 0);
    let mut out = vec![0x02];
    push_len(&mut out, digits.len() + usize::from(pad));
    if pad {
        out.push(0);
    }
    out.extend_from_slice(digits);
    out
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        // ECDSA signatures up to P-521 stay below 256 bytes.
        out.push(0x81);
        out.push(u8::try_from(len).unwrap_or(u8::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
        UnparsedPublicKey,
    };

    #[test]
    fn a_raw_ring_signature_becomes_a_der_one_ring_verifies() {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("generate");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("parse");
        let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, pair.public_key().as_ref());
        for round in 0..64u8 {
            let message = [round; 40];
            let raw = pair.sign(&rng, &message).expect("sign");
            let der = raw_to_der(raw.as_ref(), 32).expect("64 bytes");
            public.verify(&message, &der).expect("verifies");
        }
    }

    #[test]
    fn integers_are_minimal_and_positive() {
        assert_eq!(der_integer(&[0, 0, 1]), [0x02, 0x01, 0x01]);
        assert_eq!(der_integer(&[0x80]), [0x02, 0x02, 0x00, 0x80]);
        assert_eq!(der_integer(&[0, 0]), [0x02, 0x01, 0x00]);
        assert!(raw_to_der(&[1; 63], 32).is_none());
    }

    #[test]
    fn curves_come_from_their_oids() {
        let p256 = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        assert_eq!(Curve::from_ec_params(&p256), Some(Curve::P256));
        assert_eq!(Curve::from_ec_params(&[0x06, 0x01, 0x00]), None);
    }
}
