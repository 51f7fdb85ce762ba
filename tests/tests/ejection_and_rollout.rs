//! Endpoints that die, come back, drain and join, under load: a replica killed outright, a
//! rolling restart, and `ternctl demo` with its fault and kill scenarios.
//!
//! These tests start many processes and judge failures per thousand calls, so they run one at a
//! time: two at once on two cores would measure the machine rather than the proxy.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use serde_json::Value;
use tern_proto::demo::v1::pay_service_client::PayServiceClient;
use tern_tests::demo::{pay_request, LoadSummary, Loadgen, Outcome, Tally};
use tern_tests::mesh::connect;
use tern_tests::pay_mesh::{MeshOptions, PayMesh};
use tern_tests::process::binary;
use tern_tests::{eventually, free_addr, within, Must, Proc, TestDir, CALL_TIMEOUT};
use tokio::sync::{watch, Mutex};

static SERIAL: Mutex<()> = Mutex::const_new(());

/// At most one call in a thousand may fail.
fn assert_failures_within_a_thousandth(summary: &LoadSummary, what: &str, mesh: &PayMesh) {
    assert!(
        summary.failed * 1000 <= summary.sent,
        "{what}: {} of {} calls failed: {}\n{}",
        summary.failed,
        summary.sent,
        summary.raw,
        mesh.diagnostics()
    );
}

/// Seconds since midnight UTC now.
fn now_of_day() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() % 86_400.0)
        .unwrap_or_default()
}

/// Seconds since midnight of an access log time such as `2026-11-22T02:49:14.414Z`.
fn of_day(time: &str) -> Option<f64> {
    let clock = time.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = clock.split(':').map(|p| p.parse::<f64>().ok());
    let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
    Some(h * 3600.0 + m * 60.0 + s)
}

/// `a - b` in seconds of day, across midnight.
fn day_diff(a: f64, b: f64) -> f64 {
    (a - b + 43_200.0).rem_euclid(86_400.0) - 43_200.0
}

/// A pay call that failed, from the client sidecar's access log.
#[derive(Debug)]
struct FailedCall {
    upstream: String,
    error: String,
    /// When it started, in seconds of day.
    started: f64,
}

/// The outbound pay calls of an access log that did not end with gRPC OK.
fn failed_pay_calls(access_log: &str) -> Vec<FailedCall> {
    access_log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line.trim()).ok())
        .filter(|v| v["direction"] == "outbound" && v["service"] == "pay")
        .filter(|v| v["grpc_status"] != 0 || v["error"].is_string())
        .map(|v| FailedCall {
            upstream: v["upstream"].as_str().unwrap_or_default().to_string(),
            error: v["error"].as_str().unwrap_or_default().to_string(),
            started: of_day(v["time"].as_str().unwrap_or_default()).unwrap_or_default()
                - v["duration_ms"].as_f64().unwrap_or_default() / 1000.0,
        })
        .collect()
}

/// Says why calls failed when they were in flight on a killed endpoint.
const LOST_IN_FLIGHT: &str = "calls in flight on the killed endpoint's connection failed with \
     UNAVAILABLE (access log error \"upstream\", attempts 1): the proxy does not retry a request \
     whose connection dies before any of its response arrived";

