//! The body type every layer of the request path speaks.
//!
//! Bodies stream: one boxed, type-erased body per request and per response,
//! never collected into memory. `Body` is a named type rather than an alias
//! of the boxed one so that `Service<Request<Body>>` bounds stay simple for
//! the compiler's auto-trait checks.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty};

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub struct Body(UnsyncBoxBody<Bytes, BoxError>);

pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Body(body.map_err(Into::into).boxed_unsync())
}

/// `hint` plus `n` bytes already in hand: the upper bound first, since
/// `SizeHint::set_lower` panics above the current upper bound (an exact
/// hint from a peer's `content-length` has lower == upper).
pub fn hint_plus(hint: SizeHint, n: u64) -> SizeHint {
    let mut h = SizeHint::new();
    if let Some(u) = hint.upper() {
        match u.checked_add(n) {
            Some(u) => h.set_upper(u),
            None => return h,
        }
    }
    h.set_lower(hint.lower().saturating_add(n));
    h
}

pin_project_lite::pin_project! {
    /// A body that keeps `guard` (a request counted in flight, a stream
    /// counted on its connection) until it ends, fails or is dropped.
    pub struct Guarded<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> Guarded<B, G> {
    pub fn new(inner: B, guard: Option<G>) -> Self {
        Self { inner, guard }
    }
}

impl<B, G> http_body::Body for Guarded<B, G>
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
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.guard.take();
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

pub fn empty() -> Body {
    boxed(Empty::<Bytes>::new())
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_plus_keeps_exact_hints_exact() {
        let h = hint_plus(SizeHint::with_exact(10), 5);
        assert_eq!(h.exact(), Some(15));
    }

    #[test]
    fn hint_plus_never_panics_at_the_edges() {
        let h = hint_plus(SizeHint::with_exact(u64::MAX), 1);
        assert_eq!(h.upper(), None);
        let mut open = SizeHint::new();
        open.set_lower(u64::MAX);
        assert_eq!(hint_plus(open, 7).lower(), u64::MAX);
        assert_eq!(hint_plus(SizeHint::new(), 3).lower(), 3);
    }
}
