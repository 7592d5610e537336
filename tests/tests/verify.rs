//! `walferry-restore verify` end to end: real repositories written by the real agent from
//! a real PostgreSQL 15, then damaged on purpose.
//!
//! One fixture (two base backups, streamed WAL with commits spread over several sealed
//! segments, a streamed tail) is built per test; each tamper case runs on its own copy of
//! the fixture's repository, so every case starts from the same intact bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use walferry_formats::backup::{BackupManifest, BlockRef, ZERO_BLOCK};
use walferry_formats::layout::{parse_wal_key, WalObject};
use walferry_formats::view::RepoView;
use walferry_formats::{Lsn, TimelineId, Units};
use walferry_restore::verify::{Report, Window};
use walferry_tests::bins::{run_walferry, AgentProcess};
use walferry_tests::emulators::file_target;
use walferry_tests::pg::{self, PgCluster};

use crate::streaming::{cluster, pgbench, switch_wal, wait_durable, Repo, SEG};

const SLOT: &str = "walferry";

/// A cluster streamed into an encrypted `file://` repository, with two backups and
/// commits spread over several sealed segments after them; the agent is stopped when the
/// fixture is ready, so the repository holds still.
struct Fixture {
    pg: PgCluster,
    repo: Repo,
    agent: Option<AgentProcess>,
    backups: Vec<String>,
    scratch: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let pg = cluster();
        let repo = Repo::init(file_target().unwrap());
        let agent = repo.agent(
            &pg.superuser_conninfo(),
            &pg.root_dir().join("agent.log"),
            &[],
        );
        pgbench(&pg, &["-i", "-s", "1", "-q"]);
        let mut f = Fixture {
            pg,
            repo,
            agent: Some(agent),
            backups: Vec::new(),
            scratch: tempfile::tempdir().unwrap(),
        };
        f.backup();
        f.commits("a", 3);
        f.settle();
        // New data, so the second backup stores new blocks in a new pack.
        f.pg.psql(
            "postgres",
            "create table big as select g, md5(g::text) || md5((g * 7)::text) as t \
             from generate_series(1, 150000) g",
        )
        .unwrap();
        f.backup();
        for i in 0..3 {
            f.commits(&format!("s{i}"), 2);
            f.settle();
        }
        // A streamed tail: commits in parts of a segment that is not sealed.
        f.commits("tail", 2);
        f.durable_now();
        f.stop_agent();
        f
    }

    fn agent_log(&self) -> String {
        self.agent.as_ref().map(|a| a.log()).unwrap_or_default()
    }

    fn start_agent(&mut self) {
        self.agent = Some(self.repo.agent(
            &self.pg.superuser_conninfo(),
            &self.pg.root_dir().join("agent.log"),
            &[],
        ));
    }

    fn stop_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let st = a.terminate(Duration::from_secs(30)).unwrap();
            assert_eq!(st.code(), Some(0), "{}", a.log());
        }
    }

    /// A few commits, 300 ms apart.
    fn commits(&self, tag: &str, n: usize) {
        self.pg
            .psql(
                "postgres",
                "create table if not exists marks(tag text, at timestamptz)",
            )
            .unwrap();
        for i in 0..n {
            self.pg
                .psql(
                    "postgres",
                    &format!(
                        "insert into marks select '{tag}{i}', now() from generate_series(1, 2000)"
                    ),
                )
                .unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Switches WAL and waits until everything so far is durable in the repository.
    fn settle(&self) {
        let end = switch_wal(&self.pg);
        wait_durable(&self.pg, SLOT, end, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}\n{}", self.agent_log()));
    }

    /// Waits until the current insert position is durable (as streamed parts).
    fn durable_now(&self) {
        let lsn: Lsn = self
            .pg
            .psql("postgres", "select pg_current_wal_insert_lsn()")
            .unwrap()
            .parse()
            .unwrap();
        wait_durable(&self.pg, SLOT, lsn, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}\n{}", self.agent_log()));
    }

    fn backup(&mut self) -> String {
        let mut a = vec!["backup".to_string()];
        a.extend(self.repo.args());
        a.extend(["--pg".into(), self.pg.superuser_conninfo()]);
        let (st, out, err) = run_walferry("walferry-agent", &a, &[]).unwrap();
        assert!(st.success(), "backup failed ({st}):\n{out}\n{err}");
        let id = out.trim().to_string();
        self.backups.push(id.clone());
        id
    }

    fn url(&self) -> String {
        self.repo.args()[1].clone()
    }

    fn key_file(&self) -> PathBuf {
        let a = self.repo.args();
        let i = a.iter().position(|x| x == "--key-file").unwrap();
        PathBuf::from(&a[i + 1])
    }

    fn repo_dir(&self) -> PathBuf {
        url::Url::parse(&self.url())
            .unwrap()
            .to_file_path()
            .unwrap()
    }

    /// A fresh copy of the repository, to damage.
    fn copy(&self, name: &str) -> RepoCopy {
        let dir = self.scratch.path().join(name);
        let st = Command::new("cp")
            .arg("-a")
            .arg(self.repo_dir())
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success());
        RepoCopy {
            dir,
            key: self.key_file(),
        }
    }
}

