//! A snapshot pushed by the control plane, as the sidecar decodes and
//! converts it before applying anything.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tern_proto::control::v1 as pb;
use tern_proxy::config::policy::PolicyFile;
use tern_proxy::control::convert;

fuzz_target!(|data: &[u8]| {
    let Ok(snap) = pb::Snapshot::decode(data) else {
        return;
    };
    let base = PolicyFile::default()
        .validate("defaults")
        .expect("defaults validate");
    let req = http::Request::post("/tern.demo.v1.PayService/Pay")
        .header("content-type", "application/grpc")
        .header("x-canary", "1")
        .body(())
        .expect("request");
    for svc in &snap.services {
        let Ok(u) = convert::service(svc, &base) else {
            continue;
        };
        assert!(!u.name.is_empty() || svc.name.is_empty());
        assert!(u.opaque_ports.iter().all(|p| *p != 0));
        assert!(
            u.endpoints.windows(2).all(|w| w[0].addr < w[1].addr),
            "endpoints not sorted and unique"
        );
        assert!(u.routes.select(&req).is_some(), "a request without a rule");
        for rule in &u.routes.rules {
            let _ = rule.backend();
        }
        let _ = u.routes.subsets();
        let _ = serde_json::to_value(&u.routes).expect("routes serialise for /config");
    }
    if let Ok(policy) = convert::inbound(snap.inbound.as_ref()) {
        if snap.inbound.is_none() {
            assert!(policy.allows_all());
        }
        let peer = Some("spiffe://cluster.local/ns/default/sa/order");
        let _ = policy.allows(peer, Some(("tern.demo.v1.PayService", "Pay")));
        let _ = policy.allows(None, None);
    }
});
