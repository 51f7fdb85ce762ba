//! What the HTTP path reads from a request to route it: the authority
//! (`:authority` or `Host`) looked up in the route table, the gRPC method
//! and the match rules of a service's routes, and the method authorization sees.
#![no_main]

use std::sync::{Arc, LazyLock};

use http::Request;
use libfuzzer_sys::fuzz_target;
use prometheus::{IntCounter, IntGauge};
use tern_proxy::authz;
use tern_proxy::balance::{Balancer, ClientParams};
use tern_proxy::config::policy::{PolicyFile, ServicePolicy};
use tern_proxy::router::{self, RouteTable, Target};
use tern_proxy::routes::{HeaderMatch, Match, Routes, Rule};

fn policy() -> ServicePolicy {
    PolicyFile::default()
        .validate("defaults")
        .expect("defaults validate")
}

fn rule(name: &str, m: Match) -> Rule {
    Rule {
        name: name.into(),
        matches: vec![m],
        backends: Vec::new(),
        policy: policy(),
    }
}

fn routes() -> Routes {
    let header = |h: HeaderMatch| Match {
        headers: vec![h],
        ..Default::default()
    };
    let grpc = Match {
        grpc: Some(("tern.demo.v1.PayService".into(), "Pay".into())),
        ..Default::default()
    };
    let prefix = Match {
        path_prefix: Some("/api/".into()),
        ..Default::default()
    };
    let rules = vec![
        rule("pay", grpc),
        rule("api", prefix),
        rule(
            "exact",
            header(HeaderMatch::Exact {
                name: "x-canary".into(),
                value: "1".into(),
            }),
        ),
        rule(
            "prefix",
            header(HeaderMatch::Prefix {
                name: "x-user".into(),
                value: "test-".into(),
            }),
        ),
        rule(
            "present",
            header(HeaderMatch::Present {
                name: "x-debug".into(),
            }),
        ),
    ];
    Routes::new("fuzz", rules)
}

static TABLE: LazyLock<RouteTable> = LazyLock::new(|| {
    let gauge = || IntGauge::new("g", "g").expect("gauge");
    let params = ClientParams {
        client: Default::default(),
        open_connections: gauge(),
        oversized: IntCounter::new("o", "o").expect("counter"),
        endpoints_gauge: None,
        accrual: policy().accrual,
        ejections: IntCounter::new("c", "c").expect("counter"),
        ejected: gauge(),
        identity: None,
    };
    let target = Arc::new(Target::new(
        "pay".into(),
        Balancer::new("pay".into(), params),
        routes(),
    ));
    let mut table = RouteTable::default();
    table.insert("default", Arc::clone(&target));
    table.alias("Pay.Example.com.", target);
    table
});

/// Line 1: the request target (path or absolute URI); line 2: the Host
/// header; then `name: value` header lines.
fn request(data: &[u8]) -> Option<Request<()>> {
    let mut lines = data.split(|b| *b == b'\n');
    let mut req = Request::builder().uri(lines.next()?);
    if let Some(host) = lines.next().filter(|h| !h.is_empty()) {
        req = req.header(http::header::HOST, host);
    }
    for line in lines {
        let i = line.iter().position(|b| *b == b':')?;
        req = req.header(&line[..i], line[i + 1..].trim_ascii());
    }
    req.body(()).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some(req) = request(data) else {
        return;
    };
    let authority = router::authority(&req);
    if let Some(a) = req.uri().authority() {
        assert_eq!(authority, a.as_str());
    }
    // Names are case-insensitive.
    let found = TABLE.lookup(authority).is_some();
    assert_eq!(
        found,
        TABLE.lookup(&authority.to_ascii_lowercase()).is_some(),
        "{authority:?}"
    );

    let routes = &TABLE
        .lookup("pay.default.svc:80")
        .expect("pay is in the table")
        .routes
        .load();
    let (rule, _) = routes.select(&req).expect("every request has a rule");
    let grpc = authz::grpc_method(&req);
    if rule.name == "pay" {
        assert_eq!(grpc, Some(("tern.demo.v1.PayService", "Pay")));
    }
    // Routing and authorization agree on which gRPC method a request calls.
    if let Some((service, method)) = grpc.filter(|(s, m)| !s.is_empty() && !m.is_empty()) {
        let own = Match {
            grpc: Some((service.into(), method.into())),
            ..Default::default()
        };
        assert!(own.matches(&req), "{service:?}/{method:?}");
    }
    for (name, value) in req.headers() {
        let Ok(value) = value.to_str() else { continue };
        let exact = HeaderMatch::Exact {
            name: name.as_str().into(),
            value: value.into(),
        };
        let m = Match {
            headers: vec![exact],
            ..Default::default()
        };
        // The first value of a repeated header is the one matched.
        if req.headers().get(name).and_then(|v| v.to_str().ok()) == Some(value) {
            assert!(m.matches(&req), "{name}: {value:?}");
        }
    }
});
