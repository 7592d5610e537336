//! `walferry-agent list`: backups, WAL coverage and the restorable window(s).
//! The JSON form is documented in docs/list.md and kept stable.

use serde::Serialize;
use walferry_formats::view::RepoView;
use walferry_formats::{Lsn, SegmentNo, TimelineId};

#[derive(Serialize, Debug)]
pub struct ListReport {
    pub backups: Vec<BackupRow>,
    pub timelines: Vec<TimelineRow>,
    pub windows: Vec<WindowRow>,
}

#[derive(Serialize, Debug)]
pub struct BackupRow {
    pub id: String,
    pub label: String,
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    pub started_at: String,
    pub finished_at: String,
    /// Bytes of data in the backup, and bytes it added to the repository.
    pub data_bytes: u64,
    pub new_stored_bytes: u64,
    /// Share of blocks found already stored, 0..=1.
    pub dedup_ratio: f64,
    pub duration_ms: u64,
}

#[derive(Serialize, Debug)]
pub struct TimelineRow {
    pub timeline: u32,
    pub first_segment: Option<String>,
    pub sealed_segments: usize,
    /// Where the stored WAL of this timeline ends.
    pub end_lsn: Option<Lsn>,
    /// Segments missing between the first and the last stored one.
    pub gaps: Vec<String>,
    pub has_history: bool,
}

#[derive(Serialize, Debug)]
pub struct WindowRow {
    pub timeline: u32,
    pub from: String,
    /// Exclusive: recovery needs a commit after the target to stop at.
    pub to: String,
}

pub fn report(view: &RepoView) -> ListReport {
    let backups = view
        .backups
        .iter()
        .map(|b| {
            let blocks = b.stats.new_blocks + b.stats.reused_blocks;
            BackupRow {
                id: b.id.clone(),
                label: b.label.clone(),
                timeline: b.timeline.0,
                start_lsn: b.start_lsn,
                end_lsn: b.end_lsn,
                started_at: b.started_at.clone(),
                finished_at: b.finished_at.clone(),
                data_bytes: b.stats.bytes,
                new_stored_bytes: b.stats.new_stored_bytes,
                dedup_ratio: if blocks == 0 {
                    0.0
                } else {
                    b.stats.reused_blocks as f64 / blocks as f64
                },
                duration_ms: b.stats.duration_ms,
            }
        })
        .collect();
    let size = view.size;
    let timelines = view
        .catalog
        .timelines
        .iter()
        .map(|(tli, wal)| {
            let first = wal
                .sealed
                .iter()
                .next()
                .copied()
                .into_iter()
                .chain(wal.parts.keys().next().copied())
                .min();
            let last = wal
                .sealed
                .iter()
                .next_back()
                .copied()
                .into_iter()
                .chain(wal.parts.keys().next_back().copied())
                .max();
            let mut gaps = Vec::new();
            if let (Some(f), Some(l)) = (first, last) {
                for s in f.0..l.0 {
                    let seg = SegmentNo(s);
                    if !wal.sealed.contains(&seg) && wal.part_cover(seg).1 < size.bytes() {
                        gaps.push(walferry_formats::walname::segment_file_name(
                            *tli, seg, size,
                        ));
                    }
                }
            }
            TimelineRow {
                timeline: tli.0,
                first_segment: first
                    .map(|s| walferry_formats::walname::segment_file_name(*tli, s, size)),
                sealed_segments: wal.sealed.len(),
                end_lsn: wal.end(size),
                gaps,
                has_history: view.histories.contains_key(tli) || tli.0 == 1,
            }
        })
        .collect();
    let mut windows = Vec::new();
    let tlis: Vec<TimelineId> = view.catalog.timelines.keys().copied().collect();
    for tli in tlis {
        if let Some((a, b)) = view.window(tli) {
            windows.push(WindowRow {
                timeline: tli.0,
                from: a.to_string(),
                to: b.to_string(),
            });
        }
    }
    ListReport {
        backups,
        timelines,
        windows,
    }
}

/// The human form.
pub fn print(r: &ListReport) {
    println!("backups:");
    if r.backups.is_empty() {
        println!("  (none)");
    }
    for b in &r.backups {
        println!(
            "  {}  tl {}  {}..{}  finished {}  {:.1} MB data, {:.1} MB new, {:.0}% dedup, {:.1}s",
            b.id,
            b.timeline,
            b.start_lsn,
            b.end_lsn,
            b.finished_at,
            b.data_bytes as f64 / 1e6,
            b.new_stored_bytes as f64 / 1e6,
            b.dedup_ratio * 100.0,
            b.duration_ms as f64 / 1000.0
        );
    }
    println!("WAL:");
    for t in &r.timelines {
        println!(
            "  timeline {}: from {} to {}, {} sealed segments{}{}",
            t.timeline,
            t.first_segment.as_deref().unwrap_or("-"),
            t.end_lsn
                .map(|l| l.to_string())
                .unwrap_or_else(|| "-".into()),
            t.sealed_segments,
            if t.gaps.is_empty() {
                String::new()
            } else {
                format!(", GAPS: {}", t.gaps.join(", "))
            },
            if t.has_history {
                ""
            } else {
                ", history file MISSING"
            }
        );
    }
    if r.windows.is_empty() {
        println!("restorable: no window yet (a backup and later commits are needed); `--to latest` may still work");
    }
    for w in &r.windows {
        println!(
            "restorable (timeline {}): you can restore to any moment from {} up to (not including) {}, or to latest",
            w.timeline, w.from, w.to
        );
    }
}
