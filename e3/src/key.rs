//! Device identities and device keys.
//!
//! A [`DeviceKey`] is one of a device's 32-byte keys together with what names it
//! (device id, key id) and the suite it seals with. It keeps the initialised cipher, so
//! sealing and opening do no key schedule per message. Key bytes and cipher state are
//! zeroized on drop, and `Debug` never prints them.

use core::fmt;

use aead::KeyInit;
use aead::rand_core::CryptoRngCore;
use aes_gcm::Aes256Gcm;
use chacha20poly1305::ChaCha20Poly1305;
use zeroize::Zeroizing;

use crate::error::HeaderError;
use crate::header::{MAX_DEVICE_ID_LEN, Suite, validate_device_id};

/// Length of every device key.
pub const KEY_LEN: usize = 32;

/// A valid device id: 1..=64 bytes of `[A-Za-z0-9._-]`. Stored inline (no allocation).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId {
    len: u8,
    bytes: [u8; MAX_DEVICE_ID_LEN],
}

impl DeviceId {
    /// Checks `id` against the spec's device id rules.
    ///
    /// # Errors
    /// [`HeaderError::IdLen`] or [`HeaderError::DeviceId`].
    pub fn new(id: &str) -> Result<Self, HeaderError> {
        let valid = validate_device_id(id.as_bytes())?;
        let mut bytes = [0u8; MAX_DEVICE_ID_LEN];
        let len = valid.len();
        bytes
            .get_mut(..len)
            .ok_or(HeaderError::IdLen(u8::MAX))?
            .copy_from_slice(valid.as_bytes());
        Ok(Self {
            len: u8::try_from(len).map_err(|_| HeaderError::IdLen(u8::MAX))?,
            bytes,
        })
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        let bytes = self.bytes.get(..usize::from(self.len)).unwrap_or_default();
        // Validated as ASCII at construction.
        core::str::from_utf8(bytes).unwrap_or_default()
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl core::str::FromStr for DeviceId {
    type Err = HeaderError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// The initialised AEAD for a key. Both types zeroize their state on drop.
#[allow(
    clippy::large_enum_variant,
    reason = "one per key, never moved in a hot path; boxing would need alloc in the core"
)]
pub(crate) enum Cipher {
    Aes(Aes256Gcm),
    ChaCha(ChaCha20Poly1305),
}

/// One device key: 32 secret bytes, the device and key id they belong to, and the suite.
pub struct DeviceKey {
    device_id: DeviceId,
    key_id: u32,
    suite: Suite,
    secret: Zeroizing<[u8; KEY_LEN]>,
    pub(crate) cipher: Cipher,
}

impl DeviceKey {
    /// Builds a key from its parts.
    pub fn new(device_id: DeviceId, key_id: u32, suite: Suite, secret: [u8; KEY_LEN]) -> Self {
        let secret = Zeroizing::new(secret);
        let cipher = match suite {
            Suite::Aes256Gcm => Cipher::Aes(Aes256Gcm::new((&*secret).into())),
            Suite::ChaCha20Poly1305 => Cipher::ChaCha(ChaCha20Poly1305::new((&*secret).into())),
        };
        Self {
            device_id,
            key_id,
            suite,
            secret,
            cipher,
        }
    }

    /// Draws a fresh key from `rng` (use a CSPRNG such as `OsRng`).
    pub fn generate(
        device_id: DeviceId,
        key_id: u32,
        suite: Suite,
        rng: &mut impl CryptoRngCore,
    ) -> Self {
        let mut secret = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill_bytes(&mut *secret);
        Self::new(device_id, key_id, suite, *secret)
    }

    /// The device this key belongs to.
    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    /// Which of the device's keys this is.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The suite this key seals with.
    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// The secret bytes, for writing a key file. Handle with care: never log them.
    pub fn secret_bytes(&self) -> &[u8; KEY_LEN] {
        &self.secret
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceKey")
            .field("device_id", &self.device_id)
            .field("key_id", &self.key_id)
            .field("suite", &self.suite)
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_rules() {
        assert_eq!(DeviceId::new("pump-17").expect("valid").as_str(), "pump-17");
        assert_eq!(DeviceId::new(""), Err(HeaderError::IdLen(0)));
        assert_eq!(DeviceId::new(&"a".repeat(65)), Err(HeaderError::IdLen(65)));
        assert!(DeviceId::new(&"a".repeat(64)).is_ok());
        assert_eq!(
            DeviceId::new("pump/17"),
            Err(HeaderError::DeviceId { index: 4 })
        );
    }

    #[test]
    fn debug_does_not_show_the_secret() {
        let key = DeviceKey::new(
            DeviceId::new("d").expect("valid"),
            1,
            Suite::Aes256Gcm,
            [0xAB; KEY_LEN],
        );
        let shown = format!("{key:?}");
        assert!(shown.contains("redacted"));
        assert!(!shown.to_lowercase().contains("ab, ab") && !shown.contains("171"));
    }
}
