//! The admin listener (HTTP/1.1): `GET /metrics`, `/ready`, `/live`, `/state`
//! (the mesh, the registry, the subscribers, and the CA under `identity`).
//!
//! Read-only on purpose: the mesh config changes only through the watched
//! directory, so what is in force is always what is in the files.
//!
//! `/state` maps the whole mesh (every service, endpoint, identity and
//! subscriber), so it answers loopback peers only — `kubectl port-forward`
//! reaches it as one — unless `--admin-expose-state`. Probes and scrapers
//! keep `/metrics`, `/ready` and `/live` from anywhere.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admission::LogLimiter;
use crate::identity::Authority;
use crate::metrics::Metrics;
use crate::state::Mesh;

#[derive(Clone)]
pub struct Admin {
    pub mesh: Arc<Mesh>,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    /// The CA and the control plane's own identity, shown under `identity`.
    pub authority: Option<Arc<Authority>>,
    /// `--admin-expose-state`: serve `/state` to non-loopback peers too.
    pub expose_state: bool,
    pub refusal_log: Arc<LogLimiter>,
}

/// Serves admin requests on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, admin: Admin, stop: CancellationToken) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        let conn = http.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let rsp = admin.respond(req.method(), req.uri().path(), peer);
                async move { Ok::<_, Infallible>(rsp) }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with error");
            }
        });
    }
}

impl Admin {
    fn respond(&self, method: &Method, path: &str, peer: SocketAddr) -> Response<Full<Bytes>> {
        match (method, path) {
            (&Method::GET, "/live") => reply(StatusCode::OK, "text/plain", "live\n".into()),
            (&Method::GET, "/state") if !self.may_read_state(peer) => {
                self.metrics.admin_refusals.with_label_values(&[path]).inc();
                if let Some(suppressed) = self.refusal_log.allow() {
                    tracing::warn!(%peer, path, suppressed, "admin request refused: /state answers loopback peers only");
                }
                reply(
                    StatusCode::FORBIDDEN,
                    "text/plain",
                    "/state answers loopback peers only: use `kubectl port-forward` to the admin \
                     port, or start tern-control with --admin-expose-state\n"
                        .into(),
                )
            }
            (&Method::GET, "/metrics") => match self.metrics.encode() {
                Ok(text) => reply(StatusCode::OK, "text/plain; version=0.0.4", text),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e}\n"),
                ),
            },
            (&Method::GET, "/ready") => {
                if self.ready.load(Ordering::Acquire) {
                    reply(StatusCode::OK, "text/plain", "ready\n".into())
                } else {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready\n".into(),
                    )
                }
            }
            (&Method::GET, "/state") => {
                let mut state = self.mesh.state();
                if let Some(a) = &self.authority {
                    state["identity"] = a.json();
                }
                let body = serde_json::to_string_pretty(&state).unwrap_or_default();
                reply(StatusCode::OK, "application/json", body + "\n")
            }
            (_, "/metrics" | "/ready" | "/live" | "/state") => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "method not allowed\n".into(),
            ),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }
}

impl Admin {
    /// Loopback peers (a shell in the pod, `kubectl port-forward`), or anyone
    /// with `--admin-expose-state`.
    fn may_read_state(&self, peer: SocketAddr) -> bool {
        self.expose_state || peer.ip().to_canonical().is_loopback()
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::MeshConfig;

    fn admin(expose_state: bool) -> Admin {
        let metrics = Arc::new(Metrics::new().unwrap());
        let config = MeshConfig::default();
        let mesh = Mesh::new(config, Duration::from_secs(1), Arc::clone(&metrics));
        Admin {
            mesh,
            metrics,
            ready: Arc::new(AtomicBool::new(true)),
            authority: None,
            expose_state,
            refusal_log: Arc::new(LogLimiter::new()),
        }
    }

    fn status(a: &Admin, path: &str, peer: &str) -> StatusCode {
        a.respond(&Method::GET, path, peer.parse().unwrap())
            .status()
    }

    #[test]
    fn state_answers_loopback_peers_only_unless_exposed() {
        let a = admin(false);
        for local in ["127.0.0.1:5000", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
            assert_eq!(status(&a, "/state", local), StatusCode::OK, "{local}");
        }
        for remote in ["10.1.2.3:5000", "[fd00::2]:5000", "[::ffff:10.1.2.3]:5000"] {
            assert_eq!(
                status(&a, "/state", remote),
                StatusCode::FORBIDDEN,
                "{remote}"
            );
            for open in ["/metrics", "/ready", "/live"] {
                assert_eq!(status(&a, open, remote), StatusCode::OK, "{open}");
            }
        }
        let refused = a
            .metrics
            .admin_refusals
            .with_label_values(&["/state"])
            .get();
        assert_eq!(refused, 3);
        let exposed = admin(true);
        assert_eq!(status(&exposed, "/state", "10.1.2.3:5000"), StatusCode::OK);
    }
}
