#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use super::*;
use crate::config::parse_files;
use crate::discovery::{DiscoveredEndpoint, DiscoveredPort};

fn pay() -> ServiceKey {
    ServiceKey::new("default", "pay")
}

fn discovered(ips: &[&str]) -> Discovered {
    Discovered {
        virtual_ips: vec!["10.96.0.20".parse().unwrap()],
        ports: vec![DiscoveredPort {
            name: Some("grpc".into()),
            port: 50051,
            target_port: Some(8080),
        }],
        endpoints: ips
            .iter()
            .map(|ip| DiscoveredEndpoint {
                address: format!("{ip}:4143").parse().unwrap(),
                labels: BTreeMap::new(),
                identity: Some("spiffe://cluster.local/ns/default/sa/pay".into()),
                source: "EndpointSlice default/pay-abc".into(),
                target_ports: BTreeMap::from([(50051, 8080)]),
            })
            .collect(),
        http: false,
    }
}

fn dir(text: &str) -> MeshConfig {
    parse_files(&[("mesh.yaml".into(), text.to_owned())]).unwrap()
}

const DOC: &str = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: pay, namespace: default}
spec:
  protocol: http
  identity: spiffe://cluster.local/ns/default/sa/pay
  virtualIP: 10.0.0.99
  ports:
  - {name: grpc, port: 50051, protocol: opaque}
  - {name: metrics, port: 9100}
";

#[test]
fn a_cluster_service_alone() {
    let mut config = MeshConfig::default();
    let mut o = Overlay::default();
    assert!(o.set(&pay(), Some(discovered(&["10.1.0.1"])), &mut config));
    let s = &config.services[&pay()];
    assert_eq!(s.protocol, Protocol::Grpc);
    assert_eq!(s.virtual_ip, Some("10.96.0.20".parse().unwrap()));
    assert!(s.more_virtual_ips.is_empty());
    assert_eq!(
        s.ports,
        vec![Port {
            name: Some("grpc".into()),
            port: 50051,
            opaque: false,
            target_port: Some(8080),
        }]
    );
    assert_eq!(s.identity, None);
    assert_eq!(config.endpoints[&pay()].len(), 1);
    assert!(
        !o.set(&pay(), Some(discovered(&["10.1.0.1"])), &mut config),
        "unchanged"
    );
    assert!(o.set(&pay(), None, &mut config));
    assert_eq!(config, MeshConfig::default(), "gone without a trace");
    assert!(!o.set(&pay(), None, &mut config));
}

#[test]
fn a_service_document_extends_the_cluster_service_and_comes_back_when_it_leaves() {
    let loaded = dir(DOC);
    let mut config = loaded.clone();
    let mut o = Overlay::default();
    o.set(&pay(), Some(discovered(&["10.1.0.1"])), &mut config);
    let s = &config.services[&pay()];
    assert_eq!(s.protocol, Protocol::Http, "the document's protocol");
    assert_eq!(
        s.identity.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/pay")
    );
    assert_eq!(
        s.virtual_ip,
        Some("10.96.0.20".parse().unwrap()),
        "the cluster's address"
    );
    let ports: Vec<_> = s.ports.iter().map(|p| (p.port, p.opaque)).collect();
    assert_eq!(
        ports,
        [(50051, true), (9100, false)],
        "opaque kept, extra port added"
    );
    o.set(&pay(), None, &mut config);
    assert_eq!(config, loaded);
}

#[test]
fn a_new_directory_load_is_overlaid_again() {
    let mut o = Overlay::default();
    let mut config = MeshConfig::default();
    o.set(
        &pay(),
        Some(discovered(&["10.1.0.1", "10.1.0.2"])),
        &mut config,
    );
    let endpoints = "\
apiVersion: tern.dev/v1alpha1
kind: Endpoints
metadata: {name: pay-vm, namespace: default}
spec:
  service: pay
  endpoints: [{address: 192.0.2.10:50051}]
";
    let mut next = parse_files(&[
        ("a.yaml".into(), DOC.to_owned()),
        ("b.yaml".into(), endpoints.to_owned()),
    ])
    .unwrap();
    let loaded = next.clone();
    o.apply(&mut next);
    assert_eq!(next.services[&pay()].protocol, Protocol::Http);
    let addrs: Vec<String> = next.endpoints[&pay()]
        .iter()
        .map(|e| e.address.to_string())
        .collect();
    assert_eq!(
        addrs,
        ["192.0.2.10:50051", "10.1.0.1:4143", "10.1.0.2:4143"]
    );
    // The cluster's endpoints change: the document's stay.
    o.set(&pay(), Some(discovered(&["10.1.0.2"])), &mut next);
    assert_eq!(next.endpoints[&pay()].len(), 2);
    // Gone from the cluster: back to the documents alone.
    o.set(&pay(), None, &mut next);
    assert_eq!(next, loaded);
}

#[test]
fn a_headless_service_keeps_the_documents_virtual_ip() {
    let mut d = discovered(&[]);
    d.virtual_ips.clear();
    let doc = dir(DOC);
    let merged = merge(&d, doc.services.get(&pay()));
    assert_eq!(merged.virtual_ip, Some("10.0.0.99".parse().unwrap()));
    assert_eq!(merge(&d, None).virtual_ip, None);
    d.http = true;
    assert_eq!(merge(&d, None).protocol, Protocol::Http);
}

#[test]
fn a_dual_stack_service_keeps_both_virtual_ips() {
    let mut config = MeshConfig::default();
    let mut o = Overlay::default();
    let mut d = discovered(&["10.1.0.1"]);
    d.virtual_ips.push("fd00::20".parse().unwrap());
    assert!(o.set(&pay(), Some(d), &mut config));
    let s = &config.services[&pay()];
    assert_eq!(s.virtual_ip, Some("10.96.0.20".parse().unwrap()));
    assert_eq!(
        s.more_virtual_ips,
        ["fd00::20".parse::<std::net::IpAddr>().unwrap()]
    );
}

#[test]
fn the_cluster_alone_names_a_cluster_services_endpoints() {
    use crate::registry::{Registration, Registry};
    let mut config = dir(DOC);
    let mut o = Overlay::default();
    let mut registry = Registry::new(std::time::Duration::from_secs(1));
    // pay-2's sidecar is still subscribed (to this replica) after the cluster took it out.
    registry
        .register(
            &pay(),
            Registration {
                address: "10.1.0.2:4143".parse().unwrap(),
                labels: BTreeMap::new(),
                identity: None,
            },
        )
        .unwrap();
    let addresses = |config: &MeshConfig, registry: &Registry| -> Vec<String> {
        crate::snapshot::service_view(&pay(), config, registry)
            .map(|v| v.endpoints.into_iter().map(|e| e.address).collect())
            .unwrap_or_default()
    };
    assert!(o.set(&pay(), Some(discovered(&["10.1.0.1"])), &mut config));
    assert_eq!(addresses(&config, &registry), ["10.1.0.1:4143"]);
    // Once the cluster drops the service, the directory and registrations speak again.
    assert!(o.set(&pay(), None, &mut config));
    assert!(config.cluster_endpoints.is_empty());
    assert_eq!(addresses(&config, &registry), ["10.1.0.2:4143"]);
}
