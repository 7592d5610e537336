//! The writer lease: at most one process at a time may delete from (or otherwise
//! reorganise) a repository.
//!
//! # Design
//!
//! Every object in a repository is written create-only, and a lease is no exception, so
//! a lease cannot be renewed by overwriting it. Instead the lease is a numbered series of
//! small JSON objects, one per *epoch*:
//!
//! ```text
//! lease/writer/00000000000000000007    {"holder": "db1:4242:9f3c…", "purpose": "expire", "epoch": 7,
//!                                        "acquired_at": …, "renewed_at": …, "expires_at": …, …}
//! ```
//!
//! The object with the highest epoch is the lease. Its record says who holds it and
//! until when. Older epochs are garbage and are deleted by whoever writes a newer one.
//!
//! - **acquire**: list `lease/writer/`; if the highest epoch `E` is live (its `expires_at`
//!   is in the future) and not released, refuse, naming the holder. Otherwise create
//!   epoch `E+1` (create-only). Two contenders that saw the same `E` race for the same
//!   name and the store lets exactly one create it; the loser reads the winner's record
//!   and refuses. The winner lists once more and backs off if an even higher epoch exists
//!   (a contender that listed later and already moved on), then deletes epochs below its own.
//! - **renew**: check that our epoch `E` still holds our record, create `E+1` with a new
//!   expiry (create-only: if a taker-over already created `E+1`, we lost), list to make
//!   sure `E+1` is the highest, then delete `E`.
//! - **release**: create `E+1` as a *released* record (expired at once), then delete `E`.
//!   Epochs therefore only grow and are never reused, so a holder that lost its lease can
//!   never delete or overwrite a later holder's object.
//! - **expiry / takeover**: a holder that dies stops renewing; once `expires_at` passes,
//!   the next `acquire` takes over by creating the next epoch. A holder that was paused
//!   past its expiry finds out on its next renewal (its epoch is gone or `E+1` exists).
//!
//! The records are plain JSON (not encrypted), so an operator — or another agent without
//! the master key — can see who holds the lease. Liveness compares the holder's
//! `expires_at` with the reader's clock: the TTL must be well above the clock skew
//! between writers (a minute against NTP-synchronised hosts is plenty).
//!
//! A lease is advisory: it protects walferry writers from each other, not from someone
//! deleting objects by hand.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use walferry_formats::{Error, Repository};

/// Where the writer lease's epochs live.
pub const LEASE_PREFIX: &str = "lease/writer";

/// A TTL that suits most holders: renewed every third of it by [`Lease::keep_alive`].
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// What a lease object says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Unique per acquisition: `<host>:<pid>:<random hex>`.
    pub holder: String,
    pub host: String,
    pub pid: u32,
    /// What the holder is doing: `run`, `backup`, `expire`, ...
    pub purpose: String,
    pub epoch: u64,
    pub acquired_at: Timestamp,
    pub renewed_at: Timestamp,
    pub expires_at: Timestamp,
    /// Set by [`Lease::release`]: the lease is free.
    #[serde(default)]
    pub released: bool,
    /// The holder's PID namespace and process start time, so a holder on this host that
    /// died (kill -9) can be recognised at once instead of waiting for the TTL.
    #[serde(default)]
    pub pid_ns: Option<String>,
    #[serde(default)]
    pub pid_start: Option<u64>,
}

impl LeaseRecord {
    /// Whether this record still excludes other writers at `now`.
    pub fn is_live(&self, now: Timestamp) -> bool {
        !self.released && now < self.expires_at && !self.holder_died_here()
    }

    /// True only when the holder ran in this host's PID namespace and that process is
    /// gone (or a zombie, or its pid was reused). Anything uncertain counts as alive.
    fn holder_died_here(&self) -> bool {
        let (Some(ns), Some(start)) = (&self.pid_ns, self.pid_start) else {
            return false;
        };
        if self.host != host_name() || pid_namespace().as_ref() != Some(ns) {
            return false;
        }
        match process_start(self.pid) {
            None => true,
            Some((_, true)) => true,
            Some((t, false)) => t != start,
        }
    }

