//! The live state end to end: wake-ups, registration and its grace, ACKs,
//! the identity rules of registration, the mesh-wide authorization default,
//! and the assembled snapshot encoding.
#![allow(clippy::unwrap_used)]
use std::path::PathBuf;

use super::*;
use crate::config::parse_files;

const MESH: &str = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: pay}
spec: {ports: [{port: 50051}], identity: spiffe://cluster.local/ns/default/sa/pay}
---
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: inventory}
spec: {ports: [{port: 50053}]}
";

fn config(text: &str) -> MeshConfig {
    parse_files(&[(PathBuf::from("mesh.yaml"), text.to_owned())]).unwrap()
}

fn key(name: &str) -> ServiceKey {
    ServiceKey::new("default", name)
}

fn mesh(grace: Duration) -> Arc<Mesh> {
    Mesh::new(config(MESH), grace, Arc::new(Metrics::new().unwrap()))
}

const PAY_ID: &str = "spiffe://cluster.local/ns/default/sa/pay";

/// A workload; `pay`'s with the identity its Service declares, as its
/// client certificate would prove it.
fn workload(service: &str, address: Option<&str>) -> Workload {
    Workload {
        key: key(service),
        identity: (service == "pay").then(|| PAY_ID.to_owned()),
        address: address.map(|a| a.parse().unwrap()),
        labels: [("version".to_owned(), "v1".to_owned())].into(),
        peer: None,
        all_services: false,
        admin: None,
    }
}

fn calls(names: &[&str]) -> BTreeSet<ServiceKey> {
    names.iter().map(|n| key(n)).collect()
}

/// Whether `s` was woken since last asked; marks the wake-up seen.
fn woken(s: &mut Subscription) -> bool {
    let w = s.woken.has_changed().unwrap();
    s.woken.borrow_and_update();
    w
}

