//! Writing a backup into a data directory: parallel fetch, decode off the async threads,
//! bounded memory, modes kept; `--delta` reuses files whose blocks already match.
//!
//! `backup_label`, `tablespace_map` and `global/pg_control` are written last: until they
//! exist, a half-restored directory cannot be mistaken for a cluster and started.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use walferry_formats::backup::{BackupManifest, EntryKind, FileEntry, ZERO_BLOCK};
use walferry_formats::Units;

const FILES_IN_FLIGHT: usize = 4;
const LAST_FILES: [&str; 3] = ["tablespace_map", "backup_label", "global/pg_control"];

#[derive(Default, Debug)]
pub struct Stats {
    pub files: u64,
    pub bytes_written: u64,
    pub bytes_fetched: u64,
    pub blocks_reused: u64,
}

pub struct Options {
    pub pgdata: PathBuf,
    /// Tablespace oid -> directory, overriding the location recorded in the backup.
    pub tablespace_map: BTreeMap<u32, PathBuf>,
    pub delta: bool,
}

/// Checks the target before anything is fetched: it must be absent or empty (unless
/// `delta`), and no server may be running on it.
pub fn check_target(dir: &Path, delta: bool) -> anyhow::Result<()> {
    let pid_file = dir.join("postmaster.pid");
    if let Ok(text) = std::fs::read_to_string(&pid_file) {
        let pid = text.lines().next().unwrap_or("").trim();
        if !pid.is_empty() && Path::new("/proc").join(pid).exists() {
            bail!(
                "a PostgreSQL server (pid {pid}) is running on {}; stop it first (pg_ctl -D {} stop)",
                dir.display(),
                dir.display()
            );
        }
    }
    match std::fs::read_dir(dir) {
        Ok(mut it) => {
            if it.next().is_some() && !delta {
                bail!(
                    "{} is not empty; restore into an empty or new directory, or pass --delta to reuse the files in it",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("read {}", dir.display())),
    }
}

/// Where an entry goes on disk.
fn dest(manifest: &BackupManifest, opts: &Options, f: &FileEntry) -> anyhow::Result<PathBuf> {
    if f.path.split('/').any(|c| c == ".." || c.is_empty()) || f.path.starts_with('/') {
        bail!("backup entry {:?} has an unsafe path", f.path);
    }
    let root = match f.tablespace {
        None => opts.pgdata.clone(),
        Some(oid) => tablespace_dir(manifest, opts, oid)?,
    };
    Ok(root.join(&f.path))
}

fn tablespace_dir(manifest: &BackupManifest, opts: &Options, oid: u32) -> anyhow::Result<PathBuf> {
    if let Some(d) = opts.tablespace_map.get(&oid) {
        return Ok(d.clone());
    }
    manifest
        .tablespaces
        .iter()
        .find(|t| t.oid == oid)
        .map(|t| PathBuf::from(&t.location))
        .ok_or_else(|| anyhow!("backup lists files of tablespace {oid} but not its location"))
}

/// Writes every entry of `manifest` under the target. On failure, what was written is
/// removed again when the target started out empty: a directory this run created is
/// removed, one that existed empty (a mount point, say) is emptied and keeps its mode.
///
/// With `delta`, the target held a cluster before: `global/pg_control` goes first (it is
/// written again last), so a failed run never leaves a mix of old and new files that
/// looks like a cluster PostgreSQL would start.
pub async fn materialize(
    units: &Units,
    manifest: &BackupManifest,
    opts: &Options,
) -> anyhow::Result<Stats> {
    // On failure only what this run wrote is removed: never the contents of a directory
    // that held files before (the live tablespace of the cluster that was backed up, when
    // a restore on the same machine forgets --tablespace-map; a --delta target).
    let fresh: Vec<Fresh> = std::iter::once(opts.pgdata.clone())
        .chain(
            manifest
                .tablespaces
                .iter()
                .filter_map(|t| tablespace_dir(manifest, opts, t.oid).ok()),
        )
        .filter_map(|d| Fresh::probe(&d))
        .collect();
    let r = write_all(units, manifest, opts).await;
    if r.is_err() {
        for f in &fresh {
            f.undo();
        }
    }
    r
}

/// A target directory that held nothing before the restore, and how to put it back.
struct Fresh {
    /// The directory, or for one that did not exist, its highest missing ancestor.
    top: PathBuf,
    /// The mode of a directory that existed (empty); None when it did not exist.
    mode: Option<u32>,
}

impl Fresh {
    fn probe(dir: &Path) -> Option<Fresh> {
        match std::fs::read_dir(dir) {
            Ok(mut it) => it.next().is_none().then(|| Fresh {
                top: dir.to_path_buf(),
                mode: std::fs::metadata(dir)
                    .ok()
                    .map(|m| m.permissions().mode() & 0o7777),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut top = dir.to_path_buf();
                while let Some(p) = top.parent() {
                    if p.as_os_str().is_empty() || p.exists() {
                        break;
                    }
                    top = p.to_path_buf();
                }
                Some(Fresh { top, mode: None })
            }
            Err(_) => None,
        }
    }

    fn undo(&self) {
        let Some(mode) = self.mode else {
            let _ = std::fs::remove_dir_all(&self.top);
            return;
        };
        if let Ok(rd) = std::fs::read_dir(&self.top) {
            for e in rd.flatten() {
                let p = e.path();
                let _ = match e.file_type() {
                    Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
                    _ => std::fs::remove_file(&p),
                };
            }
        }
        let _ = std::fs::set_permissions(&self.top, std::fs::Permissions::from_mode(mode));
    }
}

async fn write_all(
    units: &Units,
    manifest: &BackupManifest,
    opts: &Options,
) -> anyhow::Result<Stats> {
    // Every tablespace directory is checked before anything is written. --delta reuses a
    // non-empty one only when it is named in --tablespace-map: the location recorded in
    // the backup may be the live tablespace of the cluster that was backed up.
    for t in &manifest.tablespaces {
        let d = tablespace_dir(manifest, opts, t.oid)?;
        let reuse = opts.delta && opts.tablespace_map.contains_key(&t.oid);
        check_target(&d, reuse).with_context(|| {
            format!(
                "tablespace {} goes to {}; to put it elsewhere, pass --tablespace-map {}=DIR",
                t.oid,
                d.display(),
                t.oid
            )
        })?;
    }
    create_dir(&opts.pgdata, 0o700)?;
    if opts.delta {
        let control = opts.pgdata.join("global/pg_control");
        match std::fs::remove_file(&control) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("remove {}", control.display()));
            }
            _ => {}
        }
    }
    for t in &manifest.tablespaces {
        create_dir(&tablespace_dir(manifest, opts, t.oid)?, 0o700)?;
    }
    // Directories and links first, then files; the three commit files last.
    let mut wanted: HashSet<PathBuf> = HashSet::new();
    for f in &manifest.files {
        let p = dest(manifest, opts, f)?;
        wanted.insert(p.clone());
        match f.kind {
            EntryKind::Dir => create_dir(&p, f.mode)?,
            EntryKind::Symlink => {
                let target = match (f.tablespace, f.path.strip_prefix("pg_tblspc/")) {
                    (None, Some(oid)) => match oid
                        .parse::<u32>()
                        .ok()
                        .and_then(|o| opts.tablespace_map.get(&o))
                    {
                        Some(mapped) => mapped.display().to_string(),
                        None => f.link.clone().unwrap_or_default(),
                    },
                    _ => f.link.clone().unwrap_or_default(),
                };
                let _ = std::fs::remove_file(&p);
                std::os::unix::fs::symlink(&target, &p)
                    .with_context(|| format!("create link {}", p.display()))?;
            }
            EntryKind::File => {}
        }
    }
    let stats = Arc::new(Counters::default());
    let syncs = Syncs::new();
    let is_last = |f: &FileEntry| f.tablespace.is_none() && LAST_FILES.contains(&f.path.as_str());
    let files: Vec<&FileEntry> = manifest
        .files
        .iter()
        .filter(|f| f.kind == EntryKind::File && !is_last(f))
        .collect();
    futures::stream::iter(files)
        .map(|f| write_file(units, manifest, opts, f, &stats, &syncs))
        .buffer_unordered(FILES_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    syncs.finish().await?;
    if opts.delta {
        remove_extra(&opts.pgdata, &wanted)?;
    }
    // Postgres's own manifest, as pg_basebackup leaves it, so pg_verifybackup can check the copy.
    if let Some(m) = &manifest.pg_manifest {
        let p = opts.pgdata.join("backup_manifest");
        tokio::fs::write(&p, m)
            .await
            .with_context(|| format!("write {}", p.display()))?;
        tokio::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).await?;
    }
    for name in LAST_FILES {
        if let Some(f) = manifest
            .files
            .iter()
            .find(|f| f.tablespace.is_none() && f.path == name)
        {
            if name == "tablespace_map" && !opts.tablespace_map.is_empty() {
                write_tablespace_map(units, manifest, opts, f).await?;
            } else {
                write_file(units, manifest, opts, f, &stats, &syncs).await?;
                syncs.finish().await?;
            }
        }
    }
    Ok(stats.snapshot())
}

