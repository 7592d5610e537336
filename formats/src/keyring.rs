//! Master key, data keys and the keyring that holds them.
//!
//! The master key never touches the repository. It wraps data keys (stored under
//! `keys/<id>`), and it proves itself through a key check in `walferry.json`, so a
//! wrong key is reported as such before any data is read.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use crate::gcm::GcmKey;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::{Error, Result};

/// The 32-byte master key, written as 64 hex characters.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; 32]);

impl MasterKey {
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        MasterKey(k)
    }

    /// Parses 64 hex characters; one trailing newline (`\n` or `\r\n`) is allowed.
    pub fn from_hex(text: &str) -> Result<Self> {
        let t = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(text);
        if t.len() != 64 {
            return Err(Error::InvalidKey {
                reason: "expected exactly 64 hex characters (32 bytes)",
            });
        }
        let mut k = [0u8; 32];
        hex::decode_to_slice(t, &mut k).map_err(|_| Error::InvalidKey {
            reason: "key contains characters that are not hex digits",
        })?;
        Ok(MasterKey(k))
    }

    /// Reads a key file, refusing one that group or others can access (as ssh does).
    pub fn from_file(path: &Path) -> Result<Self> {
        let io_err = |source| Error::KeyFile {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io_err)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(Error::KeyFilePermissions {
                    path: path.to_path_buf(),
                    mode,
                });
            }
        }
        let _ = meta;
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io_err)?);
        Self::from_hex(&text)
    }

    /// Resolves the key from a key file or from hex text (e.g. `WALFERRY_KEY`); the file wins.
    pub fn resolve(key_file: Option<&Path>, key_hex: Option<&str>) -> Result<Option<Self>> {
        match (key_file, key_hex) {
            (Some(p), _) => Self::from_file(p).map(Some),
            (None, Some(h)) => Self::from_hex(h).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// Hex form, for `keygen` only. The caller must write it somewhere private.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0))
    }

    fn cipher(&self) -> GcmKey {
        GcmKey::new(&self.0)
    }

    /// A value derived from the key that proves possession without revealing it.
    pub fn key_check(&self, repository_id: &str) -> String {
        let k = blake3::derive_key("walferry 2026 master key check v1", &self.0);
        hex::encode(blake3::keyed_hash(&k, repository_id.as_bytes()).as_bytes())
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// The secret material stored (wrapped) under `keys/<id>`.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct DataKeyMaterial {
    #[zeroize(skip)]
    pub id: u32,
    /// AES-256-GCM key for this key id, hex.
    aes_key: String,
    /// Key for naming blocks by keyed hash. Carried unchanged across rotations so dedup keeps working.
    id_key: String,
}

impl DataKeyMaterial {
    /// A first data key, with a fresh block-naming key.
    pub fn generate(id: u32) -> Self {
        let mut a = Zeroizing::new([0u8; 32]);
        let mut b = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(a.as_mut());
        rand::rngs::OsRng.fill_bytes(b.as_mut());
        DataKeyMaterial {
            id,
            aes_key: hex::encode(a.as_ref()),
            id_key: hex::encode(b.as_ref()),
        }
    }

    fn decode32(text: &str) -> Result<Zeroizing<[u8; 32]>> {
        let mut k = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text, k.as_mut()).map_err(|_| Error::InvalidKey {
            reason: "stored data key is malformed",
        })?;
        Ok(k)
    }

    /// Wraps this material with the master key; the result is stored as `keys/<id>`.
    pub fn wrap(&self, master: &MasterKey) -> Result<Vec<u8>> {
        let json = Zeroizing::new(serde_json::to_vec(self).map_err(|e| Error::InvalidConfig {
            reason: e.to_string(),
        })?);
        crate::envelope::seal_with_cipher(
            crate::envelope::Kind::DataKey,
            wrap_identity(self.id).as_bytes(),
            &json,
            None,
            &master.cipher(),
            0,
        )
    }

    /// Opens `keys/<id>`; a wrong master key fails authentication.
    pub fn unwrap(bytes: &[u8], id: u32, master: &MasterKey) -> Result<Self> {
        let plain = Zeroizing::new(
            crate::envelope::open_with_cipher(
                bytes,
                crate::envelope::Kind::DataKey,
                wrap_identity(id).as_bytes(),
                &master.cipher(),
            )
            .map_err(|e| match e {
                Error::AuthenticationFailed { .. } => Error::WrongMasterKey,
                e => e,
            })?,
        );
        let m: DataKeyMaterial = serde_json::from_slice(&plain).map_err(|_| Error::InvalidKey {
            reason: "stored data key is malformed",
        })?;
        if m.id != id {
            return Err(Error::InvalidKey {
                reason: "stored data key has a different id than its object name",
            });
        }
        Ok(m)
    }
}

impl fmt::Debug for DataKeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataKeyMaterial {{ id: {}, <redacted> }}", self.id)
    }
}

/// Object key under which data key `id` is stored.
pub fn wrap_identity(id: u32) -> String {
    format!("keys/{id}")
}

