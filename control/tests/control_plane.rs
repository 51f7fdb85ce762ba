//! The real `tern-control` binary against fake sidecars: registration,
//! ACKs, config pushes, rejected config, endpoint removal, shutdown.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{endpoints, hello, ControlPlane, Sidecar};

const BIN: &str = env!("CARGO_BIN_EXE_tern-control");

const SERVICES: &str = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: pay, namespace: default}
spec:
  ports: [{name: grpc, port: 50051}]
---
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: order, namespace: default}
spec:
  ports: [{name: grpc, port: 50052}]
";

const PAY_POLICY: &str = "\
apiVersion: tern.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: pay}
spec:
  service: pay
  timeout: 2s
  retries: {maxAttempts: 3, retryableCodes: [UNAVAILABLE]}
";

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// The catch-all route's timeout of `service` in a snapshot.
fn timeout_ms(s: &tern_proto::control::v1::Snapshot, service: &str) -> Option<u64> {
    let v = s.services.iter().find(|v| v.name == service)?;
    v.traffic.as_ref()?.routes.last()?.timeout_ms
}

#[tokio::test]
async fn sidecars_get_registrations_and_config_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("mesh");
    std::fs::create_dir(&config).unwrap();
    write(&config, "services.yaml", SERVICES);
    write(&config, "pay.yaml", PAY_POLICY);
    let mut cp = ControlPlane::start(
        Path::new(BIN),
        &config,
        tmp.path(),
        &["--registration-grace", "1s"],
    )
    .await
    .unwrap();
    let wait = Duration::from_secs(5);

    // B (order) calls pay, which has no endpoints yet.
    let mut b = Sidecar::connect(cp.grpc, hello("order", "127.0.0.1:7100", "v1", &["pay"]))
        .await
        .unwrap();
    let first = b.next(wait).await.unwrap();
    assert_eq!(first.config_version, 1);
    assert_eq!(first.services.len(), 1);
    assert!(first.services[0].declared);
    assert!(endpoints(&first, "pay").is_empty());
    assert_eq!(timeout_ms(&first, "pay"), Some(2000));
    b.ack(first.version).await.unwrap();

    // A (pay) registers: it appears in B's next snapshot.
    let mut a = Sidecar::connect(cp.grpc, hello("pay", "127.0.0.1:7001", "v1", &[]))
        .await
        .unwrap();
    let a_first = a.next(wait).await.unwrap();
    assert!(a_first.services.is_empty(), "A calls nothing");
    assert_eq!(
        a_first.inbound.as_ref().unwrap().default_action,
        1,
        "ALLOW without a policy"
    );
    a.ack(a_first.version).await.unwrap();
    let with_a = b.next(wait).await.unwrap();
    assert!(with_a.version > first.version);
    assert_eq!(endpoints(&with_a, "pay"), ["127.0.0.1:7001"]);
    assert_eq!(with_a.services[0].endpoints[0].labels["version"], "v1");
    b.ack(with_a.version).await.unwrap();

    // The ACK is recorded in /state.
    let deadline = Instant::now() + wait;
    loop {
        let state = cp.state().await.unwrap();
        let subs = state["subscribers"].as_array().unwrap();
        let b_state = subs.iter().find(|s| s["service"] == "order").unwrap();
        if b_state["acked_version"] == with_a.version {
            assert_eq!(b_state["sent_version"], with_a.version);
            assert_eq!(b_state["watching"], serde_json::json!(["default/pay"]));
            let pay = state["services"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == "pay")
                .unwrap();
            assert_eq!(pay["endpoints"][0]["source"], "registered");
            break;
        }
        assert!(Instant::now() < deadline, "ACK never recorded: {state:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Editing the YAML pushes a new version to B within a second ...
    let edited = Instant::now();
    write(
        &config,
        "pay.yaml",
        &PAY_POLICY.replace("timeout: 2s", "timeout: 3s"),
    );
    let pushed = b.next(wait).await.unwrap();
    let took = edited.elapsed();
    eprintln!("YAML edit to B's new snapshot: {took:?}");
    assert!(took < Duration::from_secs(1), "push took {took:?}");
    assert_eq!(pushed.config_version, 2);
    assert_eq!(timeout_ms(&pushed, "pay"), Some(3000));
    b.ack(pushed.version).await.unwrap();
    // ... and nothing to A: pay's routing is its callers' business.
    assert!(
        a.next(Duration::from_millis(300)).await.is_err(),
        "A got a snapshot it does not need"
    );

    // An invalid document is rejected: version unchanged, error counted.
    assert_eq!(
        cp.metric("tern_control_config_errors_total").await.unwrap(),
        0.0
    );
    write(
        &config,
        "broken.yaml",
        "apiVersion: tern.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: ghost}\nspec: {service: ghost}\n",
    );
    let deadline = Instant::now() + wait;
    while cp.metric("tern_control_config_errors_total").await.unwrap() < 1.0 {
        assert!(
            Instant::now() < deadline,
            "config error never counted; log:\n{}",
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cp.metric("tern_control_config_version").await.unwrap(), 2.0);
    let state = cp.state().await.unwrap();
    assert_eq!(state["config_version"], 2);
    let err = state["last_config_error"][0].as_str().unwrap();
    assert!(
        err.contains("broken.yaml: document 1: spec.service: unknown Service `default/ghost`"),
        "{err}"
    );
    assert!(
        cp.log().contains("broken.yaml: document 1: spec.service"),
        "the error is logged"
    );
    assert!(
        b.next(Duration::from_millis(300)).await.is_err(),
        "a rejected config pushed something"
    );
    std::fs::remove_file(config.join("broken.yaml")).unwrap();

    // A NACK is recorded with its reason.
    b.nack(pushed.version, "route timeout too long")
        .await
        .unwrap();
    let deadline = Instant::now() + wait;
    while cp.metric("tern_control_nacks_total").await.unwrap() < 1.0 {
        assert!(Instant::now() < deadline, "NACK never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let state = cp.state().await.unwrap();
    let b_state = state["subscribers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "order")
        .unwrap()
        .clone();
    assert_eq!(b_state["last_nack"]["reason"], "route timeout too long");
    assert_eq!(b_state["last_nack"]["version"], pushed.version);

    // Watch adds a target lazily.
    b.watch(&["order"]).await.unwrap();
    let watched = b.next(wait).await.unwrap();
    let names: Vec<&str> = watched.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["order", "pay"]);
    assert_eq!(endpoints(&watched, "order"), ["127.0.0.1:7100"]);
    b.ack(watched.version).await.unwrap();

    // A's stream ends (killed replica): it leaves B's endpoints within 2s.
    let dropped = Instant::now();
    drop(a);
    let gone = loop {
        let s = b.next(Duration::from_secs(3)).await.unwrap();
        if endpoints(&s, "pay").is_empty() {
            break dropped.elapsed();
        }
    };
    eprintln!("A's stream dropped to its endpoint leaving B's snapshot: {gone:?}");
    assert!(
        gone < Duration::from_secs(2),
        "endpoint left after {gone:?}"
    );
    assert!(
        gone >= Duration::from_millis(900),
        "left before the grace: {gone:?}"
    );

    // The metrics and readiness endpoints answer.
    assert_eq!(cp.get("/ready").await.unwrap(), "ready\n");
    assert_eq!(cp.metric("tern_control_subscribers").await.unwrap(), 1.0);
    assert!(cp.metric("tern_control_pushes_total").await.unwrap() >= 5.0);
    assert!(
        cp.metric("tern_control_push_latency_seconds_count")
            .await
            .unwrap()
            >= 5.0
    );

    // SIGTERM: streams end with UNAVAILABLE and the process exits 0.
    let status = cp.terminate(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "{status}; log:\n{}", cp.log());
    match b.next_raw(Duration::from_secs(2)).await.unwrap() {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable),
        other => panic!("stream did not end with UNAVAILABLE: {other:?}"),
    }
}

#[tokio::test]
async fn a_bad_hello_is_refused_with_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "services.yaml", SERVICES);
    let cp = ControlPlane::start(Path::new(BIN), tmp.path(), tmp.path(), &[])
        .await
        .unwrap();
    let mut bad = Sidecar::connect(cp.grpc, hello("order", "not-an-address", "v1", &["pay"]))
        .await
        .unwrap();
    match bad.next_raw(Duration::from_secs(5)).await.unwrap() {
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(
                status.message().starts_with("Hello.address"),
                "{}",
                status.message()
            );
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

#[test]
fn an_invalid_config_at_start_fails_fast_and_check_reports_it() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "services.yaml", SERVICES);
    write(
        tmp.path(),
        "pay.yaml",
        &PAY_POLICY.replace("timeout: 2s", "timeout: 2 parsecs"),
    );
    let out = std::process::Command::new(BIN)
        .arg("--config-dir")
        .arg(tmp.path())
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pay.yaml: document 1: spec.timeout"),
        "{stderr}"
    );

    let out = std::process::Command::new(BIN)
        .arg("--config-dir")
        .arg(tmp.path())
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("pay.yaml: document 1: spec.timeout"));
    write(tmp.path(), "pay.yaml", PAY_POLICY);
    let out = std::process::Command::new(BIN)
        .arg("--config-dir")
        .arg(tmp.path())
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
