//! Wires the proxy together: builds the stacks, binds the listeners, runs
//! until SIGTERM (or `/shutdown`), then drains.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::access_log::AccessLog;
use crate::admin::Admin;
use crate::config::identity::InboundTls;
use crate::config::{Config, FileConfig};
use crate::identity::{issue::Issuer, tls::Inbound, Identity};
use crate::metrics::{Direction, Metrics};
use crate::on_demand::OnDemand;
use crate::router::{Selector, Target};
use crate::serve::bind::{bind, bind_with_twin};
use crate::serve::{accept_loop, ConnMetrics, Drain, Listener, Mode};
use crate::targets::{Entry, Targets};
use crate::{authz, control, inbound, intercept, outbound, stack, tcp};

type Loop<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// What every listener's stack shares, built once at startup.
struct Core {
    metrics: Arc<Metrics>,
    log: Option<AccessLog>,
    identity: Option<Arc<Identity>>,
    out: outbound::Outbound,
    /// Written by the control client, read by the inbound stack.
    inbound_authz: authz::SharedPolicy,
    /// The local app (`--inbound-app`).
    app: Option<Arc<Target>>,
    tcp: Arc<tcp::Tcp>,
    /// Where sampled requests' spans go (`--trace-collector`); `None` when tracing is off.
    tracer: Option<Arc<crate::telemetry::Tracer>>,
    /// Where every request is reported while someone taps (`/tap`).
    tap: crate::tap::Tap,
    /// Lookups of unknown destinations; with a control plane only.
    on_demand: Option<Arc<OnDemand>>,
}

/// When to stop accepting, how to drain, and whether `/ready` says yes.
struct Lifecycle {
    ready: Arc<AtomicBool>,
    /// `/shutdown` and signals.
    shutdown: CancellationToken,
    stop_accepting: CancellationToken,
    drain: Drain,
}

pub async fn run(config: Config, file: FileConfig) -> anyhow::Result<()> {
    let core = Core::build(&config).await?;
    let life = Lifecycle {
        ready: Arc::new(AtomicBool::new(false)),
        shutdown: CancellationToken::new(),
        stop_accepting: CancellationToken::new(),
        drain: Drain::default(),
    };
    let mut bound = Vec::new();
    let loops = data_listeners(&config, &core, &life, &mut bound).await?;
    let issued = start_issuer(&config, &core);
    let (control_status, first_config) = start_control(&config, &core);
    let admin_listeners = bind_with_twin("admin", config.admin_listen).await?;
    bound.push(("admin", local(&admin_listeners[0])));
    let admin = Admin {
        metrics: Arc::clone(&core.metrics),
        ready: Arc::clone(&life.ready),
        config: config_view(
            &config,
            &file,
            &core.out.targets,
            core.app.clone(),
            control_status.clone(),
        ),
        shutdown: life.shutdown.clone(),
        identity: core.identity.clone(),
        expose_config: config.admin_expose_config,
        tap: core.tap.clone(),
        tap_enabled: config.admin_listen.ip().is_loopback() || config.admin_tap,
        explain: crate::explain::Explainer {
            targets: Arc::clone(&core.out.targets),
            inbound_authz: Arc::clone(&core.inbound_authz),
            app: core.app.clone(),
            service_name: config.service_name.clone(),
        },
    };
    // The admin port keeps answering during the drain (probes see not-ready),
    // so it stops only with the process.
    let admin_stop = CancellationToken::new();
    let admin_drain = Drain::default();
    let admin = Listener {
        name: "admin",
        svc: admin,
        metrics: ConnMetrics {
            open: prometheus::IntGauge::new("admin_open", "admin connections")?,
            accepted: prometheus::IntCounter::new("admin_accepted", "admin connections")?,
            rejections: core.metrics.protocol_rejections.clone(),
        },
        tls: None,
        mode: Mode::Http,
        limits: config.limits,
        fd_budget: None,
    };
    let admin_loops = admin_listeners
        .into_iter()
        .map(|l| accept_loop(l, admin.clone(), &admin_drain, admin_stop.clone()));
    let admin_loop = async {
        futures::future::join_all(admin_loops).await;
    };
    for (name, addr) in &bound {
        tracing::info!(listener = name, %addr, "listening");
    }
    // With a control plane and no endpoints of its own, the sidecar has nothing
    // to route by until the first snapshot arrives: not ready before that.
    let has_local_config = config
        .services
        .iter()
        .any(|s| !matches!(s.discovery, crate::config::DiscoveryConfig::None));
    let first_config = first_config.filter(|_| !has_local_config);
    announce_ready(&bound, issued, first_config, Arc::clone(&life.ready));
    serve_and_drain(&config, &core, &life, loops, admin_loop).await;
    admin_stop.cancel();
    Ok(())
}

