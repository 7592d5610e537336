//! Backups at rest: the manifest (the commit point of a backup) and packs of blocks.
//!
//! ```text
//! backups/<backup-id>.manifest    envelope (Kind::Manifest) of the JSON manifest, written last
//! packs/<aa>/<pack-id>            block envelopes back to back, then a trailer envelope
//!                                 (Kind::PackTrailer) listing them, then its length (u32 LE)
//! ```
//! A block envelope's identity is its block id, so it opens wherever it is read from, and
//! a block swapped for another fails authentication. Every manifest lists every block of
//! every file: any backup restores on its own.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lsn::{Lsn, TimelineId};

pub const MANIFEST_FORMAT: u32 = 1;
/// Packs are closed once they hold about this many stored bytes.
pub const PACK_TARGET_BYTES: usize = 32 << 20;

/// A keyed hash of a block's plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub [u8; 32]);

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockId({})", &hex::encode(self.0)[..16])
    }
}

impl Serialize for BlockId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BlockId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let mut b = [0u8; 32];
        hex::decode_to_slice(&s, &mut b).map_err(serde::de::Error::custom)?;
        Ok(BlockId(b))
    }
}

/// Where a block is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRef {
    pub id: BlockId,
    /// Pack object key, e.g. `packs/3f/3f9a…`.
    pub pack: String,
    /// Byte offset and length of the block's envelope inside the pack.
    pub offset: u64,
    pub len: u32,
    /// Plaintext length.
    pub plain_len: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// A block index in a [`FileEntry`] that stands for a block of zeros (not stored).
pub const ZERO_BLOCK: u32 = u32::MAX;

/// One entry of one archive of the backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Tablespace oid; None for the main data directory.
    pub tablespace: Option<u32>,
    /// Path inside the archive (relative, `/`-separated).
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Indexes into [`BackupManifest::blocks`], one per block of `block_size`, or [`ZERO_BLOCK`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<u32>,
    /// Set by backups that read the data directory directly, for files that had been
    /// quiet for a while when read: the next backup skips reading a file whose stamp
    /// still matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<FileStamp>,
}

/// What identifies a file's contents without reading it. A write always moves ctime,
/// which no user call can set back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub ino: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// CRC-32C of the contents, for PostgreSQL's backup_manifest.
    pub crc32c: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tablespace {
    pub oid: u32,
    pub location: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStats {
    /// Bytes of file data in the backup.
    pub bytes: u64,
    /// Blocks this backup uploaded, and their stored (compressed, encrypted) bytes.
    pub new_blocks: u64,
    pub new_stored_bytes: u64,
    /// Blocks found already stored and referenced instead.
    pub reused_blocks: u64,
    pub zero_blocks: u64,
    /// Bytes of files not read again because they were unchanged since the previous backup.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unread_bytes: u64,
    pub duration_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupManifest {
    pub format: u32,
    pub id: String,
    pub label: String,
    pub system_identifier: String,
    pub server_version_num: Option<u32>,
    pub timeline: TimelineId,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    pub end_timeline: TimelineId,
    /// RFC 3339, from the agent's clock, around BASE_BACKUP.
    pub started_at: String,
    pub finished_at: String,
    pub block_size: u32,
    pub tablespaces: Vec<Tablespace>,
    pub files: Vec<FileEntry>,
    pub blocks: Vec<BlockRef>,
    /// Postgres's own `backup_manifest`, for pg_verifybackup.
    pub pg_manifest: Option<String>,
    pub stats: BackupStats,
}

impl BackupManifest {
    pub fn key(id: &str) -> String {
        format!("backups/{id}.manifest")
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and checks internal consistency (block indexes in range, sizes agree).
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let m: BackupManifest =
            serde_json::from_slice(bytes).map_err(|e| Error::InvalidConfig {
                reason: format!("backup manifest: {e}"),
            })?;
        if m.format != MANIFEST_FORMAT {
            return Err(Error::InvalidConfig {
                reason: format!("backup manifest format {} is not supported", m.format),
            });
        }
        let bs = u64::from(m.block_size);
        for f in &m.files {
            let want = if f.kind == EntryKind::File {
                f.size.div_ceil(bs.max(1))
            } else {
                0
            };
            let bad_index = f
                .blocks
                .iter()
                .any(|&i| i != ZERO_BLOCK && i as usize >= m.blocks.len());
            if bs == 0 || f.blocks.len() as u64 != want || bad_index {
                return Err(Error::InvalidConfig {
                    reason: format!("backup manifest lists inconsistent blocks for {}", f.path),
                });
            }
        }
        Ok(m)
    }

    /// Stored bytes a full restore reads.
    pub fn stored_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| u64::from(b.len)).sum()
    }
}

