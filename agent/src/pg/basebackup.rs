//! `BASE_BACKUP` over the physical replication connection, streamed.
//!
//! PostgreSQL 15+ (option-list syntax, one CopyOutResponse whose CopyData carry
//! sub-messages) and 13/14 (keyword syntax, one CopyOutResponse per archive with raw tar
//! bytes, then one for the manifest) both come out as the same [`BackupEvent`]s:
//!
//! ```text
//! Archive{16384.tar, /path}  Data…  Progress…        user tablespaces first
//! Archive{base.tar, ""}      Data…  Progress…        global/pg_control is its last entry
//! ManifestStart              Data…                   the backup_manifest JSON (if requested)
//! End{lsn, tli}                                      the connection takes commands again
//! ```
//!
//! Nothing is buffered beyond one protocol message: each `Data` is a zero-copy slice of
//! the CopyData the server sent (32 kB on PostgreSQL 15), so memory stays bounded however
//! slow the consumer is; the server simply waits (TCP flow control).
//!
//! Every archive is a complete tar stream, end-of-archive marker included (PostgreSQL
//! 13/14 omit the two zero blocks; the stream appends them as a last `Data`).
//!
//! The backup is over only when [`BackupEvent::End`] arrives (after the server's
//! ReadyForQuery). A connection lost anywhere before that is an error from
//! [`BaseBackupStream::next`] (transient: [`PgError::Closed`]/[`PgError::Io`], or the
//! server's FATAL), never a silently short archive.

use bytes::{Buf, Bytes};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use walferry_formats::{Lsn, TimelineId};

use super::codec::{self, Backend};
use super::conn::{unexpected, ConnState, ReplicationConnection};
use super::error::{PgError, Result, ServerError};

/// The smallest and largest `MAX_RATE` the server accepts (kB/s).
pub const MAX_RATE_RANGE_KB: std::ops::RangeInclusive<u32> = 32..=1_048_576;

/// The tar end-of-archive marker: two 512-byte zero blocks.
const TAR_TRAILER: [u8; 1024] = [0; 1024];

/// Options of one `BASE_BACKUP`. `Default` is what walferry wants for a backup it stores:
/// fast checkpoint, a manifest with CRC32C checksums, a `tablespace_map`, page checksums
/// verified, no WAL in the archive (the agent streams WAL itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseBackupOptions {
    /// The backup label (in `backup_label` and `pg_stat_progress_basebackup`).
    pub label: String,
    /// `CHECKPOINT 'fast'` (an immediate checkpoint) instead of a spread one, which can
    /// take up to `checkpoint_timeout * checkpoint_completion_target` before any byte.
    pub fast_checkpoint: bool,
    /// `WAL`: put the WAL from start to end LSN into `base.tar` as `pg_wal/…` (needs the
    /// server to keep it meanwhile: `wal_keep_size` or a slot).
    pub wal: bool,
    /// `WAIT`: at the end, wait until the server archived the last WAL segment the backup
    /// needs (only matters with `archive_mode` on). Set false when the WAL reaches the
    /// repository another way (the agent's stream, or `wal`).
    pub wait_for_archive: bool,
    /// `MANIFEST 'yes'`, `MANIFEST_CHECKSUMS 'CRC32C'` (PostgreSQL 13+).
    pub manifest: bool,
    /// `TABLESPACE_MAP`: a `tablespace_map` file in `base.tar` instead of the
    /// `pg_tblspc/<oid>` symlinks, so a restore can relocate tablespaces.
    pub tablespace_map: bool,
    /// `MAX_RATE` in kB/s ([`MAX_RATE_RANGE_KB`]); None = unlimited.
    pub max_rate_kb: Option<u32>,
    /// `VERIFY_CHECKSUMS`: the server checks page checksums while reading (when the
    /// cluster has them) and fails the backup at the end if any mismatched.
    pub verify_checksums: bool,
    /// `PROGRESS`: the server first adds up the size of every tablespace
    /// ([`TablespaceInfo::size_kb`]); costs one extra walk of the data directory.
    pub estimate_size: bool,
}

