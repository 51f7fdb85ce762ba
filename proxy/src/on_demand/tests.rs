#![allow(clippy::unwrap_used)]
use std::time::Duration;

use super::*;
use crate::config::policy::PolicyFile;
use crate::metrics::Metrics;

fn on_demand(idle: Duration) -> Arc<OnDemand> {
    let metrics = Arc::new(Metrics::new().unwrap());
    let targets = Targets::new(Arc::clone(&metrics), Default::default(), "default", None);
    let config = OnDemandConfig {
        lookup_timeout: Duration::from_secs(1),
        outside_mesh_ttl: Duration::from_secs(30),
        idle_timeout: idle,
    };
    OnDemand::new(config, targets, BTreeSet::new(), &metrics.registry).unwrap()
}

/// The next request the session would send, if one is queued.
fn sent(o: &OnDemand) -> Option<Kind> {
    o.outgoing.try_lock().unwrap().try_recv().ok()
}

fn result(id: u64, outcome: pb::LookupOutcome, service: &str) -> pb::LookupResult {
    pb::LookupResult {
        id,
        outcome: outcome as i32,
        service: service.into(),
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_first_uses_share_one_lookup_and_outside_is_remembered() {
    let o = on_demand(Duration::from_secs(600));
    let dst: SocketAddr = "10.0.9.9:443".parse().unwrap();
    let (a, b) = (Arc::clone(&o), Arc::clone(&o));
    let first = tokio::spawn(async move { a.address(dst).await });
    let second = tokio::spawn(async move { b.address(dst).await });
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    let Some(Kind::Lookup(l)) = sent(&o) else {
        panic!("no lookup sent")
    };
    assert_eq!(l.address, "10.0.9.9:443");
    assert!(sent(&o).is_none(), "a second lookup for the same address");
    o.answer(&[result(l.id, pb::LookupOutcome::OutsideMesh, "")], true);
    assert_eq!(first.await.unwrap(), Outcome::OutsideMesh);
    assert_eq!(second.await.unwrap(), Outcome::OutsideMesh);
    // Another port of the same IP: known to be outside, nothing asked.
    assert_eq!(
        o.address("10.0.9.9:80".parse().unwrap()).await,
        Outcome::OutsideMesh
    );
    assert!(sent(&o).is_none());
    // Until the negative entry runs out.
    tokio::time::advance(Duration::from_secs(31)).await;
    let again = tokio::spawn({
        let o = Arc::clone(&o);
        async move { o.address(dst).await }
    });
    tokio::task::yield_now().await;
    assert!(matches!(sent(&o), Some(Kind::Lookup(_))));
    drop(again);
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_lookup_gives_up_after_the_timeout() {
    let o = on_demand(Duration::from_secs(600));
    let started = tokio::time::Instant::now();
    assert_eq!(o.name("pay.default:8080").await, Outcome::NoAnswer);
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    let Some(Kind::Lookup(l)) = sent(&o) else {
        panic!("no lookup sent")
    };
    assert_eq!(l.name, "pay.default:8080");
    // A late answer finds nobody waiting; the next use asks again.
    o.answer(&[result(l.id, pb::LookupOutcome::Unknown, "")], true);
    let o2 = Arc::clone(&o);
    let next = tokio::spawn(async move { o2.name("pay.default:8080").await });
    tokio::task::yield_now().await;
    let Some(Kind::Lookup(l2)) = sent(&o) else {
        panic!("no second lookup")
    };
    assert_ne!(l.id, l2.id);
    // A rejected snapshot answers nothing.
    o.answer(
        &[result(l2.id, pb::LookupOutcome::Found, "pay.default")],
        false,
    );
    assert_eq!(next.await.unwrap(), Outcome::NoAnswer);
}

#[tokio::test(start_paused = true)]
async fn services_found_and_unused_are_dropped_and_forgotten() {
    let o = on_demand(Duration::from_secs(10));
    let policy = PolicyFile::default().validate("t").unwrap();
    o.targets.ensure("pay", "default", &policy);
    o.answer(&[result(7, pb::LookupOutcome::Found, "pay.default")], true);
    assert_eq!(o.found(), ["pay.default"]);
    o.drop_idle();
    assert!(
        o.targets.get("pay", "default").is_some(),
        "dropped while fresh"
    );
    std::thread::sleep(Duration::from_millis(20));
    // now_ms is wall-clock based: shorten the idle time instead of waiting.
    let o = OnDemand {
        config: OnDemandConfig {
            idle_timeout: Duration::from_millis(10),
            ..o.config
        },
        ..Arc::into_inner(o).unwrap()
    };
    o.drop_idle();
    assert!(o.targets.get("pay", "default").is_none());
    assert!(o.found().is_empty());
    let Some(Kind::Forget(f)) = sent(&o) else {
        panic!("no Forget sent")
    };
    assert_eq!(f.services, ["pay.default"]);
}
