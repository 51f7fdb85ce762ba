//! The control plane end to end: `tern-control` watching a directory of mesh config, pay
//! replicas whose sidecars register them with a `version` label, and a client sidecar whose
//! `pay` endpoints, routes, retries and balancer come only from what tern-control pushes.
//! Calls go straight to the client sidecar's `pay` port; `PayReply.replica` says which replica
//! answered.
//!
//! The tests run one at a time: each starts seven or eight processes and some judge shares of
//! thousands of calls, which two at once on two cores would distort.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tern_tests::control::pay_policy;
use tern_tests::control_mesh::{ControlMesh, Replica, Setup, POLICY};
use tern_tests::demo::{Outcome, Tally};
use tern_tests::load::{pay_with_headers, started_between, Load};
use tern_tests::Must;
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());

/// A client sidecar that never ejects an endpoint, so a failing or slow replica keeps its share.
const NO_ACCRUAL: Setup = Setup {
    control_args: &[],
    client_args: &["--failure-accrual", "0"],
    relays: false,
};

const CANARY_SPLIT: &str = "  routes:
    - name: split
      match:
        - grpc: {service: tern.demo.v1.PayService, method: Pay}
      backends:
        - {subset: {version: v1}, weight: 90}
        - {subset: {version: v2}, weight: 10}
";

const ALL_V1: &str = "  routes:
    - name: stable
      match:
        - grpc: {service: tern.demo.v1.PayService, method: Pay}
      backends:
        - {subset: {version: v1}, weight: 100}
";

/// Calls per replica name among `outcomes`.
fn count(outcomes: &[Outcome], replica: &str) -> u64 {
    outcomes
        .iter()
        .filter(|o| o.result.as_deref().ok() == Some(replica))
        .count() as u64
}

/// pay-1 and pay-2 (`version: v1`) and pay-v2 (`version: v2`) under steady load. A 90/10 split
/// by version is written into the config directory mid-run: over at least 10,000 calls after
/// the client sidecar applied it, pay-v2 answers 10% ± 2%. Then the split is replaced by 100%
/// v1: once the client sidecar shows the new version, no call reaches pay-v2. No call fails at
/// any point, the two switches included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_split_by_version_and_revert_under_load() {
    const AFTER_SPLIT: u64 = 10_000;
    const AFTER_REVERT: u64 = 2_000;
    let _serial = SERIAL.lock().await;
    let replicas = [
        Replica::new("pay-1", "v1"),
        Replica::new("pay-2", "v1"),
        Replica::new("pay-v2", "v2"),
    ];
    let mesh = ControlMesh::start("cp-canary", &replicas, &Setup::default())
        .await
        .must();
    let load = mesh.ok(Load::start(mesh.target, 32).await);
    mesh.ok(load.wait_more(600, Duration::from_secs(20)).await);

    let before = mesh.ok(mesh.client_view().await);
    let (split, split_at) = mesh.ok(mesh
        .push(
            POLICY,
            &pay_policy(CANARY_SPLIT),
            &before,
            &["split", "default"],
        )
        .await);
    mesh.ok(load
        .wait_more(AFTER_SPLIT + 200, Duration::from_secs(40))
        .await);

    let (revert, revert_at) = mesh.ok(mesh
        .push(POLICY, &pay_policy(ALL_V1), &split, &["stable", "default"])
        .await);
    mesh.ok(load.wait_more(AFTER_REVERT, Duration::from_secs(20)).await);
    let outcomes = mesh.ok(load.stop().await);

    let all = Tally::of(&outcomes);
    let before_split = started_between(&outcomes, None, Some(split_at));
    let during_split = started_between(&outcomes, Some(split_at), Some(revert_at));
    let after_revert = started_between(&outcomes, Some(revert_at), None);
    let v2_share = count(&during_split, "pay-v2") as f64 / during_split.len() as f64;
    let seen = format!(
        "all calls: {all:?}\nbefore the split: {:?}\nsplit (version {:?} → {:?}): {:?}, \
         pay-v2 share {:.2}%\nafter the revert (version {:?}): {:?}",
        Tally::of(&before_split),
        before.version(),
        split.version(),
        Tally::of(&during_split),
        v2_share * 100.0,
        revert.version(),
        Tally::of(&after_revert)
    );
    eprintln!("{seen}");
    assert_eq!(all.failures(), 0, "calls failed: {seen}");
    assert_ne!(split.version(), before.version(), "{seen}");
    assert_ne!(revert.version(), split.version(), "{seen}");
    // Without a policy every replica is served, pay-v2 included.
    assert!(
        count(&before_split, "pay-v2") > 0,
        "pay-v2 was never called before the split: {seen}"
    );
    assert!(
        during_split.len() as u64 >= AFTER_SPLIT,
        "only {} calls under the split: {seen}",
        during_split.len()
    );
    assert!(
        (0.08..=0.12).contains(&v2_share),
        "pay-v2 got {:.2}% of the calls under a 90/10 split: {seen}",
        v2_share * 100.0
    );
    assert!(after_revert.len() as u64 >= AFTER_REVERT, "{seen}");
    assert_eq!(
        count(&after_revert, "pay-v2"),
        0,
        "calls reached pay-v2 after 100% v1 was applied: {seen}"
    );
}