impl Default for BaseBackupOptions {
    fn default() -> Self {
        BaseBackupOptions {
            label: "walferry".to_owned(),
            fast_checkpoint: true,
            wal: false,
            wait_for_archive: true,
            manifest: true,
            tablespace_map: true,
            max_rate_kb: None,
            verify_checksums: true,
            estimate_size: false,
        }
    }
}

impl BaseBackupOptions {
    /// The `BASE_BACKUP` command for a server of this version (`server_version_num`, e.g.
    /// 150004; 15+ gets the option-list syntax, older servers the keyword syntax).
    pub fn command(&self, server_version_num: u32) -> Result<String> {
        if self.label.contains('\0') {
            return Err(PgError::config("the backup label contains a NUL byte"));
        }
        if let Some(r) = self.max_rate_kb {
            if !MAX_RATE_RANGE_KB.contains(&r) {
                return Err(PgError::config(format!(
                    "max rate {r} kB/s is out of range: PostgreSQL accepts {}..={} kB/s",
                    MAX_RATE_RANGE_KB.start(),
                    MAX_RATE_RANGE_KB.end()
                )));
            }
        }
        if self.manifest && server_version_num < 130_000 {
            return Err(PgError::config(format!(
                "backup manifests need PostgreSQL 13 or later (the server is {server_version_num})"
            )));
        }
        // The replication lexer knows no backslash escapes: only '' inside quotes.
        let label = format!("'{}'", self.label.replace('\'', "''"));
        let mut opts: Vec<String> = Vec::new();
        if server_version_num >= 150_000 {
            opts.push(format!("LABEL {label}"));
            if self.estimate_size {
                opts.push("PROGRESS".into());
            }
            opts.push(
                if self.fast_checkpoint {
                    "CHECKPOINT 'fast'"
                } else {
                    "CHECKPOINT 'spread'"
                }
                .into(),
            );
            if self.wal {
                opts.push("WAL".into());
            }
            if !self.wait_for_archive {
                opts.push("WAIT 0".into());
            }
            if let Some(r) = self.max_rate_kb {
                opts.push(format!("MAX_RATE {r}"));
            }
            if self.tablespace_map {
                opts.push("TABLESPACE_MAP".into());
            }
            if !self.verify_checksums {
                opts.push("VERIFY_CHECKSUMS 0".into());
            }
            if self.manifest {
                opts.push("MANIFEST 'yes'".into());
                opts.push("MANIFEST_CHECKSUMS 'CRC32C'".into());
            }
            Ok(format!("BASE_BACKUP ({})", opts.join(", ")))
        } else {
            opts.push(format!("LABEL {label}"));
            if self.estimate_size {
                opts.push("PROGRESS".into());
            }
            if self.fast_checkpoint {
                opts.push("FAST".into());
            }
            if self.wal {
                opts.push("WAL".into());
            }
            if !self.wait_for_archive {
                opts.push("NOWAIT".into());
            }
            if let Some(r) = self.max_rate_kb {
                opts.push(format!("MAX_RATE {r}"));
            }
            if self.tablespace_map {
                opts.push("TABLESPACE_MAP".into());
            }
            if !self.verify_checksums {
                opts.push("NOVERIFY_CHECKSUMS".into());
            }
            if self.manifest {
                opts.push("MANIFEST 'yes'".into());
                opts.push("MANIFEST_CHECKSUMS 'CRC32C'".into());
            }
            Ok(format!("BASE_BACKUP {}", opts.join(" ")))
        }
    }
}

/// One row of the tablespace result set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablespaceInfo {
    /// None for the main data directory (`base.tar`).
    pub oid: Option<u32>,
    /// The tablespace directory on the server; None for the main data directory.
    pub location: Option<String>,
    /// Estimated size in kB (only with [`BaseBackupOptions::estimate_size`]).
    pub size_kb: Option<i64>,
}

