//! Prometheus against what Tern ships: `promtool` checks the recording and alerting rules and
//! runs their unit tests, and a real Prometheus server
//! scrapes the demo's sidecars (with those rules loaded) while loadgen drives it; PromQL over
//! its HTTP API must agree with what loadgen itself counted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _, Result};
use tern_tests::demo::{Loadgen, Order, Pay};
use tern_tests::mtls::{spiffe, MeshCa};
use tern_tests::process::{free_addr, TestDir};
use tern_tests::prometheus::{manifests, Prometheus, Target, PROMETHEUS, PROMTOOL};
use tern_tests::{missing, Must, Proxy, ProxySpec};

const PAY_ROUTE: &str = "tern.demo.v1.PayService/Pay";
/// The request duration histogram's bucket bounds (proxy/src/metrics.rs).
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn have(binary: &str) -> bool {
    std::path::Path::new(binary).is_file()
}

fn promtool(args: &[&str]) -> Result<String> {
    let out = Command::new(PROMTOOL)
        .args(args)
        .current_dir(manifests())
        .output()
        .context("running promtool")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("promtool {args:?} failed ({}):\n{text}", out.status);
    }
    Ok(text)
}

#[test]
fn the_rules_pass_promtool_check_and_their_unit_tests() {
    if !have(PROMTOOL) {
        return missing("promtool (apt-get install prometheus)").must();
    }
    let checked = promtool(&["check", "rules", "rules.yaml"]).must();
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "rules_test.yaml"]).must();
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// The upper bound of the histogram bucket `v` (seconds) falls in.
fn bucket_upper(v: f64) -> f64 {
    BUCKETS
        .into_iter()
        .find(|b| v <= *b)
        .unwrap_or(f64::INFINITY)
}

