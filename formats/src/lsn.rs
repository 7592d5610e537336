//! Log sequence numbers, timelines, segment numbers and segment sizes, in Postgres notation.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A position in the WAL: a byte offset, printed as `16/B374D848`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const INVALID: Lsn = Lsn(0);

    pub fn checked_add(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_add(bytes).map(Lsn)
    }

    pub fn checked_sub(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_sub(bytes).map(Lsn)
    }

    /// Bytes from `earlier` to `self`, or None if `earlier` is later.
    pub fn distance_from(self, earlier: Lsn) -> Option<u64> {
        self.0.checked_sub(earlier.0)
    }

    /// The segment this byte lives in.
    pub fn segment(self, size: SegmentSize) -> SegmentNo {
        SegmentNo(self.0 / size.bytes())
    }

    /// Offset of this byte within its segment.
    pub fn segment_offset(self, size: SegmentSize) -> u64 {
        self.0 & (size.bytes() - 1)
    }

    pub fn is_segment_start(self, size: SegmentSize) -> bool {
        self.segment_offset(size) == 0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

impl FromStr for Lsn {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidLsn {
            input: s.to_string(),
        };
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let part = |p: &str| {
            if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(p, 16).map_err(|_| bad())
        };
        Ok(Lsn((u64::from(part(hi)?) << 32) | u64::from(part(lo)?)))
    }
}

impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A timeline id. Timeline 0 does not exist in Postgres.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TimelineId(pub u32);

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A WAL segment number: `lsn / wal_segment_size`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SegmentNo(pub u64);

impl SegmentNo {
    pub fn start_lsn(self, size: SegmentSize) -> Option<Lsn> {
        self.0.checked_mul(size.bytes()).map(Lsn)
    }

    pub fn next(self) -> Option<SegmentNo> {
        self.0.checked_add(1).map(SegmentNo)
    }
}

/// `wal_segment_size`: a power of two from 1 MiB to 1 GiB, fixed at initdb.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct SegmentSize(u64);

impl SegmentSize {
    pub const MIN: u64 = 1 << 20;
    pub const MAX: u64 = 1 << 30;
    pub const DEFAULT: SegmentSize = SegmentSize(16 << 20);

    pub fn new(bytes: u64) -> Result<Self> {
        if bytes.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&bytes) {
            Ok(SegmentSize(bytes))
        } else {
            Err(Error::InvalidSegmentSize { bytes })
        }
    }

    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Segments per 4 GiB "log" id, the middle field of a WAL file name.
    pub fn segments_per_log(self) -> u64 {
        (1u64 << 32) / self.0
    }
}

impl TryFrom<u64> for SegmentSize {
    type Error = Error;
    fn try_from(v: u64) -> Result<Self> {
        SegmentSize::new(v)
    }
}

impl From<SegmentSize> for u64 {
    fn from(s: SegmentSize) -> u64 {
        s.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lsn_notation() {
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap(), Lsn(0x16_B374_D848));
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!("0/706FF70".parse::<Lsn>().unwrap(), Lsn(0x706_FF70));
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "1/2/3",
            "G/0",
            "123456789/0",
            "1 /2",
            "+1/2",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn segment_math() {
        let s = SegmentSize::DEFAULT;
        let l: Lsn = "0/706FF70".parse().unwrap();
        assert_eq!(l.segment(s), SegmentNo(7));
        assert_eq!(l.segment_offset(s), 0x6FF70);
        assert_eq!(SegmentNo(7).start_lsn(s), Some(Lsn(0x700_0000)));
        assert!(SegmentSize::new(3 << 20).is_err());
        assert!(SegmentSize::new(1 << 19).is_err());
        assert!(SegmentSize::new(2 << 30).is_err());
        assert_eq!(SegmentSize::new(1 << 30).unwrap().segments_per_log(), 4);
    }

    #[test]
    fn checked_arithmetic() {
        assert_eq!(Lsn(u64::MAX).checked_add(1), None);
        assert_eq!(Lsn(0).checked_sub(1), None);
        assert_eq!(Lsn(10).distance_from(Lsn(4)), Some(6));
        assert_eq!(Lsn(4).distance_from(Lsn(10)), None);
    }

    proptest! {
        #[test]
        fn lsn_round_trips(v: u64) {
            let l = Lsn(v);
            prop_assert_eq!(l.to_string().parse::<Lsn>().unwrap(), l);
            prop_assert_eq!(serde_json::from_str::<Lsn>(&serde_json::to_string(&l).unwrap()).unwrap(), l);
        }

        #[test]
        fn segment_and_offset_recompose(v in 0u64..(1u64 << 62), shift in 20u32..=30) {
            let s = SegmentSize::new(1 << shift).unwrap();
            let l = Lsn(v);
            let start = l.segment(s).start_lsn(s).unwrap();
            prop_assert_eq!(start.checked_add(l.segment_offset(s)), Some(l));
        }
    }
}
