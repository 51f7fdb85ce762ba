//! `ternctl tap`: the requests passing through one or more sidecars, live,
//! read from each one's `/tap` admin endpoint (metadata only: no bodies, and
//! only the header values the sidecar's `--tap-headers` allows).

use anyhow::{bail, Context as _, Result};
use clap::{Args, ValueEnum};
use http::StatusCode;
use http_body_util::BodyExt as _;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::admin_client;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("sidecars").required(true).multiple(true).args(["admins", "service"])))]
pub struct TapArgs {
    /// A sidecar's admin address (host:port); repeat to tap several sidecars at once.
    #[arg(long = "admin")]
    admins: Vec<String>,
    /// Tap every sidecar of this service (`name` or `name.namespace`) that tern-control
    /// lists, at the admin address each one reported.
    #[arg(long)]
    service: Option<String>,
    /// tern-control's admin listener (host:port), to list the sidecars of `--service`.
    #[arg(long, env = "TERN_CONTROL_ADMIN", default_value = "127.0.0.1:9990")]
    control: String,
    /// Only requests in this direction.
    #[arg(long, value_parser = ["inbound", "outbound"])]
    direction: Option<String>,
    /// Only this gRPC method (pkg.Service/Method), gRPC service (pkg.Service), or path; `http`
    /// for every request that is not gRPC.
    #[arg(long)]
    route: Option<String>,
    /// Only this HTTP status (503), status class (5xx) or gRPC status (UNAVAILABLE, or 14).
    #[arg(long)]
    status: Option<String>,
    /// Only requests whose peer has this SPIFFE id (or service account name).
    #[arg(long)]
    peer: Option<String>,
    /// One line per request, or the sidecar's JSON event per line.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Stop after this many requests [default: run until interrupted].
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

pub async fn run(args: TapArgs) -> Result<i32> {
    let mut filter = Vec::new();
    for (key, value) in [
        ("direction", &args.direction),
        ("route", &args.route),
        ("status", &args.status),
        ("peer", &args.peer),
    ] {
        if let Some(v) = value {
            filter.push((key, v.as_str()));
        }
    }
    let path = format!("/tap?{}", admin_client::query(&filter));
    let mut admins = args.admins.clone();
    if let Some(service) = &args.service {
        admins.extend(service_admins(&args.control, service).await?);
    }
    let (tx, mut rx) = mpsc::channel::<(String, Value)>(256);
    let mut streams = Vec::new();
    for admin in &admins {
        let rsp = admin_client::open_stream(admin, &path).await?;
        if rsp.status() != StatusCode::OK {
            let status = rsp.status();
            let body = rsp.into_body().collect().await?.to_bytes();
            bail!(
                "{admin} answered {status}: {}",
                String::from_utf8_lossy(&body).trim_end()
            );
        }
        streams.push(tokio::spawn(follow(admin.clone(), rsp, tx.clone())));
    }
    drop(tx);
    let mut seen = 0u64;
    while let Some((admin, event)) = rx.recv().await {
        if let Some(n) = event.get("dropped") {
            eprintln!("ternctl tap: {admin} dropped {n} events this client read too slowly");
            continue;
        }
        if event.get("tapping").is_some() {
            eprintln!("ternctl tap: tapping {admin}");
            continue;
        }
        match args.output {
            Output::Json => {
                let mut e = event;
                e["sidecar"] = Value::from(admin);
                println!("{e}");
            }
            Output::Text => println!("{}", line(&admin, &event, admins.len() > 1)),
        }
        seen += 1;
        if args.count.is_some_and(|c| seen >= c) {
            return Ok(0);
        }
    }
    for s in streams {
        s.abort();
    }
    eprintln!("ternctl tap: every tapped sidecar closed its stream");
    Ok(1)
}

/// The admin addresses of the sidecars of `service` (`name` or `name.namespace`, the
/// namespace `default` when not given) that tern-control's `/state` lists.
async fn service_admins(control: &str, service: &str) -> Result<Vec<String>> {
    let (name, namespace) = service.split_once('.').unwrap_or((service, "default"));
    let state = crate::mesh_state::fetch(control)
        .await
        .with_context(|| format!("listing the sidecars of {service}"))?;
    let admins: Vec<String> = state
        .sidecars
        .into_iter()
        .filter(|s| s.service == name && s.namespace == namespace)
        .filter_map(|s| s.admin)
        .collect();
    if admins.is_empty() {
        bail!("tern-control at {control} lists no sidecar of {name}.{namespace} with an admin address");
    }
    Ok(admins)
}

/// Forwards each JSON line of one sidecar's `/tap` stream.
async fn follow(
    admin: String,
    rsp: http::Response<hyper::body::Incoming>,
    tx: mpsc::Sender<(String, Value)>,
) -> Result<()> {
    let mut body = rsp.into_body();
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.with_context(|| format!("reading /tap from {admin}"))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            match serde_json::from_slice::<Value>(&line) {
                Ok(event) => {
                    if tx.send((admin.clone(), event)).await.is_err() {
                        return Ok(());
                    }
                }
                Err(e) => eprintln!("ternctl tap: {admin} sent a line that is not JSON: {e}"),
            }
        }
    }
    Ok(())
}

/// One request on one line: when, which way, what, how it ended, with whom.
fn line(admin: &str, e: &Value, name_sidecar: bool) -> String {
    let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
    let grpc = match e["grpc_status"].as_u64() {
        Some(code) => format!(
            " grpc={}",
            tern_proto::grpc_code::name(u32::try_from(code).unwrap_or(u32::MAX))
        ),
        None => String::new(),
    };
    let peer = match e["peer_identity"].as_str() {
        Some(p) => format!(" peer={p}"),
        None => String::new(),
    };
    let tls = e["tls"].as_str().unwrap_or("plaintext");
    let error = match e["error"].as_str() {
        Some(err) => format!(" error={err}"),
        None => String::new(),
    };
    let headers = match e["headers"].as_object() {
        Some(h) if !h.is_empty() => {
            let pairs: Vec<String> = h
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect();
            format!(" headers[{}]", pairs.join(" "))
        }
        _ => String::new(),
    };
    let sidecar = if name_sidecar {
        format!("[{admin}] ")
    } else {
        String::new()
    };
    format!(
        "{sidecar}{} {:<8} {} {} {}{} status={}{grpc} {:.1}ms tls={tls}{peer} attempts={}{error}{headers}",
        s("time"),
        s("direction"),
        s("method"),
        s("authority"),
        s("path"),
        if s("service").is_empty() { String::new() } else { format!(" service={}", s("service")) },
        e["status"],
        e["latency_ms"].as_f64().unwrap_or(0.0),
        e["attempts"],
    )
}
