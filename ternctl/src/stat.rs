//! `ternctl stat`: golden metrics per service and per route (gRPC method) —
//! request rate, success rate, p50/p95/p99 latency, mTLS share — over a
//! window. From Prometheus with `--prometheus URL` (PromQL over its HTTP API,
//! the recording rules' expressions), else straight from the admin
//! `/metrics` of every sidecar tern-control lists: two scrapes a window
//! apart, counter and histogram deltas. `--watch` redraws it in place.

mod prometheus;

use std::time::Duration;

use anyhow::Context as _;

use crate::golden::{Golden, Tallies};
use crate::{mesh_state, scrape};

#[derive(clap::Args, Clone)]
pub struct StatArgs {
    /// tern-control's admin listener (host:port), where the sidecars are listed.
    #[arg(long, env = "TERN_CONTROL_ADMIN", default_value = "127.0.0.1:9990")]
    control: String,
    /// Read from this Prometheus (http://host:port) instead of scraping the sidecars; it
    /// must scrape them (manifests/prometheus/scrape-config.yaml).
    #[arg(long, env = "TERN_PROMETHEUS")]
    prometheus: Option<String>,
    /// The window the numbers cover (with Prometheus: at least four scrape intervals).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    window: Duration,
    /// `inbound`: what each service served (its own sidecars); `outbound`: what its callers
    /// saw, retries included.
    #[arg(long, default_value = "inbound", value_parser = ["inbound", "outbound"])]
    direction: String,
    /// Only this service.
    #[arg(long)]
    service: Option<String>,
    /// Redraw every window, like top, until interrupted.
    #[arg(long)]
    watch: bool,
    /// `text` (a table) or `json`.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

pub async fn run(args: StatArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(
        args.window >= Duration::from_secs(1),
        "--window {}: a window is at least 1s",
        humantime::format_duration(args.window)
    );
    let mut source = Source::new(&args);
    loop {
        let rows = source.next(&args).await?;
        let rows: Vec<Golden> = rows
            .into_iter()
            .filter(|r| r.direction == args.direction)
            .filter(|r| args.service.as_ref().is_none_or(|s| *s == r.service))
            .collect();
        if args.output == "json" {
            println!(
                "{}",
                serde_json::json!({"window_s": args.window.as_secs_f64(), "rows": rows})
            );
        } else {
            if args.watch {
                // Home and clear, so each window replaces the last.
                print!("\x1b[H\x1b[2J");
            }
            print!("{}", table(&rows, &args));
        }
        if !args.watch {
            return Ok(0);
        }
    }
}

/// Where the numbers come from; scraping keeps the last scrape of each
/// sidecar, so `--watch` needs one wait per window.
enum Source {
    Prometheus(prometheus::Client),
    Sidecars(Option<Vec<(String, Tallies)>>),
}

impl Source {
    fn new(args: &StatArgs) -> Self {
        match &args.prometheus {
            Some(url) => Source::Prometheus(prometheus::Client::new(url)),
            None => Source::Sidecars(None),
        }
    }

    async fn next(&mut self, args: &StatArgs) -> anyhow::Result<Vec<Golden>> {
        match self {
            Source::Prometheus(client) => {
                if args.watch {
                    tokio::time::sleep(args.window).await;
                }
                client.golden(args.window, &args.direction).await
            }
            Source::Sidecars(last) => {
                let before = match last.take() {
                    Some(b) => b,
                    None => scrape_all(&args.control).await?,
                };
                let started = tokio::time::Instant::now();
                tokio::time::sleep(args.window).await;
                let after = scrape_all(&args.control).await?;
                let secs = started.elapsed().as_secs_f64();
                let rows = window(&before, &after).golden(secs);
                *last = Some(after);
                Ok(rows)
            }
        }
    }
}

/// One scrape of every sidecar tern-control lists, by admin address. A
/// sidecar that does not answer is left out (and `ternctl check` says why).
pub async fn scrape_all(control: &str) -> anyhow::Result<Vec<(String, Tallies)>> {
    let state = mesh_state::fetch(control)
        .await
        .context("listing the sidecars")?;
    let mut tasks = tokio::task::JoinSet::new();
    for admin in state.sidecars.into_iter().filter_map(|s| s.admin) {
        tasks.spawn(async move {
            let samples = scrape::metrics(&admin).await.ok()?;
            Some((admin, Tallies::from_samples(&samples)))
        });
    }
    let mut out = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(Some(one)) = done {
            out.push(one);
        }
    }
    Ok(out)
}

/// Everything that happened between two scrapes, summed over sidecars; a
/// sidecar new in `after` counts from its start.
pub fn window(before: &[(String, Tallies)], after: &[(String, Tallies)]) -> Tallies {
    let mut sum = Tallies::default();
    let empty = Tallies::default();
    for (admin, now) in after {
        let then = before
            .iter()
            .find(|(a, _)| a == admin)
            .map(|(_, t)| t)
            .unwrap_or(&empty);
        sum.add(&now.since(then));
    }
    sum
}

fn table(rows: &[Golden], args: &StatArgs) -> String {
    let mut out = format!(
        "{} traffic over {}{}\n{:<10} {:<36} {:>8} {:>8} {:>9} {:>9} {:>9} {:>6}\n",
        args.direction,
        humantime::format_duration(args.window),
        match &args.prometheus {
            Some(url) => format!(" (Prometheus {url})"),
            None => " (sidecars' /metrics)".into(),
        },
        "SERVICE",
        "ROUTE",
        "RPS",
        "SUCCESS",
        "P50",
        "P95",
        "P99",
        "MTLS"
    );
    let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.2}%", v * 100.0));
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}ms"));
    for r in rows {
        out.push_str(&format!(
            "{:<10} {:<36} {:>8.1} {:>8} {:>9} {:>9} {:>9} {:>6}\n",
            r.service,
            r.route.as_deref().unwrap_or("(all)"),
            r.rps,
            pct(r.success),
            ms(r.p50_ms),
            ms(r.p95_ms),
            ms(r.p99_ms),
            r.mtls.map_or("-".into(), |v| format!("{:.0}%", v * 100.0)),
        ));
    }
    if rows.is_empty() {
        out.push_str("(no responses in the window)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prom_text::parse;

    fn tallies(ok: u64) -> Tallies {
        let text = format!(
            "tern_responses_total{{direction=\"inbound\",service=\"pay\",route=\"r\",grpc_status=\"OK\"}} {ok}\n"
        );
        Tallies::from_samples(&parse(&text, "tern_"))
    }

    #[test]
    fn a_window_sums_sidecars_and_counts_new_ones_whole() {
        let before = vec![("a:1".to_string(), tallies(100))];
        let after = vec![
            ("a:1".to_string(), tallies(150)),
            ("b:1".to_string(), tallies(20)),
        ];
        let rows = window(&before, &after).golden(10.0);
        let all = rows.iter().find(|r| r.route.is_none()).map(|r| r.rps);
        assert_eq!(all, Some(7.0));
    }
}
