//! On-demand discovery end to end: a sidecar that watches nothing but what its app uses.
//!
//! Without root: `tern-control` with one pay replica behind its registering sidecar, and a
//! caller sidecar that names no service at all. A request to the caller's outbound port whose
//! `:authority` is `pay` is looked up by name and reaches pay; later calls pay no lookup; an
//! unused pay is dropped after the (shortened) idle time; with tern-control stopped (SIGSTOP)
//! a request for a name the sidecar does not know fails with UNAVAILABLE naming it after the
//! lookup timeout.
//!
//! With root (network namespaces and iptables, as in `interception.rs`): an intercepted app
//! dials a virtual IP its sidecar never heard of and gets a meshed mTLS call on the first try;
//! an address outside the mesh is passed through, and remembered (asked once).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nix::sys::signal::Signal;
use prost::Message as _;
use tern_proto::demo::v1::PayReply;
use tern_tests::control::ConfigDir;
use tern_tests::control_mesh::{ControlMesh, Replica, Setup};
use tern_tests::demo::pay_request;
use tern_tests::mtls::{spiffe, MeshCa};
use tern_tests::netns::{self, Network};
use tern_tests::process::START_TIMEOUT;
use tern_tests::raw_grpc::{unary_to, RawReply};
use tern_tests::{binary, eventually, Must, Proc, Proxy, ProxySpec, TestDir};

const PAY: &str = "/tern.demo.v1.PayService/Pay";
const LOOKUPS: &str = "tern_lookup_duration_seconds_count";

/// The replica that answered, or the gRPC status and message.
fn answer(r: &RawReply) -> Result<String, (Option<u32>, String)> {
    match r.grpc_status() {
        Some(0) => PayReply::decode(r.data.get(5..).unwrap_or_default())
            .map(|p| p.replica)
            .map_err(|e| (Some(0), e.to_string())),
        status => Err((status, r.header("grpc-message").unwrap_or_default())),
    }
}

async fn call(proxy: &Proxy, authority: &str) -> RawReply {
    unary_to(proxy.outbound, authority, PAY, &pay_request(1), &[])
        .await
        .must()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_looked_up_on_first_use_and_dropped_when_unused() {
    let mut mesh = ControlMesh::start(
        "on-demand-names",
        &[Replica::new("pay-1", "v1")],
        &Setup::default(),
    )
    .await
    .must();
    let url = mesh.control.url();
    let spec = ProxySpec::new("caller", "order").access_log("off").args(&[
        "--control-plane",
        &url,
        "--lookup-timeout",
        "500ms",
        "--service-idle-timeout",
        "2s",
    ]);
    let caller = Proxy::start(mesh.dir.path(), spec).await.must();
    let found = [("result", "found")];

    // First use of `pay` by name: one lookup, then the call goes through.
    assert_eq!(answer(&call(&caller, "pay").await), Ok("pay-1".to_string()));
    assert_eq!(caller.metric(LOOKUPS, &found).await.must(), 1.0);
    // Later calls, by any of its names, ask nothing.
    for name in ["pay", "pay.default", "pay.default.svc.cluster.local:50051"] {
        assert_eq!(answer(&call(&caller, name).await), Ok("pay-1".to_string()));
    }
    assert_eq!(caller.metric(LOOKUPS, &found).await.must(), 1.0);
    assert_eq!(
        mesh.control
            .metric("tern_control_lookups_total", &found)
            .await
            .must(),
        1.0
    );

    // A name no service has: asked once, then answered as any unknown name is.
    let r = call(&caller, "nosuch").await;
    assert_eq!(answer(&r).unwrap_err().0, Some(14), "{r:?}");
    assert_eq!(
        caller
            .metric(LOOKUPS, &[("result", "unknown")])
            .await
            .must(),
        1.0
    );

    // Unused for the idle time: dropped, and the control plane told.
    eventually(Duration::from_secs(8), || async {
        let services = caller.config().await?["services"].to_string();
        Ok(services.contains("\"pay\"").then_some(services))
    })
    .await
    .must();
    assert_eq!(
        caller
            .metric("tern_on_demand_services_dropped_total", &[])
            .await
            .must(),
        1.0
    );
    let state = mesh.control.state().await.must().to_string();
    assert!(state.contains("order"), "{state}");

    // tern-control does not answer: the request waits for the lookup timeout, then fails
    // UNAVAILABLE naming what it was for.
    mesh.control.proc.signal(Signal::SIGSTOP).must();
    let started = Instant::now();
    let r = call(&caller, "pay").await;
    let waited = started.elapsed();
    mesh.control.proc.signal(Signal::SIGCONT).must();
    let (status, message) = answer(&r).unwrap_err();
    assert_eq!(status, Some(14), "{r:?}");
    assert!(
        message.contains("no answer from the control plane about pay"),
        "{message}"
    );
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(
        caller
            .metric(LOOKUPS, &[("result", "no_answer")])
            .await
            .must(),
        1.0
    );

    // Back: looked up again, and found.
    eventually(Duration::from_secs(5), || async {
        let r = call(&caller, "pay").await;
        Ok(answer(&r).err().map(|e| format!("{e:?}")))
    })
    .await
    .must();
    mesh.control.kill().await.must();
}

/// The echo service's virtual IP (a ClusterIP no interface holds).
const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 78, 10);