fn endpoints(m: &Mesh, s: &Subscription, service: &str) -> Vec<String> {
    let built = m.build(s.subscriber.id).unwrap();
    built
        .services
        .iter()
        .find(|v| v.name == service)
        .map(|v| v.endpoints.iter().map(|e| e.address.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn config_changes_wake_only_affected_subscribers() {
    let m = mesh(Duration::from_secs(1));
    let mut order = m
        .subscribe(workload("order", None), calls(&["pay"]))
        .unwrap();
    let mut shop = m
        .subscribe(workload("shop", None), calls(&["inventory"]))
        .unwrap();
    assert!(
        woken(&mut order),
        "a new subscriber is woken for its first snapshot"
    );
    assert!(woken(&mut shop));
    let first = m.build(order.subscriber.id).unwrap();

    let policy = "---\napiVersion: tern.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: inv}\nspec: {service: inventory, timeout: 3s}\n";
    assert_eq!(
        m.apply_config(config(&format!("{MESH}{policy}")), Instant::now()),
        Some(2)
    );
    assert!(woken(&mut shop));
    assert!(
        !woken(&mut order),
        "inventory changed; order calls only pay"
    );
    assert!(first.same_as(&m.build(order.subscriber.id).unwrap()));

    // The same config again is no change at all.
    assert_eq!(
        m.apply_config(config(&format!("{MESH}{policy}")), Instant::now()),
        None
    );
    assert!(!woken(&mut shop));
    assert_eq!(m.config_version(), 2);
}

#[tokio::test]
async fn registration_reaches_callers_and_leaves_after_the_grace() {
    let m = mesh(Duration::from_millis(50));
    let mut order = m
        .subscribe(workload("order", None), calls(&["pay"]))
        .unwrap();
    woken(&mut order);
    let pay1 = m
        .subscribe(workload("pay", Some("127.0.0.1:7001")), calls(&[]))
        .unwrap();
    assert!(woken(&mut order));
    assert_eq!(endpoints(&m, &order, "pay"), ["127.0.0.1:7001"]);

    drop(pay1);
    // Still there during the grace, so a reconnect would not churn callers.
    assert_eq!(endpoints(&m, &order, "pay"), ["127.0.0.1:7001"]);
    assert!(!woken(&mut order));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(woken(&mut order));
    assert!(endpoints(&m, &order, "pay").is_empty());
    let state = m.state();
    assert_eq!(state["subscribers"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn watch_adds_targets_and_acks_are_recorded() {
    let m = mesh(Duration::from_secs(1));
    let mut order = m
        .subscribe(workload("order", None), calls(&["pay"]))
        .unwrap();
    woken(&mut order);
    let id = order.subscriber.id;
    assert!(m.watch(id, calls(&["pay"]), 10));
    assert!(!woken(&mut order), "already watched");
    assert!(
        !m.watch(id, calls(&["inventory", "ledger"]), 2),
        "over the limit"
    );
    assert!(!woken(&mut order));
    assert!(m.watch(id, calls(&["inventory"]), 2));
    assert!(woken(&mut order));
    let names: Vec<String> = m
        .build(id)
        .unwrap()
        .services
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(names, ["inventory", "pay"]);

    let v = m.next_version();
    order.subscriber.sent(v);
    assert!(!order.subscriber.ack(v + 1), "never sent");
    assert!(order.subscriber.ack(v));
    order.subscriber.nack(v, "bad route".into());
    let state = m.state();
    let s = &state["subscribers"][0];
    assert_eq!(s["sent_version"], v);
    assert_eq!(s["acked_version"], v);
    assert_eq!(s["last_nack"]["reason"], "bad route");
    assert_eq!(
        s["watching"],
        serde_json::json!(["default/inventory", "default/pay"])
    );
}

#[tokio::test]
async fn registration_follows_the_verified_identity() {
    let m = mesh(Duration::from_secs(1));
    let mut order = m
        .subscribe(workload("order", None), calls(&["pay", "inventory"]))
        .unwrap();
    woken(&mut order);
    // A verified identity other than the one pay declares.
    let mut w = workload("pay", Some("127.0.0.1:7001"));
    w.identity = Some("spiffe://cluster.local/ns/default/sa/order".into());
    let e = m.subscribe(w.clone(), calls(&[])).err().unwrap();
    assert!(matches!(e, Refusal::NotAdmitted { .. }), "{e}");
    // No certificate: no endpoint for a Service that declares an identity...
    w.identity = None;
    let e = m.subscribe(w.clone(), calls(&[])).err().unwrap();
    assert!(matches!(e, Refusal::CertificateRequired { .. }), "{e}");
    assert!(e.to_string().contains("client certificate"), "{e}");
    // ...but it may still call others without registering one.
    w.address = None;
    assert!(m.subscribe(w, calls(&["inventory"])).is_ok());
    // And a Service without a declared identity takes plaintext registrations.
    let _inv = m
        .subscribe(workload("inventory", Some("127.0.0.1:7003")), calls(&[]))
        .unwrap();
    let _pay = m
        .subscribe(workload("pay", Some("127.0.0.1:7001")), calls(&[]))
        .unwrap();
    assert!(woken(&mut order));
    let built = m.build(order.subscriber.id).unwrap();
    let identity = |service: &str| {
        built
            .services
            .iter()
            .find(|v| v.name == service)
            .map(|v| v.endpoints[0].identity.clone())
            .unwrap()
    };
    assert_eq!(identity("pay"), PAY_ID);
    assert_eq!(identity("inventory"), "", "no identity, no mTLS expected");
}

#[tokio::test]
async fn a_verified_identity_fills_in_for_an_undeclared_one() {
    let m = mesh(Duration::from_secs(1));
    let order = m
        .subscribe(workload("order", None), calls(&["inventory"]))
        .unwrap();
    let mut w = workload("inventory", Some("127.0.0.1:7003"));
    w.identity = Some("spiffe://cluster.local/ns/default/sa/inventory".into());
    let _inv = m.subscribe(w, calls(&[])).unwrap();
    let built = m.build(order.subscriber.id).unwrap();
    assert_eq!(
        built.services[0].endpoints[0].identity,
        "spiffe://cluster.local/ns/default/sa/inventory"
    );
}

#[tokio::test]
async fn services_without_a_policy_get_the_mesh_default() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let m = Mesh::with_authz_default(config(MESH), Duration::from_secs(1), metrics, Action::Deny);
    let s = m.subscribe(workload("order", None), calls(&[])).unwrap();
    let built = m.build(s.subscriber.id).unwrap();
    assert_eq!(built.inbound.default_action, pb::Action::Deny as i32);
    assert!(built.inbound.rules.is_empty());
    assert_eq!(m.state()["authz_default"], "deny");
    let s = mesh(Duration::from_secs(1));
    let sub = s.subscribe(workload("order", None), calls(&[])).unwrap();
    let built = s.build(sub.subscriber.id).unwrap();
    assert_eq!(built.inbound.default_action, pb::Action::Allow as i32);
}

#[tokio::test]
async fn assembled_encoding_equals_the_message_encoding() {
    use prost::Message;
    let m = mesh(Duration::from_secs(1));
    let _pay = m
        .subscribe(workload("pay", Some("127.0.0.1:7001")), calls(&[]))
        .unwrap();
    let order = m
        .subscribe(
            workload("order", None),
            calls(&["pay", "inventory", "nobody"]),
        )
        .unwrap();
    let built = m.build(order.subscriber.id).unwrap();
    assert_eq!(built.services.len(), 2);
    for version in [1, 300, u64::MAX] {
        let want = built.to_snapshot(version);
        let bytes = built.encode(version);
        assert_eq!(bytes, want.encode_to_vec(), "byte for byte");
        assert_eq!(
            tern_proto::control::v1::Snapshot::decode(bytes).unwrap(),
            want
        );
    }
}

#[test]
fn a_subscriber_watching_all_services_hears_of_every_one() {
    let m = mesh(Duration::from_secs(1));
    let all = Workload {
        all_services: true,
        ..workload("order", None)
    };
    let mut sub = m.subscribe(all, calls(&[])).unwrap();
    let id = sub.subscriber.id;
    let names = |m: &Arc<Mesh>| -> Vec<String> {
        m.build(id)
            .unwrap()
            .services
            .iter()
            .map(|s| s.message.name.clone())
            .collect()
    };
    assert_eq!(names(&m), ["inventory", "pay"]);
    sub.woken.mark_unchanged();
    // A service known only from a workload that registers later is pushed too.
    let _ledger = m
        .subscribe(workload("ledger", Some("127.0.0.1:7101")), calls(&[]))
        .unwrap();
    assert!(sub.woken.has_changed().unwrap());
    assert_eq!(names(&m), ["inventory", "ledger", "pay"]);
}

#[test]
fn all_services_shows_its_namespace_and_what_it_may_call() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let grace = Duration::from_secs(1);
    let ledger = ServiceKey::new("finance", "ledger");
    let all = Workload {
        all_services: true,
        ..workload("order", None)
    };
    for (authz_default, want) in [
        (Action::Deny, vec!["default/inventory", "default/pay"]),
        (
            Action::Allow,
            vec!["default/inventory", "default/pay", "finance/ledger"],
        ),
    ] {
        let m = Mesh::with_authz_default(config(MESH), grace, Arc::clone(&metrics), authz_default);
        let w = Workload {
            key: ledger.clone(),
            ..workload("ledger", Some("127.0.0.1:7101"))
        };
        let _ledger = m.subscribe(w, calls(&[])).unwrap();
        let names = |calls: BTreeSet<ServiceKey>| -> Vec<String> {
            let sub = m.subscribe(all.clone(), calls).unwrap();
            let built = m.build(sub.subscriber.id).unwrap();
            let name = |s: &Arc<View<pb::ServiceConfig>>| {
                format!("{}/{}", s.message.namespace, s.message.name)
            };
            built.services.iter().map(name).collect()
        };
        assert_eq!(names(calls(&[])), want, "{authz_default:?}");
        // Named, another namespace's service is sent whatever the policy.
        let named = names([ledger.clone()].into());
        assert!(named.contains(&"finance/ledger".to_owned()), "{named:?}");
    }
}

#[test]
fn a_verified_identity_subscribes_only_as_the_service_it_is_admitted_to() {
    let m = mesh(Duration::from_secs(1));
    let order_id = "spiffe://cluster.local/ns/default/sa/order";
    // inventory declares no identity: it admits default's `inventory` account only.
    for address in [Some("127.0.0.1:7003"), None] {
        let mut w = workload("inventory", address);
        w.identity = Some(order_id.into());
        let e = m.subscribe(w, calls(&[])).err().unwrap();
        assert_eq!(e.reason(), "not_admitted");
        assert!(
            e.to_string()
                .contains("spiffe://cluster.local/ns/default/sa/inventory"),
            "{e}"
        );
    }
    let mut w = workload("order", Some("127.0.0.1:7002"));
    w.identity = Some(order_id.into());
    assert!(m.subscribe(w, calls(&[])).is_ok());
}

#[test]
fn an_address_held_by_another_identity_is_refused() {
    let m = mesh(Duration::from_secs(1));
    let _pay = m
        .subscribe(workload("pay", Some("127.0.0.1:7001")), calls(&[]))
        .unwrap();
    let e = m
        .subscribe(workload("inventory", Some("127.0.0.1:7001")), calls(&[]))
        .err()
        .unwrap();
    assert_eq!(e.reason(), "address_held");
    assert_eq!(e.status().code(), tonic::Code::AlreadyExists);
    assert!(e.to_string().contains(PAY_ID), "{e}");
    let state = m.state();
    assert_eq!(state["subscribers"].as_array().unwrap().len(), 1, "{state}");
}

const VIPS: &str = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: pay}
spec: {ports: [{port: 50051}], virtualIP: 10.96.0.10, dnsName: pay.example.com}
---
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: inventory}
spec: {ports: [{port: 50053}], virtualIP: 10.96.0.11}
";

#[tokio::test]
async fn lookups_answer_in_the_next_snapshot_and_add_the_service() {
    let m = Mesh::new(
        config(VIPS),
        Duration::from_secs(1),
        Arc::new(Metrics::new().unwrap()),
    );
    let mut order = m.subscribe(workload("order", None), calls(&[])).unwrap();
    woken(&mut order);
    let id = order.subscriber.id;
    let names = |m: &Mesh| -> Vec<String> {
        let b = m.build(id).unwrap();
        b.services.iter().map(|s| s.name.clone()).collect()
    };
    assert!(names(&m).is_empty());
    let q = |a: &str| Query::Address(a.parse().unwrap());
    assert!(m.lookup(id, 1, &q("10.96.0.10:50051"), 10));
    assert!(m.lookup(id, 2, &q("10.0.0.99:443"), 10));
    assert!(m.lookup(id, 3, &Query::Name("pay.example.com:80".into()), 10));
    assert!(m.lookup(
        id,
        4,
        &Query::Name("inventory.default.svc.cluster.local".into()),
        10
    ));
    assert!(m.lookup(id, 5, &Query::Name("nowhere".into()), 10));
    assert!(woken(&mut order));
    let answers = order.subscriber.take_answers();
    let got: Vec<(u64, i32, &str)> = answers
        .iter()
        .map(|a| (a.id, a.outcome, a.service.as_str()))
        .collect();
    use pb::LookupOutcome as O;
    assert_eq!(
        got,
        [
            (1, O::Found as i32, "pay.default"),
            (2, O::OutsideMesh as i32, ""),
            (3, O::Found as i32, "pay.default"),
            (4, O::Found as i32, "inventory.default"),
            (5, O::Unknown as i32, ""),
        ]
    );
    assert_eq!(names(&m), ["inventory", "pay"]);
    // The watch limit holds for lookups as for Watch.
    m.forget(id, &calls(&["inventory"]));
    assert!(!m.lookup(id, 6, &q("10.96.0.11:50053"), 1));
    assert_eq!(names(&m), ["pay"]);
    // Forgotten: the next change to pay does not concern it.
    woken(&mut order);
    m.forget(id, &calls(&["pay"]));
    assert!(woken(&mut order));
    assert!(names(&m).is_empty());
    let reg = m
        .subscribe(workload("pay", Some("10.1.0.7:4143")), calls(&[]))
        .unwrap();
    assert!(!woken(&mut order));
    // A pod IP dialed directly names its service too.
    assert!(m.lookup(id, 7, &q("10.1.0.7:8080"), 10));
    assert_eq!(order.subscriber.take_answers()[0].service, "pay.default");
    drop(reg);
}
