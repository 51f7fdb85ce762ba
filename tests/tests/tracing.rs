//! OTLP spans from the sidecars, received by a stand-in collector on the official protos.
//! Through loadgen's sidecar → order's sidecar → order → order's sidecar → pay's sidecar → pay,
//! every hop mTLS, a sampled call yields the client and server span of both hops in the
//! caller's trace, parented hop by hop; an unsampled one yields none; a collector that is down
//! or hangs fails no call and the dropped spans are counted. A grpcio (Python) client's trace
//! continues the same way through two sidecars, and `ternctl demo --trace` prints a trace tree.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::sys::signal::Signal;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tern_proto::demo::v1::order_service_client::OrderServiceClient;
use tern_proto::demo::v1::CreateOrderRequest;
use tern_tests::demo::{Order, Pay};
use tern_tests::mesh::connect;
use tern_tests::mtls::{spiffe, MeshCa};
use tern_tests::otlp::{Collector, Received};
use tern_tests::process::{free_addr, TestDir};
use tern_tests::{eventually, within, Must, Proxy, ProxySpec, CALL_TIMEOUT};

const CREATE_ORDER: &str = "tern.demo.v1.OrderService/CreateOrder";
const PAY: &str = "tern.demo.v1.PayService/Pay";
/// The caller's own span, parent of everything the mesh records for its call.
const CALLER_SPAN: u64 = 0x00f0_67aa_0ba9_02b7;

/// The demo chain with a sidecar in front of the caller too; all sidecars export to
/// `collector` with `extra` flags. Fields drop in order: processes before their directory.
struct Chain {
    front: Proxy,
    order_sidecar: Proxy,
    pay_sidecar: Proxy,
    _order: Order,
    _pay: Pay,
    _ca: MeshCa,
    /// The front sidecar's `order` port: where the test calls.
    target: SocketAddr,
    _dir: TestDir,
}

impl Chain {
    async fn start(label: &str, collector: SocketAddr, extra: &[&str]) -> Result<Self> {
        let dir = TestDir::new(label)?;
        let ca = MeshCa::start(dir.path(), &[]).await?;
        let collector = collector.to_string();
        let mut trace = vec!["--trace-collector", collector.as_str()];
        trace.extend_from_slice(extra);
        let pay = Pay::start(dir.path(), "pay-1", &[]).await?;
        let spec = ProxySpec::new("pay-sidecar", "pay")
            .inbound(pay.addr)
            .args(&trace);
        let pay_sidecar = Proxy::start(dir.path(), ca.sidecar(spec, "pay")?).await?;
        let pay_port = free_addr()?;
        let order = Order::start(dir.path(), pay_port).await?;
        let pay_identity = format!("pay={}", spiffe("pay"));
        let spec = ProxySpec::new("order-sidecar", "order")
            .inbound(order.addr)
            .upstream("pay", pay_port)
            .endpoints("pay", &[pay_sidecar.inbound])
            .args(&["--endpoint-identity", &pay_identity])
            .args(&trace);
        let order_sidecar = Proxy::start(dir.path(), ca.sidecar(spec, "order")?).await?;
        let target = free_addr()?;
        let order_identity = format!("order={}", spiffe("order"));
        let spec = ProxySpec::new("loadgen-sidecar", "loadgen")
            .upstream("order", target)
            .endpoints("order", &[order_sidecar.inbound])
            .args(&["--endpoint-identity", &order_identity])
            .args(&trace);
        let front = Proxy::start(dir.path(), ca.sidecar(spec, "loadgen")?).await?;
        Ok(Self {
            front,
            order_sidecar,
            pay_sidecar,
            _order: order,
            _pay: pay,
            _ca: ca,
            target,
            _dir: dir,
        })
    }

    /// One CreateOrder call through the chain, with `traceparent` if given.
    async fn call(&self, i: usize, traceparent: Option<String>) -> Result<()> {
        let mut client = OrderServiceClient::new(connect(self.target).await?);
        let mut request = tonic::Request::new(CreateOrderRequest {
            order_id: format!("trace-{i}"),
            amount_cents: 1999,
            currency: "EUR".to_string(),
        });
        if let Some(tp) = traceparent {
            request.metadata_mut().insert("traceparent", tp.parse()?);
            request
                .metadata_mut()
                .insert("tracestate", "tern-test=1".parse()?);
        }
        within(CALL_TIMEOUT, client.create_order(request)).await??;
        Ok(())
    }

