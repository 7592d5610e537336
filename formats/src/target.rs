//! Recovery target times as users type them.
//!
//! Accepted: RFC 3339 (`2026-11-23T02:59:30Z`, `…+01:00`) and Postgres style
//! `YYYY-MM-DD HH:MM:SS[.ffffff]±TZ` (`+01`, `+0100`, `+01:00`, `Z`). A time without
//! a zone is an error, never a guess: at 3 a.m. the server's zone and the operator's
//! may differ.

use jiff::Timestamp;

use crate::error::{Error, Result};

pub fn parse_time(input: &str) -> Result<Timestamp> {
    let bad = |reason: &str| Error::InvalidTime {
        input: input.to_string(),
        reason: reason.to_string(),
    };
    let s = input.trim();
    // jiff would accept bracketed IANA annotations; keep the accepted grammar small.
    if s.contains('[') {
        return Err(bad(
            "time zone names are not accepted; give an offset like +01:00 or Z",
        ));
    }
    let fraction = s
        .split_once('.')
        .map(|(_, rest)| rest.bytes().take_while(u8::is_ascii_digit).count())
        .unwrap_or(0);
    if fraction > 6 {
        return Err(bad(
            "at most 6 fractional digits (microseconds), as Postgres keeps",
        ));
    }
    match s.parse::<Timestamp>() {
        Ok(t) => Ok(t),
        Err(_) if s.len() >= 19 && !has_offset(&s[19..]) => Err(bad(
            "the time has no zone; add one, e.g. \"2026-11-23 02:59:30+00\" or \"2026-11-23T02:59:30Z\"",
        )),
        Err(e) => Err(bad(&format!(
            "expected RFC 3339 or \"YYYY-MM-DD HH:MM:SS[.ffffff]±TZ\" ({e})"
        ))),
    }
}

fn has_offset(tail: &str) -> bool {
    tail.contains(['Z', 'z', '+', '-'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms_agree() {
        let want: Timestamp = "2026-11-23T02:59:30Z".parse().unwrap();
        for s in [
            "2026-11-23T02:59:30Z",
            "2026-11-23T03:59:30+01:00",
            "2026-11-23 02:59:30+00",
            "2026-11-23 02:59:30Z",
            "2026-11-23 04:59:30+0200",
            "2026-11-22 21:59:30-05:00",
        ] {
            assert_eq!(parse_time(s).unwrap(), want, "{s}");
        }
        let micro = parse_time("2026-11-23 02:59:30.123456+00").unwrap();
        assert_eq!(micro.subsec_microsecond(), 123_456);
    }

    #[test]
    fn rejected_forms_say_why() {
        let e = parse_time("2026-11-23 02:59:30").unwrap_err().to_string();
        assert!(e.contains("no zone"), "{e}");
        for s in [
            "",
            "yesterday",
            "2026-13-01 00:00:00Z",
            "2026-11-23 25:00:00Z",
            "2026-11-23",
            "2026-11-23 02:59:30.1234567Z",
            "2026-11-23T02:59:30Z[Europe/Paris]",
        ] {
            assert!(parse_time(s).is_err(), "{s:?} must be rejected");
        }
    }
}
