//! What recording a request's span costs on the request path: Tern's own recorder
//! (`tern_proxy::telemetry`, spans queued for a tonic OTLP exporter) beside the OpenTelemetry
//! Rust SDK (`opentelemetry_sdk`'s tracer and `BatchSpanProcessor`, with an exporter that
//! discards, so only the SDK's own work is measured).
//!
//! Both do what a sidecar does per request: read the incoming `traceparent`, decide sampling,
//! start a server span as its child, rewrite the header for the next hop, and at the end of the
//! response attach the same attributes and hand the span to the export queue. `unsampled` runs
//! the same with a `traceparent` whose sampled flag is off (what tracing costs when the caller
//! does not sample).
//!
//! ```text
//! cargo build --release -p tern-proxy --example span_cost
//! for r in baseline ours sdk; do
//!   valgrind --tool=callgrind --toggle-collect='span_cost::*_spans' \
//!     --callgrind-out-file=/tmp/span_cost.$r target/release/examples/span_cost $r 20000
//!   callgrind_annotate --inclusive=yes /tmp/span_cost.$r | grep -E 'PROGRAM TOTALS|malloc'
//! done
//! ```
//!
//! Callgrind counts only inside the measured loop, on its own thread (the exporters' threads
//! are left out): the instructions and the calls to `malloc` it reports, divided by the span
//! count, are the instructions and allocations per span; `baseline` is the loop's own work
//! (building the incoming headers), to subtract from both. Add `unsampled` after the count for
//! the cost of an unsampled request. Without valgrind it prints wall time per span.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter,
};
use tern_proxy::config::tracing::TracingConfig;
use tern_proxy::metrics::Direction;
use tern_proxy::retry::Attempts;
use tern_proxy::telemetry::{FinishedSpan, Tracer};

const PATH: &str = "/tern.demo.v1.PayService/Pay";
const PEER: &str = "spiffe://cluster.local/ns/default/sa/order";

fn incoming(sampled: bool) -> HeaderMap {
    let mut h = HeaderMap::new();
    let flags = if sampled { "01" } else { "00" };
    let tp = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}");
    h.insert(
        "traceparent",
        HeaderValue::from_str(&tp).unwrap_or(HeaderValue::from_static("")),
    );
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    h
}

/// What both paths share and is not tracing: the request's headers as they arrive.
#[inline(never)]
fn baseline_spans(n: usize, sampled: bool) {
    for _ in 0..n {
        std::hint::black_box(incoming(sampled));
    }
}

/// Tern's path, as `trace_context`, `observe` and `Tracer::record` run it per request.
#[inline(never)]
fn ours_spans(tracer: &Arc<Tracer>, n: usize, sampled: bool) {
    let service: Arc<str> = Arc::from("pay");
    let peer: Arc<str> = Arc::from(PEER);
    for _ in 0..n {
        let mut headers = incoming(sampled);
        let Some(start) = tracer.begin(&mut headers) else {
            std::hint::black_box(&headers);
            continue;
        };
        let method = http::Method::POST;
        let path = PATH.to_string();
        let attempts = Attempts::recorded();
        attempts.set_count(1);
        tracer.record(FinishedSpan {
            start: start.clone(),
            end: std::time::SystemTime::now(),
            direction: Direction::Inbound,
            service: Arc::clone(&service),
            grpc: true,
            method,
            path,
            status: 200,
            grpc_status: Some(0),
            endpoint: Some(([127, 0, 0, 1], 50051).into()),
            tls_version: Some("TLSv1.3"),
            peer_identity: Some(Arc::clone(&peer)),
            error: None,
            attempts: attempts.count(),
            retries: attempts.retries(),
            bytes_in: 42,
            bytes_out: 64,
        });
        std::hint::black_box(&headers);
    }
}

struct Headers<'a>(&'a mut HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

impl Injector for Headers<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The same work through the OpenTelemetry SDK.
#[inline(never)]
fn sdk_spans(tracer: &opentelemetry_sdk::trace::SdkTracer, n: usize, sampled: bool) {
    let propagator = TraceContextPropagator::new();
    for _ in 0..n {
        let mut headers = incoming(sampled);
        let parent = propagator.extract(&Headers(&mut headers));
        let mut span = tracer
            .span_builder(PATH.strip_prefix('/').unwrap_or(PATH).to_string())
            .with_kind(SpanKind::Server)
            .start_with_context(tracer, &parent);
        propagator.inject_context(
            &parent.with_remote_span_context(span.span_context().clone()),
            &mut Headers(&mut headers),
        );
        if span.is_recording() {
            span.set_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", "tern.demo.v1.PayService"),
                KeyValue::new("rpc.method", "Pay"),
                KeyValue::new("rpc.grpc.status_code", 0),
                KeyValue::new("http.response.status_code", 200),
                KeyValue::new("tern.direction", "inbound"),
                KeyValue::new("tern.service", "pay"),
                KeyValue::new("tern.endpoint", "127.0.0.1:50051"),
                KeyValue::new("tern.tls", true),
                KeyValue::new("tls.protocol.version", "TLSv1.3"),
                KeyValue::new("tern.peer.identity", PEER),
                KeyValue::new("tern.attempts", 1),
                KeyValue::new("tern.request.bytes", 42),
                KeyValue::new("tern.response.bytes", 64),
            ]);
            span.set_status(Status::Ok);
        }
        span.end();
        std::hint::black_box(&headers);
    }
}

/// Discards every batch: only the SDK's own work is measured.
#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        std::hint::black_box(batch);
        Ok(())
    }
}

fn measure(label: &str, n: usize, run: impl FnOnce()) {
    let started = Instant::now();
    run();
    let ns = started.elapsed().as_nanos() as f64 / n.max(1) as f64;
    println!("{label}: {n} spans, {ns:.0} ns/span (wall clock, noisy)");
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map(String::as_str).unwrap_or("ours");
    let n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let sampled = args.get(3).map(String::as_str) != Some("unsampled");
    let label = format!("{which} {}", if sampled { "sampled" } else { "unsampled" });
    match which {
        "ours" => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let _guard = rt.enter();
            let config = TracingConfig {
                // Nothing listens there; the export task never runs during the loop anyway.
                collector: "http://127.0.0.1:9".to_string(),
                sample_rate: 0.0,
                queue_size: n + 1,
                batch_delay: Duration::from_secs(1),
            };
            let registry = prometheus::Registry::new();
            let tracer = Tracer::start(&config, "pay", "default", &registry)?;
            measure(&label, n, || ours_spans(&tracer, n, sampled));
        }
        "sdk" => {
            let processor = BatchSpanProcessor::builder(Discard)
                .with_batch_config(
                    BatchConfigBuilder::default()
                        .with_max_queue_size(n + 1)
                        .build(),
                )
                .build();
            let provider = SdkTracerProvider::builder()
                .with_span_processor(processor)
                .build();
            let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "tern-proxy");
            measure(&label, n, || sdk_spans(&tracer, n, sampled));
            let _ = provider.shutdown();
        }
        "baseline" => measure(&label, n, || baseline_spans(n, sampled)),
        other => anyhow::bail!("unknown recorder {other:?}: ours, sdk or baseline"),
    }
    Ok(())
}
