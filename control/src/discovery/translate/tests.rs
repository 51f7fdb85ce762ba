#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

use super::*;

struct PodMap(HashMap<(String, String), Pod>);

impl Pods for PodMap {
    fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.0.get(&(namespace.to_owned(), name.to_owned()))
    }
}

fn pods(list: Vec<Pod>) -> PodMap {
    PodMap(
        list.into_iter()
            .map(|p| {
                let key = (
                    p.metadata.namespace.clone().unwrap(),
                    p.metadata.name.clone().unwrap(),
                );
                (key, p)
            })
            .collect(),
    )
}

fn pod(name: &str, sa: &str, sidecar: bool) -> Pod {
    let mut containers =
        vec![json!({"name": "app", "ports": [{"name": "grpc", "containerPort": 8080}]})];
    if sidecar {
        containers.push(json!({"name": "tern-proxy",
            "ports": [{"name": "tern-inbound", "containerPort": 4143}, {"name": "tern-admin", "containerPort": 4191}]}));
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "pay", "version": "v1"}},
        "spec": {"serviceAccountName": sa, "containers": containers},
    }))
    .unwrap()
}

fn pay(spec: serde_json::Value) -> Service {
    serde_json::from_value(
        json!({"metadata": {"name": "pay", "namespace": "default"}, "spec": spec}),
    )
    .unwrap()
}

fn slice(
    name: &str,
    family: &str,
    ports: serde_json::Value,
    endpoints: serde_json::Value,
) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "labels": {SERVICE_NAME_LABEL: "pay"}},
        "addressType": family, "ports": ports, "endpoints": endpoints,
    }))
    .unwrap()
}

fn ep(ip: &str, pod: &str, ready: bool) -> serde_json::Value {
    json!({"addresses": [ip], "conditions": {"ready": ready},
           "targetRef": {"kind": "Pod", "namespace": "default", "name": pod}})
}

fn addrs(d: &Discovered) -> Vec<String> {
    d.endpoints.iter().map(|e| e.address.to_string()).collect()
}

const TD: &str = "cluster.local";

