//! Wires the proxy together: builds the stacks, binds the listeners, runs
//! until SIGTERM (or `/shutdown`), then drains.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::access_log::AccessLog;
use crate::admin::Admin;
use crate::config::identity::InboundTls;
use crate::config::{Config, FileConfig};
use crate::identity::{issue::Issuer, tls::Inbound, Identity};
use crate::metrics::{Direction, Metrics};
use crate::router::{Selector, Target};
use crate::serve::{accept_loop, ConnMetrics};
use crate::targets::{Entry, Targets};
use crate::{authz, control, inbound, outbound, stack};

type Loop<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

pub async fn run(config: Config, file: FileConfig) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new().context("metrics registry")?);
    let log = AccessLog::start(&config.access_log, metrics.access_log_dropped.clone())
        .await
        .context("opening the access log")?;
    let identity = match &config.identity {
        Some(c) => Some(Identity::load(c, &metrics)?),
        None => None,
    };
    let out = outbound::build(&config, &metrics, identity.clone()).context("DNS resolver")?;
    // Written by the control client, read by the inbound stack.
    let inbound_authz = authz::Policy::shared();
    let app = config
        .inbound
        .as_ref()
        .map(|i| inbound::app_target(&config, i, &metrics));

    let ready = Arc::new(AtomicBool::new(false));
    let shutdown = CancellationToken::new();
    let stop_accepting = CancellationToken::new();
    let graceful = GracefulShutdown::new();
    let conn_metrics = |d: Direction| ConnMetrics {
        open: metrics.open_connections.with_label_values(&[d.as_str()]),
        accepted: metrics.connections.with_label_values(&[d.as_str()]),
    };

    let mut loops: Vec<Loop<'_>> = Vec::new();
    let mut bound = Vec::new();
    let outbound_listener = bind("outbound", config.outbound_listen).await?;
    bound.push(("outbound", local(&outbound_listener)));
    loops.push(Box::pin(accept_loop(
        "outbound",
        outbound_listener,
        stack::http(
            Direction::Outbound,
            Selector::Authority(out.targets.table()),
            &metrics,
            log.clone(),
            None,
        ),
        conn_metrics(Direction::Outbound),
        &graceful,
        stop_accepting.clone(),
        None,
    )));
    for (addr, target) in &out.upstreams {
        let listener = bind("upstream", *addr).await?;
        bound.push(("upstream", local(&listener)));
        loops.push(Box::pin(accept_loop(
            "upstream",
            listener,
            stack::http(
                Direction::Outbound,
                Selector::Fixed(Arc::clone(target)),
                &metrics,
                log.clone(),
                None,
            ),
            conn_metrics(Direction::Outbound),
            &graceful,
            stop_accepting.clone(),
            None,
        )));
    }
    if let (Some(inb), Some(app)) = (&config.inbound, &app) {
        let listener = bind("inbound", inb.listen).await?;
        bound.push(("inbound", local(&listener)));
        loops.push(Box::pin(accept_loop(
            "inbound",
            listener,
            stack::http(
                Direction::Inbound,
                Selector::Fixed(Arc::clone(app)),
                &metrics,
                log.clone(),
                Some(Arc::clone(&inbound_authz)),
            ),
            conn_metrics(Direction::Inbound),
            &graceful,
            stop_accepting.clone(),
            identity
                .as_ref()
                .filter(|_| config.inbound_tls != InboundTls::Off)
                .map(|id| Arc::new(Inbound::new(Arc::clone(id), config.inbound_tls))),
        )));
    }
    // With an identity, nothing is ready before the first certificate: peers
    // would refuse every connection.
    let (issued_tx, mut issued_rx) = tokio::sync::watch::channel(identity.is_none());
    if let (Some(id), Some(c)) = (&identity, &config.identity) {
        tokio::spawn(
            Issuer {
                identity: Arc::clone(id),
                control_plane: c.server.clone(),
                token_file: c.token_file.clone(),
                issued: issued_tx,
            }
            .run(),
        );
    }
    let (first_tx, mut first_rx) = tokio::sync::watch::channel(false);
    let control_status = config.control_plane.as_ref().map(|url| {
        let status = Arc::new(control::Status::default());
        let client = control::Client {
            url: url.clone(),
            me: control::Identity {
                service: config.service_name.clone(),
                namespace: config.namespace.clone(),
                identity: identity
                    .as_ref()
                    .map(|i| i.id.to_string())
                    .unwrap_or_default(),
                address: config.advertise.map(|a| a.to_string()).unwrap_or_default(),
                labels: config.labels.clone(),
                calls: config
                    .services
                    .iter()
                    .map(|s| {
                        if s.namespace == config.namespace {
                            s.name.clone()
                        } else {
                            format!("{}.{}", s.name, s.namespace)
                        }
                    })
                    .collect(),
            },
            targets: Arc::clone(&out.targets),
            defaults: config.default_policy.clone(),
            metrics: Arc::clone(&metrics),
            status: Arc::clone(&status),
            first: first_tx,
            identity: identity.clone(),
            inbound_authz: Arc::clone(&inbound_authz),
        };
        tokio::spawn(client.run());
        status
    });
    // With a control plane and no endpoints of its own, the sidecar has nothing
    // to route by until the first snapshot arrives: not ready before that.
    let has_local_config = config
        .services
        .iter()
        .any(|s| !matches!(s.discovery, crate::config::DiscoveryConfig::None));
    let wait_for_control = control_status.is_some() && !has_local_config;
    let admin_listener = bind("admin", config.admin_listen).await?;
    bound.push(("admin", local(&admin_listener)));
    let admin = Admin {
        metrics: Arc::clone(&metrics),
        ready: Arc::clone(&ready),
        config: config_view(
            &config,
            &file,
            &out.targets,
            app.clone(),
            control_status.clone(),
        ),
        shutdown: shutdown.clone(),
        identity: identity.clone(),
    };
    // The admin port keeps answering during the drain (probes see not-ready), so
    // it stops only with the process.
    let admin_stop = CancellationToken::new();
    let admin_graceful = GracefulShutdown::new();
    let admin_loop = accept_loop(
        "admin",
        admin_listener,
        admin,
        ConnMetrics {
            open: prometheus::IntGauge::new("admin_open", "admin connections")?,
            accepted: prometheus::IntCounter::new("admin_accepted", "admin connections")?,
        },
        &admin_graceful,
        admin_stop.clone(),
        None,
    );

    for (name, addr) in &bound {
        tracing::info!(listener = name, %addr, "listening");
    }
    // Tests and the demo wait for this line on stdout; it names every bound
    // address, including ports chosen by the OS.
    let ready_line = format!(
        "tern-proxy ready: {}",
        bound
            .iter()
            .map(|(n, a)| format!("{n}={a}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let became_ready = Arc::clone(&ready);
    tokio::spawn(async move {
        if issued_rx.wait_for(|issued| *issued).await.is_err() {
            return;
        }
        if wait_for_control && first_rx.wait_for(|applied| *applied).await.is_err() {
            return;
        }
        println!("{ready_line}");
        became_ready.store(true, Ordering::Release);
    });

    let serving = futures::future::join_all(loops);
    let signals = wait_for_signal(shutdown.clone());
    tokio::pin!(admin_loop);
    tokio::select! {
        _ = &mut admin_loop => {}
        _ = async {
            tokio::join!(serving, async {
                signals.await;
                tracing::info!(grace = ?config.drain_grace, "draining");
                ready.store(false, Ordering::Release);
                stop_accepting.cancel();
            });
        } => {}
    }
    let drained = tokio::time::timeout(config.drain_grace, graceful.shutdown()).await;
    match drained {
        Ok(()) => tracing::info!("drained"),
        Err(_) => {
            tracing::warn!(grace = ?config.drain_grace, "grace period over; closing connections with requests in flight")
        }
    }
    if let Some(log) = &log {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), log.flush()).await;
    }
    admin_stop.cancel();
    Ok(())
}

