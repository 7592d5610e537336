//! Point-in-time restore end to end: a real PostgreSQL 15 under a steady writer, the real
//! `walferry-agent run` streaming and `walferry-agent backup`, then `walferry-restore`
//! to times, LSNs, xids, restore points and `latest`, each restored cluster started by
//! `--start` and its data compared with a dump of the source taken at exactly that moment.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use walferry_tests::bins::AgentProcess;
use walferry_tests::emulators::{azurite_target, file_target, s3_target, StoreTarget};
use walferry_tests::pg::PgCluster;
use walferry_tests::restore::{
    strings, time_moment, wait_durable, DataDump, RestoreRepo, RestoreRun, RestoredCluster, Writer,
    WRITER_SCHEMA,
};

const DB: &str = "db";

/// A source cluster with `db` holding the writer's tables, and an agent streaming it.
struct Source {
    pg: PgCluster,
    repo: RestoreRepo,
    agent: AgentProcess,
}

impl Source {
    /// `prepare`: (database, SQL) run before `db` is created (e.g. extensions for template1).
    fn start(target: StoreTarget, prepare: &[(&str, &str)]) -> Source {
        Self::start_with(target, prepare, &[])
    }

    /// `init_flags`: extra flags for `walferry-agent init`.
    fn start_with(target: StoreTarget, prepare: &[(&str, &str)], init_flags: &[&str]) -> Source {
        let pg = PgCluster::start().unwrap();
        for (db, sql) in prepare {
            pg.psql(db, sql).unwrap();
        }
        pg.psql("postgres", &format!("create database {DB}"))
            .unwrap();
        pg.psql(DB, WRITER_SCHEMA).unwrap();
        let repo = RestoreRepo::init_with(target, init_flags).unwrap();
        let agent = repo
            .agent(&pg.superuser_conninfo(), &pg.root_dir().join("agent.log"))
            .unwrap();
        Source { pg, repo, agent }
    }

    fn backup(&self, label: &str) -> String {
        self.repo
            .backup(&self.pg.superuser_conninfo(), label)
            .unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{}", self.agent.log()))
    }

    fn dump(&self) -> DataDump {
        DataDump::take(self.pg.command("pg_dump"), DB).unwrap()
    }

