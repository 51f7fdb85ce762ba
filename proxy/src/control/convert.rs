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
mod tests;
