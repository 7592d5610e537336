//! The `run` sidecar around the streamer: settings from flags, `WALFERRY_*` and a TOML
//! file (in that order of precedence), scheduled backups, and the HTTP endpoints.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use walferry_formats::config::RepoConfig;
use walferry_formats::Units;

use crate::backup::{self, BackupRequest};
use crate::metrics::{BackupInfo, Metrics};
use crate::pg::ConnInfo;
use crate::retention::{self, RetentionPolicy};

/// The `run` settings a TOML file may hold. Unknown keys are errors, not silently ignored.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    pub repo: Option<String>,
    #[serde(default)]
    pub repo_options: BTreeMap<String, String>,
    pub key_file: Option<PathBuf>,
    pub pg: Option<String>,
    pub slot: Option<String>,
    pub rpo: Option<String>,
    pub status_interval: Option<String>,
    pub listen: Option<String>,
    pub ready_max_lag: Option<String>,
    pub backup_every: Option<String>,
    pub backup_cron: Option<String>,
    pub backup_jitter: Option<String>,
    pub pgdata: Option<PathBuf>,
    pub retain_full: Option<usize>,
    pub recovery_window: Option<String>,
    pub log_format: Option<String>,
}

impl FileSettings {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parse config file {}", path.display()))
    }
}

/// When to take backups.
#[derive(Debug, Clone)]
pub enum Schedule {
    Every(Duration),
    Cron(Box<croner::Cron>),
}

impl Schedule {
    pub fn parse_cron(expr: &str) -> anyhow::Result<Self> {
        let c: croner::Cron = expr
            .parse()
            .map_err(|e| anyhow!("invalid cron expression {expr:?}: {e}"))?;
        Ok(Schedule::Cron(Box::new(c)))
    }

    /// Time until the next backup is due, from `now`.
    pub fn wait_from(&self, now: jiff::Timestamp) -> anyhow::Result<Duration> {
        match self {
            Schedule::Every(d) => Ok(*d),
            Schedule::Cron(c) => {
                let z = now.to_zoned(jiff::tz::TimeZone::UTC);
                let next = c
                    .find_next_occurrence(&z, false)
                    .map_err(|e| anyhow!("no next time for the backup schedule: {e}"))?;
                let secs = next.timestamp().as_second() - now.as_second();
                Ok(Duration::from_secs(secs.max(1) as u64))
            }
        }
    }
}

pub fn duration(what: &str, s: &str) -> anyhow::Result<Duration> {
    let d = humantime::parse_duration(s)
        .with_context(|| format!("{what}: {s:?} is not a duration like 1s, 500ms, 24h"))?;
    if d.is_zero() {
        bail!("{what} must be above zero");
    }
    Ok(d)
}

