//! `echo-server`: the gRPC test server the end-to-end suite puts behind Tern sidecars.
//!
//! It answers every call kind of `tern.test.v1.Echo` and reports what it saw on the wire (request
//! metadata, `grpc-timeout`, cancellations) so tests can prove the proxy changed nothing. Every OK
//! response carries the trailers `x-echo-trailer: done` and `x-echo-trailer-bin: de ad be ef`.
//!
//! Usage: `echo-server --listen 127.0.0.1:0 --name echo-1`; prints
//! `echo-server listening on ADDR` once bound, stops gracefully on SIGTERM.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use clap::Parser;
use futures::Stream;
use http::HeaderValue;
use http_body_util::BodyExt as _;
use tern_proto::test::v1::echo_server::{Echo, EchoServer};
use tern_proto::test::v1::{EchoReply, EchoRequest, StatsReply, StatsRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt as _;
use tonic::metadata::{KeyAndValueRef, MetadataMap};
use tonic::{Code, Request, Response, Status, Streaming};

/// Larger than anything the tests send (5 MiB) so only the proxy can be the cause of a size error.
const MAX_MESSAGE: usize = 32 * 1024 * 1024;
const TRAILER: &str = "x-echo-trailer";
const TRAILER_BIN: &str = "x-echo-trailer-bin";
const TRAILER_BIN_VALUE: [u8; 4] = [0xde, 0xad, 0xbe, 0xef];

#[derive(Parser, Debug)]
#[command(
    name = "echo-server",
    about = "gRPC Echo test server for the Tern e2e suite"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Instance name, returned in every reply's `server` field.
    #[arg(long, default_value = "echo")]
    name: String,
    /// Send `content-length` on responses of unary-response methods, as plain HTTP/2 servers
    /// (nghttpd, servers that buffer a reply) do: the whole body is read first, then sent with
    /// its size announced. Streaming responses are left as they are.
    #[arg(long)]
    content_length: bool,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    cancelled: AtomicU64,
    last_grpc_timeout: Mutex<String>,
}

#[derive(Clone)]
struct EchoService {
    name: Arc<str>,
    counters: Arc<Counters>,
}

/// Counts the call as cancelled unless `finish` ran: tonic drops the handler (and whatever task
/// feeds a response stream notices the dropped receiver) when the client resets the stream.
struct CancelGuard {
    counters: Arc<Counters>,
    finished: bool,
}

impl CancelGuard {
    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.counters.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl EchoService {
    /// Counts the call and renders its metadata; returns the guard that detects cancellation.
    fn observe(&self, metadata: &MetadataMap) -> (Vec<String>, CancelGuard) {
        self.counters.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(timeout) = metadata.get("grpc-timeout") {
            let value = timeout.to_str().unwrap_or("<non-ascii>").to_string();
            let mut last = self
                .counters
                .last_grpc_timeout
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            *last = value;
        }
        let guard = CancelGuard {
            counters: self.counters.clone(),
            finished: false,
        };
        (render_metadata(metadata), guard)
    }

    fn reply(&self, req: &EchoRequest, metadata: Vec<String>, seq: u32) -> EchoReply {
        let payload = if req.reply_size > 0 {
            pattern(req.reply_size as usize)
        } else {
            req.payload.clone()
        };
        EchoReply {
            message: req.message.clone(),
            payload,
            server: self.name.to_string(),
            metadata,
            seq,
        }
    }
}

/// The payload the server sends when asked for `reply_size` bytes; the test checks it byte for byte.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn render_metadata(metadata: &MetadataMap) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    metadata
        .iter()
        .map(|entry| match entry {
            KeyAndValueRef::Ascii(key, value) => {
                format!("{}={}", key, value.to_str().unwrap_or("<non-ascii>"))
            }
            // Rendered decoded-then-re-encoded so padding differences on the wire do not matter.
            KeyAndValueRef::Binary(key, value) => match value.to_bytes() {
                Ok(bytes) => format!("{}={}", key, b64.encode(bytes)),
                Err(_) => format!("{}=<invalid base64>", key),
            },
        })
        .collect()
}

fn failure(req: &EchoRequest) -> Option<Status> {
    (req.fail_code != 0).then(|| Status::new(Code::from(req.fail_code), req.message.clone()))
}

