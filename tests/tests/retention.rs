//! Retention end to end: a real PostgreSQL 15, `walferry-agent run` streaming, real
//! `walferry-agent backup`s, then `walferry-agent expire`: what it deletes (and, dry, would
//! delete), that the remaining window restores and has no hole, the writer lease that
//! keeps two writers apart, and the grace period that protects a backup in progress.

use std::collections::BTreeSet;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use serde_json::Value;
use walferry_agent::lease::{Lease, LeaseError};
use walferry_formats::backup::BackupManifest;
use walferry_formats::envelope::Kind;
use walferry_formats::keyring::MasterKey;
use walferry_formats::walcatalog::WalCatalog;
use walferry_formats::{Lsn, Repository, SegmentNo, SegmentSize, TimelineId, Units};
use walferry_tests::bins::{run_walferry, AgentProcess};
use walferry_tests::emulators::file_target;
use walferry_tests::pg::PgCluster;
use walferry_tests::restore::{server_now, wait_durable, RestoreRepo, RestoredCluster};

const DB: &str = "db";
const SEG: SegmentSize = SegmentSize::DEFAULT;

/// Rows of 256 random bytes each: incompressible, so `rows` rows store about
/// `rows * 270` bytes (pages of ~28 rows).
fn random_table_sql(table: &str, rows: u64) -> String {
    format!(
        "create table {table} as select g, \
         (select decode(string_agg(md5(random()::text || g::text || i::text), ''), 'hex') \
          from generate_series(1, 16) i) as b \
         from generate_series(1, {rows}) g"
    )
}

struct Source {
    pg: PgCluster,
    repo: RestoreRepo,
    agent: AgentProcess,
}

impl Source {
    fn start() -> Source {
        let pg = PgCluster::start().unwrap();
        pg.psql("postgres", &format!("create database {DB}"))
            .unwrap();
        pg.psql(DB, "create table t(id int primary key, note text not null)")
            .unwrap();
        let repo = RestoreRepo::init(file_target().unwrap()).unwrap();
        let agent = repo
            .agent(&pg.superuser_conninfo(), &pg.root_dir().join("agent.log"))
            .unwrap();
        Source { pg, repo, agent }
    }

    /// Inserts rows `from..=to` into `t`, in one transaction.
    fn insert(&self, from: u32, to: u32) {
        self.pg
            .psql(
                DB,
                &format!(
                    "insert into t select g, md5(g::text) from generate_series({from}, {to}) g"
                ),
            )
            .unwrap();
    }

    fn count(&self) -> u64 {
        self.pg
            .psql(DB, "select count(*) from t")
            .unwrap()
            .parse()
            .unwrap()
    }

    fn switch_wal(&self) {
        self.pg.psql("postgres", "select pg_switch_wal()").unwrap();
    }

    fn catch_up(&self) {
        let lsn = self
            .pg
            .psql("postgres", "select pg_current_wal_lsn()")
            .unwrap();
        wait_durable(&self.pg, &lsn, Duration::from_secs(300))
            .unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{}", self.agent.log()));
    }

    fn backup(&self, label: &str) -> String {
        self.repo
            .backup(&self.pg.superuser_conninfo(), label)
            .unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{}", self.agent.log()))
    }
}

fn repository(repo: &RestoreRepo) -> Repository {
    Repository::open(&repo.target.url, repo.target.options.clone()).unwrap()
}

async fn units(repo: &RestoreRepo) -> Units {
    let text = std::fs::read_to_string(&repo.key).unwrap();
    let master = MasterKey::from_hex(&text).unwrap();
    Units::load(repository(repo), Some(&master))
        .await
        .unwrap()
        .0
}

async fn manifest(units: &Units, id: &str) -> BackupManifest {
    let plain = units
        .get(&BackupManifest::key(id), Kind::Manifest)
        .await
        .unwrap();
    BackupManifest::from_json(&plain).unwrap()
}

fn packs_of(m: &BackupManifest) -> BTreeSet<String> {
    m.blocks.iter().map(|b| b.pack.clone()).collect()
}

