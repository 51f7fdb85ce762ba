//! The live state of the control plane, and the one place it changes.
//!
//! [`Mesh`] holds the config in force, the registry, the precomputed service
//! views and the index of who watches what. Every change — a new config, a
//! registration, an endpoint's grace running out — goes through a method
//! here that recomputes the affected views and wakes exactly the subscribers
//! whose snapshot changed. Waking is a `tokio::sync::watch` send: a session
//! sleeps until woken, several changes before it runs coalesce into one
//! snapshot, and a slow sidecar only ever receives the newest state.
//!
//! One mutex guards the state. Every critical section is short (no I/O, no
//! awaits); each session assembles its snapshot outside it.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tern_proto::control::v1 as pb;
use tokio::sync::watch;

use crate::admission::{self, Refusal};
use crate::config::{Action, ConfigErrors, MeshConfig, ServiceKey};
use crate::metrics::Metrics;
use crate::registry::{Registration, Registry};
use crate::snapshot::{self, Built, InboundViews, Index, Interest, View, Views};

mod discovered;
mod on_demand;
mod report;
mod subscriber;
pub use on_demand::Query;
pub use subscriber::{Delivery, NackRecord, Subscriber, Workload};

pub struct Mesh {
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
    next_version: AtomicU64,
    /// The inbound policy of services without an AuthorizationPolicy.
    no_policy: Arc<View<pb::InboundPolicy>>,
    authz_default: Action,
}

struct Inner {
    config: MeshConfig,
    config_version: u64,
    last_error: Option<ConfigErrors>,
    registry: Registry,
    views: Views,
    /// Addresses and names → service, for lookups; follows `views`.
    index: Index,
    inbound: InboundViews,
    interest: Interest,
    subscribers: HashMap<u64, Entry>,
    /// Services from a discovery source, laid over the directory's in `config`.
    discovered: crate::discovery::Overlay,
}

struct Entry {
    sub: Arc<Subscriber>,
    watching: BTreeSet<ServiceKey>,
}

impl Mesh {
    /// A mesh with `config` in force as version 1, allowing calls to
    /// services without an AuthorizationPolicy.
    pub fn new(config: MeshConfig, grace: Duration, metrics: Arc<Metrics>) -> Arc<Mesh> {
        Self::with_authz_default(config, grace, metrics, Action::Allow)
    }

    /// Like [`Mesh::new`], with `authz_default` deciding calls to services
    /// without an AuthorizationPolicy (`--authz-default`).
    pub fn with_authz_default(
        config: MeshConfig,
        grace: Duration,
        metrics: Arc<Metrics>,
        authz_default: Action,
    ) -> Arc<Mesh> {
        let registry = Registry::new(grace);
        let mut views = Views::new();
        snapshot::refresh_all(&mut views, &config, &registry);
        let index = Index::of(&views);
        let mut inbound = InboundViews::new();
        snapshot::refresh_inbound(&mut inbound, &config);
        metrics.config_version.set(1);
        Arc::new(Mesh {
            inner: Mutex::new(Inner {
                config,
                config_version: 1,
                last_error: None,
                registry,
                views,
                index,
                inbound,
                interest: Interest::default(),
                subscribers: HashMap::new(),
                discovered: Default::default(),
            }),
            no_policy: Arc::new(View::new(snapshot::no_policy(authz_default))),
            authz_default,
            metrics,
            next_id: AtomicU64::new(1),
            // Seeded from the clock so versions keep growing across restarts of
            // the control plane, as operators compare them. Replicas number
            // their snapshots each on its own; a sidecar never compares
            // versions across streams.
            next_version: AtomicU64::new(version_seed()),
        })
    }

    pub fn config_version(&self) -> u64 {
        lock(&self.inner).config_version
    }

    /// Puts `config` in force and wakes the subscribers it affects. Returns
    /// the new config version, or `None` when nothing changed (a touched
    /// file, a save without edits).
    pub fn apply_config(&self, mut config: MeshConfig, since: Instant) -> Option<u64> {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        inner.last_error = None;
        inner.discovered.apply(&mut config);
        if inner.config == config {
            return None;
        }
        inner.config = config;
        inner.config_version += 1;
        let views = snapshot::refresh_all(&mut inner.views, &inner.config, &inner.registry);
        inner.index.update(&inner.views, &views);
        let policies = snapshot::refresh_inbound(&mut inner.inbound, &inner.config);
        let affected = inner.interest.affected(&views, &policies);
        for id in &affected {
            if let Some(e) = inner.subscribers.get(id) {
                e.sub.wake(since);
            }
        }
        self.metrics.config_version.set(inner.config_version as i64);
        tracing::info!(
            version = inner.config_version,
            services_changed = views.len(),
            policies_changed = policies.len(),
            subscribers_affected = affected.len(),
            "config applied"
        );
        Some(inner.config_version)
    }

