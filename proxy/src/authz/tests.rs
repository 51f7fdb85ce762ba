#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};

use http::{StatusCode, Version};
use http_body_util::BodyExt as _;
use tower::{Layer as _, Service as _, ServiceExt};

use super::*;
use crate::access_log::AccessLog;
use crate::balance::{Balancer, ClientParams};
use crate::config::policy::ServicePolicy;
use crate::config::AccessLogTarget;
use crate::errors::PROXY_ERROR_HEADER;
use crate::router::Selector;
use crate::router::Target;
use crate::routes::Routes;
use tern_identity::ConnTls;

/// What the accept loop would put in each request of a connection with `tls`.
fn conn(tls: ConnTls) -> Arc<ConnInfo> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 4143));
    Arc::new(ConnInfo {
        tls: Some(tls),
        ..ConnInfo::new(addr, addr)
    })
}

const ORDER: &str = "spiffe://cluster.local/ns/default/sa/order";
const BILLING: &str = "spiffe://other.domain/ns/payments/sa/billing";
const PAY: (&str, &str) = ("tern.demo.v1.PayService", "Pay");
const REFUND: (&str, &str) = ("tern.demo.v1.PayService", "Refund");

fn exact(id: &str) -> PeerMatch {
    PeerMatch::Exact(SpiffeId::parse(id).unwrap())
}

fn namespace(ns: &str) -> PeerMatch {
    PeerMatch::Namespace(ns.into())
}

fn method(service: &str, method: &str) -> MethodMatch {
    MethodMatch {
        service: (!service.is_empty()).then(|| service.into()),
        method: (!method.is_empty()).then(|| method.into()),
    }
}

fn deny_unless(rules: Vec<Rule>) -> Policy {
    Policy::new(Some("pay-callers"), Action::Deny, rules)
}

fn rule(from: Vec<PeerMatch>, methods: Vec<MethodMatch>) -> Rule {
    Rule { from, methods }
}

#[test]
fn an_exact_identity_is_allowed_and_no_other() {
    let p = deny_unless(vec![rule(vec![exact(ORDER)], vec![])]);
    assert!(p.allows(Some(ORDER), Some(PAY)));
    assert!(p.allows(Some(ORDER), None), "any request, gRPC or not");
    // The trust domain is not case-sensitive; the rest is.
    assert!(p.allows(Some("spiffe://Cluster.Local/ns/default/sa/order"), None));
    assert!(!p.allows(Some("spiffe://cluster.local/ns/default/sa/Order"), None));
    assert!(!p.allows(Some("spiffe://cluster.local/ns/default/sa/inventory"), None));
    assert!(!p.allows(Some("spiffe://cluster.local/ns/default/sa/order/x"), None));
    assert!(!p.allows(Some("order"), None));
}

#[test]
fn a_namespace_matches_any_identity_in_it_of_any_trust_domain() {
    let p = deny_unless(vec![rule(vec![namespace("payments")], vec![])]);
    assert!(p.allows(Some(BILLING), Some(PAY)));
    assert!(p.allows(Some("spiffe://cluster.local/ns/payments/sa/ledger"), None));
    assert!(!p.allows(Some(ORDER), Some(PAY)));
    // "payments" as a service account, not a namespace.
    assert!(!p.allows(Some("spiffe://cluster.local/ns/default/sa/payments"), None));
}

#[test]
fn method_scoped_rules_allow_only_those_methods() {
    let p = deny_unless(vec![
        rule(vec![exact(ORDER)], vec![method(PAY.0, PAY.1)]),
        // A whole service.
        rule(
            vec![namespace("payments")],
            vec![method("tern.demo.v1.PayService", "")],
        ),
        // Every gRPC request (an empty service).
        rule(
            vec![exact("spiffe://cluster.local/ns/ops/sa/probe")],
            vec![method("", "")],
        ),
    ]);
    assert!(p.allows(Some(ORDER), Some(PAY)));
    assert!(!p.allows(Some(ORDER), Some(REFUND)));
    assert!(!p.allows(Some(ORDER), Some(("tern.demo.v1.Other", "Pay"))));
    // A request that is not gRPC has no method, so a method rule never matches.
    assert!(!p.allows(Some(ORDER), None));
    assert!(p.allows(Some(BILLING), Some(PAY)));
    assert!(p.allows(Some(BILLING), Some(REFUND)));
    assert!(!p.allows(Some(BILLING), Some(("grpc.health.v1.Health", "Check"))));
    let probe = Some("spiffe://cluster.local/ns/ops/sa/probe");
    assert!(p.allows(probe, Some(("grpc.health.v1.Health", "Check"))));
    assert!(!p.allows(probe, None));
}

