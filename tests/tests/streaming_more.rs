//! More WAL streaming end to end (real PostgreSQL 15, the real agent): following a
//! promotion onto a new timeline, TLS with verify-full, a repository outage that must hold
//! the slot, and SIGTERM under load that must report exactly what is stored.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use tokio_util::sync::CancellationToken;
use walferry_agent::archive::ArchiverConfig;
use walferry_agent::pg::ConnInfo;
use walferry_agent::stream::StreamConfig;
use walferry_formats::envelope::Kind;
use walferry_formats::keyring::Keyring;
use walferry_formats::layout::segment_key;
use walferry_formats::walcatalog::WalCatalog;
use walferry_formats::{Lsn, Repository, SegmentNo, TimelineId, Units, WalFileName};
use walferry_tests::emulators::file_target;
use walferry_tests::faults::{FaultConfig, FaultyStore};
use walferry_tests::pg::{self, PgCluster};
use walferry_tests::restore::wait_until;

use crate::replication::make_certs;
use crate::streaming::{
    assert_segments_identical, cluster, pgbench, switch_wal, wait_durable, Repo, SEG,
};

/// Runs blocking testkit calls (psql, pg_ctl) off the runtime threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// The slot's restart_lsn (None when the slot is missing or has none).
fn restart_lsn(pg: &PgCluster, slot: &str) -> Option<Lsn> {
    let r = pg
        .psql(
            "postgres",
            &format!("select restart_lsn from pg_replication_slots where slot_name = '{slot}'"),
        )
        .unwrap();
    (!r.is_empty()).then(|| r.parse().unwrap())
}

fn current_lsn(pg: &PgCluster) -> Lsn {
    pg.psql("postgres", "select pg_current_wal_lsn()")
        .unwrap()
        .parse()
        .unwrap()
}

/// Where the repository's stored WAL ends on its newest timeline.
async fn stored_end(repo: &Repository) -> (TimelineId, Lsn) {
    let catalog = WalCatalog::load(repo, SEG).await.unwrap();
    catalog
        .timelines
        .iter()
        .rev()
        .find_map(|(tli, wal)| wal.end(SEG).map(|end| (*tli, end)))
        .expect("the repository holds no WAL")
}

fn segment_name(tli: TimelineId, segno: SegmentNo) -> String {
    WalFileName::Segment { tli, segno }.format(SEG)
}

/// `pg_waldump -t TLI -p DIR -s START -e END`; returns how many records it printed.
fn waldump(pg: &PgCluster, dir: &Path, tli: TimelineId, start: Lsn, end: Lsn) -> usize {
    let out = pg
        .command("pg_waldump")
        .arg("-p")
        .arg(dir)
        .args([
            "-t",
            &tli.0.to_string(),
            "-s",
            &start.to_string(),
            "-e",
            &end.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_waldump -t {} {start}..{end} failed on the fetched WAL: {}",
        tli.0,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("rmgr:"))
        .count()
}

/// A directory postgres can read, holding `files` (name, bytes).
fn readable_dir(pg: &PgCluster, files: &[(String, Vec<u8>)]) -> PathBuf {
    let dir = pg
        .make_dir(&format!("fetched-{}", rand::random::<u32>()))
        .unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&dir)
        .status()
        .unwrap();
    dir
}

