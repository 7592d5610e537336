//! `backup --pgdata DIR`: a base backup that reads the data directory directly, for an
//! agent that runs beside PostgreSQL and sees its files.
//!
//! pg_backup_start and pg_backup_stop run over an SQL session held open in between; the
//! files are read by a few threads at once, which BASE_BACKUP's single walsender cannot
//! do. What is read is what BASE_BACKUP would send (the same exclusions), the blocks go
//! through the same dedup, seal and pack pipeline, and walferry writes PostgreSQL's
//! backup_manifest itself. A file whose inode, size, mtime and ctime match the previous
//! backup's record is not read again: every write moves ctime, and a record is only
//! kept for a file that had been quiet for [`QUIET`] when it was read.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, Metadata};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tracing::{info, warn};
use walferry_formats::backup::{
    BackupManifest, BlockId, BlockRef, EntryKind, FileEntry, FileStamp, Tablespace, ZERO_BLOCK,
};
use walferry_formats::config::RepoConfig;
use walferry_formats::envelope::Kind;
use walferry_formats::keyring::Keyring;
use walferry_formats::walcatalog::WalCatalog;
use walferry_formats::{Lsn, TimelineId, Units, WalFileName};

use crate::backup::{
    commit, connect_source, consume, load_known_blocks, BackupRequest, Cut, FileEntryDraft, Taken,
};
use crate::pg::{ConnInfo, ReplicationConnection};
use crate::pgmanifest::{self, PgFile};

/// A file's record is kept for the next backup only when its last change (ctime) was at
/// least this long before it was read, so a write in the same clock tick as the read
/// cannot hide behind an unchanged timestamp.
pub const QUIET: Duration = Duration::from_secs(2);

/// Directories whose contents PostgreSQL rebuilds at startup: kept empty, as BASE_BACKUP does.
const EMPTY_DIRS: &[&str] = &[
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
];

/// Files never backed up (name, or prefix when the bool is set), as BASE_BACKUP skips them.
const SKIP_FILES: &[(&str, bool)] = &[
    ("postgresql.auto.conf.tmp", false),
    ("current_logfiles.tmp", false),
    ("pg_internal.init", true),
    ("backup_label", false),
    ("tablespace_map", false),
    ("backup_manifest", false),
    ("postmaster.pid", false),
    ("postmaster.opts", false),
];

const PG_CONTROL: &str = "global/pg_control";

/// A regular file to read.
struct Job {
    tablespace: Option<u32>,
    /// Path in the backup (relative to the data directory or the tablespace).
    rel: String,
    full: PathBuf,
}

/// The previous backup's files that may be reused: (tablespace, path) -> entry and its
/// blocks (None for a zero block).
type Previous = HashMap<(Option<u32>, String), (FileEntry, Vec<Option<BlockRef>>)>;

