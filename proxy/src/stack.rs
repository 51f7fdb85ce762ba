//! The HTTP request path, read top to bottom as a request travels it.
//!
//! Both directions use the same stack; they differ in how the target is named
//! (see [`crate::inbound`] and [`crate::outbound`]), in the metric labels, and
//! in that only inbound requests are authorized (see [`crate::authz`]).

use std::sync::Arc;

use tower::ServiceBuilder;

use crate::access_log::AccessLog;
use crate::authz::{Authorize, AuthorizeLayer, SharedPolicy};
use crate::balance::{Balance, BalanceLayer};
use crate::config::limits::Limits;
use crate::errors::{ErrorResponse, ErrorResponseLayer};
use crate::metrics::{Direction, Metrics};
use crate::observe::{Observe, ObserveLayer};
use crate::on_demand::OnDemand;
use crate::retry::{Retry, RetryLayer};
use crate::router::{Forward, Route, RouteLayer, Selector};
use crate::tap::Tap;
use crate::telemetry::Tracer;
use crate::trace_context::{TraceContext, TraceContextLayer};

pub type HttpStack = Stack<Forward>;

/// The stack over any bottom service (tests put a stub where [`Forward`] goes).
pub type Stack<S> = TraceContext<Route<Observe<ErrorResponse<Authorize<Retry<Balance<S>>>>>>>;

/// `inbound_authz`: the inbound authorization policy in force (see
/// [`crate::authz::Policy::shared`]); `None` for outbound listeners, which
/// authorize nothing. `tap`: where requests are reported while someone taps.
/// `on_demand`: where unknown authorities are looked up (outbound listeners
/// with a control plane).
#[allow(clippy::too_many_arguments)]
pub fn http(
    direction: Direction,
    selector: Selector,
    metrics: &Arc<Metrics>,
    log: Option<AccessLog>,
    inbound_authz: Option<SharedPolicy>,
    limits: &Limits,
    tracer: Option<Arc<Tracer>>,
    tap: Option<Tap>,
    on_demand: Option<Arc<OnDemand>>,
) -> HttpStack {
    http_over(
        direction,
        selector,
        metrics,
        log,
        inbound_authz,
        limits,
        tracer,
        tap,
        on_demand,
        Forward,
    )
}

// One argument per layer that needs one: a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn http_over<S>(
    direction: Direction,
    selector: Selector,
    metrics: &Arc<Metrics>,
    log: Option<AccessLog>,
    inbound_authz: Option<SharedPolicy>,
    limits: &Limits,
    tracer: Option<Arc<Tracer>>,
    tap: Option<Tap>,
    on_demand: Option<Arc<OnDemand>>,
    bottom: S,
) -> Stack<S> {
    ServiceBuilder::new()
        // 1. pass on W3C traceparent, or start a trace; with a tracer, decide
        //    whether the request is sampled and make this sidecar's span its parent
        .layer(TraceContextLayer::new(tracer))
        // 2. name the target service (listener, :authority) and the route
        //    rule the request falls under, with the backend drawn for it; an
        //    authority no known service has waits for the control plane to
        //    say which service it is (outbound, with a control plane)
        .layer(RouteLayer::new(selector, on_demand))
        // 3. count the request, follow the response to its end, log it
        //    (and finish its span, when sampled; report it to /tap, when tapped)
        .layer(ObserveLayer::new(direction, Arc::clone(metrics), log, tap))
        // 4. the proxy's own failures become a gRPC status or HTTP 4xx/5xx;
        //    a request head over the header limit stops here
        .layer(ErrorResponseLayer::new(
            direction,
            Arc::clone(metrics),
            limits.max_header_list_size,
        ))
        // 5. inbound only: callers the authorization policy does not allow
        //    stop here (PERMISSION_DENIED / 403), still logged and counted
        .layer(AuthorizeLayer::new(
            direction,
            inbound_authz,
            Arc::clone(metrics),
        ))
        // 6. deadlines and per-try timeouts; retries within a budget when
        //    the rule allows them (only then is the body kept for replay)
        .layer(RetryLayer::new(
            Arc::clone(metrics),
            limits.response_timeout,
        ))
        // 7. each attempt's endpoint (pinned, or picked within the rule's
        //    backend, skipping ejected ones), and its outcome fed back to the
        //    balancer: failure accrual, requests in flight, latency
        .layer(BalanceLayer)
        // 8. send on the endpoint's pooled connection
        .service(bottom)
}
