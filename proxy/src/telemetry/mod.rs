//! Request spans exported over OTLP (`--trace-collector`), off by default.
//!
//! The first layer of the stack ([`crate::trace_context`]) asks [`Tracer::begin`]
//! whether a request is sampled: an incoming `traceparent` decides by its
//! sampled flag, a request without one by `--trace-sample-rate`. A sampled
//! request gets a [`SpanStart`] in its extensions and travels on with this
//! sidecar's span as its parent; [`crate::observe`] finishes the span when the
//! response ends and hands it to [`Tracer::record`]. An unsampled request
//! costs the header parse the proxy did anyway, and nothing more.
//!
//! Spans leave through a bounded queue to one export task (`export`): when
//! the collector is slow or down the queue fills and spans are dropped and
//! counted (`tern_trace_spans_dropped_total`), never waited for. At shutdown
//! the sidecar flushes what is queued ([`Tracer::flush`]) before it exits.

mod export;
mod otlp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use http::HeaderMap;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::sync::{mpsc, oneshot};

use crate::config::tracing::TracingConfig;
use crate::config::Config;
use crate::metrics::Direction;
use crate::retry::RetryEvent;
use crate::trace_context::{self, TRACEPARENT, TRACESTATE};

/// The sidecar's span recorder: sampling settings and the export queue.
pub struct Tracer {
    sample_rate: f64,
    queue: mpsc::Sender<FinishedSpan>,
    dropped_queue_full: IntCounter,
    /// Asks the export task to send what is queued now; answered when done.
    flushes: mpsc::Sender<oneshot::Sender<()>>,
}

/// A sampled request's span, from its arrival; carried in the request's extensions.
#[derive(Clone)]
pub struct SpanStart {
    pub tracer: Arc<Tracer>,
    pub trace_id: u128,
    pub span_id: u64,
    /// The caller's span, when the request came with a `traceparent`.
    pub parent_id: Option<u64>,
    pub flags: u8,
    pub trace_state: Option<String>,
    pub start: SystemTime,
}

/// Everything a span says, gathered when its response ended; turned into OTLP off the
/// request path.
pub struct FinishedSpan {
    pub start: SpanStart,
    pub end: SystemTime,
    pub direction: Direction,
    /// The target service (the local workload's own name inbound).
    pub service: Arc<str>,
    pub grpc: bool,
    pub method: http::Method,
    pub path: String,
    /// 0 when no response head came back.
    pub status: u16,
    pub grpc_status: Option<u32>,
    pub endpoint: Option<SocketAddr>,
    /// `None` for a plaintext hop or before any endpoint answered.
    pub tls_version: Option<&'static str>,
    pub peer_identity: Option<Arc<str>>,
    /// The proxy's own reason when it failed the request (see [`crate::errors`]).
    pub error: Option<&'static str>,
    pub attempts: u32,
    pub retries: Vec<RetryEvent>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Tracer {
    /// The sidecar's tracer, or `None` when the configuration names no collector.
    pub fn configured(config: &Config, registry: &Registry) -> anyhow::Result<Option<Arc<Self>>> {
        let Some(t) = &config.tracing else {
            return Ok(None);
        };
        let tracer = Self::start(t, &config.service_name, &config.namespace, registry)
            .context("trace export")?;
        Ok(Some(tracer))
    }

    /// Registers the span counters and starts the export task (needs a Tokio runtime).
    pub fn start(
        config: &TracingConfig,
        service_name: &str,
        namespace: &str,
        registry: &Registry,
    ) -> anyhow::Result<Arc<Self>> {
        let dropped = IntCounterVec::new(
            Opts::new(
                "tern_trace_spans_dropped_total",
                "Spans not delivered to the trace collector: the export queue was full, or the collector failed or rejected them.",
            ),
            &["reason"],
        )?;
        let exported = IntCounter::new(
            "tern_trace_spans_exported_total",
            "Spans the trace collector accepted.",
        )?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(exported.clone()))?;
        let (queue, rx) = mpsc::channel(config.queue_size);
        let (flushes, flush_rx) = mpsc::channel(1);
        let resource = otlp::resource(service_name, namespace);
        export::spawn(config, resource, rx, flush_rx, dropped.clone(), exported)
            .with_context(|| format!("trace collector {}", config.collector))?;
        Ok(Arc::new(Self {
            sample_rate: config.sample_rate,
            queue,
            dropped_queue_full: dropped.with_label_values(&["queue_full"]),
            flushes,
        }))
    }

    /// Decides whether the request is sampled and rewrites its `traceparent` to match:
    /// with this sidecar's span as the parent when sampled, passed on untouched when the
    /// caller's says not sampled, a fresh unsampled one when there was none.
    pub fn begin(self: &Arc<Self>, headers: &mut HeaderMap) -> Option<SpanStart> {
        let incoming = headers
            .get(TRACEPARENT)
            .and_then(|v| trace_context::parse_parts(v.as_bytes()));
        let (trace_id, parent_id, flags) = match incoming {
            Some(p) => (p.trace_id, Some(p.parent_id), p.flags),
            None => {
                let sampled = self.sample_rate > 0.0 && fastrand::f64() < self.sample_rate;
                (fastrand::u128(1..), None, u8::from(sampled))
            }
        };
        if flags & trace_context::SAMPLED == 0 {
            if incoming.is_none() {
                let span = fastrand::u64(1..);
                headers.insert(TRACEPARENT, trace_context::header(trace_id, span, flags));
                // A tracestate means nothing without the traceparent it came with.
                headers.remove(TRACESTATE);
            }
            return None;
        }
        if incoming.is_none() {
            headers.remove(TRACESTATE);
        }
        let span_id = fastrand::u64(1..);
        headers.insert(TRACEPARENT, trace_context::header(trace_id, span_id, flags));
        let trace_state = headers
            .get(TRACESTATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Some(SpanStart {
            tracer: Arc::clone(self),
            trace_id,
            span_id,
            parent_id,
            flags,
            trace_state,
            start: SystemTime::now(),
        })
    }

    /// Queues a finished span for export, or drops and counts it when the queue is full.
    pub fn record(&self, span: FinishedSpan) {
        if self.queue.try_send(span).is_err() {
            self.dropped_queue_full.inc();
        }
    }

    /// Exports every span queued so far, waiting at most `limit` (a collector that
    /// is down or stuck must not hold up the exit); false when the time ran out.
    pub async fn flush(&self, limit: Duration) -> bool {
        let (done, finished) = oneshot::channel();
        let flushed = async { self.flushes.send(done).await.is_ok() && finished.await.is_ok() };
        tokio::time::timeout(limit, flushed).await.unwrap_or(false)
    }
}

#[cfg(test)]
mod tests;