/// A copy of a repository on disk, with the key that opens it.
struct RepoCopy {
    dir: PathBuf,
    key: PathBuf,
}

/// What one `walferry-restore verify` run returned.
struct VerifyRun {
    code: i32,
    stdout: String,
    stderr: String,
}

impl VerifyRun {
    fn report(&self) -> Report {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not a JSON report ({e}):\n{self}"))
    }
}

impl std::fmt::Display for VerifyRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl RepoCopy {
    fn url(&self) -> String {
        url::Url::from_directory_path(&self.dir)
            .unwrap()
            .as_str()
            .trim_end_matches('/')
            .to_string()
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// `walferry-restore verify --repo URL [--key-file K] ARGS`.
    fn verify(&self, with_key: bool, args: &[&str]) -> VerifyRun {
        let mut a = vec!["verify".to_string(), "--repo".into(), self.url()];
        if with_key {
            a.extend(["--key-file".into(), self.key.display().to_string()]);
        }
        a.extend(args.iter().map(|s| s.to_string()));
        let (st, stdout, stderr) = run_walferry("walferry-restore", &a, &[]).unwrap();
        VerifyRun {
            code: st.code().unwrap_or(-1),
            stdout,
            stderr,
        }
    }

    /// A `--json` run that must exit `code`.
    fn report(&self, with_key: bool, args: &[&str], code: i32) -> Report {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let run = self.verify(with_key, &a);
        assert_eq!(run.code, code, "verify {args:?}:\n{run}");
        let r = run.report();
        assert_eq!(r.ok, code == 0, "{run}");
        r
    }

    async fn units(&self) -> Units {
        let repo = walferry_formats::Repository::open(&self.url(), Vec::<(String, String)>::new())
            .unwrap();
        let text = std::fs::read_to_string(&self.key).unwrap();
        let master = walferry_formats::keyring::MasterKey::from_hex(&text).unwrap();
        Units::load(repo, Some(&master)).await.unwrap().0
    }

    /// Every object key in the repository.
    fn keys(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut stack = vec![self.dir.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p
                        .strip_prefix(&self.dir)
                        .unwrap()
                        .to_string_lossy()
                        .to_string();
                    out.insert(rel);
                }
            }
        }
        out
    }

    fn keys_where(&self, f: impl Fn(&WalObject) -> bool) -> Vec<String> {
        self.keys()
            .into_iter()
            .filter(|k| parse_wal_key(k, SEG).is_some_and(|w| f(&w)))
            .collect()
    }

    fn packs(&self) -> Vec<String> {
        self.keys()
            .into_iter()
            .filter(|k| k.starts_with("packs/"))
            .collect()
    }
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

fn swap(a: &Path, b: &Path) {
    let tmp = a.with_extension("swap");
    std::fs::rename(a, &tmp).unwrap();
    std::fs::rename(b, a).unwrap();
    std::fs::rename(&tmp, b).unwrap();
}

