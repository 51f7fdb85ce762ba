//! The control plane when things go wrong: a replica's sidecar registers it and callers get it
//! at once, and a killed replica leaves every caller's endpoints once its registration grace is
//! over; a killed tern-control leaves the sidecars serving on their last snapshot, and a
//! restarted one gets them back; an invalid config change is rejected and the last good config
//! stays in force.
//!
//! The tests run one at a time, under steady load through the client sidecar's `pay` port.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tern_tests::control::pay_policy;
use tern_tests::control_mesh::{ControlMesh, Replica, Setup, POLICY};
use tern_tests::demo::Tally;
use tern_tests::load::{pay_with_headers, started_between, Load};
use tern_tests::{eventually, Must};
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());

const CONNECTED: &str = "tern_control_connected";
/// How long tern-control keeps a registration whose stream ended.
const GRACE: [&str; 2] = ["--registration-grace", "500ms"];

/// Snapshots the client sidecar applied and acknowledged.
async fn client_acks(mesh: &ControlMesh) -> anyhow::Result<f64> {
    mesh.client_metric("tern_config_updates_total", &[("result", "ack")])
        .await
}

/// pay-1 and pay-2 serve steady load; the control plane keeps a killed replica's endpoint for
/// its default registration grace (1 s). pay-3 is started: it answers calls within 1 s of its sidecar being ready. Then its
/// sidecar and app are SIGKILLed: within 2 s the client sidecar no longer lists it
/// (`/config` and `tern_endpoints{service="pay"}`), and no call started after the kill fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_replica_gets_traffic_and_leaves_when_killed() {
    let _serial = SERIAL.lock().await;
    let replicas = [Replica::new("pay-1", "v1"), Replica::new("pay-2", "v1")];
    let mut mesh = ControlMesh::start("cp-join-leave", &replicas, &Setup::default())
        .await
        .must();
    let two = mesh.replica_addrs();
    let load = mesh.ok(Load::start(mesh.target, 8).await);
    mesh.ok(load.wait_more(200, Duration::from_secs(10)).await);

    let added = mesh.add_replica(&Replica::new("pay-3", "v1")).await;
    mesh.ok(added);
    let ready_at = Instant::now();
    let pay3 = mesh.sidecars[2].inbound.to_string();
    let answered = eventually(Duration::from_secs(3), || async {
        Ok(load
            .first_answer_from("pay-3")
            .is_none()
            .then(|| "pay-3 has answered no call".to_string()))
    })
    .await;
    mesh.ok(answered);
    let first_answer = load.first_answer_from("pay-3").expect("seen above");
    let joined = mesh.ok(mesh
        .wait_client(Duration::from_secs(1), |v| {
            v.endpoints("pay").contains(&pay3)
        })
        .await);
    let gauge_joined = mesh.ok(mesh.client_endpoints_gauge().await);
    mesh.ok(load.wait_more(300, Duration::from_secs(10)).await);

    let kill_started = Instant::now();
    let killed = mesh.kill_replica(2).await;
    mesh.ok(killed);
    let killed_at = Instant::now();
    let left = mesh
        .wait_client(Duration::from_secs(3), |v| v.endpoints("pay") == two)
        .await;
    let removed_at = Instant::now();
    let left = mesh.ok(left);
    let gauge_left = mesh.ok(mesh.client_endpoints_gauge().await);
    mesh.ok(load.wait_more(500, Duration::from_secs(10)).await);
    let outcomes = mesh.ok(load.stop().await);

    let after_kill = Tally::of(&started_between(&outcomes, Some(killed_at), None));
    let after_removal = Tally::of(&started_between(&outcomes, Some(removed_at), None));
    let all = Tally::of(&outcomes);
    let seen = format!(
        "pay-3 first answered {:?} after its sidecar was ready; joined: {}, gauge {gauge_joined}\n\
         removed {:?} after the kill: {}, gauge {gauge_left}\n\
         all calls: {all:?}\nstarted after the kill: {after_kill:?}\n\
         started after the removal: {after_removal:?}",
        first_answer.saturating_duration_since(ready_at),
        joined.summary("pay"),
        removed_at - kill_started,
        left.summary("pay"),
    );
    eprintln!("{seen}");
    assert!(
        first_answer.saturating_duration_since(ready_at) <= Duration::from_secs(1),
        "pay-3 got traffic too late: {seen}"
    );
    assert_eq!(gauge_joined, 3.0, "{seen}");
    assert!(
        removed_at - kill_started <= Duration::from_secs(2),
        "the killed replica stayed too long: {seen}"
    );
    assert_eq!(gauge_left, 2.0, "{seen}");
    assert_eq!(
        after_kill.failures(),
        0,
        "calls started after the kill failed: {seen}"
    );
    assert_eq!(after_removal.by_replica.get("pay-3"), None, "{seen}");
}

