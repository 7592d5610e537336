//! Opening a physical replication connection: hosts in order, TLS per sslmode, startup
//! with `replication=true`, authentication (trust, cleartext, md5, SCRAM-SHA-256[-PLUS]),
//! and the read-write check for `target_session_attrs`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UnixStream};

use super::codec::{self, Backend};
use super::conninfo::{ConnInfo, Host, Password, SslMode, TargetSessionAttrs};
use super::error::{HostAttempt, PgError, Result};
use super::io::{MessageIo, Socket};
use super::{pgpass, tls};

/// Where the connection is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Ready for a command.
    Idle,
    /// A command is in flight (or was cancelled mid-way: then the connection is unusable).
    Busy,
    /// Inside START_REPLICATION's CopyBoth.
    Streaming,
    /// The session is over (FATAL, closed, protocol error).
    Broken,
}

/// A physical replication (walsender) connection, ready for replication commands.
///
/// Obtain one with [`ReplicationConnection::connect`]; the commands live in
/// `replication.rs`. One command at a time; a command future that is dropped before it
/// completes leaves the connection unusable (every later call fails with a protocol error),
/// except [`super::ReplicationStream::next`] and `send_status`, which are cancel-safe.
pub struct ReplicationConnection {
    pub(crate) io: MessageIo,
    pub(crate) state: ConnState,
    addr: String,
    params: HashMap<String, String>,
    backend_pid: Option<i32>,
    auth: Option<&'static str>,
}

