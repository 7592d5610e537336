//! Planning a restore: target -> backup + timeline path + WAL range, checked against what
//! the repository holds before a single byte is written.

use std::fmt;

use anyhow::{anyhow, bail};
use jiff::Timestamp;
use walferry_formats::backup::BackupManifest;
use walferry_formats::view::{on_path, RepoView};
use walferry_formats::{Lsn, SegmentNo, TimelineId, WalFileName};

/// What the operator asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Time(Timestamp),
    Latest,
    Lsn(Lsn),
    Xid(u32),
    Name(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Time(t) => write!(f, "time {t}"),
            Target::Latest => f.write_str("the latest WAL"),
            Target::Lsn(l) => write!(f, "LSN {l}"),
            Target::Xid(x) => write!(f, "transaction {x}"),
            Target::Name(n) => write!(f, "restore point {n:?}"),
        }
    }
}

/// A validated plan.
#[derive(Debug)]
pub struct Plan {
    pub target: Target,
    pub backup_id: String,
    pub backup_index: usize,
    pub timeline: TimelineId,
    pub wal_start: Lsn,
    /// WAL must be present up to here (the stop point, or the end of WAL for `latest`).
    pub wal_end: Lsn,
    pub segments: Vec<String>,
    pub bytes_to_fetch: u64,
    pub window: Option<(Timestamp, Timestamp)>,
}

fn window_text(w: Option<(Timestamp, Timestamp)>) -> String {
    match w {
        Some((a, b)) => format!("the restorable window is {a} up to (not including) {b}"),
        None => "the repository has no restorable window yet (it needs a backup and WAL with commits after it)".into(),
    }
}

