//! The layer that measures every request: metrics and the access log line.
//!
//! It counts the request when it arrives, then follows the response body to
//! its end (or its reset, or the caller going away) to learn the gRPC status
//! from trailers, the bytes moved and the total duration, and records
//! everything once. While someone taps (`/tap`), it also reports each
//! request's metadata to [`crate::tap`]; otherwise tapping costs one atomic load.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, Version};
use tern_identity::ConnTls;

use crate::access_log::{self, AccessLog};
use crate::balance::Upstream;
use crate::body::{self, Body, BoxError};
use crate::errors;
use crate::metrics::{Direction, Metrics, RouteMetrics};
use crate::retry::Attempts;
use crate::router::Routed;
use crate::serve::ConnInfo;
use crate::tap::{self, Tap};
use crate::telemetry::{FinishedSpan, SpanStart};
use crate::trace_context;
use response::{CountingBody, Pending};
pub use response::{ObserveFuture, ObservedBody};

mod response;

const UNKNOWN_SERVICE: &str = "unknown";
const HTTP_ROUTE: &str = "http";

#[derive(Clone)]
pub struct ObserveLayer {
    shared: Arc<Shared>,
}

struct Shared {
    direction: Direction,
    metrics: Arc<Metrics>,
    log: Option<AccessLog>,
    tap: Option<Tap>,
    unknown: Arc<str>,
}

impl ObserveLayer {
    pub fn new(
        direction: Direction,
        metrics: Arc<Metrics>,
        log: Option<AccessLog>,
        tap: Option<Tap>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                direction,
                metrics,
                log,
                tap,
                unknown: Arc::from(UNKNOWN_SERVICE),
            }),
        }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            shared: Arc::clone(&self.shared),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    shared: Arc<Shared>,
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for Observe<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ObservedBody>;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let start = Instant::now();
        // Present only for a sampled request: the rest of the span work hangs on it.
        let span = req.extensions_mut().remove::<SpanStart>().map(|start| {
            Box::new(SpanInfo {
                start,
                method: req.method().clone(),
                path: req.uri().path().to_string(),
            })
        });
        let sh = &self.shared;
        let grpc = errors::is_grpc(req.headers());
        let service = Routed::of(&req)
            .map(|r| Arc::clone(&r.target.service))
            .unwrap_or_else(|| Arc::clone(&sh.unknown));
        let path = req.uri().path();
        let route_name = if grpc {
            path.strip_prefix('/').unwrap_or(path)
        } else {
            HTTP_ROUTE
        };
        let route = sh.metrics.route(sh.direction, &service, route_name);
        route.requests.inc();
        let log = sh.log.as_ref().map(|_| {
            Box::new(LogInfo {
                method: req.method().to_string(),
                authority: crate::router::authority(&req).to_string(),
                path: path.to_string(),
                protocol: protocol(req.version()),
                trace_id: trace_context::trace_id(req.headers()).to_string(),
            })
        });
        let tapped = sh.tap.as_ref().and_then(|t| t.start(&req));
        // Only the access log and spans report the bytes received: without
        // them the body is passed on uncounted.
        let bytes_in = (log.is_some() || span.is_some()).then(|| Arc::new(AtomicU64::new(0)));
        // Routing made the request's attempts counter (an unrouted request
        // makes none); a sampled request's also records each retry.
        let attempts = req.extensions_mut().get_mut::<Routed>().map(|r| {
            if span.is_some() {
                r.attempts = Attempts::recorded();
            }
            r.attempts.clone()
        });
        let req = req.map(|b| match &bytes_in {
            Some(bytes) => body::boxed(CountingBody {
                inner: b,
                bytes: Arc::clone(bytes),
            }),
            None => body::boxed(b),
        });
        // Inbound: what the caller's connection established. Outbound: set
        // from the response, once an endpoint was chosen.
        let tls = match sh.direction {
            Direction::Inbound => ConnInfo::of(&req).and_then(|c| c.tls.clone()),
            Direction::Outbound => None,
        };
        let pending = Pending(Some(Box::new(Completion {
            shared: Arc::clone(sh),
            route,
            start,
            grpc,
            status: 0,
            grpc_status: None,
            bytes_in,
            bytes_out: 0,
            upstream: None,
            error: None,
            attempts,
            tls,
            log,
            span,
            tapped,
        })));
        ObserveFuture::new(self.inner.call(req), pending)
    }
}

struct LogInfo {
    method: String,
    authority: String,
    path: String,
    protocol: &'static str,
    trace_id: String,
}

/// What a sampled request's span needs beyond the rest of [`Completion`].
struct SpanInfo {
    start: SpanStart,
    method: http::Method,
    path: String,
}

/// Everything recorded once the response ends.
struct Completion {
    shared: Arc<Shared>,
    route: Arc<RouteMetrics>,
    start: Instant,
    grpc: bool,
    status: u16,
    grpc_status: Option<u32>,
    bytes_in: Option<Arc<AtomicU64>>,
    bytes_out: u64,
    upstream: Option<std::net::SocketAddr>,
    error: Option<&'static str>,
    attempts: Option<Attempts>,
    tls: Option<ConnTls>,
    log: Option<Box<LogInfo>>,
    span: Option<Box<SpanInfo>>,
    /// Present only while someone taps.
    tapped: Option<Box<tap::Started>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Complete,
    /// The caller went away before the response ended.
    Cancelled,
    /// The response stream failed (reset by the peer, connection lost).
    Reset,
}

