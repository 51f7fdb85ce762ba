//! A client for one endpoint: the last hop of every stack.
//!
//! HTTP/2 requests share one multiplexed connection per endpoint, made on first
//! use and remade when it closes or after a burst (`h2_pool`); HTTP/1.1
//! requests take an idle keep-alive connection from a small pool, or open one. The request keeps the protocol
//! its caller spoke. Dropping the client (the endpoint left discovery) lets its
//! connections close once the requests in flight on them finish.
//!
//! An endpoint that discovery gives an identity is dialed with mTLS and must
//! present that identity. Such a connection takes no new requests once either
//! side's certificate has expired; the next request dials afresh, with the
//! renewed certificates.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{header, uri, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::{IntCounter, IntGauge};
use tern_backoff::ExpBackoff;
use tokio::net::TcpStream;

use crate::balance::Load;
use crate::body::{Body, Guarded};
use crate::config::limits::ClientLimits;
use crate::discovery::{Endpoint, Labels, TargetPorts};
use crate::errors::ProxyError;
use crate::identity::tls::ClientIo;
use crate::identity::{Alpn, Identity};
use crate::limits::{hard_header_list_size, header_list_size, CheckedTrailers};

mod h2_pool;
mod hop;

use h2_pool::{H2Pool, Pooled, StreamGuard};
pub use hop::h1_buf_size;
use hop::{origin_form, strip_hop_by_hop};

/// Idle HTTP/1.1 connections kept per endpoint; more are closed when freed.
const MAX_IDLE_H1: usize = 32;

pub struct EndpointClient {
    service: Arc<str>,
    addr: SocketAddr,
    endpoint: Endpoint,
    pub load: Load,
    limits: ClientLimits,
    h2: H2Pool,
    /// Serialises HTTP/2 connects so a burst of first requests opens one connection.
    h2_connecting: tokio::sync::Mutex<()>,
    h1_idle: Mutex<Vec<Conn<http1::SendRequest<Body>>>>,
    /// Set when the endpoint has an identity and this sidecar has one too.
    tls: Option<Arc<Identity>>,
    open_connections: IntGauge,
    oversized: IntCounter,
    pub accrual: crate::accrual::Accrual,
    /// Set while connecting keeps failing: the balancer then prefers other
    /// endpoints, without waiting for failure accrual to eject this one.
    connect_backoff_until: AtomicU64,
    connect_failures: AtomicU32,
}

/// A connection's sender, and when it must stop taking requests.
struct Conn<T> {
    tx: T,
    retire_at: Option<SystemTime>,
}

impl<T> Conn<T> {
    fn retired(&self) -> bool {
        self.retire_at.is_some_and(|t| SystemTime::now() >= t)
    }
}

