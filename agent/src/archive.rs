//! The WAL archiver: turns a contiguous byte stream into parts and sealed segments,
//! and keeps the durable watermark.
//!
//! Bytes of the current segment are kept in memory from offset 0. Unflushed bytes become
//! a *part* when the oldest of them has waited the RPO, or when enough have piled up; a
//! completed segment is sealed as one object instead. Uploads run concurrently, but
//! [`Archiver::next_durable`] yields them in order, so the durable LSN only moves over
//! bytes that are stored and over every byte before them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};
use walferry_formats::envelope::Kind;
use walferry_formats::layout::{
    part_index_key, part_key, parts_prefix, segment_index_key, segment_key,
};
use walferry_formats::walreader::{WalScanner, WalSummary};
use walferry_formats::{Error, Lsn, SegmentNo, SegmentSize, TimelineId, Units};

use crate::metrics::Metrics;

/// Tuning for the archiver.
#[derive(Clone, Debug)]
pub struct ArchiverConfig {
    /// A byte waits at most this long before it is uploaded.
    pub rpo: Duration,
    /// A part is cut early once this many bytes are unflushed.
    pub max_part: u64,
    /// At most this many uploads in flight; beyond it the caller must wait.
    pub max_in_flight: usize,
    /// Log an error once the repository has refused writes for this long.
    pub outage_alarm: Duration,
    /// Where upload counts and the durable position are published.
    pub metrics: Arc<Metrics>,
}

impl Default for ArchiverConfig {
    fn default() -> Self {
        ArchiverConfig {
            rpo: Duration::from_secs(1),
            max_part: 8 << 20,
            max_in_flight: 8,
            outage_alarm: Duration::from_secs(60),
            metrics: Arc::new(Metrics::default()),
        }
    }
}

/// One unit to store, with its commit-time index entry.
struct Upload {
    key: String,
    kind: Kind,
    bytes: Bytes,
    index_key: String,
    index: Bytes,
    done: Done,
}

/// What one finished upload made durable.
#[derive(Debug)]
struct Done {
    end: Lsn,
    sealed: Option<SegmentNo>,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("WAL arrived at {got}, but the archiver expected {expected}: refusing to leave a gap or write twice")]
    NotContiguous { expected: Lsn, got: Lsn },
    #[error("store WAL")]
    Store(#[from] Error),
    #[error("an upload task failed: {0}")]
    Task(String),
    #[error("an earlier WAL upload failed for good ({0}); nothing after it can count as stored")]
    Failed(String),
}

pub struct Archiver {
    units: Units,
    size: SegmentSize,
    tli: TimelineId,
    cfg: ArchiverConfig,
    seg: SegmentNo,
    buf: BytesMut,
    part_from: u64,
    part_since: Option<Instant>,
    scanner: WalScanner,
    /// Records that ended since the last part was cut, and since the segment began.
    part_summary: WalSummary,
    segment_summary: WalSummary,
    in_flight: FuturesOrdered<JoinHandle<Result<Done, Error>>>,
    cleanups: VecDeque<JoinHandle<()>>,
    received: Lsn,
    durable: Lsn,
    /// Set once an upload failed for good. Its bytes are not stored, so no later upload may
    /// move the durable LSN (that would report a gap as stored).
    failed: Option<String>,
}

impl Archiver {
    /// Starts at `start` on `tli`. `prefix` holds the bytes of `start`'s segment before
    /// `start` (already durable as parts), so the segment can be sealed later.
    pub fn new(
        units: Units,
        size: SegmentSize,
        tli: TimelineId,
        start: Lsn,
        prefix: Bytes,
        cfg: ArchiverConfig,
    ) -> Self {
        let offset = start.segment_offset(size);
        debug_assert_eq!(prefix.len() as u64, offset);
        let mut buf = BytesMut::with_capacity(size.bytes() as usize);
        buf.extend_from_slice(&prefix);
        // The scanner starts at the segment start so records crossing into `start` are seen whole.
        let seg_start = start.segment(size).start_lsn(size).unwrap_or(start);
        let mut scanner = WalScanner::new(seg_start, size);
        scanner.feed(&prefix);
        let mut archiver = Archiver {
            units,
            size,
            tli,
            cfg,
            seg: start.segment(size),
            buf,
            part_from: offset,
            part_since: None,
            scanner,
            part_summary: WalSummary::default(),
            segment_summary: WalSummary::default(),
            in_flight: FuturesOrdered::new(),
            cleanups: VecDeque::new(),
            received: start,
            durable: start,
            failed: None,
        };
        // Records that ended inside the prefix were indexed with earlier parts, but belong
        // in the sealed segment's index too.
        archiver.drain_scanner();
        archiver.part_summary = WalSummary::default();
        archiver
    }

