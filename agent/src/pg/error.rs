//! The one error type of the replication client, with predicates callers branch on.

use std::fmt;
use std::io;
use std::time::Duration;

/// Result alias for the pg module.
pub type Result<T, E = PgError> = std::result::Result<T, E>;

/// Everything that can go wrong talking to PostgreSQL over the replication protocol.
///
/// Branch on the predicates ([`PgError::is_transient`], [`PgError::is_auth`],
/// [`PgError::sqlstate`], ...) rather than on variants: a retry loop reconnects on transient
/// errors (connection drops, server restarts, "the database system is starting up", all
/// walsender slots busy) and gives up on permanent ones (bad password, missing pg_hba line,
/// missing REPLICATION attribute, bad settings), which need an operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The connection string or an argument is invalid. Permanent.
    #[error("invalid connection settings: {message}")]
    Config { message: String },

    /// A TCP connect or unix socket connect failed (refused, unreachable, no such socket).
    /// (The io error is in the message, so it is not also a `source()`.)
    #[error("connect to {addr}: {error}")]
    Connect { addr: String, error: io::Error },

    /// `connect_timeout` elapsed before the connection was ready.
    #[error("connect to {addr}: timed out after {}s", after.as_secs())]
    Timeout { addr: String, after: Duration },

    /// The TLS handshake or certificate verification failed.
    #[error("TLS with {addr}: {message}")]
    Tls { addr: String, message: String },

    /// The server does not do TLS but sslmode demands it.
    #[error(
        "server {addr} does not support TLS but sslmode={sslmode} requires it \
         (set ssl = on in postgresql.conf, or use sslmode=prefer)"
    )]
    TlsRefused { addr: String, sslmode: &'static str },

    /// Authentication failed on our side: no password for a method that needs one, an
    /// unsupported method, or a server that failed SCRAM's proof of knowing the password.
    #[error("authentication: {message}")]
    Auth { message: String },

    /// The server sent an ErrorResponse.
    #[error("{0}")]
    Server(Box<ServerError>),

    /// Reading or writing the established connection failed.
    #[error("connection to the server failed: {0}")]
    Io(io::Error),

    /// The server closed the connection.
    #[error("the server closed the connection")]
    Closed,

    /// The server sent something the protocol does not allow here.
    #[error("protocol violation: {message}")]
    Protocol { message: String },

    /// `target_session_attrs=read-write` and this server is read-only (a standby).
    #[error("server {addr} is read-only (in recovery), but target_session_attrs=read-write")]
    ReadOnly { addr: String },

    /// Every host of a multi-host connection string failed; one entry per attempt.
    #[error("could not connect to any host: {}", AttemptList(.attempts))]
    AllHostsFailed { attempts: Vec<HostAttempt> },
}

/// One failed attempt of a multi-host connect.
#[derive(Debug)]
pub struct HostAttempt {
    /// `host:port` or the unix socket path.
    pub addr: String,
    pub error: PgError,
}

struct AttemptList<'a>(&'a [HostAttempt]);

impl fmt::Display for AttemptList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "[{}] {}", a.addr, a.error)?;
        }
        Ok(())
    }
}

impl PgError {
    pub(crate) fn config(message: impl Into<String>) -> Self {
        PgError::Config {
            message: message.into(),
        }
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        PgError::Protocol {
            message: message.into(),
        }
    }

    pub(crate) fn auth(message: impl Into<String>) -> Self {
        PgError::Auth {
            message: message.into(),
        }
    }

