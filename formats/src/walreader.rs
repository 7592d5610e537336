//! A sans-IO scanner of PostgreSQL WAL: feed it bytes, poll records out.
//!
//! [`WalScanner`] reads the page and record framing of WAL written by PostgreSQL 13 to 18
//! and yields one [`Record`] per WAL record: where it starts and ends, its xid, resource
//! manager and info bits, and decoded facts for the records walferry cares about —
//! transaction commit/abort (with `xact_time`), restore points, and `XLOG_SWITCH`.
//! [`WalSummary`] folds records into a commit-time index entry.
//!
//! It is not a redo decoder: block references are parsed only as far as needed to find
//! the main data of the records above, and other records are passed through as
//! [`RecordKind::Other`].
//!
//! ```text
//! page   = header (24 bytes, or 40 on a segment's first page) + record bytes
//! header = xlp_magic u16 | xlp_info u16 | xlp_tli u32 | xlp_pageaddr u64 | xlp_rem_len u32 | pad
//!          [+ xlp_sysid u64 | xlp_seg_size u32 | xlp_xlog_blcksz u32]
//! record = xl_tot_len u32 | xl_xid u32 | xl_prev u64 | xl_info u8 | xl_rmid u8 | pad 2
//!          | xl_crc u32 | block headers | main-data header | block data | main data
//! ```
//! Records start on 8-byte boundaries and may cross pages and segments (header included);
//! every page a record continues onto says so (`XLP_FIRST_IS_CONTRECORD`) and how many
//! record bytes remain (`xlp_rem_len`). Integers are little-endian, as written by every
//! platform PostgreSQL runs on in practice (WAL is in the server's native byte order).
//!
//! The scanner stops at the end of valid WAL, as recovery does: a zero record length,
//! a page that is not where it claims to be (recycled segments hold stale data), a broken
//! `xl_prev` chain, a CRC-32C mismatch. Then [`WalScanner::poll`] returns
//! [`Error::WalEnd`] (see [`Error::is_end_of_wal`]), and keeps returning it.
//!
//! Memory: the scanner holds the bytes fed but not yet consumed, plus the current record
//! (records up to 1 GiB are legal; the buffer grows only as their bytes arrive).

use std::fmt;

use bytes::{Buf, BytesMut};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lsn::{Lsn, SegmentSize, TimelineId};

/// WAL page size (`XLOG_BLCKSZ`). Builds with another page size are not supported.
pub const XLOG_BLCKSZ: u64 = 8192;
/// Size of a page header on every page but a segment's first.
pub const SHORT_PAGE_HEADER_LEN: usize = 24;
/// Size of the page header on a segment's first page.
pub const LONG_PAGE_HEADER_LEN: usize = 40;
/// Size of a record header (`SizeOfXLogRecord`).
pub const RECORD_HEADER_LEN: usize = 24;
/// Largest record length accepted. PostgreSQL 15+ caps records at 1020 MiB
/// (`XLogRecordMaxSize`); older versions at 1 GiB - 1 (`MaxAllocSize`).
pub const MAX_RECORD_LEN: u32 = 0x3FFF_FFFF;

/// Resource manager ids this module decodes.
pub const RM_XLOG_ID: u8 = 0;
pub const RM_XACT_ID: u8 = 1;

const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;
/// In PG 13-18 (PostgreSQL 19 moves it to 0x0004).
const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
const XLP_ALL_FLAGS: u16 = 0x000F;

const XLR_INFO_MASK: u8 = 0x0F;
const XLOG_SWITCH: u8 = 0x40;
const XLOG_RESTORE_POINT: u8 = 0x70;
const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_HAS_INFO: u8 = 0x80;

const XLR_MAX_BLOCK_ID: u8 = 32;
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_HAS_DATA: u8 = 0x20;
const BKPBLOCK_SAME_REL: u8 = 0x80;
const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// PG 13-14: one "compressed" bit.
const BKPIMAGE_IS_COMPRESSED_V13: u8 = 0x02;
/// PG 15+: pglz, lz4, zstd bits.
const BKPIMAGE_COMPRESSED_V15: u8 = 0x04 | 0x08 | 0x10;

const XACT_XINFO_HAS_DBINFO: u32 = 1 << 0;
const XACT_XINFO_HAS_SUBXACTS: u32 = 1 << 1;
const XACT_XINFO_HAS_RELFILENODES: u32 = 1 << 2;
const XACT_XINFO_HAS_INVALS: u32 = 1 << 3;
const XACT_XINFO_HAS_TWOPHASE: u32 = 1 << 4;
/// PG 15+.
const XACT_XINFO_HAS_DROPPED_STATS: u32 = 1 << 8;
const TWOPHASE_MAGIC: u32 = 0x57F9_4534;
/// `RelFileNode` (PG 13-15) and `RelFileLocator` (PG 16+): three Oids.
const RELFILENODE_LEN: usize = 12;
const SHARED_INVAL_MSG_LEN: usize = 16;
/// `xl_restore_point.rp_name` is `char[MAXFNAMELEN]`.
const RESTORE_POINT_NAME_LEN: usize = 64;

/// The PostgreSQL major version whose WAL carries this `xlp_magic`, if known.
pub fn pg_major_for_magic(magic: u16) -> Option<u32> {
    match magic {
        0xD106 => Some(13),
        0xD10D => Some(14),
        0xD110 => Some(15),
        0xD113 => Some(16),
        0xD116 => Some(17),
        0xD118 => Some(18),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Time

/// A PostgreSQL `TimestampTz`: microseconds since 2000-01-01 00:00:00 UTC.
///
/// Serialized as the bare integer, exactly as Postgres stores it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PgTime(pub i64);

impl PgTime {
    /// 2000-01-01T00:00:00Z in microseconds since the Unix epoch.
    pub const EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

    /// The instant, or None for values outside jiff's range (including Postgres'
    /// `-infinity`/`infinity`, `i64::MIN`/`i64::MAX`).
    pub fn to_timestamp(self) -> Option<Timestamp> {
        self.0
            .checked_add(Self::EPOCH_UNIX_MICROS)
            .and_then(|us| Timestamp::from_microsecond(us).ok())
    }

    /// The instant truncated to whole microseconds (Postgres' resolution).
    pub fn from_timestamp(ts: Timestamp) -> PgTime {
        // jiff's range (years -9999..=9999) keeps this far from i64 overflow.
        PgTime(ts.as_microsecond() - Self::EPOCH_UNIX_MICROS)
    }
}

impl From<Timestamp> for PgTime {
    fn from(ts: Timestamp) -> PgTime {
        PgTime::from_timestamp(ts)
    }
}

impl fmt::Display for PgTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_timestamp() {
            Some(ts) => write!(f, "{ts}"),
            None => write!(f, "PgTime({})", self.0),
        }
    }
}

/// `TimestampTz` (µs since 2000-01-01 UTC) to a [`Timestamp`]; None when out of range.
pub fn pg_time_to_timestamp(pg_time: i64) -> Option<Timestamp> {
    PgTime(pg_time).to_timestamp()
}

/// A [`Timestamp`] to `TimestampTz` (µs since 2000-01-01 UTC), truncated to microseconds.
pub fn timestamp_to_pg_time(ts: Timestamp) -> i64 {
    PgTime::from_timestamp(ts).0
}

// ---------------------------------------------------------------------------------------
// Records

/// One WAL record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Where the record starts (its `ReadRecPtr`).
    pub start: Lsn,
    /// Just past its last byte (`EndRecPtr`); for `XLOG_SWITCH`, the end of the segment.
    pub end: Lsn,
    /// `xl_prev`: the start of the record before it.
    pub prev: Lsn,
    /// `xl_tot_len`: header and payload, without page headers crossed.
    pub len: u32,
    /// `xl_xid`: the (sub)transaction that wrote it, 0 if none.
    pub xid: u32,
    /// `xl_rmid`: resource manager id.
    pub rmid: u8,
    /// `xl_info`: the low 4 bits are generic flags, the high 4 the resource manager's.
    pub info: u8,
    pub kind: RecordKind,
}

/// What a record is, as far as walferry cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// A transaction record of `RM_XACT_ID` that carries a time.
    Xact(XactRecord),
    /// `pg_create_restore_point(name)`.
    RestorePoint {
        time: PgTime,
        name: String,
    },
    /// `XLOG_SWITCH`: the rest of the segment is unused.
    Switch,
    Other,
}

/// A commit, abort or prepare record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XactRecord {
    pub op: XactOp,
    /// `xact_time` (for PREPARE, `prepared_at`).
    pub time: PgTime,
    /// For the prepared variants (and PREPARE): the prepared transaction's xid, decoded
    /// from the main data; `None` if it could not be decoded. The record's own `xid` is
    /// the session's, usually 0.
    pub twophase_xid: Option<u32>,
}

/// `xl_info & XLOG_XACT_OPMASK` of the transaction records that carry a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XactOp {
    Commit,
    Prepare,
    Abort,
    CommitPrepared,
    AbortPrepared,
}

impl XactOp {
    fn from_info(info: u8) -> Option<XactOp> {
        match info & XLOG_XACT_OPMASK {
            0x00 => Some(XactOp::Commit),
            0x10 => Some(XactOp::Prepare),
            0x20 => Some(XactOp::Abort),
            0x30 => Some(XactOp::CommitPrepared),
            0x40 => Some(XactOp::AbortPrepared),
            _ => None,
        }
    }

    pub fn is_commit(self) -> bool {
        matches!(self, XactOp::Commit | XactOp::CommitPrepared)
    }

    pub fn is_abort(self) -> bool {
        matches!(self, XactOp::Abort | XactOp::AbortPrepared)
    }

    /// Commit or abort: the records `recovery_target_time` and `recovery_target_xid`
    /// stop at (PREPARE ends nothing).
    pub fn ends_transaction(self) -> bool {
        self != XactOp::Prepare
    }

