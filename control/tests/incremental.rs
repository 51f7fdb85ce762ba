//! Incremental snapshots against the real `tern-control` binary: a change to
//! one service sends its watchers that service alone (and the others
//! nothing), a sidecar that does not announce support keeps getting complete
//! snapshots, and ACK/NACK keep being recorded per sidecar in `/state`.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{endpoints, hello, ControlPlane, Sidecar};

const BIN: &str = env!("CARGO_BIN_EXE_tern-control");

const SERVICES: &str = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: a}
spec: {ports: [{port: 50051}]}
---
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: b}
spec: {ports: [{port: 50052}]}
";

fn a_endpoints(addr: &str) -> String {
    format!(
        "apiVersion: tern.dev/v1alpha1\nkind: Endpoints\nmetadata: {{name: a}}\nspec:\n  \
         service: a\n  endpoints: [{{address: \"{addr}\"}}]\n"
    )
}

#[tokio::test]
async fn a_change_to_one_service_sends_only_that_service_to_its_watchers() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("mesh");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(config.join("services.yaml"), SERVICES).unwrap();
    std::fs::write(config.join("a.yaml"), a_endpoints("10.0.0.1:8080")).unwrap();
    let cp = ControlPlane::start(Path::new(BIN), &config, tmp.path(), &[])
        .await
        .unwrap();
    let wait = Duration::from_secs(5);
    let quiet = Duration::from_millis(700);

    let incremental = |service: &str, calls: &[&str]| {
        let mut h = hello(service, "", "v1", calls);
        h.incremental = true;
        h
    };
    // x watches a and b (incremental), y only b (incremental), z a and b (old style).
    let mut x = Sidecar::connect(cp.grpc, incremental("x", &["a", "b"]))
        .await
        .unwrap();
    let mut y = Sidecar::connect(cp.grpc, incremental("y", &["b"]))
        .await
        .unwrap();
    let mut z = Sidecar::connect(cp.grpc, hello("z", "", "v1", &["a", "b"]))
        .await
        .unwrap();
    // Every stream starts complete.
    for s in [&mut x, &mut z] {
        let first = s.next(wait).await.unwrap();
        assert!(!first.incremental);
        assert_eq!(first.services.len(), 2);
        assert!(first.inbound.is_some());
        s.ack(first.version).await.unwrap();
    }
    let y_first = y.next(wait).await.unwrap();
    assert_eq!(y_first.services.len(), 1);
    y.ack(y_first.version).await.unwrap();

    // a's endpoint moves: x gets a alone; y nothing; z everything.
    std::fs::write(config.join("a.yaml"), a_endpoints("10.0.0.2:8080")).unwrap();
    let delta = x.next(wait).await.unwrap();
    assert!(delta.incremental, "{delta:?}");
    assert_eq!(delta.services.len(), 1, "{delta:?}");
    assert_eq!(endpoints(&delta, "a"), ["10.0.0.2:8080"]);
    assert!(
        delta.removed.is_empty() && delta.inbound.is_none(),
        "{delta:?}"
    );
    let full = z.next(wait).await.unwrap();
    assert!(!full.incremental);
    assert_eq!(full.services.len(), 2);
    assert_eq!(endpoints(&full, "a"), ["10.0.0.2:8080"]);
    assert!(full.inbound.is_some());
    assert!(y.next(quiet).await.is_err(), "y does not watch a");
    // The NACK of x's update and z's ACK are recorded per sidecar.
    x.nack(delta.version, "service a.default: unknown load balancer")
        .await
        .unwrap();
    z.ack(full.version).await.unwrap();

    // a goes away: x is told to forget it.
    std::fs::write(
        config.join("services.yaml"),
        SERVICES.split("---").nth(1).unwrap(),
    )
    .unwrap();
    std::fs::remove_file(config.join("a.yaml")).unwrap();
    let gone = x.next(wait).await.unwrap();
    assert!(gone.incremental);
    assert!(gone.services.is_empty(), "{gone:?}");
    assert_eq!(gone.removed, ["a.default"]);
    x.ack(gone.version).await.unwrap();
    let full = z.next(wait).await.unwrap();
    assert_eq!(full.services.len(), 1);
    assert!(y.next(quiet).await.is_err(), "y does not watch a");

    let deadline = Instant::now() + wait;
    loop {
        let state = cp.state().await.unwrap();
        let subs = state["subscribers"].as_array().unwrap();
        let x_state = subs.iter().find(|s| s["service"] == "x").unwrap();
        if x_state["acked_version"] == gone.version {
            assert_eq!(x_state["nacks"], 1, "{x_state}");
            assert_eq!(x_state["last_nack"]["version"], delta.version, "{x_state}");
            let z_state = subs.iter().find(|s| s["service"] == "z").unwrap();
            assert_eq!(z_state["nacks"], 0, "{z_state}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "x's ACK never recorded: {state:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
