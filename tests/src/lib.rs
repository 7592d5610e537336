//! walferry testkit.
