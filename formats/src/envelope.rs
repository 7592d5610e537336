//! The envelope: how every stored unit is framed.
//!
//! ```text
//! magic "WFRY" | format u8 | kind u8 | compression u8 | cipher u8 | key id u32
//! | nonce [12] | plaintext length u64 | payload (ciphertext + GCM tag) | crc32 u32
//! ```
//! Integers are little-endian. Compression comes first, then encryption. The GCM
//! associated data is the header plus the unit's identity (its object key, or a block
//! id), so a unit moved or swapped in the bucket fails to open. The trailing crc32
//! covers every byte before it and can be checked without a key.
//!
//! Pure and synchronous: callers run it on a blocking pool.

use std::borrow::Cow;
use std::io::Read;

use crate::gcm::GcmKey;
use rand::RngCore;

use crate::error::{Error, Result};
use crate::keyring::Keyring;

pub const MAGIC: [u8; 4] = *b"WFRY";
pub const FORMAT_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 32;
pub const TAG_LEN: usize = 16;
pub const CRC_LEN: usize = 4;
/// Largest plaintext one envelope may declare (a 1 GiB WAL segment fits, with room).
pub const MAX_PLAINTEXT: u64 = 2 << 30;
/// Above this, decompression grows its buffer as it goes instead of trusting the header.
const PREALLOC_LIMIT: u64 = 64 << 20;

/// What a unit is. Checked on open, so one kind can never be read as another.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u8)]
pub enum Kind {
    WalPart = 1,
    WalSegment = 2,
    WalHistory = 3,
    WalIndex = 4,
    Manifest = 5,
    Block = 6,
    PackTrailer = 7,
    DataKey = 8,
    /// Small JSON records: cluster binding, leases, verify state.
    Record = 9,
}

impl Kind {
    fn from_u8(v: u8) -> Result<Self> {
        Ok(match v {
            1 => Kind::WalPart,
            2 => Kind::WalSegment,
            3 => Kind::WalHistory,
            4 => Kind::WalIndex,
            5 => Kind::Manifest,
            6 => Kind::Block,
            7 => Kind::PackTrailer,
            8 => Kind::DataKey,
            9 => Kind::Record,
            value => {
                return Err(Error::UnknownHeaderValue {
                    field: "kind",
                    value,
                })
            }
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Compression {
    None = 0,
    Zstd = 1,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Cipher {
    None = 0,
    Aes256Gcm = 1,
}

/// A parsed, crc-checked header.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Header {
    pub kind: Kind,
    pub compression: Compression,
    pub cipher: Cipher,
    pub key_id: u32,
    pub nonce: [u8; 12],
    pub plaintext_len: u64,
}

impl Header {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.push(FORMAT_VERSION);
        out.push(self.kind as u8);
        out.push(self.compression as u8);
        out.push(self.cipher as u8);
        out.extend_from_slice(&self.key_id.to_le_bytes());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.plaintext_len.to_le_bytes());
    }
}

/// Checks framing, version and crc32 without any key, and returns the header.
/// This is what a shallow `verify` runs on every unit.
pub fn check(bytes: &[u8]) -> Result<Header> {
    let need = HEADER_LEN + CRC_LEN;
    if bytes.len() < need {
        if bytes.len() >= 4 && bytes[..4] != MAGIC {
            return Err(Error::BadMagic);
        }
        return Err(Error::Truncated {
            have: bytes.len(),
            need,
        });
    }
    if bytes[..4] != MAGIC {
        return Err(Error::BadMagic);
    }
    if bytes[4] != FORMAT_VERSION {
        return Err(Error::UnknownFormat { version: bytes[4] });
    }
    let (body, crc) = bytes.split_at(bytes.len() - CRC_LEN);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(Error::CrcMismatch { stored, computed });
    }
    let kind = Kind::from_u8(bytes[5])?;
    let compression = match bytes[6] {
        0 => Compression::None,
        1 => Compression::Zstd,
        value => {
            return Err(Error::UnknownHeaderValue {
                field: "compression",
                value,
            })
        }
    };
    let cipher = match bytes[7] {
        0 => Cipher::None,
        1 => Cipher::Aes256Gcm,
        value => {
            return Err(Error::UnknownHeaderValue {
                field: "cipher",
                value,
            })
        }
    };
    let mut key_id = [0u8; 4];
    key_id.copy_from_slice(&bytes[8..12]);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&bytes[12..24]);
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[24..32]);
    let plaintext_len = u64::from_le_bytes(len);
    if plaintext_len > MAX_PLAINTEXT {
        return Err(Error::TooLarge {
            declared: plaintext_len,
            limit: MAX_PLAINTEXT,
        });
    }
    let payload_len = body.len() - HEADER_LEN;
    if cipher == Cipher::Aes256Gcm && payload_len < TAG_LEN {
        return Err(Error::Truncated {
            have: bytes.len(),
            need: HEADER_LEN + TAG_LEN + CRC_LEN,
        });
    }
    if compression == Compression::None
        && cipher == Cipher::None
        && payload_len as u64 != plaintext_len
    {
        return Err(Error::LengthMismatch {
            declared: plaintext_len,
            actual: payload_len as u64,
        });
    }
    Ok(Header {
        kind,
        compression,
        cipher,
        key_id: u32::from_le_bytes(key_id),
        nonce,
        plaintext_len,
    })
}

