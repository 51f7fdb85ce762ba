//! The validated config model in the push API's protobuf shape.
//!
//! Only shape changes here: every decision (inheritance, defaults left to
//! the sidecar, reserved names) was made during validation.

use std::collections::HashMap;
use std::time::Duration;

use tern_proto::control::v1 as pb;

use crate::config::{self, MeshConfig, ServiceKey};

pub fn service_fields(sc: &mut pb::ServiceConfig, s: &config::Service) {
    sc.declared = true;
    sc.protocol = match s.protocol {
        config::Protocol::Grpc => pb::Protocol::Grpc,
        config::Protocol::Http => pb::Protocol::Http,
    } as i32;
    sc.ports = s
        .ports
        .iter()
        .map(|p| pb::Port {
            name: p.name.clone().unwrap_or_default(),
            port: u32::from(p.port),
            opaque: p.opaque,
        })
        .collect();
    sc.virtual_ip = s.virtual_ip.map(|ip| ip.to_string()).unwrap_or_default();
    sc.virtual_ips = s
        .virtual_ip
        .iter()
        .chain(&s.more_virtual_ips)
        .map(ToString::to_string)
        .collect();
    sc.dns_name = s.dns_name.clone().unwrap_or_default();
}

/// `port → targetPort` of a Service's ports where the two differ, in the
/// push API's shape (the endpoints carry it, see `Endpoint.target_ports`).
pub fn target_ports(s: &config::Service) -> HashMap<u32, u32> {
    s.ports
        .iter()
        .filter_map(|p| Some((u32::from(p.port), u32::from(p.target_port?))))
        .collect()
}

/// The routing a service gets: its TrafficPolicy, or a lone catch-all route
/// that leaves everything to the sidecar's defaults.
pub fn traffic(policy: Option<&config::TrafficPolicy>) -> pb::TrafficPolicy {
    let Some(p) = policy else {
        return pb::TrafficPolicy {
            name: String::new(),
            load_balancer: pb::LoadBalancer::Unspecified as i32,
            failure_accrual: None,
            routes: vec![pb::Route {
                name: config::DEFAULT_ROUTE.to_owned(),
                ..Default::default()
            }],
        };
    };
    pb::TrafficPolicy {
        name: p.name.clone(),
        load_balancer: match p.load_balancer {
            None => pb::LoadBalancer::Unspecified,
            Some(config::LoadBalancer::RoundRobin) => pb::LoadBalancer::RoundRobin,
            Some(config::LoadBalancer::P2cEwma) => pb::LoadBalancer::P2cEwma,
            Some(config::LoadBalancer::LeastRequest) => pb::LoadBalancer::LeastRequest,
        } as i32,
        failure_accrual: p.failure_accrual.as_ref().map(|f| pb::FailureAccrual {
            consecutive_failures: f.consecutive_failures,
            backoff_min_ms: f.backoff_min.map(millis),
            backoff_max_ms: f.backoff_max.map(millis),
        }),
        routes: p.routes.iter().map(route).collect(),
    }
}

fn route(r: &config::Route) -> pb::Route {
    pb::Route {
        name: r.name.clone(),
        matches: r.matches.iter().map(route_match).collect(),
        backends: r
            .backends
            .iter()
            .map(|b| pb::WeightedBackend {
                subset: b
                    .subset
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                weight: b.weight,
            })
            .collect(),
        retry: r.retry.as_ref().map(|x| pb::RetryPolicy {
            max_attempts: x.max_attempts,
            retryable_grpc_codes: x.retryable_codes.clone(),
            per_try_timeout_ms: x.per_try_timeout.map(millis),
            budget_percent: x.budget_percent,
            budget_min_per_second: x.budget_min_per_second,
            backoff_base_ms: x.backoff_base.map(millis),
            backoff_max_ms: x.backoff_max.map(millis),
        }),
        timeout_ms: r.timeout.map(millis),
    }
}

fn route_match(m: &config::RouteMatch) -> pb::RouteMatch {
    pb::RouteMatch {
        grpc: m.grpc.as_ref().map(grpc_method),
        path_prefix: m.path_prefix.clone().unwrap_or_default(),
        headers: m
            .headers
            .iter()
            .map(|h| pb::HeaderMatch {
                name: h.name.clone(),
                value: Some(match &h.value {
                    config::HeaderValue::Exact(v) => pb::header_match::Value::Exact(v.clone()),
                    config::HeaderValue::Prefix(v) => pb::header_match::Value::Prefix(v.clone()),
                    config::HeaderValue::Present => pb::header_match::Value::Present(true),
                }),
            })
            .collect(),
    }
}

fn grpc_method(g: &config::GrpcMethod) -> pb::GrpcMethod {
    pb::GrpcMethod {
        service: g.service.clone().unwrap_or_default(),
        method: g.method.clone().unwrap_or_default(),
    }
}

/// The inbound policy of a service without an AuthorizationPolicy: no
/// rules, and the mesh-wide default (`--authz-default`) decides every call.
pub fn no_policy(mesh_default: config::Action) -> pb::InboundPolicy {
    pb::InboundPolicy {
        name: String::new(),
        default_action: action(mesh_default) as i32,
        rules: Vec::new(),
    }
}

fn action(a: config::Action) -> pb::Action {
    match a {
        config::Action::Allow => pb::Action::Allow,
        config::Action::Deny => pb::Action::Deny,
    }
}

/// A workload's inbound authorization; with no policy, `mesh_default` decides.
pub fn inbound(
    config: &MeshConfig,
    key: &ServiceKey,
    mesh_default: config::Action,
) -> pb::InboundPolicy {
    let Some(p) = config.authorization.get(key) else {
        return no_policy(mesh_default);
    };
    pb::InboundPolicy {
        name: p.name.clone(),
        default_action: action(p.default_action) as i32,
        rules: p
            .rules
            .iter()
            .map(|r| pb::AuthorizationRule {
                from: r
                    .from
                    .iter()
                    .map(|f| pb::IdentityMatch {
                        kind: Some(match f {
                            config::IdentityMatch::Exact(id) => {
                                pb::identity_match::Kind::Exact(id.clone())
                            }
                            config::IdentityMatch::Namespace(ns) => {
                                pb::identity_match::Kind::Namespace(ns.clone())
                            }
                        }),
                    })
                    .collect(),
                methods: r.methods.iter().map(grpc_method).collect(),
            })
            .collect(),
    }
}

pub fn labels(l: &std::collections::BTreeMap<String, String>) -> HashMap<String, String> {
    l.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
