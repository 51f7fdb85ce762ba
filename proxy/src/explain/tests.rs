#![allow(clippy::unwrap_used)]

use super::*;
use crate::authz::{Action, MethodMatch, Policy};

fn explainer(policy: Policy) -> Explainer {
    let metrics = Arc::new(crate::metrics::Metrics::new().unwrap());
    let targets = Targets::new(metrics, Default::default(), "default", None);
    let shared = Policy::shared();
    shared.store(Arc::new(policy));
    Explainer {
        targets,
        inbound_authz: shared,
        app: None,
        service_name: "pay".into(),
    }
}

#[test]
fn questions_parse() {
    let q = Question::parse(Some(
        "authority=pay%3A50051&grpc=tern.test.v1.Echo/Unary&header=x-canary:1&header=X-B%3D2",
    ))
    .unwrap();
    assert_eq!(q.authority, "pay:50051");
    assert_eq!(q.path, "/tern.test.v1.Echo/Unary");
    assert!(q.grpc && !q.inbound);
    assert_eq!(
        q.headers,
        [("x-canary".into(), "1".into()), ("x-b".into(), "2".into())]
    );
    assert!(
        Question::parse(Some("grpc=a.B/C")).is_err(),
        "outbound needs a service"
    );
    assert!(Question::parse(Some("direction=up")).is_err());
    assert!(Question::parse(Some("authority=pay&header=novalue")).is_err());
    assert!(Question::parse(Some("authority=pay&colour=red")).is_err());
}

#[test]
fn inbound_names_the_rule_or_the_default_that_decides() {
    let order =
        tern_identity::SpiffeId::parse("spiffe://cluster.local/ns/default/sa/order").unwrap();
    let rule = AuthzRule {
        from: vec![PeerMatch::Exact(order)],
        methods: vec![MethodMatch {
            service: Some("tern.test.v1.Echo".into()),
            method: None,
        }],
    };
    let e = explainer(Policy::new(Some("pay-callers"), Action::Deny, vec![rule]));
    let ask = |caller: &str| {
        let q = Question::parse(Some(&format!(
            "direction=inbound&grpc=tern.test.v1.Echo/Unary&caller={caller}"
        )))
        .unwrap();
        e.explain(&q).unwrap()["authorization"].clone()
    };
    let allowed = ask("spiffe://cluster.local/ns/default/sa/order");
    assert_eq!(allowed["allowed"], true);
    assert_eq!(allowed["rule"], 1);
    assert_eq!(allowed["policy"], "pay-callers");
    let denied = ask("spiffe://cluster.local/ns/default/sa/stranger");
    assert_eq!(denied["allowed"], false);
    assert_eq!(denied["rule"], Value::Null);
    assert_eq!(denied["decided_by"], "default deny: no rule matches");
}

#[test]
fn an_unknown_service_says_so() {
    let e = explainer(Policy::allow_all());
    let q = Question::parse(Some("authority=nowhere")).unwrap();
    let a = e.explain(&q).unwrap();
    assert_eq!(a["service"], Value::Null);
    assert!(a["error"].as_str().unwrap().contains("nowhere"));
}
