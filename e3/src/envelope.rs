//! Sealing and opening envelopes.
//!
//! The in-place forms ([`DeviceKey::seal_into`], [`DeviceKey::open_in_place`]) allocate
//! nothing and copy the plaintext at most once; the `alloc` forms wrap them. The whole
//! header is the associated data, so no header byte can change without the tag failing.

use aead::AeadInPlace;
#[cfg(feature = "alloc")]
use aead::rand_core::CryptoRngCore;
#[cfg(feature = "alloc")]
use alloc::vec::Vec;

use crate::error::{KeyMismatch, OpenError, SealError};
use crate::header::{FIXED_OVERHEAD, Header, HeaderFields, Kind, NONCE_LEN, TAG_LEN, write_header};
use crate::key::{Cipher, DeviceKey};

/// Length of the envelope that seals `plaintext_len` bytes for `device_id_len`: `44 + L + n`.
pub const fn envelope_len(device_id_len: usize, plaintext_len: usize) -> usize {
    FIXED_OVERHEAD + device_id_len + plaintext_len
}

/// An envelope opened in place: its header and the plaintext, both borrowing the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened<'a> {
    /// The authenticated header.
    pub header: Header<'a>,
    /// The decrypted payload.
    pub plaintext: &'a [u8],
}

impl Cipher {
    fn encrypt(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], SealError> {
        let tag = match self {
            Self::Aes(c) => c.encrypt_in_place_detached(nonce.into(), aad, buf),
            Self::ChaCha(c) => c.encrypt_in_place_detached(nonce.into(), aad, buf),
        };
        tag.map(Into::into).map_err(|_| SealError::TooLong)
    }

    fn decrypt(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), OpenError> {
        // The tag comparison inside both AEADs is constant-time (`subtle`).
        let result = match self {
            Self::Aes(c) => c.decrypt_in_place_detached(nonce.into(), aad, buf, tag.into()),
            Self::ChaCha(c) => c.decrypt_in_place_detached(nonce.into(), aad, buf, tag.into()),
        };
        result.map_err(|_| OpenError::Decrypt)
    }
}

impl DeviceKey {
    /// Seals `plaintext` into `out` with the given nonce; returns the envelope length.
    ///
    /// The nonce must never repeat under this key: use [`DeviceKey::seal_with_rng`]
    /// unless you are reproducing a test vector.
    ///
    /// # Errors
    /// [`SealError::ZeroSeq`], [`SealError::BufferTooSmall`] or [`SealError::TooLong`].
    pub fn seal_into(
        &self,
        kind: Kind,
        seq: u64,
        nonce: &[u8; NONCE_LEN],
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, SealError> {
        if seq == 0 {
            return Err(SealError::ZeroSeq);
        }
        let fields = HeaderFields {
            kind,
            suite: self.suite(),
            device_id: self.device_id().as_str(),
            key_id: self.key_id(),
            seq,
        };
        let needed = envelope_len(fields.device_id.len(), plaintext.len());
        let out = out
            .get_mut(..needed)
            .ok_or(SealError::BufferTooSmall { needed })?;
        let header_len =
            write_header(out, &fields, nonce).ok_or(SealError::BufferTooSmall { needed })?;
        let (head, body) = out.split_at_mut(header_len);
        let (ciphertext, tag_out) = body.split_at_mut(plaintext.len());
        ciphertext.copy_from_slice(plaintext);
        let tag = self.cipher.encrypt(nonce, head, ciphertext)?;
        tag_out.copy_from_slice(&tag);
        Ok(needed)
    }

    /// Opens an envelope in place: checks the header, that it names this key, and the tag,
    /// then decrypts over the ciphertext. On error the buffer's ciphertext may be garbage.
    ///
    /// # Errors
    /// [`OpenError::Header`] for a malformed header, [`OpenError::WrongKey`] when the
    /// header names another device, key id or suite, [`OpenError::Decrypt`] when the
    /// tag fails.
    pub fn open_in_place<'a>(&self, envelope: &'a mut [u8]) -> Result<Opened<'a>, OpenError> {
        let layout = {
            let header = Header::parse(envelope)?;
            self.check_names_me(&header)?;
            header.layout()
        };
        let (head, body) = envelope.split_at_mut(layout.len);
        let head: &'a [u8] = head;
        let header = layout.header(head).ok_or(OpenError::Decrypt)?;
        let tag_at = body.len().checked_sub(TAG_LEN).ok_or(OpenError::Decrypt)?;
        let (ciphertext, tag) = body.split_at_mut(tag_at);
        let tag: &[u8; TAG_LEN] = (&*tag).try_into().map_err(|_| OpenError::Decrypt)?;
        self.cipher.decrypt(header.nonce(), head, ciphertext, tag)?;
        Ok(Opened {
            header,
            plaintext: ciphertext,
        })
    }

    fn check_names_me(&self, header: &Header<'_>) -> Result<(), OpenError> {
        let mismatch = if header.device_id() != self.device_id().as_str() {
            Some(KeyMismatch::DeviceId)
        } else if header.key_id() != self.key_id() {
            Some(KeyMismatch::KeyId)
        } else if header.suite() != self.suite() {
            Some(KeyMismatch::Suite)
        } else {
            None
        };
        mismatch.map_or(Ok(()), |m| Err(OpenError::WrongKey(m)))
    }

    /// Seals `plaintext` with a fresh random nonce drawn from `rng`.
    ///
    /// # Errors
    /// [`SealError::ZeroSeq`] or [`SealError::TooLong`].
    #[cfg(feature = "alloc")]
    pub fn seal_with_rng(
        &self,
        kind: Kind,
        seq: u64,
        plaintext: &[u8],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let mut out =
            alloc::vec![0u8; envelope_len(self.device_id().as_str().len(), plaintext.len())];
        self.seal_into(kind, seq, &nonce, plaintext, &mut out)?;
        Ok(out)
    }

    /// Seals `plaintext` with a fresh nonce from the operating system's CSPRNG.
    ///
    /// Random 96-bit nonces stay safe for about 2^32 envelopes per key; rotate keys
    /// well before that.
    ///
    /// # Errors
    /// [`SealError::ZeroSeq`] or [`SealError::TooLong`].
    #[cfg(feature = "std")]
    pub fn seal(&self, kind: Kind, seq: u64, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        self.seal_with_rng(kind, seq, plaintext, &mut aead::OsRng)
    }

    /// Opens `envelope` into a new buffer; the header borrows `envelope`.
    ///
    /// # Errors
    /// As [`DeviceKey::open_in_place`].
    #[cfg(feature = "alloc")]
    pub fn open<'a>(&self, envelope: &'a [u8]) -> Result<(Header<'a>, Vec<u8>), OpenError> {
        let header = Header::parse(envelope)?;
        self.check_names_me(&header)?;
        let body = envelope.get(header.len()..).unwrap_or_default();
        let tag_at = body.len().checked_sub(TAG_LEN).ok_or(OpenError::Decrypt)?;
        let (ciphertext, tag) = body.split_at(tag_at);
        let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| OpenError::Decrypt)?;
        let mut plaintext = ciphertext.to_vec();
        self.cipher
            .decrypt(header.nonce(), header.as_bytes(), &mut plaintext, tag)?;
        Ok((header, plaintext))
    }
}