    /// Remembers why the latest change was rejected, for `/state`.
    pub fn reject_config(&self, errors: ConfigErrors) {
        lock(&self.inner).last_error = Some(errors);
    }

    /// Adds a subscriber: registers its endpoint, indexes what it watches and
    /// wakes it for its first snapshot. It leaves when the returned
    /// [`Subscription`] is dropped.
    ///
    /// `workload.identity` is the verified identity of its client certificate:
    /// it must be the one its Service admits ([`admission::admitted`]). A
    /// workload without one (only let in by `--insecure-plaintext-subscribers`)
    /// registers no endpoint of a Service that declares an identity. An
    /// address another identity holds is refused ([`Refusal::AddressHeld`]).
    pub fn subscribe(
        self: &Arc<Self>,
        workload: Workload,
        calls: BTreeSet<ServiceKey>,
    ) -> Result<Subscription, Refusal> {
        let now = Instant::now();
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let declared = inner
            .config
            .services
            .get(&workload.key)
            .and_then(|s| s.identity.as_deref());
        admit(&workload, declared)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sub, woken) = Subscriber::new(id, workload);
        let key = &sub.workload.key;
        if let Some(address) = sub.workload.address {
            let registration = Registration {
                address,
                labels: sub.workload.labels.clone(),
                identity: sub.workload.identity.clone(),
            };
            let changed = inner.registry.register(key, registration).map_err(|held| {
                Refusal::AddressHeld {
                    address,
                    service: held.service,
                    holder: held
                        .identity
                        .unwrap_or_else(|| "a workload without identity".into()),
                }
            })?;
            if changed {
                let changed =
                    snapshot::refresh(&mut inner.views, [key], &inner.config, &inner.registry);
                inner.index.update(&inner.views, &changed);
                for id in inner.interest.affected(&changed, &BTreeSet::new()) {
                    if let Some(e) = inner.subscribers.get(&id) {
                        e.sub.wake(now);
                    }
                }
            }
            self.metrics
                .registered_endpoints
                .set(inner.registry.endpoint_count() as i64);
        }
        inner.interest.own(id, key);
        for k in &calls {
            inner.interest.watch(id, k);
        }
        if sub.workload.all_services {
            inner.interest.watch_all(id);
        }
        sub.wake(now);
        inner.subscribers.insert(
            id,
            Entry {
                sub: Arc::clone(&sub),
                watching: calls,
            },
        );
        self.metrics.subscribers.inc();
        Ok(Subscription {
            subscriber: sub,
            woken,
            mesh: Arc::clone(self),
        })
    }

    /// Adds targets to a subscriber's watch list and wakes it if any is new.
    /// Returns false, adding nothing, if the list would grow past `limit`.
    pub fn watch(&self, id: u64, keys: BTreeSet<ServiceKey>, limit: usize) -> bool {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let Some(entry) = inner.subscribers.get_mut(&id) else {
            return true;
        };
        let new: Vec<ServiceKey> = keys.difference(&entry.watching).cloned().collect();
        if entry.watching.len() + new.len() > limit {
            return false;
        }
        for k in &new {
            inner.interest.watch(id, k);
        }
        if !new.is_empty() {
            entry.watching.extend(new);
            entry.sub.wake(Instant::now());
        }
        true
    }

    /// The current content of a subscriber's snapshot.
    pub fn build(&self, id: u64) -> Option<Built> {
        let inner = lock(&self.inner);
        let entry = inner.subscribers.get(&id)?;
        // What it names, and with all_services its own namespace and what
        // the authorization policies let it call: a workload does not get to
        // list the whole mesh. Sorted by namespace, then name.
        let mut keys: BTreeSet<&ServiceKey> = entry.watching.iter().collect();
        let workload = &entry.sub.workload;
        if workload.all_services {
            let own = &workload.key.namespace;
            let caller = workload.identity.as_deref();
            keys.extend(inner.views.keys().filter(|k| {
                &k.namespace == own
                    || admission::may_call(&inner.config, self.authz_default, caller, k)
            }));
        }
        let services = keys
            .into_iter()
            .filter_map(|k| inner.views.get(k).cloned())
            .collect();
        Some(Built {
            config_version: inner.config_version,
            services,
            inbound: inner
                .inbound
                .get(&entry.sub.workload.key)
                .cloned()
                .unwrap_or_else(|| Arc::clone(&self.no_policy)),
            lookups: Vec::new(),
        })
    }

    /// A fresh snapshot version, larger than every one sent before.
    pub fn next_version(&self) -> u64 {
        self.next_version.fetch_add(1, Ordering::Relaxed)
    }

    fn leave(self: &Arc<Self>, id: u64) {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let Some(entry) = inner.subscribers.remove(&id) else {
            return;
        };
        let workload = &entry.sub.workload;
        inner.interest.forget(id, &entry.watching, &workload.key);
        self.metrics.subscribers.dec();
        let Some(address) = workload.address else {
            return;
        };
        let Some(deadline) = inner
            .registry
            .release(&workload.key, address, Instant::now())
        else {
            return;
        };
        drop(guard);
        // Without a runtime (the process is ending) nobody is left to tell.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let mesh = Arc::clone(self);
            rt.spawn(async move {
                tokio::time::sleep_until(deadline.into()).await;
                // As of the deadline, not of whenever this task got to run.
                mesh.expire(deadline);
            });
        }
    }

    /// Drops registered endpoints whose grace is over and tells their callers.
    pub fn expire(&self, now: Instant) {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let gone = inner.registry.expire(now);
        if gone.is_empty() {
            return;
        }
        let changed = snapshot::refresh(&mut inner.views, &gone, &inner.config, &inner.registry);
        inner.index.update(&inner.views, &changed);
        for id in inner.interest.affected(&changed, &BTreeSet::new()) {
            if let Some(e) = inner.subscribers.get(&id) {
                e.sub.wake(now);
            }
        }
        self.metrics
            .registered_endpoints
            .set(inner.registry.endpoint_count() as i64);
        tracing::info!(services = ?gone.iter().map(ToString::to_string).collect::<Vec<_>>(), "registered endpoints expired");
    }

    /// Everything `/state` shows, as JSON.
    pub fn state(&self) -> serde_json::Value {
        let inner = lock(&self.inner);
        let mut state = report::state_json(
            &inner.config,
            inner.config_version,
            inner.last_error.as_ref(),
            &inner.registry,
            inner.subscribers.values().map(|e| (&*e.sub, &e.watching)),
        );
        state["authz_default"] = serde_json::json!(self.authz_default);
        state
    }
}

