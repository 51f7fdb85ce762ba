//! IPv6 (issue 15, defect 4): in a dual-stack pod, the pod's IPv6 address must not bypass the
//! sidecar, either way. tern-init installs the same rules with ip6tables; the sidecar listens on
//! `[::]`/`[::1]` beside `0.0.0.0`/`127.0.0.1` and reads IPv6 original destinations. Pods are
//! network namespaces with IPv6 unique local addresses on their own veth pairs (see
//! `tern_tests::netns`). Needs root, ip(6)tables and iproute2: skipped loudly outside CI when
//! missing, required under `CI=true`.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context as _, Result};
use tern_tests::netns::{self, host_client, Network, Pod};
use tern_tests::process::START_TIMEOUT;
use tern_tests::{binary, Must, Proc, TestDir};

fn prerequisites() -> Option<Result<()>> {
    netns::missing_prerequisite().map(|what| tern_tests::missing(&what))
}

async fn start(pod: &Pod, dir: &Path, label: &str, bin: &str, args: &[&str]) -> Result<Proc> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let as_proxy = bin == "tern-proxy";
    let mut proc = pod.spawn(dir, label, bin, &args, as_proxy)?;
    let ready = match as_proxy {
        true => "tern-proxy ready: ".to_string(),
        false => format!("{bin} listening on"),
    };
    proc.wait_for_line(&ready, START_TIMEOUT).await?;
    Ok(proc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_goes_through_the_sidecar_both_ways() {
    if let Some(skip) = prerequisites() {
        return skip.must();
    }
    let dir = TestDir::new("interception-v6").must();
    let d = dir.path();
    let mut net = Network::create().must();
    let (a, b) = (net.pod("a").must(), net.pod("b").must());

    // tern-init as injected: IPv6 gets the same rules as IPv4, and a rerun changes nothing.
    for pod in [&a, &b] {
        pod.tern_init(&[]).must();
    }
    let rules6 = b.nat_rules("ip6tables-save").must();
    for rule in [
        "-A PREROUTING -p tcp -j TERN_INBOUND",
        "-A OUTPUT -p tcp -j TERN_OUTBOUND",
        "-A TERN_INBOUND -p tcp -j TERN_INBOUND_REDIRECT",
        "-A TERN_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 4143",
        "-A TERN_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
    ] {
        assert_eq!(rules6.matches(rule).count(), 1, "{rule} in\n{rules6}");
    }
    b.tern_init(&[]).must();
    assert_eq!(b.nat_rules("ip6tables-save").must(), rules6);

    // Pod B: echo on both families, and a server on a port it does not serve. Its sidecar is
    // configured the way injection does it in an IPv6 pod: `$(POD_IP):port`, no brackets.
    let echo = ["--listen", "[::]:50051", "--name", "echo-b"];
    let _echo = start(&b, d, "echo-b", "echo-server", &echo).await.must();
    let extra = ["--listen", "[::]:7002", "--name", "extra"];
    let _extra = start(&b, d, "extra", "tcp-greeter", &extra).await.must();
    let (advertise, app) = (format!("{}:4143", b.ip6), format!("{}:50051", b.ip6));
    let proxy_b = [
        "--service-name",
        "echo",
        "--inbound-transparent",
        "--advertise",
        &advertise,
        "--inbound-app",
        &app,
        "--admin-listen",
        "0.0.0.0:4191",
    ];
    let _proxy_b = start(&b, d, "proxy-echo", "tern-proxy", &proxy_b)
        .await
        .must();
    // Pod A's sidecar knows echo by B's IPv6 inbound address.
    let endpoints = format!("echo={}", b.addr6(4143));
    let proxy_a = [
        "--service-name",
        "client",
        "--endpoints",
        &endpoints,
        "--admin-listen",
        "0.0.0.0:4191",
    ];
    let _proxy_a = start(&a, d, "proxy-client", "tern-proxy", &proxy_a)
        .await
        .must();

    // A's app dials B's IPv6 address: out through A's sidecar, in through B's.
    let target = b.addr6(50051).to_string();
    let report = a
        .client(&["grpc", "--target", &target, "--calls", "3"], false)
        .await
        .must();
    assert_eq!(report["servers"]["echo-b"], 3, "{report}");
    let requests = "tern_requests_total";
    let out = [("direction", "outbound"), ("service", "echo")];
    a.expect_metric(requests, &out, 3.0).await.must();
    let inbound = [("direction", "inbound"), ("service", "echo")];
    b.expect_metric(requests, &inbound, 3.0).await.must();

    // From outside the mesh over IPv6: redirected to B's sidecar, not straight to the app.
    let report = host_client(&["grpc", "--target", &target]).must();
    assert_eq!(report["servers"]["echo-b"], 1, "{report}");
    b.expect_metric(requests, &inbound, 4.0).await.must();
    // A port B does not serve is refused over IPv6 as over IPv4.
    let unserved = b.addr6(7002).to_string();
    let refused = host_client(&["tcp", "--target", &unserved, "--greeting"]);
    assert!(refused.is_err(), "{refused:?}");
    let not_served = [("listener", "inbound"), ("reason", "port_not_served")];
    b.expect_metric("tern_protocol_rejections_total", &not_served, 1.0)
        .await
        .must();

    // A's app to a server outside the mesh over IPv6 passes through A's sidecar untouched.
    let outside_args = [
        "--listen".into(),
        SocketAddr::from((net.gateway6(), 0)).to_string(),
        "--name".into(),
        "outside".into(),
    ];
    let greeter = binary("tcp-greeter").must();
    let mut outside = Proc::spawn(d, "outside", &greeter, &outside_args).must();
    let outside_addr = outside
        .wait_for_line("tcp-greeter listening on", START_TIMEOUT)
        .await
        .must();
    let outside_addr: SocketAddr = outside_addr
        .parse()
        .context("the outside server's address")
        .must();
    let to_outside = ["tcp", "--target", &outside_addr.to_string(), "--greeting"];
    let report = a.client(&to_outside, false).await.must();
    assert_eq!(report["greeting"], "hello from outside\n", "{report}");
    let passthrough = [
        ("direction", "outbound"),
        ("service", ""),
        ("outcome", "ok"),
    ];
    a.expect_metric("tern_tcp_connections_total", &passthrough, 1.0)
        .await
        .must();

    // The legacy back end drives ip6tables-legacy as well.
    let legacy = net.pod("legacy").must();
    legacy.tern_init(&["--iptables-mode", "legacy"]).must();
    let rules = legacy.nat_rules("ip6tables-legacy-save").must();
    assert!(
        rules.contains("-A OUTPUT -p tcp -j TERN_OUTBOUND"),
        "{rules}"
    );
    let nft = legacy.nat_rules("ip6tables-nft-save").must();
    assert!(!nft.contains("TERN_"), "{nft}");
}