impl Completion {
    /// The endpoint that answered: an upstream's response came from the
    /// latest attempt's endpoint (which also says, outbound, what its mTLS
    /// connection established); the proxy's own error names the one it
    /// concerns, if any.
    fn upstream_from(&mut self, ext: &http::Extensions) {
        if self.error.is_some() {
            self.upstream = ext.get::<Upstream>().map(|u| u.0);
            return;
        }
        let Some((addr, tls)) = self.attempts.as_ref().and_then(Attempts::upstream) else {
            return;
        };
        self.upstream = Some(addr);
        if self.tls.is_none() {
            self.tls = tls;
        }
    }

    fn finish(mut self, outcome: Outcome) {
        let elapsed = self.start.elapsed();
        let sh = &self.shared;
        let dir = sh.direction;
        if self.status != 0 {
            let class = status_class(self.status);
            let grpc = match (self.grpc, self.grpc_status) {
                (true, Some(code)) => tern_proto::grpc_code::name(code),
                _ => "",
            };
            let (tls, peer) = match &self.tls {
                Some(t) => (
                    if t.is_tls() { "true" } else { "false" },
                    t.peer_identity.as_deref().unwrap_or(""),
                ),
                None => ("false", ""),
            };
            self.route.count_response(class, grpc, tls, peer);
        }
        self.route.duration.observe(elapsed.as_secs_f64());
        let error = match outcome {
            Outcome::Complete => self.error,
            Outcome::Cancelled => Some("cancelled"),
            Outcome::Reset => Some("reset"),
        };
        if outcome != Outcome::Complete {
            sh.metrics
                .stream_errors
                .with_label_values(&[dir.as_str(), &self.route.service, error.unwrap_or("")])
                .inc();
        }
        if let (Some(log), Some(info)) = (&sh.log, &self.log) {
            log.log(&access_log::Line {
                time: access_log::now_rfc3339(),
                direction: dir,
                protocol: info.protocol,
                method: &info.method,
                authority: &info.authority,
                path: &info.path,
                grpc_method: self.grpc.then(|| info.path.trim_start_matches('/')),
                service: &self.route.service,
                status: self.status,
                grpc_status: self.grpc_status,
                duration_ms: elapsed.as_secs_f64() * 1000.0,
                bytes_in: self.bytes_in(),
                bytes_out: self.bytes_out,
                upstream: self.upstream,
                peer_identity: self.tls.as_ref().and_then(|t| t.peer_identity.as_deref()),
                tls: self.tls.as_ref().and_then(|t| t.version),
                attempts: self.attempts(),
                trace_id: &info.trace_id,
                error,
            });
        }
        if let Some(span) = &self.span {
            self.record_span(span, error);
        }
        if let Some(started) = self.tapped.take() {
            self.report_tap(*started, elapsed.as_secs_f64() * 1000.0, error);
        }
    }

    fn report_tap(&self, started: tap::Started, latency_ms: f64, error: Option<&'static str>) {
        let Some(hub) = &self.shared.tap else {
            return;
        };
        let tls = self.tls.as_ref();
        hub.finish(
            started,
            tap::Finished {
                direction: self.shared.direction,
                service: &self.route.service,
                route: &self.route.route,
                status: self.status,
                grpc_status: self.grpc_status,
                latency_ms,
                peer_identity: tls.and_then(|t| t.peer_identity.as_deref()),
                tls: tls.and_then(|t| t.version),
                attempts: self.attempts(),
                upstream: self.upstream,
                error,
            },
        );
    }

    fn attempts(&self) -> u32 {
        self.attempts.as_ref().map_or(0, Attempts::count)
    }

    fn bytes_in(&self) -> u64 {
        self.bytes_in
            .as_ref()
            .map_or(0, |b| b.load(Ordering::Relaxed))
    }

    fn record_span(&self, span: &SpanInfo, error: Option<&'static str>) {
        let tls = self.tls.as_ref();
        span.start.tracer.record(FinishedSpan {
            start: span.start.clone(),
            end: std::time::SystemTime::now(),
            direction: self.shared.direction,
            service: Arc::clone(&self.route.service),
            grpc: self.grpc,
            method: span.method.clone(),
            path: span.path.clone(),
            status: self.status,
            grpc_status: self.grpc_status,
            endpoint: self.upstream,
            tls_version: tls.and_then(|t| t.version),
            peer_identity: tls.and_then(|t| t.peer_identity.clone()),
            error,
            attempts: self.attempts(),
            retries: self
                .attempts
                .as_ref()
                .map(Attempts::retries)
                .unwrap_or_default(),
            bytes_in: self.bytes_in(),
            bytes_out: self.bytes_out,
        });
    }
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}
