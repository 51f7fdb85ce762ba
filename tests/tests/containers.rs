//! The meshed chain as real containers: tern-control, an order pod and two pay pods on a private
//! bridge network, each pod a pause container, `tern-init`, the tern-proxy sidecar and the app in
//! one network namespace. order's app dials `pay:50051` unchanged (a virtual IP, like a
//! ClusterIP); its sidecar intercepts the connection and balances the calls over the pay pods
//! with mTLS. Also: a destination outside the mesh passes through, the admin port and the
//! proxy's own traffic are not redirected, a pay pod stopped under load costs no call, the
//! control plane cut off costs no call, Redis on an opaque port crosses the mesh with mTLS, and a
//! Job-style pod's sidecar exits 0 through `/shutdown`.
//!
//! Needs root and the Docker engine (skips loudly outside CI; under `CI=true` it must run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use tern_tests::containers::{build_images, docker, engine_available, which, Cluster, CONTROL_UID};
use tern_tests::pods::{self, failed, image, Pod, PodSpec};
use tern_tests::process::TestDir;
use tern_tests::{eventually, http1, Must};

const PAY_VIP: &str = "10.96.0.51";
const SERVICES: &str = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: pay, namespace: default}
spec:
  protocol: grpc
  ports: [{name: grpc, port: 50051}, {name: redis, port: 6379, protocol: opaque}]
  virtualIP: 10.96.0.51
  identity: spiffe://cluster.local/ns/default/sa/pay
---
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: order, namespace: default}
spec:
  protocol: grpc
  ports: [{name: grpc, port: 50052}]
  identity: spiffe://cluster.local/ns/default/sa/order
---
apiVersion: tern.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: pay, namespace: default}
spec:
  service: pay
  timeout: 5s
  retries:
    maxAttempts: 3
    retryableCodes: [UNAVAILABLE]
    budget: {percent: 50, minPerSecond: 20}
";

struct Mesh {
    cluster: Cluster,
    dir: TestDir,
    /// `TERN_CONTROL_PLANE` of every pod.
    control_plane: String,
}