/// loadgen → order's sidecar (permissive inbound) → order → order's sidecar =mTLS=> pay's
/// sidecar → pay (20 ms per call, 10% UNAVAILABLE), no retries, so every loadgen call is one
/// Pay call at pay's sidecar. Prometheus scrapes both sidecars every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_agrees_with_the_load_generator() {
    if !have(PROMETHEUS) {
        return missing("prometheus (apt-get install prometheus)").must();
    }
    let dir = TestDir::new("prometheus-demo").must();
    let ca = MeshCa::start(dir.path(), &[]).await.must();
    let pay_flags = ["--latency", "20ms", "--fail-rate", "0.1"];
    let pay = Pay::start(dir.path(), "pay-1", &pay_flags).await.must();
    let spec = ProxySpec::new("pay-sidecar", "pay")
        .inbound(pay.addr)
        .access_log("off");
    let pay_sidecar = Proxy::start(dir.path(), ca.sidecar(spec, "pay").must())
        .await
        .must();
    let pay_port = free_addr().must();
    let order = Order::start(dir.path(), pay_port).await.must();
    let pay_identity = format!("pay={}", spiffe("pay"));
    let spec = ProxySpec::new("order-sidecar", "order")
        .inbound(order.addr)
        .upstream("pay", pay_port)
        .endpoints("pay", &[pay_sidecar.inbound])
        .access_log("off")
        .args(&["--endpoint-identity", &pay_identity])
        .args(&["--inbound-tls", "permissive", "--retry-attempts", "1"]);
    let order_sidecar = Proxy::start(dir.path(), ca.sidecar(spec, "order").must())
        .await
        .must();
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let targets = [
        Target {
            admin: order_sidecar.admin,
            pod: "order-1",
            app: "order",
        },
        Target {
            admin: pay_sidecar.admin,
            pod: "pay-1",
            app: "pay",
        },
    ];
    let prom = Prometheus::start(&prom_dir, &targets).await.must();
    wait_until_both_up(&prom).await;

    let (rate, duration) = (100u32, Duration::from_secs(10));
    let started = SystemTime::now();
    let mut load = Loadgen::spawn(
        dir.path(),
        "loadgen",
        order_sidecar.inbound,
        rate,
        duration,
        &[],
    )
    .must();
    let summary = load.summary().await.must();
    let ended = SystemTime::now();
    assert!(
        summary.sent >= 900,
        "loadgen sent too little: {:?}",
        summary.raw
    );
    assert!(summary.failed > 0 && summary.ok > 0, "{:?}", summary.raw);
    // Two scrapes and a rule evaluation after the last call.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let pay_sel = format!(r#"direction="inbound",service="pay",route="{PAY_ROUTE}""#);
    // Counters are exact and the last scrape came after the last call: the totals match.
    let total = prom
        .one(&format!("sum(tern_responses_total{{{pay_sel}}})"), None)
        .await
        .must();
    let ok = prom
        .one(
            &format!(r#"sum(tern_responses_total{{{pay_sel},grpc_status="OK"}})"#),
            None,
        )
        .await
        .must();
    assert_eq!(total as u64, summary.sent, "{:?}", summary.raw);
    assert_eq!(ok as u64, summary.ok, "{:?}", summary.raw);

    // The rate over the steady part of the run (its first 2 s and last 1 s left out): loadgen
    // runs open loop, so this is its rate; 15% allows for counts landing on either side of a
    // 1 s scrape at the window's edges (~2 × rate × 1 s over 7 s, halved by extrapolation).
    let window = duration.as_secs() - 3;
    let at = started + duration - Duration::from_secs(1);
    let measured = prom
        .one(
            &format!("sum(rate(tern_responses_total{{{pay_sel}}}[{window}s]))"),
            Some(at),
        )
        .await
        .must();
    let counted = summary.sent as f64 / ended.duration_since(started).unwrap().as_secs_f64();
    eprintln!(
        "Prometheus: {measured:.1}/s; loadgen: {counted:.1}/s, {} sent, {} ok",
        summary.sent, summary.ok
    );
    assert!(
        (measured - f64::from(rate)).abs() <= 0.15 * f64::from(rate),
        "Prometheus rate {measured:.1}/s, loadgen {counted:.1}/s (asked {rate}/s)"
    );

    // The recording rules over the last minute, which holds the whole run. A series' first
    // scrape is its baseline, so about a second of calls is left out of both terms of the
    // ratio: ±0.03 is three standard deviations of a 10% failure share over ~900 calls.
    let success = prom
        .one(
            &format!("service_route:tern_success:ratio_rate1m{{{pay_sel}}}"),
            None,
        )
        .await
        .must();
    let counted_success = summary.ok as f64 / summary.sent as f64;
    assert!(
        (success - counted_success).abs() <= 0.03,
        "Prometheus success rate {success:.4}, loadgen {counted_success:.4}"
    );

    // p99: every call spends at least 20 ms in pay, so the interpolated p99 of pay's sidecar
    // lies above the 10 ms bucket bound (how far above depends on the machine's load); and that
    // sidecar sees a part of each loadgen call, so it cannot exceed the bucket that holds
    // loadgen's own p99.
    let p99 = prom
        .one(
            &format!("service_route:tern_request_duration_seconds:p99_1m{{{pay_sel}}}"),
            None,
        )
        .await
        .must();
    let loadgen_p99 = summary.p99_ms / 1000.0;
    eprintln!("success {success:.4} vs {counted_success:.4}; p99 pay {p99:.4}s, loadgen {loadgen_p99:.4}s");
    assert!(p99 > 0.010, "pay's p99 {p99}s is under pay's own 20 ms");
    assert!(
        p99 <= bucket_upper(loadgen_p99),
        "pay's p99 {p99}s is over loadgen's {loadgen_p99}s bucket"
    );

    // mTLS share: every Pay call came from order's sidecar over mTLS; loadgen called order's
    // sidecar in plaintext.
    let mtls = |service: &str| {
        format!(r#"service:tern_mtls:ratio_rate1m{{direction="inbound",service="{service}"}}"#)
    };
    assert_eq!(prom.one(&mtls("pay"), None).await.must(), 1.0);
    assert_eq!(prom.one(&mtls("order"), None).await.must(), 0.0);

    // `ternctl stat --prometheus` asks the same server with the rules' expressions; over a
    // minute, which holds the whole run, it agrees with loadgen as the rules do.
    let url = format!("http://{}", prom.addr);
    let args = [
        "stat",
        "--prometheus",
        &url,
        "--window",
        "1m",
        "--output",
        "json",
    ];
    let out = Command::new(tern_tests::binary("ternctl").must())
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ternctl stat: {text}");
    let doc: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let row = |service: &str, route: Option<&str>| {
        doc["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["service"] == service && r["route"].as_str() == route)
            .cloned()
            .unwrap_or_else(|| panic!("no {service} {route:?} row: {doc:#}"))
    };
    let pay = row("pay", Some(PAY_ROUTE));
    let stat_success = pay["success"].as_f64().unwrap();
    assert!(
        (stat_success - counted_success).abs() <= 0.03,
        "ternctl stat success rate {stat_success:.4}, loadgen {counted_success:.4}"
    );
    // The series' first scrape is its baseline and rate() extrapolates at the window's
    // edges: the count over the window is loadgen's within 15%, as for the rate above.
    let responses = pay["responses"].as_f64().unwrap();
    let sent = summary.sent as f64;
    eprintln!("ternctl stat: {responses:.0} responses, success {stat_success:.4}; loadgen: {sent} sent, success {counted_success:.4}");
    assert!(
        (responses - sent).abs() <= 0.15 * sent,
        "ternctl stat counted {responses:.0} responses, loadgen sent {sent}"
    );
    assert!(pay["p99_ms"].as_f64().unwrap() > 10.0, "{doc:#}");
    assert_eq!(pay["mtls"], 1.0, "{doc:#}");
    assert_eq!(row("order", None)["mtls"], 0.0, "{doc:#}");
}

async fn wait_until_both_up(prom: &Prometheus) {
    let up = tern_tests::eventually(Duration::from_secs(20), || async {
        let up = prom.query("sum(up)", None).await?;
        let n = up.first().map_or(0.0, |(_, v)| *v);
        Ok((n < 2.0).then(|| format!("{n} targets up")))
    })
    .await;
    if let Err(e) = up {
        panic!("{e:#}\n{}", prom.proc.diagnostics());
    }
}
