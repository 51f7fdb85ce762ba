//! Transparent interception end to end: pods as network namespaces on a bridge, each with its
//! own IP, `tern-init`'s iptables rules, and a `tern-proxy` running inside as UID 2102; the
//! apps dial plain IP:port and know nothing of the mesh. Needs root, iptables and iproute2:
//! skipped loudly outside CI when missing, required under `CI=true`.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tern_tests::control::ConfigDir;
use tern_tests::mtls::{spiffe, MeshCa};
use tern_tests::netns::{self, Network};
use tern_tests::process::START_TIMEOUT;
use tern_tests::{binary, eventually, http1, Must, Proc, TestDir};

/// The echo service's virtual IP (a ClusterIP no interface holds).
const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 77, 10);

/// `echo`: gRPC on 50051, and opaque TCP on 7000 (a server that speaks first), served by pod B.
const MESH: &str = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  ports: [{name: grpc, port: 50051}, {name: greeter, port: 7000, protocol: opaque}]
  virtualIP: 10.96.77.10
  identity: spiffe://cluster.local/ns/default/sa/echo
";

/// Lets `client` call echo's gRPC methods, and nothing else.
const ECHO_CALLERS: &str = "\
apiVersion: tern.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-callers}
spec:
  service: echo
  rules:
    - from: [{identity: spiffe://cluster.local/ns/default/sa/client}]
      methods: [{service: tern.test.v1.Echo}]
";

fn prerequisites() -> Option<Result<()>> {
    netns::missing_prerequisite().map(|what| tern_tests::missing(&what))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tern_init_is_idempotent_and_dry_run_changes_nothing() {
    if let Some(skip) = prerequisites() {
        return skip.must();
    }
    let mut net = Network::create().must();
    let pod = net.pod("init").must();
    let empty = pod.nat_rules("iptables-save").must();

    // --dry-run prints the commands and touches nothing; every flag has an env variable.
    let script = pod
        .tern_init(&["--dry-run", "--inbound-ports", "8080"])
        .must();
    assert!(
        script.contains(
            "iptables -w -t nat -A TERN_INBOUND -p tcp --dport 8080 -j TERN_INBOUND_REDIRECT"
        ) && script.contains(
            "iptables -w -t nat -C OUTPUT -p tcp -j TERN_OUTBOUND >/dev/null 2>&1 || \
                 iptables -w -t nat -A OUTPUT -p tcp -j TERN_OUTBOUND"
        ),
        "{script}"
    );
    let init = binary("tern-init").must().display().to_string();
    let env = pod
        .exec(
            "env",
            &["TERN_INIT_DRY_RUN=true", "TERN_INIT_PROXY_UID=3000", &init],
        )
        .must();
    let env_script = String::from_utf8_lossy(&env.stdout);
    assert!(
        env_script.contains("--uid-owner 3000 -j RETURN"),
        "{env_script}"
    );
    assert_eq!(pod.nat_rules("iptables-save").must(), empty);

    // Installed twice: the same rules, and the jumps only once.
    let args = [
        "--skip-outbound-cidrs",
        "169.254.169.254/32",
        "--skip-inbound-ports",
        "22",
        "--proxy-gid",
        "2103",
    ];
    let out = pod.tern_init(&args).must();
    assert!(
        out.contains("-A TERN_OUTBOUND -m owner --uid-owner 2102 -j RETURN"),
        "{out}"
    );
    let first = pod.nat_rules("iptables-save").must();
    pod.tern_init(&args).must();
    assert_eq!(pod.nat_rules("iptables-save").must(), first);
    for rule in [
        "-A PREROUTING -p tcp -j TERN_INBOUND",
        "-A OUTPUT -p tcp -j TERN_OUTBOUND",
        "-A TERN_OUTBOUND -m owner --gid-owner 2103 -j RETURN",
        "-A TERN_OUTBOUND -d 169.254.169.254/32 -j RETURN",
        "-A TERN_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
        "-A TERN_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 4140",
    ] {
        assert_eq!(first.matches(rule).count(), 1, "{rule} in\n{first}");
    }

    // The legacy back end, in a pod of its own; then auto follows the rules it finds.
    let legacy = net.pod("legacy").must();
    legacy.tern_init(&["--iptables-mode", "legacy"]).must();
    let before = legacy.nat_rules("iptables-legacy-save").must();
    assert!(
        before.contains("-A OUTPUT -p tcp -j TERN_OUTBOUND"),
        "{before}"
    );
    legacy.tern_init(&["--iptables-mode", "legacy"]).must();
    assert_eq!(legacy.nat_rules("iptables-legacy-save").must(), before);
    assert!(!legacy
        .nat_rules("iptables-nft-save")
        .must()
        .contains("TERN_"));
    let auto = legacy.tern_init(&["--dry-run"]).must();
    assert!(auto.contains("iptables-legacy -w -t nat"), "{auto}");

    // Bad input: a clear error naming the flag, exit 2.
    let bad = pod
        .exec(&init, &["--skip-outbound-cidrs", "10.0.0.1/8"])
        .must();
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("--skip-outbound-cidrs") && stderr.contains("host bits"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_reach_each_other_through_both_sidecars() {
    if let Some(skip) = prerequisites() {
        return skip.must();
    }
    let dir = TestDir::new("interception").must();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .context("opening the test directory to the sidecars")
        .must();
    let mut net = Network::create().must();
    let (a, b) = (net.pod("a").must(), net.pod("b").must());
    for pod in [&a, &b] {
        pod.tern_init(&[]).must();
    }

    // Pod B's apps, and a server outside the mesh (on the gateway, in the root namespace).
    let echo_args = ["--listen", "0.0.0.0:50051", "--name", "echo-b"].map(String::from);
    let mut echo = b
        .spawn(dir.path(), "echo-b", "echo-server", &echo_args, false)
        .must();
    echo.wait_for_line("echo-server listening on", START_TIMEOUT)
        .await
        .must();
    let greeter_args = [
        "--listen",
        "0.0.0.0:7000",
        "--listen",
        "0.0.0.0:7001",
        "--listen",
        "0.0.0.0:7002",
        "--name",
        "b",
    ]
    .map(String::from);
    let mut greeter = b
        .spawn(dir.path(), "greeter-b", "tcp-greeter", &greeter_args, false)
        .must();
    greeter
        .wait_for_line("tcp-greeter listening on", START_TIMEOUT)
        .await
        .must();
    let outside_args = [
        "--listen".into(),
        format!("{}:0", net.gateway()),
        "--name".into(),
        "outside".into(),
    ];
    let mut outside = Proc::spawn(
        dir.path(),
        "outside",
        &binary("tcp-greeter").must(),
        &outside_args,
    )
    .must();
    let outside_addr: SocketAddr = outside
        .wait_for_line("tcp-greeter listening on", START_TIMEOUT)
        .await
        .must()
        .parse::<SocketAddr>()
        .context("the outside server's address")
        .must();

    let config = ConfigDir::with_services(dir.path(), MESH).must();
    let ca = MeshCa::start_on(dir.path(), &config, SocketAddr::from((net.gateway(), 0)))
        .await
        .must();
    let echo_extra = [
        "--inbound-app",
        "127.0.0.1:50051",
        "--inbound-transparent",
        "--inbound-ports",
        "7000-7002",
    ];
    let _proxy_b = b.sidecar(dir.path(), &ca, "echo", &echo_extra).await.must();
    let client_extra = ["--virtual-ip", "echo=10.96.77.10", "--opaque-ports", "7001"];
    let _proxy_a = a
        .sidecar(dir.path(), &ca, "client", &client_extra)
        .await
        .must();
    // Pod A learns B's endpoint from the control plane.
    eventually(Duration::from_secs(10), || async {
        let config = a.local_config().await?;
        let seen = config.contains(&b.addr(4143).to_string());
        Ok((!seen).then_some(config))
    })
    .await
    .must();

    // gRPC to B's pod IP, then to the service's virtual IP: both sidecars, mTLS between them.
    for target in [b.addr(50051), SocketAddr::from((ECHO_VIP, 50051))] {
        let target = target.to_string();
        let report = a
            .client(&["grpc", "--target", &target, "--calls", "5"], false)
            .await
            .must();
        assert_eq!(report["ok"], 5, "{report}");
        assert_eq!(report["servers"]["echo-b"], 5, "{report}");
        let metadata = report["metadata"].to_string();
        assert!(!metadata.contains("tern-dst-port"), "{metadata}");
    }
    let client_id = spiffe("client");
    let echo_id = spiffe("echo");
    let out_mtls = [
        ("direction", "outbound"),
        ("service", "echo"),
        ("tls", "true"),
        ("peer_identity", echo_id.as_str()),
    ];
    a.expect_metric("tern_responses_total", &out_mtls, 10.0)
        .await
        .must();
    let in_mtls = [
        ("direction", "inbound"),
        ("tls", "true"),
        ("peer_identity", client_id.as_str()),
    ];
    b.expect_metric("tern_responses_total", &in_mtls, 10.0)
        .await
        .must();

    // Opaque TCP through the mesh to a server that speaks first: the port the control plane
    // marks opaque (on the virtual IP), one pod A's --opaque-ports names (on B's IP), and one
    // nobody marks, carried as opaque once the client has said nothing for a second.
    let targets = [
        SocketAddr::from((ECHO_VIP, 7000)),
        b.addr(7001),
        b.addr(7002),
    ];
    for target in targets {
        let report = a
            .client(
                &[
                    "tcp",
                    "--target",
                    &target.to_string(),
                    "--greeting",
                    "--send",
                    "ping\\n",
                    "--half-close",
                ],
                false,
            )
            .await
            .must();
        assert_eq!(report["greeting"], "hello from b\n", "{report}");
        assert_eq!(
            report["reply"], "b: ping\nbye from b after 5 bytes\n",
            "{report}"
        );
    }
    let tcp_ok = |direction: &'static str| {
        [
            ("direction", direction),
            ("service", "echo"),
            ("tls", "true"),
            ("outcome", "ok"),
        ]
    };
    let tcp_total = "tern_tcp_connections_total";
    a.expect_metric(tcp_total, &tcp_ok("outbound"), 3.0)
        .await
        .must();
    b.expect_metric(tcp_total, &tcp_ok("inbound"), 3.0)
        .await
        .must();
    let flow_in = [
        ("direction", "inbound"),
        ("service", "echo"),
        ("flow", "in"),
    ];
    b.expect_metric("tern_tcp_bytes_total", &flow_in, 15.0)
        .await
        .must();
    let b_log = dir.path().join("proxy-echo.stdout");
    eventually(Duration::from_secs(5), || async {
        Ok(netns::log_line(&b_log, "tcp", "inbound")
            .err()
            .map(|e| e.to_string()))
    })
    .await
    .must();
    let logged = netns::log_line(&b_log, "tcp", "inbound").must();
    assert_eq!(logged["peer_identity"], client_id.as_str(), "{logged}");
    assert_eq!(logged["tls"], "TLSv1.3", "{logged}");

    // A destination outside the mesh passes through untouched.
    let passthrough = [
        ("direction", "outbound"),
        ("service", ""),
        ("outcome", "ok"),
    ];
    let to_outside = [
        "tcp",
        "--target",
        &outside_addr.to_string(),
        "--greeting",
        "--send",
        "hi\\n",
    ];
    let report = a.client(&to_outside, false).await.must();
    assert_eq!(report["greeting"], "hello from outside\n", "{report}");
    assert_eq!(report["reply"], "outside: hi\n", "{report}");
    a.expect_metric(tcp_total, &passthrough, 1.0).await.must();

    // No loop: the sidecar's own UID, and the admin port, are never redirected.
    let report = a.client(&to_outside, true).await.must();
    assert_eq!(report["greeting"], "hello from outside\n", "{report}");
    let live = [
        "tcp",
        "--target",
        &b.addr(4191).to_string(),
        "--send",
        "GET /live HTTP/1.0\\r\\n\\r\\n",
        "--read-to-end",
    ];
    let report = a.client(&live, false).await.must();
    assert!(
        report["reply"].as_str().unwrap_or("").contains(" 200 "),
        "{report}"
    );
    a.expect_metric(tcp_total, &passthrough, 1.0).await.must();
    a.expect_metric("tern_requests_total", &[("direction", "outbound")], 10.0)
        .await
        .must();

    // Strict inbound: plaintext from outside the mesh to B's app port is refused.
    let mesh_client = binary("mesh-client").must();
    let out = std::process::Command::new(&mesh_client)
        .args(["grpc", "--target", &b.addr(50051).to_string()])
        .output()
        .context("running mesh-client")
        .must();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The TCP metrics pass Prometheus's own lint.
    if tern_tests::metrics::promtool_available() {
        for pod in [&a, &b] {
            let text = http1::get(pod.addr(4191), "/metrics").await.must().text();
            tern_tests::metrics::promtool_check(&text).must();
        }
    }

    // Authorization covers opaque TCP: a rule naming gRPC methods lets the client's gRPC in,
    // and no TCP connection of it.
    config.write("authz.yaml", ECHO_CALLERS).must();
    eventually(Duration::from_secs(10), || async {
        let config = b.local_config().await?;
        Ok((!config.contains("echo-callers")).then_some(config))
    })
    .await
    .must();
    let vip_greeter = SocketAddr::from((ECHO_VIP, 7000)).to_string();
    let denied = a
        .client(&["tcp", "--target", &vip_greeter, "--greeting"], false)
        .await;
    assert!(denied.is_err(), "{denied:?}");
    let tcp_denied = [("direction", "inbound"), ("outcome", "denied")];
    b.expect_metric(tcp_total, &tcp_denied, 1.0).await.must();
    let authz_denied = [("peer_identity", client_id.as_str())];
    b.expect_metric("tern_authz_denied_total", &authz_denied, 1.0)
        .await
        .must();

    // Rerunning tern-init in a running pod changes nothing and keeps traffic flowing.
    let before = a.nat_rules("iptables-save").must();
    a.tern_init(&[]).must();
    assert_eq!(a.nat_rules("iptables-save").must(), before);
    let report = a
        .client(&["grpc", "--target", &b.addr(50051).to_string()], false)
        .await
        .must();
    assert_eq!(report["ok"], 1, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_inbound_reaches_every_port_the_app_serves() {
    if let Some(skip) = prerequisites() {
        return skip.must();
    }
    let dir = TestDir::new("inbound-interception").must();
    let mut net = Network::create().must();
    let pod = net.pod("c").must();
    pod.tern_init(&[]).must();
    let echo_args = ["--listen", "0.0.0.0:50051", "--name", "echo-c"].map(String::from);
    let mut echo = pod
        .spawn(dir.path(), "echo-c", "echo-server", &echo_args, false)
        .must();
    echo.wait_for_line("echo-server listening on", START_TIMEOUT)
        .await
        .must();
    let greeter_args = [
        "--listen",
        "0.0.0.0:7000",
        "--listen",
        "0.0.0.0:7001",
        "--name",
        "c",
    ]
    .map(String::from);
    let mut greeter = pod
        .spawn(dir.path(), "greeter-c", "tcp-greeter", &greeter_args, false)
        .must();
    greeter
        .wait_for_line("tcp-greeter listening on", START_TIMEOUT)
        .await
        .must();
    // No identity (inbound plaintext), no --inbound-app: every port is the one dialed, if the
    // app serves it.
    let proxy_args = [
        "--service-name",
        "plain",
        "--inbound-transparent",
        "--inbound-ports",
        "50051,7000-7001",
        "--opaque-ports",
        "7000",
        "--admin-listen",
        "0.0.0.0:4191",
    ]
    .map(String::from);
    let mut proxy = pod
        .spawn(dir.path(), "proxy-plain", "tern-proxy", &proxy_args, true)
        .must();
    proxy
        .wait_for_line("tern-proxy ready: ", START_TIMEOUT)
        .await
        .must();

    // gRPC from outside the mesh: detected as HTTP, served by the inbound stack.
    let grpc = pod.addr(50051).to_string();
    let report = netns::host_client(&["grpc", "--target", &grpc, "--calls", "3"]).must();
    assert_eq!(report["servers"]["echo-c"], 3, "{report}");
    let inbound = [("direction", "inbound"), ("service", "plain")];
    pod.expect_metric("tern_requests_total", &inbound, 3.0)
        .await
        .must();

    // A server that speaks first: on the opaque port at once, on the other after the
    // detection gives up waiting for the client.
    for port in [7000, 7001] {
        let target = pod.addr(port).to_string();
        let args = ["tcp", "--target", &target, "--greeting", "--send", "hey\\n"];
        let report = netns::host_client(&args).must();
        assert_eq!(report["greeting"], "hello from c\n", "{report}");
        assert_eq!(report["reply"], "c: hey\n", "{report}");
    }
    let tcp = [
        ("direction", "inbound"),
        ("service", "plain"),
        ("tls", "false"),
        ("outcome", "ok"),
    ];
    pod.expect_metric("tern_tcp_connections_total", &tcp, 2.0)
        .await
        .must();
}
