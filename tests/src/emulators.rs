//! Object-store targets for tests: `file://`, `memory://`, Azurite (Azure Blob) and moto (S3).
//!
//! Emulators are found, in order, at an already running instance (`WALFERRY_AZURITE_URL`,
//! `WALFERRY_S3_URL`, e.g. `http://127.0.0.1:10000`), or else started once per test process
//! on a free port from a binary at `WALFERRY_AZURITE_BIN` / `WALFERRY_MOTO_BIN`,
//! `<workspace>/.tools/...` (what `scripts/test.sh` installs), or `PATH`. A started emulator
//! is killed when the test process exits. Every `*_target()` call gets a fresh, empty
//! container or bucket.

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use object_store::ObjectStore;
use std::any::Any;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const REQUIRE_EMULATORS_ENV: &str = "WALFERRY_REQUIRE_EMULATORS";
pub const AZURITE_URL_ENV: &str = "WALFERRY_AZURITE_URL";
pub const S3_URL_ENV: &str = "WALFERRY_S3_URL";
pub const AZURITE_BIN_ENV: &str = "WALFERRY_AZURITE_BIN";
pub const MOTO_BIN_ENV: &str = "WALFERRY_MOTO_BIN";

/// Azurite's well-known account and key.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// Credentials handed to moto (it does not check signatures, but object_store must sign).
pub const S3_ACCESS_KEY: &str = "walferry";
pub const S3_SECRET_KEY: &str = "walferry-secret";
pub const S3_REGION: &str = "us-east-1";

/// The prefix inside each fresh container/bucket that target URLs point at.
pub const TARGET_PREFIX: &str = "repo";

