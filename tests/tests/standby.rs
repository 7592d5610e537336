//! Backups taken from a hot standby, with the agent streaming from the standby too (the
//! usual way to keep backup load off a primary).

use std::time::Duration;

use walferry_tests::emulators::file_target;
use walferry_tests::pg::PgCluster;
use walferry_tests::restore::{
    strings, time_moment, wait_durable, wait_until, DataDump, RestoreRepo, RestoredCluster, Writer,
    WRITER_SCHEMA,
};

const DB: &str = "db";

/// Waits until `standby` has replayed the primary's WAL up to `lsn`.
fn wait_replayed(standby: &PgCluster, lsn: &str) {
    let sql = format!("select pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
    wait_until(
        &format!("the standby to replay up to {lsn}"),
        Duration::from_secs(60),
        || standby.psql("postgres", &sql).unwrap() == "t",
    );
}

/// BASE_BACKUP on a standby while the primary takes writes, the agent streaming from the
/// standby: the backup says it came from a standby, and restores to a moment after it and
/// to `latest` give the primary's data at those moments. The restored cluster is a new
/// primary: the source's standby.signal and primary_conninfo do not make it follow the
/// old primary (which is still running here).
#[tokio::test(flavor = "multi_thread")]
async fn backup_from_a_standby_restores_exactly() {
    let primary = PgCluster::start().unwrap();
    primary
        .psql("postgres", &format!("create database {DB}"))
        .unwrap();
    primary.psql(DB, WRITER_SCHEMA).unwrap();
    primary
        .psql(
            DB,
            "create table big (id int primary key, v text not null); \
             insert into big select g, md5(g::text) from generate_series(1, 100000) g; \
             checkpoint;",
        )
        .unwrap();
    let standby = PgCluster::standby_of(&primary).unwrap();
    assert_eq!(
        standby
            .psql("postgres", "select pg_is_in_recovery()")
            .unwrap(),
        "t"
    );
    let conninfo = standby.superuser_conninfo();
    let repo = RestoreRepo::init(file_target().unwrap()).unwrap();
    let agent = repo
        .agent(&conninfo, &standby.root_dir().join("agent.log"))
        .unwrap();

    let mut writer = Writer::start(&primary, DB).unwrap();
    let (id, log) = repo
        .backup_with(&conninfo, "from-standby", &[])
        .unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{}", agent.log()));
    std::thread::sleep(Duration::from_millis(800));
    let (dump_t, t) = time_moment(&primary, DB, &mut writer).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    writer.stop().unwrap();
    let dump_end = DataDump::take(primary.command("pg_dump"), DB).unwrap();
    let lsn = primary
        .psql("postgres", "select pg_current_wal_lsn()")
        .unwrap();
    wait_replayed(&standby, &lsn);
    wait_durable(&standby, &lsn, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{}", agent.log()));

    // To T, files first: the label says where the backup was taken.
    let rc = RestoredCluster::new(&primary, "t").unwrap();
    let run = rc.restore(&repo, &strings(&["--to", &t])).unwrap();
    assert_eq!(run.planned_backup(), Some(id.as_str()), "{run}\n{log}");
    let label = std::fs::read_to_string(rc.pgdata.join("backup_label")).unwrap();
    assert!(label.contains("BACKUP FROM: standby"), "{label}");
    assert!(
        !rc.pgdata.join("standby.signal").exists(),
        "the restore kept the source's standby.signal"
    );
    rc.start_by_hand(Duration::from_secs(90)).unwrap();
    dump_t
        .assert_same(&rc.dump(DB).unwrap(), "T from a standby's backup")
        .unwrap_or_else(|e| panic!("{e:#}\n{run}"));
    assert_eq!(
        rc.psql("postgres", "select pg_is_in_recovery()").unwrap(),
        "f",
        "the restored cluster is still in recovery"
    );
    rc.stop("immediate").unwrap();

    // `latest` ends at the end of the stored WAL and promotes, with the old primary up.
    let rl = RestoredCluster::new(&primary, "latest").unwrap();
    let run = rl
        .restore(&repo, &strings(&["--to", "latest", "--start"]))
        .unwrap();
    dump_end
        .assert_same(&rl.dump(DB).unwrap(), "latest from a standby's backup")
        .unwrap_or_else(|e| panic!("{e:#}\n{run}"));
    assert_eq!(
        rl.psql("postgres", "select pg_is_in_recovery()").unwrap(),
        "f"
    );
    drop(agent);
}
