//! `ternctl tap` and `ternctl explain` against a running mesh: tern-control with its CA, a
//! TrafficPolicy sending calls marked `x-canary: 1` to pay's v2 replica, an AuthorizationPolicy
//! letting only order call pay, two pay replicas (v1, v2) and the order and stranger callers,
//! each behind its own mTLS sidecar. Tap shows the calls the test made, only those its filter
//! matches, and no header value outside the sidecar's `--tap-headers`; explain names the canary
//! rule and the v2 subset for a marked call and the rule that denies a stranger.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;
use tern_proto::test::v1::{EchoRequest, StatsRequest};
use tern_tests::control::{pay_policy, ConfigDir};
use tern_tests::mesh::{connect, echo_client, App};
use tern_tests::mtls::{spiffe, MeshCa};
use tern_tests::process::{binary, free_addr, Proc, TestDir};
use tern_tests::{eventually, within, Must, Proxy, ProxySpec, CALL_TIMEOUT};

const SERVICES: &str = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: pay, namespace: default}
spec:
  protocol: grpc
  ports: [{name: grpc, port: 50051}]
  identity: spiffe://cluster.local/ns/default/sa/pay
---
apiVersion: tern.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: pay-callers, namespace: default}
spec:
  service: pay
  default: deny
  rules:
    - from:
        - identity: spiffe://cluster.local/ns/default/sa/order
      methods:
        - {service: tern.test.v1.Echo}
";