pub async fn take(
    units: &Units,
    config: &RepoConfig,
    conninfo: &ConnInfo,
    req: &BackupRequest,
    pgdata: &Path,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> anyhow::Result<BackupManifest> {
    let began = Instant::now();
    let started_at = jiff::Timestamp::now();
    let (repl, source) = connect_source(units, conninfo).await?;
    repl.close().await;
    check_data_dir(pgdata, source.system_id)?;
    let mut sql = ReplicationConnection::connect(&conninfo.sql_session())
        .await
        .context("open an SQL session for pg_backup_start")?;
    let version_dir = sql
        .query_value(
            "SELECT 'PG_' || (current_setting('server_version_num')::int / 10000) || '_' || catalog_version_no FROM pg_control_system()",
        )
        .await
        .context("read the server's version and catalog version")?
        .ok_or_else(|| anyhow!("the server did not report its catalog version"))?;

    let known = Arc::new(
        load_known_blocks(units)
            .await
            .context("read the block index of stored packs")?,
    );
    let previous = Arc::new(
        load_previous(units, config, source.system_id)
            .await
            .context("read the previous backup's manifest")?,
    );
    info!(
        known_blocks = known.len(),
        previous_files = previous.len(),
        "starting base backup from {}",
        pgdata.display()
    );

    let start_lsn = sql
        .backup_start(&req.label, req.fast_checkpoint)
        .await
        .context("run pg_backup_start")?;
    let tablespaces = read_tablespaces(pgdata)?;

    let (cut_tx, cut_rx) = mpsc::channel::<Cut>(8);
    let consumer = tokio::spawn(consume(units.clone(), known, cut_rx, source.size));
    let reader = {
        let (pgdata, tablespaces, version_dir) = (
            pgdata.to_path_buf(),
            tablespaces.clone(),
            version_dir.clone(),
        );
        let (keyring, tx, previous) = (units.keyring().clone(), cut_tx.clone(), previous.clone());
        let block_size = config.block_size as usize;
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = done.clone();
        let reading = tokio::task::spawn_blocking(move || {
            let jobs = walk(&pgdata, &tablespaces, &version_dir, &tx)?;
            let ctx = ReadCtx {
                tx: &tx,
                keyring: &keyring,
                previous: &previous,
                block_size,
                done: &seen,
            };
            read_all(jobs, &ctx)?;
            // pg_control last, as BASE_BACKUP sends it.
            read_control(&pgdata, &ctx)
        });
        // Progress while the threads read.
        async move {
            let mut reading = reading;
            loop {
                tokio::select! {
                    r = &mut reading => {
                        progress(done.load(std::sync::atomic::Ordering::Relaxed));
                        return r;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        progress(done.load(std::sync::atomic::Ordering::Relaxed));
                    }
                }
            }
        }
    };
    let read = reader.await;
    let stop = match read {
        Ok(Ok(())) => sql.backup_stop().await.context("run pg_backup_stop")?,
        // Closing the session aborts the backup on the server.
        Ok(Err(e)) => return Err(e.context(format!("read {}", pgdata.display()))),
        Err(e) => return Err(anyhow!("file reader task: {e}")),
    };
    let tli = label_timeline(&stop.label_file)?;
    let now = jiff::Timestamp::now().as_second();
    let keyring = units.keyring().clone();
    for (name, text) in [
        ("backup_label", &stop.label_file),
        ("tablespace_map", &stop.tablespace_map),
    ] {
        send_small(
            &cut_tx,
            &keyring,
            config.block_size as usize,
            name,
            text,
            now,
        )
        .await?;
    }
    drop(cut_tx);
    let consumed = consumer.await.context("upload task")??;

    store_local_wal(
        units,
        &mut sql,
        pgdata,
        source.size,
        tli,
        start_lsn,
        stop.lsn,
    )
    .await?;
    sql.close().await;

    let mut consumed = consumed;
    consumed.entries.sort_by(|a, b| {
        (a.entry.tablespace, &a.entry.path).cmp(&(b.entry.tablespace, &b.entry.path))
    });
    let pg_files: Vec<PgFile> = consumed
        .entries
        .iter()
        .filter(|d| d.entry.kind == EntryKind::File)
        .map(|d| {
            Ok(PgFile {
                path: match d.entry.tablespace {
                    None => d.entry.path.clone(),
                    Some(oid) => format!("pg_tblspc/{oid}/{}", d.entry.path),
                },
                size: d.entry.size,
                mtime: d.entry.mtime,
                crc32c: d
                    .crc32c
                    .ok_or_else(|| anyhow!("no checksum for {}", d.entry.path))?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let taken = Taken {
        started_at,
        began,
        start: (start_lsn, tli),
        end: (stop.lsn, tli),
        tablespaces,
        pg_manifest: Some(pgmanifest::render(&pg_files, tli, start_lsn, stop.lsn)),
        consumed,
    };
    commit(units, config, req, &source, taken).await
}

/// The directory must be the server's: its pg_control names the same system.
fn check_data_dir(pgdata: &Path, system_id: u64) -> anyhow::Result<()> {
    let path = pgdata.join(PG_CONTROL);
    let mut head = [0u8; 8];
    File::open(&path)
        .and_then(|mut f| f.read_exact(&mut head))
        .with_context(|| {
            format!(
                "read {}: --pgdata must be the server's data directory, readable by this user",
                path.display()
            )
        })?;
    let found = u64::from_le_bytes(head);
    if found != system_id {
        bail!(
            "{} belongs to the cluster with system identifier {found}, but the server says {system_id}; \
             --pgdata must be the data directory of the server that --pg connects to",
            pgdata.display()
        );
    }
    Ok(())
}

/// The newest backup of this cluster with the same block size, as reusable files.
async fn load_previous(
    units: &Units,
    config: &RepoConfig,
    system_id: u64,
) -> anyhow::Result<Previous> {
    let mut keys: Vec<String> = units
        .repo()
        .list("backups")
        .await?
        .into_iter()
        .map(|o| o.key)
        .filter(|k| k.ends_with(".manifest"))
        .collect();
    keys.sort();
    let Some(key) = keys.pop() else {
        return Ok(Previous::new());
    };
    let plain = units.get(&key, Kind::Manifest).await?;
    let m = BackupManifest::from_json(&plain).with_context(|| format!("parse {key}"))?;
    if m.system_identifier != system_id.to_string() || m.block_size != config.block_size {
        return Ok(Previous::new());
    }
    let mut out = Previous::new();
    for f in m.files {
        if f.kind != EntryKind::File || f.stamp.is_none() {
            continue;
        }
        let blocks = f
            .blocks
            .iter()
            .map(|&i| match i {
                ZERO_BLOCK => Ok(None),
                i => m
                    .blocks
                    .get(i as usize)
                    .cloned()
                    .map(Some)
                    .ok_or_else(|| anyhow!("{key}: block index {i} out of range")),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        out.insert((f.tablespace, f.path.clone()), (f, blocks));
    }
    Ok(out)
}

/// Tablespaces from the links in pg_tblspc.
fn read_tablespaces(pgdata: &Path) -> anyhow::Result<Vec<Tablespace>> {
    let dir = pgdata.join("pg_tblspc");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))? {
        let e = e.with_context(|| format!("list {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(oid) = name.parse::<u32>() else {
            continue;
        };
        let path = e.path();
        let target = std::fs::read_link(&path).with_context(|| {
            format!(
                "read the link {} (an in-place tablespace? back it up without --pgdata)",
                path.display()
            )
        })?;
        out.push(Tablespace {
            oid,
            location: target.to_string_lossy().into_owned(),
        });
    }
    out.sort_by_key(|t| t.oid);
    Ok(out)
}

fn entry(tablespace: Option<u32>, rel: &str, kind: EntryKind, meta: &Metadata) -> FileEntry {
    FileEntry {
        tablespace,
        path: rel.to_string(),
        kind,
        mode: meta.mode() & 0o7777,
        mtime: meta.mtime(),
        size: 0,
        link: None,
        blocks: Vec::new(),
        stamp: None,
    }
}

fn send_entry(tx: &mpsc::Sender<Cut>, e: FileEntry) -> anyhow::Result<()> {
    tx.blocking_send(Cut::Entry(FileEntryDraft {
        entry: e,
        ids: Vec::new(),
        crc32c: None,
    }))
    .map_err(|_| anyhow!("upload side stopped"))
}

/// Lists what to back up: directories and links go out at once, regular files are
/// returned for the readers. pg_control is left out (read last).
fn walk(
    pgdata: &Path,
    tablespaces: &[Tablespace],
    version_dir: &str,
    tx: &mpsc::Sender<Cut>,
) -> anyhow::Result<Vec<Job>> {
    let mut jobs = Vec::new();
    walk_dir(pgdata, "", None, tx, &mut jobs)?;
    for t in tablespaces {
        let root = Path::new(&t.location);
        let dir = root.join(version_dir);
        let meta = std::fs::symlink_metadata(&dir)
            .with_context(|| format!("read tablespace {} at {}", t.oid, dir.display()))?;
        send_entry(tx, entry(Some(t.oid), version_dir, EntryKind::Dir, &meta))?;
        walk_dir(root, version_dir, Some(t.oid), tx, &mut jobs)?;
    }
    Ok(jobs)
}

fn walk_dir(
    root: &Path,
    rel: &str,
    tablespace: Option<u32>,
    tx: &mpsc::Sender<Cut>,
    jobs: &mut Vec<Job>,
) -> anyhow::Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<String> = Vec::new();
    let listing = match std::fs::read_dir(&dir) {
        Ok(l) => l,
        // Dropped (a database, a relation's directory) since it was listed: WAL replay
        // recreates whatever is needed.
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("list {}", dir.display())),
    };
    for e in listing {
        let e = e.with_context(|| format!("list {}", dir.display()))?;
        match e.file_name().into_string() {
            Ok(n) => names.push(n),
            Err(n) => bail!(
                "{}: a file name that is not UTF-8 ({n:?}); PostgreSQL never creates one, remove it",
                dir.display()
            ),
        }
    }
    names.sort();
    let in_db_dir = is_db_dir(rel, tablespace);
    for name in &names {
        if name.starts_with("pgsql_tmp") || skipped_file(name) {
            continue;
        }
        if in_db_dir && (is_unlogged_fork(name, &names) || is_temp_relation(name)) {
            continue;
        }
        let path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        if tablespace.is_none() && path == PG_CONTROL {
            continue;
        }
        let full = root.join(&path);
        let meta = match std::fs::symlink_metadata(&full) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("stat {}", full.display())),
        };
        let top = tablespace.is_none() && rel.is_empty();
        if EMPTY_DIRS.contains(&name.as_str()) || (top && name == "pg_tblspc") {
            // Kept as empty directories; tablespaces come back from tablespace_map.
            let meta = std::fs::metadata(&full).unwrap_or(meta);
            send_entry(tx, entry(tablespace, &path, EntryKind::Dir, &meta))?;
            continue;
        }
        if top && name == "pg_wal" {
            let meta = std::fs::metadata(&full).unwrap_or(meta);
            send_entry(tx, entry(None, "pg_wal", EntryKind::Dir, &meta))?;
            send_entry(
                tx,
                entry(None, "pg_wal/archive_status", EntryKind::Dir, &meta),
            )?;
            continue;
        }
        let ft = meta.file_type();
        if ft.is_dir() {
            send_entry(tx, entry(tablespace, &path, EntryKind::Dir, &meta))?;
            walk_dir(root, &path, tablespace, tx, jobs)?;
        } else if ft.is_file() {
            jobs.push(Job {
                tablespace,
                rel: path,
                full,
            });
        } else {
            warn!(
                "skipping {}: not a regular file or directory",
                full.display()
            );
        }
    }
    Ok(())
}

fn skipped_file(name: &str) -> bool {
    SKIP_FILES.iter().any(|&(n, prefix)| {
        if prefix {
            name.starts_with(n)
        } else {
            name == n
        }
    })
}

/// `base/<db>` or `<version dir>/<db>` in a tablespace.
fn is_db_dir(rel: &str, tablespace: Option<u32>) -> bool {
    let Some((parent, last)) = rel.rsplit_once('/') else {
        return false;
    };
    let digits = !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit());
    digits && (tablespace.is_some() || parent == "base")
}

/// Splits `<digits>[_fork][.segment]` into (relation number, fork); None for other names.
fn relation_file(name: &str) -> Option<(&str, Option<&str>)> {
    let base = match name.split_once('.') {
        Some((b, seg)) if !seg.is_empty() && seg.bytes().all(|c| c.is_ascii_digit()) => b,
        Some(_) => return None,
        None => name,
    };
    let (rel, fork) = match base.split_once('_') {
        Some((r, f)) if matches!(f, "fsm" | "vm" | "init") => (r, Some(f)),
        Some(_) => return None,
        None => (base, None),
    };
    (!rel.is_empty() && rel.bytes().all(|c| c.is_ascii_digit())).then_some((rel, fork))
}

/// Every fork but the init fork of an unlogged relation is reset at startup.
fn is_unlogged_fork(name: &str, siblings: &[String]) -> bool {
    match relation_file(name) {
        Some((rel, fork)) if fork != Some("init") => {
            let init = format!("{rel}_init");
            siblings.binary_search(&init).is_ok()
        }
        _ => false,
    }
}

/// `t<backend>_<relation>[_fork][.segment]`: a temporary relation, gone after a restart.
fn is_temp_relation(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('t') else {
        return false;
    };
    let Some((backend, file)) = rest.split_once('_') else {
        return false;
    };
    !backend.is_empty()
        && backend.bytes().all(|c| c.is_ascii_digit())
        && relation_file(file).is_some()
}

struct ReadCtx<'a> {
    tx: &'a mpsc::Sender<Cut>,
    keyring: &'a Keyring,
    previous: &'a Previous,
    block_size: usize,
    done: &'a std::sync::atomic::AtomicU64,
}

