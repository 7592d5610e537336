//! walferry-agent library: the writer side (shared by the binary and tests).

pub mod archive;
pub mod backup;
pub mod cluster;
pub mod daemon;
pub mod lease;
pub mod list;
pub mod localbackup;
pub mod metrics;
pub mod pg;
pub mod pgmanifest;
pub mod retention;
pub mod stream;
pub mod walpush;
