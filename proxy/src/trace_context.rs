//! W3C trace context: passes `traceparent` on, or starts a trace when absent.
//!
//! The proxy records no spans of its own, so a valid incoming header passes
//! unchanged; an absent or malformed one is replaced by a fresh trace.

use std::task::{Context, Poll};

use http::{HeaderMap, HeaderValue, Request};

pub const TRACEPARENT: &str = "traceparent";

#[derive(Clone, Copy, Debug, Default)]
pub struct TraceContextLayer;

impl<S> tower::Layer<S> for TraceContextLayer {
    type Service = TraceContext<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TraceContext { inner }
    }
}

#[derive(Clone, Debug)]
pub struct TraceContext<S> {
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for TraceContext<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        ensure(req.headers_mut());
        self.inner.call(req)
    }
}

pub fn ensure(headers: &mut HeaderMap) {
    if headers
        .get(TRACEPARENT)
        .is_some_and(|v| parse(v.as_bytes()).is_some())
    {
        return;
    }
    let mut v = new_traceparent();
    // Unique per request: indexing it in HPACK's dynamic table would only evict useful entries.
    v.set_sensitive(true);
    headers.insert(TRACEPARENT, v);
}

/// The trace id of a valid `traceparent` header.
pub fn trace_id(headers: &HeaderMap) -> &str {
    headers
        .get(TRACEPARENT)
        .and_then(|v| parse(v.as_bytes()))
        .unwrap_or("")
}

/// `version-traceid-parentid-flags`, all lowercase hex; all-zero ids are invalid.
fn parse(v: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(v).ok()?;
    let mut parts = s.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0')
        && (version != "00" || parts.next().is_none());
    ok.then_some(trace)
}

fn new_traceparent() -> HeaderValue {
    let trace = fastrand::u128(1..);
    let span = fastrand::u64(1..);
    let s = format!("00-{trace:032x}-{span:016x}-01");
    HeaderValue::from_str(&s).unwrap_or_else(|_| {
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_header_passes_unchanged() {
        let mut h = HeaderMap::new();
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert(TRACEPARENT, HeaderValue::from_static(v));
        ensure(&mut h);
        assert_eq!(h[TRACEPARENT], v);
        assert_eq!(trace_id(&h), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn missing_or_bad_header_starts_a_trace() {
        for bad in [
            None,
            Some("00-0000-bad"),
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        ] {
            let mut h = HeaderMap::new();
            if let Some(b) = bad {
                h.insert(TRACEPARENT, HeaderValue::from_static(b));
            }
            ensure(&mut h);
            assert_eq!(trace_id(&h).len(), 32, "{bad:?}");
        }
    }
}
