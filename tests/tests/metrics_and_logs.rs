//! What an operator reads: every sidecar's `/metrics` passes `promtool check metrics`, request
//! counters match the calls made, the access log has one valid JSON line per call, and the W3C
//! trace context travels through both sidecars.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use tern_proto::test::v1::EchoRequest;
use tern_tests::metrics::{self, names};
use tern_tests::mtls::spiffe;
use tern_tests::{eventually, within, EchoMesh, Must, Proxy, Route, CALL_TIMEOUT};
use tonic::metadata::MetadataValue;

/// Calls made before looking at metrics and logs.
const N: usize = 20;
const UNARY_PATH: &str = "/tern.test.v1.Echo/Unary";
/// Metrics and log lines may be recorded just after the response reached the client.
const SETTLE: Duration = Duration::from_secs(5);

/// Two echo servers behind sidecars, after `N` OK unary calls through the client sidecar.
async fn mesh_after_calls(label: &str) -> EchoMesh {
    let mesh = EchoMesh::start(label, Route::Sidecars, 2).await.must();
    let mut client = mesh.ok(mesh.client().await);
    for i in 0..N {
        let req = EchoRequest {
            message: format!("call {i}"),
            ..EchoRequest::default()
        };
        let result = within(CALL_TIMEOUT, client.unary(req)).await;
        mesh.ok(result.and_then(|r| r.map(drop).map_err(anyhow::Error::from)));
    }
    mesh
}

