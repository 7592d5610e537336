//! walferry-agent: the writer side. Streams WAL, takes base backups, manages the repository.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use walferry_agent::archive::ArchiverConfig;
use walferry_agent::pg::ConnInfo;
use walferry_agent::stream::StreamConfig;
use walferry_formats::config::RepoConfig;
use walferry_formats::keyring::MasterKey;
use walferry_formats::{Repository, Units};

const AFTER_HELP: &str = "\
Settings come from flags, then WALFERRY_* environment variables. The master key comes from
--key-file / WALFERRY_KEY_FILE or WALFERRY_KEY (64 hex characters); it is never printed or
logged, and a key file readable by group or others is refused.

Exit codes: 0 success, 1 failure, 2 usage error.";

#[derive(Parser)]
#[command(
    name = "walferry-agent",
    version,
    about = "Keep PostgreSQL recoverable from object storage: stream WAL, take base backups",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Log format: human (default) or json.
    #[arg(
        long,
        global = true,
        env = "WALFERRY_LOG_FORMAT",
        default_value = "human"
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Make a new random master key (64 hex characters). Write it to a file: `keygen > FILE` or `--out FILE`.
    Keygen {
        /// Create FILE (mode 0600; refuses to overwrite) instead of writing to stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Create a repository (config and wrapped data key). Refuses if one already exists.
    Init {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        key: KeyArgs,
        /// Store everything unencrypted (tests and demos only; recorded in walferry.json).
        #[arg(long, conflicts_with = "key_file")]
        no_encryption: bool,
        /// zstd level for everything stored (1-22). 1 takes about half the CPU of 3 on
        /// typical table data for a few percent more bytes; fixed for the repository's life.
        #[arg(long, default_value_t = walferry_formats::config::DEFAULT_ZSTD_LEVEL, value_name = "LEVEL")]
        compression_level: i32,
        /// Dedup block size in KiB (a multiple of 8, 8-65536). Smaller blocks re-upload less
        /// after scattered changes, at the cost of larger manifests; fixed for the repository's life.
        #[arg(long, default_value_t = walferry_formats::config::DEFAULT_BLOCK_SIZE / 1024, value_name = "KIB")]
        block_size: u32,
    },
    /// Run the sidecar: stream WAL, take scheduled backups, serve /metrics and /health.
    ///
    /// Reports to Postgres as flushed only what is durable in the repository, so the slot
    /// keeps every byte that is not. SIGTERM/SIGINT store what is buffered, report the
    /// final position and exit 0. Settings: flags, then WALFERRY_* variables, then --config.
    Run(Box<RunArgs>),
    /// Take one base backup now with BASE_BACKUP; prints its id.
    ///
    /// Blocks already stored are referenced, not uploaded again. The backup is listed only
    /// once its manifest is written, after every block and the WAL it needs are stored.
    Backup {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        key: KeyArgs,
        /// libpq connection string or postgres:// URL.
        #[arg(long, env = "WALFERRY_PG", value_name = "CONNINFO")]
        pg: String,
        /// Label recorded in backup_label and the manifest.
        #[arg(long, default_value = "walferry")]
        label: String,
        /// Wait for a spread checkpoint instead of requesting an immediate one.
        #[arg(long)]
        spread_checkpoint: bool,
        /// Limit how fast the server reads and sends the data directory, e.g. 50M or
        /// 800k (bytes per second; 32k to 1G), to spare a busy server's disks.
        #[arg(long, value_name = "RATE", value_parser = parse_rate, conflicts_with = "pgdata")]
        max_rate: Option<u32>,
        /// Read the files from this directory, the server's data directory as mounted
        /// here, between pg_backup_start and pg_backup_stop instead of streaming them
        /// with BASE_BACKUP: several files are read at once, and files unchanged since the
        /// previous backup are not read again. Needs a role that may run pg_backup_start
        /// (superuser, or GRANT EXECUTE) and read access to the files.
        #[arg(long, env = "WALFERRY_PGDATA", value_name = "DIR")]
        pgdata: Option<PathBuf>,
    },
    /// archive_command-compatible: store one WAL file (segment, .partial, .history, .backup).
    ///
    /// archive_command = 'walferry-agent wal-push --repo URL --key-file FILE %p'. Pushing the
    /// same file twice succeeds; a different file under an archived name fails loudly.
    WalPush {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        key: KeyArgs,
        /// The WAL file (archive_command's %p).
        path: PathBuf,
    },
    /// List backups, WAL coverage per timeline and the restorable window(s).
    List {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        key: KeyArgs,
        /// Machine-readable output (schema in docs/list.md).
        #[arg(long)]
        json: bool,
    },
    /// Apply retention: delete the backups the policy lets go, then the packs and WAL only they needed.
    ///
    /// Keeps the newest N backups (--retain-full) and/or every backup a restore to any moment
    /// of the last --recovery-window needs; with both, a backup goes only when both let it
    /// go. WAL from the oldest kept backup's start on is never deleted. Packs no manifest
    /// references are deleted only once older than --pack-grace (a running backup writes
    /// its packs before its manifest). Deletes only while holding the repository's writer
    /// lease; refuses, naming the holder, while another writer holds it.
    Expire {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        key: KeyArgs,
        /// Keep the newest N backups (N >= 1).
        #[arg(long, env = "WALFERRY_RETAIN_FULL", value_name = "N")]
        retain_full: Option<usize>,
        /// Keep every moment of this last stretch of time restorable, e.g. 30d, 12h.
        #[arg(long, env = "WALFERRY_RECOVERY_WINDOW", value_name = "DURATION", value_parser = humantime::parse_duration)]
        recovery_window: Option<std::time::Duration>,
        /// Packs that no manifest references are deleted only when older than this.
        #[arg(long, default_value = "6h", value_name = "DURATION", value_parser = humantime::parse_duration)]
        pack_grace: std::time::Duration,
        /// Print what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// `run`'s settings; each may also come from the --config TOML file (same names, with
/// underscores), which flags and WALFERRY_* variables override.
#[derive(Args)]
struct RunArgs {
    /// TOML file with settings; unknown keys are errors.
    #[arg(long, env = "WALFERRY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Repository URL.
    #[arg(long, env = "WALFERRY_REPO", value_name = "URL")]
    repo: Option<String>,
    /// object_store option for the repository (repeatable).
    #[arg(long = "repo-option", value_name = "KEY=VALUE", value_parser = parse_option)]
    repo_options: Vec<(String, String)>,
    /// File holding the master key (mode 0600). Or set WALFERRY_KEY.
    #[arg(long, env = "WALFERRY_KEY_FILE", value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// libpq connection string or postgres:// URL (host lists, PGPASSWORD, .pgpass and sslmode work as in libpq).
    #[arg(long, env = "WALFERRY_PG", value_name = "CONNINFO")]
    pg: Option<String>,
    /// Physical replication slot (created if missing). Default: walferry.
    #[arg(long, env = "WALFERRY_SLOT")]
    slot: Option<String>,
    /// Longest time a received WAL byte may wait before upload. Default: 1s.
    #[arg(long, env = "WALFERRY_RPO", value_name = "DURATION")]
    rpo: Option<String>,
    /// Standby status update interval when nothing else moves. Default: 10s.
    #[arg(long, value_name = "DURATION")]
    status_interval: Option<String>,
    /// Serve /metrics, /health/live and /health/ready here, e.g. 127.0.0.1:9187.
    #[arg(long, env = "WALFERRY_LISTEN", value_name = "ADDR")]
    listen: Option<String>,
    /// /health/ready answers 503 once stored WAL lags the server by more than this. Default: 60s.
    #[arg(long, value_name = "DURATION")]
    ready_max_lag: Option<String>,
    /// Take a base backup this often, e.g. 24h.
    #[arg(
        long,
        env = "WALFERRY_BACKUP_EVERY",
        value_name = "DURATION",
        conflicts_with = "backup_cron"
    )]
    backup_every: Option<String>,
    /// Take base backups on a cron schedule (UTC), e.g. "0 3 * * *".
    #[arg(long, env = "WALFERRY_BACKUP_CRON", value_name = "EXPR")]
    backup_cron: Option<String>,
    /// Delay each scheduled backup by a random amount up to this. Default: 0s.
    #[arg(long, value_name = "DURATION")]
    backup_jitter: Option<String>,
    /// Scheduled backups read the files from this data directory (see `backup --pgdata`).
    #[arg(long, env = "WALFERRY_PGDATA", value_name = "DIR")]
    pgdata: Option<PathBuf>,
    /// Retention: keep this many newest backups.
    #[arg(long, env = "WALFERRY_RETAIN_FULL")]
    retain_full: Option<usize>,
    /// Retention: keep every moment of this period restorable, e.g. 30d.
    #[arg(long, env = "WALFERRY_RECOVERY_WINDOW", value_name = "DURATION")]
    recovery_window: Option<String>,
}

