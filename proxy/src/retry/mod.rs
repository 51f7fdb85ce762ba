//! Retries, timeouts and deadlines for one request, as a tower layer.
//!
//! Each attempt picks an endpoint (another one than the last failure where
//! there is one), and is retried only when nothing of its response has
//! reached the caller: a refused or timed-out connection, a refused stream,
//! a retryable gRPC status, a 502/503/504 to an idempotent HTTP request. A
//! per-service budget (a share of recent requests plus a floor per second)
//! bounds the extra load; backoff is exponential with full jitter. The whole
//! call is bounded by the configured overall timeout and by an incoming
//! `grpc-timeout`, whichever is shorter, and each attempt passes on what is
//! left of it.

pub mod classify;
pub mod deadline;
pub mod replay;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use http::{Request, Response};
use tern_backoff::{ExpBackoff, Jitter};
use tower::retry::budget::Budget as _;
use tower::ServiceExt as _;

use crate::body::Body;
use crate::errors::{is_grpc, ProxyError};
use crate::metrics::Metrics;
use crate::router::Target;
use classify::Classified;
use replay::Replay;

/// Attempts made for a request so far; shared with the access log. The retries'
/// record is kept only for a sampled request, whose span shows them as events.
#[derive(Clone, Default)]
pub struct Attempts(pub Arc<AtomicU32>, pub Option<Arc<Mutex<Vec<RetryEvent>>>>);

impl Attempts {
    /// Attempts that also remember each retry, for a span.
    pub fn recorded() -> Self {
        Self(Arc::default(), Some(Arc::default()))
    }

    fn retrying(&self, attempt: u32, endpoint: SocketAddr, reason: &'static str) {
        if let Some(log) = &self.1 {
            if let Ok(mut log) = log.lock() {
                log.push(RetryEvent {
                    time: SystemTime::now(),
                    attempt,
                    endpoint,
                    reason,
                });
            }
        }
    }

    /// The retries recorded so far (none unless [`Attempts::recorded`]).
    pub fn retries(&self) -> Vec<RetryEvent> {
        self.1
            .as_ref()
            .and_then(|l| l.lock().ok().map(|l| l.clone()))
            .unwrap_or_default()
    }
}

/// An attempt that failed and was retried.
#[derive(Clone, Debug)]
pub struct RetryEvent {
    pub time: SystemTime,
    /// Which attempt failed, the first being 1.
    pub attempt: u32,
    pub endpoint: SocketAddr,
    pub reason: &'static str,
}

#[derive(Clone)]
pub struct RetryLayer {
    metrics: Arc<Metrics>,
    response_timeout: Option<Duration>,
}

impl RetryLayer {
    /// `response_timeout`: how long a request with no deadline of its own
    /// waits for its response head (`limits.response_timeout`).
    pub fn new(metrics: Arc<Metrics>, response_timeout: Option<Duration>) -> Self {
        Self {
            metrics,
            response_timeout,
        }
    }
}

impl<S> tower::Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            metrics: Arc::clone(&self.metrics),
            response_timeout: self.response_timeout,
        }
    }
}

#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    metrics: Arc<Metrics>,
    response_timeout: Option<Duration>,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

impl<S> tower::Service<Request<Body>> for Retry<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> BoxFuture {
        match req.extensions().get::<Arc<Target>>().cloned() {
            Some(target) => Box::pin(run(
                self.inner.clone(),
                target,
                Arc::clone(&self.metrics),
                self.response_timeout,
                req,
            )),
            None => Box::pin(self.inner.call(req)),
        }
    }
}

/// What the request's body is for each attempt.
enum Source {
    Once(Option<Body>),
    Replay(Replay),
}

impl Source {
    fn body(&mut self) -> Body {
        match self {
            Self::Once(b) => b.take().unwrap_or_else(crate::body::empty),
            Self::Replay(r) => r.attempt(),
        }
    }

    fn can_replay(&self) -> bool {
        match self {
            Self::Once(_) => false,
            Self::Replay(r) => r.can_replay(),
        }
    }
}

