//! One conformance suite for `Repository`, run against every store: `file://`, `memory://`,
//! Azurite (Azure Blob) and an S3 emulator; then the same store behind a fault-injecting
//! wrapper (`walferry_tests::faults::FaultyStore`).
//!
//! Per store there are three tests: `conformance_<store>` (the contract on a healthy store),
//! `faults_<store>` (the contract when 30% of calls fail and 30% of write responses are lost)
//! and `outage_<store>` (a store that is down for longer, then shorter, than the retry budget).
//! Each uses a fresh target (temp dir, in-memory store, container or bucket) and puts its
//! repositories one or more segments below the target's own prefix, so root-prefix handling
//! is exercised everywhere.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{stream, StreamExt};
use object_store::path::Path;
use rand::{Rng, RngCore, SeedableRng};
use walferry_formats::keyring::MasterKey;
use walferry_formats::{Error, PutOutcome, Repository, RetryPolicy};
use walferry_tests::emulators::{self, StoreTarget};
use walferry_tests::faults::{FaultConfig, FaultyStore};

// ---------------------------------------------------------------------------------------
// Test matrix

/// `conformance_<store>`, `faults_<store>`, `outage_<store>` for one store.
macro_rules! store_tests {
    ($store:literal: $conformance:ident, $faults:ident, $outage:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $conformance() {
            if let Some(t) = target($store, stringify!($conformance)).await {
                conformance(&t).await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $faults() {
            if let Some(t) = target($store, stringify!($faults)).await {
                faults(&t).await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $outage() {
            if let Some(t) = target($store, stringify!($outage)).await {
                outage(&t).await;
            }
        }
    };
}

store_tests!("file": conformance_file, faults_file, outage_file);
store_tests!("memory": conformance_memory, faults_memory, outage_memory);
store_tests!("azurite": conformance_azurite, faults_azurite, outage_azurite);
store_tests!("s3": conformance_s3, faults_s3, outage_s3);

/// A fresh target, or None (after the loud SKIPPED line) when an emulator is not installed
/// and not required. With `WALFERRY_REQUIRE_EMULATORS=1` a missing emulator is an error.
async fn target(store: &str, test: &str) -> Option<StoreTarget> {
    let t = match store {
        "file" => Some(emulators::file_target().expect("file target")),
        "memory" => Some(emulators::memory_target()),
        "azurite" => emulators::azurite_target().await.expect("azurite target"),
        "s3" => emulators::s3_target().await.expect("s3 target"),
        other => panic!("unknown store {other}"),
    };
    if t.is_none() {
        eprintln!("*** SKIPPED {test}: no {store} emulator ***");
    }
    t
}

// ---------------------------------------------------------------------------------------
// Helpers

/// The target's URL with more path segments: the repository root lies below the target's.
fn sub_url(t: &StoreTarget, sub: &str) -> String {
    format!("{}/{sub}", t.url.trim_end_matches('/'))
}

fn open(t: &StoreTarget, sub: &str) -> (Repository, String) {
    let url = sub_url(t, sub);
    let repo = Repository::open(&url, t.options.clone())
        .unwrap_or_else(|e| panic!("[{}] open {url}: {e}", t.label));
    (repo, url)
}

/// Another repository in the same store as `repo` (opened at `url`), at `url` rewritten by
/// `rewrite` (applied to the URL, and to the root when the store has one).
fn neighbour(
    t: &StoreTarget,
    repo: &Repository,
    url: &str,
    rewrite: impl Fn(&str) -> String,
) -> Repository {
    let (store, root) = repo.store();
    let new_url = rewrite(url);
    if root.as_ref().is_empty() {
        // file://: the store is rooted at the repository's directory; open the other one.
        Repository::open(&new_url, t.options.clone()).expect("open neighbour")
    } else {
        // Same store object (a memory:// store exists once per open).
        let new_root = Path::from(rewrite(root.as_ref()));
        Repository::with_store(Arc::clone(store), new_root, &new_url)
    }
}

/// `repo`'s root with `suffix` appended to its last segment (`.../c1` -> `.../c1x`): a
/// string prefix of it, but not a path prefix.
fn sibling(t: &StoreTarget, repo: &Repository, url: &str, suffix: &str) -> Repository {
    neighbour(t, repo, url, |s| format!("{s}{suffix}"))
}

/// `repo`'s root without its last segment.
fn parent(t: &StoreTarget, repo: &Repository, url: &str) -> Repository {
    neighbour(t, repo, url, |s| {
        s.rsplit_once('/')
            .map(|(p, _)| p.to_owned())
            .unwrap_or_default()
    })
}

/// Deterministic pseudo-random bytes.
fn data(seed: u64, len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    Bytes::from(v)
}

fn keys(items: &[walferry_formats::ObjectInfo]) -> Vec<&str> {
    items.iter().map(|o| o.key.as_str()).collect()
}

// ---------------------------------------------------------------------------------------
// The contract on a healthy store

async fn conformance(t: &StoreTarget) {
    eprintln!("conformance on {} ({})", t.label, t.url);
    round_trip(t).await;
    create_only(t).await;
    missing_keys(t).await;
    ranges(t).await;
    listing(t).await;
    delete_then_list(t).await;
    init_and_keys(t).await;
}

async fn round_trip(t: &StoreTarget) {
    let l = &t.label;
    let (repo, _) = open(t, "roundtrip");
    let cases = [
        ("empty", Bytes::new()),
        ("small", Bytes::from_static(b"hello, walferry")),
        ("wal/00000001/000000010000000000000001", data(1, 4096)),
        ("packs/ab/multi-mib", data(2, 6 * 1024 * 1024 + 123)),
    ];
    for (key, bytes) in &cases {
        let r = repo.put(key, bytes.clone()).await;
        assert!(
            matches!(r, Ok(PutOutcome::Created)),
            "[{l}] put {key}: {r:?}"
        );
    }
    for (key, bytes) in &cases {
        let got = repo
            .get(key)
            .await
            .unwrap_or_else(|e| panic!("[{l}] get {key}: {e}"));
        assert_eq!(got.len(), bytes.len(), "[{l}] {key} length");
        assert!(got == *bytes, "[{l}] {key}: bytes differ");
        let size = repo
            .head(key)
            .await
            .unwrap_or_else(|e| panic!("[{l}] head {key}: {e}"));
        assert_eq!(size, Some(bytes.len() as u64), "[{l}] head {key}");
    }
    // A second handle on the same URL sees the same objects (except memory://, which is
    // per handle by design).
    if t.label != "memory" {
        let (again, _) = open(t, "roundtrip");
        let got = again.get("small").await.unwrap();
        assert_eq!(got, cases[1].1, "[{l}] read through a second handle");
    }
}

async fn create_only(t: &StoreTarget) {
    let l = &t.label;
    let (repo, _) = open(t, "create-only");
    let a = data(10, 1000);
    let b = data(11, 1000);
    assert_eq!(
        repo.put("backups/x.manifest", a.clone()).await.unwrap(),
        PutOutcome::Created,
        "[{l}]"
    );
    // Different bytes, same size: refused, and the stored object is untouched.
    let r = repo.put("backups/x.manifest", b.clone()).await;
    assert!(
        matches!(&r, Err(Error::Conflict { key }) if key == "backups/x.manifest"),
        "[{l}] second put with different bytes: {r:?}"
    );
    assert!(!r.unwrap_err().is_transient(), "[{l}] a conflict is final");
    // Different size too.
    let r = repo
        .put("backups/x.manifest", Bytes::from_static(b"x"))
        .await;
    assert!(matches!(r, Err(Error::Conflict { .. })), "[{l}] {r:?}");
    let r = repo.put("backups/x.manifest", Bytes::new()).await;
    assert!(
        matches!(r, Err(Error::Conflict { .. })),
        "[{l}] empty over non-empty: {r:?}"
    );
    assert_eq!(
        repo.get("backups/x.manifest").await.unwrap(),
        a,
        "[{l}] stored bytes changed"
    );
    // Same bytes: success without a write.
    assert_eq!(
        repo.put("backups/x.manifest", a.clone()).await.unwrap(),
        PutOutcome::AlreadyPresent,
        "[{l}]"
    );
    // Empty objects are create-only too.
    assert_eq!(
        repo.put("e", Bytes::new()).await.unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        repo.put("e", Bytes::new()).await.unwrap(),
        PutOutcome::AlreadyPresent
    );
    let r = repo.put("e", Bytes::from_static(b"\0")).await;
    assert!(
        matches!(r, Err(Error::Conflict { .. })),
        "[{l}] byte over empty: {r:?}"
    );
    assert_eq!(repo.head("e").await.unwrap(), Some(0));
}

async fn missing_keys(t: &StoreTarget) {
    let l = &t.label;
    let (repo, _) = open(t, "missing");
    let e = repo.get("no/such/key").await.unwrap_err();
    assert!(e.is_not_found(), "[{l}] get missing: {e:?}");
    assert!(!e.is_transient(), "[{l}] {e:?}");
    let e = repo.get_range("no/such/key", 0..10).await.unwrap_err();
    assert!(e.is_not_found(), "[{l}] get_range missing: {e:?}");
    assert_eq!(
        repo.head("no/such/key").await.unwrap(),
        None,
        "[{l}] head missing"
    );
    repo.delete("no/such/key")
        .await
        .unwrap_or_else(|e| panic!("[{l}] delete missing: {e}"));
    assert!(
        repo.list("").await.unwrap().is_empty(),
        "[{l}] fresh root lists empty"
    );
    assert!(repo.list("no/such").await.unwrap().is_empty(), "[{l}]");
    // A prefix of an existing key's name is not the key.
    repo.put("wal/00000001/seg", data(3, 10)).await.unwrap();
    assert_eq!(repo.head("wal/00000001/se").await.unwrap(), None, "[{l}]");
    assert!(repo
        .get("wal/00000001/se")
        .await
        .unwrap_err()
        .is_not_found());
}

async fn ranges(t: &StoreTarget) {
    let l = &t.label;
    let (repo, _) = open(t, "ranges");
    let obj = data(20, 10_000);
    repo.put("packs/aa/p", obj.clone()).await.unwrap();
    for r in [
        0..1,
        0..10,
        100..2100,
        9_990..10_000,
        0..10_000,
        4_095..4_097,
    ] {
        let got = repo
            .get_range("packs/aa/p", r.clone())
            .await
            .unwrap_or_else(|e| panic!("[{l}] get_range {r:?}: {e}"));
        assert_eq!(
            got,
            obj.slice(r.start as usize..r.end as usize),
            "[{l}] range {r:?}"
        );
    }
    // Past the end: an error, never short data passed off as the range, and not retried
    // as if the network were at fault.
    for r in [9_990..10_010, 10_000..10_001, 20_000..20_100] {
        let res = repo.get_range("packs/aa/p", r.clone()).await;
        let e = match res {
            Ok(b) => panic!(
                "[{l}] get_range {r:?} past the end returned {} bytes",
                b.len()
            ),
            Err(e) => e,
        };
        assert!(
            matches!(e, Error::Truncated { .. }) && e.is_corruption() && !e.is_transient(),
            "[{l}] get_range {r:?} past the end: {e:?}"
        );
    }
}

async fn listing(t: &StoreTarget) {
    let l = &t.label;
    let (repo, url) = open(t, "list/c1");
    // Inserted out of order, with names that share string prefixes but not path segments.
    let objects: BTreeMap<&str, usize> = [
        ("wal/00000002.history", 41),
        ("wal/00000001/000000010000000000000002", 20),
        ("walx/000000010000000000000001", 3),
        ("wa/l", 4),
        ("wal/00000001/000000010000000000000001", 10),
        ("wal/00000001/000000010000000000000001.parts/0-8192", 7),
        ("backups/20240101T000000.manifest", 5),
        ("packs/aa/aa01", 6),
        ("packs/ab/ab01", 8),
        ("walferry.json", 2),
    ]
    .into_iter()
    .collect();
    for (i, (key, len)) in objects.iter().rev().enumerate() {
        repo.put(key, data(100 + i as u64, *len)).await.unwrap();
    }
    // Objects outside the root: in a sibling whose name extends the root's last segment,
    // and in the parent.
    let outside = sibling(t, &repo, &url, "x");
    outside.put("wal/00000001/stray", data(1, 9)).await.unwrap();
    outside.put("walferry.json", data(2, 9)).await.unwrap();
    let parent = parent(t, &repo, &url);
    parent.put("c1x-top", data(3, 9)).await.unwrap();
    parent
        .put("wal/00000001/parent-stray", data(4, 9))
        .await
        .unwrap();

    let all = repo.list("").await.unwrap();
    let want: Vec<&str> = objects.keys().copied().collect();
    assert_eq!(
        keys(&all),
        want,
        "[{l}] list of the whole root: sorted, relative, nothing from outside"
    );
    for o in &all {
        assert_eq!(
            o.size,
            objects[o.key.as_str()] as u64,
            "[{l}] size of {}",
            o.key
        );
    }

    let wal_keys = [
        "wal/00000001/000000010000000000000001",
        "wal/00000001/000000010000000000000001.parts/0-8192",
        "wal/00000001/000000010000000000000002",
        "wal/00000002.history",
    ];
    for prefix in ["wal", "wal/"] {
        let got = repo.list(prefix).await.unwrap();
        assert_eq!(
            keys(&got),
            wal_keys,
            "[{l}] list({prefix:?}) must not match walx/ or wa/"
        );
    }
    let got = repo.list("wal/00000001").await.unwrap();
    assert_eq!(keys(&got), wal_keys[..3], "[{l}] list(wal/00000001)");
    // A prefix that is a whole key's name lists that key's "directory" only, not the key.
    let got = repo
        .list("wal/00000001/000000010000000000000001")
        .await
        .unwrap();
    assert_eq!(
        keys(&got),
        Vec::<&str>::new(),
        "[{l}] whole-segment matching: `...0001` is not a prefix of `...0001.parts`"
    );
    let got = repo
        .list("wal/00000001/000000010000000000000001.parts")
        .await
        .unwrap();
    assert_eq!(
        keys(&got),
        ["wal/00000001/000000010000000000000001.parts/0-8192"],
        "[{l}]"
    );
    let got = repo.list("packs").await.unwrap();
    assert_eq!(keys(&got), ["packs/aa/aa01", "packs/ab/ab01"], "[{l}]");
    assert!(
        repo.list("pack").await.unwrap().is_empty(),
        "[{l}] `pack` is not `packs`"
    );
    // Below an object's name (`wa/l` is an object): nothing. LocalFileSystem cannot walk a
    // file as a directory and answers with an error (ENOTDIR), which object_store reports
    // as Generic; that layout never occurs in a walferry repository, so only note it there.
    match repo.list("wa/l/x").await {
        Ok(v) => assert!(v.is_empty(), "[{l}] list(wa/l/x): {:?}", keys(&v)),
        Err(e) if t.label == "file" => eprintln!("[{l}] note: list below an object: {e}"),
        Err(e) => panic!("[{l}] list(wa/l/x): {e:?}"),
    }
    assert_eq!(
        keys(&repo.list("walx").await.unwrap()),
        ["walx/000000010000000000000001"]
    );

    // The sibling sees only its own objects, relative to its own root.
    assert_eq!(
        keys(&outside.list("").await.unwrap()),
        ["wal/00000001/stray", "walferry.json"],
        "[{l}] sibling root"
    );
    // And the parent sees everything below it, relative to itself (a root above a root).
    let p = parent.list("").await.unwrap();
    assert!(
        keys(&p).contains(&"c1/wal/00000002.history"),
        "[{l}] {:?}",
        keys(&p)
    );
    assert!(keys(&p).contains(&"c1x/walferry.json"), "[{l}]");
    assert!(keys(&p).contains(&"c1x-top"), "[{l}]");
    assert_eq!(
        keys(&parent.list("c1").await.unwrap()).len(),
        objects.len(),
        "[{l}] parent.list(c1) excludes c1x and c1x-top"
    );

    // Many objects (more than one page on stores whose pages are small): all listed, sorted.
    let (many, _) = open(t, "list/many");
    let names: Vec<String> = (0..250)
        .map(|i| format!("k/{:04}", (i * 7919) % 250))
        .collect();
    stream::iter(names.iter())
        .for_each_concurrent(16, |k| {
            let many = &many;
            async move {
                many.put(k, Bytes::from(k.clone())).await.unwrap();
            }
        })
        .await;
    let got = many.list("k").await.unwrap();
    let mut want: Vec<String> = names.clone();
    want.sort();
    assert_eq!(
        got.iter().map(|o| o.key.clone()).collect::<Vec<_>>(),
        want,
        "[{l}] 250 keys"
    );
}

async fn delete_then_list(t: &StoreTarget) {
    let l = &t.label;
    let (repo, _) = open(t, "delete");
    for k in ["a/1", "a/2", "a/3", "b/1"] {
        repo.put(k, data(7, 100)).await.unwrap();
    }
    repo.delete("a/2").await.unwrap();
    assert_eq!(
        keys(&repo.list("a").await.unwrap()),
        ["a/1", "a/3"],
        "[{l}]"
    );
    assert!(repo.get("a/2").await.unwrap_err().is_not_found(), "[{l}]");
    assert_eq!(repo.head("a/2").await.unwrap(), None, "[{l}]");
    repo.delete("a/2")
        .await
        .unwrap_or_else(|e| panic!("[{l}] second delete: {e}"));
    // A deleted name can be created again (retention removes, a later run rewrites).
    assert_eq!(
        repo.put("a/2", data(8, 50)).await.unwrap(),
        PutOutcome::Created,
        "[{l}]"
    );
    assert_eq!(repo.get("a/2").await.unwrap(), data(8, 50), "[{l}]");
    for k in ["a/1", "a/2", "a/3"] {
        repo.delete(k).await.unwrap();
    }
    assert!(repo.list("a").await.unwrap().is_empty(), "[{l}]");
    assert_eq!(keys(&repo.list("").await.unwrap()), ["b/1"], "[{l}]");
}

async fn init_and_keys(t: &StoreTarget) {
    let l = &t.label;
    // Encrypted.
    let (repo, _) = open(t, "init/enc");
    let e = repo.config().await.unwrap_err();
    assert!(matches!(e, Error::NotARepository { .. }), "[{l}] {e:?}");
    let e = repo.open_keyring(None).await.unwrap_err();
    assert!(matches!(e, Error::NotARepository { .. }), "[{l}] {e:?}");
    let master = MasterKey::generate();
    let cfg = repo.init(Some(&master)).await.unwrap();
    assert_eq!(repo.config().await.unwrap(), cfg, "[{l}]");
    assert!(cfg.is_encrypted());
    let config_bytes = repo.get("walferry.json").await.unwrap();
    for again in [Some(&master), None, Some(&MasterKey::generate())] {
        let e = repo.init(again).await.unwrap_err();
        assert!(
            matches!(e, Error::RepositoryExists { .. }),
            "[{l}] init twice: {e:?}"
        );
    }
    assert_eq!(
        repo.get("walferry.json").await.unwrap(),
        config_bytes,
        "[{l}] a refused init must not touch the config"
    );
    assert_eq!(
        keys(&repo.list("keys").await.unwrap()).len(),
        1,
        "[{l}] one wrapped key"
    );
    let (back, ring) = repo.open_keyring(Some(&master)).await.unwrap();
    assert_eq!(back, cfg, "[{l}]");
    assert!(ring.is_encrypted(), "[{l}]");
    let e = repo
        .open_keyring(Some(&MasterKey::generate()))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::WrongMasterKey), "[{l}] wrong key: {e:?}");
    let e = repo.open_keyring(None).await.unwrap_err();
    assert!(matches!(e, Error::MasterKeyRequired), "[{l}] no key: {e:?}");
    // A second handle opens it too (not for memory://, which is per handle).
    if t.label != "memory" {
        let (again, _) = open(t, "init/enc");
        let (back, _) = again.open_keyring(Some(&master)).await.unwrap();
        assert_eq!(back, cfg, "[{l}] through a second handle");
    }

    // Unencrypted.
    let (plain, _) = open(t, "init/plain");
    let cfg = plain.init(None).await.unwrap();
    assert!(!cfg.is_encrypted(), "[{l}]");
    let e = plain.init(None).await.unwrap_err();
    assert!(matches!(e, Error::RepositoryExists { .. }), "[{l}] {e:?}");
    let (_, ring) = plain.open_keyring(None).await.unwrap();
    assert!(!ring.is_encrypted(), "[{l}]");
    let e = plain.open_keyring(Some(&master)).await.unwrap_err();
    assert!(matches!(e, Error::UnexpectedMasterKey), "[{l}] {e:?}");
    assert!(
        plain.list("keys").await.unwrap().is_empty(),
        "[{l}] no keys when unencrypted"
    );
}

// ---------------------------------------------------------------------------------------
// The contract under faults

fn patient_retry(seed: u64) -> RetryPolicy {
    RetryPolicy {
        max_attempts: 40,
        base_delay: Duration::from_millis(2),
        max_delay: Duration::from_millis(40),
        seed: Some(seed),
    }
}

/// `repo`'s store and root behind a FaultyStore.
fn faulty_repo(
    repo: &Repository,
    url: &str,
    config: FaultConfig,
    retry: RetryPolicy,
) -> (Repository, Arc<FaultyStore>) {
    let (store, root) = repo.store();
    let faulty = Arc::new(FaultyStore::new(Arc::clone(store), config));
    let r = Repository::with_store(faulty.clone(), root.clone(), url).with_retry(retry);
    (r, faulty)
}

async fn faults(t: &StoreTarget) {
    let l = &t.label;
    eprintln!("faults on {} ({})", t.label, t.url);
    // `clean` goes to the store directly; `flaky` through the fault injector.
    let (clean, url) = open(t, "faults");
    let config = FaultConfig {
        seed: 0x5eed,
        fail_before: 0.3,
        drop_response: 0.3,
        break_body: 0.15,
        delay: 0.3,
        delay_range: Duration::ZERO..Duration::from_millis(4),
    };
    let (flaky, faulty) = faulty_repo(&clean, &url, config, patient_retry(7));

    // 1. 200 distinct objects, written concurrently.
    let objects: Vec<(String, Bytes)> = (0..200u64)
        .map(|i| {
            let key = format!("wal/00000001/{i:024X}");
            let len = match i % 10 {
                0 => 0,
                1 => 256 * 1024 + i as usize,
                _ => rand::rngs::StdRng::seed_from_u64(i).gen_range(1..20_000),
            };
            (key, data(1000 + i, len))
        })
        .collect();
    let outcomes: HashMap<String, Result<PutOutcome, Error>> = stream::iter(objects.iter())
        .map(|(k, b)| {
            let flaky = &flaky;
            async move { (k.clone(), flaky.put(k, b.clone()).await) }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut present = 0;
    for (k, r) in &outcomes {
        match r {
            Ok(PutOutcome::Created) => {}
            Ok(PutOutcome::AlreadyPresent) => present += 1,
            Err(e) => panic!("[{l}] put {k} under faults: {e}"),
        }
    }
    let s = faulty.stats();
    eprintln!("[{l}] after 200 puts: {s:?}; {present} AlreadyPresent");
    assert!(
        s.failed_before > 0,
        "[{l}] no pre-request failures injected: {s:?}"
    );
    assert!(
        s.dropped_put_responses > 0,
        "[{l}] no lost responses injected: {s:?}"
    );
    // Each lost put response, and only that, turns into AlreadyPresent on retry.
    assert_eq!(
        present, s.dropped_put_responses,
        "[{l}] AlreadyPresent outcomes vs lost put responses"
    );

    // 2. Every object is there, byte-identical, read without faults.
    for (k, b) in &objects {
        let got = clean
            .get(k)
            .await
            .unwrap_or_else(|e| panic!("[{l}] get {k}: {e}"));
        assert!(got == *b, "[{l}] {k}: stored bytes differ");
    }
    let listed = clean.list("wal").await.unwrap();
    let mut want: Vec<&str> = objects.iter().map(|(k, _)| k.as_str()).collect();
    want.sort();
    assert_eq!(keys(&listed), want, "[{l}] exactly the 200 objects");

    // 3. Reads and lists through the faults give the same answers.
    let flaky_list = flaky.list("wal").await.unwrap();
    assert_eq!(flaky_list, listed, "[{l}] list under faults");
    let bad: Vec<String> = stream::iter(objects.iter())
        .map(|(k, b)| {
            let flaky = &flaky;
            async move {
                match flaky.get(k).await {
                    Ok(got) if got == *b => None,
                    Ok(_) => Some(format!("{k}: bytes differ")),
                    Err(e) => Some(format!("{k}: {e}")),
                }
            }
        })
        .buffer_unordered(16)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    assert!(bad.is_empty(), "[{l}] gets under faults: {bad:?}");
    let (k, b) = &objects[1];
    let got = flaky.get_range(k, 1000..5000).await.unwrap();
    assert_eq!(got, b.slice(1000..5000), "[{l}] get_range under faults");
    for (k, b) in objects.iter().take(20) {
        assert_eq!(
            flaky.head(k).await.unwrap(),
            Some(b.len() as u64),
            "[{l}] head {k}"
        );
    }
    assert_eq!(flaky.head("wal/none").await.unwrap(), None, "[{l}]");
    assert!(
        flaky.get("wal/none").await.unwrap_err().is_not_found(),
        "[{l}]"
    );

    // 4. Writing the same bytes again: all AlreadyPresent, none Created.
    let again: Vec<Result<PutOutcome, Error>> = stream::iter(objects.iter())
        .map(|(k, b)| {
            let flaky = &flaky;
            async move { flaky.put(k, b.clone()).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for r in &again {
        assert!(
            matches!(r, Ok(PutOutcome::AlreadyPresent)),
            "[{l}] rewrite of identical bytes: {r:?}"
        );
    }

    // 5. Conflicting writes still fail, and leave the stored bytes alone.
    for (i, (k, b)) in objects.iter().enumerate().take(30) {
        let other = data(5000 + i as u64, b.len().max(1));
        let r = flaky.put(k, other).await;
        assert!(
            matches!(&r, Err(Error::Conflict { key }) if key == k),
            "[{l}] conflicting put of {k} under faults: {r:?}"
        );
        assert!(clean.get(k).await.unwrap() == *b, "[{l}] {k} changed");
    }

    // 6. Several writers of the same new objects, same bytes: all succeed, one content.
    let contested: Vec<(String, Bytes)> = (0..20u64)
        .map(|i| (format!("backups/{i:03}.manifest"), data(9000 + i, 3000)))
        .collect();
    let results: Vec<(String, Result<PutOutcome, Error>)> = stream::iter(
        contested
            .iter()
            .flat_map(|(k, b)| std::iter::repeat_n((k, b), 4)),
    )
    .map(|(k, b)| {
        let flaky = &flaky;
        async move { (k.clone(), flaky.put(k, b.clone()).await) }
    })
    .buffer_unordered(32)
    .collect()
    .await;
    for (k, r) in &results {
        assert!(r.is_ok(), "[{l}] concurrent identical put of {k}: {r:?}");
    }
    for (k, b) in &contested {
        assert!(clean.get(k).await.unwrap() == *b, "[{l}] {k}");
        let created = results
            .iter()
            .filter(|(key, r)| key == k && matches!(r, Ok(PutOutcome::Created)))
            .count();
        assert!(
            created <= 1,
            "[{l}] {k} created {created} times by create-only puts"
        );
    }

    // 7. init and keyring through faults.
    let master = MasterKey::generate();
    let cfg = flaky.init(Some(&master)).await.unwrap();
    let e = flaky.init(Some(&master)).await.unwrap_err();
    assert!(matches!(e, Error::RepositoryExists { .. }), "[{l}] {e:?}");
    let (back, _) = flaky.open_keyring(Some(&master)).await.unwrap();
    assert_eq!(back, cfg, "[{l}]");
    let e = flaky
        .open_keyring(Some(&MasterKey::generate()))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::WrongMasterKey), "[{l}] {e:?}");

    // 8. Deletes through faults (lost responses included): all gone.
    stream::iter(objects.iter())
        .for_each_concurrent(16, |(k, _)| {
            let flaky = &flaky;
            async move {
                flaky
                    .delete(k)
                    .await
                    .unwrap_or_else(|e| panic!("[{l}] delete {k} under faults: {e}"));
            }
        })
        .await;
    assert!(
        clean.list("wal").await.unwrap().is_empty(),
        "[{l}] deletes under faults"
    );

    let s = faulty.stats();
    eprintln!("[{l}] at the end: {s:?}");
    assert!(
        s.broken_bodies > 0,
        "[{l}] no broken bodies injected: {s:?}"
    );
    assert!(
        s.dropped_responses > s.dropped_put_responses,
        "[{l}] no lost delete responses: {s:?}"
    );
    assert!(s.delayed > 0, "[{l}] {s:?}");
}

async fn outage(t: &StoreTarget) {
    let l = &t.label;
    let (clean, url) = open(t, "outage");
    let short = RetryPolicy {
        max_attempts: 4,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
        seed: Some(1),
    };
    let (flaky, faulty) = faulty_repo(&clean, &url, FaultConfig::quiet(1), short);
    clean.put("old", data(1, 10)).await.unwrap();

    // Down for longer than the retry budget: every call gives up with a transient error,
    // and none is mistaken for a definite answer (NotFound, None, empty list, Ok delete).
    faulty.set_enabled(false);
    let e = flaky.put("new", data(2, 10)).await.unwrap_err();
    assert!(e.is_transient(), "[{l}] put during outage: {e:?}");
    assert!(!e.is_not_found(), "[{l}]");
    let e = flaky.get("old").await.unwrap_err();
    assert!(e.is_transient(), "[{l}] get during outage: {e:?}");
    let e = flaky.get("missing").await.unwrap_err();
    assert!(
        e.is_transient() && !e.is_not_found(),
        "[{l}] get missing during outage: {e:?}"
    );
    let e = flaky.head("missing").await.unwrap_err();
    assert!(
        e.is_transient(),
        "[{l}] head during outage must not say `absent`: {e:?}"
    );
    let e = flaky.list("").await.unwrap_err();
    assert!(
        e.is_transient(),
        "[{l}] list during outage must not say `empty`: {e:?}"
    );
    let e = flaky.delete("old").await.unwrap_err();
    assert!(e.is_transient(), "[{l}] delete during outage: {e:?}");
    let e = flaky.get_range("old", 0..5).await.unwrap_err();
    assert!(e.is_transient(), "[{l}] get_range during outage: {e:?}");
    let e = flaky.init(None).await.unwrap_err();
    assert!(e.is_transient(), "[{l}] init during outage: {e:?}");
    let e = flaky.config().await.unwrap_err();
    assert!(
        e.is_transient(),
        "[{l}] config during outage must not say `not a repository`: {e:?}"
    );
    let s = faulty.stats();
    // Every attempt of each of the 9 calls was made (4 each; get_range may add a head to
    // tell a short object from a failure), and every one of them met the outage.
    assert!(s.calls >= 4 * 9, "[{l}] 9 calls x 4 attempts: {s:?}");
    assert_eq!(s.outage_failures, s.calls, "[{l}] {s:?}");
    assert_eq!(
        clean.head("new").await.unwrap(),
        None,
        "[{l}] nothing written during outage"
    );
    assert!(
        clean.head("old").await.unwrap().is_some(),
        "[{l}] nothing deleted during outage"
    );

    // Back up: writes succeed.
    faulty.set_enabled(true);
    assert_eq!(
        flaky.put("new", data(2, 10)).await.unwrap(),
        PutOutcome::Created,
        "[{l}]"
    );
    assert_eq!(clean.get("new").await.unwrap(), data(2, 10), "[{l}]");
    flaky.delete("old").await.unwrap();
    assert_eq!(keys(&flaky.list("").await.unwrap()), ["new"], "[{l}]");

    // Down for less than the retry budget: the caller never notices.
    let (patient, faulty2) = faulty_repo(
        &clean,
        &url,
        FaultConfig::quiet(2),
        RetryPolicy {
            max_attempts: 60,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            seed: Some(2),
        },
    );
    faulty2.set_enabled(false);
    let switch = Arc::clone(&faulty2);
    let recover = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        switch.set_enabled(true);
    });
    let r = patient.put("during", data(3, 100)).await;
    recover.await.unwrap();
    assert_eq!(
        r.unwrap(),
        PutOutcome::Created,
        "[{l}] put across a short outage"
    );
    assert!(
        faulty2.stats().outage_failures > 0,
        "[{l}] the outage was never hit"
    );
    assert_eq!(clean.get("during").await.unwrap(), data(3, 100), "[{l}]");
}
