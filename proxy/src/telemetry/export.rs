//! The export task: batches queued spans and sends them to the collector.
//!
//! One task, one request in flight at a time: while the collector is slow the
//! queue in front of it fills and [`super::Tracer::record`] drops, so a stuck
//! collector costs a bounded amount of memory and no request any time.
//! At shutdown [`super::Tracer::flush`] asks it to send everything queued
//! at once, without waiting for a batch to fill.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus::{IntCounter, IntCounterVec};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

use super::{otlp, FinishedSpan};
use crate::config::tracing::TracingConfig;

/// Most spans in one export request.
const MAX_BATCH: usize = 512;
/// How long a connection attempt to the collector may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one export request may take before its spans count as dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn spawn(
    config: &TracingConfig,
    resource: Resource,
    rx: mpsc::Receiver<FinishedSpan>,
    flushes: mpsc::Receiver<oneshot::Sender<()>>,
    dropped: IntCounterVec,
    exported: IntCounter,
) -> Result<(), tonic::transport::Error> {
    // Lazy: a collector that is down at start is retried with every batch.
    let channel = Endpoint::from_shared(config.collector.clone())?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(EXPORT_TIMEOUT)
        .connect_lazy();
    let exporter = Exporter {
        client: TraceServiceClient::new(channel),
        resource,
        batch_delay: config.batch_delay,
        failed: dropped.with_label_values(&["export_failed"]),
        failing: false,
        rejected: dropped.with_label_values(&["rejected"]),
        exported,
    };
    tokio::spawn(exporter.run(rx, flushes));
    Ok(())
}

struct Exporter {
    client: TraceServiceClient<Channel>,
    resource: Resource,
    batch_delay: Duration,
    failed: IntCounter,
    rejected: IntCounter,
    exported: IntCounter,
    /// The last export failed: warn once per outage, not once per batch.
    failing: bool,
}

impl Exporter {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<FinishedSpan>,
        mut flushes: mpsc::Receiver<oneshot::Sender<()>>,
    ) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let flush = tokio::select! {
                span = rx.recv() => match span {
                    Some(first) => {
                        batch.push(first);
                        self.fill(&mut rx, &mut flushes, &mut batch).await
                    }
                    None => return,
                },
                Some(done) = flushes.recv() => Some(done),
            };
            if !batch.is_empty() {
                self.send(std::mem::take(&mut batch)).await;
            }
            if let Some(done) = flush {
                self.flush(&mut rx).await;
                let _ = done.send(());
            }
        }
    }

    /// Waits up to the batch delay for more spans, so a busy sidecar sends few
    /// requests; a flush asked for meanwhile ends the wait and is returned.
    async fn fill(
        &self,
        rx: &mut mpsc::Receiver<FinishedSpan>,
        flushes: &mut mpsc::Receiver<oneshot::Sender<()>>,
        batch: &mut Vec<FinishedSpan>,
    ) -> Option<oneshot::Sender<()>> {
        let until = tokio::time::sleep(self.batch_delay);
        tokio::pin!(until);
        while batch.len() < MAX_BATCH {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(s) => batch.push(s),
                    None => return None,
                },
                Some(done) = flushes.recv() => return Some(done),
                () = &mut until => return None,
            }
        }
        None
    }

    /// Sends everything queued now, in batches, without waiting for more.
    async fn flush(&mut self, rx: &mut mpsc::Receiver<FinishedSpan>) {
        loop {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                return;
            }
            self.send(batch).await;
        }
    }

    async fn send(&mut self, batch: Vec<FinishedSpan>) {
        let n = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![otlp::resource_spans(self.resource.clone(), batch)],
        };
        match self.client.export(request).await {
            Ok(rsp) => {
                let rejected = rsp
                    .into_inner()
                    .partial_success
                    .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0))
                    .min(n);
                self.rejected.inc_by(rejected);
                self.exported.inc_by(n - rejected);
                if std::mem::take(&mut self.failing) {
                    tracing::info!("trace export works again");
                }
            }
            Err(status) => {
                self.failed.inc_by(n);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(%status, "trace export failed; spans are dropped and counted until it works again");
                }
            }
        }
    }
}