    /// The name `pg_waldump` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            XactOp::Commit => "COMMIT",
            XactOp::Prepare => "PREPARE",
            XactOp::Abort => "ABORT",
            XactOp::CommitPrepared => "COMMIT_PREPARED",
            XactOp::AbortPrepared => "ABORT_PREPARED",
        }
    }
}

impl Record {
    pub fn is_switch(&self) -> bool {
        matches!(self.kind, RecordKind::Switch)
    }

    pub fn xact(&self) -> Option<&XactRecord> {
        match &self.kind {
            RecordKind::Xact(x) => Some(x),
            _ => None,
        }
    }

    /// The time of a commit or abort record (not PREPARE): what `recovery_target_time`
    /// compares against.
    pub fn xact_end_time(&self) -> Option<PgTime> {
        self.xact()
            .filter(|x| x.op.ends_transaction())
            .map(|x| x.time)
    }

    /// The transaction a commit or abort record ends, as `recovery_target_xid` sees it:
    /// the prepared xid for the `*_PREPARED` records, else `xl_xid`.
    pub fn ended_xid(&self) -> Option<u32> {
        let x = self.xact().filter(|x| x.op.ends_transaction())?;
        match x.op {
            XactOp::CommitPrepared | XactOp::AbortPrepared => x.twophase_xid,
            _ => Some(self.xid),
        }
    }
}