/// Serves `/metrics`, `/health/live` and `/health/ready` until `shutdown`.
pub async fn serve_http(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    max_lag: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let m1 = metrics.clone();
    let m2 = metrics;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m1.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .route("/health/live", get(|| async { "ok\n" }))
        .route(
            "/health/ready",
            get(move || {
                let m = m2.clone();
                async move {
                    match m.ready(max_lag) {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr}"))?;
    info!(%addr, "serving /metrics and /health");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("serve HTTP")
}

/// What the backup loop needs.
pub struct BackupJob {
    pub units: Units,
    pub config: RepoConfig,
    pub conninfo: ConnInfo,
    pub schedule: Schedule,
    pub jitter: Duration,
    /// Scheduled backups read the files from here (see `backup --pgdata`).
    pub pgdata: Option<PathBuf>,
    /// Applied after each successful backup, under the writer lease.
    pub retention: Option<RetentionPolicy>,
    pub metrics: Arc<Metrics>,
    /// Runs after each successful backup (refreshes repository gauges).
    pub after: Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>,
}

/// Takes backups on the schedule until `shutdown`; a failed backup is logged, counted and
/// retried at the next slot (or after 5 minutes, whichever is sooner).
pub async fn backup_loop(job: BackupJob, shutdown: CancellationToken) {
    let mut retry: Option<Duration> = None;
    loop {
        let mut wait = match job.schedule.wait_from(jiff::Timestamp::now()) {
            Ok(w) => w,
            Err(e) => {
                error!("backup schedule: {e:#}");
                return;
            }
        };
        if let Some(r) = retry.take() {
            wait = wait.min(r);
        }
        if !job.jitter.is_zero() {
            wait += job.jitter.mul_f64(rand_fraction());
        }
        info!(
            "next backup in {}",
            humantime::format_duration(Duration::from_secs(wait.as_secs()))
        );
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let req = BackupRequest {
            label: "walferry scheduled".into(),
            fast_checkpoint: true,
            max_rate_kb: None,
            pgdata: job.pgdata.clone(),
        };
        let r = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = backup::take_leased(&job.units, &job.config, &job.conninfo, &req, "run", &|_| {}) => r,
        };
        match r {
            Ok(m) => {
                job.metrics.backups_ok.fetch_add(1, Ordering::Relaxed);
                let finished = m
                    .finished_at
                    .parse::<jiff::Timestamp>()
                    .map_or(0.0, |t| t.as_millisecond() as f64 / 1000.0);
                if let Ok(mut b) = job.metrics.last_backup.lock() {
                    *b = Some(BackupInfo {
                        id: m.id.clone(),
                        finished_unix: finished,
                        data_bytes: m.stats.bytes,
                        new_stored_bytes: m.stats.new_stored_bytes,
                        duration_secs: m.stats.duration_ms as f64 / 1000.0,
                    });
                }
                info!(id = %m.id, "scheduled backup done");
                if let Some(policy) = &job.retention {
                    apply_retention(&job.units, policy).await;
                }
                (job.after)().await;
            }
            Err(e) => {
                job.metrics.backups_failed.fetch_add(1, Ordering::Relaxed);
                warn!("scheduled backup failed, retrying within 5 minutes: {e:#}");
                retry = Some(Duration::from_secs(300));
            }
        }
    }
}

/// One retention pass under the writer lease; a busy lease or a failure waits for the next backup.
async fn apply_retention(units: &Units, policy: &RetentionPolicy) {
    use crate::lease::{Lease, LeaseError, DEFAULT_TTL};
    match Lease::acquire(units.repo(), "run", DEFAULT_TTL).await {
        Ok(lease) => {
            let renewing = lease.keep_alive();
            let r = retention::apply(units, policy, retention::DEFAULT_PACK_GRACE, &lease).await;
            renewing.abort();
            let _ = lease.release().await;
            match r {
                Ok(plan) => info!(
                    backups = plan.deleted_backups.len(),
                    packs = plan.totals.packs.objects,
                    wal = plan.totals.wal.objects,
                    "retention applied"
                ),
                Err(e) => warn!("retention failed, trying again after the next backup: {e:#}"),
            }
        }
        Err(LeaseError::Held(h)) => warn!("retention skipped: the writer lease is held by {h}"),
        Err(e) => warn!("retention skipped: {e}"),
    }
}

fn rand_fraction() -> f64 {
    use rand::Rng;
    rand::thread_rng().gen_range(0.0..1.0)
}

/// Refreshes repository-wide gauges: size and the oldest restorable moment.
pub async fn refresh_repo_gauges(units: &Units, metrics: &Metrics) {
    match units.repo().list("").await {
        Ok(all) => metrics
            .repository_bytes
            .store(all.iter().map(|o| o.size).sum(), Ordering::Relaxed),
        Err(e) => warn!("list the repository for its size: {e}"),
    }
    match walferry_formats::view::RepoView::load(units).await {
        Ok(view) => {
            let oldest = view
                .latest_timeline()
                .and_then(|t| view.window(t))
                .map(|(from, _)| from.as_millisecond() as f64 / 1000.0);
            if let Ok(mut o) = metrics.oldest_restorable.lock() {
                *o = oldest;
            }
        }
        Err(e) => warn!("read the repository for the restorable window: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_shapes() {
        let full = r#"
            repo = "s3://bucket/db1"
            key_file = "/etc/walferry/master.key"
            pg = "host=/run/postgresql user=walferry"
            slot = "walferry"
            rpo = "500ms"
            listen = "127.0.0.1:9187"
            backup_every = "24h"
            backup_jitter = "10m"
            retain_full = 7
            recovery_window = "30d"
            log_format = "json"
            [repo_options]
            aws_endpoint = "http://127.0.0.1:9000"
        "#;
        let s: FileSettings = toml::from_str(full).unwrap();
        assert_eq!(s.retain_full, Some(7));
        assert_eq!(
            s.repo_options.get("aws_endpoint").map(String::as_str),
            Some("http://127.0.0.1:9000")
        );
        let empty: FileSettings = toml::from_str("").unwrap();
        assert_eq!(empty, FileSettings::default());
        let e = toml::from_str::<FileSettings>("rpoo = \"1s\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn schedules() {
        let now: jiff::Timestamp = "2026-11-23T02:59:00Z".parse().unwrap();
        let c = Schedule::parse_cron("0 3 * * *").unwrap();
        assert_eq!(c.wait_from(now).unwrap(), Duration::from_secs(60));
        assert!(Schedule::parse_cron("not cron").is_err());
        assert_eq!(
            Schedule::Every(Duration::from_secs(5))
                .wait_from(now)
                .unwrap(),
            Duration::from_secs(5)
        );
        assert!(duration("--rpo", "0s").is_err());
        assert!(duration("--rpo", "fast").is_err());
        assert_eq!(
            duration("--rpo", "250ms").unwrap(),
            Duration::from_millis(250)
        );
    }
}
