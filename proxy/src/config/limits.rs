//! Protocol limits: what one connection or request may cost the proxy.
//!
//! Every limit is a setting (YAML `limits:`, a flag, a `TERN_*` variable) and
//! every rejection is counted in `tern_protocol_rejections_total` with a
//! reason, so an operator can tell an attack from a limit set too low.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{duration, err, humantime_serde_compat, ConfigError};

/// The `limits:` section as written.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub max_header_list_size: Option<u32>,
    pub max_concurrent_streams: Option<u32>,
    pub max_client_resets: Option<u32>,
    pub idle_timeout: Option<String>,
    pub handshake_timeout: Option<String>,
    pub max_connections: Option<usize>,
    pub response_timeout: Option<String>,
}

/// Validated limits.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Limits {
    /// Bytes of a header block (names, values and 32 bytes per field, as
    /// HTTP/2 counts them), for requests and responses, HTTP/1 and HTTP/2.
    pub max_header_list_size: u32,
    /// HTTP/2 streams open at once on one downstream connection.
    pub max_concurrent_streams: u32,
    /// Streams a downstream client may cancel within [`RESET_WINDOW`] before
    /// its connection is sent GOAWAY and closed.
    pub max_client_resets: u32,
    /// A connection with no request in flight for this long is closed.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// The TLS handshake and protocol detection of a new connection.
    #[serde(with = "humantime_serde_compat")]
    pub handshake_timeout: Duration,
    /// Open connections per listener; more are refused at accept.
    pub max_connections: usize,
    /// How long a request with no deadline of its own (no `grpc-timeout`, no
    /// route timeout) waits for its response head; `None`: forever.
    #[serde(with = "humantime_serde_compat::option")]
    pub response_timeout: Option<Duration>,
}

/// The window [`Limits::max_client_resets`] counts over.
pub const RESET_WINDOW: Duration = Duration::from_secs(10);

impl Default for Limits {
    fn default() -> Self {
        Self {
            // grpc-go accepts 16 MiB of metadata and grpcio well over 16 KiB;
            // 64 KiB is what Envoy allows by default (60 KiB) rounded up.
            max_header_list_size: 64 * 1024,
            max_concurrent_streams: 200,
            max_client_resets: 200,
            idle_timeout: Duration::from_secs(300),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 20_000,
            response_timeout: Some(Duration::from_secs(300)),
        }
    }
}

/// What an endpoint client needs to know: how long to wait for a connection,
/// and how large a response head may be.
#[derive(Clone, Copy, Debug)]
pub struct ClientLimits {
    pub connect_timeout: Duration,
    pub max_header_list_size: u32,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            max_header_list_size: Limits::default().max_header_list_size,
        }
    }
}

impl LimitsFile {
    pub fn validate(&self) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let max_header_list_size = self.max_header_list_size.unwrap_or(d.max_header_list_size);
        if !(4096..=16 * 1024 * 1024).contains(&max_header_list_size) {
            return Err(err(
                "limits.max_header_list_size",
                "must be between 4096 and 16777216 bytes",
            ));
        }
        let max_concurrent_streams = self
            .max_concurrent_streams
            .unwrap_or(d.max_concurrent_streams);
        if max_concurrent_streams == 0 {
            return Err(err("limits.max_concurrent_streams", "must be at least 1"));
        }
        let max_connections = self.max_connections.unwrap_or(d.max_connections);
        if max_connections == 0 {
            return Err(err("limits.max_connections", "must be at least 1"));
        }
        let positive = |field: &str, v: Option<&str>, default: Duration| {
            let t = duration(field, v, default)?;
            if t.is_zero() {
                return Err(err(field, "must be greater than zero"));
            }
            Ok(t)
        };
        let response_timeout = duration(
            "limits.response_timeout",
            self.response_timeout.as_deref(),
            d.response_timeout.unwrap_or_default(),
        )?;
        Ok(Limits {
            max_header_list_size,
            max_concurrent_streams,
            max_client_resets: self.max_client_resets.unwrap_or(d.max_client_resets),
            idle_timeout: positive(
                "limits.idle_timeout",
                self.idle_timeout.as_deref(),
                d.idle_timeout,
            )?,
            handshake_timeout: positive(
                "limits.handshake_timeout",
                self.handshake_timeout.as_deref(),
                d.handshake_timeout,
            )?,
            max_connections,
            response_timeout: (!response_timeout.is_zero()).then_some(response_timeout),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_and_bounds() {
        let l = LimitsFile::default().validate().unwrap();
        assert_eq!(l.max_header_list_size, 65536);
        assert_eq!(l.response_timeout, Some(Duration::from_secs(300)));
        let off = LimitsFile {
            response_timeout: Some("0s".into()),
            ..Default::default()
        };
        assert_eq!(off.validate().unwrap().response_timeout, None);
        let small = LimitsFile {
            max_header_list_size: Some(100),
            ..Default::default()
        };
        let e = small.validate().unwrap_err().to_string();
        assert!(e.contains("limits.max_header_list_size"), "{e}");
        let idle = LimitsFile {
            idle_timeout: Some("0s".into()),
            ..Default::default()
        };
        assert!(idle.validate().is_err());
    }
}