/// Why the scanner stopped: the bytes at that LSN are not valid WAL.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WalEndReason {
    /// `xl_tot_len` is 0: space never written (the usual end of WAL).
    ZeroLength,
    /// A record length below the header size or over [`MAX_RECORD_LEN`].
    BadRecordLength { len: u32 },
    /// A page whose `xlp_magic` is no known `XLOG_PAGE_MAGIC` (PG 13-18), or differs from
    /// the pages before it.
    BadPageMagic { magic: u16 },
    /// A page that says it belongs at another LSN: stale data in a recycled segment.
    BadPageAddress { found: Lsn },
    /// Unknown `xlp_info` bits, a long header where none belongs (or the reverse), another
    /// segment or page size, or another cluster's system identifier.
    BadPageHeader { detail: &'static str },
    /// `xlp_tli` went backwards.
    TimelineRegressed { from: u32, to: u32 },
    /// A record continues onto a page that does not say so or disagrees on the length
    /// left, or a page claims to continue a record that had ended.
    BadContinuation { detail: &'static str },
    /// `xl_prev` does not point at the record before.
    BrokenPrevLink { expected: Lsn, found: Lsn },
    /// `xl_crc` does not match the record's bytes.
    CrcMismatch { stored: u32, computed: u32 },
    /// The record's checksum is right but its block headers or main data are not
    /// laid out as its length says.
    BadRecordLayout { detail: &'static str },
}

impl fmt::Display for WalEndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalEndReason::ZeroLength => write!(f, "record length 0 (never written)"),
            WalEndReason::BadRecordLength { len } => write!(f, "invalid record length {len}"),
            WalEndReason::BadPageMagic { magic } => {
                write!(f, "page magic {magic:04X} is not a known WAL version")
            }
            WalEndReason::BadPageAddress { found } => {
                write!(f, "page claims address {found} (stale data)")
            }
            WalEndReason::BadPageHeader { detail } => write!(f, "invalid page header: {detail}"),
            WalEndReason::TimelineRegressed { from, to } => {
                write!(f, "timeline went back from {from} to {to}")
            }
            WalEndReason::BadContinuation { detail } => {
                write!(f, "invalid record continuation: {detail}")
            }
            WalEndReason::BrokenPrevLink { expected, found } => {
                write!(f, "xl_prev is {found}, expected {expected}")
            }
            WalEndReason::CrcMismatch { stored, computed } => {
                write!(
                    f,
                    "record checksum mismatch: stored {stored:08X}, computed {computed:08X}"
                )
            }
            WalEndReason::BadRecordLayout { detail } => {
                write!(f, "invalid record layout: {detail}")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The scanner

#[derive(Debug)]
enum State {
    /// At the scanner's page-aligned start: the first page header decides whether the
    /// page begins with the tail of a record we never saw.
    Start,
    /// Skipping the tail of a record that began before our start.
    SkipContinuation {
        remaining: u64,
    },
    /// After `XLOG_SWITCH`: raw bytes up to the segment end, not interpreted.
    SkipToSegmentEnd {
        until: u64,
    },
    /// The next record starts at the next 8-byte boundary.
    BetweenRecords,
    /// Collecting a record's bytes into `rec`.
    InRecord,
    Ended {
        lsn: Lsn,
        reason: WalEndReason,
    },
    BadStart {
        reason: &'static str,
    },
}

/// Sans-IO WAL scanner: [`feed`](WalScanner::feed) contiguous WAL bytes, then
/// [`poll`](WalScanner::poll) records until it returns `Ok(None)` (more bytes needed).
///
/// ```
/// # use walferry_formats::{Lsn, SegmentSize, walreader::WalScanner};
/// let mut scanner = WalScanner::new(Lsn(0x0300_0000), SegmentSize::DEFAULT);
/// scanner.feed(&[0u8; 100]); // a zeroed, never-written segment
/// let err = scanner.poll().unwrap_err();
/// assert!(err.is_end_of_wal());
/// ```
#[derive(Debug)]
pub struct WalScanner {
    seg_size: u64,
    /// LSN of `input[0]`.
    pos: u64,
    input: BytesMut,
    state: State,
    /// The record being collected, from its first header byte.
    rec: Vec<u8>,
    rec_start: u64,
    /// `xl_tot_len` of `rec`, once its first 4 bytes are in.
    rec_len: Option<u32>,
    rec_header_checked: bool,
    /// Start of the last record returned: the next record's `xl_prev`.
    prev: Option<u64>,
    magic: Option<u16>,
    sysid: Option<u64>,
    tli: Option<u32>,
}

/// Above this, a record buffer is released once its record is done.
const KEEP_RECORD_CAPACITY: usize = 1 << 20;

impl WalScanner {
    /// A scanner whose first fed byte is at `start`.
    ///
    /// `start` is either page-aligned (a segment or page boundary; a record continued from
    /// before it is skipped) or the 8-byte-aligned start of a record inside a page.
    pub fn new(start: Lsn, seg_size: SegmentSize) -> WalScanner {
        let seg = seg_size.bytes();
        let s = start.0;
        let state = if s % XLOG_BLCKSZ == 0 {
            State::Start
        } else if s % 8 != 0 {
            State::BadStart {
                reason: "a record start must be 8-byte aligned",
            }
        } else if s % XLOG_BLCKSZ < page_header_len(s - s % XLOG_BLCKSZ, seg) as u64 {
            State::BadStart {
                reason: "it is inside a page header",
            }
        } else {
            State::BetweenRecords
        };
        WalScanner {
            seg_size: seg,
            pos: s,
            input: BytesMut::new(),
            state,
            rec: Vec::new(),
            rec_start: s,
            rec_len: None,
            rec_header_checked: false,
            prev: None,
            magic: None,
            sysid: None,
            tli: None,
        }
    }

    /// Check the first record's `xl_prev` against `prev` (the start of the record before
    /// `start`), as when resuming a scan mid-page.
    pub fn with_prev_record(mut self, prev: Lsn) -> WalScanner {
        self.prev = Some(prev.0);
        self
    }

    /// Append WAL bytes that follow the ones fed before (the first at `start`). Ignored
    /// once the end of valid WAL was reached.
    pub fn feed(&mut self, bytes: &[u8]) {
        if matches!(self.state, State::Ended { .. } | State::BadStart { .. }) {
            return;
        }
        self.input.extend_from_slice(bytes);
    }

    /// The LSN of the next byte [`feed`](WalScanner::feed) expects.
    pub fn position(&self) -> Lsn {
        Lsn(self.pos + self.input.len() as u64)
    }

    /// The PostgreSQL major version of the WAL, once a page header was read.
    pub fn pg_major(&self) -> Option<u32> {
        self.magic.and_then(pg_major_for_magic)
    }

    /// The timeline of the last page header read.
    pub fn timeline(&self) -> Option<TimelineId> {
        self.tli.map(TimelineId)
    }

    /// The system identifier, once a segment's first page was read.
    pub fn system_id(&self) -> Option<u64> {
        self.sysid
    }

    /// Where and why the scan stopped, once it has.
    pub fn end_of_wal(&self) -> Option<(Lsn, &WalEndReason)> {
        match &self.state {
            State::Ended { lsn, reason } => Some((*lsn, reason)),
            _ => None,
        }
    }

    /// The next record, `Ok(None)` if more bytes are needed, or [`Error::WalEnd`] at the
    /// end of valid WAL (then on every later call too).
    pub fn poll(&mut self) -> Result<Option<Record>> {
        loop {
            match &self.state {
                State::Ended { lsn, reason } => {
                    return Err(Error::WalEnd {
                        lsn: *lsn,
                        reason: reason.clone(),
                    })
                }
                State::BadStart { reason } => {
                    return Err(Error::InvalidWalStart {
                        lsn: Lsn(self.pos),
                        reason,
                    })
                }
                State::SkipToSegmentEnd { until } => {
                    let until = *until;
                    let n = usize_min(until - self.pos, self.input.len());
                    self.consume(n);
                    if self.pos < until {
                        return Ok(None);
                    }
                    self.state = State::BetweenRecords;
                    continue;
                }
                _ => {}
            }

            if self.pos % XLOG_BLCKSZ == 0 {
                let len = page_header_len(self.pos, self.seg_size);
                if self.input.len() < len {
                    return Ok(None);
                }
                self.read_page_header(len)?;
                continue;
            }

            let page_left = XLOG_BLCKSZ - self.pos % XLOG_BLCKSZ;
            match self.state {
                State::Start | State::BetweenRecords => {
                    let pad = (8 - self.pos % 8) % 8;
                    if pad > 0 {
                        // Padding never crosses a page: page boundaries are 8-aligned.
                        let n = usize_min(pad, self.input.len());
                        if n == 0 {
                            return Ok(None);
                        }
                        self.consume(n);
                        continue;
                    }
                    self.rec.clear();
                    self.rec_start = self.pos;
                    self.rec_len = None;
                    self.rec_header_checked = false;
                    self.state = State::InRecord;
                }
                State::SkipContinuation { remaining } => {
                    let n = usize_min(remaining.min(page_left), self.input.len());
                    if n == 0 {
                        return Ok(None);
                    }
                    self.consume(n);
                    let remaining = remaining - n as u64;
                    self.state = if remaining == 0 {
                        State::BetweenRecords
                    } else {
                        State::SkipContinuation { remaining }
                    };
                }
                State::InRecord => {
                    if let Some(record) = self.collect(page_left)? {
                        return Ok(Some(record));
                    }
                    if self.input.is_empty() && matches!(self.state, State::InRecord) {
                        return Ok(None);
                    }
                }
                State::SkipToSegmentEnd { .. } | State::Ended { .. } | State::BadStart { .. } => {
                    // Handled above.
                }
            }
        }
    }

    fn consume(&mut self, n: usize) {
        self.input.advance(n);
        self.pos += n as u64;
    }

    /// Stop for good at `lsn`; the error `poll` returns from now on.
    fn end(&mut self, lsn: u64, reason: WalEndReason) -> Error {
        self.input = BytesMut::new();
        self.rec = Vec::new();
        self.state = State::Ended {
            lsn: Lsn(lsn),
            reason: reason.clone(),
        };
        Error::WalEnd {
            lsn: Lsn(lsn),
            reason,
        }
    }

    /// Validate and consume the page header at `self.pos` (all `len` bytes are buffered).
    fn read_page_header(&mut self, len: usize) -> Result<()> {
        let page = self.pos;
        let h = &self.input[..len];
        let magic = le_u16(h, 0);
        let info = le_u16(h, 2);
        let tli = le_u32(h, 4);
        let pageaddr = le_u64(h, 8);
        let rem_len = le_u32(h, 16);
        let long = len == LONG_PAGE_HEADER_LEN;
        let (sysid, seg_size, blcksz) = if long {
            (le_u64(h, 24), le_u32(h, 32), le_u32(h, 36))
        } else {
            (0, 0, 0)
        };

        if pg_major_for_magic(magic).is_none() || self.magic.is_some_and(|m| m != magic) {
            return Err(self.end(page, WalEndReason::BadPageMagic { magic }));
        }
        if info & !XLP_ALL_FLAGS != 0 {
            return Err(self.end(
                page,
                WalEndReason::BadPageHeader {
                    detail: "unknown xlp_info bits",
                },
            ));
        }
        if long != (info & XLP_LONG_HEADER != 0) {
            return Err(self.end(
                page,
                WalEndReason::BadPageHeader {
                    detail: "long header flag does not match the page's place in the segment",
                },
            ));
        }
        if long {
            let detail = if u64::from(seg_size) != self.seg_size {
                Some("segment size differs from the one given to the scanner")
            } else if u64::from(blcksz) != XLOG_BLCKSZ {
                Some("WAL page size is not 8192")
            } else if self.sysid.is_some_and(|s| s != sysid) {
                Some("system identifier differs from earlier segments")
            } else {
                None
            };
            if let Some(detail) = detail {
                return Err(self.end(page, WalEndReason::BadPageHeader { detail }));
            }
        }
        if pageaddr != page {
            return Err(self.end(
                page,
                WalEndReason::BadPageAddress {
                    found: Lsn(pageaddr),
                },
            ));
        }
        if let Some(from) = self.tli.filter(|&t| tli < t) {
            return Err(self.end(page, WalEndReason::TimelineRegressed { from, to: tli }));
        }

        let cont = info & XLP_FIRST_IS_CONTRECORD != 0;
        let overwrite = info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0;
        match self.state {
            State::Start => {
                self.state = if cont && rem_len > 0 {
                    State::SkipContinuation {
                        remaining: u64::from(rem_len),
                    }
                } else {
                    State::BetweenRecords
                };
            }
            State::SkipContinuation { remaining } => {
                if !cont || u64::from(rem_len) != remaining {
                    return Err(self.end(
                        page,
                        WalEndReason::BadContinuation {
                            detail: "the page does not continue the record it follows",
                        },
                    ));
                }
            }
            State::BetweenRecords => {
                if cont {
                    return Err(self.end(
                        page,
                        WalEndReason::BadContinuation {
                            detail: "the page continues a record that had ended",
                        },
                    ));
                }
            }
            State::InRecord => {
                let left = self
                    .rec_len
                    .and_then(|l| (l as usize).checked_sub(self.rec.len()));
                if overwrite && !cont {
                    // The record was cut short by a crash and its tail overwritten after
                    // recovery: drop it and read on from this page, as recovery does.
                    // The next record's xl_prev still points at the last complete one.
                    self.rec = Vec::new();
                    self.state = State::BetweenRecords;
                } else if !cont {
                    let at = self.rec_start;
                    return Err(self.end(
                        at,
                        WalEndReason::BadContinuation {
                            detail: "a record continues onto a page without the contrecord flag",
                        },
                    ));
                } else if left != Some(rem_len as usize) {
                    let at = self.rec_start;
                    return Err(self.end(
                        at,
                        WalEndReason::BadContinuation {
                            detail: "xlp_rem_len disagrees with the record length",
                        },
                    ));
                }
            }
            State::SkipToSegmentEnd { .. } | State::Ended { .. } | State::BadStart { .. } => {}
        }

        self.magic = Some(magic);
        self.tli = Some(tli);
        if long {
            self.sysid = Some(sysid);
        }
        self.consume(len);
        Ok(())
    }

    /// Copy record bytes from this page; return the record once complete.
    fn collect(&mut self, page_left: u64) -> Result<Option<Record>> {
        let have = self.rec.len();
        let target = if have < 4 {
            4
        } else if have < RECORD_HEADER_LEN {
            RECORD_HEADER_LEN
        } else {
            self.rec_len.map_or(RECORD_HEADER_LEN, |l| l as usize)
        };
        let n = usize_min(((target - have) as u64).min(page_left), self.input.len());
        self.rec.extend_from_slice(&self.input[..n]);
        self.consume(n);

        if self.rec_len.is_none() && self.rec.len() >= 4 {
            let len = le_u32(&self.rec, 0);
            if len == 0 {
                return Err(self.end(self.rec_start, WalEndReason::ZeroLength));
            }
            if (len as usize) < RECORD_HEADER_LEN || len > MAX_RECORD_LEN {
                return Err(self.end(self.rec_start, WalEndReason::BadRecordLength { len }));
            }
            self.rec_len = Some(len);
        }
        if !self.rec_header_checked && self.rec.len() >= RECORD_HEADER_LEN {
            self.rec_header_checked = true;
            let found = le_u64(&self.rec, 8);
            let ok = match self.prev {
                Some(prev) => found == prev,
                None => found < self.rec_start,
            };
            if !ok {
                let expected = Lsn(self.prev.unwrap_or(self.rec_start));
                let reason = WalEndReason::BrokenPrevLink {
                    expected,
                    found: Lsn(found),
                };
                return Err(self.end(self.rec_start, reason));
            }
        }
        match self.rec_len {
            Some(len) if self.rec.len() == len as usize && self.rec_header_checked => {
                self.finish().map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The record in `rec` is complete: check it, decode it, move on.
    fn finish(&mut self) -> Result<Record> {
        let rec = &self.rec;
        let stored = le_u32(rec, 20);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&rec[RECORD_HEADER_LEN..]), &rec[..20]);
        if stored != computed {
            let at = self.rec_start;
            return Err(self.end(at, WalEndReason::CrcMismatch { stored, computed }));
        }
        let xid = le_u32(rec, 4);
        let prev = le_u64(rec, 8);
        let info = rec[16];
        let rmid = rec[17];
        let major = self.pg_major().unwrap_or(15);
        let kind = match decode_kind(major, rmid, info, rec) {
            Ok(kind) => kind,
            Err(detail) => {
                let at = self.rec_start;
                return Err(self.end(at, WalEndReason::BadRecordLayout { detail }));
            }
        };
        let mut end = self.pos;
        self.state = State::BetweenRecords;
        if matches!(kind, RecordKind::Switch) {
            let until = end.div_ceil(self.seg_size) * self.seg_size;
            end = until;
            if until > self.pos {
                self.state = State::SkipToSegmentEnd { until };
            }
        }
        let record = Record {
            start: Lsn(self.rec_start),
            end: Lsn(end),
            prev: Lsn(prev),
            len: rec.len() as u32,
            xid,
            rmid,
            info,
            kind,
        };
        self.prev = Some(self.rec_start);
        if self.rec.capacity() > KEEP_RECORD_CAPACITY {
            self.rec = Vec::new();
        } else {
            self.rec.clear();
        }
        Ok(record)
    }
}

fn page_header_len(page: u64, seg_size: u64) -> usize {
    if page % seg_size == 0 {
        LONG_PAGE_HEADER_LEN
    } else {
        SHORT_PAGE_HEADER_LEN
    }
}

fn usize_min(a: u64, b: usize) -> usize {
    usize::try_from(a).map_or(b, |a| a.min(b))
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A bounds-checked reader over a byte slice.
struct Cursor<'a> {
    buf: &'a [u8],
    off: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8], off: usize) -> Self {
        Cursor { buf, off }
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.off)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.off.checked_add(n)?;
        let s = self.buf.get(self.off..end)?;
        self.off = end;
        Some(s)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| le_u16(b, 0))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| le_u32(b, 0))
    }

    fn i64(&mut self) -> Option<i64> {
        self.take(8).map(|b| le_u64(b, 0) as i64)
    }

    /// An `int` count followed by that many items of `size` bytes.
    fn skip_array(&mut self, size: usize) -> Option<()> {
        let n = usize::try_from(self.u32()? as i32).ok()?;
        self.take(n.checked_mul(size)?).map(|_| ())
    }
}

