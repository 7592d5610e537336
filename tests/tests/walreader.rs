//! The WAL scanner on WAL written by a real PostgreSQL, checked record by record against
//! `pg_waldump` over the same range: start LSN, `xl_prev`, xid and length of every record,
//! the time of every commit/abort/prepare, the names of restore points, two-phase xids,
//! and where valid WAL ends.

use std::path::Path;
use std::process::Stdio;

use walferry_formats::walname::segment_file_name;
use walferry_formats::walreader::{PgTime, Record, RecordKind, WalScanner};
use walferry_formats::{Error, Lsn, SegmentNo, SegmentSize, TimelineId};
use walferry_tests::pg::PgCluster;

/// One line of `pg_waldump` output.
#[derive(Debug)]
struct Dumped {
    rmgr: String,
    tot_len: u32,
    xid: u32,
    lsn: Lsn,
    prev: Lsn,
    desc: String,
}

/// What `pg_waldump` printed, and where it said valid WAL ends.
struct Dump {
    records: Vec<Dumped>,
    /// `error in WAL record at X`: the last record it read.
    last_read: Option<Lsn>,
    /// `invalid record length at Y: wanted 24, got 0`.
    zero_length_at: Option<Lsn>,
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let at = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {line:?}"));
    let rest = &line[at + key.len()..];
    rest.trim_start()
        .split([',', ' '])
        .next()
        .unwrap_or_default()
}

fn parse_dump_line(line: &str) -> Dumped {
    let rmgr = field(line, "rmgr:").to_string();
    let (_, lens) = line.split_once("len (rec/tot):").unwrap();
    let tot = lens.split(',').next().unwrap().split('/').nth(1).unwrap();
    Dumped {
        rmgr,
        tot_len: tot.trim().parse().unwrap(),
        xid: field(line, "tx:").parse().unwrap(),
        lsn: field(line, "lsn:").parse().unwrap(),
        prev: field(line, "prev").parse().unwrap(),
        desc: line
            .split_once("desc: ")
            .map(|(_, d)| d)
            .unwrap_or("")
            .to_string(),
    }
}

