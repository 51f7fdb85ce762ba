//! Retries through the mesh: pay replicas behind inbound sidecars, calls made to the client
//! sidecar's `pay` port with the default policy (3 attempts, UNAVAILABLE retried, budget of 20%
//! plus 10/s over a 10 s window, 64 KiB replay buffer).
//!
//! The servers count what they served themselves (pay prints its counts when stopped, the echo
//! server answers `Stats`), so every retry the proxy made, and every one it did not, shows up at
//! the servers as well as in the client sidecar's `tern_retries_total`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tern_proto::test::v1::EchoRequest;
use tern_tests::demo::{pay_many, PayCounts, Tally};
use tern_tests::mesh::echo_client;
use tern_tests::pay_mesh::PayMesh;
use tern_tests::{within, EchoMesh, Must, Route, CALL_TIMEOUT};
use tokio::sync::Mutex;
use tonic::Code;

const RETRIES: &str = "tern_retries_total";
const EXHAUSTED: &str = "tern_retry_budget_exhausted_total";
/// The heavy tests of this file run one at a time: on two cores, two of them at once would
/// measure the machine rather than the proxy.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// Two values that must agree up to `share` of `expected` (and at least 1).
fn within_share(actual: f64, expected: f64, share: f64) -> bool {
    (actual - expected).abs() <= (expected * share).max(1.0)
}

fn served(counts: &[PayCounts]) -> u64 {
    counts.iter().map(|c| c.served).sum()
}

/// pay-1 fails 30% of its calls with UNAVAILABLE, trailers-only; pay-2 is healthy.
///
/// Each failure reaches the client sidecar before any of its response reached the caller, so it
/// is retried, on the other endpoint (a retry avoids the one that failed), where it succeeds:
/// exactly one retry per failure pay-1 counted, none of them visible to the caller. pay-1 sees
/// about 15% of the calls fail, under the 20% budget, so the budget never says no.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_is_retried_on_the_other_replica() {
    const CALLS: usize = 5000;
    let _serial = SERIAL.lock().await;
    let faults: &[&str] = &["--fail-rate", "0.3", "--fail-code", "UNAVAILABLE"];
    let mut mesh = PayMesh::start("retry-30pct", &[("pay-1", faults), ("pay-2", &[])], &[])
        .await
        .must();
    let started = Instant::now();
    let tally = Tally::of(&mesh.ok(pay_many(mesh.target, CALLS, 16).await));
    let took = started.elapsed();
    let unavailable = mesh.ok(mesh
        .client_metric(RETRIES, &[("reason", "UNAVAILABLE")])
        .await);
    let all_retries = mesh.ok(mesh.client_metric(RETRIES, &[]).await);
    let exhausted = mesh.ok(mesh.client_metric(EXHAUSTED, &[]).await);
    let counts = mesh.stop_pays().await;
    let counts = mesh.ok(counts);
    let seen = format!(
        "{CALLS} calls in {took:?}: {tally:?}; pay-1 {:?}, pay-2 {:?}; client sidecar: \
         retries UNAVAILABLE {unavailable}, all {all_retries}, budget exhausted {exhausted:.0}",
        counts[0], counts[1]
    );
    eprintln!("{seen}");
    assert_eq!(tally.failures(), 0, "callers saw failures: {seen}");
    assert_eq!(tally.ok, CALLS as u64, "{seen}");
    assert_eq!(counts[1].failed, 0, "{seen}");
    // The scenario itself: pay-1 did fail a fair share of its ~2,500 calls.
    assert!(
        counts[0].failed >= 300,
        "pay-1 failed too few calls: {seen}"
    );
    assert_eq!(exhausted, 0.0, "the budget refused a retry: {seen}");
    assert!(
        within_share(unavailable, counts[0].failed as f64, 0.02),
        "retries of UNAVAILABLE should equal pay-1's failures: {seen}"
    );
    // Every attempt reached a server: the calls plus the retries, nothing more.
    assert!(
        within_share(served(&counts) as f64, CALLS as f64 + all_retries, 0.02),
        "servers served {} attempts, expected {CALLS} calls + {all_retries} retries: {seen}",
        served(&counts)
    );
}