impl std::fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("addr", &self.addr)
            .field("tls", &self.is_tls())
            .field("backend_pid", &self.backend_pid)
            .field("auth", &self.auth)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl ReplicationConnection {
    /// Connect to the first usable host of `info` (libpq order: each host, each of its
    /// addresses). Authentication failures stop the search (as in libpq); other failures
    /// move on to the next host. With one attempt its error is returned as is, otherwise
    /// [`PgError::AllHostsFailed`].
    pub async fn connect(info: &ConnInfo) -> Result<ReplicationConnection> {
        // Reading root certificates (maybe the whole system store) blocks: once, off the
        // async workers.
        let (mode, root) = (info.sslmode, info.sslrootcert.clone());
        let tls_config =
            tokio::task::spawn_blocking(move || tls::client_config(mode, root.as_ref()))
                .await
                .map_err(|e| PgError::config(format!("TLS setup task failed: {e}")))??;
        let mut attempts: Vec<HostAttempt> = Vec::new();
        for host in &info.hosts {
            let resolved = match info.connect_timeout {
                Some(after) => tokio::time::timeout(after, resolve(host))
                    .await
                    .unwrap_or_else(|_| {
                        Err(PgError::Timeout {
                            addr: host.to_string(),
                            after,
                        })
                    }),
                None => resolve(host).await,
            };
            let targets = match resolved {
                Ok(t) => t,
                Err(error) => {
                    attempts.push(HostAttempt {
                        addr: host.to_string(),
                        error,
                    });
                    continue;
                }
            };
            for target in targets {
                let addr = target.to_string();
                let attempt = connect_target(info, tls_config.as_ref(), host, &target);
                let result = match info.connect_timeout {
                    Some(after) => match tokio::time::timeout(after, attempt).await {
                        Ok(r) => r,
                        Err(_) => Err(PgError::Timeout {
                            addr: addr.clone(),
                            after,
                        }),
                    },
                    None => attempt.await,
                };
                match result {
                    Ok(conn) => {
                        tracing::debug!(%addr, tls = conn.is_tls(), "connected to walsender");
                        return Ok(conn);
                    }
                    Err(error) => {
                        let stop = error.is_auth();
                        tracing::debug!(%addr, "connection attempt failed: {error}");
                        attempts.push(HostAttempt { addr, error });
                        if stop {
                            return Err(collapse(attempts));
                        }
                    }
                }
            }
        }
        if attempts.is_empty() {
            return Err(PgError::config("no host to connect to"));
        }
        Err(collapse(attempts))
    }

    /// `host:port` or socket path of the server.
    pub fn server_addr(&self) -> &str {
        &self.addr
    }

    /// A ParameterStatus value the server reported (`server_version`, `in_hot_standby`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// `server_version` as a number like 150004 (from "15.4 (Debian ...)"), if reported.
    pub fn server_version_num(&self) -> Option<u32> {
        parse_server_version(self.parameter("server_version")?)
    }

    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_pid
    }

    pub fn is_tls(&self) -> bool {
        self.io.socket().is_tls()
    }

    /// How the server authenticated us: `trust` (no exchange), `password`, `md5`,
    /// `SCRAM-SHA-256` or `SCRAM-SHA-256-PLUS` (bound to the TLS server certificate).
    pub fn auth_method(&self) -> &'static str {
        self.auth.unwrap_or("trust")
    }

    /// Send Terminate and close the socket.
    pub async fn close(mut self) {
        self.io.terminate().await;
    }

    pub(crate) fn set_parameter(&mut self, name: &str, value: &str) {
        self.params.insert(name.to_owned(), value.to_owned());
    }

    /// Error unless the connection can take a command now.
    pub(crate) fn ensure_idle(&self) -> Result<()> {
        match self.state {
            ConnState::Idle => Ok(()),
            ConnState::Busy => Err(PgError::protocol(
                "the connection is in the middle of a command (a previous call was cancelled); reconnect",
            )),
            ConnState::Streaming => Err(PgError::protocol(
                "the connection is streaming WAL; finish the replication stream first",
            )),
            ConnState::Broken => Err(PgError::Closed),
        }
    }

    /// Run a replication command with the simple query protocol; all rows of all result
    /// sets (None = NULL). An ErrorResponse is returned once the server is ready again.
    pub(crate) async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<Bytes>>>> {
        self.ensure_idle()?;
        self.state = ConnState::Busy;
        frontend::query(sql, self.io.out()).map_err(|e| PgError::config(format!("{e}")))?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.recv().await? {
                Backend::Message(Message::RowDescription(_))
                | Backend::Message(Message::CommandComplete(_))
                | Backend::Message(Message::EmptyQueryResponse) => {}
                Backend::Message(Message::DataRow(row)) => rows.push(codec::row_values(&row)?),
                Backend::Message(Message::ErrorResponse(body)) => {
                    let e = codec::server_error(&body);
                    if e.is_fatal() {
                        self.state = ConnState::Broken;
                        return Err(e.into());
                    }
                    error = Some(e);
                }
                Backend::Message(Message::ReadyForQuery(_)) => {
                    self.state = ConnState::Idle;
                    return match error {
                        Some(e) => Err(e.into()),
                        None => Ok(rows),
                    };
                }
                other => {
                    self.state = ConnState::Broken;
                    return Err(unexpected(&other, sql));
                }
            }
        }
    }

    /// Flush queued bytes; a failure breaks the connection.
    pub(crate) async fn flush(&mut self) -> Result<()> {
        let r = self.io.flush().await;
        if r.is_err() {
            self.state = ConnState::Broken;
        }
        r
    }

    /// The next message, with NoticeResponse logged and ParameterStatus recorded; a
    /// failure breaks the connection. Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Result<Backend> {
        loop {
            let m = match self.io.recv().await {
                Ok(m) => m,
                Err(e) => {
                    self.state = ConnState::Broken;
                    return Err(e);
                }
            };
            match m {
                Backend::Message(Message::NoticeResponse(body)) => {
                    let mut fields = Vec::new();
                    let mut it = body.fields();
                    while let Ok(Some(f)) = it.next() {
                        fields.push((f.type_(), f.value_bytes().to_vec()));
                    }
                    let n = super::error::ServerError::from_fields(
                        fields.iter().map(|(t, v)| (*t, v.as_slice())),
                    );
                    tracing::info!(addr = %self.addr, "server notice: {n}");
                }
                Backend::Message(Message::ParameterStatus(body)) => {
                    if let (Ok(k), Ok(v)) = (body.name(), body.value()) {
                        let (k, v) = (k.to_owned(), v.to_owned());
                        self.set_parameter(&k, &v);
                    }
                }
                other => return Ok(other),
            }
        }
    }
}

