//! `walferry-restore verify`: proves that a repository can still restore, names every
//! damaged or missing object with what it breaks, and prints the restorable window(s).
//!
//! Three levels (see docs/verify.md for the exact guarantees and the JSON schema):
//! - **without the key** (encrypted repository, no `--key-file`): every object's framing
//!   and crc32; packs are split into their envelopes by their checksums; WAL is checked
//!   for holes by name. Manifests, the index and histories are encrypted, so which backups
//!   a damaged object breaks, and the windows, are unknown.
//! - **shallow** (with the key): manifests, trailers, index entries and histories are
//!   opened (authenticated); every block's envelope (at its trailer offset) and every WAL
//!   object passes its crc32 and header checks; every block a manifest references is
//!   where the manifest says; WAL is continuous from every backup's start to the end of
//!   the stored WAL along each timeline path.
//! - **deep** (`--deep`, key required): also decrypts, decompresses and rehashes every
//!   block, and opens every WAL object.
//!
//! With the key, each run stores an authenticated record (`verify/<time>.json`, an
//! envelope of kind `Record`) of the immutable objects it verified; the next run does not
//! read them again unless their listed size or ETag changed. `--full` reads everything.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use walferry_formats::backup::{
    parse_trailer, trailer_from_tail, BackupManifest, BlockId, BlockRef,
};
use walferry_formats::config::{RepoConfig, CONFIG_KEY};
use walferry_formats::envelope::{
    self, Cipher, Kind, CRC_LEN, FORMAT_VERSION, HEADER_LEN, MAGIC, TAG_LEN,
};
use walferry_formats::keyring::MasterKey;
use walferry_formats::layout::{
    history_key, parse_wal_key, parts_prefix, segment_key, ClusterBinding, WalObject, CLUSTER_KEY,
};
use walferry_formats::view::{on_path, parse_history};
use walferry_formats::walcatalog::TimelineWal;
use walferry_formats::walreader::WalSummary;
use walferry_formats::{
    Error as FmtError, Lsn, Repository, RetryPolicy, SegmentNo, SegmentSize, TimelineId, Units,
};

/// Version of the JSON report and of the stored verify record.
pub const REPORT_FORMAT: u32 = 1;
const STATE_FORMAT: u32 = 1;
const STATE_PREFIX: &str = "verify/";
/// Verify records kept after a run (older ones are deleted).
const STATES_KEPT: usize = 3;
/// Bytes fetched from the end of an already verified pack to re-read its trailer.
const TAIL_GUESS: u64 = 256 << 10;
const PACKS_IN_FLIGHT: usize = 4;
const WAL_IN_FLIGHT: usize = 8;
const SMALL_IN_FLIGHT: usize = 16;
/// Manifests are read whole and can be large (one reference per block).
const MANIFESTS_IN_FLIGHT: usize = 4;