/// A store URL plus `object_store` config keys, for `object_store::parse_url_opts`.
/// Holds whatever must stay alive while it is used (e.g. the temp dir of a `file://` target).
#[derive(Clone)]
pub struct StoreTarget {
    /// Short name for test output: `file`, `memory`, `azurite`, `s3`.
    pub label: String,
    pub url: String,
    pub options: Vec<(String, String)>,
    _keep: Vec<Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for StoreTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTarget")
            .field("label", &self.label)
            .field("url", &self.url)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl StoreTarget {
    pub fn parsed_url(&self) -> Result<url::Url> {
        url::Url::parse(&self.url).with_context(|| format!("parse store url {}", self.url))
    }

    /// `object_store::parse_url_opts(url, options)`: the store and the prefix path inside it.
    /// Note: every call on a `memory://` target yields a new, empty in-memory store.
    pub fn open(&self) -> Result<(Box<dyn ObjectStore>, object_store::path::Path)> {
        let url = self.parsed_url()?;
        object_store::parse_url_opts(&url, self.options.iter().cloned())
            .with_context(|| format!("open store {}", self.url))
    }

    /// The options with upper-cased keys (`AWS_ENDPOINT`, `AZURE_STORAGE_ACCOUNT_KEY`, ...),
    /// as env vars for a child process whose object_store builders use `from_env()`.
    pub fn options_env(&self) -> Vec<(String, String)> {
        self.options
            .iter()
            .map(|(k, v)| (k.to_uppercase(), v.clone()))
            .collect()
    }
}

/// `WALFERRY_REQUIRE_EMULATORS=1` (CI): a missing emulator is an error, not a skip.
pub fn require_emulators() -> bool {
    std::env::var(REQUIRE_EMULATORS_ENV)
        .map(|v| matches!(v.trim(), "1" | "true" | "yes"))
        .unwrap_or(false)
}

/// `file:///<fresh temp dir>/repo` (the `repo` dir exists and is empty).
pub fn file_target() -> Result<StoreTarget> {
    let dir = tempfile::Builder::new()
        .prefix("walferry-store-")
        .tempdir()
        .context("create temp dir for file target")?;
    let repo = dir.path().join(TARGET_PREFIX);
    std::fs::create_dir(&repo).context("create repo dir")?;
    let url = url::Url::from_directory_path(&repo)
        .map_err(|()| anyhow!("not an absolute path: {}", repo.display()))?;
    Ok(StoreTarget {
        label: "file".into(),
        url: url.as_str().trim_end_matches('/').to_owned(),
        options: Vec::new(),
        _keep: vec![Arc::new(dir)],
    })
}

/// `memory://`.
pub fn memory_target() -> StoreTarget {
    StoreTarget {
        label: "memory".into(),
        url: "memory://".into(),
        options: Vec::new(),
        _keep: Vec::new(),
    }
}

/// `az://<fresh container>/repo` on Azurite. `Ok(None)` (with a loud note on stderr) when
/// Azurite is not installed and emulators are not required.
///
/// The options address the emulator as an ordinary account at a custom endpoint
/// (`azure_storage_use_emulator` in object_store 0.14 ignores `azure_storage_endpoint` and
/// only reads the port from the `AZURITE_BLOB_STORAGE_URL` env var).
pub async fn azurite_target() -> Result<Option<StoreTarget>> {
    blocking(|| {
        let Some(endpoint) = emulator(&AZURITE)? else {
            return Ok(None);
        };
        let container = unique_name();
        create_azure_container(endpoint, &container)?;
        Ok(Some(StoreTarget {
            label: "azurite".into(),
            url: format!("az://{container}/{TARGET_PREFIX}"),
            options: azurite_options(endpoint),
            _keep: Vec::new(),
        }))
    })
    .await
}

/// `s3://<fresh bucket>/repo` on moto. `Ok(None)` (with a loud note on stderr) when moto is
/// not installed and emulators are not required.
pub async fn s3_target() -> Result<Option<StoreTarget>> {
    blocking(|| {
        let Some(endpoint) = emulator(&MOTO)? else {
            return Ok(None);
        };
        let bucket = unique_name();
        let (status, body) = http_request(endpoint, "PUT", &format!("/{bucket}"), &[])?;
        if status != 200 {
            bail!("create bucket {bucket} at {endpoint}: HTTP {status}: {body}");
        }
        Ok(Some(StoreTarget {
            label: "s3".into(),
            url: format!("s3://{bucket}/{TARGET_PREFIX}"),
            options: s3_options(endpoint),
            _keep: Vec::new(),
        }))
    })
    .await
}

/// file, memory, and whichever emulators are available (all four when required).
pub async fn all_targets() -> Result<Vec<StoreTarget>> {
    let mut v = vec![file_target()?, memory_target()];
    v.extend(azurite_target().await?);
    v.extend(s3_target().await?);
    Ok(v)
}

/// object_store options for an Azurite blob endpoint `http://host:port`.
pub fn azurite_options(endpoint: &str) -> Vec<(String, String)> {
    [
        ("azure_storage_account_name", AZURITE_ACCOUNT.to_owned()),
        ("azure_storage_account_key", AZURITE_KEY.to_owned()),
        (
            "azure_storage_endpoint",
            format!("{endpoint}/{AZURITE_ACCOUNT}"),
        ),
        ("azure_allow_http", "true".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// object_store options for an S3 endpoint `http://host:port` (path-style requests).
pub fn s3_options(endpoint: &str) -> Vec<(String, String)> {
    [
        ("aws_endpoint", endpoint),
        ("aws_allow_http", "true"),
        ("aws_access_key_id", S3_ACCESS_KEY),
        ("aws_secret_access_key", S3_SECRET_KEY),
        ("aws_region", S3_REGION),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

// ---------------------------------------------------------------------------------------
// Finding and starting emulators

struct EmulatorKind {
    name: &'static str,
    url_env: &'static str,
    bin_env: &'static str,
    /// Relative to the workspace root.
    tools_path: &'static str,
    path_name: &'static str,
    install_hint: &'static str,
    args: fn(u16) -> Vec<String>,
    /// Printed by the emulator once it listens on the port.
    ready_line: fn(u16) -> String,
    cell: OnceLock<std::result::Result<Option<String>, String>>,
}

static AZURITE: EmulatorKind = EmulatorKind {
    name: "azurite",
    url_env: AZURITE_URL_ENV,
    bin_env: AZURITE_BIN_ENV,
    tools_path: ".tools/azurite/node_modules/.bin/azurite-blob",
    path_name: "azurite-blob",
    install_hint: "run scripts/test.sh, or `npm install azurite` and set WALFERRY_AZURITE_BIN",
    args: |port| {
        [
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &port.to_string(),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
            // Otherwise Azurite phones home to Application Insights.
            "--disableTelemetry",
            "--disableProductStyleUrl",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    },
    ready_line: |port| format!("listens on http://127.0.0.1:{port}"),
    cell: OnceLock::new(),
};

static MOTO: EmulatorKind = EmulatorKind {
    name: "moto",
    url_env: S3_URL_ENV,
    bin_env: MOTO_BIN_ENV,
    tools_path: ".tools/moto/bin/moto_server",
    path_name: "moto_server",
    install_hint: "run scripts/test.sh, or `pip install 'moto[server]'` and set WALFERRY_MOTO_BIN",
    args: |port| {
        vec![
            "-H".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ]
    },
    ready_line: |port| format!("Running on http://127.0.0.1:{port}"),
    cell: OnceLock::new(),
};

/// The emulator's base URL (`http://127.0.0.1:PORT`), starting it on first use.
fn emulator(kind: &'static EmulatorKind) -> Result<Option<&'static str>> {
    let res = kind
        .cell
        .get_or_init(|| resolve_emulator(kind).map_err(|e| format!("{e:#}")));
    match res {
        Ok(Some(url)) => Ok(Some(url.as_str())),
        Ok(None) => {
            eprintln!(
                "\n*** SKIPPED: {} not installed ({}) -- set {REQUIRE_EMULATORS_ENV}=1 to fail instead ***\n",
                kind.name, kind.install_hint
            );
            Ok(None)
        }
        Err(e) => Err(anyhow!("{e}")),
    }
}

fn resolve_emulator(kind: &EmulatorKind) -> Result<Option<String>> {
    if let Ok(url) = std::env::var(kind.url_env) {
        let url = url.trim().trim_end_matches('/').to_owned();
        // Accept the Azurite account URL too.
        let url = url
            .strip_suffix(&format!("/{AZURITE_ACCOUNT}"))
            .map(str::to_owned)
            .unwrap_or(url);
        if !url.starts_with("http://") {
            bail!("${}={url}: expected http://host:port", kind.url_env);
        }
        http_request(&url, "GET", "/", &[])
            .with_context(|| format!("{} at ${}={url} does not answer", kind.name, kind.url_env))?;
        return Ok(Some(url));
    }
    let Some(bin) = find_binary(kind)? else {
        if require_emulators() {
            bail!(
                "{} is required ({REQUIRE_EMULATORS_ENV}=1) but not found: not at ${}, {}, or `{}` on PATH ({})",
                kind.name,
                kind.bin_env,
                workspace_root().join(kind.tools_path).display(),
                kind.path_name,
                kind.install_hint
            );
        }
        return Ok(None);
    };
    let mut last = None;
    for _ in 0..4 {
        match start_emulator(kind, &bin)? {
            Ok(url) => return Ok(Some(url)),
            Err(port_taken) => last = Some(port_taken),
        }
    }
    bail!(
        "{} could not get a free port: {}",
        kind.name,
        last.unwrap_or_default()
    )
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn find_binary(kind: &EmulatorKind) -> Result<Option<PathBuf>> {
    if let Some(p) = std::env::var_os(kind.bin_env) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("${}={} is not a file", kind.bin_env, p.display());
        }
        return Ok(Some(p));
    }
    let tools = workspace_root().join(kind.tools_path);
    if tools.is_file() {
        return Ok(Some(tools));
    }
    Ok(std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(kind.path_name))
            .find(|p| p.is_file())
    }))
}

/// Runs the emulator under a small shell that kills it once the test process is gone
/// (no pre_exec/prctl: the workspace forbids unsafe code).
const WATCHDOG: &str = r#"
dir="$WF_EMU_DIR"
"$@" >"$dir/emulator.log" 2>&1 </dev/null &
c=$!
while kill -0 "$WF_WATCH_PID" 2>/dev/null && kill -0 "$c" 2>/dev/null; do sleep 0.5; done
if kill -0 "$c" 2>/dev/null; then
  kill "$c" 2>/dev/null
  i=0
  while kill -0 "$c" 2>/dev/null && [ "$i" -lt 20 ]; do sleep 0.25; i=$((i+1)); done
  kill -9 "$c" 2>/dev/null
  wait "$c" 2>/dev/null
  rm -rf "$dir"
fi
"#;

/// Ok(Ok(url)) started; Ok(Err(msg)) the port was taken (retry); Err(..) real failure.
fn start_emulator(kind: &EmulatorKind, bin: &Path) -> Result<std::result::Result<String, String>> {
    let port = crate::pg::free_port()?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("walferry-{}-", kind.name))
        .tempdir()
        .context("emulator temp dir")?
        .keep();
    let log = dir.join("emulator.log");
    let mut child: Child = Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG)
        .arg("walferry-emulator-watchdog")
        .arg(bin)
        .args((kind.args)(port))
        .env("WF_EMU_DIR", &dir)
        .env("WF_WATCH_PID", std::process::id().to_string())
        .current_dir(&dir)
        // Not inherited: nextest would wait on our stdout/stderr for a process that outlives the test.
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    let url = format!("http://127.0.0.1:{port}");
    let ready = (kind.ready_line)(port);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(&ready) && http_request(&url, "GET", "/", &[]).is_ok() {
            return Ok(Ok(url));
        }
        let exited = child.try_wait().ok().flatten().is_some();
        if exited {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            if ["EADDRINUSE", "ddress already in use", "is in use"]
                .iter()
                .any(|m| text.contains(m))
            {
                return Ok(Err(format!("port {port}: {}", text.trim())));
            }
            bail!(
                "{} ({}) exited during startup on port {port}:\n{}",
                kind.name,
                bin.display(),
                text.trim()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} ({}) did not become ready on port {port} within 90s; log so far:\n{}",
                kind.name,
                bin.display(),
                text.trim()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------
// Container/bucket creation (object_store never creates them)

fn unique_name() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!(
        "wf-{}-{n}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// `PUT /devstoreaccount1/<c>?restype=container`, SharedKey-signed.
fn create_azure_container(endpoint: &str, container: &str) -> Result<()> {
    const VERSION: &str = "2021-08-06";
    let date = http_date(SystemTime::now());
    let string_to_sign = format!(
        "PUT{}x-ms-date:{date}\nx-ms-version:{VERSION}\n/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{container}\nrestype:container",
        "\n".repeat(12)
    );
    let key = base64::engine::general_purpose::STANDARD
        .decode(AZURITE_KEY)
        .context("decode azurite key")?;
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(&key).map_err(|e| anyhow!("hmac key: {e}"))?;
    mac.update(string_to_sign.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let (status, body) = http_request(
        endpoint,
        "PUT",
        &format!("/{AZURITE_ACCOUNT}/{container}?restype=container"),
        &[
            ("x-ms-date", date),
            ("x-ms-version", VERSION.to_owned()),
            (
                "Authorization",
                format!("SharedKey {AZURITE_ACCOUNT}:{sig}"),
            ),
        ],
    )?;
    if status != 201 {
        bail!("create container {container} at {endpoint}: HTTP {status}: {body}");
    }
    Ok(())
}

/// RFC 1123 date (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WD[days.rem_euclid(7) as usize],
        MON[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Minimal HTTP/1.1 request over loopback (no body); returns status and body text.
fn http_request(
    base_url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
) -> Result<(u16, String)> {
    let host = base_url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("not an http:// url: {base_url}"))?
        .trim_end_matches('/');
    let mut stream = TcpStream::connect(host).with_context(|| format!("connect to {host}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream
        .write_all(req.as_bytes())
        .with_context(|| format!("send {method} {path} to {host}"))?;
    let mut resp = Vec::new();
    stream
        .read_to_end(&mut resp)
        .with_context(|| format!("read response to {method} {path} from {host}"))?;
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| {
            anyhow!(
                "bad HTTP response from {host}: {}",
                text.lines().next().unwrap_or("")
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("")
        .to_owned();
    Ok((status, body))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("emulator setup task failed: {e}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_date_format() {
        assert_eq!(
            http_date(UNIX_EPOCH + Duration::from_secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            http_date(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "Tue, 29 Feb 2000 00:00:00 GMT"
        );
    }

    #[test]
    fn unique_names_are_valid_bucket_names() {
        let a = unique_name();
        let b = unique_name();
        assert_ne!(a, b);
        assert!(a.len() >= 3 && a.len() <= 63);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }
}
