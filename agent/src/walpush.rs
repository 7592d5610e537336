//! `wal-push`: store one WAL file, as `archive_command` does.

use std::path::Path;

use anyhow::{bail, Context};
use bytes::Bytes;
use walferry_formats::envelope::Kind;
use walferry_formats::layout::{part_index_key, wal_file_key};
use walferry_formats::walcatalog::cluster_binding;
use walferry_formats::walreader::{pg_major_for_magic, summarize_wal};
use walferry_formats::{Error, PutOutcome, SegmentNo, SegmentSize, Units, WalFileName};

use crate::cluster;

/// The facts in a segment's first (long) page header.
struct SegmentHeader {
    system_identifier: u64,
    size: SegmentSize,
}

fn segment_header(bytes: &[u8]) -> Option<SegmentHeader> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(bytes.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(bytes.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(bytes.get(o..o + 8)?.try_into().ok()?));
    const XLP_LONG_HEADER: u16 = 0x2;
    pg_major_for_magic(u16_at(0)?)?;
    if u16_at(2)? & XLP_LONG_HEADER == 0 || u32_at(36)? != 8192 {
        return None;
    }
    Some(SegmentHeader {
        system_identifier: u64_at(24)?,
        size: SegmentSize::new(u64::from(u32_at(32)?)).ok()?,
    })
}

/// Stores the WAL file at `path`. The same file pushed twice succeeds; a different file
/// under the same name fails.
pub async fn push(units: &Units, path: &Path) -> anyhow::Result<PutOutcome> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("read the file name of {}", path.display()))?;
    let bytes = Bytes::from(
        tokio::fs::read(path)
            .await
            .with_context(|| format!("read {}", path.display()))?,
    );
    let repo = units.repo();
    let is_segment_data = !file_name.ends_with(".history") && !file_name.ends_with(".backup");
    let size = if is_segment_data {
        let Some(h) = segment_header(&bytes) else {
            bail!("{file_name} does not start with a WAL segment header; refusing to archive it");
        };
        if bytes.len() as u64 != h.size.bytes() {
            bail!(
                "{file_name} is {} bytes, but its header says segments are {} bytes; refusing a truncated segment",
                bytes.len(),
                h.size.bytes()
            );
        }
        cluster::bind(repo, h.system_identifier, h.size, None)
            .await
            .context("check which cluster the repository belongs to")?;
        h.size
    } else {
        match cluster_binding(repo).await.context("read cluster.json")? {
            Some(b) => b.wal_segment_size,
            None => SegmentSize::DEFAULT,
        }
    };
    let name = WalFileName::parse(file_name, size).context("parse the WAL file name")?;
    let key = wal_file_key(&name, size);
    let kind = match name {
        WalFileName::Segment { .. } => Kind::WalSegment,
        WalFileName::Partial { .. } => Kind::WalPart,
        WalFileName::History { .. } => Kind::WalHistory,
        WalFileName::Backup { .. } => Kind::Record,
    };
    let outcome = match units.put(&key, kind, bytes.clone()).await {
        Err(Error::Conflict { .. }) => bail!(
            "{file_name} is already archived with DIFFERENT contents at {}/{key}; refusing to overwrite it. \
             Two clusters may be archiving into one repository, or this file was changed after it was archived",
            repo.location().trim_end_matches('/')
        ),
        r => r.with_context(|| format!("store {file_name}"))?,
    };
    if let WalFileName::Segment { segno, .. } | WalFileName::Partial { segno, .. } = name {
        put_index(units, &name, segno, size, bytes).await?;
    }
    Ok(outcome)
}

async fn put_index(
    units: &Units,
    name: &WalFileName,
    segno: SegmentNo,
    size: SegmentSize,
    bytes: Bytes,
) -> anyhow::Result<()> {
    let start = segno
        .start_lsn(size)
        .context("compute the segment's start LSN")?;
    let summary = tokio::task::spawn_blocking(move || summarize_wal(start, size, &bytes))
        .await
        .context("index WAL")??;
    let tli = name.timeline();
    let index_key = match name {
        WalFileName::Partial { .. } => part_index_key(tli, segno, size, 0, size.bytes()),
        _ => walferry_formats::layout::segment_index_key(tli, segno, size),
    };
    let json = serde_json::to_vec(&summary).context("encode the WAL index entry")?;
    units
        .put(&index_key, Kind::WalIndex, Bytes::from(json))
        .await
        .context("store the WAL index entry")?;
    Ok(())
}