/// What the repository says, read the way restore plans (the oracle for windows).
struct Truth {
    view: RepoView,
    manifests: BTreeMap<String, BackupManifest>,
}

impl Truth {
    async fn read(c: &RepoCopy) -> Truth {
        let units = c.units().await;
        let view = RepoView::load(&units).await.unwrap();
        let manifests = view
            .backups
            .iter()
            .map(|m| (m.id.clone(), m.clone()))
            .collect();
        Truth { view, manifests }
    }

    /// RepoView::window for every timeline, as the report lists windows.
    fn windows(&self) -> Vec<Window> {
        let tls: BTreeSet<TimelineId> = self
            .view
            .catalog
            .timelines
            .keys()
            .chain(self.view.histories.keys())
            .copied()
            .collect();
        tls.into_iter()
            .filter_map(|t| {
                self.view.window(t).map(|(a, b)| Window {
                    timeline: t.0,
                    from: a.to_string(),
                    to: b.to_string(),
                })
            })
            .collect()
    }

    /// The last commit before `lsn` on timeline 1 (what a restore can reach when the WAL
    /// stops at `lsn`).
    fn last_commit_before(&self, lsn: Lsn) -> Timestamp {
        self.view
            .index
            .iter()
            .filter(|e| e.tli == TimelineId(1) && e.end <= lsn)
            .filter_map(|e| e.summary.last_commit.and_then(|c| c.time.to_timestamp()))
            .max()
            .unwrap()
    }

    fn packs_of(&self, id: &str) -> BTreeSet<String> {
        self.manifests[id]
            .blocks
            .iter()
            .map(|b| b.pack.clone())
            .collect()
    }

    /// A block of a table file that `id` references in `pack`.
    fn block_in(&self, id: &str, pack: &str) -> BlockRef {
        let m = &self.manifests[id];
        m.files
            .iter()
            .flat_map(|f| f.blocks.iter())
            .filter(|&&b| b != ZERO_BLOCK)
            .map(|&b| m.blocks[b as usize].clone())
            .find(|b| b.pack == pack)
            .unwrap()
    }

    /// Index entries on timeline 1 with a commit, as (object key, start, end, last commit).
    fn wal_with_commits(&self) -> Vec<(Lsn, Lsn, Timestamp)> {
        self.view
            .index
            .iter()
            .filter(|e| e.tli == TimelineId(1))
            .filter_map(|e| {
                let c = e.summary.last_commit.and_then(|c| c.time.to_timestamp())?;
                Some((e.start, e.end, c))
            })
            .collect()
    }
}

fn damaged<'a>(r: &'a Report, object: &str) -> &'a walferry_restore::verify::Damage {
    r.damaged
        .iter()
        .find(|d| d.object == object)
        .unwrap_or_else(|| panic!("{object} is not reported damaged: {r:#?}"))
}

fn window(t: u32, from: impl ToString, to: impl ToString) -> Window {
    Window {
        timeline: t,
        from: from.to_string(),
        to: to.to_string(),
    }
}

/// An untouched repository passes every level, and the windows are the planner's.
#[tokio::test(flavor = "multi_thread")]
async fn intact_repository_passes() {
    let f = Fixture::new();
    let c = f.copy("intact");
    let truth = Truth::read(&c).await;
    let windows = truth.windows();
    assert_eq!(windows.len(), 1, "{windows:?}");

    for args in [&["--full"][..], &["--deep", "--full"]] {
        let r = c.report(true, args, 0);
        assert!(r.damaged.is_empty(), "{r:#?}");
        assert_eq!(r.windows, windows, "{args:?}");
        assert_eq!(r.backups.len(), 2);
        assert!(r.backups.iter().all(|b| b.restorable), "{r:#?}");
        assert_eq!(r.checked.manifests, 2);
        assert_eq!(r.checked.packs as usize, c.packs().len());
        assert!(r.checked.blocks > 10);
        assert!(r.checked.wal_segments >= 5, "{r:#?}");
        assert!(r.checked.wal_parts >= 1, "{r:#?}");
        assert_eq!(r.mode.deep, args.contains(&"--deep"));
        assert!(r.mode.key && !r.mode.incremental);
    }
    // Without the key: checksums only, still intact.
    let r = c.report(false, &[], 0);
    assert!(!r.mode.key && r.windows.is_empty() && r.backups.is_empty());
    assert_eq!(r.checked.packs as usize, c.packs().len());
    assert!(r.checked.blocks > 10);
    assert!(r.record.is_none());
    // --deep without the key is a usage error.
    let run = c.verify(false, &["--deep"]);
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("needs the master key"), "{run}");
    // The human report.
    let run = c.verify(true, &["--full"]);
    assert_eq!(run.code, 0, "{run}");
    for want in [
        "result: intact",
        "restorable windows",
        &windows[0].from,
        "restorable\n",
    ] {
        assert!(run.stdout.contains(want), "{want:?} in:\n{run}");
    }
}