/// Who reaches a restarted control plane first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum First {
    Replicas,
    Client,
}

/// The `tern_control_connected` of every sidecar, the client's last.
async fn connected(mesh: &ControlMesh) -> anyhow::Result<Vec<f64>> {
    let mut seen = Vec::new();
    for proxy in mesh.sidecars.iter().chain([&mesh.client]) {
        seen.push(proxy.metric(CONNECTED, &[]).await?);
    }
    Ok(seen)
}

/// The subscribers `/state` lists, as `service address acked N`.
fn subscribers(state: &serde_json::Value) -> Vec<String> {
    state["subscribers"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|s| {
                    format!(
                        "{} {} acked {}",
                        s["service"].as_str().unwrap_or("?"),
                        s["address"].as_str().unwrap_or("-"),
                        s["acked_version"]
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// pay-1 and pay-2 under steady load, every sidecar connected to tern-control through a relay
/// (one for the replicas' sidecars, one for the client's). tern-control is SIGKILLed and stays
/// down for 1.5 s, three times the registration grace; it comes back on the same port with the
/// same directory while both relays hold new connections, and `first` decides who gets through
/// first: the others follow as soon as the first have subscribed.
///
/// Checked: every sidecar notices the loss (`tern_control_connected` 0) and keeps its snapshot
/// (version and endpoints) while no call fails; after the restart every sidecar is connected
/// again and has applied a new snapshot, `/state` lists all three subscribers, a config change
/// written afterwards reaches the client sidecar, and no call fails then either.
async fn restart_under_load(label: &str, first: First) {
    const DOWN: Duration = Duration::from_millis(1500);
    let replicas = [Replica::new("pay-1", "v1"), Replica::new("pay-2", "v1")];
    let setup = Setup {
        control_args: &GRACE,
        relays: true,
        ..Setup::default()
    };
    let mut mesh = ControlMesh::start(label, &replicas, &setup).await.must();
    let two = mesh.replica_addrs();
    let load = mesh.ok(Load::start(mesh.target, 16).await);
    mesh.ok(load.wait_more(300, Duration::from_secs(10)).await);
    let before = mesh.ok(mesh.client_view().await);
    let acks_before = mesh.ok(client_acks(&mesh).await);

    let killed = mesh.control.kill().await;
    mesh.ok(killed);
    let killed_at = Instant::now();
    let noticed = eventually(Duration::from_secs(2), || async {
        let seen = connected(&mesh).await?;
        Ok(seen
            .iter()
            .any(|c| *c != 0.0)
            .then(|| format!("{CONNECTED} of the pay sidecars and the client: {seen:?}")))
    })
    .await;
    mesh.ok(noticed);
    let relays = mesh.relays.as_ref().expect("started with relays");
    relays.replicas.hold();
    relays.client.hold();
    tokio::time::sleep(DOWN.saturating_sub(killed_at.elapsed())).await;
    let down = mesh.ok(mesh.client_view().await);

    let restarted_at = Instant::now();
    let restarted = mesh
        .control
        .restart(mesh.dir.path(), "tern-control-restarted")
        .await;
    mesh.control = mesh.ok(restarted);
    let relays = mesh.relays.as_ref().expect("started with relays");
    // What the client sidecar had when it alone had resubscribed.
    let mut client_alone = None;
    match first {
        First::Replicas => {
            relays.replicas.open();
            let subscribed = eventually(Duration::from_secs(3), || async {
                let state = mesh.control.state().await?;
                let pays = state["subscribers"]
                    .as_array()
                    .map(|l| l.iter().filter(|s| s["service"] == "pay").count())
                    .unwrap_or(0);
                Ok((pays < 2).then(|| format!("subscribers {:?}", subscribers(&state))))
            })
            .await;
            mesh.ok(subscribed);
            relays.client.open();
        }
        First::Client => {
            relays.client.open();
            let applied = eventually(Duration::from_secs(3), || async {
                let acked = client_acks(&mesh).await?;
                Ok((acked <= acks_before).then(|| format!("client acks {acked}")))
            })
            .await;
            mesh.ok(applied);
            client_alone = Some(mesh.ok(mesh.client_view().await));
            // The replicas' sidecars are a moment later, as after any restart some are.
            tokio::time::sleep(Duration::from_millis(200)).await;
            relays.replicas.open();
        }
    }
    let back =
        eventually(Duration::from_secs(5), || async {
            let seen = connected(&mesh).await?;
            let acked = client_acks(&mesh).await?;
            Ok((seen.iter().any(|c| *c != 1.0) || acked <= acks_before).then(|| {
            format!("{CONNECTED} of the pay sidecars and the client: {seen:?}; client acks {acked}")
        }))
        })
        .await;
    let back_at = Instant::now();
    mesh.ok(back);
    let resubscribed = mesh
        .wait_client(Duration::from_secs(2), |v| v.endpoints("pay") == two)
        .await;
    let resubscribed = mesh.ok(resubscribed);
    let listed = subscribers(&mesh.ok(mesh.control.state().await));

    let after_restart = pay_policy(
        "  routes:
    - name: after-restart
      backends:
        - {subset: {version: v1}, weight: 100}
",
    );
    let pushed = mesh
        .push(
            POLICY,
            &after_restart,
            &resubscribed,
            &["after-restart", "default"],
        )
        .await;
    let (changed, _) = mesh.ok(pushed);
    mesh.ok(load.wait_more(500, Duration::from_secs(10)).await);
    let outcomes = mesh.ok(load.stop().await);

    let while_down = Tally::of(&started_between(
        &outcomes,
        Some(killed_at),
        Some(restarted_at),
    ));
    let reconnecting = Tally::of(&started_between(
        &outcomes,
        Some(restarted_at),
        Some(back_at),
    ));
    let after = Tally::of(&started_between(&outcomes, Some(back_at), None));
    let seen = format!(
        "{first:?} reconnected first\nbefore the kill: {}\nwhile down: {}\n\
         client alone after the restart: {}\nback ({:?} after the restart): {}\n\
         subscribers on /state: {listed:?}\nafter the config change: {}\n\
         calls while down: {while_down:?}\nwhile reconnecting: {reconnecting:?}\n\
         after: {after:?}",
        before.summary("pay"),
        down.summary("pay"),
        client_alone
            .as_ref()
            .map(|v| v.summary("pay"))
            .unwrap_or_else(|| "-".to_string()),
        back_at - restarted_at,
        resubscribed.summary("pay"),
        changed.summary("pay"),
    );
    eprintln!("{seen}");
    assert!(!down.connected(), "{seen}");
    assert_eq!(
        down.version(),
        before.version(),
        "the config in force changed: {seen}"
    );
    assert_eq!(
        down.endpoints("pay"),
        two,
        "the endpoints did not outlast the control plane: {seen}"
    );
    assert!(
        while_down.ok >= 200,
        "too few calls while the control plane was down: {seen}"
    );
    assert_eq!(
        while_down.failures(),
        0,
        "calls failed while the control plane was down: {seen}"
    );
    assert!(resubscribed.connected(), "{seen}");
    assert_ne!(
        resubscribed.applied_at(),
        before.applied_at(),
        "no snapshot applied after the restart: {seen}"
    );
    assert_eq!(
        listed.len(),
        3,
        "/state should list the client and both pay sidecars: {seen}"
    );
    if let Some(alone) = &client_alone {
        assert_eq!(
            alone.endpoints("pay"),
            two,
            "the client sidecar resubscribed to the restarted control plane before pay's \
             sidecars had registered again, and the snapshot it got replaced pay's endpoints \
             with what the new control plane knew so far: {seen}"
        );
    }
    assert_eq!(
        reconnecting.failures() + after.failures(),
        0,
        "calls failed after the control plane came back: {seen}"
    );
}

/// The replicas' sidecars reach the restarted control plane first, then the client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_killed_and_restarted_under_load() {
    let _serial = SERIAL.lock().await;
    restart_under_load("cp-restart", First::Replicas).await;
}

/// The client's sidecar reaches the restarted control plane 200 ms before the replicas'
/// sidecars: until they have registered again, the new control plane knows no endpoint of pay,
/// yet pay's replicas are all alive and the client sidecar knew them. Its endpoints must not
/// be emptied, and no call may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_restart_with_the_client_back_first_keeps_endpoints() {
    let _serial = SERIAL.lock().await;
    restart_under_load("cp-restart-client-first", First::Client).await;
}

/// The policy in force before the invalid changes: everything to v1.
const STABLE: &str = "  routes:
    - name: stable
      match:
        - grpc: {service: tern.demo.v1.PayService, method: Pay}
      backends:
        - {subset: {version: v1}, weight: 100}
";

/// The YAML cases the control plane must reject, each as a whole replacement of `POLICY` that
/// would send everything to v2 if it were applied: the text, and what tern-control's error must
/// say (file, document and field).
const INVALID: [(&str, &str, &[&str]); 3] = [
    (
        "unknown field",
        "  retries: {maxAttempts: 2, perTryTimout: 100ms}
  backends:
    - {subset: {version: v2}, weight: 100}
",
        &[
            "pay-traffic.yaml: document 1: spec.retries.perTryTimout",
            "unknown field",
        ],
    ),
    (
        "weights adding up to 110",
        "  routes:
    - name: broken-split
      backends:
        - {subset: {version: v1}, weight: 90}
        - {subset: {version: v2}, weight: 20}
",
        &[
            "pay-traffic.yaml: document 1: spec.routes[0].backends",
            "110",
        ],
    ),
    (
        "a YAML syntax error",
        "  routes: [
    - name: unterminated
      backends: [{subset: {version: v2}, weight: 100}
",
        &["pay-traffic.yaml: document 1: invalid YAML", "line"],
    ),
];

/// pay-1 is v1, pay-2 is v2, and a valid policy sends everything to v1. Each invalid
/// replacement of the policy file is rejected: tern-control's stderr names the file, document and
/// field, `tern_control_config_errors_total` goes up, `/state` shows the error, and the client
/// sidecar keeps the version it had, with every call still answered by pay-1. Afterwards a valid
/// change still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_documents_are_rejected_and_the_last_good_config_stays() {
    const CALLS: usize = 200;
    const ERRORS: &str = "tern_control_config_errors_total";
    let _serial = SERIAL.lock().await;
    let replicas = [Replica::new("pay-1", "v1"), Replica::new("pay-2", "v2")];
    let mesh = ControlMesh::start("cp-invalid", &replicas, &Setup::default())
        .await
        .must();
    let before = mesh.ok(mesh.client_view().await);
    let (good, _) = mesh.ok(mesh
        .push(POLICY, &pay_policy(STABLE), &before, &["stable", "default"])
        .await);
    let good_summary = good.summary("pay");

    for (case, spec, expected) in INVALID {
        let errors_before = mesh.ok(mesh.control.metric(ERRORS, &[]).await);
        mesh.ok(mesh.config.write(POLICY, &pay_policy(spec)));
        let counted = tern_tests::eventually(Duration::from_secs(3), || async {
            let errors = mesh.control.metric(ERRORS, &[]).await?;
            Ok((errors <= errors_before).then(|| format!("{ERRORS} {errors}")))
        })
        .await;
        mesh.ok(counted.map_err(|e| e.context(format!("{case}: the error was not counted"))));
        let stderr = mesh.control.proc.stderr();
        let line = stderr
            .lines()
            .find(|l| expected.iter().all(|e| l.contains(e)))
            .map(ToString::to_string);
        assert!(
            line.is_some(),
            "{case}: tern-control's stderr has no line with {expected:?}\n{}",
            mesh.control.proc.diagnostics()
        );
        let state = mesh.ok(mesh.control.state().await);
        let last_error = state["last_config_error"].to_string();
        assert!(
            last_error.contains("pay-traffic.yaml"),
            "{case}: /state last_config_error is {last_error}"
        );

        let tally = Tally::of(&mesh.ok(pay_with_headers(mesh.target, CALLS, 16, &[]).await));
        let view = mesh.ok(mesh.client_view().await);
        let seen = format!(
            "{case}: tern-control said {line:?}; client sidecar before: {good_summary}; now: {}; \
             calls: {tally:?}",
            view.summary("pay")
        );
        eprintln!("{seen}");
        assert_eq!(
            view.version(),
            good.version(),
            "the version in force changed: {seen}"
        );
        assert_eq!(view.routes("pay"), ["stable", "default"], "{seen}");
        assert_eq!(tally.failures(), 0, "{seen}");
        assert_eq!(
            tally.by_replica.get("pay-1").copied(),
            Some(CALLS as u64),
            "calls left v1: {seen}"
        );
    }

    // Fixing the file brings back the config in force (nothing to push), and the next valid
    // change is applied as usual.
    mesh.ok(mesh.config.write(POLICY, &pay_policy(STABLE)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fixed = mesh.ok(mesh.client_view().await);
    assert_eq!(
        fixed.version(),
        good.version(),
        "restoring the config in force pushed a new snapshot: {}",
        fixed.summary("pay")
    );
    let all_v2 = pay_policy(
        "  routes:
    - name: all-v2
      backends:
        - {subset: {version: v2}, weight: 100}
",
    );
    mesh.ok(mesh
        .push(POLICY, &all_v2, &fixed, &["all-v2", "default"])
        .await);
    let tally = Tally::of(&mesh.ok(pay_with_headers(mesh.target, 50, 8, &[]).await));
    assert_eq!(
        tally.by_replica.get("pay-2").copied(),
        Some(50),
        "a valid change after the errors was not applied: {tally:?}"
    );
}