impl EndpointClient {
    pub fn new(
        service: Arc<str>,
        endpoint: Endpoint,
        limits: ClientLimits,
        open_connections: IntGauge,
        oversized: IntCounter,
        identity: Option<&Arc<Identity>>,
    ) -> Self {
        let tls = endpoint.identity.as_ref().and(identity).cloned();
        Self {
            tls,
            service,
            addr: endpoint.addr,
            endpoint,
            load: Load::default(),
            limits,
            h2: H2Pool::default(),
            h2_connecting: tokio::sync::Mutex::new(()),
            h1_idle: Mutex::new(Vec::new()),
            open_connections,
            oversized,
            accrual: crate::accrual::Accrual::default(),
            connect_backoff_until: AtomicU64::new(0),
            connect_failures: AtomicU32::new(0),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn labels(&self) -> &Labels {
        &self.endpoint.labels
    }

    pub fn target_ports(&self) -> &TargetPorts {
        &self.endpoint.target_ports
    }

    /// The port this endpoint's app serves the Service port `port` on: what
    /// a caller that dialed `port` on the service's virtual IP names to it.
    pub fn target_port(&self, port: u16) -> u16 {
        self.endpoint.target_port(port)
    }

    pub fn identity(&self) -> Option<&str> {
        self.endpoint.identity.as_deref()
    }

    /// Whether requests to this endpoint travel over mTLS.
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// What the connection to this endpoint establishes, for metrics and logs.
    pub fn conn_tls(&self) -> tern_identity::ConnTls {
        match &self.tls {
            Some(_) => tern_identity::ConnTls {
                version: Some("TLSv1.3"),
                peer_identity: self.endpoint.identity.clone(),
            },
            None => tern_identity::ConnTls::plaintext(),
        }
    }

    /// Whether the last connection attempts failed and their backoff is still running.
    pub fn connect_failing(&self, now_ms: u64) -> bool {
        now_ms < self.connect_backoff_until.load(Ordering::Relaxed)
    }

    fn connect_failed(&self) {
        // 100ms, 200ms, ... 6.4s: long enough to stop hammering a dead
        // endpoint, short enough to notice its return quickly.
        const BACKOFF: ExpBackoff =
            ExpBackoff::new(Duration::from_millis(100), Duration::from_millis(6400));
        let n = self.connect_failures.fetch_add(1, Ordering::Relaxed);
        let backoff = BACKOFF.delay(n).as_millis() as u64;
        self.connect_backoff_until
            .store(crate::accrual::now_ms() + backoff, Ordering::Relaxed);
    }

    fn connected(&self) {
        if self.connect_failures.swap(0, Ordering::Relaxed) != 0 {
            self.connect_backoff_until.store(0, Ordering::Relaxed);
        }
    }

    /// Sends `req` with the protocol the caller used and returns the response
    /// head; the body streams from the connection.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        // HTTP/2 has no connection-level headers (h2 refuses them), so only
        // HTTP/1 hops need them stripped.
        let (rsp, stream) = if req.version() == Version::HTTP_2 {
            self.absolute_uri(&mut req);
            let (rsp, stream) = self.send_h2(req).await?;
            (rsp, Some(stream))
        } else {
            strip_hop_by_hop(req.headers_mut());
            origin_form(&mut req);
            // Boxed: HTTP/1 is the rare protocol here, and its connect and
            // pool states would otherwise grow every request's future.
            let rsp = Box::pin(self.send_h1(req)).await?;
            let (mut parts, body) = rsp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            (Response::from_parts(parts, body), None)
        };
        self.check_head(&rsp)?;
        let grpc = crate::errors::is_grpc(rsp.headers());
        let (limit, oversized) = (self.limits.max_header_list_size, self.oversized.clone());
        Ok(rsp.map(|b| {
            let checked = CheckedTrailers::new(b, limit, grpc, oversized);
            crate::body::boxed(Guarded::new(checked, stream))
        }))
    }

    /// A response head over the header limit is the app's answer, not a
    /// failure to reach it: it is reported as such and never retried.
    fn check_head(&self, rsp: &Response<Incoming>) -> Result<(), ProxyError> {
        let size = header_list_size(rsp.headers());
        let limit = self.limits.max_header_list_size;
        if size <= limit as usize {
            return Ok(());
        }
        self.oversized.inc();
        Err(ProxyError::ResponseHeadersTooLarge {
            service: self.service.clone(),
            addr: self.addr,
            size: Some(size),
            limit,
        })
    }

    /// The response, and its stream counted on the connection that carries it.
    async fn send_h2(
        &self,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, StreamGuard), ProxyError> {
        // Connecting (TCP, TLS, the HTTP/2 handshake) is rare and its future
        // large: boxed, it does not make every request's future that large.
        let (mut tx, guard) = match self.h2.checkout() {
            Some(c) => c,
            None => Box::pin(self.h2_sender()).await?,
        };
        match tx.try_send_request(req).await {
            Ok(rsp) => Ok((rsp, guard)),
            Err(mut e) => match e.take_message() {
                // The connection closed before the stream was sent (GOAWAY,
                // peer restart): the request is untouched, so one fresh
                // connection may carry it.
                Some(req) => {
                    drop(guard);
                    self.h2.forget();
                    let (mut tx, guard) = Box::pin(self.h2_sender()).await?;
                    let rsp = tx.send_request(req).await.map_err(|e| self.upstream(e))?;
                    Ok((rsp, guard))
                }
                None => Err(self.upstream(e.into_error())),
            },
        }
    }

    async fn h2_sender(&self) -> Result<(http2::SendRequest<Body>, StreamGuard), ProxyError> {
        if let Some(c) = self.h2.checkout() {
            return Ok(c);
        }
        let _connecting = self.h2_connecting.lock().await;
        if let Some(c) = self.h2.checkout() {
            return Ok(c);
        }
        // A retired connection finishes the requests it carries and then
        // closes, once its last sender is gone.
        let (io, retire_at) = self.connect(true).await?;
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_frame_size(64 * 1024)
            .max_header_list_size(hard_header_list_size(self.limits.max_header_list_size))
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(io)
            .await
            .map_err(|e| self.upstream(e))?;
        self.spawn_conn(conn);
        Ok(self.h2.insert(Pooled::new(tx, retire_at)))
    }

    async fn send_h1(
        self: &Arc<Self>,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut conn = match self.take_idle_h1() {
            Some(c) => c,
            None => self.connect_h1().await?,
        };
        let rsp = match conn.tx.try_send_request(req).await {
            Ok(rsp) => rsp,
            Err(mut e) => match e.take_message() {
                // A pooled keep-alive connection the server had just closed.
                Some(req) => {
                    conn = self.connect_h1().await?;
                    conn.tx
                        .send_request(req)
                        .await
                        .map_err(|e| self.upstream(e))?
                }
                None => return Err(self.upstream(e.into_error())),
            },
        };
        // The connection is free again once this response's body has been read.
        let this = Arc::clone(self);
        tokio::spawn(async move {
            if conn.tx.ready().await.is_ok() {
                this.put_idle_h1(conn);
            }
        });
        Ok(rsp)
    }

    fn take_idle_h1(&self) -> Option<Conn<http1::SendRequest<Body>>> {
        let mut idle = self.h1_idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if c.tx.is_ready() && !c.retired() {
                return Some(c);
            }
        }
        None
    }

    fn put_idle_h1(&self, c: Conn<http1::SendRequest<Body>>) {
        let mut idle = self.h1_idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_H1 && !c.retired() {
            idle.push(c);
        }
    }