impl Mesh {
    async fn start() -> Result<Self> {
        build_images().await?;
        let dir = TestDir::new("containers")?;
        let cluster = Cluster::create("mesh").await?;
        let mesh_dir = dir.path().join("mesh");
        let state = dir.path().join("state");
        let tokens = dir.path().join("tokens");
        for d in [&mesh_dir, &state, &tokens] {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(mesh_dir.join("services.yaml"), SERVICES)?;
        // tern-control runs as its own user and generates its CA into the state directory.
        nix::unistd::chown(
            &state,
            Some(nix::unistd::Uid::from_raw(CONTROL_UID)),
            Some(nix::unistd::Gid::from_raw(CONTROL_UID)),
        )?;
        // The test directory is private to root; the containers' users must reach into it.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let control_ip = cluster.ip(2);
        let mesh_mount = format!("{}:/etc/tern/mesh:ro", mesh_dir.display());
        let state_mount = format!("{}:/var/lib/tern", state.display());
        let ip = control_ip.to_string();
        cluster
            .run(
                &format!("{}-control", cluster.network),
                &[
                    "--network",
                    &cluster.network,
                    "--ip",
                    &ip,
                    "-v",
                    &mesh_mount,
                    "-v",
                    &state_mount,
                    &image("control"),
                ],
            )
            .await?;
        let anchor = state.join("trust-anchor.pem");
        eventually(Duration::from_secs(20), || async {
            Ok((!state.join("token.key").is_file() || !anchor.is_file())
                .then(|| "tern-control has not written its CA yet".to_string()))
        })
        .await?;
        let ternctl = tern_tests::process::binary("ternctl")?;
        for sa in ["order", "pay", "job"] {
            let out = std::process::Command::new(&ternctl)
                .args(["token", "create", "--state-dir"])
                .arg(&state)
                .args(["--service-account", sa, "--out"])
                .arg(tokens.join(format!("{sa}.token")))
                .output()?;
            ensure!(out.status.success(), "ternctl token create: {out:?}");
        }
        Ok(Self {
            cluster,
            dir,
            control_plane: format!("https://{control_ip}:8090"),
        })
    }

    /// pause → tern-init (must exit 0) → tern-proxy → app, like an injected pod, subscribed to
    /// this mesh's tern-control; every pod's sidecar carries redis (6379) as opaque TCP.
    async fn pod(&self, spec: &PodSpec<'_>) -> Result<Pod> {
        let mut env = vec!["TERN_OPAQUE_PORTS=6379"];
        env.extend_from_slice(spec.extra_env);
        let spec = PodSpec {
            extra_env: &env,
            ..*spec
        };
        pods::start(&self.cluster, self.dir.path(), &spec).await
    }

    /// loadgen outside the mesh calling order's pod for `secs`; returns its JSON summary.
    async fn load(&self, order: &Pod, secs: u32) -> Result<Value> {
        pods::load(&self.cluster, &format!("{}:50052", order.ip), secs).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshed_chain_of_real_containers() {
    if !engine_available().await {
        tern_tests::missing("root and a Docker engine").must();
        return;
    }
    let mesh = Mesh::start().await.must();
    let result = scenario(&mesh).await;
    if let Err(e) = result {
        panic!("{e:#}\n\n{}", mesh.cluster.diagnostics().await);
    }
}

async fn scenario(mesh: &Mesh) -> Result<()> {
    let redis = which("redis-server").is_some();
    let redis_cmd: &[&str] = &[
        "tern-e2e/tools:latest",
        "/usr/local/bin/redis-server",
        "--port",
        "6379",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
    ];
    let pay_sidecars: &[(&str, &[&str])] = if redis { &[("redis", redis_cmd)] } else { &[] };
    let pay_hosts: &[&str] = &[];
    let mut pays = Vec::new();
    for (i, name) in ["pay-1", "pay-2"].into_iter().enumerate() {
        let app = [
            "/usr/local/bin/pay",
            "--listen",
            "0.0.0.0:50051",
            "--replica",
            name,
        ];
        let spec = PodSpec {
            name,
            last_octet: 11 + i as u8,
            service: "pay",
            service_account: "pay",
            app: &app,
            ports: "50051,6379",
            control_plane: &mesh.control_plane,
            extra_env: &["TERN_LABELS=version=v1"],
            hosts: pay_hosts,
            sidecars: if i == 0 { pay_sidecars } else { &[] },
        };
        pays.push(mesh.pod(&spec).await?);
    }
    let pay_host = format!("pay:{PAY_VIP}");
    let order_app = [
        "/usr/local/bin/order",
        "--listen",
        "0.0.0.0:50052",
        "--pay-host",
        "pay",
        "--pay-port",
        "50051",
    ];
    let order = mesh
        .pod(&PodSpec {
            name: "order",
            last_octet: 10,
            service: "order",
            service_account: "order",
            app: &order_app,
            ports: "50052",
            control_plane: &mesh.control_plane,
            // loadgen calls from outside the mesh. Nothing tells order's sidecar it calls pay:
            // it looks pay's virtual IP up when order first dials it.
            extra_env: &["TERN_INBOUND_TLS=permissive"],
            hosts: &[&pay_host],
            sidecars: &[],
        })
        .await?;
    // The first calls make order's sidecar look pay's virtual IP up; they wait for the answer.
    let first = mesh.load(&order, 1).await?;
    ensure!(
        failed(&first) == 0,
        "first calls, pay looked up on first use: {first}"
    );
    // order's sidecar must know both pay pods before the measured load starts.
    eventually(Duration::from_secs(15), || async {
        let n = order
            .metric("tern_endpoints", &[("service", "pay")])
            .await?;
        Ok((n < 2.0).then(|| format!("order's sidecar knows {n} pay endpoints")))
    })
    .await?;

    // Round robin over both pay pods, mTLS on the wire: a capture on the bridge sees TLS records
    // between the sidecars and never the gRPC method in the clear.
    let pcap = mesh.dir.path().join("mesh.pcap");
    let target = format!("{}:50052", order.ip);
    let summary = pods::load_captured(&mesh.cluster, &target, 6, &pcap).await?;
    pods::ensure_round_robin(&summary)?;
    pods::ensure_tls_only(&pcap)?;

    // A destination outside the mesh passes through untouched (a server that speaks first).
    let outside = mesh.cluster.ip(30).to_string();
    let outside_name = format!("{}-outside", mesh.cluster.network);
    mesh.cluster
        .run(
            &outside_name,
            &[
                "--network",
                &mesh.cluster.network,
                "--ip",
                &outside,
                "tern-e2e/tools:latest",
                "/usr/local/bin/tcp-greeter",
                "--listen",
                "0.0.0.0:7000",
                "--name",
                "outside",
            ],
        )
        .await?;
    let target = format!("{outside}:7000");
    let ns = order.ns();
    let tcp = eventually_ok(|| async {
        let (ok, out, err) = mesh
            .cluster
            .run_once(&[
                "--network",
                &ns,
                "tern-e2e/tools:latest",
                "/usr/local/bin/mesh-client",
                "tcp",
                "--target",
                &target,
                "--greeting",
                "--send",
                "ping\\n",
            ])
            .await?;
        ensure!(ok && out.contains("hello from outside"), "{out} {err}");
        Ok(out)
    })
    .await?;
    ensure!(tcp.contains("outside: ping"), "pass-through answer: {tcp}");

    // No loop: the admin port answers as itself (not redirected into the inbound listener), and
    // the rules exempt the proxy's user, whose own connections (to tern-control) work.
    let rules = mesh
        .cluster
        .run_once(&[
            "--network",
            &ns,
            "--cap-add",
            "NET_ADMIN",
            "--entrypoint",
            "/usr/sbin/iptables-save",
            &image("init"),
        ])
        .await?
        .1;
    ensure!(
        rules.contains("--uid-owner 2102"),
        "no owner exemption:\n{rules}"
    );
    ensure!(rules.contains("4191"), "no admin port exemption:\n{rules}");
    let metrics = http1::get(order.admin(), "/metrics").await?;
    ensure!(metrics.status == 200 && metrics.text().contains("tern_requests_total"));
    let connected = order.metric("tern_control_connected", &[]).await?;
    ensure!(
        connected == 1.0,
        "order's sidecar is not connected to tern-control"
    );

    // Redis on an opaque port of a pay pod, from order's pod, through both sidecars with mTLS.
    if redis {
        let target = pays[0].ip.to_string();
        let pong = eventually_ok(|| async {
            let (ok, out, err) = mesh
                .cluster
                .run_once(&[
                    "--network",
                    &ns,
                    "tern-e2e/tools:latest",
                    "/usr/local/bin/redis-cli",
                    "-h",
                    &target,
                    "-p",
                    "6379",
                    "PING",
                ])
                .await?;
            ensure!(ok && out.trim() == "PONG", "redis-cli: {out} {err}");
            Ok(out)
        })
        .await?;
        ensure!(pong.trim() == "PONG");
        let tls = pays[0]
            .metric("tern_tls_handshakes_total", &[("direction", "inbound")])
            .await?;
        ensure!(tls >= 2.0, "pay-1 saw {tls} inbound handshakes");
    } else {
        tern_tests::missing(
            "redis-server (Debian package redis-server) for the opaque-port check",
        )?;
    }

    // A pay pod stopped under load: its sidecar drains, callers retry; no call fails.
    let loader = mesh.load(&order, 10);
    let stopper = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let name = &pays[1].name;
        docker(&[
            "stop",
            "-t",
            "10",
            &format!("{name}-proxy"),
            &format!("{name}-app"),
        ])
        .await
    };
    let (summary, stopped) = tokio::join!(loader, stopper);
    stopped?;
    let summary = summary?;
    ensure!(
        failed(&summary) == 0,
        "calls failed while pay-2 stopped: {summary}"
    );

    // tern-control cut off the network: the sidecars keep their config and certificates.
    let control = format!("{}-control", mesh.cluster.network);
    docker(&["network", "disconnect", &mesh.cluster.network, &control]).await?;
    let summary = mesh.load(&order, 4).await?;
    ensure!(
        failed(&summary) == 0,
        "calls failed without tern-control: {summary}"
    );
    docker(&["network", "connect", &mesh.cluster.network, &control]).await?;

    job_pod(mesh).await
}

/// A Job-style pod: its app runs to the end, then `/shutdown` makes the sidecar drain and exit 0.
async fn job_pod(mesh: &Mesh) -> Result<()> {
    let order_target = format!("{}:50052", mesh.cluster.ip(10));
    let app = [
        "/usr/local/bin/loadgen",
        "--target",
        &order_target,
        "--rate",
        "5",
        "--duration",
        "2s",
    ];
    let job = mesh
        .pod(&PodSpec {
            name: "job",
            last_octet: 40,
            service: "job",
            service_account: "job",
            app: &app,
            ports: "9",
            control_plane: &mesh.control_plane,
            extra_env: &[],
            hosts: &[],
            sidecars: &[],
        })
        .await?;
    let app_name = format!("{}-app", job.name);
    let code = docker(&["wait", &app_name]).await?;
    ensure!(code == "0", "the job's app exited {code}");
    // From outside the pod (the host, on the bridge): refused.
    let mut admin = http1::Conn::connect(job.admin()).await?;
    let rsp = admin.request("POST", "/shutdown", &[], None).await?;
    ensure!(
        rsp.status == 403,
        "POST /shutdown from outside the pod answered {}",
        rsp.status
    );
    // From inside the pod's network namespace, on loopback, as a container of the pod would.
    let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &job.name]).await?;
    let script = "import urllib.request as u; print(u.urlopen(u.Request('http://127.0.0.1:4191/shutdown', method='POST')).status)";
    let out = tokio::process::Command::new("nsenter")
        .args(["-t", pid.trim(), "-n", "python3", "-c", script])
        .output()
        .await
        .context("running nsenter")?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "200",
        "POST /shutdown on the pod's loopback: {out:?}"
    );
    let proxy = format!("{}-proxy", job.name);
    let code = tokio::time::timeout(Duration::from_secs(20), docker(&["wait", &proxy]))
        .await
        .context("the job's sidecar did not exit after /shutdown")??;
    ensure!(code == "0", "the job's sidecar exited {code}");
    Ok(())
}

/// The Compose deployment of the same pods is a valid Compose file whose images are ours.
#[test]
fn compose_file_is_valid() {
    let Some(compose) = which("docker-compose") else {
        tern_tests::missing("docker-compose (Debian package docker-compose)").must();
        return;
    };
    let file = tern_tests::process::repo_root().join("manifests/compose/docker-compose.yml");
    let out = std::process::Command::new(compose)
        .arg("-f")
        .arg(&file)
        .arg("config")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for image in ["proxy", "init", "control", "demo"] {
        assert!(
            text.contains(&self::image(image)),
            "no {image} image in\n{text}"
        );
    }
    assert!(text.contains("NET_ADMIN") && text.contains("tern-pause"));
}

/// Retries `f` for a few seconds: a fresh pod's first connection may race its sidecar's routes.
async fn eventually_ok<F, Fut, T>(mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut last = None;
    for _ in 0..10 {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    match last {
        Some(e) => Err(e),
        None => bail!("no attempt made"),
    }
}
