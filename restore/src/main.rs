//! walferry-restore: the reader side. Rebuilds a cluster at a moment, serves WAL to
//! recovery, and verifies the repository.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use walferry_formats::keyring::MasterKey;
use walferry_formats::view::RepoView;
use walferry_formats::{Repository, Units};
use walferry_restore::plan::{self, Target};
use walferry_restore::{materialize, recovery, walfetch};

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
        /// On a miss, also fetch this many following segments in parallel (0 turns it off).
        #[arg(long, default_value_t = 4)]
        prefetch: u64,
    },
    /// Check integrity and print the restorable window(s); exit 1 on damage.
    ///
    /// Without a key: checksums and framing of every object. With the key (shallow): also
    /// manifests, trailers, index and histories authenticated, every referenced block where
    /// its manifest says, WAL continuous from every backup. --deep: also decrypt,
    /// decompress and rehash every block and open every WAL object. With the key, objects
    /// verified by an earlier run (recorded under verify/) are not read again; --full
    /// reads everything. See docs/verify.md.
    Verify {
        #[command(flatten)]
        repo: RepoArgs,
        /// Also decrypt, decompress and rehash every block and open every WAL object (needs the key).
        #[arg(long)]
        deep: bool,
        /// Machine-readable output (stable schema, docs/verify.md).
        #[arg(long)]
        json: bool,
        /// Read every object, not only those no earlier run verified.
        #[arg(long)]
        full: bool,
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
    /// Extra server setting for the restored cluster, e.g. port=5433 (repeatable; goes to postgresql.auto.conf).
    #[arg(long = "pg-option", value_name = "KEY=VALUE")]
    pg_options: Vec<String>,
    /// With --start: give up waiting for recovery after this long.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    start_timeout: std::time::Duration,
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
    /// The master key (if any) and the repository, from the flags and WALFERRY_KEY.
    fn key_and_repository(&self) -> anyhow::Result<(Option<MasterKey>, Repository)> {
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
        Ok((master, r))
    }

    async fn open(&self) -> anyhow::Result<Units> {
        let (master, r) = self.key_and_repository()?;
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
        Some(Command::WalFetch {
            repo,
            name,
            dest,
            prefetch,
        }) => {
            // A prefetched segment needs neither the repository nor the key.
            let cache = dest.parent().map(|p| p.join(walfetch::PREFETCH_DIR));
            if cache.is_some_and(|c| walfetch::take_prefetched(&c, &name, &dest)) {
                return Ok(Outcome::Done);
            }
            let units = repo.open().await?;
            match walfetch::fetch(&units, &name, &dest, prefetch).await? {
                walfetch::Fetched::Found(_) => Ok(Outcome::Done),
                walfetch::Fetched::NotFound => {
                    eprintln!("{name}: not in the repository");
                    Ok(Outcome::NotFound)
                }
            }
        }
        Some(Command::Verify {
            repo,
            deep,
            json,
            full,
        }) => {
            use walferry_restore::verify;
            // verify opens the store itself: without a key it reads an encrypted
            // repository's framing only.
            let (master, r) = repo.key_and_repository()?;
            let report =
                match verify::verify(r, master.as_ref(), &verify::Options { deep, full }).await {
                    Ok(r) => r,
                    Err(verify::VerifyError::Usage(m)) => return Err(UsageError(m).into()),
                    Err(verify::VerifyError::Failed(e)) => return Err(e),
                };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).context("encode the report")?
                );
            } else {
                print!("{}", report.to_text());
            }
            // Damage found: exit 1, like a failure, with the report already printed.
            Ok(if report.ok {
                Outcome::Done
            } else {
                Outcome::NotFound
            })
        }
        None => restore(cli.restore).await,
    }
}

fn key_value(flag: &str, s: &str) -> Result<(String, String), UsageError> {
    match s.split_once('=') {
        // An empty value is legitimate for --pg-option (listen_addresses=), not for a map.
        Some((k, v)) if !k.is_empty() && (flag == "--pg-option" || !v.is_empty()) => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(UsageError(format!("{flag}: expected KEY=VALUE, got {s:?}"))),
    }
}