/// loadgen → order's sidecar → order → order's sidecar → pay-1 and pay-2 sidecars, at 200
/// calls/s. pay-1's sidecar and app are SIGKILLed mid-run. New connections to the dead sidecar
/// are refused and a refused connect is retried on pay-2, so no call may fail except those in
/// flight on pay-1's connection at the instant it died, and at most one in a thousand over the
/// run. Restarted on the same ports, pay-1 is noticed and served again within the next run of a
/// few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_is_avoided_and_taken_back_after_restart() {
    const RATE: u32 = 200;
    let _serial = SERIAL.lock().await;
    let options = MeshOptions {
        order: true,
        ..MeshOptions::default()
    };
    let mut mesh = PayMesh::start_with("kill-replica", &[("pay-1", &[]), ("pay-2", &[])], &options)
        .await
        .must();
    let entry = mesh.client.inbound;
    let pay1 = mesh.sidecars[0].inbound.to_string();

    let run = Duration::from_secs(5);
    let mut first = mesh.ok(Loadgen::spawn(
        mesh.dir.path(),
        "loadgen-1",
        entry,
        RATE,
        run,
        &[],
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kill_time = now_of_day();
    let killed = mesh.kill_replica(0).await;
    mesh.ok(killed);
    let first = first.summary().await;
    let first = mesh.ok(first);
    let refused = mesh.ok(mesh
        .client_metric("tern_retries_total", &[("reason", "connect")])
        .await);
    let ejections = mesh.ok(mesh.client_metric("tern_ejections_total", &[]).await);
    let failed = failed_pay_calls(&mesh.client.proc.stdout());
    // Started before the kill (the log has whole milliseconds) and cut by it.
    let (lost_in_flight, avoidable): (Vec<_>, Vec<_>) = failed.iter().partition(|c| {
        c.upstream == pay1 && c.error == "upstream_reset" && day_diff(c.started, kill_time) < 0.02
    });
    let seen = format!(
        "loadgen: {}; calls lost in flight on pay-1 when it was killed: {}; retries after a \
         refused connect {refused}, ejections {ejections}",
        first.raw,
        lost_in_flight.len()
    );
    eprintln!("{seen}");
    assert!(
        avoidable.is_empty(),
        "pay calls failed other than those in flight on pay-1 at the kill: {avoidable:?}\n{seen}\n{}",
        mesh.diagnostics()
    );
    assert_eq!(first.failed, lost_in_flight.len() as u64, "{seen}");
    assert!(
        first.failed * 1000 <= first.sent,
        "{} of {} calls failed, more than one in a thousand; {LOST_IN_FLIGHT}: \
         {lost_in_flight:?}\n{seen}",
        first.failed,
        first.sent
    );
    assert!(
        first.replica("pay-1") > 0 && first.replica("pay-2") > first.replica("pay-1"),
        "pay-2 should have taken pay-1's share after the kill: {seen}"
    );
    assert!(
        refused + ejections > 0.0,
        "nothing shows the dead endpoint was passed over: {seen}"
    );

    let restarted = mesh.restart_replica(0).await;
    mesh.ok(restarted);
    let again = Duration::from_secs(4);
    let mut second = mesh.ok(Loadgen::spawn(
        mesh.dir.path(),
        "loadgen-2",
        entry,
        RATE,
        again,
        &[],
    ));
    let second = second.summary().await;
    let second = mesh.ok(second);
    assert_failures_within_a_thousandth(&second, "after pay-1 restarted", &mesh);
    assert!(
        second.replica("pay-1") > 0,
        "the restarted pay-1 got no calls within {again:?}: {}\n{seen}",
        second.raw
    );
}

/// Calls kept going by `workers` callers, each waiting for its answer before the next call,
/// until `stop`; every outcome is recorded as it happens.
fn keep_calling(
    target: std::net::SocketAddr,
    workers: usize,
    stop: watch::Receiver<bool>,
    outcomes: Arc<StdMutex<Vec<Outcome>>>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let client = PayServiceClient::new(connect(target).await?);
        let mut set = tokio::task::JoinSet::new();
        for w in 0..workers {
            let mut client = client.clone();
            let stop = stop.clone();
            let outcomes = outcomes.clone();
            set.spawn(async move {
                let mut i = 0;
                while !*stop.borrow() {
                    let started = Instant::now();
                    let result = match within(
                        CALL_TIMEOUT,
                        client.pay(pay_request(w * 100_000 + i)),
                    )
                    .await
                    {
                        Ok(r) => r.map(|r| r.into_inner().replica),
                        Err(_) => Err(tonic::Status::unknown("no answer within the call timeout")),
                    };
                    let elapsed = started.elapsed();
                    outcomes.lock().unwrap().push(Outcome {
                        result,
                        started,
                        elapsed,
                    });
                    i += 1;
                }
            });
        }
        while set.join_next().await.is_some() {}
        Ok(())
    })
}

