//! One bad client must never hurt another: each attack runs against two sidecars in front of
//! real gRPC servers (grpc-go, built from Debian's packaged sources; grpcio; tonic) while
//! well-behaved clients call alongside, and the test asserts that the attacker is answered or
//! cut off, the app sees nothing it should not, the others keep 100% success, the sidecars stay
//! alive with their memory bounded, and they count what happened.
//!
//! `p99_of_well_behaved_calls_under_attack` (ignored: a measurement, not a check) prints the
//! latency of well-behaved calls with and without an attacker:
//! `cargo test --workspace --test abuse -- --ignored --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tern_proto::test::v1::EchoRequest;
use tern_tests::{python, raw_grpc, within, App, EchoMesh, Must, Route, TestDir, CALL_TIMEOUT};

const UNARY: &str = "/tern.test.v1.Echo/Unary";
/// gRPC INTERNAL: what gRPC servers answer to a malformed `grpc-timeout`.
const INTERNAL: u32 = 13;
const PERMISSION_DENIED: u32 = 7;
/// A sidecar's resident memory after an attack stays under this (generous: idle is ~10 MiB).
const RSS_BOUND_KIB: u64 = 256 * 1024;

/// The gRPC server behind the sidecars.
#[derive(Clone, Copy, Debug)]
enum Backend {
    Tonic,
    Grpcio,
    GrpcGo,
}

/// The two sidecars in front of a fresh `backend` server; `None` (after a loud skip line) when
/// its tools are missing outside CI.
async fn mesh_for(label: &str, backend: Backend) -> Option<EchoMesh> {
    let dir = TestDir::new(&format!("{label}-{backend:?}").to_lowercase()).must();
    let app: App = match backend {
        Backend::Tonic => App::echo_server(dir.path(), "echo-tonic").await.must(),
        Backend::Grpcio => {
            if !python::grpcio_installed().await {
                tern_tests::missing("python grpcio not installed").must();
                return None;
            }
            let stubs = python::generate_stubs(dir.path()).await.must();
            python::start_server(dir.path(), &stubs, "echo-py")
                .await
                .must()
        }
        Backend::GrpcGo => {
            if let Some(what) = tern_tests::go::missing_prerequisite().await {
                tern_tests::missing(&what).must();
                return None;
            }
            tern_tests::go::start_server(dir.path(), "echo-go")
                .await
                .must()
        }
    };
    Some(
        EchoMesh::around(dir, Route::Sidecars, vec![app])
            .await
            .must(),
    )
}

/// Resident memory of process `pid`, from /proc.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Both sidecars are still running, each under [`RSS_BOUND_KIB`].
fn sidecars_alive_and_bounded(mesh: &mut EchoMesh) {
    let diagnostics = mesh.diagnostics();
    let sidecars = mesh.client.iter_mut().chain(mesh.inbound.iter_mut());
    for p in sidecars {
        let label = p.proc.label().to_string();
        assert!(
            matches!(p.proc.try_status(), Ok(None)),
            "{label} exited\n{diagnostics}"
        );
        let rss = rss_kib(p.proc.pid()).unwrap_or_default();
        assert!(
            rss > 0 && rss < RSS_BOUND_KIB,
            "{label}: {rss} KiB resident"
        );
    }
}

/// `n` unary calls on one fresh channel; all must succeed.
async fn well_behaved_calls(mesh: &EchoMesh, n: usize) -> anyhow::Result<()> {
    let mut client = mesh.client().await?;
    for i in 0..n {
        let req = EchoRequest {
            message: format!("call {i}"),
            ..Default::default()
        };
        within(CALL_TIMEOUT, client.unary(req))
            .await?
            .map_err(|s| anyhow::anyhow!("call {i} failed: {s:?}"))?;
    }
    Ok(())
}

/// A malformed `grpc-timeout` is answered INTERNAL by the first sidecar and never forwarded:
/// grpcio fails every later call on a connection that carried one, and the sidecars share that
/// connection among all their callers.
/// grpc-go resets the whole connection instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grpc_timeout_is_answered_by_the_proxy() {
    for backend in [Backend::Grpcio, Backend::GrpcGo] {
        invalid_grpc_timeout(backend).await;
    }
}