/// Parses and checks everything the user typed before touching the network or the disk.
fn parse_target(args: &RestoreArgs) -> Result<Target, UsageError> {
    if let Some(to) = &args.to {
        if to == "latest" {
            return Ok(Target::Latest);
        }
        return walferry_formats::target::parse_time(to)
            .map(Target::Time)
            .map_err(|e| UsageError(format!("--to: {e}")));
    }
    if let Some(l) = &args.to_lsn {
        return l
            .parse()
            .map(Target::Lsn)
            .map_err(|e| UsageError(format!("--to-lsn: {e}")));
    }
    if let Some(x) = args.to_xid {
        return Ok(Target::Xid(x));
    }
    if let Some(n) = &args.to_name {
        return Ok(Target::Name(n.clone()));
    }
    Err(UsageError(
        "choose a target: --to TIME|latest, --to-lsn, --to-xid or --to-name".into(),
    ))
}

async fn restore(args: RestoreArgs) -> anyhow::Result<Outcome> {
    let target = parse_target(&args)?;
    let Some(repo) = args.repo.as_ref() else {
        return Err(UsageError("--repo URL (or WALFERRY_REPO) is required".into()).into());
    };
    let pgdata = args
        .pgdata
        .clone()
        .ok_or_else(|| UsageError("--pgdata DIR is required".into()))?;
    let pgdata = std::path::absolute(&pgdata).context("resolve --pgdata")?;
    let mut ts_map = std::collections::BTreeMap::new();
    for m in &args.tablespace_map {
        let (oid, dir) = key_value("--tablespace-map", m)?;
        let oid: u32 = oid.parse().map_err(|_| {
            UsageError(format!("--tablespace-map: {oid:?} is not a tablespace OID"))
        })?;
        ts_map.insert(
            oid,
            std::path::absolute(dir).context("resolve --tablespace-map")?,
        );
    }
    let pg_options = args
        .pg_options
        .iter()
        .map(|o| key_value("--pg-option", o))
        .collect::<Result<Vec<_>, _>>()?;
    if !args.dry_run {
        materialize::check_target(&pgdata, args.delta)?;
        for d in ts_map.values() {
            materialize::check_target(d, args.delta)?;
        }
    }

    let units = repo.open().await?;
    let view = match RepoView::load(&units).await {
        Ok(v) => v,
        Err(e) if e.is_corruption() => {
            let way_out = match &e {
                walferry_formats::Error::At { key, .. } if key.starts_with("backups/") => format!(
                    "That backup cannot be used, and restore trusts no backup while a damaged manifest is listed: move {key} out of backups/ to restore from the other backups"
                ),
                _ => "Restore from a copy of the repository".to_string(),
            };
            anyhow::bail!(
                "read the repository: {e}. The repository is damaged; nothing was written. {way_out}. `walferry-restore verify` lists every damaged object."
            );
        }
        Err(e) => return Err(anyhow::Error::new(e).context("read the repository")),
    };
    let plan = plan::plan(&view, &target, args.backup.as_deref()).context("plan the restore")?;
    let manifest = &view.backups[plan.backup_index];
    if let Err(e) = plan::check_packs(&units, manifest).await {
        anyhow::bail!(
            "plan the restore: {e:#}. {}",
            plan::other_backups(&view, &plan)
        );
    }
    println!("restore plan:");
    println!("  target:      {}", plan.target);
    println!(
        "  backup:      {} (started {}, finished {}, WAL {}..{})",
        manifest.id,
        manifest.started_at,
        manifest.finished_at,
        manifest.start_lsn,
        manifest.end_lsn
    );
    println!("  timeline:    {}", plan.timeline);
    println!(
        "  WAL needed:  {}..{} ({} segments)",
        plan.wal_start,
        plan.wal_end,
        plan.segments.len()
    );
    println!(
        "  to fetch:    {:.1} MB of backup data, {:.1} MB on disk",
        plan.bytes_to_fetch as f64 / 1e6,
        manifest.stats.bytes as f64 / 1e6
    );
    match plan.window {
        Some((a, b)) => {
            println!("  restorable:  any moment from {a} up to (not including) {b}, or latest")
        }
        None => println!("  restorable:  latest only (no commit after a backup yet)"),
    }
    if args.dry_run {
        println!("dry run: nothing was written");
        return Ok(Outcome::Done);
    }

    let began = std::time::Instant::now();
    let opts = materialize::Options {
        pgdata: pgdata.clone(),
        tablespace_map: ts_map,
        delta: args.delta,
    };
    let stats = match materialize::materialize(&units, manifest, &opts).await {
        Ok(s) => s,
        Err(e) => {
            let damaged = e.chain().any(|c| {
                c.downcast_ref::<walferry_formats::Error>()
                    .is_some_and(|f| f.is_corruption() || f.is_not_found())
            });
            let left = if args.delta {
                format!(
                    "{} is incomplete and cannot be started (global/pg_control was removed); run the restore again",
                    pgdata.display()
                )
            } else {
                format!("nothing was left in {}", pgdata.display())
            };
            let e = e.context(format!(
                "restore backup {} into {}",
                manifest.id,
                pgdata.display()
            ));
            if damaged {
                anyhow::bail!(
                    "{e:#}\nThe backup is damaged; {left}. {}",
                    plan::other_backups(&view, &plan)
                );
            }
            anyhow::bail!("{e:#}\n{left}");
        }
    };
    let secs = began.elapsed().as_secs_f64();
    println!(
        "restored {} files ({:.1} MB) into {} in {secs:.1}s ({:.0} MB/s){}",
        stats.files,
        stats.bytes_written as f64 / 1e6,
        pgdata.display(),
        stats.bytes_written as f64 / 1e6 / secs.max(0.001),
        if args.delta {
            format!(", {} blocks reused", stats.blocks_reused)
        } else {
            String::new()
        }
    );
    let fetch = recovery::FetchCommand {
        exe: std::env::current_exe().context("find the walferry-restore binary")?,
        repo: repo.repo.clone(),
        repo_options: repo.repo_options.clone(),
        key_file: repo
            .key_file
            .as_ref()
            .map(std::path::absolute)
            .transpose()
            .context("resolve --key-file")?,
    };
    let was_standby = recovery::write_settings(&pgdata, &plan, &fetch, &pg_options)
        .context("write the recovery settings")?;
    if was_standby {
        println!(
            "the backup was taken on a standby: removed its standby.signal, so the restored cluster promotes at the target instead of following the old primary"
        );
    }
    if fetch.key_file.is_none() && std::env::var_os("WALFERRY_KEY").is_some() {
        eprintln!("note: restore_command has no --key-file; the server needs WALFERRY_KEY in its environment");
    }
    if !args.start {
        println!(
            "recovery is configured; start PostgreSQL on {} to replay WAL to the target",
            pgdata.display()
        );
        return Ok(Outcome::Done);
    }
    let dirs: Vec<std::path::PathBuf> = opts
        .tablespace_map
        .values()
        .cloned()
        .chain(
            manifest
                .tablespaces
                .iter()
                .filter(|t| !opts.tablespace_map.contains_key(&t.oid))
                .map(|t| std::path::PathBuf::from(&t.location)),
        )
        .collect();
    let cache = pgdata.join("pg_wal").join(walfetch::PREFETCH_DIR);
    walfetch::mark_supervised(&cache).with_context(|| format!("create {}", cache.display()))?;
    let pgdata2 = pgdata.clone();
    let owner = tokio::task::spawn_blocking(move || recovery::hand_over(&pgdata2, &dirs))
        .await
        .context("hand the data directory to the server's user")??;
    // Fetches the planned WAL while the server replays it.
    let prefetching = tokio::spawn(walfetch::prefetch_planned(
        units.clone(),
        plan.segments.clone(),
        cache.clone(),
        owner,
    ));
    let pgdata2 = pgdata.clone();
    let timeout = args.start_timeout;
    let reached =
        tokio::task::spawn_blocking(move || recovery::start_and_follow(&pgdata2, timeout))
            .await
            .context("recovery supervisor");
    prefetching.abort();
    let _ = prefetching.await;
    let _ = std::fs::remove_dir_all(&cache);
    let reached = reached??;
    for l in &reached.log_summary {
        println!("{l}");
    }
    println!(
        "recovery complete: last replayed commit {}, at LSN {}; the cluster is running on {}",
        reached.last_commit.as_deref().unwrap_or("(none)"),
        reached.last_lsn.as_deref().unwrap_or("(unknown)"),
        pgdata.display()
    );
    Ok(Outcome::Done)
}