/// The tamper matrix: every case on its own copy of one fixture. Each must exit 1 and
/// name the object, the backups it breaks and the time it takes away.
#[tokio::test(flavor = "multi_thread")]
async fn tamper_matrix() {
    let f = Fixture::new();
    let base = f.copy("base");
    let truth = Truth::read(&base).await;
    let [a, b] = [f.backups[0].clone(), f.backups[1].clone()];
    let ideal = truth.windows();
    assert_eq!(ideal.len(), 1);
    let (ideal_from, ideal_to) = (ideal[0].from.clone(), ideal[0].to.clone());
    let packs_a = truth.packs_of(&a);
    let packs_b = truth.packs_of(&b);
    let shared: Vec<&String> = packs_a.intersection(&packs_b).collect();
    let only_b: Vec<&String> = packs_b.difference(&packs_a).collect();
    assert!(
        !shared.is_empty() && !only_b.is_empty(),
        "{packs_a:?} {packs_b:?}"
    );
    let b_end = truth.manifests[&b].end_lsn;
    // As windows print it: up to whole microseconds.
    let b_finished: Timestamp = truth.manifests[&b].finished_at.parse().unwrap();
    let b_finished = b_finished
        .round(
            jiff::TimestampRound::new()
                .smallest(jiff::Unit::Microsecond)
                .mode(jiff::RoundMode::Ceil),
        )
        .unwrap();

    // 1. A pack both backups use, deleted: both break, the whole window is gone.
    {
        let c = f.copy("delete-shared-pack");
        std::fs::remove_file(c.path(shared[0])).unwrap();
        for args in [&["--full"][..], &["--deep", "--full"]] {
            let r = c.report(true, args, 1);
            let d = damaged(&r, shared[0]);
            assert_eq!(d.status, "missing");
            assert_eq!(d.affects.backups, vec![a.clone(), b.clone()]);
            assert_eq!(d.affects.window, ideal);
            assert!(r.windows.is_empty() && r.backups.iter().all(|x| !x.restorable));
        }
    }
    // 2. A pack only the second backup uses, deleted: it breaks; the first still covers
    //    the whole window.
    {
        let c = f.copy("delete-b-pack");
        std::fs::remove_file(c.path(only_b[0])).unwrap();
        let r = c.report(true, &[], 1);
        let d = damaged(&r, only_b[0]);
        assert_eq!(d.affects.backups, vec![b.clone()]);
        assert!(d.affects.window.is_empty(), "{d:#?}");
        assert_eq!(r.windows, ideal);
    }
    // 3. A truncated pack (also found without the key).
    {
        let c = f.copy("truncate-pack");
        let blk = truth.block_in(&a, shared[0]);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(c.path(shared[0]))
            .unwrap();
        file.set_len(blk.offset + u64::from(blk.len) / 2).unwrap();
        drop(file);
        let r = c.report(true, &[], 1);
        let d = damaged(&r, shared[0]);
        assert_eq!(d.status, "corrupt");
        assert!(d.problem.contains("truncated"), "{d:#?}");
        assert_eq!(d.affects.backups, vec![a.clone(), b.clone()]);
        assert_eq!(d.affects.window, ideal);
        let r = c.report(false, &[], 1);
        assert!(damaged(&r, shared[0]).problem.contains("trailer"), "{r:#?}");
    }
    // 4. One flipped byte inside a block that backup B alone uses: shallow (crc), deep
    //    and keyless runs all name the pack.
    {
        let c = f.copy("flip-block");
        let blk = truth.block_in(&b, only_b[0]);
        flip_byte(&c.path(only_b[0]), blk.offset + u64::from(blk.len) / 2);
        for args in [&[][..], &["--deep"]] {
            let r = c.report(true, args, 1);
            let d = damaged(&r, only_b[0]);
            assert_eq!(d.status, "corrupt");
            assert!(
                d.problem.contains(&format!("offset {}", blk.offset)),
                "{d:#?}"
            );
            assert_eq!(d.affects.backups, vec![b.clone()]);
            assert_eq!(r.damaged.len(), 1, "{r:#?}");
        }
        let r = c.report(false, &[], 1);
        assert_eq!(r.damaged.len(), 1, "{r:#?}");
        assert!(damaged(&r, only_b[0])
            .problem
            .contains("not a valid block envelope"));
    }
    // 5. A flipped byte in a manifest.
    {
        let c = f.copy("flip-manifest");
        let key = BackupManifest::key(&a);
        let len = std::fs::metadata(c.path(&key)).unwrap().len();
        flip_byte(&c.path(&key), len / 2);
        let r = c.report(true, &[], 1);
        let d = damaged(&r, &key);
        assert_eq!(d.affects.backups, vec![a.clone()]);
        assert!(d.affects.every_restore, "{d:#?}");
        // B still restores; the window now opens when B finished.
        assert_eq!(r.windows, vec![window(1, b_finished, &ideal_to)]);
        let r = c.report(false, &[], 1);
        damaged(&r, &key);
    }
    // 6. A flipped byte in a sealed segment after both backups: nothing breaks whole, but
    //    every time after the last commit before it is lost.
    let sealed_after: Vec<(String, Lsn, Lsn, Timestamp)> = truth
        .wal_with_commits()
        .into_iter()
        .filter(|(s, e, _)| *s > b_end && e.0 - s.0 == SEG.bytes())
        .map(|(s, e, t)| {
            let key = format!(
                "wal/00000001/{}",
                walferry_formats::WalFileName::Segment {
                    tli: TimelineId(1),
                    segno: s.segment(SEG),
                }
                .format(SEG)
            );
            (key, s, e, t)
        })
        .collect();
    assert!(sealed_after.len() >= 2, "{sealed_after:?}");
    {
        let (key, start, _, _) = &sealed_after[0];
        let c = f.copy("flip-segment");
        let len = std::fs::metadata(c.path(key)).unwrap().len();
        flip_byte(&c.path(key), len / 2);
        let lost = vec![window(1, truth.last_commit_before(*start), &ideal_to)];
        for args in [&[][..], &["--deep"]] {
            let r = c.report(true, args, 1);
            let d = damaged(&r, key);
            assert!(d.affects.backups.is_empty(), "{d:#?}");
            assert_eq!(d.affects.window, lost, "{args:?}");
            assert_eq!(
                r.windows,
                vec![window(1, &ideal_from, truth.last_commit_before(*start))]
            );
        }
        let r = c.report(false, &[], 1);
        damaged(&r, key);
    }
    // 7. A deleted sealed segment inside backup B's start..end: B breaks, A restores up
    //    to the commits before it.
    {
        let m = &truth.manifests[&b];
        let seg = m.start_lsn.segment(SEG);
        let key = format!(
            "wal/00000001/{}",
            walferry_formats::WalFileName::Segment {
                tli: TimelineId(1),
                segno: seg,
            }
            .format(SEG)
        );
        let c = f.copy("delete-segment");
        std::fs::remove_file(c.path(&key)).unwrap();
        let r = c.report(true, &[], 1);
        let d = damaged(&r, &key);
        assert_eq!(d.status, "missing");
        assert_eq!(d.affects.backups, vec![b.clone()]);
        let cut = truth.last_commit_before(seg.start_lsn(SEG).unwrap());
        assert_eq!(d.affects.window, vec![window(1, cut, &ideal_to)]);
        let r = c.report(false, &[], 1);
        assert_eq!(damaged(&r, &key).status, "missing");
    }
    // 8. A flipped byte in the streamed part that holds the last commit.
    {
        let parts = base.keys_where(|w| matches!(w, WalObject::Part { .. }));
        let last = truth
            .view
            .index
            .iter()
            .filter(|e| e.tli == TimelineId(1))
            .max_by_key(|e| e.summary.last_commit.map(|c| c.lsn))
            .unwrap();
        let key = parts
            .iter()
            .find(|k| match parse_wal_key(k, SEG) {
                Some(WalObject::Part {
                    segno, from, to, ..
                }) => {
                    let s = segno.start_lsn(SEG).unwrap().0;
                    Lsn(s + from) == last.start && Lsn(s + to) == last.end
                }
                _ => false,
            })
            .unwrap_or_else(|| panic!("no part holds the last commit: {parts:?}"))
            .clone();
        let c = f.copy("flip-part");
        let len = std::fs::metadata(c.path(&key)).unwrap().len();
        flip_byte(&c.path(&key), len - 10);
        let lost = vec![window(1, truth.last_commit_before(last.start), &ideal_to)];
        for args in [&[][..], &["--deep"]] {
            let r = c.report(true, args, 1);
            let d = damaged(&r, &key);
            assert!(d.affects.backups.is_empty());
            assert_eq!(d.affects.window, lost);
        }
        let r = c.report(false, &[], 1);
        damaged(&r, &key);
    }
    // 9. Two sealed segments swapped: each passes its crc, but opens under the other's
    //    name only with the wrong identity: --deep names both.
    {
        let (k1, s1, _, _) = &sealed_after[0];
        let (k2, _, _, _) = &sealed_after[1];
        let c = f.copy("swap-segments");
        swap(&c.path(k1), &c.path(k2));
        let r = c.report(true, &["--deep"], 1);
        for k in [k1, k2] {
            assert!(
                damaged(&r, k).problem.contains("authentication failed"),
                "{r:#?}"
            );
        }
        assert_eq!(
            damaged(&r, k1).affects.window,
            vec![window(1, truth.last_commit_before(*s1), &ideal_to)]
        );
    }
    // 10. Two packs swapped: their trailers fail authentication and the blocks the
    //     manifests reference are not there: every backup using either breaks.
    {
        let c = f.copy("swap-packs");
        swap(&c.path(shared[0]), &c.path(only_b[0]));
        let r = c.report(true, &[], 1);
        for p in [shared[0], only_b[0]] {
            let d = damaged(&r, p);
            assert!(d.problem.contains("trailer"), "{d:#?}");
        }
        assert_eq!(
            damaged(&r, shared[0]).affects.backups,
            vec![a.clone(), b.clone()]
        );
        assert!(r.windows.is_empty(), "{r:#?}");
    }
}