    fn to_json(&self) -> Bytes {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        Bytes::from(v)
    }

    fn from_json(key: &str, bytes: &[u8]) -> Result<Self, LeaseError> {
        serde_json::from_slice(bytes).map_err(|e| LeaseError::Malformed {
            key: key.to_string(),
            reason: e.to_string(),
        })
    }
}

impl std::fmt::Display for LeaseRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (purpose {}, pid {} on {}), acquired {}, renewed {}, expires {}",
            self.holder,
            self.purpose,
            self.pid,
            self.host,
            self.acquired_at
                .round(jiff::Unit::Second)
                .unwrap_or(self.acquired_at),
            self.renewed_at
                .round(jiff::Unit::Second)
                .unwrap_or(self.renewed_at),
            self.expires_at
                .round(jiff::Unit::Second)
                .unwrap_or(self.expires_at),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("the repository's writer lease is held by {0}; another walferry writer is working on this repository. Wait for it to finish, or, if it died, until the lease expires")]
    Held(Box<LeaseRecord>),
    #[error("the writer lease was lost: {0}")]
    Lost(String),
    #[error("lease object {key} is malformed: {reason}")]
    Malformed { key: String, reason: String },
    #[error("lease TTL must be at least one second")]
    BadTtl,
    #[error("writer lease: {0}")]
    Store(#[from] Error),
}

/// A held writer lease. Renew it (or let [`Lease::keep_alive`] do it) more often than its
/// TTL, and [`Lease::release`] it when done; dropping it without releasing leaves it to
/// expire (a best-effort release is attempted in the background).
pub struct Lease {
    inner: Arc<Inner>,
}

struct Inner {
    repo: Repository,
    ttl: Duration,
    state: Mutex<State>,
    lost: CancellationToken,
    done: CancellationToken,
}

struct State {
    record: LeaseRecord,
    released: bool,
}

fn epoch_key(epoch: u64) -> String {
    format!("{LEASE_PREFIX}/{epoch:020}")
}

/// Epochs present in the store, sorted.
async fn list_epochs(repo: &Repository) -> Result<Vec<u64>, LeaseError> {
    let mut epochs: Vec<u64> = repo
        .list(LEASE_PREFIX)
        .await?
        .iter()
        .filter_map(|o| o.key.strip_prefix(LEASE_PREFIX)?.strip_prefix('/'))
        .filter(|name| name.len() == 20)
        .filter_map(|name| name.parse::<u64>().ok())
        .collect();
    epochs.sort_unstable();
    Ok(epochs)
}

