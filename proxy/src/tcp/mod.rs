//! Opaque TCP: connections carried as bytes, never parsed.
//!
//! Which connections come here is decided once per connection by
//! [`crate::intercept`] and [`crate::serve`]:
//! - outbound pass-through: the app's redirected connection to a
//!   destination outside the mesh goes to that destination as it is;
//! - outbound to the mesh: a redirected connection to a mesh service on a
//!   port marked opaque (or one that does not speak HTTP) goes to one of its
//!   endpoints, over mTLS with the [`header`] when both sides have an
//!   identity (`outbound`);
//! - inbound: a sidecar's `tern.tcp/1` connection (header, authorization,
//!   then the app, at the pod IP), or a redirected plaintext connection to an
//!   opaque port of the app (`inbound`).
//!
//! Each connection counts in `tern_tcp_connections_total{direction, service,
//! tls, outcome}` and `tern_tcp_bytes_total{direction, service, flow}` and is
//! logged in one access-log line when it ends. `service` is the mesh service
//! (inbound: the local one), `""` for pass-through; `flow` is `in` (from the
//! client that opened it) or `out` (to that client).

pub mod header;
mod inbound;
pub use inbound::InboundApp;
mod outbound;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, Opts};
use serde::Serialize;
use tern_identity::ConnTls;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::access_log::AccessLog;
use crate::metrics::{Direction, Metrics};

/// Everything opaque connections share: metrics, the access log, and the
/// count of connections still open (a drain waits for them).
pub struct Tcp {
    connections: IntCounterVec,
    bytes: IntCounterVec,
    authz_denied: IntCounterVec,
    log: Option<AccessLog>,
    connect_timeout: Duration,
    open: Arc<Open>,
}

#[derive(Default)]
struct Open {
    count: AtomicUsize,
    idle: Notify,
}

/// Held while a connection is open.
struct Live(Arc<Open>);

impl Drop for Live {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Tcp {
    pub fn new(
        metrics: &Metrics,
        log: Option<AccessLog>,
        connect_timeout: Duration,
    ) -> Result<Arc<Self>, prometheus::Error> {
        let connections = IntCounterVec::new(
            Opts::new(
                "tern_tcp_connections_total",
                "Opaque TCP connections ended, by direction, service (\"\" for pass-through), whether the mesh hop was mTLS, and outcome (ok, error, connect_failed, connect_timeout, handshake_failed, no_endpoints, app_refused, denied, port_not_allowed, bad_header).",
            ),
            &["direction", "service", "tls", "outcome"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "tern_tcp_bytes_total",
                "Bytes carried by opaque TCP connections, by direction, service and flow (in: from the client that opened the connection, out: to it).",
            ),
            &["direction", "service", "flow"],
        )?;
        metrics.registry.register(Box::new(connections.clone()))?;
        metrics.registry.register(Box::new(bytes.clone()))?;
        Ok(Arc::new(Self {
            connections,
            bytes,
            authz_denied: metrics.authz_denied.clone(),
            log,
            connect_timeout,
            open: Arc::default(),
        }))
    }

    fn enter(&self) -> Live {
        self.open.count.fetch_add(1, Ordering::AcqRel);
        Live(Arc::clone(&self.open))
    }