/// Incremental runs read only what no earlier run verified; --full reads everything; a
/// change to a verified object is noticed.
#[tokio::test(flavor = "multi_thread")]
async fn incremental_runs_read_only_new_objects() {
    let mut f = Fixture::new();
    let c = RepoCopy {
        dir: f.repo_dir(),
        key: f.key_file(),
    };
    let count = |keys: &BTreeSet<String>, pick: fn(&WalObject) -> bool| {
        keys.iter()
            .filter(|k| parse_wal_key(k, SEG).is_some_and(|w| pick(&w)))
            .count() as u64
    };
    let sealed = |w: &WalObject| matches!(w, WalObject::Segment { .. });
    let seg_index = |w: &WalObject| matches!(w, WalObject::SegmentIndex { .. });
    let parts = |w: &WalObject| matches!(w, WalObject::Part { .. });
    let part_index = |w: &WalObject| matches!(w, WalObject::PartIndex { .. });

    let before = c.keys();
    let packs0 = c.packs().len() as u64;
    let r1 = c.report(true, &[], 0);
    assert!(!r1.mode.incremental && r1.record.is_some(), "{r1:#?}");
    assert_eq!(r1.checked.manifests, 2);
    assert_eq!(r1.checked.packs, packs0);
    assert_eq!(r1.checked.wal_segments, count(&before, sealed));

    // Nothing new: only the streamed parts (and their index entries) are read again.
    let r2 = c.report(true, &[], 0);
    assert!(r2.mode.incremental, "{r2:#?}");
    assert_eq!(r2.mode.since, r1.record);
    let k = &r2.checked;
    assert_eq!(
        (k.manifests, k.packs, k.wal_segments, k.trailers),
        (0, 0, 0, 0),
        "{r2:#?}"
    );
    assert_eq!(k.wal_parts, count(&before, parts));
    assert_eq!(k.wal_index, count(&before, part_index));
    assert!(k.skipped >= 2 + packs0 + count(&before, sealed), "{r2:#?}");
    assert_eq!(r2.windows, r1.windows);

    // One more backup and more WAL.
    f.start_agent();
    f.commits("more", 2);
    f.backup();
    f.commits("after", 2);
    f.settle();
    f.stop_agent();
    let after = c.keys();
    let new: BTreeSet<&String> = after.difference(&before).collect();
    let new_packs = new.iter().filter(|k| k.starts_with("packs/")).count() as u64;
    let truth = Truth::read(&c).await;
    let old_packs_used = truth
        .packs_of(&f.backups[2])
        .iter()
        .filter(|p| before.contains(*p))
        .count() as u64;
    let r3 = c.report(true, &[], 0);
    let k = &r3.checked;
    assert_eq!(k.manifests, 1, "{r3:#?}");
    assert_eq!(k.packs, new_packs, "{r3:#?}");
    assert_eq!(k.trailers, old_packs_used, "{r3:#?}");
    let new_keys: BTreeSet<String> = new.iter().map(|s| s.to_string()).collect();
    assert_eq!(k.wal_segments, count(&new_keys, sealed), "{r3:#?}");
    assert_eq!(
        k.wal_index,
        count(&new_keys, seg_index) + count(&after, part_index),
        "{r3:#?}"
    );
    assert_eq!(k.histories, 0);
    assert_eq!(r3.backups.len(), 3);
    assert_eq!(r3.windows, truth.windows());

    // --full reads everything again.
    let r4 = c.report(true, &["--full"], 0);
    assert!(!r4.mode.incremental);
    assert_eq!(r4.checked.manifests, 3);
    assert_eq!(r4.checked.packs as usize, c.packs().len());
    assert_eq!(r4.checked.wal_segments, count(&after, sealed));
    assert_eq!(r4.checked.skipped, 0);

    // A deep run re-reads what was verified only shallowly; the next deep run does not.
    let r5 = c.report(true, &["--deep"], 0);
    assert_eq!(r5.checked.packs as usize, c.packs().len());
    assert_eq!(r5.checked.wal_segments, count(&after, sealed));
    let r6 = c.report(true, &["--deep"], 0);
    assert_eq!(
        (r6.checked.packs, r6.checked.wal_segments),
        (0, 0),
        "{r6:#?}"
    );

    // Old records are pruned: a few are kept.
    let records = c
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("verify/"))
        .count();
    assert!((1..=3).contains(&records), "{records}");

    // A verified pack changed in place: the incremental run notices and reads it.
    let p = truth.packs_of(&f.backups[2]).into_iter().next().unwrap();
    let p = &p;
    let blk = truth.block_in(&f.backups[2], p);
    flip_byte(&c.path(p), blk.offset + 50);
    let r7 = c.report(true, &[], 1);
    assert_eq!(r7.checked.packs, 1, "{r7:#?}");
    assert!(damaged(&r7, p).affects.backups.contains(&f.backups[2]));
}