async fn run<S>(
    inner: S,
    target: Arc<Target>,
    metrics: Arc<Metrics>,
    response_timeout: Option<Duration>,
    req: Request<Body>,
) -> Result<Response<Body>, ProxyError>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError> + Clone + Send,
    S::Future: Send,
{
    let start = Instant::now();
    let routes = target.routes.load_full();
    let Some((rule, budget)) = routes.select(&req) else {
        return Err(ProxyError::NoRoute {
            authority: crate::router::authority(&req).to_string(),
        });
    };
    let policy = &rule.policy;
    // One backend per request, so a retry stays within the split it was given.
    let subset = rule.backend();
    let service = target.service.as_ref();
    budget.deposit();
    let grpc = is_grpc(req.headers());
    let incoming = deadline::from_headers(req.headers())
        .map_err(|value| ProxyError::InvalidGrpcTimeout { value })?;
    let limit = match (incoming, policy.timeout.overall) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let deadline = limit.map(|l| start + l);
    // Without a deadline, the response head is still not awaited forever;
    // this bound is the proxy's own and is never told to the server.
    let head_by = deadline.or_else(|| response_timeout.map(|t| start + t));
    let attempts = req
        .extensions()
        .get::<Attempts>()
        .cloned()
        .unwrap_or_default();
    // The app dialed one endpoint's IP: every attempt goes there.
    let pinned = req
        .extensions()
        .get::<crate::router::PinnedEndpoint>()
        .map(|p| p.0);
    let (parts, body) = req.into_parts();
    let mut source = if policy.retry.max_attempts > 1 {
        Source::Replay(Replay::new(body, policy.retry.buffer_bytes))
    } else {
        Source::Once(Some(body))
    };
    let creq = classify::Request {
        grpc,
        method: &parts.method,
        policy: &policy.retry,
    };
    let deadline_exceeded = || {
        let no_deadline = deadline.is_none();
        let kind = if no_deadline { "response" } else { "deadline" };
        metrics.timeouts.with_label_values(&[service, kind]).inc();
        let (service, elapsed) = (Arc::clone(&target.service), start.elapsed());
        if no_deadline {
            ProxyError::ResponseTimeout { service, elapsed }
        } else {
            ProxyError::DeadlineExceeded { service, elapsed }
        }
    };

    let mut avoid = None;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        attempts.0.store(attempt, Ordering::Relaxed);
        let now = Instant::now();
        let remaining = deadline.map(|d| d.saturating_duration_since(now));
        let head_left = head_by.map(|d| d.saturating_duration_since(now));
        if head_left == Some(Duration::ZERO) {
            return Err(deadline_exceeded());
        }
        let endpoint = match pinned {
            Some(addr) => target.balancer.get(addr)?,
            None => target.balancer.pick(subset, avoid)?,
        };
        let addr = endpoint.addr();
        let mut req = Request::new(source.body());
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        // A caller's deadline always travels re-encoded (canonical, and
        // shortened by the time spent here); a configured one only for gRPC.
        if let (Some(rem), true) = (remaining, grpc || incoming.is_some()) {
            req.headers_mut()
                .insert(deadline::GRPC_TIMEOUT, deadline::encode(rem));
        }
        req.extensions_mut().insert(Arc::clone(&target));
        req.extensions_mut().insert(endpoint);
        let may_retry = attempt < policy.retry.max_attempts && source.can_replay();
        let svc = inner.clone();
        let send = async {
            let rsp = svc.oneshot(req).await?;
            Ok::<_, ProxyError>(classify::classify(&creq, rsp, may_retry).await)
        };
        let per_try = match (policy.timeout.per_try, head_left) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let result = match per_try {
            Some(t) => tokio::time::timeout(t, send).await.ok(),
            None => Some(send.await),
        };

        let (last, reason): (Result<Response<Body>, ProxyError>, &'static str) = match result {
            Some(Ok(Classified::Final(rsp))) => {
                target
                    .balancer
                    .report(addr, !classify::is_failure(&policy.retry, grpc, &rsp));
                return Ok(rsp);
            }
            Some(Ok(Classified::Retryable(rsp, reason))) => (Ok(rsp), reason),
            Some(Ok(Classified::Reset(reason))) => (
                Err(ProxyError::Reset {
                    service: Arc::clone(&target.service),
                    addr,
                }),
                reason,
            ),
            Some(Err(e)) if e.is_retryable() => {
                let reason = e.reason();
                (Err(e), reason)
            }
            Some(Err(e)) => {
                if e.endpoint().is_some() {
                    target.balancer.report(addr, false);
                }
                return Err(e);
            }
            None => {
                if head_by.is_some_and(|d| Instant::now() >= d) {
                    return Err(deadline_exceeded());
                }
                metrics
                    .timeouts
                    .with_label_values(&[service, "per_try"])
                    .inc();
                let timeout = per_try.unwrap_or_default();
                (
                    Err(ProxyError::PerTryTimeout {
                        service: Arc::clone(&target.service),
                        addr: Some(addr),
                        timeout,
                    }),
                    "per_try_timeout",
                )
            }
        };
        target.balancer.report(addr, false);

        if attempt >= policy.retry.max_attempts || !source.can_replay() {
            return last;
        }
        if !budget.withdraw() {
            metrics
                .retry_budget_exhausted
                .with_label_values(&[service])
                .inc();
            return last;
        }
        metrics.retries.with_label_values(&[service, reason]).inc();
        attempts.retrying(attempt, addr, reason);
        tracing::debug!(service, endpoint = %addr, reason, attempt, "retrying");
        avoid = Some(addr);
        let pause = backoff(policy.retry.backoff_base, policy.retry.backoff_max)
            .delay(attempt.saturating_sub(1));
        match deadline {
            Some(d) if Instant::now() + pause >= d => return Err(deadline_exceeded()),
            _ => tokio::time::sleep(pause).await,
        }
    }
}

/// Full jitter: the pause after attempt `n` is uniform in `[0, min(max, base · 2^(n-1))]`.
fn backoff(base: Duration, max: Duration) -> ExpBackoff {
    ExpBackoff::new(base, max).jitter(Jitter::Full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_by_the_exponential_ceiling() {
        let base = Duration::from_millis(10);
        let max = Duration::from_millis(100);
        for _ in 0..100 {
            assert!(backoff(base, max).delay(0) <= base);
            assert!(backoff(base, max).delay(2) <= Duration::from_millis(40));
            assert!(backoff(base, max).delay(19) <= max);
        }
    }
}
