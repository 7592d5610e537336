//! Connection settings: libpq `key=value` strings and `postgres://` URLs, with libpq's
//! environment defaults (PGHOST, PGPORT, PGUSER, ...) and its password file.
//!
//! Parsing is pure: [`ConnInfo::parse_with_env`] takes the environment as a function, so
//! every shape has a unit test. The password file is read at connect time, per host,
//! because its lines are matched against the host and port actually tried.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use zeroize::Zeroizing;

use super::error::{PgError, Result};

/// Port used when neither the string nor PGPORT names one.
pub const DEFAULT_PORT: u16 = 5432;

/// A password. Its `Debug` prints `***`; there is no `Display`. Zeroed on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Zeroizing<String>);

impl Password {
    pub fn new(s: impl Into<String>) -> Self {
        Password(Zeroizing::new(s.into()))
    }

    /// The secret itself, for the authentication exchange only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS if the server offers it (certificate not verified), else plaintext. libpq's default.
    #[default]
    Prefer,
    /// TLS or fail. The certificate is not verified unless a root certificate is configured
    /// (`sslrootcert`, or `~/.postgresql/root.crt` exists), as in libpq.
    Require,
    /// TLS, and the certificate must chain to a trusted root.
    VerifyCa,
    /// TLS, chain verified, and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = PgError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(PgError::config(
                    "sslmode=allow is not supported; use disable, prefer, require, verify-ca or verify-full",
                ))
            }
            other => {
                return Err(PgError::config(format!(
                    "invalid sslmode \"{other}\" (expected disable, prefer, require, verify-ca or verify-full)"
                )))
            }
        })
    }
}

/// Where trusted root certificates come from (`sslrootcert`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    /// PEM file with one or more CA certificates.
    File(PathBuf),
    /// The operating system's trust store (`sslrootcert=system`).
    System,
}

/// libpq's `target_session_attrs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TargetSessionAttrs {
    /// Any server will do.
    #[default]
    Any,
    /// Skip servers that are read-only (standbys in recovery).
    ReadWrite,
}

impl FromStr for TargetSessionAttrs {
    type Err = PgError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "any" => Ok(TargetSessionAttrs::Any),
            "read-write" => Ok(TargetSessionAttrs::ReadWrite),
            other => Err(PgError::config(format!(
                "unsupported target_session_attrs \"{other}\" (expected any or read-write)"
            ))),
        }
    }
}

/// One server to try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address.
    Tcp { name: String, port: u16 },
    /// A unix socket directory (the socket is `<dir>/.s.PGSQL.<port>`). TLS is never used
    /// over unix sockets (as in libpq).
    Unix { dir: PathBuf, port: u16 },
}

impl Host {
    pub fn port(&self) -> u16 {
        match self {
            Host::Tcp { port, .. } | Host::Unix { port, .. } => *port,
        }
    }

    /// The `host` value as written (name or socket directory).
    pub fn host_str(&self) -> String {
        match self {
            Host::Tcp { name, .. } => name.clone(),
            Host::Unix { dir, .. } => dir.display().to_string(),
        }
    }

    /// The socket path of a unix-socket host.
    pub fn socket_path(&self) -> Option<PathBuf> {
        match self {
            Host::Unix { dir, port } => Some(dir.join(format!(".s.PGSQL.{port}"))),
            Host::Tcp { .. } => None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp { name, port } if name.contains(':') => write!(f, "[{name}]:{port}"),
            Host::Tcp { name, port } => write!(f, "{name}:{port}"),
            Host::Unix { .. } => write!(f, "{}", self.socket_path().unwrap_or_default().display()),
        }
    }
}

