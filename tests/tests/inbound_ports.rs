//! The inbound side reaches only what the app serves (issue 15, defects 2 and 3). Pods are
//! network namespaces with `tern-init`'s rules and a sidecar, as in `interception.rs`; the
//! attacker is the root namespace (a client outside the mesh) or a meshed pod's app. Needs root,
//! iptables and iproute2: skipped loudly outside CI when missing, required under `CI=true`.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use serde_json::Value;
use tern_tests::control::ConfigDir;
use tern_tests::k8s::{documents, inject_ok};
use tern_tests::mtls::MeshCa;
use tern_tests::netns::{self, host_client, Network, Pod};
use tern_tests::process::START_TIMEOUT;
use tern_tests::{eventually, Must, Proc, TestDir};

/// `victim`: gRPC on 50051 (its only declared port), served by pod V.
const MESH: &str = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: victim, namespace: default}
spec:
  ports: [{name: grpc, port: 50051}]
  identity: spiffe://cluster.local/ns/default/sa/victim
";

const PORT_NOT_SERVED: [(&str, &str); 2] = [("listener", "inbound"), ("reason", "port_not_served")];

fn prerequisites() -> Option<Result<()>> {
    netns::missing_prerequisite().map(|what| tern_tests::missing(&what))
}

/// Starts `bin` in `pod` and waits for its "listening" line.
async fn serve(pod: &Pod, dir: &Path, label: &str, bin: &str, args: &[&str]) -> Result<Proc> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let mut proc = pod.spawn(dir, label, bin, &args, false)?;
    proc.wait_for_line(&format!("{bin} listening on"), START_TIMEOUT)
        .await?;
    Ok(proc)
}

/// Waits until `pod` has counted more refused ports than `before`; returns the new count.
async fn counted(pod: &Pod, before: f64) -> f64 {
    let metric = "tern_protocol_rejections_total";
    eventually(Duration::from_secs(5), || async {
        let n = pod.metric(metric, &PORT_NOT_SERVED).await?;
        Ok((n <= before).then(|| format!("{metric} still {n}")))
    })
    .await
    .must();
    pod.metric(metric, &PORT_NOT_SERVED).await.must()
}

