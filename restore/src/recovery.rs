//! Recovery settings for a restored data directory, and the supervisor behind `--start`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::plan::{Plan, Target};

/// How `restore_command` reaches the repository.
pub struct FetchCommand {
    pub exe: PathBuf,
    pub repo: String,
    pub repo_options: Vec<String>,
    pub key_file: Option<PathBuf>,
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl FetchCommand {
    /// A restore_command. wal-fetch exits 1 for "not found" (the normal end of WAL); any
    /// other failure becomes exit 126, which makes recovery stop with an error instead of
    /// quietly ending early on a damaged or unreadable repository.
    pub fn restore_command(&self) -> String {
        let mut c = format!(
            "{} wal-fetch --repo {}",
            sh_quote(&self.exe.display().to_string()),
            sh_quote(&self.repo)
        );
        for o in &self.repo_options {
            c.push_str(&format!(" --repo-option {}", sh_quote(o)));
        }
        if let Some(k) = &self.key_file {
            c.push_str(&format!(
                " --key-file {}",
                sh_quote(&k.display().to_string())
            ));
        }
        c.push_str(" %f %p || { rc=$?; [ $rc -eq 1 ] && exit 1; exit 126; }");
        c
    }
}

/// Writes `recovery.signal` and appends the recovery settings to `postgresql.auto.conf`.
/// Returns true when it removed a `standby.signal` the backup carried.
pub fn write_settings(
    pgdata: &Path,
    plan: &Plan,
    fetch: &FetchCommand,
    extra: &[(String, String)],
) -> anyhow::Result<bool> {
    let mut s = format!(
        "\n# Added by walferry-restore: backup {}, target {}\nrestore_command = {}\nrecovery_target_action = 'promote'\nrecovery_target_timeline = '{}'\n",
        plan.backup_id,
        plan.target,
        conf_quote(&fetch.restore_command()),
        plan.timeline.0
    );
    // Targets the source's own settings may name would clash with ours ("multiple
    // recovery targets specified"); a later line wins.
    s.push_str("recovery_target = ''\nrecovery_target_time = ''\nrecovery_target_lsn = ''\nrecovery_target_xid = ''\nrecovery_target_name = ''\n");
    match &plan.target {
        Target::Time(t) => s.push_str(&format!(
            "recovery_target_time = '{}'\n",
            t.strftime("%Y-%m-%d %H:%M:%S%.6f+00")
        )),
        Target::Latest => {}
        Target::Lsn(l) => s.push_str(&format!("recovery_target_lsn = '{l}'\n")),
        Target::Xid(x) => s.push_str(&format!("recovery_target_xid = '{x}'\n")),
        Target::Name(n) => s.push_str(&format!("recovery_target_name = {}\n", conf_quote(n))),
    }
    for (k, v) in extra {
        s.push_str(&format!("{k} = {}\n", conf_quote(v)));
    }
    let auto = pgdata.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
    text.push_str(&s);
    std::fs::write(&auto, text).with_context(|| format!("write {}", auto.display()))?;
    std::fs::write(pgdata.join("recovery.signal"), b"").context("write recovery.signal")?;
    // A backup taken on a standby carries its standby.signal: left in place, the restored
    // server would start as a standby of the source's primary_conninfo, follow that
    // primary past the stored WAL and, with `latest`, never promote.
    let standby = pgdata.join("standby.signal");
    match std::fs::remove_file(&standby) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("remove {}", standby.display())),
    }
}