/// pay-1 fails every call the other way gRPC allows: response headers, no message, then
/// trailers with `grpc-status: 14`. Nothing of such a response has reached the caller until the
/// trailers arrive, so the sidecar holds the headers, sees the status, and retries on pay-2.
/// Passed on as soon as the headers came, every call to pay-1 would fail at the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_in_trailers_after_headers_is_retried() {
    const CALLS: usize = 200;
    let _serial = SERIAL.lock().await;
    let faults: &[&str] = &["--fail-rate", "1", "--fail-style", "headers-then-trailers"];
    let mut mesh = PayMesh::start("retry-trailers", &[("pay-1", faults), ("pay-2", &[])], &[])
        .await
        .must();
    let tally = Tally::of(&mesh.ok(pay_many(mesh.target, CALLS, 4).await));
    let retried = mesh.ok(mesh
        .client_metric(RETRIES, &[("reason", "UNAVAILABLE")])
        .await);
    let counts = mesh.stop_pays().await;
    let counts = mesh.ok(counts);
    let seen = format!(
        "{tally:?}; pay-1 {:?}, pay-2 {:?}; retries of UNAVAILABLE {retried}",
        counts[0], counts[1]
    );
    eprintln!("{seen}");
    assert_eq!(tally.ok, CALLS as u64, "callers saw failures: {seen}");
    assert_eq!(
        tally.by_replica.get("pay-2").copied(),
        Some(CALLS as u64),
        "{seen}"
    );
    assert!(counts[0].failed > 0, "pay-1 was never called: {seen}");
    assert_eq!(counts[0].failed, counts[0].served, "{seen}");
    assert_eq!(
        retried, counts[0].failed as f64,
        "one retry per failure of pay-1: {seen}"
    );
}

/// Both replicas fail everything: without a budget each call would be tried 3 times. The budget
/// lends 20% of the calls made within its 10 s window plus a floor of 10 retries a second over
/// that window (100 at once, for a run shorter than the window), so the servers see at most
/// R + 0.2·R + 10·max(T, 10 s) attempts, and callers get UNAVAILABLE without delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_bounds_the_load_when_everything_fails() {
    const CALLS: usize = 1000;
    const WINDOW_SECS: f64 = 10.0;
    let _serial = SERIAL.lock().await;
    let faults: &[&str] = &["--fail-rate", "1", "--fail-code", "UNAVAILABLE"];
    let mut mesh = PayMesh::start("retry-budget", &[("pay-1", faults), ("pay-2", faults)], &[])
        .await
        .must();
    let started = Instant::now();
    let tally = Tally::of(&mesh.ok(pay_many(mesh.target, CALLS, 16).await));
    let took = started.elapsed();
    let retries = mesh.ok(mesh.client_metric(RETRIES, &[]).await);
    let exhausted = mesh.ok(mesh.client_metric(EXHAUSTED, &[]).await);
    let counts = mesh.stop_pays().await;
    let counts = mesh.ok(counts);
    let attempts = served(&counts) as f64;
    let r = CALLS as f64;
    let bound = 1.2 * r + 10.0 * took.as_secs_f64().ceil().max(WINDOW_SECS) + 5.0;
    let seen = format!(
        "{CALLS} calls in {took:?}: {tally:?}; servers saw {attempts} attempts ({:?}); \
         retries {retries}, budget exhausted {exhausted}, bound {bound}",
        counts
    );
    eprintln!("{seen}");
    assert_eq!(tally.code(Code::Unavailable), CALLS as u64, "{seen}");
    assert!(
        attempts <= bound,
        "the budget let through too many retries: {seen}"
    );
    assert!(exhausted > 0.0, "the budget never said no: {seen}");
    assert_eq!(attempts, r + retries, "attempts = calls + retries: {seen}");
    assert!(
        tally.percentile(0.99) < Duration::from_millis(500),
        "callers waited too long for their UNAVAILABLE: {seen}"
    );
}