impl Core {
    async fn build(config: &Config) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new().context("metrics registry")?);
        let log = AccessLog::start(&config.access_log, metrics.access_log_dropped.clone())
            .await
            .context("opening the access log")?;
        let identity = match &config.identity {
            Some(c) => Some(Identity::load(c, &metrics)?),
            None => None,
        };
        let out = outbound::build(config, &metrics, identity.clone()).context("DNS resolver")?;
        let app = config.inbound.as_ref().and_then(|i| i.app).map(|a| {
            inbound::app_target(&config.service_name, a, config.client_limits(), &metrics)
        });
        let tcp =
            tcp::Tcp::new(&metrics, log.clone(), config.connect_timeout).context("TCP metrics")?;
        let tracer = crate::telemetry::Tracer::configured(config, &metrics.registry)?;
        let tap = crate::tap::Tap::new(&config.tap_headers, &metrics.registry)?;
        let on_demand = match config.control_plane {
            None => None,
            Some(_) => {
                let pinned = config
                    .services
                    .iter()
                    .map(|s| (s.name.clone(), s.namespace.clone()))
                    .collect();
                let od = OnDemand::new(
                    config.on_demand,
                    Arc::clone(&out.targets),
                    pinned,
                    &metrics.registry,
                )
                .context("lookup metrics")?;
                tokio::spawn(Arc::clone(&od).sweep_idle());
                Some(od)
            }
        };
        Ok(Self {
            on_demand,
            metrics,
            log,
            identity,
            out,
            inbound_authz: authz::Policy::shared(),
            app,
            tcp,
            tracer,
            tap,
        })
    }

    fn stack(
        &self,
        config: &Config,
        direction: Direction,
        selector: Selector,
        authz: bool,
    ) -> stack::HttpStack {
        stack::http(
            direction,
            selector,
            &self.metrics,
            self.log.clone(),
            authz.then(|| Arc::clone(&self.inbound_authz)),
            &config.limits,
            self.tracer.clone(),
            Some(self.tap.clone()),
            (direction == Direction::Outbound)
                .then(|| self.on_demand.clone())
                .flatten(),
        )
    }
}

/// Connection metrics of a data listener, by the direction it serves.
fn conn_metrics(metrics: &Metrics, direction: Direction) -> ConnMetrics {
    let d = direction.as_str();
    ConnMetrics {
        open: metrics.open_connections.with_label_values(&[d]),
        accepted: metrics.connections.with_label_values(&[d]),
        rejections: metrics.protocol_rejections.clone(),
    }
}