/// Chooses the backup and WAL for `target`, failing with the window when it is outside it.
pub fn plan(view: &RepoView, target: &Target, backup: Option<&str>) -> anyhow::Result<Plan> {
    let tli = view
        .latest_timeline()
        .ok_or_else(|| anyhow!("the repository holds no WAL"))?;
    let path = view.path_to(tli);
    let window = view.window(tli);
    let candidates: Vec<(usize, &BackupManifest)> = view
        .backups
        .iter()
        .enumerate()
        .filter(|(_, b)| on_path(&path, b.timeline, b.end_lsn))
        .collect();
    if candidates.is_empty() {
        bail!("no backup on the path to timeline {tli}; take one with `walferry-agent backup`");
    }
    let wal_end_of_repo = path
        .iter()
        .filter_map(|(t, end)| {
            view.catalog
                .timeline(*t)
                .and_then(|w| w.end(view.size))
                .map(|e| e.min(*end))
        })
        .max()
        .unwrap_or_default();

    let (chosen, stop) = match target {
        Target::Time(t) => {
            let Some((from, to)) = window else {
                bail!("cannot restore to {t}: {}", window_text(window));
            };
            if *t < from {
                bail!(
                    "{t} is before the first backup finished; {}",
                    window_text(window)
                );
            }
            if *t >= to {
                bail!("{t} is at or after the last commit in the repository; {}. To restore everything, use --to latest", window_text(window));
            }
            let chosen = candidates
                .iter()
                .rev()
                .find(|(_, b)| b.finished_at.parse::<Timestamp>().is_ok_and(|f| f <= *t))
                .ok_or_else(|| anyhow!("no backup finished before {t}; {}", window_text(window)))?;
            // Recovery stops before the first commit later than t: WAL is needed up to there.
            let stop = view
                .index
                .iter()
                .filter(|e| on_path(&path, e.tli, e.start) && e.end > chosen.1.end_lsn)
                .find(|e| {
                    e.summary
                        .last_commit
                        .and_then(|c| c.time.to_timestamp())
                        .is_some_and(|c| c > *t)
                })
                .map(|e| e.end)
                .ok_or_else(|| {
                    anyhow!("no commit after {t} in the WAL; {}", window_text(window))
                })?;
            (*chosen, stop)
        }
        Target::Latest => (*candidates.last().expect("not empty"), wal_end_of_repo),
        Target::Lsn(l) => {
            let chosen = candidates
                .iter()
                .rev()
                .find(|(_, b)| b.end_lsn <= *l)
                .ok_or_else(|| {
                    anyhow!(
                        "LSN {l} is before the end of the first backup ({})",
                        candidates[0].1.end_lsn
                    )
                })?;
            if *l > wal_end_of_repo {
                bail!("LSN {l} is past the end of the stored WAL ({wal_end_of_repo})");
            }
            (*chosen, *l)
        }
        Target::Name(n) => {
            let rp = view
                .index
                .iter()
                .filter(|e| on_path(&path, e.tli, e.start))
                .flat_map(|e| e.summary.restore_points.iter())
                .filter(|r| &r.name == n)
                .max_by_key(|r| r.lsn)
                .ok_or_else(|| anyhow!("no restore point named {n:?} in the WAL"))?;
            let chosen = candidates
                .iter()
                .rev()
                .find(|(_, b)| b.end_lsn <= rp.lsn)
                .ok_or_else(|| {
                    anyhow!(
                        "restore point {n:?} ({}) is before the end of the first backup",
                        rp.lsn
                    )
                })?;
            (*chosen, rp.end)
        }
        // The index does not record xids: the oldest backup replays every later commit.
        Target::Xid(_) => (candidates[0], wal_end_of_repo),
    };
    let (backup_index, manifest) = match backup {
        Some(id) => view
            .backups
            .iter()
            .enumerate()
            .find(|(_, b)| b.id == id)
            .ok_or_else(|| anyhow!("no backup with id {id}"))?,
        None => chosen,
    };
    if manifest.end_lsn > stop && !matches!(target, Target::Latest | Target::Xid(_)) {
        bail!(
            "backup {} ends at {}, after the target's stop point {stop}; choose an older backup",
            manifest.id,
            manifest.end_lsn
        );
    }
    let segments = check_wal(view, &path, manifest.start_lsn, stop.max(manifest.end_lsn))?;
    Ok(Plan {
        target: target.clone(),
        backup_id: manifest.id.clone(),
        backup_index,
        timeline: tli,
        wal_start: manifest.start_lsn,
        wal_end: stop.max(manifest.end_lsn),
        segments,
        bytes_to_fetch: manifest.stored_bytes(),
        window,
    })
}

/// Every segment from `start` to `end` must exist (sealed, or as parts) on the timeline
/// recovery will look for it on. Returns their names.
fn check_wal(
    view: &RepoView,
    path: &[(TimelineId, Lsn)],
    start: Lsn,
    end: Lsn,
) -> anyhow::Result<Vec<String>> {
    let size = view.size;
    let mut names = Vec::new();
    let last = Lsn(end.0.saturating_sub(1)).segment(size).0;
    for s in start.segment(size).0..=last {
        let segno = SegmentNo(s);
        // Like recovery: the newest timeline on the path that began at or before this segment.
        let mut tli = None;
        let mut begin = Lsn(0);
        for &(t, e) in path {
            if begin.segment(size).0 <= s {
                tli = Some(t);
            }
            begin = e;
        }
        let tli = tli.ok_or_else(|| anyhow!("no timeline covers segment {s}"))?;
        let name = WalFileName::Segment { tli, segno }.format(size);
        let have = view.catalog.timeline(tli).is_some_and(|w| {
            w.sealed.contains(&segno) || {
                let covered = w.part_cover(segno).1;
                let needed = if s == last {
                    end.segment_offset(size).max(1).min(size.bytes())
                } else {
                    size.bytes()
                };
                covered >= needed || (s == last && covered > 0 && end.is_segment_start(size))
            }
        });
        if !have {
            bail!("WAL segment {name} is missing from the repository; recovery to this target cannot pass it");
        }
        names.push(name);
    }
    Ok(names)
}
