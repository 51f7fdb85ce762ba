//! Value parsers for the demo binaries' flags. clap reports their errors with the flag's
//! name and exits with code 2, so a bad value never gets as far as starting a server.

use std::time::Duration;

/// A probability in `0.0..=1.0` (the share of calls to fail).
pub fn parse_fail_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number; expected 0.0..=1.0"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s} is out of range; expected 0.0..=1.0"))
    }
}

/// A human duration such as `50ms`, `2s`, `1m 30s` or `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}); examples: 50ms, 2s, 1m"))
}

/// A duration that must be longer than zero (timeouts: zero would fail every call).
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err("must be longer than 0".to_string()),
        d => Ok(d),
    }
}

/// A request rate per second, finite and above zero (`0.5` means one call every 2 s).
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if v.is_finite() && v > 0.0 && v <= 1_000_000.0 {
        Ok(v)
    } else {
        Err(format!(
            "{s} is out of range; expected more than 0 and at most 1000000"
        ))
    }
}

/// A gRPC target: `host:port` or `http://host:port`, turned into the endpoint URI.
pub fn parse_target(s: &str) -> Result<http::Uri, String> {
    let s = s.trim();
    let full = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    let uri: http::Uri = full
        .parse()
        .map_err(|e| format!("{s:?} is not host:port ({e})"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{s:?}: only plaintext http:// (h2c) targets are supported"
        ));
    }
    let has_port = uri.authority().and_then(|a| a.port_u16()).is_some();
    if !has_port || uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!("{s:?} is not host:port"));
    }
    Ok(uri)
}

/// A `:authority` value such as `pay` or `order.default.svc:8080`, as an origin URI.
pub fn parse_authority(s: &str) -> Result<http::Uri, String> {
    let auth: http::uri::Authority = s
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a valid authority ({e})"))?;
    http::Uri::builder()
        .scheme("http")
        .authority(auth)
        .path_and_query("/")
        .build()
        .map_err(|e| format!("{s:?} is not a valid authority ({e})"))
}

/// `host:port` for a URI authority; IPv6 literals need brackets there.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_rate_bounds() {
        assert_eq!(parse_fail_rate("0"), Ok(0.0));
        assert_eq!(parse_fail_rate("1"), Ok(1.0));
        assert_eq!(parse_fail_rate("0.25"), Ok(0.25));
        for bad in ["2", "-0.1", "1.0001", "NaN", "inf", "abc", ""] {
            assert!(parse_fail_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("2").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_positive_duration("0s").is_err());
        assert_eq!(parse_positive_duration("1s"), Ok(Duration::from_secs(1)));
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("50"), Ok(50.0));
        assert_eq!(parse_rate("0.5"), Ok(0.5));
        for bad in ["0", "-1", "NaN", "inf", "x", "2000000"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn targets() {
        let ok = |s: &str| parse_target(s).map(|u| u.to_string());
        assert_eq!(
            ok("127.0.0.1:8080"),
            Ok("http://127.0.0.1:8080/".to_string())
        );
        assert_eq!(
            ok("http://order:8080"),
            Ok("http://order:8080/".to_string())
        );
        assert_eq!(ok("[::1]:8080"), Ok("http://[::1]:8080/".to_string()));
        for bad in [
            "127.0.0.1",
            "https://order:443",
            "order:8080/x",
            "a b:1",
            "",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn authorities() {
        assert_eq!(
            parse_authority("pay:50051").map(|u| u.to_string()),
            Ok("http://pay:50051/".to_string())
        );
        assert!(parse_authority("bad host").is_err());
        assert_eq!(host_port("::1", 5), "[::1]:5");
        assert_eq!(host_port("127.0.0.1", 5), "127.0.0.1:5");
        assert_eq!(host_port("[::1]", 5), "[::1]:5");
    }
}
