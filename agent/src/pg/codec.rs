//! Sans-IO framing and the replication sub-protocol: feed bytes into a `BytesMut`, take
//! typed messages out. Nothing here does I/O or panics on bytes from the network.
//!
//! postgres-protocol's `backend::Message::parse` knows no CopyBothResponse ('W'), so we
//! frame every message ourselves (tag byte + i32 length), decode 'W' here and hand the rest
//! to `Message::parse`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{DataRowBody, ErrorResponseBody, Message};
use walferry_formats::Lsn;

use super::error::{PgError, Result, ServerError};

/// Largest backend message we accept (PostgreSQL's MaxAllocSize).
pub(crate) const MAX_MESSAGE_LEN: usize = 0x3fff_ffff;

/// Seconds from the Unix epoch to the PostgreSQL epoch (2000-01-01 00:00:00 UTC).
const PG_EPOCH_OFFSET_SECS: u64 = 946_684_800;

/// A backend message: the ones postgres-protocol knows, plus CopyBothResponse.
pub(crate) enum Backend {
    CopyBothResponse {
        format: u8,
        column_formats: Vec<u16>,
    },
    Message(Message),
}

/// Take one complete message off the front of `buf`, or None if more bytes are needed.
pub(crate) fn decode(buf: &mut BytesMut) -> Result<Option<Backend>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > MAX_MESSAGE_LEN {
        return Err(PgError::protocol(format!(
            "invalid length {len} of message '{}'",
            tag.escape_ascii()
        )));
    }
    let total = len as usize + 1;
    if buf.len() < total {
        return Ok(None);
    }
    if tag == b'W' {
        let mut body = buf.split_to(total).freeze();
        body.advance(5);
        return decode_copy_both(body).map(Some);
    }
    match Message::parse(buf) {
        Ok(Some(m)) => Ok(Some(Backend::Message(m))),
        Ok(None) => Err(PgError::protocol("message framing mismatch")),
        Err(e) => Err(PgError::protocol(format!(
            "malformed message '{}': {e}",
            tag.escape_ascii()
        ))),
    }
}

/// Bytes still missing for the message at the front of `buf` (at least 1 when incomplete).
pub(crate) fn bytes_needed(buf: &[u8]) -> usize {
    if buf.len() < 5 {
        return 5 - buf.len();
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]).max(4) as usize;
    (len + 1).saturating_sub(buf.len()).max(1)
}

fn decode_copy_both(mut body: Bytes) -> Result<Backend> {
    let bad = || PgError::protocol("malformed CopyBothResponse");
    if body.remaining() < 3 {
        return Err(bad());
    }
    let format = body.get_u8();
    let n = body.get_i16();
    if n < 0 || body.remaining() != n as usize * 2 {
        return Err(bad());
    }
    let column_formats = (0..n).map(|_| body.get_u16()).collect();
    Ok(Backend::CopyBothResponse {
        format,
        column_formats,
    })
}

/// The fields of an ErrorResponse/NoticeResponse.
pub(crate) fn server_error(body: &ErrorResponseBody) -> ServerError {
    let mut fields = Vec::new();
    let mut it = body.fields();
    // A malformed field list keeps what was read so far.
    while let Ok(Some(f)) = it.next() {
        fields.push((f.type_(), f.value_bytes().to_vec()));
    }
    ServerError::from_fields(fields.iter().map(|(t, v)| (*t, v.as_slice())))
}

/// The columns of a DataRow (None = SQL NULL).
pub(crate) fn row_values(row: &DataRowBody) -> Result<Vec<Option<Bytes>>> {
    let buf = row.buffer_bytes();
    row.ranges()
        .map(|r| {
            Ok(match r {
                Some(r) => Some(buf.get(r.clone()).map(|_| buf.slice(r)).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "column out of range")
                })?),
                None => None,
            })
        })
        .collect()
        .map_err(|e: std::io::Error| PgError::protocol(format!("malformed DataRow: {e}")))
}

