//! The walferry binaries under test, and agent processes that die with the test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::emulators::StoreTarget;

/// Directory with already built binaries; when unset, the testkit builds them once per process.
pub const BIN_DIR_ENV: &str = "WALFERRY_BIN_DIR";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Path of `walferry-agent` or `walferry-restore`, built from this checkout.
pub fn walferry_bin(name: &str) -> Result<PathBuf> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    let dir = DIR
        .get_or_init(|| {
            if let Ok(d) = std::env::var(BIN_DIR_ENV) {
                return Ok(PathBuf::from(d));
            }
            // Build (a no-op when up to date) so a test never runs a stale binary.
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = Command::new(cargo)
                .current_dir(workspace_root())
                .args([
                    "build",
                    "--quiet",
                    "-p",
                    "walferry-agent",
                    "-p",
                    "walferry-restore",
                    "--bins",
                ])
                .output()
                .map_err(|e| format!("run cargo build: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "cargo build failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let target = std::env::var("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|_| workspace_root().join("target"));
            Ok(target.join("debug"))
        })
        .clone()
        .map_err(anyhow::Error::msg)?;
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} does not exist (set {BIN_DIR_ENV} or build the binaries)",
            p.display()
        );
    }
    Ok(p)
}

/// `--repo URL --repo-option K=V ...` for a target.
pub fn repo_args(t: &StoreTarget) -> Vec<String> {
    let mut v = vec!["--repo".to_string(), t.url.clone()];
    for (k, val) in &t.options {
        v.push("--repo-option".into());
        v.push(format!("{k}={val}"));
    }
    v
}

/// Runs a walferry binary to completion; returns (status, stdout, stderr).
pub fn run_walferry(
    name: &str,
    args: &[String],
    env: &[(&str, &str)],
) -> Result<(ExitStatus, String, String)> {
    let mut cmd = Command::new(walferry_bin(name)?);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().with_context(|| format!("run {name}"))?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A background `walferry-agent` process; killed (SIGKILL) on drop.
pub struct AgentProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts `walferry-agent ARGS`, logging to `log`.
    pub fn spawn(args: &[String], log: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let child = Command::new(walferry_bin("walferry-agent")?)
            .args(args)
            .env("WALFERRY_LOG", "info,walferry_agent=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("start walferry-agent")?;
        Ok(AgentProcess {
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let pid = self.pid().context("agent already reaped")?;
        signal(pid, "TERM")?;
        self.wait(timeout)
    }

    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().context("reap walferry-agent")?;
        }
        Ok(())
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("agent already reaped")?;
        loop {
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!(
                    "walferry-agent did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    let st = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .context("run kill")?;
    if !st.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}
