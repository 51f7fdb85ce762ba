#![allow(clippy::unwrap_used)]

use http_body_util::BodyExt;

use super::*;

fn tap(headers: &[&str]) -> Tap {
    let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    Tap::new(&headers, &prometheus::Registry::new()).unwrap()
}

fn finished(route: &str, status: u16, grpc: Option<u32>) -> Finished<'_> {
    Finished {
        direction: Direction::Outbound,
        service: "pay",
        route,
        status,
        grpc_status: grpc,
        latency_ms: 1.5,
        peer_identity: Some("spiffe://cluster.local/ns/default/sa/pay"),
        tls: Some("TLSv1.3"),
        attempts: 1,
        upstream: None,
        error: None,
    }
}

fn request(path: &str) -> Request<()> {
    Request::builder()
        .uri(format!("http://pay:50051{path}"))
        .header("content-type", "application/grpc")
        .header("authorization", "Bearer secret")
        .header("x-canary", "1")
        .body(())
        .unwrap()
}

async fn next_line(body: &mut Body) -> serde_json::Value {
    let frame = body.frame().await.unwrap().unwrap();
    serde_json::from_slice(frame.data_ref().unwrap()).unwrap()
}

#[tokio::test]
async fn nothing_is_captured_while_nobody_taps() {
    let t = tap(&["x-canary"]);
    assert!(!t.active());
    assert!(t.start(&request("/a.B/C")).is_none());
    let body = t.stream(Filter::default());
    assert!(t.active());
    drop(body);
    assert!(!t.active(), "a client leaving unregisters it");
}

#[tokio::test]
async fn events_carry_allowlisted_headers_only_and_match_the_filter() {
    let t = tap(&["x-canary", "content-type"]);
    let filter = Filter::parse(Some("route=tern.test.v1.Echo&status=OK")).unwrap();
    let mut body = t.stream(filter);
    assert_eq!(next_line(&mut body).await["tapping"], true);
    for (path, grpc) in [
        ("/other.Svc/Call", Some(0)),
        ("/tern.test.v1.Echo/Unary", Some(14)),
        ("/tern.test.v1.Echo/Unary", Some(0)),
    ] {
        let started = t.start(&request(path)).unwrap();
        let route = &path[1..];
        t.finish(*started, finished(route, 200, grpc));
    }
    let ev = next_line(&mut body).await;
    assert_eq!(ev["route"], "tern.test.v1.Echo/Unary");
    assert_eq!(ev["grpc_status"], 0);
    assert_eq!(ev["authority"], "pay:50051");
    let headers = ev["headers"].as_object().unwrap();
    assert_eq!(headers.len(), 2, "{ev}");
    assert_eq!(headers["x-canary"], "1");
    assert!(!ev.to_string().contains("secret"), "{ev}");
}

#[tokio::test]
async fn a_slow_client_loses_events_and_is_told() {
    let registry = prometheus::Registry::new();
    let t = Tap::new(&[], &registry).unwrap();
    let mut body = t.stream(Filter::default());
    next_line(&mut body).await;
    for _ in 0..BUFFER + 10 {
        let started = t.start(&request("/a.B/C")).unwrap();
        t.finish(*started, finished("a.B/C", 200, Some(0)));
    }
    assert_eq!(next_line(&mut body).await["dropped"], 10);
    assert_eq!(t.inner.dropped.get(), 10);
    assert_eq!(next_line(&mut body).await["route"], "a.B/C");
}

#[test]
fn filters_parse_and_match() {
    assert!(Filter::parse(Some("direction=sideways")).is_err());
    assert!(Filter::parse(Some("colour=red")).is_err());
    let f = Filter::parse(Some("direction=outbound&peer=pay&status=2xx")).unwrap();
    let ev = |status, grpc, peer: &str| Event {
        time: String::new(),
        direction: "outbound",
        service: "pay".into(),
        route: "a.B/C".into(),
        method: "POST".into(),
        authority: "pay".into(),
        path: "/a.B/C".into(),
        status,
        grpc_status: grpc,
        latency_ms: 0.0,
        peer_identity: Some(peer.to_string()),
        tls: None,
        attempts: 1,
        upstream: None,
        error: None,
        headers: BTreeMap::new(),
    };
    let pay = "spiffe://cluster.local/ns/default/sa/pay";
    assert!(f.matches(&ev(200, Some(0), pay)));
    assert!(!f.matches(&ev(503, None, pay)));
    assert!(!f.matches(&ev(
        200,
        Some(0),
        "spiffe://cluster.local/ns/default/sa/paying"
    )));
    let f = Filter::parse(Some("status=unavailable")).unwrap();
    assert!(f.matches(&ev(200, Some(14), pay)));
    assert!(!f.matches(&ev(200, Some(0), pay)));
    let f = Filter::parse(Some("status=14&route=%2Fa.B%2FC")).unwrap();
    assert!(f.matches(&ev(200, Some(14), pay)));
    let f = Filter::parse(Some("route=a.B")).unwrap();
    assert!(f.matches(&ev(200, Some(0), pay)));
    let f = Filter::parse(Some("route=a.Bx")).unwrap();
    assert!(!f.matches(&ev(200, Some(0), pay)));
}