/// Seals plaintext into envelopes, reusing one zstd context. One per worker thread.
pub struct Sealer {
    level: i32,
    compressor: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
}

impl Sealer {
    /// `level` is a zstd level (1..=22; 3 is zstd's default).
    pub fn new(level: i32) -> Result<Self> {
        let compressor = zstd::bulk::Compressor::new(level).map_err(|e| Error::Compress {
            reason: e.to_string(),
        })?;
        Ok(Sealer {
            level,
            compressor,
            scratch: Vec::new(),
        })
    }

    pub fn level(&self) -> i32 {
        self.level
    }

    /// Compresses, then encrypts with the keyring's current key (if it has one).
    pub fn seal(
        &mut self,
        kind: Kind,
        identity: &[u8],
        plaintext: &[u8],
        keyring: &Keyring,
    ) -> Result<Vec<u8>> {
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(plaintext.len()));
        self.compressor
            .compress_to_buffer(plaintext, &mut self.scratch)
            .map_err(|e| Error::Compress {
                reason: e.to_string(),
            })?;
        // Incompressible input is stored as is: cheaper to read back.
        let (compression, body) = if self.scratch.len() < plaintext.len() {
            (Compression::Zstd, self.scratch.as_slice())
        } else {
            (Compression::None, plaintext)
        };
        match keyring.current() {
            Some((key_id, key)) => frame_encrypted(
                kind,
                identity,
                compression,
                body,
                plaintext.len(),
                &key.cipher,
                key_id,
            ),
            None => Ok(frame_plain(kind, compression, body, plaintext.len())),
        }
    }
}

/// Opens envelopes, reusing one zstd context.
pub struct Opener {
    decompressor: zstd::bulk::Decompressor<'static>,
}

impl Opener {
    pub fn new() -> Result<Self> {
        Ok(Opener {
            decompressor: zstd::bulk::Decompressor::new().map_err(|e| Error::Decompress {
                reason: e.to_string(),
            })?,
        })
    }

    /// Checks, authenticates, decrypts and decompresses one envelope.
    pub fn open(
        &mut self,
        bytes: &[u8],
        kind: Kind,
        identity: &[u8],
        keyring: &Keyring,
    ) -> Result<Vec<u8>> {
        let header = check(bytes)?;
        if header.kind != kind {
            return Err(Error::WrongKind {
                expected: kind,
                found: header.kind,
            });
        }
        match authenticated_body(&header, bytes, identity, keyring)? {
            Cow::Borrowed(body) => self.decompress(&header, body),
            Cow::Owned(body) => self.decompress_owned(&header, body),
        }
    }

