//! Replication commands (simple query protocol) and the START_REPLICATION stream.

use std::time::SystemTime;

use bytes::Bytes;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use walferry_formats::{Lsn, SegmentSize, TimelineId};

use super::codec::{self, Backend, ServerCopyData};
use super::conn::{unexpected, ConnState, ReplicationConnection};
use super::error::{PgError, Result};

/// IDENTIFY_SYSTEM's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's system identifier (as in pg_controldata).
    pub system_id: u64,
    /// The server's current timeline.
    pub timeline: TimelineId,
    /// The server's current WAL flush position.
    pub xlogpos: Lsn,
    /// None for a physical walsender.
    pub dbname: Option<String>,
}

/// What CREATE_REPLICATION_SLOT did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateSlotOutcome {
    Created,
    /// A slot of that name existed already (it was left as it is).
    AlreadyExists,
}

/// READ_REPLICATION_SLOT's answer for an existing slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// `physical` or `logical`.
    pub slot_type: String,
    /// None when the slot reserves no WAL yet.
    pub restart_lsn: Option<Lsn>,
    pub restart_tli: Option<TimelineId>,
}

/// TIMELINE_HISTORY's answer: the history file of a timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineHistoryFile {
    /// e.g. `00000002.history`.
    pub filename: String,
    /// The raw file (lines `parentTLI\tswitchLSN\treason`).
    pub content: Bytes,
}

/// One event of a replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationEvent {
    /// WAL bytes `[start, end)`; `data` is contiguous from `start`.
    XLogData {
        start: Lsn,
        /// `start + data.len()`.
        end: Lsn,
        /// The server's WAL flush position when it sent this.
        wal_end: Lsn,
        send_time: SystemTime,
        data: Bytes,
    },
    /// A server keepalive. When `reply_requested`, the stream has already answered with the
    /// positions last passed to [`ReplicationStream::send_status`].
    Keepalive {
        wal_end: Lsn,
        send_time: SystemTime,
        reply_requested: bool,
    },
    /// The streamed timeline ended (the server was promoted or switched timelines):
    /// continue with `START_REPLICATION next_start TIMELINE next_tli` (pg_receivewal
    /// restarts at the start of the segment holding `next_start`). The connection is ready
    /// for commands again.
    EndOfTimeline {
        next_tli: TimelineId,
        next_start: Lsn,
    },
    /// The server shut down cleanly and closed the connection: reconnect later.
    ServerShutdown,
}

/// A replication slot name the server accepts: 1-63 of `[a-z0-9_]`.
pub fn validate_slot_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(PgError::config(format!(
            "invalid replication slot name \"{name}\": use 1-63 lower-case letters, digits and underscores"
        )))
    }
}

/// A size setting as SHOW prints it ("16MB", "8kB", "1GB", "512") in bytes.
/// PostgreSQL memory units are powers of 1024.
pub fn parse_size_setting(s: &str) -> Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| PgError::protocol(format!("invalid size setting \"{s}\"")))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        other => {
            return Err(PgError::protocol(format!(
                "unknown unit \"{other}\" in size setting \"{s}\""
            )))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| PgError::protocol(format!("size setting \"{s}\" overflows")))
}

fn text(v: &Option<Bytes>) -> Option<String> {
    v.as_ref().map(|b| String::from_utf8_lossy(b).into_owned())
}

fn column<'a>(row: &'a [Option<Bytes>], i: usize, what: &str) -> Result<&'a Option<Bytes>> {
    row.get(i)
        .ok_or_else(|| PgError::protocol(format!("{what}: missing column {i}")))
}

fn parse_lsn(v: &Option<Bytes>, what: &str) -> Result<Option<Lsn>> {
    text(v)
        .map(|s| {
            s.parse::<Lsn>()
                .map_err(|_| PgError::protocol(format!("{what}: invalid LSN \"{s}\"")))
        })
        .transpose()
}

fn parse_tli(v: &Option<Bytes>, what: &str) -> Result<Option<TimelineId>> {
    text(v)
        .map(|s| {
            s.parse::<u32>()
                .ok()
                .filter(|t| *t > 0)
                .map(TimelineId)
                .ok_or_else(|| PgError::protocol(format!("{what}: invalid timeline \"{s}\"")))
        })
        .transpose()
}

