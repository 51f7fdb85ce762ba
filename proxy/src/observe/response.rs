//! Following a request's response to its end: the future that waits for
//! its head, the response body passed through frame by frame while it is
//! measured, and the request body counted as it streams upstream.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body::{Body as _, Frame, SizeHint};

use super::{Completion, Outcome};
use crate::body::{Body, BoxError};
use crate::errors::{grpc_status, ProxyErrorReason};

pin_project_lite::pin_project! {
    /// The response future: on the head, records status and upstream and
    /// hands the rest of the record to the body. A concrete type, not a
    /// box: it lives inside the request's task with the futures around it.
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        pending: Pending,
    }
}

impl<F> ObserveFuture<F> {
    pub(super) fn new(inner: F, pending: Pending) -> Self {
        Self { inner, pending }
    }
}

impl<F> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<ObservedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(rsp) = std::task::ready!(this.inner.poll(cx));
        let (parts, inner) = rsp.into_parts();
        let mut done = this.pending.0.take();
        if let Some(c) = done.as_mut() {
            c.status = parts.status.as_u16();
            c.grpc_status = grpc_status(&parts.headers);
            c.error = parts.extensions.get::<ProxyErrorReason>().map(|r| r.0);
            c.upstream_from(&parts.extensions);
        }
        let mut body = ObservedBody { inner, done };
        if body.inner.is_end_stream() {
            body.finish(Outcome::Complete);
        }
        Poll::Ready(Ok(Response::from_parts(parts, body)))
    }
}

/// Records a request whose caller left before any response came back.
pub(super) struct Pending(pub(super) Option<Box<Completion>>);

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            (*c).finish(Outcome::Cancelled);
        }
    }
}

pin_project_lite::pin_project! {
    /// The response body, passed through frame by frame while it is measured.
    pub struct ObservedBody {
        #[pin]
        inner: Body,
        done: Option<Box<Completion>>,
    }

    impl PinnedDrop for ObservedBody {
        fn drop(this: Pin<&mut Self>) {
            if let Some(c) = this.project().done.take() {
                (*c).finish(Outcome::Cancelled);
            }
        }
    }
}

impl ObservedBody {
    fn finish(&mut self, outcome: Outcome) {
        if let Some(c) = self.done.take() {
            (*c).finish(outcome);
        }
    }
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(c) = this.done.as_mut() {
                    if let Some(d) = frame.data_ref() {
                        c.bytes_out += d.len() as u64;
                    } else if let Some(t) = frame.trailers_ref() {
                        c.grpc_status = grpc_status(t).or(c.grpc_status);
                    }
                }
                // A server writing a Content-Length body stops polling after the
                // last byte, so the end is seen here rather than as `None`.
                if this.inner.is_end_stream() {
                    if let Some(c) = this.done.take() {
                        (*c).finish(Outcome::Complete);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(c) = this.done.take() {
                    (*c).finish(Outcome::Reset);
                }
            }
            Poll::Ready(None) => {
                if let Some(c) = this.done.take() {
                    (*c).finish(Outcome::Complete);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// The request body, counted as it streams upstream.
    pub(super) struct CountingBody<B> {
        #[pin]
        pub(super) inner: B,
        pub(super) bytes: Arc<AtomicU64>,
    }
}

impl<B> http_body::Body for CountingBody<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(d) = frame.data_ref() {
                this.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
