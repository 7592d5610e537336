//! walferry-restore library: the reader side (shared by the binary and tests).

pub mod walfetch;