/// Resolved connection settings for a physical replication connection.
///
/// `Debug` never shows the password; `Display` prints a redacted libpq-style summary fit
/// for logs.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnInfo {
    /// Servers to try, in order.
    pub hosts: Vec<Host>,
    pub user: String,
    pub password: Option<Password>,
    /// Only used to match password-file lines (`replication` when unset); a physical
    /// walsender is not connected to a database.
    pub dbname: Option<String>,
    pub application_name: Option<String>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<RootCert>,
    /// Per host attempt (TCP connect, TLS, authentication). None waits forever.
    pub connect_timeout: Option<Duration>,
    pub target_session_attrs: TargetSessionAttrs,
    /// Password file consulted when no password is given (PGPASSFILE, else ~/.pgpass).
    pub passfile: Option<PathBuf>,
    /// `application_name` sent when none is set.
    pub fallback_application_name: String,
    /// A physical-replication walsender (the default), or an ordinary SQL session in
    /// `dbname` (for pg_backup_start/stop). See [`ConnInfo::sql_session`].
    pub replication: bool,
}

/// The keys this parser understands (libpq names).
const KNOWN_KEYS: &[&str] = &[
    "host",
    "port",
    "user",
    "password",
    "dbname",
    "application_name",
    "fallback_application_name",
    "sslmode",
    "sslrootcert",
    "connect_timeout",
    "target_session_attrs",
    "passfile",
];

/// Environment variable for each key, as libpq reads them.
const ENV_DEFAULTS: &[(&str, &str)] = &[
    ("host", "PGHOST"),
    ("port", "PGPORT"),
    ("user", "PGUSER"),
    ("password", "PGPASSWORD"),
    ("dbname", "PGDATABASE"),
    ("application_name", "PGAPPNAME"),
    ("sslmode", "PGSSLMODE"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("target_session_attrs", "PGTARGETSESSIONATTRS"),
    ("passfile", "PGPASSFILE"),
];

impl ConnInfo {
    /// Parse with defaults from the process environment.
    pub fn parse(s: &str) -> Result<ConnInfo> {
        Self::parse_with_env(s, |k| std::env::var(k).ok())
    }

    /// Parse with defaults from `env` (a lookup of environment variables, for tests).
    pub fn parse_with_env(s: &str, env: impl Fn(&str) -> Option<String>) -> Result<ConnInfo> {
        let trimmed = s.trim_start();
        let pairs = if trimmed.starts_with("postgresql://") || trimmed.starts_with("postgres://") {
            parse_url(trimmed)?
        } else {
            parse_key_values(s)?
        };
        let mut opts: Vec<(String, String)> = Vec::new();
        for (k, v) in pairs {
            if !KNOWN_KEYS.contains(&k.as_str()) {
                return Err(PgError::config(format!(
                    "unknown connection option \"{k}\" (supported: {})",
                    KNOWN_KEYS.join(", ")
                )));
            }
            // A later occurrence wins, as in libpq.
            opts.retain(|(ok, _)| *ok != k);
            opts.push((k, v));
        }
        let get = |key: &str| -> Option<String> {
            if let Some((_, v)) = opts.iter().find(|(k, _)| k == key) {
                return Some(v.clone());
            }
            let var = ENV_DEFAULTS.iter().find(|(k, _)| *k == key)?.1;
            env(var).filter(|v| !v.is_empty())
        };

        let hosts = build_hosts(get("host"), get("port"))?;
        let user = match get("user") {
            Some(u) if !u.is_empty() => u,
            _ => os_user_name(&env).ok_or_else(|| {
                PgError::config("no user given and the operating system user name is unknown (set user= or PGUSER)")
            })?,
        };
        let password = get("password").filter(|p| !p.is_empty()).map(Password::new);
        let dbname = get("dbname").filter(|d| !d.is_empty());
        let application_name = get("application_name").filter(|a| !a.is_empty());
        let fallback_application_name =
            get("fallback_application_name").unwrap_or_else(|| "walferry".to_owned());
        let sslmode = match get("sslmode") {
            Some(m) => m.parse()?,
            None => SslMode::default(),
        };
        let sslrootcert = get("sslrootcert").filter(|s| !s.is_empty()).map(|s| {
            if s == "system" {
                RootCert::System
            } else {
                RootCert::File(PathBuf::from(s))
            }
        });
        let connect_timeout = match get("connect_timeout") {
            None => None,
            Some(t) => {
                let secs: i64 = t.trim().parse().map_err(|_| {
                    PgError::config(format!("invalid connect_timeout \"{t}\" (whole seconds)"))
                })?;
                // libpq: 0 or negative waits forever; 1 is raised to 2.
                (secs > 0).then(|| Duration::from_secs(secs.max(2) as u64))
            }
        };
        let target_session_attrs = match get("target_session_attrs") {
            Some(t) => t.parse()?,
            None => TargetSessionAttrs::default(),
        };
        let passfile = get("passfile")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| Path::new(&h).join(".pgpass")));
        Ok(ConnInfo {
            hosts,
            user,
            password,
            dbname,
            application_name,
            sslmode,
            sslrootcert,
            connect_timeout,
            target_session_attrs,
            passfile,
            fallback_application_name,
            replication: true,
        })
    }

    /// The same server and credentials, as an ordinary SQL session (not a walsender).
    pub fn sql_session(&self) -> ConnInfo {
        ConnInfo {
            replication: false,
            ..self.clone()
        }
    }
}

