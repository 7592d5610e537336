//! walferry-restore: the reader side. Rebuilds a cluster at a moment, serves WAL to
//! recovery, and verifies the repository.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};

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
    /// [not built yet] restore_command-compatible: fetch one WAL file into DEST (exit 0 found, 1 not found).
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

/// An error in how the command was called: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::WalFetch { .. }) => unbuilt("wal-fetch", "WAL streaming"),
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

fn unbuilt(name: &str, part: &str) -> anyhow::Result<()> {
    bail!("`walferry-restore {name}` is not built yet in this version (it arrives with {part}); nothing was written")
}
