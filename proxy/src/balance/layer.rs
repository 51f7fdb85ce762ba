//! The balance layer: one endpoint per attempt, and what the attempt taught
//! the balancer.
//!
//! Under [`crate::retry`], each attempt of a request passes here once. The
//! endpoint is the one the app dialed ([`Routed::pinned`]), else the
//! balancer's pick within the backend its route rule drew
//! ([`SelectedRule::subset`]), passing over the endpoint the previous attempt
//! failed on (recorded in the request's [`crate::retry::Attempts`]); the
//! request takes it down to Forward in its [`Routed`]. The outcome goes back to the balancer: an error of
//! the endpoint or a failed response head counts against it for failure
//! accrual, a good head for it; load-aware algorithms count the request in
//! flight until its response ends and learn its latency. What only the retry
//! layer learns (a per-try timeout, a status it read past a held head) it
//! reports itself, on the endpoint the attempts record names.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};

use super::{start_request, Algorithm, Balancer, InFlight};
use crate::body::{Body, Guarded};
use crate::endpoint::EndpointClient;
use crate::errors::{grpc_status, is_grpc, ProxyError};
use crate::on_demand::Unanswered;
use crate::router::{authority, Routed, UnservedPort};
use crate::routes::SelectedRule;

/// Whether a response's verdict waits for its first frame. The retry layer
/// reads the first frame of a gRPC response whose head carries no status
/// before deciding ([`crate::retry::classify`]) when the request may be
/// retried ([`Routed::may_hold`]); such a response's verdict is its to report.
pub fn held(rsp: &Response<Body>) -> bool {
    grpc_status(rsp.headers()).is_none() && !http_body::Body::is_end_stream(rsp.body())
}

#[derive(Clone, Copy, Debug, Default)]
pub struct BalanceLayer;

impl<S> tower::Layer<S> for BalanceLayer {
    type Service = Balance<S>;
    fn layer(&self, inner: S) -> Balance<S> {
        Balance { inner }
    }
}

#[derive(Clone)]
pub struct Balance<S> {
    inner: S,
}

impl<S> tower::Service<Request<Body>> for Balance<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = Feedback<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let grpc = is_grpc(req.headers());
        let (routed, rule) = match routed(&mut req) {
            Ok(routed) => routed,
            Err(e) => {
                return Feedback::Failed {
                    ready: std::future::ready(Err(e)),
                }
            }
        };
        let balancer = &routed.target.balancer;
        let picked = match routed.pinned {
            Some(addr) => balancer.get(addr),
            None => {
                let avoid = routed.attempts.latest_addr();
                balancer.pick(rule.subset(), avoid)
            }
        };
        let ep = match picked {
            Ok(ep) => ep,
            Err(e) => {
                return Feedback::Failed {
                    ready: std::future::ready(Err(e)),
                }
            }
        };
        routed.attempts.sent_to(&ep);
        let hold = routed.may_hold;
        let balancer = Arc::clone(balancer);
        let algorithm = balancer.algorithm();
        // Load-aware balancers need requests in flight counted until the
        // response ends; round robin does not pay for it.
        let in_flight = (algorithm != Algorithm::RoundRobin).then(|| start_request(&ep));
        let latency = (algorithm == Algorithm::P2cEwma).then(|| (Arc::clone(&ep), Instant::now()));
        let addr = ep.addr();
        routed.endpoint = Some(ep);
        Feedback::Sending {
            inner: self.inner.call(req),
            state: Some(Sent {
                balancer,
                rule,
                addr,
                grpc,
                hold,
                in_flight,
                latency,
            }),
        }
    }
}

/// What routing chose, with its rule, or why there is none.
fn routed(req: &mut Request<Body>) -> Result<(&mut Routed, SelectedRule), ProxyError> {
    let Some(rule) = Routed::of(req).and_then(|r| r.rule.clone()) else {
        return Err(unrouted(req));
    };
    // Present: it had the rule.
    let routed = req.extensions_mut().get_mut::<Routed>();
    routed
        .map(|r| (r, rule))
        .ok_or_else(|| ProxyError::NoRoute {
            authority: String::new(),
        })
}

/// Why routing found no target or no rule for the request.
fn unrouted(req: &Request<Body>) -> ProxyError {
    let ext = req.extensions();
    match ext.get::<Routed>() {
        Some(_) => ProxyError::NoRoute {
            authority: authority(req).to_string(),
        },
        None if ext.get::<UnservedPort>().is_some() => {
            let port = ext.get::<UnservedPort>().map_or(0, |p| p.0);
            ProxyError::PortNotServed { port }
        }
        // The control plane did not say in time which service the authority is.
        None if ext.get::<Unanswered>().is_some() => {
            let (destination, waited) = ext
                .get::<Unanswered>()
                .map(|u| (u.destination.clone(), u.waited))
                .unwrap_or_default();
            ProxyError::Unanswered {
                destination,
                waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            }
        }
        None => ProxyError::NoRoute {
            authority: authority(req).to_string(),
        },
    }
}

/// What is needed to report an attempt once its response head is in.
struct Sent {
    balancer: Arc<Balancer>,
    /// Whose retry policy says which statuses are failures.
    rule: SelectedRule,
    addr: SocketAddr,
    grpc: bool,
    hold: bool,
    in_flight: Option<InFlight>,
    /// For peak-EWMA: the endpoint and when the attempt started.
    latency: Option<(Arc<EndpointClient>, Instant)>,
}

