//! walferry testkit: real PostgreSQL clusters ([`pg::PgCluster`]) and object-store targets
//! ([`emulators::StoreTarget`]: file, memory, Azurite, moto S3) for the end-to-end tests in
//! `tests/tests/` (one test binary, `e2e`; see `tests/tests/main.rs`).

pub mod bins;
pub mod emulators;
pub mod faults;
pub mod pg;
pub mod restore;

pub use emulators::{
    all_targets, azurite_target, file_target, memory_target, require_emulators, s3_target,
    StoreTarget,
};
pub use pg::{PgCluster, PgClusterBuilder};