async fn bind(name: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {name} listener on {addr}"))
}

fn local(l: &TcpListener) -> String {
    l.local_addr().map(|a| a.to_string()).unwrap_or_default()
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            shutdown.cancelled().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = shutdown.cancelled() => {}
    }
}

fn config_view(
    config: &Config,
    file: &FileConfig,
    targets: &Arc<Targets>,
    app: Option<Arc<Target>>,
    control: Option<Arc<control::Status>>,
) -> crate::admin::ConfigView {
    let config = serde_json::to_value(config).unwrap_or_default();
    let file = serde_json::to_value(file).unwrap_or_default();
    let targets = Arc::clone(targets);
    Arc::new(move || {
        let services: Vec<serde_json::Value> = targets.all().iter().map(|e| describe(e)).collect();
        let (version, control) = match &control {
            None => (serde_json::json!("bootstrap"), serde_json::Value::Null),
            Some(s) => {
                let applied = s.applied.load_full();
                let version = applied
                    .as_ref()
                    .map(|a| serde_json::json!(a.version))
                    .unwrap_or(serde_json::json!("bootstrap"));
                (
                    version,
                    serde_json::json!({
                        "connected": s.connected.load(Ordering::Relaxed),
                        "applied": applied.as_deref(),
                        "last_error": s.last_error.load_full().as_deref(),
                    }),
                )
            }
        };
        serde_json::json!({
            "version": version,
            "control_plane": control,
            "bootstrap": file,
            "config": config,
            "services": services,
            "inbound_app": app.as_ref().map(|a| a.balancer.endpoint_addrs()),
        })
    })
}

fn describe(e: &Entry) -> serde_json::Value {
    let t = &e.target;
    serde_json::json!({
        "name": t.service.as_ref(),
        "namespace": e.namespace,
        "endpoints_from": if e.from_control() { "control plane" } else { "bootstrap" },
        "load_balancer": t.balancer.algorithm(),
        "endpoints": t.balancer.describe(),
        "routes": &**t.routes.load(),
    })
}