#[test]
fn the_default_action_decides_what_no_rule_matches() {
    let rules = vec![rule(vec![exact(ORDER)], vec![method(PAY.0, PAY.1)])];
    let deny = Policy::new(None, Action::Deny, rules.clone());
    let allow = Policy::new(None, Action::Allow, rules);
    assert!(!deny.allows(Some(BILLING), Some(PAY)));
    assert!(allow.allows(Some(BILLING), Some(PAY)));
    assert!(allow.allows_all());
    assert!(!Policy::new(None, Action::Deny, vec![]).allows(Some(ORDER), Some(PAY)));
    assert!(Policy::allow_all().allows(None, None));
    assert!(Policy::shared().load().allows_all(), "bootstrap: allow all");
}

#[test]
fn a_plaintext_caller_has_no_identity() {
    let p = deny_unless(vec![rule(vec![namespace("default")], vec![])]);
    let req = |tls: Option<ConnTls>| {
        let mut r = Request::builder()
            .uri("/tern.demo.v1.PayService/Pay")
            .header("content-type", "application/grpc+proto")
            .body(())
            .unwrap();
        if let Some(t) = tls {
            r.extensions_mut().insert(conn(t));
        }
        r
    };
    let mtls = ConnTls {
        version: Some("TLSv1.3"),
        peer_identity: Some(Arc::from(ORDER)),
    };
    let r = req(Some(mtls));
    assert_eq!(peer_identity(&r), Some(ORDER));
    assert_eq!(grpc_method(&r), Some(PAY));
    assert!(p.allows(peer_identity(&r), grpc_method(&r)));
    for tls in [
        None,
        Some(ConnTls::plaintext()),
        // TLS without a client certificate.
        Some(ConnTls {
            version: Some("TLSv1.3"),
            peer_identity: None,
        }),
        // An identity is only believed from a TLS handshake.
        Some(ConnTls {
            version: None,
            peer_identity: Some(Arc::from(ORDER)),
        }),
    ] {
        let r = req(tls);
        assert_eq!(peer_identity(&r), None);
        assert!(!p.allows(peer_identity(&r), grpc_method(&r)));
    }
}

#[test]
fn only_grpc_requests_have_a_method() {
    let http = Request::builder()
        .uri("/tern.demo.v1.PayService/Pay")
        .body(())
        .unwrap();
    assert_eq!(grpc_method(&http), None);
    let odd = Request::builder()
        .uri("/nomethod")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    assert_eq!(grpc_method(&odd), None);
}

// ---------------------------------------------------------------- the stack

fn app_target(metrics: &Metrics) -> Arc<Target> {
    let service: Arc<str> = Arc::from("pay");
    let policy = ServicePolicy::local_app();
    let params = ClientParams::for_service(
        metrics,
        "pay",
        Default::default(),
        policy.accrual.clone(),
        false,
    );
    let app = crate::discovery::fixed(&["127.0.0.1:1".parse().unwrap()]);
    let balancer = Balancer::spawn(
        Arc::clone(&service),
        tokio::sync::watch::channel(app).1,
        params,
    );
    Arc::new(Target::new(
        service,
        balancer,
        Routes::single("app", policy),
    ))
}

/// Stands in for the local app: answers gRPC OK and counts its calls.
#[derive(Clone, Default)]
struct App(Arc<AtomicUsize>);

impl tower::Service<Request<Body>> for App {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = Ready<Result<Response<Body>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        self.0.fetch_add(1, Ordering::SeqCst);
        let rsp = Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "0")
            .body(crate::body::empty())
            .unwrap();
        std::future::ready(Ok(rsp))
    }
}

fn grpc_call(peer: Option<&str>) -> Request<Body> {
    let mut r = Request::builder()
        .version(Version::HTTP_2)
        .uri("http://pay:50051/tern.demo.v1.PayService/Pay")
        .header("content-type", "application/grpc")
        .body(crate::body::empty())
        .unwrap();
    if let Some(id) = peer {
        r.extensions_mut().insert(conn(ConnTls {
            version: Some("TLSv1.3"),
            peer_identity: Some(Arc::from(id)),
        }));
    } else {
        r.extensions_mut().insert(conn(ConnTls::plaintext()));
    }
    r
}