/// One event of a base backup stream; see the module docs for the order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupEvent {
    /// A new tar archive begins: `16384.tar` for a tablespace, `base.tar` for the data
    /// directory. The `Data` that follow are its bytes.
    Archive {
        name: String,
        /// The tablespace's directory on the server ("" for `base.tar`).
        tablespace_path: String,
    },
    /// Bytes of the current archive, or of the manifest after `ManifestStart`.
    Data(Bytes),
    /// Bytes the server has sent so far in all archives (PostgreSQL 15+, which reports it
    /// even without `PROGRESS`).
    Progress(u64),
    /// The archives are complete; the `Data` that follow are the `backup_manifest` JSON.
    ManifestStart,
    /// The backup is complete and the connection takes commands again. Recovery from
    /// this backup must replay WAL up to `lsn` at least.
    End { lsn: Lsn, tli: TimelineId },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// 15+: one CopyOutResponse, CopyData carry typed sub-messages.
    Modern,
    /// 13/14: one CopyOutResponse per archive (raw tar bytes), then one for the manifest.
    Legacy,
}

#[derive(Debug)]
enum Phase {
    /// Inside a COPY.
    Copy,
    /// Legacy: after an archive's CopyDone, before the next CopyOutResponse or the end row.
    BetweenCopies,
    /// After the COPY: the end row, CommandComplete, then ReadyForQuery.
    Ending,
    /// The server reported a non-fatal error: draining to ReadyForQuery, then it is
    /// returned and the connection is idle again.
    Failing(ServerError),
    /// `End` was returned.
    Done,
    /// The backup failed; the connection is idle again.
    Failed,
    /// The connection is gone.
    Closed,
}

/// A running `BASE_BACKUP`; see [`ReplicationConnection::base_backup`]. It borrows the
/// connection until the backup ends. Dropped before [`BackupEvent::End`], it leaves the
/// connection unusable (later commands fail; reconnect), since a running backup can only
/// be stopped by closing the connection.
pub struct BaseBackupStream<'c> {
    conn: &'c mut ReplicationConnection,
    flow: Flow,
    phase: Phase,
    start: (Lsn, TimelineId),
    tablespaces: Vec<TablespaceInfo>,
    /// Returned by the next `next()` before anything is read.
    pending: Option<BackupEvent>,
    /// Archives begun so far.
    archives: usize,
    manifest_started: bool,
    end: Option<(Lsn, TimelineId)>,
    /// Data bytes received (archives and manifest).
    bytes: u64,
}

impl Drop for BaseBackupStream<'_> {
    fn drop(&mut self) {
        self.conn.io.set_read_chunk(super::io::READ_CHUNK);
    }
}

