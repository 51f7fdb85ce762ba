//! End-to-end checks of the demo chain: the real `pay`, `order` and `loadgen` binaries on
//! loopback ports, driven over HTTP/1.1 (raw socket) and gRPC (tonic).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde_json::Value;
use tern_proto::demo::v1::order_service_client::OrderServiceClient;
use tern_proto::demo::v1::pay_service_server::{PayService, PayServiceServer};
use tern_proto::demo::v1::{CreateOrderRequest, PayReply, PayRequest};
use tern_test_support::{Proc, Signal, TestDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;

const STARTUP: Duration = Duration::from_secs(20);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A demo binary listening on a loopback port, with its log directory; the process is stopped
/// (SIGTERM, then SIGKILL) when the test ends, however it ends.
struct Demo {
    proc: Proc,
    addr: String,
    _dir: TestDir,
}

impl Demo {
    /// Starts `bin` and waits for its `<name> listening on ADDR ...` line.
    async fn start(bin: &str, name: &str, args: &[&str]) -> Result<Demo> {
        let dir = TestDir::new(&format!("chain-{name}"))?;
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let mut proc = Proc::spawn_with_env_removed(
            dir.path(),
            name,
            Path::new(bin),
            &args,
            &[],
            &["RUST_LOG"],
        )?;
        let rest = proc
            .wait_for_line(&format!("{name} listening on "), STARTUP)
            .await?;
        let addr = rest
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        Ok(Demo {
            proc,
            addr,
            _dir: dir,
        })
    }

    async fn pay(args: &[&str]) -> Result<Demo> {
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        Demo::start(env!("CARGO_BIN_EXE_pay"), "pay", &all).await
    }

    async fn order(pay_port: &str, args: &[&str]) -> Result<Demo> {
        let mut all = vec!["--listen", "127.0.0.1:0", "--pay-port", pay_port];
        all.extend_from_slice(args);
        Demo::start(env!("CARGO_BIN_EXE_order"), "order", &all).await
    }

    fn port(&self) -> &str {
        self.addr.rsplit(':').next().unwrap_or_default()
    }
}

/// One HTTP/1.1 request on a fresh connection; returns the status code and body.
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8(raw)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    Ok((status, body.to_string()))
}

async fn grpc_order(addr: &str, order_id: &str) -> Result<Result<(String, String), tonic::Status>> {
    let mut client = OrderServiceClient::connect(format!("http://{addr}")).await?;
    let req = CreateOrderRequest {
        order_id: order_id.into(),
        amount_cents: 4200,
        currency: "EUR".into(),
    };
    let res = tokio::time::timeout(IO_TIMEOUT, client.create_order(req)).await?;
    Ok(res.map(|r| {
        let r = r.into_inner();
        (r.order_id, r.pay_replica)
    }))
}