    pub fn timeline(&self) -> TimelineId {
        self.tli
    }

    /// End of the bytes received so far.
    pub fn received(&self) -> Lsn {
        self.received
    }

    /// End of the bytes durable in the repository, with every byte before them.
    pub fn durable(&self) -> Lsn {
        self.durable
    }

    pub fn has_capacity(&self) -> bool {
        self.in_flight.len() < self.cfg.max_in_flight
    }

    pub fn has_pending(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// When the oldest unflushed byte reaches its RPO deadline.
    pub fn flush_deadline(&self) -> Option<Instant> {
        self.part_since.map(|t| t + self.cfg.rpo)
    }

    /// Takes WAL bytes that start at `start`, which must be where the last ones ended.
    pub fn push(&mut self, start: Lsn, mut data: &[u8]) -> Result<(), ArchiveError> {
        if start != self.received {
            return Err(ArchiveError::NotContiguous {
                expected: self.received,
                got: start,
            });
        }
        while !data.is_empty() {
            let room = (self.size.bytes() - self.buf.len() as u64) as usize;
            let (now, rest) = data.split_at(room.min(data.len()));
            self.buf.extend_from_slice(now);
            self.scanner.feed(now);
            self.drain_scanner();
            self.received = Lsn(self.received.0 + now.len() as u64);
            self.part_since.get_or_insert_with(Instant::now);
            data = rest;
            if self.buf.len() as u64 == self.size.bytes() {
                self.seal_segment();
            } else if self.buf.len() as u64 - self.part_from >= self.cfg.max_part {
                self.flush_part();
            }
        }
        Ok(())
    }

    fn drain_scanner(&mut self) {
        loop {
            match self.scanner.poll() {
                Ok(Some(r)) => {
                    self.part_summary.add(&r);
                    self.segment_summary.add(&r);
                }
                Ok(None) => break,
                Err(e) => {
                    // The index is an aid for planning; WAL is archived byte for byte regardless.
                    debug!("WAL scanner stopped: {e}");
                    break;
                }
            }
        }
    }

    /// Uploads the unflushed bytes as a part now.
    pub fn flush_part(&mut self) {
        let to = self.buf.len() as u64;
        let from = self.part_from;
        if from >= to {
            self.part_since = None;
            return;
        }
        let bytes = Bytes::copy_from_slice(&self.buf[from as usize..]);
        let (tli, seg, size) = (self.tli, self.seg, self.size);
        let key = part_key(tli, seg, size, from, to);
        let index_key = part_index_key(tli, seg, size, from, to);
        let index = index_bytes(std::mem::take(&mut self.part_summary));
        let end = Lsn(self.segment_start() + to);
        debug!(%key, bytes = to - from, "flush part");
        self.spawn_upload(Upload {
            key,
            kind: Kind::WalPart,
            bytes,
            index_key,
            index,
            done: Done { end, sealed: None },
        });
        self.part_from = to;
        self.part_since = None;
    }

    fn seal_segment(&mut self) {
        let bytes = self.buf.split().freeze();
        let (tli, seg, size) = (self.tli, self.seg, self.size);
        let key = segment_key(tli, seg, size);
        let index_key = segment_index_key(tli, seg, size);
        self.part_summary = WalSummary::default();
        let index = index_bytes(std::mem::take(&mut self.segment_summary));
        let end = Lsn(self.segment_start() + size.bytes());
        debug!(%key, "seal segment");
        self.spawn_upload(Upload {
            key,
            kind: Kind::WalSegment,
            bytes,
            index_key,
            index,
            done: Done {
                end,
                sealed: Some(seg),
            },
        });
        self.seg = SegmentNo(seg.0 + 1);
        self.part_from = 0;
        self.part_since = None;
        self.buf.reserve(size.bytes() as usize);
    }

    fn segment_start(&self) -> u64 {
        self.seg.0 * self.size.bytes()
    }

    /// Stores a unit and its index entry, retrying until it succeeds or fails
    /// permanently; a store outage only delays it.
    fn spawn_upload(&mut self, up: Upload) {
        let units = self.units.clone();
        let alarm = self.cfg.outage_alarm;
        let metrics = self.cfg.metrics.clone();
        self.in_flight.push_back(tokio::spawn(async move {
            let began = Instant::now();
            let mut alarmed = false;
            let mut wait = Duration::from_millis(200);
            loop {
                let r = async {
                    units.put(&up.key, up.kind, up.bytes.clone()).await?;
                    units.put(&up.index_key, Kind::WalIndex, up.index.clone()).await
                };
                match r.await {
                    Ok(_) => {
                        metrics.upload_ok(up.bytes.len() as u64);
                        if alarmed {
                            info!("repository writes recovered after {:?}", began.elapsed());
                        }
                        return Ok(up.done);
                    }
                    Err(e) if e.is_transient() => {
                        metrics.upload_failed();
                        if !alarmed && began.elapsed() >= alarm {
                            error!(
                                "repository has refused writes for {:?}; WAL is held in memory and the slot keeps it on the server: {e}",
                                began.elapsed()
                            );
                            alarmed = true;
                        } else {
                            warn!("store {} failed, retrying in {wait:?}: {e}", up.key);
                        }
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(10));
                    }
                    Err(e) => return Err(e),
                }
            }
        }));
    }

