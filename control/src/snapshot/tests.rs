//! Snapshot selection: what a view holds, and which subscribers a change reaches.
#![allow(clippy::unwrap_used)]
use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::config::parse_files;
use crate::registry::Registration;

const MESH: &str = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: pay}
spec: {ports: [{port: 50051}], identity: spiffe://cluster.local/ns/default/sa/pay}
---
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: inventory}
spec: {ports: [{port: 50053}, {port: 6379, protocol: opaque}], virtualIP: 10.96.0.53}
---
apiVersion: tern.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: inventory}
spec: {service: inventory, timeout: 1s}
---
apiVersion: tern.dev/v1alpha1
kind: Endpoints
metadata: {name: pay-static}
spec:
  service: pay
  endpoints:
    - {address: 10.0.0.2:4143, labels: {version: v1}}
    - {address: 10.0.0.1:4143, labels: {version: static}}
";

fn config(text: &str) -> MeshConfig {
    parse_files(&[(PathBuf::from("mesh.yaml"), text.to_owned())]).unwrap()
}

fn key(name: &str) -> ServiceKey {
    ServiceKey::new("default", name)
}

fn register(r: &mut Registry, name: &str, addr: &str, version: &str) -> bool {
    r.register(
        &key(name),
        Registration {
            address: addr.parse().unwrap(),
            labels: [("version".to_owned(), version.to_owned())].into(),
            identity: None,
        },
    )
    .unwrap()
}

#[test]
fn a_view_merges_static_and_registered_endpoints() {
    let c = config(MESH);
    let mut r = Registry::new(Duration::from_secs(1));
    register(&mut r, "pay", "10.0.0.1:4143", "v2");
    let v = service_view(&key("pay"), &c, &r).unwrap();
    assert!(v.declared);
    assert_eq!(v.protocol, pb::Protocol::Grpc as i32);
    let inventory = service_view(&key("inventory"), &c, &r).unwrap();
    let ports: Vec<(u32, bool)> = inventory.ports.iter().map(|p| (p.port, p.opaque)).collect();
    assert_eq!(ports, [(50053, false), (6379, true)]);
    assert_eq!(inventory.virtual_ip, "10.96.0.53");
    let eps: Vec<(&str, &str, &str)> = v
        .endpoints
        .iter()
        .map(|e| {
            (
                e.address.as_str(),
                e.labels["version"].as_str(),
                e.identity.as_str(),
            )
        })
        .collect();
    // Sorted by address; the live registration wins over the static entry,
    // and the Service's declared identity is what callers must verify.
    let id = "spiffe://cluster.local/ns/default/sa/pay";
    assert_eq!(
        eps,
        [("10.0.0.1:4143", "v2", id), ("10.0.0.2:4143", "v1", id)]
    );
    // No TrafficPolicy: one catch-all route, everything left to the sidecar.
    let traffic = v.traffic.unwrap();
    assert_eq!(traffic.routes.len(), 1);
    assert_eq!(traffic.routes[0].name, "default");
    assert!(traffic.routes[0].retry.is_none());
}

#[test]
fn services_nobody_declares_appear_only_with_endpoints() {
    let c = config(MESH);
    let mut r = Registry::new(Duration::from_secs(1));
    assert!(service_view(&key("ledger"), &c, &r).is_none());
    register(&mut r, "ledger", "10.0.0.9:4143", "v1");
    let v = service_view(&key("ledger"), &c, &r).unwrap();
    assert!(!v.declared);
    assert_eq!(v.endpoints.len(), 1);
    assert_eq!(v.endpoints[0].identity, "");
}

#[test]
fn traffic_policy_reaches_the_view() {
    let c = config(MESH);
    let r = Registry::new(Duration::from_secs(1));
    let v = service_view(&key("inventory"), &c, &r).unwrap();
    let t = v.traffic.unwrap();
    assert_eq!(t.name, "inventory");
    assert_eq!(t.routes.last().unwrap().timeout_ms, Some(1000));
}

#[test]
fn a_change_reaches_only_the_subscribers_it_affects() {
    let mut c = config(MESH);
    let mut r = Registry::new(Duration::from_secs(1));
    let mut views = Views::new();
    let mut inbound = InboundViews::new();
    refresh_all(&mut views, &c, &r);
    refresh_inbound(&mut inbound, &c);
    let pay_before = Arc::clone(&views[&key("pay")]);

    let mut interest = Interest::default();
    interest.watch(1, &key("pay")); // order calls pay
    interest.watch(2, &key("inventory")); // shop calls inventory
    interest.watch(3, &key("pay"));
    interest.watch(3, &key("inventory")); // gateway calls both
    interest.own(4, &key("pay")); // a pay replica

    // inventory's policy changes: pay's view is untouched (same Arc).
    let mesh = MESH.replace("timeout: 1s", "timeout: 2s");
    c = config(&mesh);
    let changed = refresh_all(&mut views, &c, &r);
    assert_eq!(changed, BTreeSet::from([key("inventory")]));
    assert!(Arc::ptr_eq(&pay_before, &views[&key("pay")]));
    let none = BTreeSet::new();
    assert_eq!(interest.affected(&changed, &none), BTreeSet::from([2, 3]));

    // A pay replica registers: pay's callers, not inventory's.
    assert!(register(&mut r, "pay", "10.0.0.7:4143", "v1"));
    let changed = refresh(&mut views, [&key("pay")], &c, &r);
    assert_eq!(interest.affected(&changed, &none), BTreeSet::from([1, 3]));

    // pay's AuthorizationPolicy appears: only pay's own workloads care.
    let authz = "---\napiVersion: tern.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: pay}\nspec: {service: pay, rules: [{from: [{namespace: default}]}]}\n";
    c = config(&format!("{mesh}{authz}"));
    assert!(refresh_all(&mut views, &c, &r).is_empty());
    let policies = refresh_inbound(&mut inbound, &c);
    assert_eq!(policies, BTreeSet::from([key("pay")]));
    assert_eq!(
        interest.affected(&BTreeSet::new(), &policies),
        BTreeSet::from([4])
    );

    // Nothing changed: nobody is woken.
    assert!(refresh_all(&mut views, &c, &r).is_empty());
    assert!(refresh_inbound(&mut inbound, &c).is_empty());

    // Forgotten subscribers are not woken any more.
    interest.forget(3, [&key("pay"), &key("inventory")], &key("gateway"));
    let all = BTreeSet::from([key("pay"), key("inventory")]);
    assert_eq!(interest.affected(&all, &none), BTreeSet::from([1, 2]));
}

