//! `walferry-agent backup`: a base backup over the replication protocol, cut into
//! deduplicated blocks, sealed on the bounded pool, packed, uploaded, and committed by a
//! manifest written last.
//!
//! Pipeline (every stage bounded, so memory does not grow with the database):
//! BASE_BACKUP stream -> tar reader thread (cuts files into blocks, hashes them) ->
//! dedup -> seal (Units, one task per core) -> packer -> at most two pack uploads in flight.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, Bytes, BytesMut};
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info};
use walferry_formats::backup::{
    new_backup_id, new_pack_key, parse_trailer, trailer_from_tail, trailer_plaintext,
    BackupManifest, BackupStats, BlockId, BlockRef, EntryKind, FileEntry, PackEntry, Tablespace,
    MANIFEST_FORMAT, PACK_TARGET_BYTES, ZERO_BLOCK,
};
use walferry_formats::config::RepoConfig;
use walferry_formats::envelope::Kind;
use walferry_formats::keyring::Keyring;
use walferry_formats::walcatalog::WalCatalog;
use walferry_formats::{Lsn, SegmentSize, TimelineId, Units, WalFileName};

use crate::cluster;
use crate::pg::{BackupEvent, BaseBackupOptions, ConnInfo, ReplicationConnection};

/// Pack uploads in flight at once.
const UPLOADS_IN_FLIGHT: usize = 2;
/// Bytes fetched from the end of a pack to find its trailer in one request.
const TAIL_GUESS: u64 = 256 << 10;

pub struct BackupRequest {
    pub label: String,
    pub fast_checkpoint: bool,
    /// BASE_BACKUP's MAX_RATE, in kB/s.
    pub max_rate_kb: Option<u32>,
    /// Read the files from this data directory (the server's, as mounted here) between
    /// pg_backup_start and pg_backup_stop, instead of streaming them with BASE_BACKUP.
    pub pgdata: Option<std::path::PathBuf>,
}

/// What the reader threads hand to the async side.
pub(crate) enum Cut {
    Entry(FileEntryDraft),
    Block {
        id: BlockId,
        data: Bytes,
    },
    Wal {
        name: String,
        data: Bytes,
    },
    /// A file unchanged since the previous backup: its blocks are where that backup
    /// stored them (`refs`, one per id that is not a zero block).
    Reused {
        draft: FileEntryDraft,
        refs: Vec<BlockRef>,
    },
}

pub(crate) struct FileEntryDraft {
    pub(crate) entry: FileEntry,
    pub(crate) ids: Vec<Option<BlockId>>,
    /// CRC-32C of the contents, for a backup_manifest walferry writes itself.
    pub(crate) crc32c: Option<u32>,
}

/// What the server and the repository said before the files were read.
pub(crate) struct Source {
    pub(crate) system_id: u64,
    pub(crate) version: Option<u32>,
    pub(crate) size: SegmentSize,
}

/// The parts of a backup that [`commit`] turns into a manifest.
pub(crate) struct Taken {
    pub(crate) started_at: jiff::Timestamp,
    pub(crate) began: Instant,
    pub(crate) start: (Lsn, TimelineId),
    pub(crate) end: (Lsn, TimelineId),
    pub(crate) tablespaces: Vec<Tablespace>,
    pub(crate) pg_manifest: Option<String>,
    pub(crate) consumed: Consumed,
}

/// Raw archive data for the reader thread.
enum Raw {
    Begin { tablespace: Option<u32> },
    Data(VecDeque<Bytes>),
}

/// Archive bytes handed to the reader thread at once.
const BATCH_BYTES: usize = 1 << 20;

