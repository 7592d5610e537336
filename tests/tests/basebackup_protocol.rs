//! `BASE_BACKUP` over the walsender client (`walferry_agent::pg::BaseBackupStream`)
//! against a real PostgreSQL: event order, tar contents checked with the `tar` crate and
//! against the server's own manifest, `pg_verifybackup` as an oracle, WAL inside the
//! archive, a server killed mid-backup, concurrent backups, and error mapping.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use walferry_agent::pg::{
    BackupEvent, BaseBackupOptions, ConnInfo, PgError, ReplicationConnection, TablespaceInfo,
};
use walferry_formats::walname::segment_file_name;
use walferry_formats::{Lsn, SegmentNo, TimelineId};
use walferry_tests::pg::{self, PgCluster};

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

async fn connect(conninfo: &str) -> ReplicationConnection {
    let info = ConnInfo::parse(conninfo).unwrap_or_else(|e| panic!("parse {conninfo}: {e}"));
    ReplicationConnection::connect(&info)
        .await
        .unwrap_or_else(|e| panic!("connect {conninfo:?}: {e}"))
}

/// A finished backup: each archive written to `<dir>/<name>` as it streamed.
#[derive(Debug)]
struct Collected {
    start: (Lsn, TimelineId),
    tablespaces: Vec<TablespaceInfo>,
    /// `archive:<name>`, `manifest`, `end`, in arrival order.
    order: Vec<String>,
    /// (name, tablespace path, file).
    archives: Vec<(String, String, PathBuf)>,
    manifest: Vec<u8>,
    end: (Lsn, TimelineId),
    progress: Vec<u64>,
    archive_bytes: u64,
    /// The largest Data event.
    max_chunk: usize,
}

async fn collect(
    conn: &mut ReplicationConnection,
    opts: &BaseBackupOptions,
    dir: &Path,
) -> Collected {
    collect_with(conn, opts, dir, None, false).await
}

/// [`collect`], running `at_first_data` (blocking, off the runtime) when the first data
/// arrives, while the server waits for us to read on. With `cancel_often`, most `next()`
/// calls are dropped by a tiny timeout before they complete (cancel safety).
async fn collect_with(
    conn: &mut ReplicationConnection,
    opts: &BaseBackupOptions,
    dir: &Path,
    mut at_first_data: Option<Box<dyn FnOnce() + Send + 'static>>,
    cancel_often: bool,
) -> Collected {
    let mut stream = conn.base_backup(opts).await.expect("BASE_BACKUP");
    let start = stream.start();
    let tablespaces = stream.tablespaces().to_vec();
    let mut order = Vec::new();
    let mut archives = Vec::new();
    let mut manifest = Vec::new();
    let mut progress = Vec::new();
    let mut archive_bytes = 0u64;
    let mut max_chunk = 0;
    let mut file: Option<std::fs::File> = None;
    let mut in_manifest = false;
    let mut cancelled = 0u64;
    let end = loop {
        let ev = if cancel_often {
            match tokio::time::timeout(Duration::from_micros(20), stream.next()).await {
                Ok(ev) => ev,
                Err(_) => {
                    cancelled += 1;
                    continue;
                }
            }
        } else {
            stream.next().await
        };
        match ev.expect("backup event") {
            BackupEvent::Archive {
                name,
                tablespace_path,
            } => {
                assert!(!in_manifest, "archive after the manifest");
                assert!(!name.contains('/'), "{name}");
                let path = dir.join(&name);
                file = Some(std::fs::File::create(&path).unwrap());
                order.push(format!("archive:{name}"));
                archives.push((name, tablespace_path, path));
            }
            BackupEvent::Data(bytes) => {
                max_chunk = max_chunk.max(bytes.len());
                if let Some(f) = at_first_data.take() {
                    blocking(f).await;
                }
                if in_manifest {
                    manifest.extend_from_slice(&bytes);
                } else {
                    archive_bytes += bytes.len() as u64;
                    file.as_mut()
                        .expect("data before any archive")
                        .write_all(&bytes)
                        .unwrap();
                }
            }
            BackupEvent::Progress(n) => progress.push(n),
            BackupEvent::ManifestStart => {
                assert!(!in_manifest, "two manifests");
                in_manifest = true;
                file = None;
                order.push("manifest".into());
            }
            BackupEvent::End { lsn, tli } => {
                order.push("end".into());
                break (lsn, tli);
            }
        }
    };
    if cancel_often {
        eprintln!("{cancelled} next() calls cancelled");
    }
    // The stream is over; the connection takes commands again.
    assert!(stream.next().await.is_err(), "next() after End must fail");
    drop(stream);
    Collected {
        start,
        tablespaces,
        order,
        archives,
        manifest,
        end,
        progress,
        archive_bytes,
        max_chunk,
    }
}