/// The agent streams through a promotion: the cluster restarts as a standby (the agent
/// reconnects to its cascading walsender), is promoted, and writes on timeline 2. The
/// repository ends up with the history file, timeline 1 up to the switch point and
/// timeline 2 from the start of the switch segment, all matching the server's files.
#[tokio::test(flavor = "multi_thread")]
async fn follows_promotion() {
    let pg = cluster();
    let repo = Repo::init(file_target().unwrap());
    let log = pg.root_dir().join("agent.log");
    let mut agent = repo.agent(&pg.superuser_conninfo(), &log, &[]);
    pg.psql(
        "postgres",
        "create table t (id int, v text); \
         insert into t select g, repeat('x', 100) from generate_series(1, 50000) g",
    )
    .unwrap();
    let tl1_sealed_end = switch_wal(&pg);
    wait_durable(&pg, "walferry", tl1_sealed_end, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));

    // Some WAL in the next segment too, so the switch point lands well inside it.
    pg.psql(
        "postgres",
        "insert into t select g, repeat('w', 100) from generate_series(1, 8000) g",
    )
    .unwrap();

    // Restart as a standby of nobody: it replays its own WAL and waits; the agent
    // reconnects to it (a cascading walsender) on timeline 1.
    pg.stop().unwrap();
    let signal = pg.data_dir().join("standby.signal");
    std::fs::write(&signal, "").unwrap();
    pg::give_to_postgres(&signal).unwrap();
    pg.start_server().unwrap();
    wait_until(
        "the agent to stream from the standby",
        Duration::from_secs(40),
        || {
            pg.psql(
                "postgres",
                "select count(*) from pg_stat_replication where state = 'streaming'",
            )
            .unwrap()
                == "1"
        },
    );
    assert_eq!(
        pg.psql("postgres", "select pg_is_in_recovery()").unwrap(),
        "t"
    );
    assert!(agent.is_running(), "{}", agent.log());

    let out = pg
        .command("pg_ctl")
        .arg("-D")
        .arg(pg.data_dir())
        .args(["-w", "promote"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promote: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        pg.psql("postgres", "select pg_is_in_recovery()").unwrap(),
        "f"
    );
    assert_eq!(
        pg.psql(
            "postgres",
            "select substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"
        )
        .unwrap(),
        "00000002",
        "the promoted server writes on timeline 2"
    );
    pg.psql(
        "postgres",
        "insert into t select g, repeat('y', 100) from generate_series(1, 150000) g",
    )
    .unwrap();
    let end = switch_wal(&pg);
    wait_durable(&pg, "walferry", end, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    let st = agent.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(st.code(), Some(0), "{}", agent.log());
    let agent_log = agent.log();
    assert!(agent_log.contains("timeline switch"), "{agent_log}");

    // The history file, byte for byte.
    let pg_wal = pg.data_dir().join("pg_wal");
    let out = tempfile::tempdir().unwrap();
    let history = repo
        .fetch("00000002.history", out.path())
        .expect("00000002.history is not in the repository");
    let server_history = std::fs::read(pg_wal.join("00000002.history")).unwrap();
    assert_eq!(history, server_history);
    let text = String::from_utf8(history.clone()).unwrap();
    let mut fields = text.lines().next().unwrap().split('\t');
    assert_eq!(fields.next(), Some("1"));
    let switch: Lsn = fields.next().unwrap().parse().unwrap();
    assert!(switch >= tl1_sealed_end && switch < end, "{switch}");
    let switch_seg = switch.segment(SEG);
    let switch_off = switch.segment_offset(SEG) as usize;
    assert!(switch_off > 0, "switch point {switch} at a segment start");

    let units = repo.units().await;
    let catalog = WalCatalog::load(units.repo(), SEG).await.unwrap();
    assert!(catalog.histories.contains(&TimelineId(2)), "{catalog:?}");

    // Timeline 1: every sealed segment before the switch segment matches pg_wal...
    let tl1 = catalog.timeline(TimelineId(1)).unwrap();
    let switch_seg_start = switch_seg.start_lsn(SEG).unwrap();
    let tl1_segs =
        assert_segments_identical(&pg, &repo, TimelineId(1), &tl1.sealed, switch_seg_start);
    assert!(!tl1_segs.is_empty());
    assert!(
        !tl1.sealed.contains(&switch_seg),
        "timeline 1's switch segment cannot be complete"
    );
    // ...and the switch segment is there as parts up to the switch point, served zero-padded.
    assert_eq!(tl1.part_cover(switch_seg).1, switch_off as u64, "{tl1:?}");
    let tl1_last_name = segment_name(TimelineId(1), switch_seg);
    let tl1_last = repo.fetch(&tl1_last_name, out.path()).unwrap();
    assert_eq!(tl1_last.len() as u64, SEG.bytes());
    assert!(
        tl1_last[switch_off..].iter().all(|b| *b == 0),
        "{tl1_last_name} is not zero-padded past the switch point"
    );
    // The server keeps the old timeline's last segment under its name, or as .partial
    // when it archives; one of them must be there (wal_keep_size keeps it from recycling).
    let server_copy = [tl1_last_name.clone(), format!("{tl1_last_name}.partial")]
        .iter()
        .map(|n| pg_wal.join(n))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("the server has no copy of {tl1_last_name}"));
    eprintln!(
        "switch point {switch}; the server's copy of timeline 1's last segment: {}",
        server_copy.display()
    );
    let theirs = std::fs::read(&server_copy).unwrap();
    assert!(
        tl1_last[..switch_off] == theirs[..switch_off],
        "timeline 1 up to the switch point differs from {}",
        server_copy.display()
    );

    // Timeline 2: streamed from the start of the switch segment, complete and identical.
    let tl2 = catalog.timeline(TimelineId(2)).unwrap();
    assert_eq!(tl2.sealed.first(), Some(&switch_seg), "{tl2:?}");
    let tl2_segs = assert_segments_identical(&pg, &repo, TimelineId(2), &tl2.sealed, end);
    // The new timeline's first segment begins with the old timeline's bytes.
    assert!(
        tl2_segs.len() >= 2,
        "expected timeline 2 to span segments: {tl2_segs:?}"
    );

    // pg_waldump reads timeline 1 to the switch point and timeline 2 from its first
    // segment on, from the fetched files alone. (pg_waldump does not follow history files
    // across a switch, so it runs once per timeline.)
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let tl1_names = tl1_segs.iter().map(|s| segment_name(TimelineId(1), *s));
    let tl2_names = tl2_segs.iter().map(|s| segment_name(TimelineId(2), *s));
    for name in tl1_names.chain(tl2_names) {
        let bytes = repo.fetch(&name, out.path()).unwrap();
        files.push((name, bytes));
    }
    files.push((tl1_last_name, tl1_last));
    files.push(("00000002.history".into(), history));
    let dir = readable_dir(&pg, &files);
    let n1 = waldump(
        &pg,
        &dir,
        TimelineId(1),
        tl1_segs[0].start_lsn(SEG).unwrap(),
        switch,
    );
    let n2 = waldump(&pg, &dir, TimelineId(2), switch_seg_start, end);
    assert!(n1 > 0 && n2 > 0, "pg_waldump read {n1} + {n2} records");
}

