//! Validating a `TrafficPolicy` spec: routes, matches, weighted backends,
//! retries, timeouts, load balancer and failure accrual.
//!
//! The policy-wide `backends`, `retries` and `timeout` are folded into each
//! route that does not set its own, and close the list as the catch-all
//! route, so a sidecar never has to merge two levels of settings.

use std::collections::BTreeSet;

use super::validate::{labels, At};
use super::{names, raw, DEFAULT_ROUTE};
use super::{
    Backend, ConfigError, FailureAccrual, GrpcMethod, HeaderMatch, HeaderValue, LoadBalancer,
    Retry, Route, RouteMatch, TrafficPolicy,
};

use tern_proto::MAX_BUDGET_MIN_PER_SECOND;

pub fn policy(
    at: &At,
    name: &str,
    spec: &raw::TrafficPolicySpec,
) -> Result<TrafficPolicy, ConfigError> {
    let backends = match &spec.backends {
        Some(b) => self::backends(at, "spec.backends", b)?,
        None => Vec::new(),
    };
    let retry = spec
        .retries
        .as_ref()
        .map(|r| retries(at, "spec.retries", r))
        .transpose()?;
    let timeout = spec
        .timeout
        .as_deref()
        .map(|t| duration(at, "spec.timeout", t))
        .transpose()?;

    let mut routes = Vec::with_capacity(spec.routes.len() + 1);
    let mut route_names = BTreeSet::new();
    for (i, r) in spec.routes.iter().enumerate() {
        let field = format!("spec.routes[{i}]");
        let route_name = r.name.clone().unwrap_or_else(|| format!("route-{i}"));
        names::dns_subdomain(&route_name).map_err(|m| at.err(format!("{field}.name"), m))?;
        if route_name == DEFAULT_ROUTE {
            return Err(at.err(
                format!("{field}.name"),
                "`default` is reserved for the catch-all route (the policy-wide settings)",
            ));
        }
        if !route_names.insert(route_name.clone()) {
            return Err(at.err(
                format!("{field}.name"),
                format!("duplicate route name `{route_name}`"),
            ));
        }
        let matches = match &r.matches {
            Some(list) if list.is_empty() => {
                return Err(at.err(
                    format!("{field}.match"),
                    "is empty; leave it out to match every request",
                ))
            }
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(j, m)| route_match(at, &format!("{field}.match[{j}]"), m))
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        routes.push(Route {
            name: route_name,
            matches,
            backends: match &r.backends {
                Some(b) => self::backends(at, &format!("{field}.backends"), b)?,
                None => backends.clone(),
            },
            retry: match &r.retries {
                Some(x) => Some(retries(at, &format!("{field}.retries"), x)?),
                None => retry.clone(),
            },
            timeout: match &r.timeout {
                Some(t) => Some(duration(at, &format!("{field}.timeout"), t)?),
                None => timeout,
            },
        });
    }
    routes.push(Route {
        name: DEFAULT_ROUTE.to_owned(),
        matches: Vec::new(),
        backends,
        retry,
        timeout,
    });

    Ok(TrafficPolicy {
        name: name.to_owned(),
        load_balancer: spec.load_balancer.map(|lb| match lb {
            raw::LoadBalancer::RoundRobin => LoadBalancer::RoundRobin,
            raw::LoadBalancer::P2cEwma => LoadBalancer::P2cEwma,
            raw::LoadBalancer::LeastRequest => LoadBalancer::LeastRequest,
        }),
        failure_accrual: spec
            .failure_accrual
            .as_ref()
            .map(|f| failure_accrual(at, f))
            .transpose()?,
        routes,
    })
}

fn route_match(at: &At, field: &str, m: &raw::MatchSpec) -> Result<RouteMatch, ConfigError> {
    if m.grpc.is_some() && m.path_prefix.is_some() {
        return Err(at.err(
            field,
            "set grpc or pathPrefix, not both (a gRPC method is a path)",
        ));
    }
    if m.grpc.is_none() && m.path_prefix.is_none() && m.headers.is_empty() {
        return Err(at.err(
            field,
            "matches nothing in particular; set grpc, pathPrefix or headers",
        ));
    }
    let grpc = m
        .grpc
        .as_ref()
        .map(|g| grpc_method(at, &format!("{field}.grpc"), g))
        .transpose()?;
    if let Some(p) = &m.path_prefix {
        if !p.starts_with('/') {
            return Err(at.err(
                format!("{field}.pathPrefix"),
                format!("`{p}` must start with '/'"),
            ));
        }
    }
    let mut headers = Vec::with_capacity(m.headers.len());
    for (i, h) in m.headers.iter().enumerate() {
        let field = format!("{field}.headers[{i}]");
        let name = h
            .name
            .as_deref()
            .ok_or_else(|| at.err(format!("{field}.name"), "is required"))?;
        names::header_name(name).map_err(|e| at.err(format!("{field}.name"), e))?;
        let value = match (&h.exact, &h.prefix, h.present) {
            (Some(v), None, None) => HeaderValue::Exact(v.clone()),
            (None, Some(v), None) => HeaderValue::Prefix(v.clone()),
            (None, None, Some(true)) => HeaderValue::Present,
            (None, None, Some(false)) => {
                return Err(at.err(
                    format!("{field}.present"),
                    "only `present: true` is supported",
                ))
            }
            _ => return Err(at.err(field, "set exactly one of exact, prefix or present")),
        };
        headers.push(HeaderMatch {
            name: name.to_owned(),
            value,
        });
    }
    Ok(RouteMatch {
        grpc,
        path_prefix: m.path_prefix.clone(),
        headers,
    })
}