async fn all_keys(repo: &Repository) -> BTreeSet<String> {
    repo.list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

fn agent_cmd(repo: &RestoreRepo, cmd: &str, extra: &[&str]) -> (ExitStatus, String, String) {
    let mut args = vec![cmd.to_string()];
    args.extend(repo.args());
    args.extend(extra.iter().map(|s| s.to_string()));
    run_walferry("walferry-agent", &args, &[]).unwrap()
}

/// `expire EXTRA --json`, which must succeed; its JSON.
fn expire_json(repo: &RestoreRepo, extra: &[&str]) -> Value {
    let mut a = extra.to_vec();
    a.push("--json");
    let (st, out, err) = agent_cmd(repo, "expire", &a);
    assert!(
        st.success(),
        "expire {extra:?} failed ({st}):\n{out}\n{err}"
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("expire printed no JSON ({e}):\n{out}"))
}

fn list_json(repo: &RestoreRepo) -> Value {
    let (st, out, err) = agent_cmd(repo, "list", &["--json"]);
    assert!(st.success(), "list failed:\n{out}\n{err}");
    serde_json::from_str(&out).unwrap()
}

fn strs(v: &Value, field: &str, key: &str) -> Vec<String> {
    v[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} is not an array in {v}"))
        .iter()
        .map(|x| x[key].as_str().unwrap().to_string())
        .collect()
}

fn ts(s: &str) -> jiff::Timestamp {
    s.parse().unwrap()
}

/// `list` prints times to the microsecond.
fn assert_same_time(a: &str, b: &str) {
    let d = ts(a).duration_since(ts(b)).abs();
    assert!(d < jiff::SignedDuration::from_millis(1), "{a} vs {b}");
}

/// Every segment from `from` to the end of the stored WAL on `tli` is there (sealed, or
/// parts covering it; the last one may be partial).
fn assert_no_hole(catalog: &WalCatalog, tli: TimelineId, from: Lsn) {
    let wal = catalog.timeline(tli).expect("no WAL on the timeline");
    let end = wal.end(SEG).expect("no WAL end");
    let last = Lsn(end.0 - 1).segment(SEG).0;
    for s in from.segment(SEG).0..=last {
        let seg = SegmentNo(s);
        let covered = wal.part_cover(seg).1;
        assert!(
            wal.sealed.contains(&seg) || covered == SEG.bytes() || (s == last && covered > 0),
            "WAL segment {s:X} is missing after expire (window {from}..{end})"
        );
    }
}

/// Three backups with load in between; `--retain-full 2` drops the first, its exclusive
/// packs and the WAL before the second; the window moves forward, has no hole, restores.
#[tokio::test(flavor = "multi_thread")]
async fn retain_full_drops_the_oldest_and_keeps_a_window_without_holes() {
    let src = Source::start();
    // A table only the first backup holds: its blocks fill packs no later backup needs.
    src.pg
        .psql(DB, &random_table_sql("scratch", 400_000))
        .unwrap();
    src.insert(1, 1000);
    src.catch_up();
    let b1 = src.backup("one");
    src.pg.psql(DB, "drop table scratch").unwrap();
    src.insert(1001, 2000);
    src.switch_wal();
    src.insert(2001, 3000);
    src.catch_up();
    let b2 = src.backup("two");
    src.insert(3001, 4000);
    src.switch_wal();
    src.catch_up();
    // The moment to restore to later: inside the window that remains.
    let moment = server_now(&src.pg).unwrap();
    let at_moment = src.count();
    std::thread::sleep(Duration::from_millis(20));
    src.insert(4001, 5000);
    src.switch_wal();
    let b3 = src.backup("three");
    src.insert(5001, 6000);
    src.switch_wal();
    src.insert(6001, 6001);
    src.catch_up();

    let units = units(&src.repo).await;
    let repo = units.repo().clone();
    let (m1, m2, m3) = (
        manifest(&units, &b1).await,
        manifest(&units, &b2).await,
        manifest(&units, &b3).await,
    );
    let exclusive: BTreeSet<String> = packs_of(&m1)
        .difference(&packs_of(&m2).union(&packs_of(&m3)).cloned().collect())
        .cloned()
        .collect();
    if exclusive.is_empty() {
        let sizes: std::collections::BTreeMap<String, u64> = repo
            .list("packs")
            .await
            .unwrap()
            .into_iter()
            .map(|o| (o.key, o.size))
            .collect();
        for p in packs_of(&m1) {
            let n = |m: &BackupManifest| m.blocks.iter().filter(|b| b.pack == p).count();
            eprintln!(
                "{p}: {} bytes; blocks used by b1 {}, b2 {}, b3 {}",
                sizes.get(&p).copied().unwrap_or(0),
                n(&m1),
                n(&m2),
                n(&m3)
            );
        }
        eprintln!("b1 stats {:?}\nb2 stats {:?}", m1.stats, m2.stats);
        panic!("backup 1 has no pack of its own; the scratch table should have filled one");
    }
    let before = list_json(&src.repo);
    assert_eq!(
        strs(&before, "backups", "id"),
        [b1.as_str(), b2.as_str(), b3.as_str()]
    );
    assert_same_time(
        before["windows"][0]["from"].as_str().unwrap(),
        &m1.finished_at,
    );

    // Dry run: says what would go, deletes nothing.
    let keys_before = all_keys(&repo).await;
    let dry = expire_json(&src.repo, &["--retain-full", "2", "--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        all_keys(&repo).await,
        keys_before,
        "--dry-run deleted something"
    );
    assert_eq!(strs(&dry, "deleted_backups", "id"), [b1.as_str()]);
    assert_eq!(strs(&dry, "kept_backups", "id"), [b2.as_str(), b3.as_str()]);
    let dry_packs: BTreeSet<String> = strs(&dry, "deleted_packs", "key").into_iter().collect();
    assert_eq!(dry_packs, exclusive, "the packs only backup 1 used");
    let floor = m2.start_lsn.segment(SEG);
    assert_eq!(dry["wal_floor"]["backup"], b2.as_str());
    assert_eq!(dry["wal_floor"]["segment"], floor.0);
    let dry_wal = strs(&dry, "deleted_wal", "key");
    let reasons = strs(&dry, "deleted_wal", "reason");
    assert!(
        reasons.iter().any(|r| r.starts_with("before")),
        "no WAL before backup 2 to delete? {dry}"
    );
    for (k, why) in dry_wal.iter().zip(&reasons) {
        if why.starts_with("superseded") {
            // Parts of a segment stored whole (the streamer had not removed them yet).
            let sealed = k.split(".parts/").next().unwrap().to_string();
            assert!(keys_before.contains(&sealed), "{k}: no sealed {sealed}");
            continue;
        }
        let parsed = walferry_formats::layout::parse_wal_key(k, SEG);
        let seg = match parsed {
            Some(
                walferry_formats::layout::WalObject::Segment { segno, .. }
                | walferry_formats::layout::WalObject::Part { segno, .. }
                | walferry_formats::layout::WalObject::SegmentIndex { segno, .. }
                | walferry_formats::layout::WalObject::PartIndex { segno, .. }
                | walferry_formats::layout::WalObject::BackupHistory { segno, .. },
            ) => segno,
            other => panic!("unexpected WAL object {k}: {other:?}"),
        };
        assert!(seg < floor, "{k} is at or after backup 2's start segment");
    }
    let t = &dry["totals"];
    assert_eq!(t["manifests"]["objects"], 1);
    assert_eq!(t["packs"]["objects"], exclusive.len());
    assert_eq!(t["wal"]["objects"], dry_wal.len());
    assert!(t["bytes"].as_u64().unwrap() > 60_000_000, "{t}");
    // The human form says the same.
    let (st, out, err) = agent_cmd(&src.repo, "expire", &["--retain-full", "2", "--dry-run"]);
    assert!(st.success(), "{err}");
    assert!(
        out.contains("dry run") && out.contains(&b1) && out.contains("would free"),
        "{out}"
    );
    assert_eq!(all_keys(&repo).await, keys_before);

    // For real.
    let done = expire_json(&src.repo, &["--retain-full", "2"]);
    assert_eq!(done["dry_run"], false);
    assert_eq!(done["deleted_backups"], dry["deleted_backups"]);
    assert_eq!(done["deleted_packs"], dry["deleted_packs"]);
    let keys_after = all_keys(&repo).await;
    assert!(!keys_after.contains(&BackupManifest::key(&b1)));
    for p in &exclusive {
        assert!(!keys_after.contains(p), "{p} survived");
    }
    for p in packs_of(&m2).union(&packs_of(&m3)) {
        assert!(
            keys_after.contains(p),
            "{p}, used by a kept backup, is gone"
        );
    }
    for k in &dry_wal {
        assert!(!keys_after.contains(k), "{k} survived");
    }
    // Everything else is untouched (the streamer itself removes parts of segments it
    // sealed, so only sealed WAL and non-WAL objects are compared).
    let deleted: BTreeSet<String> = strs(&done, "deleted_wal", "key")
        .into_iter()
        .chain(strs(&done, "deleted_packs", "key"))
        .chain([BackupManifest::key(&b1)])
        .collect();
    for k in keys_before.difference(&deleted) {
        if !k.starts_with("lease/") && !k.contains(".parts/") {
            assert!(keys_after.contains(k), "{k} was deleted but not listed");
        }
    }
    // A second run finds nothing more to do (but streamed parts the streamer has sealed
    // since and not yet removed).
    let again = expire_json(&src.repo, &["--retain-full", "2"]);
    assert_eq!(again["totals"]["manifests"]["objects"], 0, "{again}");
    assert_eq!(again["totals"]["packs"]["objects"], 0, "{again}");
    for why in strs(&again, "deleted_wal", "reason") {
        assert!(why.starts_with("superseded"), "{again}");
    }

    // list: two backups; the window starts later, at backup 2, and has no hole.
    let after = list_json(&src.repo);
    assert_eq!(strs(&after, "backups", "id"), [b2.as_str(), b3.as_str()]);
    let from = after["windows"][0]["from"].as_str().unwrap();
    assert_same_time(from, &m2.finished_at);
    assert!(ts(from) > ts(&m1.finished_at));
    assert!(
        after["timelines"][0]["gaps"].as_array().unwrap().is_empty(),
        "{after}"
    );
    let catalog = WalCatalog::load(&repo, SEG).await.unwrap();
    assert_no_hole(&catalog, m2.timeline, m2.start_lsn);
    let first = catalog
        .timeline(m2.timeline)
        .unwrap()
        .sealed
        .first()
        .copied();
    assert_eq!(
        first,
        Some(floor),
        "WAL below the floor survived, or the floor itself went"
    );

    // verify agrees: intact, continuous from every backup's start.
    let mut vargs = vec!["verify".to_string()];
    vargs.extend(src.repo.args());
    let (st, out, err) = run_walferry("walferry-restore", &vargs, &[]).unwrap();
    assert!(st.success(), "verify after expire failed:\n{out}\n{err}");

    // A moment inside the remaining window restores from backup 2 and its WAL.
    let rc = RestoredCluster::new(&src.pg, "moment").unwrap();
    let run = rc
        .restore(
            &src.repo,
            &["--to".into(), moment.clone(), "--start".into()],
        )
        .unwrap_or_else(|e| panic!("restore to {moment}: {e:#}"));
    assert_eq!(run.planned_backup(), Some(b2.as_str()), "{run}");
    let restored: u64 = rc
        .psql(DB, "select count(*) from t")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(restored, at_moment, "{run}");
    rc.stop("fast").unwrap();
    // And a moment before the window is refused, naming the window.
    let rc = RestoredCluster::new(&src.pg, "too-early").unwrap();
    let early = (ts(&m1.finished_at) + jiff::SignedDuration::from_millis(1))
        .round(jiff::Unit::Microsecond)
        .unwrap()
        .to_string();
    let err = rc
        .restore(&src.repo, &["--to".into(), early])
        .err()
        .expect("a restore to before the window succeeded");
    assert!(
        format!("{err:#}").contains("before the first backup"),
        "{err:#}"
    );
}

/// `--recovery-window` keeps the newest backup that finished before `now - window` and
/// every later one; with `--retain-full` too, the union is kept.
#[tokio::test(flavor = "multi_thread")]
async fn recovery_window_keeps_the_backup_the_window_starts_from() {
    let src = Source::start();
    src.insert(1, 100);
    let b1 = src.backup("one");
    src.insert(101, 200);
    src.switch_wal();
    let b2 = src.backup("two");
    std::thread::sleep(Duration::from_secs(3));
    let mid = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    src.insert(201, 300);
    src.switch_wal();
    let b3 = src.backup("three");
    src.insert(301, 400);
    src.catch_up();
    // Let b3 be more than a second old (for the 1 s window below).
    std::thread::sleep(Duration::from_secs(2));

    // A window reaching back to `mid`: b2 finished before it, b3 after it.
    let window = format!("{}s", mid.elapsed().as_secs() + 1);
    let dry = expire_json(&src.repo, &["--recovery-window", &window, "--dry-run"]);
    assert_eq!(
        strs(&dry, "kept_backups", "id"),
        [b2.as_str(), b3.as_str()],
        "{dry}"
    );
    assert_eq!(strs(&dry, "deleted_backups", "id"), [b1.as_str()]);
    assert_eq!(dry["kept_backups"][0]["kept_by"][0], "recovery_window");
    // A window older than every backup keeps them all; a tiny one keeps the newest only.
    let all = expire_json(&src.repo, &["--recovery-window", "1h", "--dry-run"]);
    assert_eq!(
        strs(&all, "kept_backups", "id"),
        [b1.as_str(), b2.as_str(), b3.as_str()]
    );
    let tiny = expire_json(&src.repo, &["--recovery-window", "1s", "--dry-run"]);
    assert_eq!(strs(&tiny, "kept_backups", "id"), [b3.as_str()]);
    // Both rules: kept when either keeps it.
    let both = expire_json(
        &src.repo,
        &["--recovery-window", "1s", "--retain-full", "2", "--dry-run"],
    );
    assert_eq!(
        strs(&both, "kept_backups", "id"),
        [b2.as_str(), b3.as_str()]
    );
    // Usage errors: exit 2, nothing done.
    for bad in [
        vec![],
        vec!["--retain-full", "0"],
        vec!["--recovery-window", "soon"],
    ] {
        let (st, _, err) = agent_cmd(&src.repo, "expire", &bad);
        assert_eq!(st.code(), Some(2), "{bad:?}: {err}");
    }

    let window = format!("{}s", mid.elapsed().as_secs() + 1);
    let done = expire_json(&src.repo, &["--recovery-window", &window]);
    assert_eq!(
        strs(&done, "deleted_backups", "id"),
        [b1.as_str()],
        "{done}"
    );
    let after = list_json(&src.repo);
    assert_eq!(strs(&after, "backups", "id"), [b2.as_str(), b3.as_str()]);
    let u = units(&src.repo).await;
    let m2 = manifest(&u, &b2).await;
    let catalog = WalCatalog::load(u.repo(), SEG).await.unwrap();
    assert_no_hole(&catalog, m2.timeline, m2.start_lsn);
}

/// The writer lease: while someone holds it, `expire` is refused with a message naming the
/// holder; after release (or once a dead holder's lease expires) it works. Dry runs only read.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_writer_is_refused_while_the_lease_is_held() {
    let repo = RestoreRepo::init(file_target().unwrap()).unwrap();
    let store = repository(&repo);
    let held = Lease::acquire(&store, "test-holder", Duration::from_secs(60))
        .await
        .unwrap();
    let holder = held.record().await.holder;

    let (st, out, err) = agent_cmd(&repo, "expire", &["--retain-full", "1"]);
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("writer lease is held by") && err.contains(&holder),
        "{err}"
    );
    assert!(
        err.contains("purpose test-holder") && err.contains("expires"),
        "{err}"
    );
    eprintln!("refused as expected: {}", err.trim());
    // A dry run deletes nothing and needs no lease.
    let (st, out, err) = agent_cmd(&repo, "expire", &["--retain-full", "1", "--dry-run"]);
    assert!(st.success(), "{out}{err}");
    // Still ours.
    assert_eq!(
        Lease::current(&store).await.unwrap().unwrap().holder,
        holder
    );

    held.release().await.unwrap();
    let v = expire_json(&repo, &["--retain-full", "1"]);
    assert_eq!(v["totals"]["objects"], 0);
    // expire released its lease: another writer gets it at once.
    let cur = Lease::current(&store).await.unwrap().unwrap();
    assert!(cur.released && cur.purpose == "expire", "{cur:?}");
    let again = Lease::acquire(&store, "test-holder", Duration::from_secs(2))
        .await
        .unwrap();
    // A holder that dies without releasing: refused until its lease expires, then taken over.
    std::mem::forget(again);
    let (st, _, err) = agent_cmd(&repo, "expire", &["--retain-full", "1"]);
    assert_eq!(st.code(), Some(1), "{err}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (st, out, err) = agent_cmd(&repo, "expire", &["--retain-full", "1"]);
    assert!(
        st.success(),
        "an expired lease was not taken over:\n{out}{err}"
    );
    // While expire holds it, a library writer is refused too (and sees who).
    match Lease::acquire(&store, "x", Duration::from_secs(5)).await {
        Ok(l) => l.release().await.unwrap(),
        Err(e) => panic!("expire did not release its lease: {e}"),
    }
    let blocker = Lease::acquire(&store, "run", Duration::from_secs(60))
        .await
        .unwrap();
    match Lease::acquire(&store, "backup", Duration::from_secs(60)).await {
        Err(LeaseError::Held(r)) => assert_eq!(r.purpose, "run"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("two holders at once"),
    }
    blocker.release().await.unwrap();
}

/// The lease's create-only arbitration on every store walferry supports: of many
/// contenders exactly one wins, the others are refused naming it, and an expired lease is
/// taken over while its old holder learns it lost it.
#[tokio::test(flavor = "multi_thread")]
async fn the_lease_arbitrates_on_every_store() {
    for target in walferry_tests::emulators::all_targets().await.unwrap() {
        let store = Repository::open(&target.url, target.options.clone()).unwrap();
        let contenders: Vec<_> = (0..6)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    Lease::acquire(&store, &format!("c{i}"), Duration::from_secs(2)).await
                })
            })
            .collect();
        let mut won = Vec::new();
        let mut refused = Vec::new();
        for c in contenders {
            match c.await.unwrap() {
                Ok(l) => won.push(l),
                Err(LeaseError::Held(r)) => refused.push(r.holder),
                Err(e) => panic!("{}: {e}", target.label),
            }
        }
        assert_eq!(won.len(), 1, "{}: {} winners", target.label, won.len());
        let winner = won.pop().unwrap();
        let holder = winner.record().await.holder;
        assert!(refused.iter().all(|h| *h == holder), "{}", target.label);
        // Not renewed: it expires and is taken over; the old holder finds out.
        tokio::time::sleep(Duration::from_millis(2200)).await;
        let next = Lease::acquire(&store, "next", Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{}: no takeover: {e}", target.label));
        assert!(
            matches!(winner.renew().await, Err(LeaseError::Lost(_))),
            "{}",
            target.label
        );
        winner.release().await.unwrap();
        next.renew().await.unwrap();
        let cur = Lease::current(&store).await.unwrap().unwrap();
        assert_eq!(cur.purpose, "next", "{}", target.label);
        next.release().await.unwrap();
        eprintln!("lease arbitration ok on {}", target.label);
    }
}

