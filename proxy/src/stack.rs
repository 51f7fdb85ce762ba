//! The HTTP request path, read top to bottom as a request travels it.
//!
//! Both directions use the same stack; they differ in how the target is named
//! (see [`crate::inbound`] and [`crate::outbound`]) and in the metric labels.

use std::sync::Arc;

use tower::ServiceBuilder;

use crate::access_log::AccessLog;
use crate::errors::{ErrorResponse, ErrorResponseLayer};
use crate::metrics::{Direction, Metrics};
use crate::observe::{Observe, ObserveLayer};
use crate::retry::{Retry, RetryLayer};
use crate::router::{Forward, Route, RouteLayer, Selector};
use crate::trace_context::{TraceContext, TraceContextLayer};

pub type HttpStack = TraceContext<Route<Observe<ErrorResponse<Retry<Forward>>>>>;

pub fn http(
    direction: Direction,
    selector: Selector,
    metrics: &Arc<Metrics>,
    log: Option<AccessLog>,
) -> HttpStack {
    ServiceBuilder::new()
        // 1. pass on W3C traceparent, or start a trace
        .layer(TraceContextLayer)
        // 2. name the target service (listener, :authority)
        .layer(RouteLayer::new(selector))
        // 3. count the request, follow the response to its end, log it
        .layer(ObserveLayer::new(direction, Arc::clone(metrics), log))
        // 4. the proxy's own failures become a gRPC status or HTTP 5xx
        .layer(ErrorResponseLayer::new(direction, Arc::clone(metrics)))
        // 5. retries within a budget, per-try timeouts, deadlines; each attempt
        //    picks an endpoint (round robin, skipping ejected ones)
        .layer(RetryLayer::new(Arc::clone(metrics)))
        // 6. send on the endpoint's pooled connection
        .service(Forward)
}
