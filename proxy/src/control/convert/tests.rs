#![allow(clippy::unwrap_used)]
use super::*;
use crate::config::policy::PolicyFile;

fn base() -> ServicePolicy {
    PolicyFile::default().validate("t").unwrap()
}

fn pay(routes: Vec<pb::Route>) -> pb::ServiceConfig {
    pb::ServiceConfig {
        name: "pay".into(),
        namespace: "default".into(),
        endpoints: vec![pb::Endpoint {
            address: "127.0.0.1:7001".into(),
            labels: [("version".to_string(), "v2".to_string())]
                .into_iter()
                .collect(),
            identity: String::new(),
            target_ports: [(80, 8080)].into_iter().collect(),
        }],
        traffic: Some(pb::TrafficPolicy {
            name: "pay".into(),
            load_balancer: pb::LoadBalancer::P2cEwma as i32,
            failure_accrual: None,
            routes,
        }),
        ..Default::default()
    }
}

#[test]
fn target_ports_convert_and_out_of_range_ones_are_refused() {
    let mut svc = pay(vec![pb::Route::default()]);
    let update = service(&svc, &base()).unwrap();
    assert_eq!(update.endpoints[0].target_port(80), 8080);
    assert_eq!(update.endpoints[0].target_port(81), 81);
    svc.endpoints[0].target_ports.insert(81, 70000);
    let e = service(&svc, &base()).err().unwrap();
    assert!(e.contains("target port 81 → 70000"), "{e}");
    svc.endpoints[0].target_ports = [(0, 80)].into_iter().collect();
    assert!(service(&svc, &base()).is_err());
}

#[test]
fn a_canary_route_converts() {
    let route = pb::Route {
        name: "default".into(),
        backends: vec![
            pb::WeightedBackend {
                subset: [("version".to_string(), "v1".to_string())]
                    .into_iter()
                    .collect(),
                weight: 90,
            },
            pb::WeightedBackend {
                subset: [("version".to_string(), "v2".to_string())]
                    .into_iter()
                    .collect(),
                weight: 10,
            },
        ],
        retry: Some(pb::RetryPolicy {
            max_attempts: Some(5),
            per_try_timeout_ms: Some(200),
            budget_percent: Some(20.0),
            ..Default::default()
        }),
        timeout_ms: Some(1500),
        ..Default::default()
    };
    let u = service(&pay(vec![route]), &base()).unwrap();
    assert_eq!(u.algorithm, Algorithm::P2cEwma);
    assert!(u.virtual_ips.is_empty());
    assert!(u.opaque_ports.is_empty());
    assert_eq!(u.endpoints[0].labels["version"], "v2");
    let rule = &u.routes.rules[0];
    assert_eq!(rule.policy.retry.max_attempts, 5);
    assert_eq!(
        rule.policy.timeout.per_try,
        Some(Duration::from_millis(200))
    );
    assert_eq!(
        rule.policy.timeout.overall,
        Some(Duration::from_millis(1500))
    );
    assert!((rule.policy.retry.budget_percent - 0.2).abs() < 1e-6);
    assert_eq!(u.routes.subsets().len(), 2);
}

#[test]
fn inbound_policies_convert_and_bad_ones_are_rejected() {
    use pb::identity_match::Kind;
    let policy = |kind: Kind, method: &str| pb::InboundPolicy {
        name: "pay-callers".into(),
        default_action: pb::Action::Deny as i32,
        rules: vec![pb::AuthorizationRule {
            from: vec![pb::IdentityMatch { kind: Some(kind) }],
            methods: vec![pb::GrpcMethod {
                service: "tern.demo.v1.PayService".into(),
                method: method.into(),
            }],
        }],
    };
    assert!(inbound(None).unwrap().allows_all());
    let ok = inbound(Some(&policy(
        Kind::Exact("spiffe://cluster.local/ns/default/sa/order".into()),
        "Pay",
    )))
    .unwrap();
    assert_eq!(ok.name(), Some("pay-callers"));
    assert_eq!(ok.default_action(), authz::Action::Deny);
    assert_eq!(ok.rules()[0].methods[0].method.as_deref(), Some("Pay"));
    for (bad, why) in [
        (policy(Kind::Exact("order".into()), ""), "not a SPIFFE id"),
        (
            policy(Kind::Namespace("Pay_NS".into()), ""),
            "not a DNS label",
        ),
        (
            policy(Kind::Namespace("payments".into()), "Pay/x"),
            "not a gRPC method",
        ),
    ] {
        let e = inbound(Some(&bad)).err().unwrap();
        assert!(e.contains(why) && e.contains("pay-callers"), "{e}");
    }
    let mut no_from = policy(Kind::Namespace("payments".into()), "");
    no_from.rules[0].from.clear();
    assert!(inbound(Some(&no_from)).is_err());
    let mut bad_action = no_from.clone();
    bad_action.rules.clear();
    bad_action.default_action = 9;
    assert!(inbound(Some(&bad_action)).is_err());
    // Not set: no rules restrict nothing; rules make the rest denied.
    let unset = |rules| pb::InboundPolicy {
        rules,
        ..Default::default()
    };
    assert!(inbound(Some(&unset(vec![]))).unwrap().allows_all());
    let ruled = policy(Kind::Namespace("payments".into()), "").rules;
    assert_eq!(
        inbound(Some(&unset(ruled))).unwrap().default_action(),
        authz::Action::Deny
    );
}

