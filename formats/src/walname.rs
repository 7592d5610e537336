//! WAL file names as Postgres writes them: segments, `.partial`, `.history`, `.backup`.

use crate::error::{Error, Result};
use crate::lsn::{SegmentNo, SegmentSize, TimelineId};

/// A file name that can appear in `pg_wal/` or in an archive.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum WalFileName {
    /// `000000010000000A0000003F`
    Segment { tli: TimelineId, segno: SegmentNo },
    /// `000000010000000A0000003F.partial`: an incomplete segment left at a timeline switch.
    Partial { tli: TimelineId, segno: SegmentNo },
    /// `00000002.history`
    History { tli: TimelineId },
    /// `000000010000000A0000003F.00000028.backup`: backup history file; offset within the segment.
    Backup {
        tli: TimelineId,
        segno: SegmentNo,
        offset: u32,
    },
}

impl WalFileName {
    /// Parses a bare file name (no directory) for the given segment size.
    pub fn parse(name: &str, size: SegmentSize) -> Result<Self> {
        let err = |reason| Error::InvalidWalFileName {
            name: name.to_string(),
            reason,
        };
        if let Some(tli) = name.strip_suffix(".history") {
            let tli = parse_timeline(tli)
                .ok_or_else(|| err("expected 8 upper-case hex digits before .history"))?;
            return Ok(WalFileName::History { tli });
        }
        if let Some(stem) = name.strip_suffix(".partial") {
            let (tli, segno) = parse_segment(stem, size).map_err(err)?;
            return Ok(WalFileName::Partial { tli, segno });
        }
        if let Some(stem) = name.strip_suffix(".backup") {
            let (seg, off) = stem
                .split_once('.')
                .ok_or_else(|| err("expected SEGMENT.OFFSET.backup"))?;
            let (tli, segno) = parse_segment(seg, size).map_err(err)?;
            let offset = parse_hex8(off)
                .ok_or_else(|| err("expected an 8-digit hex offset before .backup"))?;
            if u64::from(offset) >= size.bytes() {
                return Err(err("backup offset lies beyond the segment size"));
            }
            return Ok(WalFileName::Backup { tli, segno, offset });
        }
        let (tli, segno) = parse_segment(name, size).map_err(err)?;
        Ok(WalFileName::Segment { tli, segno })
    }

    pub fn timeline(&self) -> TimelineId {
        match *self {
            WalFileName::Segment { tli, .. }
            | WalFileName::Partial { tli, .. }
            | WalFileName::History { tli }
            | WalFileName::Backup { tli, .. } => tli,
        }
    }

    /// The file name, formatted for the given segment size.
    pub fn format(&self, size: SegmentSize) -> String {
        match *self {
            WalFileName::Segment { tli, segno } => segment_file_name(tli, segno, size),
            WalFileName::Partial { tli, segno } => {
                format!("{}.partial", segment_file_name(tli, segno, size))
            }
            WalFileName::History { tli } => format!("{:08X}.history", tli.0),
            WalFileName::Backup { tli, segno, offset } => {
                format!(
                    "{}.{offset:08X}.backup",
                    segment_file_name(tli, segno, size)
                )
            }
        }
    }
}

/// `%08X%08X%08X` of (timeline, segno / segments-per-log, segno % segments-per-log).
pub fn segment_file_name(tli: TimelineId, segno: SegmentNo, size: SegmentSize) -> String {
    let per_log = size.segments_per_log();
    format!(
        "{:08X}{:08X}{:08X}",
        tli.0,
        segno.0 / per_log,
        segno.0 % per_log
    )
}

