//! Unit tests of config parsing and validation: a full valid config, and
//! for each kind of mistake, that the error names file, document and field.
#![allow(clippy::unwrap_used)]

mod errors;
mod reference;

use std::path::PathBuf;
use std::time::Duration;

use super::*;

pub(super) const SERVICES: &str = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: pay, namespace: default}
spec:
  protocol: grpc
  ports: [{name: grpc, port: 50051}]
  virtualIP: 10.96.0.20
  identity: spiffe://tern.local/ns/default/sa/pay
  dnsName: pay.default.svc.cluster.local
---
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: order}
spec:
  ports: [{port: 50052}, {name: cache, port: 6379, protocol: opaque}, {port: 3306, protocol: tcp}]
";

pub(super) const POLICY: &str = "\
apiVersion: tern.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: pay}
spec:
  service: pay
  loadBalancer: P2C_EWMA
  timeout: 2s
  retries:
    maxAttempts: 3
    retryableCodes: [UNAVAILABLE, resource-exhausted]
    perTryTimeout: 500ms
    backoff: {base: 25ms, max: 250ms}
    budget: {percent: 20, minPerSecond: 10}
  failureAccrual:
    consecutiveFailures: 5
    backoff: {min: 1s, max: 1m}
  routes:
    - name: pay-canary
      match:
        - grpc: {service: tern.demo.v1.PayService, method: Pay}
          headers: [{name: x-canary, exact: '1'}]
      backends:
        - {subset: {version: v1}, weight: 90}
        - {subset: {version: v2}, weight: 10}
      timeout: 1s
    - match: [{pathPrefix: /healthz}]
      retries: {maxAttempts: 1}
---
apiVersion: tern.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: pay-callers}
spec:
  service: pay
  rules:
    - from:
        - identity: spiffe://tern.local/ns/default/sa/order
        - namespace: payments
      methods: [{service: tern.demo.v1.PayService, method: Pay}]
---
apiVersion: tern.dev/v1alpha1
kind: Endpoints
metadata: {name: pay-static}
spec:
  service: pay
  endpoints:
    - {address: 127.0.0.1:7001, labels: {version: v1}}
";

pub(super) fn files(docs: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
    docs.iter()
        .map(|(name, text)| (PathBuf::from(name), (*text).to_owned()))
        .collect()
}

/// Parses SERVICES (in 00-services.yaml) plus `text` (in policy.yaml).
pub(super) fn with_services(text: &str) -> Result<MeshConfig, ConfigErrors> {
    parse_files(&files(&[
        ("00-services.yaml", SERVICES),
        ("policy.yaml", text),
    ]))
}

/// The single error of parsing `text` after the services.
pub(super) fn error(text: &str) -> ConfigError {
    let mut errors = with_services(text).unwrap_err().0;
    assert_eq!(errors.len(), 1, "{errors:?}");
    errors.remove(0)
}

/// `text` with `from` replaced by `to`, which must occur in it.
pub(super) fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} not in the text");
    text.replacen(from, to, 1)
}

pub(super) fn assert_names(e: &ConfigError, file: &str, doc: usize, field: &str) {
    assert_eq!(e.file, PathBuf::from(file), "{e}");
    assert_eq!(e.doc, doc, "{e}");
    assert_eq!(e.field, field, "{e}");
    let shown = e.to_string();
    let prefix = if field.is_empty() {
        format!("{file}: document {doc}: ")
    } else {
        format!("{file}: document {doc}: {field}: ")
    };
    assert!(shown.starts_with(&prefix), "{shown}");
}

#[test]
fn a_full_config_validates_into_plain_data() {
    let c = with_services(POLICY).unwrap();
    let pay = ServiceKey::new("default", "pay");
    assert_eq!(c.services.len(), 2);
    let svc = &c.services[&pay];
    assert_eq!(svc.protocol, Protocol::Grpc);
    assert_eq!(svc.virtual_ip, Some("10.96.0.20".parse().unwrap()));
    assert!(!svc.ports[0].opaque);
    let order = &c.services[&ServiceKey::new("default", "order")];
    let opaque: Vec<(u16, bool)> = order.ports.iter().map(|p| (p.port, p.opaque)).collect();
    assert_eq!(opaque, [(50052, false), (6379, true), (3306, true)]);
    let tp = &c.traffic[&pay];
    assert_eq!(tp.load_balancer, Some(LoadBalancer::P2cEwma));
    let names: Vec<&str> = tp.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["pay-canary", "route-1", DEFAULT_ROUTE]);
    let canary = &tp.routes[0];
    assert_eq!(canary.backends.len(), 2);
    assert_eq!(canary.timeout, Some(Duration::from_secs(1)));
    // Policy-wide settings fill what a route leaves out ...
    let retry = canary.retry.as_ref().unwrap();
    assert_eq!(retry.retryable_codes, vec![14, 8]);
    assert_eq!(retry.per_try_timeout, Some(Duration::from_millis(500)));
    assert_eq!(retry.budget_percent, Some(20.0));
    // ... and a route's own settings replace them.
    assert_eq!(tp.routes[1].retry.as_ref().unwrap().max_attempts, Some(1));
    assert_eq!(tp.routes[1].timeout, Some(Duration::from_secs(2)));
    assert!(tp.routes[1].backends.is_empty());
    let fa = tp.failure_accrual.as_ref().unwrap();
    assert_eq!(fa.backoff_max, Some(Duration::from_secs(60)));
    let authz = &c.authorization[&pay];
    assert_eq!(authz.default_action, Action::Deny);
    assert_eq!(
        authz.rules[0].from[1],
        IdentityMatch::Namespace("payments".into())
    );
    assert_eq!(
        c.endpoints[&pay][0].address,
        "127.0.0.1:7001".parse().unwrap()
    );
}

#[test]
fn empty_documents_and_an_empty_directory_are_fine() {
    let c = parse_files(&files(&[("a.yaml", "---\n# nothing yet\n---\n")])).unwrap();
    assert_eq!(c, MeshConfig::default());
    assert_eq!(parse_files(&[]).unwrap(), MeshConfig::default());
}

#[test]
fn the_example_mesh_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mesh");
    let c = load_dir(&dir).unwrap();
    assert!(c.services.contains_key(&ServiceKey::new("default", "pay")));
    assert!(c
        .services
        .contains_key(&ServiceKey::new("default", "order")));
    let pay = &c.traffic[&ServiceKey::new("default", "pay")];
    assert!(pay.routes.iter().all(|r| r.retry.is_some()), "{pay:?}");
}

#[test]
fn loading_a_directory_skips_hidden_and_non_yaml_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("services.yaml"), SERVICES).unwrap();
    std::fs::write(dir.path().join(".services.yaml.swp"), "garbage: [").unwrap();
    std::fs::write(dir.path().join("README.md"), "not yaml: [").unwrap();
    std::fs::write(dir.path().join("policy.yml"), POLICY).unwrap();
    let c = load_dir(dir.path()).unwrap();
    assert_eq!(c.traffic.len(), 1);
    let e = load_dir(&dir.path().join("missing")).unwrap_err();
    assert_eq!(e.0[0].doc, 0);
}
