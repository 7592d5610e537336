//! walferry-formats: every byte walferry keeps at rest, and the repository that holds them.
//!
//! - [`lsn`] and [`walname`]: LSNs, timelines, segment numbers and WAL file names.
//! - [`envelope`]: the framed, compressed, encrypted, checksummed unit of storage.
//! - [`keyring`]: master key, wrapped data keys, block naming.
//! - [`backup`]: backup manifests and packs of blocks.
//! - [`config`]: the repository config file, walferry.json.
//! - [`layout`]: object names in a repository; [`walcatalog`]: what WAL it holds.
//! - [`repo`]: create-only access to object storage.
//! - [`target`]: recovery target times as users type them.
//! - [`view`]: a read-only view of a repository (backups, WAL, index, timelines).
//! - [`walreader`]: a sans-IO scanner of WAL pages and records (commit times, restore points).
//! - [`units`]: seal-and-store and fetch-and-open, with the codec on a bounded blocking pool.
//!
//! The codec modules are pure and synchronous. [`repo`] and [`units`] are async, because
//! object stores are; [`units`] is the one place that moves codec work onto tokio's
//! blocking pool, so neither binary runs zstd or AES on an async thread.

pub mod backup;
pub mod config;
pub mod envelope;
mod error;
pub mod gcm;
pub mod keyring;
pub mod layout;
pub mod lsn;
pub mod repo;
pub mod target;
pub mod units;
pub mod view;
pub mod walcatalog;
pub mod walname;
pub mod walreader;

pub use error::{Error, Result};
pub use lsn::{Lsn, SegmentNo, SegmentSize, TimelineId};
pub use repo::{ObjectInfo, PutOutcome, Repository, RetryPolicy};
pub use units::Units;
pub use walname::WalFileName;
