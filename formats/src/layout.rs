//! Object names in a repository, and the small records that describe it.
//!
//! ```text
//! cluster.json                                   which cluster this repository belongs to
//! wal/<tli>/<segment>                            sealed segment
//! wal/<tli>/<segment>.parts/<from>-<to>          streamed part: byte offsets within the segment, hex
//! wal/<tli>/<segment>.<offset>.backup            backup history file
//! wal/<tli>.history                              timeline history file
//! wal/index/<tli>/<segment>                      commit-time index of a sealed segment
//! wal/index/<tli>/<segment>.parts/<from>-<to>    commit-time index of a part
//! ```
//! `<tli>` is 8 upper-case hex digits, as in WAL file names. Offsets are 8 hex digits so
//! that keys sort in byte order.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lsn::{SegmentNo, SegmentSize, TimelineId};
use crate::walname::{segment_file_name, WalFileName};

pub const CLUSTER_KEY: &str = "cluster.json";

fn tli_dir(tli: TimelineId) -> String {
    format!("wal/{:08X}", tli.0)
}

/// Where a WAL file of this name is stored. `.partial` files become a part covering
/// the whole segment, so streamed and pushed WAL share one layout.
pub fn wal_file_key(name: &WalFileName, size: SegmentSize) -> String {
    match *name {
        WalFileName::Segment { tli, segno } => segment_key(tli, segno, size),
        WalFileName::Partial { tli, segno } => part_key(tli, segno, size, 0, size.bytes()),
        WalFileName::History { tli } => history_key(tli),
        WalFileName::Backup { .. } => format!("{}/{}", tli_dir(name.timeline()), name.format(size)),
    }
}

pub fn segment_key(tli: TimelineId, segno: SegmentNo, size: SegmentSize) -> String {
    format!("{}/{}", tli_dir(tli), segment_file_name(tli, segno, size))
}

pub fn parts_prefix(tli: TimelineId, segno: SegmentNo, size: SegmentSize) -> String {
    format!("{}.parts", segment_key(tli, segno, size))
}

pub fn part_key(
    tli: TimelineId,
    segno: SegmentNo,
    size: SegmentSize,
    from: u64,
    to: u64,
) -> String {
    format!("{}/{from:08X}-{to:08X}", parts_prefix(tli, segno, size))
}

pub fn history_key(tli: TimelineId) -> String {
    format!("wal/{:08X}.history", tli.0)
}

pub fn segment_index_key(tli: TimelineId, segno: SegmentNo, size: SegmentSize) -> String {
    format!(
        "wal/index/{:08X}/{}",
        tli.0,
        segment_file_name(tli, segno, size)
    )
}

pub fn part_index_key(
    tli: TimelineId,
    segno: SegmentNo,
    size: SegmentSize,
    from: u64,
    to: u64,
) -> String {
    format!(
        "wal/index/{:08X}/{}.parts/{from:08X}-{to:08X}",
        tli.0,
        segment_file_name(tli, segno, size)
    )
}

/// What a listed key under `wal/` is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WalObject {
    Segment {
        tli: TimelineId,
        segno: SegmentNo,
    },
    Part {
        tli: TimelineId,
        segno: SegmentNo,
        from: u64,
        to: u64,
    },
    History {
        tli: TimelineId,
    },
    BackupHistory {
        tli: TimelineId,
        segno: SegmentNo,
    },
    SegmentIndex {
        tli: TimelineId,
        segno: SegmentNo,
    },
    PartIndex {
        tli: TimelineId,
        segno: SegmentNo,
        from: u64,
        to: u64,
    },
}

