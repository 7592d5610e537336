//! `walferry-agent backup --pgdata DIR`: backups that read the data directory directly
//! (pg_backup_start/stop), restored to exact moments and checked by pg_verifybackup
//! against the backup_manifest walferry writes for them.

use std::process::Command;
use std::time::Duration;

use walferry_tests::bins::run_walferry;
use walferry_tests::emulators::file_target;
use walferry_tests::pg::{give_to_postgres, PgCluster};
use walferry_tests::restore::{
    strings, time_moment, wait_durable, DataDump, RestoreRepo, RestoredCluster, Writer,
    WRITER_SCHEMA,
};

const DB: &str = "db";

fn backups_listed(repo: &RestoreRepo) -> usize {
    let mut args = vec!["list".to_string()];
    args.extend(repo.args());
    args.push("--json".into());
    let (st, out, err) = run_walferry("walferry-agent", &args, &[]).unwrap();
    assert!(st.success(), "list failed:\n{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["backups"].as_array().unwrap().len()
}

/// MB the backup summary says it did not read again.
fn unread_mb(log: &str) -> f64 {
    log.split("; ")
        .find_map(|p| {
            p.strip_suffix(" MB in files unchanged since the previous backup not read again")
        })
        .map(|n| n.parse().unwrap())
        .unwrap_or(0.0)
}

fn pg_verifybackup(pg: &PgCluster, rc: &RestoredCluster) -> (bool, String) {
    let out = Command::new(pg.bin_dir().join("pg_verifybackup"))
        .arg("-n")
        .arg("-m")
        .arg(rc.pgdata.join("backup_manifest"))
        .args(["-i", "recovery.signal", "-i", "postgresql.auto.conf"])
        // A moved tablespace: the restore rewrote tablespace_map, and recovery makes the
        // pg_tblspc links when it starts.
        .args(["-i", "tablespace_map", "-i", "pg_tblspc"])
        .arg(&rc.pgdata)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The whole path: a refused directory, a first backup with no streamer (its WAL read from
/// pg_wal), a second one under a live writer that skips the files nobody touched, and
/// restores of both to exact moments, with a tablespace moved on the way.
#[tokio::test(flavor = "multi_thread")]
async fn local_backups_restore_exactly_and_skip_unchanged_files() {
    let pg = PgCluster::start().unwrap();
    let conninfo = pg.superuser_conninfo();
    let ts_dir = pg.make_dir("ts").unwrap();
    pg.psql(
        "postgres",
        &format!(
            "create tablespace ts location '{}'; create database {DB}; \
             create unlogged table scratch as select g from generate_series(1, 1000) g;",
            ts_dir.display()
        ),
    )
    .unwrap();
    pg.psql(DB, WRITER_SCHEMA).unwrap();
    pg.psql(
        DB,
        "create table big (id int primary key, v text not null); \
         insert into big select g, md5(g::text) from generate_series(1, 200000) g; \
         create table hot (id int primary key, v text not null) tablespace ts; \
         insert into hot select g, md5(g::text) from generate_series(1, 20000) g; \
         vacuum (analyze); checkpoint;",
    )
    .unwrap();
    let big_mb: f64 = pg
        .psql(DB, "select pg_relation_size('big')")
        .unwrap()
        .parse::<f64>()
        .unwrap()
        / 1e6;
    let oid = pg
        .psql(
            "postgres",
            "select oid from pg_tablespace where spcname = 'ts'",
        )
        .unwrap();
    let repo = RestoreRepo::init(file_target().unwrap()).unwrap();
    let local = vec!["--pgdata".to_string(), pg.data_dir().display().to_string()];

    // Not the server's data directory: refused before anything is stored.
    let elsewhere = pg.make_dir("not-pgdata").unwrap();
    let (st, _, err) = repo
        .run_backup(
            &conninfo,
            "wrong",
            &strings(&["--pgdata", &elsewhere.display().to_string()]),
        )
        .unwrap();
    assert!(!st.success(), "a backup of an empty directory succeeded");
    assert!(
        err.contains("pg_control") && err.contains("--pgdata must be the server's data directory"),
        "{err}"
    );
    assert_eq!(backups_listed(&repo), 0);

    // Backup 1, no streamer: its WAL comes from pg_wal. Files quiet for a while get a
    // record, so the next backup can skip them.
    std::thread::sleep(Duration::from_millis(2500));
    let (id1, log1) = repo.backup_with(&conninfo, "one", &local).unwrap();
    assert_eq!(
        unread_mb(&log1),
        0.0,
        "the first backup skipped files: {log1}"
    );
    assert!(log1.contains("stored WAL from pg_wal"), "{log1}");
    let dump1 = DataDump::take(pg.command("pg_dump"), DB).unwrap();
    let lsn1 = pg.psql("postgres", "select pg_current_wal_lsn()").unwrap();

    // Streaming from here on; only `hot` (in the tablespace) changes before backup 2.
    let agent = repo
        .agent(&conninfo, &pg.root_dir().join("agent.log"))
        .unwrap();
    pg.psql(
        DB,
        "update hot set v = upper(v) where id % 3 = 0; delete from hot where id % 7 = 0; checkpoint;",
    )
    .unwrap();
    let mut writer = Writer::start(&pg, DB).unwrap();
    let (id2, log2) = repo
        .backup_with(&conninfo, "two", &local)
        .unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{}", agent.log()));
    assert!(
        unread_mb(&log2) >= big_mb,
        "backup 2 read the untouched table `big` ({big_mb:.1} MB) again: {log2}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let (dump2, t2) = time_moment(&pg, DB, &mut writer).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    writer.stop().unwrap();
    let lsn = pg.psql("postgres", "select pg_current_wal_lsn()").unwrap();
    wait_durable(&pg, &lsn, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{}", agent.log()));

    // To T2 from backup 2, with the tablespace moved: pg_verifybackup passes on the files
    // as restored, then recovery reaches exactly the data dumped at T2.
    let moved = pg.make_dir("ts-moved").unwrap();
    let rc = RestoredCluster::new(&pg, "two").unwrap();
    let map = format!("{oid}={}", moved.display());
    let run = rc
        .restore(&repo, &strings(&["--to", &t2, "--tablespace-map", &map]))
        .unwrap();
    assert_eq!(run.planned_backup(), Some(id2.as_str()), "{run}");
    let (ok, text) = pg_verifybackup(&pg, &rc);
    assert!(ok && text.contains("successfully verified"), "{text}");
    // (start_by_hand hands over the data directory; the moved tablespace is ours to give.)
    give_to_postgres(&moved).unwrap();
    rc.start_by_hand(Duration::from_secs(90)).unwrap();
    dump2
        .assert_same(&rc.dump(DB).unwrap(), "T2 from a local backup")
        .unwrap_or_else(|e| panic!("{e:#}\n{run}"));
    // An unlogged table comes back empty, as from BASE_BACKUP.
    assert_eq!(
        rc.psql("postgres", "select count(*) from scratch").unwrap(),
        "0"
    );
    rc.stop("immediate").unwrap();

    // Backup 1 to the LSN right after it, through WAL it stored from pg_wal.
    let rc1 = RestoredCluster::new(&pg, "one").unwrap();
    let run1 = rc1
        .restore(
            &repo,
            &strings(&[
                "--to-lsn",
                &lsn1,
                "--backup",
                &id1,
                "--tablespace-map",
                &format!("{oid}={}", pg.make_dir("ts-one").unwrap().display()),
                "--start",
            ]),
        )
        .unwrap();
    dump1
        .assert_same(&rc1.dump(DB).unwrap(), "backup 1 at its end")
        .unwrap_or_else(|e| panic!("{e:#}\n{run1}"));
    drop(agent);
}
