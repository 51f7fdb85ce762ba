//! Access log: one JSON line per request (and per opaque TCP connection, see
//! [`crate::tcp`]), written off the request path.
//!
//! Lines go through a bounded channel to a writer task, so a slow stdout or
//! disk never stalls traffic; a line that does not fit is dropped and counted.

use std::net::SocketAddr;
use std::path::PathBuf;

use prometheus::IntCounter;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::config::AccessLogTarget;
use crate::metrics::Direction;

const QUEUE: usize = 8192;

#[derive(Debug, Serialize)]
pub struct Line<'a> {
    pub time: String,
    pub direction: Direction,
    pub protocol: &'static str,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    /// `package.Service/Method` for gRPC calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_method: Option<&'a str>,
    pub service: &'a str,
    pub status: u16,
    pub grpc_status: Option<u32>,
    pub duration_ms: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub upstream: Option<SocketAddr>,
    /// Inbound: the caller's verified identity; outbound: the endpoint's.
    pub peer_identity: Option<&'a str>,
    /// "TLSv1.3" when the mesh hop was mTLS, else absent (plaintext).
    pub tls: Option<&'a str>,
    pub attempts: u32,
    pub trace_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

enum Msg {
    Line(String),
    /// Answered once every line queued before it is written out.
    Flush(tokio::sync::oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<Msg>,
    dropped: IntCounter,
}

impl AccessLog {
    /// Opens the target and starts the writer; `None` when logging is off.
    pub async fn start(
        target: &AccessLogTarget,
        dropped: IntCounter,
    ) -> std::io::Result<Option<Self>> {
        let out: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = match target {
            AccessLogTarget::Off => return Ok(None),
            AccessLogTarget::Stdout => Box::new(tokio::io::stdout()),
            AccessLogTarget::Stderr => Box::new(tokio::io::stderr()),
            AccessLogTarget::File(path) => Box::new(open_append(path).await?),
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_lines(rx, out));
        Ok(Some(Self { tx, dropped }))
    }

    /// Queues one line: a request's [`Line`], or an opaque TCP connection's.
    pub fn log<L: Serialize>(&self, line: &L) {
        match serde_json::to_string(line) {
            Ok(s) => {
                if self.tx.try_send(Msg::Line(s)).is_err() {
                    self.dropped.inc();
                }
            }
            Err(e) => tracing::warn!(error = %e, "access log line not serialisable"),
        }
    }

    /// Waits until every line logged so far is written (used at shutdown).
    pub async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

async fn open_append(path: &PathBuf) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
}

async fn write_lines(
    mut rx: mpsc::Receiver<Msg>,
    out: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
) {
    let mut out = tokio::io::BufWriter::new(out);
    let mut waiting = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut msg = first;
        loop {
            match msg {
                Msg::Line(mut line) => {
                    line.push('\n');
                    if let Err(e) = out.write_all(line.as_bytes()).await {
                        tracing::error!(error = %e, "access log write failed");
                        return;
                    }
                }
                Msg::Flush(done) => waiting.push(done),
            }
            // Batch whatever is queued; flush once the queue is drained.
            match rx.try_recv() {
                Ok(next) => msg = next,
                Err(_) => break,
            }
        }
        if let Err(e) = out.flush().await {
            tracing::error!(error = %e, "access log flush failed");
            return;
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

/// RFC 3339 UTC time with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