/// Parses a repository key (relative to the root). None for keys that are not WAL objects.
pub fn parse_wal_key(key: &str, size: SegmentSize) -> Option<WalObject> {
    let (index, rest) = match key.strip_prefix("wal/index/") {
        Some(r) => (true, r),
        None => (false, key.strip_prefix("wal/")?),
    };
    if !index && !rest.contains('/') {
        return match WalFileName::parse(rest, size).ok()? {
            WalFileName::History { tli } => Some(WalObject::History { tli }),
            _ => None,
        };
    }
    let (dir, file) = rest.split_once('/')?;
    let dir_tli = u32::from_str_radix(dir, 16)
        .ok()
        .filter(|_| dir.len() == 8)?;
    let (seg, range) = match file.split_once(".parts/") {
        Some((seg, range)) => (seg, Some(range)),
        None => (file, None),
    };
    let parsed = WalFileName::parse(seg, size).ok()?;
    if parsed.timeline().0 != dir_tli {
        return None;
    }
    let obj = match (parsed, range, index) {
        (WalFileName::Segment { tli, segno }, None, false) => WalObject::Segment { tli, segno },
        (WalFileName::Segment { tli, segno }, None, true) => WalObject::SegmentIndex { tli, segno },
        (WalFileName::Segment { tli, segno }, Some(r), _) => {
            let (from, to) = parse_range(r, size)?;
            if index {
                WalObject::PartIndex {
                    tli,
                    segno,
                    from,
                    to,
                }
            } else {
                WalObject::Part {
                    tli,
                    segno,
                    from,
                    to,
                }
            }
        }
        (WalFileName::Backup { tli, segno, .. }, None, false) => {
            WalObject::BackupHistory { tli, segno }
        }
        _ => return None,
    };
    Some(obj)
}

fn parse_range(r: &str, size: SegmentSize) -> Option<(u64, u64)> {
    let (a, b) = r.split_once('-')?;
    let hex = |s: &str| {
        (s.len() == 8 && s.bytes().all(|c| c.is_ascii_hexdigit()))
            .then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
    };
    let (from, to) = (hex(a)?, hex(b)?);
    (from < to && to <= size.bytes()).then_some((from, to))
}

/// `cluster.json`: the cluster a repository belongs to. Written once, by the first agent.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterBinding {
    /// pg_control's system identifier, as a decimal string (it is a u64).
    pub system_identifier: String,
    pub wal_segment_size: SegmentSize,
    /// `server_version_num`, e.g. 150004, when known (wal-push sees only WAL files).
    pub server_version_num: Option<u32>,
    pub bound_at: String,
}

impl ClusterBinding {
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| Error::InvalidConfig {
            reason: format!("{CLUSTER_KEY}: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: SegmentSize = SegmentSize::DEFAULT;

    #[test]
    fn keys_round_trip() {
        let tli = TimelineId(2);
        let segno = SegmentNo(0x10A);
        let cases = [
            (
                segment_key(tli, segno, S),
                WalObject::Segment { tli, segno },
            ),
            (
                part_key(tli, segno, S, 0x2000, 0x5000),
                WalObject::Part {
                    tli,
                    segno,
                    from: 0x2000,
                    to: 0x5000,
                },
            ),
            (history_key(tli), WalObject::History { tli }),
            (
                segment_index_key(tli, segno, S),
                WalObject::SegmentIndex { tli, segno },
            ),
            (
                part_index_key(tli, segno, S, 0, 0x100),
                WalObject::PartIndex {
                    tli,
                    segno,
                    from: 0,
                    to: 0x100,
                },
            ),
        ];
        for (key, want) in cases {
            assert_eq!(parse_wal_key(&key, S), Some(want), "{key}");
        }
        assert_eq!(
            segment_key(tli, segno, S),
            "wal/00000002/00000002000000010000000A"
        );
        assert_eq!(
            part_key(tli, segno, S, 0x2000, 0x5000),
            "wal/00000002/00000002000000010000000A.parts/00002000-00005000"
        );
        let backup = WalFileName::parse("000000010000000000000006.00000028.backup", S).unwrap();
        assert_eq!(
            wal_file_key(&backup, S),
            "wal/00000001/000000010000000000000006.00000028.backup"
        );
        let partial = WalFileName::parse("00000001000000000000000A.partial", S).unwrap();
        assert!(matches!(
            parse_wal_key(&wal_file_key(&partial, S), S),
            Some(WalObject::Part {
                from: 0,
                to: 0x100_0000,
                ..
            })
        ));
    }

    #[test]
    fn rejects_foreign_keys() {
        for k in [
            "walferry.json",
            "wal/00000001/junk",
            "wal/00000002/000000010000000000000001",
            "wal/00000001/000000010000000000000001.parts/00000005-00000001",
            "wal/00000001/000000010000000000000001.parts/00000000-01000001",
            "packs/ab/cd",
        ] {
            assert_eq!(parse_wal_key(k, S), None, "{k}");
        }
    }
}
