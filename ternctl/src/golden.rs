//! The golden metrics of a window — request rate, success rate, latency
//! quantiles and mTLS share — per service and per route, from two scrapes of
//! the sidecars' `/metrics`: counter and histogram deltas, summed over
//! sidecars. Success and mTLS are counted as the Prometheus rules count them
//! (manifests/prometheus/rules.yaml): a response is a success when it is not
//! 5xx and its gRPC status, if any, is OK.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::prom_text::Sample;

/// Which series a tally belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub direction: String,
    pub service: String,
    pub route: String,
}

/// Counts of one series: cumulative since the sidecar started, or a delta.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tally {
    pub responses: f64,
    pub success: f64,
    pub tls: f64,
    /// Cumulative histogram buckets by upper bound (as `f64::to_bits`, which
    /// orders non-negative bounds as numbers).
    pub buckets: BTreeMap<u64, f64>,
}

/// Every series of one scrape (or a difference or sum of scrapes).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tallies(pub BTreeMap<Key, Tally>);

impl Tallies {
    /// The response counters and latency histograms of one scrape.
    pub fn from_samples(samples: &[Sample]) -> Self {
        let mut t = Tallies::default();
        for s in samples {
            let key = Key {
                direction: s.label("direction").to_string(),
                service: s.label("service").to_string(),
                route: s.label("route").to_string(),
            };
            match s.name.as_str() {
                "tern_responses_total" => {
                    let e = t.0.entry(key).or_default();
                    e.responses += s.value;
                    if is_success(s) {
                        e.success += s.value;
                    }
                    if s.label("tls") == "true" {
                        e.tls += s.value;
                    }
                }
                "tern_request_duration_seconds_bucket" => {
                    let Ok(le) = s.label("le").parse::<f64>() else {
                        continue;
                    };
                    let e = t.0.entry(key).or_default();
                    *e.buckets.entry(le.max(0.0).to_bits()).or_default() += s.value;
                }
                _ => {}
            }
        }
        t
    }

    /// What happened between `earlier` and `self`, scrapes of one sidecar. A
    /// counter that went down means the sidecar restarted: its whole value is new.
    pub fn since(&self, earlier: &Tallies) -> Tallies {
        let mut out = Tallies::default();
        for (key, now) in &self.0 {
            let delta = match earlier.0.get(key) {
                Some(before) if now.responses >= before.responses => Tally {
                    responses: now.responses - before.responses,
                    success: (now.success - before.success).max(0.0),
                    tls: (now.tls - before.tls).max(0.0),
                    buckets: now
                        .buckets
                        .iter()
                        .map(|(le, n)| {
                            let b = before.buckets.get(le).copied().unwrap_or(0.0);
                            (*le, (n - b).max(0.0))
                        })
                        .collect(),
                },
                _ => now.clone(),
            };
            out.0.insert(key.clone(), delta);
        }
        out
    }

    pub fn add(&mut self, other: &Tallies) {
        for (key, t) in &other.0 {
            let e = self.0.entry(key.clone()).or_default();
            e.add(t);
        }
    }

    /// The golden metrics of every series over `window_secs`, plus one row per
    /// service and direction with every route summed (`route: None`).
    pub fn golden(&self, window_secs: f64) -> Vec<Golden> {
        let mut services: BTreeMap<(String, String), Tally> = BTreeMap::new();
        let mut rows = Vec::new();
        for (key, t) in &self.0 {
            services
                .entry((key.direction.clone(), key.service.clone()))
                .or_default()
                .add(t);
            rows.push(t.golden(key, Some(key.route.clone()), window_secs));
        }
        for ((direction, service), t) in services {
            let key = Key {
                direction,
                service,
                route: String::new(),
            };
            rows.push(t.golden(&key, None, window_secs));
        }
        rows.sort_by(|a, b| {
            (&a.direction, &a.service, &a.route).cmp(&(&b.direction, &b.service, &b.route))
        });
        rows
    }
}

