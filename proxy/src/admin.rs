//! The admin listener: `/metrics`, `/ready`, `/live`, `/config`, `/tap`,
//! `/explain`, `/shutdown`.
//!
//! Nothing here is writable except `/shutdown` (POST), which drains the
//! proxy and exits so a Job's pod can finish. The admin port listens on the
//! pod's network for probes and scraping, so `/shutdown` answers only peers
//! on loopback (the pod's own containers); anyone else gets 403. `/config`
//! shows every service, endpoint, identity and policy the sidecar knows,
//! which is a map of the mesh for an attacker: it too answers loopback only,
//! unless `--admin-expose-config` opens it (`kubectl port-forward` reaches it
//! on loopback without that). `/explain` ([`crate::explain`]) tells as much
//! and `/tap` ([`crate::tap`]) streams who calls what: both answer like
//! `/config`, and `/tap` is off altogether when the admin port listens off
//! loopback, unless `--admin-tap` turns it on. `/metrics`, `/ready` and
//! `/live` stay open.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use crate::body::{self, Body};
use crate::explain::{Explainer, Question};
use crate::metrics::Metrics;
use crate::serve::ConnInfo;
use crate::tap::{Filter, Tap};

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
    /// `--admin-expose-config`: `/config` answers any peer, not only loopback.
    pub expose_config: bool,
    pub tap: Tap,
    /// The admin port listens on loopback, or `--admin-tap` was given.
    pub tap_enabled: bool,
    pub explain: Explainer,
}

impl tower::Service<Request<Incoming>> for Admin {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let peer = ConnInfo::of(&req).map(|c| c.peer);
        let uri = req.uri();
        let rsp = self.respond(req.method(), uri.path(), uri.query(), peer);
        Box::pin(async move { Ok(rsp) })
    }
}

impl Admin {
    fn respond(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        peer: Option<SocketAddr>,
    ) -> Response<Body> {
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
            (&Method::GET, "/config") if !self.expose_config && !is_loopback(peer) => {
                self.refuse_remote("/config", peer)
            }
            (&Method::GET, "/config") => {
                let body = serde_json::to_string_pretty(&(self.config)()).unwrap_or_default();
                reply(StatusCode::OK, "application/json", body + "\n")
            }
            (&Method::GET, "/tap" | "/explain") if !self.expose_config && !is_loopback(peer) => {
                self.refuse_remote(path, peer)
            }
            (&Method::GET, "/tap") if !self.tap_enabled => reply(
                StatusCode::FORBIDDEN,
                "text/plain",
                "/tap is off: the admin port does not listen on loopback; \
                 start tern-proxy with --admin-tap to serve it\n"
                    .into(),
            ),
            (&Method::GET, "/tap") => match Filter::parse(query) {
                Ok(filter) => {
                    let mut rsp = Response::new(self.tap.stream(filter));
                    rsp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/x-ndjson"),
                    );
                    rsp
                }
                Err(e) => bad_request(&self.metrics, "/tap", e),
            },
            (&Method::GET, "/explain") => {
                match Question::parse(query).and_then(|q| self.explain.explain(&q)) {
                    Ok(answer) => {
                        let body = serde_json::to_string_pretty(&answer).unwrap_or_default();
                        reply(StatusCode::OK, "application/json", body + "\n")
                    }
                    Err(e) => bad_request(&self.metrics, "/explain", e),
                }
            }
            (&Method::POST, "/shutdown") if !is_loopback(peer) => {
                self.refuse_remote("/shutdown", peer)
            }
            (&Method::POST, "/shutdown") => {
                tracing::info!("shutdown requested on the admin port");
                self.shutdown.cancel();
                reply(StatusCode::OK, "text/plain", "shutting down\n".into())
            }
            (
                _,
                "/metrics" | "/live" | "/ready" | "/config" | "/tap" | "/explain" | "/shutdown",
            ) => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "method not allowed\n".into(),
            ),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }
}

impl Admin {
    /// 403 for a peer off loopback asking for a loopback-only path; counted and logged.
    fn refuse_remote(&self, path: &str, peer: Option<SocketAddr>) -> Response<Body> {
        self.metrics
            .protocol_rejections
            .with_label_values(&["admin", "not_loopback"])
            .inc();
        tracing::warn!(path, peer = ?peer, "refused an admin request from a peer not on loopback");
        reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            format!("{path} is only served to loopback (use kubectl port-forward)\n"),
        )
    }
}

/// A request with no known peer is treated as remote.
fn is_loopback(peer: Option<SocketAddr>) -> bool {
    peer.is_some_and(|p| p.ip().to_canonical().is_loopback())
}

