//! gRPC deadlines: the `grpc-timeout` header.
//!
//! An incoming deadline bounds everything the proxy does for the call, and
//! each attempt passes on what is left of it, so the server never sees more
//! time than the caller gave.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The request's deadline: `Ok(None)` without `grpc-timeout`, `Err` with the
/// offending value when it is not exactly one valid timeout. An invalid one
/// is never forwarded: some servers fail every later call on the connection
/// that carried it, which the sidecar shares among its callers.
pub fn from_headers(headers: &HeaderMap) -> Result<Option<Duration>, String> {
    let mut values = headers.get_all(GRPC_TIMEOUT).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("more than one value".to_string());
    }
    parse(v).map(Some).ok_or_else(|| {
        String::from_utf8_lossy(v.as_bytes())
            .chars()
            .take(32)
            .collect()
    })
}

/// Parses `grpc-timeout`: 1 to 8 ASCII digits and a unit (H, M, S, m, u, n).
pub fn parse(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes `d` in the finest unit that fits in 8 digits.
pub fn encode(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos();
    let s = if nanos <= MAX {
        format!("{nanos}n")
    } else if d.as_micros() <= MAX {
        format!("{}u", d.as_micros())
    } else if d.as_millis() <= MAX {
        format!("{}m", d.as_millis())
    } else if u128::from(d.as_secs()) <= MAX {
        format!("{}S", d.as_secs())
    } else {
        format!("{}M", (d.as_secs() / 60).min(99_999_999))
    };
    HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("99999999M"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parse_units_and_reject_garbage() {
        let p = |s: &'static str| parse(&HeaderValue::from_static(s));
        assert_eq!(p("100m"), Some(Duration::from_millis(100)));
        assert_eq!(p("2S"), Some(Duration::from_secs(2)));
        assert_eq!(p("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(p("5u"), Some(Duration::from_micros(5)));
        assert_eq!(p("123456789m"), None);
        assert_eq!(p("m"), None);
        assert_eq!(p("10x"), None);
        assert_eq!(p("-1m"), None);
        assert_eq!(p("-1S"), None);
        assert_eq!(p("abc"), None);
        assert_eq!(p("99999999999H"), None);
        assert_eq!(p("1000000000n"), None);
        assert_eq!(p("+1S"), None);
        assert_eq!(p(" 1S"), None);
        assert_eq!(p(""), None);
        assert_eq!(p("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
    }

    #[test]
    fn from_headers_rejects_invalid_and_repeated_values() {
        let mut h = HeaderMap::new();
        assert_eq!(from_headers(&h), Ok(None));
        h.insert(GRPC_TIMEOUT, HeaderValue::from_static("5S"));
        assert_eq!(from_headers(&h), Ok(Some(Duration::from_secs(5))));
        h.append(GRPC_TIMEOUT, HeaderValue::from_static("5S"));
        assert!(from_headers(&h).is_err());
        h.insert(GRPC_TIMEOUT, HeaderValue::from_static("-1S"));
        assert_eq!(from_headers(&h), Err("-1S".to_string()));
    }

    #[test]
    fn encode_round_trips_within_precision() {
        for d in [
            Duration::from_millis(99),
            Duration::from_secs(5),
            Duration::from_secs(86_400),
        ] {
            let back = parse(&encode(d)).unwrap();
            assert!(
                back <= d && d - back < Duration::from_secs(1),
                "{d:?} -> {back:?}"
            );
        }
    }
}
