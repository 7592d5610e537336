//! Point-in-time restore end to end: a repository the restored server can read, restored
//! clusters that stop with the test, a background writer that can be paused at an exact
//! moment, and stable data dumps to compare a restored cluster with the source.
//!
//! When the tests run as root, `walferry-restore --start` runs the server as `postgres`, and
//! its `restore_command` (wal-fetch) runs as `postgres` too: the key file, the binary and a
//! `file://` repository must be readable by that user. [`RestoreRepo`] arranges that.

use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::bins::{repo_args, run_walferry, AgentProcess};
use crate::emulators::StoreTarget;
use crate::pg::{free_port, pg_bin_dir, running_as_root, PgCluster, SUPERUSER};

/// The slot `walferry-agent run` uses by default.
pub const SLOT: &str = "walferry";

/// An encrypted repository plus a master key file that the `postgres` user can read (for
/// `restore_command`), while staying mode 0600 as walferry demands.
pub struct RestoreRepo {
    pub target: StoreTarget,
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

impl RestoreRepo {
    /// `keygen` + `init` on `target`.
    pub fn init(target: StoreTarget) -> Result<RestoreRepo> {
        Self::init_with(target, &[])
    }

    /// [`Self::init`] with extra `init` flags (`--compression-level`, `--block-size`).
    pub fn init_with(target: StoreTarget, init_flags: &[&str]) -> Result<RestoreRepo> {
        let dir = tempfile::Builder::new()
            .prefix("walferry-key-")
            .tempdir()
            .context("create the key dir")?;
        // Traversable (not listable) by postgres, which reads the key in restore_command.
        chmod(dir.path(), "711")?;
        let key = dir.path().join("master.key");
        let (st, _, err) = run_walferry(
            "walferry-agent",
            &["keygen".into(), "--out".into(), key.display().to_string()],
            &[],
        )?;
        if !st.success() {
            bail!("keygen failed: {err}");
        }
        if running_as_root() {
            chown_postgres(&key)?;
        }
        let mut args = vec!["init".to_string()];
        args.extend(repo_args(&target));
        args.extend(["--key-file".into(), key.display().to_string()]);
        args.extend(init_flags.iter().map(|f| f.to_string()));
        let (st, out, err) = run_walferry("walferry-agent", &args, &[])?;
        if !st.success() {
            bail!("init failed: {out}{err}");
        }
        let repo = RestoreRepo {
            target,
            key,
            _dir: dir,
        };
        repo.open_to_postgres()?;
        Ok(repo)
    }

    /// `--repo URL [--repo-option K=V]... --key-file F`.
    pub fn args(&self) -> Vec<String> {
        let mut a = repo_args(&self.target);
        a.extend(["--key-file".into(), self.key.display().to_string()]);
        a
    }

    /// For a `file://` repository: let postgres (wal-fetch in restore_command) read it. The
    /// agent writes files 0644 and directories 0755 (umask 022); the temp dir around the
    /// repository is 0700, and this opens it (and anything written with a stricter umask).
    pub fn open_to_postgres(&self) -> Result<()> {
        let Some(path) = self.target.url.strip_prefix("file://") else {
            return Ok(());
        };
        let repo = Path::new(path);
        if let Some(parent) = repo.parent() {
            chmod(parent, "a+rx")?;
        }
        let st = Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(repo)
            .status()
            .context("run chmod")?;
        if !st.success() {
            bail!("chmod -R a+rX {} failed", repo.display());
        }
        Ok(())
    }

    /// `walferry-agent run` streaming from `conninfo` (RPO 200 ms), logging to `log`.
    pub fn agent(&self, conninfo: &str, log: &Path) -> Result<AgentProcess> {
        let mut args = vec!["run".to_string()];
        args.extend(self.args());
        args.extend([
            "--pg".into(),
            conninfo.to_string(),
            "--rpo".into(),
            "200ms".into(),
        ]);
        AgentProcess::spawn(&args, log)
    }

