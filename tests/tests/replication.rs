//! The walsender client (`walferry_agent::pg`) against a real PostgreSQL: authentication
//! methods, TLS modes, replication commands, WAL bytes compared with the server's own
//! segment files, status updates moving the slot, keepalives, restarts and a timeline
//! switch by promotion.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use walferry_agent::pg::{
    ConnInfo, CreateSlotOutcome, PgError, ReplicationConnection, ReplicationEvent,
    ReplicationStream, SslMode,
};
use walferry_formats::walname::segment_file_name;
use walferry_formats::{Lsn, SegmentSize, TimelineId};
use walferry_tests::pg::{self, PgCluster};

/// Run blocking testkit calls (psql, pg_ctl) off the runtime threads, so a stream driven
/// by the test keeps answering the walsender meanwhile.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn info(s: &str) -> ConnInfo {
    ConnInfo::parse(s).unwrap_or_else(|e| panic!("parse {s}: {e}"))
}

async fn connect(s: &str) -> ReplicationConnection {
    ReplicationConnection::connect(&info(s))
        .await
        .unwrap_or_else(|e| panic!("connect {s:?}: {e}"))
}

fn segment_start(lsn: Lsn, size: SegmentSize) -> Lsn {
    Lsn(lsn.0 - lsn.segment_offset(size))
}

/// Chown a path to postgres when the server runs as postgres (we are root).
fn give_to_postgres(path: &Path) {
    if pg::running_as_root() {
        let st = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success(), "chown {}", path.display());
    }
}

