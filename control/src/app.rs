//! Wires the control plane together from its checked settings, handing each
//! module its own part: watch and load the config, load (or generate) the CA
//! and the token key, bind the listeners, serve until SIGTERM, then end every
//! stream and exit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin};
use crate::admission::LogLimiter;
use crate::cli::Settings;
use crate::config;
use crate::identity;
use crate::metrics::Metrics;
use crate::server::ControlPlane;
use crate::state::Mesh;
use crate::tls;
use crate::watch::Watching;
use crate::webhook;
use crate::wire::ControlPlaneService;

/// How long shutdown waits for streams to close after telling them to.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new().context("metrics registry")?);
    let dir = &settings.config.dir;
    if !dir.is_dir() {
        anyhow::bail!("--config-dir {} is not a directory", dir.display());
    }
    // Watch first, then load: a change made in between is then seen twice
    // (harmless) rather than never.
    let options = settings.config.options;
    let watching = Watching::start(dir)
        .with_context(|| format!("watching the config directory {}", dir.display()))?
        .with_options(options);
    // No last good config exists yet, so a bad one at start is fatal: better
    // a clear crash than serving an empty mesh.
    let config = config::load_dir_with(dir, options)
        .map_err(|e| anyhow::anyhow!("invalid mesh config:\n{e}"))?;
    tracing::info!(
        dir = %dir.display(),
        services = config.services.len(),
        traffic_policies = config.traffic.len(),
        authorization_policies = config.authorization.len(),
        "config loaded"
    );
    let mesh = Mesh::with_authz_default(
        config,
        settings.registration_grace,
        Arc::clone(&metrics),
        settings.authz_default,
    );
    let identity = identity::setup(&settings.identity, &metrics)?;
    let authority = Arc::clone(&identity.authority);

    let listen = settings.listen;
    let grpc = TcpListener::bind(listen.grpc)
        .await
        .with_context(|| format!("binding the gRPC listener on {}", listen.grpc))?;
    let admin_listener = TcpListener::bind(listen.admin)
        .await
        .with_context(|| format!("binding the admin listener on {}", listen.admin))?;
    let grpc_addr = grpc.local_addr().context("gRPC listener address")?;
    let admin_addr = admin_listener
        .local_addr()
        .context("admin listener address")?;

    let shutdown = CancellationToken::new();
    let admin_stop = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    tokio::spawn(watching.run(
        settings.config.debounce,
        Arc::clone(&mesh),
        Arc::clone(&metrics),
        shutdown.clone(),
    ));
    let listed = crate::discovery::start(
        settings.discovery,
        settings.identity.trust_domain.clone(),
        Arc::clone(&mesh),
        Arc::clone(&metrics.discovery),
        shutdown.clone(),
    )
    .await?;
    tokio::spawn(admin::serve(
        admin_listener,
        Admin {
            mesh: Arc::clone(&mesh),
            metrics: Arc::clone(&metrics),
            ready: Arc::clone(&ready),
            authority: Some(Arc::clone(&authority)),
            expose_state: settings.admin_expose_state,
            refusal_log: Arc::new(LogLimiter::new()),
        },
        admin_stop.clone(),
    ));
    tokio::spawn(identity::follow_anchors(
        Arc::clone(&authority),
        Arc::clone(&metrics),
        shutdown.clone(),
    ));
    tokio::spawn(tls::keep_fresh(
        Arc::clone(&authority.serving),
        Arc::clone(&authority.ca),
        authority.control_identity.clone(),
        Arc::clone(&metrics),
        shutdown.clone(),
    ));
    let service = ControlPlaneService::new(ControlPlane {
        mesh: Arc::clone(&mesh),
        metrics: Arc::clone(&metrics),
        shutdown: shutdown.clone(),
        insecure_plaintext: settings.insecure_plaintext_subscribers,
        refusal_log: Arc::new(LogLimiter::new()),
    });
    if settings.insecure_plaintext_subscribers {
        tracing::warn!(
            "--insecure-plaintext-subscribers: sidecars WITHOUT a client certificate may subscribe, \
             register endpoints of Services that declare no identity and read the mesh config; \
             for development only, never in production"
        );
    }
    if matches!(settings.discovery, crate::discovery::Discovery::Config)
        && std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
    {
        // Replicas agree only on what the cluster's API holds.
        tracing::warn!(
            "running in Kubernetes without --discovery kubernetes: the registry of sidecar \
             endpoints lives in this process alone, so run a single replica"
        );
    }
    if settings.admin_expose_state {
        tracing::warn!(admin = %admin_addr, "--admin-expose-state: /state (the whole mesh) is served to every peer of the admin listener");
    }
    // Snapshots are small and latency matters more than packing; keepalive
    // pings find a sidecar whose host vanished without closing its connection,
    // so its endpoint leaves within about 15s plus the grace.
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(service)
        .add_service(identity.service.into_server())
        .serve_with_incoming_shutdown(
            tls::incoming(
                grpc,
                identity.acceptor,
                Arc::clone(&metrics),
                shutdown.clone(),
            ),
            shutdown.clone().cancelled_owned(),
        );

    let webhook_addr = webhook::start(
        &settings.webhook,
        Arc::clone(&authority.ca),
        Arc::clone(&metrics),
        shutdown.clone(),
    )
    .await?;

    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, "listening");
    let ca = &authority.ca;
    tracing::info!(
        trust_anchor = %ca.anchor_path().display(),
        trust_domain = ca.trust_domain(),
        identity = %authority.control_identity,
        anchor_expires = %crate::ca::rfc3339(ca.anchor().not_after),
        issuer_expires = %crate::ca::rfc3339(ca.issuer().not_after),
        "serving TLS on the gRPC listener (Subscribe needs a client certificate; Certify a bootstrap token); sidecars trust the trust anchor file"
    );
    // Tests and `ternctl demo` wait for this line; it names the real
    // addresses, including ports the OS chose (`webhook=` only when it is on).
    let webhook_field = webhook_addr
        .map(|a| format!(" webhook={a}"))
        .unwrap_or_default();
    println!("tern-control ready: grpc={grpc_addr} admin={admin_addr}{webhook_field}");
    mark_ready(&ready, listed, shutdown.clone());

    tokio::pin!(server);
    tokio::select! {
        result = &mut server => {
            result.context("gRPC server")?;
        }
        _ = wait_for_signal() => {
            ready.store(false, Ordering::Release);
            shutdown.cancel();
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(result) => result.context("gRPC server")?,
                Err(_) => tracing::warn!("streams did not close in time; exiting anyway"),
            }
        }
    }
    admin_stop.cancel();
    tracing::info!("stopped");
    Ok(())
}

/// `/ready` turns 200 now, or once discovery has listed the cluster (unless
/// shutdown began meanwhile).
fn mark_ready(
    ready: &Arc<AtomicBool>,
    mut listed: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    if *listed.borrow() {
        ready.store(true, Ordering::Release);
        return;
    }
    let ready = Arc::clone(ready);
    tokio::spawn(async move {
        if listed.wait_for(|l| *l).await.is_ok() && !shutdown.is_cancelled() {
            ready.store(true, Ordering::Release);
        }
    });
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        },
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the control plane");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
