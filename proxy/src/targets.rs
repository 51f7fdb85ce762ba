//! The services this sidecar can send to.
//!
//! Targets come from the bootstrap config and from control-plane pushes, and
//! live as long as the process: a push replaces a target's endpoints and
//! routes in place, so listeners and connections never need rebuilding. A
//! target's endpoints come from the control plane when it lists the service,
//! otherwise from the sidecar's own discovery (static or DNS).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::balance::{Balancer, ClientParams};
use crate::config::policy::ServicePolicy;
use crate::discovery::EndpointSet;
use crate::metrics::Metrics;
use crate::router::{RouteTable, Target};
use crate::routes::Routes;

pub struct Entry {
    pub target: Arc<Target>,
    pub namespace: String,
    /// The policy bootstrap config gives this service; routes pushed without
    /// their own settings fall back to it.
    pub base_policy: ServicePolicy,
    /// Extra names (a Service's DNS name) under which authority routing finds it.
    aliases: Mutex<Vec<String>>,
    sources: Mutex<Sources>,
    tx: watch::Sender<EndpointSet>,
}

#[derive(Default)]
struct Sources {
    control: Option<EndpointSet>,
    local: EndpointSet,
}

impl Entry {
    /// Endpoints from the sidecar's own discovery.
    pub fn set_local(&self, set: EndpointSet) {
        let mut s = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        s.local = set;
        self.publish(&s);
    }

    /// Endpoints from the control plane; `None` when it does not know the service.
    pub fn set_control(&self, set: Option<EndpointSet>) {
        let mut s = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        s.control = set;
        self.publish(&s);
    }

    fn publish(&self, s: &Sources) {
        let set = s.control.clone().unwrap_or_else(|| s.local.clone());
        self.tx.send_if_modified(|cur| {
            let changed = *cur != set;
            if changed {
                *cur = set;
            }
            changed
        });
    }

    /// `set` plus the endpoints in force now that it lacks (by address).
    pub fn with_current(&self, set: EndpointSet) -> EndpointSet {
        let current = self.tx.borrow().clone();
        let mut merged: Vec<_> = set.iter().cloned().collect();
        for e in current.iter() {
            if !merged.iter().any(|m| m.addr == e.addr) {
                merged.push(e.clone());
            }
        }
        merged.sort();
        Arc::new(merged)
    }

    pub fn from_control(&self) -> bool {
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .control
            .is_some()
    }
}

pub struct Targets {
    /// (namespace, name) → entry.
    entries: Mutex<BTreeMap<(String, String), Arc<Entry>>>,
    table: Arc<ArcSwap<RouteTable>>,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    /// The sidecar's own namespace: its services win short names like `pay`.
    namespace: String,
    identity: Option<Arc<crate::identity::Identity>>,
}

impl Targets {
    pub fn new(
        metrics: Arc<Metrics>,
        connect_timeout: Duration,
        namespace: &str,
        identity: Option<Arc<crate::identity::Identity>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            entries: Mutex::default(),
            table: Arc::new(ArcSwap::from_pointee(RouteTable::default())),
            metrics,
            connect_timeout,
            namespace: namespace.to_string(),
            identity,
        })
    }

    /// The routing table the generic outbound listener reads, always current.
    pub fn table(&self) -> Arc<ArcSwap<RouteTable>> {
        Arc::clone(&self.table)
    }

    /// The entry of `name` in `namespace`, made with `policy` if it is new.
    pub fn ensure(&self, name: &str, namespace: &str, policy: &ServicePolicy) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let key = (namespace.to_string(), name.to_string());
        if let Some(e) = entries.get(&key) {
            return Arc::clone(e);
        }
        let service: Arc<str> = Arc::from(name);
        let mut params = ClientParams::for_service(
            &self.metrics,
            name,
            self.connect_timeout,
            policy.accrual.clone(),
            true,
        );
        params.identity = self.identity.clone();
        let (tx, rx) = watch::channel(EndpointSet::default());
        let balancer = Balancer::spawn(Arc::clone(&service), rx, params);
        let target = Arc::new(Target::new(
            service,
            balancer,
            Routes::single("bootstrap", policy.clone()),
        ));
        let entry = Arc::new(Entry {
            target,
            namespace: namespace.to_string(),
            base_policy: policy.clone(),
            aliases: Mutex::default(),
            sources: Mutex::default(),
            tx,
        });
        entries.insert(key, Arc::clone(&entry));
        self.rebuild(&entries);
        entry
    }

    pub fn get(&self, name: &str, namespace: &str) -> Option<Arc<Entry>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<Entry>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.values().cloned().collect()
    }

    /// Sets the extra names of an entry (replacing earlier ones).
    pub fn set_aliases(&self, entry: &Entry, aliases: Vec<String>) {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut a = entry.aliases.lock().unwrap_or_else(|p| p.into_inner());
            if *a == aliases {
                return;
            }
            *a = aliases;
        }
        self.rebuild(&entries);
    }

    fn rebuild(&self, entries: &BTreeMap<(String, String), Arc<Entry>>) {
        let mut table = RouteTable::default();
        // Own-namespace services last, so they win the short names.
        let (own, other): (Vec<_>, Vec<_>) = entries
            .values()
            .partition(|e| e.namespace == self.namespace);
        for e in other.into_iter().chain(own) {
            table.insert(&e.namespace, Arc::clone(&e.target));
            for a in e.aliases.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                table.alias(a, Arc::clone(&e.target));
            }
        }
        self.table.store(Arc::new(table));
    }
}
