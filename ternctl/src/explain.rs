//! `ternctl explain`: what a sidecar would do with a request, and why: the
//! service and route rule it matches, the backends and their weights, the
//! endpoints with their state, the retry and timeout policy, and (inbound)
//! the authorization rule that allows or denies the caller. The sidecar
//! answers from the config it holds, with the matching code its request path
//! runs (`/explain` on its admin port).

use anyhow::{Context as _, Result};
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::admin_client;

#[derive(Args)]
pub struct ExplainArgs {
    /// The sidecar's admin address (host:port).
    #[arg(long)]
    admin: String,
    /// Explain a call this sidecar receives (authorization) instead of one it sends.
    #[arg(long)]
    inbound: bool,
    /// The service called, by name or any authority naming it (pay, pay:50051,
    /// pay.default.svc.cluster.local); outbound calls need it.
    #[arg(long)]
    authority: Option<String>,
    /// The gRPC method called: pkg.Service/Method.
    #[arg(long, conflicts_with = "path")]
    grpc: Option<String>,
    /// The HTTP path called (a request that is not gRPC).
    #[arg(long)]
    path: Option<String>,
    /// A request header, NAME:VALUE; repeat for several.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// The caller's SPIFFE id (inbound); without it, a caller with no identity.
    #[arg(long)]
    caller: Option<String>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

pub async fn run(args: ExplainArgs) -> Result<i32> {
    let direction = if args.inbound { "inbound" } else { "outbound" };
    let mut q: Vec<(&str, &str)> = vec![("direction", direction)];
    for (key, value) in [
        ("authority", &args.authority),
        ("grpc", &args.grpc),
        ("path", &args.path),
        ("caller", &args.caller),
    ] {
        if let Some(v) = value {
            q.push((key, v.as_str()));
        }
    }
    for h in &args.headers {
        q.push(("header", h.as_str()));
    }
    let path = format!("/explain?{}", admin_client::query(&q));
    let text = admin_client::get_ok(&args.admin, &path).await?;
    let answer: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} answered something that is not JSON", args.admin))?;
    match args.output {
        Output::Json => println!("{answer}"),
        Output::Text => print!("{}", render(&answer)),
    }
    Ok(0)
}

fn render(a: &Value) -> String {
    if a["direction"] == "inbound" {
        return inbound(a);
    }
    let mut out = String::new();
    if let Some(err) = a["error"].as_str() {
        out.push_str(&format!("✖ {err}\n"));
        return out;
    }
    let rule = &a["rule"];
    let routes_from = match a["routes_from"].as_str() {
        Some("bootstrap") | None => "the bootstrap config".to_string(),
        Some(name @ ("control plane" | "local app")) => format!("the {name}"),
        Some(name) => format!("TrafficPolicy {name}"),
    };
    out.push_str(&format!(
        "service     {} (routes from {routes_from}, load balancer {})\n",
        text(&a["service"]),
        text(&a["load_balancer"]),
    ));
    out.push_str(&format!(
        "rule        {} (rule {} of {}) match {}\n",
        text(&rule["name"]),
        rule["index"].as_u64().unwrap_or(0) + 1,
        rule["of"],
        matches(&rule["matches"]),
    ));
    for b in a["backends"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "backend     {} weight {} ({:.0}%)\n",
            labels(&b["subset"]),
            b["weight"],
            b["share_percent"].as_f64().unwrap_or(0.0),
        ));
    }
    for e in a["endpoints"].as_array().into_iter().flatten() {
        out.push_str(&endpoint(e));
    }
    out.push_str(&policy(&a["policy"]));
    out
}

