//! Accepting connections: plain async loops around hyper's server.
//!
//! Each accepted connection speaks HTTP/1.1 or HTTP/2 (h2c), detected from its
//! first bytes. Every connection is watched by one graceful-shutdown handle,
//! so a drain sends GOAWAY on HTTP/2, closes idle HTTP/1.1 keep-alives and
//! waits for requests in flight.

use std::convert::Infallible;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, IntGauge};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::BoxError;

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

/// Serves `svc` on every connection `listener` accepts until `stop` fires.
pub async fn accept_loop<S, B>(
    name: &'static str,
    listener: TcpListener,
    svc: S,
    metrics: ConnMetrics,
    graceful: &GracefulShutdown,
    stop: CancellationToken,
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
    }
    tracing::debug!(listener = name, "stopped accepting");
}