fn sidecars(mesh: &EchoMesh) -> Vec<&Proxy> {
    mesh.client.iter().chain(mesh.inbound.iter()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sidecar_metrics_pass_promtool() {
    if !metrics::promtool_available() {
        let what = format!(
            "{} not installed (Debian package prometheus)",
            metrics::PROMTOOL
        );
        tern_tests::missing(&what).must();
        return;
    }
    let mesh = mesh_after_calls("promtool").await;
    let mut problems = Vec::new();
    for proxy in sidecars(&mesh) {
        let text = mesh.ok(proxy.metrics().await);
        if let Err(e) = metrics::promtool_check(&text) {
            problems.push(format!("{}: {e:#}", proxy.spec.label));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// `name` summed on the client sidecar (direction="outbound") and over the echo sidecars
/// (direction="inbound"), counting only samples whose `grpc_status` is OK when `ok_only`.
async fn outbound_and_inbound_sums(
    mesh: &EchoMesh,
    name: &str,
    ok_only: bool,
) -> Result<(f64, f64)> {
    let sum = |text: &str, direction: &str| -> Result<f64> {
        let samples = metrics::parse(text)?;
        let labels = [("direction", direction)];
        if !ok_only {
            return Ok(metrics::sum(&samples, name, &labels));
        }
        Ok(names::GRPC_OK
            .iter()
            .map(|ok| metrics::sum(&samples, name, &[labels[0], ("grpc_status", ok)]))
            .sum())
    };
    let client = mesh.client.as_ref().context("no client sidecar")?;
    let outbound = sum(&client.metrics().await?, "outbound")?;
    let mut inbound = 0.0;
    for proxy in &mesh.inbound {
        inbound += sum(&proxy.metrics().await?, "inbound")?;
    }
    Ok((outbound, inbound))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_counters_match_calls() {
    let mesh = mesh_after_calls("counters").await;
    let n = N as f64;
    for (name, ok_only) in [
        (names::REQUESTS_TOTAL, false),
        (names::RESPONSES_TOTAL, true),
    ] {
        let result = eventually(SETTLE, || async {
            let (outbound, inbound) = outbound_and_inbound_sums(&mesh, name, ok_only).await?;
            Ok((outbound != n || inbound != n).then(|| {
                format!(
                    "{name} (grpc OK only: {ok_only}): outbound on the client sidecar {outbound}, \
                     inbound summed over the echo sidecars {inbound}, expected {N} each"
                )
            }))
        })
        .await;
        mesh.ok(result);
    }
    // Each side labels its responses with the mTLS peer it verified.
    let (echo, client_id) = (spiffe("echo"), spiffe("client"));
    let client = mesh.client.as_ref().unwrap();
    let samples = mesh.ok(metrics::parse(&mesh.ok(client.metrics().await)));
    let labels = [("tls", "true"), ("peer_identity", echo.as_str())];
    assert_eq!(metrics::sum(&samples, names::RESPONSES_TOTAL, &labels), n);
    let mut inbound = 0.0;
    for proxy in &mesh.inbound {
        let samples = mesh.ok(metrics::parse(&mesh.ok(proxy.metrics().await)));
        let labels = [("tls", "true"), ("peer_identity", client_id.as_str())];
        inbound += metrics::sum(&samples, names::RESPONSES_TOTAL, &labels);
    }
    assert_eq!(inbound, n);
}

/// The JSON access log lines of one direction in a sidecar's stdout; any line that looks like
/// JSON but does not parse is an error.
fn access_lines(stdout: &str, direction: &str) -> Result<Vec<Value>> {
    let mut lines = Vec::new();
    for line in stdout.lines().map(str::trim).filter(|l| l.starts_with('{')) {
        let value: Value = serde_json::from_str(line)
            .with_context(|| format!("invalid JSON log line {line:?}"))?;
        if value["direction"] == direction {
            lines.push(value);
        }
    }
    Ok(lines)
}

fn check_access_line(line: &Value, upstreams: &[String]) -> Result<()> {
    ensure!(line["method"] == "POST", "method in {line}");
    ensure!(line["path"] == UNARY_PATH, "path in {line}");
    let grpc_ok = line["grpc_status"] == 0 || line["grpc_status"] == "0";
    ensure!(grpc_ok, "grpc_status in {line}");
    let duration = line["duration_ms"]
        .as_f64()
        .with_context(|| format!("duration_ms in {line}"))?;
    ensure!(duration >= 0.0, "negative duration_ms in {line}");
    let upstream = line["upstream"]
        .as_str()
        .with_context(|| format!("upstream in {line}"))?;
    ensure!(
        upstreams.iter().any(|u| u == upstream),
        "upstream {upstream:?} is none of {upstreams:?}"
    );
    let trace_id = line["trace_id"]
        .as_str()
        .with_context(|| format!("trace_id in {line}"))?;
    if !is_trace_id(trace_id) {
        bail!("trace_id {trace_id:?} is not 32 lowercase hex digits (not all zero)");
    }
    check_mtls(line, &spiffe("echo"))
}

/// The hop between the sidecars was mTLS and the peer was who it had to be.
fn check_mtls(line: &Value, peer: &str) -> Result<()> {
    ensure!(line["tls"] == "TLSv1.3", "tls in {line}");
    ensure!(
        line["peer_identity"] == peer,
        "peer_identity in {line}, expected {peer}"
    );
    Ok(())
}

fn is_trace_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && id.bytes().any(|b| b != b'0')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_json_line_per_call() {
    let mesh = mesh_after_calls("access-log").await;
    let client = mesh.client.as_ref().unwrap();
    let upstreams: Vec<String> = mesh
        .inbound_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    mesh.ok(eventually(SETTLE, || async {
        let outbound = access_lines(&client.proc.stdout(), "outbound")?.len();
        let mut inbound = 0;
        for proxy in &mesh.inbound {
            inbound += access_lines(&proxy.proc.stdout(), "inbound")?.len();
        }
        Ok((outbound < N || inbound < N)
            .then(|| format!("{outbound} outbound, {inbound} inbound lines")))
    })
    .await);
    // A proxy that logged a call twice would pass the wait above: recount after a pause.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = mesh.ok(access_lines(&client.proc.stdout(), "outbound"));
    assert_eq!(
        lines.len(),
        N,
        "outbound access log lines on the client sidecar"
    );
    let mut trace_ids = HashSet::new();
    for line in &lines {
        mesh.ok(check_access_line(line, &upstreams));
        trace_ids.insert(line["trace_id"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(
        trace_ids.len(),
        N,
        "calls without a traceparent must each start a new trace"
    );
    let inbound_lines: Vec<Value> = mesh
        .inbound
        .iter()
        .flat_map(|p| mesh.ok(access_lines(&p.proc.stdout(), "inbound")))
        .collect();
    for line in &inbound_lines {
        mesh.ok(check_mtls(line, &spiffe("client")));
    }
    let inbound = inbound_lines.len();
    assert_eq!(
        inbound, N,
        "inbound access log lines summed over the echo sidecars"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_travels_through_both_sidecars() {
    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mesh = EchoMesh::start("trace", Route::Sidecars, 1).await.must();
    let mut client = mesh.ok(mesh.client().await);
    let mut req = tonic::Request::new(EchoRequest::default());
    let traceparent = format!("00-{TRACE_ID}-00f067aa0ba902b7-01");
    req.metadata_mut().insert(
        "traceparent",
        MetadataValue::try_from(traceparent.as_str()).unwrap(),
    );
    let reply = mesh
        .ok(within(CALL_TIMEOUT, client.unary(req)).await)
        .unwrap()
        .into_inner();
    let seen = reply
        .metadata
        .iter()
        .find_map(|m| m.strip_prefix("traceparent="))
        .unwrap_or_else(|| panic!("the server saw no traceparent: {:?}", reply.metadata));
    assert!(
        seen.starts_with(&format!("00-{TRACE_ID}-")),
        "the server saw traceparent {seen:?}"
    );
    let sidecars = [
        (mesh.client.as_ref().unwrap(), "outbound"),
        (&mesh.inbound[0], "inbound"),
    ];
    for (proxy, direction) in sidecars {
        let result = eventually(SETTLE, || async {
            let lines = access_lines(&proxy.proc.stdout(), direction)?;
            Ok(match lines.as_slice() {
                [line] if line["trace_id"] == TRACE_ID => None,
                other => Some(format!("{} {direction} lines: {other:?}", proxy.spec.label)),
            })
        })
        .await;
        mesh.ok(result);
    }
}