/// A description of an unexpected message, for protocol errors.
pub(crate) fn unexpected(m: &Backend, during: &str) -> PgError {
    let what = match m {
        Backend::CopyBothResponse { .. } => "CopyBothResponse".to_owned(),
        Backend::Message(m) => message_name(m).to_owned(),
    };
    PgError::protocol(format!("unexpected {what} during {during}"))
}

fn message_name(m: &Message) -> &'static str {
    match m {
        Message::AuthenticationOk => "AuthenticationOk",
        Message::BackendKeyData(_) => "BackendKeyData",
        Message::CommandComplete(_) => "CommandComplete",
        Message::CopyData(_) => "CopyData",
        Message::CopyDone => "CopyDone",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::DataRow(_) => "DataRow",
        Message::EmptyQueryResponse => "EmptyQueryResponse",
        Message::ErrorResponse(_) => "ErrorResponse",
        Message::NoticeResponse(_) => "NoticeResponse",
        Message::ParameterStatus(_) => "ParameterStatus",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::RowDescription(_) => "RowDescription",
        _ => "message",
    }
}

fn collapse(mut attempts: Vec<HostAttempt>) -> PgError {
    if attempts.len() == 1 {
        if let Some(a) = attempts.pop() {
            return a.error;
        }
    }
    PgError::AllHostsFailed { attempts }
}

/// One concrete address to try.
enum Target {
    Tcp { addr: SocketAddr, name: String },
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp { addr, name } if addr.ip().to_string() == *name => write!(f, "{addr}"),
            Target::Tcp { addr, name } => write!(f, "{name} ({addr})"),
            Target::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

async fn resolve(host: &Host) -> Result<Vec<Target>> {
    match host {
        Host::Unix { .. } => Ok(vec![Target::Unix(host.socket_path().unwrap_or_default())]),
        Host::Tcp { name, port } => {
            let addrs = tokio::net::lookup_host((name.as_str(), *port))
                .await
                .map_err(|error| PgError::Connect {
                    addr: host.to_string(),
                    error,
                })?;
            Ok(addrs
                .map(|addr| Target::Tcp {
                    addr,
                    name: name.clone(),
                })
                .collect())
        }
    }
}

async fn connect_target(
    info: &ConnInfo,
    tls_config: Option<&Arc<rustls::ClientConfig>>,
    host: &Host,
    target: &Target,
) -> Result<ReplicationConnection> {
    let password = resolve_password(info, host).await;
    match connect_once(
        info,
        tls_config,
        host,
        target,
        info.sslmode,
        password.as_ref(),
    )
    .await
    {
        // libpq's prefer: a failed TLS handshake, or a server that rejects us over TLS
        // (e.g. a hostnossl pg_hba line), is retried in plaintext.
        Err(e)
            if info.sslmode == SslMode::Prefer
                && matches!(target, Target::Tcp { .. })
                && (matches!(e, PgError::Tls { .. })
                    || e.server_error().is_some_and(|s| {
                        s.code == "28000" && s.message.contains("SSL encryption")
                    })) =>
        {
            tracing::debug!(addr = %target, "TLS attempt failed ({e}); retrying without TLS");
            connect_once(
                info,
                None,
                host,
                target,
                SslMode::Disable,
                password.as_ref(),
            )
            .await
        }
        other => other,
    }
}

/// The password from the string/PGPASSWORD, else from the password file (read off the
/// async workers).
async fn resolve_password(info: &ConnInfo, host: &Host) -> Option<Password> {
    if let Some(p) = &info.password {
        return Some(p.clone());
    }
    let path = info.passfile.clone()?;
    let db = match (&info.dbname, info.replication) {
        (Some(d), _) => d.clone(),
        (None, true) => "replication".to_owned(),
        (None, false) => info.user.clone(),
    };
    let (host, user) = (host.clone(), info.user.clone());
    let shown = path.display().to_string();
    match tokio::task::spawn_blocking(move || pgpass::lookup(&path, &host, &db, &user)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            tracing::warn!(path = %shown, "could not read password file: {e}");
            None
        }
        Err(e) => {
            tracing::warn!(path = %shown, "password file lookup failed: {e}");
            None
        }
    }
}