fn one_row(rows: Vec<Vec<Option<Bytes>>>, what: &str) -> Result<Vec<Option<Bytes>>> {
    let n = rows.len();
    let mut it = rows.into_iter();
    match (it.next(), n) {
        (Some(r), 1) => Ok(r),
        _ => Err(PgError::protocol(format!(
            "{what}: expected one row, got {n}"
        ))),
    }
}

impl ReplicationConnection {
    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity> {
        const W: &str = "IDENTIFY_SYSTEM";
        let row = one_row(self.simple_query(W).await?, W)?;
        let system_id = text(column(&row, 0, W)?)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| PgError::protocol("IDENTIFY_SYSTEM: invalid systemid"))?;
        let timeline = parse_tli(column(&row, 1, W)?, W)?
            .ok_or_else(|| PgError::protocol("IDENTIFY_SYSTEM: NULL timeline"))?;
        let xlogpos = parse_lsn(column(&row, 2, W)?, W)?
            .ok_or_else(|| PgError::protocol("IDENTIFY_SYSTEM: NULL xlogpos"))?;
        let dbname = text(column(&row, 3, W)?);
        Ok(SystemIdentity {
            system_id,
            timeline,
            xlogpos,
            dbname,
        })
    }

    /// `SHOW name` (the walsender allows SHOW of any setting).
    pub async fn show(&mut self, name: &str) -> Result<String> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            return Err(PgError::config(format!("invalid setting name \"{name}\"")));
        }
        let what = format!("SHOW {name}");
        let row = one_row(self.simple_query(&what).await?, &what)?;
        text(column(&row, 0, &what)?).ok_or_else(|| PgError::protocol(format!("{what}: NULL")))
    }

    /// `SHOW wal_segment_size`, parsed.
    pub async fn wal_segment_size(&mut self) -> Result<SegmentSize> {
        let bytes = parse_size_setting(&self.show("wal_segment_size").await?)?;
        SegmentSize::new(bytes)
            .map_err(|e| PgError::protocol(format!("wal_segment_size {bytes}: {e}")))
    }

    /// `CREATE_REPLICATION_SLOT name PHYSICAL RESERVE_WAL` (the form 13-17 all accept).
    /// The slot reserves WAL from the current redo point at once.
    pub async fn create_physical_slot(&mut self, name: &str) -> Result<CreateSlotOutcome> {
        validate_slot_name(name)?;
        let sql = format!("CREATE_REPLICATION_SLOT {name} PHYSICAL RESERVE_WAL");
        match self.simple_query(&sql).await {
            Ok(_) => Ok(CreateSlotOutcome::Created),
            // 42710 duplicate_object: replication slot "x" already exists
            Err(e) if e.sqlstate() == Some("42710") => Ok(CreateSlotOutcome::AlreadyExists),
            Err(e) => Err(e),
        }
    }

    /// `READ_REPLICATION_SLOT name` (PostgreSQL 15+). None if the slot does not exist.
    pub async fn read_replication_slot(&mut self, name: &str) -> Result<Option<SlotInfo>> {
        validate_slot_name(name)?;
        let what = format!("READ_REPLICATION_SLOT {name}");
        let row = one_row(self.simple_query(&what).await?, &what)?;
        let Some(slot_type) = text(column(&row, 0, &what)?) else {
            return Ok(None);
        };
        Ok(Some(SlotInfo {
            slot_type,
            restart_lsn: parse_lsn(column(&row, 1, &what)?, &what)?,
            restart_tli: parse_tli(column(&row, 2, &what)?, &what)?,
        }))
    }

    /// `DROP_REPLICATION_SLOT name` (fails with [`PgError::is_slot_missing`] if absent, and
    /// with SQLSTATE 55006 if a connection is using it).
    pub async fn drop_slot(&mut self, name: &str) -> Result<()> {
        validate_slot_name(name)?;
        self.simple_query(&format!("DROP_REPLICATION_SLOT {name}"))
            .await
            .map(|_| ())
    }

    /// `TIMELINE_HISTORY tli` (timeline 1 has no history file: the server answers with an
    /// error).
    pub async fn timeline_history(&mut self, tli: TimelineId) -> Result<TimelineHistoryFile> {
        let what = format!("TIMELINE_HISTORY {}", tli.0);
        let row = one_row(self.simple_query(&what).await?, &what)?;
        let filename = text(column(&row, 0, &what)?)
            .ok_or_else(|| PgError::protocol(format!("{what}: NULL filename")))?;
        let content = column(&row, 1, &what)?
            .clone()
            .ok_or_else(|| PgError::protocol(format!("{what}: NULL content")))?;
        Ok(TimelineHistoryFile { filename, content })
    }

    /// `START_REPLICATION [SLOT slot] PHYSICAL start TIMELINE timeline`.
    ///
    /// Errors the server raises before streaming (WAL removed, slot missing, start beyond
    /// the server's WAL, timeline not in its history) come back here and leave the
    /// connection usable. Starting exactly at the end of an old timeline streams nothing:
    /// the first event is [`ReplicationEvent::EndOfTimeline`].
    pub async fn start_replication(
        &mut self,
        slot: Option<&str>,
        start: Lsn,
        timeline: TimelineId,
    ) -> Result<ReplicationStream<'_>> {
        if let Some(s) = slot {
            validate_slot_name(s)?;
        }
        self.ensure_idle()?;
        let sql = match slot {
            Some(s) => format!(
                "START_REPLICATION SLOT {s} PHYSICAL {start} TIMELINE {}",
                timeline.0
            ),
            None => format!("START_REPLICATION PHYSICAL {start} TIMELINE {}", timeline.0),
        };
        self.state = ConnState::Busy;
        frontend::query(&sql, self.io.out()).map_err(|e| PgError::config(format!("{e}")))?;
        self.flush().await?;
        let mut next_timeline = None;
        let mut error = None;
        loop {
            match self.recv().await? {
                Backend::CopyBothResponse {
                    format,
                    column_formats,
                } if error.is_none() => {
                    tracing::trace!(format, columns = column_formats.len(), "CopyBothResponse");
                    self.state = ConnState::Streaming;
                    return Ok(ReplicationStream::new(self, start, Phase::Streaming, None));
                }
                Backend::Message(Message::RowDescription(_))
                | Backend::Message(Message::CommandComplete(_)) => {}
                Backend::Message(Message::DataRow(row)) => {
                    next_timeline = Some(parse_next_timeline(&codec::row_values(&row)?)?);
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
                    if let Some(e) = error {
                        return Err(e.into());
                    }
                    let Some((next_tli, next_start)) = next_timeline else {
                        return Err(PgError::protocol(
                            "START_REPLICATION finished without streaming or a next timeline",
                        ));
                    };
                    let ev = ReplicationEvent::EndOfTimeline {
                        next_tli,
                        next_start,
                    };
                    return Ok(ReplicationStream::new(self, start, Phase::Done, Some(ev)));
                }
                other => {
                    self.state = ConnState::Broken;
                    return Err(unexpected(&other, "START_REPLICATION"));
                }
            }
        }
    }
}