    /// Resolves once no opaque connection is open (a drain waits for this).
    pub async fn drained(&self) {
        loop {
            let idle = self.open.idle.notified();
            if self.open.count.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Counts and logs a connection that has ended.
    fn finish(&self, r: &Record<'_>) {
        let tls = if r.tls.version.is_some() {
            "true"
        } else {
            "false"
        };
        let direction = r.direction.as_str();
        self.connections
            .with_label_values(&[direction, r.service, tls, r.outcome])
            .inc();
        if r.bytes_in > 0 {
            self.bytes
                .with_label_values(&[direction, r.service, "in"])
                .inc_by(r.bytes_in);
        }
        if r.bytes_out > 0 {
            self.bytes
                .with_label_values(&[direction, r.service, "out"])
                .inc_by(r.bytes_out);
        }
        if let Some(log) = &self.log {
            log.log(&Line {
                time: crate::access_log::now_rfc3339(),
                direction: r.direction,
                protocol: "tcp",
                service: r.service,
                client: r.client,
                original_dst: r.original_dst,
                upstream: r.upstream,
                peer_identity: r.tls.peer_identity.as_deref(),
                tls: r.tls.version,
                duration_ms: r.started.elapsed().as_secs_f64() * 1000.0,
                bytes_in: r.bytes_in,
                bytes_out: r.bytes_out,
                outcome: r.outcome,
                error: r.error.as_deref(),
            });
        }
    }
}

/// What one connection did, filled in as it goes.
struct Record<'a> {
    direction: Direction,
    service: &'a str,
    client: SocketAddr,
    original_dst: Option<SocketAddr>,
    upstream: Option<SocketAddr>,
    /// The mesh hop's TLS (inbound: the caller's; outbound: the endpoint's).
    tls: ConnTls,
    started: Instant,
    bytes_in: u64,
    bytes_out: u64,
    outcome: &'static str,
    error: Option<String>,
}

impl<'a> Record<'a> {
    fn new(direction: Direction, service: &'a str, client: SocketAddr) -> Self {
        Self {
            direction,
            service,
            client,
            original_dst: None,
            upstream: None,
            tls: ConnTls::plaintext(),
            started: Instant::now(),
            bytes_in: 0,
            bytes_out: 0,
            outcome: "ok",
            error: None,
        }
    }

    fn failed(&mut self, outcome: &'static str, error: impl ToString) {
        self.outcome = outcome;
        self.error = Some(error.to_string());
    }

    /// Carries bytes between `client` and `upstream` until both directions
    /// end; an EOF on one side becomes a shutdown (FIN, or TLS close_notify)
    /// on the other, so half-closed protocols work.
    async fn splice<C, U>(&mut self, client: &mut C, upstream: &mut U)
    where
        C: AsyncRead + AsyncWrite + Unpin,
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let mut counted = Counted {
            inner: client,
            read: 0,
            written: 0,
        };
        let result = tokio::io::copy_bidirectional(&mut counted, upstream).await;
        self.bytes_in = counted.read;
        self.bytes_out = counted.written;
        if let Err(e) = result {
            self.failed("error", e);
        }
    }
}

/// One access-log line per opaque connection.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    direction: Direction,
    protocol: &'static str,
    service: &'a str,
    client: SocketAddr,
    /// Where the app sent it (outbound), or the app port it was for (inbound).
    original_dst: Option<SocketAddr>,
    upstream: Option<SocketAddr>,
    peer_identity: Option<&'a str>,
    tls: Option<&'a str>,
    duration_ms: f64,
    bytes_in: u64,
    bytes_out: u64,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// Closes a client connection with a reset: the closest an accepted
/// connection can come to "connection refused".
pub(crate) fn reset(client: TcpStream) {
    let _ = client.set_zero_linger();
    drop(client);
}

/// Counts the bytes read from and written to a stream.
struct Counted<'a, S> {
    inner: &'a mut S,
    read: u64,
    written: u64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut *self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.written += n as u64;
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn splice_counts_and_passes_half_close_on() {
        let (mut app, mut client_side) = tokio::io::duplex(1024);
        let (mut upstream_side, mut server) = tokio::io::duplex(1024);
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let proxy = tokio::spawn(async move {
            let mut r = Record::new(Direction::Outbound, "", addr);
            r.splice(&mut client_side, &mut upstream_side).await;
            (r.bytes_in, r.bytes_out, r.outcome)
        });
        // The server answers only once the client has finished sending.
        app.write_all(b"ping").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        server.write_all(b"pong!").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong!");
        assert_eq!(proxy.await.unwrap(), (4, 5, "ok"));
    }
}
