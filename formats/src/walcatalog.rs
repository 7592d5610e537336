//! What WAL a repository holds: sealed segments and streamed parts per timeline.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::envelope::Kind;
use crate::error::{Error, Result};
use crate::layout::{
    parse_wal_key, part_key, parts_prefix, ClusterBinding, WalObject, CLUSTER_KEY,
};
use crate::lsn::{Lsn, SegmentNo, SegmentSize, TimelineId};
use crate::repo::Repository;
use crate::units::Units;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimelineWal {
    pub sealed: BTreeSet<SegmentNo>,
    /// Parts per segment, as (from, to) byte offsets, sorted.
    pub parts: BTreeMap<SegmentNo, Vec<(u64, u64)>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalCatalog {
    pub size: SegmentSize,
    pub timelines: BTreeMap<TimelineId, TimelineWal>,
    pub histories: BTreeSet<TimelineId>,
}

impl WalCatalog {
    /// Lists `wal/` once.
    pub async fn load(repo: &Repository, size: SegmentSize) -> Result<Self> {
        let objects = repo.list("wal").await?;
        Ok(Self::from_keys(
            objects.iter().map(|o| o.key.as_str()),
            size,
        ))
    }

    pub fn from_keys<'a>(keys: impl IntoIterator<Item = &'a str>, size: SegmentSize) -> Self {
        let mut c = WalCatalog {
            size,
            timelines: BTreeMap::new(),
            histories: BTreeSet::new(),
        };
        for key in keys {
            match parse_wal_key(key, size) {
                Some(WalObject::Segment { tli, segno }) => {
                    c.timelines.entry(tli).or_default().sealed.insert(segno);
                }
                Some(WalObject::Part {
                    tli,
                    segno,
                    from,
                    to,
                }) => {
                    let parts = c
                        .timelines
                        .entry(tli)
                        .or_default()
                        .parts
                        .entry(segno)
                        .or_default();
                    parts.push((from, to));
                    parts.sort_unstable();
                }
                Some(WalObject::History { tli }) => {
                    c.histories.insert(tli);
                }
                _ => {}
            }
        }
        c
    }

    pub fn timeline(&self, tli: TimelineId) -> Option<&TimelineWal> {
        self.timelines.get(&tli)
    }
}

impl TimelineWal {
    /// Where the stored WAL of this timeline ends: after the newest sealed segment, plus
    /// whatever parts continue it from offset 0 of the next one. With no sealed segment,
    /// the lowest segment with parts is the start.
    pub fn end(&self, size: SegmentSize) -> Option<Lsn> {
        let seg = match self.sealed.last() {
            Some(s) => SegmentNo(s.0 + 1),
            None => *self.parts.keys().next()?,
        };
        let covered = self.part_cover(seg).1;
        Some(Lsn(seg.0 * size.bytes() + covered))
    }

    /// Parts that cover a segment contiguously from offset 0, and where that cover ends.
    /// Overlapping parts (possible after a crash) are fine: their bytes are the same WAL.
    pub fn part_cover(&self, seg: SegmentNo) -> (Vec<(u64, u64)>, u64) {
        let mut chosen = Vec::new();
        let mut pos = 0;
        let Some(parts) = self.parts.get(&seg) else {
            return (chosen, 0);
        };
        loop {
            let best = parts
                .iter()
                .filter(|(from, to)| *from <= pos && *to > pos)
                .max_by_key(|(_, to)| *to);
            match best {
                Some(&(from, to)) => {
                    chosen.push((from, to));
                    pos = to;
                }
                None => return (chosen, pos),
            }
        }
    }
}

