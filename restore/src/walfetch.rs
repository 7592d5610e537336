//! `wal-fetch`: hand one WAL file to recovery, as `restore_command` does.

use std::path::Path;

use anyhow::Context;
use walferry_formats::envelope::Kind;
use walferry_formats::layout::wal_file_key;
use walferry_formats::walcatalog::{cluster_binding, fetch_parts};
use walferry_formats::{Units, WalFileName};

#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    /// Written to the destination; how it was found.
    Found(Source),
    NotFound,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Source {
    Sealed,
    /// Fetched ahead by an earlier call.
    Prefetched,
    /// Built from streamed parts, zero-padded past `covered` bytes.
    Parts {
        covered: u64,
    },
}

/// Where prefetched segments wait, beside the destination (`pg_wal/` during recovery).
pub const PREFETCH_DIR: &str = ".walferry-prefetch";

/// Fetches `name` into `dest`. A segment with no sealed object is assembled from its
/// streamed parts and zero-padded to the full size, as pg_receivewal leaves `.partial` files.
///
/// On a miss, the next `prefetch` sealed segments are fetched at the same time into a
/// cache beside `dest`, so the calls recovery makes next are answered from local disk.
pub async fn fetch(
    units: &Units,
    name: &str,
    dest: &Path,
    prefetch: u64,
) -> anyhow::Result<Fetched> {
    let cache = dest.parent().map(|p| p.join(PREFETCH_DIR));
    if let Some(c) = &cache {
        let cached = c.join(name);
        if tokio::fs::rename(&cached, dest).await.is_ok() {
            return Ok(Fetched::Found(Source::Prefetched));
        }
    }
    let ahead = async {
        let Some(c) = &cache else { return };
        if prefetch == 0 {
            return;
        }
        let Ok(Some(binding)) = cluster_binding(units.repo()).await else {
            return;
        };
        let size = binding.wal_segment_size;
        let Ok(WalFileName::Segment { tli, segno }) = WalFileName::parse(name, size) else {
            return;
        };
        if tokio::fs::create_dir_all(c).await.is_err() {
            return;
        }
        let next = (1..=prefetch).map(|i| WalFileName::Segment {
            tli,
            segno: walferry_formats::SegmentNo(segno.0 + i),
        });
        futures::future::join_all(next.map(|n| async move {
            let key = wal_file_key(&n, size);
            // Only sealed segments: they never change. A miss or an error here is not ours to report.
            if let Ok(b) = units.get(&key, Kind::WalSegment).await {
                let _ = write_atomically(&c.join(n.format(size)), &b).await;
            }
        }))
        .await;
    };
    let (r, ()) = futures::join!(fetch_one(units, name, dest), ahead);
    r
}

async fn fetch_one(units: &Units, name: &str, dest: &Path) -> anyhow::Result<Fetched> {
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
                Err(e) if e.is_not_found() => match fetch_parts(units, tli, segno, size)
                    .await
                    .context("assemble the segment from streamed parts")?
                {
                    Some((b, covered)) => (b, Source::Parts { covered }),
                    None => return Ok(Fetched::NotFound),
                },
                Err(e) => return Err(e).with_context(|| format!("fetch {key}")),
            }
        }
        WalFileName::Partial { tli, segno } => match fetch_parts(units, tli, segno, size)
            .await
            .context("assemble the segment from streamed parts")?
        {
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