async fn invalid_grpc_timeout(backend: Backend) {
    let Some(mut mesh) = mesh_for("abuse-grpc-timeout", backend).await else {
        return;
    };
    mesh.ok(well_behaved_calls(&mesh, 3).await);
    let calls_before = mesh.ok(mesh.stats(0).await).calls;
    let req = EchoRequest::default();
    for bad in ["-1S", "abc", "99999999999H", "1000000000n", "", "1.5S"] {
        let reply = within(
            CALL_TIMEOUT,
            raw_grpc::unary(mesh.target, UNARY, &req, &[("grpc-timeout", bad)]),
        )
        .await
        .and_then(|r| r);
        let reply = mesh.ok(reply);
        assert_eq!(reply.grpc_status(), Some(INTERNAL), "{bad:?}: {reply:?}");
        assert!(
            reply.header("x-tern-proxy-error").is_some(),
            "{bad:?}: the proxy must say it answered: {reply:?}"
        );
        mesh.ok(well_behaved_calls(&mesh, 5).await);
    }
    // A valid one is honoured and passed on canonically.
    let reply = within(
        CALL_TIMEOUT,
        raw_grpc::unary(mesh.target, UNARY, &req, &[("grpc-timeout", "00005S")]),
    )
    .await
    .and_then(|r| r);
    assert_eq!(mesh.ok(reply).grpc_status(), Some(0));
    let stats = mesh.ok(mesh.stats(0).await);
    assert_eq!(
        stats.calls,
        calls_before + 6 * 5 + 1,
        "the app saw only the well-behaved calls"
    );
    let client = mesh.client.as_ref().expect("client sidecar");
    let rejected = mesh.ok(client
        .metric(
            "tern_proxy_errors_total",
            &[("reason", "invalid_grpc_timeout")],
        )
        .await);
    assert_eq!(rejected, 6.0, "{backend:?}");
    sidecars_alive_and_bounded(&mut mesh);
}

/// A unary call with one extra metadata entry of `size` bytes, straight through `addr`.
async fn call_with_metadata(
    addr: std::net::SocketAddr,
    size: usize,
) -> anyhow::Result<raw_grpc::RawReply> {
    let big = "m".repeat(size);
    let req = EchoRequest::default();
    within(
        CALL_TIMEOUT,
        raw_grpc::unary(addr, UNARY, &req, &[("x-big", big.as_str())]),
    )
    .await?
}

/// 20 KiB of request metadata (which grpc-go and grpcio accept) passes two sidecars; over the
/// limit, the first sidecar answers RESOURCE_EXHAUSTED itself, says why, and counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_metadata_limit_is_generous_and_counted() {
    let mesh = EchoMesh::start("abuse-req-headers", Route::Sidecars, 1)
        .await
        .must();
    let ok = mesh.ok(call_with_metadata(mesh.target, 20 * 1024).await);
    assert_eq!(ok.grpc_status(), Some(0), "{ok:?}");
    let calls = mesh.ok(mesh.stats(0).await).calls;
    let over = mesh.ok(call_with_metadata(mesh.target, 70 * 1024).await);
    assert_eq!(over.grpc_status(), Some(8), "RESOURCE_EXHAUSTED: {over:?}");
    assert!(over.header("x-tern-proxy-error").is_some(), "{over:?}");
    assert_eq!(
        mesh.ok(mesh.stats(0).await).calls,
        calls,
        "never reached the app"
    );
    let client = mesh.client.as_ref().expect("client sidecar");
    let counted = mesh.ok(client
        .metric(
            "tern_protocol_rejections_total",
            &[("reason", "header_list_size")],
        )
        .await);
    assert_eq!(counted, 1.0);
    mesh.ok(well_behaved_calls(&mesh, 3).await);
}

/// The app's error status in 20 KiB of response metadata reaches the caller as sent, once; over
/// the limit, the caller learns so (INTERNAL, never a retried UNAVAILABLE), and the app ran the
/// call exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_response_metadata_keeps_the_apps_status() {
    let mesh = EchoMesh::start("abuse-rsp-headers", Route::Sidecars, 1)
        .await
        .must();
    // A bare h2 client: tonic's own client takes no more than 16 KiB of headers.
    for (size, want) in [(20 * 1024, PERMISSION_DENIED), (70 * 1024, INTERNAL)] {
        let before = mesh.ok(mesh.stats(0).await).calls;
        let req = EchoRequest {
            message: "d".repeat(size),
            fail_code: PERMISSION_DENIED as i32,
            ..Default::default()
        };
        let reply = within(CALL_TIMEOUT, raw_grpc::unary(mesh.target, UNARY, &req, &[]))
            .await
            .and_then(|r| r);
        let reply = mesh.ok(reply);
        assert_eq!(
            reply.grpc_status(),
            Some(want),
            "{size} bytes: {:?}",
            reply.headers.keys().collect::<Vec<_>>()
        );
        let message = reply.header("grpc-message").unwrap_or_default();
        if want == PERMISSION_DENIED {
            assert_eq!(message.len(), size);
        } else {
            assert!(message.contains("exceed"), "{message}");
        }
        let after = mesh.ok(mesh.stats(0).await).calls;
        assert_eq!(after - before, 1, "{size} bytes: the app ran the call once");
    }
}

