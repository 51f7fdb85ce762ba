//! Errors the proxy itself makes, and the one place they become a response.
//!
//! A gRPC caller gets a trailers-only response with `grpc-status` and
//! `grpc-message`; an HTTP caller gets 502/503/504, or 403 for a call the
//! inbound authorization policy denies or a port the app does not serve
//! ([`ProxyError::PortNotServed`]). Either way the response
//! carries `x-tern-proxy-error` so a caller can tell the proxy's failure from
//! the application's.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderName, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};

mod layer;

pub use layer::{ErrorFuture, ErrorResponse, ErrorResponseLayer};

pub const PROXY_ERROR_HEADER: &str = "x-tern-proxy-error";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route: authority {authority:?} names no known service")]
    NoRoute { authority: String },
    #[error("no answer from the control plane about {destination} within {waited_ms}ms")]
    Unanswered { destination: String, waited_ms: u64 },
    #[error("service {service}: no endpoints available")]
    NoEndpoints { service: Arc<str> },
    #[error("service {service}: connect to {addr} failed: {source}")]
    Connect {
        service: Arc<str>,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("service {service}: connect to {addr} timed out")]
    ConnectTimeout { service: Arc<str>, addr: SocketAddr },
    #[error("service {service}: mTLS handshake with {addr} failed ({reason}): {detail}")]
    Handshake {
        service: Arc<str>,
        addr: SocketAddr,
        reason: &'static str,
        detail: String,
    },
    #[error("service {service}: endpoint {addr} failed: {source}")]
    Upstream {
        service: Arc<str>,
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("service {service}: endpoint {addr} reset the response stream")]
    Reset { service: Arc<str>, addr: SocketAddr },
    #[error("service {service}: no response within the per-try timeout of {timeout:?}")]
    PerTryTimeout {
        service: Arc<str>,
        addr: Option<SocketAddr>,
        timeout: std::time::Duration,
    },
    #[error("service {service}: deadline exceeded after {elapsed:?}")]
    DeadlineExceeded {
        service: Arc<str>,
        elapsed: std::time::Duration,
    },
    /// The app's response head is over the header limit (or so malformed
    /// that h2 refused it); the app did run the call, so never retried.
    #[error("service {service}: response headers from {addr} {} exceed the limit of {limit} bytes (or are malformed)", size.map(|s| format!("({s} bytes)")).unwrap_or_default())]
    ResponseHeadersTooLarge {
        service: Arc<str>,
        addr: SocketAddr,
        size: Option<usize>,
        limit: u32,
    },
    /// The caller's side of the exchange failed while it was being sent
    /// upstream: its body broke off or was malformed. Never retried.
    #[error("service {service}: bad request: {detail}")]
    BadRequest { service: Arc<str>, detail: String },
    /// The caller's request head is over the header limit.
    #[error("request headers of {size} bytes exceed the limit of {limit} bytes")]
    RequestHeadersTooLarge { size: usize, limit: u32 },
    /// The caller's `grpc-timeout` is malformed; answered here, never
    /// forwarded (see [`crate::retry::deadline::from_headers`]).
    #[error("invalid grpc-timeout {value:?}")]
    InvalidGrpcTimeout { value: String },
    /// A request with no deadline of its own got no response head within
    /// `limits.response_timeout`.
    #[error("service {service}: no response within {elapsed:?} (the proxy's response timeout)")]
    ResponseTimeout {
        service: Arc<str>,
        elapsed: std::time::Duration,
    },
    /// The inbound authorization policy does not let this caller in
    /// (`authz.rs`); never retried.
    #[error("service {service}: permission denied: {detail}")]
    PermissionDenied { service: Arc<str>, detail: String },
    /// The caller named (`tern-dst-port`) a port the app does not serve, or
    /// one of the sidecar's own; never forwarded, never retried.
    #[error("port {port} is not served here (not one of the app's ports)")]
    PortNotServed { port: u16 },
}