    async fn dropped(&self) -> Result<f64> {
        let mut sum = 0.0;
        for p in [&self.front, &self.order_sidecar, &self.pay_sidecar] {
            sum += p.metric("tern_trace_spans_dropped_total", &[]).await?;
        }
        Ok(sum)
    }
}

fn traceparent(trace_id: u128, sampled: bool) -> String {
    format!(
        "00-{trace_id:032x}-{CALLER_SPAN:016x}-0{}",
        u8::from(sampled)
    )
}

/// Waits until `collector` holds `n` spans of `trace_id`, and returns them.
async fn spans_of(collector: &Collector, trace_id: u128, n: usize) -> Vec<Received> {
    let waited = eventually(Duration::from_secs(15), || async {
        let got = collector.trace(trace_id).len();
        Ok((got < n).then(|| format!("{got} of {n} spans of trace {trace_id:032x}")))
    })
    .await;
    let spans = collector.trace(trace_id);
    waited.unwrap_or_else(|e| panic!("{e:#}: {spans:#?}"));
    spans
}

fn find<'a>(spans: &'a [Received], service: &str, kind: SpanKind) -> &'a Received {
    spans
        .iter()
        .find(|s| s.service == service && s.span.kind == kind as i32)
        .unwrap_or_else(|| panic!("no {kind:?} span from {service}'s sidecar in {spans:#?}"))
}

fn span_id(s: &Received) -> Vec<u8> {
    s.span.span_id.clone()
}

/// One hop's attributes: named by its gRPC method, mTLS with the expected peer, OK.
fn check_hop(s: &Received, name: &str, peer: &str, endpoint: Option<SocketAddr>) {
    let a = s.attributes();
    assert_eq!(s.span.name, name, "{a:?}");
    assert_eq!(s.str_attr("rpc.system"), Some("grpc"), "{a:?}");
    assert_eq!(s.int_attr("rpc.grpc.status_code"), Some(0), "{a:?}");
    assert_eq!(s.bool_attr("tern.tls"), Some(true), "{a:?}");
    assert_eq!(s.str_attr("tls.protocol.version"), Some("TLSv1.3"), "{a:?}");
    assert_eq!(
        s.str_attr("tern.peer.identity"),
        Some(spiffe(peer).as_str()),
        "{a:?}"
    );
    assert_eq!(s.int_attr("tern.attempts"), Some(1), "{a:?}");
    assert_eq!(s.str_attr("tern.error"), None, "{a:?}");
    if let Some(ep) = endpoint {
        assert_eq!(
            s.str_attr("tern.endpoint"),
            Some(ep.to_string().as_str()),
            "{a:?}"
        );
    }
    assert!(s.span.end_time_unix_nano >= s.span.start_time_unix_nano);
    assert_eq!(s.span.trace_state, "tern-test=1");
}