const MESH: &str = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  ports: [{name: grpc, port: 50051}]
  virtualIP: 10.96.78.10
  identity: spiffe://cluster.local/ns/default/sa/echo
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intercepted_app_dials_an_unknown_virtual_ip_and_an_outside_address() {
    if let Some(what) = netns::missing_prerequisite() {
        return tern_tests::missing(&what).must();
    }
    let dir = TestDir::new("on-demand-intercept").must();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .context("opening the test directory to the sidecars")
        .must();
    let mut net = Network::create().must();
    let (a, b) = (net.pod("a").must(), net.pod("b").must());
    for pod in [&a, &b] {
        pod.tern_init(&[]).must();
    }
    let echo_args = ["--listen", "0.0.0.0:50051", "--name", "echo-b"].map(String::from);
    let mut echo = b
        .spawn(dir.path(), "echo-b", "echo-server", &echo_args, false)
        .must();
    echo.wait_for_line("echo-server listening on", START_TIMEOUT)
        .await
        .must();
    let outside_args = [
        "--listen".into(),
        format!("{}:0", net.gateway()),
        "--name".into(),
        "outside".into(),
    ];
    let program = binary("tcp-greeter").must();
    let mut outside = Proc::spawn(dir.path(), "outside", &program, &outside_args).must();
    let outside_addr: SocketAddr = outside
        .wait_for_line("tcp-greeter listening on", START_TIMEOUT)
        .await
        .must()
        .parse()
        .context("the outside server's address")
        .must();

    let config = ConfigDir::with_services(dir.path(), MESH).must();
    let ca = MeshCa::start_on(dir.path(), &config, SocketAddr::from((net.gateway(), 0)))
        .await
        .must();
    let _proxy_b = b
        .sidecar(
            dir.path(),
            &ca,
            "echo",
            &["--inbound-app", "127.0.0.1:50051", "--inbound-transparent"],
        )
        .await
        .must();
    // Pod A's sidecar names no service and does not watch them all.
    let _proxy_a = a.sidecar(dir.path(), &ca, "client", &[]).await.must();
    let before = a.local_config().await.must();
    assert!(!before.contains(&ECHO_VIP.to_string()), "{before}");

    // The first call to the virtual IP: looked up, then meshed over mTLS.
    let target = SocketAddr::from((ECHO_VIP, 50051)).to_string();
    let report = a
        .client(&["grpc", "--target", &target, "--calls", "5"], false)
        .await
        .must();
    assert_eq!(report["ok"], 5, "{report}");
    assert_eq!(report["servers"]["echo-b"], 5, "{report}");
    let echo_id = spiffe("echo");
    let mtls = [
        ("direction", "outbound"),
        ("service", "echo"),
        ("tls", "true"),
        ("peer_identity", echo_id.as_str()),
    ];
    a.expect_metric("tern_responses_total", &mtls, 5.0)
        .await
        .must();
    a.expect_metric(LOOKUPS, &[("result", "found")], 1.0)
        .await
        .must();

    // Outside the mesh: passed through as before, and asked about once.
    for _ in 0..2 {
        let report = a
            .client(
                &[
                    "tcp",
                    "--target",
                    &outside_addr.to_string(),
                    "--greeting",
                    "--send",
                    "ping\\n",
                    "--half-close",
                ],
                false,
            )
            .await
            .must();
        assert_eq!(report["greeting"], "hello from outside\n", "{report}");
    }
    a.expect_metric(LOOKUPS, &[("result", "outside_mesh")], 1.0)
        .await
        .must();
    let passthrough = [
        ("direction", "outbound"),
        ("service", ""),
        ("outcome", "ok"),
    ];
    a.expect_metric("tern_tcp_connections_total", &passthrough, 2.0)
        .await
        .must();
}