/// What to check.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Decrypt, decompress and rehash every block; open every WAL object.
    pub deep: bool,
    /// Ignore the record of earlier runs: read every object.
    pub full: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The command cannot run as asked (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The repository could not be read at all (exit 1).
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

// ---------------------------------------------------------------------------------------
// The report (JSON schema: docs/verify.md)

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Report {
    pub format: u32,
    pub ok: bool,
    pub repository: String,
    pub mode: Mode,
    pub checked: Checked,
    pub damaged: Vec<Damage>,
    pub backups: Vec<BackupStatus>,
    pub windows: Vec<Window>,
    /// The verify record this run stored, if any.
    pub record: Option<String>,
    pub notes: Vec<String>,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mode {
    pub deep: bool,
    /// Whether the contents could be read (the key was given, or the repository is unencrypted).
    pub key: bool,
    /// Whether objects verified by an earlier run were trusted instead of read.
    pub incremental: bool,
    /// The record of the earlier run this one built on.
    pub since: Option<String>,
}

/// What this run read. `skipped` objects were verified by an earlier run, are unchanged
/// (same size and ETag) and were not read again.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checked {
    pub objects: u64,
    pub bytes: u64,
    pub skipped: u64,
    pub manifests: u64,
    pub packs: u64,
    pub blocks: u64,
    pub trailers: u64,
    pub wal_segments: u64,
    pub wal_parts: u64,
    pub wal_index: u64,
    pub histories: u64,
    pub other: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Damage {
    pub object: String,
    /// `missing`, `corrupt` (bytes fail a check) or `inconsistent` (intact, but not what
    /// the objects referring to it say).
    pub status: String,
    pub problem: String,
    pub affects: Affects,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Affects {
    /// Backups that can no longer be restored at all.
    pub backups: Vec<String>,
    /// Time ranges that were restorable without this damage and no longer are.
    pub window: Vec<Window>,
    /// walferry-restore reads this object to plan any restore: until it is repaired or
    /// removed, every restore fails.
    pub every_restore: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Window {
    pub timeline: u32,
    pub from: String,
    pub to: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupStatus {
    pub id: String,
    pub timeline: u32,
    pub start_lsn: String,
    pub end_lsn: String,
    pub finished_at: String,
    pub restorable: bool,
}

// ---------------------------------------------------------------------------------------
// The stored record of verified objects

#[derive(Serialize, Deserialize)]
struct State {
    format: u32,
    repository_id: String,
    written_at: String,
    objects: BTreeMap<String, Verified>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Verified {
    /// Size and ETag (or modification time) when it was verified.
    fp: String,
    deep: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<serde_json::Value>,
}

/// What a run needs from a manifest once it is verified.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct BackupInfo {
    id: String,
    timeline: TimelineId,
    end_timeline: TimelineId,
    start_lsn: Lsn,
    end_lsn: Lsn,
    finished_at: String,
    system_identifier: String,
    packs: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// Listing

#[derive(Clone, Debug)]
struct Listed {
    key: String,
    size: u64,
    fp: String,
}

/// Lists every object with its size and ETag (for the incremental record).
async fn list_all(repo: &Repository) -> Result<Vec<Listed>, FmtError> {
    let (store, root) = repo.store();
    let root_s = root.as_ref().to_string();
    let prefix = (!root_s.is_empty()).then(|| root.clone());
    let metas = RetryPolicy::default()
        .run(|| async {
            store
                .list(prefix.as_ref())
                .try_collect::<Vec<_>>()
                .await
                .map_err(|source| FmtError::Store {
                    op: "list",
                    key: String::new(),
                    source,
                })
        })
        .await?;
    let mut out: Vec<Listed> = metas
        .into_iter()
        .map(|m| {
            let full = m.location.as_ref();
            let key = if root_s.is_empty() {
                full.to_string()
            } else {
                full.strip_prefix(root_s.as_str())
                    .map(|r| r.trim_start_matches('/'))
                    .unwrap_or(full)
                    .to_string()
            };
            let tag = m
                .e_tag
                .clone()
                .unwrap_or_else(|| m.last_modified.timestamp_micros().to_string());
            Listed {
                key,
                size: m.size,
                fp: format!("{}:{tag}", m.size),
            }
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Damage and what it does

/// What a damaged or missing object takes away (used to work out what it breaks).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Effect {
    None,
    /// Blocks of a pack are unusable; None = the whole pack.
    Blocks {
        pack: String,
        offsets: Option<BTreeSet<u64>>,
    },
    /// A backup cannot be restored (its manifest is unreadable or wrong).
    Backup {
        id: String,
    },
    /// A sealed segment is unusable or missing.
    Sealed {
        tli: TimelineId,
        segno: SegmentNo,
    },
    /// A streamed part is unusable.
    Part {
        tli: TimelineId,
        segno: SegmentNo,
        from: u64,
        to: u64,
    },
    /// A timeline history is missing or unreadable.
    History {
        tli: TimelineId,
    },
}

#[derive(Clone, Debug)]
struct Found {
    object: String,
    status: &'static str,
    problem: String,
    effect: Effect,
    every_restore: bool,
}

impl Found {
    fn new(object: &str, status: &'static str, problem: impl Into<String>) -> Found {
        Found {
            object: object.to_string(),
            status,
            problem: problem.into(),
            effect: Effect::None,
            every_restore: false,
        }
    }
    fn effect(mut self, e: Effect) -> Found {
        self.effect = e;
        self
    }
    fn every_restore(mut self) -> Found {
        self.every_restore = true;
        self
    }
}

fn status_of(e: &FmtError) -> &'static str {
    if e.is_not_found() {
        "missing"
    } else {
        "corrupt"
    }
}

const PLANNING: &str =
    "walferry-restore reads it to plan any restore, so every restore fails until it is repaired or removed";

// ---------------------------------------------------------------------------------------
// The run

/// What one run accumulates (shared by concurrent checks).
#[derive(Default)]
struct Acc {
    checked: Checked,
    found: Vec<Found>,
    verified: BTreeMap<String, Verified>,
}

struct Run {
    repo: Repository,
    units: Option<Units>,
    encrypted: bool,
    deep: bool,
    size: SegmentSize,
    previous: BTreeMap<String, Verified>,
    acc: Mutex<Acc>,
}

impl Run {
    fn with<T>(&self, f: impl FnOnce(&mut Acc) -> T) -> T {
        let mut g = self.acc.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    fn found(&self, f: Found) {
        self.with(|a| a.found.push(f));
    }

    /// The earlier run's record of `o`, if it is unchanged and verified deeply enough.
    fn cached(&self, o: &Listed) -> Option<Verified> {
        self.previous
            .get(&o.key)
            .filter(|v| v.fp == o.fp && (v.deep || !self.deep))
            .cloned()
    }

    /// Trusts an earlier verification of `o`: counts it as skipped and carries it over.
    fn skip(&self, o: &Listed, v: Verified) {
        self.with(|a| {
            a.checked.skipped += 1;
            a.verified.insert(o.key.clone(), v);
        });
    }

    fn verified(&self, o: &Listed, data: Option<serde_json::Value>) {
        let v = Verified {
            fp: o.fp.clone(),
            deep: self.deep,
            data,
        };
        self.with(|a| a.verified.insert(o.key.clone(), v));
    }

    async fn get(&self, key: &str) -> Result<Bytes, FmtError> {
        let b = self.repo.get(key).await?;
        self.with(|a| {
            a.checked.objects += 1;
            a.checked.bytes += b.len() as u64;
        });
        Ok(b)
    }

    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes, FmtError> {
        let b = self.repo.get_range(key, range).await?;
        self.with(|a| a.checked.bytes += b.len() as u64);
        Ok(b)
    }

    fn units(&self) -> &Units {
        self.units.as_ref().expect("called only with the key")
    }

    /// Framing, crc32, kind, cipher and (when known) plaintext length, without a key.
    fn check_unit(&self, bytes: &[u8], kind: Kind, plain_len: Option<u64>) -> Result<(), String> {
        check_unit(bytes, kind, plain_len, self.encrypted)
    }

    /// Shallow: [`Self::check_unit`]; deep: also open it.
    async fn check_or_open(
        &self,
        key: &str,
        bytes: Bytes,
        kind: Kind,
        plain_len: Option<u64>,
    ) -> Result<(), String> {
        self.check_unit(&bytes, kind, plain_len)?;
        if self.deep {
            let plain = self
                .units()
                .open(key, kind, bytes)
                .await
                .map_err(|e| e.to_string())?;
            if let Some(n) = plain_len {
                if plain.len() as u64 != n {
                    return Err(format!("opens to {} bytes, expected {n}", plain.len()));
                }
            }
        }
        Ok(())
    }
}

fn check_unit(
    bytes: &[u8],
    kind: Kind,
    plain_len: Option<u64>,
    encrypted: bool,
) -> Result<(), String> {
    let h = envelope::check(bytes).map_err(|e| e.to_string())?;
    if h.kind != kind {
        return Err(format!("object is a {:?}, expected a {kind:?}", h.kind));
    }
    match (encrypted, h.cipher) {
        (true, Cipher::None) => {
            return Err("object is not encrypted, but this repository requires encryption".into())
        }
        (false, Cipher::Aes256Gcm) => {
            return Err("object is encrypted, but this repository is not".into())
        }
        _ => {}
    }
    if let Some(n) = plain_len {
        if h.plaintext_len != n {
            return Err(format!(
                "header declares {} bytes of plaintext, expected {n}",
                h.plaintext_len
            ));
        }
    }
    Ok(())
}

/// What a listed key is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Class {
    Config,
    Cluster,
    DataKey,
    Manifest(String),
    Pack,
    Wal(WalObject),
    Record,
    Other,
}

fn classify(key: &str, size: SegmentSize) -> Class {
    if key == CONFIG_KEY {
        return Class::Config;
    }
    if key == CLUSTER_KEY {
        return Class::Cluster;
    }
    if key.starts_with("keys/") {
        return Class::DataKey;
    }
    if key.starts_with(STATE_PREFIX) {
        return Class::Record;
    }
    if let Some(id) = key
        .strip_prefix("backups/")
        .and_then(|r| r.strip_suffix(".manifest"))
    {
        return Class::Manifest(id.to_string());
    }
    if key.starts_with("packs/") {
        return Class::Pack;
    }
    match parse_wal_key(key, size) {
        Some(w) => Class::Wal(w),
        None => Class::Other,
    }
}

/// Verifies the repository. Reads only; writes nothing but its own record under `verify/`
/// (with the key, for encrypted repositories).
pub async fn verify(
    repo: Repository,
    master: Option<&MasterKey>,
    opts: &Options,
) -> Result<Report, VerifyError> {
    let began = Instant::now();
    let location = repo.location().to_string();
    let config: RepoConfig = repo
        .config()
        .await
        .map_err(|e| anyhow::Error::new(e).context("read walferry.json"))?;
    let encrypted = config.is_encrypted();
    let keyed = master.is_some() || !encrypted;
    if opts.deep && !keyed {
        return Err(VerifyError::Usage(
            "--deep decrypts every block and needs the master key: pass --key-file or set \
             WALFERRY_KEY_FILE / WALFERRY_KEY (without it, verify checks checksums only)"
                .into(),
        ));
    }
    let units = if keyed {
        let (units, _) = Units::load(repo.clone(), master).await.map_err(|e| {
            anyhow::Error::new(e).context(format!("open the repository at {location}"))
        })?;
        Some(units)
    } else {
        None
    };
    let listed = list_all(&repo)
        .await
        .map_err(|e| anyhow::Error::new(e).context("list the repository"))?;

    let mut notes = Vec::new();
    let mut run = Run {
        repo: repo.clone(),
        units,
        encrypted,
        deep: opts.deep,
        size: SegmentSize::DEFAULT,
        previous: BTreeMap::new(),
        acc: Mutex::new(Acc::default()),
    };
    run.with(|a| {
        a.checked.objects += 1;
        a.checked.other += 1;
    });

    // cluster.json: the segment size every WAL name depends on.
    let binding = match listed.iter().find(|o| o.key == CLUSTER_KEY) {
        Some(_) => match run.get(CLUSTER_KEY).await {
            Ok(b) => {
                run.with(|a| a.checked.other += 1);
                match ClusterBinding::from_json(&b) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        run.found(
                            Found::new(CLUSTER_KEY, "corrupt", format!("{e}; {PLANNING}"))
                                .every_restore(),
                        );
                        None
                    }
                }
            }
            Err(e) => {
                run.found(Found::new(CLUSTER_KEY, status_of(&e), e.to_string()).every_restore());
                None
            }
        },
        None => {
            let holds_data = listed
                .iter()
                .any(|o| o.key.starts_with("wal/") || o.key.starts_with("backups/"));
            if holds_data {
                run.found(
                    Found::new(
                        CLUSTER_KEY,
                        "missing",
                        format!("the repository holds WAL or backups but no cluster binding; {PLANNING}"),
                    )
                    .every_restore(),
                );
            }
            None
        }
    };
    if let Some(b) = &binding {
        run.size = b.wal_segment_size;
    }
    let size = run.size;

    // The record of earlier runs: only with the key and only for encrypted repositories,
    // where it is authenticated.
    let incremental = keyed && encrypted && !opts.full;
    let mut since = None;
    let mut records: Vec<&Listed> = listed
        .iter()
        .filter(|o| o.key.starts_with(STATE_PREFIX))
        .collect();
    records.sort_by(|a, b| b.key.cmp(&a.key));
    if incremental {
        if let Some(newest) = records.first() {
            match read_state(&run, &newest.key, &config.repository_id).await {
                Ok(s) => {
                    run.previous = s.objects;
                    since = Some(newest.key.clone());
                }
                Err(problem) => {
                    run.found(Found::new(
                        &newest.key,
                        "corrupt",
                        format!("{problem}; this run re-reads everything"),
                    ));
                }
            }
        }
    } else if keyed && !encrypted {
        notes.push("the repository is not encrypted, so a record of earlier runs cannot be authenticated: every run reads everything".into());
    } else if !keyed {
        notes.push("no key: manifests, the commit-time index and timeline histories are encrypted, so which backups a damaged object breaks and the restorable windows are unknown; every run reads everything".into());
    }

    // Group the listing.
    let mut manifests = Vec::new();
    let mut packs = Vec::new();
    let mut wal = Vec::new();
    let mut others = Vec::new();
    let mut unknown = Vec::new();
    for o in &listed {
        match classify(&o.key, size) {
            Class::Config | Class::Cluster => {}
            Class::Manifest(id) => manifests.push((o.clone(), id)),
            Class::Pack => packs.push(o.clone()),
            Class::Wal(w) => wal.push((o.clone(), w)),
            Class::DataKey => others.push((o.clone(), Kind::DataKey)),
            Class::Record => {
                if since.as_deref() != Some(o.key.as_str()) {
                    others.push((o.clone(), Kind::Record));
                }
            }
            Class::Other => {
                if o.key.starts_with("backups/") {
                    // Leftovers of the backup command, not part of any backup.
                    continue;
                }
                run.with(|a| a.checked.other += 1);
                unknown.push(o.key.clone());
            }
        }
    }
    let run = run;
    if !unknown.is_empty() {
        let more = unknown.len().saturating_sub(5);
        unknown.truncate(5);
        notes.push(format!(
            "not walferry objects, not checked: {}{}",
            unknown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ));
    }

    // Small framed objects that nothing else reads: keys, older verify records.
    futures::stream::iter(others)
        .for_each_concurrent(SMALL_IN_FLIGHT, |(o, kind)| {
            let run = &run;
            async move {
                if let Some(v) = run.cached(&o) {
                    return run.skip(&o, v);
                }
                run.with(|a| a.checked.other += 1);
                match run.get(&o.key).await {
                    Ok(b) => match run.check_unit(&b, kind, None) {
                        Ok(()) => {
                            if kind == Kind::DataKey {
                                run.verified(&o, None)
                            }
                        }
                        Err(p) => run.found(Found::new(&o.key, "corrupt", p)),
                    },
                    Err(e) if e.is_not_found() => {}
                    Err(e) => run.found(Found::new(&o.key, status_of(&e), e.to_string())),
                }
            }
        })
        .await;

    let backups = if keyed {
        let backups = check_manifests(&run, &manifests, &packs, binding.as_ref()).await;
        check_packs_keyed(&run, &packs, &backups).await;
        backups
    } else {
        for (o, _) in &manifests {
            check_sealed_small(&run, o, Kind::Manifest).await;
            run.with(|a| a.checked.manifests += 1);
        }
        check_packs_sealed(&run, &packs).await;
        Vec::new()
    };
    let wal_read = check_wal(&run, &wal).await;

    // WAL continuity, windows and what each damaged object breaks.
    let mut found = run.with(|a| std::mem::take(&mut a.found));
    let model = Model::build(size, &backups, &wal, &wal_read, keyed);
    let missing = model.missing_wal(&run, &backups).await;
    let mut model = model;
    for (tli, segno, covered) in missing {
        model.add_sealed(tli, segno);
        let key = segment_key(tli, segno, size);
        let problem = if covered > 0 {
            format!("missing: neither this sealed segment nor streamed parts past byte {covered} of it are in the repository, and later WAL is; recovery cannot pass {}", Lsn(segno.0 * size.bytes() + covered))
        } else {
            "missing: neither this sealed segment nor streamed parts of it are in the repository, and later WAL is; recovery cannot pass it".to_string()
        };
        found.push(Found::new(&key, "missing", problem).effect(Effect::Sealed { tli, segno }));
    }
    for tli in model.inferred_histories.clone() {
        if found.iter().any(|f| f.effect == Effect::History { tli }) {
            continue;
        }
        let every =
            model.latest_timeline() == Some(tli) && !backups.iter().any(|b| b.info.timeline == tli);
        let mut f = Found::new(
            &history_key(tli),
            "missing",
            format!("timeline {tli} has WAL but no history file: recovery cannot follow the switch to it from an older timeline"),
        )
        .effect(Effect::History { tli });
        if every {
            f.problem.push_str(&format!(
                "; timeline {tli} is the newest, so walferry-restore finds no backup to restore"
            ));
            f = f.every_restore();
        }
        found.push(f);
    }

    let ideal = model.evaluate(&[]);
    let all: Vec<&Effect> = found.iter().map(|f| &f.effect).collect();
    let actual = model.evaluate(&all);
    let mut damaged = Vec::new();
    for f in &found {
        let affects = if keyed {
            let with = model.evaluate(&[&f.effect]);
            let mut backups: Vec<String> = ideal
                .restorable
                .difference(&with.restorable)
                .cloned()
                .collect();
            if let Effect::Backup { id } = &f.effect {
                if !backups.contains(id) {
                    backups.push(id.clone());
                }
            }
            backups.sort();
            Affects {
                backups,
                window: lost_windows(&ideal.windows, &with.windows),
                every_restore: f.every_restore,
            }
        } else {
            Affects {
                every_restore: f.every_restore,
                ..Affects::default()
            }
        };
        damaged.push(Damage {
            object: f.object.clone(),
            status: f.status.to_string(),
            problem: f.problem.clone(),
            affects,
        });
    }
    damaged.sort_by(|a, b| a.object.cmp(&b.object));

    let backup_status = backups
        .iter()
        .map(|b| BackupStatus {
            id: b.info.id.clone(),
            timeline: b.info.timeline.0,
            start_lsn: b.info.start_lsn.to_string(),
            end_lsn: b.info.end_lsn.to_string(),
            finished_at: b.info.finished_at.clone(),
            restorable: actual.restorable.contains(&b.info.id),
        })
        .collect();
    let windows = flatten_windows(&actual.windows);

    // Store what was verified, for the next run.
    let mut record = None;
    let (checked, verified) = run.with(|a| (a.checked.clone(), std::mem::take(&mut a.verified)));
    if keyed && encrypted {
        match write_state(&run, &config.repository_id, verified, &records).await {
            Ok(key) => record = Some(key),
            Err(e) => notes.push(format!(
                "could not store the verify record (the next run reads everything again): {e:#}"
            )),
        }
    }
    if since.is_some() && checked.skipped > 0 {
        notes.push(format!(
            "{} objects verified by an earlier run are unchanged and were not read again; --full reads them",
            checked.skipped
        ));
    }

    Ok(Report {
        format: REPORT_FORMAT,
        ok: damaged.is_empty(),
        repository: location,
        mode: Mode {
            deep: opts.deep,
            key: keyed,
            incremental: since.is_some(),
            since,
        },
        checked,
        damaged,
        backups: backup_status,
        windows,
        record,
        notes,
        duration_ms: began.elapsed().as_millis() as u64,
    })
}

async fn read_state(run: &Run, key: &str, repository_id: &str) -> Result<State, String> {
    let sealed = run.get(key).await.map_err(|e| e.to_string())?;
    run.with(|a| a.checked.other += 1);
    let plain = run
        .units()
        .open(key, Kind::Record, sealed)
        .await
        .map_err(|e| format!("verify record does not open: {e}"))?;
    let s: State = serde_json::from_slice(&plain).map_err(|e| format!("verify record: {e}"))?;
    if s.format != STATE_FORMAT || s.repository_id != repository_id {
        return Err("verify record belongs to another repository or format".into());
    }
    Ok(s)
}

async fn write_state(
    run: &Run,
    repository_id: &str,
    objects: BTreeMap<String, Verified>,
    older: &[&Listed],
) -> anyhow::Result<String> {
    let now = Timestamp::now();
    let mut r = [0u8; 2];
    rand_fill(&mut r);
    let key = format!(
        "{STATE_PREFIX}{}-{}.json",
        now.strftime("%Y%m%dT%H%M%S%.6fZ"),
        hex_encode(&r)
    );
    let state = State {
        format: STATE_FORMAT,
        repository_id: repository_id.to_string(),
        written_at: now.to_string(),
        objects,
    };
    let json = serde_json::to_vec(&state)?;
    run.units()
        .put(&key, Kind::Record, Bytes::from(json))
        .await?;
    // Keep a few records; the newest is what the next run reads.
    for o in older.iter().skip(STATES_KEPT.saturating_sub(1)) {
        run.repo.delete(&o.key).await?;
    }
    Ok(key)
}

fn rand_fill(buf: &mut [u8]) {
    // Uniqueness only (two runs in one microsecond): the clock's nanoseconds suffice.
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ std::process::id())
        .unwrap_or_default();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (n >> (8 * (i % 4))) as u8;
    }
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

async fn check_sealed_small(run: &Run, o: &Listed, kind: Kind) {
    match run.get(&o.key).await {
        Ok(b) => {
            if let Err(p) = run.check_unit(&b, kind, None) {
                run.found(Found::new(&o.key, "corrupt", p));
            }
        }
        Err(e) if e.is_not_found() => {}
        Err(e) => run.found(Found::new(&o.key, status_of(&e), e.to_string())),
    }
}

// ---------------------------------------------------------------------------------------
// Manifests

/// A backup as this run knows it: from its manifest, or from an earlier run's record.
struct Backup {
    info: BackupInfo,
    key: String,
    listed: Listed,
    /// Block references by pack, when the manifest was read this run.
    refs: Option<HashMap<String, Vec<BlockRef>>>,
}

async fn check_manifests(
    run: &Run,
    manifests: &[(Listed, String)],
    packs: &[Listed],
    binding: Option<&ClusterBinding>,
) -> Vec<Backup> {
    let listed_packs: HashMap<&str, &Listed> = packs.iter().map(|o| (o.key.as_str(), o)).collect();
    // A pack that is gone is reported from the pack list alone; one that changed is read
    // again, and so are the manifests referencing it.
    let pack_cached = |key: &str| {
        listed_packs
            .get(key)
            .is_none_or(|o| run.cached(o).is_some())
    };
    let results: Vec<Option<Backup>> = futures::stream::iter(manifests)
        .map(|(o, id)| async move {
            // An earlier run's summary is good while the manifest and every pack it
            // references are unchanged (a changed pack gets its references re-checked).
            if let Some(v) = run.cached(o) {
                let info = v
                    .data
                    .clone()
                    .and_then(|d| serde_json::from_value::<BackupInfo>(d).ok());
                if let Some(info) = info {
                    if info.packs.iter().all(|p| pack_cached(p)) {
                        run.skip(o, v);
                        return Some(Backup {
                            info,
                            key: o.key.clone(),
                            listed: o.clone(),
                            refs: None,
                        });
                    }
                }
            }
            run.with(|a| a.checked.manifests += 1);
            let m = match run.get(&o.key).await {
                Ok(sealed) => match run.units().open(&o.key, Kind::Manifest, sealed).await {
                    Ok(plain) => BackupManifest::from_json(&plain),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            let m = match m {
                Ok(m) => m,
                Err(e) if e.is_not_found() => return None, // expired meanwhile
                Err(e) => {
                    run.found(
                        Found::new(&o.key, status_of(&e), format!("{e}; {PLANNING}"))
                            .effect(Effect::Backup { id: id.clone() })
                            .every_restore(),
                    );
                    return None;
                }
            };
            let mut problems = Vec::new();
            if &m.id != id {
                problems.push(format!("the manifest names backup {}", m.id));
            }
            if let Some(b) = binding {
                if m.system_identifier != b.system_identifier {
                    problems.push(format!(
                        "backup of cluster {}, but the repository belongs to cluster {}",
                        m.system_identifier, b.system_identifier
                    ));
                }
            }
            if m.end_lsn < m.start_lsn || m.finished_at.parse::<Timestamp>().is_err() {
                problems.push("impossible start/end".into());
            }
            if !problems.is_empty() {
                run.found(
                    Found::new(&o.key, "inconsistent", problems.join("; "))
                        .effect(Effect::Backup { id: id.clone() }),
                );
                return None;
            }
            let mut refs: HashMap<String, Vec<BlockRef>> = HashMap::new();
            for r in &m.blocks {
                refs.entry(r.pack.clone()).or_default().push(r.clone());
            }
            let mut packs: Vec<String> = refs.keys().cloned().collect();
            packs.sort();
            Some(Backup {
                info: BackupInfo {
                    id: m.id.clone(),
                    timeline: m.timeline,
                    end_timeline: m.end_timeline,
                    start_lsn: m.start_lsn,
                    end_lsn: m.end_lsn,
                    finished_at: m.finished_at.clone(),
                    system_identifier: m.system_identifier.clone(),
                    packs,
                },
                key: o.key.clone(),
                listed: o.clone(),
                refs: Some(refs),
            })
        })
        .buffer_unordered(MANIFESTS_IN_FLIGHT)
        .collect()
        .await;
    let mut backups: Vec<Backup> = results.into_iter().flatten().collect();
    backups.sort_by(|a, b| {
        a.info
            .start_lsn
            .cmp(&b.info.start_lsn)
            .then(a.info.id.cmp(&b.info.id))
    });
    backups
}

// ---------------------------------------------------------------------------------------
// Packs, with the key

/// One block to check in a pack.
#[derive(Clone, Debug)]
struct BlockAt {
    offset: u64,
    len: u32,
    id: BlockId,
    plain_len: u32,
}

#[derive(Default)]
struct PackResult {
    blocks: u64,
    /// offset -> problem
    damaged: BTreeMap<u64, String>,
    trailer: Option<String>,
    /// backup id -> problems with its references into this pack
    bad_refs: BTreeMap<String, Vec<String>>,
}

async fn check_packs_keyed(run: &Run, packs: &[Listed], backups: &[Backup]) {
    // References from manifests read this run, and packs named by any manifest.
    let mut new_refs: HashMap<&str, Vec<(&str, &BlockRef)>> = HashMap::new();
    let mut named: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for b in backups {
        for p in &b.info.packs {
            named
                .entry(p.as_str())
                .or_default()
                .push(b.info.id.as_str());
        }
        if let Some(refs) = &b.refs {
            for (p, rs) in refs {
                let v = new_refs.entry(p.as_str()).or_default();
                v.extend(rs.iter().map(|r| (b.info.id.as_str(), r)));
            }
        }
    }
    let listed: BTreeSet<&str> = packs.iter().map(|o| o.key.as_str()).collect();
    for (p, ids) in &named {
        if !listed.contains(p) {
            run.found(
                Found::new(
                    p,
                    "missing",
                    format!("missing: referenced by backup(s) {}", dedup(ids).join(", ")),
                )
                .effect(Effect::Blocks {
                    pack: p.to_string(),
                    offsets: None,
                }),
            );
        }
    }

    let results: Vec<(String, Option<PackResult>, bool)> = futures::stream::iter(packs)
        .map(|o| {
            let refs: Vec<(&str, &BlockRef)> =
                new_refs.get(o.key.as_str()).cloned().unwrap_or_default();
            async move {
                if let Some(v) = run.cached(o) {
                    if refs.is_empty() {
                        run.skip(o, v);
                        return (o.key.clone(), None, true);
                    }
                    // Verified before: only the new references need its trailer. If the
                    // trailer no longer opens, the whole pack is verified again below.
                    if let Ok(bad) = check_new_refs(run, o, &refs).await {
                        run.skip(o, v);
                        let r = PackResult {
                            bad_refs: bad,
                            ..PackResult::default()
                        };
                        return (o.key.clone(), Some(r), true);
                    }
                }
                run.with(|a| a.checked.packs += 1);
                let r = match run.get(&o.key).await {
                    Ok(bytes) => check_pack(run, &o.key, bytes, &refs).await,
                    Err(e) if e.is_not_found() && refs.is_empty() => {
                        return (o.key.clone(), None, true); // deleted by retention meanwhile
                    }
                    Err(e) => {
                        let mut r = PackResult::default();
                        r.damaged.insert(u64::MAX, e.to_string());
                        r
                    }
                };
                (o.key.clone(), Some(r), false)
            }
        })
        .buffer_unordered(PACKS_IN_FLIGHT)
        .collect()
        .await;

    let mut bad_refs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (key, r, skipped) in results {
        let Some(r) = r else { continue };
        let o = packs.iter().find(|o| o.key == key).expect("listed");
        run.with(|a| a.checked.blocks += r.blocks);
        for (id, problems) in r.bad_refs {
            bad_refs.entry(id).or_default().extend(problems);
        }
        if skipped {
            continue;
        }
        let whole = r.damaged.contains_key(&u64::MAX);
        if r.damaged.is_empty() && r.trailer.is_none() {
            run.verified(o, None);
            continue;
        }
        let users = named
            .get(key.as_str())
            .map(|v| dedup(v))
            .unwrap_or_default();
        let users_text = if users.is_empty() {
            "no backup references it yet (a new backup may reuse its blocks)".to_string()
        } else {
            format!("referenced by backup(s) {}", users.join(", "))
        };
        if !r.damaged.is_empty() {
            let (status, text) = if whole {
                let p = &r.damaged[&u64::MAX];
                (
                    if p.contains("not found") {
                        "missing"
                    } else {
                        "corrupt"
                    },
                    p.clone(),
                )
            } else {
                let (first_at, first) = r.damaged.iter().next().expect("not empty");
                (
                    "corrupt",
                    format!(
                        "{} of {} blocks are damaged (first at offset {first_at}: {first})",
                        r.damaged.len(),
                        r.blocks.max(r.damaged.len() as u64)
                    ),
                )
            };
            let mut problem = text;
            if let Some(t) = &r.trailer {
                let _ = write!(problem, "; trailer: {t}");
            }
            let _ = write!(problem, "; {users_text}");
            let offsets = (!whole).then(|| r.damaged.keys().copied().collect());
            run.found(Found::new(&key, status, problem).effect(Effect::Blocks {
                pack: key.clone(),
                offsets,
            }));
        } else if let Some(t) = &r.trailer {
            run.found(Found::new(
                &key,
                "corrupt",
                format!(
                    "trailer: {t}; its blocks are intact and restores (which read blocks directly) are not affected, \
                     but `walferry-agent backup` reads every trailer and fails until this pack is repaired or removed; {users_text}"
                ),
            ));
        }
    }

    // Manifests whose references are wrong; the rest are verified.
    for b in backups.iter().filter(|b| b.refs.is_some()) {
        match bad_refs.get(&b.info.id) {
            Some(problems) => {
                let mut text = format!("{} block reference(s) are wrong: ", problems.len());
                text.push_str(
                    &problems
                        .iter()
                        .take(3)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; "),
                );
                run.found(
                    Found::new(&b.key, "inconsistent", text).effect(Effect::Backup {
                        id: b.info.id.clone(),
                    }),
                );
            }
            None => run.verified(&b.listed, serde_json::to_value(&b.info).ok()),
        }
    }
}

fn dedup(v: &[&str]) -> Vec<String> {
    let s: BTreeSet<&str> = v.iter().copied().collect();
    s.into_iter().map(str::to_string).collect()
}

/// Checks references into an already verified pack against its trailer (a range read).
async fn check_new_refs(
    run: &Run,
    o: &Listed,
    refs: &[(&str, &BlockRef)],
) -> Result<BTreeMap<String, Vec<String>>, FmtError> {
    run.with(|a| {
        a.checked.trailers += 1;
        a.checked.objects += 1;
    });
    let from = o.size.saturating_sub(TAIL_GUESS);
    let mut tail = run.get_range(&o.key, from..o.size).await?;
    let n = tail.len();
    if n < 4 {
        return Err(FmtError::Truncated { have: n, need: 4 });
    }
    let len = u64::from(u32::from_le_bytes([
        tail[n - 4],
        tail[n - 3],
        tail[n - 2],
        tail[n - 1],
    ]));
    if len + 4 > n as u64 {
        let start = o.size.checked_sub(len + 4).ok_or(FmtError::Truncated {
            have: o.size as usize,
            need: (len + 4) as usize,
        })?;
        tail = run.get_range(&o.key, start..o.size).await?;
    }
    let sealed = Bytes::copy_from_slice(trailer_from_tail(&tail)?);
    let plain = run.units().open(&o.key, Kind::PackTrailer, sealed).await?;
    let entries = parse_trailer(&plain)?;
    let by_offset: HashMap<u64, BlockAt> = entries
        .iter()
        .map(|e| {
            (
                e.offset,
                BlockAt {
                    offset: e.offset,
                    len: e.len,
                    id: e.id,
                    plain_len: e.plain_len,
                },
            )
        })
        .collect();
    Ok(compare_refs(&o.key, refs, &by_offset))
}

fn compare_refs(
    pack: &str,
    refs: &[(&str, &BlockRef)],
    entries: &HashMap<u64, BlockAt>,
) -> BTreeMap<String, Vec<String>> {
    let mut bad: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (backup, r) in refs {
        let ok = entries
            .get(&r.offset)
            .is_some_and(|e| e.id == r.id && e.len == r.len && e.plain_len == r.plain_len);
        if !ok {
            bad.entry(backup.to_string()).or_default().push(format!(
                "block {} at {pack} offset {} is not what the pack's trailer lists there",
                r.id, r.offset
            ));
        }
    }
    bad
}

/// Checks one pack read whole: its trailer (authenticated with the pack's name), every
/// block it lists and every block a manifest read this run references in it.
async fn check_pack(run: &Run, key: &str, bytes: Bytes, refs: &[(&str, &BlockRef)]) -> PackResult {
    let mut r = PackResult::default();
    let trailer = async {
        let sealed = Bytes::copy_from_slice(trailer_from_tail(&bytes)?);
        let tlen = sealed.len() as u64;
        let plain = run.units().open(key, Kind::PackTrailer, sealed).await?;
        Ok::<_, FmtError>((parse_trailer(&plain)?, tlen))
    }
    .await;
    let data_end;
    let mut blocks: BTreeMap<u64, BlockAt> = BTreeMap::new();
    match trailer {
        Ok((entries, tlen)) => {
            data_end = (bytes.len() as u64).saturating_sub(tlen + 4);
            for e in entries {
                blocks.insert(
                    e.offset,
                    BlockAt {
                        offset: e.offset,
                        len: e.len,
                        id: e.id,
                        plain_len: e.plain_len,
                    },
                );
            }
            let by_offset: HashMap<u64, BlockAt> =
                blocks.iter().map(|(k, v)| (*k, v.clone())).collect();
            r.bad_refs = compare_refs(key, refs, &by_offset);
        }
        Err(e) => {
            r.trailer = Some(e.to_string());
            data_end = bytes.len() as u64;
            // Restores read blocks by the manifests' offsets: check those.
            for (_, b) in refs {
                blocks.entry(b.offset).or_insert(BlockAt {
                    offset: b.offset,
                    len: b.len,
                    id: b.id,
                    plain_len: b.plain_len,
                });
            }
        }
    }
    r.blocks = blocks.len() as u64;
    let mut prev_end = 0u64;
    let mut to_open = Vec::new();
    for b in blocks.values() {
        let end = b.offset + u64::from(b.len);
        if end > data_end {
            r.damaged.insert(
                b.offset,
                format!(
                    "block of {} bytes at offset {} lies past the end of the data ({data_end} bytes): truncated",
                    b.len, b.offset
                ),
            );
            continue;
        }
        if b.offset < prev_end {
            r.damaged.insert(b.offset, "blocks overlap".into());
            continue;
        }
        prev_end = end;
        let slice = bytes.slice(b.offset as usize..end as usize);
        match run.check_unit(&slice, Kind::Block, Some(u64::from(b.plain_len))) {
            Ok(()) => to_open.push((b.offset, b.id, slice)),
            Err(p) => {
                r.damaged.insert(b.offset, p);
            }
        }
    }
    if run.deep {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let opened: Vec<(u64, Result<(), FmtError>)> = futures::stream::iter(to_open)
            // The plaintext is dropped at once: only whether it opens matters.
            .map(|(off, id, slice)| async move {
                (off, run.units().open_block(id.0, slice).await.map(drop))
            })
            .buffer_unordered(cores)
            .collect()
            .await;
        for (off, res) in opened {
            if let Err(e) = res {
                r.damaged.insert(off, e.to_string());
            }
        }
    }
    r
}

// ---------------------------------------------------------------------------------------
// Packs, without the key: split by checksums

/// CRC-32 (IEEE), the one crc32fast computes, one byte at a time.
const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Finds the end of the envelope starting at `start`, without a key: the first position
/// where the crc32 of everything before it matches the 4 bytes there, and the next
/// envelope (or `limit`) begins. Then runs the full header checks.
fn envelope_end(bytes: &[u8], start: usize, limit: usize) -> Option<usize> {
    let b = &bytes[..limit];
    if b.len() < start + HEADER_LEN + CRC_LEN
        || b[start..start + 4] != MAGIC
        || b[start + 4] != FORMAT_VERSION
    {
        return None;
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&b[start + 24..start + 32]);
    let plain = u64::from_le_bytes(len8);
    let tag = if b[start + 7] == Cipher::Aes256Gcm as u8 {
        TAG_LEN
    } else {
        0
    };
    // Stored bodies are never larger than the plaintext (incompressible data is stored as is).
    let max_end = (start as u64)
        .saturating_add(HEADER_LEN as u64 + plain + (tag + CRC_LEN) as u64)
        .min(limit as u64) as usize;
    let min_end = start + HEADER_LEN + tag + CRC_LEN;
    let mut state = !0u32;
    for &x in &b[start..min_end - CRC_LEN] {
        state = CRC_TABLE[((state ^ u32::from(x)) & 0xff) as usize] ^ (state >> 8);
    }
    let mut end = min_end;
    loop {
        if end > max_end {
            return None;
        }
        let stored = u32::from_le_bytes([b[end - 4], b[end - 3], b[end - 2], b[end - 1]]);
        if !state == stored
            && (end == limit
                || (b.len() >= end + 5 && b[end..end + 4] == MAGIC && b[end + 4] == FORMAT_VERSION))
            && envelope::check(&b[start..end]).is_ok()
        {
            return Some(end);
        }
        if end == max_end {
            return None;
        }
        let x = b[end - CRC_LEN];
        state = CRC_TABLE[((state ^ u32::from(x)) & 0xff) as usize] ^ (state >> 8);
        end += 1;
    }
}

/// What a keyless scan of a pack found.
#[derive(Debug, Default, PartialEq, Eq)]
struct PackScan {
    blocks: u64,
    problems: Vec<String>,
}

/// Splits a pack into block envelopes and its trailer without a key, checking every
/// envelope's crc32 and header.
fn scan_pack(bytes: &[u8], encrypted: bool) -> PackScan {
    let mut s = PackScan::default();
    let n = bytes.len();
    let mut data_end = n.saturating_sub(4);
    match trailer_from_tail(bytes) {
        Ok(t) => match check_unit(t, Kind::PackTrailer, None, encrypted) {
            Ok(()) => data_end = n - 4 - t.len(),
            Err(p) => s.problems.push(format!("trailer: {p}")),
        },
        Err(e) => s.problems.push(format!("trailer: {e}")),
    }
    let trailer_ok = s.problems.is_empty();
    let mut pos = 0;
    while pos < data_end {
        match envelope_end(bytes, pos, data_end) {
            Some(end) => {
                let kind_ok = check_unit(&bytes[pos..end], Kind::Block, None, encrypted);
                match kind_ok {
                    Ok(()) => s.blocks += 1,
                    // The trailer as found by the scan when the length field is damaged.
                    Err(_) if !trailer_ok && end == data_end => {}
                    Err(p) => s.problems.push(format!("block at offset {pos}: {p}")),
                }
                pos = end;
            }
            None => {
                // Resynchronise at the next envelope that checks out.
                let mut next = pos + 1;
                let found = loop {
                    match bytes[next.min(data_end)..data_end]
                        .windows(4)
                        .position(|w| w == MAGIC)
                    {
                        Some(i) => {
                            let at = next + i;
                            if envelope_end(bytes, at, data_end).is_some() {
                                break Some(at);
                            }
                            next = at + 1;
                        }
                        None => break None,
                    }
                };
                let until = found.unwrap_or(data_end);
                s.problems.push(format!(
                    "bytes {pos}..{until} are not a valid block envelope (checksum or framing)"
                ));
                pos = until;
            }
        }
    }
    s
}

async fn check_packs_sealed(run: &Run, packs: &[Listed]) {
    futures::stream::iter(packs)
        .for_each_concurrent(PACKS_IN_FLIGHT, |o| async move {
            run.with(|a| a.checked.packs += 1);
            match run.get(&o.key).await {
                Ok(bytes) => {
                    let encrypted = run.encrypted;
                    let scan = tokio::task::spawn_blocking(move || scan_pack(&bytes, encrypted))
                        .await
                        .unwrap_or_else(|e| PackScan {
                            blocks: 0,
                            problems: vec![format!("scan failed: {e}")],
                        });
                    run.with(|a| a.checked.blocks += scan.blocks);
                    if !scan.problems.is_empty() {
                        let mut text = scan
                            .problems
                            .iter()
                            .take(3)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join("; ");
                        if scan.problems.len() > 3 {
                            let _ = write!(text, "; and {} more", scan.problems.len() - 3);
                        }
                        run.found(Found::new(&o.key, "corrupt", text));
                    }
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => run.found(Found::new(&o.key, status_of(&e), e.to_string())),
            }
        })
        .await;
}

// ---------------------------------------------------------------------------------------
// WAL objects

/// Contents of WAL objects that planning reads.
#[derive(Default)]
struct WalRead {
    /// (tli, start, end, last commit)
    index: Vec<(TimelineId, Lsn, Lsn, Commits)>,
    histories: BTreeMap<TimelineId, Vec<(TimelineId, Lsn)>>,
    /// Objects that vanished between the listing and the read (parts of a segment that
    /// was sealed meanwhile).
    vanished: BTreeSet<String>,
}

async fn check_wal(run: &Run, wal: &[(Listed, WalObject)]) -> WalRead {
    let size = run.size;
    let keyed = run.units.is_some();
    let out = Mutex::new(WalRead::default());
    futures::stream::iter(wal)
        .for_each_concurrent(WAL_IN_FLIGHT, |(o, w)| {
            let out = &out;
            async move {
                let transient = matches!(w, WalObject::Part { .. } | WalObject::PartIndex { .. });
                let cacheable = !transient;
                if cacheable {
                    if let Some(v) = run.cached(o) {
                        match w {
                            WalObject::History { tli } => {
                                if let Some(h) =
                                    v.data.clone().and_then(|d| serde_json::from_value(d).ok())
                                {
                                    lock(out).histories.insert(*tli, h);
                                    return run.skip(o, v);
                                }
                            }
                            WalObject::SegmentIndex { tli, segno } => {
                                if let Some(s) = v
                                    .data
                                    .clone()
                                    .and_then(|d| serde_json::from_value::<WalSummary>(d).ok())
                                {
                                    let start = Lsn(segno.0 * size.bytes());
                                    lock(out).index.push((
                                        *tli,
                                        start,
                                        Lsn(start.0 + size.bytes()),
                                        commits(&s),
                                    ));
                                    return run.skip(o, v);
                                }
                            }
                            _ => return run.skip(o, v),
                        }
                    }
                }
                run.with(|a| match w {
                    WalObject::Segment { .. } => a.checked.wal_segments += 1,
                    WalObject::Part { .. } => a.checked.wal_parts += 1,
                    WalObject::History { .. } => a.checked.histories += 1,
                    WalObject::SegmentIndex { .. } | WalObject::PartIndex { .. } => {
                        a.checked.wal_index += 1
                    }
                    WalObject::BackupHistory { .. } => a.checked.other += 1,
                });
                let bytes = match run.get(&o.key).await {
                    Ok(b) => b,
                    Err(e) if e.is_not_found() && transient => {
                        lock(out).vanished.insert(o.key.clone());
                        return;
                    }
                    Err(e) => {
                        let f = Found::new(&o.key, status_of(&e), e.to_string());
                        return run.found(wal_effect(f, w));
                    }
                };
                let res: Result<Option<serde_json::Value>, String> = async {
                    match *w {
                        WalObject::Segment { .. } => run
                            .check_or_open(&o.key, bytes, Kind::WalSegment, Some(size.bytes()))
                            .await
                            .map(|()| None),
                        WalObject::Part { from, to, .. } => run
                            .check_or_open(&o.key, bytes, Kind::WalPart, Some(to - from))
                            .await
                            .map(|()| None),
                        WalObject::BackupHistory { .. } => run
                            .check_or_open(&o.key, bytes, Kind::Record, None)
                            .await
                            .map(|()| None),
                        WalObject::History { tli } => {
                            run.check_unit(&bytes, Kind::WalHistory, None)?;
                            if !keyed {
                                return Ok(None);
                            }
                            let plain = run
                                .units()
                                .open(&o.key, Kind::WalHistory, bytes)
                                .await
                                .map_err(|e| e.to_string())?;
                            let h = parse_history(&plain).map_err(|e| e.to_string())?;
                            lock(out).histories.insert(tli, h.clone());
                            Ok(serde_json::to_value(h).ok())
                        }
                        WalObject::SegmentIndex { tli, segno }
                        | WalObject::PartIndex { tli, segno, .. } => {
                            run.check_unit(&bytes, Kind::WalIndex, None)?;
                            if !keyed {
                                return Ok(None);
                            }
                            let plain = run
                                .units()
                                .open(&o.key, Kind::WalIndex, bytes)
                                .await
                                .map_err(|e| e.to_string())?;
                            let s: WalSummary = serde_json::from_slice(&plain)
                                .map_err(|e| format!("WAL index entry: {e}"))?;
                            let base = segno.0 * size.bytes();
                            let (start, end) = match *w {
                                WalObject::PartIndex { from, to, .. } => {
                                    (Lsn(base + from), Lsn(base + to))
                                }
                                _ => (Lsn(base), Lsn(base + size.bytes())),
                            };
                            lock(out).index.push((tli, start, end, commits(&s)));
                            Ok(serde_json::to_value(s).ok())
                        }
                    }
                }
                .await;
                match res {
                    Ok(data) => {
                        if cacheable && keyed {
                            run.verified(o, data);
                        }
                    }
                    Err(p) => run.found(wal_effect(Found::new(&o.key, "corrupt", p), w)),
                }
            }
        })
        .await;
    let mut r = out.into_inner().unwrap_or_else(|p| p.into_inner());
    r.index.sort_by_key(|e| (e.0, e.1, e.2));
    r
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The first and last commit of an index entry: (LSN, time).
type Commits = [Option<(Lsn, Timestamp)>; 2];

fn commits(s: &WalSummary) -> Commits {
    let f = |c: Option<walferry_formats::walreader::XactStamp>| {
        c.and_then(|c| Some((c.lsn, c.time.to_timestamp()?)))
    };
    [f(s.first_commit), f(s.last_commit)]
}

/// The latest commit time of an index entry that lies on `path`, judged by the commit
/// records' own LSNs: an entry of a new timeline's first segment starts before the
/// switch but its commits after it are on the new timeline (and an old timeline's entry
/// may hold commits past the switch that are not).
fn commit_on_path(path: &[(TimelineId, Lsn)], tli: TimelineId, c: &Commits) -> Option<Timestamp> {
    c.iter()
        .rev()
        .flatten()
        .find(|(lsn, _)| on_path(path, tli, *lsn))
        .map(|(_, t)| *t)
}

fn wal_effect(f: Found, w: &WalObject) -> Found {
    match *w {
        WalObject::Segment { tli, segno } => f.effect(Effect::Sealed { tli, segno }),
        WalObject::Part {
            tli,
            segno,
            from,
            to,
        } => f.effect(Effect::Part {
            tli,
            segno,
            from,
            to,
        }),
        WalObject::History { tli } => {
            let mut f = f.effect(Effect::History { tli }).every_restore();
            f.problem.push_str(&format!("; {PLANNING}"));
            f
        }
        WalObject::SegmentIndex { .. } | WalObject::PartIndex { .. } => {
            let mut f = f.every_restore();
            f.problem.push_str(&format!("; {PLANNING}"));
            f
        }
        WalObject::BackupHistory { .. } => f,
    }
}

// ---------------------------------------------------------------------------------------
// The model: which backups restore, and to which times, with and without each damage

struct BackupModel {
    info: BackupInfo,
    finished: Option<Timestamp>,
    /// pack -> offsets referenced (None: only the pack list is known).
    refs: Option<HashMap<String, BTreeSet<u64>>>,
}

struct Model {
    size: SegmentSize,
    backups: Vec<BackupModel>,
    /// Stored WAL, plus missing segments once they are found (the world without damage).
    wal: BTreeMap<TimelineId, TimelineWal>,
    histories: BTreeMap<TimelineId, Vec<(TimelineId, Lsn)>>,
    /// Timelines with WAL but no readable history, whose history was inferred.
    inferred_histories: Vec<TimelineId>,
    index: Vec<(TimelineId, Lsn, Lsn, Commits)>,
    keyed: bool,
}

#[derive(Debug, Default)]
struct Eval {
    restorable: BTreeSet<String>,
    windows: BTreeMap<TimelineId, Vec<(Timestamp, Timestamp)>>,
}

impl Model {
    fn build(
        size: SegmentSize,
        backups: &[Backup],
        wal: &[(Listed, WalObject)],
        read: &WalRead,
        keyed: bool,
    ) -> Model {
        let mut tl: BTreeMap<TimelineId, TimelineWal> = BTreeMap::new();
        let mut history_objects = BTreeSet::new();
        for (o, w) in wal {
            if read.vanished.contains(&o.key) {
                continue;
            }
            match *w {
                WalObject::Segment { tli, segno } => {
                    tl.entry(tli).or_default().sealed.insert(segno);
                }
                WalObject::Part {
                    tli,
                    segno,
                    from,
                    to,
                } => {
                    let p = tl.entry(tli).or_default().parts.entry(segno).or_default();
                    p.push((from, to));
                    p.sort_unstable();
                }
                WalObject::History { tli } => {
                    history_objects.insert(tli);
                }
                _ => {}
            }
        }
        let mut m = Model {
            size,
            backups: backups
                .iter()
                .map(|b| BackupModel {
                    info: b.info.clone(),
                    finished: b.info.finished_at.parse().ok().map(ceil_micros),
                    refs: b.refs.as_ref().map(|r| {
                        r.iter()
                            .map(|(p, rs)| (p.clone(), rs.iter().map(|x| x.offset).collect()))
                            .collect()
                    }),
                })
                .collect(),
            wal: tl,
            histories: read.histories.clone(),
            inferred_histories: Vec::new(),
            index: read.index.clone(),
            keyed,
        };
        // A timeline past 1 with WAL but no history: infer one (parent = the newest older
        // timeline, switch = where its WAL starts) so the world without damage can be
        // worked out; the missing history is reported as damage.
        let timelines: Vec<TimelineId> = m.wal.keys().copied().collect();
        for t in timelines {
            if t.0 <= 1 || m.histories.contains_key(&t) {
                continue;
            }
            if !keyed && history_objects.contains(&t) {
                continue; // present, just unreadable without the key
            }
            let parent = m
                .wal
                .keys()
                .chain(m.histories.keys())
                .copied()
                .filter(|p| *p < t)
                .max();
            let first = m.wal.get(&t).and_then(|w| first_stored(w, size));
            if let (Some(p), Some(first)) = (parent, first) {
                let mut h = m.histories.get(&p).cloned().unwrap_or_default();
                h.push((p, first));
                m.histories.insert(t, h);
            }
            if !history_objects.contains(&t) {
                m.inferred_histories.push(t);
            }
        }
        m
    }

    fn latest_timeline(&self) -> Option<TimelineId> {
        self.wal.keys().chain(self.histories.keys()).copied().max()
    }

    fn add_sealed(&mut self, tli: TimelineId, segno: SegmentNo) {
        self.wal.entry(tli).or_default().sealed.insert(segno);
    }

    fn timelines(&self) -> BTreeSet<TimelineId> {
        self.wal
            .keys()
            .chain(self.histories.keys())
            .copied()
            .collect()
    }

    /// Gaps in the stored WAL along every timeline path (before the end of the stored
    /// WAL), from the oldest backup's start (or the oldest WAL, without backups): each as
    /// (timeline, segment, bytes covered by parts). Re-checked against the store, so a
    /// segment sealed while the listing ran is not reported.
    async fn missing_wal(
        &self,
        run: &Run,
        backups: &[Backup],
    ) -> Vec<(TimelineId, SegmentNo, u64)> {
        let size = self.size;
        let mut candidates: BTreeMap<(TimelineId, SegmentNo), u64> = BTreeMap::new();
        for t in self.timelines() {
            let path = self.path_to(t, &Applied::default());
            let starts: Vec<u64> = backups
                .iter()
                .filter(|b| on_path(&path, b.info.timeline, b.info.end_lsn))
                .map(|b| b.info.start_lsn.segment(size).0)
                .collect();
            let from = match starts.iter().min() {
                Some(s) if self.keyed => *s,
                _ => match path
                    .iter()
                    .find_map(|(pt, _)| self.wal.get(pt).and_then(|w| first_stored(w, size)))
                {
                    Some(l) => l.segment(size).0,
                    None => continue,
                },
            };
            let gaps = gaps(&self.wal, &path, from, size);
            // The last gap is the end of the stored WAL.
            for g in gaps.iter().take(gaps.len().saturating_sub(1)) {
                let n = g.segment(size);
                let src = source(&path, n.0, size);
                candidates.insert((src, n), g.segment_offset(size));
            }
        }
        let mut out = Vec::new();
        for ((tli, segno), covered) in candidates {
            // Sealed (and its parts removed) while the listing ran?
            match run.repo.head(&segment_key(tli, segno, size)).await {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(_) => {}
            }
            if let Ok(parts) = run.repo.list(&parts_prefix(tli, segno, size)).await {
                let mut w = TimelineWal::default();
                let mut v: Vec<(u64, u64)> = parts
                    .iter()
                    .filter_map(|o| match parse_wal_key(&o.key, size) {
                        Some(WalObject::Part { from, to, .. }) => Some((from, to)),
                        _ => None,
                    })
                    .collect();
                v.sort_unstable();
                w.parts.insert(segno, v);
                if w.part_cover(segno).1 > covered {
                    continue;
                }
            }
            out.push((tli, segno, covered));
        }
        out
    }

    fn path_to(&self, tli: TimelineId, a: &Applied) -> Vec<(TimelineId, Lsn)> {
        let mut p = if a.histories.contains(&tli) {
            Vec::new()
        } else {
            self.histories.get(&tli).cloned().unwrap_or_default()
        };
        p.push((tli, Lsn(u64::MAX)));
        p
    }

    /// Which backups restore and the windows per timeline, with `effects` applied.
    fn evaluate(&self, effects: &[&Effect]) -> Eval {
        let size = self.size;
        let mut a = Applied::default();
        let mut wal = None::<BTreeMap<TimelineId, TimelineWal>>;
        for e in effects {
            match e {
                Effect::None => {}
                Effect::Blocks { pack, offsets } => a.blocks.push((pack.clone(), offsets.clone())),
                Effect::Backup { id } => {
                    a.backups.insert(id.clone());
                }
                Effect::Sealed { tli, segno } => {
                    let w = wal.get_or_insert_with(|| self.wal.clone());
                    if let Some(t) = w.get_mut(tli) {
                        t.sealed.remove(segno);
                    }
                }
                Effect::Part {
                    tli,
                    segno,
                    from,
                    to,
                } => {
                    let w = wal.get_or_insert_with(|| self.wal.clone());
                    if let Some(p) = w.get_mut(tli).and_then(|t| t.parts.get_mut(segno)) {
                        p.retain(|x| *x != (*from, *to));
                    }
                }
                Effect::History { tli } => {
                    a.histories.insert(*tli);
                }
            }
        }
        let wal = wal.as_ref().unwrap_or(&self.wal);
        let broken = |b: &BackupModel| {
            a.backups.contains(&b.info.id)
                || a.blocks
                    .iter()
                    .any(|(pack, offsets)| match (&b.refs, offsets) {
                        (Some(refs), Some(offs)) => refs
                            .get(pack)
                            .is_some_and(|mine| mine.iter().any(|o| offs.contains(o))),
                        (Some(refs), None) => refs.contains_key(pack),
                        (None, _) => b.info.packs.contains(pack),
                    })
        };
        let mut ev = Eval::default();
        let reach = |path: &[(TimelineId, Lsn)], start: Lsn, gaps: &[Lsn]| -> Lsn {
            let s = start.segment(size).0;
            gaps.iter()
                .find(|g| g.segment(size).0 >= s)
                .copied()
                .unwrap_or_else(|| stored_end(wal, path, size))
        };
        for b in &self.backups {
            if broken(b) {
                continue;
            }
            let path = self.path_to(b.info.end_timeline, &a);
            let g = gaps(wal, &path, b.info.start_lsn.segment(size).0, size);
            if reach(&path, b.info.start_lsn, &g) >= b.info.end_lsn {
                ev.restorable.insert(b.info.id.clone());
            }
        }
        for t in self.timelines() {
            let path = self.path_to(t, &a);
            let on: Vec<&BackupModel> = self
                .backups
                .iter()
                .filter(|b| on_path(&path, b.info.timeline, b.info.end_lsn) && !broken(b))
                .collect();
            let Some(from_seg) = on.iter().map(|b| b.info.start_lsn.segment(size).0).min() else {
                continue;
            };
            let g = gaps(wal, &path, from_seg, size);
            let index: Vec<(Lsn, Timestamp)> = self
                .index
                .iter()
                .filter_map(|e| Some((e.2, commit_on_path(&path, e.0, &e.3)?)))
                .collect();
            let mut spans = Vec::new();
            for b in on {
                let r = reach(&path, b.info.start_lsn, &g);
                let Some(from) = b.finished else { continue };
                if r < b.info.end_lsn {
                    continue;
                }
                let to = index.iter().filter(|e| e.0 <= r).map(|e| e.1).max();
                if let Some(to) = to {
                    if to > from {
                        spans.push((from, to));
                    }
                }
            }
            let merged = merge(spans);
            if !merged.is_empty() {
                ev.windows.insert(t, merged);
            }
        }
        ev
    }
}

/// Effects applied to one evaluation (besides WAL, which is applied to a copy).
#[derive(Default)]
struct Applied {
    backups: BTreeSet<String>,
    blocks: Vec<(String, Option<BTreeSet<u64>>)>,
    histories: BTreeSet<TimelineId>,
}

fn first_stored(w: &TimelineWal, size: SegmentSize) -> Option<Lsn> {
    let s = w.sealed.first().map(|s| s.0 * size.bytes());
    let p = w
        .parts
        .iter()
        .filter_map(|(seg, v)| v.first().map(|(from, _)| seg.0 * size.bytes() + from))
        .min();
    s.into_iter().chain(p).min().map(Lsn)
}

fn last_stored(w: &TimelineWal, size: SegmentSize) -> Option<Lsn> {
    let s = w.sealed.last().map(|s| (s.0 + 1) * size.bytes());
    let p = w
        .parts
        .iter()
        .filter_map(|(seg, v)| v.iter().map(|(_, to)| seg.0 * size.bytes() + to).max())
        .max();
    s.into_iter().chain(p).max().map(Lsn)
}

/// Where stored WAL ends along `path` (each timeline counted only up to its switch).
fn stored_end(
    wal: &BTreeMap<TimelineId, TimelineWal>,
    path: &[(TimelineId, Lsn)],
    size: SegmentSize,
) -> Lsn {
    let mut end = Lsn(0);
    let mut begin = Lsn(0);
    for &(t, e) in path {
        if let Some(last) = wal.get(&t).and_then(|w| last_stored(w, size)) {
            let last = last.min(e);
            if last > begin {
                end = end.max(last);
            }
        }
        begin = e;
    }
    end
}

/// The timeline recovery reads segment `n` from on `path` (as the planner does).
fn source(path: &[(TimelineId, Lsn)], n: u64, size: SegmentSize) -> TimelineId {
    let mut tli = path[0].0;
    let mut begin = Lsn(0);
    for &(t, e) in path {
        if begin.segment(size).0 <= n {
            tli = t;
        }
        begin = e;
    }
    tli
}

/// Positions from segment `from` on where the usable WAL along `path` stops, ascending;
/// the last is the end of the stored WAL.
fn gaps(
    wal: &BTreeMap<TimelineId, TimelineWal>,
    path: &[(TimelineId, Lsn)],
    from: u64,
    size: SegmentSize,
) -> Vec<Lsn> {
    let end = stored_end(wal, path, size);
    let mut out = Vec::new();
    if end.0 == 0 {
        return out;
    }
    let last = Lsn(end.0 - 1).segment(size).0;
    for n in from..=last + 1 {
        let t = source(path, n, size);
        let covered = match wal.get(&t) {
            Some(w) if w.sealed.contains(&SegmentNo(n)) => size.bytes(),
            Some(w) => w.part_cover(SegmentNo(n)).1,
            None => 0,
        };
        if covered < size.bytes() {
            let g = Lsn(n * size.bytes() + covered);
            out.push(g);
            if g >= end {
                break;
            }
        }
    }
    out
}

/// Up to whole microseconds, as `RepoView::window` prints the start of a window: the
/// precision `--to` accepts, so a printed start can be pasted back as a target.
fn ceil_micros(t: Timestamp) -> Timestamp {
    t.round(
        jiff::TimestampRound::new()
            .smallest(jiff::Unit::Microsecond)
            .mode(jiff::RoundMode::Ceil),
    )
    .unwrap_or(t)
}

fn merge(mut spans: Vec<(Timestamp, Timestamp)>) -> Vec<(Timestamp, Timestamp)> {
    spans.sort();
    let mut out: Vec<(Timestamp, Timestamp)> = Vec::new();
    for (a, b) in spans {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// `ideal` minus `with`, per timeline.
fn lost_windows(
    ideal: &BTreeMap<TimelineId, Vec<(Timestamp, Timestamp)>>,
    with: &BTreeMap<TimelineId, Vec<(Timestamp, Timestamp)>>,
) -> Vec<Window> {
    let mut out = BTreeMap::new();
    for (t, spans) in ideal {
        let keep = with.get(t).cloned().unwrap_or_default();
        let mut lost = Vec::new();
        for &(a, b) in spans {
            let mut pieces = vec![(a, b)];
            for &(ka, kb) in &keep {
                pieces = pieces
                    .into_iter()
                    .flat_map(|(pa, pb)| {
                        let mut v = Vec::new();
                        if ka > pa {
                            v.push((pa, pb.min(ka)));
                        }
                        if kb < pb {
                            v.push((pa.max(kb), pb));
                        }
                        v.into_iter().filter(|(x, y)| x < y)
                    })
                    .collect();
            }
            lost.extend(pieces);
        }
        if !lost.is_empty() {
            out.insert(*t, lost);
        }
    }
    flatten_windows(&out)
}

fn flatten_windows(w: &BTreeMap<TimelineId, Vec<(Timestamp, Timestamp)>>) -> Vec<Window> {
    w.iter()
        .flat_map(|(t, spans)| {
            spans.iter().map(move |(a, b)| Window {
                timeline: t.0,
                from: a.to_string(),
                to: b.to_string(),
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Text output

impl Report {
    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let level = match (self.mode.key, self.mode.deep) {
            (false, _) => "checksums only (no key)",
            (true, false) => "shallow",
            (true, true) => "deep",
        };
        let _ = writeln!(
            s,
            "verify {}: {level}{}",
            self.repository,
            if self.mode.incremental {
                ", incremental"
            } else {
                ", full"
            }
        );
        let c = &self.checked;
        let _ = writeln!(
            s,
            "read {} objects ({:.1} MB) in {:.1}s: {} manifests, {} packs ({} blocks), {} trailers, \
             {} WAL segments, {} parts, {} index entries, {} histories, {} other; {} unchanged objects not read again",
            c.objects,
            c.bytes as f64 / 1e6,
            self.duration_ms as f64 / 1000.0,
            c.manifests,
            c.packs,
            c.blocks,
            c.trailers,
            c.wal_segments,
            c.wal_parts,
            c.wal_index,
            c.histories,
            c.other,
            c.skipped
        );
        if !self.damaged.is_empty() {
            let _ = writeln!(s, "DAMAGE ({} objects):", self.damaged.len());
            for d in &self.damaged {
                let _ = writeln!(s, "  {} [{}]: {}", d.object, d.status, d.problem);
                if !d.affects.backups.is_empty() {
                    let _ = writeln!(s, "    breaks backups: {}", d.affects.backups.join(", "));
                }
                for w in &d.affects.window {
                    let _ = writeln!(
                        s,
                        "    no longer restorable: timeline {} from {} up to {}",
                        w.timeline, w.from, w.to
                    );
                }
                if d.affects.every_restore {
                    let _ = writeln!(s, "    every restore fails until it is repaired or removed");
                }
            }
        }
        if !self.backups.is_empty() {
            let _ = writeln!(s, "backups:");
            for b in &self.backups {
                let _ = writeln!(
                    s,
                    "  {}  timeline {}  WAL {}..{}  finished {}  {}",
                    b.id,
                    b.timeline,
                    b.start_lsn,
                    b.end_lsn,
                    b.finished_at,
                    if b.restorable {
                        "restorable"
                    } else {
                        "NOT RESTORABLE"
                    }
                );
            }
        }
        if self.mode.key {
            if self.windows.is_empty() {
                let _ = writeln!(s, "restorable windows: none (a window needs an intact backup and WAL with commits after it)");
            } else {
                let _ = writeln!(s, "restorable windows (point in time):");
                for w in &self.windows {
                    let _ = writeln!(
                        s,
                        "  timeline {}: from {} up to (not including) {}",
                        w.timeline, w.from, w.to
                    );
                }
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        if let Some(r) = &self.record {
            let _ = writeln!(s, "recorded as {r}");
        }
        let _ = writeln!(
            s,
            "result: {}",
            if self.ok {
                "intact".to_string()
            } else {
                format!("DAMAGE FOUND in {} object(s)", self.damaged.len())
            }
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walferry_formats::keyring::{DataKeyMaterial, Keyring};

    #[test]
    fn crc_table_matches_the_envelope_crc() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 31 % 251) as u8).collect();
        let e = envelope::seal(Kind::Block, b"x", &data, 3, &Keyring::unencrypted()).unwrap();
        let (body, crc) = e.split_at(e.len() - CRC_LEN);
        let mut state = !0u32;
        for &x in body {
            state = CRC_TABLE[((state ^ u32::from(x)) & 0xff) as usize] ^ (state >> 8);
        }
        assert_eq!(!state, u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]));
    }

    fn pack(ring: &Keyring, blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut buf = Vec::new();
        for (i, b) in blocks.iter().enumerate() {
            let e = envelope::seal(Kind::Block, &[i as u8; 32], b, 3, ring).unwrap();
            buf.extend_from_slice(&e);
        }
        let t = envelope::seal(Kind::PackTrailer, b"packs/aa/x", b"[]", 3, ring).unwrap();
        buf.extend_from_slice(&t);
        buf.extend_from_slice(&(t.len() as u32).to_le_bytes());
        buf
    }

    fn blocks() -> Vec<Vec<u8>> {
        vec![
            vec![0u8; 8192], // compresses well
            (0..8192u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(), // does not
            b"WFRY\x01 looks like a header inside the plaintext".repeat(50),
            vec![7u8; 100],
        ]
    }

    #[test]
    fn keyless_scan_splits_packs() {
        let enc = Keyring::from_materials(&[DataKeyMaterial::generate(1)], 1).unwrap();
        for (ring, encrypted) in [(enc, true), (Keyring::unencrypted(), false)] {
            let p = pack(&ring, &blocks());
            let s = scan_pack(&p, encrypted);
            assert_eq!(
                s,
                PackScan {
                    blocks: 4,
                    problems: vec![]
                }
            );

            // A flipped byte inside the second block.
            let mut bad = p.clone();
            let first = envelope_end(&p, 0, p.len()).unwrap();
            bad[first + 40] ^= 0x10;
            let s = scan_pack(&bad, encrypted);
            assert_eq!(s.blocks, 3, "{s:?}");
            assert_eq!(s.problems.len(), 1, "{s:?}");
            assert!(
                s.problems[0].starts_with(&format!("bytes {first}..")),
                "{s:?}"
            );

            // Truncated: the trailer is gone.
            let s = scan_pack(&p[..p.len() / 2], encrypted);
            assert!(!s.problems.is_empty());
            assert!(s.problems[0].starts_with("trailer"), "{s:?}");

            // Plaintext envelopes in an encrypted repository (and the reverse) are refused.
            let s = scan_pack(&p, !encrypted);
            assert!(!s.problems.is_empty());
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn window_arithmetic() {
        let a = (ts("2026-01-01T00:00:00Z"), ts("2026-01-01T10:00:00Z"));
        let b = (ts("2026-01-01T05:00:00Z"), ts("2026-01-01T12:00:00Z"));
        assert_eq!(merge(vec![b, a]), vec![(a.0, b.1)]);
        let ideal = BTreeMap::from([(TimelineId(1), vec![(a.0, b.1)])]);
        let with = BTreeMap::from([(
            TimelineId(1),
            vec![(ts("2026-01-01T02:00:00Z"), ts("2026-01-01T03:00:00Z"))],
        )]);
        let lost = lost_windows(&ideal, &with);
        assert_eq!(lost.len(), 2);
        assert_eq!(lost[0].to, "2026-01-01T02:00:00Z");
        assert_eq!(lost[1].from, "2026-01-01T03:00:00Z");
        assert!(lost_windows(&ideal, &ideal).is_empty());
    }

    fn model() -> Model {
        let s = SegmentSize::DEFAULT;
        let seg = s.bytes();
        let t1 = TimelineId(1);
        let mut w = TimelineWal::default();
        for n in 1..=6 {
            w.sealed.insert(SegmentNo(n));
        }
        w.parts.insert(SegmentNo(7), vec![(0, 100)]);
        let backup = |id: &str, start: u64, fin: &str| BackupModel {
            info: BackupInfo {
                id: id.into(),
                timeline: t1,
                end_timeline: t1,
                start_lsn: Lsn(start * seg + 40),
                end_lsn: Lsn(start * seg + 500),
                finished_at: fin.into(),
                system_identifier: "1".into(),
                packs: vec![format!("packs/{id}")],
            },
            finished: Some(ts(fin)),
            refs: None,
        };
        let idx = |n: u64, t: &str| {
            let c = Some((Lsn(n * seg + 100), ts(t)));
            (t1, Lsn(n * seg), Lsn((n + 1) * seg), [c, c])
        };
        Model {
            size: s,
            backups: vec![
                backup("a", 1, "2026-01-01T01:00:00Z"),
                backup("b", 4, "2026-01-01T04:00:00Z"),
            ],
            wal: BTreeMap::from([(t1, w)]),
            histories: BTreeMap::new(),
            inferred_histories: vec![],
            index: (1..=6)
                .map(|n| idx(n, &format!("2026-01-01T0{n}:30:00Z")))
                .collect(),
            keyed: true,
        }
    }

    #[test]
    fn damage_effects() {
        let m = model();
        let ideal = m.evaluate(&[]);
        assert_eq!(ideal.restorable.len(), 2);
        let full = vec![(ts("2026-01-01T01:00:00Z"), ts("2026-01-01T06:30:00Z"))];
        assert_eq!(ideal.windows[&TimelineId(1)], full);

        // Segment 3 gone: backup a reaches only the commits of segments 1-2; b is intact.
        let e = Effect::Sealed {
            tli: TimelineId(1),
            segno: SegmentNo(3),
        };
        let with = m.evaluate(&[&e]);
        assert_eq!(with.restorable.len(), 2);
        assert_eq!(
            with.windows[&TimelineId(1)],
            vec![
                (ts("2026-01-01T01:00:00Z"), ts("2026-01-01T02:30:00Z")),
                (ts("2026-01-01T04:00:00Z"), ts("2026-01-01T06:30:00Z"))
            ]
        );
        let lost = lost_windows(&ideal.windows, &with.windows);
        assert_eq!(lost.len(), 1);
        assert_eq!(
            (lost[0].from.as_str(), lost[0].to.as_str()),
            ("2026-01-01T02:30:00Z", "2026-01-01T04:00:00Z")
        );

        // Segment 4 gone: it holds backup b's start..end, so b is broken.
        let e = Effect::Sealed {
            tli: TimelineId(1),
            segno: SegmentNo(4),
        };
        let with = m.evaluate(&[&e]);
        assert!(!with.restorable.contains("b") && with.restorable.contains("a"));

        // A pack of backup a.
        let e = Effect::Blocks {
            pack: "packs/a".into(),
            offsets: None,
        };
        let with = m.evaluate(&[&e]);
        assert_eq!(with.restorable.iter().collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(
            with.windows[&TimelineId(1)],
            vec![(ts("2026-01-01T04:00:00Z"), ts("2026-01-01T06:30:00Z"))]
        );

        // Gaps: missing segment 5 in the stored WAL is found.
        let mut m2 = model();
        m2.wal
            .get_mut(&TimelineId(1))
            .unwrap()
            .sealed
            .remove(&SegmentNo(5));
        let path = m2.path_to(TimelineId(1), &Applied::default());
        let g = gaps(&m2.wal, &path, 1, m2.size);
        assert_eq!(
            g,
            vec![Lsn(5 * m2.size.bytes()), Lsn(7 * m2.size.bytes() + 100)]
        );
    }
}
