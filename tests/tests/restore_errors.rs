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
        let mut f = Self::streaming(pgbench_init);
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

    /// Streaming, with data, and no backup yet.
    fn streaming(pgbench_init: &[&str]) -> Fixture {
        let pg = cluster();
        let repo = Repo::init(file_target().unwrap());
        let agent = repo.agent(
            &pg.superuser_conninfo(),
            &pg.root_dir().join("agent.log"),
            // Report durable positions promptly, so settle() does not wait for them.
            &["--status-interval", "1s"],
        );
        pgbench(&pg, pgbench_init);
        Fixture {
            pg,
            repo,
            agent,
            backup_id: String::new(),
            end: Lsn(0),
            scratch: tempfile::tempdir().unwrap(),
        }
    }

    /// Switches WAL and waits until everything so far is durable in the repository.
    fn settle(&mut self) {
        self.end = switch_wal(&self.pg);
        // Generous: on a loaded machine the archiver can lag a minute behind.
        wait_durable(&self.pg, "walferry", self.end, Duration::from_secs(180))
            .unwrap_or_else(|e| panic!("{e}\n{}", self.agent.log()));
    }

    fn agent_log(&self) -> String {
        self.agent.log()
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

    /// An empty directory under the scratch dir (a mount point, say).
    fn empty_dir(&self, name: &str) -> PathBuf {
        let d = self.scratch.path().join(name);
        std::fs::create_dir(&d).unwrap();
        d
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
        before
            .as_ref()
            .map(|b| b.keys().cloned().collect::<Vec<_>>()),
        after
            .as_ref()
            .map(|b| b.keys().cloned().collect::<Vec<_>>()),
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

/// Targets outside the restorable window fail before anything is written, and say
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
    // The printed window can be pasted back as a target.
    let start = err
        .split("restorable window is ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap()
        .to_string();
    let (st, out, err) = f.restore(&["--to", &start, "--dry-run", "--pgdata", "/nonexistent"]);
    assert_exit(st, 0, &out, &err);
    assert_mentions(&out, &[&f.backup_id, "dry run: nothing was written"]);

    let after = pg_time(jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600));
    let pgdata = f.occupied("after");
    let (st, out, err) = unchanged(&pgdata, || {
        f.restore(&[
            "--to",
            &after,
            "--pgdata",
            pgdata.to_str().unwrap(),
            "--delta",
        ])
    });
    assert_exit(st, 1, &out, &err);
    assert_mentions(
        &err,
        &[
            "after the last commit",
            "restorable window is",
            "--to latest",
        ],
    );

    let past = Lsn(f.end.0 + (1 << 32)).to_string();
    let pgdata = f.absent("lsn");
    let (st, out, err) = unchanged(&pgdata, || {
        f.restore(&["--to-lsn", &past, "--pgdata", pgdata.to_str().unwrap()])
    });
    assert_exit(st, 1, &out, &err);
    assert_mentions(
        &err,
        &[&past, "past the end of the stored WAL", "--to latest"],
    );
}

/// A restore that must fail with exit 1 into `pgdata`, leaving it exactly as it was.
fn restore_fails(f: &Fixture, pgdata: &Path, extra: &[&str]) -> String {
    let mut args = vec!["--pgdata", pgdata.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (st, out, err) = unchanged(pgdata, || f.restore(&args));
    assert_exit(st, 1, &out, &err);
    err
}

/// Key problems: the wrong key, no key for an encrypted repository, a key file others
/// can read. Each names the problem and what to do, and writes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn key_problems_are_refused() {
    let f = Fixture::new();
    let url = f.repo.args()[1].clone();
    let run = |key: &[&str], pgdata: &Path| {
        let mut a = vec!["--repo".to_string(), url.clone()];
        a.extend(key.iter().map(|s| s.to_string()));
        a.extend(["--to".into(), "latest".into(), "--pgdata".into()]);
        a.push(pgdata.display().to_string());
        unchanged(pgdata, || {
            run_walferry("walferry-restore", &a, &[]).unwrap()
        })
    };

    let other = f.scratch.path().join("other.key");
    let (st, _, err) = run_walferry(
        "walferry-agent",
        &["keygen".into(), "--out".into(), other.display().to_string()],
        &[],
    )
    .unwrap();
    assert!(st.success(), "{err}");
    for pgdata in [f.absent("wrong-key"), f.empty_dir("wrong-key-empty")] {
        let (st, out, err) = run(&["--key-file", other.to_str().unwrap()], &pgdata);
        assert_exit(st, 1, &out, &err);
        assert_mentions(
            &err,
            &[
                "does not open this repository",
                "use the key the repository was created with",
            ],
        );
    }

    let pgdata = f.absent("no-key");
    let (st, out, err) = run(&[], &pgdata);
    assert_exit(st, 1, &out, &err);
    assert_mentions(
        &err,
        &[
            "repository is encrypted; a master key is required",
            "--key-file",
        ],
    );

    let open = f.scratch.path().join("open.key");
    std::fs::copy(f.key_file(), &open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let pgdata = f.absent("open-key");
    let (st, out, err) = run(&["--key-file", open.to_str().unwrap()], &pgdata);
    assert_exit(st, 1, &out, &err);
    assert_mentions(
        &err,
        &[
            open.to_str().unwrap(),
            "accessible by group or others",
            "chmod 600",
        ],
    );
}

/// A block of a table file that every restore needs: (file path, block number, its ref).
fn needed_block(m: &BackupManifest) -> (String, usize, walferry_formats::backup::BlockRef) {
    let file = m
        .files
        .iter()
        .filter(|e| e.tablespace.is_none() && e.path.starts_with("base/"))
        .max_by_key(|e| e.blocks.len())
        .unwrap();
    let (n, &b) = file
        .blocks
        .iter()
        .enumerate()
        .find(|(_, &b)| b != walferry_formats::backup::ZERO_BLOCK)
        .unwrap();
    (file.path.clone(), n, m.blocks[b as usize].clone())
}

/// The sealed segment object `key`, once the archiver has written it.
fn wait_sealed(f: &Fixture, key: &str) -> PathBuf {
    let obj = f.object(key);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !obj.exists() {
        assert!(
            Instant::now() < deadline,
            "{key} was not sealed within 60 s:\n{}",
            f.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    obj
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

/// One flipped byte inside a pack, in a block the restore needs: the restore fails
/// naming the pack and the file, and removes what it wrote. A --delta restore that has
/// to fetch that block fails too, and leaves no directory PostgreSQL would start.
#[tokio::test(flavor = "multi_thread")]
async fn damaged_pack_fails_naming_pack_and_file() {
    let f = Fixture::new();
    let m = f.manifest().await;
    let (path, n, block) = needed_block(&m);
    // A good copy first, for the --delta case below.
    let copy = f.absent("copy");
    let (st, out, err) = f.restore(&["--to", "latest", "--pgdata", copy.to_str().unwrap()]);
    assert_exit(st, 0, &out, &err);
    assert!(copy.join("global/pg_control").exists());

    flip_byte(
        &f.object(&block.pack),
        block.offset + u64::from(block.len) / 2,
    );
    for pgdata in [f.absent("absent"), f.empty_dir("empty")] {
        let err = restore_fails(&f, &pgdata, &["--to", "latest"]);
        assert_mentions(
            &err,
            &[
                &block.pack,
                &format!("block {n} of {path}"),
                "corrupt",
                "The backup is damaged",
                "nothing was left in",
                "take a new backup",
            ],
        );
    }

    // --delta reuses matching blocks; spoil the copy's block so it must be fetched.
    let local = copy.join(&path);
    let mut bytes = std::fs::read(&local).unwrap();
    let bs = m.block_size as usize;
    bytes[n * bs..(n + 1) * bs].fill(0x55);
    std::fs::write(&local, bytes).unwrap();
    let (st, out, err) = f.restore(&[
        "--to",
        "latest",
        "--delta",
        "--pgdata",
        copy.to_str().unwrap(),
    ]);
    assert_exit(st, 1, &out, &err);
    assert_mentions(
        &err,
        &[
            &block.pack,
            "incomplete and cannot be started",
            "run the restore again",
        ],
    );
    assert!(!copy.join("global/pg_control").exists());
}

/// A flipped byte in the backup manifest: the restore fails naming the manifest.
#[tokio::test(flavor = "multi_thread")]
async fn damaged_manifest_fails_naming_it() {
    let f = Fixture::new();
    let key = BackupManifest::key(&f.backup_id);
    let obj = f.object(&key);
    let len = std::fs::metadata(&obj).unwrap().len();
    flip_byte(&obj, len / 2);
    for pgdata in [f.absent("absent"), f.occupied("occupied")] {
        let extra: &[&str] = if pgdata.exists() {
            &["--to", "latest", "--delta"]
        } else {
            &["--to", "latest"]
        };
        let err = restore_fails(&f, &pgdata, extra);
        assert_mentions(
            &err,
            &[
                &key,
                "corrupt",
                "nothing was written",
                &format!("move {key} out of backups/"),
            ],
        );
    }
}

/// A deleted pack: the restore fails naming the missing pack.
#[tokio::test(flavor = "multi_thread")]
async fn missing_pack_fails_naming_it() {
    let f = Fixture::new();
    let m = f.manifest().await;
    let (_, _, block) = needed_block(&m);
    std::fs::remove_file(f.object(&block.pack)).unwrap();
    for pgdata in [f.absent("absent"), f.empty_dir("empty")] {
        let err = restore_fails(&f, &pgdata, &["--to", "latest"]);
        assert_mentions(
            &err,
            &[
                &block.pack,
                "is missing from the repository",
                &f.backup_id,
                "take a new backup",
            ],
        );
    }
    // The plan finds it: a dry run fails the same way.
    let (st, out, err) = f.restore(&["--to", "latest", "--dry-run", "--pgdata", "/nonexistent"]);
    assert_exit(st, 1, &out, &err);
    assert_mentions(&err, &[&block.pack, "is missing from the repository"]);
}

/// A truncated pack: the restore fails naming the pack.
#[tokio::test(flavor = "multi_thread")]
async fn truncated_pack_fails_naming_it() {
    let f = Fixture::new();
    let m = f.manifest().await;
    let (_, _, block) = needed_block(&m);
    let obj = f.object(&block.pack);
    let file = std::fs::OpenOptions::new().write(true).open(&obj).unwrap();
    file.set_len(block.offset + u64::from(block.len) / 2)
        .unwrap();
    drop(file);
    for pgdata in [f.absent("absent"), f.empty_dir("empty")] {
        let err = restore_fails(&f, &pgdata, &["--to", "latest"]);
        assert_mentions(&err, &[&block.pack, "is truncated", "take a new backup"]);
    }
}

/// The target directory: a non-empty one (without --delta), and one a server runs on.
#[tokio::test(flavor = "multi_thread")]
async fn occupied_or_live_target_is_refused() {
    let f = Fixture::new();
    let pgdata = f.occupied("occupied");
    let err = restore_fails(&f, &pgdata, &["--to", "latest"]);
    assert_mentions(&err, &[pgdata.to_str().unwrap(), "is not empty", "--delta"]);

    // The fixture's own running cluster.
    let live = f.pg.data_dir();
    let auto_conf = std::fs::read(live.join("postgresql.auto.conf")).unwrap();
    let pid = f.pg.postmaster_pid().unwrap().to_string();
    for extra in [&["--to", "latest"][..], &["--to", "latest", "--delta"]] {
        let mut args = vec!["--pgdata", live.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (st, out, err) = f.restore(&args);
        assert_exit(st, 1, &out, &err);
        assert_mentions(
            &err,
            &[
                &format!("PostgreSQL server (pid {pid}) is running on"),
                "stop it first",
            ],
        );
        assert!(f.pg.is_running());
        assert!(!live.join("recovery.signal").exists());
        assert_eq!(
            std::fs::read(live.join("postgresql.auto.conf")).unwrap(),
            auto_conf
        );
    }

    // A postmaster.pid naming a live process (this test), with --delta.
    let fake = f.empty_dir("fake-live");
    std::fs::write(
        fake.join("postmaster.pid"),
        format!("{}\n{}\n", std::process::id(), fake.display()),
    )
    .unwrap();
    let err = restore_fails(&f, &fake, &["--to", "latest", "--delta"]);
    assert_mentions(&err, &["is running on", "stop it first"]);
}

/// Malformed times are usage errors (exit 2), caught before the repository or the
/// target directory is touched.
#[test]
fn malformed_time_is_a_usage_error() {
    let scratch = tempfile::tempdir().unwrap();
    // An address nothing listens on: parsing must fail before any network access.
    let repo = [
        "--repo",
        "s3://walferry-nowhere/db",
        "--repo-option",
        "aws_endpoint=http://127.0.0.1:9",
        "--repo-option",
        "aws_allow_http=true",
    ];
    let occupied = scratch.path().join("occupied");
    std::fs::create_dir(&occupied).unwrap();
    std::fs::write(occupied.join("keep-me.txt"), b"precious").unwrap();
    for (to, want) in [
        ("2026-11-23 02:59:30", "has no zone"),
        ("yesterday", "expected RFC 3339"),
    ] {
        for pgdata in [scratch.path().join("absent"), occupied.clone()] {
            let mut a: Vec<String> = repo.iter().map(|s| s.to_string()).collect();
            a.extend(["--to".into(), to.into(), "--pgdata".into()]);
            a.push(pgdata.display().to_string());
            let (st, out, err) = unchanged(&pgdata, || {
                run_walferry("walferry-restore", &a, &[]).unwrap()
            });
            // Exit 2, not 1: the time was refused before the (unreachable) repository
            // was contacted, which would have failed with exit 1.
            assert_exit(st, 2, &out, &err);
            assert_mentions(&err, &["--to", to, want]);
        }
    }
}

/// A WAL segment between the backup and the target is missing: the plan fails naming
/// it, before anything is written.
#[tokio::test(flavor = "multi_thread")]
async fn missing_wal_segment_fails_the_plan() {
    let mut f = Fixture::new();
    let m = f.manifest().await;
    // Several sealed segments after the backup, then a target after all of them.
    for i in 0..3 {
        f.pg.psql(
            "postgres",
            &format!(
                "insert into after_backup select g from generate_series(1, 1000) g; select {i}"
            ),
        )
        .unwrap();
        f.settle();
    }
    std::thread::sleep(Duration::from_millis(1100));
    let target = pg_time(jiff::Timestamp::now());
    std::thread::sleep(Duration::from_millis(1100));
    f.pg.psql("postgres", "insert into after_backup values (-1)")
        .unwrap();
    f.settle();

    let seg = walferry_formats::WalFileName::Segment {
        tli: m.end_timeline,
        segno: walferry_formats::SegmentNo(m.end_lsn.segment(crate::streaming::SEG).0 + 2),
    }
    .format(crate::streaming::SEG);
    let key = format!("wal/{:08X}/{seg}", m.end_timeline.0);
    std::fs::remove_file(wait_sealed(&f, &key)).unwrap();
    let _ = std::fs::remove_dir_all(f.object(&format!("{key}.parts")));

    for pgdata in [f.absent("absent"), f.empty_dir("empty")] {
        for to in [&["--to", &target][..], &["--to", "latest"]] {
            let err = restore_fails(&f, &pgdata, to);
            assert_mentions(
                &err,
                &[
                    &seg,
                    "missing from the repository",
                    "choose a target before",
                ],
            );
        }
    }
    // --dry-run says the same.
    let (st, out, err) = f.restore(&["--to", "latest", "--dry-run", "--pgdata", "/nonexistent"]);
    assert_exit(st, 1, &out, &err);
    assert_mentions(&err, &[&seg]);
}

/// About 50 MB that does not compress, so a backup writes more than one pack and takes a
/// while: time to interrupt it.
fn add_noise(pg: &PgCluster) {
    pg.psql(
        "postgres",
        "create table noise as \
         select g, (select string_agg(decode(md5(random()::text || g || i), 'hex'), ''::bytea) \
                    from generate_series(1, 60) i) as b \
         from generate_series(1, 50000) g",
    )
    .unwrap();
}

/// The manifests in the repository.
fn manifests(f: &Fixture) -> Vec<String> {
    match std::fs::read_dir(f.object("backups")) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".manifest"))
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn pack_count(f: &Fixture) -> usize {
    let Ok(rd) = std::fs::read_dir(f.object("packs")) else {
        return 0;
    };
    rd.flatten()
        .filter_map(|d| std::fs::read_dir(d.path()).ok())
        .map(|r| r.count())
        .sum()
}

/// Waits until `agent`'s log contains `what`; false if it exited first or time ran out.
fn wait_for_log(agent: &mut AgentProcess, what: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if agent.log().contains(what) {
            return true;
        }
        if !agent.is_running() {
            return agent.log().contains(what);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// When the newest writer lease record expires (None when there is none).
fn lease_expiry(f: &Fixture) -> Option<jiff::Timestamp> {
    let dir = f.object("lease/writer");
    let newest = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.len() == 20))
        .max()?;
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(newest).ok()?).ok()?;
    if record["released"].as_bool() == Some(true) {
        return None;
    }
    record["expires_at"].as_str()?.parse().ok()
}

/// "reused N of M blocks" from the backup summary.
fn reused_blocks(stderr: &str) -> (u64, u64) {
    let rest = stderr
        .split("reused ")
        .nth(1)
        .unwrap_or_else(|| panic!("no reuse count in:\n{stderr}"));
    let mut w = rest.split_whitespace();
    let n = w.next().unwrap().parse().unwrap();
    assert_eq!(w.next(), Some("of"));
    (n, w.next().unwrap().parse().unwrap())
}

/// kill -9 of `walferry-agent backup` while it uploads: no backup is listed (no
/// manifest), and the retry reuses the blocks of the packs the dead run stored.
#[tokio::test(flavor = "multi_thread")]
async fn killed_backup_is_not_listed_and_retry_reuses_blocks() {
    let f = Fixture::streaming(&["-i", "-s", "1", "-q"]);
    add_noise(&f.pg);
    let log = f.scratch.path().join("backup.log");
    let mut backup = AgentProcess::spawn(&f.backup_args(), &log).unwrap();
    assert!(
        wait_for_log(&mut backup, "pack stored", Duration::from_secs(120)),
        "no pack was stored before the backup ended:\n{}",
        backup.log()
    );
    backup.kill9().unwrap();
    assert!(
        !backup.log().contains(" done: "),
        "the backup finished before it was killed:\n{}",
        backup.log()
    );
    assert!(pack_count(&f) > 0);
    assert_eq!(manifests(&f), Vec::<String>::new());

    let (st, out, err) = f.restore(&["--to", "latest", "--dry-run", "--pgdata", "/nonexistent"]);
    assert_exit(st, 1, &out, &err);
    assert_mentions(&err, &["no backup", "walferry-agent backup"]);

    // The dead run's lease names a process in this PID namespace that no longer exists:
    // a retry takes it over at once instead of waiting for the TTL.
    assert!(
        lease_expiry(&f).expect("the killed backup held the writer lease") > jiff::Timestamp::now()
    );
    let (st, out, err) = run_walferry("walferry-agent", &f.backup_args(), &[]).unwrap();
    assert!(st.success(), "retry failed:\n{out}\n{err}");
    let id = out.trim().to_string();
    let (reused, total) = reused_blocks(&err);
    eprintln!("retry: reused {reused} of {total} blocks");
    assert!(
        reused > 0 && reused < total,
        "reused {reused} of {total}:\n{err}"
    );
    assert_eq!(manifests(&f), vec![format!("{id}.manifest")]);

    // The retried backup restores (the reused blocks are found where the trailers say).
    let mut f = f;
    f.settle();
    let pgdata = f.absent("restored");
    let (st, out, err) = f.restore(&["--to", "latest", "--pgdata", pgdata.to_str().unwrap()]);
    assert_exit(st, 0, &out, &err);
    assert_mentions(&out, &[&id]);
    assert!(pgdata.join("global/pg_control").exists());
}

/// PostgreSQL restarts in the middle of a backup: the backup fails with a clear
/// connection error (exit 1), commits nothing, and the retry succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_restart_during_backup_fails_cleanly() {
    let mut f = Fixture::streaming(&["-i", "-s", "1", "-q"]);
    add_noise(&f.pg);
    let log = f.scratch.path().join("backup.log");
    // Throttled by the server (MAX_RATE), so the restart lands mid-backup on any machine.
    let mut args = f.backup_args();
    args.extend(["--max-rate".into(), "1M".into()]);
    let mut backup = AgentProcess::spawn(&args, &log).unwrap();
    assert!(
        wait_for_log(&mut backup, "starting base backup", Duration::from_secs(60)),
        "{}",
        backup.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(backup.is_running(), "backup ended early:\n{}", backup.log());
    f.pg.restart().unwrap();
    let st = backup.wait(Duration::from_secs(120)).unwrap();
    let text = backup.log();
    assert_eq!(st.code(), Some(1), "{text}");
    assert_mentions(
        &text,
        &[
            "take a base backup: ",
            "No backup was committed",
            "run `walferry-agent backup` again",
        ],
    );
    // Depending on timing (still in the checkpoint, or streaming) the agent sees the
    // server's goodbye or only the closed socket.
    assert!(
        text.contains("the server closed the connection")
            || text.contains("terminating connection due to administrator command"),
        "{text}"
    );
    assert_eq!(manifests(&f), Vec::<String>::new());

    // The streamer reconnects; the retry succeeds and is listed.
    let id = f.backup().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(manifests(&f), vec![format!("{id}.manifest")]);
    f.settle();
    let (st, out, err) = f.restore(&["--to", "latest", "--dry-run", "--pgdata", "/nonexistent"]);
    assert_exit(st, 0, &out, &err);
    assert_mentions(&out, &[&id]);
}

/// Stops a server `walferry-restore --start` left running, when the test ends.
struct StopOnDrop<'a>(&'a PgCluster, PathBuf);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        if self.1.join("postmaster.pid").exists() {
            let _ = self
                .0
                .command("pg_ctl")
                .arg("-D")
                .arg(&self.1)
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}

fn chmod(path: &Path, mode: &str, recursive: bool) {
    let mut c = std::process::Command::new("chmod");
    if recursive {
        c.arg("-R");
    }
    assert!(c.arg(mode).arg(path).status().unwrap().success());
}

/// A damaged sealed segment that recovery needs: wal-fetch fails inside
/// restore_command, and recovery stops loudly instead of ending early.
#[tokio::test(flavor = "multi_thread")]
async fn damaged_segment_fails_recovery_loudly() {
    let mut f = Fixture::new();
    let m = f.manifest().await;
    for i in 0..2 {
        f.pg.psql(
            "postgres",
            &format!(
                "insert into after_backup select g from generate_series(1, 1000) g; select {i}"
            ),
        )
        .unwrap();
        f.settle();
    }
    let size = crate::streaming::SEG;
    let seg = walferry_formats::WalFileName::Segment {
        tli: m.end_timeline,
        segno: walferry_formats::SegmentNo(m.end_lsn.segment(size).0 + 1),
    }
    .format(size);
    let obj = wait_sealed(&f, &format!("wal/{:08X}/{seg}", m.end_timeline.0));
    let len = std::fs::metadata(&obj).unwrap().len();
    flip_byte(&obj, len / 2);

    // restore_command runs as the server's user: let it read the key and the repository.
    let key = f.key_file();
    if walferry_tests::pg::running_as_root() {
        walferry_tests::pg::give_to_postgres(&key).unwrap();
    }
    chmod(key.parent().unwrap(), "711", false);
    let repo = f.repo_dir();
    chmod(repo.parent().unwrap(), "a+rx", false);
    chmod(&repo, "a+rX", true);

    let pgdata = f.pg.make_dir("restore-parent").unwrap().join("pgdata");
    let _stop = StopOnDrop(&f.pg, pgdata.clone());
    let port = format!("port={}", walferry_tests::pg::free_port().unwrap());
    let (st, out, err) = f.restore(&[
        "--to",
        "latest",
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--start",
        "--start-timeout",
        "120s",
        "--pg-option",
        &port,
    ]);
    assert_exit(st, 1, &out, &err);
    assert_mentions(
        &err,
        &[
            "recovery failed",
            &seg,
            "corrupt",
            "wal-fetch failed",
            "the repository is damaged",
        ],
    );
    assert!(
        !err.contains("recovery complete") && !out.contains("recovery complete"),
        "{out}"
    );
}