    /// [`Self::open`] straight into `out` (named `path` in errors), decompressing a piece at
    /// a time, so a large unit (a 16 MiB WAL segment) never sits in memory whole. Returns
    /// the plaintext length; on error, `out` holds a partial write the caller must discard.
    pub fn open_into(
        &mut self,
        bytes: &[u8],
        kind: Kind,
        identity: &[u8],
        keyring: &Keyring,
        out: &mut impl std::io::Write,
        path: &std::path::Path,
    ) -> Result<u64> {
        let header = check(bytes)?;
        if header.kind != kind {
            return Err(Error::WrongKind {
                expected: kind,
                found: header.kind,
            });
        }
        let body = authenticated_body(&header, bytes, identity, keyring)?;
        let body: &[u8] = &body;
        let write_err = |source| Error::Write {
            path: path.to_path_buf(),
            source,
        };
        let written = match header.compression {
            Compression::None => {
                out.write_all(body).map_err(write_err)?;
                body.len() as u64
            }
            Compression::Zstd => {
                let mut dec = zstd::stream::read::Decoder::new(body)
                    .map_err(|e| Error::Decompress {
                        reason: e.to_string(),
                    })?
                    .take(header.plaintext_len + 1);
                let mut buf = vec![0u8; 256 << 10];
                let mut n = 0u64;
                loop {
                    let got = dec.read(&mut buf).map_err(|e| Error::Decompress {
                        reason: e.to_string(),
                    })?;
                    if got == 0 {
                        break;
                    }
                    out.write_all(&buf[..got]).map_err(write_err)?;
                    n += got as u64;
                }
                n
            }
        };
        if written != header.plaintext_len {
            return Err(Error::LengthMismatch {
                declared: header.plaintext_len,
                actual: written,
            });
        }
        out.flush().map_err(write_err)?;
        Ok(written)
    }

    /// [`Self::decompress`] for a body the caller owns (just decrypted): a stored,
    /// uncompressed body is handed back as it is instead of being copied once more.
    fn decompress_owned(&mut self, header: &Header, body: Vec<u8>) -> Result<Vec<u8>> {
        match header.compression {
            Compression::None => {
                if body.len() as u64 != header.plaintext_len {
                    return Err(Error::LengthMismatch {
                        declared: header.plaintext_len,
                        actual: body.len() as u64,
                    });
                }
                Ok(body)
            }
            Compression::Zstd => self.decompress(header, &body),
        }
    }

    fn decompress(&mut self, header: &Header, body: &[u8]) -> Result<Vec<u8>> {
        let out = match header.compression {
            Compression::None => body.to_vec(),
            Compression::Zstd if header.plaintext_len <= PREALLOC_LIMIT => self
                .decompressor
                .decompress(body, header.plaintext_len as usize)
                .map_err(|e| Error::Decompress {
                    reason: e.to_string(),
                })?,
            Compression::Zstd => {
                // Grow with the real output; never trust a large declared size up front.
                let mut out = Vec::new();
                zstd::stream::read::Decoder::new(body)
                    .map_err(|e| Error::Decompress {
                        reason: e.to_string(),
                    })?
                    .take(header.plaintext_len + 1)
                    .read_to_end(&mut out)
                    .map_err(|e| Error::Decompress {
                        reason: e.to_string(),
                    })?;
                out
            }
        };
        if out.len() as u64 != header.plaintext_len {
            return Err(Error::LengthMismatch {
                declared: header.plaintext_len,
                actual: out.len() as u64,
            });
        }
        Ok(out)
    }
}

/// One-shot seal; prefer a long-lived [`Sealer`] in loops.
pub fn seal(
    kind: Kind,
    identity: &[u8],
    plaintext: &[u8],
    level: i32,
    keyring: &Keyring,
) -> Result<Vec<u8>> {
    Sealer::new(level)?.seal(kind, identity, plaintext, keyring)
}

/// One-shot open; prefer a long-lived [`Opener`] in loops.
pub fn open(bytes: &[u8], kind: Kind, identity: &[u8], keyring: &Keyring) -> Result<Vec<u8>> {
    Opener::new()?.open(bytes, kind, identity, keyring)
}

