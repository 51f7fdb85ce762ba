//! tern-control's address as configured: one URL, or several separated by
//! commas (`https://tern-control-0:8090,https://tern-control-1:8090`). Each
//! host is an IP or a DNS name, which may resolve to several replicas (a
//! headless Service); the sidecar subscribes to one of them and moves to
//! another when it fails (`control/failover.rs`).

use std::fmt;

use serde::Serialize;

/// The control plane's replicas, as written: plain data, checked once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlPlanes {
    tls: bool,
    /// `(host, port)`, hosts without IPv6 brackets, in the order given.
    hosts: Vec<(String, u16)>,
}

impl ControlPlanes {
    /// `http://` or `https://` URLs (a bare `host:port` is `http://`), all of
    /// one scheme, each naming a host and nothing after the port.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut tls = None;
        let mut hosts = Vec::new();
        for part in text.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(format!("{text:?}: an empty address in the list"));
            }
            let url = if part.contains("://") {
                part.to_string()
            } else {
                format!("http://{part}")
            };
            let uri: http::Uri = url
                .parse()
                .map_err(|_| format!("{part:?} is not a URL like http://host:port"))?;
            let secure = match uri.scheme_str() {
                Some("https") => true,
                Some("http") => false,
                _ => return Err(format!("{part:?}: the scheme must be http or https")),
            };
            if tls.is_some_and(|t| t != secure) {
                return Err(format!("{text:?} mixes http:// and https://"));
            }
            tls = Some(secure);
            let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
                return Err(format!("{part:?} is not a URL like http://host:port"));
            };
            if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
                return Err(format!("{part:?}: only scheme, host and port are allowed"));
            }
            let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
            let host = host.trim_matches(['[', ']']).to_string();
            if !hosts.contains(&(host.clone(), port)) {
                hosts.push((host, port));
            }
        }
        Ok(Self {
            tls: tls.unwrap_or(false),
            hosts,
        })
    }

    /// Whether the stream is TLS (`https://`).
    pub fn tls(&self) -> bool {
        self.tls
    }

    pub fn hosts(&self) -> &[(String, u16)] {
        &self.hosts
    }
}

impl fmt::Display for ControlPlanes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        for (i, (host, port)) in self.hosts.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            if host.contains(':') {
                write!(f, "{sep}{scheme}://[{host}]:{port}")?;
            } else {
                write!(f, "{sep}{scheme}://{host}:{port}")?;
            }
        }
        Ok(())
    }
}

impl Serialize for ControlPlanes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn one_or_several_urls_of_one_scheme() {
        let one = ControlPlanes::parse("127.0.0.1:8090").unwrap();
        assert!(!one.tls());
        assert_eq!(one.to_string(), "http://127.0.0.1:8090");
        let several =
            ControlPlanes::parse("https://tern-control-0:8090, https://[fd00::2]:8090").unwrap();
        assert!(several.tls());
        assert_eq!(
            several.hosts(),
            [
                ("tern-control-0".to_string(), 8090),
                ("fd00::2".to_string(), 8090)
            ]
        );
        assert_eq!(
            several.to_string(),
            "https://tern-control-0:8090,https://[fd00::2]:8090"
        );
        assert_eq!(
            ControlPlanes::parse("https://tern-control.tern.svc")
                .unwrap()
                .hosts(),
            [("tern-control.tern.svc".to_string(), 443)]
        );
    }

    #[test]
    fn bad_lists_say_why() {
        for (text, why) in [
            ("http://a:1,https://b:2", "mixes"),
            ("http://a:1,,http://b:2", "empty"),
            ("ftp://a:1", "scheme"),
            ("http://a:1/path", "only scheme"),
            ("http://:80", "not a URL"),
        ] {
            let e = ControlPlanes::parse(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }
}
