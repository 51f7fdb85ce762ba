//! A Kubernetes Service whose `targetPort` differs from its `port`, called through two sidecars:
//! the caller's sidecar names the endpoint's target port (`tern-dst-port`, the opaque header)
//! to the callee's, which forwards only to ports its app serves; and the Service is dual-stack,
//! so its IPv6 ClusterIP reaches it as well as its IPv4 one. Pods are network namespaces
//! with `tern-init`'s rules, as in `interception.rs`; tern-control discovers the Service from
//! the stand-in API server of `kube_discovery.rs` (no real one runs here). Needs root,
//! iptables and iproute2: skipped loudly outside CI when missing, required under `CI=true`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use tern_tests::control::{ConfigDir, Control};
use tern_tests::kube_watch::KubeWatchStandIn;
use tern_tests::mtls::MeshCa;
use tern_tests::netns::{self, Network, Pod as NsPod};
use tern_tests::process::START_TIMEOUT;
use tern_tests::{eventually, Must, Proc, TestDir};

const BEARER: &str = "tern-control-serviceaccount-token";
const CLUSTER_IP: &str = "10.96.0.80";
/// web is dual-stack: its IPv6 ClusterIP names it too.
const CLUSTER_IP6: &str = "fd00:96::80";

/// Only what the cluster cannot say: port 7000 is opaque (its server speaks first).
const OVERLAY: &str = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: web, namespace: default}
spec:
  ports: [{port: 7000, protocol: opaque}]
";

/// `web`: 80 → 8080, 9000 → the pod's port named `alt` (9443), 7000 → 7100 (opaque).
fn service() -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": CLUSTER_IP,
            "clusterIPs": [CLUSTER_IP, CLUSTER_IP6], "ipFamilies": ["IPv4", "IPv6"],
            "selector": {"app": "web"},
            "ports": [
                {"name": "grpc", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "alt", "port": 9000, "targetPort": "alt", "protocol": "TCP"},
                {"name": "raw", "port": 7000, "targetPort": 7100, "protocol": "TCP"}]}
    }))
    .unwrap()
}

/// The web pod at `ip`, with the injected sidecar, service account `web`.
fn pod(ip: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"app": "web"}},
        "spec": {"serviceAccountName": "web", "containers": [
            {"name": "web", "ports": [{"name": "grpc", "containerPort": 8080},
                {"name": "alt", "containerPort": 9443}, {"name": "raw", "containerPort": 7100}]},
            {"name": "tern-proxy", "ports": [{"name": "tern-inbound", "containerPort": 4143}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    }))
    .unwrap()
}

fn slice(ip: &str) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"name": "web-x1", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": 8080, "protocol": "TCP"},
            {"name": "alt", "port": 9443, "protocol": "TCP"},
            {"name": "raw", "port": 7100, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "namespace": "default", "name": "web-1"}}]
    }))
    .unwrap()
}

/// Starts `bin` in `pod` and waits for its "listening" line.
async fn serve(pod: &NsPod, dir: &Path, label: &str, bin: &str, args: &[&str]) -> Result<Proc> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let mut proc = pod.spawn(dir, label, bin, &args, false)?;
    proc.wait_for_line(&format!("{bin} listening on"), START_TIMEOUT)
        .await?;
    Ok(proc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_port_reaches_the_target_port_through_two_sidecars() {
    if let Some(what) = netns::missing_prerequisite() {
        return tern_tests::missing(&what).must();
    }
    let dir = TestDir::new("kube-target-ports").must();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .context("opening the test directory to the sidecars")
        .must();
    let d = dir.path();
    let mut net = Network::create().must();
    let (c, w) = (net.pod("c").must(), net.pod("w").must());
    c.tern_init(&[]).must();
    w.tern_init(&[]).must();

    // The web pod serves 8080, 9443 and (speaking first) 7100, and nothing on 80, 9000, 7000.
    let _grpc = serve(
        &w,
        d,
        "grpc",
        "echo-server",
        &["--listen", "0.0.0.0:8080", "--name", "grpc"],
    )
    .await
    .must();
    let _alt = serve(
        &w,
        d,
        "alt",
        "echo-server",
        &["--listen", "0.0.0.0:9443", "--name", "alt"],
    )
    .await
    .must();
    let _raw = serve(
        &w,
        d,
        "raw",
        "tcp-greeter",
        &["--listen", "0.0.0.0:7100", "--name", "raw"],
    )
    .await
    .must();

    let api = KubeWatchStandIn::start(BEARER).await.must();
    let ip = w.addr(0).ip().to_string();
    api.apply(&service()).must();
    api.apply(&pod(&ip)).must();
    api.apply(&slice(&ip)).must();
    let kubeconfig = api.write_kubeconfig(&d.join("kubeconfig"), BEARER).must();
    let config = ConfigDir::with_services(d, OVERLAY).must();
    let control = Control::start_with_env(
        d,
        "tern-control",
        &config,
        SocketAddr::from((net.gateway(), 0)),
        &["--discovery".into(), "kubernetes".into()],
        &[("KUBECONFIG", kubeconfig.display().to_string())],
    )
    .await
    .must();
    let ca = MeshCa::of(d, control).must();
    let app = w.addr(8080).to_string();
    let web_extra = [
        "--inbound-app",
        &app,
        "--inbound-transparent",
        "--inbound-ports",
        "9443,7100",
    ];
    let _proxy_w = w.sidecar(d, &ca, "web", &web_extra).await.must();
    let _proxy_c = c
        .sidecar(d, &ca, "client", &["--watch-all-services"])
        .await
        .must();

    // The app dials the ClusterIP at the Service port; the app behind it serves the target port.
    let port80 = format!("{CLUSTER_IP}:80");
    // Until the caller's sidecar has learnt web (the first calls may pass through unmeshed).
    eventually(Duration::from_secs(15), || async {
        let report = c.client(&["grpc", "--target", &port80], false).await;
        Ok(match report {
            Ok(r) if r["servers"]["grpc"] == 1 => None,
            other => Some(format!("{other:?}")),
        })
    })
    .await
    .must();
    // Over mTLS, through both sidecars.
    let over_mtls = [("direction", "inbound"), ("tls", "true")];
    let n = w.metric("tern_responses_total", &over_mtls).await.must();
    assert!(n >= 1.0, "{n} inbound mTLS responses");

    // A named targetPort, resolved through the EndpointSlice.
    let port9000 = format!("{CLUSTER_IP}:9000");
    let report = c
        .client(&["grpc", "--target", &port9000], false)
        .await
        .must();
    assert_eq!(report["servers"]["alt"], 1, "{report}");

    // Opaque TCP: the header names the target port.
    let port7000 = format!("{CLUSTER_IP}:7000");
    let report = c
        .client(&["tcp", "--target", &port7000, "--greeting"], false)
        .await
        .must();
    assert_eq!(report["greeting"], "hello from raw\n", "{report}");

    // The IPv6 ClusterIP of the dual-stack Service is the same service (its endpoints are
    // the primary family's).
    let port80_v6 = format!("[{CLUSTER_IP6}]:80");
    let report = c
        .client(&["grpc", "--target", &port80_v6], false)
        .await
        .must();
    assert_eq!(report["servers"]["grpc"], 1, "{report}");
}