/// The retry, timeout and failure-accrual policy of the rule, one line each.
fn policy(p: &Value) -> String {
    let (r, t, f) = (&p["retry"], &p["timeout"], &p["accrual"]);
    let codes: Vec<&str> = r["grpc_codes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .map(|c| tern_proto::grpc_code::name(u32::try_from(c).unwrap_or(u32::MAX)))
        .collect();
    let or_none = |v: &Value| v.as_str().unwrap_or("none").to_string();
    format!(
        "retry       up to {} attempts on {}, backoff {}..{}, budget {:.0}% of requests (at least {}/s)\n\
         timeout     per try {}, whole request {}\n\
         accrual     eject after {} consecutive failures for {}..{}, keeping at least {} endpoint(s)\n",
        r["max_attempts"],
        if codes.is_empty() { "nothing".to_string() } else { codes.join(", ") },
        text(&r["backoff_base"]),
        text(&r["backoff_max"]),
        r["budget_percent"].as_f64().unwrap_or(0.0) * 100.0,
        r["budget_min_per_second"],
        or_none(&t["per_try"]),
        or_none(&t["overall"]),
        f["consecutive_failures"],
        text(&f["backoff_min"]),
        text(&f["backoff_max"]),
        f["min_available"],
    )
}

fn endpoint(e: &Value) -> String {
    let state = if e["connect_failing"] == true {
        "failing connects"
    } else if e["ejected"] == true {
        "ejected"
    } else {
        "ready"
    };
    let chosen: Vec<String> = e["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .map(|i| format!("backend {}", i + 1))
        .collect();
    let chosen = match chosen.is_empty() {
        true => "not in this rule's backends".to_string(),
        false => format!("in {}", chosen.join(", ")),
    };
    format!(
        "endpoint    {} {} {state} identity={} ({chosen})\n",
        text(&e["address"]),
        labels(&e["labels"]),
        e["identity"].as_str().unwrap_or("none (plaintext)"),
    )
}

fn inbound(a: &Value) -> String {
    let authz = &a["authorization"];
    let verdict = if authz["allowed"] == true {
        "✔ ALLOWED"
    } else {
        "✖ DENIED"
    };
    let mut out = format!(
        "service     {} (inbound){}\n",
        text(&a["service"]),
        match a["grpc_method"].as_str() {
            Some(m) => format!(" gRPC {m}"),
            None => format!(" path {}", text(&a["path"])),
        }
    );
    out.push_str(&format!(
        "caller      {}\n",
        a["caller"].as_str().unwrap_or("no identity (plaintext)")
    ));
    out.push_str(&format!(
        "{verdict}   by AuthorizationPolicy {}: {}\n",
        authz["policy"].as_str().unwrap_or("(none)"),
        text(&authz["decided_by"]),
    ));
    for (i, r) in authz["rules"].as_array().into_iter().flatten().enumerate() {
        out.push_str(&format!("  rule {}    {}\n", i + 1, text(r)));
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn labels(v: &Value) -> String {
    match v.as_object() {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| format!("{k}={}", text(v)))
            .collect::<Vec<_>>()
            .join(","),
        _ => "(all endpoints)".into(),
    }
}

/// A rule's matches: any one selects it; all parts of one must hold.
fn matches(v: &Value) -> String {
    let Some(list) = v.as_array().filter(|l| !l.is_empty()) else {
        return "every request".into();
    };
    list.iter().map(one_match).collect::<Vec<_>>().join(" or ")
}

fn one_match(m: &Value) -> String {
    let mut parts = Vec::new();
    if let Some([service, method]) = m["grpc"].as_array().map(Vec::as_slice) {
        let part = |v: &Value| match v.as_str() {
            Some("") | None => "*".to_string(),
            Some(s) => s.to_string(),
        };
        parts.push(format!("gRPC {}/{}", part(service), part(method)));
    }
    if let Some(prefix) = m["path_prefix"].as_str() {
        parts.push(format!("path {prefix}*"));
    }
    for h in m["headers"].as_array().into_iter().flatten() {
        let header = if let Some(e) = h.get("exact") {
            format!("header {} = {}", text(&e["name"]), text(&e["value"]))
        } else if let Some(p) = h.get("prefix") {
            format!(
                "header {} starts with {}",
                text(&p["name"]),
                text(&p["value"])
            )
        } else if let Some(p) = h.get("present") {
            format!("header {} present", text(&p["name"]))
        } else {
            h.to_string()
        };
        parts.push(header);
    }
    match parts.is_empty() {
        true => "every request".into(),
        false => format!("({})", parts.join(" and ")),
    }
}
