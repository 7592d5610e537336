//! `Repository`: typed, create-only access to a bucket (or directory) over `object_store`.
//!
//! Every write is `PutMode::Create`. When a response is lost and the retry meets
//! `AlreadyExists`, the stored bytes are read back: identical bytes are success,
//! anything else is a [`Error::Conflict`]. Transient failures are retried here,
//! on top of object_store's own HTTP retries, through one helper.

use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{
    ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutMode, PutOptions, PutPayload,
};
use rand::{Rng, SeedableRng};
use url::Url;

use crate::config::{RepoConfig, CONFIG_KEY};
use crate::error::{store_error_is_transient, Error, Result};
use crate::keyring::{wrap_identity, DataKeyMaterial, Keyring, MasterKey};

/// How often and how patiently transient store failures are retried.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Seed for backoff jitter; `None` draws from the OS. Tests pin it.
    pub seed: Option<u64>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            seed: None,
        }
    }
}

impl RetryPolicy {
    /// Runs `op` until it succeeds, fails permanently, or attempts run out.
    pub async fn run<T, F, Fut>(&self, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut rng = match self.seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::from_entropy(),
        };
        let mut attempt = 1;
        loop {
            match op().await {
                Err(e) if e.is_transient() && attempt < self.max_attempts => {
                    let cap = self
                        .base_delay
                        .saturating_mul(1 << (attempt - 1).min(16))
                        .min(self.max_delay);
                    // Full jitter: spreads retries of many writers apart.
                    let wait = cap.mul_f64(rng.gen_range(0.5..=1.0));
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }
}

/// What a create-only put found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PutOutcome {
    Created,
    /// The object was already there with identical bytes (e.g. a retried write whose response was lost).
    AlreadyPresent,
}

/// One listed object. `key` is relative to the repository root.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// When the store says the object was last written, if it says (retention's grace
    /// period for packs that no manifest references yet).
    pub last_modified: Option<jiff::Timestamp>,
}

#[derive(Clone, Debug)]
pub struct Repository {
    store: Arc<dyn ObjectStore>,
    root: Path,
    location: String,
    retry: RetryPolicy,
}