    /// Worth retrying later (with backoff): the connection dropped, the server is restarting,
    /// starting up, shutting down or in crash recovery, all walsender slots are busy, a slot
    /// is still held by an old connection, or (multi-host) any host failed transiently.
    /// Permanent errors (authentication, pg_hba, privileges, settings, missing slot, removed
    /// WAL) need an operator; retrying them only fills the log.
    pub fn is_transient(&self) -> bool {
        match self {
            PgError::Connect { .. }
            | PgError::Timeout { .. }
            | PgError::Io(_)
            | PgError::Closed
            | PgError::ReadOnly { .. } => true,
            PgError::Server(e) => e.is_transient(),
            PgError::AllHostsFailed { attempts } => attempts.iter().any(|a| a.error.is_transient()),
            PgError::Config { .. }
            | PgError::Tls { .. }
            | PgError::TlsRefused { .. }
            | PgError::Auth { .. }
            | PgError::Protocol { .. } => false,
        }
    }

    /// Not transient.
    pub fn is_permanent(&self) -> bool {
        !self.is_transient()
    }

    /// Authentication or authorization failed (password, pg_hba, REPLICATION attribute).
    pub fn is_auth(&self) -> bool {
        match self {
            PgError::Auth { .. } => true,
            PgError::Server(e) => {
                e.code.starts_with("28")
                    || e.code == "42501"
                    || e.message.contains("must be superuser or replication role")
            }
            PgError::AllHostsFailed { attempts } => attempts.iter().all(|a| a.error.is_auth()),
            _ => false,
        }
    }

    /// The server's error, if this is one (for a multi-host failure: the last server error).
    pub fn server_error(&self) -> Option<&ServerError> {
        match self {
            PgError::Server(e) => Some(e),
            PgError::AllHostsFailed { attempts } => {
                attempts.iter().rev().find_map(|a| a.error.server_error())
            }
            _ => None,
        }
    }

    /// The SQLSTATE of the server's error, e.g. `28P01`.
    pub fn sqlstate(&self) -> Option<&str> {
        self.server_error().map(|e| e.code.as_str())
    }

    /// `replication slot "…" does not exist`.
    pub fn is_slot_missing(&self) -> bool {
        self.server_error().is_some_and(|e| {
            e.code == "42704"
                || (e.message.contains("replication slot") && e.message.contains("does not exist"))
        })
    }

    /// `requested WAL segment … has already been removed`: the server no longer has the WAL
    /// we asked for; a gap in the archive that only a new base backup closes.
    pub fn is_wal_removed(&self) -> bool {
        self.server_error()
            .is_some_and(|e| e.message.contains("has already been removed"))
    }

    /// Operator advice for this error, if there is some.
    pub fn advice(&self) -> Option<&'static str> {
        match self {
            PgError::Server(e) => e.advice(),
            PgError::Connect { error, .. }
                if matches!(
                    error.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                ) =>
            {
                Some(
                    "nothing accepts connections there: is the server running, and do \
                     listen_addresses, port and unix_socket_directories match the connection \
                     string? walferry retries",
                )
            }
            PgError::AllHostsFailed { attempts } => attempts.iter().find_map(|a| a.error.advice()),
            _ => None,
        }
    }
}

impl From<ServerError> for PgError {
    fn from(e: ServerError) -> Self {
        PgError::Server(Box::new(e))
    }
}