impl std::fmt::Debug for BaseBackupStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseBackupStream")
            .field("flow", &self.flow)
            .field("phase", &self.phase)
            .field("start", &self.start)
            .field("archives", &self.archives)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl ReplicationConnection {
    /// Start `BASE_BACKUP`. Returns once the server has done its checkpoint, reported the
    /// start LSN and the tablespaces, and begun sending. Errors before that (bad option,
    /// a backup the server cannot start) come back here and leave the connection usable.
    ///
    /// Not cancel-safe (like the other commands); the returned stream's `next()` is.
    pub async fn base_backup(&mut self, opts: &BaseBackupOptions) -> Result<BaseBackupStream<'_>> {
        self.ensure_idle()?;
        let version = self.server_version_num().unwrap_or(150_000);
        let sql = opts.command(version)?;
        let flow = if version >= 150_000 {
            Flow::Modern
        } else {
            Flow::Legacy
        };
        tracing::debug!(%sql, "starting base backup");
        self.state = ConnState::Busy;
        frontend::query(&sql, self.io.out()).map_err(|e| PgError::config(format!("{e}")))?;
        self.flush().await?;
        let mut sets_done = 0usize;
        let mut start = None;
        let mut tablespaces = Vec::new();
        let mut error: Option<ServerError> = None;
        loop {
            match self.recv().await? {
                Backend::Message(Message::CopyOutResponse(_)) if error.is_none() => {
                    let Some(start) = start else {
                        self.state = ConnState::Broken;
                        return Err(PgError::protocol(
                            "BASE_BACKUP began sending before reporting its start position",
                        ));
                    };
                    self.io.set_read_chunk(super::io::BULK_READ_CHUNK);
                    let mut stream = BaseBackupStream {
                        conn: self,
                        flow,
                        phase: Phase::Copy,
                        start,
                        tablespaces,
                        pending: None,
                        archives: 0,
                        manifest_started: false,
                        end: None,
                        bytes: 0,
                    };
                    if flow == Flow::Legacy {
                        stream.pending = Some(stream.legacy_copy_start()?);
                    }
                    return Ok(stream);
                }
                Backend::Message(Message::RowDescription(_)) => {}
                Backend::Message(Message::CommandComplete(_)) => sets_done += 1,
                Backend::Message(Message::DataRow(row)) => {
                    let parsed = codec::row_values(&row).and_then(|r| match sets_done {
                        0 => parse_position(&r, "BASE_BACKUP start").map(|p| start = Some(p)),
                        1 => parse_tablespace(&r).map(|t| tablespaces.push(t)),
                        _ => Err(PgError::protocol(
                            "BASE_BACKUP: unexpected third result set",
                        )),
                    });
                    if let Err(e) = parsed {
                        self.state = ConnState::Broken;
                        return Err(e);
                    }
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    let e = codec::server_error(&body);
                    if e.is_fatal() {
                        self.state = ConnState::Broken;
                        return Err(e.into());
                    }
                    error = Some(e);
                }
                Backend::Message(Message::ReadyForQuery(_)) => {
                    self.state = ConnState::Idle;
                    return Err(match error {
                        Some(e) => e.into(),
                        None => PgError::protocol("BASE_BACKUP finished without sending a backup"),
                    });
                }
                Backend::Message(Message::CopyData(_) | Message::CopyDone) if error.is_some() => {}
                other => {
                    self.state = ConnState::Broken;
                    return Err(unexpected(&other, "BASE_BACKUP"));
                }
            }
        }
    }
}