/// Takes one base backup and returns its manifest once it is committed.
pub async fn take(
    units: &Units,
    config: &RepoConfig,
    conninfo: &ConnInfo,
    req: &BackupRequest,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> anyhow::Result<BackupManifest> {
    if let Some(pgdata) = &req.pgdata {
        return crate::localbackup::take(units, config, conninfo, req, pgdata, progress).await;
    }
    let began = Instant::now();
    let started_at = jiff::Timestamp::now();
    let (mut conn, source) = connect_source(units, conninfo).await?;
    let size = source.size;
    let known = Arc::new(
        load_known_blocks(units)
            .await
            .context("read the block index of stored packs")?,
    );
    info!(known_blocks = known.len(), "starting base backup");

    let opts = BaseBackupOptions {
        label: req.label.clone(),
        fast_checkpoint: req.fast_checkpoint,
        wal: true,
        // walferry stores the WAL itself; never wait on an archive_command.
        wait_for_archive: false,
        manifest: true,
        tablespace_map: true,
        max_rate_kb: req.max_rate_kb,
        ..BaseBackupOptions::default()
    };
    let mut stream = conn.base_backup(&opts).await.context("start BASE_BACKUP")?;
    let (start_lsn, start_tli) = stream.start();
    let tablespaces: Vec<Tablespace> = stream
        .tablespaces()
        .iter()
        .filter_map(|t| {
            Some(Tablespace {
                oid: t.oid?,
                location: t.location.clone()?,
            })
        })
        .collect();

    let block_size = config.block_size as usize;
    let (raw_tx, raw_rx) = mpsc::channel::<Raw>(4);
    let (cut_tx, cut_rx) = mpsc::channel::<Cut>(8);
    let keyring = units.keyring().clone();
    let reader =
        tokio::task::spawn_blocking(move || read_archives(raw_rx, cut_tx, block_size, keyring));
    let consumer = tokio::spawn(consume(units.clone(), known, cut_rx, size));

    let mut pg_manifest: Option<Vec<u8>> = None;
    let mut bytes_seen = 0u64;
    // Data goes to the reader thread in batches of about BATCH_BYTES, or whatever has
    // arrived when the socket has nothing more: one wakeup per batch, not per message.
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_len = 0usize;
    let end: (Lsn, TimelineId) = loop {
        let ev = match stream.next().now_or_never() {
            Some(ev) => ev,
            None => {
                flush_batch(&raw_tx, &mut batch, &mut batch_len).await?;
                stream.next().await
            }
        };
        match ev.context("receive the base backup")? {
            BackupEvent::Archive { name, .. } => {
                let tablespace = match name.as_str() {
                    "base.tar" => None,
                    n => Some(
                        n.strip_suffix(".tar")
                            .and_then(|o| o.parse::<u32>().ok())
                            .ok_or_else(|| {
                                anyhow!("unexpected archive {n:?} in the base backup")
                            })?,
                    ),
                };
                flush_batch(&raw_tx, &mut batch, &mut batch_len).await?;
                send(&raw_tx, Raw::Begin { tablespace }).await?;
            }
            BackupEvent::Data(d) => match pg_manifest.as_mut() {
                Some(m) => m.extend_from_slice(&d),
                None => {
                    bytes_seen += d.len() as u64;
                    batch_len += d.len();
                    batch.push(d);
                    if batch_len >= BATCH_BYTES {
                        progress(bytes_seen);
                        flush_batch(&raw_tx, &mut batch, &mut batch_len).await?;
                    }
                }
            },
            BackupEvent::Progress(_) => {}
            BackupEvent::ManifestStart => {
                flush_batch(&raw_tx, &mut batch, &mut batch_len).await?;
                pg_manifest = Some(Vec::new());
            }
            BackupEvent::End { lsn, tli } => {
                flush_batch(&raw_tx, &mut batch, &mut batch_len).await?;
                progress(bytes_seen);
                break (lsn, tli);
            }
        }
    };
    drop(stream);
    drop(raw_tx);
    reader.await.context("tar reader task")??;
    let consumed = consumer.await.context("upload task")??;
    conn.close().await;
    let taken = Taken {
        started_at,
        began,
        start: (start_lsn, start_tli),
        end,
        tablespaces,
        pg_manifest: pg_manifest.map(|m| String::from_utf8_lossy(&m).into_owned()),
        consumed,
    };
    commit(units, config, req, &source, taken).await
}

/// Connects for replication, identifies the server and checks that the repository
/// belongs to its cluster.
pub(crate) async fn connect_source(
    units: &Units,
    conninfo: &ConnInfo,
) -> anyhow::Result<(ReplicationConnection, Source)> {
    let mut conn = ReplicationConnection::connect(conninfo)
        .await
        .context("connect to PostgreSQL")?;
    let ident = conn
        .identify_system()
        .await
        .context("identify the server")?;
    let size = conn
        .wal_segment_size()
        .await
        .context("read wal_segment_size")?;
    let version = conn.server_version_num();
    cluster::bind(units.repo(), ident.system_id, size, version)
        .await
        .context("check which cluster the repository belongs to")?;
    Ok((
        conn,
        Source {
            system_id: ident.system_id,
            version,
            size,
        },
    ))
}

/// Checks that the WAL is stored, then writes the manifest: the commit point.
pub(crate) async fn commit(
    units: &Units,
    config: &RepoConfig,
    req: &BackupRequest,
    source: &Source,
    taken: Taken,
) -> anyhow::Result<BackupManifest> {
    let ((start_lsn, start_tli), (end_lsn, end_tli)) = (taken.start, taken.end);
    ensure_wal_covered(units, source.size, start_tli, start_lsn, end_lsn).await?;

    let consumed = taken.consumed;
    let id = new_backup_id(taken.started_at);
    let mut index: HashMap<BlockId, u32> = HashMap::new();
    let mut blocks: Vec<BlockRef> = Vec::new();
    let mut files = Vec::with_capacity(consumed.entries.len());
    for draft in consumed.entries {
        let mut entry = draft.entry;
        for id in draft.ids {
            let Some(id) = id else {
                entry.blocks.push(ZERO_BLOCK);
                continue;
            };
            let i = match index.get(&id) {
                Some(&i) => i,
                None => {
                    let r = consumed
                        .refs
                        .get(&id)
                        .ok_or_else(|| anyhow!("block {id} was cut but never stored"))?;
                    blocks.push(r.clone());
                    let i = u32::try_from(blocks.len() - 1).context("too many blocks")?;
                    index.insert(id, i);
                    i
                }
            };
            entry.blocks.push(i);
        }
        files.push(entry);
    }
    let manifest = BackupManifest {
        format: MANIFEST_FORMAT,
        id: id.clone(),
        label: req.label.clone(),
        system_identifier: source.system_id.to_string(),
        server_version_num: source.version,
        timeline: start_tli,
        start_lsn,
        end_lsn,
        end_timeline: end_tli,
        started_at: taken.started_at.to_string(),
        finished_at: jiff::Timestamp::now().to_string(),
        block_size: config.block_size,
        tablespaces: taken.tablespaces,
        files,
        blocks,
        pg_manifest: taken.pg_manifest,
        stats: BackupStats {
            duration_ms: taken.began.elapsed().as_millis() as u64,
            ..consumed.stats
        },
    };
    // The commit point: until this object exists, nothing lists the backup.
    units
        .put(
            &BackupManifest::key(&id),
            Kind::Manifest,
            Bytes::from(manifest.to_json()),
        )
        .await
        .context("store the backup manifest")?;
    Ok(manifest)
}

/// [`take`] under the repository's writer lease, so `expire` never deletes a pack this
/// backup is about to reference. Refused, naming the holder, while another writer works.
pub async fn take_leased(
    units: &Units,
    config: &RepoConfig,
    conninfo: &ConnInfo,
    req: &BackupRequest,
    purpose: &str,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> anyhow::Result<BackupManifest> {
    use crate::lease::{Lease, DEFAULT_TTL};
    let lease = Lease::acquire(units.repo(), purpose, DEFAULT_TTL)
        .await
        .context("take the repository's writer lease")?;
    let renewing = lease.keep_alive();
    let lost = lease.lost_token();
    let taken = tokio::select! {
        r = take(units, config, conninfo, req, progress) => r,
        _ = lost.cancelled() => Err(anyhow!("the writer lease was lost mid-backup; the backup was not committed")),
    };
    renewing.abort();
    if let Err(e) = lease.release().await {
        tracing::warn!("release the writer lease (it lapses by itself): {e}");
    }
    taken
}

async fn flush_batch(
    tx: &mpsc::Sender<Raw>,
    batch: &mut Vec<Bytes>,
    len: &mut usize,
) -> anyhow::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    *len = 0;
    send(tx, Raw::Data(std::mem::take(batch).into())).await
}

async fn send(tx: &mpsc::Sender<Raw>, msg: Raw) -> anyhow::Result<()> {
    tx.send(msg)
        .await
        .map_err(|_| anyhow!("the tar reader stopped early (see the error below)"))
}

/// The WAL from start to end must be durable, or the backup cannot be restored.
async fn ensure_wal_covered(
    units: &Units,
    size: SegmentSize,
    tli: TimelineId,
    start: Lsn,
    end: Lsn,
) -> anyhow::Result<()> {
    // A listing is not a snapshot: a segment the streamer seals while it runs can show
    // neither as sealed nor as parts. A gap is only believed when it is seen again.
    let mut attempt = 0;
    loop {
        let catalog = WalCatalog::load(units.repo(), size)
            .await
            .context("list stored WAL")?;
        match first_missing(&catalog, size, tli, start, end) {
            None => return Ok(()),
            Some(_) if attempt < 3 => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Some(seg) => bail!(
                "WAL segment {} needed by this backup is not in the repository; the backup is not committed",
                WalFileName::Segment { tli, segno: seg }.format(size)
            ),
        }
    }
}

fn first_missing(
    catalog: &WalCatalog,
    size: SegmentSize,
    tli: TimelineId,
    start: Lsn,
    end: Lsn,
) -> Option<walferry_formats::SegmentNo> {
    let tl = catalog.timeline(tli);
    let first = start.segment(size).0;
    let last = Lsn(end.0.saturating_sub(1)).segment(size).0;
    (first..=last)
        .map(walferry_formats::SegmentNo)
        .find(|&seg| {
            let sealed = tl.is_some_and(|t| t.sealed.contains(&seg));
            let covered = tl.map(|t| t.part_cover(seg).1).unwrap_or(0);
            let needed = if seg.0 == last {
                end.segment_offset(size).max(1)
            } else {
                size.bytes()
            };
            !sealed && covered < needed
        })
}

/// Reads the block ids of every stored pack from the pack trailers.
pub async fn load_known_blocks(units: &Units) -> anyhow::Result<HashMap<BlockId, BlockRef>> {
    let mut known = HashMap::new();
    let packs = units.repo().list("packs").await.context("list packs")?;
    for p in packs {
        let from = p.size.saturating_sub(TAIL_GUESS);
        let mut tail = units
            .repo()
            .get_range(&p.key, from..p.size)
            .await
            .with_context(|| format!("read the trailer of {}", p.key))?;
        let len = trailer_len(&tail).with_context(|| format!("read the trailer of {}", p.key))?;
        if len + 4 > tail.len() as u64 {
            let start = p
                .size
                .checked_sub(len + 4)
                .ok_or_else(|| anyhow!("{} is truncated", p.key))?;
            tail = units.repo().get_range(&p.key, start..p.size).await?;
        }
        // A damaged trailer only means its blocks are not reused: warn, and back up anyway.
        let entries = match trailer_from_tail(&tail) {
            Ok(t) => match units
                .open(&p.key, Kind::PackTrailer, Bytes::copy_from_slice(t))
                .await
            {
                Ok(plain) => parse_trailer(&plain).map_err(anyhow::Error::from),
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        };
        let entries = match entries {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("pack {} has an unreadable trailer, its blocks will not be reused (run `walferry-restore verify`): {e:#}", p.key);
                continue;
            }
        };
        for e in entries {
            known.insert(
                e.id,
                BlockRef {
                    id: e.id,
                    pack: p.key.clone(),
                    offset: e.offset,
                    len: e.len,
                    plain_len: e.plain_len,
                },
            );
        }
    }
    Ok(known)
}

fn trailer_len(tail: &[u8]) -> anyhow::Result<u64> {
    let n = tail.len();
    anyhow::ensure!(n >= 4, "pack is shorter than its trailer length");
    Ok(u64::from(u32::from_le_bytes([
        tail[n - 4],
        tail[n - 3],
        tail[n - 2],
        tail[n - 1],
    ])))
}

/// Adapts the raw-data channel to `Read` for the tar reader; one archive at a time.
struct ChannelReader<'a> {
    rx: &'a mut mpsc::Receiver<Raw>,
    cur: VecDeque<Bytes>,
    next: Option<Option<u32>>,
    done: bool,
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.front().is_none_or(|b| b.is_empty()) {
            if self.cur.pop_front().is_some() {
                continue;
            }
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Raw::Data(d)) => self.cur = d,
                Some(Raw::Begin { tablespace }) => {
                    self.next = Some(tablespace);
                    self.done = true;
                }
                None => self.done = true,
            }
        }
        let Some(cur) = self.cur.front_mut() else {
            return Ok(0);
        };
        let n = buf.len().min(cur.len());
        buf[..n].copy_from_slice(&cur[..n]);
        cur.advance(n);
        Ok(n)
    }
}

