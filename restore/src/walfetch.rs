//! `wal-fetch`: hand one WAL file to recovery, as `restore_command` does.

use std::path::{Path, PathBuf};

use futures::StreamExt;

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
/// Present in [`PREFETCH_DIR`] while `restore --start` runs [`prefetch_planned`].
const SUPERVISED: &str = ".supervised";
/// Segments [`prefetch_planned`] keeps ready ahead of recovery (disk: this many segments).
const PLANNED_AHEAD: usize = 8;
/// Segments it fetches at once.
const PLANNED_PARALLEL: usize = 3;

/// Moves a prefetched `name` to `dest`, and drops cached segments recovery has passed
/// (names sort in WAL order), which a prefetcher that fell behind may have left.
pub fn take_prefetched(cache: &Path, name: &str, dest: &Path) -> bool {
    let hit = std::fs::rename(cache.join(name), dest).is_ok();
    if is_segment_name(name) {
        if let Ok(rd) = std::fs::read_dir(cache) {
            for e in rd.flatten() {
                let n = e.file_name();
                let n = n.to_string_lossy();
                if is_segment_name(&n) && *n < *name {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    hit
}

fn is_segment_name(n: &str) -> bool {
    n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Fetches the planned segments into `cache`, in order, a few at a time, keeping at most
/// [`PLANNED_AHEAD`] waiting there: recovery's `wal-fetch` calls then find them on local
/// disk instead of waiting for the repository. Only sealed segments (they never change);
/// a miss or an error is left for `wal-fetch` itself to meet and report. Files are given
/// to `owner` (the data directory's owner), so the server can recycle them later.
pub async fn prefetch_planned(
    units: Units,
    segments: Vec<String>,
    cache: PathBuf,
    owner: Option<(u32, u32)>,
) {
    let Ok(Some(binding)) = cluster_binding(units.repo()).await else {
        return;
    };
    let size = binding.wal_segment_size;
    let waiting = |cache: &Path| {
        std::fs::read_dir(cache)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| is_segment_name(&e.file_name().to_string_lossy()))
                    .count()
            })
            .unwrap_or(0)
    };
    let jobs = segments.into_iter().map(|name| {
        let (units, cache) = (&units, &cache);
        async move {
            while waiting(cache) >= PLANNED_AHEAD {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let Ok(parsed @ WalFileName::Segment { .. }) = WalFileName::parse(&name, size) else {
                return;
            };
            let key = wal_file_key(&parsed, size);
            let _ = store_sealed(units, &key, &cache.join(&name), owner).await;
        }
    });
    futures::stream::iter(jobs)
        .buffered(PLANNED_PARALLEL)
        .for_each(|()| async {})
        .await;
}

/// Marks `cache` as served by [`prefetch_planned`] (see [`fetch`]).
pub fn mark_supervised(cache: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(cache)?;
    std::fs::write(cache.join(SUPERVISED), b"")
}

/// Decodes the sealed segment `key` straight into `dest` (through a temporary file beside
/// it, handed to `owner` before it becomes visible), a piece at a time: a 16 MiB segment
/// is never held in memory whole. Ok(false) when the repository has no such object.
async fn store_sealed(
    units: &Units,
    key: &str,
    dest: &Path,
    owner: Option<(u32, u32)>,
) -> anyhow::Result<bool> {
    let mut tmp = dest.as_os_str().to_owned();
    tmp.push(".walferry-tmp");
    let tmp = PathBuf::from(tmp);
    let file = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let stored = async {
        units
            .get_into(key, Kind::WalSegment, file, tmp.clone())
            .await?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))
                .with_context(|| format!("chown {}", tmp.display()))?;
        }
        tokio::fs::rename(&tmp, dest)
            .await
            .with_context(|| format!("rename {} to {}", tmp.display(), dest.display()))?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    match stored {
        Ok(()) => Ok(true),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            let missing = e
                .downcast_ref::<walferry_formats::Error>()
                .is_some_and(|f| f.is_not_found());
            if missing {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

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
        if take_prefetched(c, name, dest) {
            return Ok(Fetched::Found(Source::Prefetched));
        }
    }
    // Under `restore --start` the supervisor fetches ahead itself; a miss here only means
    // it has not got this far, so fetch just this one.
    let supervised = cache.as_ref().is_some_and(|c| c.join(SUPERVISED).exists());
    let ahead = async {
        let Some(c) = &cache else { return };
        if prefetch == 0 || supervised {
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
            let _ = store_sealed(units, &key, &c.join(n.format(size)), None).await;
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
            let fetch_sealed = || async {
                store_sealed(units, &key, dest, None)
                    .await
                    .with_context(|| format!("fetch {key}"))
            };
            if fetch_sealed().await? {
                return Ok(Fetched::Found(Source::Sealed));
            }
            let parts = fetch_parts(units, tli, segno, size).await;
            // A live agent deletes parts only once the sealed segment is stored: parts
            // that vanished mid-read mean the sealed copy exists now.
            if fetch_sealed().await? {
                return Ok(Fetched::Found(Source::Sealed));
            }
            match parts.context("assemble the segment from streamed parts")? {
                Some((b, covered)) => (b, Source::Parts { covered }),
                None => return Ok(Fetched::NotFound),
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