/// One block's entry in a pack trailer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    pub id: BlockId,
    pub offset: u64,
    pub len: u32,
    pub plain_len: u32,
}

/// Random pack names: `packs/<aa>/<32 hex>`.
pub fn new_pack_key() -> String {
    let mut b = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
    let h = hex::encode(b);
    format!("packs/{}/{h}", &h[..2])
}

/// Splits a pack's tail into the sealed trailer: the last 4 bytes give its length.
/// `tail` is the end of the pack object; returns the trailer envelope bytes.
pub fn trailer_from_tail(tail: &[u8]) -> Result<&[u8]> {
    let n = tail.len();
    if n < 4 {
        return Err(Error::Truncated { have: n, need: 4 });
    }
    let len = u32::from_le_bytes([tail[n - 4], tail[n - 3], tail[n - 2], tail[n - 1]]) as usize;
    if len + 4 > n {
        return Err(Error::Truncated {
            have: n,
            need: len + 4,
        });
    }
    Ok(&tail[n - 4 - len..n - 4])
}

/// Encodes a trailer's plaintext (JSON list of entries).
pub fn trailer_plaintext(entries: &[PackEntry]) -> Vec<u8> {
    serde_json::to_vec(entries).unwrap_or_default()
}

pub fn parse_trailer(plaintext: &[u8]) -> Result<Vec<PackEntry>> {
    serde_json::from_slice(plaintext).map_err(|e| Error::InvalidConfig {
        reason: format!("pack trailer: {e}"),
    })
}

/// Sortable, unique backup ids: `20261123T072900Z-a1b2`.
pub fn new_backup_id(now: jiff::Timestamp) -> String {
    let mut b = [0u8; 2];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
    format!("{}-{}", now.strftime("%Y%m%dT%H%M%SZ"), hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> BackupManifest {
        BackupManifest {
            format: MANIFEST_FORMAT,
            id: "x".into(),
            label: "l".into(),
            system_identifier: "1".into(),
            server_version_num: Some(150018),
            timeline: TimelineId(1),
            start_lsn: Lsn(0x100),
            end_lsn: Lsn(0x200),
            end_timeline: TimelineId(1),
            started_at: "a".into(),
            finished_at: "b".into(),
            block_size: 8192,
            tablespaces: vec![],
            files: vec![FileEntry {
                tablespace: None,
                path: "base/1/1".into(),
                kind: EntryKind::File,
                mode: 0o600,
                mtime: 0,
                size: 10000,
                link: None,
                blocks: vec![0, ZERO_BLOCK],
                stamp: Some(FileStamp {
                    ino: 5,
                    mtime_ns: 1,
                    ctime_ns: 2,
                    crc32c: 3,
                }),
            }],
            blocks: vec![BlockRef {
                id: BlockId([7; 32]),
                pack: "packs/aa/bb".into(),
                offset: 0,
                len: 100,
                plain_len: 8192,
            }],
            pg_manifest: None,
            stats: BackupStats::default(),
        }
    }

    #[test]
    fn manifest_round_trip_and_checks() {
        let m = manifest();
        assert_eq!(BackupManifest::from_json(&m.to_json()).unwrap(), m);
        let mut bad = m.clone();
        bad.files[0].blocks = vec![0];
        assert!(BackupManifest::from_json(&bad.to_json()).is_err());
        let mut bad = m.clone();
        bad.files[0].blocks = vec![0, 5];
        assert!(BackupManifest::from_json(&bad.to_json()).is_err());
    }

    #[test]
    fn trailer_framing() {
        let mut pack = vec![9u8; 10];
        let trailer = b"TRAILER".to_vec();
        pack.extend_from_slice(&trailer);
        pack.extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        assert_eq!(trailer_from_tail(&pack).unwrap(), trailer.as_slice());
        assert!(trailer_from_tail(&pack[pack.len() - 5..]).is_err());
        assert!(trailer_from_tail(&[1, 2]).is_err());
    }

    #[test]
    fn backup_ids_sort_by_time() {
        let a = new_backup_id("2026-01-02T03:04:05Z".parse().unwrap());
        let b = new_backup_id("2026-01-02T03:04:06Z".parse().unwrap());
        assert!(a < b && a.starts_with("20260102T030405Z-"));
    }
}