#[test]
fn bad_values_are_rejected_with_a_reason() {
    let bad_weights = pb::Route {
        name: "r".into(),
        backends: vec![pb::WeightedBackend {
            subset: Default::default(),
            weight: 60,
        }],
        ..Default::default()
    };
    let e = service(&pay(vec![bad_weights]), &base()).err().unwrap();
    assert!(e.contains("add up to 60"), "{e}");
    // Weights that wrap around to 100 in 32 bits.
    let wrapping_weights = pb::Route {
        name: "r".into(),
        backends: vec![
            pb::WeightedBackend {
                subset: Default::default(),
                weight: u32::MAX,
            },
            pb::WeightedBackend {
                subset: Default::default(),
                weight: 101,
            },
        ],
        ..Default::default()
    };
    let e = service(&pay(vec![wrapping_weights]), &base())
        .err()
        .unwrap();
    assert!(e.contains("add up to 4294967396"), "{e}");
    let huge_budget = pb::Route {
        name: "r".into(),
        retry: Some(pb::RetryPolicy {
            budget_min_per_second: Some(u32::MAX),
            ..Default::default()
        }),
        ..Default::default()
    };
    let e = service(&pay(vec![huge_budget]), &base()).err().unwrap();
    assert!(e.contains("budget_min_per_second"), "{e}");
    let bad_code = pb::Route {
        name: "r".into(),
        retry: Some(pb::RetryPolicy {
            retryable_grpc_codes: vec![7],
            ..Default::default()
        }),
        ..Default::default()
    };
    assert!(service(&pay(vec![bad_code]), &base()).is_err());
    let mut addressed = pay(vec![]);
    addressed.virtual_ip = "10.96.0.20".into();
    addressed.ports = vec![
        pb::Port {
            name: "grpc".into(),
            port: 50051,
            opaque: false,
        },
        pb::Port {
            name: "redis".into(),
            port: 6379,
            opaque: true,
        },
    ];
    let u = service(&addressed, &base()).unwrap();
    assert_eq!(u.virtual_ips, ["10.96.0.20".parse::<IpAddr>().unwrap()]);
    assert_eq!(u.opaque_ports, [6379]);
    // Dual-stack: the list, when given, is every virtual IP.
    addressed.virtual_ips = vec!["10.96.0.20".into(), "fd00::20".into()];
    let u = service(&addressed, &base()).unwrap();
    let both: Vec<IpAddr> = vec!["10.96.0.20".parse().unwrap(), "fd00::20".parse().unwrap()];
    assert_eq!(u.virtual_ips, both);
    addressed.virtual_ips.push("fd00::".into());
    addressed.virtual_ips.push("nope".into());
    assert!(service(&addressed, &base())
        .err()
        .unwrap()
        .contains("\"nope\""));
    addressed.virtual_ips.clear();
    addressed.virtual_ip = "10.96.0".into();
    assert!(service(&addressed, &base())
        .err()
        .unwrap()
        .contains("virtual_ip"));
    addressed.virtual_ip.clear();
    addressed.ports[1].port = 70000;
    assert!(service(&addressed, &base()).is_err());
    let mut bad_addr = pay(vec![]);
    bad_addr.endpoints[0].address = "nowhere".into();
    assert!(service(&bad_addr, &base())
        .err()
        .unwrap()
        .contains("not ip:port"));
}
