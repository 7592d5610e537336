//! Real PostgreSQL clusters for tests: `initdb` into a temp dir, a private socket dir, a
//! free TCP port, and the `postgres` OS user when the tests run as root.
//!
//! All methods block (they run `pg_ctl`, `psql`, ...); from async tests that is fine for
//! the short calls, or wrap them in `tokio::task::spawn_blocking`.

use anyhow::{anyhow, bail, Context, Result};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Superuser, reachable without a password over the unix socket and TCP.
pub const SUPERUSER: &str = "postgres";
/// `LOGIN REPLICATION` role whose password is stored as SCRAM; pg_hba demands SCRAM over TCP.
pub const SCRAM_USER: &str = "walferry_scram";
pub const SCRAM_PASSWORD: &str = "scram-Secret-42";
/// `LOGIN REPLICATION` role whose password is stored as MD5; pg_hba demands md5 over TCP.
pub const MD5_USER: &str = "walferry_md5";
pub const MD5_PASSWORD: &str = "md5-Secret-42";

/// Environment variable that overrides the directory holding `initdb`, `pg_ctl`, ...
pub const PG_BINDIR_ENV: &str = "WALFERRY_PG_BINDIR";
/// Environment variable: keep the cluster's temp dir after the test (for debugging).
pub const KEEP_ENV: &str = "WALFERRY_KEEP_PG";
/// Environment variable: parent directory for cluster temp dirs (default: the system temp dir).
pub const TMPDIR_ENV: &str = "WALFERRY_PG_TMPDIR";

const START_ATTEMPTS: usize = 6;
const PG_CTL_TIMEOUT_SECS: &str = "300";

/// The directory with the PostgreSQL server binaries (cached for the process).
///
/// Order: `$WALFERRY_PG_BINDIR`, `pg_config --bindir` if it holds `initdb` (Debian's
/// `/usr/bin/pg_config` points at `/usr/bin`, which does not), then the newest
/// `/usr/lib/postgresql/<major>/bin`.
pub fn pg_bin_dir() -> Result<PathBuf> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| find_bin_dir().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn find_bin_dir() -> Result<PathBuf> {
    let has_initdb = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Ok(dir) = std::env::var(PG_BINDIR_ENV) {
        let dir = PathBuf::from(dir);
        if has_initdb(&dir) {
            return Ok(dir);
        }
        bail!("${PG_BINDIR_ENV}={} has no initdb/postgres", dir.display());
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_initdb(&dir) {
                return Ok(dir);
            }
        }
    }
    let mut found: Vec<(Vec<u32>, PathBuf)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let version: Vec<u32> = name.split('.').filter_map(|p| p.parse().ok()).collect();
            let bin = e.path().join("bin");
            if !version.is_empty() && has_initdb(&bin) {
                found.push((version, bin));
            }
        }
    }
    found.sort();
    found.pop().map(|(_, dir)| dir).ok_or_else(|| {
        anyhow!(
            "PostgreSQL server binaries not found: no initdb via pg_config --bindir or in \
             /usr/lib/postgresql/*/bin (install postgresql, or set ${PG_BINDIR_ENV})"
        )
    })
}

/// True when the current process runs as uid 0 (then PostgreSQL runs as `postgres`).
pub fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
            })
            .unwrap_or(false)
    })
}

