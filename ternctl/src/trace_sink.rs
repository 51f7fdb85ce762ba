//! An OTLP/gRPC trace receiver inside ternctl (the official
//! `TraceService/Export` from `opentelemetry-proto`): `ternctl bench` points the
//! sidecars at it to measure the cost of exporting spans, counting what arrives;
//! `ternctl demo --trace` keeps the spans too, to print one trace.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;

/// A span and the `service.name` of the sidecar that sent it.
pub type Received = (String, Span);

/// Spans kept at most; a demo needs a few traces, not all of them.
const KEEP_AT_MOST: usize = 10_000;

#[derive(Clone, Default)]
struct Counter {
    count: Arc<AtomicU64>,
    /// `None`: count only.
    kept: Option<Arc<Mutex<Vec<Received>>>>,
}

#[tonic::async_trait]
impl TraceService for Counter {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        let n: usize = request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(kept) = &self.kept {
            let mut kept = kept
                .lock()
                .map_err(|_| tonic::Status::internal("poisoned"))?;
            for rs in request.resource_spans {
                let service = service_name(&rs);
                for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                    if kept.len() < KEEP_AT_MOST {
                        kept.push((service.clone(), span));
                    }
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn service_name(rs: &opentelemetry_proto::tonic::trace::v1::ResourceSpans) -> String {
    rs.resource
        .iter()
        .flat_map(|r| &r.attributes)
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            other => format!("{other:?}"),
        })
        .unwrap_or_default()
}

/// A running receiver on loopback, on a thread and runtime of its own so that it takes
/// nothing from the caller's; stops when dropped.
pub struct TraceSink {
    pub addr: SocketAddr,
    received: Counter,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TraceSink {
    /// `keep`: keep the spans (see [`TraceSink::kept`]), not only count them.
    pub fn start(keep: bool) -> anyhow::Result<Self> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let received = Counter {
            kept: keep.then(Arc::default),
            ..Counter::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = TraceServiceServer::new(received.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("trace-sink".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => return eprintln!("trace receiver: {e}"),
                    };
                    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                    let served = tonic::transport::Server::builder()
                        .add_service(service)
                        .serve_with_incoming_shutdown(incoming, async {
                            let _ = stopped.await;
                        })
                        .await;
                    if let Err(e) = served {
                        eprintln!("trace receiver stopped: {e}");
                    }
                });
            })?;
        Ok(Self {
            addr,
            received,
            stop: Some(stop),
        })
    }

    /// Spans received so far.
    pub fn spans(&self) -> u64 {
        self.received.count.load(Ordering::Relaxed)
    }

    /// The spans kept so far.
    pub fn kept(&self) -> Vec<Received> {
        self.received
            .kept
            .as_ref()
            .and_then(|k| k.lock().ok().map(|k| k.clone()))
            .unwrap_or_default()
    }
}

impl Drop for TraceSink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
