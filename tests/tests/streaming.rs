//! WAL streaming end to end: a real PostgreSQL 15, the real `walferry-agent run` process,
//! real stores. Every completed segment must come back byte-identical through
//! `walferry-restore wal-fetch`, and the commit-time index must agree with pg_waldump.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use walferry_formats::envelope::Kind;
use walferry_formats::keyring::MasterKey;
use walferry_formats::layout::segment_index_key;
use walferry_formats::walcatalog::WalCatalog;
use walferry_formats::walreader::WalSummary;
use walferry_formats::{Lsn, Repository, SegmentNo, SegmentSize, TimelineId, Units, WalFileName};
use walferry_tests::bins::{repo_args, run_walferry, AgentProcess};
use walferry_tests::emulators::{file_target, s3_target, StoreTarget};
use walferry_tests::pg::PgCluster;

pub(crate) const SEG: SegmentSize = SegmentSize::DEFAULT;

/// A cluster that keeps all its WAL, so pg_wal can serve as the oracle.
pub(crate) fn cluster() -> PgCluster {
    PgCluster::builder()
        .config("wal_keep_size", "8GB")
        .config("max_wal_size", "8GB")
        .start()
        .unwrap()
}

/// A repository (encrypted) on `target` plus the key file.
pub(crate) struct Repo {
    target: StoreTarget,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

impl Repo {
    pub(crate) fn init(target: StoreTarget) -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        let (st, _, err) = run_walferry(
            "walferry-agent",
            &["keygen".into(), "--out".into(), key.display().to_string()],
            &[],
        )
        .unwrap();
        assert!(st.success(), "{err}");
        let mut args = vec!["init".to_string()];
        args.extend(repo_args(&target));
        args.extend(["--key-file".into(), key.display().to_string()]);
        let (st, out, err) = run_walferry("walferry-agent", &args, &[]).unwrap();
        assert!(st.success(), "init failed: {out}{err}");
        Repo {
            target,
            key,
            _dir: dir,
        }
    }

    pub(crate) fn args(&self) -> Vec<String> {
        let mut a = repo_args(&self.target);
        a.extend(["--key-file".into(), self.key.display().to_string()]);
        a
    }

