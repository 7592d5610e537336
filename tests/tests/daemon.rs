//! The `run` sidecar: HTTP endpoints, Prometheus metrics, scheduled backups, readiness
//! during a repository outage, and settings precedence.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use walferry_agent::archive::ArchiverConfig;
use walferry_agent::metrics::Metrics;
use walferry_agent::pg::ConnInfo;
use walferry_agent::stream::StreamConfig;
use walferry_formats::keyring::Keyring;
use walferry_formats::{Repository, Units};
use walferry_tests::bins::{repo_args, run_walferry, AgentProcess};
use walferry_tests::emulators::file_target;
use walferry_tests::faults::{FaultConfig, FaultyStore};
use walferry_tests::pg::{free_port, PgCluster};

/// A plain HTTP/1.0 GET: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Parses Prometheus text format strictly enough to catch malformed output.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut f = rest.split_whitespace();
            let (name, kind) = (f.next().unwrap(), f.next().unwrap());
            assert!(
                ["gauge", "counter"].contains(&kind),
                "bad type line {line:?}"
            );
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (name, value) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name {name:?}"
        );
        assert!(typed.contains(name), "{name} has no TYPE line");
        out.insert(
            name.to_string(),
            value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        );
    }
    out
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn daemon_serves_metrics_and_takes_scheduled_backups() {
    let pg = PgCluster::start().unwrap();
    let target = file_target().unwrap();
    let mut init = vec!["init".to_string()];
    init.extend(repo_args(&target));
    init.push("--no-encryption".into());
    assert!(run_walferry("walferry-agent", &init, &[])
        .unwrap()
        .0
        .success());
    let port = free_port().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut args = vec!["run".to_string()];
    args.extend(repo_args(&target));
    args.extend(
        [
            "--pg",
            &pg.superuser_conninfo(),
            "--rpo",
            "200ms",
            "--listen",
            &addr.to_string(),
            "--backup-every",
            "8s",
            "--status-interval",
            "1s",
        ]
        .map(String::from),
    );
    let mut agent = AgentProcess::spawn(&args, &pg.root_dir().join("agent.log")).unwrap();

    assert!(
        wait_until(Duration::from_secs(20), || http_get(addr, "/health/live")
            .is_some_and(|(s, _)| s == 200)),
        "{}",
        agent.log()
    );
    assert!(
        wait_until(Duration::from_secs(20), || http_get(addr, "/health/ready")
            .is_some_and(|(s, _)| s == 200)),
        "never ready: {:?}\n{}",
        http_get(addr, "/health/ready"),
        agent.log()
    );
    let first = parse_metrics(&http_get(addr, "/metrics").unwrap().1);
    assert_eq!(first["walferry_streaming"], 1.0);
    pg.command("pgbench")
        .args(["-i", "-s", "5", "-q"])
        .status()
        .unwrap();
    pg.psql("postgres", "select pg_switch_wal()").unwrap();
    // Durable LSN moves, and two scheduled backups land.
    assert!(
        wait_until(Duration::from_secs(60), || {
            let m = parse_metrics(&http_get(addr, "/metrics").map(|r| r.1).unwrap_or_default());
            m.get("walferry_backups_total").copied().unwrap_or(0.0) >= 2.0
                && m["walferry_durable_lsn"] > first["walferry_durable_lsn"]
        }),
        "{}",
        agent.log()
    );
    let m = parse_metrics(&http_get(addr, "/metrics").unwrap().1);
    for name in [
        "walferry_last_backup_timestamp_seconds",
        "walferry_last_backup_size_bytes",
        "walferry_last_backup_duration_seconds",
        "walferry_upload_bytes_total",
        "walferry_lag_bytes",
        "walferry_rpo_seconds",
    ] {
        assert!(m.contains_key(name), "{name} missing: {m:?}");
    }
    assert!(m["walferry_upload_bytes_total"] > 0.0);
    assert!(m["walferry_last_backup_size_bytes"] > 1e6);
    let st = agent.terminate(Duration::from_secs(60)).unwrap();
    assert!(st.success(), "{}", agent.log());
    let mut list = vec!["list".to_string()];
    list.extend(repo_args(&target));
    list.push("--json".into());
    let (st, out, err) = run_walferry("walferry-agent", &list, &[]).unwrap();
    assert!(st.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["backups"].as_array().unwrap().len() >= 2, "{out}");
}

