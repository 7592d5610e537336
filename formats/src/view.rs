//! A read-only view of a repository: backups, WAL, the commit-time index and timeline
//! histories, fetched once. Restore planning, `verify` and `list` read it.

use std::collections::BTreeMap;

use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;

use crate::backup::BackupManifest;
use crate::envelope::Kind;
use crate::error::{Error, Result};
use crate::layout::{history_key, parse_wal_key, WalObject};
use crate::walcatalog::{cluster_binding, WalCatalog};
use crate::walreader::WalSummary;
use crate::{Lsn, SegmentSize, TimelineId, Units};

/// How often [`RepoView::load`] reads again after an object vanished mid-read.
const LOAD_ATTEMPTS: u64 = 5;

/// One commit-time index entry: a WAL range and what was committed in it.
#[derive(Clone, Debug)]
pub struct IndexEntry {
    pub tli: TimelineId,
    pub start: Lsn,
    pub end: Lsn,
    pub summary: WalSummary,
}

/// Everything planning (and verify, and list) reads, fetched once.
pub struct RepoView {
    pub size: SegmentSize,
    pub backups: Vec<BackupManifest>,
    pub catalog: WalCatalog,
    pub index: Vec<IndexEntry>,
    /// For each timeline with a history file: (parent timeline, where the parent ended).
    pub histories: BTreeMap<TimelineId, Vec<(TimelineId, Lsn)>>,
}

