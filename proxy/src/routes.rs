//! Routes of one service: which rule a request falls under, and where it goes.
//!
//! A rule matches by gRPC service/method, path prefix and headers; it names
//! weighted backends (endpoint subsets selected by labels, e.g. 10% to
//! `version: v2`) and the retry and timeout policy of its requests. Rules are
//! tried in order; the last one matches everything, so every request has a
//! rule. The whole set is replaced at once when the control plane pushes a
//! new version.

use http::Request;
use serde::Serialize;
use tower::retry::budget::TpsBudget;

use crate::config::policy::ServicePolicy;
use crate::discovery::Labels;

#[derive(Debug, Serialize)]
pub struct Routes {
    /// Where these routes came from (`bootstrap`, or the TrafficPolicy's name).
    pub source: String,
    pub rules: Vec<Rule>,
    /// Retries of every rule draw from this one budget, so they stay a bounded
    /// share of the service's traffic.
    #[serde(skip)]
    pub budget: TpsBudget,
}

#[derive(Clone, Debug, Serialize)]
pub struct Rule {
    pub name: String,
    /// Any one matching selects the rule; empty matches every request.
    pub matches: Vec<Match>,
    /// Empty: every endpoint of the service.
    pub backends: Vec<Backend>,
    pub policy: ServicePolicy,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Match {
    /// `(service, method)`; an empty part matches anything.
    pub grpc: Option<(String, String)>,
    pub path_prefix: Option<String>,
    pub headers: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderMatch {
    Exact { name: String, value: String },
    Prefix { name: String, value: String },
    Present { name: String },
}

#[derive(Clone, Debug, Serialize)]
pub struct Backend {
    pub subset: Labels,
    pub weight: u32,
}

impl Routes {
    /// One rule for every request, to every endpoint.
    pub fn single(source: &str, policy: ServicePolicy) -> Self {
        Self::new(
            source,
            vec![Rule {
                name: "default".into(),
                matches: Vec::new(),
                backends: Vec::new(),
                policy,
            }],
        )
    }

    /// `rules` must not be empty; the budget follows the last (default) rule.
    pub fn new(source: &str, rules: Vec<Rule>) -> Self {
        let budget = match rules.last() {
            Some(r) => {
                let p = &r.policy.retry;
                TpsBudget::new(p.budget_ttl, p.budget_min_per_second, p.budget_percent)
            }
            None => TpsBudget::default(),
        };
        Self {
            source: source.to_string(),
            rules,
            budget,
        }
    }

    /// The first rule that matches `req`.
    pub fn select<B>(&self, req: &Request<B>) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(req)))
            .or(self.rules.last())
    }

    /// Every label subset a backend selects, for the balancer to keep ready.
    pub fn subsets(&self) -> Vec<Labels> {
        self.rules
            .iter()
            .flat_map(|r| r.backends.iter())
            .filter(|b| !b.subset.is_empty())
            .map(|b| b.subset.clone())
            .collect()
    }
}

impl Rule {
    /// A backend drawn with probability weight/total; `None` means all endpoints.
    pub fn backend(&self) -> Option<&Labels> {
        let total: u32 = self.backends.iter().map(|b| b.weight).sum();
        if total == 0 {
            return None;
        }
        let mut roll = fastrand::u32(..total);
        for b in &self.backends {
            if roll < b.weight {
                return (!b.subset.is_empty()).then_some(&b.subset);
            }
            roll -= b.weight;
        }
        None
    }
}

impl Match {
    pub fn matches<B>(&self, req: &Request<B>) -> bool {
        if let Some((service, method)) = &self.grpc {
            // gRPC paths are `/<service>/<method>`.
            let path = req.uri().path().strip_prefix('/').unwrap_or("");
            let Some((s, m)) = path.split_once('/') else {
                return false;
            };
            if (!service.is_empty() && s != service) || (!method.is_empty() && m != method) {
                return false;
            }
            if !crate::errors::is_grpc(req.headers()) {
                return false;
            }
        }
        if let Some(prefix) = &self.path_prefix {
            if !req.uri().path().starts_with(prefix.as_str()) {
                return false;
            }
        }
        self.headers.iter().all(|h| h.matches(req.headers()))
    }
}

impl HeaderMatch {
    fn matches(&self, headers: &http::HeaderMap) -> bool {
        let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        match self {
            Self::Exact { name, value: want } => value(name) == Some(want.as_str()),
            Self::Prefix { name, value: want } => {
                value(name).is_some_and(|v| v.starts_with(want.as_str()))
            }
            Self::Present { name } => headers.contains_key(name.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::policy::PolicyFile;

    fn policy() -> ServicePolicy {
        PolicyFile::default().validate("t").unwrap()
    }

    fn req(path: &str, headers: &[(&'static str, &'static str)]) -> Request<()> {
        let mut r = Request::builder()
            .uri(path)
            .header("content-type", "application/grpc");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    }

    fn v(version: &str) -> Labels {
        [("version".to_string(), version.to_string())]
            .into_iter()
            .collect()
    }

    fn routes() -> Routes {
        Routes::new(
            "test",
            vec![
                Rule {
                    name: "canary-header".into(),
                    matches: vec![Match {
                        headers: vec![HeaderMatch::Exact {
                            name: "x-canary".into(),
                            value: "1".into(),
                        }],
                        ..Default::default()
                    }],
                    backends: vec![Backend {
                        subset: v("v2"),
                        weight: 100,
                    }],
                    policy: policy(),
                },
                Rule {
                    name: "refunds".into(),
                    matches: vec![Match {
                        grpc: Some(("tern.demo.v1.PayService".into(), "Refund".into())),
                        ..Default::default()
                    }],
                    backends: vec![],
                    policy: policy(),
                },
                Rule {
                    name: "default".into(),
                    matches: vec![],
                    backends: vec![
                        Backend {
                            subset: v("v1"),
                            weight: 90,
                        },
                        Backend {
                            subset: v("v2"),
                            weight: 10,
                        },
                    ],
                    policy: policy(),
                },
            ],
        )
    }

    #[test]
    fn rules_match_in_order() {
        let r = routes();
        assert_eq!(
            r.select(&req("/tern.demo.v1.PayService/Pay", &[("x-canary", "1")]))
                .unwrap()
                .name,
            "canary-header"
        );
        assert_eq!(
            r.select(&req("/tern.demo.v1.PayService/Refund", &[]))
                .unwrap()
                .name,
            "refunds"
        );
        assert_eq!(
            r.select(&req("/tern.demo.v1.PayService/Pay", &[("x-canary", "0")]))
                .unwrap()
                .name,
            "default"
        );
        assert_eq!(r.subsets().len(), 3);
    }

    #[test]
    fn weights_split_traffic() {
        let r = routes();
        let rule = r.rules.last().unwrap();
        let n = 100_000;
        let v2 = (0..n).filter(|_| rule.backend() == Some(&v("v2"))).count();
        let share = v2 as f64 / n as f64;
        assert!((0.09..0.11).contains(&share), "{share}");
    }
}
