//! gRPC status codes by name: parsing what users type in flags (`UNAVAILABLE`, `unavailable`,
//! `Unavailable`, `14`) and the canonical UPPER_SNAKE names used in JSON output.

use tonic::Code;

const CODES: [(Code, &str); 17] = [
    (Code::Ok, "OK"),
    (Code::Cancelled, "CANCELLED"),
    (Code::Unknown, "UNKNOWN"),
    (Code::InvalidArgument, "INVALID_ARGUMENT"),
    (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
    (Code::NotFound, "NOT_FOUND"),
    (Code::AlreadyExists, "ALREADY_EXISTS"),
    (Code::PermissionDenied, "PERMISSION_DENIED"),
    (Code::ResourceExhausted, "RESOURCE_EXHAUSTED"),
    (Code::FailedPrecondition, "FAILED_PRECONDITION"),
    (Code::Aborted, "ABORTED"),
    (Code::OutOfRange, "OUT_OF_RANGE"),
    (Code::Unimplemented, "UNIMPLEMENTED"),
    (Code::Internal, "INTERNAL"),
    (Code::Unavailable, "UNAVAILABLE"),
    (Code::DataLoss, "DATA_LOSS"),
    (Code::Unauthenticated, "UNAUTHENTICATED"),
];

/// The canonical name of `code` as the gRPC spec spells it, e.g. `DEADLINE_EXCEEDED`.
pub fn code_name(code: Code) -> &'static str {
    CODES
        .iter()
        .find(|(c, _)| *c == code)
        .map_or("UNKNOWN", |(_, name)| name)
}

/// Folds case and separators so `DEADLINE_EXCEEDED`, `deadline-exceeded` and
/// `DeadlineExceeded` (tonic's Debug spelling) all compare equal.
fn fold(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '_' | '-' | ' '))
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// Parses a gRPC code given by name (any case, `_`/`-` optional) or by number `0..=16`.
pub fn parse_code(s: &str) -> Result<Code, String> {
    let s = s.trim();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
        return match s.parse::<i32>() {
            Ok(n @ 0..=16) => Ok(Code::from_i32(n)),
            _ => Err(format!("gRPC code number must be 0..=16, got {s}")),
        };
    }
    let folded = fold(s);
    // The American spelling is common in other gRPC implementations' docs.
    let folded = if folded == "CANCELED" {
        "CANCELLED".to_string()
    } else {
        folded
    };
    CODES
        .iter()
        .find(|(_, name)| fold(name) == folded)
        .map(|(code, _)| *code)
        .ok_or_else(|| {
            format!(
                "unknown gRPC code {s:?} (expected a name like UNAVAILABLE or DEADLINE_EXCEEDED, or a number 1..=16)"
            )
        })
}

/// Like [`parse_code`] but refuses `OK`: injecting a "failure" with status OK would be a
/// success that the caller could not tell apart from a real one.
pub fn parse_failure_code(s: &str) -> Result<Code, String> {
    match parse_code(s)? {
        Code::Ok => Err("OK (0) is not a failure code; use 1..=16".to_string()),
        code => Ok(code),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (code, name) in CODES {
            assert_eq!(code_name(code), name);
            assert_eq!(parse_code(name), Ok(code));
            assert_eq!(parse_code(&name.to_lowercase()), Ok(code));
            assert_eq!(parse_code(&format!("{code:?}")), Ok(code));
            assert_eq!(parse_code(&(code as i32).to_string()), Ok(code));
        }
    }

    #[test]
    fn accepts_variants() {
        assert_eq!(parse_code("deadline-exceeded"), Ok(Code::DeadlineExceeded));
        assert_eq!(parse_code(" Unavailable "), Ok(Code::Unavailable));
        assert_eq!(parse_code("canceled"), Ok(Code::Cancelled));
        assert_eq!(parse_code("14"), Ok(Code::Unavailable));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_code("17").is_err());
        assert!(parse_code("99999999999999").is_err());
        assert!(parse_code("-1").is_err());
        assert!(parse_code("").is_err());
        assert!(parse_code("NOPE").is_err());
        assert!(parse_failure_code("OK").is_err());
        assert!(parse_failure_code("0").is_err());
        assert_eq!(parse_failure_code("16"), Ok(Code::Unauthenticated));
    }
}