#[test]
fn inbound_policy_defaults_to_the_mesh_default() {
    let c = config(MESH);
    let p = inbound_policy(&c, &key("pay"), crate::config::Action::Allow);
    assert_eq!(p.default_action, pb::Action::Allow as i32);
    assert!(p.rules.is_empty());
    let p = inbound_policy(&c, &key("pay"), crate::config::Action::Deny);
    assert_eq!(p.default_action, pb::Action::Deny as i32);
    assert_eq!(p, no_policy(crate::config::Action::Deny));
    let c = config(&format!(
        "{MESH}---\napiVersion: tern.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: pay}}\nspec:\n  service: pay\n  rules: [{{from: [{{identity: spiffe://cluster.local/ns/default/sa/order}}], methods: [{{service: tern.demo.v1.PayService}}]}}]\n"
    ));
    let p = inbound_policy(&c, &key("pay"), crate::config::Action::Allow);
    assert_eq!(p.name, "pay");
    assert_eq!(p.default_action, pb::Action::Deny as i32);
    let rule = &p.rules[0];
    assert_eq!(
        rule.from[0].kind,
        Some(pb::identity_match::Kind::Exact(
            "spiffe://cluster.local/ns/default/sa/order".into()
        ))
    );
    assert_eq!(rule.methods[0].service, "tern.demo.v1.PayService");
    assert_eq!(rule.methods[0].method, "");
}

#[test]
fn targets_resolve_against_the_callers_namespace() {
    assert_eq!(
        target("pay", "shop").unwrap(),
        ServiceKey::new("shop", "pay")
    );
    assert_eq!(
        target("pay.prod", "shop").unwrap(),
        ServiceKey::new("prod", "pay")
    );
    assert_eq!(
        target("pay.prod.svc.cluster.local", "shop").unwrap(),
        ServiceKey::new("prod", "pay")
    );
    assert!(target("pay.prod.example.com", "shop").is_err());
    assert!(target("Pay", "shop").is_err());
    assert!(target("", "shop").is_err());
}

#[test]
fn endpoints_carry_the_services_target_ports_and_their_own_win() {
    let mut c = config(
        "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80, targetPort: 8080}, {port: 9000, targetPort: 9000}]}
---
apiVersion: tern.dev/v1alpha1
kind: Endpoints
metadata: {name: web}
spec: {service: web, endpoints: [{address: 10.0.0.1:4143}, {address: 10.0.0.2:4143}]}
",
    );
    // The second endpoint resolved port 80 on its own (a discovered one, say).
    let eps = c.endpoints.get_mut(&key("web")).unwrap();
    eps[1].target_ports = [(80, 8081)].into();
    let mut r = Registry::new(Duration::from_secs(1));
    register(&mut r, "web", "10.0.0.3:4143", "v1");
    let view = service_view(&key("web"), &c, &r).unwrap();
    let targets: Vec<(&str, Vec<(u32, u32)>)> = view
        .endpoints
        .iter()
        .map(|e| {
            (
                e.address.as_str(),
                e.target_ports.clone().into_iter().collect(),
            )
        })
        .collect();
    assert_eq!(
        targets,
        [
            ("10.0.0.1:4143", vec![(80, 8080)]),
            ("10.0.0.2:4143", vec![(80, 8081)]),
            ("10.0.0.3:4143", vec![(80, 8080)]),
        ],
        "9000 → 9000 is no mapping"
    );
}

#[test]
fn a_target_port_of_zero_is_refused() {
    let text = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80, targetPort: 0}]}
";
    let e = parse_files(&[(PathBuf::from("mesh.yaml"), text.to_owned())]).unwrap_err();
    assert!(e.to_string().contains("spec.ports[0].targetPort"), "{e}");
}

#[test]
fn every_virtual_ip_is_pushed_the_primary_first() {
    let mut c = config(MESH);
    let inventory = c.services.get_mut(&key("inventory")).unwrap();
    inventory.more_virtual_ips = vec!["fd00::53".parse().unwrap()];
    let view = service_view(
        &key("inventory"),
        &c,
        &Registry::new(Duration::from_secs(1)),
    )
    .unwrap();
    assert_eq!(
        view.virtual_ip, "10.96.0.53",
        "older sidecars read this one"
    );
    assert_eq!(view.virtual_ips, ["10.96.0.53", "fd00::53"]);
    let pay = service_view(&key("pay"), &c, &Registry::new(Duration::from_secs(1))).unwrap();
    assert!(pay.virtual_ips.is_empty(), "{pay:?}");
}