const CANARY: &str = "  backends:
    - {subset: {version: v1}, weight: 100}
  routes:
    - name: canary-header
      match:
        - grpc: {service: tern.test.v1.Echo}
          headers: [{name: x-canary, exact: \"1\"}]
      backends:
        - {subset: {version: v2}, weight: 100}
";

/// The header order's sidecar may show in `/tap`, and one it must never show.
const TAP_HEADERS: &str = "x-canary,content-type";
const SECRET: &str = "Bearer tap-must-not-show-this";

struct Mesh {
    order: Proxy,
    stranger: Proxy,
    pays: Vec<Proxy>,
    apps: Vec<App>,
    ca: MeshCa,
    dir: TestDir,
}

impl Mesh {
    async fn start() -> Result<Self> {
        let dir = TestDir::new("tap-explain")?;
        let config = ConfigDir::with_services(dir.path(), SERVICES)?;
        config.write("pay-traffic.yaml", &pay_policy(CANARY))?;
        let ca = MeshCa::start_with(dir.path(), &config, &[]).await?;
        let (mut apps, mut pays) = (Vec::new(), Vec::new());
        for version in ["v1", "v2"] {
            let app = App::echo_server(dir.path(), &format!("pay-{version}-app")).await?;
            let mut args = ca.subscribed_args("pay")?;
            args.extend(["--label".into(), format!("version={version}")]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let spec = ProxySpec::new(&format!("pay-{version}-sidecar"), "pay")
                .inbound(app.addr)
                .args(&args);
            pays.push(Proxy::start(dir.path(), spec).await?);
            apps.push(app);
        }
        let caller = |sa: &str, extra: &[&str]| -> Result<ProxySpec> {
            let mut args = ca.subscribed_args(sa)?;
            args.extend(extra.iter().map(ToString::to_string));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Ok(ProxySpec::new(&format!("{sa}-sidecar"), sa)
                .upstream("pay", free_addr()?)
                .args(&args))
        };
        let order = Proxy::start(
            dir.path(),
            caller("order", &["--tap-headers", TAP_HEADERS])?,
        )
        .await?;
        let stranger = Proxy::start(dir.path(), caller("stranger", &[])?).await?;
        let mesh = Self {
            order,
            stranger,
            pays,
            apps,
            ca,
            dir,
        };
        mesh.wait_for_config().await?;
        Ok(mesh)
    }

    /// Until both callers know both pay endpoints and the canary route, and both pay
    /// sidecars hold the AuthorizationPolicy.
    async fn wait_for_config(&self) -> Result<()> {
        let inbounds: Vec<String> = self.pays.iter().map(|p| p.inbound.to_string()).collect();
        for caller in [&self.order, &self.stranger] {
            eventually(Duration::from_secs(15), || async {
                let text = caller.config().await?["services"].to_string();
                let ready =
                    inbounds.iter().all(|a| text.contains(a)) && text.contains("canary-header");
                Ok((!ready).then(|| format!("{}: services {text}", caller.spec.label)))
            })
            .await?;
        }
        for pay in &self.pays {
            eventually(Duration::from_secs(15), || async {
                let config = pay.config().await?;
                let applied = &config["control_plane"]["applied"]["inbound_policy"];
                Ok((applied != "pay-callers").then(|| format!("inbound policy {applied}")))
            })
            .await?;
        }
        Ok(())
    }

    fn diagnostics(&self) -> String {
        let mut text = self.ca.control.proc.diagnostics();
        for p in [&self.order, &self.stranger].into_iter().chain(&self.pays) {
            text.push('\n');
            text.push_str(&p.proc.diagnostics());
        }
        text
    }

    fn ok<T>(&self, result: Result<T>) -> T {
        match result {
            Ok(v) => v,
            Err(e) => panic!("{e:#}\n{}", self.diagnostics()),
        }
    }
}

/// One Echo call through `upstream` carrying `headers`; the gRPC status code.
async fn unary(upstream: SocketAddr, headers: &[(&'static str, &str)]) -> Result<tonic::Code> {
    let mut client = echo_client(connect(upstream).await?);
    let mut req = tonic::Request::new(EchoRequest {
        message: "hello".into(),
        ..EchoRequest::default()
    });
    for (name, value) in headers {
        req.metadata_mut().insert(*name, value.parse()?);
    }
    Ok(match within(CALL_TIMEOUT, client.unary(req)).await? {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    })
}

async fn stats_call(upstream: SocketAddr) -> Result<()> {
    let mut client = echo_client(connect(upstream).await?);
    within(CALL_TIMEOUT, client.stats(StatsRequest::default())).await??;
    Ok(())
}

/// Starts `ternctl ARGS` and, for `tap`, waits until it says it is tapping.
async fn ternctl(dir: &Path, label: &str, args: &[&str]) -> Result<Proc> {
    let args: Vec<String> = args.iter().map(ToString::to_string).collect();
    let mut proc = Proc::spawn(dir, label, &binary("ternctl")?, &args)?;
    if args.first().map(String::as_str) == Some("tap") {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !proc.stderr().contains("tapping") {
            if proc.try_status()?.is_some() || Instant::now() > deadline {
                bail!("{label} did not start tapping\n{}", proc.diagnostics());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(proc)
}

fn as_args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Runs `ternctl ARGS` to its end; its stdout (it must exit 0).
async fn ternctl_output(dir: &Path, label: &str, args: &[&str]) -> Result<String> {
    let mut proc = ternctl(dir, label, args).await?;
    let status = proc.wait_exit(Duration::from_secs(20)).await?;
    if !status.success() {
        bail!("{label} exited {status}\n{}", proc.diagnostics());
    }
    Ok(proc.stdout())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_shows_the_calls_its_filter_matches_and_only_allowed_headers() {
    let mesh = Mesh::start().await.must();
    let dir = mesh.dir.path();
    let order_admin = mesh.order.admin.to_string();
    let v2_admin = mesh.pays[1].admin.to_string();
    const MARKED: usize = 4;
    let mut outbound = mesh.ok(ternctl(
        dir,
        "tap-order",
        &[
            "tap",
            "--admin",
            &order_admin,
            "--route",
            "tern.test.v1.Echo/Unary",
            "--status",
            "OK",
            "--output",
            "json",
            "--count",
            "4",
        ],
    )
    .await);
    // Every pay sidecar, listed by tern-control: the marked calls all land on v2.
    let control_admin = mesh.ca.control.admin.to_string();
    let mut inbound = mesh.ok(ternctl(
        dir,
        "tap-pay",
        &[
            "tap",
            "--service",
            "pay",
            "--control",
            &control_admin,
            "--direction",
            "inbound",
            "--route",
            "tern.test.v1.Echo/Unary",
            "--peer",
            "order",
            "--count",
            "4",
        ],
    )
    .await);
    let order = mesh.order.upstream("pay").must();
    let stranger = mesh.stranger.upstream("pay").must();
    let marked = [("x-canary", "1"), ("authorization", SECRET)];
    for _ in 0..MARKED {
        // Calls the filters leave out: another method, and a caller whose sidecar is not tapped.
        mesh.ok(stats_call(order).await);
        let denied = mesh.ok(unary(stranger, &marked).await);
        assert_eq!(denied, tonic::Code::PermissionDenied);
        assert_eq!(mesh.ok(unary(order, &marked).await), tonic::Code::Ok);
    }

    let status = mesh.ok(outbound.wait_exit(Duration::from_secs(20)).await);
    assert!(status.success(), "{}", outbound.diagnostics());
    let text = outbound.stdout();
    assert!(
        !text.contains("tap-must-not-show-this"),
        "a header outside the allowlist: {text}"
    );
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), MARKED, "{text}");
    for e in &events {
        assert_eq!(e["direction"], "outbound", "{e}");
        assert_eq!(e["route"], "tern.test.v1.Echo/Unary", "{e}");
        assert_eq!(e["path"], "/tern.test.v1.Echo/Unary", "{e}");
        assert_eq!(e["grpc_status"], 0, "{e}");
        assert_eq!(e["service"], "pay", "{e}");
        assert_eq!(e["peer_identity"], spiffe("pay"), "{e}");
        assert_eq!(e["tls"], "TLSv1.3", "{e}");
        assert_eq!(
            e["upstream"],
            mesh.pays[1].inbound.to_string(),
            "marked calls go to v2: {e}"
        );
        let headers = e["headers"].as_object().unwrap();
        assert_eq!(headers["x-canary"], "1", "{e}");
        assert!(
            headers
                .keys()
                .all(|k| TAP_HEADERS.split(',').any(|h| h == k)),
            "a header outside the allowlist: {e}"
        );
    }

    let status = mesh.ok(inbound.wait_exit(Duration::from_secs(20)).await);
    assert!(status.success(), "{}", inbound.diagnostics());
    let text = inbound.stdout();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), MARKED, "{text}");
    for l in &lines {
        assert!(
            l.contains(" inbound ") && l.contains("/tern.test.v1.Echo/Unary"),
            "{l}"
        );
        assert!(l.contains(&format!("peer={}", spiffe("order"))), "{l}");
        assert!(l.contains("grpc=OK") && l.contains("tls=TLSv1.3"), "{l}");
        assert!(!l.contains("tap-must-not-show-this"), "{l}");
        assert!(l.starts_with(&format!("[{v2_admin}] ")), "{l}");
    }
    // The calls were counted where they landed: every marked one on v2.
    let v2_calls = tern_tests::mesh::stats(mesh.apps[1].addr)
        .await
        .must()
        .calls;
    assert_eq!(v2_calls, MARKED as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_names_the_canary_rule_and_the_denying_rule() {
    let mesh = Mesh::start().await.must();
    let dir = mesh.dir.path();
    let order_admin = mesh.order.admin.to_string();
    let v2 = mesh.pays[1].inbound.to_string();
    let marked = [
        "explain",
        "--admin",
        &order_admin,
        "--authority",
        "pay:50051",
        "--grpc",
        "tern.test.v1.Echo/Unary",
        "--header",
        "x-canary:1",
    ];
    let text = mesh.ok(ternctl_output(dir, "explain-marked", &marked).await);
    eprintln!("{text}");
    assert!(text.contains("rule        canary-header"), "{text}");
    assert!(text.contains("backend     version=v2 weight 100"), "{text}");
    let v2_line = text.lines().find(|l| l.contains(&v2)).unwrap_or_default();
    assert!(
        v2_line.contains("version=v2")
            && v2_line.contains("ready")
            && v2_line.contains("in backend 1"),
        "{text}"
    );
    assert!(v2_line.contains(&spiffe("pay")), "{text}");
    let json_args: Vec<&str> = marked.iter().copied().chain(["--output", "json"]).collect();
    let answer: Value =
        serde_json::from_str(&mesh.ok(ternctl_output(dir, "explain-json", &json_args).await))
            .unwrap();
    assert_eq!(answer["service"], "pay", "{answer}");
    assert_eq!(answer["rule"]["name"], "canary-header", "{answer}");
    assert_eq!(answer["backends"][0]["subset"]["version"], "v2", "{answer}");
    assert_eq!(answer["backends"].as_array().unwrap().len(), 1, "{answer}");
    assert_eq!(answer["policy"]["retry"]["max_attempts"], 3, "{answer}");

    let unmarked = [
        "explain",
        "--admin",
        &order_admin,
        "--authority",
        "pay",
        "--grpc",
        "tern.test.v1.Echo/Unary",
        "--header",
        "x-canary:0",
        "--output",
        "json",
    ];
    let answer: Value =
        serde_json::from_str(&mesh.ok(ternctl_output(dir, "explain-unmarked", &unmarked).await))
            .unwrap();
    assert_eq!(answer["rule"]["name"], "default", "{answer}");
    assert_eq!(answer["backends"][0]["subset"]["version"], "v1", "{answer}");

    let pay_admin = mesh.pays[0].admin.to_string();
    let inbound = |caller: &str| -> Vec<String> {
        [
            "explain",
            "--admin",
            &pay_admin,
            "--inbound",
            "--grpc",
            "tern.test.v1.Echo/Unary",
            "--caller",
            caller,
        ]
        .map(ToString::to_string)
        .to_vec()
    };
    let stranger_args = inbound(&spiffe("stranger"));
    let text = mesh.ok(ternctl_output(dir, "explain-stranger", &as_args(&stranger_args)).await);
    eprintln!("{text}");
    assert!(text.contains("✖ DENIED"), "{text}");
    assert!(
        text.contains("AuthorizationPolicy pay-callers: default deny"),
        "{text}"
    );
    // And the sidecar does as it says.
    let stranger_up = mesh.stranger.upstream("pay").must();
    assert_eq!(
        mesh.ok(unary(stranger_up, &[]).await),
        tonic::Code::PermissionDenied
    );

    let order = spiffe("order");
    let order_args = inbound(&order);
    let text = mesh.ok(ternctl_output(dir, "explain-order", &as_args(&order_args)).await);
    assert!(text.contains("✔ ALLOWED"), "{text}");
    assert!(
        text.contains(&format!(
            "rule 1: allow identity {order} calling tern.test.v1.Echo/*"
        )),
        "{text}"
    );
}
