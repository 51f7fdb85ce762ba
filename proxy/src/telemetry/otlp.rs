//! Finished spans as OTLP messages, with OpenTelemetry's semantic-convention
//! attribute names where one exists and `tern.*` ones for what is the mesh's own.

use std::time::SystemTime;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};

use super::FinishedSpan;
use crate::metrics::Direction;
use crate::retry::RetryEvent;

const SCOPE: &str = "tern-proxy";

/// The sidecar as an OTLP resource: its workload's service and namespace.
pub(super) fn resource(service_name: &str, namespace: &str) -> Resource {
    Resource {
        attributes: vec![
            kv("service.name", string(service_name)),
            kv("service.namespace", string(namespace)),
            kv("tern.component", string("tern-proxy")),
        ],
        ..Resource::default()
    }
}

pub(super) fn resource_spans(resource: Resource, spans: Vec<FinishedSpan>) -> ResourceSpans {
    ResourceSpans {
        resource: Some(resource),
        scope_spans: vec![ScopeSpans {
            scope: Some(InstrumentationScope {
                name: SCOPE.to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                ..InstrumentationScope::default()
            }),
            spans: spans.into_iter().map(span).collect(),
            schema_url: String::new(),
        }],
        schema_url: String::new(),
    }
}

/// `rpc.service/rpc.method` for gRPC, the HTTP method otherwise (the proxy knows no
/// route template, and a raw path would make names unbounded).
pub fn name(grpc: bool, method: &http::Method, path: &str) -> String {
    match grpc {
        true => path.trim_start_matches('/').to_string(),
        false => method.as_str().to_string(),
    }
}

pub(super) fn span(s: FinishedSpan) -> Span {
    let kind = match s.direction {
        Direction::Inbound => span::SpanKind::Server,
        Direction::Outbound => span::SpanKind::Client,
    };
    Span {
        trace_id: s.start.trace_id.to_be_bytes().to_vec(),
        span_id: s.start.span_id.to_be_bytes().to_vec(),
        trace_state: s.start.trace_state.clone().unwrap_or_default(),
        parent_span_id: s
            .start
            .parent_id
            .map(|p| p.to_be_bytes().to_vec())
            .unwrap_or_default(),
        flags: u32::from(s.start.flags),
        name: name(s.grpc, &s.method, &s.path),
        kind: kind as i32,
        start_time_unix_nano: nanos(s.start.start),
        end_time_unix_nano: nanos(s.end),
        attributes: attributes(&s),
        events: s.retries.iter().map(retry_event).collect(),
        status: Some(span_status(&s)),
        ..Span::default()
    }
}

fn attributes(s: &FinishedSpan) -> Vec<KeyValue> {
    let mut a = vec![
        kv("tern.direction", string(s.direction.as_str())),
        kv("tern.service", string(&s.service)),
        kv(
            "tern.tls",
            AnyValue {
                value: Some(any_value::Value::BoolValue(s.tls_version.is_some())),
            },
        ),
        kv("tern.attempts", int(i64::from(s.attempts))),
        kv(
            "tern.request.bytes",
            int(i64::try_from(s.bytes_in).unwrap_or(i64::MAX)),
        ),
        kv(
            "tern.response.bytes",
            int(i64::try_from(s.bytes_out).unwrap_or(i64::MAX)),
        ),
        kv("http.request.method", string(s.method.as_str())),
        kv("url.path", string(&s.path)),
    ];
    if s.status != 0 {
        a.push(kv("http.response.status_code", int(i64::from(s.status))));
    }
    if s.grpc {
        let path = s.path.trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        a.push(kv("rpc.system", string("grpc")));
        a.push(kv("rpc.service", string(service)));
        a.push(kv("rpc.method", string(method)));
        if let Some(code) = s.grpc_status {
            a.push(kv("rpc.grpc.status_code", int(i64::from(code))));
        }
    }
    if let Some(ep) = s.endpoint {
        a.push(kv("tern.endpoint", string(&ep.to_string())));
        a.push(kv("server.address", string(&ep.ip().to_string())));
        a.push(kv("server.port", int(i64::from(ep.port()))));
    }
    if let Some(v) = s.tls_version {
        a.push(kv("tls.protocol.version", string(v)));
    }
    if let Some(id) = &s.peer_identity {
        a.push(kv("tern.peer.identity", string(id)));
    }
    if let Some(e) = s.error {
        a.push(kv("tern.error", string(e)));
    }
    a
}

/// Error when the proxy failed the request, the gRPC status is not OK, or the HTTP
/// status is 5xx (4xx too on the client side, as the conventions say).
fn span_status(s: &FinishedSpan) -> Status {
    let message = match (s.error, s.grpc, s.grpc_status) {
        (Some(e), _, _) => Some(e.to_string()),
        (None, true, Some(code)) if code != 0 => {
            Some(tern_proto::grpc_code::name(code).to_string())
        }
        (None, true, None) if s.status != 0 => Some("no grpc-status".to_string()),
        _ if s.status == 0 || s.status >= 500 => Some(format!("HTTP {}", s.status)),
        _ if s.status >= 400 && s.direction == Direction::Outbound => {
            Some(format!("HTTP {}", s.status))
        }
        _ => None,
    };
    match message {
        Some(message) => Status {
            message,
            code: status::StatusCode::Error as i32,
        },
        None => Status {
            message: String::new(),
            code: status::StatusCode::Unset as i32,
        },
    }
}

fn retry_event(e: &RetryEvent) -> span::Event {
    span::Event {
        time_unix_nano: nanos(e.time),
        name: "retry".to_string(),
        attributes: vec![
            kv("tern.attempt", int(i64::from(e.attempt))),
            kv("tern.endpoint", string(&e.endpoint.to_string())),
            kv("tern.retry.reason", string(e.reason)),
        ],
        dropped_attributes_count: 0,
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn kv(key: &str, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(value),
        ..KeyValue::default()
    }
}

fn string(s: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.to_string())),
    }
}

fn int(i: i64) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::IntValue(i)),
    }
}