/// The main data of a complete record (`rec` includes the header), found by walking its
/// block headers as `DecodeXLogRecord` does.
fn main_data(rec: &[u8], major: u32) -> std::result::Result<&[u8], &'static str> {
    const TRUNCATED: &str = "block headers run past the record";
    let mut c = Cursor::new(rec, RECORD_HEADER_LEN);
    let mut datatotal: u64 = 0;
    let mut main_len: u64 = 0;
    while c.remaining() as u64 > datatotal {
        let id = c.u8().ok_or(TRUNCATED)?;
        match id {
            XLR_BLOCK_ID_DATA_SHORT => {
                main_len = u64::from(c.u8().ok_or(TRUNCATED)?);
                datatotal += main_len;
                break;
            }
            XLR_BLOCK_ID_DATA_LONG => {
                main_len = u64::from(c.u32().ok_or(TRUNCATED)?);
                datatotal += main_len;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => {
                c.take(2).ok_or(TRUNCATED)?;
            }
            XLR_BLOCK_ID_TOPLEVEL_XID => {
                c.take(4).ok_or(TRUNCATED)?;
            }
            0..=XLR_MAX_BLOCK_ID => {
                let fork_flags = c.u8().ok_or(TRUNCATED)?;
                let data_len = c.u16().ok_or(TRUNCATED)?;
                let has_data = fork_flags & BKPBLOCK_HAS_DATA != 0;
                if has_data != (data_len > 0) {
                    return Err("block data flag disagrees with its length");
                }
                datatotal += u64::from(data_len);
                if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let bimg_len = c.u16().ok_or(TRUNCATED)?;
                    let _hole_offset = c.u16().ok_or(TRUNCATED)?;
                    let bimg_info = c.u8().ok_or(TRUNCATED)?;
                    let compressed = if major <= 14 {
                        bimg_info & BKPIMAGE_IS_COMPRESSED_V13 != 0
                    } else {
                        bimg_info & BKPIMAGE_COMPRESSED_V15 != 0
                    };
                    if bimg_info & BKPIMAGE_HAS_HOLE != 0 && compressed {
                        let _hole_length = c.u16().ok_or(TRUNCATED)?;
                    }
                    datatotal += u64::from(bimg_len);
                }
                if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    c.take(RELFILENODE_LEN).ok_or(TRUNCATED)?;
                }
                let _block_no = c.u32().ok_or(TRUNCATED)?;
            }
            _ => return Err("invalid block id"),
        }
    }
    if c.remaining() as u64 != datatotal {
        return Err("block and main data lengths do not add up to the record length");
    }
    // main_len <= datatotal == remaining <= rec.len(), so this cannot underflow.
    Ok(&rec[rec.len() - main_len as usize..])
}

fn decode_kind(
    major: u32,
    rmid: u8,
    info: u8,
    rec: &[u8],
) -> std::result::Result<RecordKind, &'static str> {
    const SHORT: &str = "main data too short for its record type";
    match rmid {
        RM_XLOG_ID => match info & !XLR_INFO_MASK {
            XLOG_SWITCH => Ok(RecordKind::Switch),
            XLOG_RESTORE_POINT => {
                let main = main_data(rec, major)?;
                let mut c = Cursor::new(main, 0);
                let time = PgTime(c.i64().ok_or(SHORT)?);
                let rest = &main[8..];
                let name = &rest[..rest.len().min(RESTORE_POINT_NAME_LEN)];
                let name = name.split(|&b| b == 0).next().unwrap_or_default();
                Ok(RecordKind::RestorePoint {
                    time,
                    name: String::from_utf8_lossy(name).into_owned(),
                })
            }
            _ => Ok(RecordKind::Other),
        },
        RM_XACT_ID => {
            let Some(op) = XactOp::from_info(info) else {
                return Ok(RecordKind::Other);
            };
            let main = main_data(rec, major)?;
            let mut c = Cursor::new(main, 0);
            let xact = if op == XactOp::Prepare {
                // xl_xact_prepare: magic, total_len, xid, database, prepared_at, ...
                let magic = c.u32().ok_or(SHORT)?;
                if magic != TWOPHASE_MAGIC {
                    return Err("PREPARE record without the two-phase magic");
                }
                let _total_len = c.u32().ok_or(SHORT)?;
                let xid = c.u32().ok_or(SHORT)?;
                let _database = c.u32().ok_or(SHORT)?;
                let time = PgTime(c.i64().ok_or(SHORT)?);
                XactRecord {
                    op,
                    time,
                    twophase_xid: Some(xid),
                }
            } else {
                let time = PgTime(c.i64().ok_or(SHORT)?);
                let twophase_xid = if info & XLOG_XACT_HAS_INFO != 0 {
                    twophase_xid(&mut c, major, op.is_commit())
                } else {
                    None
                };
                XactRecord {
                    op,
                    time,
                    twophase_xid,
                }
            };
            Ok(RecordKind::Xact(xact))
        }
        _ => Ok(RecordKind::Other),
    }
}

/// Walk a commit/abort record's xinfo sections (`ParseCommitRecord`/`ParseAbortRecord`)
/// up to the two-phase xid. `c` is just past `xact_time`.
fn twophase_xid(c: &mut Cursor<'_>, major: u32, commit: bool) -> Option<u32> {
    let xinfo = c.u32()?;
    if xinfo & XACT_XINFO_HAS_TWOPHASE == 0 {
        return None;
    }
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        c.take(8)?;
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        c.skip_array(4)?;
    }
    if xinfo & XACT_XINFO_HAS_RELFILENODES != 0 {
        c.skip_array(RELFILENODE_LEN)?;
    }
    if major >= 15 && xinfo & XACT_XINFO_HAS_DROPPED_STATS != 0 {
        // xl_xact_stats_item: kind, dboid, objoid (PG 15-17); objid as two u32 (PG 18).
        c.skip_array(if major >= 18 { 16 } else { 12 })?;
    }
    if commit && xinfo & XACT_XINFO_HAS_INVALS != 0 {
        c.skip_array(SHARED_INVAL_MSG_LEN)?;
    }
    c.u32()
}

// ---------------------------------------------------------------------------------------
// Summary: the commit-time index entry

/// A commit or abort record: where, and its `xact_time`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XactStamp {
    /// Start of the record: recovery to a time just before `time` stops here.
    pub lsn: Lsn,
    pub time: PgTime,
}

/// A restore point made by `pg_create_restore_point`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePoint {
    /// Start of the restore point record.
    pub lsn: Lsn,
    /// End of it: `recovery_target_name` stops after this record.
    pub end: Lsn,
    pub time: PgTime,
    pub name: String,
}

/// What a stretch of WAL holds, for the commit-time index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalSummary {
    pub records: u64,
    /// First commit or abort record (including the prepared variants): the records
    /// `recovery_target_time` compares against.
    pub first_commit: Option<XactStamp>,
    /// Last commit or abort record.
    pub last_commit: Option<XactStamp>,
    /// COMMIT and COMMIT_PREPARED records.
    pub commits: u64,
    /// ABORT and ABORT_PREPARED records.
    pub aborts: u64,
    pub restore_points: Vec<RestorePoint>,
    /// Set when the scan stopped at invalid WAL before the end of the bytes given.
    pub end_of_valid_wal: Option<Lsn>,
}

impl WalSummary {
    pub fn add(&mut self, r: &Record) {
        self.records += 1;
        match &r.kind {
            RecordKind::Xact(x) if x.op.ends_transaction() => {
                let stamp = XactStamp {
                    lsn: r.start,
                    time: x.time,
                };
                self.first_commit.get_or_insert(stamp);
                self.last_commit = Some(stamp);
                if x.op.is_commit() {
                    self.commits += 1;
                } else {
                    self.aborts += 1;
                }
            }
            RecordKind::RestorePoint { time, name } => self.restore_points.push(RestorePoint {
                lsn: r.start,
                end: r.end,
                time: *time,
                name: name.clone(),
            }),
            _ => {}
        }
    }
}

/// Fold records into a summary (`end_of_valid_wal` stays unset).
pub fn summarize<'a>(records: impl IntoIterator<Item = &'a Record>) -> WalSummary {
    let mut s = WalSummary::default();
    for r in records {
        s.add(r);
    }
    s
}

