//! `walferry.json`: the repository's self-description, read before anything else.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keyring::MasterKey;

pub const REPO_FORMAT_VERSION: u32 = 1;
pub const CONFIG_KEY: &str = "walferry.json";
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// zstd 1, not 3: on table data it takes about 60% of level 3's CPU for 3-7% more bytes
/// (and on pgbench-like data it is smaller); the agent shares its host with PostgreSQL.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum CipherName {
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    /// Only for tests and demos; recorded here so a reader knows plaintext is expected.
    #[serde(rename = "none")]
    None,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    /// Repository format version; a reader refuses versions it does not know.
    pub format: u32,
    /// Random id, 32 hex characters.
    pub repository_id: String,
    pub cipher: CipherName,
    pub compression: CompressionConfig,
    /// Files are cut into blocks of this many bytes (a multiple of 8 KiB).
    pub block_size: u32,
    /// Ids of the data keys under `keys/`.
    pub key_ids: Vec<u32>,
    /// The data key that seals new objects.
    pub current_key_id: Option<u32>,
    /// Proves a master key belongs to this repository (encrypted repositories only).
    pub key_check: Option<String>,
    /// RFC 3339 creation time, for humans.
    pub created_at: String,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    pub algorithm: String,
    pub level: i32,
}

impl RepoConfig {
    /// A new config for a repository; `master` is None for an unencrypted one.
    pub fn new(master: Option<&MasterKey>, created_at: String) -> Self {
        let mut id = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
        let repository_id = hex::encode(id);
        RepoConfig {
            format: REPO_FORMAT_VERSION,
            cipher: if master.is_some() {
                CipherName::Aes256Gcm
            } else {
                CipherName::None
            },
            compression: CompressionConfig {
                algorithm: "zstd".into(),
                level: DEFAULT_ZSTD_LEVEL,
            },
            block_size: DEFAULT_BLOCK_SIZE,
            key_ids: if master.is_some() { vec![1] } else { vec![] },
            current_key_id: master.map(|_| 1),
            key_check: master.map(|m| m.key_check(&repository_id)),
            repository_id,
            created_at,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Parses and validates; the format version is checked before anything else.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let raw: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| Error::InvalidConfig {
                reason: format!("{CONFIG_KEY} is not valid JSON: {e}"),
            })?;
        let version =
            raw.get("format")
                .and_then(|v| v.as_u64())
                .ok_or_else(|| Error::InvalidConfig {
                    reason: format!("{CONFIG_KEY} has no numeric \"format\" field"),
                })?;
        if version != u64::from(REPO_FORMAT_VERSION) {
            return Err(Error::UnsupportedRepoFormat {
                version: u32::try_from(version).unwrap_or(u32::MAX),
            });
        }
        let c: RepoConfig = serde_json::from_value(raw).map_err(|e| Error::InvalidConfig {
            reason: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Sets the zstd level and block size chosen at `init`, checked as any stored config is.
    pub fn with_layout(mut self, level: i32, block_size: u32) -> Result<Self> {
        self.compression.level = level;
        self.block_size = block_size;
        self.validate()?;
        Ok(self)
    }

    fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidConfig { reason });
        if self.repository_id.len() != 32
            || !self.repository_id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return bad("repository_id must be 32 hex characters".into());
        }
        if self.block_size < 8192 || self.block_size % 8192 != 0 || self.block_size > 64 << 20 {
            return bad(format!(
                "block_size {} must be a multiple of 8192 between 8 KiB and 64 MiB",
                self.block_size
            ));
        }
        if self.compression.algorithm != "zstd" || !(1..=22).contains(&self.compression.level) {
            return bad("compression must be zstd with a level from 1 to 22".into());
        }
        match self.cipher {
            CipherName::Aes256Gcm => {
                let Some(cur) = self.current_key_id else {
                    return bad("an encrypted repository needs current_key_id".into());
                };
                if !self.key_ids.contains(&cur) || self.key_check.is_none() {
                    return bad(
                        "current_key_id must be listed in key_ids, and key_check must be set"
                            .into(),
                    );
                }
            }
            CipherName::None => {
                if !self.key_ids.is_empty()
                    || self.current_key_id.is_some()
                    || self.key_check.is_some()
                {
                    return bad("an unencrypted repository lists no keys".into());
                }
            }
        }
        Ok(())
    }

    pub fn is_encrypted(&self) -> bool {
        self.cipher == CipherName::Aes256Gcm
    }

    /// Checks that the given master key (or its absence) fits this repository.
    pub fn check_master_key(&self, master: Option<&MasterKey>) -> Result<()> {
        match (self.is_encrypted(), master) {
            (true, None) => Err(Error::MasterKeyRequired),
            (false, Some(_)) => Err(Error::UnexpectedMasterKey),
            (false, None) => Ok(()),
            (true, Some(m)) => {
                let expected = self.key_check.as_deref().unwrap_or_default();
                if m.key_check(&self.repository_id) == expected {
                    Ok(())
                } else {
                    Err(Error::WrongMasterKey)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_key_check() {
        let m = MasterKey::generate();
        let c = RepoConfig::new(Some(&m), "2026-11-23T00:00:00Z".into());
        let back = RepoConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(back, c);
        back.check_master_key(Some(&m)).unwrap();
        assert!(matches!(
            back.check_master_key(Some(&MasterKey::generate())),
            Err(Error::WrongMasterKey)
        ));
        assert!(matches!(
            back.check_master_key(None),
            Err(Error::MasterKeyRequired)
        ));

        let plain = RepoConfig::new(None, "x".into());
        let back = RepoConfig::from_json(&plain.to_json()).unwrap();
        back.check_master_key(None).unwrap();
        assert!(matches!(
            back.check_master_key(Some(&m)),
            Err(Error::UnexpectedMasterKey)
        ));
    }

    #[test]
    fn rejects_bad_configs() {
        let c = RepoConfig::new(None, "x".into());
        let mut v: serde_json::Value = serde_json::from_slice(&c.to_json()).unwrap();
        v["format"] = 2.into();
        assert!(matches!(
            RepoConfig::from_json(&serde_json::to_vec(&v).unwrap()),
            Err(Error::UnsupportedRepoFormat { version: 2 })
        ));
        v["format"] = 1.into();
        v["surprise"] = true.into();
        assert!(RepoConfig::from_json(&serde_json::to_vec(&v).unwrap()).is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&c.to_json()).unwrap();
        v["block_size"] = 1000.into();
        assert!(RepoConfig::from_json(&serde_json::to_vec(&v).unwrap()).is_err());
        // Flipping an encrypted repository to "none" is caught: it still lists keys.
        let m = MasterKey::generate();
        let mut v: serde_json::Value =
            serde_json::from_slice(&RepoConfig::new(Some(&m), "x".into()).to_json()).unwrap();
        v["cipher"] = "none".into();
        assert!(RepoConfig::from_json(&serde_json::to_vec(&v).unwrap()).is_err());
        assert!(RepoConfig::from_json(b"{not json").is_err());
    }
}