/// A query `/tap` or `/explain` cannot answer: 400 naming why; logged and counted.
fn bad_request(metrics: &Metrics, path: &str, reason: String) -> Response<Body> {
    metrics
        .protocol_rejections
        .with_label_values(&["admin", "bad_query"])
        .inc();
    tracing::warn!(path, reason, "refused an admin query");
    reply(StatusCode::BAD_REQUEST, "text/plain", format!("{reason}\n"))
}

fn reply(status: StatusCode, content_type: &'static str, text: String) -> Response<Body> {
    let mut rsp = Response::new(body::boxed(Full::new(Bytes::from(text))));
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

    use http_body_util::BodyExt;

    use super::*;

    fn admin(expose_config: bool) -> Admin {
        let metrics = Arc::new(Metrics::new().unwrap());
        let targets =
            crate::targets::Targets::new(Arc::clone(&metrics), Default::default(), "ns", None);
        Admin {
            tap: Tap::new(&[], &metrics.registry).unwrap(),
            metrics,
            ready: Arc::new(AtomicBool::new(true)),
            config: Arc::new(|| serde_json::json!({"service_name": "pay"})),
            shutdown: CancellationToken::new(),
            identity: None,
            expose_config,
            tap_enabled: true,
            explain: Explainer {
                targets,
                inbound_authz: crate::authz::Policy::shared(),
                app: None,
                service_name: "pay".into(),
            },
        }
    }

    fn peer(addr: &str) -> Option<SocketAddr> {
        Some(addr.parse::<SocketAddr>().unwrap())
    }

    fn refusals(a: &Admin) -> u64 {
        a.metrics
            .protocol_rejections
            .with_label_values(&["admin", "not_loopback"])
            .get()
    }

    async fn body(rsp: Response<Body>) -> String {
        let bytes = rsp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn config_answers_loopback_only_by_default() {
        let a = admin(false);
        for remote in [Some("10.0.0.7:5000"), Some("[fd00::7]:5000"), None] {
            let rsp = a.respond(&Method::GET, "/config", None, remote.and_then(peer));
            assert_eq!(rsp.status(), StatusCode::FORBIDDEN, "{remote:?}");
        }
        assert_eq!(refusals(&a), 3);
        for local in ["127.0.0.1:5000", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
            let rsp = a.respond(&Method::GET, "/config", None, peer(local));
            assert_eq!(rsp.status(), StatusCode::OK, "{local}");
            assert!(body(rsp).await.contains("\"pay\""));
        }
        assert_eq!(refusals(&a), 3);
    }

    #[tokio::test]
    async fn expose_config_opens_config_and_not_shutdown() {
        let a = admin(true);
        let rsp = a.respond(&Method::GET, "/config", None, peer("10.0.0.7:5000"));
        assert_eq!(rsp.status(), StatusCode::OK);
        assert!(body(rsp).await.contains("\"pay\""));
        let rsp = a.respond(&Method::POST, "/shutdown", None, peer("10.0.0.7:5000"));
        assert_eq!(rsp.status(), StatusCode::FORBIDDEN);
        assert!(!a.shutdown.is_cancelled());
        assert_eq!(refusals(&a), 1);
    }

    #[test]
    fn probes_and_metrics_stay_open() {
        let a = admin(false);
        for path in ["/metrics", "/ready", "/live"] {
            let rsp = a.respond(&Method::GET, path, None, peer("10.0.0.7:5000"));
            assert_eq!(rsp.status(), StatusCode::OK, "{path}");
        }
        assert_eq!(refusals(&a), 0);
    }

    #[tokio::test]
    async fn tap_and_explain_answer_loopback_only_and_tap_can_be_off() {
        let mut a = admin(false);
        for path in ["/tap", "/explain"] {
            let rsp = a.respond(&Method::GET, path, None, peer("10.0.0.7:5000"));
            assert_eq!(rsp.status(), StatusCode::FORBIDDEN, "{path}");
        }
        let local = peer("127.0.0.1:5000");
        let rsp = a.respond(&Method::GET, "/explain", Some("authority=pay"), local);
        assert_eq!(rsp.status(), StatusCode::OK);
        assert!(body(rsp).await.contains("no service is known"));
        let rsp = a.respond(&Method::GET, "/explain", Some("direction=up"), local);
        assert_eq!(rsp.status(), StatusCode::BAD_REQUEST);
        let rsp = a.respond(&Method::GET, "/tap", Some("direction=up"), local);
        assert_eq!(rsp.status(), StatusCode::BAD_REQUEST);
        let rsp = a.respond(&Method::GET, "/tap", None, local);
        assert_eq!(rsp.status(), StatusCode::OK);
        assert!(a.tap.active());
        drop(rsp);
        a.tap_enabled = false;
        let rsp = a.respond(&Method::GET, "/tap", None, local);
        assert_eq!(rsp.status(), StatusCode::FORBIDDEN);
        assert!(body(rsp).await.contains("--admin-tap"));
        assert!(!a.tap.active());
    }
}