/// One tar entry: path, kind, size, and the content of small regular files.
#[derive(Debug)]
struct TarEntry {
    path: String,
    kind: tar::EntryType,
    size: u64,
    content: Option<Vec<u8>>,
}

fn list_tar(path: &Path) -> Vec<TarEntry> {
    let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let p = entry.path().unwrap().to_string_lossy().into_owned();
        let kind = entry.header().entry_type();
        let size = entry.header().size().unwrap();
        let content = (kind.is_file() && size <= 64 * 1024).then(|| {
            let mut v = Vec::new();
            entry.read_to_end(&mut v).unwrap();
            v
        });
        out.push(TarEntry {
            path: p,
            kind,
            size,
            content,
        });
    }
    out
}

fn file_text<'a>(entries: &'a [TarEntry], path: &str) -> &'a str {
    let e = entries
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("{path} not in the archive"));
    std::str::from_utf8(e.content.as_deref().unwrap()).unwrap()
}

/// `START WAL LOCATION: 0/6000028 (file 000000010000000000000006)` -> the LSN.
fn label_lsn(label: &str, key: &str) -> Lsn {
    let line = label
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in backup_label:\n{label}"));
    line.split_whitespace().next().unwrap().parse().unwrap()
}

fn manifest_json(c: &Collected) -> serde_json::Value {
    let m: serde_json::Value = serde_json::from_slice(&c.manifest).expect("manifest is JSON");
    assert_eq!(m["PostgreSQL-Backup-Manifest-Version"], 1);
    m
}

/// Path -> size of every file the manifest lists.
fn manifest_files(m: &serde_json::Value) -> BTreeMap<String, u64> {
    m["Files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let path = f["Path"].as_str().map(str::to_owned).unwrap_or_else(|| {
                let hex = f["Encoded-Path"].as_str().unwrap();
                let bytes: Vec<u8> = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            });
            assert_eq!(f["Checksum-Algorithm"], "CRC32C", "{f}");
            (path, f["Size"].as_u64().unwrap())
        })
        .collect()
}

/// Path -> size of every regular file of the archives, tablespace files as
/// `pg_tblspc/<oid>/…` (how the manifest names them); WAL segments left out (the manifest
/// does not list them, but it does list their `pg_wal/archive_status/*.done` markers).
fn archive_files(c: &Collected) -> BTreeMap<String, u64> {
    let mut files = BTreeMap::new();
    for (name, _, path) in &c.archives {
        let prefix = match name.strip_suffix(".tar").unwrap() {
            "base" => String::new(),
            oid => format!("pg_tblspc/{oid}/"),
        };
        for e in list_tar(path) {
            let segment = e
                .path
                .strip_prefix("pg_wal/")
                .is_some_and(|rest| !rest.contains('/'));
            if e.kind.is_file() && !segment {
                let old = files.insert(format!("{prefix}{}", e.path), e.size);
                assert!(old.is_none(), "{} twice", e.path);
            }
        }
    }
    files
}

/// The manifest lists exactly the archives' files, with their sizes.
fn assert_same_files(listed: &BTreeMap<String, u64>, archived: &BTreeMap<String, u64>) {
    let only_listed: Vec<_> = listed
        .iter()
        .filter(|(p, s)| archived.get(*p) != Some(s))
        .collect();
    let only_archived: Vec<_> = archived
        .iter()
        .filter(|(p, s)| listed.get(*p) != Some(s))
        .collect();
    assert!(
        only_listed.is_empty() && only_archived.is_empty(),
        "manifest only: {only_listed:?}; archives only: {only_archived:?}"
    );
    assert!(listed.len() > 100, "{} files", listed.len());
}

