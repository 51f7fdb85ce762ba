//! gRPC metadata the proxy reads from callers and servers: `grpc-timeout`,
//! `grpc-status`, and the percent-encoding of the `grpc-message` it writes.
#![no_main]

use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tern_proxy::errors::{grpc_status, percent_encode};
use tern_proxy::retry::deadline;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = HeaderValue::from_bytes(data) {
        if let Some(d) = deadline::parse(&v) {
            // What an attempt passes on never exceeds what the caller gave.
            let back = deadline::parse(&deadline::encode(d)).expect("encode's output parses");
            assert!(back <= d, "{v:?}: {d:?} re-encoded as {back:?}");
        }
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", v);
        if let Some(code) = grpc_status(&headers) {
            headers.insert("grpc-status", HeaderValue::from(code));
            assert_eq!(grpc_status(&headers), Some(code));
        }
    }

    // Any duration, encoded, parses back to no more than itself (and loses
    // less than a minute, the coarsest unit, unless it is capped).
    if let Some((secs, rest)) = data.split_first_chunk::<8>() {
        let nanos = rest
            .first_chunk::<4>()
            .map_or(0, |n| u32::from_le_bytes(*n));
        let d = Duration::new(u64::from_le_bytes(*secs), nanos % 1_000_000_000);
        let back = deadline::parse(&deadline::encode(d)).expect("encode's output parses");
        assert!(back <= d, "{d:?} re-encoded as {back:?}");
        if d.as_secs() < 99_999_999 * 60 {
            assert!(
                d - back < Duration::from_secs(60),
                "{d:?} re-encoded as {back:?}"
            );
        }
    }

    // grpc-message: always a valid header value, and decodes to the message.
    let msg = String::from_utf8_lossy(data);
    let encoded = percent_encode(&msg);
    assert!(HeaderValue::from_str(&encoded).is_ok(), "{encoded:?}");
    assert_eq!(percent_decode(encoded.as_bytes()), msg.as_bytes());
});

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = std::str::from_utf8(&s[i + 1..i + 3]).expect("ASCII");
            out.push(u8::from_str_radix(hex, 16).expect("two hex digits"));
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}
