//! Retries, timeouts and deadlines for one request, as a tower layer.
//!
//! The route rule chosen by routing ([`SelectedRule`]) gives the policy. A
//! rule that allows one attempt costs nothing more than its timeouts: the
//! request goes down as it came, its body streamed. Otherwise the body is
//! kept for replay ([`replay`]) and each attempt goes through the balance
//! layer below, which picks its endpoint (another one than the last failure
//! where there is one, see [`crate::balance::layer`]). An attempt is
//! retried only when nothing of its response has reached the caller: a
//! refused or timed-out connection, a refused stream, a retryable gRPC
//! status, a 502/503/504 to an idempotent HTTP request. A per-service budget
//! (a share of recent requests plus a floor per second) bounds the extra
//! load; backoff is exponential with full jitter. A stream the server never
//! processed is resent at once, spending neither an attempt nor the budget
//! (see [`ProxyError::is_unprocessed`]). The whole
//! call is bounded by the configured overall timeout and by an incoming
//! `grpc-timeout`, whichever is shorter, and each attempt passes on what is
//! left of it.

mod attempts;
pub mod classify;
pub mod deadline;
pub mod replay;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use tern_backoff::{ExpBackoff, Jitter};
use tower::retry::budget::Budget as _;
use tower::ServiceExt as _;

use crate::balance;
use crate::body::Body;
use crate::errors::{is_grpc, ProxyError};
use crate::metrics::Metrics;
use crate::router::{Routed, Target};
use crate::routes::SelectedRule;
pub use attempts::{Attempts, RetryEvent};
use classify::Classified;
use replay::Replay;

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
        match Routed::of(&req).and_then(|r| Some((&r.target, r.rule.as_ref()?))) {
            Some((target, rule)) => Box::pin(run(
                self.inner.clone(),
                Arc::clone(target),
                rule.clone(),
                Arc::clone(&self.metrics),
                self.response_timeout,
                req,
            )),
            // No target or no rule: the balance layer says so.
            _ => Box::pin(self.inner.call(req)),
        }
    }
}

/// What is needed to turn an attempt that ran out of time into its error.
struct Timing<'a> {
    start: Instant,
    /// The caller's `grpc-timeout`, if it sent one.
    incoming: Option<Duration>,
    /// The whole call's end: the caller's deadline or the rule's overall timeout.
    deadline: Option<Instant>,
    /// Without a deadline, the response head is still not awaited forever;
    /// this bound is the proxy's own and is never told to the server.
    head_by: Option<Instant>,
    grpc: bool,
    target: &'a Target,
    metrics: &'a Metrics,
}

impl<'a> Timing<'a> {
    fn new(
        req: &Request<Body>,
        rule: &SelectedRule,
        target: &'a Target,
        metrics: &'a Metrics,
        response_timeout: Option<Duration>,
    ) -> Result<Self, ProxyError> {
        let start = Instant::now();
        let incoming = deadline::from_headers(req.headers())
            .map_err(|value| ProxyError::InvalidGrpcTimeout { value })?;
        let limit = match (incoming, rule.rule().policy.timeout.overall) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let deadline = limit.map(|l| start + l);
        Ok(Self {
            start,
            incoming,
            deadline,
            head_by: deadline.or_else(|| response_timeout.map(|t| start + t)),
            grpc: is_grpc(req.headers()),
            target,
            metrics,
        })
    }

