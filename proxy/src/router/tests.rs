//! Target selection per listener kind, and the route table's names.
#![allow(clippy::unwrap_used)]
use super::*;
use crate::serve::ConnInfo;
use tower::{Layer as _, Service as _, ServiceExt as _};

type Seen = (
    Option<Vec<SocketAddr>>,
    Option<SocketAddr>,
    Option<HeaderValue>,
);

/// Routes `req` and reports the target's endpoints, the pinned endpoint
/// and the DST_PORT header the layers below would see.
async fn route(selector: &Selector, req: Request<()>) -> Seen {
    let probe = tower::service_fn(|req: Request<()>| async move {
        let routed = Routed::of(&req);
        Ok::<Seen, std::convert::Infallible>((
            routed.map(|r| r.target.balancer.endpoint_addrs()),
            routed.and_then(|r| r.pinned),
            req.headers().get(DST_PORT).cloned(),
        ))
    });
    let mut svc = RouteLayer::new(selector.clone(), None).layer(probe);
    svc.ready().await.unwrap().call(req).await.unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn intercepted_requests_follow_their_destination() {
    let metrics = Arc::new(crate::metrics::Metrics::new().unwrap());
    let target = |name: &str, a: &str| {
        crate::inbound::app_target(name, addr(a), Default::default(), &metrics)
    };
    let (pay, web) = (
        target("pay", "10.1.0.7:4143"),
        target("web", "10.1.0.9:4143"),
    );
    let mut table = RouteTable::default();
    table.insert("default", Arc::clone(&web));
    let outbound = Selector::Intercepted(Arc::new(ArcSwap::from_pointee(table)));
    let dest = Destination {
        target: Arc::clone(&pay),
        endpoint: Some(addr("10.1.0.7:4143")),
        port: Some(50051),
    };
    let with_dest = |authority: &str| {
        let mut req = Request::builder()
            .uri(format!("http://{authority}/x"))
            .header(DST_PORT, "4191")
            .body(())
            .unwrap();
        let a = addr("127.0.0.1:40000");
        req.extensions_mut().insert(Arc::new(ConnInfo {
            dest: Some(dest.clone()),
            ..ConnInfo::new(a, addr("127.0.0.1:4140"))
        }));
        req
    };
    // The pod IP the app dialed: that endpoint, and the port goes along
    // (a header the app sent is replaced).
    let (eps, pinned, port) = route(&outbound, with_dest("10.1.0.7:50051")).await;
    assert_eq!(eps.unwrap(), [addr("10.1.0.7:4143")]);
    assert_eq!(pinned, Some(addr("10.1.0.7:4143")));
    assert_eq!(port.unwrap(), "50051");
    // An authority naming a known service wins.
    let (eps, pinned, port) = route(&outbound, with_dest("web:80")).await;
    assert_eq!(eps.unwrap(), [addr("10.1.0.9:4143")]);
    assert_eq!((pinned, port), (None, None));

    let served = crate::config::ports::PortSet::parse(&[crate::config::ports::PortItem::Text(
        "8080,9000,4191".into(),
    )])
    .unwrap();
    let app = target("pay", "127.0.0.1:8080");
    let ports = crate::inbound::AppPorts::new(
        "pay",
        Default::default(),
        Arc::clone(&metrics),
        &served,
        &[4143, 4191],
        Some((addr("127.0.0.1:8080"), Arc::clone(&app))),
    );
    let inbound = Selector::Local {
        app: Some(app),
        ports: Some(ports),
    };
    let named = |port: &str| {
        let mut req = Request::builder().header(DST_PORT, port).body(()).unwrap();
        req.extensions_mut().insert(Arc::new(ConnInfo::new(
            addr("10.1.0.9:40000"),
            addr("10.1.0.7:4143"),
        )));
        req
    };
    // A served port, at the pod IP the connection came in on.
    let (eps, _, port) = route(&inbound, named("9000")).await;
    assert_eq!(eps.unwrap(), [addr("10.1.0.7:9000")]);
    assert_eq!(port, None, "the header never reaches the app");
    // --inbound-app's port goes where it says.
    let (eps, ..) = route(&inbound, named("8080")).await;
    assert_eq!(eps.unwrap(), [addr("127.0.0.1:8080")]);
    let (eps, ..) = route(&inbound, Request::new(())).await;
    assert_eq!(eps.unwrap(), [addr("127.0.0.1:8080")]);
    // A port the app does not serve, and the sidecar's own ports even when
    // listed, are not a destination.
    assert_eq!(route(&inbound, named("6060")).await.0, None);
    assert_eq!(route(&inbound, named("4191")).await.0, None);
    let refused = metrics
        .protocol_rejections
        .with_label_values(&["inbound", "port_not_served"])
        .get();
    assert_eq!(refused, 2);
}

#[test]
fn a_service_port_is_named_as_the_endpoints_target_port() {
    let mut e = crate::discovery::Endpoint::new(addr("10.1.0.7:4143"));
    e.target_ports.insert(80, 8080);
    let gauge = prometheus::IntGauge::new("g", "g").unwrap();
    let counter = prometheus::IntCounter::new("c", "c").unwrap();
    let ep = EndpointClient::new("web".into(), e, Default::default(), gauge, counter, None);
    let named = |port: &str, pinned: bool| {
        let mut req = Request::builder().header(DST_PORT, port).body(()).unwrap();
        name_target_port(&mut req, &ep, pinned);
        req.headers().get(DST_PORT).cloned().unwrap()
    };
    assert_eq!(named("80", false), "8080", "dialed on the virtual IP");
    assert_eq!(named("9000", false), "9000", "no mapping: as dialed");
    assert_eq!(named("80", true), "80", "dialed at the pod's own IP");
    let mut req = Request::new(());
    name_target_port(&mut req, &ep, false);
    assert_eq!(
        req.headers().get(DST_PORT),
        None,
        "nothing named, nothing added"
    );
}

#[test]
fn ports_are_stripped() {
    assert_eq!(strip_port("pay:50051"), "pay");
    assert_eq!(strip_port("pay"), "pay");
    assert_eq!(strip_port("[::1]:80"), "::1");
    assert_eq!(
        strip_port("pay.default.svc.cluster.local:50051"),
        "pay.default.svc.cluster.local"
    );
}
