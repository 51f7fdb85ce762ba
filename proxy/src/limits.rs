//! Enforcing the protocol limits of [`crate::config::limits`] on the request
//! path: header block sizes both ways, and response trailers that would
//! otherwise be cut short without a word.
//!
//! hyper and h2 are given twice the configured header limit as their own hard
//! bound (memory stays bounded), so that a block over the limit reaches this
//! module, which answers it with a status that says so and counts it. Only a
//! block over twice the limit is refused by h2 itself (431, or a reset
//! stream), uncounted.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Frame, SizeHint};
use prometheus::IntCounter;

use crate::body::{Body, BoxError};
use crate::errors::PROXY_ERROR_HEADER;

/// What hyper and h2 are configured with: the hard bound past which they
/// refuse a header block themselves.
pub fn hard_header_list_size(limit: u32) -> u32 {
    limit.saturating_mul(2)
}

/// A header block's size as HTTP/2 counts it (RFC 9113 §6.5.2): name and
/// value lengths plus 32 bytes per field.
pub fn header_list_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum()
}

/// A response body whose trailers are checked against the header limit: an
/// oversized trailer block becomes a gRPC INTERNAL status naming the limit
/// (for gRPC), or is dropped with a log line, and is counted either way.
pub struct CheckedTrailers<B = Body> {
    inner: B,
    limit: usize,
    grpc: bool,
    rejected: IntCounter,
}

impl<B> CheckedTrailers<B> {
    pub fn new(inner: B, limit: u32, grpc: bool, rejected: IntCounter) -> Self {
        Self {
            inner,
            limit: limit as usize,
            grpc,
            rejected,
        }
    }

    fn replace(&self, size: usize) -> HeaderMap {
        self.rejected.inc();
        let message = format!(
            "response trailers of {size} bytes exceed the proxy's limit of {} bytes",
            self.limit
        );
        tracing::warn!(
            size,
            limit = self.limit,
            "dropped oversized response trailers"
        );
        let mut t = HeaderMap::new();
        if self.grpc {
            t.insert("grpc-status", HeaderValue::from_static("13"));
            if let Ok(v) = HeaderValue::from_str(&message) {
                t.insert("grpc-message", v.clone());
                t.insert(PROXY_ERROR_HEADER, v);
            }
        } else if let Ok(v) = HeaderValue::from_str(&message) {
            t.insert(PROXY_ERROR_HEADER, v);
        }
        t
    }
}

// Generic over the body so the upstream's body is wrapped as it comes, not
// boxed twice per response.
impl<B> http_body::Body for CheckedTrailers<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => f,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        let size = frame.trailers_ref().map_or(0, header_list_size);
        if size > self.limit {
            let t = self.replace(size);
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::{BodyExt as _, StreamBody};

    fn with_trailer(value_len: usize) -> Body {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("7"));
        t.insert(
            "x-big",
            HeaderValue::from_str(&"a".repeat(value_len)).unwrap(),
        );
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"msg"))),
            Ok(Frame::trailers(t)),
        ];
        crate::body::boxed(StreamBody::new(futures::stream::iter(frames)))
    }

    #[tokio::test]
    async fn trailers_within_the_limit_pass_unchanged() {
        let c = IntCounter::new("c", "c").unwrap();
        let b = CheckedTrailers::new(with_trailer(100), 4096, true, c.clone());
        let t = b.collect().await.unwrap().trailers().cloned().unwrap();
        assert_eq!(t["grpc-status"], "7");
        assert_eq!(c.get(), 0);
    }

    #[tokio::test]
    async fn oversized_trailers_become_internal_and_are_counted() {
        let c = IntCounter::new("c", "c").unwrap();
        let b = CheckedTrailers::new(with_trailer(5000), 4096, true, c.clone());
        let collected = b.collect().await.unwrap();
        let t = collected.trailers().cloned().unwrap();
        assert_eq!(t["grpc-status"], "13");
        assert!(t["grpc-message"].to_str().unwrap().contains("4096"));
        assert_eq!(collected.to_bytes(), "msg");
        assert_eq!(c.get(), 1);
    }

    #[test]
    fn size_counts_32_bytes_per_field() {
        let mut h = HeaderMap::new();
        h.insert("ab", HeaderValue::from_static("cde"));
        assert_eq!(header_list_size(&h), 37);
    }
}