/// A repository outage: lag grows, /health/ready turns 503 with the reason, upload errors
/// count up; after recovery everything catches up and readiness returns.
#[tokio::test(flavor = "multi_thread")]
async fn outage_shows_in_metrics_and_readiness() {
    let pg = PgCluster::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let inner: Arc<dyn object_store::ObjectStore> =
        Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let faulty = Arc::new(FaultyStore::new(inner, FaultConfig::quiet(1)));
    let repo = Repository::with_store(
        faulty.clone(),
        object_store::path::Path::default(),
        "file:///faulty",
    )
    .with_retry(walferry_formats::RetryPolicy {
        max_attempts: 2,
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(50),
        seed: Some(1),
    });
    repo.init(None).await.unwrap();
    let units = Units::new(repo, Arc::new(Keyring::unencrypted()), 3);
    let metrics = Arc::new(Metrics::new(Duration::from_millis(200)));
    let shutdown = CancellationToken::new();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let http = tokio::spawn(walferry_agent::daemon::serve_http(
        addr,
        metrics.clone(),
        Duration::from_secs(2),
        shutdown.clone(),
    ));
    let cfg = StreamConfig {
        conninfo: ConnInfo::parse(&pg.superuser_conninfo()).unwrap(),
        slot: "walferry".into(),
        archiver: ArchiverConfig {
            rpo: Duration::from_millis(200),
            metrics: metrics.clone(),
            outage_alarm: Duration::from_secs(1),
            ..ArchiverConfig::default()
        },
        status_interval: Duration::from_millis(500),
        max_backoff: Duration::from_secs(2),
    };
    let streamer = tokio::spawn(walferry_agent::stream::run(units, cfg, shutdown.clone()));
    let ready = move || http_get(addr, "/health/ready");
    assert!(
        tokio::task::spawn_blocking(move || wait_until(Duration::from_secs(20), || ready()
            .is_some_and(|(s, _)| s == 200)))
        .await
        .unwrap()
    );

    faulty.set_enabled(false);
    pg.psql(
        "postgres",
        "create table t as select g from generate_series(1, 200000) g",
    )
    .unwrap();
    let saw_503 = tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(20), || {
            http_get(addr, "/health/ready")
                .is_some_and(|(s, body)| s == 503 && body.contains("not ready"))
        })
    })
    .await
    .unwrap();
    assert!(saw_503, "readiness stayed 200 during the outage");
    let during = parse_metrics(&http_get(addr, "/metrics").unwrap().1);
    assert!(during["walferry_lag_bytes"] > 0.0, "{during:?}");
    assert!(during["walferry_upload_errors_total"] > 0.0, "{during:?}");
    assert!(
        during["walferry_repository_outage_seconds"] > 0.0,
        "{during:?}"
    );
    assert!(during["walferry_lag_seconds"] > 0.0, "{during:?}");

    faulty.set_enabled(true);
    let recovered = tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(40), || {
            let m = parse_metrics(&http_get(addr, "/metrics").map(|r| r.1).unwrap_or_default());
            m.get("walferry_lag_bytes") == Some(&0.0)
                && http_get(addr, "/health/ready").is_some_and(|(s, _)| s == 200)
        })
    })
    .await
    .unwrap();
    assert!(recovered, "{:?}", http_get(addr, "/metrics"));
    let after = parse_metrics(&http_get(addr, "/metrics").unwrap().1);
    assert_eq!(after["walferry_repository_outage_seconds"], 0.0);
    shutdown.cancel();
    assert!(streamer.await.unwrap().is_ok());
    http.await.unwrap().unwrap();
}

/// Flags beat WALFERRY_* variables, which beat the --config file; unknown keys are errors.
#[test]
fn settings_precedence_and_unknown_keys() {
    let pg = PgCluster::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("walferry.toml");

    // Each run streams into a repository of its own: a new slot starts at the server's
    // current position, which a repository already holding older WAL rightly refuses.
    let slot_after = |extra: &[&str], env: &[(&str, &str)]| -> String {
        let target = file_target().unwrap();
        let mut init = vec!["init".to_string()];
        init.extend(repo_args(&target));
        init.push("--no-encryption".into());
        assert!(run_walferry("walferry-agent", &init, &[])
            .unwrap()
            .0
            .success());
        std::fs::write(
            &cfg,
            format!(
                "repo = {:?}\npg = {:?}\nslot = \"from_file\"\n",
                target.url,
                pg.superuser_conninfo()
            ),
        )
        .unwrap();
        let mut args = vec![
            "run".to_string(),
            "--config".into(),
            cfg.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = dir.path().join(format!("a{}.log", rand::random::<u32>()));
        let mut cmd = std::process::Command::new(
            walferry_tests::bins::walferry_bin("walferry-agent").unwrap(),
        );
        cmd.args(&args)
            .envs(env.iter().copied())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().unwrap();
        let ok = wait_until(Duration::from_secs(20), || {
            pg.psql(
                "postgres",
                "select count(*) from pg_replication_slots where active",
            )
            .unwrap()
                == "1"
        });
        let _ = std::process::Command::new("kill")
            .arg(child.id().to_string())
            .status();
        let _ = child.wait();
        assert!(ok, "{}", std::fs::read_to_string(&log).unwrap_or_default());
        let slot = pg
            .psql(
                "postgres",
                "select slot_name from pg_replication_slots order by slot_name desc limit 1",
            )
            .unwrap();
        pg.psql(
            "postgres",
            &format!("select pg_drop_replication_slot('{slot}')"),
        )
        .unwrap();
        slot
    };
    assert_eq!(slot_after(&[], &[]), "from_file");
    assert_eq!(
        slot_after(&[], &[("WALFERRY_SLOT", "from_env")]),
        "from_env"
    );
    assert_eq!(
        slot_after(&["--slot", "from_flag"], &[("WALFERRY_SLOT", "from_env")]),
        "from_flag"
    );

    std::fs::write(&cfg, "repo = \"file:///x\"\nrpoo = \"1s\"\n").unwrap();
    let (st, _, err) = run_walferry(
        "walferry-agent",
        &["run".into(), "--config".into(), cfg.display().to_string()],
        &[],
    )
    .unwrap();
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(
        err.contains("unknown field") && err.contains("rpoo"),
        "{err}"
    );
}