/// verify-full over TCP with SCRAM: the agent checks the server certificate against the
/// CA and the IP SAN, streams, and the segments match; the wrong CA is a permanent error.
#[tokio::test(flavor = "multi_thread")]
async fn tls_streams_with_verify_full() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(certs.path(), "a", &["127.0.0.1"]);
    let (other_ca, _, _) = make_certs(certs.path(), "b", &["127.0.0.1"]);
    pg::give_to_postgres(certs.path()).unwrap();
    let pg = PgCluster::builder()
        .config("wal_keep_size", "8GB")
        .config("max_wal_size", "8GB")
        .config("ssl", "on")
        .config("ssl_cert_file", cert.display().to_string())
        .config("ssl_key_file", key.display().to_string())
        .start()
        .unwrap();
    let conninfo = |root: &Path| {
        format!(
            "host=127.0.0.1 port={} user={} password={} dbname=postgres sslmode=verify-full sslrootcert={}",
            pg.port(),
            pg::SCRAM_USER,
            pg::SCRAM_PASSWORD,
            root.display()
        )
    };
    let repo = Repo::init(file_target().unwrap());
    let log = pg.root_dir().join("agent.log");
    let mut agent = repo.agent(&conninfo(&ca), &log, &[]);
    pg.psql(
        "postgres",
        "create table t as select g, repeat('z', 100) as v from generate_series(1, 100000) g",
    )
    .unwrap();
    let end = switch_wal(&pg);
    wait_durable(&pg, "walferry", end, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    // The walsender's connection really is TLS, as the SCRAM role.
    let ssl = pg
        .psql(
            "postgres",
            "select s.ssl, r.usename from pg_stat_replication r join pg_stat_ssl s using (pid)",
        )
        .unwrap();
    assert_eq!(ssl, format!("t|{}", pg::SCRAM_USER));
    let st = agent.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(st.code(), Some(0), "{}", agent.log());

    let units = repo.units().await;
    let catalog = WalCatalog::load(units.repo(), SEG).await.unwrap();
    let sealed = &catalog.timeline(TimelineId(1)).unwrap().sealed;
    let segs = assert_segments_identical(&pg, &repo, TimelineId(1), sealed, end);
    assert!(!segs.is_empty());

    // A CA that did not sign the server certificate: refused at once, no retries.
    let bad_log = pg.root_dir().join("agent-bad-ca.log");
    let mut bad = repo.agent(&conninfo(&other_ca), &bad_log, &["--slot", "other"]);
    let st = bad.wait(Duration::from_secs(30)).unwrap();
    let text = bad.log();
    assert_eq!(st.code(), Some(1), "{text}");
    assert!(text.contains("certificate"), "{text}");
    assert!(text.contains("verify-full"), "{text}");
    assert!(
        !text.contains("reconnecting"),
        "a certificate failure is not retried: {text}"
    );
}