    /// Waits until everything written so far is durable in the repository.
    fn catch_up(&self) {
        let lsn = self
            .pg
            .psql("postgres", "select pg_current_wal_lsn()")
            .unwrap();
        wait_durable(&self.pg, &lsn, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{}", self.agent.log()));
    }

    /// See [`time_moment`].
    fn time_moment(&self, writer: &mut Writer) -> (DataDump, String) {
        time_moment(&self.pg, DB, writer).unwrap()
    }
}

/// One recorded moment: the target flags, the source's data then, and what the restore
/// must report.
struct Moment {
    name: &'static str,
    target: Vec<String>,
    dump: DataDump,
    backup: String,
    /// A line recovery must log (from `--start`'s summary).
    log_line: String,
}

/// Restores `m` into a fresh directory with `--start`, checks the plan, recovery's stop
/// line and the data, and stops the restored server.
fn restore_and_compare(src: &Source, m: &Moment) {
    let began = Instant::now();
    let rc = RestoredCluster::new(&src.pg, m.name).unwrap();
    let mut args = m.target.clone();
    args.push("--start".into());
    let run = rc
        .restore(&src.repo, &args)
        .unwrap_or_else(|e| panic!("restore to {}: {e:#}", m.name));
    assert_eq!(
        run.planned_backup(),
        Some(m.backup.as_str()),
        "{}: wrong backup planned\n{run}",
        m.name
    );
    assert!(
        run.stdout.contains(&m.log_line),
        "{}: recovery did not log {:?}\n{run}",
        m.name,
        m.log_line
    );
    assert!(
        run.stdout.contains("recovery complete:"),
        "{}: {run}",
        m.name
    );
    let restored = rc.dump(DB).unwrap();
    m.dump
        .assert_same(&restored, &format!("target {}", m.name))
        .unwrap_or_else(|e| panic!("{e:#}\n{run}"));
    // The restored cluster is a normal primary now.
    assert_eq!(
        rc.psql("postgres", "select pg_is_in_recovery()").unwrap(),
        "f"
    );
    rc.stop("fast").unwrap();
    eprintln!(
        "restored {} in {:.1}s: {} rows identical",
        m.name,
        began.elapsed().as_secs_f64(),
        restored.rows()
    );
}

fn assert_all_distinct(moments: &[Moment]) {
    for (i, a) in moments.iter().enumerate() {
        for b in &moments[i + 1..] {
            assert!(
                a.dump != b.dump,
                "the source did not change between {} and {}: the writer is not writing",
                a.name,
                b.name
            );
        }
    }
}

/// Every kind of target, on an encrypted file:// repository, with writes going on around
/// every moment; each restore is compared with a dump taken at exactly that moment.
#[tokio::test(flavor = "multi_thread")]
async fn pitr_dumps_match_at_every_target() {
    let t0 = Instant::now();
    let lap = |what: &str| eprintln!("[{:5.1}s] {what}", t0.elapsed().as_secs_f64());
    let src = Source::start(file_target().unwrap(), &[]);
    let pg = &src.pg;
    let id1 = src.backup("pitr-1");
    lap("backup 1");
    let mut writer = Writer::start(pg, DB).unwrap();
    let mut moments = Vec::new();

    // (a) a time right after backup 1.
    std::thread::sleep(Duration::from_millis(300));
    let (dump, t) = src.time_moment(&mut writer);
    let lsn_a = pg.psql("postgres", "select pg_current_wal_lsn()").unwrap();
    moments.push(Moment {
        name: "time-after-backup-1",
        target: strings(&["--to", &t]),
        dump,
        backup: id1.clone(),
        log_line: "recovery stopping before commit of transaction".into(),
    });

    // (b) a time several WAL segments later: bulk WAL in another database, while the
    // writer keeps committing.
    pg.psql(
        "postgres",
        "create table filler as select g, md5(g::text) as h, repeat('z', 300) as pad \
         from generate_series(1, 130000) g",
    )
    .unwrap();
    pg.psql("postgres", "select pg_switch_wal()").unwrap();
    pg.psql("postgres", "drop table filler").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (dump, t) = src.time_moment(&mut writer);
    let segs: f64 = pg
        .psql(
            "postgres",
            &format!(
                "select pg_wal_lsn_diff(pg_current_wal_lsn(), '{lsn_a}') / (16 * 1024 * 1024)"
            ),
        )
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        segs >= 3.0,
        "only {segs:.1} segments of WAL between (a) and (b)"
    );
    lap("several segments later");
    moments.push(Moment {
        name: "time-segments-later",
        target: strings(&["--to", &t]),
        dump,
        backup: id1.clone(),
        log_line: "recovery stopping before commit of transaction".into(),
    });

    // (c) backup 2, taken under the writer; then a time after it.
    let id2 = src.backup("pitr-2");
    assert_ne!(id1, id2);
    lap("backup 2");
    std::thread::sleep(Duration::from_millis(300));
    let (dump, t) = src.time_moment(&mut writer);
    moments.push(Moment {
        name: "time-after-backup-2",
        target: strings(&["--to", &t]),
        dump,
        backup: id2.clone(),
        log_line: "recovery stopping before commit of transaction".into(),
    });

    // (d) a named restore point.
    std::thread::sleep(Duration::from_millis(300));
    writer.pause().unwrap();
    let dump = src.dump();
    pg.psql("postgres", "select pg_create_restore_point('rp')")
        .unwrap();
    writer.resume();
    moments.push(Moment {
        name: "restore-point",
        target: strings(&["--to-name", "rp"]),
        dump,
        backup: id2.clone(),
        log_line: "recovery stopping at restore point \"rp\"".into(),
    });