fn parse_hex8(s: &str) -> Option<u32> {
    if s.len() != 8
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

fn parse_timeline(s: &str) -> Option<TimelineId> {
    match parse_hex8(s)? {
        0 => None,
        t => Some(TimelineId(t)),
    }
}

fn parse_segment(
    s: &str,
    size: SegmentSize,
) -> std::result::Result<(TimelineId, SegmentNo), &'static str> {
    if s.len() != 24 {
        return Err("expected 24 upper-case hex digits");
    }
    let field = |i: usize| s.get(i * 8..i * 8 + 8).and_then(parse_hex8);
    let (Some(tli), Some(log), Some(seg)) = (field(0), field(1), field(2)) else {
        return Err("expected 24 upper-case hex digits");
    };
    if tli == 0 {
        return Err("timeline 0 does not exist");
    }
    let per_log = size.segments_per_log();
    if u64::from(seg) >= per_log {
        return Err("segment field too large for this wal_segment_size");
    }
    Ok((
        TimelineId(tli),
        SegmentNo(u64::from(log) * per_log + u64::from(seg)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use proptest::prelude::*;

    const S16: SegmentSize = SegmentSize::DEFAULT;

    #[test]
    fn known_names() {
        let l: Lsn = "0/706FF70".parse().unwrap();
        assert_eq!(
            segment_file_name(TimelineId(1), l.segment(S16), S16),
            "000000010000000000000007"
        );
        assert_eq!(
            WalFileName::parse("000000010000000A0000003F", S16).unwrap(),
            WalFileName::Segment {
                tli: TimelineId(1),
                segno: SegmentNo(0xA * 256 + 0x3F)
            }
        );
        assert_eq!(
            WalFileName::parse("00000002.history", S16).unwrap(),
            WalFileName::History { tli: TimelineId(2) }
        );
        assert_eq!(
            WalFileName::parse("000000010000000000000006.00000028.backup", S16).unwrap(),
            WalFileName::Backup {
                tli: TimelineId(1),
                segno: SegmentNo(6),
                offset: 0x28
            }
        );
        assert!(matches!(
            WalFileName::parse("00000001000000000000000A.partial", S16).unwrap(),
            WalFileName::Partial { .. }
        ));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "00000001000000000000000",
            "0000000100000000000000070",
            "000000010000000000000g07",
            "000000010000000000000a07",
            "000000000000000000000007",
            "00000001000000000000FF00",
            "0000000.history",
            "00000000.history",
            "000000010000000000000006.backup",
            "000000010000000000000006.01000000.backup",
            "RECOVERYXLOG",
        ] {
            assert!(
                WalFileName::parse(bad, S16).is_err(),
                "{bad:?} must not parse"
            );
        }
        // With 1 GiB segments only 4 segments fit in a log id.
        let g = SegmentSize::new(1 << 30).unwrap();
        assert!(WalFileName::parse("000000010000000000000004", g).is_err());
        assert!(WalFileName::parse("000000010000000000000003", g).is_ok());
    }

    fn any_name() -> impl Strategy<Value = (WalFileName, SegmentSize)> {
        (
            20u32..=30,
            1u32..=u32::MAX,
            any::<u32>(),
            any::<u32>(),
            0u8..4,
        )
            .prop_map(|(shift, tli, log, off, kind)| {
                let size = SegmentSize::new(1 << shift).unwrap();
                let segno = SegmentNo(
                    u64::from(log) * size.segments_per_log()
                        + u64::from(off) % size.segments_per_log(),
                );
                let tli = TimelineId(tli);
                let name = match kind {
                    0 => WalFileName::Segment { tli, segno },
                    1 => WalFileName::Partial { tli, segno },
                    2 => WalFileName::History { tli },
                    _ => WalFileName::Backup {
                        tli,
                        segno,
                        offset: (u64::from(off) % size.bytes()) as u32,
                    },
                };
                (name, size)
            })
    }

    proptest! {
        #[test]
        fn names_round_trip((name, size) in any_name()) {
            let text = name.format(size);
            prop_assert_eq!(WalFileName::parse(&text, size).unwrap(), name);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,48}") {
            let _ = WalFileName::parse(&s, S16);
        }
    }
}