/// Seals with an explicit cipher (used to wrap data keys with the master key).
pub(crate) fn seal_with_cipher(
    kind: Kind,
    identity: &[u8],
    plaintext: &[u8],
    level: Option<i32>,
    cipher: &GcmKey,
    key_id: u32,
) -> Result<Vec<u8>> {
    match level {
        Some(level) => {
            let compressed =
                zstd::bulk::compress(plaintext, level).map_err(|e| Error::Compress {
                    reason: e.to_string(),
                })?;
            frame_encrypted(
                kind,
                identity,
                Compression::Zstd,
                &compressed,
                plaintext.len(),
                cipher,
                key_id,
            )
        }
        None => frame_encrypted(
            kind,
            identity,
            Compression::None,
            plaintext,
            plaintext.len(),
            cipher,
            key_id,
        ),
    }
}

/// Opens an envelope sealed by [`seal_with_cipher`].
pub(crate) fn open_with_cipher(
    bytes: &[u8],
    kind: Kind,
    identity: &[u8],
    cipher: &GcmKey,
) -> Result<Vec<u8>> {
    let header = check(bytes)?;
    if header.kind != kind {
        return Err(Error::WrongKind {
            expected: kind,
            found: header.kind,
        });
    }
    if header.cipher != Cipher::Aes256Gcm {
        return Err(Error::PlaintextRejected);
    }
    let body = decrypt(&header, bytes, identity, cipher)?;
    Opener::new()?.decompress_owned(&header, body)
}

/// The payload after the key checks: borrowed when stored in the clear (allowed only in
/// an unencrypted repository), decrypted and authenticated otherwise.
fn authenticated_body<'a>(
    header: &Header,
    bytes: &'a [u8],
    identity: &[u8],
    keyring: &Keyring,
) -> Result<Cow<'a, [u8]>> {
    match header.cipher {
        Cipher::None if keyring.is_encrypted() => Err(Error::PlaintextRejected),
        Cipher::None => Ok(Cow::Borrowed(&bytes[HEADER_LEN..bytes.len() - CRC_LEN])),
        Cipher::Aes256Gcm => {
            let key = keyring
                .get(header.key_id)
                .ok_or(if keyring.is_encrypted() {
                    Error::UnknownKeyId {
                        key_id: header.key_id,
                    }
                } else {
                    Error::KeyRequired {
                        key_id: header.key_id,
                    }
                })?;
            Ok(Cow::Owned(decrypt(header, bytes, identity, &key.cipher)?))
        }
    }
}

fn aad(header_bytes: &[u8], identity: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(header_bytes.len() + identity.len());
    a.extend_from_slice(header_bytes);
    a.extend_from_slice(identity);
    a
}

