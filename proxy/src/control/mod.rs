//! The sidecar's side of the control-plane push API.
//!
//! One long-lived gRPC stream: the sidecar says who it is (which registers
//! its workload as an endpoint of its service) and which services it calls,
//! then applies each snapshot it receives and acknowledges it, or rejects it
//! with a reason and keeps what it had. When the control plane goes away the
//! sidecar keeps its last snapshot, keeps serving, and reconnects with
//! backoff, to another replica when there are several (`failover`).
//!
//! The same stream carries on-demand lookups ([`crate::on_demand`]): their
//! requests go out between snapshots, and each answer is handed over once
//! the snapshot carrying it (and the service it found) is applied.

pub mod channel;
pub mod convert;
pub mod failover;
mod merge;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use serde::Serialize;
use tern_backoff::{ExpBackoff, Jitter};
use tern_proto::control::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::config::policy::ServicePolicy;
use crate::metrics::Metrics;
use crate::targets::Targets;

/// Who this sidecar is, as told to the control plane.
#[derive(Clone, Debug, Serialize)]
pub struct Identity {
    pub service: String,
    pub namespace: String,
    pub identity: String,
    /// Where callers reach this workload (its inbound listener); empty for a caller only.
    pub address: String,
    pub labels: BTreeMap<String, String>,
    /// Services it calls, as `name` or `name.namespace`.
    pub calls: Vec<String>,
    /// Whether it asks for every service the control plane knows.
    pub all_services: bool,
    /// Its admin listener, for operators' tools that list sidecars through the control plane.
    pub admin: String,
}

/// The snapshot in force, for `/config`.
#[derive(Clone, Debug, Serialize)]
pub struct Applied {
    pub version: u64,
    pub config_version: u64,
    pub applied_at: String,
    pub services: Vec<String>,
    pub inbound_policy: Option<String>,
}

/// What the rest of the proxy can see of the control-plane connection.
#[derive(Default)]
pub struct Status {
    pub connected: AtomicBool,
    pub applied: ArcSwapOption<Applied>,
    pub last_error: ArcSwapOption<String>,
    /// The replica (address) of the current or last subscription.
    pub replica: ArcSwapOption<String>,
}

pub struct Client {
    /// The control plane's replicas; one subscription at a time.
    pub replicas: failover::Replicas,
    pub me: Identity,
    pub targets: Arc<Targets>,
    /// Policy for services that bootstrap config does not mention.
    pub defaults: ServicePolicy,
    pub metrics: Arc<Metrics>,
    pub status: Arc<Status>,
    /// Fires once the first snapshot has been applied.
    pub first: watch::Sender<bool>,
    /// Where each applied snapshot's inbound authorization policy goes; the
    /// inbound stack reads it (created by `authz::Policy::shared()`).
    pub inbound_authz: crate::authz::SharedPolicy,
    /// With an identity the stream is mTLS, so the control plane knows who registers.
    pub identity: Option<Arc<crate::identity::Identity>>,
    /// Lookups to send and answer; `None`: this sidecar sends none.
    pub on_demand: Option<Arc<crate::on_demand::OnDemand>>,
}

impl Client {
    pub async fn run(self) {
        let mut attempt = 0;
        loop {
            let result = self.session(&mut attempt).await;
            self.status.connected.store(false, Ordering::Relaxed);
            self.metrics.control_connected.set(0);
            let reason = match result {
                Ok(()) => "stream ended".to_string(),
                Err(e) => e,
            };
            let retry_in = RECONNECT.delay(attempt);
            tracing::warn!(control_plane = %self.replicas.planes(), reason, ?retry_in, "control plane unavailable; keeping the last config");
            self.status.last_error.store(Some(Arc::new(reason)));
            tokio::time::sleep(retry_in).await;
            attempt = attempt.saturating_add(1);
        }
    }

