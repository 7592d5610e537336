//! What the sidecar knows about itself, for `/metrics` (Prometheus text format) and
//! `/health/*`. Writers update atomics; the HTTP handlers only read.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use walferry_formats::Lsn;

/// The last completed backup.
#[derive(Clone, Debug)]
pub struct BackupInfo {
    pub id: String,
    pub finished_unix: f64,
    pub data_bytes: u64,
    pub new_stored_bytes: u64,
    pub duration_secs: f64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub streaming: AtomicBool,
    pub received_lsn: AtomicU64,
    pub durable_lsn: AtomicU64,
    /// The server's WAL position as last reported to us (XLogData / keepalive wal_end).
    pub server_lsn: AtomicU64,
    /// When durable last reached the server's position (ms since the epoch).
    caught_up_ms: AtomicU64,
    pub upload_bytes: AtomicU64,
    pub upload_errors: AtomicU64,
    /// Since when uploads have been failing (ms since the epoch; 0 = not failing).
    outage_since_ms: AtomicU64,
    pub backups_ok: AtomicU64,
    pub backups_failed: AtomicU64,
    pub last_backup: Mutex<Option<BackupInfo>>,
    /// Oldest restorable moment (seconds since the epoch), when known.
    pub oldest_restorable: Mutex<Option<f64>>,
    pub repository_bytes: AtomicU64,
    pub last_verify_ok: Mutex<Option<bool>>,
    /// The configured RPO, for the dashboard's reference line.
    pub rpo_target_secs: Mutex<f64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Metrics {
    pub fn new(rpo: Duration) -> Self {
        let m = Metrics::default();
        if let Ok(mut r) = m.rpo_target_secs.lock() {
            *r = rpo.as_secs_f64();
        }
        m.caught_up_ms.store(now_ms(), Ordering::Relaxed);
        m
    }

    pub fn set_server_lsn(&self, lsn: Lsn) {
        self.server_lsn.fetch_max(lsn.0, Ordering::Relaxed);
        self.check_caught_up();
    }

    pub fn set_received(&self, lsn: Lsn) {
        self.received_lsn.store(lsn.0, Ordering::Relaxed);
    }

    pub fn set_durable(&self, lsn: Lsn) {
        self.durable_lsn.fetch_max(lsn.0, Ordering::Relaxed);
        self.check_caught_up();
    }

    fn check_caught_up(&self) {
        if self.durable_lsn.load(Ordering::Relaxed) >= self.server_lsn.load(Ordering::Relaxed) {
            self.caught_up_ms.store(now_ms(), Ordering::Relaxed);
        }
    }

    pub fn upload_ok(&self, bytes: u64) {
        self.upload_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.outage_since_ms.store(0, Ordering::Relaxed);
    }

    pub fn upload_failed(&self) {
        self.upload_errors.fetch_add(1, Ordering::Relaxed);
        let _ = self.outage_since_ms.compare_exchange(
            0,
            now_ms(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    pub fn lag_bytes(&self) -> u64 {
        self.server_lsn
            .load(Ordering::Relaxed)
            .saturating_sub(self.durable_lsn.load(Ordering::Relaxed))
    }

    /// How long WAL the server has is not yet stored: what a crash now would lose.
    pub fn lag_seconds(&self) -> f64 {
        if self.lag_bytes() == 0 {
            return 0.0;
        }
        now_ms().saturating_sub(self.caught_up_ms.load(Ordering::Relaxed)) as f64 / 1000.0
    }

    pub fn outage_seconds(&self) -> f64 {
        match self.outage_since_ms.load(Ordering::Relaxed) {
            0 => 0.0,
            t => now_ms().saturating_sub(t) as f64 / 1000.0,
        }
    }

    /// Ready while streaming with lag under `max_lag`; otherwise the reason.
    pub fn ready(&self, max_lag: Duration) -> Result<(), String> {
        if !self.streaming.load(Ordering::Relaxed) {
            return Err("not streaming: no replication connection to PostgreSQL".into());
        }
        let out = self.outage_seconds();
        if out > 0.0 && out >= max_lag.as_secs_f64() {
            return Err(format!("repository writes have failed for {out:.0}s"));
        }
        let lag = self.lag_seconds();
        if lag > max_lag.as_secs_f64() {
            return Err(format!(
                "WAL not yet stored for {lag:.0}s ({} bytes), above the {:.0}s limit",
                self.lag_bytes(),
                max_lag.as_secs_f64()
            ));
        }
        Ok(())
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let mut g = |name: &str, help: &str, kind: &str, v: f64| {
            let _ = writeln!(
                o,
                "# HELP walferry_{name} {help}\n# TYPE walferry_{name} {kind}\nwalferry_{name} {v}"
            );
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        g(
            "streaming",
            "1 while a replication connection streams WAL",
            "gauge",
            f64::from(u8::from(self.streaming.load(Ordering::Relaxed))),
        );
        g(
            "received_lsn",
            "End of the WAL received from the server, as a byte position",
            "gauge",
            load(&self.received_lsn),
        );
        g(
            "durable_lsn",
            "End of the WAL durable in the repository (the flush LSN reported to PostgreSQL)",
            "gauge",
            load(&self.durable_lsn),
        );
        g(
            "server_lsn",
            "The server's WAL position as last reported to the agent",
            "gauge",
            load(&self.server_lsn),
        );
        g(
            "lag_bytes",
            "WAL the server has that is not yet durable in the repository",
            "gauge",
            self.lag_bytes() as f64,
        );
        g(
            "lag_seconds",
            "How long the oldest WAL not yet durable has been waiting",
            "gauge",
            self.lag_seconds(),
        );
        g("rpo_seconds", "Current recovery point objective estimate: data a host loss now would lose, in seconds", "gauge", self.lag_seconds());
        g(
            "rpo_target_seconds",
            "Configured RPO (--rpo)",
            "gauge",
            self.rpo_target_secs.lock().map_or(0.0, |r| *r),
        );
        g(
            "upload_bytes_total",
            "Bytes of WAL uploaded",
            "counter",
            load(&self.upload_bytes),
        );
        g(
            "upload_errors_total",
            "Failed repository writes (each retried)",
            "counter",
            load(&self.upload_errors),
        );
        g(
            "repository_outage_seconds",
            "How long repository writes have been failing (0 when healthy)",
            "gauge",
            self.outage_seconds(),
        );
        g(
            "backups_total",
            "Backups completed by this process",
            "counter",
            load(&self.backups_ok),
        );
        g(
            "backup_failures_total",
            "Backups that failed in this process",
            "counter",
            load(&self.backups_failed),
        );
        if let Some(b) = self.last_backup.lock().ok().and_then(|b| b.clone()) {
            g(
                "last_backup_timestamp_seconds",
                "When the last backup finished",
                "gauge",
                b.finished_unix,
            );
            g(
                "last_backup_size_bytes",
                "Data bytes in the last backup",
                "gauge",
                b.data_bytes as f64,
            );
            g(
                "last_backup_new_bytes",
                "Bytes the last backup added to the repository",
                "gauge",
                b.new_stored_bytes as f64,
            );
            g(
                "last_backup_duration_seconds",
                "How long the last backup took",
                "gauge",
                b.duration_secs,
            );
        }
        if let Some(t) = self.oldest_restorable.lock().ok().and_then(|t| *t) {
            g(
                "oldest_restorable_timestamp_seconds",
                "Earliest moment the repository can restore to",
                "gauge",
                t,
            );
        }
        g(
            "repository_size_bytes",
            "Bytes stored in the repository",
            "gauge",
            load(&self.repository_bytes),
        );
        if let Some(ok) = self.last_verify_ok.lock().ok().and_then(|v| *v) {
            g(
                "last_verify_ok",
                "1 if the last verify found the repository intact",
                "gauge",
                f64::from(u8::from(ok)),
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_and_readiness() {
        let m = Metrics::new(Duration::from_secs(1));
        assert!(
            m.ready(Duration::from_secs(5)).is_err(),
            "not streaming yet"
        );
        m.streaming.store(true, Ordering::Relaxed);
        m.set_server_lsn(Lsn(100));
        m.set_durable(Lsn(100));
        assert_eq!(m.lag_bytes(), 0);
        assert_eq!(m.lag_seconds(), 0.0);
        assert!(m.ready(Duration::from_secs(5)).is_ok());
        m.set_server_lsn(Lsn(300));
        assert_eq!(m.lag_bytes(), 200);
        m.upload_failed();
        assert!(m.outage_seconds() >= 0.0);
        m.upload_ok(10);
        assert_eq!(m.outage_seconds(), 0.0);
        let text = m.render();
        for name in [
            "walferry_durable_lsn 100",
            "walferry_lag_bytes 200",
            "walferry_upload_errors_total 1",
            "# TYPE walferry_upload_bytes_total counter",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
    }
}
