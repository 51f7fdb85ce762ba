//! Moving a gRPC error status from the response headers to trailers.
//!
//! gRPC servers usually answer an error "trailers-only": one HEADERS frame
//! carrying `grpc-status`. Some send response headers first and the status
//! in trailers after an empty body. `pay --fail-style headers-then-trailers`
//! answers that way, so a mesh's retries can be checked against both shapes.

use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::StreamBody;

const STATUS_HEADERS: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];

#[derive(Clone, Copy, Debug, Default)]
pub struct HeadersThenTrailersLayer;

impl<S> tower::Layer<S> for HeadersThenTrailersLayer {
    type Service = HeadersThenTrailers<S>;
    fn layer(&self, inner: S) -> Self::Service {
        HeadersThenTrailers { inner }
    }
}

#[derive(Clone, Debug)]
pub struct HeadersThenTrailers<S> {
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for HeadersThenTrailers<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut rsp = fut.await?;
            if !rsp.headers().contains_key("grpc-status") {
                return Ok(rsp);
            }
            let mut trailers = HeaderMap::new();
            for name in STATUS_HEADERS {
                if let Some(v) = rsp.headers_mut().remove(name) {
                    trailers.insert(name, v);
                }
            }
            let frames = futures::stream::iter([Ok::<_, std::convert::Infallible>(
                Frame::<Bytes>::trailers(trailers),
            )]);
            *rsp.body_mut() = tonic::body::Body::new(StreamBody::new(frames));
            Ok(rsp)
        })
    }
}
