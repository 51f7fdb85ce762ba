//! `order`: the demo's front service. One port serves gRPC `OrderService.CreateOrder` and
//! HTTP/1.1 `POST /orders` (JSON); both pay through `PayService.Pay` at a fixed host:port,
//! like a plain application that knows nothing of a mesh (a sidecar's upstream port, or a
//! pay replica directly).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tern_demo::cli::{host_port, parse_positive_duration};
use tern_demo::deadline::{effective_code, parse_grpc_timeout};
use tern_demo::order_api::{
    http_status_for, order_id_or_new, parse_order_request, ErrorReply, OrderReply, MAX_BODY_BYTES,
};
use tern_demo::process::{init_tracing, shutdown_signal};
use tern_proto::demo::v1::order_service_server::{OrderService, OrderServiceServer};
use tern_proto::demo::v1::pay_service_client::PayServiceClient;
use tern_proto::demo::v1::{CreateOrderReply, CreateOrderRequest, PayRequest};
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Routes;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use tower::ServiceExt;

/// W3C trace context headers carried from the incoming request to the pay call.
const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// How long in-flight requests may take to finish after SIGTERM.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Tern demo order service (gRPC OrderService and HTTP/1.1 POST /orders on one port).
#[derive(Parser, Debug)]
#[command(name = "order")]
struct Args {
    /// Address to serve gRPC and HTTP on; port 0 picks a free port (the bound one is printed).
    #[arg(
        long,
        env = "ORDER_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    listen: SocketAddr,
    /// Host of the pay service.
    #[arg(
        long,
        env = "GRPC_SERVER_HOST",
        default_value = "127.0.0.1",
        value_name = "HOST"
    )]
    pay_host: String,
    /// Port of the pay service.
    #[arg(
        long,
        env = "GRPC_SERVER_PORT",
        default_value = "50051",
        value_name = "PORT"
    )]
    pay_port: u16,
    /// Deadline of each pay call (sent as grpc-timeout); a shorter incoming deadline wins.
    #[arg(long, env = "ORDER_PAY_TIMEOUT", default_value = "5s", value_name = "DURATION",
          value_parser = parse_positive_duration)]
    pay_timeout: Duration,
}

type TraceContext = Vec<(&'static str, AsciiMetadataValue)>;

#[derive(Clone, Debug)]
struct Orders {
    pay: PayServiceClient<Channel>,
    pay_timeout: Duration,
}

impl Orders {
    async fn place(
        &self,
        order: CreateOrderRequest,
        trace: TraceContext,
        incoming_deadline: Option<Duration>,
    ) -> Result<CreateOrderReply, Status> {
        let deadline = incoming_deadline.map_or(self.pay_timeout, |d| d.min(self.pay_timeout));
        let order_id = order_id_or_new(Some(&order.order_id));
        let mut req = Request::new(PayRequest {
            order_id: order_id.clone(),
            amount_cents: order.amount_cents,
            currency: order.currency,
        });
        req.set_timeout(deadline);
        for (name, value) in trace {
            req.metadata_mut().insert(name, value);
        }
        let started = Instant::now();
        let mut pay = self.pay.clone();
        // The channel enforces the deadline too; this outer bound also covers time spent
        // queued in the channel's buffer.
        match tokio::time::timeout(deadline, pay.pay(req)).await {
            Ok(Ok(reply)) => {
                let reply = reply.into_inner();
                Ok(CreateOrderReply {
                    order_id,
                    pay_status: reply.status,
                    pay_replica: reply.replica,
                    pay_version: reply.version,
                })
            }
            Ok(Err(status)) => {
                let code = effective_code(&status, started.elapsed(), deadline);
                tracing::debug!(%order_id, ?code, message = status.message(), "pay failed");
                if code == status.code() {
                    Err(Status::new(code, status.message()))
                } else {
                    Err(deadline_exceeded(deadline))
                }
            }
            Err(_) => Err(deadline_exceeded(deadline)),
        }
    }
}

fn deadline_exceeded(deadline: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "pay did not answer within {}",
        humantime::format_duration(deadline)
    ))
}

fn trace_from_metadata(md: &MetadataMap) -> TraceContext {
    TRACE_HEADERS
        .iter()
        .filter_map(|&name| md.get(name).map(|v| (name, v.clone())))
        .collect()
}

