//! Each rejected mistake names its file, document and field.
#![allow(clippy::unwrap_used)]

use super::*;

#[test]
fn unknown_fields_are_named_with_their_path() {
    let e = error(&edit(POLICY, "perTryTimeout", "perTryTimout"));
    assert_names(&e, "policy.yaml", 1, "spec.retries.perTryTimout");
    assert!(e.message.contains("unknown field"), "{e}");
    let e = error(&edit(POLICY, "- name: pay-canary", "- nmae: pay-canary"));
    assert_names(&e, "policy.yaml", 1, "spec.routes[0].nmae");
    let e = error(&edit(
        POLICY,
        "metadata: {name: pay-static}",
        "metadata: {name: pay-static, uid: 1}",
    ));
    assert_names(&e, "policy.yaml", 3, "metadata.uid");
    let e = error(&edit(
        POLICY,
        "kind: Endpoints\n",
        "kind: Endpoints\nstatus: {}\n",
    ));
    assert_names(&e, "policy.yaml", 3, "status");
}

#[test]
fn unknown_kinds_and_versions_are_rejected() {
    let e = error(&edit(
        POLICY,
        "kind: AuthorizationPolicy",
        "kind: AuthPolicy",
    ));
    assert_names(&e, "policy.yaml", 2, "kind");
    assert!(e.message.contains("AuthPolicy"), "{e}");
    let e = error(&edit(
        POLICY,
        "apiVersion: tern.dev/v1alpha1\nkind: Endpoints",
        "apiVersion: v1\nkind: Endpoints",
    ));
    assert_names(&e, "policy.yaml", 3, "apiVersion");
    let e = error(&edit(POLICY, "metadata: {name: pay}\n", ""));
    assert_names(&e, "policy.yaml", 1, "metadata");
}

#[test]
fn bad_references_name_the_referring_field() {
    let e = error(&edit(
        POLICY,
        "  service: pay\n  loadBalancer",
        "  service: payy\n  loadBalancer",
    ));
    assert_names(&e, "policy.yaml", 1, "spec.service");
    assert!(e.message.contains("unknown Service `default/payy`"), "{e}");
    // A Service in another namespace is another Service.
    let e = error(&edit(
        POLICY,
        "metadata: {name: pay-callers}",
        "metadata: {name: pay-callers, namespace: prod}",
    ));
    assert_names(&e, "policy.yaml", 2, "spec.service");
    let e = error(&edit(
        POLICY,
        "spec:\n  service: pay\n  endpoints",
        "spec:\n  endpoints",
    ));
    assert_names(&e, "policy.yaml", 3, "spec.service");
}

#[test]
fn weights_must_add_up_to_100() {
    let e = error(&edit(POLICY, "weight: 10}", "weight: 20}"));
    assert_names(&e, "policy.yaml", 1, "spec.routes[0].backends");
    assert!(e.message.contains("add up to 110"), "{e}");
    let e = error(&edit(POLICY, "weight: 10}", "weight: 101}"));
    assert_names(&e, "policy.yaml", 1, "spec.routes[0].backends[1].weight");
    let e = error(&edit(
        POLICY,
        "{subset: {version: v1}, weight: 90}",
        "{subset: {version: v1}}",
    ));
    assert_names(&e, "policy.yaml", 1, "spec.routes[0].backends[0].weight");
}

#[test]
fn bad_durations_are_rejected() {
    let e = error(&edit(POLICY, "timeout: 2s", "timeout: soon"));
    assert_names(&e, "policy.yaml", 1, "spec.timeout");
    let e = error(&edit(POLICY, "perTryTimeout: 500ms", "perTryTimeout: 0ms"));
    assert_names(&e, "policy.yaml", 1, "spec.retries.perTryTimeout");
    let e = error(&edit(
        POLICY,
        "backoff: {min: 1s, max: 1m}",
        "backoff: {min: 1m, max: 1s}",
    ));
    assert_names(&e, "policy.yaml", 1, "spec.failureAccrual.backoff.max");
    let e = error(&edit(POLICY, "timeout: 1s", "timeout: 1"));
    assert_names(&e, "policy.yaml", 1, "spec.routes[0].timeout");
}

