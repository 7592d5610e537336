//! `wal-fetch`: hand one WAL file to recovery, as `restore_command` does.

use std::path::Path;

use anyhow::Context;
use bytes::Bytes;
use walferry_formats::envelope::Kind;
use walferry_formats::layout::{parse_wal_key, part_key, parts_prefix, wal_file_key, WalObject};
use walferry_formats::walcatalog::{assemble, cluster_binding, TimelineWal};
use walferry_formats::{SegmentNo, SegmentSize, TimelineId, Units, WalFileName};

#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    /// Written to the destination; how it was found.
    Found(Source),
    NotFound,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Source {
    Sealed,
    /// Built from streamed parts, zero-padded past `covered` bytes.
    Parts {
        covered: u64,
    },
}

/// Fetches `name` into `dest`. A segment with no sealed object is assembled from its
/// streamed parts and zero-padded to the full size, as pg_receivewal leaves `.partial` files.
pub async fn fetch(units: &Units, name: &str, dest: &Path) -> anyhow::Result<Fetched> {
    let repo = units.repo();
    let Some(binding) = cluster_binding(repo).await.context("read cluster.json")? else {
        return Ok(Fetched::NotFound);
    };
    let size = binding.wal_segment_size;
    let parsed = WalFileName::parse(name, size).context("parse the WAL file name")?;
    let (bytes, source) = match parsed {
        WalFileName::Segment { tli, segno } => {
            let key = wal_file_key(&parsed, size);
            match units.get(&key, Kind::WalSegment).await {
                Ok(b) => (b, Source::Sealed),
                Err(e) if e.is_not_found() => match from_parts(units, tli, segno, size).await? {
                    Some((b, covered)) => (b, Source::Parts { covered }),
                    None => return Ok(Fetched::NotFound),
                },
                Err(e) => return Err(e).with_context(|| format!("fetch {key}")),
            }
        }
        WalFileName::Partial { tli, segno } => match from_parts(units, tli, segno, size).await? {
            Some((b, covered)) => (b, Source::Parts { covered }),
            None => return Ok(Fetched::NotFound),
        },
        WalFileName::History { .. } | WalFileName::Backup { .. } => {
            let key = wal_file_key(&parsed, size);
            let kind = if matches!(parsed, WalFileName::History { .. }) {
                Kind::WalHistory
            } else {
                Kind::Record
            };
            match units.get(&key, kind).await {
                Ok(b) => (b, Source::Sealed),
                Err(e) if e.is_not_found() => return Ok(Fetched::NotFound),
                Err(e) => return Err(e).with_context(|| format!("fetch {key}")),
            }
        }
    };
    write_atomically(dest, &bytes).await?;
    Ok(Fetched::Found(source))
}

/// Assembles a segment from the parts that cover it from offset 0. None if there are none.
async fn from_parts(
    units: &Units,
    tli: TimelineId,
    segno: SegmentNo,
    size: SegmentSize,
) -> anyhow::Result<Option<(Bytes, u64)>> {
    let listed = units
        .repo()
        .list(&parts_prefix(tli, segno, size))
        .await
        .context("list streamed parts")?;
    let mut wal = TimelineWal::default();
    for o in &listed {
        if let Some(WalObject::Part { from, to, .. }) = parse_wal_key(&o.key, size) {
            wal.parts.entry(segno).or_default().push((from, to));
        }
    }
    if let Some(p) = wal.parts.get_mut(&segno) {
        p.sort_unstable();
    }
    let (cover, covered) = wal.part_cover(segno);
    if cover.is_empty() {
        return Ok(None);
    }
    let fetches = cover.iter().map(|&(from, to)| {
        let key = part_key(tli, segno, size, from, to);
        async move {
            let b = units
                .get(&key, Kind::WalPart)
                .await
                .with_context(|| format!("fetch {key}"))?;
            anyhow::ensure!(
                b.len() as u64 == to - from,
                "{key} holds {} bytes, its name says {}",
                b.len(),
                to - from
            );
            Ok::<_, anyhow::Error>((from, b))
        }
    });
    let pieces = futures::future::try_join_all(fetches).await?;
    let refs: Vec<(u64, &[u8])> = pieces.iter().map(|(f, b)| (*f, b.as_ref())).collect();
    Ok(Some((Bytes::from(assemble(size.bytes(), &refs)), covered)))
}

/// Writes next to `dest` and renames, so recovery never sees a half-written file.
async fn write_atomically(dest: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut tmp = dest.as_os_str().to_owned();
    tmp.push(".walferry-tmp");
    let tmp = std::path::PathBuf::from(tmp);
    tokio::fs::write(&tmp, bytes)
        .await
        .with_context(|| format!("write {}", tmp.display()))?;
    tokio::fs::rename(&tmp, dest)
        .await
        .with_context(|| format!("rename {} to {}", tmp.display(), dest.display()))?;
    Ok(())
}