    /// One subscription; `attempt` (the reconnect count) is reset by each snapshot received.
    async fn session(&self, attempt: &mut u32) -> Result<(), String> {
        if let Some(id) = &self.identity {
            // Registering needs the certificate that proves the identity.
            if id.store.get().is_none() {
                return Err("waiting for the workload certificate".to_string());
            }
        }
        let (channel, replica) = self.replicas.connect(self.identity.as_ref()).await?;
        let mut client = pb::control_plane_client::ControlPlaneClient::new(channel);
        let (tx, rx) = mpsc::channel(8);
        let hello = pb::Hello {
            service: self.me.service.clone(),
            namespace: self.me.namespace.clone(),
            identity: self.me.identity.clone(),
            address: self.me.address.clone(),
            labels: self.me.labels.clone().into_iter().collect(),
            // Services found by lookups before stay watched on a new stream.
            calls: self
                .me
                .calls
                .iter()
                .cloned()
                .chain(self.on_demand.iter().flat_map(|o| o.found()))
                .collect(),
            all_services: self.me.all_services,
            admin: self.me.admin.clone(),
            incremental: true,
        };
        send(&tx, pb::sidecar_message::Kind::Hello(hello)).await?;
        let mut stream = client
            .subscribe(ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("subscribe: {} {}", s.code(), s.message()))?
            .into_inner();
        self.subscribed(replica);
        // A control plane that just restarted knows only the workloads that
        // have re-registered so far. While the others reconnect, endpoints this
        // sidecar already had are kept beside the pushed ones; then the last
        // snapshot is applied as it is.
        let mut hold_until = self
            .status
            .applied
            .load()
            .is_some()
            .then(|| tokio::time::Instant::now() + RESUME_GRACE);
        // Everything in force, incremental snapshots merged in: what is
        // re-applied once the hold after a reconnect ends.
        let mut last: Option<pb::Snapshot> = None;
        loop {
            let holding = hold_until.is_some();
            let message = tokio::select! {
                m = stream.message() => m,
                Some(request) = next_request(self.on_demand.as_deref()) => {
                    send(&tx, request).await?;
                    continue;
                }
                _ = sleep_until(hold_until), if holding => {
                    hold_until = None;
                    if let Some(snap) = &last {
                        if let Err(r) = self.apply(snap, false) {
                            tracing::warn!(reason = r.reasons.join("; "), "re-applying the last snapshot failed");
                        }
                    }
                    continue;
                }
            };
            let snapshot = match message {
                Ok(Some(s)) => s,
                Ok(None) => return Ok(()),
                Err(s) => return Err(format!("stream: {} {}", s.code(), s.message())),
            };
            *attempt = 0;
            let version = snapshot.version;
            let hold = hold_until.is_some_and(|t| tokio::time::Instant::now() < t);
            let result = self.apply(&snapshot, hold);
            if let Some(o) = &self.on_demand {
                o.answer(&snapshot.lookups, result.is_ok());
            }
            last = merge::in_force(last, snapshot, result.as_ref().err());
            let result = result.map_err(|r| r.reasons.join("; "));
            let kind = match result {
                Ok(()) => {
                    self.metrics
                        .config_updates
                        .with_label_values(&["ack"])
                        .inc();
                    pb::sidecar_message::Kind::Ack(pb::Ack { version })
                }
                Err(reason) => {
                    tracing::warn!(
                        version,
                        reason,
                        "rejected a config snapshot; keeping the previous one"
                    );
                    self.metrics
                        .config_updates
                        .with_label_values(&["nack"])
                        .inc();
                    self.status.last_error.store(Some(Arc::new(reason.clone())));
                    pb::sidecar_message::Kind::Nack(pb::Nack { version, reason })
                }
            };
            send(&tx, kind).await?;
        }
    }

    fn subscribed(&self, replica: std::net::SocketAddr) {
        self.status.connected.store(true, Ordering::Relaxed);
        self.metrics.control_connected.set(1);
        let before = self
            .status
            .replica
            .swap(Some(Arc::new(replica.to_string())));
        if self.replicas.subscribed(replica) {
            // Its versions are its own: the snapshots it sends are applied
            // whatever their numbers, as the first of a new stream.
            self.metrics.control_failovers.inc();
            tracing::info!(%replica, from = before.as_deref().map(String::as_str), "resubscribed to another control-plane replica");
        } else {
            tracing::info!(%replica, "subscribed to the control plane");
        }
    }

