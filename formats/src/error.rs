use std::path::PathBuf;

use crate::envelope::Kind;

/// The one error type of `walferry-formats`.
///
/// Variants carry the facts a caller needs to act; the predicates below group them
/// the way callers branch (retry, report damage, ask for another key).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid LSN {input:?}: expected two hex numbers like 16/B374D848")]
    InvalidLsn { input: String },

    #[error("invalid WAL segment size {bytes}: must be a power of two from 1 MiB to 1 GiB")]
    InvalidSegmentSize { bytes: u64 },

    #[error("invalid WAL file name {name:?}: {reason}")]
    InvalidWalFileName { name: String, reason: &'static str },

    #[error("invalid time {input:?}: {reason}")]
    InvalidTime { input: String, reason: String },

    #[error("truncated object: {have} bytes, at least {need} needed")]
    Truncated { have: usize, need: usize },

    #[error("not a walferry object (bad magic)")]
    BadMagic,

    #[error(
        "unknown object format version {version}; this walferry reads version {}",
        crate::envelope::FORMAT_VERSION
    )]
    UnknownFormat { version: u8 },

    #[error(
        "checksum mismatch: stored crc32 {stored:08x}, computed {computed:08x} (object is corrupt)"
    )]
    CrcMismatch { stored: u32, computed: u32 },

    #[error("corrupt object header: unknown {field} {value}")]
    UnknownHeaderValue { field: &'static str, value: u8 },

    #[error("object is a {found:?}, expected a {expected:?}")]
    WrongKind { expected: Kind, found: Kind },

    #[error(
        "object is encrypted with data key {key_id}, which this repository's keyring does not hold"
    )]
    UnknownKeyId { key_id: u32 },

    #[error("object is encrypted (data key {key_id}) but no key was given: pass --key-file or set WALFERRY_KEY_FILE / WALFERRY_KEY")]
    KeyRequired { key_id: u32 },

    #[error("authentication failed with data key {key_id}: the object was modified, moved or renamed, or the key is wrong")]
    AuthenticationFailed { key_id: u32 },

    #[error(
        "object is not encrypted, but this repository requires encryption; refusing to trust it"
    )]
    PlaintextRejected,

    #[error("block {id} decodes to data with another hash (the pack holds the wrong block)")]
    BlockHashMismatch { id: String },

    #[error("decompression failed: {reason}")]
    Decompress { reason: String },

    #[error("write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("compression failed: {reason}")]
    Compress { reason: String },

    #[error("length mismatch: header says {declared} bytes, decoded {actual}")]
    LengthMismatch { declared: u64, actual: u64 },

    #[error("object declares {declared} bytes of plaintext, over the limit of {limit}")]
    TooLarge { declared: u64, limit: u64 },

    #[error("key file {path} is accessible by group or others (mode {mode:o}); run `chmod 600 {path}`", path = path.display())]
    KeyFilePermissions { path: PathBuf, mode: u32 },

    #[error("cannot read key file {path}: {source}", path = path.display())]
    KeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid master key: {reason}")]
    InvalidKey { reason: &'static str },

    #[error("the master key does not open this repository (key check failed): use the key the repository was created with")]
    WrongMasterKey,

    #[error("repository is encrypted; a master key is required: pass --key-file or set WALFERRY_KEY_FILE / WALFERRY_KEY")]
    MasterKeyRequired,

    #[error("repository is not encrypted, but a master key was given; drop the key or use another repository")]
    UnexpectedMasterKey,

    #[error("invalid repository config: {reason}")]
    InvalidConfig { reason: String },

    #[error(
        "repository format version {version} is not supported; this walferry reads version {}",
        crate::config::REPO_FORMAT_VERSION
    )]
    UnsupportedRepoFormat { version: u32 },

    #[error("invalid repository URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },

    #[error("unknown option {key:?} for a {scheme} repository; see object_store's {scheme} configuration keys")]
    UnknownOption { key: String, scheme: String },

    #[error("a walferry repository already exists at {location}; it was left untouched")]
    RepositoryExists { location: String },

    #[error("no walferry repository at {location} (walferry.json not found): check --repo, or create one with `walferry-agent init`")]
    NotARepository { location: String },

    #[error("{location} holds {key} from an interrupted init made with another master key; remove the keys/ prefix there, or use that key")]
    InitLeftovers { location: String, key: String },

    #[error("the repository holds no WAL and no backups yet (cluster.json is missing)")]
    EmptyRepository,

    /// Names the object an error is about. The cause is part of the message and not a
    /// `source()`, so a `{:#}` chain does not print it twice.
    #[error("{key}: {inner}")]
    At { key: String, inner: Box<Error> },

    #[error("object {key} not found")]
    NotFound { key: String },

    #[error("object {key} already exists with different contents; refusing to overwrite it")]
    Conflict { key: String },

    #[error("end of valid WAL at {lsn}: {reason}")]
    WalEnd {
        lsn: crate::Lsn,
        reason: crate::walreader::WalEndReason,
    },

    #[error("cannot start reading WAL at {lsn}: {reason}")]
    InvalidWalStart {
        lsn: crate::Lsn,
        reason: &'static str,
    },

    #[error("{op} {key}: {source}")]
    Store {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
}

impl Error {
    /// Names the object this error is about.
    pub fn at(self, key: &str) -> Error {
        match self {
            e @ (Error::NotFound { .. } | Error::Store { .. } | Error::At { .. }) => e,
            e => Error::At {
                key: key.to_string(),
                inner: Box::new(e),
            },
        }
    }

    /// The error underneath any [`Error::At`] naming.
    pub fn root(&self) -> &Error {
        match self {
            Error::At { inner, .. } => inner.root(),
            e => e,
        }
    }

    /// The object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self.root(), Error::NotFound { .. })
    }

    /// A failure that may go away if the same call is repeated.
    pub fn is_transient(&self) -> bool {
        match self.root() {
            Error::Store { source, .. } => store_error_is_transient(source),
            _ => false,
        }
    }

    /// The bytes themselves are damaged, tampered with, or not ours.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self.root(),
            Error::Truncated { .. }
                | Error::BadMagic
                | Error::CrcMismatch { .. }
                | Error::UnknownHeaderValue { .. }
                | Error::WrongKind { .. }
                | Error::AuthenticationFailed { .. }
                | Error::PlaintextRejected
                | Error::Decompress { .. }
                | Error::BlockHashMismatch { .. }
                | Error::LengthMismatch { .. }
                | Error::TooLarge { .. }
        )
    }

    /// A WAL scan reached the end of valid WAL (zeroed space, a recycled segment, a torn
    /// or corrupt record). Normal at the tail of the WAL that has been written.
    pub fn is_end_of_wal(&self) -> bool {
        matches!(self, Error::WalEnd { .. })
    }

    /// The caller must supply a different (or any) key.
    pub fn is_key_problem(&self) -> bool {
        matches!(
            self.root(),
            Error::UnknownKeyId { .. }
                | Error::KeyRequired { .. }
                | Error::WrongMasterKey
                | Error::MasterKeyRequired
                | Error::UnexpectedMasterKey
                | Error::InvalidKey { .. }
                | Error::KeyFilePermissions { .. }
                | Error::KeyFile { .. }
        )
    }
}

pub(crate) fn store_error_is_transient(e: &object_store::Error) -> bool {
    // Generic covers HTTP and I/O failures that survived object_store's own retries;
    // JoinError is a lost blocking task. Everything else is a definite answer.
    matches!(
        e,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    )
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