/// A CopyData payload from a walsender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ServerCopyData {
    /// 'w': WAL bytes starting at `start`; `wal_end` is the server's current end of WAL.
    XLogData {
        start: Lsn,
        wal_end: Lsn,
        send_time: i64,
        data: Bytes,
    },
    /// 'k': keepalive.
    Keepalive {
        wal_end: Lsn,
        send_time: i64,
        reply_requested: bool,
    },
}

/// Parse a walsender CopyData payload ('w' or 'k').
pub(crate) fn parse_copy_data(mut data: Bytes) -> Result<ServerCopyData> {
    let Some(&kind) = data.first() else {
        return Err(PgError::protocol("empty CopyData message"));
    };
    match kind {
        b'w' => {
            if data.len() < 25 {
                return Err(PgError::protocol(format!(
                    "XLogData message too short ({} bytes)",
                    data.len()
                )));
            }
            data.advance(1);
            let start = Lsn(data.get_u64());
            let wal_end = Lsn(data.get_u64());
            let send_time = data.get_i64();
            if start.checked_add(data.len() as u64).is_none() {
                return Err(PgError::protocol(
                    "XLogData runs past the end of the LSN space",
                ));
            }
            Ok(ServerCopyData::XLogData {
                start,
                wal_end,
                send_time,
                data,
            })
        }
        b'k' => {
            if data.len() < 18 {
                return Err(PgError::protocol(format!(
                    "keepalive message too short ({} bytes)",
                    data.len()
                )));
            }
            data.advance(1);
            let wal_end = Lsn(data.get_u64());
            let send_time = data.get_i64();
            let reply_requested = data.get_u8() != 0;
            Ok(ServerCopyData::Keepalive {
                wal_end,
                send_time,
                reply_requested,
            })
        }
        other => Err(PgError::protocol(format!(
            "unknown replication message '{}'",
            other.escape_ascii()
        ))),
    }
}

/// Append a CopyData('r' standby status update) message to `out`.
pub(crate) fn encode_status(
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    client_time: i64,
    reply_requested: bool,
    out: &mut BytesMut,
) {
    out.put_u8(b'd');
    out.put_i32(4 + 34);
    out.put_u8(b'r');
    out.put_u64(write.0);
    out.put_u64(flush.0);
    out.put_u64(apply.0);
    out.put_i64(client_time);
    out.put_u8(u8::from(reply_requested));
}

/// Microseconds since 2000-01-01 UTC (PostgreSQL's TimestampTz) as a SystemTime.
pub fn pg_timestamp_to_system_time(us: i64) -> SystemTime {
    let epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_OFFSET_SECS);
    let d = Duration::from_micros(us.unsigned_abs());
    let t = if us >= 0 {
        epoch.checked_add(d)
    } else {
        epoch.checked_sub(d)
    };
    t.unwrap_or(epoch)
}

