//! `ternctl dashboard`: a live HTML page of the mesh — services with their
//! golden metrics and a latency chart, sidecars with config version,
//! certificate expiry and mTLS coverage, recent NACKs — refreshed every few
//! seconds. The page, its CSS and its script are embedded in the binary;
//! the data comes from `/api/overview`, which a sampler task rebuilds from
//! tern-control's `/state` and the sidecars' `/metrics`, as `check` and
//! `stat` read them.
//!
//! It runs beside the operator, not in the cluster: tern-control keeps no
//! scraper of the data plane and no extra listener, and the dashboard reads
//! only what an operator's port-forward already reaches. Like `/state` it
//! answers loopback peers only unless `--expose`.

mod sampler;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");
const STYLE: &str = include_str!("dashboard/dashboard.css");

#[derive(clap::Args)]
pub struct DashboardArgs {
    /// tern-control's admin listener (host:port), where the sidecars are listed.
    #[arg(long, env = "TERN_CONTROL_ADMIN", default_value = "127.0.0.1:9990")]
    control: String,
    /// Where the dashboard listens.
    #[arg(long, env = "TERN_DASHBOARD_LISTEN", default_value = "127.0.0.1:9995")]
    listen: SocketAddr,
    /// Serve peers other than loopback too: the page shows every sidecar, address and identity.
    #[arg(long, env = "TERN_DASHBOARD_EXPOSE")]
    expose: bool,
    /// How often the data is refreshed (the page follows).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    refresh: Duration,
}

pub async fn run(args: DashboardArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(
        args.refresh >= Duration::from_millis(500),
        "--refresh {}: at least 500ms",
        humantime::format_duration(args.refresh)
    );
    let addr = start(&args.control, args.listen, args.expose, args.refresh).await?;
    println!(
        "Tern dashboard: http://{addr}/  (tern-control admin {})",
        args.control
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(0)
}

/// Binds the listener and spawns the server and its sampler; returns where it listens.
pub async fn start(
    control: &str,
    listen: SocketAddr,
    expose: bool,
    refresh: Duration,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the dashboard to {listen}"))?;
    let addr = listener.local_addr()?;
    let overview = Arc::new(Mutex::new(Value::Null));
    tokio::spawn(sampler::run(
        control.to_string(),
        refresh,
        Arc::clone(&overview),
    ));
    tokio::spawn(serve(listener, overview, expose));
    Ok(addr)
}

async fn serve(listener: TcpListener, overview: Arc<Mutex<Value>>, expose: bool) {
    let http = hyper::server::conn::http1::Builder::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("ternctl dashboard: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let overview = Arc::clone(&overview);
        let conn = http.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let allowed = expose || peer.ip().to_canonical().is_loopback();
                if !allowed {
                    eprintln!(
                        "ternctl dashboard: refused {peer}: loopback peers only without --expose"
                    );
                }
                let rsp = respond(req.method(), req.uri().path(), allowed, &overview);
                async move { Ok::<_, Infallible>(rsp) }
            }),
        );
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

fn respond(
    method: &Method,
    path: &str,
    allowed: bool,
    overview: &Mutex<Value>,
) -> Response<Full<Bytes>> {
    if !allowed {
        return reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            "the dashboard answers loopback peers only (ternctl dashboard --expose)\n".into(),
        );
    }
    if method != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
    }
    match path {
        "/" | "/index.html" => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE.into()),
        "/dashboard.js" => reply(StatusCode::OK, "text/javascript", SCRIPT.into()),
        "/dashboard.css" => reply(StatusCode::OK, "text/css", STYLE.into()),
        "/api/overview" => {
            let v = overview.lock().map(|v| v.clone()).unwrap_or(Value::Null);
            reply(StatusCode::OK, "application/json", v.to_string())
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    rsp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_the_page_to_loopback_only() {
        let o = Mutex::new(serde_json::json!({"services": []}));
        let get = |path, allowed| respond(&Method::GET, path, allowed, &o).status();
        assert_eq!(get("/", true), StatusCode::OK);
        assert_eq!(get("/dashboard.js", true), StatusCode::OK);
        assert_eq!(get("/api/overview", true), StatusCode::OK);
        assert_eq!(get("/nothing", true), StatusCode::NOT_FOUND);
        assert_eq!(get("/", false), StatusCode::FORBIDDEN);
        assert_eq!(get("/api/overview", false), StatusCode::FORBIDDEN);
        assert!(PAGE.contains("dashboard.js"));
    }
}
