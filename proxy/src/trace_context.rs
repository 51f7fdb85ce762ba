//! W3C trace context: passes `traceparent` on, or starts a trace when absent.
//!
//! Without a trace collector the proxy records no spans of its own, so a valid
//! incoming header passes unchanged and an absent or malformed one is replaced
//! by a fresh trace. With one, [`crate::telemetry::Tracer::begin`] decides:
//! a sampled request continues with this sidecar's span as its parent.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderName, HeaderValue, Request};

use crate::telemetry::Tracer;

// Header names as `HeaderName`s: a lookup by `&str` parses the name first,
// which cost more than the lookup itself.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// The `sampled` bit of the trace flags.
pub const SAMPLED: u8 = 0x01;

#[derive(Clone, Default)]
pub struct TraceContextLayer {
    tracer: Option<Arc<Tracer>>,
}

impl TraceContextLayer {
    /// `tracer`: where sampled requests' spans go; `None` when tracing is off.
    pub fn new(tracer: Option<Arc<Tracer>>) -> Self {
        Self { tracer }
    }
}

impl<S> tower::Layer<S> for TraceContextLayer {
    type Service = TraceContext<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TraceContext {
            inner,
            tracer: self.tracer.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TraceContext<S> {
    inner: S,
    tracer: Option<Arc<Tracer>>,
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
        match &self.tracer {
            None => ensure(req.headers_mut()),
            Some(tracer) => {
                if let Some(span) = tracer.begin(req.headers_mut()) {
                    req.extensions_mut().insert(span);
                }
            }
        }
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
    headers.insert(TRACEPARENT, new_traceparent());
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

/// The fields of a valid `traceparent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub parent_id: u64,
    pub flags: u8,
}

pub fn parse_parts(v: &[u8]) -> Option<TraceParent> {
    let trace = parse(v)?;
    // `parse` checked the layout: version, 32 + 16 + 2 hex digits.
    let s = std::str::from_utf8(v).ok()?;
    let parent = s.get(36..52)?;
    let flags = s.get(53..55)?;
    Some(TraceParent {
        trace_id: u128::from_str_radix(trace, 16).ok()?,
        parent_id: u64::from_str_radix(parent, 16).ok()?,
        flags: u8::from_str_radix(flags, 16).ok()?,
    })
}

/// A `traceparent` value (version 00) for these ids and flags. Written digit
/// by digit: through `format!` it cost a few thousand instructions, more than
/// the rest of a request's trace handling together.
pub fn header(trace_id: u128, span_id: u64, flags: u8) -> HeaderValue {
    let mut s = [b'-'; 55];
    s[..2].copy_from_slice(b"00");
    hex_into(&mut s[3..35], trace_id);
    hex_into(&mut s[36..52], u128::from(span_id));
    hex_into(&mut s[53..55], u128::from(flags));
    let mut v = HeaderValue::from_bytes(&s).unwrap_or_else(|_| HeaderValue::from_static(FALLBACK));
    // Unique per request: indexing it in HPACK's dynamic table would only evict useful entries.
    v.set_sensitive(true);
    v
}

/// `v`'s low digits in lowercase hex, filling `out`.
fn hex_into(out: &mut [u8], mut v: u128) {
    for d in out.iter_mut().rev() {
        *d = b"0123456789abcdef"[(v & 0xf) as usize];
        v >>= 4;
    }
}

const FALLBACK: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A fresh trace, sampled: with no collector the proxy cannot tell, so it leaves the
/// decision to whoever records spans downstream.
fn new_traceparent() -> HeaderValue {
    header(fastrand::u128(1..), fastrand::u64(1..), SAMPLED)
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
    fn header_digits_at_the_edges() {
        let v = header(u128::MAX, 1, 0);
        let want = format!("00-{}-0000000000000001-00", "f".repeat(32));
        assert_eq!(v, want.as_str());
        assert_eq!(header(1, u64::MAX, 0xab).as_bytes()[52..], *b"-ab");
    }

    #[test]
    fn parts_round_trip_through_the_header() {
        let v = header(0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1);
        assert_eq!(v, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let p = parse_parts(v.as_bytes());
        assert_eq!(
            p,
            Some(TraceParent {
                trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
                parent_id: 0x00f067aa0ba902b7,
                flags: 1
            })
        );
        assert_eq!(parse_parts(b"00-0000-bad"), None);
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
