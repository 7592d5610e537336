//! walferry-agent library: the writer side (shared by the binary and tests).