/// Where the repository is.
#[derive(Args)]
struct RepoArgs {
    /// Repository URL: file:///path, s3://bucket/prefix, az://container/prefix, gs://bucket/prefix.
    #[arg(long, env = "WALFERRY_REPO", value_name = "URL")]
    repo: String,
    /// object_store option for the repository, e.g. aws_endpoint=http://127.0.0.1:9000 (repeatable).
    /// Cloud stores also read AWS_*, AZURE_* and GOOGLE_* environment variables.
    #[arg(long = "repo-option", value_name = "KEY=VALUE", value_parser = parse_option)]
    repo_options: Vec<(String, String)>,
}

#[derive(Args)]
struct KeyArgs {
    /// File holding the master key (64 hex characters, mode 0600). Or set WALFERRY_KEY.
    #[arg(long, env = "WALFERRY_KEY_FILE", value_name = "FILE")]
    key_file: Option<PathBuf>,
}

fn parse_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// An error in how the command was called: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WALFERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Keygen { out } => keygen(out.as_deref()),
        Command::Init {
            repo,
            key,
            no_encryption,
            compression_level,
            block_size,
        } => init(repo, key, no_encryption, compression_level, block_size).await,
        Command::Run(args) => run(*args).await,
        Command::Backup {
            repo,
            key,
            pg,
            label,
            spread_checkpoint,
            max_rate,
            pgdata,
        } => {
            let conninfo = ConnInfo::parse(&pg).map_err(|e| UsageError(format!("--pg: {e}")))?;
            let master = load_master_key(&key)?;
            let r = Repository::open(&repo.repo, repo.repo_options)
                .context("open the repository URL")?;
            let location = r.location().to_string();
            let (units, config) = Units::load(r, master.as_ref())
                .await
                .with_context(|| format!("open the repository at {location}"))?;
            let req = walferry_agent::backup::BackupRequest {
                label,
                fast_checkpoint: !spread_checkpoint,
                max_rate_kb: max_rate,
                pgdata,
            };
            let progress = Progress::new();
            let m = walferry_agent::backup::take_leased(&units, &config, &conninfo, &req, "backup", &|b| {
                progress.update(b)
            })
            .await
            .map_err(|e| {
                progress.finish();
                anyhow::anyhow!(
                    "take a base backup: {e:#}\nNo backup was committed (no manifest was written). Once the cause is fixed, run `walferry-agent backup` again; blocks already stored are reused"
                )
            })?;
            progress.finish();
            let secs = m.stats.duration_ms as f64 / 1000.0;
            let total_blocks = m.stats.new_blocks + m.stats.reused_blocks;
            eprintln!(
                "backup {} done: {:.1} MB of data in {secs:.1}s ({:.0} MB/s); uploaded {:.1} MB in {} new blocks, reused {} of {} blocks ({:.0}% dedup), {} zero blocks{}; WAL {}..{} on timeline {}",
                m.id,
                m.stats.bytes as f64 / 1e6,
                m.stats.bytes as f64 / 1e6 / secs.max(0.001),
                m.stats.new_stored_bytes as f64 / 1e6,
                m.stats.new_blocks,
                m.stats.reused_blocks,
                total_blocks,
                if total_blocks == 0 { 0.0 } else { 100.0 * m.stats.reused_blocks as f64 / total_blocks as f64 },
                m.stats.zero_blocks,
                if m.stats.unread_bytes > 0 {
                    format!(
                        "; {:.1} MB in files unchanged since the previous backup not read again",
                        m.stats.unread_bytes as f64 / 1e6
                    )
                } else {
                    String::new()
                },
                m.start_lsn,
                m.end_lsn,
                m.timeline
            );
            println!("{}", m.id);
            Ok(())
        }
        Command::WalPush { repo, key, path } => {
            let units = open_units(repo, &key).await?;
            let outcome = walferry_agent::walpush::push(&units, &path).await?;
            tracing::info!(file = %path.display(), ?outcome, "archived");
            Ok(())
        }
        Command::List { repo, key, json } => {
            let units = open_units(repo, &key).await?;
            let view = walferry_formats::view::RepoView::load(&units)
                .await
                .context("read the repository")?;
            let report = walferry_agent::list::report(&view);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).context("encode JSON")?
                );
            } else {
                walferry_agent::list::print(&report);
            }
            Ok(())
        }
        Command::Expire {
            repo,
            key,
            retain_full,
            recovery_window,
            pack_grace,
            dry_run,
            json,
        } => {
            use walferry_agent::lease::{Lease, DEFAULT_TTL};
            use walferry_agent::retention::{self, RetentionPolicy};
            let policy = RetentionPolicy {
                retain_full,
                recovery_window,
            };
            policy.validate().map_err(UsageError)?;
            let units = open_units(repo, &key).await?;
            let plan = if dry_run {
                retention::load_plan(&units, &policy, pack_grace).await?
            } else {
                // Refused, naming the holder, while another writer holds it.
                let lease = Lease::acquire(units.repo(), "expire", DEFAULT_TTL).await?;
                let renewing = lease.keep_alive();
                let applied = retention::apply(&units, &policy, pack_grace, &lease).await;
                renewing.abort();
                if let Err(e) = lease.release().await {
                    tracing::warn!("release the writer lease (it expires by itself): {e}");
                }
                applied?
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&plan).context("encode JSON")?
                );
            } else {
                retention::print(&plan);
            }
            Ok(())
        }
    }
}