/// A client that opens streams and cancels each one is sent GOAWAY on its own connection once
/// past its reset budget; another client's long bidi streams through the same sidecars all
/// complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelling_client_is_cut_off_alone() {
    for backend in [Backend::Tonic, Backend::GrpcGo] {
        cancelling_client(backend).await;
    }
}

async fn cancelling_client(backend: Backend) {
    let Some(mut mesh) = mesh_for("abuse-resets", backend).await else {
        return;
    };
    let calls_before = mesh.ok(mesh.stats(0).await).calls;
    // A well-behaved client keeps bidi streams going meanwhile.
    let target = mesh.target;
    let good = tokio::spawn(async move {
        let mut client = tern_tests::mesh::echo_client(tern_tests::mesh::connect(target).await?);
        for round in 0..20 {
            let msgs: Vec<EchoRequest> = (0..5)
                .map(|i| EchoRequest {
                    message: format!("{round}-{i}"),
                    delay_ms: 10,
                    ..Default::default()
                })
                .collect();
            let mut stream = within(
                CALL_TIMEOUT,
                client.bidi_stream(futures::stream::iter(msgs)),
            )
            .await??
            .into_inner();
            let mut n = 0;
            while let Some(r) = within(CALL_TIMEOUT, stream.message()).await?? {
                n += 1;
                assert_eq!(r.seq, n);
            }
            anyhow::ensure!(n == 5, "round {round}: {n} replies");
        }
        anyhow::Ok(())
    });
    let cut_off = cancel_flood(mesh.target, 2000).await;
    assert!(cut_off, "{backend:?}: the attacker was never sent GOAWAY");
    mesh.ok(good.await.must_join());
    // Cancelled streams reach the app only up to the client's budget (the default, 200 per
    // 10 s), beside the 20 bidi calls and the Stats call.
    let calls = mesh.ok(mesh.stats(0).await).calls - calls_before;
    assert!(
        calls <= 20 + 1 + 400,
        "{backend:?}: {calls} calls reached the app"
    );
    let client_sidecar = mesh.client.as_ref().expect("client sidecar");
    let counted = mesh.ok(client_sidecar
        .metric(
            "tern_protocol_rejections_total",
            &[("reason", "client_resets")],
        )
        .await);
    assert!(
        counted >= 1.0,
        "{backend:?}: counted {counted}\n{}",
        mesh.diagnostics()
    );
    mesh.ok(well_behaved_calls(&mesh, 5).await);
    sidecars_alive_and_bounded(&mut mesh);
}

/// The attacker: streams opened on one connection, a DATA frame sent on each, then reset 5 ms
/// later, up to `streams` times; true when the sidecar cut it off with GOAWAY.
async fn cancel_flood(target: std::net::SocketAddr, streams: usize) -> bool {
    let tcp = tokio::net::TcpStream::connect(target).await.must_io();
    let (h2, conn) = h2::client::handshake(tcp).await.must_h2();
    let driver = tokio::spawn(conn);
    let mut cut_off = false;
    let mut h2 = h2;
    for _ in 0..streams {
        let ready = match within(CALL_TIMEOUT, h2.ready()).await.must() {
            Ok(r) => r,
            Err(_) => {
                cut_off = true;
                break;
            }
        };
        h2 = ready;
        let req = http::Request::post(format!("http://{target}{UNARY}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let Ok((_rsp, mut send)) = h2.send_request(req, false) else {
            cut_off = true;
            break;
        };
        // A message header announcing one byte that never comes: every server (grpc-go
        // answers a complete unary message before END_STREAM) is still waiting for the call.
        let _ = send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 1]), false);
        // Slower than h2's own guard against resets of streams not yet accepted (with room
        // for a loaded machine): only the per-connection budget can stop this client.
        tokio::time::sleep(Duration::from_millis(5)).await;
        send.send_reset(h2::Reason::CANCEL);
    }
    driver.abort();
    cut_off
}

