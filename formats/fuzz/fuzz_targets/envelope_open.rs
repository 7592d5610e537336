//! Arbitrary bytes into the envelope decoder: `check` and `open`, with an encrypted and
//! an unencrypted keyring. Nothing may panic, and whatever opens must match its header.
//!
//! Most random inputs stop at the crc32, so every input is also tried with its trailing
//! crc recomputed, which lets the fuzzer reach the header, decryption and zstd paths.
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use walferry_formats::envelope::{self, Kind, Opener, CRC_LEN, MAX_PLAINTEXT};
use walferry_formats::keyring::{DataKeyMaterial, Keyring};

struct Fixture {
    encrypted: Keyring,
    plain: Keyring,
    /// Reused across inputs, as workers reuse theirs: an error must not poison it.
    opener: Mutex<Opener>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture {
        encrypted: Keyring::from_materials(&[DataKeyMaterial::generate(1)], 1).expect("keyring"),
        plain: Keyring::unencrypted(),
        opener: Mutex::new(Opener::new().expect("opener")),
    })
}

const KINDS: [Kind; 9] = [
    Kind::WalPart,
    Kind::WalSegment,
    Kind::WalHistory,
    Kind::WalIndex,
    Kind::Manifest,
    Kind::Block,
    Kind::PackTrailer,
    Kind::DataKey,
    Kind::Record,
];

fn exercise(bytes: &[u8]) {
    let f = fixture();
    let header = envelope::check(bytes);
    if let Ok(h) = &header {
        assert!(h.plaintext_len <= MAX_PLAINTEXT);
    }
    // The kind the header claims (so WrongKind does not end every run early), and another.
    let claimed = bytes
        .get(5)
        .and_then(|&k| KINDS.get(usize::from(k).wrapping_sub(1)))
        .copied()
        .unwrap_or(Kind::Block);
    for kind in [claimed, Kind::Block] {
        for keys in [&f.encrypted, &f.plain] {
            let one_shot = envelope::open(bytes, kind, b"fuzz/identity", keys);
            let reused =
                f.opener
                    .lock()
                    .expect("opener lock")
                    .open(bytes, kind, b"fuzz/identity", keys);
            match (&one_shot, &reused) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b, "a reused opener disagrees with a fresh one");
                    let h = header.as_ref().expect("opened but check failed");
                    assert_eq!(a.len() as u64, h.plaintext_len);
                    assert_eq!(h.kind, kind);
                }
                (Err(_), Err(_)) => {}
                _ => {
                    panic!("a reused opener disagrees with a fresh one: {one_shot:?} vs {reused:?}")
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    exercise(data);
    if data.len() >= CRC_LEN {
        let mut fixed = data.to_vec();
        let n = fixed.len() - CRC_LEN;
        let crc = crc32(&fixed[..n]);
        fixed[n..].copy_from_slice(&crc.to_le_bytes());
        exercise(&fixed);
    }
});

/// crc32 (IEEE), bitwise: the fuzz crate needs no crc dependency for a few KiB of input.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}