/// The tar reader thread: cuts files into blocks and names them by keyed hash.
fn read_archives(
    mut rx: mpsc::Receiver<Raw>,
    tx: mpsc::Sender<Cut>,
    block_size: usize,
    keyring: Arc<Keyring>,
) -> anyhow::Result<()> {
    let mut next = match rx.blocking_recv() {
        Some(Raw::Begin { tablespace }) => Some(tablespace),
        Some(Raw::Data(_)) => bail!("archive data arrived before an archive began"),
        None => None,
    };
    while let Some(tablespace) = next.take() {
        let mut reader = ChannelReader {
            rx: &mut rx,
            cur: VecDeque::new(),
            next: None,
            done: false,
        };
        read_one_archive(&mut reader, tablespace, &tx, block_size, &keyring).with_context(
            || {
                format!(
                    "read the archive of {}",
                    tablespace.map_or("the data directory".to_string(), |o| format!(
                        "tablespace {o}"
                    ))
                )
            },
        )?;
        // Drain what the tar reader did not consume (trailing zero blocks).
        let mut sink = [0u8; 8192];
        while reader.read(&mut sink)? > 0 {}
        next = reader.next;
    }
    Ok(())
}

fn read_one_archive(
    reader: &mut ChannelReader<'_>,
    tablespace: Option<u32>,
    tx: &mpsc::Sender<Cut>,
    block_size: usize,
    keyring: &Keyring,
) -> anyhow::Result<()> {
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().context("read tar entries")? {
        let mut entry = entry.context("read a tar entry")?;
        let header = entry.header();
        let path = entry
            .path()
            .context("read a tar entry's path")?
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        let kind = match header.entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink,
            other => bail!("unexpected tar entry type {other:?} for {path}"),
        };
        let mode = header.mode().context("read mode")?;
        let mtime = header.mtime().context("read mtime")? as i64;
        let size = header.size().context("read size")?;
        let link = entry
            .link_name()
            .context("read link")?
            .map(|l| l.to_string_lossy().into_owned());
        let file = FileEntry {
            tablespace,
            path: path.clone(),
            kind,
            mode,
            mtime,
            size: if kind == EntryKind::File { size } else { 0 },
            link,
            blocks: Vec::new(),
            stamp: None,
        };
        // WAL shipped inside the backup goes where all WAL goes, not into blocks.
        // (archive_status markers are ordinary empty files: PostgreSQL's manifest lists them.)
        let wal_name = path
            .strip_prefix("pg_wal/")
            .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()));
        if let (None, EntryKind::File, Some(name)) = (tablespace, kind, wal_name) {
            let name = name.to_string();
            let mut data = Vec::with_capacity(size as usize);
            entry
                .read_to_end(&mut data)
                .context("read a WAL file from the archive")?;
            tx.blocking_send(Cut::Wal {
                name,
                data: Bytes::from(data),
            })
            .map_err(|_| anyhow!("upload side stopped"))?;
            continue;
        }
        let mut ids = Vec::new();
        if kind == EntryKind::File {
            let mut left = size;
            while left > 0 {
                let want = (block_size as u64).min(left) as usize;
                let mut buf = BytesMut::zeroed(want);
                entry
                    .read_exact(&mut buf)
                    .with_context(|| format!("read {path}"))?;
                left -= want as u64;
                if buf.iter().all(|&b| b == 0) {
                    ids.push(None);
                    continue;
                }
                let data = buf.freeze();
                let id = BlockId(keyring.block_id(&data));
                ids.push(Some(id));
                tx.blocking_send(Cut::Block { id, data })
                    .map_err(|_| anyhow!("upload side stopped"))?;
            }
        }
        tx.blocking_send(Cut::Entry(FileEntryDraft {
            entry: file,
            ids,
            crc32c: None,
        }))
        .map_err(|_| anyhow!("upload side stopped"))?;
    }
    Ok(())
}