/// The (next_tli int8, next_tli_startpos text) row that ends a historic timeline.
fn parse_next_timeline(row: &[Option<Bytes>]) -> Result<(TimelineId, Lsn)> {
    const W: &str = "end-of-timeline row";
    let tli =
        parse_tli(column(row, 0, W)?, W)?.ok_or_else(|| PgError::protocol("NULL next_tli"))?;
    let lsn = parse_lsn(column(row, 1, W)?, W)?
        .ok_or_else(|| PgError::protocol("NULL next_tli_startpos"))?;
    Ok((tli, lsn))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// CopyBoth in progress.
    Streaming,
    /// The server left COPY (CopyDone or CommandComplete); we answered CopyDone; waiting
    /// for the next-timeline row and ReadyForQuery, or for the connection to close.
    Ending,
    /// Ended at the end of a timeline; the connection is idle again.
    Done,
    /// Ended by server shutdown or an error; the connection is gone.
    Closed,
}

/// The WAL stream of START_REPLICATION. Borrows the connection until it ends.
///
/// `next()` and `send_status()` are cancel-safe, so one task can drive both:
///
/// ```ignore
/// let mut tick = tokio::time::interval(Duration::from_secs(10));
/// loop {
///     tokio::select! {
///         ev = stream.next() => match ev? {
///             ReplicationEvent::XLogData { end, data, .. } => { buffer(data); received = end; }
///             ReplicationEvent::Keepalive { .. } => {}
///             ReplicationEvent::EndOfTimeline { .. } | ReplicationEvent::ServerShutdown => break,
///         },
///         _ = tick.tick() => stream.send_status(received, durable, Lsn::INVALID, false).await?,
///     }
/// }
/// ```
///
/// A keepalive that asks for a reply is answered inside `next()` with the positions of the
/// last `send_status` call (all zero before the first), so a slow consumer is not
/// disconnected by `wal_sender_timeout` and the slot never advances past what the caller
/// reported. A walsender shutting down waits until the reported flush (or, when flush is
/// 0/0, write) position reaches what it sent, up to `wal_sender_timeout`.
pub struct ReplicationStream<'c> {
    conn: &'c mut ReplicationConnection,
    phase: Phase,
    /// Returned by the next `next()` before anything is read.
    pending: Option<ReplicationEvent>,
    /// Last positions sent with send_status: (write, flush, apply).
    reported: (Lsn, Lsn, Lsn),
    /// End of the last XLogData received (the start position before any).
    received: Lsn,
    next_timeline: Option<(TimelineId, Lsn)>,
    /// A write failed (the walsender may have exited): what it sent before still gets
    /// read, so a clean shutdown is told apart from a broken connection.
    write_failed: Option<PgError>,
}