    // (e) an LSN at a quiet moment.
    std::thread::sleep(Duration::from_millis(300));
    writer.pause().unwrap();
    let dump = src.dump();
    let lsn = pg.psql("postgres", "select pg_current_wal_lsn()").unwrap();
    writer.resume();
    moments.push(Moment {
        name: "lsn",
        target: strings(&["--to-lsn", &lsn]),
        dump,
        backup: id2.clone(),
        log_line: format!("recovery stopping after WAL location (LSN) \"{lsn}\""),
    });

    // (f) an xid: the committing transaction is included.
    std::thread::sleep(Duration::from_millis(300));
    writer.pause().unwrap();
    let xid = pg
        .psql(
            DB,
            "begin; insert into marks values ('xid', txid_current(), now()); \
             select txid_current(); commit;",
        )
        .unwrap();
    let dump = src.dump();
    writer.resume();
    assert!(
        dump.0.iter().any(|l| l.contains("'xid'")),
        "the marked transaction is not in the dump"
    );
    moments.push(Moment {
        name: "xid",
        target: strings(&["--to-xid", &xid]),
        dump,
        // The WAL index holds no xids: the oldest backup replays every later commit.
        backup: id1.clone(),
        log_line: format!("recovery stopping after commit of transaction {xid}"),
    });

    // (g) latest, after the writes stop and the stream catches up.
    std::thread::sleep(Duration::from_millis(300));
    let batches = writer.stop().unwrap();
    assert!(batches > 50, "the writer committed only {batches} batches");
    let dump = src.dump();
    src.catch_up();
    moments.push(Moment {
        name: "latest",
        target: strings(&["--to", "latest"]),
        dump,
        backup: id2.clone(),
        log_line: "archive recovery complete".into(),
    });
    assert_all_distinct(&moments);
    lap("all moments recorded, the stream caught up");

    // The planner picks backup 2 for a time after it, and --dry-run writes nothing.
    let dry = RestoredCluster::new(pg, "dry-run").unwrap();
    let mut args = moments[2].target.clone();
    args.push("--dry-run".into());
    let run = dry.restore(&src.repo, &args).unwrap();
    assert_eq!(run.planned_backup(), Some(id2.as_str()), "{run}");
    assert!(run.stdout.contains("dry run: nothing was written"), "{run}");
    assert!(
        !dry.pgdata.exists(),
        "--dry-run created {}",
        dry.pgdata.display()
    );
    lap("dry run");

    restore_all(&src, &moments);
    lap("all restores compared");
    drop(src);
    lap("source dropped");
}

/// Restores every moment, a few side by side (each into its own directory and port).
fn restore_all(src: &Source, moments: &[Moment]) {
    std::thread::scope(|s| {
        for chunk in moments.chunks(3) {
            let running: Vec<_> = chunk
                .iter()
                .map(|m| s.spawn(move || restore_and_compare(src, m)))
                .collect();
            for r in running {
                if let Err(panic) = r.join() {
                    std::panic::resume_unwind(panic);
                }
            }
        }
    });
}