    /// `walferry-agent backup`; returns the backup id it prints.
    pub fn backup(&self, conninfo: &str, label: &str) -> Result<String> {
        Ok(self.backup_with(conninfo, label, &[])?.0)
    }

    /// `walferry-agent backup ... EXTRA`; returns the backup id and what it logged.
    pub fn backup_with(
        &self,
        conninfo: &str,
        label: &str,
        extra: &[String],
    ) -> Result<(String, String)> {
        let (st, out, err) = self.run_backup(conninfo, label, extra)?;
        if !st.success() {
            bail!("backup failed ({st}):\n{out}\n{err}");
        }
        let id = out.trim().to_string();
        if id.is_empty() || id.contains(char::is_whitespace) {
            bail!("backup printed {out:?}, not a backup id; stderr:\n{err}");
        }
        Ok((id, err))
    }

    /// `walferry-agent backup ... EXTRA`, whatever its outcome: (status, stdout, stderr).
    pub fn run_backup(
        &self,
        conninfo: &str,
        label: &str,
        extra: &[String],
    ) -> Result<(std::process::ExitStatus, String, String)> {
        let mut args = vec!["backup".to_string()];
        args.extend(self.args());
        args.extend([
            "--pg".into(),
            conninfo.to_string(),
            "--label".into(),
            label.to_string(),
        ]);
        args.extend(extra.iter().cloned());
        run_walferry("walferry-agent", &args, &[])
    }

    /// `walferry-restore ARGS` with this repository's `--repo ... --key-file ...` first.
    pub fn restore(&self, extra: &[String]) -> Result<RestoreRun> {
        self.open_to_postgres()?;
        let mut args = self.args();
        args.extend(extra.iter().cloned());
        let (status, stdout, stderr) = run_walferry("walferry-restore", &args, &[])?;
        Ok(RestoreRun {
            args,
            status,
            stdout,
            stderr,
        })
    }
}

/// What one `walferry-restore` run did.
pub struct RestoreRun {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl RestoreRun {
    /// Fails with the whole output unless the run exited 0.
    pub fn ok(self) -> Result<RestoreRun> {
        if !self.status.success() {
            bail!("{self}");
        }
        Ok(self)
    }

    /// The backup id from the plan's `backup:` line.
    pub fn planned_backup(&self) -> Option<&str> {
        self.stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("backup:"))
            .and_then(|rest| rest.split_whitespace().next())
    }

    /// `N` from the `..., N blocks reused` that a `--delta` restore prints.
    pub fn blocks_reused(&self) -> Option<u64> {
        let line = self.stdout.lines().find(|l| l.contains("blocks reused"))?;
        let before = line.split(" blocks reused").next()?;
        before.rsplit(' ').next()?.parse().ok()
    }
}

impl std::fmt::Display for RestoreRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "walferry-restore {:?} exited {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args, self.status, self.stdout, self.stderr
        )
    }
}

/// A data directory restored by `walferry-restore`, on its own port and socket dir (inside
/// the source cluster's temp dir, so it is removed with it). Dropping it stops a server
/// still running there (immediate mode).
pub struct RestoredCluster {
    pub pgdata: PathBuf,
    pub sock: PathBuf,
    port: AtomicU16,
    bin: PathBuf,
}

impl RestoredCluster {
    /// Reserves `<source root>/restore-<name>` (absent: the restore creates it) and a
    /// socket dir; nothing runs yet.
    pub fn new(source: &PgCluster, name: &str) -> Result<RestoredCluster> {
        Ok(RestoredCluster {
            pgdata: source.root_dir().join(format!("restore-{name}")),
            sock: source.make_dir(&format!("rsock-{name}"))?,
            port: AtomicU16::new(unique_port()?),
            bin: pg_bin_dir()?,
        })
    }

