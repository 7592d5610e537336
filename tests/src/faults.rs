//! A fault-injecting [`ObjectStore`] wrapper: fails, delays, or loses the responses of a
//! share of calls, as a flaky network between walferry and its bucket would.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use walferry_tests::faults::{FaultConfig, FaultyStore};
//! # fn f(inner: Arc<dyn object_store::ObjectStore>) {
//! let faulty = Arc::new(FaultyStore::new(inner, FaultConfig {
//!     fail_before: 0.3,
//!     drop_response: 0.3,
//!     ..FaultConfig::quiet(42)
//! }));
//! // ... use it through a Repository, then:
//! assert!(faulty.stats().injected() > 0);
//! # }
//! ```
//!
//! Every injected error is `object_store::Error::Generic { store: "faulty", .. }`, which
//! walferry treats as transient (like an HTTP failure that survived object_store's retries).
//!
//! Kinds of fault:
//! - *fail before*: the call fails without reaching the inner store (nothing happened);
//! - *dropped response*: a write (put, multipart complete, delete, copy, rename) reached the
//!   inner store and succeeded, but the caller gets an error (the "lost response" case);
//! - *broken body*: a get or list succeeded, but its stream breaks after the first chunk;
//! - *delay*: the call is delayed by a random duration from `delay_range` first;
//! - *outage*: while [`FaultyStore::set_enabled`]`(false)`, every call fails before
//!   reaching the store, regardless of the probabilities.
//!
//! Determinism: the decision for a call is drawn from an RNG seeded by
//! `(seed, operation, path, how many times this operation was called on this path)`, so
//! the same sequence of calls per path sees the same faults however tasks interleave.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
    UploadPart,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The `store` name carried by every injected error.
pub const FAULTY_STORE: &str = "faulty";

/// What and how often to inject. Probabilities are in `0.0..=1.0`.
#[derive(Clone, Debug)]
pub struct FaultConfig {
    /// Seed of every decision.
    pub seed: u64,
    /// Probability that a call fails before it reaches the inner store.
    pub fail_before: f64,
    /// Probability that a successful write's response is replaced by an error.
    pub drop_response: f64,
    /// Probability that a successful get's or list's stream breaks after its first chunk.
    pub break_body: f64,
    /// Probability that a call is delayed (by a duration drawn from `delay_range`).
    pub delay: f64,
    pub delay_range: Range<Duration>,
}

impl FaultConfig {
    /// No faults at all (until changed); a starting point for `..FaultConfig::quiet(seed)`.
    pub fn quiet(seed: u64) -> Self {
        FaultConfig {
            seed,
            fail_before: 0.0,
            drop_response: 0.0,
            break_body: 0.0,
            delay: 0.0,
            delay_range: Duration::ZERO..Duration::ZERO,
        }
    }

    /// A rough network: 30% of calls fail, 30% of write responses are lost, 10% of bodies
    /// break, half the calls are delayed by up to 5 ms.
    pub fn flaky(seed: u64) -> Self {
        FaultConfig {
            seed,
            fail_before: 0.3,
            drop_response: 0.3,
            break_body: 0.1,
            delay: 0.5,
            delay_range: Duration::ZERO..Duration::from_millis(5),
        }
    }
}

/// Counts of what a [`FaultyStore`] did (a snapshot; see [`FaultyStore::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Calls made to the wrapper (including multipart part/complete calls).
    pub calls: u64,
    /// Calls failed before reaching the inner store by chance.
    pub failed_before: u64,
    /// Calls failed before reaching the inner store because the store was disabled.
    pub outage_failures: u64,
    /// Writes that happened but whose response was replaced by an error.
    pub dropped_responses: u64,
    /// Of `dropped_responses`, those of `put_opts` (single-request puts).
    pub dropped_put_responses: u64,
    /// Get or list streams broken after their first chunk.
    pub broken_bodies: u64,
    /// Calls delayed.
    pub delayed: u64,
}

