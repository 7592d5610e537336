//! Retention: which backups to keep, and what their deletion frees.
//!
//! # Policy
//!
//! - `retain_full = N`: keep the newest N backups (newest by `finished_at`).
//! - `recovery_window = W`: keep everything needed so that any moment in the last W stays
//!   restorable: every backup that finished after `now - W`, plus the newest backup that
//!   finished at or before `now - W` (the one a restore to `now - W` starts from).
//! - Both given: a backup is deleted only when *both* rules let it go (the union is kept).
//!
//! At least one rule must be given, and `retain_full` must be at least 1, so the newest
//! backup is never deleted.
//!
//! # What the plan deletes, in this order
//!
//! 1. **Manifests** of the backups the policy lets go: the commit points. Once a manifest
//!    is gone, nothing lists or restores that backup.
//! 2. **Packs** no remaining manifest references. A pack that some deleted manifest
//!    referenced (and no kept one does) goes at once. A pack that *no* manifest references
//!    may belong to a backup still running (packs are written before their manifest), so
//!    it goes only once it is older than the grace period (default 6 h, by the store's
//!    last-modified time; a pack whose age the store does not report is kept).
//! 3. **WAL** below the oldest kept backup's start: sealed segments, parts, `.backup`
//!    files and commit-time index entries whose segment number is below the segment that
//!    holds the oldest kept backup's `start_lsn` (segment numbers are LSN-based, so the
//!    bound is the same on every timeline). WAL at or after that segment is never deleted,
//!    so the restorable window loses its old end but never gets a hole. A timeline's
//!    `.history` file goes once the timeline has no WAL left and is not the latest
//!    timeline, the timeline of a kept backup, or an ancestor of one of those. Streamed
//!    parts of a segment that is also stored sealed (and their index entries, when the
//!    segment has its own) are redundant at any age and go too; the streamer removes them
//!    itself after sealing, and leaves them only when it stops in between.
//!
//! Every delete is idempotent: an interrupted expire is finished by running it again.
//! Deletes happen only while the writer lease is held (see [`crate::lease`]); the lease is
//! checked, and renewed when needed, before every batch.
//!
//! Not done here: repacking packs that are mostly garbage (a pack is kept whole while any
//! kept manifest references any block in it), and protecting a restore that is reading a
//! backup while it is being expired.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::time::Duration;

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use serde::Serialize;
use walferry_formats::backup::BackupManifest;
use walferry_formats::layout::{parse_wal_key, WalObject};
use walferry_formats::view::RepoView;
use walferry_formats::{Error, Lsn, ObjectInfo, Repository, SegmentNo, TimelineId, Units};

use crate::lease::Lease;

/// Unreferenced packs younger than this may belong to a running backup.
pub const DEFAULT_PACK_GRACE: Duration = Duration::from_secs(6 * 3600);

/// Deletes per lease check.
const BATCH: usize = 64;
/// Deletes in flight at once.
const PARALLEL_DELETES: usize = 8;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Keep the newest N backups.
    pub retain_full: Option<usize>,
    /// Keep what a restore to any moment in the last `recovery_window` needs.
    pub recovery_window: Option<Duration>,
}