/// A route matching the header `x-canary: 1` sends to v2; everything else goes to v1 (the
/// policy-wide backends). Calls with the header, without it and with `x-canary: 0` are answered
/// exactly as routed, counted by the replica that answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_route_sends_exactly_the_marked_calls_to_v2() {
    const MARKED: usize = 300;
    const UNMARKED: usize = 300;
    const OTHER_VALUE: usize = 100;
    let _serial = SERIAL.lock().await;
    let replicas = [
        Replica::new("pay-1", "v1"),
        Replica::new("pay-2", "v1"),
        Replica::new("pay-v2", "v2"),
    ];
    let mesh = ControlMesh::start("cp-header", &replicas, &Setup::default())
        .await
        .must();
    let before = mesh.ok(mesh.client_view().await);
    let policy = pay_policy(
        "  backends:
    - {subset: {version: v1}, weight: 100}
  routes:
    - name: canary-header
      match:
        - grpc: {service: tern.demo.v1.PayService}
          headers: [{name: x-canary, exact: \"1\"}]
      backends:
        - {subset: {version: v2}, weight: 100}
",
    );
    mesh.ok(mesh
        .push(POLICY, &policy, &before, &["canary-header", "default"])
        .await);

    let marked = mesh.ok(pay_with_headers(mesh.target, MARKED, 16, &[("x-canary", "1")]).await);
    let unmarked = mesh.ok(pay_with_headers(mesh.target, UNMARKED, 16, &[]).await);
    let other = mesh.ok(pay_with_headers(mesh.target, OTHER_VALUE, 16, &[("x-canary", "0")]).await);
    let (marked, unmarked, other) = (Tally::of(&marked), Tally::of(&unmarked), Tally::of(&other));
    let seen =
        format!("x-canary: 1 → {marked:?}\nno x-canary → {unmarked:?}\nx-canary: 0 → {other:?}");
    eprintln!("{seen}");
    for tally in [&marked, &unmarked, &other] {
        assert_eq!(tally.failures(), 0, "calls failed: {seen}");
    }
    assert_eq!(
        marked.by_replica.get("pay-v2").copied(),
        Some(MARKED as u64),
        "every call with x-canary: 1 must reach pay-v2: {seen}"
    );
    for tally in [&unmarked, &other] {
        assert_eq!(
            tally.by_replica.get("pay-v2"),
            None,
            "calls without x-canary: 1 reached pay-v2: {seen}"
        );
        // Both v1 replicas share them.
        assert!(
            tally.by_replica.contains_key("pay-1") && tally.by_replica.contains_key("pay-2"),
            "{seen}"
        );
    }
}

/// pay-1 fails every call with UNAVAILABLE, pay-2 is healthy, and the client sidecar never
/// ejects (`--failure-accrual 0`), so round robin sends pay-1 half the calls. The policy's retry
/// budget (policy-wide: the sidecar keeps one per service) covers a retry of every call. A route
/// pushed with `maxAttempts: 1` lets pay-1's failures through (about half the calls); pushed
/// again with `maxAttempts: 3`, every call succeeds on pay-2 after a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_retry_policy_changes_what_callers_see() {
    const CALLS: usize = 400;
    let _serial = SERIAL.lock().await;
    let mesh = failing_and_healthy("cp-retries").await;
    let route = |retries: &str| {
        pay_policy(&format!(
            "  retries:
    budget: {{percent: 100, minPerSecond: 100}}
  routes:
    - name: pay
      match:
        - grpc: {{service: tern.demo.v1.PayService, method: Pay}}
      retries: {retries}
"
        ))
    };
    let before = mesh.ok(mesh.client_view().await);
    let (one, _) = mesh.ok(mesh
        .push(
            POLICY,
            &route("{maxAttempts: 1}"),
            &before,
            &["pay", "default"],
        )
        .await);
    let retries_before = mesh.ok(pay_retries(&mesh).await);
    let without = Tally::of(&mesh.ok(pay_with_headers(mesh.target, CALLS, 8, &[]).await));
    let retries_without = mesh.ok(pay_retries(&mesh).await) - retries_before;

    let three = route("{maxAttempts: 3, retryableCodes: [UNAVAILABLE]}");
    mesh.ok(mesh.push(POLICY, &three, &one, &["pay", "default"]).await);
    let with = Tally::of(&mesh.ok(pay_with_headers(mesh.target, CALLS, 8, &[]).await));
    let retries_with = mesh.ok(pay_retries(&mesh).await) - retries_before - retries_without;
    let seen = format!(
        "maxAttempts 1: {without:?}, retries {retries_without}\nmaxAttempts 3: {with:?}, \
         retries {retries_with}; client sidecar: {:?}",
        mesh.ok(retry_metrics(&mesh).await)
    );
    eprintln!("{seen}");
    let failed_share = without.failures() as f64 / CALLS as f64;
    assert!(
        (0.35..=0.65).contains(&failed_share),
        "with maxAttempts 1 about half the calls should fail: {seen}"
    );
    assert_eq!(
        without.code(tonic::Code::Unavailable),
        without.failures(),
        "{seen}"
    );
    assert_eq!(retries_without, 0.0, "{seen}");
    assert_eq!(
        with.failures(),
        0,
        "with maxAttempts 3 no call may fail: {seen}"
    );
    assert_eq!(
        with.by_replica.get("pay-2").copied(),
        Some(CALLS as u64),
        "{seen}"
    );
    assert!(
        retries_with >= CALLS as f64 * 0.3,
        "the calls that reached pay-1 were not retried: {seen}"
    );
}