#[test]
fn bad_label_selectors_are_rejected() {
    let e = error(&edit(
        POLICY,
        "{subset: {version: v2}",
        "{subset: {'ver sion': v2}",
    ));
    assert_names(
        &e,
        "policy.yaml",
        1,
        "spec.routes[0].backends[1].subset.ver sion",
    );
    let e = error(&edit(
        POLICY,
        "{subset: {version: v2}",
        "{subset: {version: 'v2!'}",
    ));
    assert_names(
        &e,
        "policy.yaml",
        1,
        "spec.routes[0].backends[1].subset.version",
    );
    let e = error(&edit(
        POLICY,
        "labels: {version: v1}}",
        "labels: {version: -v1}}",
    ));
    assert_names(&e, "policy.yaml", 3, "spec.endpoints[0].labels.version");
    let e = error(&edit(
        POLICY,
        "{subset: {version: v2}, weight: 10}",
        "{subset: {version: v1}, weight: 10}",
    ));
    assert_names(&e, "policy.yaml", 1, "spec.routes[0].backends[1].subset");
}

#[test]
fn duplicate_names_are_rejected() {
    let twice = format!("{POLICY}---\n{}", POLICY.split("---\n").nth(2).unwrap());
    let e = error(&twice);
    assert_names(&e, "policy.yaml", 4, "metadata.name");
    assert!(
        e.message.contains(
            "duplicate Endpoints `default/pay-static`, first defined in policy.yaml document 3"
        ),
        "{e}"
    );
    // A second policy of one kind for the same Service is ambiguous.
    let other = edit(
        POLICY.split("---\n").nth(1).unwrap(),
        "name: pay-callers",
        "name: pay-more",
    );
    let e = error(&format!("{POLICY}---\n{other}"));
    assert_names(&e, "policy.yaml", 4, "spec.service");
    let e = error(&edit(
        POLICY,
        "- match: [{pathPrefix: /healthz}]",
        "- name: pay-canary\n      match: [{pathPrefix: /healthz}]",
    ));
    assert_names(&e, "policy.yaml", 1, "spec.routes[1].name");
    let e = error(&edit(POLICY, "- name: pay-canary", "- name: default"));
    assert_names(&e, "policy.yaml", 1, "spec.routes[0].name");
    let e = error(&edit(
        POLICY,
        "    - {address: 127.0.0.1:7001, labels: {version: v1}}\n",
        "    - {address: 127.0.0.1:7001}\n    - {address: 127.0.0.1:7001}\n",
    ));
    assert_names(&e, "policy.yaml", 3, "spec.endpoints[1].address");
}

#[test]
fn matches_retries_and_identities_are_checked() {
    let cases = [
        (
            "pathPrefix: /healthz",
            "pathPrefix: healthz",
            1,
            "spec.routes[1].match[0].pathPrefix",
        ),
        (
            "- match: [{pathPrefix: /healthz}]",
            "- match: [{pathPrefix: /h, grpc: {}}]",
            1,
            "spec.routes[1].match[0]",
        ),
        (
            "- match: [{pathPrefix: /healthz}]",
            "- match: []",
            1,
            "spec.routes[1].match",
        ),
        (
            "method: Pay}\n          headers",
            "method: Pay/x}\n          headers",
            1,
            "spec.routes[0].match[0].grpc.method",
        ),
        (
            "{name: x-canary, exact: '1'}",
            "{name: X-Canary, exact: '1'}",
            1,
            "spec.routes[0].match[0].headers[0].name",
        ),
        (
            "{name: x-canary, exact: '1'}",
            "{name: x-canary, exact: '1', prefix: '1'}",
            1,
            "spec.routes[0].match[0].headers[0]",
        ),
        (
            "maxAttempts: 3",
            "maxAttempts: 11",
            1,
            "spec.retries.maxAttempts",
        ),
        (
            "[UNAVAILABLE, resource-exhausted]",
            "[UNAVAILABLE, PERMISSION_DENIED]",
            1,
            "spec.retries.retryableCodes[1]",
        ),
        (
            "percent: 20",
            "percent: 120",
            1,
            "spec.retries.budget.percent",
        ),
        (
            "minPerSecond: 10",
            "minPerSecond: 4294967295",
            1,
            "spec.retries.budget.minPerSecond",
        ),
        (
            "loadBalancer: P2C_EWMA",
            "loadBalancer: RANDOM",
            1,
            "spec.loadBalancer",
        ),
        (
            "consecutiveFailures: 5",
            "consecutiveFailures: 0",
            1,
            "spec.failureAccrual.consecutiveFailures",
        ),
        (
            "identity: spiffe://tern.local/ns/default/sa/order",
            "identity: order",
            2,
            "spec.rules[0].from[0].identity",
        ),
        (
            "identity: spiffe://tern.local/ns/default/sa/order",
            "identity: spiffe://tern.local/order",
            2,
            "spec.rules[0].from[0].identity",
        ),
        (
            "- namespace: payments",
            "- {namespace: payments, identity: spiffe://a/b}",
            2,
            "spec.rules[0].from[1]",
        ),
        (
            "methods: [{service: tern.demo.v1.PayService, method: Pay}]",
            "methods: [{method: Pay}]",
            2,
            "spec.rules[0].methods[0].service",
        ),
        (
            "{address: 127.0.0.1:7001,",
            "{address: localhost,",
            3,
            "spec.endpoints[0].address",
        ),
    ];
    for (from, to, doc, field) in cases {
        let e = error(&edit(POLICY, from, to));
        assert_names(&e, "policy.yaml", doc, field);
    }
}

