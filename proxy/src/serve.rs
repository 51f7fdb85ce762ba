//! Accepting connections: plain async loops around hyper's server.
//!
//! Each accepted connection speaks HTTP/1.1 or HTTP/2 (h2c), detected from its
//! first bytes. Every connection is watched by one graceful-shutdown handle,
//! so a drain sends GOAWAY on HTTP/2, closes idle HTTP/1.1 keep-alives and
//! waits for requests in flight.
//!
//! The inbound listener may take mTLS ([`crate::identity::tls::Inbound`]):
//! the handshake runs in the connection's own task, so a slow or hostile
//! peer never holds up the accept loop, and what it established
//! ([`ConnTls`]) rides in every request's extensions. A connection may also
//! turn out not to be HTTP at all ([`Mode`]): one iptables redirected to a
//! destination outside the mesh, or opaque TCP (ALPN `tern.tcp/1` from
//! another sidecar); those go to [`crate::tcp`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, IntGauge};
use tern_identity::tls::ALPN_TERN_TCP;
use tern_identity::ConnTls;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::body::BoxError;
use crate::identity::tls::{Accepted, Inbound};
use crate::intercept::{self, InboundConn, OutboundConn};
use crate::router::Destination;

pub struct ConnMetrics {
    pub open: IntGauge,
    pub accepted: IntCounter,
}

pub fn server_builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_frame_size(64 * 1024)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    b
}

/// What a listener does with each connection besides serving HTTP.
pub enum Mode {
    /// Every connection is HTTP (admin, explicit upstream ports).
    Http,
    /// The generic outbound port: connections iptables redirected here are
    /// routed by their original destination ([`crate::intercept`]).
    Outbound(Arc<intercept::Outbound>),
    /// The inbound port: opaque TCP from other sidecars, and redirected
    /// connections with transparent inbound.
    Inbound(Arc<intercept::Inbound>),
}

/// One listener: its name (logs), its HTTP stack, and how it treats connections.
pub struct Listener<S> {
    pub name: &'static str,
    pub svc: S,
    pub metrics: ConnMetrics,
    /// With it, each connection first goes through its handshake.
    pub tls: Option<Arc<Inbound>>,
    pub mode: Mode,
}

/// Serves every connection `listener` accepts until `stop` fires; each in
/// its own task, which decides what the connection is (see [`Mode`]).
pub async fn accept_loop<S, B>(
    listener: TcpListener,
    l: Listener<S>,
    graceful: &GracefulShutdown,
    stop: CancellationToken,
) where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let name = l.name;
    let open = l.metrics.open.clone();
    let accepted = l.metrics.accepted.clone();
    let ctx = Arc::new(Ctx {
        builder: server_builder(),
        l,
    });
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        accepted.inc();
        open.inc();
        let ctx = Arc::clone(&ctx);
        let watcher = graceful.watcher();
        let open = open.clone();
        tokio::spawn(async move {
            ctx.connection(watcher, stream, peer).await;
            open.dec();
        });
    }
    tracing::debug!(listener = name, "stopped accepting");
}

struct Ctx<S> {
    builder: auto::Builder<TokioExecutor>,
    l: Listener<S>,
}

/// What the HTTP stack learns about its connection: the handshake's result
/// and, for an intercepted one, where it was going.
#[derive(Clone, Default)]
struct ConnInfo {
    tls: Option<ConnTls>,
    dest: Option<Destination>,
}

impl<S, B> Ctx<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    async fn connection(&self, watcher: Watcher, stream: TcpStream, peer: SocketAddr) {
        let name = self.l.name;
        let mut info = ConnInfo::default();
        match &self.l.mode {
            Mode::Outbound(out) => {
                if let Some(dst) = intercept::original_dst(&stream) {
                    match out.classify(&stream, dst).await {
                        OutboundConn::Http(dest) => info.dest = Some(dest),
                        OutboundConn::Mesh { target, pinned } => {
                            return out.tcp.to_mesh(stream, peer, dst, target, pinned).await
                        }
                        OutboundConn::Passthrough => {
                            return out.tcp.passthrough(stream, peer, dst).await
                        }
                    }
                }
            }
            Mode::Inbound(inb) => {
                if let Some(dst) = inb.redirected(&stream) {
                    match inb.classify(&stream, dst).await {
                        InboundConn::Http(dest) => info.dest = Some(dest),
                        InboundConn::Opaque => {
                            return inb.tcp.to_app(stream, peer, dst.port(), inb.app()).await
                        }
                        InboundConn::Refused => {
                            let why = "a redirected connection to one of the sidecar's ports";
                            tracing::warn!(listener = name, %peer, %dst, "refused {why}");
                            return;
                        }
                    }
                }
            }
            Mode::Http => {}
        }
        let Some(tls) = &self.l.tls else {
            return self.http(watcher, stream, peer, info).await;
        };
        match tls.accept(stream).await {
            Err(e) => {
                tracing::warn!(listener = name, %peer, reason = e.reason, detail = %e.detail, "refused connection");
            }
            Ok(Accepted::Plain(stream)) => {
                info.tls = Some(ConnTls::plaintext());
                self.http(watcher, stream, peer, info).await
            }
            Ok(Accepted::Tls(stream, conn_tls)) => {
                let opaque = stream.get_ref().1.alpn_protocol() == Some(ALPN_TERN_TCP);
                if let (true, Mode::Inbound(inb)) = (opaque, &self.l.mode) {
                    return inb.tcp.from_mesh(stream, peer, conn_tls, inb.app()).await;
                }
                info.tls = Some(conn_tls);
                self.http(watcher, stream, peer, info).await
            }
        }
    }

    async fn http<I>(&self, watcher: Watcher, io: I, peer: SocketAddr, info: ConnInfo)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let svc = WithConn {
            inner: self.l.svc.clone(),
            info,
        };
        let conn = self
            .builder
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc))
            .into_owned();
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(listener = self.l.name, %peer, error = %e, "connection ended with error");
        }
    }
}

/// Puts what is known about the connection into each request.
#[derive(Clone)]
struct WithConn<S> {
    inner: S,
    info: ConnInfo,
}

impl<S> tower::Service<Request<Incoming>> for WithConn<S>
where
    S: tower::Service<Request<Incoming>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        if let Some(tls) = &self.info.tls {
            req.extensions_mut().insert(tls.clone());
        }
        if let Some(dest) = &self.info.dest {
            req.extensions_mut().insert(dest.clone());
        }
        self.inner.call(req)
    }
}
