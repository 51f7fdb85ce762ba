//! Turning a pushed snapshot into the proxy's own types, validating as it goes.
//!
//! Everything is checked before anything is applied: a snapshot with one bad
//! value is rejected whole (NACK) and the sidecar keeps what it had.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tern_proto::control::v1 as pb;

use crate::authz;
use crate::balance::Algorithm;
use crate::config::policy::ServicePolicy;
use crate::discovery::{Endpoint, EndpointSet};
use crate::routes::{Backend, HeaderMatch, Match, Routes, Rule, MAX_BUDGET_MIN_PER_SECOND};

/// One service of a snapshot, ready to apply.
pub struct ServiceUpdate {
    pub name: String,
    pub namespace: String,
    pub endpoints: EndpointSet,
    pub routes: Routes,
    pub algorithm: Algorithm,
    pub accrual: crate::config::policy::AccrualPolicy,
    pub aliases: Vec<String>,
    /// Every virtual IP, the primary first (empty: none).
    pub virtual_ips: Vec<IpAddr>,
    /// Ports the service declares opaque TCP.
    pub opaque_ports: Vec<u16>,
}

pub fn service(svc: &pb::ServiceConfig, base: &ServicePolicy) -> Result<ServiceUpdate, String> {
    let at = |what: &str| format!("service {}.{}: {what}", svc.name, svc.namespace);
    let mut endpoints = Vec::with_capacity(svc.endpoints.len());
    for e in &svc.endpoints {
        let addr: SocketAddr = e
            .address
            .parse()
            .map_err(|_| at(&format!("endpoint {:?} is not ip:port", e.address)))?;
        let mut target_ports = BTreeMap::new();
        for (port, target) in &e.target_ports {
            match (u16::try_from(*port), u16::try_from(*target)) {
                (Ok(p), Ok(t)) if p > 0 && t > 0 => target_ports.insert(p, t),
                _ => {
                    let what =
                        format!("endpoint {addr}: target port {port} → {target} is not 1-65535");
                    return Err(at(&what));
                }
            };
        }
        endpoints.push(Endpoint {
            addr,
            labels: e.labels.clone().into_iter().collect(),
            identity: (!e.identity.is_empty()).then(|| Arc::from(e.identity.as_str())),
            target_ports,
        });
    }
    endpoints.sort();
    endpoints.dedup_by(|a, b| a.addr == b.addr);
    let virtual_ips = virtual_ips(svc).map_err(|e| at(&e))?;
    let mut opaque_ports = Vec::new();
    for p in svc.ports.iter().filter(|p| p.opaque) {
        match u16::try_from(p.port) {
            Ok(port) if port > 0 => opaque_ports.push(port),
            _ => return Err(at(&format!("port {} is not 1-65535", p.port))),
        }
    }

    let traffic = svc.traffic.clone().unwrap_or_default();
    let algorithm = match pb::LoadBalancer::try_from(traffic.load_balancer) {
        Ok(pb::LoadBalancer::P2cEwma) => Algorithm::P2cEwma,
        Ok(pb::LoadBalancer::LeastRequest) => Algorithm::LeastRequest,
        Ok(_) => Algorithm::RoundRobin,
        Err(_) => {
            return Err(at(&format!(
                "unknown load balancer {}",
                traffic.load_balancer
            )))
        }
    };
    let mut accrual = base.accrual.clone();
    if let Some(fa) = &traffic.failure_accrual {
        if let Some(n) = fa.consecutive_failures {
            accrual.consecutive_failures = n;
        }
        if let Some(ms) = fa.backoff_min_ms {
            accrual.backoff_min = Duration::from_millis(ms);
        }
        if let Some(ms) = fa.backoff_max_ms {
            accrual.backoff_max = Duration::from_millis(ms);
        }
        if accrual.backoff_min.is_zero() || accrual.backoff_max < accrual.backoff_min {
            return Err(at("failure accrual backoff_max must be ≥ backoff_min > 0"));
        }
    }

    let mut rules = Vec::with_capacity(traffic.routes.len().max(1));
    for r in &traffic.routes {
        rules.push(rule(r, base).map_err(|e| at(&format!("route {:?}: {e}", r.name)))?);
    }
    if rules.is_empty() {
        rules.push(Rule {
            name: "default".into(),
            matches: Vec::new(),
            backends: Vec::new(),
            policy: base.clone(),
        });
    }
    let source = if traffic.name.is_empty() {
        "control plane"
    } else {
        traffic.name.as_str()
    };
    let aliases = (!svc.dns_name.is_empty())
        .then(|| svc.dns_name.clone())
        .into_iter()
        .collect();
    Ok(ServiceUpdate {
        name: svc.name.clone(),
        namespace: if svc.namespace.is_empty() {
            "default".into()
        } else {
            svc.namespace.clone()
        },
        endpoints: Arc::new(endpoints),
        routes: Routes::new(source, rules),
        algorithm,
        accrual,
        aliases,
        virtual_ips,
        opaque_ports,
    })
}