async fn read_epoch(repo: &Repository, epoch: u64) -> Result<Option<LeaseRecord>, LeaseError> {
    let key = epoch_key(epoch);
    match repo.get(&key).await {
        Ok(b) => LeaseRecord::from_json(&key, &b).map(Some),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Creates `record` at its epoch. Ok(false) when another record already has that name.
async fn create(repo: &Repository, record: &LeaseRecord) -> Result<bool, LeaseError> {
    match repo.put(&epoch_key(record.epoch), record.to_json()).await {
        Ok(_) => Ok(true),
        Err(Error::Conflict { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn ttl_span(ttl: Duration) -> jiff::SignedDuration {
    jiff::SignedDuration::try_from(ttl).unwrap_or(jiff::SignedDuration::MAX)
}

/// This process's PID namespace, e.g. `pid:[4026531836]`.
fn pid_namespace() -> Option<String> {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .map(|p| p.display().to_string())
}

/// A process's start time (clock ticks since boot) and whether it is a zombie.
fn process_start(pid: u32) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let zombie = fields.first() == Some(&"Z");
    let start = fields.get(19)?.parse().ok()?;
    Some((start, zombie))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// 48 random bits, from the standard library's per-process random hash keys.
fn random_u48() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() & 0xFFFF_FFFF_FFFF
}

impl Lease {
    /// Who holds the writer lease now, if anyone (a released or expired record is returned
    /// too; check [`LeaseRecord::is_live`]).
    pub async fn current(repo: &Repository) -> Result<Option<LeaseRecord>, LeaseError> {
        for _ in 0..5 {
            let Some(&top) = list_epochs(repo).await?.last() else {
                return Ok(None);
            };
            if let Some(r) = read_epoch(repo, top).await? {
                return Ok(Some(r));
            }
            // Deleted between list and get: a newer epoch exists now.
        }
        Err(LeaseError::Lost(
            "the lease objects kept changing while being read".into(),
        ))
    }

    /// Takes the writer lease for `purpose`, or fails with [`LeaseError::Held`] naming the
    /// live holder. An expired (or released) lease is taken over.
    pub async fn acquire(
        repo: &Repository,
        purpose: &str,
        ttl: Duration,
    ) -> Result<Lease, LeaseError> {
        if ttl < Duration::from_secs(1) {
            return Err(LeaseError::BadTtl);
        }
        let host = host_name();
        let pid = std::process::id();
        let holder = format!("{host}:{pid}:{:012x}", random_u48());
        for _ in 0..8 {
            let epochs = list_epochs(repo).await?;
            let top = epochs.last().copied();
            if let Some(top) = top {
                match read_epoch(repo, top).await? {
                    Some(r) if r.is_live(Timestamp::now()) => {
                        return Err(LeaseError::Held(Box::new(r)))
                    }
                    Some(_) => {}
                    // Gone between list and get: someone moved on; look again.
                    None => continue,
                }
            }
            let now = Timestamp::now();
            let record = LeaseRecord {
                holder: holder.clone(),
                host: host.clone(),
                pid,
                purpose: purpose.to_string(),
                epoch: top.map_or(1, |t| t + 1),
                acquired_at: now,
                renewed_at: now,
                expires_at: now.saturating_add(ttl_span(ttl)).unwrap_or(now),
                released: false,
                pid_ns: pid_namespace(),
                pid_start: process_start(pid).map(|(t, _)| t),
            };
            if !create(repo, &record).await? {
                // Someone else created this epoch first: theirs is the lease now.
                match read_epoch(repo, record.epoch).await? {
                    Some(r) if r.is_live(Timestamp::now()) => {
                        return Err(LeaseError::Held(Box::new(r)))
                    }
                    _ => continue,
                }
            }
            // A contender that listed after us may already be past our epoch.
            let after = list_epochs(repo).await?;
            if let Some(&higher) = after.iter().find(|&&e| e > record.epoch) {
                let _ = repo.delete(&epoch_key(record.epoch)).await;
                match read_epoch(repo, higher).await? {
                    Some(r) if r.is_live(Timestamp::now()) => {
                        return Err(LeaseError::Held(Box::new(r)))
                    }
                    _ => continue,
                }
            }
            for old in after.iter().filter(|&&e| e < record.epoch) {
                repo.delete(&epoch_key(*old)).await?;
            }
            tracing::info!(holder = %record.holder, epoch = record.epoch, purpose, "acquired the writer lease");
            return Ok(Lease {
                inner: Arc::new(Inner {
                    repo: repo.clone(),
                    ttl,
                    state: Mutex::new(State {
                        record,
                        released: false,
                    }),
                    lost: CancellationToken::new(),
                    done: CancellationToken::new(),
                }),
            });
        }
        Err(LeaseError::Lost(
            "the lease objects kept changing while acquiring; another writer is starting too"
                .into(),
        ))
    }

    /// The record as last written.
    pub async fn record(&self) -> LeaseRecord {
        self.inner.state.lock().await.record.clone()
    }

    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// Cancelled when a renewal finds the lease lost (taken over after it expired), or it
    /// expired because renewals kept failing. Work done under the lease should stop when
    /// it fires.
    pub fn lost_token(&self) -> CancellationToken {
        self.inner.lost.clone()
    }

    /// Extends the lease by its TTL from now (writes the next epoch).
    pub async fn renew(&self) -> Result<(), LeaseError> {
        self.inner.renew().await
    }

    /// Fails unless the lease is still ours, renewing it first when less than two thirds
    /// of its TTL are left. Call before each destructive step.
    pub async fn ensure_held(&self) -> Result<(), LeaseError> {
        let mut st = self.inner.state.lock().await;
        if self.inner.lost.is_cancelled() {
            return Err(LeaseError::Lost("a renewal found it taken".into()));
        }
        let left = st.record.expires_at.duration_since(Timestamp::now());
        if left < ttl_span(self.inner.ttl.mul_f64(2.0 / 3.0)) {
            self.inner.renew_checked(&mut st).await?;
        }
        Ok(())
    }

    /// Renews every third of the TTL in the background until the lease is released or
    /// lost (then [`Lease::lost_token`] fires). A failed renewal is retried on the next
    /// tick while the lease has not yet expired.
    pub fn keep_alive(&self) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        let every = (inner.ttl / 3).max(Duration::from_millis(200));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = inner.done.cancelled() => return,
                    _ = inner.lost.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                match inner.renew().await {
                    Ok(()) => {}
                    Err(LeaseError::Lost(why)) => {
                        if !inner.done.is_cancelled() {
                            tracing::error!("the writer lease was lost: {why}");
                        }
                        return;
                    }
                    Err(e) => {
                        let st = inner.state.lock().await;
                        if !st.record.is_live(Timestamp::now()) {
                            tracing::error!("the writer lease expired; renewing failed: {e}");
                            inner.lost.cancel();
                            return;
                        }
                        tracing::warn!("renewing the writer lease failed (will retry): {e}");
                    }
                }
            }
        })
    }

    /// Gives the lease up: writes a released record as the next epoch and removes ours.
    pub async fn release(self) -> Result<(), LeaseError> {
        self.inner.release().await
    }
}

impl Inner {
    async fn renew(&self) -> Result<(), LeaseError> {
        let mut st = self.state.lock().await;
        self.renew_checked(&mut st).await
    }

    /// Renews; a lost lease also fires the lost token.
    async fn renew_checked(&self, st: &mut State) -> Result<(), LeaseError> {
        let r = self.renew_locked(st).await;
        if matches!(r, Err(LeaseError::Lost(_))) && !st.released {
            self.lost.cancel();
        }
        r
    }

    async fn renew_locked(&self, st: &mut State) -> Result<(), LeaseError> {
        if st.released {
            return Err(LeaseError::Lost("it was released".into()));
        }
        if self.lost.is_cancelled() {
            return Err(LeaseError::Lost("an earlier renewal found it taken".into()));
        }
        let repo = &self.repo;
        let cur = st.record.epoch;
        match read_epoch(repo, cur).await? {
            Some(r) if r.holder == st.record.holder => {}
            _ => {
                return Err(LeaseError::Lost(format!(
                    "epoch {cur} is no longer ours (the lease expired and another writer took it)"
                )))
            }
        }
        let now = Timestamp::now();
        let next = LeaseRecord {
            epoch: cur + 1,
            renewed_at: now,
            expires_at: now.saturating_add(ttl_span(self.ttl)).unwrap_or(now),
            ..st.record.clone()
        };
        if !create(repo, &next).await? {
            let who = read_epoch(repo, cur + 1)
                .await?
                .map_or_else(|| "another writer".to_string(), |r| r.to_string());
            return Err(LeaseError::Lost(format!("taken over by {who}")));
        }
        let epochs = list_epochs(repo).await?;
        if let Some(&higher) = epochs.iter().find(|&&e| e > next.epoch) {
            let _ = repo.delete(&epoch_key(next.epoch)).await;
            return Err(LeaseError::Lost(format!(
                "a newer lease epoch {higher} exists"
            )));
        }
        st.record = next;
        for old in epochs.iter().filter(|&&e| e <= cur) {
            repo.delete(&epoch_key(*old)).await?;
        }
        tracing::debug!(epoch = st.record.epoch, expires = %st.record.expires_at, "renewed the writer lease");
        Ok(())
    }

    async fn release(&self) -> Result<(), LeaseError> {
        let mut st = self.state.lock().await;
        if st.released {
            return Ok(());
        }
        st.released = true;
        self.done.cancel();
        if self.lost.is_cancelled() {
            return Ok(());
        }
        let repo = &self.repo;
        let cur = st.record.epoch;
        match read_epoch(repo, cur).await? {
            Some(r) if r.holder == st.record.holder => {}
            // Not ours any more: nothing to give up.
            _ => return Ok(()),
        }
        let now = Timestamp::now();
        let next = LeaseRecord {
            epoch: cur + 1,
            renewed_at: now,
            expires_at: now,
            released: true,
            ..st.record.clone()
        };
        if create(repo, &next).await? {
            repo.delete(&epoch_key(cur)).await?;
            tracing::info!(holder = %next.holder, "released the writer lease");
        }
        Ok(())
    }
}

impl Drop for Lease {
    /// Best effort: stops the keep-alive and releases in the background when a runtime is
    /// there to run it. At process exit the lease may stay until it expires; call
    /// [`Lease::release`] for a prompt hand-over.
    fn drop(&mut self) {
        self.inner.done.cancel();
        let released = self.inner.state.try_lock().map_or(true, |s| s.released);
        if released || self.inner.lost.is_cancelled() {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let inner = self.inner.clone();
            handle.spawn(async move {
                if let Err(e) = inner.release().await {
                    tracing::warn!(
                        "releasing the writer lease on drop failed (it expires by itself): {e}"
                    );
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn repos() -> (tempfile::TempDir, Vec<Repository>) {
        let dir = tempfile::tempdir().unwrap();
        let file = format!("file://{}/repo", dir.path().display());
        let none = Vec::<(String, String)>::new();
        let repos = vec![
            Repository::open("memory:///", none.clone()).unwrap(),
            Repository::open(&file, none).unwrap(),
        ];
        (dir, repos)
    }

    async fn epochs(repo: &Repository) -> Vec<u64> {
        list_epochs(repo).await.unwrap()
    }

    #[tokio::test]
    async fn second_writer_is_refused_naming_the_holder_until_release() {
        let (_d, repos) = repos();
        for repo in repos {
            let a = Lease::acquire(&repo, "expire", DEFAULT_TTL).await.unwrap();
            let holder = a.record().await.holder;
            assert!(
                holder.contains(&format!(":{}:", std::process::id())),
                "{holder}"
            );
            let e = Lease::acquire(&repo, "backup", DEFAULT_TTL)
                .await
                .err()
                .unwrap();
            let msg = e.to_string();
            assert!(matches!(e, LeaseError::Held(_)), "{msg}");
            assert!(
                msg.contains(&holder) && msg.contains("purpose expire"),
                "{msg}"
            );
            assert!(msg.contains("expires"), "{msg}");
            let cur = Lease::current(&repo).await.unwrap().unwrap();
            assert!(cur.is_live(Timestamp::now()) && cur.holder == holder);
            a.release().await.unwrap();
            // One released record remains; epochs only grow.
            let after = epochs(&repo).await;
            assert_eq!(after.len(), 1);
            let cur = Lease::current(&repo).await.unwrap().unwrap();
            assert!(cur.released && !cur.is_live(Timestamp::now()));
            let b = Lease::acquire(&repo, "backup", DEFAULT_TTL).await.unwrap();
            let rb = b.record().await;
            assert!(rb.epoch > after[0] && rb.purpose == "backup");
            assert_eq!(epochs(&repo).await, [rb.epoch]);
            b.release().await.unwrap();
        }
    }

    #[tokio::test]
    async fn renewal_writes_new_epochs_and_keeps_others_out() {
        let (_d, repos) = repos();
        for repo in repos {
            let ttl = Duration::from_secs(1);
            let a = Lease::acquire(&repo, "run", ttl).await.unwrap();
            let first = a.record().await;
            let keep = a.keep_alive();
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                assert!(matches!(
                    Lease::acquire(&repo, "expire", ttl).await,
                    Err(LeaseError::Held(_))
                ));
            }
            let now = a.record().await;
            assert!(now.epoch > first.epoch + 2, "{} {}", now.epoch, first.epoch);
            assert_eq!(now.acquired_at, first.acquired_at);
            assert!(now.expires_at > first.expires_at);
            // Old epochs are cleaned up as it goes.
            assert!(epochs(&repo).await.len() <= 2);
            a.ensure_held().await.unwrap();
            assert!(!a.lost_token().is_cancelled());
            a.release().await.unwrap();
            keep.await.unwrap();
            Lease::acquire(&repo, "expire", ttl)
                .await
                .unwrap()
                .release()
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_and_its_old_holder_finds_out() {
        let (_d, repos) = repos();
        for repo in repos {
            let ttl = Duration::from_secs(1);
            let stale = Lease::acquire(&repo, "backup", ttl).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let b = Lease::acquire(&repo, "expire", DEFAULT_TTL).await.unwrap();
            let rb = b.record().await;
            // The stale holder cannot renew, sees the loss, and its release leaves b alone.
            assert!(matches!(stale.renew().await, Err(LeaseError::Lost(_))));
            assert!(stale.lost_token().is_cancelled());
            assert!(matches!(
                stale.ensure_held().await,
                Err(LeaseError::Lost(_))
            ));
            stale.release().await.unwrap();
            let cur = Lease::current(&repo).await.unwrap().unwrap();
            assert_eq!(cur.holder, rb.holder);
            assert!(cur.is_live(Timestamp::now()));
            b.renew().await.unwrap();
            b.release().await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn exactly_one_of_many_contenders_wins() {
        let (_d, repos) = repos();
        for repo in repos {
            for round in 0..3 {
                let tasks: Vec<_> = (0..8)
                    .map(|i| {
                        let repo = repo.clone();
                        tokio::spawn(async move {
                            Lease::acquire(&repo, &format!("c{i}"), DEFAULT_TTL).await
                        })
                    })
                    .collect();
                let mut won = Vec::new();
                for t in tasks {
                    match t.await.unwrap() {
                        Ok(l) => won.push(l),
                        Err(LeaseError::Held(_)) => {}
                        Err(e) => panic!("round {round}: {e}"),
                    }
                }
                assert_eq!(won.len(), 1, "round {round}");
                let winner = won.pop().unwrap();
                let cur = Lease::current(&repo).await.unwrap().unwrap();
                assert_eq!(cur.holder, winner.record().await.holder);
                winner.release().await.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn dropping_releases_in_the_background() {
        let (_d, repos) = repos();
        for repo in repos {
            let a = Lease::acquire(&repo, "expire", DEFAULT_TTL).await.unwrap();
            let _keep = a.keep_alive();
            drop(a);
            let mut free = false;
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if let Ok(b) = Lease::acquire(&repo, "expire", DEFAULT_TTL).await {
                    b.release().await.unwrap();
                    free = true;
                    break;
                }
            }
            assert!(free, "the dropped lease was not released");
        }
    }

    #[tokio::test]
    async fn ttl_below_a_second_is_refused() {
        let repo = Repository::open("memory:///", Vec::<(String, String)>::new()).unwrap();
        assert!(matches!(
            Lease::acquire(&repo, "x", Duration::from_millis(10)).await,
            Err(LeaseError::BadTtl)
        ));
    }
}