/// `run`: resolve settings (flags > WALFERRY_* > TOML), then stream, schedule and serve.
async fn run(args: RunArgs) -> anyhow::Result<()> {
    use walferry_agent::daemon::{self, duration, FileSettings, Schedule};
    let file = match &args.config {
        Some(p) => FileSettings::load(p).map_err(|e| UsageError(format!("{e:#}")))?,
        None => FileSettings::default(),
    };
    let usage = |e: anyhow::Error| anyhow::Error::new(UsageError(format!("{e:#}")));
    let pick = |flag: Option<String>, file: Option<String>| flag.or(file);
    let repo = pick(args.repo, file.repo).ok_or_else(|| {
        UsageError("--repo URL (or WALFERRY_REPO, or repo in --config) is required".into())
    })?;
    let pg = pick(args.pg, file.pg).ok_or_else(|| {
        UsageError("--pg CONNINFO (or WALFERRY_PG, or pg in --config) is required".into())
    })?;
    let mut repo_options: Vec<(String, String)> = file.repo_options.into_iter().collect();
    for (k, v) in args.repo_options {
        repo_options.retain(|(fk, _)| fk != &k);
        repo_options.push((k, v));
    }
    let key = KeyArgs {
        key_file: args.key_file.or(file.key_file),
    };
    let slot = pick(args.slot, file.slot).unwrap_or_else(|| "walferry".into());
    let rpo = duration(
        "--rpo",
        &pick(args.rpo, file.rpo).unwrap_or_else(|| "1s".into()),
    )
    .map_err(usage)?;
    let status_interval = duration(
        "--status-interval",
        &pick(args.status_interval, file.status_interval).unwrap_or_else(|| "10s".into()),
    )
    .map_err(usage)?;
    let ready_max_lag = duration(
        "--ready-max-lag",
        &pick(args.ready_max_lag, file.ready_max_lag).unwrap_or_else(|| "60s".into()),
    )
    .map_err(usage)?;
    let jitter = match pick(args.backup_jitter, file.backup_jitter) {
        Some(j) => humantime::parse_duration(&j)
            .map_err(|e| UsageError(format!("--backup-jitter: {e}")))?,
        None => std::time::Duration::ZERO,
    };
    let schedule = match (
        pick(args.backup_every, file.backup_every),
        pick(args.backup_cron, file.backup_cron),
    ) {
        (Some(_), Some(_)) => {
            return Err(UsageError("choose one of backup_every and backup_cron".into()).into())
        }
        (Some(e), None) => Some(Schedule::Every(
            duration("--backup-every", &e).map_err(usage)?,
        )),
        (None, Some(c)) => Some(Schedule::parse_cron(&c).map_err(usage)?),
        (None, None) => None,
    };
    let listen: Option<std::net::SocketAddr> = pick(args.listen, file.listen)
        .map(|l| {
            l.parse()
                .map_err(|e| UsageError(format!("--listen {l:?}: {e}")))
        })
        .transpose()?;
    let retain_full = args.retain_full.or(file.retain_full);
    let recovery_window = pick(args.recovery_window, file.recovery_window)
        .map(|w| duration("--recovery-window", &w).map_err(usage))
        .transpose()?;
    let conninfo = ConnInfo::parse(&pg).map_err(|e| UsageError(format!("--pg: {e}")))?;
    walferry_agent::pg::validate_slot_name(&slot)
        .map_err(|e| UsageError(format!("--slot: {e}")))?;

    let master = load_master_key(&key)?;
    let r = Repository::open(&repo, repo_options).context("open the repository URL")?;
    let location = r.location().to_string();
    let (units, config) = Units::load(r, master.as_ref())
        .await
        .with_context(|| format!("open the repository at {location}"))?;
    let metrics = std::sync::Arc::new(walferry_agent::metrics::Metrics::new(rpo));
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = listen {
        let (m, s) = (metrics.clone(), shutdown.clone());
        tasks.spawn(async move {
            if let Err(e) = daemon::serve_http(addr, m, ready_max_lag, s.clone()).await {
                tracing::error!("{e:#}");
                s.cancel();
            }
        });
    }
    let refresh: std::sync::Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync> = {
        let (u, m) = (units.clone(), metrics.clone());
        std::sync::Arc::new(move || {
            let (u, m) = (u.clone(), m.clone());
            Box::pin(async move { daemon::refresh_repo_gauges(&u, &m).await })
        })
    };
    let retention = (retain_full.is_some() || recovery_window.is_some()).then_some(
        walferry_agent::retention::RetentionPolicy {
            retain_full,
            recovery_window,
        },
    );
    if let Some(p) = &retention {
        p.validate().map_err(UsageError)?;
    }
    match schedule {
        Some(schedule) => {
            let job = daemon::BackupJob {
                units: units.clone(),
                config: config.clone(),
                conninfo: conninfo.clone(),
                schedule,
                jitter,
                pgdata: args.pgdata.clone().or(file.pgdata.clone()),
                retention,
                metrics: metrics.clone(),
                after: refresh.clone(),
            };
            tasks.spawn(daemon::backup_loop(job, shutdown.clone()));
        }
        None if retention.is_some() => tracing::warn!("retention is applied after scheduled backups; with no --backup-every/--backup-cron, run `walferry-agent expire` instead"),
        None => {}
    }
    {
        let (s, f) = (shutdown.clone(), refresh.clone());
        tasks.spawn(async move {
            loop {
                f().await;
                tokio::select! {
                    _ = s.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(600)) => {}
                }
            }
        });
    }
    let cfg = StreamConfig {
        conninfo,
        slot,
        archiver: ArchiverConfig {
            rpo,
            metrics: metrics.clone(),
            ..ArchiverConfig::default()
        },
        status_interval,
        max_backoff: std::time::Duration::from_secs(30),
    };
    let result = walferry_agent::stream::run(units, cfg, shutdown.clone()).await;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    match result? {
        Some(lsn) => tracing::info!(durable = %lsn, "exiting"),
        None => tracing::info!("exiting before streaming started"),
    }
    Ok(())
}