async fn connect_once(
    info: &ConnInfo,
    tls_config: Option<&Arc<rustls::ClientConfig>>,
    host: &Host,
    target: &Target,
    sslmode: SslMode,
    password: Option<&Password>,
) -> Result<ReplicationConnection> {
    let addr = target.to_string();
    let socket = match target {
        Target::Unix(path) => {
            let s = UnixStream::connect(path)
                .await
                .map_err(|error| PgError::Connect {
                    addr: addr.clone(),
                    error,
                })?;
            // No TLS over unix sockets (libpq does the same).
            Socket::Unix(s)
        }
        Target::Tcp { addr: sa, .. } => {
            let s = TcpStream::connect(sa)
                .await
                .map_err(|error| PgError::Connect {
                    addr: addr.clone(),
                    error,
                })?;
            let _ = s.set_nodelay(true);
            match tls_config {
                Some(config) if sslmode != SslMode::Disable => {
                    negotiate_tls(s, config.clone(), host, sslmode, &addr).await?
                }
                _ => Socket::Tcp(s),
            }
        }
    };
    let mut conn = ReplicationConnection {
        io: MessageIo::new(socket),
        state: ConnState::Busy,
        addr,
        params: HashMap::new(),
        backend_pid: None,
        auth: None,
    };
    conn.startup(info, password).await?;
    if info.target_session_attrs == TargetSessionAttrs::ReadWrite && conn.is_read_only().await? {
        let addr = conn.addr.clone();
        conn.close().await;
        return Err(PgError::ReadOnly { addr });
    }
    Ok(conn)
}

async fn negotiate_tls(
    mut s: TcpStream,
    config: Arc<rustls::ClientConfig>,
    host: &Host,
    sslmode: SslMode,
    addr: &str,
) -> Result<Socket> {
    let mut req = bytes::BytesMut::new();
    frontend::ssl_request(&mut req);
    s.write_all(&req).await.map_err(PgError::Io)?;
    let mut sock = Socket::Tcp(s);
    match MessageIo::read_byte(&mut sock).await? {
        b'S' => {}
        b'N' => {
            if sslmode == SslMode::Prefer {
                return Ok(sock);
            }
            return Err(PgError::TlsRefused {
                addr: addr.to_owned(),
                sslmode: sslmode.as_str(),
            });
        }
        other => {
            return Err(PgError::protocol(format!(
                "unexpected answer '{}' to SSLRequest",
                other.escape_ascii()
            )))
        }
    }
    let Socket::Tcp(s) = sock else {
        return Err(PgError::protocol("socket changed during TLS negotiation"));
    };
    let name = tls::server_name(&host.host_str())?;
    let tls_stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, s)
        .await
        .map_err(|e| PgError::Tls {
            addr: addr.to_owned(),
            message: tls_message(&e, sslmode),
        })?;
    Ok(Socket::Tls(Box::new(tls_stream)))
}

fn tls_message(e: &std::io::Error, sslmode: SslMode) -> String {
    let base = match e.get_ref() {
        Some(inner) => inner.to_string(),
        None => e.to_string(),
    };
    match sslmode {
        SslMode::VerifyCa | SslMode::VerifyFull if base.contains("certificate") => format!(
            "{base} (sslmode={}: the server certificate must chain to sslrootcert{})",
            sslmode.as_str(),
            if sslmode == SslMode::VerifyFull {
                " and name the host"
            } else {
                ""
            }
        ),
        _ => base,
    }
}