impl Repository {
    /// Opens a repository URL: `file:///abs/path`, `memory://`, `s3://bucket/prefix`,
    /// `az://container/prefix` (or an Azure https URL), `gs://bucket/prefix`.
    ///
    /// `options` are object_store configuration keys for that scheme (`aws_endpoint`,
    /// `azure_storage_use_emulator`, ...). Cloud stores also read their usual environment
    /// variables (`AWS_*`, `AZURE_*`, `GOOGLE_*`). A key object_store would ignore is an error.
    pub fn open<I, K, V>(url: &str, options: I) -> Result<Self>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let invalid = |reason: String| Error::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        let (scheme, root) =
            ObjectStoreScheme::parse(&parsed).map_err(|e| invalid(e.to_string()))?;
        let options: Vec<(String, String)> = options
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_ascii_lowercase(), v.into()))
            .collect();
        let unknown = |key: &str| Error::UnknownOption {
            key: key.to_string(),
            scheme: parsed.scheme().to_string(),
        };
        let store_err = |e: object_store::Error| invalid(e.to_string());

        let store: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::Local => {
                if let Some((k, _)) = options.first() {
                    return Err(unknown(k));
                }
                let dir = parsed.to_file_path().map_err(|_| {
                    invalid("expected an absolute path, like file:///var/lib/walferry".into())
                })?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| invalid(format!("cannot create {}: {e}", dir.display())))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(store_err)?
                    .with_automatic_cleanup(true)
                    .with_fsync(true);
                return Ok(Repository::with_store(Arc::new(fs), Path::default(), url));
            }
            ObjectStoreScheme::Memory => {
                if let Some((k, _)) = options.first() {
                    return Err(unknown(k));
                }
                Arc::new(object_store::memory::InMemory::new())
            }
            ObjectStoreScheme::AmazonS3 => {
                use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
                let mut b = AmazonS3Builder::from_env().with_url(url);
                for (k, v) in &options {
                    let key = AmazonS3ConfigKey::from_str(k).map_err(|_| unknown(k))?;
                    b = b.with_config(key, v.clone());
                }
                Arc::new(b.build().map_err(store_err)?)
            }
            ObjectStoreScheme::MicrosoftAzure => {
                use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
                let mut b = MicrosoftAzureBuilder::from_env().with_url(url);
                for (k, v) in &options {
                    let key = AzureConfigKey::from_str(k).map_err(|_| unknown(k))?;
                    b = b.with_config(key, v.clone());
                }
                Arc::new(b.build().map_err(store_err)?)
            }
            ObjectStoreScheme::GoogleCloudStorage => {
                use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
                let mut b = GoogleCloudStorageBuilder::from_env().with_url(url);
                for (k, v) in &options {
                    let key = GoogleConfigKey::from_str(k).map_err(|_| unknown(k))?;
                    b = b.with_config(key, v.clone());
                }
                Arc::new(b.build().map_err(store_err)?)
            }
            _ => {
                return Err(invalid(
                    "unsupported scheme; use file://, s3://, az://, gs:// or memory://".into(),
                ))
            }
        };
        Ok(Repository::with_store(store, root, url))
    }

    /// Wraps an existing store (for example a fault-injecting one in tests).
    pub fn with_store(store: Arc<dyn ObjectStore>, root: Path, url: &str) -> Self {
        Repository {
            store,
            root,
            location: redact(url),
            retry: RetryPolicy::default(),
        }
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The URL, without credentials or query, for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The underlying store and root, for wrappers.
    pub fn store(&self) -> (&Arc<dyn ObjectStore>, &Path) {
        (&self.store, &self.root)
    }

    fn path(&self, key: &str) -> Result<Path> {
        let full = if self.root.as_ref().is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.root)
        };
        Path::parse(&full).map_err(|e| Error::InvalidUrl {
            url: full.clone(),
            reason: e.to_string(),
        })
    }

    fn relative(&self, p: &Path) -> String {
        let s = p.as_ref();
        let root = self.root.as_ref();
        if root.is_empty() {
            s.to_string()
        } else {
            s.strip_prefix(root)
                .map(|r| r.trim_start_matches('/'))
                .unwrap_or(s)
                .to_string()
        }
    }

    /// Writes `key` only if it does not exist. Identical existing bytes count as success.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<PutOutcome> {
        let path = self.path(key)?;
        let created = self
            .retry
            .run(|| async {
                let opts = PutOptions::from(PutMode::Create);
                match self
                    .store
                    .put_opts(&path, PutPayload::from(bytes.clone()), opts)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                    Err(source) => Err(store_error("put", key, source)),
                }
            })
            .await?;
        if created {
            return Ok(PutOutcome::Created);
        }
        // Either an earlier attempt landed before its response was lost, or someone else
        // wrote this name. Only identical bytes are acceptable.
        let stored = self.get(key).await?;
        if stored == bytes {
            Ok(PutOutcome::AlreadyPresent)
        } else {
            Err(Error::Conflict {
                key: key.to_string(),
            })
        }
    }

    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path(key)?;
        self.retry
            .run(|| async {
                let r = self
                    .store
                    .get(&path)
                    .await
                    .map_err(|e| store_error("get", key, e))?;
                r.bytes().await.map_err(|e| store_error("get", key, e))
            })
            .await
    }

    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let path = self.path(key)?;
        let want = range.end.saturating_sub(range.start);
        let got = self
            .retry
            .run(|| async {
                match self.store.get_range(&path, range.clone()).await {
                    Ok(b) => Ok(b),
                    // A range that starts past the end comes back as a Generic error (local
                    // and memory: InvalidGetRange; S3: HTTP 416), which would pass for
                    // transient. It is a definite answer: the object is shorter than asked.
                    Err(e) if store_error_is_transient(&e) => match self.store.head(&path).await {
                        Ok(meta) if meta.size < range.end => Err(Error::Truncated {
                            have: usize::try_from(meta.size.saturating_sub(range.start))
                                .unwrap_or(usize::MAX),
                            need: usize::try_from(want).unwrap_or(usize::MAX),
                        }),
                        _ => Err(store_error("get range of", key, e)),
                    },
                    Err(e) => Err(store_error("get range of", key, e)),
                }
            })
            .await?;
        if got.len() as u64 != want {
            return Err(Error::Truncated {
                have: got.len(),
                need: usize::try_from(want).unwrap_or(usize::MAX),
            });
        }
        Ok(got)
    }

    /// Size of `key`, or None if it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<u64>> {
        let path = self.path(key)?;
        let r = self
            .retry
            .run(|| async {
                self.store
                    .head(&path)
                    .await
                    .map_err(|e| store_error("head", key, e))
            })
            .await;
        match r {
            Ok(meta) => Ok(Some(meta.size)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every object under `prefix` (whole path segments), sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let p = if prefix.is_empty() {
            None
        } else {
            Some(self.path(prefix.trim_end_matches('/'))?)
        };
        let p = match (&p, self.root.as_ref().is_empty()) {
            (Some(p), _) => Some(p.clone()),
            (None, false) => Some(self.root.clone()),
            (None, true) => None,
        };
        let mut items = self
            .retry
            .run(|| async {
                self.store
                    .list(p.as_ref())
                    .map_ok(|m| ObjectInfo {
                        key: self.relative(&m.location),
                        size: m.size,
                        last_modified: jiff::Timestamp::new(
                            m.last_modified.timestamp(),
                            m.last_modified.timestamp_subsec_nanos() as i32,
                        )
                        .ok(),
                    })
                    .try_collect::<Vec<_>>()
                    .await
                    .map_err(|e| store_error("list", prefix, e))
            })
            .await?;
        items.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(items)
    }

    /// Deletes `key`; a key that is already gone counts as deleted.
    pub async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        let r = self
            .retry
            .run(|| async {
                self.store
                    .delete(&path)
                    .await
                    .map_err(|e| store_error("delete", key, e))
            })
            .await;
        match r {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    /// Creates a new repository. Refuses if one exists; `walferry.json` is written last.
    pub async fn init(&self, master: Option<&MasterKey>) -> Result<RepoConfig> {
        let config = RepoConfig::new(master, jiff::Timestamp::now().to_string());
        self.init_with(master, config).await
    }

    /// [`Self::init`] with a config made by [`RepoConfig::new`] and adjusted by the caller.
    pub async fn init_with(
        &self,
        master: Option<&MasterKey>,
        config: RepoConfig,
    ) -> Result<RepoConfig> {
        if self.head(CONFIG_KEY).await?.is_some() {
            return Err(Error::RepositoryExists {
                location: self.location.clone(),
            });
        }
        if let Some(master) = master {
            let id = config.current_key_id.unwrap_or(1);
            let key = wrap_identity(id);
            let wrapped = DataKeyMaterial::generate(id).wrap(master)?;
            match self.put(&key, Bytes::from(wrapped)).await {
                Ok(_) => {}
                Err(Error::Conflict { .. }) => {
                    // An earlier init died before writing walferry.json. Reuse its key if ours opens it.
                    let existing = self.get(&key).await?;
                    DataKeyMaterial::unwrap(&existing, id, master).map_err(|_| {
                        Error::InitLeftovers {
                            location: self.location.clone(),
                            key,
                        }
                    })?;
                }
                Err(e) => return Err(e),
            }
        }
        match self.put(CONFIG_KEY, Bytes::from(config.to_json())).await {
            Ok(_) => Ok(config),
            Err(Error::Conflict { .. }) => Err(Error::RepositoryExists {
                location: self.location.clone(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Reads and validates `walferry.json`.
    pub async fn config(&self) -> Result<RepoConfig> {
        match self.get(CONFIG_KEY).await {
            Ok(b) => RepoConfig::from_json(&b),
            Err(e) if e.is_not_found() => Err(Error::NotARepository {
                location: self.location.clone(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Reads the config, checks the master key against it and unwraps the data keys.
    pub async fn open_keyring(&self, master: Option<&MasterKey>) -> Result<(RepoConfig, Keyring)> {
        let config = self.config().await?;
        config.check_master_key(master)?;
        let (Some(master), Some(current)) = (master, config.current_key_id) else {
            return Ok((config, Keyring::unencrypted()));
        };
        let mut materials = Vec::with_capacity(config.key_ids.len());
        for &id in &config.key_ids {
            let bytes = self.get(&wrap_identity(id)).await?;
            materials.push(DataKeyMaterial::unwrap(&bytes, id, master)?);
        }
        let ring = Keyring::from_materials(&materials, current)?;
        Ok((config, ring))
    }
}

fn store_error(op: &'static str, key: &str, source: object_store::Error) -> Error {
    match source {
        object_store::Error::NotFound { .. } => Error::NotFound {
            key: key.to_string(),
        },
        source => Error::Store {
            op,
            key: key.to_string(),
            source,
        },
    }
}

/// Drops credentials and query parameters from a URL for display.
fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.to_string()
        }
        Err(_) => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_options_are_errors() {
        let e = Repository::open("s3://b/p", [("aws_endpiont", "http://x")]).unwrap_err();
        assert!(matches!(e, Error::UnknownOption { .. }), "{e}");
        assert!(Repository::open(
            "s3://b/p",
            [
                ("AWS_ENDPOINT", "http://127.0.0.1:1"),
                ("aws_region", "us-east-1")
            ]
        )
        .is_ok());
        assert!(matches!(
            Repository::open("memory://", [("x", "y")]),
            Err(Error::UnknownOption { .. })
        ));
        assert!(matches!(
            Repository::open("az://c/p", [("azure_bogus", "1")]),
            Err(Error::UnknownOption { .. })
        ));
        assert!(Repository::open("ftp://x/y", Vec::<(String, String)>::new()).is_err());
        assert!(Repository::open("not a url", Vec::<(String, String)>::new()).is_err());
    }

    #[test]
    fn redacts_credentials() {
        assert_eq!(redact("s3://user:secret@bucket/p?sig=abc"), "s3://bucket/p");
    }

    #[tokio::test]
    async fn range_past_the_end_is_truncated_not_transient() {
        let dir = tempfile::tempdir().unwrap();
        let file = format!("file://{}/repo", dir.path().display());
        for url in ["memory:///r", file.as_str()] {
            let repo = Repository::open(url, Vec::<(String, String)>::new()).unwrap();
            repo.put("k", Bytes::from(vec![1u8; 100])).await.unwrap();
            assert_eq!(repo.get_range("k", 90..100).await.unwrap().len(), 10);
            for range in [90..110, 100..101, 200..300] {
                let e = repo.get_range("k", range.clone()).await.unwrap_err();
                assert!(
                    matches!(e, Error::Truncated { .. }),
                    "{url} {range:?}: {e:?}"
                );
                assert!(!e.is_transient() && e.is_corruption());
            }
            assert!(repo
                .get_range("none", 0..1)
                .await
                .unwrap_err()
                .is_not_found());
        }
    }

    #[tokio::test]
    async fn init_is_create_only_and_keys_work() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/repo", dir.path().display());
        let repo = Repository::open(&url, Vec::<(String, String)>::new()).unwrap();
        assert!(matches!(
            repo.config().await,
            Err(Error::NotARepository { .. })
        ));
        let master = MasterKey::generate();
        let cfg = repo.init(Some(&master)).await.unwrap();
        assert!(matches!(
            repo.init(Some(&master)).await,
            Err(Error::RepositoryExists { .. })
        ));
        assert!(matches!(
            repo.init(None).await,
            Err(Error::RepositoryExists { .. })
        ));
        let (back, ring) = repo.open_keyring(Some(&master)).await.unwrap();
        assert_eq!(back, cfg);
        assert!(ring.is_encrypted());
        assert!(matches!(
            repo.open_keyring(Some(&MasterKey::generate())).await,
            Err(Error::WrongMasterKey)
        ));
        assert!(matches!(
            repo.open_keyring(None).await,
            Err(Error::MasterKeyRequired)
        ));
    }
}