async fn send(
    stack: &mut crate::stack::Stack<App>,
    req: Request<Body>,
) -> (http::response::Parts, bytes::Bytes) {
    let rsp = ServiceExt::<Request<Body>>::ready(stack)
        .await
        .unwrap()
        .call(req)
        .await
        .unwrap();
    let (parts, body) = rsp.into_parts();
    (parts, body.collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn a_denied_call_is_answered_logged_and_counted_without_reaching_the_app() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let log = AccessLog::start(
        &AccessLogTarget::File(path.clone()),
        metrics.access_log_dropped.clone(),
    )
    .await
    .unwrap();
    let policy = Policy::shared();
    policy.store(Arc::new(deny_unless(vec![rule(
        vec![namespace("payments")],
        vec![],
    )])));
    let app = App::default();
    let mut stack = crate::stack::http_over(
        Direction::Inbound,
        Selector::Fixed(app_target(&metrics)),
        &metrics,
        log.clone(),
        Some(Arc::clone(&policy)),
        &Default::default(),
        None,
        None,
        None,
        app.clone(),
    );

    // A plaintext caller: trailers-only PERMISSION_DENIED.
    let (rsp, _) = send(&mut stack, grpc_call(None)).await;
    assert_eq!(rsp.status, StatusCode::OK);
    assert_eq!(rsp.headers["grpc-status"], "7");
    let msg = rsp.headers["grpc-message"].to_str().unwrap();
    assert!(
        msg.contains("service pay") && msg.contains("no client identity"),
        "{msg}"
    );
    assert!(msg.contains("tern.demo.v1.PayService/Pay"), "{msg}");
    assert!(rsp.headers.contains_key(PROXY_ERROR_HEADER));
    // A caller from another namespace, named in the message.
    let (rsp, _) = send(&mut stack, grpc_call(Some(ORDER))).await;
    assert_eq!(rsp.headers["grpc-status"], "7");
    let msg = rsp.headers["grpc-message"].to_str().unwrap();
    assert!(msg.contains(ORDER) && msg.contains("pay-callers"), "{msg}");
    // An HTTP/1 caller gets 403.
    let mut http1 = Request::builder()
        .uri("http://pay/refunds")
        .body(crate::body::empty())
        .unwrap();
    http1.extensions_mut().insert(conn(ConnTls::plaintext()));
    let (rsp, body) = send(&mut stack, http1).await;
    assert_eq!(rsp.status, StatusCode::FORBIDDEN);
    assert!(String::from_utf8_lossy(&body).contains("permission denied"));
    assert_eq!(app.0.load(Ordering::SeqCst), 0, "the app saw a denied call");

    // An allowed caller goes through.
    let (rsp, _) = send(&mut stack, grpc_call(Some(BILLING))).await;
    assert_eq!(rsp.headers["grpc-status"], "0");
    assert_eq!(app.0.load(Ordering::SeqCst), 1);
    // A new policy applies to the next request.
    policy.store(Arc::new(Policy::allow_all()));
    let (rsp, _) = send(&mut stack, grpc_call(None)).await;
    assert_eq!(rsp.headers["grpc-status"], "0");
    assert_eq!(app.0.load(Ordering::SeqCst), 2);

    let text = metrics.encode().unwrap();
    assert!(
        text.contains(r#"tern_authz_denied_total{peer_identity="",service="pay"} 2"#),
        "{text}"
    );
    let by_id = format!(r#"tern_authz_denied_total{{peer_identity="{ORDER}",service="pay"}} 1"#);
    assert!(text.contains(&by_id), "{text}");
    // Responses, whatever else labels them: two PERMISSION_DENIED, one 4xx.
    let responses = |label: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("tern_responses_total{") && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(responses(r#"grpc_status="PERMISSION_DENIED""#), 2, "{text}");
    assert_eq!(responses(r#"status_class="4xx""#), 1, "{text}");

    log.as_ref().unwrap().flush().await;
    let lines = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{lines:?}");
    assert_eq!(lines[0]["grpc_status"], 7);
    assert_eq!(lines[0]["error"], "permission_denied");
    assert_eq!(lines[0]["direction"], "inbound");
    assert_eq!(lines[2]["status"], 403);
    assert_eq!(lines[3]["grpc_status"], 0);
}

#[tokio::test]
async fn outbound_requests_are_not_checked() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let policy = Policy::shared();
    policy.store(Arc::new(deny_unless(vec![])));
    let app = App::default();
    let layer = AuthorizeLayer::new(Direction::Outbound, Some(policy), metrics);
    let rsp = layer
        .layer(app.clone())
        .oneshot(grpc_call(None))
        .await
        .unwrap();
    assert_eq!(rsp.headers()["grpc-status"], "0");
    assert_eq!(app.0.load(Ordering::SeqCst), 1);
}
