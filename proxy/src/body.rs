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
