//! `/explain`: what this sidecar would do with a request, for `ternctl explain`.
//!
//! The answer comes from the config the sidecar holds now and from the same
//! code the request path runs: [`RouteTable::lookup`](crate::router::RouteTable::lookup)
//! names the service, [`Routes::select`](crate::routes::Routes::select) the
//! rule, the balancer's view the endpoints, and
//! [`Policy::decide`](crate::authz::Policy::decide) (what
//! [`crate::authz::AuthorizeLayer`] asks) the authorization. Nothing is sent anywhere.

use std::sync::Arc;

use http::{HeaderName, HeaderValue, Request};
use serde_json::{json, Value};

use crate::authz::{PeerMatch, Rule as AuthzRule, SharedPolicy};
use crate::discovery::Labels;
use crate::router::Target;
use crate::routes::Rule;
use crate::targets::Targets;

/// What `/explain` reads: the live state of the sidecar.
#[derive(Clone)]
pub struct Explainer {
    pub targets: Arc<Targets>,
    pub inbound_authz: SharedPolicy,
    /// The local app (`--inbound-app`), for inbound requests.
    pub app: Option<Arc<Target>>,
    pub service_name: String,
}

/// The request to explain, from `/explain`'s query string.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Question {
    pub inbound: bool,
    /// The service's name or any authority naming it (outbound).
    pub authority: String,
    pub path: String,
    pub grpc: bool,
    pub headers: Vec<(String, String)>,
    /// The caller's SPIFFE id (inbound); none: a caller without an identity.
    pub caller: Option<String>,
}

impl Question {
    /// `direction=inbound|outbound&authority=&grpc=pkg.Service/Method` (or
    /// `path=`) `&header=name:value` (repeated) `&caller=spiffe://...`.
    pub fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut q = Self::default();
        for (key, value) in crate::tap::query_pairs(query) {
            match key.as_str() {
                "direction" => match value.as_str() {
                    "inbound" => q.inbound = true,
                    "outbound" => q.inbound = false,
                    d => return Err(format!("direction must be inbound or outbound, not {d:?}")),
                },
                "authority" | "service" => q.authority = value,
                "grpc" => {
                    q.grpc = true;
                    q.path = format!("/{}", value.trim_start_matches('/'));
                }
                "path" => q.path = value,
                "header" => {
                    let (name, v) = value
                        .split_once(':')
                        .or_else(|| value.split_once('='))
                        .ok_or_else(|| format!("header {value:?} is not name:value"))?;
                    q.headers
                        .push((name.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
                "caller" => q.caller = Some(value).filter(|v| !v.is_empty()),
                other => return Err(format!("unknown explain parameter {other:?}")),
            }
        }
        if !q.inbound && q.authority.is_empty() {
            return Err("an outbound request needs authority= (or service=)".into());
        }
        if q.path.is_empty() {
            q.path = "/".into();
        }
        Ok(q)
    }

    /// The request as the stack would see it (head only).
    fn request(&self) -> Result<Request<()>, String> {
        let uri = format!("http://{}{}", self.authority_or_local(), self.path);
        let mut req = Request::builder()
            .method(if self.grpc { "POST" } else { "GET" })
            .uri(&uri)
            .body(())
            .map_err(|e| format!("{uri}: {e}"))?;
        let headers = req.headers_mut();
        if self.grpc {
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
        }
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a header name"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| format!("{value:?} is not a header value"))?;
            headers.append(name, value);
        }
        Ok(req)
    }

    fn authority_or_local(&self) -> &str {
        if self.authority.is_empty() {
            "localhost"
        } else {
            &self.authority
        }
    }
}

impl Explainer {
    /// The answer, or why the question cannot be asked (a 400).
    pub fn explain(&self, q: &Question) -> Result<Value, String> {
        let req = q.request()?;
        Ok(if q.inbound {
            self.inbound(q, &req)
        } else {
            self.outbound(q, &req)
        })
    }