/// Unpack the archives as pg_basebackup -Fp would (tablespaces under pg_tblspc/<oid>) and
/// write the manifest, then run `pg_verifybackup` on the result.
fn verify_with_pg_verifybackup(pg: &PgCluster, c: &Collected, dir: &Path, parse_wal: bool) {
    for (name, _, path) in &c.archives {
        let target = match name.strip_suffix(".tar").unwrap() {
            "base" => dir.to_path_buf(),
            oid => dir.join("pg_tblspc").join(oid),
        };
        std::fs::create_dir_all(&target).unwrap();
        tar::Archive::new(std::fs::File::open(path).unwrap())
            .unpack(&target)
            .unwrap();
    }
    std::fs::write(dir.join("backup_manifest"), &c.manifest).unwrap();
    pg::give_to_postgres(dir).unwrap();
    let mut cmd = pg.command("pg_verifybackup");
    if !parse_wal {
        cmd.arg("-n");
    }
    let out = cmd.arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "pg_verifybackup failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_backup_with_tablespace_matches_manifest() {
    let pg = PgCluster::start().unwrap();
    let ts_dir = pg.make_dir("ts").unwrap();
    pg.psql(
        "postgres",
        &format!(
            "CREATE TABLESPACE ts LOCATION '{}';\n\
             CREATE TABLE t (x int, s text) TABLESPACE ts;\n\
             INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g;",
            ts_dir.display()
        ),
    )
    .unwrap();
    let ts_oid: u32 = pg
        .psql(
            "postgres",
            "SELECT oid FROM pg_tablespace WHERE spcname = 'ts'",
        )
        .unwrap()
        .parse()
        .unwrap();
    let rel_path = pg
        .psql("postgres", "SELECT pg_relation_filepath('t')")
        .unwrap();
    let mut conn = connect(&pg.superuser_conninfo()).await;
    let id = conn.identify_system().await.unwrap();
    let out = pg.make_dir("out").unwrap();
    let opts = BaseBackupOptions {
        label: "walferry 'test'".into(),
        estimate_size: true,
        ..Default::default()
    };
    let c = collect(&mut conn, &opts, &out).await;

    // Order: the user tablespace, then base.tar, then the manifest.
    assert_eq!(
        c.order,
        vec![
            format!("archive:{ts_oid}.tar"),
            "archive:base.tar".to_owned(),
            "manifest".to_owned(),
            "end".to_owned()
        ]
    );
    assert_eq!(c.archives[0].1, ts_dir.display().to_string());
    assert_eq!(c.archives[1].1, "");
    // Tablespace rows: the user tablespace with its location, then the data directory;
    // PROGRESS gives sizes.
    assert_eq!(c.tablespaces.len(), 2, "{:?}", c.tablespaces);
    assert_eq!(c.tablespaces[0].oid, Some(ts_oid));
    assert_eq!(
        c.tablespaces[0].location.as_deref(),
        Some(&*ts_dir.display().to_string())
    );
    assert_eq!(
        (c.tablespaces[1].oid, &c.tablespaces[1].location),
        (None, &None)
    );
    assert!(c.tablespaces.iter().all(|t| t.size_kb.unwrap_or(-1) > 0));

    // Positions: same timeline as the server, start <= end, and not before what the
    // server had flushed when we asked.
    assert_eq!(c.start.1, id.timeline);
    assert_eq!(c.end.1, id.timeline);
    assert!(c.start.0 <= c.end.0, "{:?} > {:?}", c.start, c.end);
    assert!(c.start.0 >= id.xlogpos, "{:?} < {}", c.start, id.xlogpos);
    // Progress counts archive bytes, never backwards; the server reports at most once a
    // second and at the end of each archive, so the last report is the total.
    assert!(c.progress.len() >= c.archives.len(), "{:?}", c.progress);
    assert!(
        c.progress.windows(2).all(|w| w[0] <= w[1]),
        "{:?}",
        c.progress
    );
    assert_eq!(*c.progress.last().unwrap(), c.archive_bytes);
    eprintln!(
        "archives {} bytes, {} progress messages, largest data message {} bytes",
        c.archive_bytes,
        c.progress.len(),
        c.max_chunk
    );
    // Bounded memory: the server sends small messages, and we pass them on as they are.
    assert!(c.max_chunk <= 1 << 20, "{}", c.max_chunk);

    // base.tar: complete tar files, expected entries, pg_control last.
    let base = list_tar(&c.archives[1].2);
    assert_eq!(base.last().unwrap().path, "global/pg_control");
    for must in [
        "PG_VERSION",
        "backup_label",
        "tablespace_map",
        "global/pg_control",
    ] {
        assert!(base.iter().any(|e| e.path == must), "{must} missing");
    }
    assert_eq!(file_text(&base, "PG_VERSION").trim(), "15");
    assert!(!base.iter().any(|e| e.path == "postmaster.pid"));
    let label = file_text(&base, "backup_label");
    assert_eq!(
        label_lsn(label, "START WAL LOCATION:"),
        c.start.0,
        "{label}"
    );
    assert!(label.contains("LABEL: walferry 'test'\n"), "{label}");
    assert!(label.contains(&format!("START TIMELINE: {}\n", c.start.1 .0)));
    assert_eq!(
        file_text(&base, "tablespace_map"),
        format!("{ts_oid} {}\n", ts_dir.display())
    );
    // No WAL without WAL=true.
    assert!(!base
        .iter()
        .any(|e| e.path.starts_with("pg_wal/") && e.kind.is_file()));
    // Both archives end with the tar end-of-archive marker.
    for (_, _, path) in &c.archives {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(bytes.len() % 512, 0);
        assert!(bytes[bytes.len() - 1024..].iter().all(|b| *b == 0));
    }

    // The tablespace archive: PG_15_<catversion>/<db>/<relfilenode>, our table among them.
    let ts = list_tar(&c.archives[0].2);
    assert!(ts.iter().all(|e| e.path.starts_with("PG_15_")), "{ts:?}");
    let rel_in_ts = rel_path
        .strip_prefix(&format!("pg_tblspc/{ts_oid}/"))
        .unwrap_or_else(|| panic!("{rel_path}"));
    let table = ts.iter().find(|e| e.path == rel_in_ts).unwrap();
    assert!(table.size >= 8192 * 10, "{table:?}");

    // The manifest: WAL range = the backup's, files = the archives' regular files.
    let m = manifest_json(&c);
    let ranges = m["WAL-Ranges"].as_array().unwrap();
    assert_eq!(ranges.len(), 1);
    assert_eq!(ranges[0]["Timeline"], c.end.1 .0);
    assert_eq!(ranges[0]["Start-LSN"], c.start.0.to_string());
    assert_eq!(ranges[0]["End-LSN"], c.end.0.to_string());
    let listed = manifest_files(&m);
    let archived = archive_files(&c);
    assert!(listed.contains_key("tablespace_map") && listed.contains_key("backup_label"));
    assert!(listed.contains_key(&rel_path), "{rel_path}");
    assert_same_files(&listed, &archived);

    // The server's own verifier agrees (WAL is not in the backup: -n).
    let plain = pg.make_dir("plain").unwrap();
    let pg = Arc::new(pg);
    let (pg2, c) = (pg.clone(), Arc::new(c));
    let c2 = c.clone();
    blocking(move || verify_with_pg_verifybackup(&pg2, &c2, &plain, false)).await;

    // The connection is idle again and takes commands.
    let id2 = conn.identify_system().await.unwrap();
    assert!(id2.xlogpos >= c.end.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_backup_with_wal_holds_the_segments() {
    // 1 MB segments, and WAL written while the backup runs, so it spans several.
    let pg = Arc::new(
        PgCluster::builder()
            .initdb_arg("--wal-segsize=1")
            .start()
            .unwrap(),
    );
    pg.psql("postgres", "CREATE TABLE w (x int, s text)")
        .unwrap();
    let mut conn = connect(&pg.superuser_conninfo()).await;
    let seg = conn.wal_segment_size().await.unwrap();
    assert_eq!(seg.bytes(), 1 << 20);
    let out = pg.make_dir("out").unwrap();
    let opts = BaseBackupOptions {
        wal: true,
        wait_for_archive: false,
        ..Default::default()
    };
    let writer = pg.clone();
    let write_wal: Box<dyn FnOnce() + Send> = Box::new(move || {
        writer
            .psql(
                "postgres",
                "INSERT INTO w SELECT g, repeat('w', 200) FROM generate_series(1, 15000) g",
            )
            .unwrap();
    });
    let c = collect_with(&mut conn, &opts, &out, Some(write_wal), false).await;
    assert_eq!(
        c.order,
        vec!["archive:base.tar", "manifest", "end"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    );
    let base = list_tar(&c.archives[0].2);
    let wal: Vec<&TarEntry> = base
        .iter()
        .filter(|e| e.kind.is_file() && e.path.starts_with("pg_wal/"))
        .collect();
    // The segments from the one holding the start to the one holding the last byte before
    // the end, each a full segment, each marked archived (.done) so the restored cluster
    // does not archive them again.
    let (tli, first, last) = (
        c.start.1,
        c.start.0.segment(seg),
        Lsn(c.end.0 .0 - 1).segment(seg),
    );
    assert!(last.0 >= first.0 + 2, "{:?} .. {:?}", c.start, c.end);
    let names: Vec<String> = (first.0..=last.0)
        .map(|n| segment_file_name(tli, SegmentNo(n), seg))
        .collect();
    let segments: Vec<&TarEntry> = wal
        .iter()
        .copied()
        .filter(|e| !e.path["pg_wal/".len()..].contains('/'))
        .collect();
    let got: Vec<String> = segments.iter().map(|e| e.path.clone()).collect();
    let expected: Vec<String> = names.iter().map(|n| format!("pg_wal/{n}")).collect();
    assert_eq!(got, expected);
    assert!(segments.iter().all(|e| e.size == seg.bytes()), "{wal:?}");
    let done: Vec<String> = wal
        .iter()
        .filter_map(|e| e.path.strip_prefix("pg_wal/archive_status/"))
        .map(str::to_owned)
        .collect();
    let expected_done: Vec<String> = names.iter().map(|n| format!("{n}.done")).collect();
    assert_eq!(done, expected_done);
    // With WAL, PostgreSQL 15 sends `pg_wal/` but no `pg_wal/archive_status/` directory
    // entry: the directory exists only through the .done files in it (an extractor must
    // create parent directories).
    assert!(!base
        .iter()
        .any(|e| e.path.trim_end_matches('/') == "pg_wal/archive_status"));
    assert!(base.iter().any(|e| e.path == "pg_wal/" && e.kind.is_dir()));
    // The manifest does not list WAL; everything else matches.
    let m = manifest_json(&c);
    assert_eq!(m["WAL-Ranges"][0]["End-LSN"], c.end.0.to_string());
    assert_same_files(&manifest_files(&m), &archive_files(&c));

    // pg_verifybackup, this time parsing the WAL in the backup from start to end.
    let plain = pg.make_dir("plain").unwrap();
    let pg2 = pg.clone();
    blocking(move || verify_with_pg_verifybackup(&pg2, &c, &plain, true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_backup_is_an_error_not_an_end() {
    let pg = Arc::new(PgCluster::start().unwrap());
    let mut conn = connect(&pg.superuser_conninfo()).await;
    // Throttled to the minimum: the ~30 MB of a fresh cluster would take minutes.
    let opts = BaseBackupOptions {
        max_rate_kb: Some(32),
        ..Default::default()
    };
    let mut stream = conn.base_backup(&opts).await.unwrap();
    let mut killer = None;
    let mut data_bytes = 0u64;
    let result = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match stream.next().await {
                Ok(BackupEvent::Data(b)) => {
                    data_bytes += b.len() as u64;
                    if killer.is_none() {
                        let pg = pg.clone();
                        killer = Some(tokio::task::spawn_blocking(move || pg.kill9()));
                    }
                    // A slow consumer.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(BackupEvent::End { lsn, .. }) => {
                    panic!("backup ended at {lsn} although the server was killed")
                }
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("no error within 120 s after the kill");
    killer.unwrap().await.unwrap().unwrap();
    eprintln!("after {data_bytes} bytes: {result}");
    assert!(result.is_transient(), "{result:?}");
    assert!(
        matches!(result, PgError::Closed | PgError::Io(_))
            || result.sqlstate().is_some_and(|s| s.starts_with("57")),
        "{result:?}"
    );
    // The stream stays failed, and so does the connection.
    assert!(matches!(stream.next().await, Err(PgError::Closed)));
    drop(stream);
    assert!(conn.identify_system().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_base_backups_both_succeed() {
    let pg = PgCluster::start().unwrap();
    let (mut a, mut b) = (
        connect(&pg.superuser_conninfo()).await,
        connect(&pg.superuser_conninfo()).await,
    );
    let (da, db) = (pg.make_dir("a").unwrap(), pg.make_dir("b").unwrap());
    let opts = BaseBackupOptions {
        label: "a".into(),
        ..Default::default()
    };
    let opts_b = BaseBackupOptions {
        label: "b".into(),
        ..Default::default()
    };
    // One of them drops most of its next() futures half-way (cancel safety).
    let (ca, cb) = tokio::join!(
        collect(&mut a, &opts, &da),
        collect_with(&mut b, &opts_b, &db, None, true)
    );
    for c in [&ca, &cb] {
        assert_eq!(c.order, vec!["archive:base.tar", "manifest", "end"]);
        assert!(c.start.0 <= c.end.0);
        let m = manifest_json(c);
        assert_eq!(m["WAL-Ranges"][0]["End-LSN"], c.end.0.to_string());
        assert_same_files(&manifest_files(&m), &archive_files(c));
    }
    // Every byte of the cancelled one is there: the server's verifier checks each file's
    // CRC32C against the manifest.
    let plain = pg.make_dir("plain").unwrap();
    let pg = Arc::new(pg);
    let (pg2, cb) = (pg.clone(), Arc::new(cb));
    let cb2 = cb.clone();
    blocking(move || verify_with_pg_verifybackup(&pg2, &cb2, &plain, false)).await;
    let la = list_tar(&ca.archives[0].2);
    assert!(file_text(&la, "backup_label").contains("LABEL: a\n"));
    let lb = list_tar(&cb.archives[0].2);
    assert!(file_text(&lb, "backup_label").contains("LABEL: b\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_mapped_and_leave_the_connection_usable() {
    let pg = PgCluster::builder()
        .config("max_wal_senders", "1")
        .start()
        .unwrap();
    let mut held = connect(&pg.superuser_conninfo()).await;
    held.identify_system().await.unwrap();

    // A second walsender is refused: transient, with advice.
    let info = ConnInfo::parse(&pg.superuser_conninfo()).unwrap();
    let err = ReplicationConnection::connect(&info).await.unwrap_err();
    eprintln!("{err}");
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(err.sqlstate(), Some("53300"), "{err:?}");
    assert!(err.advice().unwrap().contains("max_wal_senders"), "{err}");
    assert!(err.to_string().contains("advice:"), "{err}");

    // An error before the COPY (label over MAXPGPATH) comes from base_backup() and leaves
    // the connection idle.
    let too_long = BaseBackupOptions {
        label: "x".repeat(2000),
        ..Default::default()
    };
    let err = held.base_backup(&too_long).await.unwrap_err();
    eprintln!("{err}");
    assert!(err.server_error().is_some(), "{err:?}");
    assert!(err.is_permanent(), "{err:?}");
    held.identify_system().await.unwrap();

    // Client-side validation.
    let bad_rate = BaseBackupOptions {
        max_rate_kb: Some(1),
        ..Default::default()
    };
    assert!(matches!(
        held.base_backup(&bad_rate).await.unwrap_err(),
        PgError::Config { .. }
    ));
    held.identify_system().await.unwrap();

    // A stream dropped before End leaves the connection refusing commands (it is still in
    // the middle of the backup), rather than mixing the backup's bytes into a reply.
    let mut stream = held
        .base_backup(&BaseBackupOptions::default())
        .await
        .unwrap();
    loop {
        if let BackupEvent::Data(_) = stream.next().await.unwrap() {
            break;
        }
    }
    drop(stream);
    let err = tokio::time::timeout(Duration::from_secs(5), held.identify_system())
        .await
        .expect("a command on a connection mid-backup must fail at once")
        .unwrap_err();
    assert!(matches!(err, PgError::Protocol { .. }), "{err:?}");
}
