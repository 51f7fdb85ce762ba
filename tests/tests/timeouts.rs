//! Deadlines and per-try timeouts through the mesh.
//!
//! The deadline test calls with a bare HTTP/2 client that sends `grpc-timeout` and runs no timer
//! of its own (a tonic channel would give up by itself at the deadline and hide whether the
//! proxy did), so the DEADLINE_EXCEEDED it gets can only come from a sidecar.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tern_proto::test::v1::EchoRequest;
use tern_tests::checks::parse_grpc_timeout;
use tern_tests::demo::{pay_many, Tally};
use tern_tests::pay_mesh::PayMesh;
use tern_tests::raw_grpc;
use tern_tests::{within, EchoMesh, Must, Route, CALL_TIMEOUT};

const UNARY: &str = "/tern.test.v1.Echo/Unary";
const DEADLINE: Duration = Duration::from_millis(100);
/// The server takes this long: far past the deadline.
const SLOW_MS: u32 = 500;
/// gRPC DEADLINE_EXCEEDED.
const DEADLINE_EXCEEDED: u32 = 4;

/// Attempts both echo servers counted, asked directly.
async fn echo_calls(mesh: &EchoMesh) -> u64 {
    let mut calls = 0;
    for i in 0..mesh.apps.len() {
        calls += mesh.ok(mesh.stats(i).await).calls;
    }
    calls
}

/// A 100 ms `grpc-timeout` on a call the server answers after 500 ms: the client sidecar
/// answers DEADLINE_EXCEEDED itself at the deadline (not before, not much after), and never
/// retries, since no time is left: the servers saw exactly one attempt per call, and were told
/// no more than the 100 ms the caller gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_deadline_ends_the_call_without_retries() {
    const ROUNDS: u64 = 3;
    let mesh = EchoMesh::start("deadline", Route::Sidecars, 2).await.must();
    let client = mesh.client.as_ref().expect("a client sidecar");
    for round in 0..ROUNDS {
        let before = echo_calls(&mesh).await;
        let req = EchoRequest {
            message: format!("late {round}"),
            delay_ms: SLOW_MS,
            ..EchoRequest::default()
        };
        let started = Instant::now();
        let call = raw_grpc::unary(mesh.target, UNARY, &req, &[("grpc-timeout", "100m")]);
        let reply = mesh.ok(within(CALL_TIMEOUT, call).await.and_then(|r| r));
        let elapsed = started.elapsed();
        assert_eq!(
            reply.grpc_status(),
            Some(DEADLINE_EXCEEDED),
            "round {round}: {reply:?}\n{}",
            mesh.diagnostics()
        );
        assert!(
            reply.header("x-tern-proxy-error").is_some(),
            "round {round}: DEADLINE_EXCEEDED did not come from a sidecar: {reply:?}"
        );
        assert!(
            (DEADLINE..=Duration::from_millis(300)).contains(&elapsed),
            "round {round}: DEADLINE_EXCEEDED after {elapsed:?}, deadline {DEADLINE:?}"
        );
        // A retry would have been sent right after the first attempt was given up.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let attempts = echo_calls(&mesh).await - before;
        assert_eq!(
            attempts, 1,
            "round {round}: the servers saw {attempts} attempts"
        );
    }
    let mut told = Vec::new();
    for i in 0..mesh.apps.len() {
        let seen = mesh.ok(mesh.stats(i).await).last_grpc_timeout;
        if !seen.is_empty() {
            told.push(mesh.ok(parse_grpc_timeout(&seen)));
        }
    }
    assert!(
        !told.is_empty() && told.iter().all(|t| *t <= DEADLINE),
        "servers were told grpc-timeout {told:?}, the caller gave {DEADLINE:?}"
    );
    let counted = mesh.ok(client
        .metric(
            "tern_timeouts_total",
            &[("service", "echo"), ("kind", "deadline")],
        )
        .await);
    assert_eq!(counted, ROUNDS as f64, "client sidecar deadline timeouts");
    let retries = mesh.ok(client.metric("tern_retries_total", &[]).await);
    assert_eq!(retries, 0.0, "client sidecar retried");
}

/// `--per-try-timeout 200ms`: an attempt on pay-1, which takes 2 s, is given up after 200 ms
/// and retried on pay-2, which answers at once. Every call succeeds, well before pay-1 would
/// have answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_moves_slow_attempts_to_another_replica() {
    const CALLS: usize = 20;
    let slow: &[&str] = &["--latency", "2s"];
    let mut mesh = PayMesh::start(
        "per-try-timeout",
        &[("pay-1", slow), ("pay-2", &[])],
        &["--per-try-timeout", "200ms"],
    )
    .await
    .must();
    let tally = Tally::of(&mesh.ok(pay_many(mesh.target, CALLS, 2).await));
    let per_try = mesh.ok(mesh
        .client_metric("tern_timeouts_total", &[("kind", "per_try")])
        .await);
    let retried = mesh.ok(mesh
        .client_metric("tern_retries_total", &[("reason", "per_try_timeout")])
        .await);
    let counts = mesh.stop_pays().await;
    let counts = mesh.ok(counts);
    let seen = format!(
        "{tally:?}; per-try timeouts {per_try}, retries after one {retried}; servers {counts:?}"
    );
    eprintln!("{seen}");
    assert_eq!(tally.ok, CALLS as u64, "{seen}");
    assert_eq!(
        tally.by_replica.get("pay-2").copied(),
        Some(CALLS as u64),
        "{seen}"
    );
    assert!(per_try > 0.0, "no attempt timed out: {seen}");
    assert_eq!(
        per_try, retried,
        "every timed-out attempt was retried: {seen}"
    );
    assert!(
        tally.percentile(1.0) < Duration::from_secs(1),
        "a call waited for the slow replica: {seen}"
    );
}