    /// `--pgdata DIR --pg-option port=P --pg-option unix_socket_directories=S`.
    pub fn restore_args(&self) -> Vec<String> {
        vec![
            "--pgdata".into(),
            self.pgdata.display().to_string(),
            "--pg-option".into(),
            format!("port={}", self.port()),
            "--pg-option".into(),
            format!("unix_socket_directories={}", self.sock.display()),
            // Keep few WAL segments around: test machines pay for every byte on removal.
            "--pg-option".into(),
            "min_wal_size=32MB".into(),
            "--pg-option".into(),
            "wal_recycle=off".into(),
        ]
    }

    /// `walferry-restore ARGS --pgdata DIR --pg-option ...` into this directory, where ARGS
    /// hold the target (`--to latest`, `--to-lsn X/X`, ...) and flags (`--start`, `--delta`,
    /// `--tablespace-map`). Fails unless walferry-restore exits 0.
    ///
    /// With `--start`, when another process took the port first, the directory is
    /// cleared and the restore runs again on a new port (twice at most).
    pub fn restore(&self, repo: &RestoreRepo, args: &[String]) -> Result<RestoreRun> {
        let start = args.iter().any(|a| a == "--start");
        let fresh = std::fs::read_dir(&self.pgdata).map_or(true, |mut d| d.next().is_none());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut all: Vec<String> = args.to_vec();
            all.extend(self.restore_args());
            if start {
                all.extend(["--start-timeout".into(), "90s".into()]);
            }
            let run = repo.restore(&all)?;
            if run.status.success() {
                return Ok(run);
            }
            let log = self.recovery_log();
            let port_taken = [
                "could not create any TCP/IP sockets",
                "Address already in use",
            ]
            .iter()
            .any(|m| log.contains(m) || run.stdout.contains(m) || run.stderr.contains(m));
            if start && fresh && port_taken && attempt < 3 && !self.is_running() {
                eprintln!("port {} was taken; restoring again on another", self.port());
                std::fs::remove_dir_all(&self.pgdata)
                    .with_context(|| format!("clear {}", self.pgdata.display()))?;
                self.port.store(unique_port()?, Ordering::SeqCst);
                continue;
            }
            bail!("{run}\n--- recovery log ---\n{log}");
        }
    }

    pub fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }

    /// The server log `--start` writes (empty when none).
    pub fn recovery_log(&self) -> String {
        std::fs::read_to_string(self.pgdata.join("walferry-recovery.log")).unwrap_or_default()
    }

    /// `bin` as postgres (when root), pointed at this cluster's socket.
    pub fn command(&self, bin: &str) -> Command {
        let mut c = as_postgres(&self.bin.join(bin));
        c.env("PGHOST", &self.sock)
            .env("PGPORT", self.port().to_string())
            .env("PGUSER", SUPERUSER)
            .env("PGDATABASE", "postgres")
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .current_dir(&self.sock)
            .stdin(Stdio::null());
        c
    }

    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        psql_with(self.command("psql"), db, sql)
    }

    /// The sorted data dump of `db`, see [`DataDump`].
    pub fn dump(&self, db: &str) -> Result<DataDump> {
        DataDump::take(self.command("pg_dump"), db)
    }

    /// Starts a restored (not `--start`ed) directory by hand: hand it to postgres, `pg_ctl
    /// start`, and wait until recovery has promoted it.
    pub fn start_by_hand(&self, timeout: Duration) -> Result<()> {
        if running_as_root() {
            chown_postgres(&self.pgdata)?;
        }
        let log = self.sock.join("server.log");
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.pgdata)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "120", "start"])
            .output()
            .context("run pg_ctl start")?;
        if !out.status.success() {
            bail!(
                "pg_ctl start failed: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let deadline = Instant::now() + timeout;
        loop {
            if self.psql("postgres", "select pg_is_in_recovery()").ok() == Some("f".into()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the restored cluster did not finish recovery within {timeout:?}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn is_running(&self) -> bool {
        std::fs::read_to_string(self.pgdata.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().map(|p| p.trim().to_string()))
            .is_some_and(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .is_ok_and(|s| !s.contains("State:\tZ"))
            })
    }

    /// `pg_ctl stop` (as postgres), waiting for it.
    pub fn stop(&self, mode: &str) -> Result<()> {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.pgdata)
            .args(["-m", mode, "-w", "-t", "60", "stop"])
            .output()
            .context("run pg_ctl stop")?;
        if !out.status.success() {
            bail!(
                "pg_ctl stop -D {} failed: {}{}",
                self.pgdata.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for RestoredCluster {
    /// Stops a server still running here; removes the directory unless the test failed or
    /// `WALFERRY_KEEP_PG` is set (then it goes with the source cluster's temp dir).
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.stop("immediate");
        }
        let keep = std::env::var_os(crate::pg::KEEP_ENV).is_some_and(|v| !v.is_empty() && v != "0");
        if !keep && !std::thread::panicking() && !self.is_running() {
            let _ = std::fs::remove_dir_all(&self.pgdata);
        }
    }
}

/// A stable dump of a database's data: `pg_dump --data-only --inserts`, one row per line,
/// lines sorted (row order on disk is not part of the data).
#[derive(Clone, PartialEq, Eq)]
pub struct DataDump(pub Vec<String>);

impl DataDump {
    pub fn take(mut pg_dump: Command, db: &str) -> Result<DataDump> {
        let out = pg_dump
            .args(["--data-only", "--inserts", "--no-comments", "-d", db])
            .output()
            .context("run pg_dump")?;
        if !out.status.success() {
            bail!(
                "pg_dump -d {db} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut lines: Vec<String> = String::from_utf8(out.stdout)
            .context("pg_dump output is not UTF-8")?
            .lines()
            // `\restrict KEY` / `\unrestrict KEY` (pg_dump 15.14+) carry a random key.
            .filter(|l| {
                !l.trim().is_empty()
                    && !l.starts_with("\\restrict")
                    && !l.starts_with("\\unrestrict")
            })
            .map(str::to_string)
            .collect();
        lines.sort();
        Ok(DataDump(lines))
    }

    /// The number of `INSERT` lines (rows).
    pub fn rows(&self) -> usize {
        self.0.iter().filter(|l| l.starts_with("INSERT ")).count()
    }

    /// Lines only in `self`, and lines only in `other` (at most `max` of each).
    pub fn diff<'a>(&'a self, other: &'a DataDump, max: usize) -> (Vec<&'a str>, Vec<&'a str>) {
        let a: std::collections::BTreeSet<&str> = self.0.iter().map(String::as_str).collect();
        let b: std::collections::BTreeSet<&str> = other.0.iter().map(String::as_str).collect();
        (
            a.difference(&b).take(max).copied().collect(),
            b.difference(&a).take(max).copied().collect(),
        )
    }

    /// Fails with a readable difference unless the two dumps are identical.
    pub fn assert_same(&self, restored: &DataDump, what: &str) -> Result<()> {
        if self == restored {
            return Ok(());
        }
        let (only_src, only_restored) = self.diff(restored, 15);
        bail!(
            "{what}: the restored data differs from the source at the target \
             ({} vs {} rows).\nonly in the source:\n  {}\nonly in the restored cluster:\n  {}",
            self.rows(),
            restored.rows(),
            only_src.join("\n  "),
            only_restored.join("\n  ")
        )
    }
}

impl std::fmt::Debug for DataDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataDump({} lines, {} rows)", self.0.len(), self.rows())
    }
}

/// Waits until the slot's restart_lsn (the flush the agent reported: what is durable in
/// the repository) reaches `lsn`.
pub fn wait_durable(pg: &PgCluster, lsn: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = pg.psql(
            "postgres",
            &format!(
                "select coalesce(restart_lsn >= '{lsn}'::pg_lsn, false) \
                 from pg_replication_slots where slot_name = '{SLOT}'"
            ),
        )?;
        if r == "t" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("slot {SLOT} did not reach {lsn} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A moment to restore to, with writes going on around it: pauses `writer`, dumps `db`,
/// reads the server's `now()`, resumes. No commit falls between the dump and the time,
/// so the dump is exactly the state at that time.
pub fn time_moment(pg: &PgCluster, db: &str, writer: &mut Writer) -> Result<(DataDump, String)> {
    writer.pause()?;
    let dump = DataDump::take(pg.command("pg_dump"), db)?;
    let t = server_now(pg)?;
    writer.resume();
    Ok((dump, t))
}

/// Polls `f` every 100 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Command-line arguments from string slices.
pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The server's clock right now, in the form `--to` takes (UTC, microseconds).
pub fn server_now(pg: &PgCluster) -> Result<String> {
    pg.psql(
        "postgres",
        "select to_char(now() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'",
    )
}

/// The tables [`Writer`] writes, created in `db` (no sequences: their state after recovery
/// legitimately runs ahead of the source).
pub const WRITER_SCHEMA: &str = "
create table accounts(id int primary key, balance bigint not null, touched int not null);
insert into accounts select g, 0, 0 from generate_series(1, 100) g;
create table events(id int primary key, note text not null, at timestamptz not null);
create index events_note on events(note);
create table marks(name text primary key, xid bigint not null, at timestamptz not null);
";

#[derive(Default)]
struct WriterState {
    pause: bool,
    paused: bool,
    stop: bool,
    done: bool,
}

/// A background writer: one psql session committing inserts, updates, deletes and a
/// rollback now and then into [`WRITER_SCHEMA`]'s tables, about every 10 ms. [`Writer::pause`]
/// returns only once every statement sent so far has committed, so the source is quiet
/// until [`Writer::resume`].
pub struct Writer {
    ctl: Arc<(Mutex<WriterState>, Condvar)>,
    thread: Option<JoinHandle<Result<u64>>>,
}

impl Writer {
    pub fn start(pg: &PgCluster, db: &str) -> Result<Writer> {
        let mut cmd = pg.command("psql");
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", db])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("start the writer's psql")?;
        let stdin = child.stdin.take().context("psql stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("psql stdout")?);
        let ctl = Arc::new((Mutex::new(WriterState::default()), Condvar::new()));
        let ctl2 = ctl.clone();
        let thread = std::thread::spawn(move || {
            let r = write_loop(&ctl2, stdin, stdout, &mut child);
            let (m, cv) = &*ctl2;
            if let Ok(mut g) = m.lock() {
                g.done = true;
            }
            cv.notify_all();
            r
        });
        Ok(Writer {
            ctl,
            thread: Some(thread),
        })
    }

    /// Stops sending and waits until everything sent has committed.
    pub fn pause(&mut self) -> Result<()> {
        let (m, cv) = &*self.ctl;
        let mut g = m.lock().map_err(|_| anyhow!("writer lock poisoned"))?;
        g.pause = true;
        cv.notify_all();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !g.paused && !g.done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("the writer did not pause within 30 s");
            }
            g = cv
                .wait_timeout(g, left)
                .map_err(|_| anyhow!("writer lock poisoned"))?
                .0;
        }
        if g.done {
            drop(g);
            return Err(self.join().err().unwrap_or_else(|| anyhow!("writer ended")));
        }
        Ok(())
    }

    pub fn resume(&mut self) {
        let (m, cv) = &*self.ctl;
        if let Ok(mut g) = m.lock() {
            g.pause = false;
        }
        cv.notify_all();
    }

    /// Stops the writer (after its current batch has committed); returns how many batches
    /// it committed.
    pub fn stop(mut self) -> Result<u64> {
        {
            let (m, cv) = &*self.ctl;
            if let Ok(mut g) = m.lock() {
                g.stop = true;
            }
            cv.notify_all();
        }
        self.join()
    }

    fn join(&mut self) -> Result<u64> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow!("writer thread panicked"))?,
            None => bail!("writer already stopped"),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let (m, cv) = &*self.ctl;
        if let Ok(mut g) = m.lock() {
            g.stop = true;
        }
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(
    ctl: &(Mutex<WriterState>, Condvar),
    mut stdin: ChildStdin,
    mut stdout: BufReader<std::process::ChildStdout>,
    child: &mut Child,
) -> Result<u64> {
    let (m, cv) = ctl;
    let mut n: u64 = 0;
    let result = loop {
        {
            let mut g = m.lock().map_err(|_| anyhow!("writer lock poisoned"))?;
            if g.pause && !g.stop {
                g.paused = true;
                cv.notify_all();
                while g.pause && !g.stop {
                    g = cv.wait(g).map_err(|_| anyhow!("writer lock poisoned"))?;
                }
                g.paused = false;
            }
            if g.stop {
                break Ok(n);
            }
        }
        n += 1;
        let mut sql = format!(
            "insert into events values ({n}, md5('{n}'), now());\n\
             update accounts set balance = balance + {n}, touched = {n} where id = {};\n\
             delete from events where id = {};\n",
            n % 100 + 1,
            n as i64 - 300
        );
        if n % 5 == 0 {
            sql.push_str(&format!(
                "begin; update accounts set balance = balance - 1 where id = {}; \
                 insert into events values (-{n}, 'in a transaction', now()); commit;\n",
                (n * 7) % 100 + 1
            ));
        }
        if n % 7 == 0 {
            sql.push_str(&format!(
                "begin; insert into events values (-1000000 - {n}, 'rolled back', now()); rollback;\n"
            ));
        }
        sql.push_str(&format!("\\echo tick {n}\n"));
        if let Err(e) = stdin.write_all(sql.as_bytes()).and_then(|()| stdin.flush()) {
            break Err(anyhow!("write to the writer's psql: {e}"));
        }
        // psql runs statements in order: once it echoes the tick, all of them committed.
        let want = format!("tick {n}");
        let mut line = String::new();
        let got = loop {
            line.clear();
            match stdout.read_line(&mut line) {
                Ok(0) => break Err(anyhow!("the writer's psql exited")),
                Ok(_) if line.trim() == want => break Ok(()),
                Ok(_) => {}
                Err(e) => break Err(anyhow!("read the writer's psql: {e}")),
            }
        };
        if let Err(e) = got {
            break Err(e);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(stdin);
    let status = child.wait().context("wait for the writer's psql");
    match (result, status) {
        (Ok(n), Ok(st)) if st.success() => Ok(n),
        (Ok(_), Ok(st)) => Err(anyhow!("the writer's psql exited {st}")),
        (Ok(_), Err(e)) => Err(e),
        (Err(e), _) => {
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut s, &mut err);
            }
            Err(e.context(format!("writer psql stderr: {}", err.trim())))
        }
    }
}

/// Runs `psql -X -A -t -q -v ON_ERROR_STOP=1 -d db -c sql` from a prepared command.
fn psql_with(mut cmd: Command, db: &str, sql: &str) -> Result<String> {
    let out = cmd
        .args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            db,
            "-c",
            sql,
        ])
        .output()
        .context("run psql")?;
    if !out.status.success() {
        bail!(
            "psql on db {db} failed: {}\nSQL: {sql}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A free port not handed to another restored cluster of this process (restores may run
/// side by side).
fn unique_port() -> Result<u16> {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().map_err(|_| anyhow!("port list poisoned"))?;
    for _ in 0..50 {
        let p = free_port()?;
        if !given.contains(&p) {
            given.push(p);
            return Ok(p);
        }
    }
    bail!("no free port after 50 tries")
}

fn as_postgres(program: &Path) -> Command {
    if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn chmod(path: &Path, mode: &str) -> Result<()> {
    let st = Command::new("chmod")
        .arg(mode)
        .arg(path)
        .status()
        .context("run chmod")?;
    if !st.success() {
        bail!("chmod {mode} {} failed", path.display());
    }
    Ok(())
}

fn chown_postgres(path: &Path) -> Result<()> {
    let st = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .context("run chown")?;
    if !st.success() {
        bail!("chown -R postgres {} failed", path.display());
    }
    Ok(())
}
