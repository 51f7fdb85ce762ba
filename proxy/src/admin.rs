//! The admin listener: `/metrics`, `/ready`, `/live`, `/config`, `/shutdown`.
//!
//! Nothing here is writable except `/shutdown` (POST), which drains the
//! proxy and exits so a Job's pod can finish. The admin port listens on the
//! pod's network for probes and scraping, so `/shutdown` answers only peers
//! on loopback (the pod's own containers); anyone else gets 403.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::serve::ClientAddr;

/// What `/config` shows: produced on demand from the live state.
pub type ConfigView = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

#[derive(Clone)]
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    pub config: ConfigView,
    pub shutdown: CancellationToken,
    /// With an identity, an expired certificate makes the sidecar not ready:
    /// peers refuse it until the control plane renews it.
    pub identity: Option<Arc<crate::identity::Identity>>,
}

impl tower::Service<Request<Incoming>> for Admin {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let peer = req.extensions().get::<ClientAddr>().copied();
        let rsp = self.respond(req.method(), req.uri().path(), peer);
        Box::pin(async move { Ok(rsp) })
    }
}

impl Admin {
    fn respond(
        &self,
        method: &Method,
        path: &str,
        peer: Option<ClientAddr>,
    ) -> Response<Full<Bytes>> {
        match (method, path) {
            (&Method::GET, "/metrics") => match self.metrics.encode() {
                Ok(text) => reply(StatusCode::OK, "text/plain; version=0.0.4", text),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e}\n"),
                ),
            },
            (&Method::GET, "/live") => reply(StatusCode::OK, "text/plain", "live\n".into()),
            (&Method::GET, "/ready") => {
                let cert_ok = self.identity.as_ref().is_none_or(|i| i.is_ready());
                if self.ready.load(Ordering::Acquire) && cert_ok {
                    reply(StatusCode::OK, "text/plain", "ready\n".into())
                } else if !cert_ok {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready: no valid workload certificate\n".into(),
                    )
                } else {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready\n".into(),
                    )
                }
            }
            (&Method::GET, "/config") => {
                let body = serde_json::to_string_pretty(&(self.config)()).unwrap_or_default();
                reply(StatusCode::OK, "application/json", body + "\n")
            }
            (&Method::POST, "/shutdown") if !peer.is_some_and(|p| p.is_loopback()) => {
                self.metrics
                    .protocol_rejections
                    .with_label_values(&["admin", "not_loopback"])
                    .inc();
                tracing::warn!(peer = ?peer.map(|p| p.0), "refused /shutdown from a peer not on loopback");
                reply(
                    StatusCode::FORBIDDEN,
                    "text/plain",
                    "/shutdown is only accepted from loopback\n".into(),
                )
            }
            (&Method::POST, "/shutdown") => {
                tracing::info!("shutdown requested on the admin port");
                self.shutdown.cancel();
                reply(StatusCode::OK, "text/plain", "shutting down\n".into())
            }
            (_, "/metrics" | "/live" | "/ready" | "/config" | "/shutdown") => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "method not allowed\n".into(),
            ),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    rsp
}
