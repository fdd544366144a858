//! `check-config` for a key in a PKCS#11 token: the same steps the gateway takes at
//! start (load the module, find the token, log in, find the key, prove the
//! certificate is the key's), each failure reported at `cloud.key` or `devices.key` with its hint.

use std::path::Path;

use super::diagnostics::Problem;
use crate::tls::load_certs;
use crate::tls::pkcs11::{Pkcs11Key, open_token_key};

/// The problem with the token key `key` and the certificate file `cert`, if any.
/// A certificate file that cannot be read is not reported here (the certificate
/// checks report it).
pub(super) fn token_key_problem(key: &Pkcs11Key, cert: &Path) -> Option<Problem> {
    let chain = load_certs(cert).ok()?;
    let leaf = chain.first()?;
    let error = open_token_key(key, cert, leaf).err()?;
    let problem = Problem::new(error.to_string()).hint(error.hint());
    Some(match error.uses_up_pin_tries() {
        true => problem.harmful_to_retry(),
        false => problem,
    })
}