fn trace_from_headers(headers: &HeaderMap) -> TraceContext {
    TRACE_HEADERS
        .iter()
        .filter_map(|&name| {
            let value = headers.get(name)?;
            AsciiMetadataValue::try_from(value.as_bytes())
                .ok()
                .map(|v| (name, v))
        })
        .collect()
}

#[tonic::async_trait]
impl OrderService for Orders {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<CreateOrderReply>, Status> {
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let trace = trace_from_metadata(request.metadata());
        self.place(request.into_inner(), trace, deadline)
            .await
            .map(Response::new)
    }
}

/// Routes one request: the JSON API and health check by path, gRPC to tonic.
#[derive(Clone)]
struct App {
    orders: Orders,
    grpc: Routes,
}

impl App {
    async fn handle(self, req: http::Request<Incoming>) -> http::Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/orders") => self.orders_http(req).await,
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
            _ if is_grpc(req.headers()) => match self.grpc.oneshot(req).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            },
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    async fn orders_http(self, req: http::Request<Incoming>) -> http::Response<Body> {
        let trace = trace_from_headers(req.headers());
        let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                let msg = format!("body larger than {MAX_BODY_BYTES} bytes");
                let err = ErrorReply::new(Code::InvalidArgument, msg);
                return json(StatusCode::PAYLOAD_TOO_LARGE, &err);
            }
            Err(e) => {
                let err = ErrorReply::new(Code::InvalidArgument, format!("cannot read body: {e}"));
                return json(StatusCode::BAD_REQUEST, &err);
            }
        };
        let order = match parse_order_request(&body) {
            Ok(order) => order,
            Err(msg) => {
                let err = ErrorReply::new(Code::InvalidArgument, msg);
                return json(StatusCode::BAD_REQUEST, &err);
            }
        };
        let request = CreateOrderRequest {
            order_id: order.order_id.unwrap_or_default(),
            amount_cents: order.amount_cents,
            currency: order.currency,
        };
        match self.orders.place(request, trace, None).await {
            Ok(r) => json(
                StatusCode::OK,
                &OrderReply {
                    order_id: r.order_id,
                    pay_status: r.pay_status,
                    pay_replica: r.pay_replica,
                    pay_version: r.pay_version,
                },
            ),
            Err(status) => json(
                http_status_for(status.code()),
                &ErrorReply::new(status.code(), status.message()),
            ),
        }
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> http::Response<Body> {
    let mut resp = http::Response::new(Body::new(Full::new(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn text(status: StatusCode, body: &'static str) -> http::Response<Body> {
    respond(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    )
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> http::Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => respond(status, "application/json", Bytes::from(body)),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode reply\n"),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let pay_uri = format!("http://{}", host_port(&args.pay_host, args.pay_port));
    // Lazy: order must start (and answer UNAVAILABLE) before pay is up.
    let channel = Endpoint::from_shared(pay_uri.clone())
        .with_context(|| format!("invalid pay address {pay_uri}"))?
        .connect_timeout(args.pay_timeout)
        .connect_lazy();
    let orders = Orders {
        pay: PayServiceClient::new(channel),
        pay_timeout: args.pay_timeout,
    };
    let app = App {
        grpc: Routes::new(OrderServiceServer::new(orders.clone())).prepare(),
        orders,
    };

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener
        .local_addr()
        .context("cannot read the bound address")?;
    println!("order listening on {bound}");

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning on the error.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let svc = hyper::service::service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(app.handle(req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended with error: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!("order: connections still open after {DRAIN_GRACE:?}; exiting anyway");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("order: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn validates_flags() {
        let parse = |a: &[&str]| Args::try_parse_from([&["order"], a].concat());
        assert!(parse(&["--pay-port", "70000"]).is_err());
        assert!(parse(&["--pay-timeout", "0s"]).is_err());
        assert!(parse(&["--pay-timeout", "later"]).is_err());
        assert!(parse(&["--pay-host", "pay", "--pay-timeout", "250ms"]).is_ok());
    }

    #[test]
    fn trace_context_from_http() {
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static("00-abc-def-01"));
        h.insert("other", HeaderValue::from_static("x"));
        let t = trace_from_headers(&h);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].0, "traceparent");
        assert!(is_grpc(&{
            let mut g = HeaderMap::new();
            g.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc+proto"),
            );
            g
        }));
        assert!(!is_grpc(&h));
    }
}