trait MustIo<T> {
    fn must_io(self) -> T;
    fn must_h2(self) -> T
    where
        Self: Sized,
    {
        self.must_io()
    }
}

impl<T, E: Into<anyhow::Error>> MustIo<T> for Result<T, E> {
    fn must_io(self) -> T {
        self.map_err(Into::into).must()
    }
}

trait MustJoin<T> {
    fn must_join(self) -> T;
}

impl<T> MustJoin<T> for Result<T, tokio::task::JoinError> {
    fn must_join(self) -> T {
        self.map_err(anyhow::Error::from).must()
    }
}

/// `/shutdown` on a sidecar's admin port, which listens on the pod's address for probes, is
/// refused (403) to a peer elsewhere on the network, and honoured from the pod's own loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_only_from_loopback() {
    use tern_tests::netns;
    if let Some(what) = netns::missing_prerequisite() {
        return tern_tests::missing(&what).must();
    }
    let dir = TestDir::new("abuse-shutdown").must();
    let mut net = netns::Network::create().must();
    let pod = net.pod("victim").must();
    let args: Vec<String> = [
        "--service-name",
        "victim",
        "--admin-listen",
        "0.0.0.0:4191",
        "--outbound-listen",
        "127.0.0.1:4140",
    ]
    .map(String::from)
    .to_vec();
    let mut proxy = pod
        .spawn(dir.path(), "victim-sidecar", "tern-proxy", &args, false)
        .must();
    let admin = pod.addr(4191);
    tern_tests::eventually(std::time::Duration::from_secs(10), || async {
        let r = tern_tests::http1::get(admin, "/ready").await?;
        Ok((r.status != 200).then(|| format!("/ready {}", r.status)))
    })
    .await
    .must();
    // From the root namespace: the gateway's address, not the pod's loopback.
    let mut conn = tern_tests::http1::Conn::connect(admin).await.must();
    let refused = conn.request("POST", "/shutdown", &[], None).await.must();
    assert_eq!(refused.status, 403, "{}", proxy.diagnostics());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        proxy.try_status().must().is_none(),
        "the sidecar must still run"
    );
    let ready = tern_tests::http1::get(admin, "/ready").await.must();
    assert_eq!(ready.status, 200);
    let metrics = tern_tests::http1::get(admin, "/metrics")
        .await
        .must()
        .text();
    assert!(
        metrics.contains(
            r#"tern_protocol_rejections_total{listener="admin",reason="not_loopback"} 1"#
        ),
        "{metrics}"
    );
    // From inside the pod, on loopback: accepted.
    let script = "import urllib.request as u; print(u.urlopen(u.Request('http://127.0.0.1:4191/shutdown', method='POST')).status)";
    let out = pod.exec("python3", &["-c", script]).must();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "200",
        "{out:?}"
    );
    let status = proxy
        .wait_exit(std::time::Duration::from_secs(10))
        .await
        .must();
    assert!(status.success(), "{status}");
}

/// An HTTP/1 request whose chunked body is malformed is the client's error: the sidecar answers
/// 400, not 502, and counts it as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_chunk_size_is_the_clients_error() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = TestDir::new("abuse-chunk").must();
    // An HTTP/1 endpoint that reads whatever comes and never answers: the error can only be
    // the request's.
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.must_io();
    let backend_addr = backend.local_addr().must_io();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    let listen = tern_tests::free_addr().must();
    let spec = tern_tests::ProxySpec::new("client-sidecar", "client")
        .upstream("web", listen)
        .endpoints("web", &[backend_addr]);
    let proxy = tern_tests::Proxy::start(dir.path(), spec).await.must();
    let mut s = tokio::net::TcpStream::connect(listen).await.must_io();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .must_io();
    let mut rsp = Vec::new();
    let _ = within(CALL_TIMEOUT, s.read_to_end(&mut rsp)).await.must();
    let head = String::from_utf8_lossy(&rsp);
    assert!(
        head.starts_with("HTTP/1.1 400"),
        "{head}\n{}",
        proxy.proc.diagnostics()
    );
    let counted = proxy
        .metric("tern_proxy_errors_total", &[("reason", "bad_request")])
        .await
        .must();
    assert_eq!(counted, 1.0);
}