    async fn connect_h1(&self) -> Result<Conn<http1::SendRequest<Body>>, ProxyError> {
        let (io, retire_at) = self.connect(false).await?;
        let (tx, conn) = http1::Builder::new()
            .max_buf_size(h1_buf_size(hard_header_list_size(
                self.limits.max_header_list_size,
            )))
            .handshake(io)
            .await
            .map_err(|e| self.upstream(e))?;
        self.spawn_conn(conn);
        Ok(Conn { tx, retire_at })
    }

    fn spawn_conn<F>(&self, conn: F)
    where
        F: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
    {
        let gauge = self.open_connections.clone();
        let addr = self.addr;
        gauge.inc();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "upstream connection ended with error");
            }
            gauge.dec();
        });
    }

    /// TCP, then TLS when the endpoint has an identity; `h2` picks the ALPN offered.
    async fn connect(
        &self,
        h2: bool,
    ) -> Result<(TokioIo<ClientIo>, Option<SystemTime>), ProxyError> {
        let (io, retire_at) = self.dial(self.addr, Alpn::http(h2)).await?;
        Ok((TokioIo::new(io), retire_at))
    }

    /// A connection for opaque TCP to `port` of this endpoint's workload.
    /// With identities on both sides: mTLS to its sidecar's inbound port
    /// offering ALPN `tern.tcp/1` (the caller then sends the header naming
    /// `port`, see [`crate::tcp::header`]); without: plain TCP straight to
    /// `ip:port`, which the peer's interception, if any, takes from there.
    pub async fn connect_tcp(&self, port: u16) -> Result<ClientIo, ProxyError> {
        let addr = match self.tls {
            Some(_) => self.addr,
            None => SocketAddr::new(self.addr.ip(), port),
        };
        Ok(self.dial(addr, Alpn::Tcp).await?.0)
    }

    async fn dial(
        &self,
        addr: SocketAddr,
        alpn: Alpn,
    ) -> Result<(ClientIo, Option<SystemTime>), ProxyError> {
        let connecting =
            tokio::time::timeout(self.limits.connect_timeout, TcpStream::connect(addr));
        let stream = match connecting.await {
            Err(_) => {
                self.connect_failed();
                return Err(ProxyError::ConnectTimeout {
                    service: self.service.clone(),
                    addr,
                });
            }
            Ok(Err(source)) => {
                self.connect_failed();
                return Err(ProxyError::Connect {
                    service: self.service.clone(),
                    addr,
                    source,
                });
            }
            Ok(Ok(s)) => s,
        };
        // Small gRPC messages must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let (Some(identity), Some(expected)) = (&self.tls, &self.endpoint.identity) else {
            self.connected();
            return Ok((ClientIo::Plain(stream), None));
        };
        match crate::identity::tls::connect(identity, expected, alpn, addr, stream).await {
            Ok((io, retire_at)) => {
                self.connected();
                Ok((io, retire_at))
            }
            Err(e) => {
                // Another endpoint may be fine: back off this one like a
                // failed connect.
                self.connect_failed();
                tracing::warn!(
                    service = %self.service,
                    %addr,
                    expected = %expected,
                    reason = e.reason,
                    detail = %e.detail,
                    "mTLS handshake with endpoint failed"
                );
                Err(ProxyError::Handshake {
                    service: self.service.clone(),
                    addr,
                    reason: e.reason,
                    detail: e.detail,
                })
            }
        }
    }

    fn upstream(&self, source: hyper::Error) -> ProxyError {
        if source.is_user() {
            // What failed is the caller's side of the exchange (its request
            // body broke off or was malformed, say an invalid chunk size):
            // the caller's error, not the endpoint's.
            return ProxyError::BadRequest {
                service: self.service.clone(),
                detail: source_chain(&source),
            };
        }
        if crate::errors::local_protocol_error(&source) || source.is_parse_too_large() {
            // h2 refused the response head itself: over twice the limit, or
            // malformed. The app did answer, so this is never retried.
            self.oversized.inc();
            return ProxyError::ResponseHeadersTooLarge {
                service: self.service.clone(),
                addr: self.addr,
                size: None,
                limit: self.limits.max_header_list_size,
            };
        }
        ProxyError::Upstream {
            service: self.service.clone(),
            addr: self.addr,
            source,
        }
    }

    /// HTTP/2 needs `:scheme` and `:authority`; keep the caller's authority so the
    /// app sees the name it was called by.
    fn absolute_uri(&self, req: &mut Request<Body>) {
        let uri = req.uri();
        if uri.scheme().is_some() && uri.authority().is_some() {
            return;
        }
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| self.addr.to_string());
        let mut parts = uri::Parts::default();
        parts.scheme = Some(uri::Scheme::HTTP);
        parts.authority = authority.parse().ok();
        parts.path_and_query = uri
            .path_and_query()
            .cloned()
            .or_else(|| Some(uri::PathAndQuery::from_static("/")));
        if let Ok(u) = Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
        req.headers_mut().remove(header::HOST);
    }
}

/// An error and its causes, one line.
fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}