/// `pg_waldump -p pg_wal -s start` (to the end of valid WAL), times printed in UTC.
fn pg_waldump(pg: &PgCluster, start: Lsn) -> Dump {
    let out = pg
        .command("pg_waldump")
        .env("TZ", "UTC")
        .arg("-p")
        .arg(pg.data_dir().join("pg_wal"))
        .arg("-s")
        .arg(start.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let records: Vec<Dumped> = stdout
        .lines()
        .filter(|l| l.starts_with("rmgr:"))
        .map(parse_dump_line)
        .collect();
    assert!(
        !records.is_empty(),
        "pg_waldump printed no records: {stderr}"
    );
    let lsn_after = |key: &str| {
        stderr.find(key).map(|i| {
            field(&stderr[i..], key)
                .trim_end_matches(':')
                .parse()
                .unwrap()
        })
    };
    Dump {
        records,
        last_read: lsn_after("error in WAL record at"),
        zero_length_at: lsn_after("invalid record length at"),
    }
}

/// The time pg_waldump printed in a transaction record's description.
fn dumped_time(desc: &str) -> PgTime {
    let i = desc
        .find(" UTC")
        .unwrap_or_else(|| panic!("no UTC time in {desc:?}"));
    let text = format!("{}Z", &desc[i - 26..i]);
    PgTime::from_timestamp(walferry_formats::target::parse_time(&text).unwrap())
}

/// Scan pg_wal's segment files from `start`, feeding each file in `chunk`-byte pieces.
/// Returns the records and where (and why) the scan stopped.
fn scan_pg_wal(
    pg_wal: &Path,
    start: Lsn,
    seg: SegmentSize,
    chunk: usize,
) -> (Vec<Record>, Lsn, String) {
    let mut scanner = WalScanner::new(start, seg);
    let mut records = Vec::new();
    let mut segno = start.segment(seg);
    let mut skip = start.segment_offset(seg) as usize;
    loop {
        let name = segment_file_name(TimelineId(1), segno, seg);
        let bytes = std::fs::read(pg_wal.join(&name))
            .unwrap_or_else(|e| panic!("read {name}: {e} (the scan never ended)"));
        assert_eq!(bytes.len() as u64, seg.bytes(), "{name}");
        for piece in bytes[skip..].chunks(chunk) {
            scanner.feed(piece);
            loop {
                match scanner.poll() {
                    Ok(Some(r)) => records.push(r),
                    Ok(None) => break,
                    Err(Error::WalEnd { lsn, reason }) => {
                        return (records, lsn, reason.to_string());
                    }
                    Err(e) => panic!("scan {name}: {e}"),
                }
            }
        }
        skip = 0;
        segno = SegmentNo(segno.0 + 1);
    }
}

/// Everything pg_waldump says about each record, we say too.
fn assert_same_records(ours: &[Record], dump: &Dump) -> Summary {
    let theirs = &dump.records;
    for (i, (o, t)) in ours.iter().zip(theirs).enumerate() {
        let ctx = || format!("record #{i}: ours {o:?}\npg_waldump {t:?}");
        assert_eq!(o.start, t.lsn, "{}", ctx());
        assert_eq!(o.prev, t.prev, "{}", ctx());
        assert_eq!(o.xid, t.xid, "{}", ctx());
        assert_eq!(o.len, t.tot_len, "{}", ctx());
    }
    assert_eq!(
        ours.len(),
        theirs.len(),
        "record counts differ; last ours {:?}, last pg_waldump {:?}",
        ours.last(),
        theirs.last()
    );

    let mut s = Summary::default();
    for (o, t) in ours.iter().zip(theirs) {
        let op = t.desc.split([' ', ';']).next().unwrap_or_default();
        match (&o.kind, t.rmgr.as_str()) {
            (RecordKind::Xact(x), "Transaction") => {
                assert_eq!(x.op.as_str(), op, "{o:?} vs {t:?}");
                assert_eq!(x.time, dumped_time(&t.desc), "{o:?} vs {t:?}");
                if let Some(xid) = t.desc.strip_prefix(&format!("{op} ")) {
                    if let Some((xid, _)) = xid.split_once(": ") {
                        if let Ok(xid) = xid.parse::<u32>() {
                            assert_eq!(o.ended_xid(), Some(xid), "{o:?} vs {t:?}");
                            s.twophase += 1;
                        }
                    }
                }
                *s.ops.entry(op.to_string()).or_default() += 1;
            }
            (RecordKind::RestorePoint { name, .. }, "XLOG") => {
                assert_eq!(t.desc, format!("RESTORE_POINT {name}"));
                s.restore_points.push(name.clone());
            }
            (RecordKind::Switch, "XLOG") => {
                assert_eq!(op, "SWITCH");
                s.switches += 1;
            }
            (RecordKind::Other, _) => {
                let decoded_by_us = match t.rmgr.as_str() {
                    "Transaction" => [
                        "COMMIT",
                        "ABORT",
                        "PREPARE",
                        "COMMIT_PREPARED",
                        "ABORT_PREPARED",
                    ]
                    .contains(&op),
                    "XLOG" => op == "SWITCH" || op == "RESTORE_POINT",
                    _ => false,
                };
                assert!(!decoded_by_us, "not decoded: {o:?} vs {t:?}");
            }
            _ => panic!("kinds differ: {o:?} vs {t:?}"),
        }
        if o.len as u64 > 8192 {
            s.multi_page += 1;
        }
    }
    s
}

#[derive(Default, Debug)]
struct Summary {
    ops: std::collections::BTreeMap<String, u64>,
    twophase: u64,
    restore_points: Vec<String>,
    switches: u64,
    multi_page: u64,
}

fn lsn(pg: &PgCluster, sql: &str) -> Lsn {
    pg.psql("postgres", sql).unwrap().parse().unwrap()
}

/// A mix of everything the scanner decodes, plus records that cross pages and segments.
const WORKLOAD: &str = "
create table t (id int, v text);
alter table t alter column v set storage external;
checkpoint;
insert into t select g, repeat(md5(g::text), 600) from generate_series(1, 30) g;
insert into t values (1, 'one');
insert into t values (2, 'two');
begin; insert into t values (3, 'rolled back'); rollback;
select pg_create_restore_point('rp1');
begin; insert into t values (4, 'sub'); savepoint s1; insert into t values (5, 'sub2');
  release s1; commit;
begin; insert into t values (6, 'sub'); savepoint s1; insert into t values (7, 'gone');
  rollback to s1; commit;
select pg_logical_emit_message(true, 'walferry', repeat('x', 2500000));
select pg_switch_wal();
insert into t values (8, 'after switch');
begin; insert into t values (9, '2pc'); prepare transaction 'g1';
commit prepared 'g1';
begin; insert into t values (10, '2pc aborted'); prepare transaction 'g2';
rollback prepared 'g2';
begin; create table tp (a int); insert into tp values (1); prepare transaction 'g3';
commit prepared 'g3';
begin; drop table tp; prepare transaction 'g4';
commit prepared 'g4';
create table filler as select g, repeat('y', 300) as v from generate_series(1, 20000) g;
checkpoint;
update filler set g = g + 1 where g % 7 = 0;
drop table filler;
select pg_create_restore_point('rp2');
select pg_logical_emit_message(false, 'walferry', repeat('z', 100000));
insert into t values (11, 'last');
";

#[test]
fn scanner_matches_pg_waldump_on_real_wal() {
    let pg = PgCluster::builder()
        .initdb_arg("--wal-segsize=1")
        .config("max_prepared_transactions", "5")
        .config("wal_keep_size", "1GB")
        .start()
        .unwrap();
    let seg = SegmentSize::new(1 << 20).unwrap();
    assert_eq!(pg.psql("postgres", "show wal_segment_size").unwrap(), "1MB");
    let begin = lsn(&pg, "select pg_current_wal_insert_lsn()");
    pg.psql("postgres", WORKLOAD).unwrap();
    pg.stop().unwrap();

    // From the start of the segment the workload began in.
    let start = begin.segment(seg).start_lsn(seg).unwrap();
    let dump = pg_waldump(&pg, start);
    let pg_wal = pg.data_dir().join("pg_wal");
    let (ours, end, reason) = scan_pg_wal(&pg_wal, start, seg, 64 << 10);
    let s = assert_same_records(&ours, &dump);
    eprintln!(
        "{} records, {:?}; stopped at {end}: {reason}",
        ours.len(),
        s
    );

    assert_eq!(s.ops.get("COMMIT_PREPARED"), Some(&3), "{s:?}");
    assert_eq!(s.ops.get("ABORT_PREPARED"), Some(&1), "{s:?}");
    assert_eq!(s.ops.get("PREPARE"), Some(&4), "{s:?}");
    assert!(s.ops.get("ABORT").is_some_and(|&n| n >= 1), "{s:?}");
    assert!(s.ops.get("COMMIT").is_some_and(|&n| n >= 15), "{s:?}");
    assert_eq!(s.twophase, 4, "{s:?}");
    assert_eq!(s.restore_points, ["rp1", "rp2"]);
    assert!(s.switches >= 1);
    assert!(s.multi_page >= 2, "{s:?}");
    assert!(
        ours.iter().any(|r| r.len as u64 > 2 * seg.bytes()),
        "a record spans segments"
    );

    // Where valid WAL ends, both agree.
    assert_eq!(dump.last_read, ours.last().map(|r| r.start));
    // (Past the shutdown checkpoint the segment is zero-filled.)
    assert_eq!(Some(end), dump.zero_length_at, "{reason}");

    // Any chunking gives the same answer.
    let (again, end_again, _) = scan_pg_wal(&pg_wal, start, seg, 8191);
    assert_eq!(again, ours);
    assert_eq!(end_again, end);
}

#[test]
fn scan_starts_inside_a_record_that_crosses_segments() {
    let pg = PgCluster::builder()
        .config("wal_keep_size", "1GB")
        .start()
        .unwrap();
    let seg = SegmentSize::DEFAULT;
    pg.psql(
        "postgres",
        "select pg_logical_emit_message(false, 'walferry', repeat('x', 100));",
    )
    .unwrap();
    let before = lsn(&pg, "select pg_current_wal_insert_lsn()");
    // A 17 MB record: it starts in one 16 MB segment and ends in the next.
    pg.psql(
        "postgres",
        "select pg_logical_emit_message(false, 'walferry', repeat('x', 17000000));\n\
         create table after_big (a int);\n\
         insert into after_big values (1);\n\
         select pg_create_restore_point('after_big');",
    )
    .unwrap();
    pg.stop().unwrap();
    let pg_wal = pg.data_dir().join("pg_wal");

    // The first segment boundary after the big record began.
    let boundary = before.segment(seg).next().unwrap().start_lsn(seg).unwrap();
    let name = segment_file_name(TimelineId(1), boundary.segment(seg), seg);
    let first_page = std::fs::read(pg_wal.join(&name)).unwrap();
    let info = u16::from_le_bytes([first_page[2], first_page[3]]);
    let rem_len = u32::from_le_bytes(first_page[16..20].try_into().unwrap());
    assert_eq!(info & 0x3, 0x3, "{name}: long header + FIRST_IS_CONTRECORD");
    assert!(
        u64::from(rem_len) > 8192,
        "{name}: rem_len {rem_len} continues past the first page"
    );

    let mut starts = vec![
        boundary,                   // a segment boundary, mid-record
        Lsn(boundary.0 + 5 * 8192), // a page boundary, mid-record
    ];
    let mut first_after = None;
    while let Some(start) = starts.pop() {
        let dump = pg_waldump(&pg, start);
        let (ours, _, _) = scan_pg_wal(&pg_wal, start, seg, 1 << 20);
        let s = assert_same_records(&ours, &dump);
        assert_eq!(s.restore_points, ["after_big"], "from {start}");
        assert!(ours[0].start > start, "from {start}");
        match first_after {
            None => {
                first_after = Some(ours[0].start);
                // Also from the page where the big record ends.
                starts.push(Lsn(ours[0].start.0 - ours[0].start.0 % 8192));
            }
            Some(first) => assert_eq!(ours[0].start, first, "from {start}"),
        }
    }
}