fn signal(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig} {pid}");
}

/// `expire --retain-full 1` while a backup is running (held still with SIGSTOP right after
/// it stored its first pack): the running backup's packs are unreferenced but young, so
/// they stay; the backup completes and restores.
#[tokio::test(flavor = "multi_thread")]
async fn expire_during_a_running_backup_leaves_it_intact() {
    let src = Source::start();
    src.insert(1, 100);
    let b1 = src.backup("one");
    src.insert(101, 200);
    src.switch_wal();
    let b2 = src.backup("two");
    // A bigger dataset for the third backup: several packs.
    src.pg.psql(DB, &random_table_sql("big", 250_000)).unwrap();
    src.insert(201, 300);
    src.catch_up();
    let want_rows = src.count();
    let want_big = src
        .pg
        .psql(DB, "select count(*), sum(length(b)) from big")
        .unwrap();

    let store = repository(&src.repo);
    let packs_before: BTreeSet<String> = store
        .list("packs")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    let log = src.pg.root_dir().join("backup3.log");
    let mut args = vec!["backup".to_string()];
    args.extend(src.repo.args());
    args.extend([
        "--pg".into(),
        src.pg.superuser_conninfo(),
        "--label".into(),
        "three".into(),
    ]);
    let mut backup = AgentProcess::spawn(&args, &log).unwrap();
    let pid = backup.pid().unwrap();
    // Wait for its first pack, then hold it still.
    let deadline = Instant::now() + Duration::from_secs(120);
    let new_packs = loop {
        let now: BTreeSet<String> = store
            .list("packs")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        let new: BTreeSet<String> = now.difference(&packs_before).cloned().collect();
        if !new.is_empty() {
            signal(pid, "STOP");
            break new;
        }
        assert!(
            backup.is_running(),
            "the backup ended before storing a pack:\n{}",
            backup.log()
        );
        assert!(
            Instant::now() < deadline,
            "no pack within 120 s:\n{}",
            backup.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Packs it stored until the stop landed, too.
    let in_progress: BTreeSet<String> = store
        .list("packs")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .filter(|k| !packs_before.contains(k))
        .collect();
    assert!(in_progress.is_superset(&new_packs));

    let (st, out, err) = agent_cmd(&src.repo, "expire", &["--retain-full", "1", "--json"]);
    if st.success() {
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(strs(&v, "deleted_backups", "id"), [b1.as_str()], "{v}");
        assert_eq!(strs(&v, "kept_backups", "id"), [b2.as_str()]);
        let kept: BTreeSet<String> = strs(&v, "kept_unreferenced_packs", "key")
            .into_iter()
            .collect();
        assert!(kept.is_superset(&in_progress), "{v}");
        for p in strs(&v, "deleted_packs", "key") {
            assert!(
                !in_progress.contains(&p),
                "expire deleted {p} of the running backup"
            );
        }
        assert!(v["kept_unreferenced_packs"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("grace"));
        eprintln!(
            "expire ran during the backup: kept its {} pack(s) (grace period), deleted {} pack(s) of backup 1",
            in_progress.len(),
            v["deleted_packs"].as_array().unwrap().len()
        );
    } else {
        // A backup that holds the writer lease keeps expire out altogether.
        assert!(
            err.contains("writer lease is held by") && err.contains("purpose backup"),
            "expire failed otherwise:\n{out}\n{err}"
        );
        eprintln!("expire was refused: the running backup holds the writer lease");
    }
    let left: BTreeSet<String> = store
        .list("packs")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert!(
        left.is_superset(&in_progress),
        "packs of the running backup were deleted"
    );

    signal(pid, "CONT");
    let st = backup.wait(Duration::from_secs(300)).unwrap();
    assert!(
        st.success(),
        "the backup failed after expire:\n{}",
        backup.log()
    );
    let b3 = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.contains(' '))
        .unwrap()
        .to_string();
    let listed = list_json(&src.repo);
    let ids = strs(&listed, "backups", "id");
    assert!(ids.contains(&b3) && ids.contains(&b2), "{ids:?} (b3 {b3})");

    let u = units(&src.repo).await;
    let m3 = manifest(&u, &b3).await;
    let left = all_keys(u.repo()).await;
    for p in packs_of(&m3) {
        assert!(left.contains(&p), "{p} of backup 3 is missing");
    }
    src.catch_up();
    let rc = RestoredCluster::new(&src.pg, "latest").unwrap();
    let run = rc
        .restore(
            &src.repo,
            &[
                "--to".into(),
                "latest".into(),
                "--backup".into(),
                b3.clone(),
                "--start".into(),
            ],
        )
        .unwrap_or_else(|e| panic!("restore of backup 3: {e:#}"));
    assert_eq!(run.planned_backup(), Some(b3.as_str()), "{run}");
    let rows: u64 = rc
        .psql(DB, "select count(*) from t")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(rows, want_rows);
    assert_eq!(
        rc.psql(DB, "select count(*), sum(length(b)) from big")
            .unwrap(),
        want_big
    );
    rc.stop("fast").unwrap();
}
