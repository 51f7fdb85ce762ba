//! Golden metrics from a Prometheus server that scrapes the sidecars: the
//! recording rules' expressions (manifests/prometheus/rules.yaml) over the
//! chosen window, as instant queries on its HTTP API.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

use crate::admin_client;
use crate::golden::Golden;

pub struct Client {
    url: String,
}

/// Which series a result belongs to: service and route (`None`: all routes).
type Series = (String, Option<String>);

impl Client {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_string(),
        }
    }

    /// Every golden metric of `direction` over `window`, per service and per route.
    pub async fn golden(&self, window: Duration, direction: &str) -> anyhow::Result<Vec<Golden>> {
        let w = format!("{}s", window.as_secs().max(1));
        let mut rows: BTreeMap<Series, Golden> = BTreeMap::new();
        for by in ["service, route", "service"] {
            let sel = format!("direction=\"{direction}\"");
            let responses = format!("rate(tern_responses_total{{{sel}}}[{w}])");
            let ratio = |matcher: &str| {
                format!(
                    "sum by ({by}) (rate(tern_responses_total{{{sel}, {matcher}}}[{w}]) or {responses} * 0) / sum by ({by}) ({responses})"
                )
            };
            let quantile = |q: &str| {
                format!("histogram_quantile({q}, sum by ({by}, le) (rate(tern_request_duration_seconds_bucket{{{sel}}}[{w}])))")
            };
            let rate = format!("sum by ({by}) ({responses})");
            let success = ratio("status_class!=\"5xx\", grpc_status=~\"|OK\"");
            let mtls = ratio("tls=\"true\"");
            for (series, v) in self.query(&rate).await? {
                let row = entry(&mut rows, &series, direction);
                row.rps = v;
                row.responses = v * window.as_secs_f64();
            }
            for (series, v) in self.query(&success).await? {
                entry(&mut rows, &series, direction).success = v.is_finite().then_some(v);
            }
            for (series, v) in self.query(&mtls).await? {
                entry(&mut rows, &series, direction).mtls = v.is_finite().then_some(v);
            }
            for (q, set) in [
                (
                    "0.50",
                    (|r, v| r.p50_ms = v) as fn(&mut Golden, Option<f64>),
                ),
                ("0.95", |r, v| r.p95_ms = v),
                ("0.99", |r, v| r.p99_ms = v),
            ] {
                for (series, v) in self.query(&quantile(q)).await? {
                    set(
                        entry(&mut rows, &series, direction),
                        v.is_finite().then_some(v * 1000.0),
                    );
                }
            }
        }
        let mut rows: Vec<Golden> = rows.into_values().collect();
        rows.sort_by(|a, b| (&a.service, &a.route).cmp(&(&b.service, &b.route)));
        Ok(rows)
    }

    /// An instant query: each series' labels and value.
    async fn query(&self, promql: &str) -> anyhow::Result<Vec<(Series, f64)>> {
        let (host, prefix) = admin_client::split_url(&self.url)?;
        let path = format!(
            "{prefix}/api/v1/query?query={}",
            admin_client::encode_query(promql)
        );
        let reply = admin_client::get(&host, &path).await?;
        let v: Value = serde_json::from_str(&reply.body)
            .with_context(|| format!("Prometheus answered {}: {}", reply.status, reply.body))?;
        anyhow::ensure!(
            v["status"] == "success",
            "Prometheus refused {promql}: {}",
            v["error"]
        );
        let results = v["data"]["result"].as_array().cloned().unwrap_or_default();
        Ok(results
            .iter()
            .filter_map(|r| {
                let service = r["metric"]["service"].as_str()?.to_string();
                let route = r["metric"]["route"].as_str().map(str::to_string);
                let value = r["value"][1].as_str()?.parse::<f64>().ok()?;
                Some(((service, route), value))
            })
            .collect())
    }
}

fn entry<'a>(
    rows: &'a mut BTreeMap<Series, Golden>,
    s: &Series,
    direction: &str,
) -> &'a mut Golden {
    rows.entry(s.clone()).or_insert_with(|| Golden {
        direction: direction.to_string(),
        service: s.0.clone(),
        route: s.1.clone(),
        responses: 0.0,
        rps: 0.0,
        success: None,
        p50_ms: None,
        p95_ms: None,
        p99_ms: None,
        mtls: None,
    })
}
