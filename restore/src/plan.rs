//! Planning a restore: target -> backup + timeline path + WAL range, checked against what
//! the repository holds before a single byte is written.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use anyhow::{anyhow, bail, Context};
use jiff::Timestamp;
use walferry_formats::backup::BackupManifest;
use walferry_formats::view::{on_path, RepoView};
use walferry_formats::{Lsn, SegmentNo, TimelineId, Units, WalFileName};

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
                .filter(|e| e.end > chosen.1.end_lsn)
                .find(|e| {
                    e.summary.last_commit.is_some_and(|c| {
                        on_path(&path, e.tli, c.lsn)
                            && c.time.to_timestamp().is_some_and(|c| c > *t)
                    })
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
                bail!("LSN {l} is past the end of the stored WAL ({wal_end_of_repo}); choose an LSN up to {wal_end_of_repo}, or --to latest");
            }
            (*chosen, *l)
        }
        Target::Name(n) => {
            let rp = view
                .index
                .iter()
                .flat_map(|e| e.summary.restore_points.iter().map(move |r| (e.tli, r)))
                .filter(|(tli, r)| &r.name == n && on_path(&path, *tli, r.lsn))
                .map(|(_, r)| r)
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
    let segments = check_wal(view, &path, manifest.start_lsn, stop.max(manifest.end_lsn))
        .map_err(|gap| {
            let way_out = if gap.start < manifest.end_lsn {
                format!(
                    "backup {} needs it to become consistent and cannot be restored; choose another backup with --backup ID",
                    manifest.id
                )
            } else {
                let later = view
                    .backups
                    .iter()
                    .filter(|b| on_path(&path, b.timeline, b.end_lsn))
                    .rfind(|b| b.start_lsn >= gap.end && b.end_lsn <= stop);
                match later {
                    Some(b) => format!(
                        "choose a target before {}, or restore from backup {} (--backup {}), which starts after the gap",
                        gap.start, b.id, b.id
                    ),
                    None => format!(
                        "choose a target before {}; moments after it need a backup taken after it (`walferry-agent backup`)",
                        gap.start
                    ),
                }
            };
            anyhow!(
                "WAL segment {} is missing from the repository (it holds WAL {}..{}); recovery to this target cannot pass it: {way_out}",
                gap.name,
                gap.start,
                gap.end
            )
        })?;
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

/// A WAL segment recovery needs that the repository does not hold.
struct Gap {
    name: String,
    start: Lsn,
    end: Lsn,
}

/// Every segment from `start` to `end` must exist (sealed, or as parts) on the timeline
/// recovery will look for it on. Returns their names, or the first one missing.
fn check_wal(
    view: &RepoView,
    path: &[(TimelineId, Lsn)],
    start: Lsn,
    end: Lsn,
) -> Result<Vec<String>, Gap> {
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
        let seg_start = Lsn(s * size.bytes());
        let gap = |name: String| Gap {
            name,
            start: seg_start,
            end: Lsn(seg_start.0 + size.bytes()),
        };
        let Some(tli) = tli else {
            return Err(gap(format!("{s:X} (no timeline covers it)")));
        };
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
            return Err(gap(name));
        }
        names.push(name);
    }
    Ok(names)
}

/// Every pack the backup reads must exist and be long enough for its blocks: one listing,
/// before anything is written. (A changed byte inside a pack shows when its block is
/// decoded; the materializer then removes what it wrote.)
pub async fn check_packs(units: &Units, manifest: &BackupManifest) -> anyhow::Result<()> {
    let stored: HashMap<String, u64> = units
        .repo()
        .list("packs")
        .await
        .context("list packs")?
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    // Pack -> (bytes its blocks need, one block in it).
    let mut needed: BTreeMap<&str, (u64, usize)> = BTreeMap::new();
    for (i, b) in manifest.blocks.iter().enumerate() {
        let e = needed.entry(b.pack.as_str()).or_insert((0, i));
        e.0 = e.0.max(b.offset + u64::from(b.len));
    }
    for (pack, (end, block)) in needed {
        let file = manifest
            .files
            .iter()
            .find(|f| f.blocks.contains(&(block as u32)))
            .map_or("?", |f| f.path.as_str());
        match stored.get(pack) {
            None => bail!(
                "backup {} cannot be restored: pack {pack} is missing from the repository (it holds blocks of {file}, among others)",
                manifest.id
            ),
            Some(&size) if size < end => bail!(
                "backup {} cannot be restored: pack {pack} is truncated ({size} bytes stored, its blocks need {end}; it holds blocks of {file}, among others)",
                manifest.id
            ),
            Some(_) => {}
        }
    }
    Ok(())
}

/// The way out when the chosen backup is damaged: the other backups that reach the target.
pub fn other_backups(view: &RepoView, plan: &Plan) -> String {
    let path = view.path_to(plan.timeline);
    let others: Vec<&str> = view
        .backups
        .iter()
        .filter(|b| b.id != plan.backup_id)
        .filter(|b| on_path(&path, b.timeline, b.end_lsn) && b.end_lsn <= plan.wal_end)
        .map(|b| b.id.as_str())
        .collect();
    let verify = "`walferry-restore verify` lists every damaged object.";
    if others.is_empty() {
        format!("No other backup reaches this target; take a new backup (`walferry-agent backup`) to restore later moments. {verify}")
    } else {
        format!(
            "Restore from another backup with --backup ID ({} reach this target). {verify}",
            others.join(", ")
        )
    }
}
