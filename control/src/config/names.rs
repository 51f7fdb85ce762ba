//! Syntax checks shared by every kind: names, label selectors, identities,
//! durations and gRPC status codes. Each returns the reason a value is bad,
//! and the caller adds the file, document and field.

use std::time::Duration;

use tern_proto::grpc_code;

/// A DNS-1123 label (`pay`, `order-v2`): how services and namespaces are
/// named, so that `pay.ns` can be split unambiguously.
pub fn dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!("`{s}` is longer than 63 characters"));
    }
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = !s.starts_with('-') && !s.ends_with('-');
    if ok_chars && ok_ends {
        Ok(())
    } else {
        Err(format!(
            "`{s}` is not a DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit)"
        ))
    }
}

/// A DNS-1123 subdomain (`pay-retries`, `pay.default.svc.cluster.local`).
pub fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err(format!("`{s}` is longer than 253 characters"));
    }
    for part in s.split('.') {
        dns_label(part).map_err(|_| format!("`{s}` is not a DNS name"))?;
    }
    Ok(())
}

/// A Kubernetes label key: optional `prefix/` (a DNS subdomain) and a name.
pub fn label_key(k: &str) -> Result<(), String> {
    let name = match k.split_once('/') {
        Some((prefix, name)) => {
            dns_subdomain(prefix).map_err(|_| format!("label key `{k}` has a bad prefix"))?;
            name
        }
        None => k,
    };
    if name.is_empty() || !label_chars(name) {
        return Err(format!(
            "`{k}` is not a label key (up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// A Kubernetes label value: empty, or like a label key's name part.
pub fn label_value(v: &str) -> Result<(), String> {
    if v.is_empty() || label_chars(v) {
        Ok(())
    } else {
        Err(format!(
            "`{v}` is not a label value (up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"
        ))
    }
}

fn label_chars(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    s.len() <= 63
        && alnum(s.chars().next())
        && alnum(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `spiffe://<trust-domain>/<path>`, as carried in a certificate's URI SAN.
pub fn spiffe_id(s: &str) -> Result<(), String> {
    let bad = || {
        format!("`{s}` is not a SPIFFE id (spiffe://<trust-domain>/ns/<namespace>/sa/<account>)")
    };
    let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
    let (domain, path) = rest.split_once('/').ok_or_else(bad)?;
    let domain_ok = !domain.is_empty()
        && domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    let path_ok = !path.is_empty()
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        });
    if domain_ok && path_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// A protobuf full name such as `tern.demo.v1.PayService`.
pub fn proto_full_name(s: &str) -> Result<(), String> {
    if !s.is_empty() && s.split('.').all(proto_ident) {
        Ok(())
    } else {
        Err(format!(
            "`{s}` is not a gRPC service name (like tern.demo.v1.PayService)"
        ))
    }
}

/// A protobuf identifier such as a method name (`Pay`).
pub fn proto_method(s: &str) -> Result<(), String> {
    if proto_ident(s) {
        Ok(())
    } else {
        Err(format!("`{s}` is not a gRPC method name (like Pay)"))
    }
}

fn proto_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// An HTTP header name, lowercase as HTTP/2 requires.
pub fn header_name(s: &str) -> Result<(), String> {
    let token =
        |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b);
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!("`{s}` must be lowercase"));
    }
    if s.bytes().all(token) {
        Ok(())
    } else {
        Err(format!("`{s}` is not an HTTP header name"))
    }
}

/// A positive duration in humantime syntax (`250ms`, `2s`, `1m30s`), whole
/// milliseconds since that is what the push API carries.
pub fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration like 250ms or 2s: {e}"))?;
    if d < Duration::from_millis(1) {
        return Err(format!("`{s}` must be at least 1ms"));
    }
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!("`{s}` must be whole milliseconds"));
    }
    Ok(d)
}

/// A retryable gRPC status code by name (any case, `-` or `_`) or number.
pub fn retryable_grpc_code(s: &str) -> Result<u32, String> {
    let code = grpc_code::parse(s).ok_or_else(|| format!("`{s}` is not a gRPC status code"))?;
    // Retrying these would repeat a call that the server answered on purpose.
    if grpc_code::never_retried(code) {
        return Err(format!(
            "`{s}` is never retried (OK, INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED)"
        ));
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_and_labels() {
        assert!(dns_label("pay-v2").is_ok());
        assert!(dns_label("Pay").is_err());
        assert!(dns_label("-pay").is_err());
        assert!(dns_subdomain("pay.default.svc.cluster.local").is_ok());
        assert!(dns_subdomain("pay..local").is_err());
        assert!(label_key("version").is_ok());
        assert!(label_key("app.kubernetes.io/version").is_ok());
        assert!(label_key("bad key").is_err());
        assert!(label_key("/x").is_err());
        assert!(label_value("").is_ok());
        assert!(label_value("v2").is_ok());
        assert!(label_value("v2!").is_err());
    }

    #[test]
    fn identities_methods_headers() {
        assert!(spiffe_id("spiffe://tern.local/ns/default/sa/pay").is_ok());
        assert!(spiffe_id("spiffe://tern.local").is_err());
        assert!(spiffe_id("https://tern.local/ns/x").is_err());
        assert!(proto_full_name("tern.demo.v1.PayService").is_ok());
        assert!(proto_full_name("tern..PayService").is_err());
        assert!(proto_method("Pay").is_ok());
        assert!(proto_method("Pay/x").is_err());
        assert!(header_name("x-canary").is_ok());
        assert!(header_name("X-Canary").is_err());
    }

    #[test]
    fn durations_and_codes() {
        assert_eq!(duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(duration("0s").is_err());
        assert!(duration("soon").is_err());
        assert!(duration("1500us").is_err());
        assert_eq!(retryable_grpc_code("unavailable").unwrap(), 14);
        assert_eq!(retryable_grpc_code("resource-exhausted").unwrap(), 8);
        assert_eq!(retryable_grpc_code("4").unwrap(), 4);
        assert!(retryable_grpc_code("PERMISSION_DENIED").is_err());
        assert!(retryable_grpc_code("17").is_err());
        assert!(retryable_grpc_code("NOPE").is_err());
    }
}
