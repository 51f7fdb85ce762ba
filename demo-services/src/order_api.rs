//! order's HTTP/1.1 JSON API (`POST /orders`): request and reply bodies, and how a failed
//! pay call maps to an HTTP status and error body.

use serde::{Deserialize, Serialize};
use tonic::Code;

use crate::codes::code_name;

/// Largest `POST /orders` body read; orders are tiny and this bounds memory per request.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug, Deserialize, PartialEq)]
pub struct OrderRequest {
    #[serde(default)]
    pub order_id: Option<String>,
    pub amount_cents: i64,
    pub currency: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct OrderReply {
    pub order_id: String,
    pub pay_status: String,
    pub pay_replica: String,
    pub pay_version: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ErrorReply {
    pub error: String,
    pub grpc_code: &'static str,
}

impl ErrorReply {
    pub fn new(code: Code, error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            grpc_code: code_name(code),
        }
    }
}

/// The HTTP status for a failed pay call: the gateway statuses say "the upstream failed"
/// so HTTP/1 clients (and a mesh's HTTP/1 retry rules) can tell that from order's own bugs.
pub fn http_status_for(code: Code) -> http::StatusCode {
    match code {
        Code::Unavailable => http::StatusCode::BAD_GATEWAY,
        Code::DeadlineExceeded => http::StatusCode::GATEWAY_TIMEOUT,
        Code::InvalidArgument => http::StatusCode::BAD_REQUEST,
        _ => http::StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Parses a `POST /orders` body; the error text is meant for the client.
pub fn parse_order_request(body: &[u8]) -> Result<OrderRequest, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid order JSON: {e}"))
}

/// An order id for requests that did not bring one.
pub fn new_order_id() -> String {
    format!("ord-{:016x}", fastrand::u64(..))
}

/// The caller's order id, or a fresh one when it is missing or blank.
pub fn order_id_or_new(id: Option<&str>) -> String {
    match id.map(str::trim) {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => new_order_id(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping() {
        assert_eq!(http_status_for(Code::Unavailable), 502);
        assert_eq!(http_status_for(Code::DeadlineExceeded), 504);
        assert_eq!(http_status_for(Code::InvalidArgument), 400);
        assert_eq!(http_status_for(Code::Internal), 500);
        assert_eq!(http_status_for(Code::PermissionDenied), 500);
    }

    #[test]
    fn parses_bodies() {
        let r = parse_order_request(br#"{"order_id":"o1","amount_cents":123,"currency":"EUR"}"#);
        assert_eq!(
            r,
            Ok(OrderRequest {
                order_id: Some("o1".into()),
                amount_cents: 123,
                currency: "EUR".into()
            })
        );
        let r = parse_order_request(br#"{"amount_cents":5,"currency":"USD"}"#);
        assert!(matches!(r, Ok(OrderRequest { order_id: None, .. })));
        assert!(parse_order_request(b"not json").is_err());
        assert!(parse_order_request(br#"{"amount_cents":"x","currency":"EUR"}"#).is_err());
        assert!(parse_order_request(br#"{"currency":"EUR"}"#).is_err());
    }

    #[test]
    fn error_body_shape() -> Result<(), serde_json::Error> {
        let body = serde_json::to_value(ErrorReply::new(Code::Unavailable, "pay down"))?;
        assert_eq!(
            body,
            serde_json::json!({"error": "pay down", "grpc_code": "UNAVAILABLE"})
        );
        Ok(())
    }

    #[test]
    fn order_ids() {
        assert_eq!(order_id_or_new(Some("abc")), "abc");
        assert!(order_id_or_new(Some("  ")).starts_with("ord-"));
        let a = order_id_or_new(None);
        assert_eq!(a.len(), 20);
        assert_ne!(a, new_order_id());
    }
}