/// A rolling restart. pay-3's sidecar address is among the client sidecar's endpoints before
/// pay-3 exists (the balancer passes over what it cannot connect to); pay-3 starts and gets
/// calls; then pay-1's sidecar is told to stop (SIGTERM, 5 s drain) while calls to pay-1, which
/// takes 1 s per call, are in flight. Those calls complete, later calls go to pay-2 and pay-3,
/// no call fails, and pay-1's sidecar exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_loses_no_calls() {
    const WORKERS: usize = 18;
    const MIN_IN_FLIGHT: usize = 5;
    let grace = Duration::from_secs(5);
    let _serial = SERIAL.lock().await;
    let pay3_inbound = free_addr().must();
    let spare = [pay3_inbound];
    let options = MeshOptions {
        spare_endpoints: &spare,
        sidecar_grace: grace,
        ..MeshOptions::default()
    };
    let slow: &[&str] = &["--latency", "1s"];
    let mut mesh = PayMesh::start_with("rollout", &[("pay-1", slow), ("pay-2", &[])], &options)
        .await
        .must();
    let outcomes = Arc::new(StdMutex::new(Vec::new()));
    let (stop, stopped) = watch::channel(false);
    let load = keep_calling(mesh.target, WORKERS, stopped, outcomes.clone());
    let served_by = |name: &'static str| {
        let outcomes = outcomes.clone();
        move || {
            let outcomes = outcomes.clone();
            async move {
                let n = outcomes
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|o| o.result.as_deref().ok() == Some(name))
                    .count();
                Ok((n == 0).then(|| format!("no call answered by {name} yet")))
            }
        }
    };
    mesh.ok(eventually(Duration::from_secs(5), served_by("pay-1")).await);
    let added = mesh.add_replica("pay-3", &[], pay3_inbound, grace).await;
    mesh.ok(added);
    mesh.ok(eventually(Duration::from_secs(10), served_by("pay-3")).await);
    let refused = mesh.ok(mesh
        .client_metric("tern_retries_total", &[("reason", "connect")])
        .await);
    // Callers pile up on slow pay-1: every third call goes there and takes a second.
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let terminated = Instant::now();
    mesh.ok(mesh.sidecars[0].proc.signal(Signal::SIGTERM));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(true).unwrap();
    mesh.ok(within(CALL_TIMEOUT + Duration::from_secs(2), load)
        .await
        .and_then(|r| r.map_err(Into::into))
        .and_then(|r| r));
    let exit = mesh.sidecars[0]
        .proc
        .wait_exit(grace + Duration::from_secs(2))
        .await;
    let exit = mesh.ok(exit);

    let outcomes = outcomes.lock().unwrap().clone();
    let tally = Tally::of(&outcomes);
    let pay1 = |o: &&Outcome| o.result.as_deref().ok() == Some("pay-1");
    let in_flight = outcomes
        .iter()
        .filter(pay1)
        .filter(|o| o.started < terminated && o.started + o.elapsed > terminated)
        .count();
    // A call made right at the signal may still reach pay-1 before its sidecar stops accepting.
    let late = outcomes
        .iter()
        .filter(pay1)
        .filter(|o| o.started > terminated + Duration::from_millis(200))
        .count();
    let seen = format!(
        "{tally:?}; {in_flight} calls at pay-1 when its sidecar was told to stop, {late} \
         started later; retries after a refused connect before pay-3 was up {refused}"
    );
    eprintln!("{seen}");
    assert_eq!(
        tally.failures(),
        0,
        "calls failed during the rollout: {seen}\n{}",
        mesh.diagnostics()
    );
    assert!(
        in_flight >= MIN_IN_FLIGHT,
        "the scenario needs calls in flight at pay-1: {seen}"
    );
    assert_eq!(
        late, 0,
        "pay-1 got new calls after its sidecar was told to stop: {seen}"
    );
    // pay-3 was an endpoint before it existed: calls to it were refused and went elsewhere.
    assert!(
        refused > 0.0,
        "pay-3 was never tried before it started: {seen}"
    );
    assert_eq!(
        exit.code(),
        Some(0),
        "pay-1's sidecar exited with {exit}: {seen}"
    );
}

/// `ternctl demo --duration 20 --faults --kill`: pay-1 fails 30% of its calls and is killed and
/// restarted mid-run; the demo's own verdict (exit 0) and its summary say no call failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ternctl_demo_with_faults_and_kill_loses_no_calls() {
    let _serial = SERIAL.lock().await;
    let dir = TestDir::new("demo").must();
    let args: Vec<String> = [
        "demo",
        "--duration",
        "20",
        "--faults",
        "--kill",
        "--log-dir",
    ]
    .iter()
    .map(ToString::to_string)
    .chain([dir.path().join("logs").display().to_string()])
    .collect();
    // Without CARGO in its environment ternctl runs the binaries beside it instead of building.
    let program = binary("ternctl").must();
    let mut demo =
        Proc::spawn_with_env_removed(dir.path(), "ternctl", &program, &args, &[], &["CARGO"])
            .must();
    let status = demo.wait_exit(Duration::from_secs(60)).await.must();
    let stdout = demo.stdout();
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    let summary: Value = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "last line is not JSON ({e}): {last:?}\n{}",
            demo.diagnostics()
        )
    });
    eprintln!("{summary}");
    let access_log = dir.path().join("logs").join("order-proxy.access.log");
    let failed = failed_pay_calls(&std::fs::read_to_string(access_log).unwrap_or_default());
    assert_eq!(
        summary["failed"],
        0,
        "{summary}\nfailed pay calls in order-proxy's access log: {failed:?}\n(when they are \
         errors \"upstream\" on pay-1 at the kill: {LOST_IN_FLIGHT})\n{}",
        demo.diagnostics()
    );
    assert!(summary["calls"].as_u64().unwrap_or(0) > 0, "{summary}");
    assert!(
        status.success(),
        "ternctl demo exited with {status}: {summary}"
    );
}