/// Scan `bytes` (WAL starting at `start`) and summarize every complete record in it.
/// A record cut off by the end of `bytes` is left out; invalid WAL ends the scan and sets
/// `end_of_valid_wal`. Errors only for a `start` the scanner cannot begin at.
pub fn summarize_wal(start: Lsn, seg_size: SegmentSize, bytes: &[u8]) -> Result<WalSummary> {
    let mut scanner = WalScanner::new(start, seg_size);
    scanner.feed(bytes);
    let mut s = WalSummary::default();
    loop {
        match scanner.poll() {
            Ok(Some(r)) => s.add(&r),
            Ok(None) => return Ok(s),
            Err(Error::WalEnd { lsn, .. }) => {
                s.end_of_valid_wal = Some(lsn);
                return Ok(s);
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    const SEG: u64 = 1 << 20;
    const BASE: u64 = 16 * SEG; // 0/1000000
    const PG15: u16 = 0xD110;
    const SYSID: u64 = 7_312_345_678_901_234_567;
    /// 2026-11-22 11:22:17.866504 UTC
    const T0: i64 = 848_661_737_866_504;

    fn seg() -> SegmentSize {
        SegmentSize::new(SEG).unwrap()
    }

    /// Writes WAL the way PostgreSQL lays it out: page headers, aligned records that
    /// cross pages and segments, contrecord flags, correct CRCs.
    struct WalBuilder {
        base: u64,
        buf: Vec<u8>,
        prev: u64,
        magic: u16,
        tli: u32,
        /// OR-ed into the xlp_info of the next page header written.
        next_page_flags: u16,
    }

    impl WalBuilder {
        fn new(base: u64) -> Self {
            assert_eq!(base % XLOG_BLCKSZ, 0);
            WalBuilder {
                base,
                buf: Vec::new(),
                prev: 0,
                magic: PG15,
                tli: 1,
                next_page_flags: 0,
            }
        }

        fn pos(&self) -> u64 {
            self.base + self.buf.len() as u64
        }

        fn lsn_at(&self, lsn: u64) -> usize {
            (lsn - self.base) as usize
        }

        fn page_header(&mut self, rem: usize) {
            let p = self.pos();
            let long = p % SEG == 0;
            let mut info = std::mem::take(&mut self.next_page_flags);
            if rem > 0 {
                info |= XLP_FIRST_IS_CONTRECORD;
            }
            if long {
                info |= XLP_LONG_HEADER;
            }
            self.buf.extend_from_slice(&self.magic.to_le_bytes());
            self.buf.extend_from_slice(&info.to_le_bytes());
            self.buf.extend_from_slice(&self.tli.to_le_bytes());
            self.buf.extend_from_slice(&p.to_le_bytes());
            self.buf.extend_from_slice(&(rem as u32).to_le_bytes());
            self.buf.extend_from_slice(&[0; 4]);
            if long {
                self.buf.extend_from_slice(&SYSID.to_le_bytes());
                self.buf.extend_from_slice(&(SEG as u32).to_le_bytes());
                self.buf
                    .extend_from_slice(&(XLOG_BLCKSZ as u32).to_le_bytes());
            }
        }

        /// Record bytes, with page headers where pages begin; stops early after
        /// `limit` bytes (a torn record).
        fn put(&mut self, data: &[u8], limit: usize) {
            let mut i = 0;
            while i < data.len().min(limit) {
                if self.pos() % XLOG_BLCKSZ == 0 {
                    self.page_header(if i == 0 { 0 } else { data.len() - i });
                }
                let room = (XLOG_BLCKSZ - self.pos() % XLOG_BLCKSZ) as usize;
                let n = (data.len().min(limit) - i).min(room);
                self.buf.extend_from_slice(&data[i..i + n]);
                i += n;
            }
        }

        fn align(&mut self) {
            while self.pos() % 8 != 0 {
                self.buf.push(0);
            }
        }

        fn record_start(&mut self) -> u64 {
            self.align();
            let p = self.pos();
            if p % XLOG_BLCKSZ == 0 {
                p + page_header_len(p, SEG) as u64
            } else {
                p
            }
        }

        fn encode(&self, rmid: u8, info: u8, xid: u32, payload: &[u8]) -> Vec<u8> {
            let mut rec = Vec::with_capacity(RECORD_HEADER_LEN + payload.len());
            rec.extend_from_slice(&((RECORD_HEADER_LEN + payload.len()) as u32).to_le_bytes());
            rec.extend_from_slice(&xid.to_le_bytes());
            rec.extend_from_slice(&self.prev.to_le_bytes());
            rec.extend_from_slice(&[info, rmid, 0, 0, 0, 0, 0, 0]);
            rec.extend_from_slice(payload);
            let crc = crc32c::crc32c_append(crc32c::crc32c(&rec[24..]), &rec[..20]);
            rec[20..24].copy_from_slice(&crc.to_le_bytes());
            rec
        }

        /// A record with `payload` after the header; returns (start, end).
        fn raw(&mut self, rmid: u8, info: u8, xid: u32, payload: &[u8]) -> (u64, u64) {
            let start = self.record_start();
            let rec = self.encode(rmid, info, xid, payload);
            self.put(&rec, usize::MAX);
            self.prev = start;
            (start, self.pos())
        }

        fn record(&mut self, rmid: u8, info: u8, xid: u32, main: &[u8]) -> (u64, u64) {
            self.raw(rmid, info, xid, &main_payload(main))
        }

        fn commit(&mut self, xid: u32, time: i64) -> (u64, u64) {
            self.record(RM_XACT_ID, 0x00, xid, &time.to_le_bytes())
        }

        fn abort(&mut self, xid: u32, time: i64) -> (u64, u64) {
            self.record(RM_XACT_ID, 0x20, xid, &time.to_le_bytes())
        }

        fn restore_point(&mut self, name: &str, time: i64) -> (u64, u64) {
            let mut main = time.to_le_bytes().to_vec();
            let mut n = [0u8; RESTORE_POINT_NAME_LEN];
            n[..name.len()].copy_from_slice(name.as_bytes());
            main.extend_from_slice(&n);
            self.record(RM_XLOG_ID, XLOG_RESTORE_POINT, 0, &main)
        }

        /// A heap-like record of `size` bytes of main data.
        fn big(&mut self, size: usize) -> (u64, u64) {
            let main: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            self.record(10, 0x00, 900, &main)
        }

        /// XLOG_SWITCH, then the rest of the segment: empty pages with headers.
        fn switch(&mut self) -> (u64, u64) {
            let r = self.record(RM_XLOG_ID, XLOG_SWITCH, 0, &[]);
            while self.pos() % SEG != 0 {
                if self.pos() % XLOG_BLCKSZ == 0 {
                    self.page_header(0);
                }
                while self.pos() % XLOG_BLCKSZ != 0 {
                    self.buf.push(0);
                }
            }
            r
        }

        /// A filler record so that the next record starts at `offset` in this page
        /// (at `XLOG_BLCKSZ`: on the next page, after its header).
        fn fill_to(&mut self, offset: u64) {
            let p = self.record_start();
            let target = p - p % XLOG_BLCKSZ + offset;
            let len = (target - p) as usize;
            assert!(len >= RECORD_HEADER_LEN, "no room for a filler");
            let payload = match len - RECORD_HEADER_LEN {
                0 => Vec::new(),
                n if n <= 257 => {
                    let mut v = vec![XLR_BLOCK_ID_DATA_SHORT, (n - 2) as u8];
                    v.resize(n, 0xAB);
                    v
                }
                n => {
                    let mut v = vec![XLR_BLOCK_ID_DATA_LONG];
                    v.extend_from_slice(&((n - 5) as u32).to_le_bytes());
                    v.resize(n, 0xAB);
                    v
                }
            };
            self.raw(10, 0x00, 0, &payload);
            assert_eq!(self.pos().next_multiple_of(8), target);
        }

        /// Zeroed space after the last record: how unwritten WAL looks.
        fn zero_tail(&mut self, bytes: usize) {
            self.align();
            self.buf.resize(self.buf.len() + bytes, 0);
        }
    }

    fn main_payload(main: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        if main.is_empty() {
        } else if main.len() <= 255 {
            v.extend_from_slice(&[XLR_BLOCK_ID_DATA_SHORT, main.len() as u8]);
        } else {
            v.push(XLR_BLOCK_ID_DATA_LONG);
            v.extend_from_slice(&(main.len() as u32).to_le_bytes());
        }
        v.extend_from_slice(main);
        v
    }

    type Scan = (Vec<Record>, Option<(Lsn, WalEndReason)>);

    /// Feed `bytes` in chunks of the given sizes (cycled), polling after each.
    fn scan_chunks(start: u64, bytes: &[u8], chunks: &[usize]) -> Scan {
        let mut s = WalScanner::new(Lsn(start), seg());
        let mut out = Vec::new();
        let mut off = 0;
        let mut sizes = chunks.iter().cycle();
        loop {
            loop {
                match s.poll() {
                    Ok(Some(r)) => out.push(r),
                    Ok(None) => break,
                    Err(Error::WalEnd { lsn, reason }) => {
                        assert_eq!(s.end_of_wal(), Some((lsn, &reason)));
                        return (out, Some((lsn, reason)));
                    }
                    Err(Error::InvalidWalStart { .. }) => return (out, None),
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
            if off == bytes.len() {
                return (out, None);
            }
            let n = (*sizes.next().unwrap()).clamp(1, bytes.len() - off);
            s.feed(&bytes[off..off + n]);
            off += n;
        }
    }

    fn scan(start: u64, bytes: &[u8]) -> Scan {
        scan_chunks(start, bytes, &[bytes.len().max(1)])
    }

    fn starts(records: &[Record]) -> Vec<u64> {
        records.iter().map(|r| r.start.0).collect()
    }

    #[test]
    fn single_commit_is_decoded() {
        let mut b = WalBuilder::new(BASE);
        let (start, end) = b.commit(735, T0);
        assert_eq!(start, BASE + 40);
        // Without what follows, the scanner just waits.
        let (records, stop) = scan(BASE, &b.buf);
        assert_eq!(stop, None);
        assert_eq!(
            records,
            vec![Record {
                start: Lsn(start),
                end: Lsn(end),
                prev: Lsn(0),
                len: 34,
                xid: 735,
                rmid: RM_XACT_ID,
                info: 0,
                kind: RecordKind::Xact(XactRecord {
                    op: XactOp::Commit,
                    time: PgTime(T0),
                    twophase_xid: None,
                }),
            }]
        );
        assert_eq!(records[0].xact_end_time(), Some(PgTime(T0)));
        assert_eq!(records[0].ended_xid(), Some(735));

        b.zero_tail(64);
        let (records, stop) = scan(BASE, &b.buf);
        assert_eq!(records.len(), 1);
        assert_eq!(
            stop,
            Some((Lsn(end.next_multiple_of(8)), WalEndReason::ZeroLength))
        );
    }

    #[test]
    fn scanner_reports_page_facts() {
        let mut b = WalBuilder::new(BASE);
        b.commit(1, T0);
        let mut s = WalScanner::new(Lsn(BASE), seg());
        assert_eq!(s.pg_major(), None);
        s.feed(&b.buf);
        assert!(s.poll().unwrap().is_some());
        assert_eq!(s.pg_major(), Some(15));
        assert_eq!(s.timeline(), Some(TimelineId(1)));
        assert_eq!(s.system_id(), Some(SYSID));
        assert_eq!(s.position(), Lsn(BASE + b.buf.len() as u64));
        assert_eq!(s.end_of_wal(), None);
    }

    #[test]
    fn record_headers_split_across_pages() {
        for offset in [8176, 8184, 8168] {
            let mut b = WalBuilder::new(BASE);
            b.commit(1, T0);
            b.fill_to(offset);
            let (split, split_end) = b.commit(2, T0 + 1);
            assert_eq!(split % XLOG_BLCKSZ, offset);
            let (after, _) = b.abort(3, T0 + 2);
            b.zero_tail(16);
            let whole = scan(BASE, &b.buf);
            let bytewise = scan_chunks(BASE, &b.buf, &[1]);
            assert_eq!(whole, bytewise);
            let (records, stop) = whole;
            assert_eq!(starts(&records)[2..], [split, after]);
            assert_eq!(records[2].end, Lsn(split_end));
            assert_eq!(records[2].xact_end_time(), Some(PgTime(T0 + 1)));
            assert_eq!(records[3].xact().unwrap().op, XactOp::Abort);
            assert_eq!(stop.unwrap().1, WalEndReason::ZeroLength);
        }
    }

    #[test]
    fn records_cross_pages_and_segments() {
        let mut b = WalBuilder::new(BASE);
        let mut want = vec![b.commit(1, T0)];
        want.push(b.big(30_000));
        want.push(b.big(1_500_000)); // spans two segment boundaries
        want.push(b.commit(2, T0 + 5));
        b.fill_to(XLOG_BLCKSZ - 8);
        want.push(b.big(3 * SEG as usize)); // starts at page offset 8184
        want.push(b.commit(3, T0 + 6));
        b.zero_tail(8);
        let (records, stop) = scan(BASE, &b.buf);
        let got: Vec<(u64, u64)> = records
            .iter()
            .filter(|r| r.xid != 0)
            .map(|r| (r.start.0, r.end.0))
            .collect();
        assert_eq!(got, want);
        assert!(records[4].start.0 < 2 * SEG + BASE);
        assert_eq!(
            records.last().unwrap().xact_end_time(),
            Some(PgTime(T0 + 6))
        );
        assert_eq!(stop.unwrap().1, WalEndReason::ZeroLength);
    }

    #[test]
    fn switch_skips_to_the_next_segment() {
        let mut b = WalBuilder::new(BASE);
        b.commit(1, T0);
        let (switch, _) = b.switch();
        assert_eq!(b.pos(), BASE + SEG);
        let (next, _) = b.commit(2, T0 + 1);
        assert_eq!(next, BASE + SEG + 40);
        let (records, stop) = scan(BASE, &b.buf);
        assert_eq!(stop, None);
        assert_eq!(starts(&records), [BASE + 40, switch, next]);
        assert!(records[1].is_switch());
        assert_eq!(records[1].end, Lsn(BASE + SEG));
        assert_eq!(records[2].prev, Lsn(switch));
    }

    #[test]
    fn switch_padding_is_not_interpreted() {
        // Real servers write page headers into the padding; zeros must do too.
        let mut b = WalBuilder::new(BASE);
        b.commit(1, T0);
        b.record(RM_XLOG_ID, XLOG_SWITCH, 0, &[]);
        let pad = (BASE + SEG - b.pos()) as usize;
        b.zero_tail(pad);
        let (next, _) = b.commit(2, T0 + 1);
        let (records, _) = scan_chunks(BASE, &b.buf, &[4096, 1, 77]);
        assert_eq!(records.last().unwrap().start, Lsn(next));
    }

    /// A segment whose first page continues a record from the segment before.
    fn contrecord_wal() -> (WalBuilder, Vec<(u64, u64)>) {
        let mut b = WalBuilder::new(BASE);
        let mut recs = vec![b.commit(1, T0)];
        b.fill_to(XLOG_BLCKSZ - 16);
        recs.push(b.big(2 * SEG as usize + 20_000)); // into segment BASE+2*SEG
        recs.push(b.commit(2, T0 + 1));
        recs.push(b.restore_point("rp1", T0 + 2));
        b.zero_tail(8);
        (b, recs)
    }

    #[test]
    fn start_at_segment_boundary_skips_continuation() {
        let (b, recs) = contrecord_wal();
        // From the next segment: its first page (and all others) continue the big record.
        let from = BASE + SEG;
        let (records, stop) = scan(from, &b.buf[b.lsn_at(from)..]);
        let first = &b.buf[b.lsn_at(from)..];
        assert_eq!(le_u16(first, 2), XLP_FIRST_IS_CONTRECORD | XLP_LONG_HEADER);
        assert!(le_u32(first, 16) as u64 > SEG);
        assert_eq!(starts(&records), [recs[2].0, recs[3].0]);
        assert_eq!(stop.unwrap().1, WalEndReason::ZeroLength);

        // From the segment where the record ends, and from a page inside it.
        for from in [BASE + 2 * SEG, BASE + SEG + 5 * XLOG_BLCKSZ] {
            let (records, _) = scan_chunks(from, &b.buf[b.lsn_at(from)..], &[1000, 3]);
            assert_eq!(starts(&records), [recs[2].0, recs[3].0], "from {from:X}");
            assert_eq!(
                records[1].kind,
                RecordKind::RestorePoint {
                    time: PgTime(T0 + 2),
                    name: "rp1".into()
                }
            );
        }
    }

    #[test]
    fn start_at_a_record_inside_a_page() {
        let (b, recs) = contrecord_wal();
        let from = recs[2].0;
        assert_ne!(from % XLOG_BLCKSZ, 0);
        let bytes = &b.buf[b.lsn_at(from)..];
        let (records, _) = scan(from, bytes);
        assert_eq!(starts(&records), [recs[2].0, recs[3].0]);

        // With the previous record known, its xl_prev is checked.
        let mut s = WalScanner::new(Lsn(from), seg()).with_prev_record(Lsn(recs[1].0));
        s.feed(bytes);
        assert_eq!(s.poll().unwrap().unwrap().start, Lsn(from));
        let mut s = WalScanner::new(Lsn(from), seg()).with_prev_record(Lsn(recs[0].0));
        s.feed(bytes);
        let err = s.poll().unwrap_err();
        assert!(err.is_end_of_wal(), "{err}");
        assert!(matches!(
            s.end_of_wal(),
            Some((_, WalEndReason::BrokenPrevLink { .. }))
        ));

        for bad in [from + 4, BASE + SEG + 16, BASE + 8] {
            let mut s = WalScanner::new(Lsn(bad), seg());
            s.feed(&[0; 64]);
            assert!(
                matches!(s.poll(), Err(Error::InvalidWalStart { .. })),
                "{bad:X}"
            );
        }
    }

    fn end_of(b: &WalBuilder) -> (Vec<Record>, Lsn, WalEndReason) {
        let (records, stop) = scan(b.base, &b.buf);
        let (lsn, reason) = stop.expect("the scan must stop");
        (records, lsn, reason)
    }

    #[test]
    fn stops_at_bad_page_magic() {
        let mut b = WalBuilder::new(BASE);
        b.commit(1, T0);
        b.fill_to(XLOG_BLCKSZ); // the next record starts on page 2
        let (next, _) = b.commit(2, T0 + 1);
        b.buf[XLOG_BLCKSZ as usize] = 0x42;
        let (records, lsn, reason) = end_of(&b);
        assert!(next > BASE + XLOG_BLCKSZ);
        assert_eq!(records.len(), 2);
        assert_eq!(lsn, Lsn(BASE + XLOG_BLCKSZ));
        assert!(matches!(reason, WalEndReason::BadPageMagic { .. }));

        // A zeroed page, as at the end of a preallocated segment.
        let mut b = WalBuilder::new(BASE);
        b.commit(1, T0);
        b.fill_to(XLOG_BLCKSZ);
        b.zero_tail(XLOG_BLCKSZ as usize);
        let (_, lsn, reason) = end_of(&b);
        assert_eq!(
            (lsn, reason),
            (
                Lsn(BASE + XLOG_BLCKSZ),
                WalEndReason::BadPageMagic { magic: 0 }
            )
        );
    }

    #[test]
    fn stops_at_a_recycled_segment() {
        let mut b = WalBuilder::new(BASE);
        b.commit(1, T0);
        b.switch();
        // The next segment file still holds what was written there four segments ago.
        let mut old = WalBuilder::new(BASE - 3 * SEG);
        old.commit(9, T0 - 1000);
        let mut bytes = b.buf.clone();
        bytes.extend_from_slice(&old.buf);
        let (records, stop) = scan(BASE, &bytes);
        assert_eq!(records.len(), 2);
        assert_eq!(
            stop,
            Some((
                Lsn(BASE + SEG),
                WalEndReason::BadPageAddress {
                    found: Lsn(BASE - 3 * SEG)
                }
            ))
        );
    }

    #[test]
    fn stops_at_a_broken_prev_link() {
        let mut b = WalBuilder::new(BASE);
        b.commit(1, T0);
        b.prev = BASE + 4096;
        let (bad, _) = b.commit(2, T0 + 1);
        let (records, lsn, reason) = end_of(&b);
        assert_eq!(records.len(), 1);
        assert_eq!(lsn, Lsn(bad));
        assert_eq!(
            reason,
            WalEndReason::BrokenPrevLink {
                expected: Lsn(BASE + 40),
                found: Lsn(BASE + 4096)
            }
        );
    }

    #[test]
    fn stops_at_a_crc_mismatch_and_stays_stopped() {
        let mut b = WalBuilder::new(BASE);
        b.commit(1, T0);
        let (bad, end) = b.big(20_000);
        b.commit(3, T0 + 1);
        let i = b.lsn_at(end) - 10;
        b.buf[i] ^= 0x01;
        let mut s = WalScanner::new(Lsn(BASE), seg());
        s.feed(&b.buf);
        assert!(s.poll().unwrap().is_some());
        let err = s.poll().unwrap_err();
        assert!(err.is_end_of_wal());
        assert!(!err.is_corruption());
        let Error::WalEnd { lsn, reason } = &err else {
            panic!("{err}")
        };
        assert_eq!(*lsn, Lsn(bad));
        assert!(matches!(reason, WalEndReason::CrcMismatch { .. }));
        assert!(
            err.to_string().starts_with("end of valid WAL at 0/10000"),
            "{err}"
        );
        let at = s.position();
        s.feed(&[0; 100]);
        assert_eq!(s.position(), at, "bytes after the end are dropped");
        assert_eq!(s.poll().unwrap_err().to_string(), err.to_string());
    }

    #[test]
    fn stops_at_a_torn_continuation() {
        let mut b = WalBuilder::new(BASE);
        b.commit(1, T0);
        let (big, _) = b.big(20_000);
        // Clear the contrecord flag of the page the big record continues onto.
        let hdr = XLOG_BLCKSZ as usize + 2;
        b.buf[hdr] &= !(XLP_FIRST_IS_CONTRECORD as u8);
        let (_, lsn, reason) = end_of(&b);
        assert_eq!(lsn, Lsn(big));
        assert!(matches!(reason, WalEndReason::BadContinuation { .. }));

        // A wrong remaining length.
        let mut b = WalBuilder::new(BASE);
        b.commit(1, T0);
        b.big(20_000);
        b.buf[XLOG_BLCKSZ as usize + 16] ^= 0x04;
        let (_, _, reason) = end_of(&b);
        assert!(matches!(reason, WalEndReason::BadContinuation { .. }));

        // A page that claims to continue a record when none is open.
        let mut b = WalBuilder::new(BASE);
        b.commit(1, T0);
        b.fill_to(XLOG_BLCKSZ);
        b.commit(2, T0);
        b.buf[XLOG_BLCKSZ as usize + 2] |= XLP_FIRST_IS_CONTRECORD as u8;
        let (records, lsn, reason) = end_of(&b);
        assert_eq!(records.len(), 2);
        assert_eq!(lsn, Lsn(BASE + XLOG_BLCKSZ));
        assert!(matches!(reason, WalEndReason::BadContinuation { .. }));
    }

    #[test]
    fn stops_at_impossible_lengths_and_headers() {
        let mut b = WalBuilder::new(BASE);
        let (_, end) = b.commit(1, T0);
        let at = end.next_multiple_of(8);
        b.align();
        b.buf.extend_from_slice(&7u32.to_le_bytes());
        b.zero_tail(40);
        let (_, lsn, reason) = end_of(&b);
        assert_eq!(
            (lsn, reason),
            (Lsn(at), WalEndReason::BadRecordLength { len: 7 })
        );

        // Wrong segment size for the scanner.
        let mut b = WalBuilder::new(BASE);
        b.commit(1, T0);
        let mut s = WalScanner::new(Lsn(BASE), SegmentSize::new(2 * SEG).unwrap());
        s.feed(&b.buf);
        assert!(s.poll().unwrap_err().is_end_of_wal());
        assert!(matches!(
            s.end_of_wal(),
            Some((_, WalEndReason::BadPageHeader { .. }))
        ));

        // A timeline going backwards.
        let mut b = WalBuilder::new(BASE);
        b.tli = 3;
        b.commit(1, T0);
        b.fill_to(XLOG_BLCKSZ);
        b.tli = 2;
        b.commit(2, T0);
        let (_, lsn, reason) = end_of(&b);
        assert_eq!(lsn, Lsn(BASE + XLOG_BLCKSZ));
        assert_eq!(reason, WalEndReason::TimelineRegressed { from: 3, to: 2 });
    }

    #[test]
    fn overwritten_contrecord_is_dropped() {
        let mut b = WalBuilder::new(BASE);
        let (first, _) = b.commit(1, T0);
        // A record torn by a crash: only its first-page bytes made it.
        let torn_start = b.record_start();
        let torn = b.encode(10, 0, 5, &main_payload(&[7u8; 20_000]));
        let room = (XLOG_BLCKSZ - b.pos() % XLOG_BLCKSZ) as usize;
        b.put(&torn, room);
        assert_eq!(b.pos() % XLOG_BLCKSZ, 0);
        // After recovery the server overwrote the rest, flagging the page.
        b.next_page_flags = XLP_FIRST_IS_OVERWRITE_CONTRECORD;
        let mut main = torn_start.to_le_bytes().to_vec();
        main.extend_from_slice(&(T0 + 9).to_le_bytes());
        let (ovw, _) = b.record(RM_XLOG_ID, 0xD0, 0, &main);
        let (after, _) = b.commit(2, T0 + 10);
        let (records, stop) = scan(BASE, &b.buf);
        assert_eq!(stop, None);
        assert_eq!(starts(&records), [first, ovw, after]);
        assert_eq!(records[1].prev, Lsn(first));
    }

    #[test]
    fn restore_points_and_two_phase_records_decode() {
        let mut b = WalBuilder::new(BASE);
        let (rp, rp_end) = b.restore_point("before-upgrade", T0);

        // PREPARE: xl_xact_prepare.
        let mut prep = TWOPHASE_MAGIC.to_le_bytes().to_vec();
        prep.extend_from_slice(&200u32.to_le_bytes()); // total_len
        prep.extend_from_slice(&741u32.to_le_bytes()); // xid
        prep.extend_from_slice(&5u32.to_le_bytes()); // database
        prep.extend_from_slice(&(T0 + 1).to_le_bytes());
        prep.extend_from_slice(&[0; 40]);
        b.record(RM_XACT_ID, 0x10, 741, &prep);

        // COMMIT_PREPARED with every xinfo section before the two-phase xid.
        let xinfo = XACT_XINFO_HAS_DBINFO
            | XACT_XINFO_HAS_SUBXACTS
            | XACT_XINFO_HAS_RELFILENODES
            | XACT_XINFO_HAS_DROPPED_STATS
            | XACT_XINFO_HAS_INVALS
            | XACT_XINFO_HAS_TWOPHASE
            | (1 << 7); // HAS_GID
        let mut cp = (T0 + 2).to_le_bytes().to_vec();
        cp.extend_from_slice(&xinfo.to_le_bytes());
        cp.extend_from_slice(&[1; 8]); // dbinfo
        cp.extend_from_slice(&2i32.to_le_bytes());
        cp.extend_from_slice(&[2; 8]); // 2 subxacts
        cp.extend_from_slice(&1i32.to_le_bytes());
        cp.extend_from_slice(&[3; 12]); // 1 relfilenode
        cp.extend_from_slice(&3i32.to_le_bytes());
        cp.extend_from_slice(&[4; 36]); // 3 stats items (PG 15)
        cp.extend_from_slice(&2i32.to_le_bytes());
        cp.extend_from_slice(&[5; 32]); // 2 invalidation messages
        cp.extend_from_slice(&741u32.to_le_bytes());
        cp.extend_from_slice(b"g1\0");
        b.record(RM_XACT_ID, 0x30 | XLOG_XACT_HAS_INFO, 0, &cp);

        // ABORT_PREPARED: no invalidations in abort records.
        let xinfo = XACT_XINFO_HAS_RELFILENODES | XACT_XINFO_HAS_TWOPHASE;
        let mut ap = (T0 + 3).to_le_bytes().to_vec();
        ap.extend_from_slice(&xinfo.to_le_bytes());
        ap.extend_from_slice(&1i32.to_le_bytes());
        ap.extend_from_slice(&[3; 12]);
        ap.extend_from_slice(&742u32.to_le_bytes());
        b.record(RM_XACT_ID, 0x40 | XLOG_XACT_HAS_INFO, 0, &ap);

        // An ASSIGNMENT record is just "other".
        b.record(RM_XACT_ID, 0x50, 9, &[0; 12]);

        let (records, _) = scan(BASE, &b.buf);
        assert_eq!(records.len(), 5);
        assert_eq!(
            records[0].kind,
            RecordKind::RestorePoint {
                time: PgTime(T0),
                name: "before-upgrade".into()
            }
        );
        let prepare = records[1].xact().unwrap();
        assert_eq!(
            (prepare.op, prepare.time, prepare.twophase_xid),
            (XactOp::Prepare, PgTime(T0 + 1), Some(741))
        );
        assert_eq!(records[1].xact_end_time(), None);
        assert_eq!(records[1].ended_xid(), None);
        let cp = records[2].xact().unwrap();
        assert_eq!((cp.op, cp.time), (XactOp::CommitPrepared, PgTime(T0 + 2)));
        assert_eq!(records[2].ended_xid(), Some(741));
        assert_eq!(records[3].xact().unwrap().op, XactOp::AbortPrepared);
        assert_eq!(records[3].ended_xid(), Some(742));
        assert_eq!(records[4].kind, RecordKind::Other);

        let summary = summarize(&records);
        assert_eq!(
            summary.restore_points,
            vec![RestorePoint {
                lsn: Lsn(rp),
                end: Lsn(rp_end),
                time: PgTime(T0),
                name: "before-upgrade".into()
            }]
        );
        assert_eq!((summary.commits, summary.aborts), (1, 1));
        assert_eq!(summary.first_commit.unwrap().time, PgTime(T0 + 2));
        assert_eq!(summary.last_commit.unwrap().time, PgTime(T0 + 3));
    }

    #[test]
    fn main_data_is_found_behind_block_headers() {
        // rel + block for block 0 (image with a hole, compressed), block 1 (same rel, data),
        // an origin, a top-level xid, then long main data.
        fn payload(bimg_info: u8, hole_len_field: bool, main: &[u8]) -> Vec<u8> {
            let mut p = vec![0u8, BKPBLOCK_HAS_IMAGE | BKPBLOCK_HAS_DATA];
            p.extend_from_slice(&10u16.to_le_bytes()); // data_len
            p.extend_from_slice(&100u16.to_le_bytes()); // bimg_len
            p.extend_from_slice(&40u16.to_le_bytes()); // hole_offset
            p.push(bimg_info);
            if hole_len_field {
                p.extend_from_slice(&7000u16.to_le_bytes());
            }
            p.extend_from_slice(&[1; 12]); // relfilenode
            p.extend_from_slice(&3u32.to_le_bytes()); // block number
            p.extend_from_slice(&[1, BKPBLOCK_HAS_DATA | BKPBLOCK_SAME_REL]);
            p.extend_from_slice(&5u16.to_le_bytes());
            p.extend_from_slice(&4u32.to_le_bytes());
            p.extend_from_slice(&[XLR_BLOCK_ID_ORIGIN, 1, 0]);
            p.extend_from_slice(&[XLR_BLOCK_ID_TOPLEVEL_XID, 9, 0, 0, 0]);
            p.push(XLR_BLOCK_ID_DATA_LONG);
            p.extend_from_slice(&(main.len() as u32).to_le_bytes());
            p.extend_from_slice(&[0xEE; 100 + 10 + 5]); // image, block 0 data, block 1 data
            p.extend_from_slice(main);
            p
        }
        let mut main = (T0 + 7).to_le_bytes().to_vec();
        main.resize(300, 0);
        let cases = [
            (0xD110, 0x01 | 0x04, true),  // PG15: hole + pglz
            (0xD110, 0x01 | 0x02, false), // PG15: hole + apply, uncompressed
            (0xD10D, 0x01 | 0x02, true),  // PG14: hole + compressed
            (0xD10D, 0x01 | 0x04, false), // PG14: hole + apply
            (0xD118, 0x01 | 0x10, true),  // PG18: hole + zstd
        ];
        for (magic, bimg_info, hole_len_field) in cases {
            let mut b = WalBuilder::new(BASE);
            b.magic = magic;
            b.raw(RM_XACT_ID, 0, 5, &payload(bimg_info, hole_len_field, &main));
            let (records, stop) = scan(BASE, &b.buf);
            assert_eq!(stop, None, "magic {magic:X} info {bimg_info:X}");
            assert_eq!(records[0].xact_end_time(), Some(PgTime(T0 + 7)));
        }

        // Lengths that do not add up end the scan (as DecodeXLogRecord fails recovery).
        let mut b = WalBuilder::new(BASE);
        let mut bad = payload(0x01 | 0x04, true, &main);
        bad.pop();
        b.raw(RM_XACT_ID, 0, 5, &bad);
        let (_, _, reason) = {
            b.zero_tail(8);
            end_of(&b)
        };
        assert!(matches!(reason, WalEndReason::BadRecordLayout { .. }));
    }

    #[test]
    fn summary_of_a_stretch_of_wal() {
        let mut b = WalBuilder::new(BASE);
        let (c1, _) = b.commit(1, T0);
        b.abort(2, T0 + 1);
        b.big(9000);
        b.restore_point("rp1", T0 + 2);
        let (c3, _) = b.commit(3, T0 + 3);
        b.zero_tail(8);
        let s = summarize_wal(Lsn(BASE), seg(), &b.buf).unwrap();
        assert_eq!(s.records, 5);
        assert_eq!((s.commits, s.aborts), (2, 1));
        assert_eq!(
            s.first_commit,
            Some(XactStamp {
                lsn: Lsn(c1),
                time: PgTime(T0)
            })
        );
        assert_eq!(
            s.last_commit,
            Some(XactStamp {
                lsn: Lsn(c3),
                time: PgTime(T0 + 3)
            })
        );
        assert_eq!(s.restore_points.len(), 1);
        assert!(s.end_of_valid_wal.is_some());

        let json = serde_json::to_string(&s).unwrap();
        assert!(
            json.contains(r#""first_commit":{"lsn":"0/1000028","time":848661737866504}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<WalSummary>(&json).unwrap(), s);

        // A cut-off record is left out and is not an end of WAL.
        let s = summarize_wal(Lsn(BASE), seg(), &b.buf[..b.lsn_at(c3) + 10]).unwrap();
        assert_eq!((s.records, s.end_of_valid_wal), (4, None));

        assert!(summarize_wal(Lsn(BASE + 3), seg(), &b.buf).is_err());
    }

    #[test]
    fn pg_time_conversions() {
        let epoch: Timestamp = "2000-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(PgTime(0).to_timestamp(), Some(epoch));
        assert_eq!(PgTime::from_timestamp(epoch), PgTime(0));
        let t: Timestamp = "2026-11-22T11:22:17.866504Z".parse().unwrap();
        assert_eq!(timestamp_to_pg_time(t), T0);
        assert_eq!(pg_time_to_timestamp(T0), Some(t));
        assert_eq!(PgTime(T0).to_string(), "2026-11-22T11:22:17.866504Z");
        let before: Timestamp = "1999-12-31T23:59:59.5Z".parse().unwrap();
        assert_eq!(PgTime::from(before), PgTime(-500_000));
        assert_eq!(PgTime(i64::MAX).to_timestamp(), None);
        assert_eq!(PgTime(i64::MIN).to_timestamp(), None);
        assert_eq!(
            PgTime(i64::MAX).to_string(),
            format!("PgTime({})", i64::MAX)
        );
    }

    #[test]
    fn magic_table() {
        let majors: Vec<_> = [0xD106, 0xD10D, 0xD110, 0xD113, 0xD116, 0xD118, 0xD101, 0]
            .into_iter()
            .map(pg_major_for_magic)
            .collect();
        assert_eq!(
            majors,
            [
                Some(13),
                Some(14),
                Some(15),
                Some(16),
                Some(17),
                Some(18),
                None,
                None
            ]
        );
    }

    /// WAL with every shape at once, from a segment start (1 MiB segments).
    fn mixed_wal() -> &'static WalBuilder {
        static WAL: OnceLock<WalBuilder> = OnceLock::new();
        WAL.get_or_init(|| {
            let mut b = WalBuilder::new(BASE);
            b.commit(1, T0);
            b.fill_to(8176);
            b.commit(2, T0 + 1);
            b.fill_to(8184);
            b.abort(3, T0 + 2);
            b.big(40_000);
            b.restore_point("rp", T0 + 3);
            b.big(1_200_000);
            for i in 0..20 {
                b.commit(10 + i, T0 + 10 + i64::from(i));
            }
            b.switch();
            b.fill_to(8184);
            b.big(9000);
            b.commit(50, T0 + 50);
            b.zero_tail(100);
            b
        })
    }

    /// Page-aligned places to start in `mixed_wal` (some inside a record).
    fn start_points() -> Vec<u64> {
        vec![
            BASE,
            BASE + XLOG_BLCKSZ,
            BASE + 10 * XLOG_BLCKSZ,
            BASE + SEG,
            BASE + SEG + 3 * XLOG_BLCKSZ,
            BASE + 2 * SEG,
        ]
    }

    /// Starts at a segment, a page, a record-aligned offset, inside a header, misaligned.
    fn odd_starts() -> Vec<u64> {
        vec![BASE, BASE + XLOG_BLCKSZ, BASE + 64, BASE + 8, BASE + 3]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn any_chunking_yields_the_same_records(
            chunks in proptest::collection::vec(1usize..20_000, 1..40),
            start in proptest::sample::select(start_points()),
        ) {
            let b = mixed_wal();
            let bytes = &b.buf[b.lsn_at(start)..];
            let whole = scan(start, bytes);
            prop_assert!(whole.1.is_some());
            prop_assert!(whole.0.len() >= 3);
            prop_assert_eq!(scan_chunks(start, bytes, &chunks), whole);
        }

        #[test]
        fn corrupted_wal_keeps_the_records_before_the_damage(
            damage in proptest::collection::vec((0usize..120_000, 1u8..=255), 1..4),
        ) {
            let b = mixed_wal();
            let original = scan(BASE, &b.buf).0;
            let mut bytes = b.buf.clone();
            for &(at, x) in &damage {
                bytes[at] ^= x;
            }
            let first = damage.iter().map(|d| d.0).min().unwrap() as u64 + BASE;
            let (got, _) = scan_chunks(BASE, &bytes, &[3000, 7]);
            let intact: Vec<&Record> = original.iter().filter(|r| r.end.0 <= first).collect();
            prop_assert!(got.len() >= intact.len());
            for (g, o) in got.iter().zip(intact) {
                prop_assert_eq!(g, o);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..30_000),
            start in proptest::sample::select(odd_starts()),
            chunk in 1usize..5000,
        ) {
            let _ = scan_chunks(start, &bytes, &[chunk]);
        }

        #[test]
        fn plausible_headers_with_junk_never_panic(
            junk in proptest::collection::vec(any::<u8>(), 0..20_000),
            info in 0u16..16,
            rem_len in any::<u32>(),
        ) {
            // A valid long page header, then anything.
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&PG15.to_le_bytes());
            bytes.extend_from_slice(&(info | XLP_LONG_HEADER).to_le_bytes());
            bytes.extend_from_slice(&1u32.to_le_bytes());
            bytes.extend_from_slice(&BASE.to_le_bytes());
            bytes.extend_from_slice(&rem_len.to_le_bytes());
            bytes.extend_from_slice(&[0; 4]);
            bytes.extend_from_slice(&SYSID.to_le_bytes());
            bytes.extend_from_slice(&(SEG as u32).to_le_bytes());
            bytes.extend_from_slice(&(XLOG_BLCKSZ as u32).to_le_bytes());
            bytes.extend_from_slice(&junk);
            let _ = scan_chunks(BASE, &bytes, &[4096]);
        }
    }
}
