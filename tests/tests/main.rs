//! The `e2e` integration-test binary of walferry-tests.
//!
//! All end-to-end tests live in this one binary (one link instead of one per file; cargo's
//! auto-discovery is off: `autotests = false` in tests/Cargo.toml). To add tests, create
//! `tests/tests/<name>.rs` and add `mod <name>;` below. Each test still runs in its own
//! process under `cargo nextest`, so PostgreSQL clusters and emulators never share state
//! by accident.
//!
//! Run: `cargo nextest run -p walferry-tests` (or `cargo test -p walferry-tests`).

#![allow(clippy::unwrap_used)]

mod basebackup_protocol;
mod cli;
mod conformance;
mod daemon;
mod deploy;
mod local_backup;
mod pitr;
mod replication;
mod restore_errors;
mod retention;
mod standby;
mod streaming;
mod streaming_more;
mod testkit;
mod verify;
mod walreader;
