use std::time::Duration;

use http::HeaderValue;

use super::*;

const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn tracer(rate: f64, queue_size: usize) -> (Arc<Tracer>, Registry) {
    let registry = Registry::new();
    let config = TracingConfig {
        // Nothing listens on port 9 of loopback: exports fail fast.
        collector: "http://127.0.0.1:9".to_string(),
        sample_rate: rate,
        queue_size,
        batch_delay: Duration::from_secs(60),
    };
    let t = Tracer::start(&config, "order", "default", &registry).expect("tracer");
    (t, registry)
}

fn headers(traceparent: Option<&'static str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(v) = traceparent {
        h.insert(TRACEPARENT, HeaderValue::from_static(v));
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
    }
    h
}

fn traceparent(h: &HeaderMap) -> trace_context::TraceParent {
    let v = h.get(TRACEPARENT).expect("a traceparent");
    trace_context::parse_parts(v.as_bytes()).expect("a valid traceparent")
}

#[tokio::test]
async fn a_sampled_request_continues_with_this_span_as_parent() {
    let (t, _) = tracer(0.0, 8);
    let mut h = headers(Some(INCOMING));
    let span = t.begin(&mut h).expect("sampled");
    let out = traceparent(&h);
    assert_eq!(span.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
    assert_eq!(span.parent_id, Some(0x00f067aa0ba902b7));
    assert_eq!(span.trace_state.as_deref(), Some("vendor=x"));
    assert_eq!(out.trace_id, span.trace_id);
    assert_eq!(out.parent_id, span.span_id);
    assert_eq!(out.flags, 1);
    assert_eq!(h[TRACESTATE], "vendor=x");
}

#[tokio::test]
async fn an_unsampled_request_passes_unchanged() {
    let (t, _) = tracer(1.0, 8);
    let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let mut h = headers(Some(v));
    assert!(t.begin(&mut h).is_none());
    assert_eq!(h[TRACEPARENT], v);
}

#[tokio::test]
async fn without_a_traceparent_the_rate_decides() {
    let (never, _) = tracer(0.0, 8);
    let mut h = headers(None);
    assert!(never.begin(&mut h).is_none());
    assert_eq!(
        traceparent(&h).flags,
        0,
        "a fresh trace is marked unsampled"
    );
    let (always, _) = tracer(1.0, 8);
    let mut h = headers(None);
    let span = always.begin(&mut h).expect("sampled");
    assert_eq!(span.parent_id, None);
    assert_eq!(traceparent(&h).parent_id, span.span_id);
}

fn finished(start: SpanStart) -> FinishedSpan {
    FinishedSpan {
        start,
        end: SystemTime::now(),
        direction: Direction::Outbound,
        service: Arc::from("pay"),
        grpc: true,
        method: http::Method::POST,
        path: "/pay.Pay/Pay".to_string(),
        status: 200,
        grpc_status: Some(0),
        endpoint: None,
        tls_version: None,
        peer_identity: None,
        error: None,
        attempts: 1,
        retries: Vec::new(),
        bytes_in: 0,
        bytes_out: 0,
    }
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_without_waiting() {
    let (t, registry) = tracer(1.0, 1);
    for _ in 0..3 {
        let mut h = headers(None);
        let span = t.begin(&mut h).expect("sampled");
        t.record(finished(span));
    }
    // The export task has not run yet (one thread, no await): one span queued, two dropped.
    let dropped: u64 = registry
        .gather()
        .iter()
        .filter(|f| f.name() == "tern_trace_spans_dropped_total")
        .flat_map(|f| {
            f.get_metric()
                .iter()
                .map(|m| m.get_counter().get_value() as u64)
        })
        .sum();
    assert_eq!(dropped, 2);
}

#[test]
fn spans_are_named_by_grpc_method_or_http_method() {
    assert_eq!(
        otlp::name(true, &http::Method::POST, "/pay.Pay/Pay"),
        "pay.Pay/Pay"
    );
    assert_eq!(otlp::name(false, &http::Method::GET, "/orders/17"), "GET");
}