#[test]
fn sidecar_pods_are_mtls_at_the_inbound_port_others_plaintext_at_their_port() {
    let svc = pay(
        json!({"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
        "ports": [{"name": "grpc", "port": 50051, "targetPort": "grpc"}]}),
    );
    let s = slice(
        "pay-abc",
        "IPv4",
        json!([{"name": "grpc", "port": 8080}]),
        json!([ep("10.1.0.1", "pay-1", true), ep("10.1.0.2", "pay-2", true)]),
    );
    let pods = pods(vec![
        pod("pay-1", "pay", true),
        pod("pay-2", "legacy", false),
    ]);
    let d = service(&svc, &[&s], &pods, TD).unwrap();
    assert_eq!(d.virtual_ips, vec!["10.96.0.20".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        d.ports,
        vec![DiscoveredPort {
            name: Some("grpc".into()),
            port: 50051,
            target_port: Some(8080)
        }]
    );
    assert_eq!(addrs(&d), ["10.1.0.1:4143", "10.1.0.2:8080"]);
    assert_eq!(
        d.endpoints[0].identity.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/pay")
    );
    assert_eq!(
        d.endpoints[1].identity, None,
        "no sidecar: plaintext, nothing to verify"
    );
    assert_eq!(
        d.endpoints[0].labels.get("version").map(String::as_str),
        Some("v1")
    );
    assert_eq!(d.endpoints[0].source, "EndpointSlice default/pay-abc");
    assert!(!d.http);
}

#[test]
fn named_target_ports_resolve_per_slice_and_numeric_ones_without_a_slice() {
    let svc = pay(json!({"clusterIP": "10.96.0.20", "ports": [
        {"name": "grpc", "port": 50051, "targetPort": "grpc"},
        {"name": "admin", "port": 9000, "targetPort": 9090, "appProtocol": "http"},
        {"name": "dns", "port": 53, "protocol": "UDP"},
        {"name": "same", "port": 7000}]}));
    let d = service(&svc, &[], &pods(vec![]), TD).unwrap();
    let targets: Vec<_> = d.ports.iter().map(|p| (p.port, p.target_port)).collect();
    assert_eq!(
        targets,
        [(50051, None), (9000, Some(9090)), (7000, Some(7000))],
        "UDP dropped"
    );
    assert!(d.http, "appProtocol http");

    // Two slices resolve `grpc` differently (pods of two templates): each
    // slice's pods are reached at their own number.
    let a = slice(
        "pay-a",
        "IPv4",
        json!([{"name": "grpc", "port": 8080}, {"name": "admin", "port": 9090}]),
        json!([ep("10.1.0.1", "pay-1", true)]),
    );
    let b = slice(
        "pay-b",
        "IPv4",
        json!([{"name": "grpc", "port": 8081}, {"name": "admin", "port": 9090}]),
        json!([ep("10.1.0.2", "pay-2", true)]),
    );
    let pods = pods(vec![pod("pay-1", "pay", false), pod("pay-2", "pay", false)]);
    let d = service(&svc, &[&b, &a], &pods, TD).unwrap();
    assert_eq!(
        d.ports[0].target_port,
        Some(8080),
        "the first slice by name"
    );
    assert_eq!(addrs(&d), ["10.1.0.1:8080", "10.1.0.2:8081"]);
    // Each endpoint carries its own slice's targets where they differ from
    // the port (7000 → 7000 is left out); the sidecar names them onwards.
    let targets = |i: usize| d.endpoints[i].target_ports.clone();
    assert_eq!(targets(0), BTreeMap::from([(50051, 8080), (9000, 9090)]));
    assert_eq!(targets(1), BTreeMap::from([(50051, 8081), (9000, 9090)]));
}

#[test]
fn sidecar_endpoints_carry_the_target_port_of_each_service_port() {
    let svc = pay(json!({"clusterIP": "10.96.0.20", "ports": [
        {"name": "http", "port": 80, "targetPort": 8080},
        {"name": "grpc", "port": 50051, "targetPort": "grpc"},
        {"name": "same", "port": 7000, "targetPort": 7000}]}));
    let s = slice(
        "pay-abc",
        "IPv4",
        json!([{"name": "http", "port": 8080}, {"name": "grpc", "port": 9443},
               {"name": "same", "port": 7000}]),
        json!([ep("10.1.0.1", "pay-1", true), ep("10.1.0.2", "pay-2", true)]),
    );
    let pods = pods(vec![pod("pay-1", "pay", true), pod("pay-2", "pay", false)]);
    let d = service(&svc, &[&s], &pods, TD).unwrap();
    // The sidecar pod keeps its inbound address; the port map says where its app listens.
    assert_eq!(addrs(&d), ["10.1.0.1:4143", "10.1.0.2:8080"]);
    let want = BTreeMap::from([(80, 8080), (50051, 9443)]);
    assert_eq!(d.endpoints[0].target_ports, want);
    assert_eq!(
        d.endpoints[1].target_ports, want,
        "plaintext pods too (opaque TCP dials it)"
    );
}

#[test]
fn not_ready_terminating_and_unknown_pods_are_left_out() {
    let svc = pay(json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80, "targetPort": 8080}]}));
    let terminating = json!({"addresses": ["10.1.0.3"],
        "conditions": {"ready": false, "serving": true, "terminating": true},
        "targetRef": {"kind": "Pod", "name": "pay-3"}});
    let unknown_ready =
        json!({"addresses": ["10.1.0.4"], "targetRef": {"kind": "Pod", "name": "pay-4"}});
    let by_hand = json!({"addresses": ["192.0.2.7"]});
    let s = slice(
        "pay-x",
        "IPv4",
        json!([{"port": 8080}]),
        json!([
            ep("10.1.0.1", "pay-1", true),
            ep("10.1.0.2", "pay-2", false),
            terminating,
            unknown_ready,
            by_hand,
            ep("10.1.0.9", "not-seen-yet", true)
        ]),
    );
    let pods = pods(vec![
        pod("pay-1", "pay", false),
        pod("pay-2", "pay", false),
        pod("pay-3", "pay", false),
        pod("pay-4", "pay", true),
    ]);
    let d = service(&svc, &[&s], &pods, TD).unwrap();
    // Unset conditions mean ready; a slice written by hand has no pod: plaintext.
    assert_eq!(
        addrs(&d),
        ["10.1.0.1:8080", "10.1.0.4:4143", "192.0.2.7:8080"]
    );
}

