//! Arbitrary bytes as plaintext: seal, then open, must give them back, encrypted or not.
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use walferry_formats::envelope::{self, Cipher, Kind, Opener, Sealer};
use walferry_formats::keyring::{DataKeyMaterial, Keyring};

struct Fixture {
    encrypted: Keyring,
    plain: Keyring,
    sealers: Mutex<Vec<Sealer>>,
    opener: Mutex<Opener>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture {
        encrypted: Keyring::from_materials(&[DataKeyMaterial::generate(1)], 1).expect("keyring"),
        plain: Keyring::unencrypted(),
        sealers: Mutex::new((1..=5).map(|l| Sealer::new(l).expect("sealer")).collect()),
        opener: Mutex::new(Opener::new().expect("opener")),
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    // The level comes from the data, so every level sees every shape of input.
    let level = data.first().map_or(0, |b| usize::from(b % 5));
    let identity = b"backups/fuzz.manifest";
    for keys in [&f.encrypted, &f.plain] {
        let sealed = f.sealers.lock().expect("sealers")[level]
            .seal(Kind::Manifest, identity, data, keys)
            .expect("seal never fails");
        let h = envelope::check(&sealed).expect("a sealed envelope passes check");
        assert_eq!(h.plaintext_len, data.len() as u64);
        assert_eq!(h.kind, Kind::Manifest);
        assert_eq!(h.cipher == Cipher::Aes256Gcm, keys.is_encrypted());
        let opened = f
            .opener
            .lock()
            .expect("opener")
            .open(&sealed, Kind::Manifest, identity, keys)
            .expect("a sealed envelope opens");
        assert_eq!(opened, data);
        // The one-shot path agrees, and another identity is refused when encrypted.
        assert_eq!(
            envelope::open(&sealed, Kind::Manifest, identity, keys).expect("one-shot open"),
            data
        );
        if keys.is_encrypted() {
            assert!(envelope::open(&sealed, Kind::Manifest, b"backups/other", keys).is_err());
        }
    }
});
