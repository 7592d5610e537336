//! Storing and reading envelopes: the codec runs on tokio's blocking pool, bounded to
//! one task per core, never on the async threads.

use std::cell::RefCell;
use std::sync::Arc;

use crate::config::RepoConfig;
use crate::envelope::{Kind, Opener, Sealer};
use crate::keyring::{Keyring, MasterKey};
use crate::{Error, PutOutcome, Repository};
use bytes::Bytes;
use tokio::sync::Semaphore;

thread_local! {
    static SEALER: RefCell<Option<Sealer>> = const { RefCell::new(None) };
    static OPENER: RefCell<Option<Opener>> = const { RefCell::new(None) };
}

/// Seals, stores, fetches and opens envelopes in one repository.
#[derive(Clone)]
pub struct Units {
    repo: Repository,
    keyring: Arc<Keyring>,
    level: i32,
    cpu: Arc<Semaphore>,
}

impl Units {
    pub fn new(repo: Repository, keyring: Arc<Keyring>, level: i32) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Units {
            repo,
            keyring,
            level,
            cpu: Arc::new(Semaphore::new(cores)),
        }
    }

    /// Opens an existing repository: reads its config, checks the master key against it
    /// and unwraps the data keys.
    pub async fn load(
        repo: Repository,
        master: Option<&MasterKey>,
    ) -> Result<(Self, RepoConfig), Error> {
        let (config, keyring) = repo.open_keyring(master).await?;
        let level = config.compression.level;
        Ok((Units::new(repo, Arc::new(keyring), level), config))
    }

    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }

    /// Runs codec work on the blocking pool, at most one task per core.
    async fn on_pool<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Keyring) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let _permit = self.cpu.acquire().await.map_err(|_| Error::Compress {
            reason: "worker pool closed".into(),
        })?;
        let keyring = self.keyring.clone();
        blocking(move || f(&keyring)).await
    }

    /// Seals `plaintext` under `identity` (an object key, or a block id) off the async threads.
    pub async fn seal(
        &self,
        identity: impl AsRef<[u8]>,
        kind: Kind,
        plaintext: Bytes,
    ) -> Result<Bytes, Error> {
        let identity = identity.as_ref().to_vec();
        let level = self.level;
        self.on_pool(move |keyring| {
            SEALER.with(|cell| {
                let mut slot = cell.borrow_mut();
                let sealer = match slot.as_mut() {
                    Some(s) if s.level() == level => s,
                    _ => slot.insert(Sealer::new(level)?),
                };
                sealer
                    .seal(kind, &identity, &plaintext, keyring)
                    .map(Bytes::from)
            })
        })
        .await
    }

    /// Opens an envelope sealed under `identity` off the async threads.
    pub async fn open(
        &self,
        identity: impl AsRef<[u8]>,
        kind: Kind,
        sealed: Bytes,
    ) -> Result<Bytes, Error> {
        let identity = identity.as_ref().to_vec();
        self.on_pool(move |keyring| {
            with_opener(|o| o.open(&sealed, kind, &identity, keyring).map(Bytes::from))
        })
        .await
    }

    /// Opens a block envelope and checks that its plaintext hashes to `id`, so a block
    /// that decrypts but is not the one the manifest asked for is never written out.
    pub async fn open_block(&self, id: [u8; 32], sealed: Bytes) -> Result<Bytes, Error> {
        self.on_pool(move |keyring| {
            let plain = with_opener(|o| o.open(&sealed, Kind::Block, &id, keyring))?;
            if keyring.block_id(&plain) != id {
                return Err(Error::BlockHashMismatch {
                    id: hex::encode(id),
                });
            }
            Ok(Bytes::from(plain))
        })
        .await
    }

    /// Seals and stores `plaintext` at `key`, create-only.
    ///
    /// Nonces are random, so re-storing the same plaintext (after a crash, or a second
    /// `wal-push` of one file) meets different envelope bytes: that is success when the
    /// stored object opens to the same plaintext, and a conflict otherwise.
    pub async fn put(&self, key: &str, kind: Kind, plaintext: Bytes) -> Result<PutOutcome, Error> {
        let sealed = self.seal(key, kind, plaintext.clone()).await?;
        match self.repo.put(key, sealed).await {
            Err(Error::Conflict { .. }) => {
                let stored = self.repo.get(key).await?;
                match self.open(key, kind, stored).await {
                    Ok(existing) if existing == plaintext => Ok(PutOutcome::AlreadyPresent),
                    _ => Err(Error::Conflict {
                        key: key.to_string(),
                    }),
                }
            }
            other => other,
        }
    }

    /// Fetches `key` and opens it straight into `file` (see [`Opener::open_into`]), off
    /// the async threads; returns the plaintext length.
    pub async fn get_into(
        &self,
        key: &str,
        kind: Kind,
        file: std::fs::File,
        path: std::path::PathBuf,
    ) -> Result<u64, Error> {
        let sealed = self.repo.get(key).await?;
        let identity = key.as_bytes().to_vec();
        self.on_pool(move |keyring| {
            let mut file = file;
            with_opener(|o| o.open_into(&sealed, kind, &identity, keyring, &mut file, &path))
        })
        .await
    }

    /// Fetches and opens `key`.
    pub async fn get(&self, key: &str, kind: Kind) -> Result<Bytes, Error> {
        let sealed = self.repo.get(key).await?;
        self.open(key, kind, sealed).await
    }
}

/// This thread's reusable opener (one zstd context per pool thread).
fn with_opener<T>(f: impl FnOnce(&mut Opener) -> Result<T, Error>) -> Result<T, Error> {
    OPENER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let opener = match slot.as_mut() {
            Some(o) => o,
            None => slot.insert(Opener::new()?),
        };
        f(opener)
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Compress {
            reason: format!("worker task failed: {e}"),
        })?
}