pub(crate) struct Consumed {
    pub(crate) entries: Vec<FileEntryDraft>,
    refs: HashMap<BlockId, BlockRef>,
    stats: BackupStats,
}

/// Seals new blocks, packs and uploads them; stores WAL found in the archive.
pub(crate) async fn consume(
    units: Units,
    known: Arc<HashMap<BlockId, BlockRef>>,
    mut rx: mpsc::Receiver<Cut>,
    size: SegmentSize,
) -> anyhow::Result<Consumed> {
    let mut entries = Vec::new();
    let mut refs: HashMap<BlockId, BlockRef> = HashMap::new();
    let mut seen: HashSet<BlockId> = HashSet::new();
    let mut stats = BackupStats::default();
    // In cut order, so a file's new blocks lie side by side in its pack and a restore
    // fetches neighbours with one range read.
    let mut sealing: FuturesOrdered<AbortOnDropHandle<anyhow::Result<(BlockId, u32, Bytes)>>> =
        FuturesOrdered::new();
    let max_sealing = 2 * std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut packer = Packer::new(units.clone());
    let mut wal: JoinSet<anyhow::Result<()>> = JoinSet::new();

    while let Some(cut) = rx.recv().await {
        match cut {
            Cut::Entry(draft) => {
                stats.bytes += draft.entry.size;
                stats.zero_blocks += draft.ids.iter().filter(|i| i.is_none()).count() as u64;
                entries.push(draft);
            }
            Cut::Reused { draft, refs: old } => {
                stats.bytes += draft.entry.size;
                stats.unread_bytes += draft.entry.size;
                stats.zero_blocks += draft.ids.iter().filter(|i| i.is_none()).count() as u64;
                for r in old {
                    if seen.insert(r.id) {
                        stats.reused_blocks += 1;
                        refs.insert(r.id, r);
                    }
                }
                entries.push(draft);
            }
            Cut::Block { id, data } => {
                if let Some(r) = known.get(&id) {
                    if seen.insert(id) {
                        stats.reused_blocks += 1;
                        refs.insert(id, r.clone());
                    }
                    continue;
                }
                if !seen.insert(id) {
                    continue;
                }
                while sealing.len() >= max_sealing {
                    let Some(done) = sealing.next().await else {
                        break;
                    };
                    let (id, plain_len, sealed) = done.context("seal task")??;
                    packer
                        .add(id, plain_len, sealed, &mut refs, &mut stats)
                        .await?;
                }
                let u = units.clone();
                sealing.push_back(AbortOnDropHandle::new(tokio::spawn(async move {
                    let plain_len = data.len() as u32;
                    let sealed = u.seal(id.0, Kind::Block, data).await?;
                    Ok((id, plain_len, sealed))
                })));
            }
            Cut::Wal { name, data } => {
                let u = units.clone();
                wal.spawn(async move {
                    let parsed = WalFileName::parse(&name, size)
                        .with_context(|| format!("WAL file {name} in the backup"))?;
                    if let WalFileName::Segment { .. } = parsed {
                        let key = walferry_formats::layout::wal_file_key(&parsed, size);
                        u.put(&key, Kind::WalSegment, data)
                            .await
                            .with_context(|| format!("store {name}"))?;
                        debug!(%name, "stored WAL from the backup");
                    }
                    Ok(())
                });
            }
        }
    }
    while let Some(r) = sealing.next().await {
        let (id, plain_len, sealed) = r.context("seal task")??;
        packer
            .add(id, plain_len, sealed, &mut refs, &mut stats)
            .await?;
    }
    packer.finish().await?;
    while let Some(r) = wal.join_next().await {
        r.context("WAL task")??;
    }
    Ok(Consumed {
        entries,
        refs,
        stats,
    })
}