/// A SystemTime as microseconds since 2000-01-01 UTC.
pub fn system_time_to_pg_timestamp(t: SystemTime) -> i64 {
    let epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_OFFSET_SECS);
    match t.duration_since(epoch) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_micros()).map_or(i64::MIN, |v| -v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn decodes_copy_both_and_hands_the_rest_on() {
        // Recorded from PostgreSQL 15 after START_REPLICATION: 'W' format 0, 0 columns.
        let mut buf = BytesMut::from(&frame(b'W', &[0, 0, 0])[..]);
        // Followed by a CopyData keepalive in the same read.
        let mut k = vec![b'k'];
        k.extend_from_slice(&0x0000_0001_0000_0100u64.to_be_bytes());
        k.extend_from_slice(&12345i64.to_be_bytes());
        k.push(1);
        buf.extend_from_slice(&frame(b'd', &k));
        match decode(&mut buf).unwrap().unwrap() {
            Backend::CopyBothResponse {
                format,
                column_formats,
            } => {
                assert_eq!(format, 0);
                assert!(column_formats.is_empty());
            }
            Backend::Message(_) => panic!("expected CopyBothResponse"),
        }
        let Backend::Message(Message::CopyData(body)) = decode(&mut buf).unwrap().unwrap() else {
            panic!("expected CopyData")
        };
        assert!(buf.is_empty());
        assert_eq!(
            parse_copy_data(body.into_bytes()).unwrap(),
            ServerCopyData::Keepalive {
                wal_end: Lsn(0x0000_0001_0000_0100),
                send_time: 12345,
                reply_requested: true
            }
        );
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let full = frame(b'W', &[0, 0, 1, 0, 0]);
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert!(decode(&mut buf).unwrap().is_none(), "cut {cut}");
            assert!(bytes_needed(&buf) >= 1);
            assert_eq!(buf.len(), cut, "nothing consumed");
        }
        let mut buf = BytesMut::from(&full[..]);
        let Backend::CopyBothResponse { column_formats, .. } = decode(&mut buf).unwrap().unwrap()
        else {
            panic!()
        };
        assert_eq!(column_formats, vec![0]);
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        for bad in [
            frame(b'W', &[0]),                  // too short
            frame(b'W', &[0, 0, 2, 0, 0]),      // says 2 columns, has 1
            frame(b'W', &[0, 0xff, 0xff]),      // negative count
            vec![b'Z', 0, 0, 0, 2],             // length < 4
            vec![b'd', 0x7f, 0xff, 0xff, 0xff], // absurd length
            frame(b'?', &[1, 2, 3]),            // unknown tag
        ] {
            let mut buf = BytesMut::from(&bad[..]);
            assert!(decode(&mut buf).is_err(), "{bad:?}");
        }
        for payload in [&b""[..], b"w123", b"k", b"x0000000000000000000"] {
            assert!(parse_copy_data(Bytes::copy_from_slice(payload)).is_err());
        }
    }

    #[test]
    fn xlogdata_and_status_layouts() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&0x1600_0000u64.to_be_bytes());
        w.extend_from_slice(&0x1600_0100u64.to_be_bytes());
        w.extend_from_slice(&(-5i64).to_be_bytes());
        w.extend_from_slice(b"walbytes");
        let ServerCopyData::XLogData {
            start,
            wal_end,
            send_time,
            data,
        } = parse_copy_data(Bytes::from(w)).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (start, wal_end, send_time),
            (Lsn(0x1600_0000), Lsn(0x1600_0100), -5)
        );
        assert_eq!(&data[..], b"walbytes");

        let mut out = BytesMut::new();
        encode_status(Lsn(1), Lsn(2), Lsn(3), 4, true, &mut out);
        assert_eq!(out.len(), 1 + 4 + 34);
        assert_eq!(out[0], b'd');
        assert_eq!(&out[1..5], &38i32.to_be_bytes());
        assert_eq!(out[5], b'r');
        assert_eq!(&out[6..14], &1u64.to_be_bytes());
        assert_eq!(&out[14..22], &2u64.to_be_bytes());
        assert_eq!(&out[22..30], &3u64.to_be_bytes());
        assert_eq!(&out[30..38], &4i64.to_be_bytes());
        assert_eq!(out[38], 1);
    }

    #[test]
    fn pg_epoch_conversions() {
        let t = UNIX_EPOCH + Duration::from_secs(946_684_800);
        assert_eq!(system_time_to_pg_timestamp(t), 0);
        assert_eq!(pg_timestamp_to_system_time(0), t);
        let later = t + Duration::from_micros(1_500_000);
        assert_eq!(system_time_to_pg_timestamp(later), 1_500_000);
        assert_eq!(pg_timestamp_to_system_time(1_500_000), later);
        assert_eq!(
            system_time_to_pg_timestamp(UNIX_EPOCH),
            -946_684_800_000_000
        );
        assert_eq!(
            pg_timestamp_to_system_time(-946_684_800_000_000),
            UNIX_EPOCH
        );
    }
}
