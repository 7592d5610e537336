//! Restore failure paths, end to end: a real PostgreSQL 15, the real `walferry-agent` and
//! `walferry-restore` binaries, a real `file://` repository that the tests damage on
//! purpose.
//!
//! Every case asserts the exit code (1 failure, 2 usage), a message that names the
//! problem, the object and the way out, and that the target directory is left exactly as
//! it was: absent stays absent, a pre-existing directory keeps exactly its contents. No
//! half-written directory that looks like a cluster may remain.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use walferry_formats::backup::BackupManifest;
use walferry_formats::envelope::Kind;
use walferry_formats::Lsn;
use walferry_tests::bins::{run_walferry, AgentProcess};
use walferry_tests::emulators::file_target;
use walferry_tests::pg::PgCluster;

use crate::streaming::{cluster, pgbench, switch_wal, wait_durable, Repo};

/// A cluster streamed into an encrypted `file://` repository by `walferry-agent run`,
/// with one committed base backup and commits after it, all durable in the repository.
struct Fixture {
    pg: PgCluster,
    repo: Repo,
    agent: AgentProcess,
    backup_id: String,
    /// Where the WAL was durable when the fixture was ready.
    end: Lsn,
    /// Scratch space for target directories (removed with the fixture).
    scratch: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Self::with_data(&["-i", "-s", "1", "-q"])
    }

    /// `pgbench_init` runs before the backup, so its data is inside it.
    fn with_data(pgbench_init: &[&str]) -> Fixture {
        let pg = cluster();
        let repo = Repo::init(file_target().unwrap());
        let agent = repo.agent(
            &pg.superuser_conninfo(),
            &pg.root_dir().join("agent.log"),
            &[],
        );
        pgbench(&pg, pgbench_init);
        let mut f = Fixture {
            pg,
            repo,
            agent,
            backup_id: String::new(),
            end: Lsn(0),
            scratch: tempfile::tempdir().unwrap(),
        };
        f.backup_id = f.backup().unwrap_or_else(|e| panic!("{e}"));
        // Commits after the backup, a little apart, so the window is not empty.
        f.pg.psql("postgres", "create table after_backup(x int)")
            .unwrap();
        for i in 0..3 {
            f.pg.psql(
                "postgres",
                &format!("insert into after_backup values ({i})"),
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
        f.settle();
        f
    }

    /// Switches WAL and waits until everything so far is durable in the repository.
    fn settle(&mut self) {
        self.end = switch_wal(&self.pg);
        wait_durable(&self.pg, "walferry", self.end, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}\n{}", self.agent.log()));
    }

    /// `walferry-agent backup`: the new backup id, or the failure with its output.
    fn backup(&self) -> Result<String, String> {
        let (st, out, err) = run_walferry("walferry-agent", &self.backup_args(), &[]).unwrap();
        if st.success() {
            Ok(out.trim().to_string())
        } else {
            Err(format!("backup failed ({st}):\n{out}\n{err}"))
        }
    }

    fn backup_args(&self) -> Vec<String> {
        let mut a = vec!["backup".to_string()];
        a.extend(self.repo.args());
        a.extend(["--pg".into(), self.pg.superuser_conninfo()]);
        a
    }

    /// `walferry-restore ARGS...` with the repository and key.
    fn restore(&self, extra: &[&str]) -> (ExitStatus, String, String) {
        let mut a = self.repo.args();
        a.extend(extra.iter().map(|s| s.to_string()));
        run_walferry("walferry-restore", &a, &[]).unwrap()
    }

    /// The repository's directory on disk.
    fn repo_dir(&self) -> PathBuf {
        let url = &self.repo.args()[1];
        url::Url::parse(url).unwrap().to_file_path().unwrap()
    }

    fn key_file(&self) -> PathBuf {
        let a = self.repo.args();
        let i = a.iter().position(|x| x == "--key-file").unwrap();
        PathBuf::from(&a[i + 1])
    }

    fn object(&self, key: &str) -> PathBuf {
        self.repo_dir().join(key)
    }

    /// The committed manifest of the fixture's backup.
    async fn manifest(&self) -> BackupManifest {
        let units = self.repo.units().await;
        let plain = units
            .get(&BackupManifest::key(&self.backup_id), Kind::Manifest)
            .await
            .unwrap();
        BackupManifest::from_json(&plain).unwrap()
    }

    /// A path under the scratch dir that does not exist yet.
    fn absent(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    /// A directory under the scratch dir holding one file.
    fn occupied(&self, name: &str) -> PathBuf {
        let d = self.scratch.path().join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("keep-me.txt"), b"precious").unwrap();
        d
    }
}

/// Everything under `dir` (path -> mode and bytes); None when it does not exist.
fn snapshot(dir: &Path) -> Option<BTreeMap<PathBuf, (u32, Vec<u8>)>> {
    let meta = std::fs::symlink_metadata(dir).ok()?;
    let mut out = BTreeMap::new();
    out.insert(PathBuf::new(), (meta.permissions().mode(), Vec::new()));
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            if m.is_dir() {
                stack.push(p);
                out.insert(rel, (m.permissions().mode(), Vec::new()));
            } else {
                out.insert(rel, (m.permissions().mode(), std::fs::read(&p).unwrap()));
            }
        }
    }
    Some(out)
}

