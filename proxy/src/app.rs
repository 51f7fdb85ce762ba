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
use crate::serve::{accept_loop, ConnMetrics, Listener, Mode};
use crate::targets::{Entry, Targets};
use crate::{authz, control, inbound, intercept, outbound, stack, tcp};

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
    let app =
        config.inbound.as_ref().and_then(|i| i.app).map(|a| {
            inbound::app_target(&config.service_name, a, config.connect_timeout, &metrics)
        });
    let tcp =
        tcp::Tcp::new(&metrics, log.clone(), config.connect_timeout).context("TCP metrics")?;

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
        outbound_listener,
        Listener {
            name: "outbound",
            svc: stack::http(
                Direction::Outbound,
                Selector::Intercepted(out.targets.table()),
                &metrics,
                log.clone(),
                None,
            ),
            metrics: conn_metrics(Direction::Outbound),
            tls: None,
            mode: Mode::Outbound(Arc::new(intercept::Outbound {
                targets: Arc::clone(&out.targets),
                opaque_ports: config.opaque_ports.clone(),
                tcp: Arc::clone(&tcp),
            })),
        },
        &graceful,
        stop_accepting.clone(),
    )));
    for (addr, target) in &out.upstreams {
        let listener = bind("upstream", *addr).await?;
        bound.push(("upstream", local(&listener)));
        loops.push(Box::pin(accept_loop(
            listener,
            Listener {
                name: "upstream",
                svc: stack::http(
                    Direction::Outbound,
                    Selector::Fixed(Arc::clone(target)),
                    &metrics,
                    log.clone(),
                    None,
                ),
                metrics: conn_metrics(Direction::Outbound),
                tls: None,
                mode: Mode::Http,
            },
            &graceful,
            stop_accepting.clone(),
        )));
    }
    if let Some(inb) = &config.inbound {
        let listener = bind("inbound", inb.listen).await?;
        bound.push(("inbound", local(&listener)));
        let ports = inbound::AppPorts::new(
            &config.service_name,
            config.connect_timeout,
            Arc::clone(&metrics),
            own_ports(&config),
            inb.app.zip(app.clone()),
        );
        loops.push(Box::pin(accept_loop(
            listener,
            Listener {
                name: "inbound",
                svc: stack::http(
                    Direction::Inbound,
                    Selector::Local {
                        app: app.clone(),
                        ports: inb.transparent.then(|| Arc::clone(&ports)),
                    },
                    &metrics,
                    log.clone(),
                    Some(Arc::clone(&inbound_authz)),
                ),
                metrics: conn_metrics(Direction::Inbound),
                tls: identity
                    .as_ref()
                    .filter(|_| config.inbound_tls != InboundTls::Off)
                    .map(|id| Arc::new(Inbound::new(Arc::clone(id), config.inbound_tls))),
                mode: Mode::Inbound(Arc::new(intercept::Inbound {
                    transparent: inb.transparent,
                    mode: config.inbound_tls,
                    opaque_ports: config.opaque_ports.clone(),
                    ports,
                    service: config.service_name.clone(),
                    authz: Arc::clone(&inbound_authz),
                    tcp: Arc::clone(&tcp),
                })),
            },
            &graceful,
            stop_accepting.clone(),
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
                all_services: config.watch_all_services,
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
        admin_listener,
        Listener {
            name: "admin",
            svc: admin,
            metrics: ConnMetrics {
                open: prometheus::IntGauge::new("admin_open", "admin connections")?,
                accepted: prometheus::IntCounter::new("admin_accepted", "admin connections")?,
            },
            tls: None,
            mode: Mode::Http,
        },
        &admin_graceful,
        admin_stop.clone(),
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
    let drained = tokio::time::timeout(config.drain_grace, async {
        tokio::join!(graceful.shutdown(), tcp.drained());
    })
    .await;
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

/// The ports of the sidecar's own listeners: never a destination on loopback.
fn own_ports(config: &Config) -> Vec<u16> {
    let mut ports = vec![config.outbound_listen.port(), config.admin_listen.port()];
    ports.extend(config.inbound.as_ref().map(|i| i.listen.port()));
    ports.extend(
        config
            .services
            .iter()
            .filter_map(|s| s.upstream.map(|u| u.port())),
    );
    ports.retain(|p| *p != 0);
    ports
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
    let (virtual_ip, opaque_ports) = e.addressing();
    serde_json::json!({
        "name": t.service.as_ref(),
        "namespace": e.namespace,
        "virtual_ip": virtual_ip,
        "opaque_ports": opaque_ports,
        "endpoints_from": if e.from_control() { "control plane" } else { "bootstrap" },
        "load_balancer": t.balancer.algorithm(),
        "endpoints": t.balancer.describe(),
        "routes": &**t.routes.load(),
    })
}