async fn delay(ms: u32) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let (metadata, guard) = self.observe(request.metadata());
        let req = request.into_inner();
        delay(req.delay_ms).await;
        guard.finish();
        match failure(&req) {
            Some(status) => Err(status),
            None => Ok(Response::new(self.reply(&req, metadata, 0))),
        }
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let (metadata, guard) = self.observe(request.metadata());
        let req = request.into_inner();
        if let Some(status) = failure(&req) {
            guard.finish();
            return Err(status);
        }
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            for seq in 1..=req.count {
                tokio::select! {
                    _ = delay(req.delay_ms) => {}
                    _ = tx.closed() => return,
                }
                let reply = this.reply(&req, metadata.clone(), seq);
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
            guard.finish();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let (metadata, guard) = self.observe(request.metadata());
        let mut inbound = request.into_inner();
        let mut joined = EchoRequest::default();
        let mut count = 0u32;
        while let Some(item) = inbound.next().await {
            let req = item?;
            count += 1;
            joined.message.push_str(&req.message);
            joined.payload.extend_from_slice(&req.payload);
            joined.delay_ms = joined.delay_ms.max(req.delay_ms);
            if req.fail_code != 0 {
                joined.fail_code = req.fail_code;
            }
        }
        delay(joined.delay_ms).await;
        guard.finish();
        if let Some(status) = failure(&joined) {
            return Err(status);
        }
        Ok(Response::new(self.reply(&joined, metadata, count)))
    }

    type BidiStreamStream = ReplyStream;

    async fn bidi_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStreamStream>, Status> {
        let (metadata, guard) = self.observe(request.metadata());
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let mut seq = 0u32;
            loop {
                let next = tokio::select! {
                    next = inbound.next() => next,
                    _ = tx.closed() => return,
                };
                let req = match next {
                    None => break,
                    Some(Ok(req)) => req,
                    // The client reset the stream: the guard counts it.
                    Some(Err(_)) => return,
                };
                seq += 1;
                tokio::select! {
                    _ = delay(req.delay_ms) => {}
                    _ = tx.closed() => return,
                }
                let item = match failure(&req) {
                    Some(status) => Err(status),
                    None => Ok(this.reply(&req, metadata.clone(), seq)),
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() {
                    return;
                }
                if failed {
                    break;
                }
            }
            guard.finish();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stats(&self, _request: Request<StatsRequest>) -> Result<Response<StatsReply>, Status> {
        let last_grpc_timeout = self
            .counters
            .last_grpc_timeout
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        Ok(Response::new(StatsReply {
            server: self.name.to_string(),
            calls: self.counters.calls.load(Ordering::SeqCst),
            cancelled: self.counters.cancelled.load(Ordering::SeqCst),
            last_grpc_timeout,
        }))
    }
}

/// Adds the test trailers to every trailer block that reports `grpc-status: 0`.
///
/// tonic gives a unary handler no way to set trailers (its response metadata become headers), so
/// the trailers are added to the HTTP/2 body here, which covers all four call kinds alike.
fn add_trailers(response: http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> {
    response.map(|body| {
        let body = body.map_frame(|frame| match frame.into_trailers() {
            Ok(mut trailers) => {
                if trailers.get("grpc-status").is_some_and(|s| s == "0") {
                    let b64 = base64::engine::general_purpose::STANDARD;
                    trailers.insert(TRAILER, HeaderValue::from_static("done"));
                    if let Ok(value) = HeaderValue::from_str(&b64.encode(TRAILER_BIN_VALUE)) {
                        trailers.insert(TRAILER_BIN, value);
                    }
                }
                http_body::Frame::trailers(trailers)
            }
            Err(frame) => frame,
        });
        tonic::body::Body::new(body)
    })
}

/// Announces the size of unary responses (see `Args::content_length`).
#[derive(Clone)]
struct ContentLength<S>(S);

type HttpResponse = http::Response<tonic::body::Body>;

impl<S, B> tower::Service<http::Request<B>> for ContentLength<S>
where
    S: tower::Service<http::Request<B>, Response = HttpResponse> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<HttpResponse, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let unary = path.ends_with("/Unary") || path.ends_with("/ClientStream");
        let fut = self.0.call(req);
        Box::pin(async move {
            let rsp = fut.await?;
            if !unary {
                return Ok(rsp);
            }
            let (mut parts, body) = rsp.into_parts();
            let Ok(collected) = body.collect().await else {
                return Ok(http::Response::from_parts(
                    parts,
                    tonic::body::Body::empty(),
                ));
            };
            let trailers = collected.trailers().cloned();
            let data = collected.to_bytes();
            parts
                .headers
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(data.len()));
            let mut frames = vec![Ok::<_, tonic::Status>(http_body::Frame::data(data))];
            frames.extend(trailers.map(|t| Ok(http_body::Frame::trailers(t))));
            let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
            Ok(http::Response::from_parts(
                parts,
                tonic::body::Body::new(body),
            ))
        })
    }
}

async fn shutdown_signal() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        // Without a SIGTERM handler, Ctrl-C still stops the server.
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr().context("reading the bound address")?;
    let service = EchoService {
        name: args.name.into(),
        counters: Arc::default(),
    };
    let echo = EchoServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    println!("echo-server listening on {local}");
    tonic::transport::Server::builder()
        // grpc-go takes up to 16 MiB of metadata; hyper's default is 16 KiB. The metadata tests
        // need a server that takes more than the proxy's own limit.
        .http2_max_header_list_size(1024 * 1024)
        .layer(tower::util::option_layer(
            args.content_length
                .then_some(tower::layer::layer_fn(ContentLength)),
        ))
        .layer(tower::util::MapResponseLayer::new(add_trailers))
        .add_service(echo)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown_signal())
        .await
        .context("serving")?;
    Ok(())
}