/// gRPC status codes the proxy produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcCode {
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Internal = 13,
    Unavailable = 14,
}

impl ProxyError {
    /// A short, bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoRoute { .. } => "no_route",
            Self::Unanswered { .. } => "lookup_unanswered",
            Self::NoEndpoints { .. } => "no_endpoints",
            Self::Connect { .. } => "connect",
            Self::ConnectTimeout { .. } => "connect_timeout",
            Self::Handshake { .. } => "tls_handshake",
            Self::Upstream { source, .. } if unprocessed(source) => "refused_stream",
            Self::Upstream { .. } => "upstream_reset",
            Self::Reset { .. } => "reset",
            Self::PerTryTimeout { .. } => "per_try_timeout",
            Self::DeadlineExceeded { .. } => "deadline_exceeded",
            Self::ResponseTimeout { .. } => "response_timeout",
            Self::PermissionDenied { .. } => "permission_denied",
            Self::PortNotServed { .. } => "port_not_served",
            Self::InvalidGrpcTimeout { .. } => "invalid_grpc_timeout",
            Self::ResponseHeadersTooLarge { .. } => "response_header_list_size",
            Self::RequestHeadersTooLarge { .. } => "header_list_size",
            Self::BadRequest { .. } => "bad_request",
        }
    }

    /// Whether another attempt may be made: nothing of this attempt's
    /// response has reached the caller. That covers a refused connection, a
    /// refused stream, a stream the server's GOAWAY left unprocessed, and a
    /// connection that was reset or lost before the response headers came
    /// (an endpoint killed mid-call), as well as a per-try timeout.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. }
                | Self::ConnectTimeout { .. }
                | Self::Handshake { .. }
                | Self::PerTryTimeout { .. }
                | Self::Upstream { .. }
        )
    }

    /// The server did not process the request at all (a refused stream, or
    /// one above the last-stream-id of its GOAWAY, whatever the GOAWAY's
    /// error code): sending it again cannot make it run twice.
    pub fn is_unprocessed(&self) -> bool {
        matches!(self, Self::Upstream { source, .. } if unprocessed(source))
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        match self {
            Self::Connect { addr, .. }
            | Self::ConnectTimeout { addr, .. }
            | Self::Handshake { addr, .. }
            | Self::Upstream { addr, .. }
            | Self::Reset { addr, .. }
            | Self::ResponseHeadersTooLarge { addr, .. } => Some(*addr),
            Self::PerTryTimeout { addr, .. } => *addr,
            _ => None,
        }
    }

    fn http_status(&self) -> StatusCode {
        match self {
            Self::NoRoute { .. } | Self::NoEndpoints { .. } | Self::Unanswered { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::ConnectTimeout { .. }
            | Self::PerTryTimeout { .. }
            | Self::DeadlineExceeded { .. }
            | Self::ResponseTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Connect { .. }
            | Self::Handshake { .. }
            | Self::Upstream { .. }
            | Self::Reset { .. }
            | Self::ResponseHeadersTooLarge { .. } => StatusCode::BAD_GATEWAY,
            Self::RequestHeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::PermissionDenied { .. } | Self::PortNotServed { .. } => StatusCode::FORBIDDEN,
            Self::InvalidGrpcTimeout { .. } | Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
        }
    }

    fn grpc_code(&self) -> GrpcCode {
        match self {
            Self::DeadlineExceeded { .. } | Self::ResponseTimeout { .. } => {
                GrpcCode::DeadlineExceeded
            }
            Self::PermissionDenied { .. } | Self::PortNotServed { .. } => {
                GrpcCode::PermissionDenied
            }
            // What gRPC servers themselves answer to a malformed timeout.
            Self::InvalidGrpcTimeout { .. }
            | Self::ResponseHeadersTooLarge { .. }
            | Self::BadRequest { .. } => GrpcCode::Internal,
            Self::RequestHeadersTooLarge { .. } => GrpcCode::ResourceExhausted,
            _ => GrpcCode::Unavailable,
        }
    }

    /// The response a caller sees for this error.
    pub fn to_response(&self, grpc: bool) -> Response<Body> {
        let message = self.to_string();
        let mut rsp = Response::new(body::empty());
        if let Ok(v) = HeaderValue::from_str(&message) {
            rsp.headers_mut().insert(PROXY_ERROR_HEADER, v);
        }
        if grpc {
            let h = rsp.headers_mut();
            // Trailers-only: the status travels in the one HEADERS frame.
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", grpc_status_value(self.grpc_code() as u16));
            if let Ok(v) = HeaderValue::from_str(&percent_encode(&message)) {
                h.insert("grpc-message", v);
            }
        } else {
            *rsp.status_mut() = self.http_status();
            rsp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            *rsp.body_mut() = body::boxed(http_body_util::Full::new(bytes::Bytes::from(format!(
                "{message}\n"
            ))));
        }
        rsp
    }
}