/// The repository refuses every write for a while: the streamer keeps running, the slot
/// does not move past what was stored before the outage, and once the store is back
/// everything lands and the slot catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_outage_holds_the_slot() {
    let pg = Arc::new(blocking(cluster).await);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let real = Repository::open(&url, Vec::<(String, String)>::new()).unwrap();
    let (inner, root) = real.store();
    let faulty = Arc::new(FaultyStore::new(inner.clone(), FaultConfig::quiet(11)));
    let store: Arc<dyn ObjectStore> = faulty.clone();
    let repo = Repository::with_store(store, root.clone(), &url);
    let config = repo.init(None).await.unwrap();
    let units = Units::new(
        repo,
        Arc::new(Keyring::unencrypted()),
        config.compression.level,
    );
    let cfg = StreamConfig {
        conninfo: ConnInfo::parse(&pg.superuser_conninfo()).unwrap(),
        slot: "walferry".into(),
        archiver: ArchiverConfig {
            rpo: Duration::from_millis(200),
            outage_alarm: Duration::from_secs(1),
            ..ArchiverConfig::default()
        },
        status_interval: Duration::from_millis(500),
        max_backoff: Duration::from_secs(5),
    };
    let token = CancellationToken::new();
    let task = tokio::spawn(walferry_agent::stream::run(units, cfg, token.clone()));

    let p = pg.clone();
    let end1 = blocking(move || {
        p.psql(
            "postgres",
            "create table t (id int, v text); \
             insert into t select g, repeat('a', 100) from generate_series(1, 50000) g",
        )
        .unwrap();
        let end = switch_wal(&p);
        wait_durable(&p, "walferry", end, Duration::from_secs(30)).unwrap();
        end
    })
    .await;

    // Outage. Writes already inside the inner store finish quickly; after that what the
    // store holds is fixed, and it bounds the slot.
    faulty.set_enabled(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, stored) = stored_end(&real).await;
    assert!(stored >= end1, "{stored} < {end1}");
    let p = pg.clone();
    let before = blocking(move || restart_lsn(&p, "walferry").unwrap()).await;
    assert!(before <= stored, "slot at {before}, store ends at {stored}");
    let p = pg.clone();
    let written = blocking(move || {
        p.psql(
            "postgres",
            "insert into t select g, repeat('b', 100) from generate_series(1, 250000) g",
        )
        .unwrap();
        current_lsn(&p)
    })
    .await;
    assert!(
        written.0 > stored.0 + SEG.bytes(),
        "the outage should see more than a segment of WAL ({stored} -> {written})"
    );
    let outage_began = Instant::now();
    let mut samples = Vec::new();
    while outage_began.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let p = pg.clone();
        let (r, active) = blocking(move || {
            let active = p
                .psql(
                    "postgres",
                    "select active from pg_replication_slots where slot_name = 'walferry'",
                )
                .unwrap();
            (restart_lsn(&p, "walferry").unwrap(), active)
        })
        .await;
        assert!(
            r <= stored,
            "during the outage the slot moved to {r}, past the stored end {stored}"
        );
        assert_eq!(active, "t", "the streamer let go of the slot");
        assert!(
            !task.is_finished(),
            "the streamer stopped during the outage"
        );
        samples.push(r);
    }
    assert!(samples.len() >= 4, "{samples:?}");
    eprintln!(
        "outage: stored end {stored}, server wrote to {written}, slot samples {samples:?}, {:?}",
        faulty.stats()
    );
    assert_eq!(
        stored_end(&real).await.1,
        stored,
        "nothing can be stored during the outage"
    );
    assert!(faulty.stats().outage_failures > 0, "{:?}", faulty.stats());

    // Back: everything lands, the slot catches up.
    faulty.set_enabled(true);
    let p = pg.clone();
    let end2 = blocking(move || {
        let end = switch_wal(&p);
        wait_durable(&p, "walferry", end, Duration::from_secs(60)).unwrap();
        end
    })
    .await;
    assert!(end2 > written);
    token.cancel();
    let durable = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the streamer did not stop")
        .unwrap()
        .unwrap()
        .expect("the streamer started");
    assert!(durable >= end2, "{durable} < {end2}");

    // Every segment, read through the plain store, matches pg_wal, with no gap.
    let (plain, _) = Units::load(real.clone(), None).await.unwrap();
    let catalog = WalCatalog::load(&real, SEG).await.unwrap();
    let sealed: &BTreeSet<SegmentNo> = &catalog.timeline(TimelineId(1)).unwrap().sealed;
    let first = *sealed.first().unwrap();
    let last = SegmentNo(end2.0 / SEG.bytes() - 1);
    assert!(last.0 - first.0 >= 2, "{first:?}..{last:?}");
    let fetched = tempfile::tempdir().unwrap();
    for s in first.0..=last.0 {
        let segno = SegmentNo(s);
        assert!(sealed.contains(&segno), "segment {s:X} is not sealed (gap)");
        let name = segment_name(TimelineId(1), segno);
        let ours = plain
            .get(&segment_key(TimelineId(1), segno, SEG), Kind::WalSegment)
            .await
            .unwrap();
        let theirs = std::fs::read(pg.data_dir().join("pg_wal").join(&name)).unwrap();
        assert!(ours[..] == theirs[..], "{name} differs from pg_wal");
        // And the same through wal-fetch's code path.
        let dest = fetched.path().join(&name);
        walferry_restore::walfetch::fetch(&plain, &name, &dest, 0)
            .await
            .unwrap();
        assert!(std::fs::read(&dest).unwrap() == theirs, "wal-fetch {name}");
    }
}