/// `child` lies within `parent` in time (one host, one clock).
fn nested(child: &Received, parent: &Received) {
    assert!(
        child.span.start_time_unix_nano >= parent.span.start_time_unix_nano
            && child.span.end_time_unix_nano <= parent.span.end_time_unix_nano,
        "{} not within {}",
        child.span.name,
        parent.span.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_call_yields_both_hops_spans_and_an_unsampled_one_none() {
    let collector = Collector::start().await.must();
    let chain = Chain::start("tracing-sampled", collector.addr, &[])
        .await
        .must();
    let sampled = 0x4bf9_2f35_77b3_4da6_a3ce_9290_0e0e_4736_u128;
    chain.call(0, Some(traceparent(sampled, true))).await.must();
    let spans = spans_of(&collector, sampled, 4).await;
    assert_eq!(spans.len(), 4, "{spans:#?}");

    let front = find(&spans, "loadgen", SpanKind::Client);
    let order_in = find(&spans, "order", SpanKind::Server);
    let order_out = find(&spans, "order", SpanKind::Client);
    let pay_in = find(&spans, "pay", SpanKind::Server);
    // Parent links, hop by hop: the caller's span, then each sidecar's.
    assert_eq!(front.span.parent_span_id, CALLER_SPAN.to_be_bytes());
    assert_eq!(order_in.span.parent_span_id, span_id(front));
    assert_eq!(order_out.span.parent_span_id, span_id(order_in));
    assert_eq!(pay_in.span.parent_span_id, span_id(order_out));
    let ids: std::collections::HashSet<_> = spans.iter().map(span_id).collect();
    assert_eq!(ids.len(), 4, "span ids are distinct");

    check_hop(
        front,
        CREATE_ORDER,
        "order",
        Some(chain.order_sidecar.inbound),
    );
    check_hop(order_in, CREATE_ORDER, "loadgen", None);
    check_hop(order_out, PAY, "pay", Some(chain.pay_sidecar.inbound));
    check_hop(pay_in, PAY, "order", None);
    assert_eq!(front.str_attr("tern.service"), Some("order"));
    assert_eq!(pay_in.str_attr("tern.service"), Some("pay"));
    nested(order_in, front);
    nested(order_out, order_in);
    nested(pay_in, order_out);

    // Unsampled: a traceparent saying so, and none at all (default rate 0).
    let unsampled = 0x1111_2222_3333_4444_5555_6666_7777_8888_u128;
    chain
        .call(1, Some(traceparent(unsampled, false)))
        .await
        .must();
    chain.call(2, None).await.must();
    // Each sidecar exports in order: once a later sampled call's spans are in, any span of
    // the calls before would be too.
    let later = 0x9999_aaaa_bbbb_cccc_dddd_eeee_ffff_0001_u128;
    chain.call(3, Some(traceparent(later, true))).await.must();
    spans_of(&collector, later, 4).await;
    assert!(collector.trace(unsampled).is_empty());
    assert_eq!(collector.spans().len(), 8, "{:#?}", collector.spans());
    assert_eq!(chain.dropped().await.must(), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_traceparent_the_sample_rate_starts_traces() {
    let collector = Collector::start().await.must();
    let chain = Chain::start(
        "tracing-rate",
        collector.addr,
        &["--trace-sample-rate", "1"],
    )
    .await
    .must();
    chain.call(0, None).await.must();
    eventually(Duration::from_secs(15), || async {
        let n = collector.spans().len();
        Ok((n < 4).then(|| format!("{n} spans")))
    })
    .await
    .must();
    let spans = collector.spans();
    let front = find(&spans, "loadgen", SpanKind::Client);
    assert!(
        front.span.parent_span_id.is_empty(),
        "the front sidecar's span is the root"
    );
    assert!(spans.iter().all(|s| s.span.trace_id == front.span.trace_id));
}

/// Spans still queued when a sidecar is told to stop are exported before it exits: the calls
/// are made just before SIGTERM, well inside the exporter's one-second batch delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_queued_at_shutdown_reach_the_collector() {
    let collector = Collector::start().await.must();
    let mut chain = Chain::start("tracing-shutdown", collector.addr, &[])
        .await
        .must();
    let trace_id = 0x5151_2222_3333_4444_5555_6666_7777_0042_u128;
    chain
        .call(0, Some(traceparent(trace_id, true)))
        .await
        .must();
    for p in [&chain.front, &chain.order_sidecar, &chain.pay_sidecar] {
        p.proc.signal(Signal::SIGTERM).must();
    }
    for p in [
        &mut chain.front,
        &mut chain.order_sidecar,
        &mut chain.pay_sidecar,
    ] {
        let status = p.proc.wait_exit(Duration::from_secs(10)).await.must();
        assert!(status.success(), "{}", p.proc.diagnostics());
    }
    // Every sidecar has exited: what the collector holds now is all it will get.
    let spans = collector.trace(trace_id);
    assert_eq!(spans.len(), 4, "{spans:#?}");
}

/// Calls through a chain whose collector is down, or accepts and never answers, all succeed
/// and stay fast; the spans are dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_down_or_stuck_fails_no_call_and_counts_dropped_spans() {
    // Accepted by the kernel, never read: an export waits for its timeout.
    let stuck = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = free_addr().unwrap();
    for (label, collector) in [
        ("tracing-stuck", stuck.local_addr().unwrap()),
        ("tracing-down", down),
    ] {
        let chain = Chain::start(label, collector, &["--trace-sample-rate", "1"])
            .await
            .must();
        let mut slowest = Duration::ZERO;
        for i in 0..20 {
            let started = Instant::now();
            chain
                .call(i, None)
                .await
                .unwrap_or_else(|e| panic!("{label}: call {i}: {e:#}"));
            slowest = slowest.max(started.elapsed());
        }
        assert!(
            slowest < Duration::from_millis(500),
            "{label}: a call took {slowest:?}"
        );
        eventually(Duration::from_secs(20), || async {
            let dropped = chain.dropped().await?;
            Ok((dropped < 80.0).then(|| format!("{label}: {dropped} spans dropped of 80")))
        })
        .await
        .must();
    }
}

/// `ternctl demo --trace --faults`: the demo prints one sampled call's spans as a tree across
/// order's and pay's sidecars, from a receiver ternctl runs itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ternctl_demo_prints_a_trace_tree() {
    let dir = TestDir::new("demo-trace").must();
    let logs = dir.path().join("logs").display().to_string();
    let args: Vec<String> = [
        "demo",
        "--duration",
        "6",
        "--faults",
        "--trace",
        "--log-dir",
        &logs,
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    // Without CARGO in its environment ternctl runs the binaries beside it instead of building.
    let program = tern_tests::binary("ternctl").must();
    let mut demo = tern_tests::Proc::spawn_with_env_removed(
        dir.path(),
        "ternctl",
        &program,
        &args,
        &[],
        &["CARGO"],
    )
    .must();
    demo.wait_exit(Duration::from_secs(60)).await.must();
    let stdout = demo.stdout();
    let tree: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("trace "))
        .take_while(|l| !l.trim().is_empty())
        .collect();
    let at = |depth: usize, prefix: &str| {
        let want = format!("{}{prefix}", "  ".repeat(depth));
        tree.iter().any(|l| l.starts_with(&want))
    };
    assert!(
        at(1, &format!("order-proxy server {CREATE_ORDER}"))
            && at(2, &format!("order-proxy client {PAY}"))
            && at(3, &format!("pay-proxy server {PAY}")),
        "no order → pay tree in the demo's output:\n{stdout}\n{}",
        demo.diagnostics()
    );
    let pay_hop = tree
        .iter()
        .find(|l| l.contains("pay-proxy server"))
        .expect("pay's span");
    assert!(
        pay_hop.contains(&format!("peer={}", spiffe("order"))),
        "{pay_hop}"
    );
}

/// The issue's own shape: a grpcio (Python) client sends a sampled `traceparent` through a
/// client sidecar =mTLS=> a server sidecar → echo server; the collector gets the client span
/// (child of the Python caller's span) and the server span (child of the client span).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_client_s_trace_continues_through_both_sidecars() {
    use tern_tests::python;
    if !python::grpcio_installed().await {
        return tern_tests::missing("python grpcio (python3 -m pip install grpcio grpcio-tools)")
            .must();
    }
    let dir = TestDir::new("tracing-grpcio").must();
    let collector = Collector::start().await.must();
    let trace = ["--trace-collector".to_string(), collector.addr.to_string()];
    let trace: Vec<&str> = trace.iter().map(String::as_str).collect();
    let ca = MeshCa::start(dir.path(), &[]).await.must();
    let echo = tern_tests::App::echo_server(dir.path(), "echo-1")
        .await
        .must();
    let spec = ProxySpec::new("echo-sidecar", "echo")
        .inbound(echo.addr)
        .args(&trace);
    let server = Proxy::start(dir.path(), ca.sidecar(spec, "echo").must())
        .await
        .must();
    let target = free_addr().must();
    let echo_identity = format!("echo={}", spiffe("echo"));
    let spec = ProxySpec::new("client-sidecar", "client")
        .upstream("echo", target)
        .endpoints("echo", &[server.inbound])
        .args(&["--endpoint-identity", &echo_identity])
        .args(&trace);
    let _client = Proxy::start(dir.path(), ca.sidecar(spec, "client").must())
        .await
        .must();

    let stubs = python::generate_stubs(dir.path()).await.must();
    let trace_id = 0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c_u128;
    let args = [
        "-u".to_string(),
        python::script("traced_call.py").display().to_string(),
        "--target".to_string(),
        target.to_string(),
        "--traceparent".to_string(),
        traceparent(trace_id, true),
        "--tracestate".to_string(),
        "tern-test=1".to_string(),
    ];
    let env = [("PYTHONPATH", stubs.display().to_string())];
    let program = std::path::PathBuf::from(python::python());
    let mut call =
        tern_tests::Proc::spawn_with_env(dir.path(), "traced_call.py", &program, &args, &env)
            .must();
    let status = call.wait_exit(Duration::from_secs(30)).await.must();
    assert!(status.success(), "{}", call.diagnostics());

    let spans = spans_of(&collector, trace_id, 2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let out = find(&spans, "client", SpanKind::Client);
    let inb = find(&spans, "echo", SpanKind::Server);
    assert_eq!(out.span.parent_span_id, CALLER_SPAN.to_be_bytes());
    assert_eq!(inb.span.parent_span_id, span_id(out));
    check_hop(out, "tern.test.v1.Echo/Unary", "echo", Some(server.inbound));
    check_hop(inb, "tern.test.v1.Echo/Unary", "client", None);
}