/// A replica answering `code` to every call: each call reaches one server once and its caller
/// gets `code`, never retried.
async fn never_retried(label: &str, code_flag: &str, code: Code) {
    const CALLS: usize = 40;
    let _serial = SERIAL.lock().await;
    let faults: &[&str] = &["--fail-rate", "1", "--fail-code", code_flag];
    let mut mesh = PayMesh::start(label, &[("pay-1", faults), ("pay-2", faults)], &[])
        .await
        .must();
    let tally = Tally::of(&mesh.ok(pay_many(mesh.target, CALLS, 4).await));
    let retries = mesh.ok(mesh.client_metric(RETRIES, &[]).await);
    let counts = mesh.stop_pays().await;
    let counts = mesh.ok(counts);
    let seen = format!("{tally:?}; servers {counts:?}; retries {retries}");
    eprintln!("{seen}");
    assert_eq!(tally.code(code), CALLS as u64, "{seen}");
    assert_eq!(served(&counts), CALLS as u64, "a call was retried: {seen}");
    assert_eq!(retries, 0.0, "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_denied_is_never_retried() {
    never_retried("retry-denied", "PERMISSION_DENIED", Code::PermissionDenied).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_argument_is_never_retried() {
    never_retried("retry-invalid", "INVALID_ARGUMENT", Code::InvalidArgument).await;
}

/// The attempts both echo servers counted, asked directly.
async fn echo_calls(mesh: &EchoMesh) -> u64 {
    let mut calls = 0;
    for i in 0..mesh.apps.len() {
        calls += mesh.ok(mesh.stats(i).await).calls;
    }
    calls
}

/// One Echo call asking the server to fail with UNAVAILABLE; returns the attempts it caused.
async fn failing_echo(mesh: &EchoMesh, payload: usize) -> u64 {
    let before = echo_calls(mesh).await;
    let mut client = echo_client(mesh.ok(mesh.channel().await));
    let req = EchoRequest {
        message: format!("{payload} bytes"),
        payload: vec![7; payload],
        fail_code: Code::Unavailable as i32,
        ..EchoRequest::default()
    };
    let result = mesh.ok(within(CALL_TIMEOUT, client.unary(req)).await);
    let status = result.expect_err("the server was told to fail");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    echo_calls(mesh).await - before
}

/// Request bodies are kept for replay up to 64 KiB: a 1 MiB request that fails is not retried
/// (the server saw it once), while the same failure with a small body is tried 3 times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_request_bodies_are_not_retried() {
    const LARGE: usize = 1024 * 1024;
    let _serial = SERIAL.lock().await;
    let mesh = EchoMesh::start("retry-large-body", Route::Sidecars, 2)
        .await
        .must();
    for round in 0..3 {
        let small = failing_echo(&mesh, 100).await;
        assert_eq!(
            small, 3,
            "round {round}: a small failed request made {small} attempts"
        );
        let large = failing_echo(&mesh, LARGE).await;
        assert_eq!(
            large, 1,
            "round {round}: a 1 MiB failed request made {large} attempts"
        );
    }
}

/// An upstream sends GOAWAY with an error code (ENHANCE_YOUR_CALM) and a last-stream-id below
/// most of the calls open on the connection. The calls above it were never processed: they are
/// retried on a new connection, even with no retry budget at all, and all succeed, each run
/// exactly once. The call at the last-stream-id was taken and then dropped unanswered: it was
/// processed, so it gets no such free retry (the budget, zero here, says no) and fails
/// UNAVAILABLE, having run once.
/// The same holds for a graceful GOAWAY (NO_ERROR) and a PROTOCOL_ERROR one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_an_error_goaway_left_unprocessed_are_retried() {
    const NO_ERROR: u32 = 0;
    const PROTOCOL_ERROR: u32 = 0x1;
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    let _serial = SERIAL.lock().await;
    for code in [ENHANCE_YOUR_CALM, PROTOCOL_ERROR, NO_ERROR] {
        goaway_case(code).await;
    }
}

async fn goaway_case(code: u32) {
    use tern_tests::goaway_server::GoAwayServer;
    use tern_tests::process::{free_addr, TestDir};
    use tern_tests::{Proxy, ProxySpec};
    const CALLS: usize = 6;
    let server = GoAwayServer::start(CALLS, 3, code).await.must();
    let dir = TestDir::new(&format!("retry-goaway-{code}")).must();
    let config = dir.path().join("no-budget.yaml");
    std::fs::write(
        &config,
        "defaults:\n  retry: { budget_percent: 0, budget_min_per_second: 0 }\n",
    )
    .unwrap();
    let target = free_addr().must();
    let spec = ProxySpec::new("client-sidecar", "client")
        .upstream("echo", target)
        .endpoints("echo", &[server.addr])
        .args(&["--config", &config.display().to_string()]);
    let sidecar = Proxy::start(dir.path(), spec).await.must();
    let client = echo_client(tern_tests::mesh::connect(target).await.must());
    let calls = (0..CALLS).map(|i| {
        let mut client = client.clone();
        tokio::spawn(async move {
            let req = EchoRequest {
                message: format!("call-{i}"),
                ..Default::default()
            };
            let reply = within(CALL_TIMEOUT, client.unary(req)).await;
            (format!("call-{i}"), reply)
        })
    });
    let mut failed = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        let (message, reply) = call.await.unwrap();
        match reply.unwrap() {
            Ok(r) => assert_eq!(r.into_inner().message, message),
            Err(status) => failed.push((message, status.code())),
        }
    }
    let seen = std::mem::take(&mut *server.seen.lock().unwrap());
    let context = format!("GOAWAY {code}: {seen:?}\n{}", sidecar.proc.diagnostics());
    assert_eq!(seen.ignored.len(), 3, "{context}");
    assert_eq!(seen.dropped.len(), 1, "{context}");
    assert_eq!(
        failed,
        [(seen.dropped[0].clone(), Code::Unavailable)],
        "only the processed, dropped call fails: {context}"
    );
    let mut served: Vec<&str> = seen.served.iter().map(|(m, _)| m.as_str()).collect();
    served.sort_unstable();
    served.dedup();
    assert_eq!(
        served.len(),
        seen.served.len(),
        "a call ran twice: {context}"
    );
    assert_eq!(served.len(), CALLS - 1, "{context}");
    for m in &seen.ignored {
        assert!(
            seen.served.iter().any(|(s, conn)| s == m && *conn > 1),
            "{m} was not retried on a new connection: {context}"
        );
    }
    assert!(!served.contains(&seen.dropped[0].as_str()), "{context}");
}
