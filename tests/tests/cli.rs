//! The command-line contract: init on every store, refusals with clear messages and the
//! documented exit codes, key files, and --help.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use walferry_formats::config::CONFIG_KEY;
use walferry_formats::{Error, Repository};
use walferry_tests::bins::{repo_args, run_walferry};
use walferry_tests::emulators::{azurite_target, file_target, s3_target, StoreTarget};

fn keygen(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    let (st, _, err) = run_walferry(
        "walferry-agent",
        &["keygen".into(), "--out".into(), p.display().to_string()],
        &[],
    )
    .unwrap();
    assert!(st.success(), "{err}");
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
    p
}

fn init_args(t: &StoreTarget, extra: &[&str]) -> Vec<String> {
    let mut a = vec!["init".to_string()];
    a.extend(repo_args(t));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

async fn init_refuses_and_leaves_untouched(t: StoreTarget) {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "k");
    let key_s = key.display().to_string();
    let repo = Repository::open(&t.url, t.options.clone()).unwrap();

    // A world-readable key is refused before anything is written.
    let loose = keygen(dir.path(), "loose");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (st, _, err) = run_walferry(
        "walferry-agent",
        &init_args(&t, &["--key-file", &loose.display().to_string()]),
        &[],
    )
    .unwrap();
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    assert!(matches!(
        repo.config().await,
        Err(Error::NotARepository { .. })
    ));

    // No key and no --no-encryption: a usage error.
    let (st, _, err) = run_walferry("walferry-agent", &init_args(&t, &[]), &[]).unwrap();
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("--no-encryption"), "{err}");

    // A block size that is not whole pages, or a zstd level out of range: usage errors
    // that name the flag, and nothing is written.
    for (flags, names) in [
        (["--block-size", "12"], "--block-size 12"),
        (["--compression-level", "23"], "--compression-level 23"),
    ] {
        let mut extra = vec!["--key-file", &key_s];
        extra.extend(flags);
        let (st, _, err) = run_walferry("walferry-agent", &init_args(&t, &extra), &[]).unwrap();
        assert_eq!(st.code(), Some(2), "{err}");
        assert!(err.contains(names), "{err}");
        assert!(matches!(
            repo.config().await,
            Err(Error::NotARepository { .. })
        ));
    }

    let (st, out, err) = run_walferry(
        "walferry-agent",
        &init_args(&t, &["--key-file", &key_s]),
        &[],
    )
    .unwrap();
    assert!(st.success(), "{out}{err}");
    assert!(
        out.contains("created repository") && out.contains("AES-256-GCM"),
        "{out}"
    );
    let before = repo.get(CONFIG_KEY).await.unwrap();
    let listed_before = repo.list("").await.unwrap();

    // A second init, with the same key, another key, or no encryption, is refused.
    let other = keygen(dir.path(), "other");
    for extra in [
        vec!["--key-file", key_s.as_str()],
        vec!["--key-file", &other.display().to_string()],
        vec!["--no-encryption"],
    ] {
        let (st, _, err) = run_walferry("walferry-agent", &init_args(&t, &extra), &[]).unwrap();
        assert_eq!(st.code(), Some(1), "{extra:?}: {err}");
        assert!(
            err.contains("already exists") && err.contains("untouched"),
            "{err}"
        );
    }
    assert_eq!(repo.get(CONFIG_KEY).await.unwrap(), before);
    assert_eq!(repo.list("").await.unwrap(), listed_before);

    // The key also comes from WALFERRY_KEY; a wrong one is named as such.
    let wrong = std::fs::read_to_string(&other).unwrap();
    let mut fetch = vec!["wal-fetch".to_string()];
    fetch.extend(repo_args(&t));
    fetch.extend([
        "000000010000000000000001".into(),
        dir.path().join("x").display().to_string(),
    ]);
    let (st, _, err) = run_walferry(
        "walferry-restore",
        &fetch,
        &[("WALFERRY_KEY", wrong.trim())],
    )
    .unwrap();
    assert_eq!(st.code(), Some(3), "{err}");
    assert!(
        err.contains("master key does not open this repository"),
        "{err}"
    );
    let right = std::fs::read_to_string(&key).unwrap();
    let (st, _, err) = run_walferry(
        "walferry-restore",
        &fetch,
        &[("WALFERRY_KEY", right.trim())],
    )
    .unwrap();
    assert_eq!(st.code(), Some(1), "not found expected: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn init_file() {
    init_refuses_and_leaves_untouched(file_target().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn init_azurite() {
    let Some(t) = azurite_target().await.unwrap() else {
        return;
    };
    init_refuses_and_leaves_untouched(t).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn init_s3() {
    let Some(t) = s3_target().await.unwrap() else {
        return;
    };
    init_refuses_and_leaves_untouched(t).await;
}

#[test]
fn unknown_repo_option_is_an_error() {
    let t = file_target().unwrap();
    let (st, _, err) = run_walferry(
        "walferry-agent",
        &[
            "init".into(),
            "--repo".into(),
            "s3://bucket/p".into(),
            "--repo-option".into(),
            "aws_endpiont=http://x".into(),
            "--no-encryption".into(),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("unknown option \"aws_endpiont\""), "{err}");
    drop(t);
}

#[test]
fn keygen_protects_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let k = keygen(dir.path(), "k");
    let text = std::fs::read_to_string(&k).unwrap();
    assert_eq!(text.len(), 65);
    assert!(text.trim_end().bytes().all(|b| b.is_ascii_hexdigit()));
    // Never overwrites.
    let (st, _, err) = run_walferry(
        "walferry-agent",
        &["keygen".into(), "--out".into(), k.display().to_string()],
        &[],
    )
    .unwrap();
    assert_eq!(st.code(), Some(1), "{err}");
    assert_eq!(std::fs::read_to_string(&k).unwrap(), text);
    // `keygen > FILE` makes the redirected file private.
    let redirected = dir.path().join("r");
    let f = std::fs::File::create(&redirected).unwrap();
    std::fs::set_permissions(&redirected, std::fs::Permissions::from_mode(0o644)).unwrap();
    let st =
        std::process::Command::new(walferry_tests::bins::walferry_bin("walferry-agent").unwrap())
            .arg("keygen")
            .stdout(f)
            .status()
            .unwrap();
    assert!(st.success());
    assert_eq!(
        std::fs::metadata(&redirected).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(std::fs::read_to_string(&redirected).unwrap().len(), 65);
}

#[test]
fn help_describes_the_whole_contract() {
    let (st, out, _) = run_walferry("walferry-agent", &["--help".into()], &[]).unwrap();
    assert!(st.success());
    for cmd in [
        "keygen", "init", "run", "backup", "wal-push", "list", "expire",
    ] {
        assert!(out.contains(cmd), "agent --help lacks {cmd}:\n{out}");
    }
    assert!(out.contains("Exit codes"), "{out}");
    assert!(
        !out.contains("not built yet"),
        "every command is built now:\n{out}"
    );
    let (st, out, _) = run_walferry("walferry-restore", &["--help".into()], &[]).unwrap();
    assert!(st.success());
    for s in [
        "--to",
        "--to-lsn",
        "--to-xid",
        "--to-name",
        "--pgdata",
        "--start",
        "--backup",
        "--delta",
        "--dry-run",
        "wal-fetch",
        "verify",
    ] {
        assert!(out.contains(s), "restore --help lacks {s}:\n{out}");
    }
    // A command missing its required arguments is a usage error (exit 2).
    let (st, _, err) = run_walferry("walferry-agent", &["backup".into()], &[]).unwrap();
    assert_eq!(st.code(), Some(2), "{err}");
}

#[test]
fn restore_rejects_a_time_without_a_zone() {
    let dir = tempfile::tempdir().unwrap();
    let pgdata = dir.path().join("pgdata");
    for (to, want) in [
        ("2026-11-23 02:59:30", "no zone"),
        ("yesterday", "invalid time"),
    ] {
        let (st, _, err) = run_walferry(
            "walferry-restore",
            &[
                "--repo".into(),
                "file:///nonexistent".into(),
                "--to".into(),
                to.into(),
                "--pgdata".into(),
                pgdata.display().to_string(),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(st.code(), Some(2), "{to}: {err}");
        assert!(err.contains(want), "{err}");
        assert!(!pgdata.exists(), "nothing may be written on bad input");
    }
}