impl FaultStats {
    /// Every injected error (delays are not errors).
    pub fn injected(&self) -> u64 {
        self.failed_before + self.outage_failures + self.dropped_responses + self.broken_bodies
    }
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    failed_before: AtomicU64,
    outage_failures: AtomicU64,
    dropped_responses: AtomicU64,
    dropped_put_responses: AtomicU64,
    broken_bodies: AtomicU64,
    delayed: AtomicU64,
}

struct State {
    config: Mutex<FaultConfig>,
    /// false: a total outage, every call fails.
    enabled: AtomicBool,
    /// false: probabilistic faults paused (the outage switch still applies).
    faults: AtomicBool,
    /// Calls so far per (operation, path), for per-call seeds.
    sequence: Mutex<HashMap<(&'static str, String), u64>>,
    counters: Counters,
}

/// The decisions for one call.
struct Plan {
    outage: bool,
    fail_before: bool,
    drop_response: bool,
    break_body: bool,
    delay: Option<Duration>,
}

impl State {
    fn plan(&self, op: &'static str, path: &str) -> Plan {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let n = {
            let mut seq = self.sequence.lock().unwrap_or_else(|e| e.into_inner());
            let n = seq.entry((op, path.to_owned())).or_insert(0);
            *n += 1;
            *n
        };
        let cfg = self
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let outage = !self.enabled.load(Ordering::SeqCst);
        if outage || !self.faults.load(Ordering::SeqCst) {
            return Plan {
                outage,
                fail_before: false,
                drop_response: false,
                break_body: false,
                delay: None,
            };
        }
        let mut h = Fnv::new();
        h.write(&cfg.seed.to_le_bytes());
        h.write(op.as_bytes());
        h.write(&[0]);
        h.write(path.as_bytes());
        h.write(&[0]);
        h.write(&n.to_le_bytes());
        let mut rng = StdRng::seed_from_u64(h.finish());
        let mut chance = |p: f64| rng.gen_bool(p.clamp(0.0, 1.0));
        let fail_before = chance(cfg.fail_before);
        let drop_response = chance(cfg.drop_response);
        let break_body = chance(cfg.break_body);
        let delayed = chance(cfg.delay);
        let delay = if delayed && cfg.delay_range.end > cfg.delay_range.start {
            Some(rng.gen_range(cfg.delay_range.clone()))
        } else if delayed {
            Some(cfg.delay_range.start)
        } else {
            None
        };
        Plan {
            outage: false,
            fail_before,
            drop_response,
            break_body,
            delay,
        }
    }

    /// Applies delay, then outage or pre-failure. `Err` means: do not call the inner store.
    async fn before(&self, plan: &Plan, op: &'static str, path: &str) -> Result<()> {
        if let Some(d) = plan.delay {
            self.counters.delayed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(d).await;
        }
        if plan.outage {
            self.counters
                .outage_failures
                .fetch_add(1, Ordering::Relaxed);
            return Err(injected(format!("{op} {path}: store unavailable (outage)")));
        }
        if plan.fail_before {
            self.counters.failed_before.fetch_add(1, Ordering::Relaxed);
            return Err(injected(format!(
                "{op} {path}: connection reset before the request was sent"
            )));
        }
        Ok(())
    }

    /// For writes: replaces a success by a lost-response error when planned.
    fn after_write<T>(&self, plan: &Plan, op: &'static str, path: &str, r: Result<T>) -> Result<T> {
        match r {
            Ok(_) if plan.drop_response => {
                self.counters
                    .dropped_responses
                    .fetch_add(1, Ordering::Relaxed);
                if op == "put" {
                    self.counters
                        .dropped_put_responses
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(injected(format!(
                    "{op} {path}: response lost (the write did happen)"
                )))
            }
            r => r,
        }
    }

    /// Breaks a stream after its first item, when planned.
    fn wrap_stream<T: Send + 'static>(
        self: &Arc<Self>,
        plan: &Plan,
        op: &'static str,
        path: &str,
        s: BoxStream<'static, Result<T>>,
    ) -> BoxStream<'static, Result<T>> {
        if !plan.break_body {
            return s;
        }
        let state = Arc::clone(self);
        let msg = format!("{op} {path}: connection reset while reading the response");
        s.take(1)
            .chain(stream::once(async move {
                state.counters.broken_bodies.fetch_add(1, Ordering::Relaxed);
                Err(injected(msg))
            }))
            .boxed()
    }
}