impl FromStr for ConnInfo {
    type Err = PgError;
    fn from_str(s: &str) -> Result<Self> {
        ConnInfo::parse(s)
    }
}

impl fmt::Display for ConnInfo {
    /// Redacted: `host=a,b port=5432,5432 user=u sslmode=prefer` (never the password).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<String> = self.hosts.iter().map(Host::host_str).collect();
        let ports: Vec<String> = self.hosts.iter().map(|h| h.port().to_string()).collect();
        write!(
            f,
            "host={} port={} user={} sslmode={}",
            hosts.join(","),
            ports.join(","),
            self.user,
            self.sslmode.as_str()
        )?;
        if self.password.is_some() {
            f.write_str(" password=***")?;
        }
        if self.target_session_attrs == TargetSessionAttrs::ReadWrite {
            f.write_str(" target_session_attrs=read-write")?;
        }
        Ok(())
    }
}

/// The default unix socket directory: Debian's `/var/run/postgresql` when it exists, else
/// upstream's `/tmp`.
pub fn default_socket_dir() -> PathBuf {
    let debian = Path::new("/var/run/postgresql");
    if debian.is_dir() {
        debian.to_path_buf()
    } else {
        PathBuf::from("/tmp")
    }
}

fn build_hosts(host: Option<String>, port: Option<String>) -> Result<Vec<Host>> {
    let host = host.unwrap_or_default();
    let host_list: Vec<&str> = host.split(',').collect();
    let port = port.unwrap_or_default();
    let port_list: Vec<&str> = port.split(',').collect();
    if port_list.len() != 1 && port_list.len() != host_list.len() {
        return Err(PgError::config(format!(
            "could not match {} port numbers to {} hosts",
            port_list.len(),
            host_list.len()
        )));
    }
    let mut hosts = Vec::with_capacity(host_list.len());
    for (i, h) in host_list.iter().enumerate() {
        let p = if port_list.len() == 1 {
            port_list[0]
        } else {
            port_list[i]
        };
        let p = p.trim();
        let port = if p.is_empty() {
            DEFAULT_PORT
        } else {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(PgError::config(format!("invalid port number \"{p}\""))),
            }
        };
        let h = h.trim();
        hosts.push(if h.is_empty() {
            Host::Unix {
                dir: default_socket_dir(),
                port,
            }
        } else if h.starts_with('/') {
            Host::Unix {
                dir: PathBuf::from(h),
                port,
            }
        } else {
            Host::Tcp {
                name: h.to_owned(),
                port,
            }
        });
    }
    Ok(hosts)
}

/// The OS user: $USER, $LOGNAME, else the /etc/passwd entry of our uid.
fn os_user_name(env: &impl Fn(&str) -> Option<String>) -> Option<String> {
    if let Some(u) = env("USER")
        .or_else(|| env("LOGNAME"))
        .filter(|u| !u.is_empty())
    {
        return Some(u);
    }
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .to_owned();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut it = l.split(':');
        let name = it.next()?;
        let _pw = it.next()?;
        (it.next()? == uid).then(|| name.to_owned())
    })
}

