//! `traceparent` from callers: a valid one passes unchanged, anything else
//! is replaced by a fresh, valid trace.
#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tern_proxy::trace_context::{ensure, trace_id, TRACEPARENT};

fuzz_target!(|data: &[u8]| {
    let Ok(v) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut h = HeaderMap::new();
    h.insert(TRACEPARENT, v.clone());
    let incoming = trace_id(&h).to_owned();
    ensure(&mut h);
    if incoming.is_empty() {
        assert_ne!(h[TRACEPARENT], v, "an invalid traceparent was passed on");
    } else {
        assert_eq!(h[TRACEPARENT], v, "a valid traceparent was changed");
        assert_eq!(trace_id(&h), incoming);
        assert_eq!(v.as_bytes().get(3..35), Some(incoming.as_bytes()));
    }
    let id = trace_id(&h);
    assert_eq!(id.len(), 32, "{:?}", h[TRACEPARENT]);
    assert!(id
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert!(id.bytes().any(|b| b != b'0'));
    let once = h.clone();
    ensure(&mut h);
    assert_eq!(h, once, "ensure is not idempotent");
});