/// One usable data key.
pub(crate) struct DataKey {
    pub(crate) cipher: GcmKey,
}

/// The keys a process uses to seal and open objects, and to name blocks.
///
/// An unencrypted keyring seals plaintext and refuses nothing; an encrypted one
/// seals with the current key and refuses plaintext envelopes.
pub struct Keyring {
    keys: BTreeMap<u32, DataKey>,
    current: Option<u32>,
    id_key: [u8; 32],
}

impl Keyring {
    /// For repositories created with `--no-encryption`. Block names use a fixed public key.
    pub fn unencrypted() -> Self {
        Keyring {
            keys: BTreeMap::new(),
            current: None,
            id_key: blake3::derive_key("walferry 2026 unencrypted block ids v1", b""),
        }
    }

    /// Builds a keyring from unwrapped data keys; `current` seals new objects.
    pub fn from_materials(materials: &[DataKeyMaterial], current: u32) -> Result<Self> {
        let mut keys = BTreeMap::new();
        let mut id_key = None;
        for m in materials {
            let aes = DataKeyMaterial::decode32(&m.aes_key)?;
            let idk = DataKeyMaterial::decode32(&m.id_key)?;
            match &id_key {
                None => id_key = Some(*idk),
                Some(k) if k != &*idk => {
                    return Err(Error::InvalidKey {
                        reason: "data keys disagree on the block-naming key",
                    })
                }
                Some(_) => {}
            }
            keys.insert(
                m.id,
                DataKey {
                    cipher: GcmKey::new(&aes),
                },
            );
        }
        if !keys.contains_key(&current) {
            return Err(Error::UnknownKeyId { key_id: current });
        }
        Ok(Keyring {
            keys,
            current: Some(current),
            id_key: id_key.ok_or(Error::UnknownKeyId { key_id: current })?,
        })
    }

    pub fn is_encrypted(&self) -> bool {
        self.current.is_some()
    }

    pub(crate) fn current(&self) -> Option<(u32, &DataKey)> {
        let id = self.current?;
        self.keys.get(&id).map(|k| (id, k))
    }

    pub(crate) fn get(&self, id: u32) -> Option<&DataKey> {
        self.keys.get(&id)
    }

    /// Names a block by a keyed hash of its plaintext, so names leak nothing about content.
    pub fn block_id(&self, plaintext: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.id_key, plaintext).as_bytes()
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl Drop for Keyring {
    fn drop(&mut self) {
        self.id_key.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_parsing() {
        let h = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        assert!(MasterKey::from_hex(h).is_ok());
        assert!(MasterKey::from_hex(&format!("{h}\n")).is_ok());
        assert!(MasterKey::from_hex(&format!("{h}\r\n")).is_ok());
        assert!(MasterKey::from_hex(&format!("{h}\n\n")).is_err());
        assert!(MasterKey::from_hex(&format!(" {h}")).is_err());
        assert!(MasterKey::from_hex(&h[..62]).is_err());
        assert!(MasterKey::from_hex(&h.replace('0', "g")).is_err());
    }

    #[test]
    fn debug_never_shows_key_material() {
        let k = MasterKey::generate();
        let hex = k.to_hex();
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(&hex[..16]), "{dbg}");
        let m = DataKeyMaterial::generate(1);
        let dbg = format!("{m:?}");
        assert!(
            !dbg.contains(&m.aes_key[..16]) && !dbg.contains(&m.id_key[..16]),
            "{dbg}"
        );
        let ring = Keyring::from_materials(&[m], 1).unwrap();
        assert!(!format!("{ring:?}").contains(&hex[..16]));
    }

    #[cfg(unix)]
    #[test]
    fn key_file_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        let k = MasterKey::generate();
        std::fs::write(&p, format!("{}\n", k.to_hex().as_str())).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = MasterKey::from_file(&p).unwrap_err();
        assert!(
            matches!(e, Error::KeyFilePermissions { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let back = MasterKey::from_file(&p).unwrap();
        assert_eq!(back.to_hex(), k.to_hex());
    }

    #[test]
    fn wrap_and_unwrap() {
        let master = MasterKey::generate();
        let m = DataKeyMaterial::generate(7);
        let wrapped = m.wrap(&master).unwrap();
        let back = DataKeyMaterial::unwrap(&wrapped, 7, &master).unwrap();
        assert_eq!(back.aes_key, m.aes_key);
        let other = MasterKey::generate();
        assert!(matches!(
            DataKeyMaterial::unwrap(&wrapped, 7, &other),
            Err(Error::WrongMasterKey)
        ));
        // Renamed to another key slot: the identity no longer matches.
        assert!(DataKeyMaterial::unwrap(&wrapped, 8, &master).is_err());
    }

    #[test]
    fn key_check_depends_on_key_and_repo() {
        let a = MasterKey::generate();
        let b = MasterKey::generate();
        assert_eq!(a.key_check("r1"), a.key_check("r1"));
        assert_ne!(a.key_check("r1"), b.key_check("r1"));
        assert_ne!(a.key_check("r1"), a.key_check("r2"));
    }
}