fn rule(r: &pb::Route, base: &ServicePolicy) -> Result<Rule, String> {
    let mut policy = base.clone();
    if let Some(retry) = &r.retry {
        let p = &mut policy.retry;
        if let Some(n) = retry.max_attempts {
            if !(1..=10).contains(&n) {
                return Err(format!("max_attempts {n} is not between 1 and 10"));
            }
            p.max_attempts = n;
        }
        if !retry.retryable_grpc_codes.is_empty() {
            for c in &retry.retryable_grpc_codes {
                if *c > 16 || tern_proto::grpc_code::never_retried(*c) {
                    return Err(format!("gRPC code {c} cannot be retried"));
                }
            }
            p.grpc_codes = retry.retryable_grpc_codes.clone();
        }
        if let Some(ms) = retry.per_try_timeout_ms {
            policy.timeout.per_try = (ms > 0).then(|| Duration::from_millis(ms));
        }
        let p = &mut policy.retry;
        if let Some(pct) = retry.budget_percent {
            if !(0.0..=1000.0).contains(&pct) {
                return Err(format!("budget_percent {pct} is out of range"));
            }
            p.budget_percent = (pct / 100.0) as f32;
        }
        if let Some(n) = retry.budget_min_per_second {
            if n > MAX_BUDGET_MIN_PER_SECOND {
                return Err(format!(
                    "budget_min_per_second {n} is more than {MAX_BUDGET_MIN_PER_SECOND}"
                ));
            }
            p.budget_min_per_second = n;
        }
        if let Some(ms) = retry.backoff_base_ms {
            p.backoff_base = Duration::from_millis(ms);
        }
        if let Some(ms) = retry.backoff_max_ms {
            p.backoff_max = Duration::from_millis(ms);
        }
        if p.backoff_max < p.backoff_base {
            return Err("backoff_max is smaller than backoff_base".into());
        }
    }
    if let Some(ms) = r.timeout_ms {
        policy.timeout.overall = (ms > 0).then(|| Duration::from_millis(ms));
    }
    let mut matches = Vec::with_capacity(r.matches.len());
    for m in &r.matches {
        let mut headers = Vec::with_capacity(m.headers.len());
        for h in &m.headers {
            let name = h.name.to_ascii_lowercase();
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(format!("{:?} is not a header name", h.name));
            }
            headers.push(match &h.value {
                Some(pb::header_match::Value::Exact(v)) => HeaderMatch::Exact {
                    name,
                    value: v.clone(),
                },
                Some(pb::header_match::Value::Prefix(v)) => HeaderMatch::Prefix {
                    name,
                    value: v.clone(),
                },
                Some(pb::header_match::Value::Present(_)) | None => HeaderMatch::Present { name },
            });
        }
        matches.push(Match {
            grpc: m
                .grpc
                .as_ref()
                .map(|g| (g.service.clone(), g.method.clone())),
            path_prefix: (!m.path_prefix.is_empty()).then(|| m.path_prefix.clone()),
            headers,
        });
    }
    let backends: Vec<Backend> = r
        .backends
        .iter()
        .map(|b| Backend {
            subset: b.subset.clone().into_iter().collect(),
            weight: b.weight,
        })
        .collect();
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if !backends.is_empty() && total != 100 {
        return Err(format!("backend weights add up to {total}, not 100"));
    }
    Ok(Rule {
        name: r.name.clone(),
        matches,
        backends,
        policy,
    })
}

