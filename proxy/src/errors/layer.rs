//! The layer that turns the proxy's own failures into the caller's
//! response (see [`super::ProxyError::to_response`]), with a log line and a
//! metric; a request head over the header limit stops here.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};

use super::{is_grpc, ProxyError, ProxyErrorReason};
use crate::balance::Upstream;
use crate::body::Body;
use crate::metrics::{Direction, Metrics};
use crate::router::Routed;

/// Turns a [`ProxyError`] into the caller's response, with a log line and a metric.
#[derive(Clone)]
pub struct ErrorResponseLayer {
    direction: Direction,
    metrics: Arc<Metrics>,
    max_header_list_size: u32,
}

impl ErrorResponseLayer {
    pub fn new(direction: Direction, metrics: Arc<Metrics>, max_header_list_size: u32) -> Self {
        Self {
            direction,
            metrics,
            max_header_list_size,
        }
    }

    /// A request head over the limit: hyper and h2 let up to twice the limit
    /// through (see [`crate::limits`]) so that it can be answered and counted here.
    fn check_head(&self, req: &Request<Body>) -> Result<(), ProxyError> {
        let size = crate::limits::header_list_size(req.headers());
        let limit = self.max_header_list_size;
        if size <= limit as usize {
            return Ok(());
        }
        self.metrics
            .protocol_rejections
            .with_label_values(&[self.direction.as_str(), "header_list_size"])
            .inc();
        Err(ProxyError::RequestHeadersTooLarge { size, limit })
    }
}

impl<S> tower::Layer<S> for ErrorResponseLayer {
    type Service = ErrorResponse<S>;
    fn layer(&self, inner: S) -> ErrorResponse<S> {
        ErrorResponse {
            layer: self.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct ErrorResponse<S> {
    layer: ErrorResponseLayer,
    inner: S,
}

impl<S> tower::Service<Request<Body>> for ErrorResponse<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ErrorFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The stack's services are always ready; an error here would be a
        // programming error, surfaced per request by `call` instead.
        let _ = self.inner.poll_ready(cx);
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let answer = Answer {
            grpc: is_grpc(req.headers()),
            service: Routed::of(&req).map(|r| Arc::clone(&r.target.service)),
            layer: self.layer.clone(),
        };
        match self.layer.check_head(&req) {
            Ok(()) => ErrorFuture::Sending {
                inner: self.inner.call(req),
                answer,
            },
            Err(e) => ErrorFuture::Refused {
                ready: std::future::ready(Ok(answer.respond(e))),
            },
        }
    }
}

/// What turning the request's error into its response needs.
struct Answer {
    grpc: bool,
    service: Option<Arc<str>>,
    layer: ErrorResponseLayer,
}

impl Answer {
    fn respond(&self, e: ProxyError) -> Response<Body> {
        let layer = &self.layer;
        let service = self.service.as_deref().unwrap_or("unknown");
        // A refused port was logged, rate-limited, where it was
        // refused (`AppPorts::refuse`): any caller can cause it.
        if !matches!(e, ProxyError::PortNotServed { .. }) {
            tracing::warn!(
                direction = layer.direction.as_str(),
                service,
                reason = e.reason(),
                error = %e,
                "request failed in proxy"
            );
        }
        layer
            .metrics
            .proxy_errors
            .with_label_values(&[layer.direction.as_str(), service, e.reason()])
            .inc();
        let mut rsp = e.to_response(self.grpc);
        rsp.extensions_mut().insert(ProxyErrorReason(e.reason()));
        if let Some(addr) = e.endpoint() {
            rsp.extensions_mut().insert(Upstream(addr));
        }
        rsp
    }
}

pin_project_lite::pin_project! {
    /// The response future: the inner one's error becomes the caller's
    /// response. A concrete type, not a box: it lives inside the request's
    /// task with the futures around it.
    #[project = ErrorFutureProj]
    pub enum ErrorFuture<F> {
        Sending { #[pin] inner: F, answer: Answer },
        Refused { #[pin] ready: std::future::Ready<Result<Response<Body>, Infallible>> },
    }
}

impl<F> Future for ErrorFuture<F>
where
    F: Future<Output = Result<Response<Body>, ProxyError>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ErrorFutureProj::Refused { ready } => ready.poll(cx),
            ErrorFutureProj::Sending { inner, answer } => {
                Poll::Ready(Ok(match std::task::ready!(inner.poll(cx)) {
                    Ok(rsp) => rsp,
                    Err(e) => answer.respond(e),
                }))
            }
        }
    }
}
