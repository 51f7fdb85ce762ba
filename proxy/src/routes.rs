//! Routes of one service: which rule a request falls under, and where it goes.
//!
//! A rule matches by gRPC service/method, path prefix and headers; it names
//! weighted backends (endpoint subsets selected by labels, e.g. 10% to
//! `version: v2`) and the retry and timeout policy of its requests. Rules are
//! tried in order; the last one matches everything, so every request has a
//! rule. The whole set is replaced at once when the control plane pushes a
//! new version.

use std::sync::Arc;

use http::Request;
use serde::Serialize;
use tower::retry::budget::TpsBudget;

use crate::config::policy::ServicePolicy;
use crate::discovery::Labels;

pub use tern_proto::MAX_BUDGET_MIN_PER_SECOND;

#[derive(Debug, Serialize)]
pub struct Routes {
    /// Where these routes came from (`bootstrap`, or the TrafficPolicy's name).
    pub source: String,
    pub rules: Vec<Rule>,
    /// One retry budget per rule, with the rule's own limits; a push that
    /// leaves a rule's limits alone keeps its budget (and what it has spent).
    #[serde(skip)]
    budgets: Vec<Arc<TpsBudget>>,
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

    /// Policies are validated before they get here; a budget floor above
    /// [`MAX_BUDGET_MIN_PER_SECOND`] is capped rather than trusted to be, as
    /// `TpsBudget::new` panics on one of `i32::MAX` or more.
    pub fn new(source: &str, rules: Vec<Rule>) -> Self {
        let budgets = rules
            .iter()
            .map(|r| {
                let p = &r.policy.retry;
                Arc::new(TpsBudget::new(
                    p.budget_ttl,
                    p.budget_min_per_second.min(MAX_BUDGET_MIN_PER_SECOND),
                    p.budget_percent,
                ))
            })
            .collect();
        Self {
            source: source.to_string(),
            rules,
            budgets,
        }
    }

    /// Keeps the budgets of `old`'s rules whose name and limits are unchanged,
    /// so a config push does not hand out a fresh reserve of retries.
    pub fn keep_budgets_from(&mut self, old: &Routes) {
        for (i, rule) in self.rules.iter().enumerate() {
            let same = old
                .rules
                .iter()
                .position(|o| o.name == rule.name && same_budget(o, rule));
            if let Some(j) = same {
                self.budgets[i] = Arc::clone(&old.budgets[j]);
            }
        }
    }

    /// The first rule that matches `req`, with its retry budget.
    pub fn select<B>(&self, req: &Request<B>) -> Option<(&Rule, &TpsBudget)> {
        let i = self.position(req)?;
        Some((self.rules.get(i)?, self.budgets.get(i)?))
    }

    fn position<B>(&self, req: &Request<B>) -> Option<usize> {
        let i = self
            .rules
            .iter()
            .position(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(req)))
            .or(self.rules.len().checked_sub(1))?;
        // One budget per rule, built together: this holds for both.
        (i < self.budgets.len()).then_some(i)
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

fn same_budget(a: &Rule, b: &Rule) -> bool {
    let (a, b) = (&a.policy.retry, &b.policy.retry);
    a.budget_ttl == b.budget_ttl
        && a.budget_min_per_second == b.budget_min_per_second
        && a.budget_percent == b.budget_percent
}

/// The rule a request falls under, chosen once when it is routed, with the
/// backend drawn for it: every attempt stays within the split it was given.
#[derive(Clone)]
pub struct SelectedRule {
    routes: Arc<Routes>,
    index: usize,
    /// Index into the rule's backends; `None`: every endpoint.
    backend: Option<usize>,
}

impl SelectedRule {
    /// The rule of `routes` that matches `req`; `None` only for a rule set without rules.
    pub fn select<B>(routes: Arc<Routes>, req: &Request<B>) -> Option<Self> {
        let index = routes.position(req)?;
        let backend = routes.rules.get(index)?.backend_index();
        Some(Self {
            routes,
            index,
            backend,
        })
    }

    pub fn rule(&self) -> &Rule {
        // `select` checked the index against these very routes.
        &self.routes.rules[self.index]
    }

    pub fn budget(&self) -> &TpsBudget {
        &self.routes.budgets[self.index]
    }

    /// The endpoints to pick from: the drawn backend's subset, `None` for all.
    pub fn subset(&self) -> Option<&Labels> {
        let b = self.rule().backends.get(self.backend?)?;
        (!b.subset.is_empty()).then_some(&b.subset)
    }
}

impl Rule {
    /// A backend drawn with probability weight/total; `None` means all endpoints.
    pub fn backend(&self) -> Option<&Labels> {
        let b = self.backends.get(self.backend_index()?)?;
        (!b.subset.is_empty()).then_some(&b.subset)
    }

    fn backend_index(&self) -> Option<usize> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut roll = fastrand::u64(..total);
        for (i, b) in self.backends.iter().enumerate() {
            let weight = u64::from(b.weight);
            if roll < weight {
                return Some(i);
            }
            roll -= weight;
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
                .0
                .name,
            "canary-header"
        );
        assert_eq!(
            r.select(&req("/tern.demo.v1.PayService/Refund", &[]))
                .unwrap()
                .0
                .name,
            "refunds"
        );
        assert_eq!(
            r.select(&req("/tern.demo.v1.PayService/Pay", &[("x-canary", "0")]))
                .unwrap()
                .0
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

    #[test]
    fn huge_budget_floors_and_weights_do_not_panic() {
        let mut p = policy();
        p.retry.budget_min_per_second = u32::MAX;
        let rule = Rule {
            name: "r".into(),
            matches: vec![],
            backends: vec![
                Backend {
                    subset: v("v1"),
                    weight: u32::MAX,
                },
                Backend {
                    subset: v("v2"),
                    weight: 101,
                },
            ],
            policy: p,
        };
        let r = Routes::new("test", vec![rule]);
        assert!(r.rules[0].backend().is_some());
    }
}
