//! walferry-restore library: the reader side (shared by the binary and tests).

pub mod materialize;
pub mod plan;
pub mod recovery;
pub mod verify;
pub mod walfetch;