/// Reads the files with a few threads at once; each takes the next file from a queue.
fn read_all(jobs: Vec<Job>, ctx: &ReadCtx<'_>) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
    let queue = Mutex::new(VecDeque::from(jobs));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let job = match queue.lock() {
                            Ok(mut q) => q.pop_front(),
                            Err(_) => bail!("a file reader thread panicked"),
                        };
                        let Some(job) = job else { return Ok(()) };
                        if let Err(e) = read_file(&job, ctx) {
                            // Stop the others early.
                            if let Ok(mut q) = queue.lock() {
                                q.clear();
                            }
                            return Err(e);
                        }
                    }
                })
            })
            .collect();
        let mut first = Ok(());
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(anyhow!("a file reader thread panicked")));
            if first.is_ok() {
                first = r;
            }
        }
        first
    })
}

fn stamp_of(meta: &Metadata) -> (u64, i64, i64) {
    (
        meta.ino(),
        meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
    )
}

fn read_file(job: &Job, ctx: &ReadCtx<'_>) -> anyhow::Result<()> {
    let mut file = match File::open(&job.full) {
        Ok(f) => f,
        // Removed since the walk (a dropped table): WAL replay removes it anyway.
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("open {}", job.full.display())),
    };
    let opened = SystemTime::now();
    let before = file
        .metadata()
        .with_context(|| format!("stat {}", job.full.display()))?;
    let size = before.len();
    let (ino, mtime_ns, ctime_ns) = stamp_of(&before);
    let mut entry = entry(job.tablespace, &job.rel, EntryKind::File, &before);
    entry.size = size;

    if let Some((old, refs)) = ctx.previous.get(&(job.tablespace, job.rel.clone())) {
        if let Some(s) = old.stamp {
            if (s.ino, s.mtime_ns, s.ctime_ns) == (ino, mtime_ns, ctime_ns) && old.size == size {
                entry.stamp = Some(s);
                ctx.done
                    .fetch_add(size, std::sync::atomic::Ordering::Relaxed);
                let ids = refs.iter().map(|r| r.as_ref().map(|r| r.id)).collect();
                return ctx
                    .tx
                    .blocking_send(Cut::Reused {
                        draft: FileEntryDraft {
                            entry,
                            ids,
                            crc32c: Some(s.crc32c),
                        },
                        refs: refs.iter().flatten().cloned().collect(),
                    })
                    .map_err(|_| anyhow!("upload side stopped"));
            }
        }
    }

    let mut crc = 0u32;
    let mut ids = Vec::new();
    let mut left = size;
    let mut eof = false;
    while left > 0 {
        let want = (ctx.block_size as u64).min(left) as usize;
        let mut buf = BytesMut::zeroed(want);
        if !eof {
            let got = read_full(&mut file, &mut buf)
                .with_context(|| format!("read {}", job.full.display()))?;
            // Truncated while read: the rest stays zeros, as BASE_BACKUP pads it; WAL
            // replay brings the file to its final state.
            eof = got < want;
        }
        left -= want as u64;
        crc = crc32c::crc32c_append(crc, &buf);
        ctx.done
            .fetch_add(want as u64, std::sync::atomic::Ordering::Relaxed);
        if buf.iter().all(|&b| b == 0) {
            ids.push(None);
            continue;
        }
        let data = buf.freeze();
        let id = BlockId(ctx.keyring.block_id(&data));
        ids.push(Some(id));
        ctx.tx
            .blocking_send(Cut::Block { id, data })
            .map_err(|_| anyhow!("upload side stopped"))?;
    }
    // A record for the next backup, only if nothing changed while reading and the file
    // had been quiet for a while before.
    let after = file
        .metadata()
        .with_context(|| format!("stat {}", job.full.display()))?;
    let changed_at = SystemTime::UNIX_EPOCH + Duration::from_nanos(ctime_ns.max(0) as u64);
    let quiet = opened.duration_since(changed_at).is_ok_and(|d| d >= QUIET);
    if quiet && !eof && stamp_of(&after) == (ino, mtime_ns, ctime_ns) && after.len() == size {
        entry.stamp = Some(FileStamp {
            ino,
            mtime_ns,
            ctime_ns,
            crc32c: crc,
        });
    }
    ctx.tx
        .blocking_send(Cut::Entry(FileEntryDraft {
            entry,
            ids,
            crc32c: Some(crc),
        }))
        .map_err(|_| anyhow!("upload side stopped"))
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// pg_control, read until two reads agree: the server rewrites it in place, and a read
/// racing that write could see half of each version.
fn read_control(pgdata: &Path, ctx: &ReadCtx<'_>) -> anyhow::Result<()> {
    let path = pgdata.join(PG_CONTROL);
    let read = || -> anyhow::Result<(Vec<u8>, Metadata)> {
        let mut f = File::open(&path).with_context(|| format!("open {}", path.display()))?;
        let meta = f.metadata()?;
        let mut b = Vec::new();
        f.read_to_end(&mut b)
            .with_context(|| format!("read {}", path.display()))?;
        Ok((b, meta))
    };
    let mut last = read()?;
    let mut agreed = false;
    for _ in 0..10 {
        let next = read()?;
        if next.0 == last.0 {
            agreed = true;
            break;
        }
        last = next;
        std::thread::sleep(Duration::from_millis(10));
    }
    if !agreed {
        bail!("{} kept changing while read; try again", path.display());
    }
    let (bytes, meta) = last;
    let mut e = entry(None, PG_CONTROL, EntryKind::File, &meta);
    e.size = bytes.len() as u64;
    send_bytes(ctx.tx, ctx.keyring, ctx.block_size, e, &bytes)
}

