//! Kubernetes discovery end to end with real containers: two tern-control replicas with
//! `--discovery kubernetes`, their mesh config directory holding no Service at all (only a
//! TrafficPolicy for pay), an order pod and two pay pods (pause, `tern-init`, the sidecar, the
//! app) on a private Docker bridge.
//!
//! The Kubernetes API server is a STAND-IN ([`tern_tests::kube_watch`]): no real API server can
//! run on this machine. It speaks the list/watch protocol as the API server does and serves
//! k8s-openapi Services, EndpointSlices and Pods over TLS, from the bridge's host side; the
//! replicas reach it as `kubernetes.default.svc` through a kubeconfig. Everything else is real.
//!
//! What it shows: order's app dials pay's ClusterIP unchanged and its sidecar balances the calls
//! over both pay pods with mTLS (a capture on the bridge sees TLS and no gRPC in the clear); a
//! pay pod taken out of pay's EndpointSlice gets no call from 1 s after, and no call fails; the
//! replica order's sidecar is subscribed to, killed under load, fails no call, the sidecar
//! resubscribes to the other replica (`/config`, `tern_control_failovers_total`) and applies
//! what that replica pushes next, although its snapshot versions are lower (versions are per
//! replica).
//!
//! Needs root and the Docker engine (skips loudly outside CI; under `CI=true` it must run). It
//! tags the same images as `containers.rs`: do not run both at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use k8s_openapi::api::core::v1::{Pod as KubePod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};
use tern_tests::containers::{build_images, docker, engine_available, Cluster, CONTROL_UID};
use tern_tests::control::pay_policy;
use tern_tests::kube_watch::KubeWatchStandIn;
use tern_tests::pods::{self, failed, image, Pod, PodSpec};
use tern_tests::process::TestDir;
use tern_tests::{eventually, http1, Must};

const BEARER: &str = "tern-control-serviceaccount-token";
const PAY_VIP: &str = "10.96.0.51";
const ORDER_VIP: &str = "10.96.0.52";
const PAY: [(&str, u8); 2] = [("pay-1", 11), ("pay-2", 12)];
const ORDER: (&str, u8) = ("order", 10);
/// The two tern-control replicas' last octets.
const CONTROLS: [u8; 2] = [2, 3];

fn service(name: &str, vip: &str, port: u16) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
            "selector": {"app": name},
            "ports": [{"name": "grpc", "port": port, "targetPort": port, "protocol": "TCP"}]}
    }))
    .unwrap()
}

/// An injected pod as the API server lists it: the app and the `tern-proxy` container.
fn kube_pod(name: &str, app: &str, ip: Ipv4Addr, port: u16) -> KubePod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app, "version": "v1"}},
        "spec": {"serviceAccountName": app, "containers": [
            {"name": app, "ports": [{"name": "grpc", "containerPort": port}]},
            {"name": "tern-proxy", "ports": [{"name": "tern-inbound", "containerPort": 4143},
                {"name": "tern-admin", "containerPort": 4191}]}]},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}
    }))
    .unwrap()
}