impl BaseBackupStream<'_> {
    /// The backup's start LSN (its checkpoint's redo point) and timeline.
    pub fn start(&self) -> (Lsn, TimelineId) {
        self.start
    }

    /// The tablespaces in the order the server reported them (the main data directory has
    /// no oid; on 15+ it is sent last).
    pub fn tablespaces(&self) -> &[TablespaceInfo] {
        &self.tablespaces
    }

    /// Archive and manifest bytes received so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes
    }

    /// The next event. Cancel-safe (nothing is lost if the future is dropped before it
    /// completes). After [`BackupEvent::End`] or an error the stream is over: further calls
    /// fail (with [`PgError::Closed`] if the connection is gone). After `End`, and after
    /// a non-fatal server error (e.g. a checksum failure), the connection takes commands
    /// again.
    pub async fn next(&mut self) -> Result<BackupEvent> {
        loop {
            if let Some(ev) = self.pending.take() {
                return Ok(ev);
            }
            match self.phase {
                Phase::Done => return Err(PgError::protocol("the base backup has ended")),
                Phase::Failed => return Err(PgError::protocol("the base backup failed")),
                Phase::Closed => return Err(PgError::Closed),
                Phase::Copy | Phase::BetweenCopies | Phase::Ending | Phase::Failing(_) => {}
            }
            let msg = match self.conn.recv().await {
                Ok(m) => m,
                Err(e) => {
                    // recv marked the connection broken. A server error that was already
                    // reported says more than the closed socket.
                    let phase = std::mem::replace(&mut self.phase, Phase::Closed);
                    return Err(match phase {
                        Phase::Failing(server) => server.into(),
                        _ => e,
                    });
                }
            };
            if let Some(ev) = self.handle(msg)? {
                return Ok(ev);
            }
        }
    }

    /// Apply one message to the state; Some(event) to return, None to read on. Never
    /// awaits, so `next()` stays cancel-safe.
    fn handle(&mut self, msg: Backend) -> Result<Option<BackupEvent>> {
        if let Phase::Failing(_) = self.phase {
            return match msg {
                Backend::Message(Message::ReadyForQuery(_)) => {
                    self.conn.state = ConnState::Idle;
                    match std::mem::replace(&mut self.phase, Phase::Failed) {
                        Phase::Failing(e) => Err(e.into()),
                        _ => Err(PgError::protocol("base backup state lost")),
                    }
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    let e = codec::server_error(&body);
                    if e.is_fatal() {
                        return Err(self.fail(e.into()));
                    }
                    Ok(None)
                }
                // Whatever else was in flight before the error.
                _ => Ok(None),
            };
        }
        match msg {
            Backend::Message(Message::ErrorResponse(body)) => {
                let e = codec::server_error(&body);
                if e.is_fatal() {
                    return Err(self.fail(e.into()));
                }
                tracing::debug!("base backup failed on the server: {e}");
                self.phase = Phase::Failing(e);
                Ok(None)
            }
            Backend::Message(Message::CopyData(body)) if matches!(self.phase, Phase::Copy) => {
                let data = body.into_bytes();
                let ev = match self.flow {
                    Flow::Modern => self.modern_copy_data(data),
                    Flow::Legacy => {
                        self.bytes += data.len() as u64;
                        Ok(BackupEvent::Data(data))
                    }
                };
                ev.map(Some).map_err(|e| self.fail(e))
            }
            Backend::Message(Message::CopyDone) if matches!(self.phase, Phase::Copy) => {
                match self.flow {
                    Flow::Modern => {
                        self.phase = Phase::Ending;
                        Ok(None)
                    }
                    Flow::Legacy => {
                        self.phase = Phase::BetweenCopies;
                        if self.manifest_started {
                            Ok(None)
                        } else {
                            // 13/14 leave out the tar end-of-archive marker.
                            self.bytes += TAR_TRAILER.len() as u64;
                            Ok(Some(BackupEvent::Data(Bytes::from_static(&TAR_TRAILER))))
                        }
                    }
                }
            }
            Backend::Message(Message::CopyOutResponse(_))
                if matches!(self.phase, Phase::BetweenCopies) && self.end.is_none() =>
            {
                self.phase = Phase::Copy;
                self.legacy_copy_start().map(Some).map_err(|e| self.fail(e))
            }
            Backend::Message(Message::RowDescription(_) | Message::CommandComplete(_))
                if matches!(self.phase, Phase::Ending | Phase::BetweenCopies) =>
            {
                Ok(None)
            }
            Backend::Message(Message::DataRow(row))
                if matches!(self.phase, Phase::Ending | Phase::BetweenCopies)
                    && self.end.is_none() =>
            {
                let end = codec::row_values(&row)
                    .and_then(|r| parse_position(&r, "BASE_BACKUP end"))
                    .map_err(|e| self.fail(e))?;
                self.end = Some(end);
                self.phase = Phase::Ending;
                Ok(None)
            }
            Backend::Message(Message::ReadyForQuery(_))
                if matches!(self.phase, Phase::Ending | Phase::BetweenCopies) =>
            {
                let Some((lsn, tli)) = self.end else {
                    return Err(self.fail(PgError::protocol(
                        "BASE_BACKUP finished without reporting its end position",
                    )));
                };
                if self.archives == 0 {
                    return Err(self.fail(PgError::protocol("BASE_BACKUP sent no archive")));
                }
                self.conn.state = ConnState::Idle;
                self.phase = Phase::Done;
                Ok(Some(BackupEvent::End { lsn, tli }))
            }
            other => Err(self.fail(unexpected(&other, "BASE_BACKUP streaming"))),
        }
    }

    /// The connection can no longer be trusted: mark it broken, end the stream.
    fn fail(&mut self, e: PgError) -> PgError {
        self.phase = Phase::Closed;
        self.conn.state = ConnState::Broken;
        e
    }

    /// A 15+ CopyData sub-message.
    fn modern_copy_data(&mut self, mut data: Bytes) -> Result<BackupEvent> {
        if data.is_empty() {
            return Err(PgError::protocol("empty CopyData in BASE_BACKUP"));
        }
        let kind = data.get_u8();
        match kind {
            b'n' => {
                if self.manifest_started {
                    return Err(PgError::protocol(
                        "BASE_BACKUP began an archive after the manifest",
                    ));
                }
                let (name, path) = parse_new_archive(&data)?;
                self.archives += 1;
                Ok(BackupEvent::Archive {
                    name,
                    tablespace_path: path,
                })
            }
            b'd' => {
                if self.archives == 0 && !self.manifest_started {
                    return Err(PgError::protocol(
                        "BASE_BACKUP sent data before naming an archive",
                    ));
                }
                self.bytes += data.len() as u64;
                Ok(BackupEvent::Data(data))
            }
            b'p' => {
                if data.len() != 8 {
                    return Err(PgError::protocol(format!(
                        "BASE_BACKUP progress message of {} bytes",
                        data.len()
                    )));
                }
                let n = data.get_i64();
                u64::try_from(n)
                    .map(BackupEvent::Progress)
                    .map_err(|_| PgError::protocol(format!("BASE_BACKUP progress {n}")))
            }
            b'm' => {
                if self.manifest_started {
                    return Err(PgError::protocol("BASE_BACKUP sent two manifests"));
                }
                self.manifest_started = true;
                Ok(BackupEvent::ManifestStart)
            }
            other => Err(PgError::protocol(format!(
                "unknown BASE_BACKUP message '{}'",
                other.escape_ascii()
            ))),
        }
    }

    /// 13/14: a CopyOutResponse begins the next tablespace's archive, or the manifest
    /// after the last one.
    fn legacy_copy_start(&mut self) -> Result<BackupEvent> {
        if let Some(ts) = self.tablespaces.get(self.archives) {
            self.archives += 1;
            return Ok(BackupEvent::Archive {
                name: match ts.oid {
                    Some(oid) => format!("{oid}.tar"),
                    None => "base.tar".to_owned(),
                },
                tablespace_path: ts.location.clone().unwrap_or_default(),
            });
        }
        if self.manifest_started {
            return Err(PgError::protocol(
                "BASE_BACKUP sent more archives than tablespaces",
            ));
        }
        self.manifest_started = true;
        Ok(BackupEvent::ManifestStart)
    }
}