/// A byte counter: a progress bar on a terminal, a log line every few seconds otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last_log: std::sync::Mutex<std::time::Instant>,
    began: std::time::Instant,
}

impl Progress {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} backing up {bytes} ({bytes_per_sec}) {elapsed}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b
        });
        Progress {
            bar,
            last_log: std::sync::Mutex::new(std::time::Instant::now()),
            began: std::time::Instant::now(),
        }
    }

    fn update(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.set_position(bytes);
            return;
        }
        let Ok(mut last) = self.last_log.lock() else {
            return;
        };
        if last.elapsed() >= std::time::Duration::from_secs(5) {
            *last = std::time::Instant::now();
            let secs = self.began.elapsed().as_secs_f64();
            tracing::info!(
                "backed up {:.0} MB ({:.0} MB/s)",
                bytes as f64 / 1e6,
                bytes as f64 / 1e6 / secs.max(0.001)
            );
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// SIGTERM and SIGINT start a clean drain; a second signal is left to the default handling.
fn spawn_signal_handler(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: storing buffered WAL, then exiting"),
            _ = int.recv() => tracing::info!("SIGINT: storing buffered WAL, then exiting"),
        }
        token.cancel();
    });
    Ok(())
}

fn keygen(out: Option<&Path>) -> anyhow::Result<()> {
    let key = MasterKey::generate();
    let text = format!("{}\n", key.to_hex().as_str());
    match out {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| {
                    format!("create key file {} (it must not exist yet)", path.display())
                })?;
            f.write_all(text.as_bytes())
                .and_then(|()| f.sync_all())
                .with_context(|| format!("write key file {}", path.display()))?;
            eprintln!("wrote a new master key to {} (mode 0600). Keep a copy somewhere safe: without it no backup can be restored.", path.display());
        }
        None => {
            let stdout = std::io::stdout();
            if stdout.is_terminal() {
                return Err(UsageError(
                    "refusing to print a key to a terminal: redirect it (`walferry-agent keygen > FILE`) or use --out FILE".into(),
                )
                .into());
            }
            restrict_stdout_file()?;
            let mut lock = stdout.lock();
            lock.write_all(text.as_bytes())
                .and_then(|()| lock.flush())
                .context("write the key to stdout")?;
        }
    }
    Ok(())
}