/// After a promotion, the timeline-2 window is listed; without its history file, verify
/// names the file and the window on timeline 2 that is lost.
#[tokio::test(flavor = "multi_thread")]
async fn missing_history_after_promotion() {
    let pg = cluster();
    let repo = Repo::init(file_target().unwrap());
    let log = pg.root_dir().join("agent.log");
    let mut agent = repo.agent(&pg.superuser_conninfo(), &log, &[]);
    pgbench(&pg, &["-i", "-s", "1", "-q"]);
    let mut args = vec!["backup".to_string()];
    args.extend(repo.args());
    args.extend(["--pg".into(), pg.superuser_conninfo()]);
    let (st, out, err) = run_walferry("walferry-agent", &args, &[]).unwrap();
    assert!(st.success(), "{out}{err}");
    for i in 0..3 {
        pg.psql("postgres", &format!("create table t{i} as select 1 as x"))
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let end = switch_wal(&pg);
    wait_durable(&pg, SLOT, end, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));

    // Restart as a standby of nobody, promote it: timeline 2.
    pg.stop().unwrap();
    let signal = pg.data_dir().join("standby.signal");
    std::fs::write(&signal, "").unwrap();
    pg::give_to_postgres(&signal).unwrap();
    pg.start_server().unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    while pg
        .psql(
            "postgres",
            "select count(*) from pg_stat_replication where state = 'streaming'",
        )
        .unwrap()
        != "1"
    {
        assert!(
            Instant::now() < deadline,
            "the agent did not reconnect:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = pg
        .command("pg_ctl")
        .arg("-D")
        .arg(pg.data_dir())
        .args(["-w", "promote"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..3 {
        pg.psql("postgres", &format!("create table u{i} as select 1 as x"))
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let end = switch_wal(&pg);
    wait_durable(&pg, SLOT, end, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    let st = agent.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(st.code(), Some(0), "{}", agent.log());

    let dir = url::Url::parse(&repo.args()[1])
        .unwrap()
        .to_file_path()
        .unwrap();
    let key = {
        let a = repo.args();
        PathBuf::from(&a[a.iter().position(|x| x == "--key-file").unwrap() + 1])
    };
    let intact = RepoCopy {
        dir: dir.clone(),
        key: key.clone(),
    };
    let truth = Truth::read(&intact).await;
    let planner = truth.windows();
    assert_eq!(planner.len(), 2, "{planner:?}");
    // Timeline 2's window ends at its last commit. (RepoView::window judges index entries
    // by their start, so it misses commits in timeline 2's first segment, which starts
    // before the switch: verify judges by the commits' own LSNs.)
    let last_on_2 = truth
        .view
        .index
        .iter()
        .filter(|e| e.tli == TimelineId(2))
        .filter_map(|e| e.summary.last_commit.and_then(|c| c.time.to_timestamp()))
        .max()
        .unwrap();
    let tl2 = vec![window(2, &planner[1].from, last_on_2)];
    assert!(planner[1].to <= tl2[0].to);
    let windows = vec![planner[0].clone(), tl2[0].clone()];
    for args in [&[][..], &["--deep"]] {
        let r = intact.report(true, args, 0);
        assert_eq!(r.windows, windows);
        assert!(r.checked.histories >= 1 || r.mode.incremental);
    }

    let scratch = tempfile::tempdir().unwrap();
    let copy = scratch.path().join("no-history");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&dir)
        .arg(&copy)
        .status()
        .unwrap()
        .success());
    let c = RepoCopy { dir: copy, key };
    std::fs::remove_file(c.path("wal/00000002.history")).unwrap();
    let r = c.report(true, &["--full"], 1);
    let d = damaged(&r, "wal/00000002.history");
    assert_eq!(d.status, "missing");
    assert_eq!(d.affects.window, tl2, "{r:#?}");
    assert!(d.affects.every_restore, "{d:#?}");
    assert!(r.windows.iter().all(|w| w.timeline != 2), "{r:#?}");
    let r = c.report(false, &[], 1);
    assert_eq!(damaged(&r, "wal/00000002.history").status, "missing");
}
