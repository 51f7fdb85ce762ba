//! Accepting connections: plain async loops around hyper's server.
//!
//! Each accepted connection speaks HTTP/1.1 or HTTP/2 (h2c), detected from its
//! first bytes. Every connection is watched by one [`Drain`] handle, so a
//! drain sends GOAWAY on HTTP/2, closes idle HTTP/1.1 keep-alives and waits
//! for requests in flight. Each connection is also held to the protocol
//! limits ([`crate::config::limits`]): a listener takes at most
//! `max_connections` at once, and a connection idle too long or whose client
//! cancels too many streams ([`conn_state`]) is closed the same graceful way.
//!
//! The inbound listener may take mTLS ([`crate::identity::tls::Inbound`]):
//! the handshake runs in the connection's own task, so a slow or hostile
//! peer never holds up the accept loop, and what it established
//! ([`ConnTls`]) rides in every request's extensions, with the rest of what
//! is known about the connection ([`ConnInfo`]). A connection may also
//! turn out not to be HTTP at all ([`Mode`]): one iptables redirected to a
//! destination outside the mesh, or opaque TCP (ALPN `tern.tcp/1` from
//! another sidecar); those go to [`crate::tcp`].

pub mod bind;
pub mod conn_info;
pub mod conn_state;
pub mod fd_budget;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, IntCounterVec, IntGauge};
use tern_identity::tls::ALPN_TERN_TCP;
use tern_identity::ConnTls;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::BoxError;
use crate::config::limits::Limits;
use crate::identity::tls::{Accepted, Inbound};
use crate::intercept::{self, InboundConn, OutboundConn};
use crate::limits::hard_header_list_size;
use crate::warn_limit::WarnLimiter;
pub use conn_info::ConnInfo;
use conn_info::WithConn;
use conn_state::ConnState;

#[derive(Clone)]
pub struct ConnMetrics {
    pub open: IntGauge,
    pub accepted: IntCounter,
    /// `tern_protocol_rejections_total`, labelled here with the listener's name.
    pub rejections: IntCounterVec,
}

/// Asks every connection it watches to finish (GOAWAY, close idle
/// keep-alives) and waits for them.
#[derive(Clone, Default)]
pub struct Drain {
    signal: CancellationToken,
    tasks: TaskTracker,
}

impl Drain {
    /// Signals every connection and waits until all have closed.
    pub async fn shutdown(&self) {
        self.signal.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

pub fn server_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    // Twice the limit, so that a head over it reaches the stack to be
    // answered and counted (see crate::limits).
    let hard = hard_header_list_size(limits.max_header_list_size);
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(crate::endpoint::h1_buf_size(hard))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_frame_size(64 * 1024)
        .max_header_list_size(hard)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    b
}

/// What a listener does with each connection besides serving HTTP.
#[derive(Clone)]
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
#[derive(Clone)]
pub struct Listener<S> {
    pub name: &'static str,
    pub svc: S,
    pub metrics: ConnMetrics,
    /// With it, each connection first goes through its handshake.
    pub tls: Option<Arc<Inbound>>,
    pub mode: Mode,
    pub limits: Limits,
    /// Shared by the data listeners (see [`fd_budget`]); `None` for admin.
    pub fd_budget: Option<Arc<Semaphore>>,
}

/// Serves every connection `listener` accepts until `stop` fires; each in
/// its own task, which decides what the connection is (see [`Mode`]).
pub async fn accept_loop<S, B>(
    listener: TcpListener,
    l: Listener<S>,
    drain: &Drain,
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
    let slots = Arc::new(Semaphore::new(l.limits.max_connections));
    let ctx = Arc::new(Ctx {
        builder: server_builder(&l.limits),
        drain: drain.signal.clone(),
        warn: WarnLimiter::default(),
        l,
    });
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    ctx.reject("accept_error");
                    if let Some(suppressed) = ctx.warn.allow() {
                        tracing::warn!(listener = name, error = %e, suppressed, "accept failed");
                    }
                    // Usually out of file descriptors: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Refused as cheaply as possible: closed before any read.
            ctx.reject("max_connections");
            drop(stream);
            continue;
        };
        let fd_slot = match &ctx.l.fd_budget {
            None => None,
            Some(budget) => match Arc::clone(budget).try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    ctx.reject("fd_reserve");
                    drop(stream);
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        accepted.inc();
        open.inc();
        let ctx = Arc::clone(&ctx);
        let open = open.clone();
        drain.tasks.spawn(async move {
            ctx.connection(stream, peer).await;
            open.dec();
            drop((slot, fd_slot));
        });
    }
    tracing::debug!(listener = name, "stopped accepting");
}