/// When stdout is redirected to a regular file, make it private before the key goes in.
fn restrict_stdout_file() -> anyhow::Result<()> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::PermissionsExt;
    let fd = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .context("inspect stdout")?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().context("inspect stdout")?;
    if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .context("make the key file private (chmod 600)")?;
    }
    Ok(())
}

async fn init(
    repo: RepoArgs,
    key: KeyArgs,
    no_encryption: bool,
    level: i32,
    block_kib: u32,
) -> anyhow::Result<()> {
    let master = load_master_key(&key)?;
    match (&master, no_encryption) {
        (None, false) => {
            return Err(UsageError(
                "init needs a master key (--key-file FILE or WALFERRY_KEY; make one with `walferry-agent keygen --out FILE`), or --no-encryption".into(),
            )
            .into())
        }
        (Some(_), true) => {
            return Err(UsageError("--no-encryption was given together with a master key; choose one".into()).into())
        }
        _ => {}
    }
    if !(1..=22).contains(&level) {
        return Err(UsageError(format!(
            "--compression-level {level}: choose a zstd level from 1 to 22"
        ))
        .into());
    }
    if block_kib % 8 != 0 || !(8..=65536).contains(&block_kib) {
        return Err(UsageError(format!(
            "--block-size {block_kib}: choose a multiple of 8 KiB from 8 to 65536 (a PostgreSQL page is 8 KiB)"
        ))
        .into());
    }
    let config = RepoConfig::new(master.as_ref(), jiff::Timestamp::now().to_string())
        .with_layout(level, block_kib * 1024)
        .context("choose the repository layout")?;
    let r = Repository::open(&repo.repo, repo.repo_options).context("open the repository URL")?;
    let config = r
        .init_with(master.as_ref(), config)
        .await
        .with_context(|| format!("create a repository at {}", r.location()))?;
    println!(
        "created repository {} (id {}, {}, zstd level {}, block size {} KiB)",
        r.location(),
        config.repository_id,
        if config.is_encrypted() {
            "encrypted with AES-256-GCM"
        } else {
            "NOT encrypted"
        },
        config.compression.level,
        config.block_size / 1024
    );
    Ok(())
}

