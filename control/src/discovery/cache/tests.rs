#![allow(clippy::unwrap_used)]

use serde_json::json;

use super::*;

fn svc(name: &str, ip: &str) -> Service {
    serde_json::from_value(
        json!({"metadata": {"name": name, "namespace": "default", "resourceVersion": "1"},
        "spec": {"clusterIP": ip, "ports": [{"port": 80, "targetPort": 8080}]}}),
    )
    .unwrap()
}

fn slice(name: &str, service: &str, pods: &[(&str, &str)]) -> EndpointSlice {
    let endpoints: Vec<_> = pods
        .iter()
        .map(|(ip, pod)| json!({"addresses": [ip], "targetRef": {"kind": "Pod", "namespace": "default", "name": pod}}))
        .collect();
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": "default",
        "labels": {SERVICE_NAME_LABEL: service}}, "addressType": "IPv4",
        "ports": [{"port": 8080}], "endpoints": endpoints}))
    .unwrap()
}

fn pod(name: &str, sa: &str) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": "default"},
        "spec": {"serviceAccountName": sa, "containers": [{"name": "app"}]}}))
    .unwrap()
}

fn keys(names: &[&str]) -> BTreeSet<ServiceKey> {
    names
        .iter()
        .map(|n| ServiceKey::new("default", *n))
        .collect()
}

fn listed(cache: &mut Cache) {
    for e in [Event::Init, Event::InitDone] {
        cache.on_service(e.clone());
    }
    for e in [Event::Init, Event::InitDone] {
        cache.on_slice(e.clone());
    }
    for e in [Event::Init, Event::InitDone] {
        cache.on_pod(e.clone());
    }
}

fn addrs(cache: &Cache, name: &str) -> Vec<String> {
    cache
        .discovered(&ServiceKey::new("default", name), "cluster.local")
        .map(|d| d.endpoints.iter().map(|e| e.address.to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn a_relist_finds_what_changed_while_the_watch_was_down_and_nothing_else() {
    let mut c = Store::<Service>::default();
    c.apply(Event::Init);
    c.apply(Event::InitApply(svc("pay", "10.96.0.1")));
    c.apply(Event::InitApply(svc("order", "10.96.0.2")));
    assert_eq!(c.len(), 0, "nothing until the list is whole");
    assert_eq!(c.apply(Event::InitDone).len(), 2);
    assert!(c.listed());
    assert_eq!(c.restarts, 0);
    // The watch drops; meanwhile order is deleted and inventory created.
    c.apply(Event::Init);
    c.apply(Event::InitApply(svc("pay", "10.96.0.1")));
    c.apply(Event::InitApply(svc("inventory", "10.96.0.3")));
    assert_eq!(
        c.len(),
        2,
        "the old contents serve until the relist is done"
    );
    let mut touched: Vec<(Option<String>, Option<String>)> = c
        .apply(Event::InitDone)
        .into_iter()
        .map(|(was, now)| (was.map(|o| o.name_any()), now.map(|o| o.name_any())))
        .collect();
    touched.sort();
    assert_eq!(
        touched,
        [
            (None, Some("inventory".into())),
            (Some("order".into()), None)
        ],
        "pay, listed again unchanged, is not touched"
    );
    assert_eq!(c.restarts, 1);
    assert!(c.get("default", "order").is_none());
    // An event repeating what the store has touches nothing; a delete of the unknown neither.
    assert!(c.apply(Event::Apply(svc("pay", "10.96.0.1"))).is_empty());
    assert!(c.apply(Event::Delete(svc("nope", "10.96.0.9"))).is_empty());
    assert_eq!(c.apply(Event::Delete(svc("pay", "10.96.0.1"))).len(), 1);
}

#[test]
fn slices_and_pods_touch_the_services_they_belong_to() {
    let mut c = Cache::default();
    listed(&mut c);
    assert!(c.ready());
    assert_eq!(
        c.on_service(Event::Apply(svc("pay", "10.96.0.1"))),
        keys(&["pay"])
    );
    // A slice naming a pod not seen yet: the endpoint waits for the pod.
    let s = slice(
        "pay-1",
        "pay",
        &[("10.1.0.1", "pay-a"), ("10.1.0.2", "pay-b")],
    );
    assert_eq!(c.on_slice(Event::Apply(s)), keys(&["pay"]));
    assert!(addrs(&c, "pay").is_empty());
    assert_eq!(c.on_pod(Event::Apply(pod("pay-a", "pay"))), keys(&["pay"]));
    assert_eq!(addrs(&c, "pay"), ["10.1.0.1:8080"]);
    assert!(
        c.on_pod(Event::Apply(pod("stranger", "x"))).is_empty(),
        "in no slice"
    );
    c.on_pod(Event::Apply(pod("pay-b", "pay")));
    assert_eq!(addrs(&c, "pay"), ["10.1.0.1:8080", "10.1.0.2:8080"]);
    // pay-b leaves the slice: the slice touches pay, and pay-b no longer does.
    let s = slice("pay-1", "pay", &[("10.1.0.1", "pay-a")]);
    assert_eq!(c.on_slice(Event::Apply(s)), keys(&["pay"]));
    assert_eq!(addrs(&c, "pay"), ["10.1.0.1:8080"]);
    assert!(c.on_pod(Event::Delete(pod("pay-b", "pay"))).is_empty());
    // A slice relabelled to another service touches both.
    let s = slice("pay-1", "order", &[("10.1.0.1", "pay-a")]);
    assert_eq!(c.on_slice(Event::Apply(s)), keys(&["order", "pay"]));
    assert!(addrs(&c, "pay").is_empty());
}

#[test]
fn a_relist_of_slices_that_drops_one_removes_its_endpoints() {
    let mut c = Cache::default();
    listed(&mut c);
    c.on_service(Event::Apply(svc("pay", "10.96.0.1")));
    c.on_pod(Event::Apply(pod("pay-a", "pay")));
    c.on_pod(Event::Apply(pod("pay-b", "pay")));
    c.on_slice(Event::Apply(slice(
        "pay-1",
        "pay",
        &[("10.1.0.1", "pay-a")],
    )));
    c.on_slice(Event::Apply(slice(
        "pay-2",
        "pay",
        &[("10.1.0.2", "pay-b")],
    )));
    assert_eq!(addrs(&c, "pay").len(), 2);
    c.on_slice(Event::Init);
    c.on_slice(Event::InitApply(slice(
        "pay-1",
        "pay",
        &[("10.1.0.1", "pay-a")],
    )));
    assert_eq!(c.on_slice(Event::InitDone), keys(&["pay"]));
    assert_eq!(addrs(&c, "pay"), ["10.1.0.1:8080"]);
    assert_eq!(c.slices.restarts, 1);
    assert_eq!(c.keys(), keys(&["pay"]));
}

#[test]
fn not_ready_until_every_kind_is_listed() {
    let mut c = Cache::default();
    c.on_service(Event::Init);
    c.on_service(Event::InitDone);
    c.on_slice(Event::Init);
    c.on_slice(Event::InitDone);
    assert!(!c.ready());
    c.on_pod(Event::Init);
    c.on_pod(Event::InitDone);
    assert!(c.ready());
}