    /// Waits for the oldest upload; returns the new durable LSN. Call only when [`has_pending`](Self::has_pending).
    /// After an upload failed for good, every call fails: the durable LSN stays before it.
    pub async fn next_durable(&mut self) -> Result<Lsn, ArchiveError> {
        if let Some(why) = &self.failed {
            return Err(ArchiveError::Failed(why.clone()));
        }
        let Some(joined) = self.in_flight.next().await else {
            return Ok(self.durable);
        };
        let done = match joined
            .map_err(|e| ArchiveError::Task(e.to_string()))
            .and_then(|r| r.map_err(ArchiveError::Store))
        {
            Ok(done) => done,
            Err(e) => {
                self.failed = Some(e.to_string());
                return Err(e);
            }
        };
        self.durable = self.durable.max(done.end);
        self.cfg.metrics.set_durable(self.durable);
        if let Some(seg) = done.sealed {
            // Every earlier upload has landed (ordered), so no part of this segment is still in flight.
            self.spawn_cleanup(seg);
        }
        Ok(self.durable)
    }

    fn spawn_cleanup(&mut self, seg: SegmentNo) {
        while self.cleanups.front().is_some_and(|h| h.is_finished()) {
            self.cleanups.pop_front();
        }
        let units = self.units.clone();
        let (tli, size) = (self.tli, self.size);
        self.cleanups.push_back(tokio::spawn(async move {
            if let Err(e) = remove_parts(&units, tli, seg, size).await {
                warn!("remove parts of a sealed segment (they are harmless, retention removes them later): {e}");
            }
        }));
    }

    /// Flushes what is buffered and waits until all of it is durable.
    pub async fn drain(&mut self) -> Result<Lsn, ArchiveError> {
        self.flush_part();
        while self.has_pending() {
            self.next_durable().await?;
        }
        while let Some(h) = self.cleanups.pop_front() {
            let _ = h.await;
        }
        Ok(self.durable)
    }
}

fn index_bytes(summary: WalSummary) -> Bytes {
    Bytes::from(serde_json::to_vec(&summary).unwrap_or_default())
}

/// Deletes the parts (and their index entries) of a segment that is sealed.
pub async fn remove_parts(
    units: &Units,
    tli: TimelineId,
    seg: SegmentNo,
    size: SegmentSize,
) -> Result<(), Error> {
    let repo = units.repo();
    let data = parts_prefix(tli, seg, size);
    let index = data.replacen("wal/", "wal/index/", 1);
    for prefix in [data, index] {
        for obj in repo.list(&prefix).await? {
            repo.delete(&obj.key).await?;
        }
    }
    Ok(())
}