/// The report of a call that must have failed, as text (its error names the reason).
fn refused(call: Result<Value>) -> String {
    match call {
        Ok(report) => panic!("the call went through: {report}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_reaches_only_the_ports_the_app_serves() {
    if let Some(skip) = prerequisites() {
        return skip.must();
    }
    let dir = TestDir::new("inbound-ports").must();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .context("opening the test directory to the sidecars")
        .must();
    let d = dir.path();
    let mut net = Network::create().must();
    let (c, v) = (net.pod("c").must(), net.pod("v").must());
    c.tern_init(&[]).must();
    v.tern_init(&["--skip-inbound-ports", "9090"]).must();

    // Pod V: the app on 50051; a debug server and a raw TCP service bound to loopback only; a
    // server on a port tern-init skips; and a declared port whose server binds loopback only.
    let app_args = ["--listen", "0.0.0.0:50051", "--name", "app"];
    let _app = serve(&v, d, "app", "echo-server", &app_args).await.must();
    let debug = ["--listen", "127.0.0.1:6060", "--name", "debug"];
    let _debug = serve(&v, d, "debug", "echo-server", &debug).await.must();
    let skipped = ["--listen", "0.0.0.0:9090", "--name", "skipped"];
    let _skipped = serve(&v, d, "skipped", "echo-server", &skipped)
        .await
        .must();
    let private = ["--listen", "127.0.0.1:7100", "--listen", "127.0.0.1:7000"];
    let _private = serve(&v, d, "private", "tcp-greeter", &private)
        .await
        .must();

    let config = ConfigDir::with_services(d, MESH).must();
    let ca = MeshCa::start_on(d, &config, SocketAddr::from((net.gateway(), 0)))
        .await
        .must();
    let app = v.addr(50051).to_string();
    let victim_extra = [
        "--inbound-app",
        &app,
        "--inbound-transparent",
        "--inbound-tls",
        "permissive",
        "--inbound-ports",
        "7000",
    ];
    let _proxy_v = v.sidecar(d, &ca, "victim", &victim_extra).await.must();
    let watch_all = ["--watch-all-services"];
    let _proxy_c = c.sidecar(d, &ca, "client", &watch_all).await.must();

    // What V serves works: from the meshed pod over mTLS (once it has learnt V), and from
    // outside the mesh in plaintext.
    let client_id = tern_tests::mtls::spiffe("client");
    let over_mtls = [
        ("direction", "inbound"),
        ("tls", "true"),
        ("peer_identity", client_id.as_str()),
    ];
    eventually(Duration::from_secs(10), || async {
        c.client(&["grpc", "--target", &app], false).await?;
        let n = v.metric("tern_responses_total", &over_mtls).await?;
        Ok((n < 1.0).then(|| format!("{n} inbound mTLS responses")))
    })
    .await
    .must();
    let report = host_client(&["grpc", "--target", &app]).must();
    assert_eq!(report["servers"]["app"], 1, "{report}");

    // Each attack below is refused, and counted (a client may retry a refused connection, so
    // only "more than before" is certain).
    let mut refusals = 0.0;
    // Plaintext from outside the mesh naming a loopback-only port, or a port tern-init skips,
    // in tern-dst-port: refused with PERMISSION_DENIED, never forwarded.
    let inbound = v.addr(4143).to_string();
    for port in ["6060", "9090"] {
        let named = format!("tern-dst-port={port}");
        let call = host_client(&["grpc", "--target", &inbound, "--metadata", &named]);
        let error = refused(call);
        assert!(
            error.contains("PermissionDenied") && error.contains(port),
            "{error}"
        );
        refusals = counted(&v, refusals).await;
    }
    // The meshed pod's app dialing those ports: its sidecar names the port, V refuses it.
    let debug_port = v.addr(6060).to_string();
    let error = refused(c.client(&["grpc", "--target", &debug_port], false).await);
    assert!(error.contains("PermissionDenied"), "{error}");
    refusals = counted(&v, refusals).await;
    // ... and as opaque TCP (a server that speaks first) to a loopback-only port.
    let raw = v.addr(7100).to_string();
    let greeting = ["tcp", "--target", &raw, "--greeting"];
    refused(c.client(&greeting, false).await);
    let not_allowed = [("direction", "inbound"), ("outcome", "port_not_allowed")];
    v.expect_metric("tern_tcp_connections_total", &not_allowed, 1.0)
        .await
        .must();
    refusals = counted(&v, refusals).await;
    // Outside the mesh, straight to the loopback-only port: redirected, then refused.
    refused(host_client(&["grpc", "--target", &debug_port]));
    counted(&v, refusals).await;
    let stderr = std::fs::read_to_string(d.join("proxy-victim.stderr"))
        .context("the sidecar's log")
        .must();
    assert!(stderr.contains("port not served"), "{stderr}");

    // A declared port whose server binds loopback only stays private: the sidecar forwards to
    // the pod IP, where nothing listens.
    let local_only = v.addr(7000).to_string();
    refused(host_client(&["tcp", "--target", &local_only, "--greeting"]));
    let app_refused = [("direction", "inbound"), ("outcome", "app_refused")];
    v.expect_metric("tern_tcp_connections_total", &app_refused, 1.0)
        .await
        .must();
}

/// Defect 3: injection used to have tern-init redirect only the declared container ports, so a
/// port the app listens on without declaring it was reached directly, bypassing the sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_ports_are_intercepted_too() {
    if let Some(skip) = prerequisites() {
        return skip.must();
    }
    let dir = TestDir::new("undeclared-ports").must();
    let d = dir.path();
    let mut net = Network::create().must();
    let pod = net.pod("w").must();

    // tern-init as `ternctl inject` runs it for a pod that declares 50051 only.
    let injected = inject_ok(&["-"], Some(WEB)).must();
    let docs = documents(&injected).must();
    let args = init_args(&docs).must();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    pod.tern_init(&args).must();

    let web = ["--listen", "0.0.0.0:50051", "--name", "web"];
    let _web = serve(&pod, d, "web", "echo-server", &web).await.must();
    let undeclared = ["--listen", "0.0.0.0:9000", "--name", "undeclared"];
    let _undeclared = serve(&pod, d, "undeclared", "tcp-greeter", &undeclared)
        .await
        .must();
    let app = pod.addr(50051).to_string();
    let proxy_args = [
        "--service-name",
        "web",
        "--inbound-transparent",
        "--inbound-app",
        &app,
        "--admin-listen",
        "0.0.0.0:4191",
    ]
    .map(String::from);
    let mut proxy = pod
        .spawn(d, "proxy-web", "tern-proxy", &proxy_args, true)
        .must();
    proxy
        .wait_for_line("tern-proxy ready: ", START_TIMEOUT)
        .await
        .must();

    // The declared port goes through the sidecar ...
    let report = host_client(&["grpc", "--target", &app]).must();
    assert_eq!(report["servers"]["web"], 1, "{report}");
    let inbound = [("direction", "inbound"), ("service", "web")];
    pod.expect_metric("tern_requests_total", &inbound, 1.0)
        .await
        .must();
    // ... and the undeclared one too, where it is refused: it is not a port the pod serves.
    let target = pod.addr(9000).to_string();
    refused(host_client(&["tcp", "--target", &target, "--greeting"]));
    pod.expect_metric("tern_protocol_rejections_total", &PORT_NOT_SERVED, 1.0)
        .await
        .must();
}

/// A Deployment declaring one port.
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

/// The arguments of the injected tern-init container.
fn init_args(docs: &[Value]) -> Result<Vec<String>> {
    let inits = docs
        .iter()
        .filter_map(|d| d["spec"]["template"]["spec"]["initContainers"].as_array())
        .flatten();
    let init = inits
        .into_iter()
        .find(|c| c["name"] == "tern-init")
        .ok_or_else(|| anyhow!("no tern-init container in {docs:?}"))?;
    let args = init["args"]
        .as_array()
        .ok_or_else(|| anyhow!("tern-init has no args: {init}"))?;
    Ok(args
        .iter()
        .filter_map(|a| a.as_str().map(String::from))
        .collect())
}