impl ReplicationConnection {
    /// Startup message, authentication, then wait for ReadyForQuery.
    async fn startup(&mut self, info: &ConnInfo, password: Option<&Password>) -> Result<()> {
        let app = info
            .application_name
            .as_deref()
            .unwrap_or(&info.fallback_application_name);
        // A walsender for replication; otherwise an SQL session in dbname (user's by default).
        let session = if info.replication {
            ("replication", "true")
        } else {
            ("database", info.dbname.as_deref().unwrap_or(&info.user))
        };
        let params: [(&str, &str); 4] = [
            ("user", &info.user),
            session,
            ("application_name", app),
            ("client_encoding", "UTF8"),
        ];
        frontend::startup_message(params, self.io.out())
            .map_err(|e| PgError::config(format!("startup parameters: {e}")))?;
        self.flush().await?;
        self.authenticate(&info.user, password).await?;
        loop {
            match self.recv().await? {
                Backend::Message(Message::BackendKeyData(k)) => {
                    self.backend_pid = Some(k.process_id());
                }
                Backend::Message(Message::ReadyForQuery(_)) => {
                    self.state = ConnState::Idle;
                    return Ok(());
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    self.state = ConnState::Broken;
                    return Err(codec::server_error(&body).into());
                }
                other => {
                    self.state = ConnState::Broken;
                    return Err(unexpected(&other, "connection startup"));
                }
            }
        }
    }