/// `service`'s EndpointSlice listing `pods` (name, IP), all ready.
fn slice(service: &str, port: u16, pods: &[(&str, Ipv4Addr)]) -> EndpointSlice {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|(name, ip)| {
            json!({"addresses": [ip.to_string()], "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "namespace": "default", "name": name}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("{service}-x7k2p"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .unwrap()
}

struct Kube {
    cluster: Cluster,
    dir: TestDir,
    api: KubeWatchStandIn,
}

impl Kube {
    fn pay_pods(&self, names: &[&str]) -> EndpointSlice {
        let pods: Vec<(&str, Ipv4Addr)> = PAY
            .iter()
            .filter(|(n, _)| names.contains(n))
            .map(|(n, o)| (*n, self.cluster.ip(*o)))
            .collect();
        slice("pay", 50051, &pods)
    }

    fn control_name(&self, octet: u8) -> String {
        format!("{}-control-{octet}", self.cluster.network)
    }

    fn control_plane(&self) -> String {
        let urls: Vec<String> = CONTROLS
            .iter()
            .map(|o| format!("https://{}:8090", self.cluster.ip(*o)))
            .collect();
        urls.join(",")
    }
}

async fn start() -> Result<Kube> {
    build_images().await?;
    let dir = TestDir::new("kube-containers")?;
    let cluster = Cluster::create("kube").await?;
    for d in ["mesh", "empty", "state", "tokens", "kube"] {
        std::fs::create_dir_all(dir.path().join(d))?;
    }
    // No Service document: the cluster's Services are the mesh's.
    let policy = pay_policy(
        "  loadBalancer: ROUND_ROBIN\n  retries:\n    maxAttempts: 3\n    retryableCodes: [UNAVAILABLE]\n",
    );
    std::fs::write(dir.path().join("mesh/policy.yaml"), policy)?;
    let state = dir.path().join("state");
    let uid = Some(nix::unistd::Uid::from_raw(CONTROL_UID));
    nix::unistd::chown(&state, uid, Some(nix::unistd::Gid::from_raw(CONTROL_UID)))?;
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;

    let gateway = cluster.ip(1);
    let api = KubeWatchStandIn::start_on(BEARER, SocketAddr::from((gateway, 0))).await?;
    api.apply(&service("pay", PAY_VIP, 50051))?;
    api.apply(&service("order", ORDER_VIP, 50052))?;
    for (name, octet) in PAY {
        api.apply(&kube_pod(name, "pay", cluster.ip(octet), 50051))?;
    }
    let order_ip = cluster.ip(ORDER.1);
    api.apply(&kube_pod(ORDER.0, "order", order_ip, 50052))?;
    api.apply(&slice("order", 50052, &[(ORDER.0, order_ip)]))?;
    let kube = Kube { cluster, dir, api };
    kube.api.apply(&kube.pay_pods(&["pay-1", "pay-2"]))?;
    let server = format!("https://kubernetes.default.svc:{}", kube.api.addr.port());
    kube.api
        .write_kubeconfig_for(&kube.dir.path().join("kube/config"), BEARER, &server)?;
    make_ca(&kube).await?;
    for octet in CONTROLS {
        start_control(&kube, octet).await?;
    }
    Ok(kube)
}

/// The mesh CA and token key, made once by a tern-control that generates them into the state
/// directory, then shared by both replicas as the `tern-ca` Secret is in a cluster.
async fn make_ca(kube: &Kube) -> Result<()> {
    let c = &kube.cluster;
    let state = kube.dir.path().join("state");
    let mounts = [
        format!(
            "{}:/etc/tern/mesh:ro",
            kube.dir.path().join("empty").display()
        ),
        format!("{}:/var/lib/tern", state.display()),
    ];
    let name = format!("{}-ca", c.network);
    c.run(
        &name,
        &["-v", &mounts[0], "-v", &mounts[1], &image("control")],
    )
    .await?;
    eventually(Duration::from_secs(20), || async {
        let done = ["token.key", "trust-anchor.pem", "issuer-key.pem"]
            .iter()
            .all(|f| state.join(f).is_file());
        Ok((!done).then(|| "tern-control has not written its CA yet".to_string()))
    })
    .await?;
    docker(&["rm", "-f", &name]).await?;
    let ternctl = tern_tests::process::binary("ternctl")?;
    for sa in ["order", "pay"] {
        let out = std::process::Command::new(&ternctl)
            .args(["token", "create", "--state-dir"])
            .arg(&state)
            .args(["--service-account", sa, "--out"])
            .arg(kube.dir.path().join(format!("tokens/{sa}.token")))
            .output()?;
        ensure!(out.status.success(), "ternctl token create: {out:?}");
    }
    Ok(())
}

/// One replica, as the cluster manifests run it: the shared CA and token key, the mesh config
/// directory, Kubernetes discovery (the stand-in, by kubeconfig).
async fn start_control(kube: &Kube, octet: u8) -> Result<()> {
    let c = &kube.cluster;
    let d = kube.dir.path();
    let ip = c.ip(octet);
    let mount = |from: &str, to: &str| format!("{}:{to}:ro", d.join(from).display());
    let (mesh, ca, kubeconfig) = (
        mount("mesh", "/etc/tern/mesh"),
        mount("state", "/var/run/tern/ca"),
        mount("kube", "/var/run/kube"),
    );
    let (ip_arg, host) = (
        ip.to_string(),
        format!("--add-host=kubernetes.default.svc:{}", c.ip(1)),
    );
    #[rustfmt::skip]
    let args = [
        "--network", &c.network, "--ip", &ip_arg, &host,
        "-v", &mesh, "-v", &ca, "-v", &kubeconfig,
        "-e", "KUBECONFIG=/var/run/kube/config", "-e", "TERN_CONTROL_LOG=info",
        &image("control"),
        "--config-dir", "/etc/tern/mesh", "--state-dir", "/var/lib/tern",
        "--grpc-listen", "0.0.0.0:8090", "--admin-listen", "0.0.0.0:9990",
        "--discovery", "kubernetes",
        "--ca-anchor", "/var/run/tern/ca/trust-anchor.pem",
        "--ca-issuer-cert", "/var/run/tern/ca/issuer.pem",
        "--ca-issuer-key", "/var/run/tern/ca/issuer-key.pem",
        "--token-key-file", "/var/run/tern/ca/token.key",
    ];
    c.run(&kube.control_name(octet), &args).await?;
    control_ready(kube, octet).await
}

/// A replica is ready once its discovery has listed the cluster.
async fn control_ready(kube: &Kube, octet: u8) -> Result<()> {
    let admin = SocketAddr::from((kube.cluster.ip(octet), 9990));
    eventually(Duration::from_secs(30), || async move {
        let status = http1::get(admin, "/ready").await.map(|r| r.status);
        Ok((!matches!(status, Ok(200))).then(|| format!("{admin}/ready: {status:?}")))
    })
    .await
}

async fn pod(kube: &Kube, name: &str, octet: u8, extra_env: &[&str]) -> Result<Pod> {
    let (app, port) = if name == ORDER.0 {
        ("order", "50052")
    } else {
        ("pay", "50051")
    };
    let listen = format!("0.0.0.0:{port}");
    let bin = format!("/usr/local/bin/{app}");
    let command: Vec<&str> = if app == "order" {
        // order dials pay by name, which resolves to pay's ClusterIP, as in a cluster.
        vec![
            &bin,
            "--listen",
            &listen,
            "--pay-host",
            "pay",
            "--pay-port",
            "50051",
        ]
    } else {
        vec![&bin, "--listen", &listen, "--replica", name]
    };
    let control_plane = kube.control_plane();
    let pay_host = format!("pay:{PAY_VIP}");
    let spec = PodSpec {
        name,
        last_octet: octet,
        service: app,
        service_account: app,
        app: &command,
        ports: port,
        control_plane: &control_plane,
        extra_env,
        hosts: &[&pay_host],
        sidecars: &[],
    };
    pods::start(&kube.cluster, kube.dir.path(), &spec).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_services_are_meshed_by_replicated_control_planes() {
    if !engine_available().await {
        tern_tests::missing("root and a Docker engine").must();
        return;
    }
    let kube = start().await.must();
    if let Err(e) = scenario(&kube).await {
        panic!("{e:#}\n\n{}", kube.cluster.diagnostics().await);
    }
}

async fn scenario(kube: &Kube) -> Result<()> {
    // Versions are per replica, seeded from its clock: the first replica's are the lower. It is
    // cut off while the pods start, so they subscribe to the second, and the failover below
    // goes to lower versions.
    let (net, first) = (&kube.cluster.network, kube.control_name(CONTROLS[0]));
    docker(&["network", "disconnect", net, &first]).await?;
    let mut pays = Vec::new();
    for (name, octet) in PAY {
        pays.push(pod(kube, name, octet, &[]).await?);
    }
    // loadgen calls order from outside the mesh; the test reads order's /config from the host.
    let order_env = [
        "TERN_INBOUND_TLS=permissive",
        "TERN_ADMIN_EXPOSE_CONFIG=true",
    ];
    let order = pod(kube, ORDER.0, ORDER.1, &order_env).await?;
    let first_ip = kube.cluster.ip(CONTROLS[0]).to_string();
    docker(&["network", "connect", "--ip", &first_ip, net, &first]).await?;
    control_ready(kube, CONTROLS[0]).await?;
    let target = format!("{}:50052", order.ip);
    // Nothing tells order's sidecar it calls pay, as in an injected pod: the first call to pay's
    // ClusterIP makes it look the address up, and that call waits for the answer, not fails.
    let first = pods::load(&kube.cluster, &target, 1).await?;
    ensure!(
        failed(&first) == 0,
        "first calls, pay looked up on first use: {first}"
    );
    pay_endpoints(&order, 2.0).await?;

    balanced_over_mtls(kube, &order, &target).await?;
    slice_removal(kube, &order, &pays[1], &target).await?;
    replica_killed(kube, &order, &target).await
}

/// Waits until order's sidecar knows `n` pay endpoints.
async fn pay_endpoints(order: &Pod, n: f64) -> Result<()> {
    eventually(Duration::from_secs(15), || async {
        let have = order
            .metric("tern_endpoints", &[("service", "pay")])
            .await?;
        Ok((have != n).then(|| format!("order's sidecar knows {have} pay endpoints, not {n}")))
    })
    .await
}

/// Round robin over both pay pods; on the bridge, TLS records between the sidecars and never
/// the gRPC method or the HTTP/2 preface in the clear.
async fn balanced_over_mtls(kube: &Kube, order: &Pod, target: &str) -> Result<()> {
    let pcap = kube.dir.path().join("kube.pcap");
    let summary = pods::load_captured(&kube.cluster, target, 5, &pcap).await?;
    let (p1, p2) = pods::ensure_round_robin(&summary)?;
    let outbound = order
        .metric(
            "tern_requests_total",
            &[("direction", "outbound"), ("service", "pay")],
        )
        .await?;
    ensure!(
        outbound >= (p1 + p2) as f64,
        "order's sidecar did not carry the calls to pay ({outbound})"
    );
    pods::ensure_tls_only(&pcap)
}

/// pay-2 taken out of pay's EndpointSlice under load: from 1 s after, it answers no call,
/// and no call fails.
async fn slice_removal(kube: &Kube, order: &Pod, pay2: &Pod, target: &str) -> Result<()> {
    let inbound = || pay2.metric("tern_requests_total", &[("direction", "inbound")]);
    let loader = pods::load(&kube.cluster, target, 7);
    let remover = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = inbound().await?;
        kube.api.apply(&kube.pay_pods(&["pay-1"]))?;
        let removed = Instant::now();
        tokio::time::sleep_until((removed + Duration::from_secs(1)).into()).await;
        let at_1s = inbound().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let at_3s = inbound().await?;
        Ok::<_, anyhow::Error>((before, at_1s, at_3s))
    };
    let (summary, counts) = tokio::join!(loader, remover);
    let (summary, (before, at_1s, at_3s)) = (summary?, counts?);
    ensure!(
        failed(&summary) == 0,
        "calls failed while pay-2 left the slice: {summary}"
    );
    ensure!(before > 0.0, "pay-2 had answered nothing before it left");
    ensure!(
        at_3s == at_1s,
        "pay-2 still got calls more than 1 s after leaving the slice ({at_1s} then {at_3s})"
    );
    pay_endpoints(order, 1.0).await
}

/// The replica order's sidecar is subscribed to (the second), killed under load: no call
/// fails, the sidecar resubscribes to the first and applies what it pushes (pay-2 back in the
/// slice), although that replica's versions are lower.
async fn replica_killed(kube: &Kube, order: &Pod, target: &str) -> Result<()> {
    let [first, second] = CONTROLS.map(|o| format!("{}:8090", kube.cluster.ip(o)));
    let config = order.config().await?;
    let replica = &config["control_plane"]["replica"];
    ensure!(
        replica.as_str() == Some(second.as_str()),
        "order is subscribed to {replica}, not {second}"
    );
    let version = |c: &Value| {
        c["control_plane"]["applied"]["version"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = version(&config);
    let failovers = order.metric("tern_control_failovers_total", &[]).await?;
    // The first replica, cut off a while ago, has caught up with the cluster: pay-1 and order.
    let admin = SocketAddr::from((kube.cluster.ip(CONTROLS[0]), 9990));
    eventually(Duration::from_secs(30), || async move {
        let text = http1::get(admin, "/metrics").await?.text();
        let samples = tern_tests::metrics::parse(&text)?;
        let n = tern_tests::metrics::sum(&samples, "tern_control_discovered_endpoints", &[]);
        Ok((n != 2.0).then(|| format!("the first replica has {n} discovered endpoints, not 2")))
    })
    .await?;

    let loader = pods::load(&kube.cluster, target, 6);
    let killer = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        docker(&["kill", &kube.control_name(CONTROLS[1])]).await
    };
    let (summary, killed) = tokio::join!(loader, killer);
    killed?;
    let summary = summary?;
    ensure!(
        failed(&summary) == 0,
        "calls failed while {second} died: {summary}"
    );
    eventually(Duration::from_secs(15), || async {
        let c = order.config().await?;
        let now = c["control_plane"]["replica"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let connected = c["control_plane"]["connected"].as_bool() == Some(true);
        Ok((now != first || !connected)
            .then(|| format!("order's sidecar is on {now} (connected: {connected})")))
    })
    .await?;
    let after = order.metric("tern_control_failovers_total", &[]).await?;
    ensure!(
        after == failovers + 1.0,
        "tern_control_failovers_total went {failovers} → {after}"
    );
    // The first replica's snapshots are applied, although their versions are lower.
    kube.api.apply(&kube.pay_pods(&["pay-1", "pay-2"]))?;
    pay_endpoints(order, 2.0).await?;
    let now = version(&order.config().await?);
    ensure!(
        now > 0 && now < before,
        "expected a lower version from the first replica: {before} before, {now} now"
    );
    let summary = pods::load(&kube.cluster, target, 2).await?;
    ensure!(
        failed(&summary) == 0,
        "calls failed after the failover: {summary}"
    );
    ensure!(
        summary["by_replica"]["pay-2"].as_u64().unwrap_or(0) > 0,
        "pay-2 got no call once back in the slice: {summary}"
    );
    Ok(())
}