impl std::fmt::Debug for ReplicationStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("phase", &self.phase)
            .field("received", &self.received)
            .field("reported", &self.reported)
            .finish_non_exhaustive()
    }
}

impl<'c> ReplicationStream<'c> {
    fn new(
        conn: &'c mut ReplicationConnection,
        start: Lsn,
        phase: Phase,
        pending: Option<ReplicationEvent>,
    ) -> Self {
        ReplicationStream {
            conn,
            phase,
            pending,
            reported: (Lsn::INVALID, Lsn::INVALID, Lsn::INVALID),
            received: start,
            next_timeline: None,
            write_failed: None,
        }
    }

    /// End of the WAL received so far (the start position before any arrived).
    pub fn received_lsn(&self) -> Lsn {
        self.received
    }

    /// The next event. Cancel-safe. After `EndOfTimeline` the stream is over (further
    /// calls fail with a protocol error) and the connection takes commands again; after
    /// `ServerShutdown` or an error, further calls fail with [`PgError::Closed`].
    pub async fn next(&mut self) -> Result<ReplicationEvent> {
        loop {
            // Queued writes (a keepalive answer, our CopyDone, a cancelled send_status)
            // go out first; they stay queued if this future is dropped.
            let flushed = match self.write_failed {
                Some(_) => Ok(()),
                None => self.conn.flush().await,
            };
            if let Err(e) = flushed {
                let clean_end = self.phase == Phase::Ending && self.next_timeline.is_none();
                if clean_end && matches!(e, PgError::Closed | PgError::Io(_)) {
                    // Our CopyDone met a walsender that already exited after its shutdown.
                    self.phase = Phase::Closed;
                    return Ok(ReplicationEvent::ServerShutdown);
                }
                if !matches!(e, PgError::Closed | PgError::Io(_)) {
                    self.phase = Phase::Closed;
                    return Err(e);
                }
                self.write_failed = Some(e);
            }
            if let Some(ev) = self.pending.take() {
                return Ok(ev);
            }
            match self.phase {
                Phase::Streaming | Phase::Ending => {}
                Phase::Done => {
                    return Err(PgError::protocol(
                        "the replication stream ended at the end of its timeline",
                    ))
                }
                Phase::Closed => return Err(PgError::Closed),
            }
            let msg = match self.conn.recv().await {
                Ok(m) => m,
                Err(PgError::Closed)
                    if self.phase == Phase::Ending && self.next_timeline.is_none() =>
                {
                    // CopyDone/CommandComplete, then the walsender exited: clean shutdown.
                    self.phase = Phase::Closed;
                    return Ok(ReplicationEvent::ServerShutdown);
                }
                Err(e) => {
                    self.phase = Phase::Closed;
                    return Err(self.write_failed.take().unwrap_or(e));
                }
            };
            match (self.phase, msg) {
                (_, Backend::Message(Message::ErrorResponse(body))) => {
                    // A walsender exits after any error while streaming.
                    self.phase = Phase::Closed;
                    self.conn.state = ConnState::Broken;
                    return Err(codec::server_error(&body).into());
                }
                (Phase::Streaming, Backend::Message(Message::CopyData(body))) => {
                    match codec::parse_copy_data(body.into_bytes()) {
                        Ok(ServerCopyData::XLogData {
                            start,
                            wal_end,
                            send_time,
                            data,
                        }) => {
                            // parse_copy_data checked that this does not overflow.
                            let end = Lsn(start.0 + data.len() as u64);
                            self.received = self.received.max(end);
                            return Ok(ReplicationEvent::XLogData {
                                start,
                                end,
                                wal_end,
                                send_time: codec::pg_timestamp_to_system_time(send_time),
                                data,
                            });
                        }
                        Ok(ServerCopyData::Keepalive {
                            wal_end,
                            send_time,
                            reply_requested,
                        }) => {
                            if reply_requested {
                                self.queue_status(false);
                            }
                            self.pending = Some(ReplicationEvent::Keepalive {
                                wal_end,
                                send_time: codec::pg_timestamp_to_system_time(send_time),
                                reply_requested,
                            });
                        }
                        Err(e) => {
                            self.phase = Phase::Closed;
                            self.conn.state = ConnState::Broken;
                            return Err(e);
                        }
                    }
                }
                (Phase::Streaming, Backend::Message(Message::CopyDone)) => {
                    // End of timeline (or shutdown): answer CopyDone, then expect the
                    // next-timeline row and ReadyForQuery (or the connection closing).
                    frontend::copy_done(self.conn.io.out());
                    self.phase = Phase::Ending;
                }
                (Phase::Streaming, Backend::Message(Message::CommandComplete(_))) => {
                    // Shutdown without CopyDone (COPY 0, then the walsender exits).
                    self.phase = Phase::Ending;
                }
                (Phase::Ending, Backend::Message(Message::CopyData(_))) => {}
                (Phase::Ending, Backend::Message(Message::RowDescription(_)))
                | (Phase::Ending, Backend::Message(Message::CommandComplete(_))) => {}
                (Phase::Ending, Backend::Message(Message::DataRow(row))) => {
                    let parsed = codec::row_values(&row).and_then(|r| parse_next_timeline(&r));
                    match parsed {
                        Ok(t) => self.next_timeline = Some(t),
                        Err(e) => {
                            self.phase = Phase::Closed;
                            self.conn.state = ConnState::Broken;
                            return Err(e);
                        }
                    }
                }
                (Phase::Ending, Backend::Message(Message::ReadyForQuery(_))) => {
                    self.conn.state = ConnState::Idle;
                    self.phase = Phase::Done;
                    return match self.next_timeline.take() {
                        Some((next_tli, next_start)) => Ok(ReplicationEvent::EndOfTimeline {
                            next_tli,
                            next_start,
                        }),
                        None => Err(PgError::protocol(
                            "the server ended streaming without naming a next timeline",
                        )),
                    };
                }
                (_, other) => {
                    self.phase = Phase::Closed;
                    self.conn.state = ConnState::Broken;
                    return Err(unexpected(&other, "replication streaming"));
                }
            }
        }
    }

