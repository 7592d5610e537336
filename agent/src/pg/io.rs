//! The socket (TCP, unix, or TLS over TCP) and a cancel-safe message reader/writer on it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::codec::{self, Backend};
use super::error::{PgError, Result};

/// A connected socket.
pub(crate) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Socket {
    /// The server's certificate (DER), when TLS is on.
    pub(crate) fn peer_certificate(&self) -> Option<&[u8]> {
        match self {
            Socket::Tls(s) => s
                .get_ref()
                .1
                .peer_certificates()?
                .first()
                .map(|c| c.as_ref()),
            _ => None,
        }
    }

    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Socket::Tls(_))
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Messages over a [`Socket`]. Both `recv` and `flush` are cancel-safe: bytes read stay in
/// `rbuf` until a whole message is there, and bytes queued in `wbuf` stay there until the
/// socket took them, so a `tokio::select!` that drops either future loses nothing.
pub(crate) struct MessageIo {
    sock: Socket,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Bytes were written since the last successful flush (TLS buffers inside rustls).
    unflushed: bool,
    /// Largest single read; decoded messages share (and pin) one read's allocation.
    read_chunk: usize,
}

/// Reads during streaming replication: WAL messages sit in the archiver's buffers, so
/// small reads keep what they pin small.
pub(crate) const READ_CHUNK: usize = 64 * 1024;
/// Reads during a base backup, where data passes straight through: fewer syscalls and
/// wakeups per gigabyte.
pub(crate) const BULK_READ_CHUNK: usize = 512 * 1024;

impl MessageIo {
    pub(crate) fn new(sock: Socket) -> Self {
        MessageIo {
            sock,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(1024),
            unflushed: false,
            read_chunk: READ_CHUNK,
        }
    }

    pub(crate) fn set_read_chunk(&mut self, bytes: usize) {
        self.read_chunk = bytes.max(8 * 1024);
    }

    pub(crate) fn socket(&self) -> &Socket {
        &self.sock
    }

    /// The buffer to encode outgoing messages into; [`MessageIo::flush`] sends it.
    pub(crate) fn out(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// The next backend message. Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Result<Backend> {
        loop {
            if let Some(m) = codec::decode(&mut self.rbuf)? {
                return Ok(m);
            }
            let want = codec::bytes_needed(&self.rbuf).clamp(8 * 1024, self.read_chunk);
            self.rbuf.reserve(want);
            match self.sock.read_buf(&mut self.rbuf).await {
                Ok(0) => return Err(PgError::Closed),
                Ok(_) => {}
                Err(e) => return Err(io_error(e)),
            }
        }
    }

    /// Send everything queued. Cancel-safe: what was not written stays queued.
    pub(crate) async fn flush(&mut self) -> Result<()> {
        while !self.wbuf.is_empty() {
            self.unflushed = true;
            match self.sock.write_buf(&mut self.wbuf).await {
                Ok(0) => return Err(PgError::Closed),
                Ok(_) => {}
                Err(e) => return Err(io_error(e)),
            }
        }
        if self.unflushed {
            self.sock.flush().await.map_err(io_error)?;
            self.unflushed = false;
        }
        Ok(())
    }

    /// Read exactly one byte (the SSLRequest answer), nothing buffered beyond it.
    pub(crate) async fn read_byte(sock: &mut Socket) -> Result<u8> {
        let mut b = [0u8; 1];
        match sock.read_exact(&mut b).await {
            Ok(_) => Ok(b[0]),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(PgError::Closed),
            Err(e) => Err(io_error(e)),
        }
    }

    /// Best-effort close: send Terminate and shut the socket down.
    pub(crate) async fn terminate(&mut self) {
        postgres_protocol::message::frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.sock.shutdown().await;
    }
}

fn io_error(e: io::Error) -> PgError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => PgError::Closed,
        _ => PgError::Io(e),
    }
}