/// Collects sealed blocks into packs and uploads them, at most a few at a time.
struct Packer {
    units: Units,
    key: String,
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
    uploads: JoinSet<anyhow::Result<()>>,
    permits: Arc<Semaphore>,
}

impl Packer {
    fn new(units: Units) -> Self {
        Packer {
            units,
            key: new_pack_key(),
            buf: Vec::new(),
            entries: Vec::new(),
            uploads: JoinSet::new(),
            permits: Arc::new(Semaphore::new(UPLOADS_IN_FLIGHT)),
        }
    }

    async fn add(
        &mut self,
        id: BlockId,
        plain_len: u32,
        sealed: Bytes,
        refs: &mut HashMap<BlockId, BlockRef>,
        stats: &mut BackupStats,
    ) -> anyhow::Result<()> {
        let offset = self.buf.len() as u64;
        let len = u32::try_from(sealed.len()).context("block too large")?;
        self.buf.extend_from_slice(&sealed);
        self.entries.push(PackEntry {
            id,
            offset,
            len,
            plain_len,
        });
        refs.insert(
            id,
            BlockRef {
                id,
                pack: self.key.clone(),
                offset,
                len,
                plain_len,
            },
        );
        stats.new_blocks += 1;
        stats.new_stored_bytes += u64::from(len);
        if self.buf.len() >= PACK_TARGET_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let key = std::mem::replace(&mut self.key, new_pack_key());
        let mut buf = std::mem::take(&mut self.buf);
        let entries = std::mem::take(&mut self.entries);
        let trailer = self
            .units
            .seal(
                &key,
                Kind::PackTrailer,
                Bytes::from(trailer_plaintext(&entries)),
            )
            .await
            .context("seal a pack trailer")?;
        buf.extend_from_slice(&trailer);
        buf.extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        // Reap finished uploads so errors surface early; wait for a slot.
        while let Some(r) = self.uploads.try_join_next() {
            r.context("pack upload task")??;
        }
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .context("upload slots closed")?;
        let repo = self.units.repo().clone();
        self.uploads.spawn(async move {
            let _permit = permit;
            repo.put(&key, Bytes::from(buf))
                .await
                .with_context(|| format!("upload pack {key}"))?;
            debug!(%key, blocks = entries.len(), "pack stored");
            Ok(())
        });
        Ok(())
    }

    async fn finish(mut self) -> anyhow::Result<()> {
        self.flush().await?;
        while let Some(r) = self.uploads.join_next().await {
            r.context("pack upload task")??;
        }
        Ok(())
    }
}