fn frame_plain(kind: Kind, compression: Compression, body: &[u8], plaintext_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + CRC_LEN);
    Header {
        kind,
        compression,
        cipher: Cipher::None,
        key_id: 0,
        nonce: [0; 12],
        plaintext_len: plaintext_len as u64,
    }
    .write(&mut out);
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn frame_encrypted(
    kind: Kind,
    identity: &[u8],
    compression: Compression,
    body: &[u8],
    plaintext_len: usize,
    cipher: &GcmKey,
    key_id: u32,
) -> Result<Vec<u8>> {
    let mut nonce = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut nonce);
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TAG_LEN + CRC_LEN);
    Header {
        kind,
        compression,
        cipher: Cipher::Aes256Gcm,
        key_id,
        nonce,
        plaintext_len: plaintext_len as u64,
    }
    .write(&mut out);
    out.extend_from_slice(body);
    let (head, payload) = out.split_at_mut(HEADER_LEN);
    let tag = cipher
        .seal(&nonce, &aad(head, identity), payload)
        .map_err(|_| Error::Compress {
            reason: "encryption failed".into(),
        })?;
    out.extend_from_slice(&tag);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn decrypt(header: &Header, bytes: &[u8], identity: &[u8], cipher: &GcmKey) -> Result<Vec<u8>> {
    let payload = &bytes[HEADER_LEN..bytes.len() - CRC_LEN];
    let (ct, tag) = payload.split_at(payload.len() - TAG_LEN);
    cipher
        .open(&header.nonce, &aad(&bytes[..HEADER_LEN], identity), ct, tag)
        .map_err(|_| Error::AuthenticationFailed {
            key_id: header.key_id,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::DataKeyMaterial;
    use proptest::prelude::*;

    fn ring(id: u32) -> Keyring {
        Keyring::from_materials(&[DataKeyMaterial::generate(id)], id).unwrap()
    }

    fn sample(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8 ^ (i / 1000) as u8).collect()
    }

    #[test]
    fn round_trip_encrypted_and_plain() {
        for keys in [ring(1), Keyring::unencrypted()] {
            for data in [Vec::new(), vec![7u8], sample(100_000), {
                let mut r = vec![0u8; 5000];
                rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut r);
                r
            }] {
                let sealed = seal(Kind::Block, b"id", &data, 3, &keys).unwrap();
                let h = check(&sealed).unwrap();
                assert_eq!(h.plaintext_len, data.len() as u64);
                assert_eq!(h.cipher == Cipher::Aes256Gcm, keys.is_encrypted());
                assert_eq!(open(&sealed, Kind::Block, b"id", &keys).unwrap(), data);
            }
        }
    }

    #[test]
    fn open_into_writes_what_open_returns() {
        let path = std::path::Path::new("out");
        for keys in [ring(1), Keyring::unencrypted()] {
            // Below, at and well above the 256 KiB pieces open_into decompresses in.
            for data in [Vec::new(), sample(256 << 10), sample(3 << 20)] {
                let sealed = seal(Kind::WalSegment, b"w", &data, 3, &keys).unwrap();
                let mut out = Vec::new();
                let n = Opener::new()
                    .unwrap()
                    .open_into(&sealed, Kind::WalSegment, b"w", &keys, &mut out, path)
                    .unwrap();
                assert_eq!(n, data.len() as u64);
                assert_eq!(out, data);
                // Damage is refused before anything is written.
                let mut bad = sealed.clone();
                let mid = bad.len() / 2;
                bad[mid] ^= 1;
                let mut out = Vec::new();
                assert!(Opener::new()
                    .unwrap()
                    .open_into(&bad, Kind::WalSegment, b"w", &keys, &mut out, path)
                    .is_err());
                assert!(out.is_empty());
            }
        }
    }

    #[test]
    fn typed_errors() {
        let keys = ring(1);
        let sealed = seal(Kind::WalPart, b"wal/1/x", &sample(4096), 3, &keys).unwrap();
        let e = |r: Result<Vec<u8>>| r.unwrap_err();

        assert!(matches!(
            e(open(&sealed[..10], Kind::WalPart, b"wal/1/x", &keys)),
            Error::Truncated { .. }
        ));
        assert!(matches!(
            e(open(
                &sealed[..sealed.len() - 1],
                Kind::WalPart,
                b"wal/1/x",
                &keys
            )),
            Error::CrcMismatch { .. }
        ));
        let mut bad = sealed.clone();
        bad[0] = b'X';
        assert!(matches!(
            e(open(&bad, Kind::WalPart, b"wal/1/x", &keys)),
            Error::BadMagic
        ));
        let mut bad = sealed.clone();
        bad[4] = 9;
        assert!(matches!(
            e(open(&bad, Kind::WalPart, b"wal/1/x", &keys)),
            Error::UnknownFormat { version: 9 }
        ));
        assert!(matches!(
            e(open(&sealed, Kind::Block, b"wal/1/x", &keys)),
            Error::WrongKind { .. }
        ));
        assert!(matches!(
            e(open(&sealed, Kind::WalPart, b"wal/1/y", &keys)),
            Error::AuthenticationFailed { key_id: 1 }
        ));
        assert!(matches!(
            e(open(&sealed, Kind::WalPart, b"wal/1/x", &ring(2))),
            Error::UnknownKeyId { key_id: 1 }
        ));
        assert!(matches!(
            e(open(&sealed, Kind::WalPart, b"wal/1/x", &ring(1))),
            Error::AuthenticationFailed { .. }
        ));
        assert!(matches!(
            e(open(
                &sealed,
                Kind::WalPart,
                b"wal/1/x",
                &Keyring::unencrypted()
            )),
            Error::KeyRequired { key_id: 1 }
        ));
        let plain = seal(
            Kind::WalPart,
            b"wal/1/x",
            b"abc",
            3,
            &Keyring::unencrypted(),
        )
        .unwrap();
        assert!(matches!(
            e(open(&plain, Kind::WalPart, b"wal/1/x", &keys)),
            Error::PlaintextRejected
        ));
    }

    #[test]
    fn length_mismatch_detected_in_plain_envelopes() {
        let keys = Keyring::unencrypted();
        let mut sealed = seal(Kind::Block, b"b", &sample(10_000), 3, &keys).unwrap();
        // Change the declared length and fix the crc: the decoded size no longer matches.
        sealed[24] ^= 1;
        let n = sealed.len() - CRC_LEN;
        let crc = crc32fast::hash(&sealed[..n]);
        sealed[n..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            open(&sealed, Kind::Block, b"b", &keys),
            Err(Error::LengthMismatch { .. }) | Err(Error::Decompress { .. })
        ));
    }

    #[test]
    fn length_mismatch_detected_in_encrypted_stored_envelopes() {
        // A stored (uncompressed) body is returned without a copy; its length is still checked.
        let keys = ring(1);
        let (key_id, key) = keys.current().unwrap();
        let body = sample(1000);
        for declared in [999, 1001, 0] {
            let sealed = frame_encrypted(
                Kind::Block,
                b"b",
                Compression::None,
                &body,
                declared,
                &key.cipher,
                key_id,
            )
            .unwrap();
            assert!(matches!(
                open(&sealed, Kind::Block, b"b", &keys),
                Err(Error::LengthMismatch { .. })
            ));
        }
        let sealed = frame_encrypted(
            Kind::Block,
            b"b",
            Compression::None,
            &body,
            body.len(),
            &key.cipher,
            key_id,
        )
        .unwrap();
        assert_eq!(open(&sealed, Kind::Block, b"b", &keys).unwrap(), body);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 0..20_000), level in 1i32..6, enc: bool) {
            let keys = if enc { ring(3) } else { Keyring::unencrypted() };
            let sealed = seal(Kind::Manifest, b"backups/x", &data, level, &keys).unwrap();
            prop_assert_eq!(open(&sealed, Kind::Manifest, b"backups/x", &keys).unwrap(), data);
        }

        #[test]
        fn every_byte_flip_is_detected(len in 0usize..3000, enc: bool, seed: u64) {
            let keys = if enc { ring(1) } else { Keyring::unencrypted() };
            let data: Vec<u8> = (0..len).map(|i| (i as u64).wrapping_mul(seed | 1) as u8 % 7).collect();
            let sealed = seal(Kind::Block, b"blk", &data, 3, &keys).unwrap();
            for i in 0..sealed.len() {
                let mut bad = sealed.clone();
                bad[i] ^= 1 << (seed % 8);
                prop_assert!(check(&bad).is_err(), "flip at {} passed check", i);
                prop_assert!(open(&bad, Kind::Block, b"blk", &keys).is_err(), "flip at {} opened", i);
            }
        }

        #[test]
        fn swapped_identities_are_rejected(a in "[a-z/]{1,20}", b in "[a-z/]{1,20}") {
            prop_assume!(a != b);
            let keys = ring(1);
            let sealed = seal(Kind::WalSegment, a.as_bytes(), b"payload", 3, &keys).unwrap();
            let rejected = matches!(open(&sealed, Kind::WalSegment, b.as_bytes(), &keys), Err(Error::AuthenticationFailed { .. }));
            prop_assert!(rejected);
        }

        #[test]
        fn wrong_key_is_rejected(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let sealed = seal(Kind::Block, b"x", &data, 3, &ring(1)).unwrap();
            let rejected = matches!(open(&sealed, Kind::Block, b"x", &ring(1)), Err(Error::AuthenticationFailed { .. }));
            prop_assert!(rejected);
        }

        #[test]
        fn open_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = open(&data, Kind::Block, b"x", &ring(1));
            let _ = open(&data, Kind::Block, b"x", &Keyring::unencrypted());
        }
    }
}