/// Runs `f` and asserts that `dir` is exactly as before.
fn unchanged<T>(dir: &Path, f: impl FnOnce() -> T) -> T {
    let before = snapshot(dir);
    let r = f();
    let after = snapshot(dir);
    assert!(
        before == after,
        "{} changed: before {:?}, after {:?}",
        dir.display(),
        before.as_ref().map(|b| b.keys().cloned().collect::<Vec<_>>()),
        after.as_ref().map(|b| b.keys().cloned().collect::<Vec<_>>()),
    );
    r
}

/// `YYYY-MM-DD HH:MM:SS+00`, as an operator types it.
fn pg_time(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%d %H:%M:%S+00").to_string()
}

fn assert_exit(st: ExitStatus, code: i32, out: &str, err: &str) {
    assert_eq!(st.code(), Some(code), "stdout:\n{out}\nstderr:\n{err}");
}

fn assert_mentions(text: &str, wanted: &[&str]) {
    eprintln!("--- checked message ---\n{text}");
    for w in wanted {
        assert!(text.contains(w), "expected {w:?} in:\n{text}");
    }
}

/// 1. Targets outside the restorable window fail before anything is written, and say
/// what the window is.
#[tokio::test(flavor = "multi_thread")]
async fn targets_outside_the_window() {
    let f = Fixture::new();
    let m = f.manifest().await;
    let finished: jiff::Timestamp = m.finished_at.parse().unwrap();

    let before = pg_time(finished - jiff::SignedDuration::from_secs(3600));
    let pgdata = f.absent("before");
    let (st, out, err) = unchanged(&pgdata, || {
        f.restore(&["--to", &before, "--pgdata", pgdata.to_str().unwrap()])
    });
    assert_exit(st, 1, &out, &err);
    assert_mentions(
        &err,
        &["before the first backup finished", "restorable window is"],
    );

    let after = pg_time(jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600));
    let pgdata = f.occupied("after");
    let (st, out, err) = unchanged(&pgdata, || {
        f.restore(&["--to", &after, "--pgdata", pgdata.to_str().unwrap(), "--delta"])
    });
    assert_exit(st, 1, &out, &err);
    assert_mentions(
        &err,
        &["after the last commit", "restorable window is", "--to latest"],
    );

    let past = Lsn(f.end.0 + (1 << 32)).to_string();
    let pgdata = f.absent("lsn");
    let (st, out, err) = unchanged(&pgdata, || {
        f.restore(&["--to-lsn", &past, "--pgdata", pgdata.to_str().unwrap()])
    });
    assert_exit(st, 1, &out, &err);
    assert_mentions(&err, &[&past, "past the end of the stored WAL"]);
}