#[test]
fn service_specs_are_checked() {
    let cases = [
        (
            "virtualIP: 10.96.0.20",
            "virtualIP: 10.96.0",
            "spec.virtualIP",
        ),
        (
            "identity: spiffe://tern.local/ns/default/sa/pay",
            "identity: pay",
            "spec.identity",
        ),
        (
            "dnsName: pay.default.svc.cluster.local",
            "dnsName: Pay_Svc",
            "spec.dnsName",
        ),
        (
            "ports: [{name: grpc, port: 50051}]",
            "ports: []",
            "spec.ports",
        ),
        (
            "ports: [{name: grpc, port: 50051}]",
            "ports: [{name: grpc, port: 0}]",
            "spec.ports[0].port",
        ),
        (
            "ports: [{name: grpc, port: 50051}]",
            "ports: [{name: grpc}]",
            "spec.ports[0].port",
        ),
        (
            "ports: [{name: grpc, port: 50051}]",
            "ports: [{port: 70000}]",
            "spec.ports[0].port",
        ),
        (
            "ports: [{name: grpc, port: 50051}]",
            "ports: [{name: grpc, port: 50051, protocol: udp}]",
            "spec.ports[0].protocol",
        ),
        ("protocol: grpc", "protocol: tcp", "spec.protocol"),
        (
            "metadata: {name: pay, namespace: default}",
            "metadata: {name: Pay}",
            "metadata.name",
        ),
    ];
    for (from, to, field) in cases {
        let text = edit(SERVICES, from, to);
        let errors = parse_files(&files(&[("svc.yaml", &text)])).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_names(&errors[0], "svc.yaml", 1, field);
    }
}

#[test]
fn every_error_is_reported_and_yaml_errors_name_the_file() {
    let bad = edit(
        &edit(POLICY, "timeout: 2s", "timeout: x"),
        "{address: 127.0.0.1:7001,",
        "{address: x,",
    );
    let errors = with_services(&bad).unwrap_err().0;
    let fields: Vec<(usize, &str)> = errors.iter().map(|e| (e.doc, e.field.as_str())).collect();
    assert_eq!(
        fields,
        [(1, "spec.timeout"), (3, "spec.endpoints[0].address")]
    );
    let e = error("apiVersion: tern.dev/v1alpha1\nkind: [\n");
    assert_names(&e, "policy.yaml", 1, "");
    assert!(
        e.to_string()
            .starts_with("policy.yaml: document 1: invalid YAML"),
        "{e}"
    );
}

#[test]
fn with_services_elsewhere_documents_may_name_undeclared_services() {
    let elsewhere = crate::config::LoadOptions {
        services_elsewhere: true,
    };
    let policy = edit(
        POLICY,
        "  service: pay\n  loadBalancer",
        "  service: payy\n  loadBalancer",
    );
    let portless = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: ledger}
spec: {protocol: http}
";
    let docs = files(&[("policy.yaml", &policy), ("ledger.yaml", portless)]);
    assert!(parse_files(&docs).is_err(), "strict by default");
    let c = crate::config::parse_files_with(&docs, elsewhere).unwrap();
    assert!(c.traffic.contains_key(&ServiceKey::new("default", "payy")));
    assert!(c.services[&ServiceKey::new("default", "ledger")]
        .ports
        .is_empty());
}
