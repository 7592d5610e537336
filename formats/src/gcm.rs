//! AES-256-GCM through AWS-LC (`aws-lc-rs`): the same ciphertext and tags as any
//! conforming implementation, at several GB/s (its GHASH uses the CPU's carry-less
//! multiply and vector units; the `aes-gcm` crate's tops out near 1.3 GB/s here).

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

pub const TAG_LEN: usize = 16;

/// One AES-256-GCM key. Nonces are the caller's: 96 random bits per envelope.
pub struct GcmKey(LessSafeKey);

/// Encryption or authentication failed; deliberately says nothing more.
#[derive(Debug)]
pub struct Unspecified;

impl GcmKey {
    pub fn new(key: &[u8; 32]) -> Self {
        // A 32-byte key is always valid for AES-256.
        match UnboundKey::new(&AES_256_GCM, key) {
            Ok(k) => GcmKey(LessSafeKey::new(k)),
            Err(_) => unreachable!("AES-256 takes any 32-byte key"),
        }
    }

    /// Encrypts `buf` in place; returns the tag.
    pub fn seal(
        &self,
        nonce: &[u8; 12],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], Unspecified> {
        let tag = self
            .0
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), buf)
            .map_err(|_| Unspecified)?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypts `ciphertext` (without its tag) after checking `tag`.
    pub fn open(
        &self,
        nonce: &[u8; 12],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8],
    ) -> Result<Vec<u8>, Unspecified> {
        let mut buf = Vec::with_capacity(ciphertext.len() + TAG_LEN);
        buf.extend_from_slice(ciphertext);
        buf.extend_from_slice(tag);
        let n = self
            .0
            .open_in_place(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| Unspecified)?
            .len();
        buf.truncate(n);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NIST GCM test vector (gcmEncryptExtIV256.rsp, Count 0 with 128-bit plaintext):
    /// the format depends on standard AES-256-GCM output, whatever library computes it.
    #[test]
    fn matches_a_published_vector() {
        let key: [u8; 32] =
            hex::decode("31bdadd96698c204aa9ce1448ea94ae1fb4a9a0b3c9d773b51bb1822666b8f22")
                .unwrap()
                .try_into()
                .unwrap();
        let nonce: [u8; 12] = hex::decode("0d18e06c7c725ac9e362e1ce")
            .unwrap()
            .try_into()
            .unwrap();
        let mut buf = hex::decode("2db5168e932556f8089a0622981d017d").unwrap();
        let tag = GcmKey::new(&key).seal(&nonce, b"", &mut buf).unwrap();
        assert_eq!(hex::encode(&buf), "fa4362189661d163fcd6a56d8bf0405a");
        assert_eq!(hex::encode(tag), "d636ac1bbedd5cc3ee727dc2ab4a9489");
        let plain = GcmKey::new(&key).open(&nonce, b"", &buf, &tag).unwrap();
        assert_eq!(hex::encode(plain), "2db5168e932556f8089a0622981d017d");
        let mut bad = tag;
        bad[0] ^= 1;
        assert!(GcmKey::new(&key).open(&nonce, b"", &buf, &bad).is_err());
    }

    proptest::proptest! {
        /// Byte for byte what the `aes-gcm` crate (used before) produces: envelopes
        /// written by earlier versions open, and new ones open there.
        #[test]
        fn agrees_with_the_aes_gcm_crate(
            key in proptest::array::uniform32(0u8..),
            nonce in proptest::array::uniform12(0u8..),
            aad in proptest::collection::vec(0u8.., 0..64),
            plain in proptest::collection::vec(0u8.., 0..4096),
        ) {
            use aes_gcm::aead::{AeadInPlace, KeyInit, Nonce};
            let theirs = aes_gcm::Aes256Gcm::new(&key.into());
            let mut a = plain.clone();
            let tag_a = theirs
                .encrypt_in_place_detached(Nonce::<aes_gcm::Aes256Gcm>::from_slice(&nonce), &aad, &mut a)
                .unwrap();
            let mut b = plain.clone();
            let tag_b = GcmKey::new(&key).seal(&nonce, &aad, &mut b).unwrap();
            proptest::prop_assert_eq!(&a, &b);
            proptest::prop_assert_eq!(tag_a.as_slice(), &tag_b[..]);
            let opened = GcmKey::new(&key).open(&nonce, &aad, &a, tag_a.as_slice()).unwrap();
            proptest::prop_assert_eq!(opened, plain);
        }
    }
}