/// A route's own `retries.budget` is part of its retry policy like `maxAttempts` (a route's
/// retries replace the policy's). pay-1 fails every call, pay-2 is healthy: half the calls
/// need a retry, which the sidecar's default budget (20% plus 10/s) cannot cover but the
/// route's `budget: {percent: 100, minPerSecond: 100}` can. No call may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_retry_budget_is_honoured() {
    const CALLS: usize = 1000;
    let _serial = SERIAL.lock().await;
    let mesh = failing_and_healthy("cp-route-budget").await;
    let policy = pay_policy(
        "  routes:
    - name: pay
      match:
        - grpc: {service: tern.demo.v1.PayService, method: Pay}
      retries:
        maxAttempts: 3
        budget: {percent: 100, minPerSecond: 100}
",
    );
    let before = mesh.ok(mesh.client_view().await);
    let (view, _) = mesh.ok(mesh
        .push(POLICY, &policy, &before, &["pay", "default"])
        .await);
    let budgets: Vec<String> = view
        .service("pay")
        .and_then(|s| s["routes"]["rules"].as_array())
        .map(|rules| {
            rules
                .iter()
                .map(|r| {
                    let retry = &r["policy"]["retry"];
                    format!(
                        "{}: budget_percent {} budget_min_per_second {}",
                        r["name"], retry["budget_percent"], retry["budget_min_per_second"]
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let tally = Tally::of(&mesh.ok(pay_with_headers(mesh.target, CALLS, 8, &[]).await));
    let metrics = mesh.ok(retry_metrics(&mesh).await);
    let seen = format!("{tally:?}; client sidecar: {metrics:?}; its /config routes: {budgets:?}");
    eprintln!("{seen}");
    assert_eq!(
        tally.failures(),
        0,
        "calls failed although the route's retry budget (100% + 100/s) covers a retry of \
         every call; the sidecar refused retries as if the budget were its default: {seen}"
    );
}

/// pay-1 failing every call with UNAVAILABLE, pay-2 healthy, a client sidecar that never ejects.
async fn failing_and_healthy(label: &str) -> ControlMesh {
    let failing: &[&str] = &["--fail-rate", "1", "--fail-code", "UNAVAILABLE"];
    let replicas = [
        Replica::new("pay-1", "v1").flags(failing),
        Replica::new("pay-2", "v1"),
    ];
    ControlMesh::start(label, &replicas, &NO_ACCRUAL)
        .await
        .must()
}

async fn pay_retries(mesh: &ControlMesh) -> anyhow::Result<f64> {
    mesh.client_metric("tern_retries_total", &[("service", "pay")])
        .await
}

/// The client sidecar's retry samples.
async fn retry_metrics(mesh: &ControlMesh) -> anyhow::Result<Vec<String>> {
    let text = mesh.client.metrics().await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("tern_retr"))
        .map(ToString::to_string)
        .collect())
}

/// pay-1 answers after 1 s, pay-2 at once. Without a per-try timeout about half the calls wait
/// for pay-1 (and succeed slowly); a pushed `perTryTimeout: 200ms` gives up on pay-1 and retries
/// on pay-2, so every call succeeds within well under a second, answered by pay-2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_per_try_timeout_moves_calls_off_a_slow_replica() {
    const SLOW: Duration = Duration::from_secs(1);
    let _serial = SERIAL.lock().await;
    let slow: &[&str] = &["--latency", "1s"];
    let replicas = [
        Replica::new("pay-1", "v1").flags(slow),
        Replica::new("pay-2", "v1"),
    ];
    let mesh = ControlMesh::start("cp-per-try", &replicas, &NO_ACCRUAL)
        .await
        .must();
    let before_calls = Tally::of(&mesh.ok(pay_with_headers(mesh.target, 16, 16, &[]).await));

    let before = mesh.ok(mesh.client_view().await);
    let per_try = pay_policy(
        "  routes:
    - name: pay
      match:
        - grpc: {service: tern.demo.v1.PayService, method: Pay}
      timeout: 3s
      retries:
        maxAttempts: 2
        perTryTimeout: 200ms
        budget: {percent: 100, minPerSecond: 100}
",
    );
    mesh.ok(mesh
        .push(POLICY, &per_try, &before, &["pay", "default"])
        .await);
    let after_calls = Tally::of(&mesh.ok(pay_with_headers(mesh.target, 100, 16, &[]).await));
    let seen =
        format!("no per-try timeout: {before_calls:?}\nperTryTimeout 200ms: {after_calls:?}");
    eprintln!("{seen}");
    assert_eq!(before_calls.failures(), 0, "{seen}");
    assert!(
        before_calls.by_replica.get("pay-1").copied().unwrap_or(0) >= 4
            && before_calls.percentile(1.0) >= SLOW,
        "without a per-try timeout pay-1 should answer slowly: {seen}"
    );
    assert_eq!(after_calls.failures(), 0, "{seen}");
    assert_eq!(
        after_calls.by_replica.get("pay-2").copied(),
        Some(100),
        "{seen}"
    );
    assert!(
        after_calls.percentile(1.0) < SLOW - Duration::from_millis(100),
        "a call waited for pay-1 despite the per-try timeout: {seen}"
    );
}

/// pay-1 adds 50 ms to every call, pay-2 none. Round robin (no policy) splits the calls evenly;
/// after `loadBalancer: P2C_EWMA` is pushed, pay-2 answers more than 80% of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_p2c_ewma_prefers_the_fast_replica() {
    const CALLS: usize = 1000;
    let _serial = SERIAL.lock().await;
    let slow: &[&str] = &["--latency", "50ms"];
    let replicas = [
        Replica::new("pay-1", "v1").flags(slow),
        Replica::new("pay-2", "v1"),
    ];
    let mesh = ControlMesh::start("cp-p2c", &replicas, &Setup::default())
        .await
        .must();
    let round_robin = Tally::of(&mesh.ok(pay_with_headers(mesh.target, 200, 8, &[]).await));
    let before = mesh.ok(mesh.client_view().await);
    let (view, _) = mesh.ok(mesh
        .push(
            POLICY,
            &pay_policy("  loadBalancer: P2C_EWMA\n"),
            &before,
            &["default"],
        )
        .await);
    let p2c = Tally::of(&mesh.ok(pay_with_headers(mesh.target, CALLS, 8, &[]).await));
    let fast_share =
        |t: &Tally| t.by_replica.get("pay-2").copied().unwrap_or(0) as f64 / t.ok.max(1) as f64;
    let seen = format!(
        "round robin: {round_robin:?}\nP2C_EWMA ({}): {p2c:?}",
        view.summary("pay")
    );
    eprintln!("{seen}");
    assert_eq!(round_robin.failures() + p2c.failures(), 0, "{seen}");
    assert_eq!(
        view.load_balancer("pay").as_deref(),
        Some("p2c_ewma"),
        "{seen}"
    );
    assert!(
        (0.4..=0.6).contains(&fast_share(&round_robin)),
        "round robin should split evenly: {seen}"
    );
    assert!(
        fast_share(&p2c) > 0.8,
        "P2C_EWMA should send most calls to the fast replica: {seen}"
    );
}