/// 'n' body: archive name cstring, tablespace path cstring.
fn parse_new_archive(body: &[u8]) -> Result<(String, String)> {
    let bad = || PgError::protocol("malformed BASE_BACKUP new-archive message");
    let mut parts = body.split(|b| *b == 0);
    let name = parts.next().ok_or_else(bad)?;
    let path = parts.next().ok_or_else(bad)?;
    // Both strings NUL-terminated: "name\0path\0" splits into [name, path, ""].
    if parts.next() != Some(&[][..]) || parts.next().is_some() || name.is_empty() {
        return Err(bad());
    }
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| bad());
    Ok((text(name)?, text(path)?))
}

fn text(v: Option<&Option<Bytes>>) -> Option<String> {
    v.and_then(|v| v.as_ref())
        .map(|b| String::from_utf8_lossy(b).into_owned())
}

/// A (recptr text, tli int8) row: the start or end of the backup.
fn parse_position(row: &[Option<Bytes>], what: &str) -> Result<(Lsn, TimelineId)> {
    let lsn = text(row.first()).ok_or_else(|| PgError::protocol(format!("{what}: no LSN")))?;
    let lsn = lsn
        .parse::<Lsn>()
        .map_err(|_| PgError::protocol(format!("{what}: invalid LSN \"{lsn}\"")))?;
    let tli = text(row.get(1)).ok_or_else(|| PgError::protocol(format!("{what}: no timeline")))?;
    let tli = tli
        .parse::<u32>()
        .ok()
        .filter(|t| *t > 0)
        .map(TimelineId)
        .ok_or_else(|| PgError::protocol(format!("{what}: invalid timeline \"{tli}\"")))?;
    Ok((lsn, tli))
}