    /// The time an attempt starting now may wait for its response head
    /// (`per_try` bounded by what is left), or the error when none is left.
    fn per_try(&self, per_try: Option<Duration>) -> Result<Option<Duration>, ProxyError> {
        let head_left = self
            .head_by
            .map(|d| d.saturating_duration_since(Instant::now()));
        if head_left == Some(Duration::ZERO) {
            return Err(self.exceeded());
        }
        Ok(match (per_try, head_left) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    /// A caller's deadline always travels re-encoded (canonical, and
    /// shortened by the time spent here); a configured one only for gRPC.
    fn pass_on(&self, headers: &mut http::HeaderMap) {
        let remaining = self
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        if let (Some(rem), true) = (remaining, self.grpc || self.incoming.is_some()) {
            headers.insert(deadline::GRPC_TIMEOUT, deadline::encode(rem));
        }
    }

    /// The error of an attempt that ran out of time, counted.
    fn timed_out(&self, per_try: Option<Duration>, addr: Option<SocketAddr>) -> ProxyError {
        if self.head_by.is_some_and(|d| Instant::now() >= d) {
            return self.exceeded();
        }
        let service = self.target.service.as_ref();
        self.metrics
            .timeouts
            .with_label_values(&[service, "per_try"])
            .inc();
        if let Some(addr) = addr {
            self.target.balancer.report(addr, false);
        }
        ProxyError::PerTryTimeout {
            service: Arc::clone(&self.target.service),
            addr,
            timeout: per_try.unwrap_or_default(),
        }
    }

    fn exceeded(&self) -> ProxyError {
        let no_deadline = self.deadline.is_none();
        let kind = if no_deadline { "response" } else { "deadline" };
        let service = Arc::clone(&self.target.service);
        self.metrics
            .timeouts
            .with_label_values(&[&service, kind])
            .inc();
        let elapsed = self.start.elapsed();
        if no_deadline {
            ProxyError::ResponseTimeout { service, elapsed }
        } else {
            ProxyError::DeadlineExceeded { service, elapsed }
        }
    }
}

async fn run<S>(
    inner: S,
    target: Arc<Target>,
    rule: SelectedRule,
    metrics: Arc<Metrics>,
    response_timeout: Option<Duration>,
    req: Request<Body>,
) -> Result<Response<Body>, ProxyError>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError> + Clone + Send,
    S::Future: Send,
{
    let timing = Timing::new(&req, &rule, &target, &metrics, response_timeout)?;
    // The budget is a share of all recent requests to the service, those
    // whose rule allows no retry included: one deposit, a few atomics.
    rule.budget().deposit();
    if rule.rule().policy.retry.max_attempts > 1 {
        retrying(inner, &rule, &timing, req).await
    } else {
        once(inner, &rule, &timing, req).await
    }
}

/// A request that cannot be retried: one attempt, its body passed on as it
/// comes, nothing held; only the timeouts apply.
async fn once<S>(
    inner: S,
    rule: &SelectedRule,
    timing: &Timing<'_>,
    mut req: Request<Body>,
) -> Result<Response<Body>, ProxyError>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError> + Send,
    S::Future: Send,
{
    let per_try = rule.rule().policy.timeout.per_try;
    let limit = timing.per_try(per_try)?;
    timing.pass_on(req.headers_mut());
    let attempts = Routed::of(&req).map(|r| r.attempts.clone());
    if let Some(a) = &attempts {
        a.set_count(1);
    }
    let Some(limit) = limit else {
        return inner.oneshot(req).await;
    };
    match tokio::time::timeout(limit, inner.oneshot(req)).await {
        Ok(result) => result,
        Err(_) => Err(timing.timed_out(per_try, attempts.and_then(|a| a.latest_addr()))),
    }
}

/// Attempts until one succeeds, fails for good, or the attempts, the budget
/// or the time run out.
async fn retrying<S>(
    inner: S,
    rule: &SelectedRule,
    timing: &Timing<'_>,
    mut req: Request<Body>,
) -> Result<Response<Body>, ProxyError>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError> + Clone + Send,
    S::Future: Send,
{
    let policy = &rule.rule().policy;
    let target = timing.target;
    let service = target.service.as_ref();
    // `call` found it; each attempt goes down with its own copy.
    let Some(mut routed) = req.extensions_mut().remove::<Routed>() else {
        return Err(ProxyError::NoRoute {
            authority: crate::router::authority(&req).to_string(),
        });
    };
    let attempts = routed.attempts.clone();
    let (parts, body) = req.into_parts();
    let source = Replay::new(body, policy.retry.buffer_bytes);
    let creq = classify::Request {
        grpc: timing.grpc,
        method: &parts.method,
        policy: &policy.retry,
    };
    let mut attempt = 0u32;
    // Attempts the server never processed (refused, or above its GOAWAY's
    // last-stream-id): retried without counting against the policy.
    let mut unprocessed = 0u32;
    loop {
        attempt += 1;
        attempts.set_count(attempt);
        let per_try = timing.per_try(policy.timeout.per_try)?;
        let mut req = Request::new(source.attempt());
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        timing.pass_on(req.headers_mut());
        let allowed = policy.retry.max_attempts + unprocessed;
        let may_retry = attempt < allowed && source.can_replay();
        // What the balance layer chooses the endpoint by.
        routed.may_hold = may_retry;
        req.extensions_mut().insert(routed.clone());
        let svc = inner.clone();
        let send = async {
            let rsp = svc.oneshot(req).await?;
            let held = may_retry && creq.grpc && balance::layer::held(&rsp);
            let verdict = classify::classify(&creq, rsp, may_retry).await;
            Ok::<_, ProxyError>((verdict, held))
        };
        let result = match per_try {
            Some(t) => tokio::time::timeout(t, send).await.ok(),
            None => Some(send.await),
        };
        let addr = attempts.latest_addr().unwrap_or(NO_ENDPOINT);
        let (last, reason): (Result<Response<Body>, ProxyError>, &'static str) = match result {
            Some(Ok((verdict, held))) => {
                // The balance layer left a held response's verdict to us.
                if held {
                    let ok = matches!(&verdict, Classified::Final(rsp)
                        if !classify::is_failure(&policy.retry, timing.grpc, rsp));
                    target.balancer.report(addr, ok);
                }
                match verdict {
                    Classified::Final(rsp) => return Ok(rsp),
                    Classified::Retryable(rsp, reason) => (Ok(rsp), reason),
                    Classified::Reset(reason) => (
                        Err(ProxyError::Reset {
                            service: Arc::clone(&target.service),
                            addr,
                        }),
                        reason,
                    ),
                }
            }
            Some(Err(e)) if e.is_retryable() => {
                let reason = e.reason();
                (Err(e), reason)
            }
            Some(Err(e)) => return Err(e),
            None => match timing.timed_out(per_try, Some(addr)) {
                e @ ProxyError::PerTryTimeout { .. } => (Err(e), "per_try_timeout"),
                // The whole call's time is up: nothing to retry.
                e => return Err(e),
            },
        };
        if !source.can_replay() {
            return last;
        }
        let free = matches!(&last, Err(e) if e.is_unprocessed()) && unprocessed < MAX_UNPROCESSED;
        if free {
            // Nothing was done by the server: resending costs it nothing
            // new, so neither an attempt nor the budget is spent.
            unprocessed += 1;
        } else if attempt >= allowed {
            return last;
        } else if !rule.budget().withdraw() {
            timing
                .metrics
                .retry_budget_exhausted
                .with_label_values(&[service])
                .inc();
            return last;
        }
        timing
            .metrics
            .retries
            .with_label_values(&[service, reason])
            .inc();
        attempts.retrying(attempt, addr, reason);
        tracing::debug!(service, endpoint = %addr, reason, attempt, "retrying");
        if free {
            continue;
        }
        let pause = backoff(policy.retry.backoff_base, policy.retry.backoff_max)
            .delay(attempt.saturating_sub(1));
        match timing.deadline {
            Some(d) if Instant::now() + pause >= d => return Err(timing.exceeded()),
            _ => tokio::time::sleep(pause).await,
        }
    }
}

/// Unprocessed attempts resent per request at most, so a server that
/// refuses every stream still ends the call.
const MAX_UNPROCESSED: u32 = 5;

/// Stands for the endpoint in an error when none was picked (the balance
/// layer records one before every send, so only in theory).
const NO_ENDPOINT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

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