/// A file whose contents are in memory, cut into blocks like any other.
fn send_bytes(
    tx: &mpsc::Sender<Cut>,
    keyring: &Keyring,
    block_size: usize,
    entry: FileEntry,
    bytes: &[u8],
) -> anyhow::Result<()> {
    let mut ids = Vec::new();
    for chunk in bytes.chunks(block_size) {
        if chunk.iter().all(|&b| b == 0) {
            ids.push(None);
            continue;
        }
        let id = BlockId(keyring.block_id(chunk));
        ids.push(Some(id));
        tx.blocking_send(Cut::Block {
            id,
            data: Bytes::copy_from_slice(chunk),
        })
        .map_err(|_| anyhow!("upload side stopped"))?;
    }
    tx.blocking_send(Cut::Entry(FileEntryDraft {
        entry,
        ids,
        crc32c: Some(crc32c::crc32c(bytes)),
    }))
    .map_err(|_| anyhow!("upload side stopped"))
}

/// backup_label or tablespace_map, from pg_backup_stop.
async fn send_small(
    tx: &mpsc::Sender<Cut>,
    keyring: &Arc<Keyring>,
    block_size: usize,
    name: &str,
    text: &str,
    mtime: i64,
) -> anyhow::Result<()> {
    let entry = FileEntry {
        tablespace: None,
        path: name.to_string(),
        kind: EntryKind::File,
        mode: 0o600,
        mtime,
        size: text.len() as u64,
        link: None,
        blocks: Vec::new(),
        stamp: None,
    };
    let (tx, keyring, bytes) = (tx.clone(), keyring.clone(), text.as_bytes().to_vec());
    tokio::task::spawn_blocking(move || send_bytes(&tx, &keyring, block_size, entry, &bytes))
        .await
        .context("block task")?
}