    pub(crate) fn agent(&self, pg_conninfo: &str, log: &Path, extra: &[&str]) -> AgentProcess {
        let mut args = vec!["run".to_string()];
        args.extend(self.args());
        args.extend([
            "--pg".into(),
            pg_conninfo.to_string(),
            "--rpo".into(),
            "200ms".into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        AgentProcess::spawn(&args, log).unwrap()
    }

    pub(crate) async fn units(&self) -> Units {
        let repo = Repository::open(&self.target.url, self.target.options.clone()).unwrap();
        let text = std::fs::read_to_string(&self.key).unwrap();
        let master = MasterKey::from_hex(&text).unwrap();
        Units::load(repo, Some(&master)).await.unwrap().0
    }

    /// `walferry-restore wal-fetch NAME DEST`: Some(bytes) on exit 0, None on exit 1.
    pub(crate) fn fetch(&self, name: &str, dir: &Path) -> Option<Vec<u8>> {
        let dest = dir.join(name);
        let mut args = vec!["wal-fetch".to_string()];
        args.extend(self.args());
        args.extend([name.to_string(), dest.display().to_string()]);
        let (st, _, err) = run_walferry("walferry-restore", &args, &[]).unwrap();
        match st.code() {
            Some(0) => Some(std::fs::read(&dest).unwrap()),
            Some(1) => None,
            _ => panic!("wal-fetch {name} failed: {err}"),
        }
    }
}

/// Waits until the slot's restart_lsn (which follows our reported flush) reaches `lsn`.
pub(crate) fn wait_durable(pg: &PgCluster, slot: &str, lsn: Lsn, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = pg.psql(
            "postgres",
            &format!("select coalesce(restart_lsn >= '{lsn}'::pg_lsn, false) from pg_replication_slots where slot_name = '{slot}'"),
        )?;
        if r == "t" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "slot {slot} did not reach {lsn} within {timeout:?} (restart_lsn check said {r:?})"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn pgbench(pg: &PgCluster, args: &[&str]) {
    let out = pg.command("pgbench").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "pgbench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Switches to a new segment and returns the end of the completed one.
pub(crate) fn switch_wal(pg: &PgCluster) -> Lsn {
    // Make sure the current segment has something in it, or pg_switch_wal is a no-op.
    pg.psql(
        "postgres",
        "create table if not exists sw(x int); insert into sw values (1)",
    )
    .unwrap();
    let at: Lsn = pg
        .psql("postgres", "select pg_switch_wal()")
        .unwrap()
        .parse()
        .unwrap();
    let seg = at.segment(SEG);
    Lsn((seg.0 + 1) * SEG.bytes())
}

/// Every segment on `tli` that the repository holds sealed, up to `end`, fetched back
/// and compared with the server's pg_wal file. Returns the segments compared.
pub(crate) fn assert_segments_identical(
    pg: &PgCluster,
    repo: &Repo,
    tli: TimelineId,
    sealed: &BTreeSet<SegmentNo>,
    end: Lsn,
) -> Vec<SegmentNo> {
    let out = tempfile::tempdir().unwrap();
    let first = *sealed.first().expect("no sealed segment in the repository");
    let last = SegmentNo(end.0 / SEG.bytes() - 1);
    let mut compared = Vec::new();
    for s in first.0..=last.0 {
        let name = WalFileName::Segment {
            tli,
            segno: SegmentNo(s),
        }
        .format(SEG);
        let ours = repo
            .fetch(&name, out.path())
            .unwrap_or_else(|| panic!("{name} is missing from the repository (gap)"));
        let theirs = std::fs::read(pg.data_dir().join("pg_wal").join(&name)).unwrap();
        assert!(ours == theirs, "{name} differs from the server's copy");
        assert!(
            sealed.contains(&SegmentNo(s)),
            "{name} was served but is not sealed"
        );
        compared.push(SegmentNo(s));
    }
    compared
}

/// `(lsn, time, total length)` of every COMMIT/ABORT pg_waldump prints for [start, end).
pub(crate) fn waldump_commits(
    pg: &PgCluster,
    dir: &Path,
    start: Lsn,
    end: Lsn,
) -> Vec<(Lsn, jiff::Timestamp, u64)> {
    let out = pg
        .command("pg_waldump")
        .env("TZ", "UTC")
        .arg("-p")
        .arg(dir)
        .args([
            "-s",
            &start.to_string(),
            "-e",
            &end.to_string(),
            "-r",
            "Transaction",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pg_waldump failed on the fetched WAL: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v = Vec::new();
    for line in stdout.lines() {
        let Some(desc) = line.split("desc: ").nth(1) else {
            continue;
        };
        let Some(rest) = desc
            .strip_prefix("COMMIT ")
            .or_else(|| desc.strip_prefix("ABORT "))
        else {
            continue;
        };
        let lsn: Lsn = line
            .split("lsn: ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let ts = rest.get(..26).unwrap();
        let civil: jiff::civil::DateTime = ts.replace(' ', "T").parse().unwrap();
        // "len (rec/tot): 34/ 34": the record's total length, for where it ends.
        let tot: u64 = line
            .split("len (rec/tot):")
            .nth(1)
            .and_then(|x| x.split(',').next())
            .and_then(|x| x.split('/').nth(1))
            .and_then(|x| x.trim().parse().ok())
            .unwrap();
        v.push((
            lsn,
            civil.to_zoned(jiff::tz::TimeZone::UTC).unwrap().timestamp(),
            tot,
        ));
    }
    v
}

/// Copies fetched segments into a directory pg_waldump (as postgres) can read.
pub(crate) fn fetched_dir(
    pg: &PgCluster,
    repo: &Repo,
    tli: TimelineId,
    segs: &[SegmentNo],
) -> PathBuf {
    let dir = pg
        .make_dir(&format!("fetched-{}", rand::random::<u32>()))
        .unwrap();
    for s in segs {
        let name = WalFileName::Segment { tli, segno: *s }.format(SEG);
        let bytes = repo.fetch(&name, &dir).unwrap();
        assert_eq!(bytes.len() as u64, SEG.bytes());
    }
    // wal-fetch wrote the files as root; let postgres read them.
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&dir)
        .status()
        .unwrap();
    dir
}

/// Streams a pgbench load for `seconds`, then checks bytes, pg_waldump continuity and the index.
async fn stream_and_check(target: StoreTarget, seconds: u32) {
    let pg = cluster();
    let repo = Repo::init(target);
    let log = pg.root_dir().join("agent.log");
    let mut agent = repo.agent(&pg.scram_conninfo(), &log, &[]);
    pgbench(&pg, &["-i", "-s", "10", "-q"]);
    pg.psql("postgres", "select pg_create_restore_point('before-load')")
        .unwrap();
    pgbench(
        &pg,
        &["-c", "8", "-j", "2", "-T", &seconds.to_string(), "-n"],
    );
    let end = switch_wal(&pg);
    wait_durable(&pg, "walferry", end, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    let st = agent.terminate(Duration::from_secs(30)).unwrap();
    assert!(st.success(), "agent exit {st:?}\n{}", agent.log());

    let units = repo.units().await;
    let catalog = WalCatalog::load(units.repo(), SEG).await.unwrap();
    let tl = catalog.timeline(TimelineId(1)).unwrap();
    let segs = assert_segments_identical(&pg, &repo, TimelineId(1), &tl.sealed, end);
    assert!(
        segs.len() >= 3,
        "expected several segments, got {}",
        segs.len()
    );

    // pg_waldump reads the fetched sequence with no gap, and the index agrees with it.
    let dir = fetched_dir(&pg, &repo, TimelineId(1), &segs);
    let start = segs[0].start_lsn(SEG).unwrap();
    let dumped = waldump_commits(&pg, &dir, start, end);
    assert!(!dumped.is_empty());
    let mut indexed = 0u64;
    let mut restore_points = Vec::new();
    for s in &segs {
        let raw = units
            .get(&segment_index_key(TimelineId(1), *s, SEG), Kind::WalIndex)
            .await
            .unwrap();
        let summary: WalSummary = serde_json::from_slice(&raw).unwrap();
        indexed += summary.commits + summary.aborts;
        restore_points.extend(summary.restore_points.iter().map(|r| r.name.clone()));
        let seg_end = Lsn(s.start_lsn(SEG).unwrap().0 + SEG.bytes());
        // The index files a record under the segment where it ENDS; a commit that starts
        // in the last bytes of a segment belongs to the next one. pg_waldump gives starts,
        // and its "len (rec/tot)" the length.
        let ends_in = |l: &Lsn, tot: u64| {
            let e = Lsn(l.0 + tot);
            e > s.start_lsn(SEG).unwrap() && e <= seg_end
        };
        let in_seg: Vec<_> = dumped
            .iter()
            .filter(|(l, _, tot)| ends_in(l, *tot))
            .collect();
        match (summary.first_commit, summary.last_commit) {
            (Some(f), Some(l)) => {
                assert_eq!(
                    in_seg.first().map(|x| (x.0, x.1)),
                    Some((f.lsn, f.time.to_timestamp().unwrap())),
                    "first commit of {s:?}"
                );
                assert_eq!(
                    in_seg.last().map(|x| (x.0, x.1)),
                    Some((l.lsn, l.time.to_timestamp().unwrap())),
                    "last commit of {s:?}"
                );
            }
            _ => assert!(
                in_seg.is_empty(),
                "index of {s:?} has no commits, pg_waldump has {}",
                in_seg.len()
            ),
        }
    }
    assert_eq!(
        indexed,
        dumped.len() as u64,
        "commit+abort count: index vs pg_waldump"
    );
    assert!(
        restore_points.contains(&"before-load".to_string()),
        "{restore_points:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_pgbench_byte_identical_file() {
    stream_and_check(file_target().unwrap(), 60).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_pgbench_byte_identical_s3() {
    let Some(t) = s3_target().await.unwrap() else {
        return;
    };
    stream_and_check(t, 15).await;
}

/// kill -9 the agent at random moments under load, and restart Postgres once: nothing
/// is lost, nothing is duplicated, and every segment matches.
#[tokio::test(flavor = "multi_thread")]
async fn survives_kill9_and_postgres_restart() {
    let pg = cluster();
    let repo = Repo::init(file_target().unwrap());
    let log = pg.root_dir().join("agent.log");
    pgbench(&pg, &["-i", "-s", "5", "-q"]);
    let bench = {
        let mut c = pg.command("pgbench");
        c.args(["-c", "4", "-j", "2", "-T", "40", "-n"]);
        c.spawn().unwrap()
    };
    let mut kills = 0;
    let began = Instant::now();
    let mut agent = repo.agent(&pg.scram_conninfo(), &log, &[]);
    while kills < 12 {
        std::thread::sleep(Duration::from_millis(300 + rand::random::<u64>() % 1700));
        agent.kill9().unwrap();
        kills += 1;
        if kills == 6 {
            pg.restart().unwrap();
        }
        agent = repo.agent(&pg.scram_conninfo(), &log, &[]);
    }
    let mut bench = bench;
    let _ = bench.wait();
    assert!(began.elapsed() > Duration::from_secs(5));
    let end = switch_wal(&pg);
    wait_durable(&pg, "walferry", end, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert!(agent.terminate(Duration::from_secs(30)).unwrap().success());

    let units = repo.units().await;
    let catalog = WalCatalog::load(units.repo(), SEG).await.unwrap();
    let tl = catalog.timeline(TimelineId(1)).unwrap();
    let segs = assert_segments_identical(&pg, &repo, TimelineId(1), &tl.sealed, end);
    assert!(
        segs.len() >= 3,
        "expected several segments, got {}",
        segs.len()
    );
    let dir = fetched_dir(&pg, &repo, TimelineId(1), &segs);
    waldump_commits(&pg, &dir, segs[0].start_lsn(SEG).unwrap(), end);
    let log = agent.log();
    assert!(log.matches("start streaming").count() >= 1, "{log}");
}

/// md5 and SCRAM both stream; the slot only advances over stored WAL.
#[tokio::test(flavor = "multi_thread")]
async fn md5_and_scram_stream() {
    let pg = cluster();
    for (i, conninfo) in [pg.md5_conninfo(), pg.scram_conninfo()]
        .into_iter()
        .enumerate()
    {
        let repo = Repo::init(file_target().unwrap());
        let slot = format!("s{i}");
        let log = pg.root_dir().join(format!("agent{i}.log"));
        let mut agent = repo.agent(&conninfo, &log, &["--slot", &slot]);
        std::thread::sleep(Duration::from_millis(500));
        pg.psql(
            "postgres",
            &format!("create table t{i} as select g from generate_series(1, 100000) g"),
        )
        .unwrap();
        let end = switch_wal(&pg);
        wait_durable(&pg, &slot, end, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
        assert!(agent.terminate(Duration::from_secs(30)).unwrap().success());
        let units = repo.units().await;
        let catalog = WalCatalog::load(units.repo(), SEG).await.unwrap();
        let sealed = &catalog.timeline(TimelineId(1)).unwrap().sealed;
        assert_segments_identical(&pg, &repo, TimelineId(1), sealed, end);
    }
}

/// A repository bound to one cluster refuses another, with a clear message and exit 1.
#[tokio::test(flavor = "multi_thread")]
async fn refuses_another_cluster() {
    let a = cluster();
    let b = cluster();
    let repo = Repo::init(file_target().unwrap());
    let mut agent = repo.agent(&a.superuser_conninfo(), &a.root_dir().join("a.log"), &[]);
    let end = switch_wal(&a);
    wait_durable(&a, "walferry", end, Duration::from_secs(30)).unwrap();
    assert!(agent.terminate(Duration::from_secs(30)).unwrap().success());

    let mut other = repo.agent(&b.superuser_conninfo(), &b.root_dir().join("b.log"), &[]);
    let st = other.wait(Duration::from_secs(30)).unwrap();
    assert_eq!(st.code(), Some(1), "{}", other.log());
    assert!(
        other.log().contains("belongs to cluster"),
        "{}",
        other.log()
    );
}

/// archive_command = wal-push: segments land in the same layout the streamer uses;
/// pushing a file twice succeeds, a different file under an archived name fails.
#[tokio::test(flavor = "multi_thread")]
async fn wal_push_as_archive_command() {
    let pg = cluster();
    let repo = Repo::init(file_target().unwrap());
    let agent_bin = walferry_tests::bins::walferry_bin("walferry-agent").unwrap();
    let cmd = format!(
        "{} wal-push {} %p",
        agent_bin.display(),
        repo.args()
            .iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    // archive_command runs as postgres: it must read the key and write the repository.
    let repo_dir = repo.target.url.strip_prefix("file://").unwrap();
    let repo_parent = Path::new(repo_dir).parent().unwrap();
    for p in [repo.key.as_path(), Path::new(repo_dir), repo_parent] {
        assert!(Command::new("chown")
            .arg("-R")
            .arg("postgres")
            .arg(p)
            .status()
            .unwrap()
            .success());
    }
    Command::new("chmod")
        .arg("a+x")
        .arg(repo.key.parent().unwrap())
        .status()
        .unwrap();
    pg.append_config("archive_mode", "on").unwrap();
    pg.append_config("archive_command", &cmd).unwrap();
    pg.restart().unwrap();
    pg.psql(
        "postgres",
        "create table t as select g from generate_series(1, 200000) g",
    )
    .unwrap();
    let end = switch_wal(&pg);
    let last = WalFileName::Segment {
        tli: TimelineId(1),
        segno: SegmentNo(end.0 / SEG.bytes() - 1),
    }
    .format(SEG);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let archived = pg
            .psql(
                "postgres",
                "select coalesce(last_archived_wal, '') from pg_stat_archiver",
            )
            .unwrap();
        if archived.as_str() >= last.as_str() {
            break;
        }
        if Instant::now() > deadline {
            let failed = pg
                .psql(
                    "postgres",
                    "select failed_count, last_failed_wal from pg_stat_archiver",
                )
                .unwrap();
            panic!(
                "archiving stalled at {archived:?} (failures: {failed}): {}",
                pg.log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let units = repo.units().await;
    let catalog = WalCatalog::load(units.repo(), SEG).await.unwrap();
    let sealed = &catalog.timeline(TimelineId(1)).unwrap().sealed;
    let segs = assert_segments_identical(&pg, &repo, TimelineId(1), sealed, end);
    assert!(segs.len() >= 2);

    // Idempotent: the same file again succeeds.
    let seg_path = pg.data_dir().join("pg_wal").join(&last);
    let mut push = vec!["wal-push".to_string()];
    push.extend(repo.args());
    push.push(seg_path.display().to_string());
    let (st, _, err) = run_walferry("walferry-agent", &push, &[]).unwrap();
    assert!(st.success(), "{err}");
    // A different file under the same name fails loudly, and the stored one is untouched.
    let fake_dir = tempfile::tempdir().unwrap();
    let fake = fake_dir.path().join(&last);
    let mut bytes = std::fs::read(&seg_path).unwrap();
    bytes[SEG.bytes() as usize / 2] ^= 0xFF;
    std::fs::write(&fake, &bytes).unwrap();
    let mut push = vec!["wal-push".to_string()];
    push.extend(repo.args());
    push.push(fake.display().to_string());
    let (st, _, err) = run_walferry("walferry-agent", &push, &[]).unwrap();
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("DIFFERENT contents"), "{err}");
    let back = repo.fetch(&last, fake_dir.path()).unwrap();
    assert!(back == std::fs::read(&seg_path).unwrap());
    // Nothing for a name that was never archived, and a clear not-found exit.
    assert!(repo
        .fetch("0000000100000000000000FF", fake_dir.path())
        .is_none());
    assert!(repo.fetch("00000005.history", fake_dir.path()).is_none());
}