/// Binds the outbound, explicit upstream and inbound listeners; their accept
/// loops run once polled.
async fn data_listeners<'a>(
    config: &'a Config,
    core: &'a Core,
    life: &'a Lifecycle,
    bound: &mut Vec<(&'static str, String)>,
) -> anyhow::Result<Vec<Loop<'a>>> {
    let mut loops: Vec<Loop<'a>> = Vec::new();
    let fd_budget = crate::serve::fd_budget::data_connections();
    let listener = |name, svc, tls, mode| Listener {
        name,
        svc,
        metrics: conn_metrics(
            &core.metrics,
            if name == "inbound" {
                Direction::Inbound
            } else {
                Direction::Outbound
            },
        ),
        tls,
        mode,
        limits: config.limits,
        fd_budget: Some(Arc::clone(&fd_budget)),
    };
    let outbound_listeners = bind_with_twin("outbound", config.outbound_listen).await?;
    bound.push(("outbound", local(&outbound_listeners[0])));
    let svc = core.stack(
        config,
        Direction::Outbound,
        Selector::Intercepted(core.out.targets.table()),
        false,
    );
    let mode = Mode::Outbound(Arc::new(intercept::Outbound {
        targets: Arc::clone(&core.out.targets),
        opaque_ports: config.opaque_ports.clone(),
        tcp: Arc::clone(&core.tcp),
        on_demand: core.on_demand.clone(),
    }));
    let outbound = listener("outbound", svc, None, mode);
    for l in outbound_listeners {
        let stop = life.stop_accepting.clone();
        loops.push(Box::pin(accept_loop(
            l,
            outbound.clone(),
            &life.drain,
            stop,
        )));
    }
    for (addr, target) in &core.out.upstreams {
        let l = bind("upstream", *addr).await?;
        bound.push(("upstream", local(&l)));
        let svc = core.stack(
            config,
            Direction::Outbound,
            Selector::Fixed(Arc::clone(target)),
            false,
        );
        loops.push(Box::pin(accept_loop(
            l,
            listener("upstream", svc, None, Mode::Http),
            &life.drain,
            life.stop_accepting.clone(),
        )));
    }
    if let Some(inb) = &config.inbound {
        let listeners = bind_with_twin("inbound", inb.listen).await?;
        bound.push(("inbound", local(&listeners[0])));
        let ports = inbound::AppPorts::new(
            &config.service_name,
            config.client_limits(),
            Arc::clone(&core.metrics),
            &inb.ports,
            &own_ports(config),
            inb.app.zip(core.app.clone()),
        );
        let selector = Selector::Local {
            app: core.app.clone(),
            ports: inb.transparent.then(|| Arc::clone(&ports)),
        };
        let svc = core.stack(config, Direction::Inbound, selector, true);
        let tls = core
            .identity
            .as_ref()
            .filter(|_| config.inbound_tls != InboundTls::Off)
            .map(|id| {
                Arc::new(Inbound::new(
                    Arc::clone(id),
                    config.inbound_tls,
                    config.limits.handshake_timeout,
                ))
            });
        let mode = Mode::Inbound(Arc::new(intercept::Inbound {
            transparent: inb.transparent,
            mode: config.inbound_tls,
            opaque_ports: config.opaque_ports.clone(),
            ports,
            service: config.service_name.clone(),
            authz: Arc::clone(&core.inbound_authz),
            tcp: Arc::clone(&core.tcp),
        }));
        let inbound = listener("inbound", svc, tls, mode);
        for l in listeners {
            let stop = life.stop_accepting.clone();
            loops.push(Box::pin(accept_loop(l, inbound.clone(), &life.drain, stop)));
        }
    }
    Ok(loops)
}

/// With an identity, nothing is ready before the first certificate: peers
/// would refuse every connection. The receiver turns true once one is held.
fn start_issuer(config: &Config, core: &Core) -> watch::Receiver<bool> {
    let (issued_tx, issued_rx) = watch::channel(core.identity.is_none());
    if let (Some(id), Some(c)) = (&core.identity, &config.identity) {
        tokio::spawn(crate::identity::anchors::follow(Arc::clone(id)));
        tokio::spawn(
            Issuer {
                identity: Arc::clone(id),
                control_plane: control::failover::Replicas::new(c.server.clone()),
                token_file: c.token_file.clone(),
                issued: issued_tx,
            }
            .run(),
        );
    }
    issued_rx
}

