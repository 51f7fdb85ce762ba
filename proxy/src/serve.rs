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
//! ([`ConnTls`]) rides in every request's extensions.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, IntGauge};
use tern_identity::ConnTls;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::BoxError;
use crate::identity::tls::{Accepted, Inbound};

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

/// Serves `svc` on every connection `listener` accepts until `stop` fires;
/// with `tls`, each connection first goes through its handshake.
pub async fn accept_loop<S, B>(
    name: &'static str,
    listener: TcpListener,
    svc: S,
    metrics: ConnMetrics,
    graceful: &GracefulShutdown,
    stop: CancellationToken,
    tls: Option<Arc<Inbound>>,
) where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let builder = server_builder();
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
        metrics.accepted.inc();
        let open = metrics.open.clone();
        open.inc();
        let Some(tls) = &tls else {
            let conn = builder
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc.clone()))
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(listener = name, %peer, error = %e, "connection ended with error");
                }
                open.dec();
            });
            continue;
        };
        let tls = Arc::clone(tls);
        let watcher = graceful.watcher();
        let svc = svc.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let result = match tls.accept(stream).await {
                Err(e) => {
                    tracing::warn!(listener = name, %peer, reason = e.reason, detail = %e.detail, "refused connection");
                    Ok(())
                }
                Ok(Accepted::Plain(stream)) => {
                    let svc = WithConnTls {
                        inner: svc,
                        tls: ConnTls::plaintext(),
                    };
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
                    watcher.watch(conn.into_owned()).await
                }
                Ok(Accepted::Tls(stream, conn_tls)) => {
                    let svc = WithConnTls {
                        inner: svc,
                        tls: conn_tls,
                    };
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(listener = name, %peer, error = %e, "connection ended with error");
            }
            open.dec();
        });
    }
    tracing::debug!(listener = name, "stopped accepting");
}

/// Puts what the connection's handshake established into each request.
#[derive(Clone)]
struct WithConnTls<S> {
    inner: S,
    tls: ConnTls,
}

impl<S> tower::Service<Request<Incoming>> for WithConnTls<S>
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
        req.extensions_mut().insert(self.tls.clone());
        self.inner.call(req)
    }
}