fn injected(msg: String) -> object_store::Error {
    object_store::Error::Generic {
        store: FAULTY_STORE,
        source: msg.into(),
    }
}

/// FNV-1a then a splitmix64 finaliser: a hash that is stable across Rust releases.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// An [`ObjectStore`] that injects faults into calls to an inner store.
#[derive(Clone)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    state: Arc<State>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, config: FaultConfig) -> Self {
        FaultyStore {
            inner,
            state: Arc::new(State {
                config: Mutex::new(config),
                enabled: AtomicBool::new(true),
                faults: AtomicBool::new(true),
                sequence: Mutex::new(HashMap::new()),
                counters: Counters::default(),
            }),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// `false`: a total outage, every call fails before reaching the store (counted in
    /// `outage_failures`). `true` (the default): back to the configured fault rates.
    pub fn set_enabled(&self, enabled: bool) {
        self.state.enabled.store(enabled, Ordering::SeqCst);
    }

    pub fn is_enabled(&self) -> bool {
        self.state.enabled.load(Ordering::SeqCst)
    }

    /// Pauses (`false`) or resumes (`true`, the default) the probabilistic faults and delays.
    pub fn set_faults(&self, on: bool) {
        self.state.faults.store(on, Ordering::SeqCst);
    }

    /// Replaces the fault configuration (takes effect for calls made from now on).
    pub fn set_config(&self, config: FaultConfig) {
        *self.state.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
    }

    pub fn config(&self) -> FaultConfig {
        self.state
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn stats(&self) -> FaultStats {
        let c = &self.state.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultStats {
            calls: get(&c.calls),
            failed_before: get(&c.failed_before),
            outage_failures: get(&c.outage_failures),
            dropped_responses: get(&c.dropped_responses),
            dropped_put_responses: get(&c.dropped_put_responses),
            broken_bodies: get(&c.broken_bodies),
            delayed: get(&c.delayed),
        }
    }
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyStore")
            .field("inner", &self.inner)
            .field("config", &self.config())
            .field("enabled", &self.is_enabled())
            .field("stats", &self.stats())
            .finish()
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

fn opt_path(p: Option<&Path>) -> String {
    p.map(|p| p.to_string()).unwrap_or_default()
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let path = location.as_ref();
        let plan = self.state.plan("put", path);
        self.state.before(&plan, "put", path).await?;
        let r = self.inner.put_opts(location, payload, opts).await;
        self.state.after_write(&plan, "put", path, r)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        let path = location.as_ref();
        let plan = self.state.plan("put_multipart", path);
        self.state.before(&plan, "put_multipart", path).await?;
        let upload = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultyUpload {
            inner: upload,
            state: Arc::clone(&self.state),
            path: path.to_owned(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let path = location.as_ref();
        let op = if options.head { "head" } else { "get" };
        let plan = self.state.plan(op, path);
        self.state.before(&plan, op, path).await?;
        let head = options.head;
        let mut r = self.inner.get_opts(location, options).await?;
        if head || !plan.break_body {
            return Ok(r);
        }
        let meta = r.meta.clone();
        let range = r.range.clone();
        let attributes = r.attributes.clone();
        let extensions = std::mem::take(&mut r.extensions);
        let body = self.state.wrap_stream(&plan, op, path, r.into_stream());
        Ok(GetResult {
            payload: GetResultPayload::Stream(body),
            meta,
            range,
            attributes,
            extensions,
        })
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let path = location.as_ref();
        let plan = self.state.plan("get_ranges", path);
        self.state.before(&plan, "get_ranges", path).await?;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        // Each location is decided on its own: one that fails before is not passed on; the
        // others are deleted by the inner store (one by one, so each result meets its plan),
        // and may have their response dropped.
        let state = Arc::clone(&self.state);
        let inner = Arc::clone(&self.inner);
        locations
            .then(move |loc| {
                let state = Arc::clone(&state);
                let inner = Arc::clone(&inner);
                async move {
                    let loc = loc?;
                    let plan = state.plan("delete", loc.as_ref());
                    state.before(&plan, "delete", loc.as_ref()).await?;
                    let one = stream::once(futures::future::ready(Ok(loc.clone()))).boxed();
                    let r = inner
                        .delete_stream(one)
                        .next()
                        .await
                        .unwrap_or_else(|| Ok(loc.clone()));
                    state.after_write(&plan, "delete", loc.as_ref(), r)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let path = opt_path(prefix);
        let plan = self.state.plan("list", &path);
        let state = Arc::clone(&self.state);
        let inner = Arc::clone(&self.inner);
        let prefix = prefix.cloned();
        stream::once(async move {
            if let Err(e) = state.before(&plan, "list", &path).await {
                return stream::once(futures::future::ready(Err(e))).boxed();
            }
            let s = inner.list(prefix.as_ref());
            state.wrap_stream(&plan, "list", &path, s)
        })
        .flatten()
        .boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let path = opt_path(prefix);
        let plan = self.state.plan("list", &path);
        let state = Arc::clone(&self.state);
        let inner = Arc::clone(&self.inner);
        let prefix = prefix.cloned();
        let offset = offset.clone();
        stream::once(async move {
            if let Err(e) = state.before(&plan, "list", &path).await {
                return stream::once(futures::future::ready(Err(e))).boxed();
            }
            let s = inner.list_with_offset(prefix.as_ref(), &offset);
            state.wrap_stream(&plan, "list", &path, s)
        })
        .flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let path = opt_path(prefix);
        let plan = self.state.plan("list_with_delimiter", &path);
        self.state
            .before(&plan, "list_with_delimiter", &path)
            .await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        let path = to.as_ref();
        let plan = self.state.plan("copy", path);
        self.state.before(&plan, "copy", path).await?;
        let r = self.inner.copy_opts(from, to, options).await;
        self.state.after_write(&plan, "copy", path, r)
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        let path = to.as_ref();
        let plan = self.state.plan("rename", path);
        self.state.before(&plan, "rename", path).await?;
        let r = self.inner.rename_opts(from, to, options).await;
        self.state.after_write(&plan, "rename", path, r)
    }
}

/// A multipart upload whose parts and completion see the same faults as other calls.
struct FaultyUpload {
    inner: Box<dyn MultipartUpload>,
    state: Arc<State>,
    path: String,
}

impl fmt::Debug for FaultyUpload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyUpload")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl MultipartUpload for FaultyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let plan = self.state.plan("put_part", &self.path);
        // The part request is only issued (and its future created) if the call gets through;
        // create it now, since `put_part` borrows the upload mutably.
        let part = if plan.outage || plan.fail_before {
            None
        } else {
            Some(self.inner.put_part(data))
        };
        let state = Arc::clone(&self.state);
        let path = self.path.clone();
        Box::pin(async move {
            state.before(&plan, "put_part", &path).await?;
            let r = match part {
                Some(p) => p.await,
                None => Ok(()),
            };
            state.after_write(&plan, "put_part", &path, r)
        })
    }

    async fn complete(&mut self) -> Result<PutResult> {
        let plan = self.state.plan("complete", &self.path);
        self.state.before(&plan, "complete", &self.path).await?;
        let r = self.inner.complete().await;
        self.state.after_write(&plan, "complete", &self.path, r)
    }

    async fn abort(&mut self) -> Result<()> {
        let plan = self.state.plan("abort", &self.path);
        self.state.before(&plan, "abort", &self.path).await?;
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::ObjectStoreExt;

    fn store(config: FaultConfig) -> (Arc<dyn ObjectStore>, FaultyStore) {
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        (Arc::clone(&inner), FaultyStore::new(inner, config))
    }

    #[tokio::test]
    async fn quiet_store_passes_everything_through() {
        let (inner, faulty) = store(FaultConfig::quiet(1));
        let p = Path::from("a/b");
        faulty
            .put(&p, Bytes::from_static(b"x").into())
            .await
            .unwrap();
        assert_eq!(inner.get(&p).await.unwrap().bytes().await.unwrap(), "x");
        assert_eq!(faulty.get(&p).await.unwrap().bytes().await.unwrap(), "x");
        faulty.delete(&p).await.unwrap();
        assert!(inner.head(&p).await.is_err());
        assert_eq!(faulty.stats().injected(), 0);
        assert_eq!(faulty.stats().calls, 3);
    }

    #[tokio::test]
    async fn outage_fails_everything_without_touching_the_store() {
        let (inner, faulty) = store(FaultConfig::quiet(1));
        faulty.set_enabled(false);
        let p = Path::from("k");
        let e = faulty
            .put(&p, Bytes::from_static(b"x").into())
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                object_store::Error::Generic {
                    store: FAULTY_STORE,
                    ..
                }
            ),
            "{e}"
        );
        assert!(inner.head(&p).await.is_err(), "the write must not happen");
        let listed: Vec<_> = faulty.list(None).collect().await;
        assert!(listed.len() == 1 && listed[0].is_err());
        assert_eq!(faulty.stats().outage_failures, 2);
        faulty.set_enabled(true);
        faulty
            .put(&p, Bytes::from_static(b"x").into())
            .await
            .unwrap();
        assert!(inner.head(&p).await.is_ok());
    }

    #[tokio::test]
    async fn dropped_response_means_the_write_happened() {
        let (inner, faulty) = store(FaultConfig {
            drop_response: 1.0,
            ..FaultConfig::quiet(7)
        });
        let p = Path::from("k");
        assert!(faulty
            .put(&p, Bytes::from_static(b"x").into())
            .await
            .is_err());
        assert_eq!(inner.get(&p).await.unwrap().bytes().await.unwrap(), "x");
        assert!(faulty.delete(&p).await.is_err());
        assert!(
            inner.head(&p).await.is_err(),
            "the delete must have happened"
        );
        let s = faulty.stats();
        assert_eq!((s.dropped_responses, s.dropped_put_responses), (2, 1));
    }

    #[tokio::test]
    async fn broken_bodies_fail_reads_not_heads() {
        let (inner, faulty) = store(FaultConfig {
            break_body: 1.0,
            ..FaultConfig::quiet(7)
        });
        let p = Path::from("k");
        inner
            .put(&p, Bytes::from(vec![7u8; 100_000]).into())
            .await
            .unwrap();
        let r = faulty.get(&p).await.unwrap();
        assert!(r.bytes().await.is_err());
        assert_eq!(faulty.head(&p).await.unwrap().size, 100_000);
        let listed: Vec<_> = faulty.list(None).collect().await;
        assert!(listed.iter().any(|r| r.is_err()));
        assert_eq!(faulty.stats().broken_bodies, 2);
    }

    #[tokio::test]
    async fn decisions_are_deterministic_per_seed() {
        async fn run(seed: u64) -> Vec<bool> {
            let (_, faulty) = store(FaultConfig {
                fail_before: 0.5,
                ..FaultConfig::quiet(seed)
            });
            let mut out = Vec::new();
            for i in 0..64 {
                // Injected (Generic) vs reached the store (NotFound).
                let r = faulty.head(&Path::from(format!("k{}", i % 8))).await;
                out.push(matches!(r, Err(object_store::Error::Generic { .. })));
            }
            out
        }
        let a = run(3).await;
        assert_eq!(a, run(3).await);
        assert_ne!(a, run(4).await);
        assert!(a.iter().any(|x| *x) && a.iter().any(|x| !*x));
    }
}