struct Ctx<S> {
    builder: auto::Builder<TokioExecutor>,
    drain: CancellationToken,
    warn: WarnLimiter,
    l: Listener<S>,
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
    /// Every path but serving HTTP is boxed: the task of each open connection
    /// is as large as its future, so the handshake's and opaque TCP's states
    /// must not size every idle HTTP/2 connection.
    async fn connection(&self, stream: TcpStream, peer: SocketAddr) {
        let name = self.l.name;
        let Ok(local) = stream.local_addr() else {
            return; // the connection is already gone
        };
        let mut info = ConnInfo::new(peer, local);
        match &self.l.mode {
            Mode::Outbound(out) => {
                if let Some(dst) = intercept::original_dst(&stream) {
                    match Box::pin(out.classify(&stream, dst)).await {
                        OutboundConn::Http(dest) => info.dest = Some(dest),
                        OutboundConn::Mesh { target, pinned } => {
                            let tcp = out.tcp.to_mesh(stream, peer, dst, target, pinned);
                            return Box::pin(tcp).await;
                        }
                        OutboundConn::Passthrough => {
                            return Box::pin(out.tcp.passthrough(stream, peer, dst)).await
                        }
                        OutboundConn::Unanswered => {
                            if intercept::detect(&stream).await != intercept::Protocol::Http {
                                tracing::warn!(%peer, %dst, "no answer from the control plane about the destination; connection reset");
                                return crate::tcp::reset(stream);
                            }
                            let waited = out.on_demand.as_ref().map(|o| o.lookup_timeout());
                            info.unanswered = Some(crate::on_demand::Unanswered {
                                destination: dst.to_string(),
                                waited: waited.unwrap_or_default(),
                            });
                        }
                    }
                }
            }
            Mode::Inbound(inb) => {
                if let Some(dst) = inb.redirected(&stream) {
                    match Box::pin(inb.classify(&stream, dst)).await {
                        InboundConn::Http(dest) => info.dest = Some(dest),
                        InboundConn::Opaque => {
                            return Box::pin(inb.tcp.to_app(stream, peer, inb.app(dst))).await
                        }
                        InboundConn::Refused => {
                            inb.ports.refuse(peer, dst.port(), "redirected connection");
                            return crate::tcp::reset(stream);
                        }
                    }
                }
            }
            Mode::Http => {}
        }
        let Some(tls) = &self.l.tls else {
            return self.http(stream, info).await;
        };
        match Box::pin(tls.accept(stream)).await {
            Err(e) => {
                if e.reason == "timeout" {
                    self.reject("handshake_timeout");
                }
                if let Some(suppressed) = self.warn.allow() {
                    tracing::warn!(listener = name, %peer, reason = e.reason, detail = %e.detail, suppressed, "refused connection");
                }
            }
            Ok(Accepted::Plain(stream)) => {
                info.tls = Some(ConnTls::plaintext());
                self.http(stream, info).await
            }
            Ok(Accepted::Tls(stream, conn_tls)) => {
                let opaque = stream.get_ref().1.alpn_protocol() == Some(ALPN_TERN_TCP);
                if let (true, Mode::Inbound(inb)) = (opaque, &self.l.mode) {
                    let tcp = inb.tcp.from_mesh(stream, peer, conn_tls, inb.app(local));
                    return Box::pin(tcp).await;
                }
                info.tls = Some(conn_tls);
                self.http(stream, info).await
            }
        }
    }

    fn reject(&self, reason: &str) {
        self.l
            .metrics
            .rejections
            .with_label_values(&[self.l.name, reason])
            .inc();
    }

    /// Serves HTTP until the client is done, the proxy drains, or the
    /// connection's limits close it (GOAWAY, then requests in flight finish).
    async fn http<I>(&self, io: I, info: ConnInfo)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let peer = info.peer;
        let state = ConnState::new(self.l.limits);
        let svc = WithConn {
            inner: self.l.svc.clone(),
            info: Arc::new(info),
            state: Arc::clone(&state),
        };
        let conn = self
            .builder
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc))
            .into_owned();
        tokio::pin!(conn);
        let mut closing = false;
        let result = loop {
            tokio::select! {
                r = conn.as_mut() => break r,
                _ = self.drain.cancelled(), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                trouble = state.trouble(), if !closing => {
                    closing = true;
                    self.reject(trouble.reason());
                    tracing::debug!(listener = self.l.name, %peer, reason = trouble.reason(), "closing connection");
                    conn.as_mut().graceful_shutdown();
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(listener = self.l.name, %peer, error = %e, "connection ended with error");
        }
    }
}