/// Where the PostgreSQL server binaries are.
pub fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(d) = std::env::var("WALFERRY_PG_BINDIR") {
        return Ok(PathBuf::from(d));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if d.join("pg_ctl").exists() {
            return Ok(d);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("pg_ctl").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().context(
        "no PostgreSQL server binaries found (set WALFERRY_PG_BINDIR, or put pg_config on PATH)",
    )
}

/// What recovery reached.
pub struct Reached {
    pub last_commit: Option<String>,
    pub last_lsn: Option<String>,
    pub log_summary: Vec<String>,
}

/// Runs PostgreSQL commands as `user` when we are root (the server refuses root).
fn pg_command(bin: &Path, user: Option<&str>) -> Command {
    match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--"]).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

fn is_root() -> bool {
    // The real uid, read without unsafe libc calls.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Starts the restored cluster, follows recovery to its end, and reports what it reached.
/// As root, gives the restored directories to `postgres` (the server refuses to run as
/// root) and returns its uid and gid, for files written into them afterwards.
pub fn hand_over(pgdata: &Path, extra_dirs: &[PathBuf]) -> anyhow::Result<Option<(u32, u32)>> {
    if !is_root() {
        return Ok(None);
    }
    let u = "postgres";
    for d in std::iter::once(&pgdata.to_path_buf()).chain(extra_dirs) {
        let st = Command::new("chown")
            .args(["-R", u])
            .arg(d)
            .status()
            .context("run chown")?;
        if !st.success() {
            bail!("chown -R {u} {} failed", d.display());
        }
    }
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(pgdata).with_context(|| format!("stat {}", pgdata.display()))?;
    Ok(Some((m.uid(), m.gid())))
}

/// Starts the server on a restored directory (after [`hand_over`]) and follows recovery.
pub fn start_and_follow(pgdata: &Path, timeout: Duration) -> anyhow::Result<Reached> {
    let bin = pg_bin_dir()?;
    let user = is_root().then_some("postgres");
    let log = pgdata.join("walferry-recovery.log");
    let st = pg_command(&bin.join("pg_ctl"), user)
        .arg("-D")
        .arg(pgdata)
        .arg("-l")
        .arg(&log)
        .args(["-W", "start"])
        .status()
        .context("run pg_ctl start")?;
    if !st.success() {
        bail!(
            "pg_ctl start failed:\n{}",
            explain_log(&read(&log)).join("\n")
        );
    }
    let began = Instant::now();
    let deadline = began + timeout;
    // `pg_ctl -W` returns before the postmaster has written postmaster.pid; on a busy
    // machine that can take well over a second. Until the pid file has been seen, its
    // absence means "still starting" (for a grace period), not "stopped".
    let mut seen_pid = false;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let text = read(&log);
        let pid_file = pgdata.join("postmaster.pid");
        let pid_text = std::fs::read_to_string(&pid_file).ok();
        seen_pid |= pid_text.is_some();
        let running = pid_text
            .and_then(|t| {
                t.lines()
                    .next()
                    .map(|p| Path::new("/proc").join(p.trim()).join("status"))
            })
            .and_then(|p| std::fs::read_to_string(p).ok())
            .is_some_and(|s| !s.contains("State:\tZ"));
        let starting =
            !seen_pid && !text.contains("FATAL:") && began.elapsed() < Duration::from_secs(60);
        if !running && !starting
            || text.contains("FATAL:") && text.contains("startup process")
            || text.contains("PANIC:")
        {
            // Leave nothing half-started behind: the directory is not a usable cluster.
            let _ = pg_command(&bin.join("pg_ctl"), user)
                .arg("-D")
                .arg(pgdata)
                .args(["-m", "immediate", "-W", "stop"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            bail!(
                "recovery failed (the server was stopped):\n{}",
                explain_log(&text).join("\n")
            );
        }
        if text.contains("database system is ready to accept connections")
            && !pgdata.join("recovery.signal").exists()
        {
            let q = |sql: &str| query(&bin, user, &pid_file, sql);
            let last_commit = q("select pg_last_xact_replay_timestamp()")
                .ok()
                .filter(|s| !s.is_empty());
            let last_lsn = q("select pg_last_wal_replay_lsn()")
                .ok()
                .filter(|s| !s.is_empty());
            return Ok(Reached {
                last_commit,
                last_lsn,
                log_summary: explain_log(&text),
            });
        }
        if Instant::now() > deadline {
            bail!(
                "recovery did not finish within {timeout:?}; the server is still running. Log:\n{}",
                explain_log(&text).join("\n")
            );
        }
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Runs one query over the socket named in postmaster.pid.
fn query(bin: &Path, user: Option<&str>, pid_file: &Path, sql: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(pid_file).context("read postmaster.pid")?;
    let lines: Vec<&str> = text.lines().collect();
    let (port, sock) = (
        lines.get(3).copied().unwrap_or("5432"),
        lines.get(4).copied().unwrap_or("/tmp"),
    );
    let out = pg_command(&bin.join("psql"), user)
        .args([
            "-X", "-A", "-t", "-h", sock, "-p", port, "-U", "postgres", "-d", "postgres", "-c", sql,
        ])
        .output()
        .context("run psql")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The server log's recovery story in plain words, with advice for known failures.
pub fn explain_log(log: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in log.lines() {
        let msg = line.split_once(": ").map(|(_, m)| m).unwrap_or(line);
        let advice = if line
            .contains("requested recovery stop point is before consistent recovery point")
        {
            Some("the target lies inside the backup itself: choose a later target, or an older backup with --backup ID")
        } else if line.contains("recovery ended before configured recovery target was reached") {
            Some("the WAL ends before the target: the repository does not hold WAL up to it (check `walferry-restore verify`)")
        } else if line.contains("WAL ends before consistent recovery point") {
            Some("WAL written during the backup is missing: the backup cannot be restored; use another backup")
        } else if line.contains("could not restore file") {
            Some("wal-fetch failed on a real error (see its message above): the repository is damaged or unreadable")
        } else {
            None
        };
        let keep = advice.is_some()
            || [
                "starting point-in-time recovery",
                "consistent recovery state reached",
                "recovery stopping",
                "redo done",
                "last completed transaction",
                "selected new timeline",
                "archive recovery complete",
                "error:",
                "FATAL:",
            ]
            .iter()
            .any(|k| line.contains(k));
        if keep {
            out.push(format!("  postgres: {msg}"));
        }
        if let Some(a) = advice {
            out.push(format!("  -> {a}"));
        }
    }
    out
}
