//! walferry-agent: the writer side. Streams WAL, takes base backups, manages the repository.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use walferry_agent::archive::ArchiverConfig;
use walferry_agent::pg::ConnInfo;
use walferry_agent::stream::StreamConfig;
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
    },
    /// Run the sidecar: stream WAL through a physical replication slot into the repository.
    ///
    /// Reports to Postgres as flushed only what is durable in the repository, so the slot
    /// keeps every byte that is not. SIGTERM/SIGINT store what is buffered, report the
    /// final position and exit 0. (Scheduled backups, retention and /metrics are not built yet.)
    Run {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        key: KeyArgs,
        /// libpq connection string or postgres:// URL (host lists, PGPASSWORD, .pgpass and sslmode work as in libpq).
        #[arg(long, env = "WALFERRY_PG", value_name = "CONNINFO")]
        pg: String,
        /// Physical replication slot to use (created if missing).
        #[arg(long, env = "WALFERRY_SLOT", default_value = "walferry")]
        slot: String,
        /// Longest time a received WAL byte may wait before it is uploaded, e.g. 1s, 500ms.
        #[arg(long, env = "WALFERRY_RPO", default_value = "1s", value_parser = humantime::parse_duration)]
        rpo: std::time::Duration,
        /// How often to send standby status updates when nothing else moves.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        status_interval: std::time::Duration,
    },
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
    /// [not built yet] List backups, WAL coverage and the restorable window.
    List(Unbuilt),
    /// [not built yet] Apply retention: remove backups, WAL and packs no longer needed.
    Expire(Unbuilt),
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

/// Accepts and ignores the arguments of a command that is not built yet.
#[derive(Args)]
struct Unbuilt {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<String>,
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
        } => init(repo, key, no_encryption).await,
        Command::Run {
            repo,
            key,
            pg,
            slot,
            rpo,
            status_interval,
        } => {
            if rpo.is_zero() || status_interval.is_zero() {
                return Err(
                    UsageError("--rpo and --status-interval must be above zero".into()).into(),
                );
            }
            let conninfo = ConnInfo::parse(&pg).map_err(|e| UsageError(format!("--pg: {e}")))?;
            walferry_agent::pg::validate_slot_name(&slot)
                .map_err(|e| UsageError(format!("--slot: {e}")))?;
            let units = open_units(repo, &key).await?;
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone())?;
            let cfg = StreamConfig {
                conninfo,
                slot,
                archiver: ArchiverConfig {
                    rpo,
                    ..ArchiverConfig::default()
                },
                status_interval,
                max_backoff: std::time::Duration::from_secs(30),
            };
            let durable = walferry_agent::stream::run(units, cfg, shutdown).await?;
            match durable {
                Some(lsn) => tracing::info!(durable = %lsn, "exiting"),
                None => tracing::info!("exiting before streaming started"),
            }
            Ok(())
        }
        Command::Backup {
            repo,
            key,
            pg,
            label,
            spread_checkpoint,
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
            };
            let progress = Progress::new();
            let m = walferry_agent::backup::take(&units, &config, &conninfo, &req, &|b| {
                progress.update(b)
            })
            .await
            .context("take a base backup")?;
            progress.finish();
            let secs = m.stats.duration_ms as f64 / 1000.0;
            let total_blocks = m.stats.new_blocks + m.stats.reused_blocks;
            eprintln!(
                "backup {} done: {:.1} MB of data in {secs:.1}s ({:.0} MB/s); uploaded {:.1} MB in {} new blocks, reused {} of {} blocks ({:.0}% dedup), {} zero blocks; WAL {}..{} on timeline {}",
                m.id,
                m.stats.bytes as f64 / 1e6,
                m.stats.bytes as f64 / 1e6 / secs.max(0.001),
                m.stats.new_stored_bytes as f64 / 1e6,
                m.stats.new_blocks,
                m.stats.reused_blocks,
                total_blocks,
                if total_blocks == 0 { 0.0 } else { 100.0 * m.stats.reused_blocks as f64 / total_blocks as f64 },
                m.stats.zero_blocks,
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
        Command::List(_) => unbuilt("list", "sidecar operations"),
        Command::Expire(_) => unbuilt("expire", "sidecar operations"),
    }
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

fn unbuilt(name: &str, part: &str) -> anyhow::Result<()> {
    bail!("`walferry-agent {name}` is not built yet in this version (it arrives with {part}); nothing was done")
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

async fn init(repo: RepoArgs, key: KeyArgs, no_encryption: bool) -> anyhow::Result<()> {
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
    let r = Repository::open(&repo.repo, repo.repo_options).context("open the repository URL")?;
    let config = r
        .init(master.as_ref())
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
