//! `run`'s WAL streamer: replication connection -> archiver, with reconnects, timeline
//! following and a clean drain on shutdown.

use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};
use walferry_formats::envelope::Kind;
use walferry_formats::layout::history_key;
use walferry_formats::walcatalog::{fetch_parts, WalCatalog};
use walferry_formats::{Lsn, SegmentSize, TimelineId, Units};

use crate::archive::{ArchiveError, Archiver, ArchiverConfig};
use crate::cluster;
use crate::pg::{ConnInfo, CreateSlotOutcome, PgError, ReplicationConnection, ReplicationEvent};

#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub conninfo: ConnInfo,
    pub slot: String,
    pub archiver: ArchiverConfig,
    /// Standby status updates go out at least this often (and whenever the durable LSN moves).
    pub status_interval: Duration,
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
}

/// How one connection ended.
enum SessionEnd {
    Shutdown,
    Reconnect,
}

/// A failure that no reconnect can fix.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
struct Permanent(anyhow::Error);

/// Streams until `shutdown` fires; then drains what it holds and returns the final durable LSN.
pub async fn run(
    units: Units,
    cfg: StreamConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<Lsn>> {
    let mut archiver: Option<Archiver> = None;
    let mut backoff = Duration::from_millis(500);
    loop {
        let r = session(&units, &cfg, &mut archiver, &shutdown).await;
        match r {
            Ok(SessionEnd::Shutdown) => break,
            Ok(SessionEnd::Reconnect) => {
                info!("server closed the replication connection; reconnecting");
                backoff = Duration::from_millis(500);
            }
            Err(e) => {
                if let Some(p) = e.downcast_ref::<Permanent>() {
                    return Err(anyhow!("{p}"));
                }
                warn!("replication stopped, reconnecting in {backoff:?}: {e:#}");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(cfg.max_backoff);
    }
    // Not connected: store what is held; the slot already keeps everything not reported.
    match archiver.as_mut() {
        Some(a) => Ok(Some(a.drain().await.context("store buffered WAL")?)),
        None => Ok(None),
    }
}

fn permanent(e: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(Permanent(e.into()))
}

fn classify(e: PgError) -> anyhow::Error {
    if e.is_transient() {
        anyhow::Error::new(e)
    } else {
        permanent(e)
    }
}

async fn session(
    units: &Units,
    cfg: &StreamConfig,
    archiver: &mut Option<Archiver>,
    shutdown: &CancellationToken,
) -> anyhow::Result<SessionEnd> {
    let mut conn = ReplicationConnection::connect(&cfg.conninfo)
        .await
        .map_err(classify)?;
    let ident = conn.identify_system().await.map_err(classify)?;
    let size = conn.wal_segment_size().await.map_err(classify)?;
    cluster::bind(
        units.repo(),
        ident.system_id,
        size,
        conn.server_version_num(),
    )
    .await
    .map_err(|e| match e {
        cluster::BindError::OtherCluster { .. } => permanent(e),
        e => anyhow::Error::new(e),
    })?;
    let slot = match conn
        .read_replication_slot(&cfg.slot)
        .await
        .map_err(classify)?
    {
        Some(s) => s,
        None => {
            if conn
                .create_physical_slot(&cfg.slot)
                .await
                .map_err(classify)?
                == CreateSlotOutcome::Created
            {
                info!(slot = %cfg.slot, "created physical replication slot");
            }
            conn.read_replication_slot(&cfg.slot)
                .await
                .map_err(classify)?
                .ok_or_else(|| {
                    anyhow!(
                        "replication slot {} vanished right after it was created",
                        cfg.slot
                    )
                })?
        }
    };

    if archiver.is_none() {
        let (tli, start) = resume_point(units, size, &ident, &slot).await?;
        let prefix = match start.segment_offset(size) {
            0 => Bytes::new(),
            off => {
                let (bytes, covered) = fetch_parts(units, tli, start.segment(size), size)
                    .await
                    .context("read the stored start of the current segment")?
                    .ok_or_else(|| anyhow!("the stored parts of the current segment vanished"))?;
                anyhow::ensure!(
                    covered >= off,
                    "the stored parts of the current segment shrank"
                );
                bytes.slice(..off as usize)
            }
        };
        info!(timeline = %tli, %start, "start streaming");
        *archiver = Some(Archiver::new(
            units.clone(),
            size,
            tli,
            start,
            prefix,
            cfg.archiver.clone(),
        ));
    }
    let Some(a) = archiver.as_mut() else {
        unreachable!("archiver set above");
    };

    loop {
        let (tli, start) = (a.timeline(), a.received());
        let span = info_span!("timeline", tli = tli.0);
        match stream_timeline(&mut conn, a, cfg, shutdown)
            .instrument(span)
            .await?
        {
            TimelineEnd::Shutdown => {
                conn.close().await;
                return Ok(SessionEnd::Shutdown);
            }
            TimelineEnd::ServerGone => return Ok(SessionEnd::Reconnect),
            TimelineEnd::Next {
                next_tli,
                next_start,
            } => {
                let durable = a
                    .drain()
                    .await
                    .map_err(permanent)
                    .context("store the end of the old timeline")?;
                info!(old = %tli, new = %next_tli, switch = %next_start, %durable, from = %start, "timeline switch");
                let history = conn.timeline_history(next_tli).await.map_err(classify)?;
                units
                    .put(&history_key(next_tli), Kind::WalHistory, history.content)
                    .await
                    .with_context(|| format!("store {}", history.filename))?;
                // Like pg_receivewal: the new timeline's first segment is streamed whole,
                // including the old timeline's bytes that Postgres copied into it.
                let seg_start = next_start
                    .segment(size)
                    .start_lsn(size)
                    .ok_or_else(|| anyhow!("segment start of {next_start} overflows"))?;
                *a = Archiver::new(
                    units.clone(),
                    size,
                    next_tli,
                    seg_start,
                    Bytes::new(),
                    cfg.archiver.clone(),
                );
            }
        }
    }
}

/// Where to start: where the repository's WAL ends, or for a new repository the slot's
/// (or server's) position rounded down to a segment start.
async fn resume_point(
    units: &Units,
    size: SegmentSize,
    ident: &crate::pg::SystemIdentity,
    slot: &crate::pg::SlotInfo,
) -> anyhow::Result<(TimelineId, Lsn)> {
    let catalog = WalCatalog::load(units.repo(), size)
        .await
        .context("list stored WAL")?;
    let stored = catalog
        .timelines
        .iter()
        .rev()
        .find_map(|(tli, wal)| wal.end(size).map(|end| (*tli, end)));
    if let Some((tli, end)) = stored {
        if let Some(restart) = slot.restart_lsn.filter(|r| *r > end) {
            return Err(permanent(anyhow!(
                "the repository's WAL ends at {end} (timeline {tli}), but replication slot's restart_lsn is {restart}: \
                 the server may already have removed the WAL in between, leaving a gap. Drop the slot and take a new base backup, \
                 or use a new repository"
            )));
        }
        // The slot holds everything not yet reported durable. If it is behind the stored
        // end (a kill -9 before the last status update, or an upload that failed for good
        // while later ones landed), stream again from its segment: re-stored objects are
        // recognised as identical, and no hole can hide behind a newer sealed segment.
        let same_tli = slot.restart_tli.is_none_or(|t| t == tli);
        if let Some(restart) = slot.restart_lsn.filter(|r| *r < end && same_tli) {
            let from = restart
                .segment(size)
                .start_lsn(size)
                .ok_or_else(|| anyhow!("segment start of {restart} overflows"))?;
            return Ok((tli, from));
        }
        return Ok((tli, end));
    }
    let (lsn, tli) = match (slot.restart_lsn, slot.restart_tli) {
        (Some(l), Some(t)) => (l, t),
        (Some(l), None) => (l, ident.timeline),
        _ => (ident.xlogpos, ident.timeline),
    };
    let start = lsn
        .segment(size)
        .start_lsn(size)
        .ok_or_else(|| anyhow!("segment start of {lsn} overflows"))?;
    Ok((tli, start))
}

/// Clears the streaming flag when a stream ends, however it ends.
struct NotStreaming<'a>(&'a crate::metrics::Metrics);

impl Drop for NotStreaming<'_> {
    fn drop(&mut self) {
        self.0
            .streaming
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

enum TimelineEnd {
    Shutdown,
    ServerGone,
    Next {
        next_tli: TimelineId,
        next_start: Lsn,
    },
}

async fn stream_timeline(
    conn: &mut ReplicationConnection,
    a: &mut Archiver,
    cfg: &StreamConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<TimelineEnd> {
    let metrics = cfg.archiver.metrics.clone();
    let mut stream = conn
        .start_replication(Some(&cfg.slot), a.received(), a.timeline())
        .await
        .map_err(|e| {
            if e.server_error().is_some_and(|s| s.message.contains("ahead of the WAL flush position")) {
                // A standby that restarted has not replayed up to us yet: wait for it.
                anyhow::Error::new(e)
            } else if e.is_wal_removed() {
                permanent(anyhow!(
                    "{e}: WAL the repository still needs is gone from the server. Take a new base backup; \
                     the repository has a gap before it"
                ))
            } else {
                classify(e)
            }
        })?;
    metrics
        .streaming
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let _not_streaming = NotStreaming(&metrics);
    let mut ticker = tokio::time::interval(cfg.status_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    loop {
        let deadline = a.flush_deadline().map(tokio::time::Instant::from_std);
        let mut report = false;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let durable = a.drain().await.map_err(permanent).context("store buffered WAL before exiting")?;
                stream.send_status(a.received(), durable, Lsn::INVALID, false).await.ok();
                let _ = stream.stop().await;
                info!(%durable, "stopped streaming; everything received is stored");
                return Ok(TimelineEnd::Shutdown);
            }
            // Transient store errors are retried inside the upload; what comes out is final.
            done = a.next_durable(), if a.has_pending() => {
                done.map_err(permanent)?;
                report = true;
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => a.flush_part(),
            _ = ticker.tick() => report = true,
            ev = stream.next(), if a.has_capacity() => match ev.map_err(classify)? {
                ReplicationEvent::XLogData { start, data, wal_end, .. } => {
                    metrics.set_server_lsn(wal_end);
                    a.push(start, &data).map_err(|e| match e {
                        ArchiveError::NotContiguous { .. } => permanent(e),
                        e => anyhow::Error::new(e),
                    })?;
                }
                ReplicationEvent::Keepalive { reply_requested, wal_end, .. } => {
                    metrics.set_server_lsn(wal_end);
                    report = reply_requested;
                }
                ReplicationEvent::EndOfTimeline { next_tli, next_start } => {
                    return Ok(TimelineEnd::Next { next_tli, next_start });
                }
                ReplicationEvent::ServerShutdown => return Ok(TimelineEnd::ServerGone),
            },
        }
        metrics.set_received(a.received());
        if report {
            stream
                .send_status(a.received(), a.durable(), Lsn::INVALID, false)
                .await
                .map_err(classify)?;
        }
    }
}
