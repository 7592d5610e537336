//! PostgreSQL physical replication client: a walsender connection built on
//! `postgres-protocol` message codecs over tokio (tokio-postgres has no replication mode).
//!
//! - [`ConnInfo`]: libpq connection strings and URLs, environment defaults, password file.
//! - [`ReplicationConnection::connect`]: hosts in order, TLS per `sslmode` (rustls),
//!   authentication (trust, password, md5, SCRAM-SHA-256 with channel binding), and
//!   `target_session_attrs=read-write`.
//! - Replication commands on the connection: [`ReplicationConnection::identify_system`],
//!   `show`, `create_physical_slot`, `read_replication_slot`, `drop_slot`,
//!   `timeline_history`, `start_replication`, `base_backup`.
//! - [`ReplicationStream`]: the CopyBoth WAL stream; cancel-safe `next()` and
//!   `send_status()` for one task driving both with `tokio::select!`.
//! - [`BaseBackupStream`]: `BASE_BACKUP` (PG13+ syntax and flow) as a bounded-memory
//!   stream of [`BackupEvent`]s: tar archives, the manifest, the end LSN.
//! - [`PgError`]: one error type with `is_transient()` and operator advice.
//!
//! What this module is not: an SQL client (a physical walsender runs replication commands
//! and SHOW only), or a logical decoding client.

mod basebackup;
mod codec;
mod conn;
mod conninfo;
mod error;
mod io;
mod lowlevel;
mod pgpass;
mod replication;
mod tls;

pub use basebackup::{
    BackupEvent, BaseBackupOptions, BaseBackupStream, TablespaceInfo, MAX_RATE_RANGE_KB,
};
pub use codec::{pg_timestamp_to_system_time, system_time_to_pg_timestamp};
pub use conn::ReplicationConnection;
pub use conninfo::{
    default_socket_dir, ConnInfo, Host, Password, RootCert, SslMode, TargetSessionAttrs,
    DEFAULT_PORT,
};
pub use error::{HostAttempt, PgError, Result, ServerError};
pub use lowlevel::BackupStop;
pub use replication::{
    parse_size_setting, validate_slot_name, CreateSlotOutcome, ReplicationEvent, ReplicationStream,
    SlotInfo, SystemIdentity, TimelineHistoryFile,
};