/// A restored directory is, file for file, the backup PostgreSQL described in its own
/// manifest (pg_verifybackup), and after recovery its heap and indexes are sound
/// (pg_amcheck) and its page checksums verify (pg_checksums).
#[tokio::test(flavor = "multi_thread")]
async fn restored_dir_passes_pg_verifybackup_and_amcheck() {
    // amcheck in template1 too, so `db` has it and pg_amcheck --all finds it everywhere.
    let src = Source::start(
        file_target().unwrap(),
        &[
            ("template1", "create extension amcheck"),
            ("postgres", "create extension amcheck"),
        ],
    );
    let pg = &src.pg;
    pg.psql(
        DB,
        "create table wide as select g as id, md5(g::text) as h, g % 97 as k \
         from generate_series(1, 50000) g; \
         create unique index wide_id on wide(id); create index wide_k on wide(k, h);",
    )
    .unwrap();
    src.backup("verify");
    let writer = Writer::start(pg, DB).unwrap();
    pg.psql(
        DB,
        "update wide set h = md5(h) where k < 20; delete from wide where k = 50;",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    writer.stop().unwrap();
    let dump = src.dump();
    src.catch_up();

    let rc = RestoredCluster::new(pg, "verify").unwrap();
    let run = rc
        .restore(&src.repo, &strings(&["--to", "latest"]))
        .unwrap();
    assert!(run.stdout.contains("recovery is configured"), "{run}");
    let manifest = rc.pgdata.join("backup_manifest");
    assert!(manifest.exists(), "the restore wrote no backup_manifest");

    let verify = |what: &str| {
        // As the restoring user: the files are not postgres's until the server starts.
        let out = Command::new(pg.bin_dir().join("pg_verifybackup"))
            .arg("-n")
            .arg("-m")
            .arg(&manifest)
            .args(["-i", "recovery.signal", "-i", "postgresql.auto.conf"])
            .arg(&rc.pgdata)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("pg_verifybackup ({what}): {}", text.trim());
        (out.status.success(), text)
    };
    let (ok, text) = verify("restored");
    assert!(ok && text.contains("successfully verified"), "{text}");
    // The check has teeth: one changed byte in a relation file is reported.
    let victim = rc.pgdata.join("PG_VERSION");
    let original = std::fs::read(&victim).unwrap();
    let mut bad = original.clone();
    bad[0] ^= 0x01;
    std::fs::write(&victim, &bad).unwrap();
    let (ok, text) = verify("one byte changed");
    assert!(!ok && text.contains("PG_VERSION"), "{text}");
    std::fs::write(&victim, &original).unwrap();

    rc.start_by_hand(Duration::from_secs(60)).unwrap();
    dump.assert_same(&rc.dump(DB).unwrap(), "latest").unwrap();
    let out = rc
        .command("pg_amcheck")
        .args(["--all", "--heapallindexed", "--parent-check", "--progress"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim().is_empty(),
        "pg_amcheck found problems ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains("relations"),
        "pg_amcheck checked nothing: {stderr}"
    );
    rc.stop("fast").unwrap();
    let out = rc
        .command("pg_checksums")
        .arg("--check")
        .arg("-D")
        .arg(&rc.pgdata)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("Bad checksums:  0"),
        "pg_checksums: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Backup, one time target and `latest` on a store other than file://; wal-fetch in
/// restore_command reaches it through the --repo-option flags.
async fn round_trip(target: StoreTarget) {
    round_trip_with(target, &[]).await
}

async fn round_trip_with(target: StoreTarget, init_flags: &[&str]) {
    let src = Source::start_with(target, &[], init_flags);
    let id = src.backup("round-trip");
    let mut writer = Writer::start(&src.pg, DB).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (at_time, t) = src.time_moment(&mut writer);
    std::thread::sleep(Duration::from_millis(500));
    writer.stop().unwrap();
    let latest = src.dump();
    src.catch_up();
    let moments = [
        Moment {
            name: "time",
            target: strings(&["--to", &t]),
            dump: at_time,
            backup: id.clone(),
            log_line: "recovery stopping before commit of transaction".into(),
        },
        Moment {
            name: "latest",
            target: strings(&["--to", "latest"]),
            dump: latest,
            backup: id.clone(),
            log_line: "archive recovery complete".into(),
        },
    ];
    assert_all_distinct(&moments);
    restore_all(&src, &moments);
}

/// A repository made with a non-default zstd level and a small block size records both,
/// and restores exactly as the default one does.
#[tokio::test(flavor = "multi_thread")]
async fn pitr_round_trip_with_level_and_block_size() {
    let target = file_target().unwrap();
    let config_path = target
        .parsed_url()
        .unwrap()
        .to_file_path()
        .unwrap()
        .join("walferry.json");
    // A clone keeps the repository's temp dir alive after the round trip.
    round_trip_with(
        target.clone(),
        &["--compression-level", "9", "--block-size", "64"],
    )
    .await;
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    assert_eq!(config["compression"]["level"], 9, "{config}");
    assert_eq!(config["block_size"], 65536, "{config}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pitr_round_trip_azurite() {
    let Some(t) = azurite_target().await.unwrap() else {
        return;
    };
    round_trip(t).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pitr_round_trip_s3() {
    let Some(t) = s3_target().await.unwrap() else {
        return;
    };
    round_trip(t).await;
}

/// A tablespace whose original directory is still in use on this machine: a restore that
/// does not move it is refused without touching it, and `--tablespace-map` moves it.
#[tokio::test(flavor = "multi_thread")]
async fn tablespace_survives_round_trip() {
    let pg = PgCluster::start().unwrap();
    let ts_dir = pg.make_dir("ts-original").unwrap();
    pg.psql(
        "postgres",
        &format!("create tablespace ts location '{}'", ts_dir.display()),
    )
    .unwrap();
    pg.psql("postgres", &format!("create database {DB}"))
        .unwrap();
    pg.psql(
        DB,
        "create table tt (id int primary key using index tablespace ts, v text not null) \
         tablespace ts; \
         insert into tt select g, md5(g::text) from generate_series(1, 20000) g; \
         create table plain(id int primary key); insert into plain values (1), (2);",
    )
    .unwrap();
    let oid = pg
        .psql(
            "postgres",
            "select oid from pg_tablespace where spcname = 'ts'",
        )
        .unwrap();
    let repo = RestoreRepo::init(file_target().unwrap()).unwrap();
    let agent = repo
        .agent(&pg.superuser_conninfo(), &pg.root_dir().join("agent.log"))
        .unwrap();
    repo.backup(&pg.superuser_conninfo(), "ts")
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()));
    // WAL after the backup writes into the tablespace during recovery.
    pg.psql(
        DB,
        "insert into tt select g, 'after ' || g from generate_series(20001, 25000) g; \
         update tt set v = upper(v) where id % 10 = 0; delete from tt where id % 13 = 0;",
    )
    .unwrap();
    let src = DataDump::take(pg.command("pg_dump"), DB).unwrap();
    let lsn = pg.psql("postgres", "select pg_current_wal_lsn()").unwrap();
    wait_durable(&pg, &lsn, Duration::from_secs(60)).unwrap();
    let source_files = list_tree(&ts_dir);
    assert!(!source_files.is_empty());

    // Not moved: the original directory is in use, so the restore refuses, and leaves it be.
    let refused = RestoredCluster::new(&pg, "unmapped").unwrap();
    let err = refused
        .restore(&repo, &strings(&["--to", "latest"]))
        .map(|r| r.to_string())
        .expect_err("a restore onto the live tablespace directory succeeded");
    assert!(format!("{err:#}").contains("not empty"), "{err:#}");
    assert_eq!(
        list_tree(&ts_dir),
        source_files,
        "the failed restore changed the source's tablespace directory"
    );
    assert_eq!(
        pg.psql(DB, "select count(*) from tt").unwrap(),
        src.0
            .iter()
            .filter(|l| l.contains("public.tt "))
            .count()
            .to_string()
    );

    let moved = pg.make_dir("ts-moved").unwrap();
    let rc = RestoredCluster::new(&pg, "mapped").unwrap();
    let map = format!("{oid}={}", moved.display());
    let run = rc
        .restore(
            &repo,
            &strings(&["--to", "latest", "--tablespace-map", &map, "--start"]),
        )
        .unwrap();
    src.assert_same(&rc.dump(DB).unwrap(), "latest with a moved tablespace")
        .unwrap_or_else(|e| panic!("{e:#}\n{run}"));
    assert_eq!(
        rc.psql("postgres", &format!("select pg_tablespace_location({oid})"))
            .unwrap(),
        moved.display().to_string()
    );
    let link = std::fs::read_link(rc.pgdata.join("pg_tblspc").join(&oid)).unwrap();
    assert_eq!(link, moved);
    // The table's file really lives in the new place.
    let rel = rc.psql(DB, "select pg_relation_filepath('tt')").unwrap();
    let real = std::fs::canonicalize(rc.pgdata.join(&rel)).unwrap();
    assert!(
        real.starts_with(std::fs::canonicalize(&moved).unwrap()),
        "{rel} resolves to {}",
        real.display()
    );
    rc.stop("fast").unwrap();
    assert_eq!(pg.psql(DB, "select count(*) from plain").unwrap(), "2");
    assert_eq!(list_tree(&ts_dir), source_files);
}

/// Relative paths of every file under `dir`, sorted.
fn list_tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Restore to one moment, stop, then `--delta` into the same directory to a later one:
/// unchanged blocks are kept, and the data is exactly the second moment's.
#[tokio::test(flavor = "multi_thread")]
async fn delta_restore_reuses_matching_blocks() {
    let src = Source::start(file_target().unwrap(), &[]);
    let pg = &src.pg;
    pg.psql(
        DB,
        "create table bulk as select g as id, md5(g::text) as h from generate_series(1, 100000) g",
    )
    .unwrap();
    let id = src.backup("delta");
    let mut writer = Writer::start(pg, DB).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let (first, t1) = src.time_moment(&mut writer);
    std::thread::sleep(Duration::from_millis(400));
    pg.psql(DB, "update bulk set h = upper(h) where id % 3 = 0")
        .unwrap();
    let (second, t2) = src.time_moment(&mut writer);
    std::thread::sleep(Duration::from_millis(300));
    writer.stop().unwrap();
    src.catch_up();
    assert!(first != second);

    let rc = RestoredCluster::new(pg, "delta").unwrap();
    let run1 = rc
        .restore(&src.repo, &strings(&["--to", &t1, "--start"]))
        .unwrap();
    assert_eq!(run1.planned_backup(), Some(id.as_str()), "{run1}");
    first
        .assert_same(&rc.dump(DB).unwrap(), "first target")
        .unwrap();
    rc.stop("fast").unwrap();
    // The first run promoted the cluster: it wrote a new timeline and changed pages.
    assert!(rc.pgdata.join("pg_wal/00000002.history").exists());

    let run2 = rc
        .restore(&src.repo, &strings(&["--to", &t2, "--delta", "--start"]))
        .unwrap();
    let reused = run2
        .blocks_reused()
        .unwrap_or_else(|| panic!("the delta restore did not report reused blocks:\n{run2}"));
    assert!(reused > 0, "no block was reused:\n{run2}");
    for l in run1.stdout.lines().chain(run2.stdout.lines()) {
        if l.starts_with("restored ") {
            eprintln!("{l}");
        }
    }
    second
        .assert_same(&rc.dump(DB).unwrap(), "second target (delta)")
        .unwrap_or_else(|e| panic!("{e:#}\n{run2}"));
    rc.stop("fast").unwrap();
    let written = |r: &RestoreRun| -> f64 {
        r.stdout
            .lines()
            .find_map(|l| l.strip_prefix("restored "))
            .and_then(|l| l.split('(').nth(1))
            .and_then(|l| l.split(' ').next())
            .and_then(|mb| mb.parse().ok())
            .unwrap_or_else(|| panic!("no 'restored N files (X MB)' line:\n{r}"))
    };
    assert!(
        written(&run2) < written(&run1),
        "the delta restore wrote as much as a full one:\n{run1}\n{run2}"
    );
}