    /// Send a standby status update ('r'): `write`, `flush` and `apply` are each the
    /// position after the last byte. A physical slot's restart_lsn follows `flush`, so report there only what is
    /// durably stored; `Lsn::INVALID` (0/0) means "not reported". Cancel-safe: a dropped
    /// call leaves the message queued and the next `next()`/`send_status()` sends it.
    /// After the server left streaming this is a no-op.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<()> {
        if self.phase != Phase::Streaming {
            return Ok(());
        }
        if self.write_failed.is_some() {
            return Err(PgError::Closed);
        }
        self.reported = (write, flush, apply);
        self.queue_status(reply_requested);
        match self.conn.flush().await {
            Ok(()) => Ok(()),
            // The socket may still hold the server's last words (a clean shutdown's
            // CopyDone): next() reads them before it reports the failure.
            Err(e @ (PgError::Closed | PgError::Io(_))) => {
                let msg = e.to_string();
                self.write_failed = Some(e);
                Err(PgError::Io(std::io::Error::other(msg)))
            }
            Err(e) => {
                self.phase = Phase::Closed;
                Err(e)
            }
        }
    }

    fn queue_status(&mut self, reply_requested: bool) {
        let (w, f, a) = self.reported;
        codec::encode_status(
            w,
            f,
            a,
            codec::system_time_to_pg_timestamp(SystemTime::now()),
            reply_requested,
            self.conn.io.out(),
        );
    }

    /// Leave streaming from our side (CopyDone), drain to ReadyForQuery, and give the
    /// connection back for commands. If the server ended the timeline at the same moment,
    /// its next timeline is returned.
    pub async fn stop(mut self) -> Result<Option<(TimelineId, Lsn)>> {
        match self.phase {
            Phase::Done => {
                return Ok(match self.pending.take() {
                    Some(ReplicationEvent::EndOfTimeline {
                        next_tli,
                        next_start,
                    }) => Some((next_tli, next_start)),
                    _ => None,
                })
            }
            Phase::Closed => return Err(PgError::Closed),
            Phase::Streaming => {
                frontend::copy_done(self.conn.io.out());
                self.phase = Phase::Ending;
            }
            Phase::Ending => {}
        }
        self.conn.flush().await?;
        loop {
            match self.conn.recv().await? {
                Backend::Message(Message::CopyData(_))
                | Backend::Message(Message::CopyDone)
                | Backend::Message(Message::RowDescription(_))
                | Backend::Message(Message::CommandComplete(_)) => {}
                Backend::Message(Message::DataRow(row)) => {
                    self.next_timeline = Some(parse_next_timeline(&codec::row_values(&row)?)?);
                }
                Backend::Message(Message::ReadyForQuery(_)) => {
                    self.conn.state = ConnState::Idle;
                    self.phase = Phase::Done;
                    return Ok(self.next_timeline.take());
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    self.conn.state = ConnState::Broken;
                    return Err(codec::server_error(&body).into());
                }
                other => {
                    self.conn.state = ConnState::Broken;
                    return Err(unexpected(&other, "stopping replication"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_settings() {
        assert_eq!(parse_size_setting("16MB").unwrap(), 16 << 20);
        assert_eq!(parse_size_setting("1GB").unwrap(), 1 << 30);
        assert_eq!(parse_size_setting("8kB").unwrap(), 8192);
        assert_eq!(parse_size_setting("512").unwrap(), 512);
        assert_eq!(parse_size_setting(" 64 MB ").unwrap(), 64 << 20);
        assert!(parse_size_setting("MB").is_err());
        assert!(parse_size_setting("16XB").is_err());
        assert!(parse_size_setting("99999999999TB").is_err());
    }

    #[test]
    fn slot_names() {
        assert!(validate_slot_name("walferry_1").is_ok());
        for bad in ["", "Upper", "with space", "x;DROP", &"a".repeat(64)] {
            assert!(validate_slot_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn next_timeline_row() {
        let row = vec![
            Some(Bytes::from_static(b"2")),
            Some(Bytes::from_static(b"0/A002080")),
        ];
        assert_eq!(
            parse_next_timeline(&row).unwrap(),
            (TimelineId(2), Lsn(0x0A00_2080))
        );
        assert!(parse_next_timeline(&[None, None]).is_err());
        assert!(parse_next_timeline(&[Some(Bytes::from_static(b"0"))]).is_err());
    }
}