/// SIGTERM under a pgbench load: exit 0, and the slot's restart_lsn is exactly where the
/// repository's stored WAL ends (the final status update went out, and reported nothing
/// that is not stored). The stored bytes match pg_wal up to that point.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_load_reports_final_flush() {
    let pg = cluster();
    let repo = Repo::init(file_target().unwrap());
    pgbench(&pg, &["-i", "-s", "5", "-q"]);
    let log = pg.root_dir().join("agent.log");
    let mut agent = repo.agent(&pg.scram_conninfo(), &log, &[]);
    let start = current_lsn(&pg);
    let mut bench = pg
        .command("pgbench")
        .args(["-c", "4", "-j", "2", "-T", "120", "-n"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Let it stream for a while (and make sure it is streaming before the signal).
    wait_until("the agent to stream", Duration::from_secs(30), || {
        restart_lsn(&pg, "walferry").is_some_and(|r| r > start)
    });
    std::thread::sleep(Duration::from_secs(3));
    let st = agent.terminate(Duration::from_secs(30)).unwrap();
    let agent_log = agent.log();
    assert_eq!(st.code(), Some(0), "{agent_log}");
    let restart = restart_lsn(&pg, "walferry").unwrap();
    let active = pg
        .psql(
            "postgres",
            "select active from pg_replication_slots where slot_name = 'walferry'",
        )
        .unwrap();
    assert_eq!(active, "f");

    let units = repo.units().await;
    let (tli, end) = stored_end(units.repo()).await;
    assert_eq!(tli, TimelineId(1));
    assert_eq!(
        restart, end,
        "slot restart_lsn vs the end of the stored WAL\n{agent_log}"
    );
    assert!(
        agent_log
            .lines()
            .any(|l| l.contains("exiting") && l.contains(&end.to_string())),
        "the agent's final durable LSN is not {end}: {agent_log}"
    );
    assert!(end > start, "nothing streamed under load");
    assert!(
        bench.try_wait().unwrap().is_none(),
        "the load should still be running when the agent stopped"
    );
    // Stop the load (runuser passes SIGTERM on to pgbench).
    Command::new("kill")
        .args(["-TERM", &bench.id().to_string()])
        .status()
        .unwrap();
    bench.wait().unwrap();

    // What the repository holds matches the server, up to `end`.
    let catalog = WalCatalog::load(units.repo(), SEG).await.unwrap();
    let tl = catalog.timeline(TimelineId(1)).unwrap();
    let seg_start = end.segment(SEG).start_lsn(SEG).unwrap();
    if !tl.sealed.is_empty() {
        assert_segments_identical(&pg, &repo, TimelineId(1), &tl.sealed, seg_start);
    }
    let off = end.segment_offset(SEG) as usize;
    if off > 0 {
        let name = segment_name(TimelineId(1), end.segment(SEG));
        let out = tempfile::tempdir().unwrap();
        let ours = repo.fetch(&name, out.path()).unwrap();
        let theirs = std::fs::read(pg.data_dir().join("pg_wal").join(&name)).unwrap();
        assert!(
            ours[..off] == theirs[..off],
            "{name} up to {end} differs from pg_wal"
        );
        assert!(ours[off..].iter().all(|b| *b == 0));
    }
}

/// A unit the repository refuses for good (here: a different object already sits under
/// the segment's name) must stop the streamer. The durable position, and with it the
/// slot, never moves past the refused WAL, even though later parts would store fine.
#[tokio::test(flavor = "multi_thread")]
async fn refused_segment_is_never_reported() {
    let pg = cluster();
    let repo = Repo::init(file_target().unwrap());
    let log = pg.root_dir().join("agent.log");
    let mut agent = repo.agent(&pg.superuser_conninfo(), &log, &[]);
    let start = current_lsn(&pg);
    wait_until("the agent to stream", Duration::from_secs(30), || {
        restart_lsn(&pg, "walferry").is_some()
    });
    // Plant foreign bytes under the name of a segment the server has not written yet.
    // Its parts store fine, but the sealed segment (the only copy of its tail) is refused.
    let bad = SegmentNo(start.segment(SEG).0 + 2);
    let bad_end = Lsn(bad.start_lsn(SEG).unwrap().0 + SEG.bytes());
    let units = repo.units().await;
    units
        .repo()
        .put(
            &segment_key(TimelineId(1), bad, SEG),
            bytes::Bytes::from_static(b"not this segment"),
        )
        .await
        .unwrap();
    pg.psql(
        "postgres",
        "create table t (id int, v text); \
         insert into t select g, repeat('r', 100) from generate_series(1, 400000) g",
    )
    .unwrap();
    let written = current_lsn(&pg);
    assert!(written.0 > bad_end.0 + SEG.bytes(), "{written}");
    // The agent gives up with the conflict; meanwhile the slot stays inside the bad segment.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let r = restart_lsn(&pg, "walferry").unwrap();
        assert!(
            r < bad_end,
            "the slot moved to {r}, past {bad_end}, but the end of that segment was never stored\n{}",
            agent.log()
        );
        if !agent.is_running() {
            break agent.wait(Duration::from_secs(1)).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the agent keeps running after a permanent store error\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = agent.log();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("already exists with different contents"),
        "{text}"
    );
    let r = restart_lsn(&pg, "walferry").unwrap();
    assert!(r < bad_end, "{r} >= {bad_end}");
}