#[derive(Default)]
struct Counters {
    files: AtomicU64,
    written: AtomicU64,
    fetched: AtomicU64,
    reused: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Stats {
        Stats {
            files: self.files.load(Ordering::Relaxed),
            bytes_written: self.written.load(Ordering::Relaxed),
            bytes_fetched: self.fetched.load(Ordering::Relaxed),
            blocks_reused: self.reused.load(Ordering::Relaxed),
        }
    }
}

fn create_dir(p: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(p).with_context(|| format!("create directory {}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode & 0o7777))
        .with_context(|| format!("set the mode of {}", p.display()))
}

/// Fetches (or, with --delta, reuses) each block of one file and writes it in order.
async fn write_file(
    units: &Units,
    manifest: &BackupManifest,
    opts: &Options,
    f: &FileEntry,
    stats: &Counters,
    syncs: &Syncs,
) -> anyhow::Result<()> {
    let path = dest(manifest, opts, f)?;
    let bs = u64::from(manifest.block_size);
    let mut existing = if opts.delta {
        tokio::fs::File::open(&path).await.ok()
    } else {
        None
    };
    // Blocks that already match on disk are kept; the rest are fetched.
    let mut plan: Vec<(u64, u32, bool)> = Vec::with_capacity(f.blocks.len());
    for (i, &b) in f.blocks.iter().enumerate() {
        let offset = i as u64 * bs;
        let len = bs.min(f.size - offset) as usize;
        let keep = match (&mut existing, b) {
            (Some(file), b) => {
                let mut local = vec![0u8; len];
                let ok = file.seek(std::io::SeekFrom::Start(offset)).await.is_ok()
                    && file.read_exact(&mut local).await.is_ok();
                ok && if b == ZERO_BLOCK {
                    local.iter().all(|&x| x == 0)
                } else {
                    let id = manifest.blocks[b as usize].id.0;
                    units.keyring().block_id(&local) == id
                }
            }
            _ => false,
        };
        plan.push((offset, b, keep));
    }
    drop(existing);
    // Tar archives do not always carry an entry for every parent directory.
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .with_context(|| format!("create directory {}", parent.display()))?;
    }
    let file = {
        let (path, delta) = (path.clone(), opts.delta);
        tokio::task::spawn_blocking(move || {
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(!delta)
                .open(&path)
                .with_context(|| format!("create {}", path.display()))
        })
        .await
        .context("file task")??
    };
    let file = Arc::new(file);
    // Each run is fetched, decoded on the pool and written at its own offsets
    // (positional writes on the blocking pool), so runs finish in any order.
    let runs = runs(manifest, &plan);
    futures::stream::iter(runs.iter())
        .map(|run| {
            let (file, path) = (file.clone(), path.clone());
            async move {
                let blocks = fetch_run(units, manifest, f, run, stats).await?;
                let n = write_blocks(file, path, blocks).await?;
                stats.written.fetch_add(n, Ordering::Relaxed);
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(RUNS_IN_FLIGHT)
        .try_collect::<()>()
        .await?;
    let kept = plan.iter().filter(|p| p.2).count() as u64;
    stats.reused.fetch_add(kept, Ordering::Relaxed);
    let (size, mode) = (f.size, f.mode & 0o7777);
    {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            file.set_len(size)
                .and_then(|()| {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                })
                .with_context(|| format!("finish {}", path.display()))
        })
        .await
        .context("file task")??;
    }
    stats.files.fetch_add(1, Ordering::Relaxed);
    syncs.add(path);
    Ok(())
}

/// Blocks fetched with one request and written together: neighbours in one pack (as a
/// backup writes a file's new blocks), or one zero block.
struct Run {
    /// (offset in the file, block index)
    blocks: Vec<(u64, u32)>,
}

/// Writes one decoded run at its offsets; returns the bytes written.
async fn write_blocks(
    file: Arc<std::fs::File>,
    path: PathBuf,
    blocks: Vec<(u64, Bytes)>,
) -> anyhow::Result<u64> {
    tokio::task::spawn_blocking(move || {
        let mut n = 0;
        for (offset, data) in &blocks {
            file.write_all_at(data, *offset)
                .with_context(|| format!("write {}", path.display()))?;
            n += data.len() as u64;
        }
        Ok(n)
    })
    .await
    .context("write task")?
}

/// Blocks that go in one run, at most (bounds memory: runs in flight x this x block size).
const RUN_BLOCKS: usize = 8;
/// Runs in flight per file (fetched, decoding or being written).
const RUNS_IN_FLIGHT: usize = 3;

/// Groups the blocks to write into runs that one range read can fetch.
fn runs(manifest: &BackupManifest, plan: &[(u64, u32, bool)]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for &(offset, b, keep) in plan {
        if keep {
            continue;
        }
        let joins = out.last().and_then(|run| {
            let &(_, prev) = run.blocks.last()?;
            if b == ZERO_BLOCK || prev == ZERO_BLOCK || run.blocks.len() >= RUN_BLOCKS {
                return None;
            }
            let (p, r) = (
                &manifest.blocks[prev as usize],
                &manifest.blocks[b as usize],
            );
            (p.pack == r.pack && p.offset + u64::from(p.len) == r.offset).then_some(())
        });
        match (joins, out.last_mut()) {
            (Some(()), Some(run)) => run.blocks.push((offset, b)),
            _ => out.push(Run {
                blocks: vec![(offset, b)],
            }),
        }
    }
    out
}

/// Fetches one run with a single range read and decodes its blocks on the pool.
async fn fetch_run(
    units: &Units,
    manifest: &BackupManifest,
    f: &FileEntry,
    run: &Run,
    stats: &Counters,
) -> anyhow::Result<Vec<(u64, Bytes)>> {
    let bs = u64::from(manifest.block_size);
    let &(first_offset, first) = run.blocks.first().ok_or_else(|| anyhow!("empty run"))?;
    if first == ZERO_BLOCK {
        let len = bs.min(f.size - first_offset) as usize;
        return Ok(vec![(first_offset, Bytes::from(vec![0u8; len]))]);
    }
    let refs: Vec<_> = run
        .blocks
        .iter()
        .map(|&(_, b)| &manifest.blocks[b as usize])
        .collect();
    let (start, pack) = (refs[0].offset, &refs[0].pack);
    let end = refs
        .iter()
        .map(|r| r.offset + u64::from(r.len))
        .max()
        .unwrap_or(start);
    let which = || {
        let blocks: Vec<u64> = run.blocks.iter().map(|&(o, _)| o / bs).collect();
        match blocks.as_slice() {
            [one] => format!("block {one}"),
            [a, .., z] => format!("blocks {a}-{z}"),
            [] => String::new(),
        }
    };
    let sealed = units
        .repo()
        .get_range(pack, start..end)
        .await
        .with_context(|| format!("fetch {} of {} from {pack}", which(), f.path))?;
    stats
        .fetched
        .fetch_add(sealed.len() as u64, Ordering::Relaxed);
    let decodes = run.blocks.iter().zip(&refs).map(|(&(offset, _), r)| {
        let from = (r.offset - start) as usize;
        let piece = sealed.slice(from..from + r.len as usize);
        async move {
            let plain = units.open_block(r.id.0, piece).await.with_context(|| {
                format!("decode block {} of {} from {}", offset / bs, f.path, r.pack)
            })?;
            Ok::<_, anyhow::Error>((offset, plain))
        }
    });
    futures::future::try_join_all(decodes).await
}

/// Files written but not yet synced. Syncing happens beside the writing of later files,
/// and [`Syncs::finish`] waits for all of it before the commit files are written.
struct Syncs {
    tasks: std::sync::Mutex<tokio::task::JoinSet<anyhow::Result<()>>>,
    slots: Arc<tokio::sync::Semaphore>,
}

impl Syncs {
    fn new() -> Self {
        Syncs {
            tasks: std::sync::Mutex::new(tokio::task::JoinSet::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(SYNCS_IN_FLIGHT)),
        }
    }

    /// By path, not by open file: thousands of files may wait here, and an fsync through
    /// a new descriptor flushes the same data.
    fn add(&self, path: PathBuf) {
        let slots = self.slots.clone();
        let task = async move {
            let _slot = slots.acquire_owned().await.context("sync slots closed")?;
            tokio::task::spawn_blocking(move || {
                std::fs::File::open(&path)
                    .and_then(|f| f.sync_all())
                    .with_context(|| format!("sync {}", path.display()))
            })
            .await
            .context("sync task")?
        };
        if let Ok(mut t) = self.tasks.lock() {
            t.spawn(task);
        }
    }

    async fn finish(&self) -> anyhow::Result<()> {
        let mut tasks = match self.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(_) => bail!("a sync task panicked"),
        };
        while let Some(r) = tasks.join_next().await {
            r.context("sync task")??;
        }
        Ok(())
    }
}

/// Files synced at once.
const SYNCS_IN_FLIGHT: usize = 4;

/// With relocated tablespaces, recovery must recreate the links to the new places.
async fn write_tablespace_map(
    units: &Units,
    manifest: &BackupManifest,
    opts: &Options,
    f: &FileEntry,
) -> anyhow::Result<()> {
    let mut text = String::new();
    for t in &manifest.tablespaces {
        let d = tablespace_dir(manifest, opts, t.oid)?;
        text.push_str(&format!("{} {}\n", t.oid, d.display()));
    }
    let _ = units;
    let path = dest(manifest, opts, f)?;
    tokio::fs::write(&path, text)
        .await
        .with_context(|| format!("write {}", path.display()))?;
    tokio::fs::set_permissions(&path, std::fs::Permissions::from_mode(f.mode & 0o7777)).await?;
    Ok(())
}

/// --delta: files in the data directory that the backup does not have must go.
fn remove_extra(root: &Path, wanted: &HashSet<PathBuf>) -> anyhow::Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let e = e?;
            let p = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() {
                if wanted.contains(&p) {
                    stack.push(p);
                } else {
                    std::fs::remove_dir_all(&p)
                        .with_context(|| format!("remove {}", p.display()))?;
                }
            } else if !wanted.contains(&p) {
                std::fs::remove_file(&p).with_context(|| format!("remove {}", p.display()))?;
            }
        }
    }
    Ok(())
}