impl RetentionPolicy {
    pub fn validate(&self) -> Result<(), String> {
        match (self.retain_full, self.recovery_window) {
            (None, None) => Err(
                "give a retention policy: --retain-full N and/or --recovery-window DURATION".into(),
            ),
            (Some(0), _) => {
                Err("--retain-full must be at least 1 (the newest backup is never deleted)".into())
            }
            (_, Some(w)) if w.is_zero() => Err("--recovery-window must be above zero".into()),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for RetentionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(n) = self.retain_full {
            parts.push(format!(
                "keep the newest {n} backup{}",
                if n == 1 { "" } else { "s" }
            ));
        }
        if let Some(w) = self.recovery_window {
            parts.push(format!(
                "keep every moment of the last {} restorable",
                humantime::format_duration(w)
            ));
        }
        f.write_str(&parts.join(" and "))
    }
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PolicyReport {
    pub retain_full: Option<usize>,
    /// Seconds.
    pub recovery_window_secs: Option<u64>,
    pub recovery_window: Option<String>,
    pub pack_grace_secs: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackupItem {
    pub id: String,
    /// The manifest's object key.
    pub key: String,
    /// The manifest object's size.
    pub bytes: u64,
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    pub finished_at: String,
    /// For kept backups: which rules keep it (`retain_full`, `recovery_window`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kept_by: Vec<&'static str>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ObjectItem {
    pub key: String,
    pub bytes: u64,
    /// Packs: `released` (only deleted backups used it), `orphan` (no manifest references
    /// it, older than the grace period), `younger than the grace period`, `age unknown`.
    /// WAL: `before the oldest kept backup`, `superseded by the sealed segment` (parts, and
    /// their index entries, of a segment stored whole), `timeline no longer needed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Count {
    pub objects: usize,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Totals {
    pub manifests: Count,
    pub packs: Count,
    pub wal: Count,
    pub objects: usize,
    pub bytes: u64,
}

/// The oldest WAL kept: everything in a lower segment is deleted.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct WalFloor {
    /// The oldest kept backup, whose start this is.
    pub backup: String,
    pub timeline: u32,
    pub start_lsn: Lsn,
    /// The segment number holding `start_lsn`; lower segments (on every timeline) go.
    pub segment: u64,
}

/// What expire deletes (or, with `dry_run`, would delete). The JSON form is stable.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Plan {
    pub dry_run: bool,
    pub now: String,
    pub policy: PolicyReport,
    pub kept_backups: Vec<BackupItem>,
    pub deleted_backups: Vec<BackupItem>,
    pub deleted_packs: Vec<ObjectItem>,
    /// Packs no manifest references that are kept anyway (maybe a backup in progress).
    pub kept_unreferenced_packs: Vec<ObjectItem>,
    pub wal_floor: Option<WalFloor>,
    pub deleted_wal: Vec<ObjectItem>,
    pub totals: Totals,
    /// Things found on the way that need a look (e.g. a kept backup's pack is missing).
    pub warnings: Vec<String>,
}

/// The object listings a plan needs besides the [`RepoView`].
#[derive(Clone, Debug, Default)]
pub struct Listing {
    pub manifests: Vec<ObjectInfo>,
    pub packs: Vec<ObjectInfo>,
    pub wal: Vec<ObjectInfo>,
}

impl Listing {
    /// Lists `backups/`, `packs/` and `wal/`. Call after loading the view: a backup that
    /// commits in between has its packs listed as unreferenced, which the grace period covers.
    pub async fn load(repo: &Repository) -> walferry_formats::Result<Listing> {
        Ok(Listing {
            manifests: repo.list("backups").await?,
            packs: repo.list("packs").await?,
            wal: repo.list("wal").await?,
        })
    }
}

fn policy_report(policy: &RetentionPolicy, grace: Duration) -> PolicyReport {
    PolicyReport {
        retain_full: policy.retain_full,
        recovery_window_secs: policy.recovery_window.map(|w| w.as_secs()),
        recovery_window: policy
            .recovery_window
            .map(|w| humantime::format_duration(w).to_string()),
        pack_grace_secs: grace.as_secs(),
    }
}

fn finished(b: &BackupManifest) -> Option<Timestamp> {
    b.finished_at.parse().ok()
}

/// Computes what to delete. Pure: no store access.
pub fn plan(
    view: &RepoView,
    listing: &Listing,
    policy: &RetentionPolicy,
    pack_grace: Duration,
    now: Timestamp,
) -> Plan {
    let size = view.size;
    let mut warnings = Vec::new();

    // Newest first. A backup whose finish time does not parse counts as newest (kept).
    let mut order: Vec<&BackupManifest> = view.backups.iter().collect();
    order.sort_by(|a, b| {
        let fa = finished(a).unwrap_or(Timestamp::MAX);
        let fb = finished(b).unwrap_or(Timestamp::MAX);
        fb.cmp(&fa).then(b.start_lsn.cmp(&a.start_lsn))
    });
    let mut kept_by: Vec<Vec<&'static str>> = vec![Vec::new(); order.len()];
    if let Some(n) = policy.retain_full {
        for k in kept_by.iter_mut().take(n) {
            k.push("retain_full");
        }
    }
    if let Some(w) = policy.recovery_window {
        let span = jiff::SignedDuration::try_from(w).unwrap_or(jiff::SignedDuration::MAX);
        let cutoff = now.checked_sub(span).unwrap_or(Timestamp::MIN);
        let mut found_base = false;
        for (i, b) in order.iter().enumerate() {
            match finished(b) {
                Some(f) if f <= cutoff => {
                    if !found_base {
                        kept_by[i].push("recovery_window");
                        found_base = true;
                    }
                }
                _ => kept_by[i].push("recovery_window"),
            }
        }
    }
    let manifest_size = |id: &str| {
        let key = BackupManifest::key(id);
        listing
            .manifests
            .iter()
            .find(|o| o.key == key)
            .map_or(0, |o| o.size)
    };
    let item = |b: &BackupManifest, by: Vec<&'static str>| BackupItem {
        id: b.id.clone(),
        key: BackupManifest::key(&b.id),
        bytes: manifest_size(&b.id),
        timeline: b.timeline.0,
        start_lsn: b.start_lsn,
        end_lsn: b.end_lsn,
        finished_at: b.finished_at.clone(),
        kept_by: by,
    };
    let mut kept: Vec<&BackupManifest> = Vec::new();
    let mut kept_backups = Vec::new();
    let mut deleted_backups = Vec::new();
    let mut deleted: Vec<&BackupManifest> = Vec::new();
    for (b, by) in order.iter().zip(kept_by) {
        if by.is_empty() {
            deleted.push(b);
            deleted_backups.push(item(b, by));
        } else {
            kept.push(b);
            kept_backups.push(item(b, by));
        }
    }
    // Oldest first in the report.
    kept_backups.reverse();
    deleted_backups.reverse();

    // Packs.
    let kept_refs: HashSet<&str> = kept
        .iter()
        .flat_map(|b| b.blocks.iter().map(|r| r.pack.as_str()))
        .collect();
    let deleted_refs: HashSet<&str> = deleted
        .iter()
        .flat_map(|b| b.blocks.iter().map(|r| r.pack.as_str()))
        .collect();
    let listed: HashSet<&str> = listing.packs.iter().map(|o| o.key.as_str()).collect();
    let missing: BTreeSet<&str> = kept_refs
        .iter()
        .filter(|k| !listed.contains(*k))
        .copied()
        .collect();
    if !missing.is_empty() {
        warnings.push(format!(
            "{} pack(s) referenced by kept backups are missing from the repository (run `walferry-restore verify`): {}",
            missing.len(),
            missing.iter().take(5).copied().collect::<Vec<_>>().join(", ")
        ));
    }
    let grace_span =
        jiff::SignedDuration::try_from(pack_grace).unwrap_or(jiff::SignedDuration::MAX);
    let mut deleted_packs = Vec::new();
    let mut kept_unreferenced_packs = Vec::new();
    for p in &listing.packs {
        if kept_refs.contains(p.key.as_str()) {
            continue;
        }
        let mut obj = ObjectItem {
            key: p.key.clone(),
            bytes: p.size,
            reason: None,
        };
        if deleted_refs.contains(p.key.as_str()) {
            obj.reason = Some("released");
            deleted_packs.push(obj);
            continue;
        }
        match p.last_modified {
            Some(lm) if now.duration_since(lm) >= grace_span => {
                obj.reason = Some("orphan");
                deleted_packs.push(obj);
            }
            Some(_) => {
                obj.reason = Some("younger than the grace period");
                kept_unreferenced_packs.push(obj);
            }
            None => {
                obj.reason = Some("age unknown");
                kept_unreferenced_packs.push(obj);
            }
        }
    }

    // WAL.
    let oldest = kept.iter().min_by_key(|b| (b.start_lsn, b.timeline));
    let wal_floor = oldest.map(|b| WalFloor {
        backup: b.id.clone(),
        timeline: b.timeline.0,
        start_lsn: b.start_lsn,
        segment: b.start_lsn.segment(size).0,
    });
    let mut deleted_wal_data = Vec::new();
    let mut deleted_wal_index = Vec::new();
    let mut history_keys: Vec<(&ObjectInfo, TimelineId)> = Vec::new();
    let mut remaining_tlis: BTreeSet<TimelineId> = BTreeSet::new();
    let parsed: Vec<(&ObjectInfo, Option<WalObject>)> = listing
        .wal
        .iter()
        .map(|o| (o, parse_wal_key(&o.key, size)))
        .collect();
    // A sealed segment supersedes its parts, and a segment's index entry its parts' entries
    // (the streamer removes them itself once it seals a segment, unless it stops first).
    let sealed: HashSet<(TimelineId, SegmentNo)> = parsed
        .iter()
        .filter_map(|(_, p)| match p {
            Some(WalObject::Segment { tli, segno }) => Some((*tli, *segno)),
            _ => None,
        })
        .collect();
    let seg_indexed: HashSet<(TimelineId, SegmentNo)> = parsed
        .iter()
        .filter_map(|(_, p)| match p {
            Some(WalObject::SegmentIndex { tli, segno }) => Some((*tli, *segno)),
            _ => None,
        })
        .collect();
    for (o, p) in parsed {
        let (tli, segno, index, superseded) = match p {
            Some(WalObject::History { tli }) => {
                history_keys.push((o, tli));
                continue;
            }
            Some(WalObject::Segment { tli, segno } | WalObject::BackupHistory { tli, segno }) => {
                (tli, segno, false, false)
            }
            Some(WalObject::Part { tli, segno, .. }) => {
                (tli, segno, false, sealed.contains(&(tli, segno)))
            }
            Some(WalObject::SegmentIndex { tli, segno }) => (tli, segno, true, false),
            Some(WalObject::PartIndex { tli, segno, .. }) => {
                (tli, segno, true, seg_indexed.contains(&(tli, segno)))
            }
            None => continue,
        };
        let below = wal_floor
            .as_ref()
            .is_some_and(|f| segno < SegmentNo(f.segment));
        if !below && !superseded {
            remaining_tlis.insert(tli);
            continue;
        }
        let obj = ObjectItem {
            key: o.key.clone(),
            bytes: o.size,
            reason: Some(if below {
                "before the oldest kept backup"
            } else {
                "superseded by the sealed segment"
            }),
        };
        if index {
            deleted_wal_index.push(obj);
        } else {
            deleted_wal_data.push(obj);
        }
    }
    // Timelines whose history must stay: those with WAL left, the latest, kept backups'
    // timelines, and every ancestor of those.
    let mut needed: BTreeSet<TimelineId> = remaining_tlis;
    needed.extend(view.latest_timeline());
    for b in &kept {
        needed.insert(b.timeline);
        needed.insert(b.end_timeline);
    }
    let roots: Vec<TimelineId> = needed.iter().copied().collect();
    for t in roots {
        needed.extend(view.path_to(t).iter().map(|(a, _)| *a));
    }
    let mut deleted_wal_history = Vec::new();
    if wal_floor.is_some() {
        for (o, tli) in history_keys {
            if !needed.contains(&tli) {
                deleted_wal_history.push(ObjectItem {
                    key: o.key.clone(),
                    bytes: o.size,
                    reason: Some("timeline no longer needed"),
                });
            }
        }
    }
    // Data first, then its index entries, then history files.
    let mut deleted_wal = deleted_wal_data;
    deleted_wal.extend(deleted_wal_index);
    deleted_wal.extend(deleted_wal_history);

    let count = |items: &[ObjectItem]| Count {
        objects: items.len(),
        bytes: items.iter().map(|i| i.bytes).sum(),
    };
    let manifests = Count {
        objects: deleted_backups.len(),
        bytes: deleted_backups.iter().map(|b| b.bytes).sum(),
    };
    let packs = count(&deleted_packs);
    let wal = count(&deleted_wal);
    let totals = Totals {
        manifests,
        packs,
        wal,
        objects: manifests.objects + packs.objects + wal.objects,
        bytes: manifests.bytes + packs.bytes + wal.bytes,
    };
    Plan {
        dry_run: true,
        now: now.to_string(),
        policy: policy_report(policy, pack_grace),
        kept_backups,
        deleted_backups,
        deleted_packs,
        kept_unreferenced_packs,
        wal_floor,
        deleted_wal,
        totals,
        warnings,
    }
}

/// Reads the repository and computes the plan (`dry_run` set).
pub async fn load_plan(
    units: &Units,
    policy: &RetentionPolicy,
    pack_grace: Duration,
) -> anyhow::Result<Plan> {
    let now = Timestamp::now();
    let view = match RepoView::load(units).await {
        Ok(v) => v,
        // No cluster bound yet: no backup, no pack, no WAL.
        Err(e) if matches!(e.root(), Error::EmptyRepository) => {
            return Ok(plan(
                &RepoView {
                    size: walferry_formats::SegmentSize::DEFAULT,
                    backups: Vec::new(),
                    catalog: walferry_formats::walcatalog::WalCatalog::from_keys(
                        [],
                        walferry_formats::SegmentSize::DEFAULT,
                    ),
                    index: Vec::new(),
                    histories: Default::default(),
                },
                &Listing::default(),
                policy,
                pack_grace,
                now,
            ))
        }
        Err(e) => return Err(e).context("read the repository"),
    };
    let listing = Listing::load(units.repo())
        .await
        .context("list the repository")?;
    Ok(plan(&view, &listing, policy, pack_grace, now))
}

/// Deletes what `plan` lists, in order (manifests, packs, WAL), checking the lease before
/// every batch. Idempotent: objects already gone count as deleted.
pub async fn execute(repo: &Repository, plan: &Plan, lease: &Lease) -> anyhow::Result<()> {
    // Owned keys: the deletes run in a spawned daemon task, which must not borrow `plan`
    // through a closure over `&str` (that future is not Send for every lifetime).
    let manifests: Vec<String> = plan.deleted_backups.iter().map(|b| b.key.clone()).collect();
    let packs: Vec<String> = plan.deleted_packs.iter().map(|p| p.key.clone()).collect();
    let wal: Vec<String> = plan.deleted_wal.iter().map(|w| w.key.clone()).collect();
    for (what, keys) in [
        ("backup manifests", manifests),
        ("packs", packs),
        ("WAL objects", wal),
    ] {
        for batch in keys.chunks(BATCH) {
            lease
                .ensure_held()
                .await
                .with_context(|| format!("stop before deleting {what}"))?;
            futures::stream::iter(batch.iter().cloned())
                .map(|key| async move {
                    repo.delete(&key)
                        .await
                        .with_context(|| format!("delete {key}"))
                })
                .buffer_unordered(PARALLEL_DELETES)
                .try_collect::<Vec<()>>()
                .await?;
        }
        tracing::info!(count = keys.len(), "deleted {what}");
    }
    Ok(())
}

/// Plans and applies `policy` under a lease the caller holds (the `run` daemon's loop).
pub async fn apply(
    units: &Units,
    policy: &RetentionPolicy,
    pack_grace: Duration,
    lease: &Lease,
) -> anyhow::Result<Plan> {
    lease.ensure_held().await?;
    let mut plan = load_plan(units, policy, pack_grace).await?;
    execute(units.repo(), &plan, lease).await?;
    plan.dry_run = false;
    Ok(plan)
}

fn mb(bytes: u64) -> String {
    if bytes >= 1_000_000 {
        format!("{:.1} MB", bytes as f64 / 1e6)
    } else {
        format!("{:.1} kB", bytes as f64 / 1e3)
    }
}

/// The human form.
pub fn print(plan: &Plan) {
    let verb = if plan.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    let total = plan.kept_backups.len() + plan.deleted_backups.len();
    println!(
        "expire{}: {total} backup(s); keeping {}, {verb} {}",
        if plan.dry_run {
            " (dry run: nothing is deleted)"
        } else {
            ""
        },
        plan.kept_backups.len(),
        plan.deleted_backups.len()
    );
    for b in &plan.kept_backups {
        println!(
            "  keep    backup {}  tl {}  {}..{}  finished {}  ({})",
            b.id,
            b.timeline,
            b.start_lsn,
            b.end_lsn,
            b.finished_at,
            b.kept_by.join(", ")
        );
    }
    for b in &plan.deleted_backups {
        println!(
            "  {verb} backup {}  tl {}  {}..{}  finished {}",
            b.id, b.timeline, b.start_lsn, b.end_lsn, b.finished_at
        );
    }
    for p in &plan.deleted_packs {
        println!(
            "  {verb} pack {} ({}, {})",
            p.key,
            mb(p.bytes),
            p.reason.unwrap_or("")
        );
    }
    for p in &plan.kept_unreferenced_packs {
        println!(
            "  keep    pack {} ({}): no manifest references it, but it is {} (it may belong to a backup in progress)",
            p.key,
            mb(p.bytes),
            p.reason.unwrap_or("")
        );
    }
    if let Some(f) = &plan.wal_floor {
        println!(
            "  WAL: keeping everything from the segment of {} (backup {}, timeline {}) on; {verb} {} older object(s) ({})",
            f.start_lsn,
            f.backup,
            f.timeline,
            plan.totals.wal.objects,
            mb(plan.totals.wal.bytes)
        );
        if let (Some(first), Some(last)) = (plan.deleted_wal.first(), plan.deleted_wal.last()) {
            println!("       {} .. {}", first.key, last.key);
        }
    }
    for w in &plan.warnings {
        println!("  warning: {w}");
    }
    let t = &plan.totals;
    println!(
        "{}: {} manifest(s) ({}), {} pack(s) ({}), {} WAL object(s) ({}); {} in total",
        if plan.dry_run { "would free" } else { "freed" },
        t.manifests.objects,
        mb(t.manifests.bytes),
        t.packs.objects,
        mb(t.packs.bytes),
        t.wal.objects,
        mb(t.wal.bytes),
        mb(t.bytes)
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::BTreeMap;
    use walferry_formats::backup::{BackupStats, BlockId, BlockRef, MANIFEST_FORMAT};
    use walferry_formats::layout::{
        history_key, part_index_key, part_key, segment_index_key, segment_key,
    };
    use walferry_formats::walcatalog::WalCatalog;
    use walferry_formats::SegmentSize;

    const S: SegmentSize = SegmentSize::DEFAULT;
    const T1: TimelineId = TimelineId(1);
    const T2: TimelineId = TimelineId(2);

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn seg_lsn(seg: u64, off: u64) -> Lsn {
        Lsn(seg * S.bytes() + off)
    }

    fn backup(
        id: &str,
        tli: TimelineId,
        seg: u64,
        finished: &str,
        packs: &[&str],
    ) -> BackupManifest {
        BackupManifest {
            format: MANIFEST_FORMAT,
            id: id.into(),
            label: "t".into(),
            system_identifier: "1".into(),
            server_version_num: Some(150000),
            timeline: tli,
            start_lsn: seg_lsn(seg, 0x28),
            end_lsn: seg_lsn(seg, 0x1000),
            end_timeline: tli,
            started_at: finished.into(),
            finished_at: finished.into(),
            block_size: 8192,
            tablespaces: vec![],
            files: vec![],
            blocks: packs
                .iter()
                .enumerate()
                .map(|(i, p)| BlockRef {
                    id: BlockId([i as u8; 32]),
                    pack: p.to_string(),
                    offset: 0,
                    len: 10,
                    plain_len: 8192,
                })
                .collect(),
            pg_manifest: None,
            stats: BackupStats::default(),
        }
    }

    fn obj(key: &str, size: u64, lm: Option<&str>) -> ObjectInfo {
        ObjectInfo {
            key: key.into(),
            size,
            last_modified: lm.map(ts),
        }
    }

    fn view(
        backups: Vec<BackupManifest>,
        wal_keys: &[String],
        histories: &[(TimelineId, Vec<(TimelineId, Lsn)>)],
    ) -> RepoView {
        RepoView {
            size: S,
            backups,
            catalog: WalCatalog::from_keys(wal_keys.iter().map(String::as_str), S),
            index: vec![],
            histories: histories.iter().cloned().collect::<BTreeMap<_, _>>(),
        }
    }

    fn keys(items: &[ObjectItem]) -> Vec<&str> {
        items.iter().map(|i| i.key.as_str()).collect()
    }

    fn ids(items: &[BackupItem]) -> Vec<&str> {
        items.iter().map(|i| i.id.as_str()).collect()
    }

    /// Three backups on timeline 1 at segments 2, 5, 8; WAL from segment 1 to 9.
    fn fixture() -> (RepoView, Listing) {
        let backups = vec![
            backup(
                "b1",
                T1,
                2,
                "2026-01-01T00:00:00Z",
                &["packs/aa/p1", "packs/aa/shared"],
            ),
            backup(
                "b2",
                T1,
                5,
                "2026-01-02T00:00:00Z",
                &["packs/aa/p2", "packs/aa/shared"],
            ),
            backup(
                "b3",
                T1,
                8,
                "2026-01-03T00:00:00Z",
                &["packs/aa/p3", "packs/aa/shared"],
            ),
        ];
        let mut wal = Vec::new();
        for s in 1..=8 {
            wal.push(segment_key(T1, SegmentNo(s), S));
            wal.push(segment_index_key(T1, SegmentNo(s), S));
        }
        wal.push(part_key(T1, SegmentNo(4), S, 0, 0x1000));
        wal.push(part_index_key(T1, SegmentNo(4), S, 0, 0x1000));
        wal.push(part_key(T1, SegmentNo(9), S, 0, 0x1000));
        let v = view(backups, &wal, &[]);
        let listing = Listing {
            manifests: ["b1", "b2", "b3"]
                .iter()
                .map(|id| obj(&BackupManifest::key(id), 100, None))
                .collect(),
            packs: vec![
                obj("packs/aa/p1", 1000, Some("2026-01-01T00:00:00Z")),
                obj("packs/aa/p2", 2000, Some("2026-01-02T00:00:00Z")),
                obj("packs/aa/p3", 3000, Some("2026-01-03T00:00:00Z")),
                obj("packs/aa/shared", 4000, Some("2026-01-01T00:00:00Z")),
                // An interrupted backup long ago, a running one now, one of unknown age.
                obj("packs/bb/fresh", 600, Some("2026-01-04T11:00:00Z")),
                obj("packs/bb/old-orphan", 500, Some("2026-01-02T12:00:00Z")),
                obj("packs/bb/unknown", 700, None),
            ],
            wal: wal.iter().map(|k| obj(k, 10, None)).collect(),
        };
        (v, listing)
    }

    const NOW: &str = "2026-01-04T12:00:00Z";

    #[test]
    fn retain_full_deletes_the_oldest_and_what_only_it_needed() {
        let (v, l) = fixture();
        let p = plan(
            &v,
            &l,
            &RetentionPolicy {
                retain_full: Some(2),
                recovery_window: None,
            },
            DEFAULT_PACK_GRACE,
            ts(NOW),
        );
        assert_eq!(ids(&p.deleted_backups), ["b1"]);
        assert_eq!(ids(&p.kept_backups), ["b2", "b3"]);
        assert_eq!(
            keys(&p.deleted_packs),
            ["packs/aa/p1", "packs/bb/old-orphan"]
        );
        assert_eq!(p.deleted_packs[0].reason, Some("released"));
        assert_eq!(p.deleted_packs[1].reason, Some("orphan"));
        assert_eq!(
            keys(&p.kept_unreferenced_packs),
            ["packs/bb/fresh", "packs/bb/unknown"]
        );
        // WAL below b2's start segment (5): segments 1..=4, the part in 4, their index.
        let floor = p.wal_floor.as_ref().unwrap();
        assert_eq!((floor.backup.as_str(), floor.segment), ("b2", 5));
        let mut want: Vec<String> = (1..=4).map(|s| segment_key(T1, SegmentNo(s), S)).collect();
        want.push(part_key(T1, SegmentNo(4), S, 0, 0x1000));
        want.extend((1..=4).map(|s| segment_index_key(T1, SegmentNo(s), S)));
        want.push(part_index_key(T1, SegmentNo(4), S, 0, 0x1000));
        let mut got: Vec<String> = keys(&p.deleted_wal).iter().map(|s| s.to_string()).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);
        // Data before index entries.
        let first_index = p
            .deleted_wal
            .iter()
            .position(|o| o.key.starts_with("wal/index/"))
            .unwrap();
        assert!(p.deleted_wal[..first_index]
            .iter()
            .all(|o| !o.key.starts_with("wal/index/")));
        assert!(p.deleted_wal[first_index..]
            .iter()
            .all(|o| o.key.starts_with("wal/index/")));
        assert_eq!(
            p.totals.manifests,
            Count {
                objects: 1,
                bytes: 100
            }
        );
        assert_eq!(
            p.totals.packs,
            Count {
                objects: 2,
                bytes: 1500
            }
        );
        assert_eq!(p.totals.wal.objects, 10);
        assert_eq!(p.totals.bytes, 100 + 1500 + 100);
    }

    #[test]
    fn recovery_window_keeps_the_backup_that_starts_the_window() {
        let (v, l) = fixture();
        let pol = |h: u64| RetentionPolicy {
            retain_full: None,
            recovery_window: Some(Duration::from_secs(h * 3600)),
        };
        // now - 36h = Jan 3 00:00 exactly: b3 finished then, so b3 alone covers it.
        let p = plan(&v, &l, &pol(36), DEFAULT_PACK_GRACE, ts(NOW));
        assert_eq!(ids(&p.kept_backups), ["b3"]);
        // now - 37h = Jan 2 23:00: b2 is the newest that finished before it.
        let p = plan(&v, &l, &pol(37), DEFAULT_PACK_GRACE, ts(NOW));
        assert_eq!(ids(&p.kept_backups), ["b2", "b3"]);
        assert_eq!(ids(&p.deleted_backups), ["b1"]);
        // A window older than every backup keeps all.
        let p = plan(&v, &l, &pol(24 * 30), DEFAULT_PACK_GRACE, ts(NOW));
        assert_eq!(ids(&p.kept_backups), ["b1", "b2", "b3"]);
        assert!(p.deleted_backups.is_empty());
        // Only the WAL from before the oldest backup goes.
        assert_eq!(
            keys(&p.deleted_wal),
            [
                segment_key(T1, SegmentNo(1), S),
                part_key(T1, SegmentNo(4), S, 0, 0x1000),
                segment_index_key(T1, SegmentNo(1), S),
                part_index_key(T1, SegmentNo(4), S, 0, 0x1000),
            ]
        );
        // Both rules: the union is kept.
        let both = RetentionPolicy {
            retain_full: Some(3),
            recovery_window: Some(Duration::from_secs(3600)),
        };
        let p = plan(&v, &l, &both, DEFAULT_PACK_GRACE, ts(NOW));
        assert_eq!(ids(&p.kept_backups), ["b1", "b2", "b3"]);
        assert_eq!(p.kept_backups[0].kept_by, ["retain_full"]);
        assert_eq!(
            p.kept_backups[2].kept_by,
            ["retain_full", "recovery_window"]
        );
    }

    #[test]
    fn grace_period_and_unknown_age() {
        let (v, l) = fixture();
        let pol = RetentionPolicy {
            retain_full: Some(3),
            recovery_window: None,
        };
        let p = plan(&v, &l, &pol, Duration::from_secs(1800), ts(NOW));
        // fresh is 1 h old: past a 30 min grace. Unknown age is never deleted.
        assert_eq!(
            keys(&p.deleted_packs),
            ["packs/bb/fresh", "packs/bb/old-orphan"]
        );
        assert_eq!(keys(&p.kept_unreferenced_packs), ["packs/bb/unknown"]);
        // Nothing kept is below b1's start.
        assert_eq!(
            keys(&p.deleted_wal),
            [
                segment_key(T1, SegmentNo(1), S),
                part_key(T1, SegmentNo(4), S, 0, 0x1000),
                segment_index_key(T1, SegmentNo(1), S),
                part_index_key(T1, SegmentNo(4), S, 0, 0x1000),
            ]
        );
    }

    #[test]
    fn histories_of_unneeded_timelines_go() {
        // Timeline 2 branched off timeline 1 at segment 3 and was abandoned; timeline 3
        // branched at segment 6 and is live, with the kept backup.
        let t3 = TimelineId(3);
        let backups = vec![
            backup("old", T1, 2, "2026-01-01T00:00:00Z", &[]),
            backup("new", t3, 7, "2026-01-03T00:00:00Z", &[]),
        ];
        let wal = vec![
            segment_key(T1, SegmentNo(2), S),
            segment_key(T1, SegmentNo(5), S),
            segment_key(T2, SegmentNo(3), S),
            segment_key(t3, SegmentNo(7), S),
            history_key(T2),
            history_key(t3),
        ];
        let v = view(
            backups,
            &wal,
            &[
                (T2, vec![(T1, seg_lsn(3, 0x100))]),
                (t3, vec![(T1, seg_lsn(6, 0x100))]),
            ],
        );
        let l = Listing {
            wal: wal.iter().map(|k| obj(k, 1, None)).collect(),
            ..Listing::default()
        };
        let p = plan(
            &v,
            &l,
            &RetentionPolicy {
                retain_full: Some(1),
                recovery_window: None,
            },
            DEFAULT_PACK_GRACE,
            ts(NOW),
        );
        assert_eq!(ids(&p.deleted_backups), ["old"]);
        assert_eq!(
            keys(&p.deleted_wal),
            [
                segment_key(T1, SegmentNo(2), S),
                segment_key(T1, SegmentNo(5), S),
                segment_key(T2, SegmentNo(3), S),
                history_key(T2),
            ]
        );
    }

    #[test]
    fn nothing_without_backups_but_old_orphans() {
        let v = view(vec![], &[segment_key(T1, SegmentNo(1), S)], &[]);
        let l = Listing {
            packs: vec![obj("packs/aa/x", 1, Some("2026-01-01T00:00:00Z"))],
            wal: vec![obj(&segment_key(T1, SegmentNo(1), S), 1, None)],
            ..Listing::default()
        };
        let p = plan(
            &v,
            &l,
            &RetentionPolicy {
                retain_full: Some(1),
                recovery_window: None,
            },
            DEFAULT_PACK_GRACE,
            ts(NOW),
        );
        assert!(p.deleted_backups.is_empty() && p.deleted_wal.is_empty());
        assert_eq!(keys(&p.deleted_packs), ["packs/aa/x"]);
    }

    #[test]
    fn superseded_parts_go_at_any_age() {
        let backups = vec![backup("b", T1, 2, "2026-01-01T00:00:00Z", &[])];
        let wal = vec![
            segment_key(T1, SegmentNo(6), S),
            part_key(T1, SegmentNo(6), S, 0, 0x1000),
            part_index_key(T1, SegmentNo(6), S, 0, 0x1000),
            // Segment 7: sealed, but its own index entry is missing: the part's entry stays.
            segment_key(T1, SegmentNo(7), S),
            part_key(T1, SegmentNo(7), S, 0, 0x1000),
            part_index_key(T1, SegmentNo(7), S, 0, 0x1000),
            segment_index_key(T1, SegmentNo(6), S),
            // Segment 8: only parts (the streamer's current segment).
            part_key(T1, SegmentNo(8), S, 0, 0x1000),
            part_index_key(T1, SegmentNo(8), S, 0, 0x1000),
        ];
        let v = view(backups, &wal, &[]);
        let l = Listing {
            wal: wal.iter().map(|k| obj(k, 1, None)).collect(),
            ..Listing::default()
        };
        let p = plan(
            &v,
            &l,
            &RetentionPolicy {
                retain_full: Some(1),
                recovery_window: None,
            },
            DEFAULT_PACK_GRACE,
            ts(NOW),
        );
        assert_eq!(
            keys(&p.deleted_wal),
            [
                part_key(T1, SegmentNo(6), S, 0, 0x1000),
                part_key(T1, SegmentNo(7), S, 0, 0x1000),
                part_index_key(T1, SegmentNo(6), S, 0, 0x1000),
            ]
        );
        assert!(p
            .deleted_wal
            .iter()
            .all(|o| o.reason == Some("superseded by the sealed segment")));
    }

    #[test]
    fn policy_validation() {
        assert!(RetentionPolicy::default().validate().is_err());
        assert!(RetentionPolicy {
            retain_full: Some(0),
            recovery_window: None
        }
        .validate()
        .is_err());
        assert!(RetentionPolicy {
            retain_full: None,
            recovery_window: Some(Duration::ZERO)
        }
        .validate()
        .is_err());
        let ok = RetentionPolicy {
            retain_full: Some(2),
            recovery_window: Some(Duration::from_secs(86400 * 30)),
        };
        assert!(ok.validate().is_ok());
        assert_eq!(
            ok.to_string(),
            "keep the newest 2 backups and keep every moment of the last 30days restorable"
        );
    }
}