/// When root: `chown -R postgres:postgres path` (so a server started as postgres, or a
/// tool run through [`PgCluster::command`], can use it). A no-op otherwise.
pub fn give_to_postgres(path: &Path) -> Result<()> {
    if running_as_root() {
        run_checked(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(path),
        )
        .with_context(|| format!("chown {} to postgres", path.display()))?;
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1 right now (another process may still take it first).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Options for a new cluster; see [`PgCluster::builder`].
#[derive(Debug, Clone, Default)]
pub struct PgClusterBuilder {
    config: Vec<(String, String)>,
    hba_lines: Vec<String>,
    initdb_args: Vec<String>,
}

impl PgClusterBuilder {
    /// An extra `key = 'value'` line in postgresql.conf (after the testkit defaults, so it wins).
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.push((key.into(), value.into()));
        self
    }

    /// An extra pg_hba.conf line, placed before the testkit defaults (first match wins).
    pub fn hba_line(mut self, line: impl Into<String>) -> Self {
        self.hba_lines.push(line.into());
        self
    }

    /// An extra `initdb` argument, e.g. `--wal-segsize=1`.
    pub fn initdb_arg(mut self, arg: impl Into<String>) -> Self {
        self.initdb_args.push(arg.into());
        self
    }

    /// initdb, configure, start, create the test roles.
    pub fn start(self) -> Result<PgCluster> {
        PgCluster::create(self)
    }
}

/// A running (or stopped) throwaway PostgreSQL cluster. Dropping it stops the server
/// immediately and removes its directory.
#[derive(Debug)]
pub struct PgCluster {
    tmp: Option<TempDir>,
    root: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    port: AtomicU16,
    as_root: bool,
}

impl PgCluster {
    pub fn builder() -> PgClusterBuilder {
        PgClusterBuilder::default()
    }

    /// A cluster with the testkit defaults, started. (To start a stopped or killed
    /// cluster again, use [`PgCluster::start_server`].)
    pub fn start() -> Result<PgCluster> {
        Self::builder().start()
    }

    fn create(opts: PgClusterBuilder) -> Result<PgCluster> {
        let cluster = Self::prepare()?;
        cluster.initdb(&opts)?;
        cluster.write_config(&opts)?;
        cluster.start_server()?;
        cluster.create_roles()?;
        Ok(cluster)
    }

    /// A hot standby of `primary`, streaming from it: pg_basebackup -R of the primary,
    /// with its own port and socket directory, started. It keeps the primary's settings
    /// and roles.
    pub fn standby_of(primary: &PgCluster) -> Result<PgCluster> {
        let cluster = Self::prepare()?;
        let mut cmd = cluster.command("pg_basebackup");
        cmd.arg("-D")
            .arg(&cluster.data)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"])
            .arg("-h")
            .arg(&primary.sock)
            .args(["-p", &primary.port().to_string(), "-U", SUPERUSER]);
        run_checked(&mut cmd).context("pg_basebackup for a standby")?;
        // The primary's postgresql.conf names its socket directory; a later line wins.
        let conf_path = cluster.data.join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&conf_path).context("read postgresql.conf")?;
        writeln!(
            conf,
            "unix_socket_directories = {}",
            quote_conf(&cluster.sock.to_string_lossy())
        )?;
        std::fs::write(&conf_path, conf).context("write postgresql.conf")?;
        cluster.write_port_file()?;
        cluster.start_server()?;
        Ok(cluster)
    }

    /// The directories and the watchdog of a cluster not made yet.
    fn prepare() -> Result<PgCluster> {
        let bin = pg_bin_dir()?;
        let as_root = running_as_root();
        let parent = std::env::var_os(TMPDIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let tmp = tempfile::Builder::new()
            .prefix("walferry-pg-")
            .tempdir_in(&parent)
            .with_context(|| format!("create temp dir in {}", parent.display()))?;
        let root = tmp.path().to_path_buf();
        let sock = root.join("sock");
        std::fs::create_dir(&sock).context("create socket dir")?;
        if as_root {
            // tempdir is 0700 root-owned; hand the whole tree to postgres.
            run_checked(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&root),
            )
            .context("chown cluster dir to postgres (does the `postgres` user exist?)")?;
        }
        let cluster = PgCluster {
            data: root.join("data"),
            log: root.join("postgres.log"),
            sock,
            root,
            tmp: Some(tmp),
            bin,
            port: AtomicU16::new(free_port()?),
            as_root,
        };
        if as_root {
            // A TMPDIR under a 0700 home would make every later step fail obscurely.
            let ok = cluster
                .raw_command("test")
                .args(["-w"])
                .arg(&cluster.root)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                bail!(
                    "user postgres cannot write {} (set ${TMPDIR_ENV} to a directory it can reach)",
                    cluster.root.display()
                );
            }
        }
        cluster.spawn_watchdog();
        Ok(cluster)
    }

    /// If the test process dies without dropping us (nextest timeout, Ctrl-C), a detached
    /// shell stops the server and removes the dir. Its own session, so a kill of the test's
    /// process group does not take it along (pg_ctl also puts postgres in its own session).
    fn spawn_watchdog(&self) {
        let mut stop = self.pg_ctl();
        stop.args(["-m", "immediate", "-w", "-t", "30", "stop"]);
        let mut argv = vec![stop.get_program().to_owned()];
        argv.extend(stop.get_args().map(|a| a.to_owned()));
        let spawn = |wrapper: Option<&str>| {
            let mut cmd = match wrapper {
                Some(w) => {
                    let mut c = Command::new(w);
                    c.arg("sh");
                    c
                }
                None => Command::new("sh"),
            };
            cmd.arg("-c")
                .arg(PG_WATCHDOG)
                .arg("walferry-pg-watchdog")
                .args(&argv)
                .envs(stop.get_envs().filter_map(|(k, v)| Some((k, v?))))
                .env("WF_WATCH_PID", std::process::id().to_string())
                .env("WF_ROOT", &self.root)
                .current_dir(&self.root)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        };
        if spawn(Some("setsid")).or_else(|_| spawn(None)).is_err() {
            eprintln!(
                "walferry testkit: could not start the cluster watchdog (cleanup relies on Drop)"
            );
        }
    }

    fn initdb(&self, opts: &PgClusterBuilder) -> Result<()> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-U", SUPERUSER, "--auth=trust", "--data-checksums"])
            .args(["-E", "UTF8", "--locale=C"])
            // Only initdb's own fsync is skipped (speed); the server runs with fsync=on.
            .arg("--no-sync")
            .args(&opts.initdb_args);
        run_checked(&mut cmd).context("initdb")?;
        Ok(())
    }

    fn write_config(&self, opts: &PgClusterBuilder) -> Result<()> {
        let conf_path = self.data.join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&conf_path).context("read postgresql.conf")?;
        conf.push_str("\n# ---- walferry testkit ----\n");
        let defaults: &[(&str, &str)] = &[
            ("listen_addresses", "127.0.0.1"),
            ("unix_socket_directories", &self.sock.to_string_lossy()),
            ("wal_level", "replica"),
            ("max_wal_senders", "10"),
            ("max_replication_slots", "10"),
            ("wal_keep_size", "0"),
            ("fsync", "on"),
            ("password_encryption", "scram-sha-256"),
            ("logging_collector", "off"),
            ("log_line_prefix", "%m [%p] %q%u@%d "),
            ("shared_buffers", "64MB"),
        ];
        for (k, v) in defaults {
            writeln!(conf, "{k} = {}", quote_conf(v))?;
        }
        for (k, v) in &opts.config {
            writeln!(conf, "{k} = {}", quote_conf(v))?;
        }
        // The port lives in its own file so a retry on another port leaves the rest alone.
        conf.push_str("include 'walferry_port.conf'\n");
        std::fs::write(&conf_path, conf).context("write postgresql.conf")?;
        self.write_port_file()?;

        let mut hba = String::new();
        for l in &opts.hba_lines {
            writeln!(hba, "{l}")?;
        }
        // The password users come before the trust lines, so they must authenticate.
        hba.push_str(
            "local all all trust\n\
             local replication all trust\n\
             host all walferry_scram 127.0.0.1/32 scram-sha-256\n\
             host replication walferry_scram 127.0.0.1/32 scram-sha-256\n\
             host all walferry_md5 127.0.0.1/32 md5\n\
             host replication walferry_md5 127.0.0.1/32 md5\n\
             host all all 127.0.0.1/32 trust\n\
             host replication all 127.0.0.1/32 trust\n",
        );
        std::fs::write(self.data.join("pg_hba.conf"), hba).context("write pg_hba.conf")?;
        Ok(())
    }

    fn write_port_file(&self) -> Result<()> {
        let path = self.data.join("walferry_port.conf");
        std::fs::write(&path, format!("port = {}\n", self.port()))
            .with_context(|| format!("write {}", path.display()))?;
        if self.as_root {
            run_checked(Command::new("chown").arg("postgres:postgres").arg(&path))?;
        }
        Ok(())
    }

    fn create_roles(&self) -> Result<()> {
        self.psql(
            "postgres",
            &format!(
                "SET password_encryption = 'scram-sha-256';\n\
                 CREATE ROLE {SCRAM_USER} LOGIN REPLICATION PASSWORD '{SCRAM_PASSWORD}';\n\
                 SET password_encryption = 'md5';\n\
                 CREATE ROLE {MD5_USER} LOGIN REPLICATION PASSWORD '{MD5_PASSWORD}';\n"
            ),
        )
        .context("create test roles")?;
        Ok(())
    }

    // ---- accessors ----

    pub fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }
    pub fn socket_dir(&self) -> &Path {
        &self.sock
    }
    pub fn data_dir(&self) -> &Path {
        &self.data
    }
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }
    /// The temp dir holding data/, sock/ and postgres.log; removed on drop.
    pub fn root_dir(&self) -> &Path {
        &self.root
    }
    pub fn log_path(&self) -> &Path {
        &self.log
    }
    /// A new empty directory `<root_dir>/<name>` (mode 0700, owned by the server's OS
    /// user), removed with the cluster: a place for pg_basebackup output, a restored
    /// PGDATA, archives.
    pub fn make_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        give_to_postgres(&dir)?;
        Ok(dir)
    }
    /// The server log so far (empty if none yet).
    pub fn log_contents(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        tail_lines(&self.log_contents(), n)
    }
    /// Superuser over the unix socket (trust), libpq key=value form.
    pub fn superuser_conninfo(&self) -> String {
        format!(
            "host={} port={} user={SUPERUSER} dbname=postgres",
            self.sock.display(),
            self.port()
        )
    }
    /// Superuser over TCP 127.0.0.1 (trust).
    pub fn superuser_tcp_conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} dbname=postgres",
            self.port()
        )
    }
    /// `walferry_scram` over TCP; the server demands SCRAM-SHA-256.
    pub fn scram_conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={SCRAM_USER} password={SCRAM_PASSWORD} dbname=postgres",
            self.port()
        )
    }
    /// `walferry_md5` over TCP; the server demands MD5.
    pub fn md5_conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={MD5_USER} password={MD5_PASSWORD} dbname=postgres",
            self.port()
        )
    }
    pub fn scram_password(&self) -> &'static str {
        SCRAM_PASSWORD
    }
    pub fn md5_password(&self) -> &'static str {
        MD5_PASSWORD
    }

    // ---- commands ----

    /// A command for a PostgreSQL binary (`pg_waldump`, `pgbench`, `pg_dump`, ...), run as
    /// `postgres` when we are root, with PGHOST/PGPORT/PGUSER/PGDATABASE pointing here
    /// (unix socket, superuser). As root, paths it writes must be writable by postgres
    /// (see [`PgCluster::make_dir`]).
    pub fn command(&self, bin_name: &str) -> Command {
        let mut cmd = self.raw_command(self.bin.join(bin_name));
        cmd.env("PGHOST", &self.sock)
            .env("PGPORT", self.port().to_string())
            .env("PGUSER", SUPERUSER)
            .env("PGDATABASE", "postgres")
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE");
        cmd
    }

    /// `program` as the postgres user when root, with cwd in the cluster dir (postgres
    /// cannot always read the test's cwd).
    fn raw_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.current_dir(&self.root).stdin(Stdio::null());
        cmd
    }

    /// Run SQL through `psql -X -A -t -q -v ON_ERROR_STOP=1` as the superuser on database
    /// `db`; statements run one by one as in a script. Returns trimmed stdout (rows as
    /// `a|b`, one per line).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let mut cmd = self.command("psql");
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            db,
            "-f",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawn psql")?;
        let mut stdin = child.stdin.take().context("psql stdin")?;
        let sql_owned = sql.to_owned();
        // Separate writer thread: psql may produce output before it has read all input.
        let writer = std::thread::spawn(move || stdin.write_all(sql_owned.as_bytes()));
        let out = child.wait_with_output().context("wait for psql")?;
        let _ = writer.join();
        if !out.status.success() {
            bail!(
                "psql failed ({}) on db {db}: {}\nSQL: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                truncate(sql, 2000)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn pg_ctl(&self) -> Command {
        let mut c = self.command("pg_ctl");
        c.arg("-D").arg(&self.data);
        c
    }

    // ---- lifecycle ----

    /// Start the server again (after `stop()`/`kill9()`); waits until it accepts connections,
    /// which after a crash means crash recovery is done. On "address already in use" it
    /// moves to a new free port (check `port()` afterwards).
    pub fn start_server(&self) -> Result<()> {
        if self.is_running() {
            bail!("postgres in {} is already running", self.data.display());
        }
        let mut last_err = None;
        for attempt in 0..START_ATTEMPTS {
            if attempt > 0 {
                self.port.store(free_port()?, Ordering::SeqCst);
                self.write_port_file()?;
            }
            self.remove_stale_lock_files();
            let log_before = self.log_contents().len();
            let out = self
                .pg_ctl()
                .arg("-l")
                .arg(&self.log)
                .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "start"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .output()
                .context("spawn pg_ctl start")?;
            if out.status.success() {
                return Ok(());
            }
            let log = self.log_contents();
            let new_log = log.get(log_before..).unwrap_or(&log);
            let port_taken = [
                "could not bind",
                "Address already in use",
                "could not create any TCP/IP sockets",
            ]
            .iter()
            .any(|m| new_log.contains(m));
            let err = anyhow!(
                "pg_ctl start failed ({}) on port {}: {}{}",
                out.status,
                self.port(),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            if !port_taken {
                eprintln!(
                    "\n!!!!! walferry testkit: PostgreSQL failed to start in {} !!!!!\n{err:#}\n--- server log tail ---\n{}\n--- end ---\n",
                    self.data.display(),
                    tail_lines(new_log, 40)
                );
                return Err(err);
            }
            last_err = Some(err);
        }
        let err = last_err.unwrap_or_else(|| anyhow!("start failed"));
        eprintln!(
            "\n!!!!! walferry testkit: PostgreSQL could not bind a port after {START_ATTEMPTS} tries !!!!!\n{err:#}\n--- server log tail ---\n{}\n",
            self.log_tail(40)
        );
        Err(err)
    }

    /// Fast shutdown (`pg_ctl stop -m fast`), waiting for it.
    pub fn stop(&self) -> Result<()> {
        let mut cmd = self.pg_ctl();
        cmd.args(["-m", "fast", "-w", "-t", PG_CTL_TIMEOUT_SECS, "stop"]);
        run_checked(&mut cmd).context("pg_ctl stop")?;
        Ok(())
    }

    /// `stop()` then `start_server()`.
    pub fn restart(&self) -> Result<()> {
        self.stop()?;
        self.start_server()
    }

    /// Re-read the configuration files (`pg_ctl reload`).
    pub fn reload(&self) -> Result<()> {
        let mut cmd = self.pg_ctl();
        cmd.arg("reload");
        run_checked(&mut cmd).context("pg_ctl reload")?;
        Ok(())
    }

    /// Append `key = 'value'` to postgresql.conf (takes effect on reload/restart).
    pub fn append_config(&self, key: &str, value: &str) -> Result<()> {
        let path = self.data.join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        writeln!(f, "{key} = {}", quote_conf(value))?;
        Ok(())
    }

    /// SIGKILL the postmaster (a crash) and wait until it and all its children are gone.
    /// A later `start_server()` runs crash recovery.
    pub fn kill9(&self) -> Result<()> {
        let pid = self
            .postmaster_pid()
            .filter(|p| pid_alive(*p))
            .ok_or_else(|| anyhow!("kill9: postgres in {} is not running", self.data.display()))?;
        let children = children_of(pid);
        run_checked(Command::new("kill").args(["-KILL", &pid.to_string()]))
            .context("kill -KILL postmaster")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left: Vec<u32> = std::iter::once(pid)
                .chain(children.iter().copied())
                .filter(|p| pid_alive(*p))
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kill9: processes {left:?} still alive 60s after SIGKILL of postmaster {pid}"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// True when the postmaster of this data dir is alive.
    pub fn is_running(&self) -> bool {
        self.postmaster_pid().is_some_and(pid_alive)
    }

    /// PID from `postmaster.pid`, if the file exists.
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// A killed postmaster that nobody reaped stays a zombie (PID 1 on some sandboxes never
    /// reaps), and postgres refuses to start while a pid in postmaster.pid or a socket lock
    /// file answers kill(0): drop lock files whose owner is dead.
    fn remove_stale_lock_files(&self) {
        let mut locks = vec![self.data.join("postmaster.pid")];
        if let Ok(entries) = std::fs::read_dir(&self.sock) {
            locks.extend(
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.to_string_lossy().ends_with(".lock")),
            );
        }
        for lock in locks {
            let pid = std::fs::read_to_string(&lock)
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()));
            if pid.is_some_and(|pid| !pid_alive(pid)) {
                let _ = std::fs::remove_file(&lock);
            }
        }
    }

    /// Keep the temp dir after drop (prints where it is).
    pub fn keep(&mut self) -> PathBuf {
        // Tells the watchdog to leave the dir alone too.
        let _ = std::fs::write(self.root.join(".keep"), b"");
        if let Some(tmp) = self.tmp.take() {
            let _ = tmp.keep();
        }
        self.root.clone()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self
                .pg_ctl()
                .args(["-m", "immediate", "-w", "-t", "30", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if self.is_running() {
                let _ = self.kill9();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- walferry testkit: server log tail of {} (test panicked) ---\n{}\n--- end ---",
                self.data.display(),
                self.log_tail(30)
            );
        }
        if std::env::var_os(KEEP_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
            let dir = self.keep();
            eprintln!(
                "walferry testkit: keeping cluster dir {} (${KEEP_ENV})",
                dir.display()
            );
        }
        // TempDir's own drop removes the directory.
    }
}

/// Waits for the test process (or the cluster dir) to go; then stops postgres and removes
/// the dir unless `.keep` exists. "$@" is the `pg_ctl ... stop` command line.
const PG_WATCHDOG: &str = r#"
while kill -0 "$WF_WATCH_PID" 2>/dev/null && [ -d "$WF_ROOT" ]; do sleep 1; done
[ -d "$WF_ROOT" ] || exit 0
[ -e "$WF_ROOT/.keep" ] && exit 0
"$@" >/dev/null 2>&1
rm -rf "$WF_ROOT"
"#;

fn quote_conf(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Run, and turn a non-zero exit into an error carrying stdout and stderr.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// (state, ppid) from /proc/<pid>/stat; the comm field may hold spaces and parens.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Alive and not a zombie.
fn pid_alive(pid: u32) -> bool {
    matches!(proc_stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| matches!(proc_stat(*pid), Some((_, ppid)) if ppid == parent))
        .collect()
}