impl RepoView {
    pub async fn load(units: &Units) -> Result<RepoView> {
        // A live agent seals segments and deletes their parts, and retention deletes
        // backups, while this reads: an object listed a moment ago may be gone. Reading
        // again gives a consistent view; only a miss that persists is an error.
        let mut attempt = 0;
        loop {
            match Self::load_once(units).await {
                Err(e) if e.is_not_found() && attempt < LOAD_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
                }
                r => return r,
            }
        }
    }

    async fn load_once(units: &Units) -> Result<RepoView> {
        let repo = units.repo();
        let binding = cluster_binding(repo).await?.ok_or(Error::EmptyRepository)?;
        let size = binding.wal_segment_size;
        let manifests = repo.list("backups").await?;
        let backups: Vec<BackupManifest> = futures::stream::iter(
            manifests
                .into_iter()
                .filter(|o| o.key.ends_with(".manifest")),
        )
        .map(|o| async move {
            let plain = units
                .get(&o.key, Kind::Manifest)
                .await
                .map_err(|e| e.at(&o.key))?;
            BackupManifest::from_json(&plain).map_err(|e| e.at(&o.key))
        })
        .buffer_unordered(8)
        .try_collect()
        .await?;
        let catalog = WalCatalog::load(repo, size).await?;
        let index_keys = repo.list("wal/index").await?;
        let mut index: Vec<IndexEntry> = futures::stream::iter(index_keys)
            .map(|o| async move {
                let (tli, start, end) = match parse_wal_key(&o.key, size) {
                    Some(WalObject::SegmentIndex { tli, segno }) => {
                        let s = segno.start_lsn(size).unwrap_or_default();
                        (tli, s, Lsn(s.0 + size.bytes()))
                    }
                    Some(WalObject::PartIndex {
                        tli,
                        segno,
                        from,
                        to,
                    }) => {
                        let s = segno.start_lsn(size).unwrap_or_default();
                        (tli, Lsn(s.0 + from), Lsn(s.0 + to))
                    }
                    _ => return Ok(None),
                };
                let plain = units
                    .get(&o.key, Kind::WalIndex)
                    .await
                    .map_err(|e| e.at(&o.key))?;
                let summary: WalSummary = serde_json::from_slice(&plain).map_err(|e| {
                    Error::InvalidConfig {
                        reason: format!("WAL index entry: {e}"),
                    }
                    .at(&o.key)
                })?;
                Ok::<_, Error>(Some(IndexEntry {
                    tli,
                    start,
                    end,
                    summary,
                }))
            })
            .buffer_unordered(16)
            .try_filter_map(|e| async move { Ok(e) })
            .try_collect()
            .await?;
        index.sort_by_key(|e| (e.tli, e.start));
        let mut histories = BTreeMap::new();
        for tli in catalog.histories.iter().copied() {
            let key = history_key(tli);
            let plain = units
                .get(&key, Kind::WalHistory)
                .await
                .map_err(|e| e.at(&key))?;
            histories.insert(tli, parse_history(&plain).map_err(|e| e.at(&key))?);
        }
        let mut backups = backups;
        backups.sort_by_key(|b| b.start_lsn);
        Ok(RepoView {
            size,
            backups,
            catalog,
            index,
            histories,
        })
    }

    /// The newest timeline the repository knows.
    pub fn latest_timeline(&self) -> Option<TimelineId> {
        let wal = self.catalog.timelines.keys().next_back().copied();
        let hist = self.histories.keys().next_back().copied();
        wal.max(hist)
    }

    /// The timelines leading to `tli`, oldest first: (timeline, where it ends on this path).
    pub fn path_to(&self, tli: TimelineId) -> Vec<(TimelineId, Lsn)> {
        let mut path: Vec<(TimelineId, Lsn)> =
            self.histories.get(&tli).cloned().unwrap_or_default();
        path.push((tli, Lsn(u64::MAX)));
        path
    }

    /// The restorable windows for time targets on the path to `tli`: from the earliest
    /// backup's end to the last commit the WAL holds (exclusive: recovery needs a later
    /// commit to stop at).
    pub fn window(&self, tli: TimelineId) -> Option<(Timestamp, Timestamp)> {
        let path = self.path_to(tli);
        let from = self
            .backups
            .iter()
            .filter(|b| on_path(&path, b.timeline, b.end_lsn))
            .filter_map(|b| b.finished_at.parse::<Timestamp>().ok())
            .min()?;
        // Up to whole microseconds, the precision `--to` accepts and Postgres keeps: the
        // printed start of the window can be pasted back as a target.
        let from = from
            .round(
                jiff::TimestampRound::new()
                    .smallest(jiff::Unit::Microsecond)
                    .mode(jiff::RoundMode::Ceil),
            )
            .unwrap_or(from);
        let to = self
            .index
            .iter()
            .filter_map(|e| e.summary.last_commit.map(|c| (e.tli, c)))
            // By the commit's own position: a new timeline's first segment starts before
            // the switch point, yet its commits after the switch are on the path.
            .filter(|(tli, c)| on_path(&path, *tli, c.lsn))
            .filter_map(|(_, c)| c.time.to_timestamp())
            .max()?;
        (to > from).then_some((from, to))
    }
}

/// Whether `lsn` on `tli` lies on `path` (as returned by [`RepoView::path_to`]).
pub fn on_path(path: &[(TimelineId, Lsn)], tli: TimelineId, lsn: Lsn) -> bool {
    let mut begin = Lsn(0);
    for &(t, end) in path {
        if t == tli && lsn >= begin && lsn < end {
            return true;
        }
        begin = end;
    }
    false
}

/// Parses a timeline history file: `parentTLI<TAB>switchLSN<TAB>reason` lines.
pub fn parse_history(bytes: &[u8]) -> Result<Vec<(TimelineId, Lsn)>> {
    let bad = |line: &str| Error::InvalidConfig {
        reason: format!("malformed timeline history line {line:?}"),
    };
    let text = std::str::from_utf8(bytes).map_err(|_| bad("(not UTF-8)"))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut f = line.split_whitespace();
        let (Some(t), Some(l)) = (f.next(), f.next()) else {
            return Err(bad(line));
        };
        let tli = t.parse().map_err(|_| bad(line))?;
        out.push((TimelineId(tli), l.parse().map_err(|_| bad(line))?));
    }
    Ok(out)
}
