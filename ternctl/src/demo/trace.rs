//! `ternctl demo --trace`: one sampled call's spans across the sidecars, as a tree.
//!
//! The sidecars export to a receiver ternctl runs ([`crate::trace_sink`]); order's sidecar
//! samples a share of loadgen's calls (which carry no `traceparent`), and order passes the
//! context on to pay. At the end the fullest trace is printed, its retries included.

use std::collections::HashMap;
use std::fmt::Write as _;

use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

use crate::trace_sink::Received;

/// Share of loadgen's calls order's sidecar starts a trace for.
pub const SAMPLE_RATE: &str = "0.05";

/// The trace with the most spans (the first such), as printable lines; `None` without spans.
pub fn render(spans: &[Received]) -> Option<String> {
    let mut by_trace: HashMap<&[u8], Vec<&Received>> = HashMap::new();
    for r in spans {
        by_trace.entry(&r.1.trace_id).or_default().push(r);
    }
    // Prefer a trace with a retry in it: it shows the most of what the mesh does.
    let (trace_id, spans) = by_trace.into_iter().max_by_key(|(_, s)| {
        let retries = s.iter().map(|r| r.1.events.len()).sum::<usize>();
        (
            s.len(),
            retries,
            s.iter().map(|r| r.1.start_time_unix_nano).min(),
        )
    })?;
    let mut out = format!("trace {}\n", hex(trace_id));
    let ids: Vec<&[u8]> = spans.iter().map(|r| r.1.span_id.as_slice()).collect();
    let mut roots: Vec<&Received> = spans
        .iter()
        .copied()
        .filter(|r| !ids.contains(&r.1.parent_span_id.as_slice()))
        .collect();
    roots.sort_by_key(|r| r.1.start_time_unix_nano);
    for root in roots {
        print_span(&mut out, root, &spans, 1);
    }
    Some(out)
}

fn print_span(out: &mut String, r: &Received, all: &[&Received], depth: usize) {
    let (service, s) = (&r.0, &r.1);
    let kind = match s.kind {
        k if k == SpanKind::Server as i32 => "server",
        k if k == SpanKind::Client as i32 => "client",
        _ => "span",
    };
    let ms = s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano) as f64 / 1e6;
    let indent = "  ".repeat(depth);
    let _ = write!(out, "{indent}{service}-proxy {kind} {} {ms:.1} ms", s.name);
    for (key, label) in [
        ("rpc.grpc.status_code", "grpc"),
        ("tern.peer.identity", "peer"),
        ("tls.protocol.version", "tls"),
        ("tern.endpoint", "endpoint"),
        ("tern.error", "error"),
    ] {
        if let Some(v) = attr(&s.attributes, key) {
            let _ = write!(out, " {label}={v}");
        }
    }
    out.push('\n');
    for e in &s.events {
        let reason = attr(&e.attributes, "tern.retry.reason").unwrap_or_default();
        let endpoint = attr(&e.attributes, "tern.endpoint").unwrap_or_default();
        let _ = writeln!(out, "{indent}  · {} after {reason} from {endpoint}", e.name);
    }
    let mut children: Vec<&Received> = all
        .iter()
        .copied()
        .filter(|c| c.1.parent_span_id == s.span_id)
        .collect();
    children.sort_by_key(|c| c.1.start_time_unix_nano);
    for c in children {
        print_span(out, c, all, depth + 1);
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    let v = attrs
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match v {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The receiver's view when nothing arrived: what to check.
pub fn nothing(received: u64) -> String {
    format!("no trace to show ({received} spans received): was any call sampled?")
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::trace::v1::Span;

    fn span(id: u8, parent: u8, kind: SpanKind, name: &str) -> Span {
        Span {
            trace_id: vec![7; 16],
            span_id: vec![id; 8],
            parent_span_id: if parent == 0 { vec![] } else { vec![parent; 8] },
            kind: kind as i32,
            name: name.into(),
            start_time_unix_nano: u64::from(id) * 1000,
            end_time_unix_nano: 10_000_000,
            ..Span::default()
        }
    }

    #[test]
    fn a_trace_prints_as_a_tree() {
        let spans = vec![
            ("pay".to_string(), span(3, 2, SpanKind::Server, "Pay")),
            (
                "order".to_string(),
                span(1, 0, SpanKind::Server, "CreateOrder"),
            ),
            ("order".to_string(), span(2, 1, SpanKind::Client, "Pay")),
        ];
        let out = render(&spans).unwrap_or_default();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert!(
            lines[1].starts_with("  order-proxy server CreateOrder"),
            "{out}"
        );
        assert!(lines[2].starts_with("    order-proxy client Pay"), "{out}");
        assert!(lines[3].starts_with("      pay-proxy server Pay"), "{out}");
    }
}