#[tokio::test]
async fn chain_serves_http_grpc_and_load() -> Result<()> {
    let mut pay = Demo::pay(&["--replica", "pay-1", "--version", "v7"]).await?;
    let order = Demo::order(pay.port(), &[]).await?;

    let (status, body) = http(&order.addr, "GET", "/healthz", "", "").await?;
    assert_eq!((status, body.as_str()), (200, "ok"));

    let (status, body) = http(
        &order.addr,
        "POST",
        "/orders",
        "",
        r#"{"order_id":"o-1","amount_cents":123,"currency":"EUR"}"#,
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(v["order_id"], "o-1");
    assert_eq!(v["pay_status"], "paid");
    assert_eq!(v["pay_replica"], "pay-1");
    assert_eq!(v["pay_version"], "v7");

    // No order_id: order makes one up.
    let (status, body) = http(
        &order.addr,
        "POST",
        "/orders",
        "",
        r#"{"amount_cents":1,"currency":"EUR"}"#,
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body)?;
    assert!(v["order_id"].as_str().is_some_and(|id| !id.is_empty()));

    let (status, body) = http(
        &order.addr,
        "POST",
        "/orders",
        "",
        r#"{"amount_cents":0,"currency":"EUR"}"#,
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(v["grpc_code"], "INVALID_ARGUMENT");

    let (status, _) = http(&order.addr, "POST", "/orders", "", "{not json").await?;
    assert_eq!(status, 400);

    let reply = grpc_order(&order.addr, "o-2").await?;
    assert_eq!(reply.ok(), Some(("o-2".to_string(), "pay-1".to_string())));

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--target", &order.addr, "--duration", "2s", "--rate", "50"])
        .stderr(Stdio::null())
        .output()
        .await?;
    assert!(out.status.success(), "loadgen exit {:?}", out.status);
    let stdout = String::from_utf8(out.stdout)?;
    let last = stdout.lines().last().context("loadgen printed nothing")?;
    let s: Value = serde_json::from_str(last)?;
    assert_eq!(s["type"], "summary", "{last}");
    assert!(s["ok"].as_u64().is_some_and(|ok| ok > 50), "{last}");
    assert_eq!(s["failed"], 0, "{last}");
    assert_eq!(s["sent"], s["ok"], "{last}");
    assert!(
        s["by_replica"]["pay-1"].as_u64().is_some_and(|n| n > 0),
        "{last}"
    );
    assert!(s["p50_ms"].as_f64().is_some_and(|p| p > 0.0), "{last}");

    // SIGTERM: graceful stop with exit code 0.
    pay.proc.signal(Signal::SIGTERM)?;
    let status = pay.proc.wait_exit(Duration::from_secs(10)).await?;
    assert!(status.success(), "pay exit {status:?}");
    Ok(())
}

#[tokio::test]
async fn pay_errors_reach_http_and_grpc_callers() -> Result<()> {
    let failing = Demo::pay(&["--fail-rate", "1", "--fail-code", "unavailable"]).await?;
    let order = Demo::order(failing.port(), &[]).await?;
    let (status, body) = http(
        &order.addr,
        "POST",
        "/orders",
        "",
        r#"{"amount_cents":5,"currency":"EUR"}"#,
    )
    .await?;
    assert_eq!(status, 502, "{body}");
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(v["grpc_code"], "UNAVAILABLE");
    let err = grpc_order(&order.addr, "x")
        .await?
        .err()
        .context("expected failure")?;
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("injected"), "{}", err.message());

    let slow = Demo::pay(&["--latency", "2s"]).await?;
    let order = Demo::order(slow.port(), &["--pay-timeout", "100ms"]).await?;
    let (status, body) = http(
        &order.addr,
        "POST",
        "/orders",
        "",
        r#"{"amount_cents":5,"currency":"EUR"}"#,
    )
    .await?;
    assert_eq!(status, 504, "{body}");
    let err = grpc_order(&order.addr, "x")
        .await?
        .err()
        .context("expected failure")?;
    assert_eq!(err.code(), Code::DeadlineExceeded);

    // order starts and answers even while nothing listens at the pay address.
    let closed_port = {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        l.local_addr()?.port().to_string()
    };
    let order = Demo::order(&closed_port, &[]).await?;
    let (status, body) = http(
        &order.addr,
        "POST",
        "/orders",
        "",
        r#"{"amount_cents":5,"currency":"EUR"}"#,
    )
    .await?;
    assert_eq!(status, 502, "{body}");
    Ok(())
}

/// A PayService that remembers the `traceparent` of each call.
#[derive(Clone, Default)]
struct RecordingPay {
    seen: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl PayService for RecordingPay {
    async fn pay(
        &self,
        req: tonic::Request<PayRequest>,
    ) -> Result<tonic::Response<PayReply>, tonic::Status> {
        let tp = req
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(tp);
        }
        Ok(tonic::Response::new(PayReply {
            status: "paid".into(),
            replica: "recorder".into(),
            version: "v0".into(),
        }))
    }
}

#[tokio::test]
async fn traceparent_is_propagated_to_pay() -> Result<()> {
    let pay = RecordingPay::default();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port().to_string();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PayServiceServer::new(pay.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let order = Demo::order(&port, &[]).await?;

    let tp_http = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (status, body) = http(
        &order.addr,
        "POST",
        "/orders",
        &format!("traceparent: {tp_http}\r\n"),
        r#"{"amount_cents":5,"currency":"EUR"}"#,
    )
    .await?;
    assert_eq!(status, 200, "{body}");

    let tp_grpc = "00-11111111111111111111111111111111-2222222222222222-01";
    let mut client = OrderServiceClient::connect(format!("http://{}", order.addr)).await?;
    let mut req = tonic::Request::new(CreateOrderRequest {
        order_id: "t".into(),
        amount_cents: 5,
        currency: "EUR".into(),
    });
    req.metadata_mut().insert("traceparent", tp_grpc.parse()?);
    client.create_order(req).await?;

    let seen = pay.seen.lock().map_err(|_| anyhow!("poisoned"))?.clone();
    assert_eq!(seen, vec![tp_http.to_string(), tp_grpc.to_string()]);
    server.abort();
    Ok(())
}

#[test]
fn bad_flags_exit_with_code_2() -> Result<()> {
    let cases: [(&str, &[&str]); 6] = [
        (env!("CARGO_BIN_EXE_pay"), &["--fail-rate", "2"]),
        (env!("CARGO_BIN_EXE_pay"), &["--fail-code", "NOT_A_CODE"]),
        (env!("CARGO_BIN_EXE_pay"), &["--latency", "5"]),
        (env!("CARGO_BIN_EXE_order"), &["--pay-port", "99999"]),
        (env!("CARGO_BIN_EXE_loadgen"), &["--rate", "0"]),
        (
            env!("CARGO_BIN_EXE_loadgen"),
            &["--rate", "5", "--concurrency", "2"],
        ),
    ];
    for (bin, args) in cases {
        let out = Command::new(bin).args(args).stdin(Stdio::null()).output()?;
        assert_eq!(out.status.code(), Some(2), "{bin} {args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let flag = args[0];
        assert!(stderr.contains(flag), "{bin} {args:?}: {stderr}");
    }
    Ok(())
}
