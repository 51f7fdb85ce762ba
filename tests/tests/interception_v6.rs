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

/// A Deployment declaring one port, as `ternctl inject` sees it.
const WEB: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
        - name: web
          image: web:1
          ports: [{containerPort: 50051}]
";

/// What the kubelet would give the injected containers of [`WEB`].
struct Injected {
    init_args: Vec<String>,
    proxy_env: Vec<(String, String)>,
}

/// [`Injected`] in a pod whose IP is `pod_ip`: tern-init's arguments, and the proxy's
/// environment with `$(POD_IP)` expanded. The control plane and identity are left out (this
/// pod runs without them), and so is the inbound mode, which needs an identity.
fn injected(pod_ip: &str) -> Result<Injected> {
    let text = tern_tests::k8s::inject_ok(&["-"], Some(WEB))?;
    let docs = tern_tests::k8s::documents(&text)?;
    let spec = docs
        .iter()
        .map(|d| &d["spec"]["template"]["spec"])
        .find(|s| s.is_object())
        .context("no pod template")?;
    let named = |list: &str, name: &str| {
        spec[list]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name).cloned())
            .with_context(|| format!("no {name} in {list}"))
    };
    let strings = |v: &serde_json::Value| -> Vec<String> {
        let items = v.as_array().map(Vec::as_slice).unwrap_or_default();
        items
            .iter()
            .filter_map(|a| a.as_str().map(String::from))
            .collect()
    };
    let init_args = strings(&named("initContainers", "tern-init")?["args"]);
    let proxy = named("containers", "tern-proxy")?;
    let left_out = [
        "TERN_CONTROL_PLANE",
        "TERN_IDENTITY_TRUST_ANCHORS",
        "TERN_IDENTITY_TOKEN_FILE",
        "TERN_INBOUND_TLS",
    ];
    let mut env = vec![("POD_IP".to_string(), pod_ip.to_string())];
    for var in proxy["env"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let (Some(name), Some(value)) = (var["name"].as_str(), var["value"].as_str()) else {
            continue;
        };
        if !left_out.contains(&name) {
            env.push((name.to_string(), value.replace("$(POD_IP)", pod_ip)));
        }
    }
    Ok(Injected {
        init_args,
        proxy_env: env,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_sidecar_works_in_an_ipv6_only_pod() {
    if let Some(skip) = prerequisites() {
        return skip.must();
    }
    let dir = TestDir::new("ipv6-only").must();
    let d = dir.path();
    let mut net = Network::create().must();
    let pod = net.pod_ipv6_only("v6").must();
    let injected = injected(&pod.ip6.to_string()).must();
    let init_args: Vec<&str> = injected.init_args.iter().map(String::as_str).collect();
    pod.tern_init(&init_args).must();

    let web = ["--listen", "[::]:50051", "--name", "web"];
    let _web = start(&pod, d, "web", "echo-server", &web).await.must();
    let undeclared = ["--listen", "[::]:9000", "--name", "undeclared"];
    let _undeclared = start(&pod, d, "undeclared", "tcp-greeter", &undeclared)
        .await
        .must();
    // The injected proxy, as its UID, with the injected environment (and no flags).
    let ids = netns::PROXY_UID.to_string();
    let proxy_bin = binary("tern-proxy").must().display().to_string();
    let args = [
        "netns",
        "exec",
        &pod.ns,
        "setpriv",
        "--reuid",
        &ids,
        "--regid",
        &ids,
        "--clear-groups",
        "--",
        &proxy_bin,
    ]
    .map(String::from);
    let env: Vec<(&str, String)> = injected
        .proxy_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let mut proxy = Proc::spawn_with_env(d, "proxy-web", Path::new("ip"), &args, &env).must();
    proxy
        .wait_for_line("tern-proxy ready: ", START_TIMEOUT)
        .await
        .must();

    // The kubelet's probes reach the admin port on the pod's IPv6 address.
    let ready = tern_tests::http1::get(pod.admin(), "/ready").await.must();
    assert_eq!(ready.status, 200, "{}", ready.text());
    // A caller outside the mesh dials the app's port: redirected to the sidecar, served.
    let app = pod.addr6(50051).to_string();
    let report = host_client(&["grpc", "--target", &app]).must();
    assert_eq!(report["servers"]["web"], 1, "{report}");
    // A caller dialing the inbound port itself reaches the app at $(POD_IP):50051.
    let inbound = pod.addr6(4143).to_string();
    let report = host_client(&["grpc", "--target", &inbound]).must();
    assert_eq!(report["servers"]["web"], 1, "{report}");
    let requests = [("direction", "inbound"), ("service", "web")];
    pod.expect_metric("tern_requests_total", &requests, 2.0)
        .await
        .must();
    // The undeclared port is intercepted and refused.
    let target = pod.addr6(9000).to_string();
    let refused = host_client(&["tcp", "--target", &target, "--greeting"]);
    assert!(refused.is_err(), "{refused:?}");
    let not_served = [("listener", "inbound"), ("reason", "port_not_served")];
    pod.expect_metric("tern_protocol_rejections_total", &not_served, 1.0)
        .await
        .must();
}

/// One dual-stack socket (`--inbound-listen [::]:4143`) takes redirected IPv4 connections as
/// IPv4-mapped addresses: their original destination is still read (from the IPv4 NAT record),
/// so they go to the port dialed, as IPv6 ones do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_inbound_socket_reads_ipv4_original_destinations() {
    if let Some(skip) = prerequisites() {
        return skip.must();
    }
    let dir = TestDir::new("dual-stack-socket").must();
    let d = dir.path();
    let mut net = Network::create().must();
    let pod = net.pod("dual").must();
    pod.tern_init(&[]).must();
    let greeter = ["--listen", "[::]:7000", "--name", "dual"];
    let _greeter = start(&pod, d, "greeter", "tcp-greeter", &greeter)
        .await
        .must();
    let proxy = [
        "--service-name",
        "dual",
        "--inbound-listen",
        "[::]:4143",
        "--inbound-transparent",
        "--inbound-ports",
        "7000",
        "--opaque-ports",
        "7000",
        "--admin-listen",
        "0.0.0.0:4191",
    ];
    let _proxy = start(&pod, d, "proxy-dual", "tern-proxy", &proxy)
        .await
        .must();
    for target in [pod.addr(7000), pod.addr6(7000)] {
        let target = target.to_string();
        let report = host_client(&["tcp", "--target", &target, "--greeting"]).must();
        assert_eq!(
            report["greeting"], "hello from dual\n",
            "{target}: {report}"
        );
    }
    let tcp = [("direction", "inbound"), ("outcome", "ok")];
    pod.expect_metric("tern_tcp_connections_total", &tcp, 2.0)
        .await
        .must();
}
