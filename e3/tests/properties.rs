//! Property tests: parsing never panics, seal/open round-trips, and every single-bit
//! flip anywhere in an envelope is rejected.

use e3::{
    DeviceId, DeviceKey, Header, Kind, OpenError, ReplayWindow, Suite, Verdict, decode_receipt,
};
use proptest::prelude::*;

fn suite() -> impl Strategy<Value = Suite> {
    prop_oneof![Just(Suite::Aes256Gcm), Just(Suite::ChaCha20Poly1305)]
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Uplink), Just(Kind::Command), Just(Kind::Receipt)]
}

fn device_id() -> impl Strategy<Value = DeviceId> {
    "[A-Za-z0-9._-]{1,64}".prop_map(|s| DeviceId::new(&s).expect("strategy yields valid ids"))
}

fn key() -> impl Strategy<Value = DeviceKey> {
    (device_id(), any::<u32>(), suite(), any::<[u8; 32]>())
        .prop_map(|(id, key_id, suite, secret)| DeviceKey::new(id, key_id, suite, secret))
}

proptest! {
    #[test]
    fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(header) = Header::parse(&bytes) {
            prop_assert!(header.len() + 16 <= bytes.len());
            prop_assert_eq!(header.as_bytes(), &bytes[..header.len()]);
        }
        let _ = decode_receipt(&bytes);
    }

    #[test]
    fn parsing_mutated_valid_headers_never_panics(
        key in key(),
        seq in 1u64..,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut envelope = key.seal(Kind::Uplink, seq, b"reading").expect("seals");
        for (at, byte) in edits {
            let i = at.index(envelope.len());
            envelope[i] = byte;
        }
        envelope.truncate(cut.index(envelope.len() + 1));
        let _ = Header::parse(&envelope);
        let _ = key.open(&envelope);
    }

    #[test]
    fn seal_then_open_round_trips(
        key in key(),
        kind in kind(),
        seq in 1u64..,
        plaintext in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let envelope = key.seal(kind, seq, &plaintext).expect("seals");
        prop_assert_eq!(envelope.len(), e3::envelope_len(key.device_id().as_str().len(), plaintext.len()));
        let (header, opened) = key.open(&envelope).expect("opens");
        prop_assert_eq!(opened, plaintext);
        prop_assert_eq!(header.kind(), kind);
        prop_assert_eq!(header.seq(), seq);
        prop_assert_eq!(header.key_id(), key.key_id());
        prop_assert_eq!(header.device_id(), key.device_id().as_str());
    }

    #[test]
    fn any_single_bit_flip_is_rejected(
        key in key(),
        kind in kind(),
        seq in 1u64..,
        plaintext in proptest::collection::vec(any::<u8>(), 0..256),
        bit in any::<prop::sample::Index>(),
    ) {
        let mut envelope = key.seal(kind, seq, &plaintext).expect("seals");
        let bit = bit.index(envelope.len() * 8);
        envelope[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(key.open(&envelope).is_err(), "flip of bit {} opened", bit);
        let mut in_place = envelope.clone();
        prop_assert!(key.open_in_place(&mut in_place).is_err());
    }

    #[test]
    fn open_with_other_key_bytes_fails_opaquely(
        key in key(),
        other in any::<[u8; 32]>(),
        plaintext in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        prop_assume!(&other != key.secret_bytes());
        let envelope = key.seal(Kind::Uplink, 1, &plaintext).expect("seals");
        let impostor = DeviceKey::new(key.device_id().clone(), key.key_id(), key.suite(), other);
        prop_assert_eq!(impostor.open(&envelope).err(), Some(OpenError::Decrypt));
    }

    #[test]
    fn replay_window_accepts_each_seq_once_and_survives_restore(
        seqs in proptest::collection::vec(1u64..200_000, 1..300),
    ) {
        let mut window = ReplayWindow::new();
        let mut accepted = std::collections::BTreeSet::new();
        for (i, &seq) in seqs.iter().enumerate() {
            if i == seqs.len() / 2 {
                window = ReplayWindow::from_bytes(&window.to_bytes()).expect("restores");
            }
            let verdict = window.accept(seq);
            let highest = accepted.iter().next_back().copied().unwrap_or(0);
            let expected = if highest > seq && highest - seq > ReplayWindow::SPAN {
                Verdict::Stale
            } else if accepted.contains(&seq) {
                Verdict::Duplicate
            } else {
                Verdict::Fresh
            };
            prop_assert_eq!(verdict, expected, "seq {}", seq);
            if verdict == Verdict::Fresh {
                accepted.insert(seq);
            }
        }
    }
}