impl Sent {
    fn finish(
        self,
        result: Result<Response<Body>, ProxyError>,
    ) -> Result<Response<Body>, ProxyError> {
        let rsp = match result {
            Ok(rsp) => rsp,
            Err(e) => {
                if e.is_retryable() || e.endpoint().is_some() {
                    self.balancer.report(self.addr, false);
                }
                return Err(e);
            }
        };
        if let Some((ep, started)) = self.latency {
            ep.load.observe(started.elapsed());
        }
        if !(self.grpc && self.hold && held(&rsp)) {
            let policy = &self.rule.rule().policy.retry;
            let failed = crate::retry::classify::is_failure(policy, self.grpc, &rsp);
            self.balancer.report(self.addr, !failed);
        }
        Ok(match self.in_flight {
            Some(guard) => rsp.map(|b| crate::body::boxed(Guarded::new(b, Some(guard)))),
            None => rsp,
        })
    }
}

pin_project_lite::pin_project! {
    /// The attempt's response future, reporting its outcome when it is ready.
    #[project = FeedbackProj]
    pub enum Feedback<F> {
        Sending { #[pin] inner: F, state: Option<Sent> },
        Failed { #[pin] ready: std::future::Ready<Result<Response<Body>, ProxyError>> },
    }
}

impl<F> Future for Feedback<F>
where
    F: Future<Output = Result<Response<Body>, ProxyError>>,
{
    type Output = Result<Response<Body>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            FeedbackProj::Failed { ready } => ready.poll(cx),
            FeedbackProj::Sending { inner, state } => {
                let result = std::task::ready!(inner.poll(cx));
                Poll::Ready(match state.take() {
                    Some(sent) => sent.finish(result),
                    None => result,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::policy::ServicePolicy;
    use crate::retry::Attempts;
    use crate::router::Target;
    use crate::routes::Routes;
    use tower::{Layer as _, Service as _, ServiceExt as _};

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    async fn target(ports: &[u16]) -> Arc<Target> {
        let metrics = crate::metrics::Metrics::new().unwrap();
        let policy = ServicePolicy::local_app();
        let params = super::super::ClientParams::for_service(
            &metrics,
            "svc",
            Default::default(),
            policy.accrual.clone(),
            false,
        );
        let addrs: Vec<SocketAddr> = ports.iter().map(|p| addr(*p)).collect();
        let updates = tokio::sync::watch::channel(crate::discovery::fixed(&addrs)).1;
        let balancer = Balancer::spawn(Arc::from("svc"), updates, params);
        for _ in 0..100 {
            if balancer.endpoint_addrs().len() == ports.len() {
                break;
            }
            tokio::task::yield_now().await;
        }
        Arc::new(Target::new(
            Arc::from("svc"),
            balancer,
            Routes::single("test", policy),
        ))
    }

    /// Answers with the endpoint the balance layer chose.
    fn echo_endpoint() -> impl tower::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = ProxyError,
        Future = impl Future<Output = Result<Response<Body>, ProxyError>>,
    > + Clone {
        tower::service_fn(|req: Request<Body>| async move {
            let routed = req.extensions().get::<Routed>().unwrap();
            let ep = routed.endpoint.as_ref().unwrap().addr();
            let mut rsp = Response::new(crate::body::empty());
            rsp.extensions_mut().insert(super::super::Upstream(ep));
            Ok(rsp)
        })
    }

    fn request(
        target: &Arc<Target>,
        attempts: Option<&Attempts>,
        pinned: Option<SocketAddr>,
    ) -> Request<Body> {
        let mut req = Request::new(crate::body::empty());
        let rule = SelectedRule::select(target.routes.load_full(), &req).unwrap();
        let mut routed = Routed::new(Arc::clone(target), Some(rule), pinned);
        if let Some(a) = attempts {
            routed.attempts = a.clone();
        }
        req.extensions_mut().insert(routed);
        req
    }

    fn served_by(rsp: &Response<Body>) -> SocketAddr {
        rsp.extensions().get::<super::super::Upstream>().unwrap().0
    }

    #[tokio::test]
    async fn each_attempt_avoids_the_endpoint_the_last_one_went_to() {
        let target = target(&[7001, 7002, 7003]).await;
        let mut svc = BalanceLayer.layer(echo_endpoint());
        let attempts = Attempts::default();
        let mut last = None;
        for _ in 0..6 {
            let req = request(&target, Some(&attempts), None);
            let rsp = svc.ready().await.unwrap().call(req).await.unwrap();
            let now = served_by(&rsp);
            let recorded = attempts.latest_addr();
            assert_eq!(recorded, Some(now), "the attempt's endpoint is recorded");
            assert_ne!(last, Some(now), "a retry goes elsewhere when it can");
            last = Some(now);
        }
    }

    #[tokio::test]
    async fn a_pinned_endpoint_is_used_and_an_unrouted_request_is_refused() {
        let target = target(&[7001, 7002]).await;
        let mut svc = BalanceLayer.layer(echo_endpoint());
        for _ in 0..3 {
            let req = request(&target, None, Some(addr(7002)));
            let rsp = svc.ready().await.unwrap().call(req).await.unwrap();
            assert_eq!(served_by(&rsp), addr(7002));
        }
        let mut req = Request::new(crate::body::empty());
        req.extensions_mut().insert(UnservedPort(6060));
        let result = svc.ready().await.unwrap().call(req).await;
        assert!(matches!(
            result,
            Err(ProxyError::PortNotServed { port: 6060 })
        ));
        let mut req = Request::new(crate::body::empty());
        req.extensions_mut()
            .insert(Routed::new(Arc::clone(&target), None, None));
        let result = svc.ready().await.unwrap().call(req).await;
        assert!(matches!(result, Err(ProxyError::NoRoute { .. })), "no rule");
    }
}