/// Set on a response the proxy made itself, for logs and metrics.
#[derive(Clone, Copy, Debug)]
pub struct ProxyErrorReason(pub &'static str);

/// h2 refused what the peer sent on this stream (a response head over the
/// header limit, or a malformed one): a reset h2 made itself, not the peer.
pub fn local_protocol_error(e: &hyper::Error) -> bool {
    h2_error(e).is_some_and(|h2| h2.is_library() && h2.reason() == Some(h2::Reason::PROTOCOL_ERROR))
}

fn h2_error(e: &hyper::Error) -> Option<&h2::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = s.source();
    }
    None
}

/// An HTTP/2 stream the server refused, or one above a GOAWAY's last stream id.
///
/// h2 gives a stream a remote GOAWAY error only when the peer's GOAWAY names a
/// last-stream-id below it (`Streams::recv_go_away` errors exactly those
/// streams, and streams opened after it, with the GOAWAY's reason). Streams at
/// or below the last-stream-id run on; when the connection then closes they
/// end with an I/O error (broken pipe, reset), never a GOAWAY error. So a
/// remote GOAWAY error means "not processed" whatever its error code.
fn unprocessed(e: &hyper::Error) -> bool {
    h2_error(e).is_some_and(|h2| {
        h2.is_remote() && (h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM))
    })
}

fn grpc_status_value(code: u16) -> HeaderValue {
    HeaderValue::from(code)
}

/// Percent-encodes a grpc-message as the gRPC HTTP/2 spec asks: every byte
/// outside printable ASCII, and '%' itself.
pub fn percent_encode(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `grpc-status` of a header or trailer block, if it carries one.
/// A `HeaderName`, not a `&str`: a lookup by `&str` parses the name first,
/// and this one runs several times per request.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

pub fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
}

pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_error_is_trailers_only_unavailable() {
        let e = ProxyError::NoEndpoints {
            service: "pay".into(),
        };
        let rsp = e.to_response(true);
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(rsp.headers()["grpc-status"], "14");
        let msg = rsp.headers()["grpc-message"].to_str().unwrap_or_default();
        assert!(msg.contains("service pay"), "{msg}");
        assert_eq!(
            e.to_response(false).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn an_unserved_port_is_forbidden_and_says_which() {
        let e = ProxyError::PortNotServed { port: 6060 };
        let http = e.to_response(false);
        assert_eq!(http.status(), StatusCode::FORBIDDEN);
        let header = http.headers()[PROXY_ERROR_HEADER]
            .to_str()
            .unwrap_or_default();
        assert!(header.contains("port 6060 is not served"), "{header}");
        let grpc = e.to_response(true);
        assert_eq!(grpc.headers()["grpc-status"], "7");
        assert!(!e.is_retryable());
        assert_eq!(e.reason(), "port_not_served");
    }

    #[test]
    fn percent_encoding_follows_grpc_spec() {
        assert_eq!(percent_encode("a%b é"), "a%25b %C3%A9");
    }
}
