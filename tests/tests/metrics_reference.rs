//! docs/METRICS.md stays true: every metric family that tern-proxy and tern-control expose
//! (sidecars with mTLS and tracing on, after sampled calls) is documented with its type and
//! labels, every documented metric still exists in the sources, and every span attribute a
//! sidecar sends is documented.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use tern_tests::demo::Pay;
use tern_tests::load::pay_with_headers;
use tern_tests::mtls::{spiffe, MeshCa};
use tern_tests::otlp::Collector;
use tern_tests::process::{free_addr, TestDir};
use tern_tests::{eventually, http1, Must, Proxy, ProxySpec};

/// name → (type, label names).
type Families = BTreeMap<String, (String, BTreeSet<String>)>;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The families of a text exposition, with the label names their samples carry.
fn families(text: &str) -> Families {
    let mut out = Families::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            out.insert(name.to_string(), (kind.to_string(), BTreeSet::new()));
        }
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let sample = &line[..name_end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| sample.strip_suffix(s))
            .find(|base| out.contains_key(*base))
            .unwrap_or(sample);
        let labels = line[name_end..]
            .strip_prefix('{')
            .and_then(|l| l.split_once('}'))
            .map(|(l, _)| l)
            .unwrap_or("");
        let names = labels
            .split(',')
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.trim().to_string()))
            .filter(|k| k != "le" && !k.is_empty());
        if let Some((_, set)) = out.get_mut(family) {
            set.extend(names);
        }
    }
    out
}

/// The rows of docs/METRICS.md's tables: `| `name` | type | `a`, `b` | meaning |`.
fn documented(doc: &str) -> Families {
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `tern_"))
        .map(|rest| {
            let cells: Vec<&str> = rest.split('|').map(str::trim).collect();
            let name = format!("tern_{}", cells[0].trim_end_matches('`'));
            let labels = cells[2]
                .split(',')
                .map(|l| l.trim().trim_matches('`').to_string())
                .filter(|l| !l.is_empty() && l != "—")
                .collect();
            (name, (cells[1].to_string(), labels))
        })
        .collect()
}

/// Span attribute keys documented: rows `| `key` | ... |` under "## Span attributes".
fn documented_attributes(doc: &str) -> BTreeSet<String> {
    let section = doc.split("## Span attributes").nth(1).unwrap_or("");
    // The first cell may name two: "| `server.address`, `server.port` |".
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split(" |").next())
        .flat_map(|cell| cell.split(", ").map(|k| k.trim_matches('`').to_string()))
        .collect()
}

fn sources_mention(name: &str) -> bool {
    let suffix = name.strip_prefix("tern_control_");
    ["proxy/src", "control/src"].iter().any(|d| {
        walk(&repo().join(d)).iter().any(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            text.contains(&format!("\"{name}\""))
                || suffix.is_some_and(|s| text.contains(&format!("\"{s}\"")))
        })
    })
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_metrics_md_matches_what_the_mesh_exposes() {
    let dir = TestDir::new("metrics-reference").must();
    let collector = Collector::start().await.must();
    let trace = ["--trace-collector".to_string(), collector.addr.to_string()];
    let trace: Vec<&str> = trace.iter().map(String::as_str).collect();
    let ca = MeshCa::start(dir.path(), &[]).await.must();
    let pay = Pay::start(dir.path(), "pay-1", &["--fail-rate", "0.3"])
        .await
        .must();
    let spec = ProxySpec::new("pay-sidecar", "pay")
        .inbound(pay.addr)
        .args(&trace);
    let pay_sidecar = Proxy::start(dir.path(), ca.sidecar(spec, "pay").must())
        .await
        .must();
    let target = free_addr().must();
    let pay_identity = format!("pay={}", spiffe("pay"));
    let spec = ProxySpec::new("client-sidecar", "client")
        .upstream("pay", target)
        .endpoints("pay", &[pay_sidecar.inbound])
        .args(&["--endpoint-identity", &pay_identity])
        .args(&trace);
    let client = Proxy::start(dir.path(), ca.sidecar(spec, "client").must())
        .await
        .must();
    let sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    pay_with_headers(target, 20, 2, &[("traceparent", sampled)])
        .await
        .must();
    eventually(Duration::from_secs(15), || async {
        let n = collector.spans().len();
        Ok((n < 40).then(|| format!("{n} of 40 spans")))
    })
    .await
    .must();

    let mut exposed = Families::new();
    for proxy in [&client, &pay_sidecar] {
        for (name, (kind, labels)) in families(&proxy.metrics().await.must()) {
            let entry = exposed.entry(name).or_insert((kind, BTreeSet::new()));
            entry.1.extend(labels);
        }
    }
    let control = http1::get(ca.control.admin, "/metrics").await.must();
    exposed.extend(families(&String::from_utf8_lossy(&control.body)));

    let doc = std::fs::read_to_string(repo().join("docs/METRICS.md")).unwrap();
    let docs = documented(&doc);
    let mut problems = Vec::new();
    for (name, (kind, labels)) in &exposed {
        match docs.get(name) {
            None => problems.push(format!(
                "undocumented: | `{name}` | {kind} | {} |",
                labels
                    .iter()
                    .map(|l| format!("`{l}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Some((dk, dl)) if dk != kind || dl != labels => problems.push(format!(
                "{name}: documented {dk} {dl:?}, exposed {kind} {labels:?}"
            )),
            Some(_) => {}
        }
    }
    for name in docs.keys() {
        if !sources_mention(name) {
            problems.push(format!("documented but not in the sources: {name}"));
        }
    }
    let attributes = documented_attributes(&doc);
    let mut seen = BTreeSet::new();
    for span in collector.spans() {
        seen.extend(span.span.attributes.iter().map(|kv| kv.key.clone()));
        for event in &span.span.events {
            seen.extend(event.attributes.iter().map(|kv| kv.key.clone()));
        }
    }
    for key in seen.difference(&attributes) {
        problems.push(format!("span attribute undocumented: {key}"));
    }
    assert!(
        problems.is_empty(),
        "docs/METRICS.md:\n{}",
        problems.join("\n")
    );
}