/// `--max-rate`: bytes per second with an optional k/M/G suffix (powers of 1024), as kB/s.
fn parse_rate(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let bytes = num
        .parse::<u64>()
        .map_err(|_| format!("{s:?} is not a rate such as 50M or 800k"))?
        .saturating_mul(mult);
    let kb = bytes / 1024;
    if !(32..=1_048_576).contains(&kb) {
        return Err(format!("{s}: choose from 32k to 1G per second"));
    }
    Ok(kb as u32)
}

/// Opens an existing repository with its keys.
async fn open_units(repo: RepoArgs, key: &KeyArgs) -> anyhow::Result<Units> {
    let master = load_master_key(key)?;
    let r = Repository::open(&repo.repo, repo.repo_options).context("open the repository URL")?;
    let location = r.location().to_string();
    let (units, _) = Units::load(r, master.as_ref())
        .await
        .with_context(|| format!("open the repository at {location}"))?;
    Ok(units)
}

fn load_master_key(args: &KeyArgs) -> anyhow::Result<Option<MasterKey>> {
    let env_key = std::env::var("WALFERRY_KEY").ok();
    MasterKey::resolve(args.key_file.as_deref(), env_key.as_deref()).context("load the master key")
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates_are_bytes_per_second_as_kb() {
        assert_eq!(parse_rate("50M"), Ok(50 * 1024));
        assert_eq!(parse_rate("800k"), Ok(800));
        assert_eq!(parse_rate("1G"), Ok(1 << 20));
        assert_eq!(parse_rate("32768"), Ok(32));
        assert!(parse_rate("31k").is_err());
        assert!(parse_rate("2G").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("").is_err());
    }
}