/// The fields of a server ErrorResponse (or NoticeResponse).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ServerError {
    /// ERROR, FATAL or PANIC (the non-localized 'V' field when present).
    pub severity: String,
    /// SQLSTATE, e.g. `28P01`.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ServerError {
    /// Parse the fields of an ErrorResponse/NoticeResponse body. Unknown fields are skipped;
    /// non-UTF-8 text is replaced, never a panic.
    pub(crate) fn from_fields<'a>(fields: impl IntoIterator<Item = (u8, &'a [u8])>) -> Self {
        let mut e = ServerError::default();
        let mut localized_severity = None;
        for (ty, value) in fields {
            let v = String::from_utf8_lossy(value).into_owned();
            match ty {
                b'V' => e.severity = v,
                b'S' => localized_severity = Some(v),
                b'C' => e.code = v,
                b'M' => e.message = v,
                b'D' => e.detail = Some(v),
                b'H' => e.hint = Some(v),
                _ => {}
            }
        }
        if e.severity.is_empty() {
            e.severity = localized_severity.unwrap_or_else(|| "ERROR".to_owned());
        }
        e
    }

    /// The session is gone after this error (FATAL or PANIC).
    pub fn is_fatal(&self) -> bool {
        self.severity == "FATAL" || self.severity == "PANIC"
    }

    /// See [`PgError::is_transient`].
    pub fn is_transient(&self) -> bool {
        let c = self.code.as_str();
        // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now (starting up,
        // shutting down, in recovery), 57P05 idle_session_timeout; 53xxx insufficient
        // resources (53300: too many connections, incl. max_wal_senders); 08xxx connection
        // exceptions; 55006 object_in_use (a slot still held by the previous connection).
        matches!(c, "57P01" | "57P02" | "57P03" | "57P05" | "55006")
            || c.starts_with("53")
            || c.starts_with("08")
            || self.message.contains("the database system is starting up")
            || self
                .message
                .contains("the database system is shutting down")
            || self
                .message
                .contains("the database system is in recovery mode")
    }

    /// Operator advice for the common misconfigurations.
    pub fn advice(&self) -> Option<&'static str> {
        let m = self.message.as_str();
        let c = self.code.as_str();
        if m.contains("no pg_hba.conf entry for replication connection")
            && m.contains("no encryption")
        {
            return Some(
                "pg_hba.conf has no line that allows this unencrypted replication connection; a \
                 physical walsender only matches lines whose database column is the keyword \
                 `replication` (`all` does not match it). Add e.g. `host replication <user> \
                 <client-address>/32 scram-sha-256` and reload the server, or, if only \
                 `hostssl` lines allow it, connect with sslmode=require or stronger",
            );
        }
        if m.contains("no pg_hba.conf entry for replication connection") {
            return Some(
                "pg_hba.conf has no line that allows this replication connection; a physical \
                 walsender only matches lines whose database column is the keyword \
                 `replication` (`all` does not match it). Add e.g. `host replication <user> \
                 <client-address>/32 scram-sha-256` and reload the server",
            );
        }
        if m.contains("no pg_hba.conf entry") {
            return Some(
                "pg_hba.conf has no line for this client, user and encryption; add one (for \
                 streaming WAL: database column `replication`) and reload the server",
            );
        }
        if m.contains("pg_hba.conf rejects replication connection") {
            return Some(
                "a `reject` line in pg_hba.conf matches this replication connection; put an \
                 allowing `replication` line before it and reload the server",
            );
        }
        if m.contains("must be superuser or replication role")
            || m.contains("permission denied to start WAL sender")
            || (c == "42501" && m.contains("replication"))
        {
            return Some(
                "the role may not stream WAL: run `ALTER ROLE <user> REPLICATION` as a superuser",
            );
        }
        if c == "28P01" || m.contains("password authentication failed") {
            return Some(
                "the password is wrong or the role has none: check `password=` in the \
                 connection string, PGPASSWORD or the password file (~/.pgpass), and that the \
                 role's password was set with the server's password_encryption",
            );
        }
        if m.contains("has already been removed") {
            return Some(
                "the server already recycled WAL the archive still needs, so the archive has \
                 a gap: use a replication slot so this cannot happen, and take a new base \
                 backup to start a new restorable window",
            );
        }
        if m.contains("replication slot") && m.contains("does not exist") {
            return Some(
                "the replication slot is missing (dropped, or this is another server after a \
                 failover): create it, and check the archive for a gap",
            );
        }
        if m.contains("exceeds max_wal_senders") || m.contains("max_wal_senders") {
            return Some(
                "all walsender slots are in use: raise max_wal_senders (restart needed) or stop \
                 other replication clients",
            );
        }
        if m.contains("all replication slots are in use") {
            return Some("raise max_replication_slots (restart needed) or drop unused slots");
        }
        if c == "57P03" {
            return Some(
                "the server is not accepting connections yet (starting up, shutting down or in \
                 crash recovery); walferry retries",
            );
        }
        if c == "55006" && m.contains("replication slot") {
            return Some(
                "another connection is using this replication slot (often an old walferry \
                 connection the server has not noticed is gone; it is released after \
                 wal_sender_timeout)",
            );
        }
        if m.contains("is ahead of the WAL flush position") {
            return Some(
                "the requested start is beyond this server's WAL: after a failover to a lagging \
                 standby, the archive holds WAL this server never had; take a new base backup",
            );
        }
        if m.contains("is not in this server's history") {
            return Some(
                "this server's timeline history does not contain the requested timeline: the \
                 archive belongs to another cluster or a diverged timeline",
            );
        }
        if m.contains("unrecognized configuration parameter") {
            return Some("the server rejected a startup parameter; check the connection string");
        }
        None
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "server {}: {}", self.severity, self.message)?;
        if !self.code.is_empty() {
            write!(f, " (SQLSTATE {})", self.code)?;
        }
        if let Some(d) = &self.detail {
            write!(f, "; detail: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        if let Some(a) = self.advice() {
            write!(f, "; advice: {a}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(severity: &str, code: &str, message: &str) -> ServerError {
        ServerError {
            severity: severity.into(),
            code: code.into(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    #[test]
    fn classifies_common_server_errors() {
        let starting = PgError::from(server(
            "FATAL",
            "57P03",
            "the database system is starting up",
        ));
        assert!(starting.is_transient());
        assert!(!starting.is_auth());

        let hba = PgError::from(server(
            "FATAL",
            "28000",
            "no pg_hba.conf entry for replication connection from host \"127.0.0.1\", user \"u\", no encryption",
        ));
        assert!(hba.is_permanent());
        assert!(hba.is_auth());
        assert!(hba.advice().unwrap().contains("host replication"));
        assert!(hba.to_string().contains("advice:"), "{hba}");

        let pw = PgError::from(server(
            "FATAL",
            "28P01",
            "password authentication failed for user \"u\"",
        ));
        assert!(pw.is_auth() && pw.is_permanent());
        assert_eq!(pw.sqlstate(), Some("28P01"));

        let role = PgError::from(server(
            "FATAL",
            "42501",
            "must be superuser or replication role to start walsender",
        ));
        assert!(role.is_auth());
        assert!(role.advice().unwrap().contains("ALTER ROLE"));

        let senders = PgError::from(server(
            "FATAL",
            "53300",
            "number of requested standby connections exceeds max_wal_senders (currently 1)",
        ));
        assert!(senders.is_transient());
        assert!(senders.advice().unwrap().contains("max_wal_senders"));

        let removed = PgError::from(server(
            "ERROR",
            "58P01",
            "requested WAL segment 000000010000000000000001 has already been removed",
        ));
        assert!(removed.is_wal_removed() && removed.is_permanent());

        let slot = PgError::from(server(
            "ERROR",
            "42704",
            "replication slot \"x\" does not exist",
        ));
        assert!(slot.is_slot_missing() && slot.is_permanent());

        let shutdown = PgError::from(server(
            "FATAL",
            "57P01",
            "terminating connection due to administrator command",
        ));
        assert!(shutdown.is_transient());
    }

    #[test]
    fn multi_host_transient_if_any_attempt_is() {
        let refused = PgError::Connect {
            addr: "h:1".into(),
            error: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        assert!(refused.is_transient());
        assert!(refused.advice().unwrap().contains("server running"));

        let e = PgError::AllHostsFailed {
            attempts: vec![
                HostAttempt {
                    addr: "a:5432".into(),
                    error: PgError::auth("no password supplied"),
                },
                HostAttempt {
                    addr: "b:5432".into(),
                    error: PgError::Closed,
                },
            ],
        };
        assert!(e.is_transient());
        assert!(!e.is_auth());
        let s = e.to_string();
        assert!(s.contains("[a:5432]") && s.contains("[b:5432]"), "{s}");
    }
}
