//! Deadlines: reading an incoming `grpc-timeout` header, and telling a call that ran out of
//! time apart from one that was cancelled for another reason.

use std::time::Duration;
use tonic::{Code, Status};

/// Parses a `grpc-timeout` header value: up to 8 ASCII digits and a unit
/// (`H`, `M`, `S`, `m` milli, `u` micro, `n` nano), as the gRPC HTTP/2 spec defines it.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit = value.chars().last()?;
    let digits = value.get(..value.len() - unit.len_utf8())?;
    if digits.is_empty() || digits.len() > 8 || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The code to report for a failed call. tonic's channel enforces the deadline we send in
/// `grpc-timeout` itself and reports its expiry as CANCELLED; every other gRPC client calls
/// that DEADLINE_EXCEEDED, and so do Tern's error counts and HTTP mapping.
pub fn effective_code(status: &Status, elapsed: Duration, deadline: Duration) -> Code {
    match status.code() {
        Code::Cancelled if elapsed >= deadline => Code::DeadlineExceeded,
        code => code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
    }

    #[test]
    fn rejects_malformed() {
        for bad in ["", "S", "123456789S", "10x", "1.5S", "-1S", "10é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cancelled_after_deadline_is_deadline_exceeded() {
        let d = Duration::from_millis(100);
        let st = Status::cancelled("Timeout expired");
        assert_eq!(effective_code(&st, d, d), Code::DeadlineExceeded);
        assert_eq!(effective_code(&st, d / 2, d), Code::Cancelled);
        let un = Status::unavailable("down");
        assert_eq!(effective_code(&un, d * 2, d), Code::Unavailable);
    }
}