fn is_success(s: &Sample) -> bool {
    s.label("status_class") != "5xx" && matches!(s.label("grpc_status"), "" | "OK")
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.responses += other.responses;
        self.success += other.success;
        self.tls += other.tls;
        for (le, n) in &other.buckets {
            *self.buckets.entry(*le).or_default() += n;
        }
    }

    fn golden(&self, key: &Key, route: Option<String>, window_secs: f64) -> Golden {
        let ratio = |n: f64| (self.responses > 0.0).then(|| n / self.responses);
        Golden {
            direction: key.direction.clone(),
            service: key.service.clone(),
            route,
            responses: self.responses,
            rps: if window_secs > 0.0 {
                self.responses / window_secs
            } else {
                0.0
            },
            success: ratio(self.success),
            p50_ms: self.quantile(0.50).map(|s| s * 1000.0),
            p95_ms: self.quantile(0.95).map(|s| s * 1000.0),
            p99_ms: self.quantile(0.99).map(|s| s * 1000.0),
            mtls: ratio(self.tls),
        }
    }

    /// The `q` quantile in seconds, interpolated within its bucket as
    /// Prometheus' `histogram_quantile` does; `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let buckets: Vec<(f64, f64)> = self
            .buckets
            .iter()
            .map(|(le, n)| (f64::from_bits(*le), *n))
            .collect();
        let total = buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower = (0.0, 0.0);
        for &(le, count) in &buckets {
            if count >= rank {
                if le.is_infinite() {
                    // Above the highest bound: that bound is all that is known.
                    return Some(lower.0);
                }
                let within = count - lower.1;
                let share = if within > 0.0 {
                    (rank - lower.1) / within
                } else {
                    1.0
                };
                return Some(lower.0 + (le - lower.0) * share);
            }
            lower = (le, count);
        }
        Some(lower.0)
    }
}

/// One row of `ternctl stat`: a service (route `None`) or one of its routes.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Golden {
    pub direction: String,
    pub service: String,
    pub route: Option<String>,
    /// Responses completed in the window.
    pub responses: f64,
    /// Responses per second.
    pub rps: f64,
    /// Share of responses that succeeded, 0-1; `None` without responses.
    pub success: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Share of responses whose hop was mTLS, 0-1.
    pub mtls: Option<f64>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::prom_text::parse;

    const BEFORE: &str = "\
tern_responses_total{direction=\"inbound\",service=\"pay\",route=\"P/Pay\",status_class=\"2xx\",grpc_status=\"OK\",tls=\"true\"} 100
tern_request_duration_seconds_bucket{direction=\"inbound\",service=\"pay\",route=\"P/Pay\",le=\"0.01\"} 100
tern_request_duration_seconds_bucket{direction=\"inbound\",service=\"pay\",route=\"P/Pay\",le=\"0.1\"} 100
tern_request_duration_seconds_bucket{direction=\"inbound\",service=\"pay\",route=\"P/Pay\",le=\"+Inf\"} 100
";
    const AFTER: &str = "\
tern_responses_total{direction=\"inbound\",service=\"pay\",route=\"P/Pay\",status_class=\"2xx\",grpc_status=\"OK\",tls=\"true\"} 190
tern_responses_total{direction=\"inbound\",service=\"pay\",route=\"P/Pay\",status_class=\"2xx\",grpc_status=\"UNAVAILABLE\",tls=\"false\"} 10
tern_request_duration_seconds_bucket{direction=\"inbound\",service=\"pay\",route=\"P/Pay\",le=\"0.01\"} 150
tern_request_duration_seconds_bucket{direction=\"inbound\",service=\"pay\",route=\"P/Pay\",le=\"0.1\"} 200
tern_request_duration_seconds_bucket{direction=\"inbound\",service=\"pay\",route=\"P/Pay\",le=\"+Inf\"} 200
";

    #[test]
    fn window_deltas_give_rate_success_mtls_and_quantiles() {
        let before = Tallies::from_samples(&parse(BEFORE, "tern_"));
        let after = Tallies::from_samples(&parse(AFTER, "tern_"));
        let rows = after.since(&before).golden(10.0);
        assert_eq!(rows.len(), 2, "{rows:?}");
        let service = rows.iter().find(|r| r.route.is_none()).unwrap();
        assert_eq!(service.responses, 100.0);
        assert_eq!(service.rps, 10.0);
        assert_eq!(service.success, Some(0.9));
        assert_eq!(service.mtls, Some(0.9));
        // 50 of the 100 were at most 10ms, the rest at most 100ms.
        assert!((service.p50_ms.unwrap() - 10.0).abs() < 1e-9);
        assert!((service.p99_ms.unwrap() - 98.2).abs() < 1e-9);
    }

    #[test]
    fn a_restarted_sidecar_counts_from_zero() {
        let before = Tallies::from_samples(&parse(AFTER, "tern_"));
        let after = Tallies::from_samples(&parse(BEFORE, "tern_"));
        let rows = after.since(&before).golden(1.0);
        assert_eq!(rows[0].responses, 100.0);
    }
}
