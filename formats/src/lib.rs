//! walferry-formats: every byte walferry keeps at rest, and the repository that holds them.
//!
//! - [`lsn`] and [`walname`]: LSNs, timelines, segment numbers and WAL file names.
//! - [`envelope`]: the framed, compressed, encrypted, checksummed unit of storage.
//! - [`keyring`]: master key, wrapped data keys, block naming.
//! - [`config`]: the repository config file, walferry.json.
//! - [`repo`]: create-only access to object storage.
//! - [`target`]: recovery target times as users type them.
//!
//! The codec modules are pure and synchronous (callers run them on a blocking pool);
//! only [`repo`] is async, because object stores are. This crate never spawns tasks.

pub mod config;
pub mod envelope;
mod error;
pub mod keyring;
pub mod lsn;
pub mod repo;
pub mod target;
pub mod walname;

pub use error::{Error, Result};
pub use lsn::{Lsn, SegmentNo, SegmentSize, TimelineId};
pub use repo::{ObjectInfo, PutOutcome, Repository, RetryPolicy};
pub use walname::WalFileName;