pub fn grpc_method(
    at: &At,
    field: &str,
    g: &raw::GrpcMethodSpec,
) -> Result<GrpcMethod, ConfigError> {
    if let Some(s) = &g.service {
        names::proto_full_name(s).map_err(|e| at.err(format!("{field}.service"), e))?;
    }
    if let Some(m) = &g.method {
        if g.service.is_none() {
            return Err(at.err(format!("{field}.service"), "is required when method is set"));
        }
        names::proto_method(m).map_err(|e| at.err(format!("{field}.method"), e))?;
    }
    Ok(GrpcMethod {
        service: g.service.clone(),
        method: g.method.clone(),
    })
}

fn backends(at: &At, field: &str, list: &[raw::BackendSpec]) -> Result<Vec<Backend>, ConfigError> {
    if list.is_empty() {
        return Err(at.err(field, "is empty; leave it out to use every endpoint"));
    }
    let mut out = Vec::with_capacity(list.len());
    let mut subsets = BTreeSet::new();
    let mut total = 0u64;
    for (i, b) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let weight = b
            .weight
            .ok_or_else(|| at.err(format!("{f}.weight"), "is required"))?;
        if weight > 100 {
            return Err(at.err(format!("{f}.weight"), "must be 0-100 (a percentage)"));
        }
        let subset = labels(at, &format!("{f}.subset"), &b.subset)?;
        if !subsets.insert(subset.clone()) {
            return Err(at.err(
                format!("{f}.subset"),
                "the same subset is listed twice; add the weights together",
            ));
        }
        total += u64::from(weight);
        out.push(Backend { subset, weight });
    }
    if total != 100 {
        return Err(at.err(field, format!("weights add up to {total}, not 100")));
    }
    Ok(out)
}

fn retries(at: &At, field: &str, r: &raw::RetrySpec) -> Result<Retry, ConfigError> {
    if let Some(n) = r.max_attempts {
        if !(1..=10).contains(&n) {
            return Err(at.err(
                format!("{field}.maxAttempts"),
                "must be 1-10 (attempts in all, the first included)",
            ));
        }
    }
    let mut codes = Vec::new();
    for (i, c) in r.retryable_codes.iter().flatten().enumerate() {
        let code = names::retryable_grpc_code(c)
            .map_err(|e| at.err(format!("{field}.retryableCodes[{i}]"), e))?;
        if !codes.contains(&code) {
            codes.push(code);
        }
    }
    if r.retryable_codes.as_ref().is_some_and(|c| c.is_empty()) {
        return Err(at.err(
            format!("{field}.retryableCodes"),
            "is empty; set maxAttempts: 1 to turn retries off",
        ));
    }
    let (backoff_base, backoff_max) = match &r.backoff {
        Some(b) => {
            let base = b
                .base
                .as_deref()
                .map(|d| duration(at, &format!("{field}.backoff.base"), d))
                .transpose()?;
            let max = b
                .max
                .as_deref()
                .map(|d| duration(at, &format!("{field}.backoff.max"), d))
                .transpose()?;
            if let (Some(lo), Some(hi)) = (base, max) {
                if hi < lo {
                    return Err(at.err(format!("{field}.backoff.max"), "is smaller than base"));
                }
            }
            (base, max)
        }
        None => (None, None),
    };
    let (budget_percent, budget_min_per_second) = match &r.budget {
        Some(b) => {
            if let Some(p) = b.percent {
                if !(0.0..=100.0).contains(&p) {
                    return Err(at.err(format!("{field}.budget.percent"), "must be 0-100"));
                }
            }
            if b.min_per_second
                .is_some_and(|n| n > MAX_BUDGET_MIN_PER_SECOND)
            {
                return Err(at.err(
                    format!("{field}.budget.minPerSecond"),
                    format!("must be at most {MAX_BUDGET_MIN_PER_SECOND}"),
                ));
            }
            (b.percent, b.min_per_second)
        }
        None => (None, None),
    };
    Ok(Retry {
        max_attempts: r.max_attempts,
        retryable_codes: codes,
        per_try_timeout: r
            .per_try_timeout
            .as_deref()
            .map(|d| duration(at, &format!("{field}.perTryTimeout"), d))
            .transpose()?,
        budget_percent,
        budget_min_per_second,
        backoff_base,
        backoff_max,
    })
}

fn failure_accrual(at: &At, f: &raw::FailureAccrualSpec) -> Result<FailureAccrual, ConfigError> {
    let field = "spec.failureAccrual";
    if f.consecutive_failures == Some(0) {
        return Err(at.err(
            format!("{field}.consecutiveFailures"),
            "must be at least 1; leave failureAccrual out for the sidecar's default",
        ));
    }
    let (min, max) = match &f.backoff {
        Some(b) => (
            b.min
                .as_deref()
                .map(|d| duration(at, &format!("{field}.backoff.min"), d))
                .transpose()?,
            b.max
                .as_deref()
                .map(|d| duration(at, &format!("{field}.backoff.max"), d))
                .transpose()?,
        ),
        None => (None, None),
    };
    if let (Some(lo), Some(hi)) = (min, max) {
        if hi < lo {
            return Err(at.err(format!("{field}.backoff.max"), "is smaller than min"));
        }
    }
    Ok(FailureAccrual {
        consecutive_failures: f.consecutive_failures,
        backoff_min: min,
        backoff_max: max,
    })
}

fn duration(at: &At, field: &str, s: &str) -> Result<std::time::Duration, ConfigError> {
    names::duration(s).map_err(|e| at.err(field, e))
}