    /// Validates a complete snapshot as a whole, then applies it service by
    /// service; an incremental one is applied service by service, each valid
    /// service taking effect and each invalid one keeping its last good
    /// state (the error names them). With `hold`, endpoints the sidecar
    /// already had stay beside the pushed ones.
    fn apply(&self, snap: &pb::Snapshot, hold: bool) -> Result<(), Rejected> {
        let mut updates = Vec::with_capacity(snap.services.len());
        let mut rejected = Rejected::default();
        for svc in &snap.services {
            let ns = if svc.namespace.is_empty() {
                "default"
            } else {
                svc.namespace.as_str()
            };
            let base = self
                .targets
                .get(&svc.name, ns)
                .map(|e| e.base_policy.clone())
                .unwrap_or_else(|| self.defaults.clone());
            match convert::service(svc, &base) {
                Ok(u) => updates.push(u),
                Err(e) if snap.incremental => rejected.service(e, format!("{}.{ns}", svc.name)),
                Err(e) => return Err(Rejected::whole(e)),
            }
        }
        // Absent from an incremental snapshot: unchanged.
        let authz = match (&snap.inbound, snap.incremental) {
            (None, true) => None,
            (p, false) => Some(convert::inbound(p.as_ref()).map_err(Rejected::whole)?),
            (Some(p), true) => match convert::inbound(Some(p)) {
                Ok(a) => Some(a),
                Err(e) => {
                    rejected.inbound(e);
                    None
                }
            },
        };
        let mut listed = Vec::with_capacity(updates.len());
        for u in updates {
            let base = self
                .targets
                .get(&u.name, &u.namespace)
                .map(|e| e.base_policy.clone())
                .unwrap_or_else(|| self.defaults.clone());
            let entry = self.targets.ensure(&u.name, &u.namespace, &base);
            let t = &entry.target;
            t.balancer.set_algorithm(u.algorithm);
            t.balancer.set_accrual(u.accrual);
            t.set_routes(u.routes);
            let endpoints = if hold {
                entry.with_current(u.endpoints)
            } else {
                u.endpoints
            };
            entry.set_control(Some(endpoints));
            entry.set_pushed_addressing(u.virtual_ips, u.opaque_ports);
            self.targets.set_aliases(&entry, u.aliases);
            listed.push(format!("{}.{}", u.name, u.namespace));
        }
        // A service the control plane stopped listing falls back to local discovery.
        for entry in self.targets.all() {
            let key = format!("{}.{}", entry.target.service, entry.namespace);
            let gone = match snap.incremental {
                true => snap.removed.contains(&key),
                false => !listed.contains(&key),
            };
            if entry.from_control() && gone {
                entry.set_control(None);
                entry.set_pushed_addressing(Vec::new(), Vec::new());
            }
        }
        if snap.incremental {
            listed = merge::listed(self.status.applied.load().as_deref(), listed, &snap.removed);
        }
        let previous_policy = self
            .status
            .applied
            .load()
            .as_ref()
            .and_then(|a| a.inbound_policy.clone());
        let inbound_policy = match (&snap.inbound, &authz) {
            (Some(p), Some(_)) => Some(p.name.clone()).filter(|n| !n.is_empty()),
            (None, Some(_)) => None,
            (_, None) => previous_policy,
        };
        let applied = Applied {
            version: snap.version,
            config_version: snap.config_version,
            applied_at: crate::access_log::now_rfc3339(),
            services: listed,
            inbound_policy,
        };
        self.metrics.config_version.set(snap.version as i64);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.metrics.config_last_push.set(now);
        if let Some(authz) = authz {
            self.inbound_authz.store(Arc::new(authz));
        }
        self.status.applied.store(Some(Arc::new(applied)));
        self.first.send_replace(true);
        tracing::info!(
            version = snap.version,
            services = snap.services.len(),
            incremental = snap.incremental,
            removed = snap.removed.len(),
            rejected = rejected.reasons.len(),
            "applied config snapshot"
        );
        match rejected.reasons.is_empty() {
            true => {
                self.status.last_error.store(None);
                Ok(())
            }
            false => Err(rejected),
        }
    }
}

/// What of a snapshot was not applied, and why.
#[derive(Debug, Default)]
pub struct Rejected {
    pub reasons: Vec<String>,
    /// Nothing was applied (a complete snapshot, all or nothing).
    pub whole: bool,
    /// Services ("name.namespace") that keep their last good state.
    pub services: Vec<String>,
    /// The inbound policy keeps its last good state.
    pub inbound: bool,
}

impl Rejected {
    fn whole(reason: String) -> Self {
        Self {
            reasons: vec![reason],
            whole: true,
            ..Self::default()
        }
    }

    fn service(&mut self, reason: String, service: String) {
        self.reasons.push(reason);
        self.services.push(service);
    }

    fn inbound(&mut self, reason: String) {
        self.reasons.push(reason);
        self.inbound = true;
    }
}

/// Reconnects wait 100ms, 200ms ... 5s, each ±50% so that sidecars cut off
/// together do not come back together.
const RECONNECT: ExpBackoff =
    ExpBackoff::new(Duration::from_millis(100), Duration::from_secs(5)).jitter(Jitter::Spread(0.5));

/// Longer than a sidecar's longest reconnect backoff, so every workload that
/// was registered before a control-plane restart has re-registered by then.
const RESUME_GRACE: Duration = Duration::from_secs(6);

async fn next_request(
    on_demand: Option<&crate::on_demand::OnDemand>,
) -> Option<pb::sidecar_message::Kind> {
    match on_demand {
        Some(o) => o.next_request().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn send(
    tx: &mpsc::Sender<pb::SidecarMessage>,
    kind: pb::sidecar_message::Kind,
) -> Result<(), String> {
    tx.send(pb::SidecarMessage { kind: Some(kind) })
        .await
        .map_err(|_| "the stream to the control plane closed".to_string())
}