/// `START TIMELINE: n` from backup_label.
fn label_timeline(label: &str) -> anyhow::Result<TimelineId> {
    label
        .lines()
        .find_map(|l| l.strip_prefix("START TIMELINE: "))
        .and_then(|t| t.trim().parse::<u32>().ok())
        .filter(|&t| t > 0)
        .map(TimelineId)
        .ok_or_else(|| anyhow!("pg_backup_stop returned a backup_label without START TIMELINE"))
}

/// Stores, from pg_wal, the WAL segments of the backup that the repository lacks (when
/// no streamer runs). Only segments the server has finished writing are read.
async fn store_local_wal(
    units: &Units,
    sql: &mut ReplicationConnection,
    pgdata: &Path,
    size: walferry_formats::SegmentSize,
    tli: TimelineId,
    start: Lsn,
    end: Lsn,
) -> anyhow::Result<()> {
    let catalog = WalCatalog::load(units.repo(), size)
        .await
        .context("list stored WAL")?;
    let first = start.segment(size).0;
    let last = Lsn(end.0.saturating_sub(1)).segment(size).0;
    let tl = catalog.timeline(tli);
    let missing: Vec<u64> = (first..=last)
        .filter(|&s| !tl.is_some_and(|t| t.sealed.contains(&walferry_formats::SegmentNo(s))))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let written: Lsn = sql
        .query_value(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END",
        )
        .await
        .context("read the server's WAL position")?
        .ok_or_else(|| anyhow!("the server reported no WAL position"))?
        .parse()
        .map_err(|_| anyhow!("the server reported an invalid WAL position"))?;
    let done_below = written.segment(size).0;
    for seg in missing {
        if seg >= done_below {
            // Still being written: the streamer stores it, or the WAL check names it.
            continue;
        }
        let name = WalFileName::Segment {
            tli,
            segno: walferry_formats::SegmentNo(seg),
        }
        .format(size);
        let path = pgdata.join("pg_wal").join(&name);
        crate::walpush::push(units, &path)
            .await
            .with_context(|| format!("store {name} from {}", path.display()))?;
        info!(%name, "stored WAL from pg_wal");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_names() {
        assert_eq!(relation_file("16384"), Some(("16384", None)));
        assert_eq!(relation_file("16384.2"), Some(("16384", None)));
        assert_eq!(relation_file("16384_fsm"), Some(("16384", Some("fsm"))));
        assert_eq!(relation_file("16384_init.1"), Some(("16384", Some("init"))));
        assert_eq!(relation_file("PG_VERSION"), None);
        assert_eq!(relation_file("16384_x"), None);
        assert_eq!(relation_file("16384."), None);
        assert!(is_temp_relation("t3_16390"));
        assert!(is_temp_relation("t3_16390_fsm.1"));
        assert!(!is_temp_relation("t_1"));
        assert!(!is_temp_relation("16390"));
    }

    #[test]
    fn unlogged_forks_and_db_dirs() {
        let names: Vec<String> = ["100", "100_fsm", "100_init", "200", "200_vm"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(is_unlogged_fork("100", &names));
        assert!(is_unlogged_fork("100_fsm", &names));
        assert!(!is_unlogged_fork("100_init", &names));
        assert!(!is_unlogged_fork("200", &names));
        assert!(is_db_dir("base/5", None));
        assert!(!is_db_dir("base", None));
        assert!(!is_db_dir("global", None));
        assert!(is_db_dir("PG_15_202209061/16384", Some(16400)));
        assert!(!is_db_dir("pg_xact/1", None));
    }

    #[test]
    fn timeline_from_label() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-11-23 14:00:00 UTC\nLABEL: x\nSTART TIMELINE: 3\n";
        assert_eq!(label_timeline(label).unwrap(), TimelineId(3));
        assert!(label_timeline("LABEL: x\n").is_err());
    }
}
