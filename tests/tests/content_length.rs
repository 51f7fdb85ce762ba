//! Peers that announce body sizes with `content-length`, which gRPC stacks such as tonic and
//! grpcio never send but plain HTTP/2 servers and some clients do.
//!
//! - Debian's `nghttpd` serves a gRPC reply from a file, with `content-length` and a
//!   `grpc-status: 0` trailer, behind two sidecars with retries possible: every call succeeds.
//! - A client announces a streaming request's size and the first attempt fails while the body is
//!   still arriving: the retry replays the sent part and streams the rest to another endpoint.
//!
//! The gRPC transparency suite also runs against a content-length-sending echo server
//! (`grpc_transparency.rs`, the `content_length` tests).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use bytes::{BufMut as _, Bytes, BytesMut};
use prost::Message as _;
use tern_proto::test::v1::{EchoReply, EchoRequest};
use tern_tests::containers::which;
use tern_tests::process::START_TIMEOUT;
use tern_tests::raw_grpc;
use tern_tests::{
    eventually, free_addr, missing, within, App, EchoMesh, Must, Proc, Proxy, ProxySpec, Route,
    TestDir, CALL_TIMEOUT,
};
use tokio::net::{TcpListener, TcpStream};

const UNARY: &str = "/tern.test.v1.Echo/Unary";
const CLIENT_STREAM: &str = "/tern.test.v1.Echo/ClientStream";

fn grpc_frame(msg: &impl prost::Message) -> Bytes {
    let encoded = msg.encode_to_vec();
    let mut frame = BytesMut::with_capacity(5 + encoded.len());
    frame.put_u8(0);
    frame.put_u32(encoded.len() as u32);
    frame.put_slice(&encoded);
    frame.freeze()
}

/// nghttpd serving `reply` for the Unary path, as an [`App`] the mesh can sit in front of.
async fn nghttpd(dir: &std::path::Path, reply: &Bytes) -> Result<App> {
    let program = which("nghttpd").context("nghttpd")?;
    let docs = dir.join("htdocs");
    std::fs::create_dir_all(docs.join("tern.test.v1.Echo"))?;
    std::fs::write(docs.join("tern.test.v1.Echo/Unary"), reply)?;
    let addr = free_addr()?;
    let args = [
        "--no-tls".to_string(),
        "--trailer=grpc-status: 0".to_string(),
        "-d".to_string(),
        docs.display().to_string(),
        "-a".to_string(),
        addr.ip().to_string(),
        addr.port().to_string(),
    ];
    let proc = Proc::spawn(dir, "nghttpd", &program, &args)?;
    eventually(START_TIMEOUT, || async {
        Ok(TcpStream::connect(addr)
            .await
            .err()
            .map(|e| format!("nghttpd not listening yet: {e}")))
    })
    .await?;
    Ok(App {
        proc,
        addr,
        name: "nghttpd".to_string(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nghttpd_replies_with_content_length_pass_two_sidecars() {
    if which("nghttpd").is_none() {
        missing("nghttpd (Debian's nghttp2-server) is not installed").must();
        return;
    }
    let dir = TestDir::new("nghttpd").must();
    let reply = grpc_frame(&EchoReply {
        message: "from nghttpd".into(),
        ..Default::default()
    });
    let app = nghttpd(dir.path(), &reply).await.must();
    let mesh = EchoMesh::around(dir, Route::Sidecars, vec![app])
        .await
        .must();
    let request = EchoRequest {
        message: "hi".into(),
        ..Default::default()
    };
    for i in 0..200 {
        let got = within(
            CALL_TIMEOUT,
            raw_grpc::unary(mesh.target, UNARY, &request, &[]),
        )
        .await
        .and_then(|r| r);
        let got = mesh.ok(got.with_context(|| format!("call {i}")));
        assert_eq!(got.grpc_status(), Some(0), "call {i}: {got:?}");
        assert_eq!(got.data, reply, "call {i}: the reply's bytes");
        assert_eq!(got.header("content-length"), Some(reply.len().to_string()));
    }
    for proxy in mesh.inbound.iter().chain(mesh.client.iter()) {
        assert!(
            !proxy.proc.stderr().contains("panicked"),
            "{}",
            proxy.proc.diagnostics()
        );
    }
}

/// Answers every request with UNAVAILABLE as soon as the first DATA frame is in, while the
/// caller is still sending: a failure the caller's sidecar may retry elsewhere.
async fn fail_after_first_frame(listener: TcpListener) {
    while let Ok((tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(tcp).await else {
                return;
            };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    let _ = body.data().await;
                    let rsp = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "14")
                        .body(())
                        .unwrap();
                    let _ = respond.send_response(rsp, true);
                });
            }
        });
    }
}

/// A client-streaming call whose size is announced, sent in two parts `gap` apart.
async fn announced_client_stream(
    addr: SocketAddr,
    parts: [Bytes; 2],
    gap: Duration,
) -> Result<u32> {
    let tcp = TcpStream::connect(addr).await?;
    let (client, conn) = h2::client::handshake(tcp).await?;
    let driver = tokio::spawn(conn);
    let mut client = client.ready().await?;
    let total = parts[0].len() + parts[1].len();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{CLIENT_STREAM}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("content-length", total.to_string())
        .body(())?;
    let (rsp, mut send) = client.send_request(req, false)?;
    let [first, second] = parts;
    send.send_data(first, false)?;
    tokio::time::sleep(gap).await;
    send.send_data(second, true)?;
    let (head, mut body) = rsp.await?.into_parts();
    let mut data = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await?;
    driver.abort();
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| head.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_string();
    if status != "0" {
        bail!("grpc-status {status}, headers {:?}", head.headers);
    }
    let reply = EchoReply::decode(data.get(5..).context("no message")?)?;
    Ok(reply.seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_of_an_announced_request_still_streaming() {
    let dir = TestDir::new("announced-retry").must();
    let echo = App::echo_server(dir.path(), "echo-1").await.must();
    let flaky = TcpListener::bind("127.0.0.1:0").await.must_io();
    let flaky_addr = flaky.local_addr().must_io();
    tokio::spawn(fail_after_first_frame(flaky));
    let listen = free_addr().must();
    let spec = ProxySpec::new("client-sidecar", "client")
        .upstream("echo", listen)
        .endpoints("echo", &[flaky_addr, echo.addr]);
    let proxy = Proxy::start(dir.path(), spec).await.must();
    let msg = |m: &str| {
        grpc_frame(&EchoRequest {
            message: m.into(),
            ..Default::default()
        })
    };
    // Round robin alternates, so half the calls meet the failing endpoint first.
    for i in 0..4 {
        let seq = within(
            CALL_TIMEOUT,
            announced_client_stream(listen, [msg("a"), msg("b")], Duration::from_millis(200)),
        )
        .await
        .and_then(|r| r)
        .with_context(|| format!("call {i}\n{}", proxy.proc.diagnostics()))
        .must();
        assert_eq!(seq, 2, "call {i}: the server saw both messages");
    }
    let retries = proxy.metric("tern_retries_total", &[]).await.must();
    assert!(retries >= 1.0, "no call was retried: {retries}");
    assert!(
        !proxy.proc.stderr().contains("panicked"),
        "{}",
        proxy.proc.diagnostics()
    );
}

trait MustIo<T> {
    fn must_io(self) -> T;
}

impl<T> MustIo<T> for std::io::Result<T> {
    fn must_io(self) -> T {
        self.map_err(anyhow::Error::from).must()
    }
}
