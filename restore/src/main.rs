//! walferry-restore: the reader side. Rebuilds a cluster at a moment, serves WAL to
//! recovery, and verifies the repository.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use walferry_formats::keyring::MasterKey;
use walferry_formats::{Repository, Units};
use walferry_restore::walfetch;

const AFTER_HELP: &str = "\
Examples:
  walferry-restore --repo s3://bucket/db1 --to '2026-11-23 02:59:30+00' --pgdata /var/lib/pg --start
  walferry-restore --repo s3://bucket/db1 --to latest --pgdata /var/lib/pg --dry-run
  walferry-restore verify --repo s3://bucket/db1 --json

--to accepts RFC 3339 and YYYY-MM-DD HH:MM:SS[.ffffff]±TZ; a time without a zone is an error.
The master key comes from --key-file / WALFERRY_KEY_FILE or WALFERRY_KEY.

Exit codes: 0 success, 1 failure or damage found, 2 usage error.";

#[derive(Parser)]
#[command(
    name = "walferry-restore",
    version,
    about = "Rebuild a PostgreSQL cluster at a chosen moment from a walferry repository",
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    restore: RestoreArgs,
}

#[derive(Subcommand)]
enum Command {
    /// restore_command-compatible: fetch one WAL file into DEST.
    ///
    /// restore_command = 'walferry-restore wal-fetch --repo URL --key-file FILE %f %p'.
    /// Exit 0 found, 1 not found (normal at the end of WAL), 2 usage, 3 any real error
    /// (unreadable repository, damaged object, wrong key).
    WalFetch {
        #[command(flatten)]
        repo: RepoArgs,
        /// WAL file name, e.g. 000000010000000A0000003F or 00000002.history
        name: String,
        /// Where to write it (restore_command's %p)
        dest: PathBuf,
    },
    /// [not built yet] Check integrity and print the restorable window(s); exit 1 on damage.
    Verify {
        #[command(flatten)]
        repo: RepoArgs,
        /// Also decrypt, decompress and rehash every block (needs the key).
        #[arg(long)]
        deep: bool,
        /// Machine-readable output (stable schema).
        #[arg(long)]
        json: bool,
    },
}

/// Restore a cluster (the default command).
#[derive(Args)]
#[group(id = "target", multiple = false, required = true)]
struct RestoreArgs {
    #[command(flatten)]
    repo: Option<RepoArgs>,
    /// Target time (RFC 3339 or YYYY-MM-DD HH:MM:SS[.ffffff]±TZ), or `latest`.
    #[arg(long, group = "target", value_name = "TIME|latest")]
    to: Option<String>,
    /// Target LSN, e.g. 16/B374D848.
    #[arg(long, group = "target", value_name = "LSN")]
    to_lsn: Option<String>,
    /// Target transaction id.
    #[arg(long, group = "target", value_name = "XID")]
    to_xid: Option<u32>,
    /// Target restore point name (pg_create_restore_point).
    #[arg(long, group = "target", value_name = "NAME")]
    to_name: Option<String>,
    /// Data directory to create (must be empty or absent, unless --delta).
    #[arg(long, value_name = "DIR", required = true)]
    pgdata: Option<PathBuf>,
    /// Start Postgres after restoring and follow recovery to the target.
    #[arg(long)]
    start: bool,
    /// Restore from this backup instead of the newest one before the target.
    #[arg(long, value_name = "ID")]
    backup: Option<String>,
    /// Reuse files in a non-empty --pgdata whose blocks already match.
    #[arg(long)]
    delta: bool,
    /// Print the plan (backup, WAL range, bytes, restorable window) and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Put tablespace OID somewhere else: OID=DIR (repeatable).
    #[arg(long, value_name = "OID=DIR")]
    tablespace_map: Vec<String>,
}

#[derive(Args)]
struct RepoArgs {
    /// Repository URL: file:///path, s3://bucket/prefix, az://container/prefix, gs://bucket/prefix.
    #[arg(long, env = "WALFERRY_REPO", value_name = "URL", required = false)]
    repo: String,
    /// object_store option for the repository, KEY=VALUE (repeatable).
    #[arg(long = "repo-option", value_name = "KEY=VALUE")]
    repo_options: Vec<String>,
    /// File holding the master key (mode 0600). Or set WALFERRY_KEY.
    #[arg(long, env = "WALFERRY_KEY_FILE", value_name = "FILE")]
    key_file: Option<PathBuf>,
}

impl RepoArgs {
    async fn open(&self) -> anyhow::Result<Units> {
        let env_key = std::env::var("WALFERRY_KEY").ok();
        let master = MasterKey::resolve(self.key_file.as_deref(), env_key.as_deref())
            .context("load the master key")?;
        let options = self
            .repo_options
            .iter()
            .map(|o| match o.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => Err(UsageError(format!(
                    "--repo-option: expected KEY=VALUE, got {o:?}"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let r = Repository::open(&self.repo, options).context("open the repository URL")?;
        let location = r.location().to_string();
        let (units, _) = Units::load(r, master.as_ref())
            .await
            .with_context(|| format!("open the repository at {location}"))?;
        Ok(units)
    }
}

/// An error in how the command was called: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// What a command found: for wal-fetch, "not found" is exit 1 but not an error.
enum Outcome {
    Done,
    NotFound,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let wal_fetch = matches!(cli.command, Some(Command::WalFetch { .. }));
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::NotFound) => ExitCode::FAILURE,
        Err(e) if wal_fetch && e.downcast_ref::<UsageError>().is_none() => {
            eprintln!("error: {e:#}");
            ExitCode::from(3)
        }
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

async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    match cli.command {
        Some(Command::WalFetch { repo, name, dest }) => {
            let units = repo.open().await?;
            match walfetch::fetch(&units, &name, &dest).await? {
                walfetch::Fetched::Found(_) => Ok(Outcome::Done),
                walfetch::Fetched::NotFound => {
                    eprintln!("{name}: not in the repository");
                    Ok(Outcome::NotFound)
                }
            }
        }
        Some(Command::Verify { .. }) => unbuilt("verify", "sidecar operations"),
        None => {
            let args = cli.restore;
            if let Some(to) = args.to.as_deref().filter(|t| *t != "latest") {
                walferry_formats::target::parse_time(to)
                    .map_err(|e| UsageError(format!("--to: {e}")))?;
            }
            if let Some(lsn) = &args.to_lsn {
                lsn.parse::<walferry_formats::Lsn>()
                    .map_err(|e| UsageError(format!("--to-lsn: {e}")))?;
            }
            if args.repo.is_none() {
                return Err(UsageError("--repo URL (or WALFERRY_REPO) is required".into()).into());
            }
            unbuilt("restore", "base backups and point-in-time restore")
        }
    }
}

fn unbuilt(name: &str, part: &str) -> anyhow::Result<Outcome> {
    bail!("`walferry-restore {name}` is not built yet in this version (it arrives with {part}); nothing was written")
}