    fn outbound(&self, q: &Question, req: &Request<()>) -> Value {
        let table = self.targets.table();
        let Some(target) = table.load().lookup(&q.authority).cloned() else {
            return json!({
                "direction": "outbound",
                "authority": q.authority,
                "service": null,
                "error": format!("no service is known as {:?}: the request would fail with no route", q.authority),
            });
        };
        let routes = target.routes.load();
        let selected = routes.select(req).and_then(|(rule, _)| {
            Some((
                routes.rules.iter().position(|r| std::ptr::eq(r, rule))?,
                rule,
            ))
        });
        let mut answer = json!({
            "direction": "outbound",
            "authority": q.authority,
            "path": q.path,
            "service": &*target.service,
            "routes_from": routes.source,
            "load_balancer": target.balancer.algorithm(),
        });
        if let Some((index, rule)) = selected {
            answer["rule"] = json!({
                "name": rule.name,
                "index": index,
                "of": routes.rules.len(),
                "matches": rule.matches,
            });
            answer["backends"] = backends(rule);
            answer["policy"] = json!(rule.policy);
            answer["endpoints"] = endpoints(&target, rule);
        }
        answer
    }

    fn inbound(&self, q: &Question, req: &Request<()>) -> Value {
        let policy = self.inbound_authz.load();
        let grpc = crate::authz::grpc_method(req);
        let decision = policy.decide(q.caller.as_deref(), grpc);
        let decided_by = match decision.rule {
            Some(i) => policy
                .rules()
                .get(i)
                .map(|r| format!("rule {}: {}", i + 1, rule_text(r)))
                .unwrap_or_default(),
            None if policy.allows_all() && policy.name().is_none() => {
                "no AuthorizationPolicy: every caller is allowed".to_string()
            }
            None => format!(
                "default {}: no rule matches",
                if decision.allowed { "allow" } else { "deny" }
            ),
        };
        json!({
            "direction": "inbound",
            "service": self.service_name,
            "path": q.path,
            "caller": q.caller,
            "grpc_method": grpc.map(|(s, m)| format!("{s}/{m}")),
            "authorization": {
                "policy": policy.name(),
                "allowed": decision.allowed,
                "rule": decision.rule.map(|i| i + 1),
                "decided_by": decided_by,
                "rules": policy.rules().iter().map(rule_text).collect::<Vec<_>>(),
            },
            "app": self.app.as_ref().map(|a| a.balancer.endpoint_addrs()),
        })
    }
}

/// The rule's backends with each one's share of its requests.
fn backends(rule: &Rule) -> Value {
    let total: u64 = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
    if rule.backends.is_empty() || total == 0 {
        return json!([{"subset": {}, "weight": 100, "share_percent": 100.0}]);
    }
    rule.backends
        .iter()
        .map(|b| {
            json!({
                "subset": b.subset,
                "weight": b.weight,
                "share_percent": f64::from(b.weight) * 100.0 / total as f64,
            })
        })
        .collect()
}

/// The service's endpoints as the balancer sees them, each marked with the
/// rule's backends (by index) whose subset it is in.
fn endpoints(target: &Target, rule: &Rule) -> Value {
    let subsets: Vec<&Labels> = rule
        .backends
        .iter()
        .filter(|b| b.weight > 0)
        .map(|b| &b.subset)
        .collect();
    let mut eps = target.balancer.describe();
    for ep in &mut eps {
        let in_backends: Vec<usize> = if rule.backends.is_empty() {
            vec![0]
        } else {
            subsets
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    s.iter()
                        .all(|(k, v)| ep["labels"].get(k).and_then(Value::as_str) == Some(v))
                })
                .map(|(i, _)| i)
                .collect()
        };
        ep["backends"] = json!(in_backends);
    }
    json!(eps)
}

fn rule_text(r: &AuthzRule) -> String {
    let from: Vec<String> = r
        .from
        .iter()
        .map(|f| match f {
            PeerMatch::Exact(id) => format!("identity {id}"),
            PeerMatch::Namespace(ns) => format!("namespace {ns}"),
        })
        .collect();
    let methods: Vec<String> = r
        .methods
        .iter()
        .map(|m| match (&m.service, &m.method) {
            (None, _) => "any gRPC method".to_string(),
            (Some(s), None) => format!("{s}/*"),
            (Some(s), Some(m)) => format!("{s}/{m}"),
        })
        .collect();
    let methods = match methods.is_empty() {
        true => "any request".to_string(),
        false => methods.join(", "),
    };
    format!("allow {} calling {methods}", from.join(" or "))
}

#[cfg(test)]
mod tests;