#[test]
fn dual_stack_lists_both_virtual_ips_and_counts_each_pod_once() {
    let svc = pay(
        json!({"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00::20"],
        "ipFamilies": ["IPv4", "IPv6"], "ports": [{"port": 80, "targetPort": 8080}]}),
    );
    let v4 = slice(
        "pay-v4",
        "IPv4",
        json!([{"port": 8080}]),
        json!([ep("10.1.0.1", "pay-1", true)]),
    );
    let v6 = slice(
        "pay-v6",
        "IPv6",
        json!([{"port": 8080}]),
        json!([ep("fd00::1:1", "pay-1", true)]),
    );
    let pods = pods(vec![pod("pay-1", "pay", true)]);
    let d = service(&svc, &[&v6, &v4], &pods, TD).unwrap();
    let vips: Vec<String> = d.virtual_ips.iter().map(ToString::to_string).collect();
    assert_eq!(vips, ["10.96.0.20", "fd00::20"]);
    assert_eq!(
        addrs(&d),
        ["10.1.0.1:4143"],
        "the primary family's slice only"
    );
    // IPv6 primary: the IPv6 slice.
    let svc6 = pay(json!({"clusterIPs": ["fd00::20", "10.96.0.20"], "ports": [{"port": 80}]}));
    let d = service(&svc6, &[&v4, &v6], &pods, TD).unwrap();
    assert_eq!(addrs(&d), ["[fd00::1:1]:4143"]);
}

#[test]
fn headless_has_no_virtual_ip_and_external_name_is_no_service() {
    let headless = pay(
        json!({"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"name": "grpc", "port": 50051}]}),
    );
    let s = slice(
        "pay-h",
        "IPv4",
        json!([{"name": "grpc", "port": 50051}]),
        json!([ep("10.1.0.1", "pay-1", true)]),
    );
    let pods = pods(vec![pod("pay-1", "pay", true)]);
    let d = service(&headless, &[&s], &pods, TD).unwrap();
    assert!(d.virtual_ips.is_empty());
    assert_eq!(addrs(&d), ["10.1.0.1:4143"]);
    let external = pay(json!({"type": "ExternalName", "externalName": "pay.example.com"}));
    assert_eq!(service(&external, &[], &pods, TD), None);
}

#[test]
fn native_sidecars_and_configured_inbound_ports_count() {
    let mut p = pod("pay-1", "", false);
    let native: k8s_openapi::api::core::v1::Container = serde_json::from_value(json!({
        "name": "tern-proxy", "restartPolicy": "Always",
        "ports": [{"name": "tern-inbound", "containerPort": 15006}]}))
    .unwrap();
    p.spec.as_mut().unwrap().init_containers = Some(vec![native]);
    assert_eq!(sidecar_inbound_port(&p), Some(15006));
    assert_eq!(
        pod_identity(&p, "default", TD).as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/default"),
        "no service account named: `default`"
    );
    assert_eq!(sidecar_inbound_port(&pod("x", "pay", false)), None);
}

#[test]
fn virtual_ips_prefer_the_list_and_skip_none() {
    assert!(virtual_ips(None, Some("None")).is_empty());
    assert_eq!(virtual_ips(Some(&[]), Some("10.0.0.1")).len(), 1);
    assert_eq!(
        virtual_ips(Some(&["10.0.0.1".into(), "10.0.0.1".into()]), None).len(),
        1
    );
}