/// An open subscription; dropping it unsubscribes (and starts the grace of
/// the workload's endpoint), however the session ended.
pub struct Subscription {
    pub subscriber: Arc<Subscriber>,
    /// Changes each time the subscriber's snapshot may have changed.
    pub woken: watch::Receiver<()>,
    mesh: Arc<Mesh>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.mesh.leave(self.subscriber.id);
    }
}

/// Whether `workload` may subscribe as its Service, which declares `declared`.
fn admit(workload: &Workload, declared: Option<&str>) -> Result<(), Refusal> {
    let service = &workload.key;
    match (&workload.identity, declared) {
        (Some(verified), _) => {
            let domain = admission::trust_domain(verified);
            let admitted = admission::admitted(service, declared, domain);
            if *verified != admitted {
                return Err(Refusal::NotAdmitted {
                    identity: verified.clone(),
                    service: service.clone(),
                    admitted,
                });
            }
        }
        (None, Some(declared)) if workload.address.is_some() => {
            return Err(Refusal::CertificateRequired {
                service: service.clone(),
                admitted: declared.to_owned(),
            });
        }
        (None, _) => {}
    }
    Ok(())
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in one session must not wedge every other one; at worst a view
    // is stale until the next change recomputes it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;

/// Milliseconds since the Unix epoch at start, times 1000: a restarted control
/// plane starts above every version it sent before (unless it sent more than
/// a thousand snapshots per millisecond of uptime).
fn version_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_millis() as u64).saturating_mul(1000))
        .unwrap_or(1)
        .max(1)
}
