//! gRPC status codes by name, shared by the proxy (metrics, config) and the
//! control plane (config validation), so both spell them the same way.

/// Canonical names, indexed by code.
pub const NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The canonical name of `code`, or `INVALID_CODE` past 16.
pub fn name(code: u32) -> &'static str {
    NAMES.get(code as usize).copied().unwrap_or("INVALID_CODE")
}

/// A code by name (any case, `-` or `_`) or by number.
pub fn parse(s: &str) -> Option<u32> {
    if let Ok(n) = s.trim().parse::<u32>() {
        return (n as usize).lt(&NAMES.len()).then_some(n);
    }
    let norm = s.trim().to_ascii_uppercase().replace('-', "_");
    NAMES.iter().position(|n| *n == norm).map(|p| p as u32)
}

/// Codes a proxy must never retry: the server answered them on purpose.
pub fn never_retried(code: u32) -> bool {
    matches!(code, 0 | 3 | 7 | 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_round_trip() {
        assert_eq!(parse("unavailable"), Some(14));
        assert_eq!(parse("deadline-exceeded"), Some(4));
        assert_eq!(parse("16"), Some(16));
        assert_eq!(parse("17"), None);
        assert_eq!(parse("nope"), None);
        assert_eq!(name(14), "UNAVAILABLE");
        assert_eq!(name(99), "INVALID_CODE");
        assert!(never_retried(7) && !never_retried(14));
    }
}