    async fn authenticate(&mut self, user: &str, password: Option<&Password>) -> Result<()> {
        let need_password = || {
            PgError::auth(
                "the server requested password authentication but no password was supplied \
                 (set password= in the connection string, PGPASSWORD, or a line in the \
                 password file ~/.pgpass)",
            )
        };
        loop {
            match self.recv().await? {
                Backend::Message(Message::AuthenticationOk) => return Ok(()),
                Backend::Message(Message::AuthenticationCleartextPassword) => {
                    let pw = password.ok_or_else(need_password)?;
                    frontend::password_message(pw.expose().as_bytes(), self.io.out())
                        .map_err(|e| PgError::auth(format!("password message: {e}")))?;
                    self.auth = Some("password");
                    self.flush().await?;
                }
                Backend::Message(Message::AuthenticationMd5Password(body)) => {
                    let pw = password.ok_or_else(need_password)?;
                    let hash = md5_hash(user.as_bytes(), pw.expose().as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), self.io.out())
                        .map_err(|e| PgError::auth(format!("password message: {e}")))?;
                    self.auth = Some("md5");
                    self.flush().await?;
                }
                Backend::Message(Message::AuthenticationSasl(body)) => {
                    let pw = password.ok_or_else(need_password)?;
                    let mut mechanisms = Vec::new();
                    let mut it = body.mechanisms();
                    while let Some(m) = it
                        .next()
                        .map_err(|e| PgError::protocol(format!("SASL mechanisms: {e}")))?
                    {
                        mechanisms.push(m.to_owned());
                    }
                    self.scram(pw, &mechanisms).await?;
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    self.state = ConnState::Broken;
                    return Err(codec::server_error(&body).into());
                }
                Backend::Message(
                    Message::AuthenticationGss
                    | Message::AuthenticationKerberosV5
                    | Message::AuthenticationSspi
                    | Message::AuthenticationScmCredential
                    | Message::AuthenticationGssContinue(_),
                ) => {
                    return Err(PgError::auth(
                        "the server requested GSSAPI/Kerberos/SSPI authentication, which walferry \
                         does not support; use scram-sha-256 in pg_hba.conf",
                    ))
                }
                other => return Err(unexpected(&other, "authentication")),
            }
        }
    }

    async fn scram(&mut self, pw: &Password, mechanisms: &[String]) -> Result<()> {
        let has = |m: &str| mechanisms.iter().any(|x| x == m);
        let cert_hash = self
            .io
            .socket()
            .peer_certificate()
            .and_then(tls::tls_server_end_point);
        // Channel binding as libpq/tokio-postgres choose it.
        let (mechanism, binding) = match cert_hash {
            Some(hash) if has(SCRAM_SHA_256_PLUS) => {
                (SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(hash))
            }
            _ if !has(SCRAM_SHA_256) => {
                return Err(PgError::auth(format!(
                    "the server offers only SASL mechanisms {mechanisms:?}; walferry supports SCRAM-SHA-256"
                )))
            }
            Some(_) => (SCRAM_SHA_256, ChannelBinding::unrequested()),
            None if self.is_tls() && !has(SCRAM_SHA_256_PLUS) => {
                (SCRAM_SHA_256, ChannelBinding::unrequested())
            }
            None => (SCRAM_SHA_256, ChannelBinding::unsupported()),
        };
        self.auth = Some(mechanism);
        let mut scram = ScramSha256::new(pw.expose().as_bytes(), binding);
        frontend::sasl_initial_response(mechanism, scram.message(), self.io.out())
            .map_err(|e| PgError::auth(format!("SASL message: {e}")))?;
        self.flush().await?;
        match self.recv().await? {
            Backend::Message(Message::AuthenticationSaslContinue(body)) => {
                scram
                    .update(body.data())
                    .map_err(|e| PgError::auth(format!("SCRAM exchange: {e}")))?;
            }
            Backend::Message(Message::ErrorResponse(body)) => {
                self.state = ConnState::Broken;
                return Err(codec::server_error(&body).into());
            }
            other => return Err(unexpected(&other, "SCRAM authentication")),
        }
        frontend::sasl_response(scram.message(), self.io.out())
            .map_err(|e| PgError::auth(format!("SASL message: {e}")))?;
        self.flush().await?;
        match self.recv().await? {
            Backend::Message(Message::AuthenticationSaslFinal(body)) => {
                scram.finish(body.data()).map_err(|e| {
                    PgError::auth(format!(
                        "the server failed SCRAM verification (it does not know the password, \
                         or the connection was intercepted): {e}"
                    ))
                })?;
                Ok(())
            }
            Backend::Message(Message::ErrorResponse(body)) => {
                self.state = ConnState::Broken;
                Err(codec::server_error(&body).into())
            }
            other => Err(unexpected(&other, "SCRAM authentication")),
        }
    }

    /// libpq's read-write test: servers 14+ report `in_hot_standby` and
    /// `default_transaction_read_only` at startup; older ones are asked with
    /// `SHOW transaction_read_only` (a physical walsender allows SHOW).
    async fn is_read_only(&mut self) -> Result<bool> {
        let on = |v: Option<&str>| v == Some("on");
        if self.parameter("in_hot_standby").is_some()
            && self.parameter("default_transaction_read_only").is_some()
        {
            return Ok(on(self.parameter("in_hot_standby"))
                || on(self.parameter("default_transaction_read_only")));
        }
        let rows = self.simple_query("SHOW transaction_read_only").await?;
        let v = rows
            .first()
            .and_then(|r| r.first())
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned());
        Ok(v.as_deref() == Some("on"))
    }
}

/// "15.4 (Debian 15.4-1)" -> 150004; "9.6.24" -> 90624; "16devel" -> 160000.
fn parse_server_version(s: &str) -> Option<u32> {
    let v = s.split_whitespace().next()?;
    let nums: Vec<u32> = v
        .split('.')
        .map(|p| {
            let digits: String = p.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse().unwrap_or(0)
        })
        .collect();
    let major = *nums.first()?;
    if major == 0 {
        return None;
    }
    if major >= 10 {
        Some(major * 10_000 + nums.get(1).copied().unwrap_or(0))
    } else {
        Some(
            major * 10_000
                + nums.get(1).copied().unwrap_or(0) * 100
                + nums.get(2).copied().unwrap_or(0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        assert_eq!(
            parse_server_version("15.4 (Debian 15.4-1.pgdg120+1)"),
            Some(150004)
        );
        assert_eq!(parse_server_version("16devel"), Some(160000));
        assert_eq!(parse_server_version("9.6.24"), Some(90624));
        assert_eq!(parse_server_version("garbage"), None);
    }
}