/// A flood of connections cannot take the descriptors the admin port needs: with 256 of them,
/// the data listeners refuse connections past their share (counted), while `/ready` and
/// `/metrics` keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_answers_while_connections_flood() {
    if tern_tests::containers::which("prlimit").is_none() {
        return tern_tests::missing("prlimit (util-linux)").must();
    }
    let dir = TestDir::new("abuse-fds").must();
    let outbound = tern_tests::free_addr().must();
    let admin = tern_tests::free_addr().must();
    let proxy_bin = tern_tests::binary("tern-proxy").must();
    let args: Vec<String> = vec![
        "--nofile=256:256".into(),
        proxy_bin.display().to_string(),
        "--service-name".into(),
        "flooded".into(),
        "--outbound-listen".into(),
        outbound.to_string(),
        "--admin-listen".into(),
        admin.to_string(),
        "--access-log".into(),
        "off".into(),
    ];
    let prlimit = tern_tests::containers::which("prlimit").expect("prlimit");
    let proc = tern_tests::Proc::spawn(dir.path(), "flooded", &prlimit, &args).must();
    tern_tests::eventually(std::time::Duration::from_secs(10), || async {
        let r = tern_tests::http1::get(admin, "/ready").await?;
        Ok((r.status != 200).then(|| format!("/ready {}", r.status)))
    })
    .await
    .must();
    let mut flood = Vec::new();
    for _ in 0..400 {
        match tokio::net::TcpStream::connect(outbound).await {
            Ok(s) => flood.push(s),
            Err(_) => break,
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let ready = tern_tests::http1::get(admin, "/ready").await.must();
    assert_eq!(ready.status, 200, "{}", proc.diagnostics());
    let metrics = tern_tests::http1::get(admin, "/metrics")
        .await
        .must()
        .text();
    let samples = tern_tests::metrics::parse(&metrics).must();
    let refused = tern_tests::metrics::sum(
        &samples,
        "tern_protocol_rejections_total",
        &[("reason", "fd_reserve")],
    );
    assert!(refused >= 100.0, "refused {refused}");
    drop(flood);
}

/// Latency of well-behaved unary calls through the two sidecars in front of grpc-go, quiet and
/// while a client floods cancelled streams, printed beside the target (p99 under attack within
/// 2× of the quiet run). A measurement on a shared machine, never a check: run it on demand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run with --ignored --nocapture"]
async fn p99_of_well_behaved_calls_under_attack() {
    const CALLS: usize = 2000;
    let Some(mesh) = mesh_for("abuse-p99", Backend::GrpcGo).await else {
        return;
    };
    let quiet = mesh.ok(latencies(&mesh, CALLS).await);
    let target = mesh.target;
    let attacker = tokio::spawn(async move {
        // New connections as each is cut off, until the calls are done.
        let mut connections = 0;
        loop {
            cancel_flood(target, 100_000).await;
            connections += 1;
            if connections > 1000 {
                return connections;
            }
        }
    });
    let attacked = mesh.ok(latencies(&mesh, CALLS).await);
    attacker.abort();
    let (q50, q99) = (percentile(&quiet, 0.5), percentile(&quiet, 0.99));
    let (a50, a99) = (percentile(&attacked, 0.5), percentile(&attacked, 0.99));
    let ratio = a99.as_secs_f64() / q99.as_secs_f64().max(f64::EPSILON);
    println!("well-behaved unary calls through two sidecars to grpc-go, {CALLS} each run:");
    println!("  quiet:        p50 {q50:?}  p99 {q99:?}");
    println!("  under attack: p50 {a50:?}  p99 {a99:?}  (p99 {ratio:.2}x quiet; target <= 2x)");
}

/// Latency of each of `n` sequential unary calls; every call must succeed.
async fn latencies(mesh: &EchoMesh, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut client = mesh.client().await?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let req = EchoRequest {
            message: format!("call {i}"),
            ..Default::default()
        };
        let started = Instant::now();
        within(CALL_TIMEOUT, client.unary(req))
            .await?
            .map_err(|s| anyhow::anyhow!("call {i} failed: {s:?}"))?;
        out.push(started.elapsed());
    }
    Ok(out)
}

fn percentile(samples: &[Duration], q: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let i = ((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1);
    sorted.get(i).copied().unwrap_or_default()
}