/// A (spcoid oid, spclocation text, size int8) row.
fn parse_tablespace(row: &[Option<Bytes>]) -> Result<TablespaceInfo> {
    if row.len() < 3 {
        return Err(PgError::protocol(format!(
            "BASE_BACKUP tablespace row has {} columns",
            row.len()
        )));
    }
    let oid = text(row.first())
        .map(|s| {
            s.parse::<u32>()
                .map_err(|_| PgError::protocol(format!("invalid tablespace oid \"{s}\"")))
        })
        .transpose()?;
    let size_kb = text(row.get(2))
        .map(|s| {
            s.parse::<i64>()
                .map_err(|_| PgError::protocol(format!("invalid tablespace size \"{s}\"")))
        })
        .transpose()?;
    Ok(TablespaceInfo {
        oid,
        location: text(row.get(1)),
        size_kb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modern_command() {
        let o = BaseBackupOptions {
            label: "it's".into(),
            ..Default::default()
        };
        assert_eq!(
            o.command(150_004).unwrap(),
            "BASE_BACKUP (LABEL 'it''s', CHECKPOINT 'fast', TABLESPACE_MAP, \
             MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C')"
        );
        let o = BaseBackupOptions {
            label: "x".into(),
            fast_checkpoint: false,
            wal: true,
            wait_for_archive: false,
            manifest: false,
            tablespace_map: false,
            max_rate_kb: Some(32),
            verify_checksums: false,
            estimate_size: true,
        };
        assert_eq!(
            o.command(170_000).unwrap(),
            "BASE_BACKUP (LABEL 'x', PROGRESS, CHECKPOINT 'spread', WAL, WAIT 0, \
             MAX_RATE 32, VERIFY_CHECKSUMS 0)"
        );
    }

    #[test]
    fn legacy_command() {
        let o = BaseBackupOptions {
            wal: true,
            wait_for_archive: false,
            verify_checksums: false,
            max_rate_kb: Some(1000),
            ..Default::default()
        };
        assert_eq!(
            o.command(140_010).unwrap(),
            "BASE_BACKUP LABEL 'walferry' FAST WAL NOWAIT MAX_RATE 1000 TABLESPACE_MAP \
             NOVERIFY_CHECKSUMS MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'"
        );
        assert!(o.command(120_000).is_err(), "no manifests before 13");
        let o = BaseBackupOptions {
            manifest: false,
            ..o
        };
        assert!(o.command(120_000).is_ok());
    }

    #[test]
    fn rejects_bad_options() {
        for rate in [0, 31, 1_048_577] {
            let o = BaseBackupOptions {
                max_rate_kb: Some(rate),
                ..Default::default()
            };
            assert!(o.command(150_000).is_err(), "{rate}");
        }
        let o = BaseBackupOptions {
            label: "a\0b".into(),
            ..Default::default()
        };
        assert!(o.command(150_000).is_err());
    }

    #[test]
    fn new_archive_message() {
        assert_eq!(
            parse_new_archive(b"16384.tar\0/srv/ts\0").unwrap(),
            ("16384.tar".to_owned(), "/srv/ts".to_owned())
        );
        assert_eq!(
            parse_new_archive(b"base.tar\0\0").unwrap(),
            ("base.tar".to_owned(), String::new())
        );
        for bad in [
            &b""[..],
            b"base.tar",
            b"base.tar\0",
            b"a\0b\0c\0",
            b"\0\0",
            b"a\0b",
        ] {
            assert!(parse_new_archive(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn result_rows() {
        let b = |s: &'static str| Some(Bytes::from_static(s.as_bytes()));
        assert_eq!(
            parse_position(&[b("0/6000028"), b("1")], "t").unwrap(),
            (Lsn(0x0600_0028), TimelineId(1))
        );
        assert!(parse_position(&[b("0/6000028"), b("0")], "t").is_err());
        assert!(parse_position(&[b("nope"), b("1")], "t").is_err());
        assert!(parse_position(&[None, b("1")], "t").is_err());
        assert_eq!(
            parse_tablespace(&[b("16384"), b("/srv/ts"), b("123")]).unwrap(),
            TablespaceInfo {
                oid: Some(16384),
                location: Some("/srv/ts".into()),
                size_kb: Some(123)
            }
        );
        assert_eq!(
            parse_tablespace(&[None, None, None]).unwrap(),
            TablespaceInfo {
                oid: None,
                location: None,
                size_kb: None
            }
        );
        assert!(parse_tablespace(&[None, None]).is_err());
        assert!(parse_tablespace(&[b("x"), None, None]).is_err());
    }
}