/// Subscribes to the control plane, if there is one: its status (for
/// `/config`) and a receiver that turns true once the first config applied.
fn start_control(
    config: &Config,
    core: &Core,
) -> (Option<Arc<control::Status>>, Option<watch::Receiver<bool>>) {
    let Some(planes) = &config.control_plane else {
        return (None, None);
    };
    let (first_tx, first_rx) = watch::channel(false);
    let status = Arc::new(control::Status::default());
    let client = control::Client {
        replicas: control::failover::Replicas::new(planes.clone()),
        me: control::Identity {
            service: config.service_name.clone(),
            namespace: config.namespace.clone(),
            identity: core
                .identity
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
            // Port 0 is only known once bound: not worth telling.
            admin: match config.admin_listen.port() {
                0 => String::new(),
                _ => config.admin_listen.to_string(),
            },
        },
        targets: Arc::clone(&core.out.targets),
        defaults: config.default_policy.clone(),
        metrics: Arc::clone(&core.metrics),
        status: Arc::clone(&status),
        first: first_tx,
        identity: core.identity.clone(),
        inbound_authz: Arc::clone(&core.inbound_authz),
        on_demand: core.on_demand.clone(),
    };
    tokio::spawn(client.run());
    (Some(status), Some(first_rx))
}

/// Prints the ready line and turns `/ready` on once the certificate (and the
/// first config, when waited for) are in.
fn announce_ready(
    bound: &[(&'static str, String)],
    mut issued: watch::Receiver<bool>,
    first_config: Option<watch::Receiver<bool>>,
    ready: Arc<AtomicBool>,
) {
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
    tokio::spawn(async move {
        if issued.wait_for(|issued| *issued).await.is_err() {
            return;
        }
        if let Some(mut first) = first_config {
            if first.wait_for(|applied| *applied).await.is_err() {
                return;
            }
        }
        println!("{ready_line}");
        ready.store(true, Ordering::Release);
    });
}

/// Serves until SIGTERM or `/shutdown`, then drains within the grace period.
async fn serve_and_drain(
    config: &Config,
    core: &Core,
    life: &Lifecycle,
    loops: Vec<Loop<'_>>,
    admin_loop: impl Future<Output = ()>,
) {
    let serving = futures::future::join_all(loops);
    let signals = wait_for_signal(life.shutdown.clone());
    tokio::pin!(admin_loop);
    tokio::select! {
        _ = &mut admin_loop => {}
        _ = async {
            tokio::join!(serving, async {
                signals.await;
                tracing::info!(grace = ?config.drain_grace, "draining");
                life.ready.store(false, Ordering::Release);
                life.stop_accepting.cancel();
            });
        } => {}
    }
    let drained = tokio::time::timeout(config.drain_grace, async {
        tokio::join!(life.drain.shutdown(), core.tcp.drained());
    })
    .await;
    match drained {
        Ok(()) => tracing::info!("drained"),
        Err(_) => {
            tracing::warn!(grace = ?config.drain_grace, "grace period over; closing connections with requests in flight")
        }
    }
    if let Some(log) = &core.log {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), log.flush()).await;
    }
    if let Some(tracer) = &core.tracer {
        if !tracer.flush(SPAN_FLUSH_LIMIT).await {
            tracing::warn!(limit = ?SPAN_FLUSH_LIMIT, "queued spans not all exported before exit");
        }
    }
}

/// How long the exit waits for queued spans to reach the collector.
const SPAN_FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);

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
                        "replica": s.replica.load_full().as_deref(),
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
    let (virtual_ips, opaque_ports) = e.addressing();
    serde_json::json!({
        "name": t.service.as_ref(),
        "namespace": e.namespace,
        "virtual_ip": virtual_ips.first(),
        "virtual_ips": virtual_ips,
        "opaque_ports": opaque_ports,
        "endpoints_from": if e.from_control() { "control plane" } else { "bootstrap" },
        "load_balancer": t.balancer.algorithm(),
        "endpoints": t.balancer.describe(),
        "routes": &**t.routes.load(),
    })
}