/// libpq `key=value` syntax: whitespace-separated pairs, optional spaces around `=`,
/// single-quoted values with `\'` and `\\` escapes, backslash escapes in bare values.
fn parse_key_values(s: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = it.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            it.next();
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.next() != Some('=') {
            return Err(PgError::config(format!(
                "missing \"=\" after \"{key}\" in connection info string"
            )));
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        let mut value = String::new();
        if it.peek() == Some(&'\'') {
            it.next();
            loop {
                match it.next() {
                    None => {
                        return Err(PgError::config(
                            "unterminated quoted string in connection info string",
                        ))
                    }
                    Some('\\') => match it.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(PgError::config(
                                "unterminated quoted string in connection info string",
                            ))
                        }
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = it.peek() {
                if c.is_whitespace() {
                    break;
                }
                it.next();
                if c == '\\' {
                    if let Some(n) = it.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// `postgres[ql]://[user[:password]@][host][:port][,host[:port]...][/dbname][?k=v&...]`,
/// percent-encoded; IPv6 hosts in brackets; a host may be a percent-encoded socket
/// directory (`%2Fvar%2Frun%2Fpostgresql`).
fn parse_url(s: &str) -> Result<Vec<(String, String)>> {
    let rest = s
        .strip_prefix("postgresql://")
        .or_else(|| s.strip_prefix("postgres://"))
        .ok_or_else(|| PgError::config("connection URL must start with postgresql://"))?;
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match main.find('/') {
        Some(i) => (&main[..i], Some(&main[i + 1..])),
        None => (main, None),
    };
    let mut out = Vec::new();
    let hostspec = match authority.rfind('@') {
        Some(i) => {
            let userinfo = &authority[..i];
            let (user, pw) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                out.push(("user".to_owned(), percent_decode(user)?));
            }
            if let Some(p) = pw {
                out.push(("password".to_owned(), percent_decode(p)?));
            }
            &authority[i + 1..]
        }
        None => authority,
    };
    if !hostspec.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for part in hostspec.split(',') {
            let (h, p) = if let Some(after) = part.strip_prefix('[') {
                let end = after.find(']').ok_or_else(|| {
                    PgError::config(format!("missing \"]\" in IPv6 host address in URI: {part}"))
                })?;
                let host = &after[..end];
                let tail = &after[end + 1..];
                let port = match tail.strip_prefix(':') {
                    Some(p) => p,
                    None if tail.is_empty() => "",
                    None => {
                        return Err(PgError::config(format!(
                            "unexpected \"{tail}\" after IPv6 host address in URI"
                        )))
                    }
                };
                (host, port)
            } else {
                match part.rsplit_once(':') {
                    Some((h, p)) => (h, p),
                    None => (part, ""),
                }
            };
            hosts.push(percent_decode(h)?);
            ports.push(percent_decode(p)?);
        }
        out.push(("host".to_owned(), hosts.join(",")));
        if ports.iter().any(|p| !p.is_empty()) {
            out.push(("port".to_owned(), ports.join(",")));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.push(("dbname".to_owned(), percent_decode(db)?));
    }
    if let Some(q) = query {
        for kv in q.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                PgError::config(format!(
                    "missing key/value separator \"=\" in URI query parameter: \"{kv}\""
                ))
            })?;
            let k = percent_decode(k)?;
            let v = percent_decode(v)?;
            // libpq maps ssl=true to sslmode=require.
            if k == "ssl" && v == "true" {
                out.push(("sslmode".to_owned(), "require".to_owned()));
            } else {
                out.push((k, v));
            }
        }
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    PgError::config(format!("invalid percent-encoded token in URI: \"{s}\""))
                })?;
            if hex == 0 {
                return Err(PgError::config(format!(
                    "forbidden value %00 in percent-encoded value: \"{s}\""
                )));
            }
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| PgError::config(format!("percent-encoded value is not UTF-8: \"{s}\"")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn parse(s: &str) -> ConnInfo {
        ConnInfo::parse_with_env(s, env_of(&[("USER", "osuser"), ("HOME", "/home/x")])).unwrap()
    }

    #[test]
    fn key_value_basic() {
        let c = parse("host=db.example port=6543 user=alice password=s3cret dbname=app application_name=wf sslmode=verify-full sslrootcert=/etc/ca.pem connect_timeout=7 target_session_attrs=read-write");
        assert_eq!(
            c.hosts,
            vec![Host::Tcp {
                name: "db.example".into(),
                port: 6543
            }]
        );
        assert_eq!(c.user, "alice");
        assert_eq!(c.password.as_ref().unwrap().expose(), "s3cret");
        assert_eq!(c.dbname.as_deref(), Some("app"));
        assert_eq!(c.application_name.as_deref(), Some("wf"));
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sslrootcert, Some(RootCert::File("/etc/ca.pem".into())));
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(7)));
        assert_eq!(c.target_session_attrs, TargetSessionAttrs::ReadWrite);
        assert_eq!(c.passfile, Some(PathBuf::from("/home/x/.pgpass")));
    }

    #[test]
    fn key_value_quoting_and_spaces() {
        let c = parse(r"host = 'h' password='' user='a b\'c\\d' dbname=x\ y");
        assert_eq!(c.hosts[0].host_str(), "h");
        // An empty password counts as none (libpq then consults the password file).
        assert!(c.password.is_none());
        assert_eq!(c.user, r"a b'c\d");
        assert_eq!(c.dbname.as_deref(), Some("x y"));
        let e = ConnInfo::parse_with_env("host='unterminated", env_of(&[("USER", "u")]));
        assert!(matches!(e, Err(PgError::Config { .. })));
        let e = ConnInfo::parse_with_env("host", env_of(&[("USER", "u")]));
        assert!(matches!(e, Err(PgError::Config { .. })));
    }

    #[test]
    fn host_lists_and_ports() {
        let c = parse("host=a,b,/run/pg port=5432,5433,5434");
        assert_eq!(
            c.hosts,
            vec![
                Host::Tcp {
                    name: "a".into(),
                    port: 5432
                },
                Host::Tcp {
                    name: "b".into(),
                    port: 5433
                },
                Host::Unix {
                    dir: "/run/pg".into(),
                    port: 5434
                },
            ]
        );
        assert_eq!(
            c.hosts[2].socket_path().unwrap(),
            PathBuf::from("/run/pg/.s.PGSQL.5434")
        );
        let c = parse("host=a,b port=6000");
        assert!(c.hosts.iter().all(|h| h.port() == 6000));
        let e = ConnInfo::parse_with_env("host=a,b,c port=1,2", env_of(&[("USER", "u")]));
        assert!(matches!(e, Err(PgError::Config { .. })));
        let e = ConnInfo::parse_with_env("port=0", env_of(&[("USER", "u")]));
        assert!(matches!(e, Err(PgError::Config { .. })));
    }

    #[test]
    fn urls() {
        let c = parse("postgresql://bob:p%40ss@h1:5433,[::1]:5434,h3/mydb?sslmode=require&application_name=x%20y&target_session_attrs=read-write");
        assert_eq!(c.user, "bob");
        assert_eq!(c.password.as_ref().unwrap().expose(), "p@ss");
        assert_eq!(
            c.hosts,
            vec![
                Host::Tcp {
                    name: "h1".into(),
                    port: 5433
                },
                Host::Tcp {
                    name: "::1".into(),
                    port: 5434
                },
                Host::Tcp {
                    name: "h3".into(),
                    port: 5432
                },
            ]
        );
        assert_eq!(c.hosts[1].to_string(), "[::1]:5434");
        assert_eq!(c.dbname.as_deref(), Some("mydb"));
        assert_eq!(c.sslmode, SslMode::Require);
        assert_eq!(c.application_name.as_deref(), Some("x y"));
        assert_eq!(c.target_session_attrs, TargetSessionAttrs::ReadWrite);

        let c = parse("postgres://%2Fvar%2Frun%2Fpg:5999/db");
        assert_eq!(
            c.hosts,
            vec![Host::Unix {
                dir: "/var/run/pg".into(),
                port: 5999
            }]
        );
        let c = parse("postgresql:///db?host=/tmp/sock&port=7000&user=u");
        assert_eq!(
            c.hosts,
            vec![Host::Unix {
                dir: "/tmp/sock".into(),
                port: 7000
            }]
        );
        assert_eq!(c.user, "u");
        let c = parse("postgresql://h?ssl=true");
        assert_eq!(c.sslmode, SslMode::Require);
        let e = ConnInfo::parse_with_env("postgresql://h/db?bogus=1", env_of(&[("USER", "u")]));
        assert!(matches!(e, Err(PgError::Config { .. })));
        let e = ConnInfo::parse_with_env("postgresql://h/%zz", env_of(&[("USER", "u")]));
        assert!(matches!(e, Err(PgError::Config { .. })));
    }

    #[test]
    fn environment_defaults() {
        let env = env_of(&[
            ("PGHOST", "envhost"),
            ("PGPORT", "7777"),
            ("PGUSER", "envuser"),
            ("PGPASSWORD", "envpw"),
            ("PGDATABASE", "envdb"),
            ("PGSSLMODE", "require"),
            ("PGSSLROOTCERT", "system"),
            ("PGPASSFILE", "/tmp/pgpass"),
            ("USER", "osuser"),
        ]);
        let c = ConnInfo::parse_with_env("", &env).unwrap();
        assert_eq!(
            c.hosts,
            vec![Host::Tcp {
                name: "envhost".into(),
                port: 7777
            }]
        );
        assert_eq!(c.user, "envuser");
        assert_eq!(c.password.as_ref().unwrap().expose(), "envpw");
        assert_eq!(c.dbname.as_deref(), Some("envdb"));
        assert_eq!(c.sslmode, SslMode::Require);
        assert_eq!(c.sslrootcert, Some(RootCert::System));
        assert_eq!(c.passfile, Some(PathBuf::from("/tmp/pgpass")));
        // The string wins over the environment.
        let c = ConnInfo::parse_with_env("user=explicit sslmode=disable", &env).unwrap();
        assert_eq!(c.user, "explicit");
        assert_eq!(c.sslmode, SslMode::Disable);
        // Nothing at all: OS user, default socket dir, port 5432, prefer.
        let c = ConnInfo::parse_with_env("", env_of(&[("USER", "osuser")])).unwrap();
        assert_eq!(c.user, "osuser");
        assert_eq!(c.sslmode, SslMode::Prefer);
        assert!(matches!(c.hosts[0], Host::Unix { port: 5432, .. }));
        assert_eq!(c.connect_timeout, None);
    }

    #[test]
    fn sslmodes_and_timeouts() {
        for (s, m) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            assert_eq!(parse(&format!("sslmode={s}")).sslmode, m);
            assert_eq!(m.as_str(), s);
        }
        assert!(ConnInfo::parse_with_env("sslmode=bogus", env_of(&[("USER", "u")])).is_err());
        assert_eq!(
            parse("connect_timeout=1").connect_timeout,
            Some(Duration::from_secs(2))
        );
        assert_eq!(parse("connect_timeout=0").connect_timeout, None);
        assert!(ConnInfo::parse_with_env("connect_timeout=x", env_of(&[("USER", "u")])).is_err());
        assert!(
            ConnInfo::parse_with_env("target_session_attrs=standby", env_of(&[("USER", "u")]))
                .is_err()
        );
    }

    #[test]
    fn password_never_in_debug_or_display() {
        let c = parse("host=h user=u password=TopSecret123");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("TopSecret123"), "{dbg}");
        assert!(dbg.contains("***"));
        let shown = c.to_string();
        assert!(!shown.contains("TopSecret123"), "{shown}");
        assert!(shown.contains("password=***"));
        let c = parse("postgresql://u:TopSecret123@h/db");
        assert!(!format!("{c:?} {c}").contains("TopSecret123"));
    }
}
