//! The low-level backup API over an ordinary SQL session: `pg_backup_start` and
//! `pg_backup_stop` (PostgreSQL 15+), for backups that read the data directory directly.
//! The backup belongs to the session: it must stay open from start to stop, and closing
//! it aborts the backup on the server.

use bytes::Bytes;
use walferry_formats::Lsn;

use super::conn::ReplicationConnection;
use super::error::{PgError, Result};

/// What `pg_backup_stop` returns.
#[derive(Debug, Clone)]
pub struct BackupStop {
    pub lsn: Lsn,
    /// The backup_label contents; it goes into the backup, not into the live data directory.
    pub label_file: String,
    /// The tablespace_map contents; empty without tablespaces.
    pub tablespace_map: String,
}

/// A string literal for SQL (standard_conforming_strings is on since 9.1).
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn text(v: Option<&Option<Bytes>>) -> Option<String> {
    v.and_then(|v| v.as_ref())
        .map(|b| String::from_utf8_lossy(b).into_owned())
}

impl ReplicationConnection {
    /// One value of a one-row query, as text.
    pub async fn query_value(&mut self, sql: &str) -> Result<Option<String>> {
        let rows = self.simple_query(sql).await?;
        match rows.as_slice() {
            [row] => Ok(text(row.first())),
            _ => Err(PgError::protocol(format!(
                "{sql}: expected one row, got {}",
                rows.len()
            ))),
        }
    }

    /// `pg_backup_start(label, fast)`: the start LSN (the checkpoint's redo point).
    pub async fn backup_start(&mut self, label: &str, fast: bool) -> Result<Lsn> {
        let sql = format!("SELECT pg_backup_start({}, {fast})", literal(label));
        let v = self
            .query_value(&sql)
            .await?
            .ok_or_else(|| PgError::protocol("pg_backup_start returned NULL"))?;
        v.parse()
            .map_err(|_| PgError::protocol(format!("pg_backup_start: invalid LSN \"{v}\"")))
    }

    /// `pg_backup_stop(wait_for_archive => false)`: walferry stores the WAL itself.
    pub async fn backup_stop(&mut self) -> Result<BackupStop> {
        let rows = self
            .simple_query("SELECT lsn, labelfile, spcmapfile FROM pg_backup_stop(false)")
            .await?;
        let [row] = rows.as_slice() else {
            return Err(PgError::protocol("pg_backup_stop: expected one row"));
        };
        let lsn =
            text(row.first()).ok_or_else(|| PgError::protocol("pg_backup_stop returned no LSN"))?;
        Ok(BackupStop {
            lsn: lsn
                .parse()
                .map_err(|_| PgError::protocol(format!("pg_backup_stop: invalid LSN \"{lsn}\"")))?,
            label_file: text(row.get(1))
                .ok_or_else(|| PgError::protocol("pg_backup_stop returned no backup_label"))?,
            tablespace_map: text(row.get(2)).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_doubles_quotes() {
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal("plain"), "'plain'");
    }
}