/// The snapshot's inbound authorization policy; absent means allow all.
pub fn inbound(p: Option<&pb::InboundPolicy>) -> Result<authz::Policy, String> {
    let Some(p) = p else {
        return Ok(authz::Policy::allow_all());
    };
    let at = |what: String| format!("inbound policy {:?}: {what}", p.name);
    let mut rules = Vec::with_capacity(p.rules.len());
    for (i, r) in p.rules.iter().enumerate() {
        rules.push(authz_rule(r).map_err(|e| at(format!("rule {i}: {e}")))?);
    }
    let default_action = match pb::Action::try_from(p.default_action) {
        Ok(pb::Action::Allow) => authz::Action::Allow,
        Ok(pb::Action::Deny) => authz::Action::Deny,
        // Not set: an empty policy restricts nothing (as no policy at all);
        // one with rules exists to restrict callers, so the rest is denied.
        Ok(pb::Action::Unspecified) if rules.is_empty() => authz::Action::Allow,
        Ok(pb::Action::Unspecified) => authz::Action::Deny,
        Err(_) => return Err(at(format!("unknown default action {}", p.default_action))),
    };
    Ok(authz::Policy::new(Some(&p.name), default_action, rules))
}

fn authz_rule(r: &pb::AuthorizationRule) -> Result<authz::Rule, String> {
    if r.from.is_empty() {
        return Err("names no client (from is empty)".into());
    }
    let mut from = Vec::with_capacity(r.from.len());
    for f in &r.from {
        from.push(match &f.kind {
            Some(pb::identity_match::Kind::Exact(id)) => authz::PeerMatch::Exact(
                tern_identity::SpiffeId::parse(id).map_err(|e| e.to_string())?,
            ),
            Some(pb::identity_match::Kind::Namespace(ns)) => {
                if !crate::config::is_dns_label(ns) {
                    return Err(format!("namespace {ns:?} is not a DNS label"));
                }
                authz::PeerMatch::Namespace(ns.clone())
            }
            None => return Err("a from entry names neither an identity nor a namespace".into()),
        });
    }
    let mut methods = Vec::with_capacity(r.methods.len());
    for m in &r.methods {
        if !m.service.is_empty() && !m.service.split('.').all(proto_ident) {
            return Err(format!("{:?} is not a gRPC service name", m.service));
        }
        if !m.method.is_empty() && (m.service.is_empty() || !proto_ident(&m.method)) {
            return Err(format!(
                "method {:?} of service {:?} is not a gRPC method",
                m.method, m.service
            ));
        }
        methods.push(authz::MethodMatch {
            service: (!m.service.is_empty()).then(|| m.service.clone()),
            method: (!m.method.is_empty()).then(|| m.method.clone()),
        });
    }
    Ok(authz::Rule { from, methods })
}

/// A protobuf identifier (`Pay`, one part of `tern.demo.v1.PayService`).
/// `virtual_ips`, or `virtual_ip` alone from a control plane that predates
/// the list; each parsed, duplicates dropped.
fn virtual_ips(svc: &pb::ServiceConfig) -> Result<Vec<IpAddr>, String> {
    let listed: Vec<&str> = match svc.virtual_ips.is_empty() {
        true => vec![svc.virtual_ip.as_str()],
        false => svc.virtual_ips.iter().map(String::as_str).collect(),
    };
    let mut out = Vec::new();
    for v in listed.into_iter().map(str::trim).filter(|v| !v.is_empty()) {
        let ip: IpAddr = v
            .parse()
            .map_err(|_| format!("virtual_ip {v:?} is not an IP address"))?;
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

fn proto_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
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
}