/// Wait until `f` returns Some, polling (blocking calls allowed inside).
async fn wait_for<T: Send + 'static>(
    what: &str,
    timeout: Duration,
    f: impl Fn() -> Option<T> + Send + Sync + 'static,
) -> T {
    let f = Arc::new(f);
    let deadline = Instant::now() + timeout;
    loop {
        let g = f.clone();
        if let Some(v) = blocking(move || g()).await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_over_unix_socket_identify_and_show() {
    let pg = PgCluster::start().unwrap();
    let conninfo = pg.superuser_conninfo();
    assert!(conninfo.contains(&pg.socket_dir().display().to_string()));
    let mut conn = connect(&conninfo).await;
    assert!(!conn.is_tls());
    assert_eq!(conn.auth_method(), "trust");
    assert!(conn.server_version_num().unwrap() >= 150_000);
    assert!(conn.backend_pid().is_some());

    let id = conn.identify_system().await.unwrap();
    let sysid: u64 = pg
        .psql(
            "postgres",
            "select system_identifier from pg_control_system()",
        )
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(id.system_id, sysid);
    assert_eq!(id.timeline, TimelineId(1));
    assert!(id.xlogpos > Lsn(0));
    assert_eq!(id.dbname, None, "a physical walsender has no database");

    assert_eq!(conn.show("wal_segment_size").await.unwrap(), "16MB");
    assert_eq!(
        conn.wal_segment_size().await.unwrap(),
        SegmentSize::new(16 << 20).unwrap()
    );
    assert_eq!(conn.show("wal_level").await.unwrap(), "replica");

    // The session really is a walsender with our application_name.
    let pid = conn.backend_pid().unwrap();
    let row = pg
        .psql(
            "postgres",
            &format!(
                "select backend_type, application_name from pg_stat_activity where pid = {pid}"
            ),
        )
        .unwrap();
    assert_eq!(row, "walsender|walferry");

    // SQL is refused by a physical walsender; the error comes back and the connection stays usable.
    let e = conn.show("no_such_setting").await.unwrap_err();
    assert!(e.server_error().is_some(), "{e}");
    assert_eq!(conn.identify_system().await.unwrap().system_id, sysid);
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_and_md5_over_tcp_and_plaintext_fallback() {
    let pg = PgCluster::start().unwrap();
    // SCRAM-SHA-256 (pg_hba demands it for this role); ssl is off so prefer falls back.
    let mut conn = connect(&pg.scram_conninfo()).await;
    assert!(!conn.is_tls());
    assert_eq!(conn.auth_method(), "SCRAM-SHA-256");
    assert_eq!(
        conn.identify_system().await.unwrap().timeline,
        TimelineId(1)
    );
    let pid = conn.backend_pid().unwrap();
    let who = pg
        .psql(
            "postgres",
            &format!("select usename, backend_type from pg_stat_activity where pid = {pid}"),
        )
        .unwrap();
    assert_eq!(who, format!("{}|walsender", pg::SCRAM_USER));
    conn.close().await;

    // MD5.
    let mut conn = connect(&pg.md5_conninfo()).await;
    assert_eq!(conn.auth_method(), "md5");
    assert_eq!(conn.show("wal_segment_size").await.unwrap(), "16MB");
    conn.close().await;

    // sslmode=require against a server without TLS: refused, permanent, says what to do.
    let e =
        ReplicationConnection::connect(&info(&format!("{} sslmode=require", pg.scram_conninfo())))
            .await
            .unwrap_err();
    assert!(matches!(e, PgError::TlsRefused { .. }), "{e:?}");
    assert!(e.is_permanent());
    assert!(e.to_string().contains("ssl = on"), "{e}");

    // URL form, with the password percent-encoded, and a dead host first in the list.
    let dead = pg::free_port().unwrap();
    let url = format!(
        "postgresql://{}:{}@127.0.0.1:{dead},127.0.0.1:{}/postgres?application_name=url_test",
        pg::SCRAM_USER,
        pg::SCRAM_PASSWORD.replace('-', "%2D"),
        pg.port()
    );
    let mut conn = connect(&url).await;
    assert_eq!(conn.server_addr(), format!("127.0.0.1:{}", pg.port()));
    conn.identify_system().await.unwrap();
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_password_and_password_file() {
    let pg = PgCluster::start().unwrap();
    let port = pg.port();
    for (user, method) in [(pg::SCRAM_USER, "scram"), (pg::MD5_USER, "md5")] {
        let s = format!("host=127.0.0.1 port={port} user={user} password=wrong-password");
        let e = ReplicationConnection::connect(&info(&s)).await.unwrap_err();
        assert_eq!(e.sqlstate(), Some("28P01"), "{method}: {e}");
        assert!(e.is_auth() && e.is_permanent(), "{method}: {e:?}");
        let shown = e.to_string();
        assert!(shown.contains("password authentication failed"), "{shown}");
        assert!(shown.contains("advice:"), "{shown}");
        assert!(
            !shown.contains("wrong-password"),
            "password leaked: {shown}"
        );
    }

    // No password anywhere (an empty password file): a clear client-side error.
    let dir = tempfile::tempdir().unwrap();
    let passfile = dir.path().join("pgpass");
    std::fs::write(&passfile, "").unwrap();
    let base = format!(
        "host=127.0.0.1 port={port} user={} passfile={}",
        pg::SCRAM_USER,
        passfile.display()
    );
    let e = ReplicationConnection::connect(&info(&base))
        .await
        .unwrap_err();
    assert!(matches!(e, PgError::Auth { .. }), "{e:?}");
    assert!(e.to_string().contains("no password was supplied"), "{e}");

    // The password file supplies it (0600, wildcard database, escaped colon-free password).
    std::fs::write(
        &passfile,
        format!(
            "# walferry test\nother:1:*:*:nope\n127.0.0.1:{port}:*:{}:{}\n",
            pg::SCRAM_USER,
            pg::SCRAM_PASSWORD
        ),
    )
    .unwrap();
    set_mode(&passfile, 0o600);
    let mut conn = connect(&base).await;
    conn.identify_system().await.unwrap();
    conn.close().await;

    // A password file readable by others is ignored, as libpq does.
    set_mode(&passfile, 0o644);
    let e = ReplicationConnection::connect(&info(&base))
        .await
        .unwrap_err();
    assert!(matches!(e, PgError::Auth { .. }), "{e:?}");
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_hba_line_and_missing_replication_role_give_advice() {
    let pg = PgCluster::start().unwrap();
    pg.psql(
        "postgres",
        "create role plain_login login password 'plain-pw';",
    )
    .unwrap();

    // A role without REPLICATION (trust over the socket).
    let s = format!(
        "host={} port={} user=plain_login",
        pg.socket_dir().display(),
        pg.port()
    );
    let e = ReplicationConnection::connect(&info(&s)).await.unwrap_err();
    assert!(e.is_auth() && e.is_permanent(), "{e:?}");
    assert!(e.advice().unwrap_or_default().contains("ALTER ROLE"), "{e}");

    // pg_hba.conf without any `replication` line for TCP.
    let hba = pg.data_dir().join("pg_hba.conf");
    std::fs::write(
        &hba,
        "local all all trust\nlocal replication all trust\nhost all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    pg.reload().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let e = ReplicationConnection::connect(&info(&pg.superuser_tcp_conninfo()))
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate(), Some("28000"), "{e}");
    assert!(e.is_permanent());
    let shown = e.to_string();
    assert!(
        shown.contains("no pg_hba.conf entry for replication connection"),
        "{shown}"
    );
    assert!(
        shown.contains("host replication"),
        "advice missing: {shown}"
    );
}

/// A CA and a server certificate signed by it for `names`; returns (ca.pem, cert.pem, key.pem).
pub(crate) fn make_certs(dir: &Path, tag: &str, names: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("walferry test CA {tag}"));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, names[0].to_string());
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let ca_path = dir.join(format!("ca-{tag}.pem"));
    let cert_path = dir.join(format!("server-{tag}.crt"));
    let key_path = dir.join(format!("server-{tag}.key"));
    std::fs::write(&ca_path, ca.pem()).unwrap();
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    set_mode(&key_path, 0o600);
    (ca_path, cert_path, key_path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_require_verify_ca_and_verify_full() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(dir.path(), "a", &["localhost", "127.0.0.1"]);
    let (other_ca, cert_b, key_b) = make_certs(dir.path(), "b", &["db.example.invalid"]);
    give_to_postgres(dir.path());
    let pg = PgCluster::builder()
        .config("ssl", "on")
        .config("ssl_cert_file", cert.display().to_string())
        .config("ssl_key_file", key.display().to_string())
        .start()
        .unwrap();
    let port = pg.port();
    let trust = format!("host=127.0.0.1 port={port} user=postgres");

    // require: encrypted, certificate not checked.
    let mut conn = connect(&format!("{trust} sslmode=require")).await;
    assert!(conn.is_tls());
    let pid = conn.backend_pid().unwrap();
    let ssl = pg
        .psql(
            "postgres",
            &format!("select ssl from pg_stat_ssl where pid = {pid}"),
        )
        .unwrap();
    assert_eq!(ssl, "t");
    conn.identify_system().await.unwrap();
    conn.close().await;

    // prefer (the default) uses TLS when offered.
    let conn = connect(&trust).await;
    assert!(conn.is_tls());
    conn.close().await;
    // disable does not.
    let conn = connect(&format!("{trust} sslmode=disable")).await;
    assert!(!conn.is_tls());
    conn.close().await;

    // SCRAM over TLS: the server offers SCRAM-SHA-256-PLUS and we bind to its certificate.
    let mut conn = connect(&format!("{} sslmode=require", pg.scram_conninfo())).await;
    assert!(conn.is_tls());
    assert_eq!(conn.auth_method(), "SCRAM-SHA-256-PLUS");
    conn.identify_system().await.unwrap();
    conn.close().await;

    // verify-full with the right CA, by IP SAN and by DNS SAN.
    for host in ["127.0.0.1", "localhost"] {
        let s = format!(
            "host={host} port={port} user=postgres sslmode=verify-full sslrootcert={}",
            ca.display()
        );
        let mut conn = connect(&s).await;
        assert!(conn.is_tls());
        conn.identify_system().await.unwrap();
        conn.close().await;
    }
    let conn = connect(&format!(
        "{trust} sslmode=verify-ca sslrootcert={}",
        ca.display()
    ))
    .await;
    assert!(conn.is_tls());
    conn.close().await;

    // verify-full / verify-ca against the wrong CA: refused, permanent.
    for mode in ["verify-ca", "verify-full"] {
        let s = format!("{trust} sslmode={mode} sslrootcert={}", other_ca.display());
        let e = ReplicationConnection::connect(&info(&s)).await.unwrap_err();
        assert!(matches!(e, PgError::Tls { .. }), "{mode}: {e:?}");
        assert!(e.is_permanent());
    }
    // require with a root certificate verifies the chain too (libpq semantics).
    let s = format!("{trust} sslmode=require sslrootcert={}", other_ca.display());
    assert!(ReplicationConnection::connect(&info(&s)).await.is_err());
    // A missing root file is a settings error.
    let s = format!("{trust} sslmode=verify-full sslrootcert=/nonexistent/ca.pem");
    let e = ReplicationConnection::connect(&info(&s)).await.unwrap_err();
    assert!(matches!(e, PgError::Config { .. }), "{e:?}");

    // A certificate for another name: verify-ca passes, verify-full does not.
    pg.append_config("ssl_cert_file", &cert_b.display().to_string())
        .unwrap();
    pg.append_config("ssl_key_file", &key_b.display().to_string())
        .unwrap();
    pg.reload().unwrap();
    let ca_b = other_ca;
    let vca = format!("{trust} sslmode=verify-ca sslrootcert={}", ca_b.display());
    let conn = wait_for_connect(&vca).await;
    conn.close().await;
    let s = format!("{trust} sslmode=verify-full sslrootcert={}", ca_b.display());
    let e = ReplicationConnection::connect(&info(&s)).await.unwrap_err();
    assert!(matches!(e, PgError::Tls { .. }), "{e:?}");
    assert!(e.to_string().contains("name"), "{e}");
}

/// Connect, retrying for a few seconds (after a reload or restart).
async fn wait_for_connect(s: &str) -> ReplicationConnection {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ReplicationConnection::connect(&info(s)).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("connect {s}: {e}"),
        }
    }
}

/// Collect XLogData until `until` is received, answering with status updates on a timer
/// (so `next()` is cancelled again and again: it must lose nothing).
async fn collect_wal(stream: &mut ReplicationStream<'_>, from: Lsn, until: Lsn) -> Vec<u8> {
    let mut out = Vec::new();
    let mut expected = from;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let deadline = tokio::time::sleep(Duration::from_secs(120));
    tokio::pin!(deadline);
    while expected < until {
        tokio::select! {
            ev = stream.next() => match ev.unwrap() {
                ReplicationEvent::XLogData { start, end, data, .. } => {
                    assert_eq!(start, expected, "WAL is contiguous");
                    assert_eq!(end.0 - start.0, data.len() as u64);
                    out.extend_from_slice(&data);
                    expected = end;
                }
                ReplicationEvent::Keepalive { .. } => {}
                other => panic!("unexpected {other:?}"),
            },
            _ = tick.tick() => {
                stream.send_status(stream.received_lsn(), Lsn::INVALID, Lsn::INVALID, false).await.unwrap();
            }
            _ = &mut deadline => panic!("timed out at {expected}, waiting for {until}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_stream_segment_matches_pg_wal_and_status_moves_slot() {
    let pg = Arc::new(PgCluster::start().unwrap());
    let mut conn = connect(&pg.superuser_conninfo()).await;
    let size = conn.wal_segment_size().await.unwrap();

    assert_eq!(
        conn.create_physical_slot("wf_slot").await.unwrap(),
        CreateSlotOutcome::Created
    );
    assert_eq!(
        conn.create_physical_slot("wf_slot").await.unwrap(),
        CreateSlotOutcome::AlreadyExists
    );
    let slot = conn
        .read_replication_slot("wf_slot")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(slot.slot_type, "physical");
    assert_eq!(slot.restart_tli, Some(TimelineId(1)));
    let restart = slot.restart_lsn.expect("RESERVE_WAL reserves WAL at once");
    assert_eq!(
        conn.read_replication_slot("no_such_slot").await.unwrap(),
        None
    );

    // A missing slot is a clear error and leaves the connection usable.
    let e = conn
        .start_replication(Some("no_such_slot"), restart, TimelineId(1))
        .await
        .unwrap_err();
    assert!(e.is_slot_missing() && e.is_permanent(), "{e}");

    let start = segment_start(restart, size);
    let seg_end = Lsn(start.0 + size.bytes());
    let mut stream = conn
        .start_replication(Some("wf_slot"), start, TimelineId(1))
        .await
        .unwrap();

    // Generate WAL, then switch so the segment is complete.
    let p = pg.clone();
    let writer = tokio::task::spawn_blocking(move || {
        p.psql(
            "postgres",
            "create table t (id int, v text);\n\
             insert into t select g, repeat('x', 100) from generate_series(1, 20000) g;\n\
             select pg_switch_wal();",
        )
        .unwrap();
    });
    let wal = collect_wal(&mut stream, start, seg_end).await;
    writer.await.unwrap();

    let seg_name = segment_file_name(TimelineId(1), start.segment(size), size);
    let on_disk = std::fs::read(pg.data_dir().join("pg_wal").join(&seg_name)).unwrap();
    assert_eq!(on_disk.len() as u64, size.bytes());
    assert!(wal.len() as u64 >= size.bytes());
    assert!(
        wal[..size.bytes() as usize] == on_disk[..],
        "streamed bytes differ from pg_wal/{seg_name}"
    );

    // Report flush = end of the segment: the slot's restart_lsn follows.
    stream
        .send_status(seg_end, seg_end, Lsn::INVALID, false)
        .await
        .unwrap();
    let p = pg.clone();
    let want = seg_end.to_string();
    wait_for(
        "restart_lsn to follow flush",
        Duration::from_secs(30),
        move || {
            let got = p
                .psql(
                    "postgres",
                    "select restart_lsn from pg_replication_slots where slot_name = 'wf_slot'",
                )
                .unwrap();
            (got == want).then_some(())
        },
    )
    .await;

    // Stop from our side; the connection takes commands again; drop the slot.
    assert_eq!(stream.stop().await.unwrap(), None);
    let slot = conn
        .read_replication_slot("wf_slot")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(slot.restart_lsn, Some(seg_end));
    conn.drop_slot("wf_slot").await.unwrap();
    assert_eq!(conn.read_replication_slot("wf_slot").await.unwrap(), None);
    let e = conn.drop_slot("wf_slot").await.unwrap_err();
    assert!(e.is_slot_missing(), "{e}");
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_reply_requests_are_answered() {
    // The walsender asks for a reply after half of wal_sender_timeout and disconnects a
    // client that stays silent for the whole timeout.
    let pg = PgCluster::builder()
        .config("wal_sender_timeout", "2s")
        .start()
        .unwrap();
    let mut conn = connect(&pg.superuser_conninfo()).await;
    let id = conn.identify_system().await.unwrap();
    let size = conn.wal_segment_size().await.unwrap();
    let mut stream = conn
        .start_replication(None, segment_start(id.xlogpos, size), id.timeline)
        .await
        .unwrap();
    // Never call send_status: only the automatic answers keep us connected.
    let mut requested = 0;
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
            Err(_) => {}
            Ok(Ok(ReplicationEvent::Keepalive {
                reply_requested: true,
                ..
            })) => requested += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("stream ended after {requested} reply requests: {e}"),
        }
    }
    assert!(requested >= 2, "only {requested} reply requests in 8s");
    let reply = pg
        .psql(
            "postgres",
            "select reply_time is not null from pg_stat_replication",
        )
        .unwrap();
    assert_eq!(reply, "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_and_crash_end_the_stream_with_transient_errors() {
    let pg = Arc::new(PgCluster::start().unwrap());
    for crash in [false, true] {
        let mut conn = connect(&pg.superuser_conninfo()).await;
        let id = conn.identify_system().await.unwrap();
        let size = conn.wal_segment_size().await.unwrap();
        let mut stream = conn
            .start_replication(None, segment_start(id.xlogpos, size), id.timeline)
            .await
            .unwrap();
        let p = pg.clone();
        let bounce = tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(300));
            if crash {
                p.kill9().unwrap();
            } else {
                p.stop().unwrap();
            }
        });
        let mut saw_shutdown = false;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let err = loop {
            tokio::select! {
                ev = stream.next() => match ev {
                    Ok(ReplicationEvent::ServerShutdown) => saw_shutdown = true,
                    Ok(ReplicationEvent::EndOfTimeline { .. }) => panic!("unexpected end of timeline"),
                    Ok(_) => {}
                    Err(e) => break e,
                },
                // Confirm what we received (as write; flush 0/0 = not reported), which lets
                // a fast shutdown's walsender finish at once.
                _ = tick.tick() => {
                    let r = stream.received_lsn();
                    let _ = stream.send_status(r, Lsn::INVALID, Lsn::INVALID, false).await;
                }
            }
        };
        bounce.await.unwrap();
        assert!(err.is_transient(), "crash={crash}: {err:?}");
        if !crash {
            assert!(
                saw_shutdown,
                "a clean shutdown is reported as ServerShutdown, not {err:?}"
            );
        }
        let p = pg.clone();
        blocking(move || p.start_server().unwrap()).await;
        // Reconnects fine afterwards (the port may have moved).
        let mut conn = wait_for_connect(&pg.superuser_conninfo()).await;
        conn.identify_system().await.unwrap();
        conn.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeline_switch_by_promotion() {
    let pg = Arc::new(PgCluster::start().unwrap());
    pg.psql(
        "postgres",
        "create table t (id int); insert into t select generate_series(1, 1000);",
    )
    .unwrap();
    // Turn the cluster into a standby of nobody: it replays its own WAL and waits.
    pg.stop().unwrap();
    let signal = pg.data_dir().join("standby.signal");
    std::fs::write(&signal, "").unwrap();
    give_to_postgres(&signal);
    pg.start_server().unwrap();

    let rw = format!(
        "{} target_session_attrs=read-write",
        pg.superuser_conninfo()
    );
    let e = ReplicationConnection::connect(&info(&rw))
        .await
        .unwrap_err();
    assert!(matches!(e, PgError::ReadOnly { .. }), "{e:?}");
    assert!(e.is_transient());

    let mut conn = connect(&pg.superuser_conninfo()).await;
    assert_eq!(conn.parameter("in_hot_standby"), Some("on"));
    let id = conn.identify_system().await.unwrap();
    assert_eq!(id.timeline, TimelineId(1));
    let size = conn.wal_segment_size().await.unwrap();
    let start = segment_start(id.xlogpos, size);

    // Stream timeline 1 from the standby (a cascading walsender), promote it meanwhile:
    // the stream ends with EndOfTimeline at the switch point.
    let mut stream = conn
        .start_replication(None, start, TimelineId(1))
        .await
        .unwrap();
    let p = pg.clone();
    let promote = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(500));
        let out = p
            .command("pg_ctl")
            .arg("-D")
            .arg(p.data_dir())
            .args(["-w", "promote"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut expected = start;
    let (next_tli, next_start) = loop {
        assert!(Instant::now() < deadline, "no end of timeline");
        tokio::select! {
            ev = stream.next() => match ev.unwrap() {
                ReplicationEvent::XLogData { start, end, .. } => {
                    assert_eq!(start, expected);
                    expected = end;
                }
                ReplicationEvent::EndOfTimeline { next_tli, next_start } => break (next_tli, next_start),
                ReplicationEvent::Keepalive { .. } => {}
                ReplicationEvent::ServerShutdown => panic!("unexpected shutdown"),
            },
            _ = tick.tick() => {
                let r = stream.received_lsn();
                stream.send_status(r, Lsn::INVALID, Lsn::INVALID, false).await.unwrap();
            }
        }
    };
    promote.await.unwrap();
    assert_eq!(next_tli, TimelineId(2));
    assert_eq!(
        expected, next_start,
        "WAL was streamed up to the switch point"
    );
    assert!(stream.next().await.is_err(), "the stream is over");
    drop(stream);

    // The connection is usable again: fetch the new timeline's history.
    let hist = conn.timeline_history(TimelineId(2)).await.unwrap();
    assert_eq!(hist.filename, "00000002.history");
    let text = String::from_utf8(hist.content.to_vec()).unwrap();
    let first = text.lines().next().unwrap();
    let mut parts = first.split('\t');
    assert_eq!(parts.next(), Some("1"));
    assert_eq!(parts.next().unwrap().parse::<Lsn>().unwrap(), next_start);
    let e = conn.timeline_history(TimelineId(1)).await.unwrap_err();
    assert!(e.server_error().is_some(), "{e}");

    // Starting exactly at timeline 1's end: no COPY, only the next-timeline row.
    let mut stream = conn
        .start_replication(None, next_start, TimelineId(1))
        .await
        .unwrap();
    assert_eq!(
        stream.next().await.unwrap(),
        ReplicationEvent::EndOfTimeline {
            next_tli: TimelineId(2),
            next_start
        }
    );
    drop(stream);

    // Historic timeline 1 from its segment start: streams to the switch point, then ends.
    let mut stream = conn
        .start_replication(None, start, TimelineId(1))
        .await
        .unwrap();
    let wal = collect_wal_until_end(&mut stream, start).await;
    assert_eq!(wal, (TimelineId(2), next_start));
    drop(stream);

    // And timeline 2 streams from the segment holding the switch point.
    let new_start = segment_start(next_start, size);
    let mut stream = conn
        .start_replication(None, new_start, TimelineId(2))
        .await
        .unwrap();
    let got = collect_wal(&mut stream, new_start, next_start).await;
    assert!(got.len() as u64 >= next_start.0 - new_start.0);
    stream.stop().await.unwrap();
    assert_eq!(
        conn.identify_system().await.unwrap().timeline,
        TimelineId(2)
    );
    conn.close().await;

    // Promoted: read-write connections are accepted now.
    let conn = connect(&rw).await;
    assert_eq!(conn.parameter("in_hot_standby"), Some("off"));
    conn.close().await;
}

/// Read a (historic) timeline to its end; returns the EndOfTimeline fields.
async fn collect_wal_until_end(stream: &mut ReplicationStream<'_>, from: Lsn) -> (TimelineId, Lsn) {
    let mut expected = from;
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("historic timeline ends promptly")
            .unwrap();
        match ev {
            ReplicationEvent::XLogData { start, end, .. } => {
                assert_eq!(start, expected);
                expected = end;
            }
            ReplicationEvent::EndOfTimeline {
                next_tli,
                next_start,
            } => {
                assert_eq!(expected, next_start);
                return (next_tli, next_start);
            }
            ReplicationEvent::Keepalive { .. } => {}
            ReplicationEvent::ServerShutdown => panic!("unexpected shutdown"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_walsenders_is_transient_with_advice() {
    let pg = PgCluster::builder()
        .config("max_wal_senders", "1")
        .start()
        .unwrap();
    let first = connect(&pg.superuser_conninfo()).await;
    let e = ReplicationConnection::connect(&info(&pg.superuser_conninfo()))
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e:?}");
    assert!(
        e.advice().unwrap_or_default().contains("max_wal_senders"),
        "{e}"
    );
    first.close().await;
}

#[test]
fn sslmode_parse_is_strict() {
    assert!(
        ConnInfo::parse("host=h sslmode=verify-full")
            .unwrap()
            .sslmode
            == SslMode::VerifyFull
    );
    assert!(ConnInfo::parse("host=h sslmode=nope").is_err());
}