/// Reads `cluster.json`, if the repository has been bound to a cluster yet.
pub async fn cluster_binding(repo: &Repository) -> Result<Option<ClusterBinding>> {
    match repo.get(CLUSTER_KEY).await {
        Ok(b) => ClusterBinding::from_json(&b).map(Some),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Fetches the parts that cover a segment contiguously from offset 0 and lays them into
/// one zero-padded segment. Returns it with the number of bytes covered; None if the
/// segment has no parts.
pub async fn fetch_parts(
    units: &Units,
    tli: TimelineId,
    segno: SegmentNo,
    size: SegmentSize,
) -> Result<Option<(Bytes, u64)>> {
    let listed = units.repo().list(&parts_prefix(tli, segno, size)).await?;
    let mut wal = TimelineWal::default();
    let mut parts: Vec<(u64, u64)> = listed
        .iter()
        .filter_map(|o| match parse_wal_key(&o.key, size) {
            Some(WalObject::Part { from, to, .. }) => Some((from, to)),
            _ => None,
        })
        .collect();
    parts.sort_unstable();
    wal.parts.insert(segno, parts);
    let (cover, covered) = wal.part_cover(segno);
    if cover.is_empty() {
        return Ok(None);
    }
    let fetches = cover.iter().map(|&(from, to)| {
        let key = part_key(tli, segno, size, from, to);
        async move {
            let b = units.get(&key, Kind::WalPart).await?;
            if b.len() as u64 != to - from {
                return Err(Error::LengthMismatch {
                    declared: to - from,
                    actual: b.len() as u64,
                });
            }
            Ok((from, b))
        }
    });
    let pieces = futures::future::try_join_all(fetches).await?;
    let refs: Vec<(u64, &[u8])> = pieces.iter().map(|(f, b)| (*f, b.as_ref())).collect();
    Ok(Some((Bytes::from(assemble(size.bytes(), &refs)), covered)))
}

/// Lays parts (each with its start offset) into one buffer of `len` bytes, in order.
/// Later pieces overwrite the overlap of earlier ones; both hold the same WAL.
pub fn assemble(len: u64, pieces: &[(u64, &[u8])]) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    for (from, bytes) in pieces {
        let start = (*from as usize).min(out.len());
        let end = (start + bytes.len()).min(out.len());
        out[start..end].copy_from_slice(&bytes[..end - start]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{history_key, part_key, segment_key};

    const S: SegmentSize = SegmentSize::DEFAULT;

    #[test]
    fn end_and_cover() {
        let t = TimelineId(1);
        let keys = [
            segment_key(t, SegmentNo(3), S),
            segment_key(t, SegmentNo(4), S),
            part_key(t, SegmentNo(5), S, 0, 100),
            part_key(t, SegmentNo(5), S, 50, 300),
            part_key(t, SegmentNo(5), S, 100, 200),
            part_key(t, SegmentNo(5), S, 400, 500),
            history_key(TimelineId(2)),
            "walferry.json".to_string(),
        ];
        let c = WalCatalog::from_keys(keys.iter().map(String::as_str), S);
        let tl = c.timeline(t).unwrap();
        assert_eq!(
            tl.part_cover(SegmentNo(5)),
            (vec![(0, 100), (50, 300)], 300)
        );
        assert_eq!(tl.end(S), Some(Lsn(5 * S.bytes() + 300)));
        assert!(c.histories.contains(&TimelineId(2)));

        let only_parts = WalCatalog::from_keys([part_key(t, SegmentNo(9), S, 0, 10).as_str()], S);
        assert_eq!(
            only_parts.timeline(t).unwrap().end(S),
            Some(Lsn(9 * S.bytes() + 10))
        );
        let gap = WalCatalog::from_keys([part_key(t, SegmentNo(9), S, 10, 20).as_str()], S);
        assert_eq!(gap.timeline(t).unwrap().end(S), Some(Lsn(9 * S.bytes())));
    }

    #[test]
    fn assemble_pads_and_overlaps() {
        let a = [1u8; 4];
        let b = [2u8; 4];
        assert_eq!(
            assemble(10, &[(0, &a), (2, &b)]),
            vec![1, 1, 2, 2, 2, 2, 0, 0, 0, 0]
        );
        assert_eq!(assemble(3, &[(0, &a)]), vec![1, 1, 1]);
    }
}
