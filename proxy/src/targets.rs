//! The services this sidecar can send to.
//!
//! Targets come from the bootstrap config and from control-plane pushes, and
//! live as long as the process: a push replaces a target's endpoints and
//! routes in place, so listeners and connections never need rebuilding. A
//! target's endpoints come from the control plane when it lists the service,
//! otherwise from the sidecar's own discovery (static or DNS).
//!
//! For transparent interception the targets are also indexed by IP: a
//! service's virtual IP, and the IP of each of its endpoints, name the
//! service an intercepted connection is for ([`Targets::resolve`]).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::balance::{Balancer, ClientParams};
use crate::config::limits::ClientLimits;
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
    addressing: Mutex<Addressing>,
    sources: Mutex<Sources>,
    tx: watch::Sender<EndpointSet>,
    /// Re-indexed by IP when the endpoints change.
    targets: Weak<Targets>,
}

/// How intercepted connections find a service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Addressing {
    bootstrap_vip: Option<IpAddr>,
    /// Every pushed virtual IP (both of a dual-stack service); empty: none.
    pushed_vips: Vec<IpAddr>,
    /// Ports the service declares opaque TCP.
    opaque_ports: Vec<u16>,
}

impl Addressing {
    /// The virtual IPs in force: the pushed ones, else the bootstrap one.
    fn vips(&self) -> Vec<IpAddr> {
        match self.pushed_vips.is_empty() {
            true => self.bootstrap_vip.into_iter().collect(),
            false => self.pushed_vips.clone(),
        }
    }
}

/// What an intercepted connection's original destination names.
#[derive(Clone)]
pub struct Resolved {
    pub target: Arc<Target>,
    /// The app dialed this endpoint's IP: only this endpoint may take it.
    pub endpoint: Option<SocketAddr>,
    /// The service declares the port opaque TCP.
    pub opaque: bool,
}

#[derive(Clone)]
struct Dest {
    target: Arc<Target>,
    endpoint: Option<SocketAddr>,
    opaque_ports: Arc<[u16]>,
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
        let changed = self.publish(&s);
        drop(s);
        self.reindex_if(changed);
    }

    /// Endpoints from the control plane; `None` when it does not know the service.
    pub fn set_control(&self, set: Option<EndpointSet>) {
        let mut s = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        s.control = set;
        let changed = self.publish(&s);
        drop(s);
        self.reindex_if(changed);
    }

    fn publish(&self, s: &Sources) -> bool {
        let set = s.control.clone().unwrap_or_else(|| s.local.clone());
        let changed = self.tx.send_if_modified(|cur| {
            let changed = *cur != set;
            if changed {
                *cur = set.clone();
            }
            changed
        });
        // A request waiting for this push (an on-demand lookup) picks an
        // endpoint right after it: the balancer must not lag behind.
        if changed {
            self.target.balancer.set_endpoints(set);
        }
        changed
    }

    /// The virtual IP from bootstrap config (`--virtual-ip`).
    pub fn set_bootstrap_vip(&self, ip: Option<IpAddr>) {
        self.update_addressing(|a| a.bootstrap_vip = ip);
    }

    /// What the control plane says: the virtual IPs (none pushed: the
    /// bootstrap one stays) and the ports declared opaque.
    pub fn set_pushed_addressing(&self, vips: Vec<IpAddr>, opaque_ports: Vec<u16>) {
        self.update_addressing(|a| {
            a.pushed_vips = vips;
            a.opaque_ports = opaque_ports;
        });
    }

    fn update_addressing(&self, f: impl FnOnce(&mut Addressing)) {
        let mut a = self.addressing.lock().unwrap_or_else(|p| p.into_inner());
        let before = a.clone();
        f(&mut a);
        let changed = *a != before;
        drop(a);
        self.reindex_if(changed);
    }

    fn reindex_if(&self, changed: bool) {
        if let Some(t) = self.targets.upgrade().filter(|_| changed) {
            t.reindex();
        }
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

    /// The virtual IPs in force and the ports declared opaque, for `/config`.
    pub fn addressing(&self) -> (Vec<IpAddr>, Vec<u16>) {
        let a = self.addressing.lock().unwrap_or_else(|p| p.into_inner());
        (a.vips(), a.opaque_ports.clone())
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
    /// Virtual IPs and endpoint IPs → the service (see [`Targets::resolve`]).
    by_ip: ArcSwap<HashMap<IpAddr, Dest>>,
    me: Weak<Targets>,
    metrics: Arc<Metrics>,
    client: ClientLimits,
    /// The sidecar's own namespace: its services win short names like `pay`.
    namespace: String,
    identity: Option<Arc<crate::identity::Identity>>,
}

impl Targets {
    pub fn new(
        metrics: Arc<Metrics>,
        client: ClientLimits,
        namespace: &str,
        identity: Option<Arc<crate::identity::Identity>>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            entries: Mutex::default(),
            table: Arc::new(ArcSwap::from_pointee(RouteTable::default())),
            by_ip: ArcSwap::from_pointee(HashMap::new()),
            me: Weak::clone(me),
            metrics,
            client,
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
            self.client,
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
            addressing: Mutex::default(),
            sources: Mutex::default(),
            tx,
            targets: Weak::clone(&self.me),
        });
        entries.insert(key, Arc::clone(&entry));
        self.rebuild(&entries);
        entry
    }

    /// Forgets `name` in `namespace`: no name or IP leads to it any more.
    pub fn remove(&self, name: &str, namespace: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries
            .remove(&(namespace.to_string(), name.to_string()))
            .is_none()
        {
            return;
        }
        self.rebuild(&entries);
        drop(entries);
        self.reindex();
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

    /// The service an intercepted connection to `dst` is for: the one whose
    /// virtual IP it is, else the one with an endpoint on that IP (then only
    /// that endpoint). `None`: not in the mesh, pass it through.
    pub fn resolve(&self, dst: SocketAddr) -> Option<Resolved> {
        let table = self.by_ip.load();
        let d = table.get(&dst.ip())?;
        d.target.touch();
        Some(Resolved {
            target: Arc::clone(&d.target),
            endpoint: d.endpoint,
            opaque: d.opaque_ports.contains(&dst.port()),
        })
    }

    /// Rebuilds the IP index from every entry's endpoints and virtual IP.
    fn reindex(&self) {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_ip = HashMap::new();
        let mut vips = Vec::new();
        for e in entries.values() {
            let a = e
                .addressing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let opaque_ports: Arc<[u16]> = Arc::from(a.opaque_ports.as_slice());
            for ep in e.tx.borrow().iter() {
                // Loopback endpoints (local tests) are never an intercepted
                // destination; an IP two services share goes to the first.
                if ep.addr.ip().is_loopback() || ep.addr.ip().is_unspecified() {
                    continue;
                }
                by_ip.entry(ep.addr.ip()).or_insert_with(|| Dest {
                    target: Arc::clone(&e.target),
                    endpoint: Some(ep.addr),
                    opaque_ports: Arc::clone(&opaque_ports),
                });
            }
            for vip in a.vips() {
                let dest = Dest {
                    target: Arc::clone(&e.target),
                    endpoint: None,
                    opaque_ports: Arc::clone(&opaque_ports),
                };
                vips.push((vip, dest));
            }
        }
        // A virtual IP wins over an endpoint that happens to share it.
        by_ip.extend(vips);
        self.by_ip.store(Arc::new(by_ip));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::policy::PolicyFile;
    use crate::discovery::{fixed, Endpoint};

    fn targets() -> (Arc<Targets>, ServicePolicy) {
        let metrics = Arc::new(Metrics::new().unwrap());
        let t = Targets::new(metrics, Default::default(), "default", None);
        (t, PolicyFile::default().validate("t").unwrap())
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn virtual_ips_and_endpoint_ips_name_their_service() {
        let (t, policy) = targets();
        let pay = t.ensure("pay", "default", &policy);
        pay.set_local(fixed(&[addr("10.1.0.7:4143"), addr("127.0.0.1:7001")]));
        pay.set_bootstrap_vip(Some("10.96.0.10".parse().unwrap()));
        let web = t.ensure("web", "default", &policy);
        web.set_control(Some(Arc::new(vec![Endpoint::new(addr("10.1.0.9:4143"))])));

        let r = t.resolve(addr("10.96.0.10:50051")).unwrap();
        assert_eq!(&*r.target.service, "pay");
        assert_eq!(r.endpoint, None);
        assert!(!r.opaque);
        // The app dialed a pod: that endpoint, whatever port it dialed.
        let r = t.resolve(addr("10.1.0.9:8080")).unwrap();
        assert_eq!(&*r.target.service, "web");
        assert_eq!(r.endpoint, Some(addr("10.1.0.9:4143")));
        assert!(t.resolve(addr("10.1.0.8:8080")).is_none());
        // Loopback endpoints are never an intercepted destination.
        assert!(t.resolve(addr("127.0.0.1:7001")).is_none());

        // A pushed virtual IP replaces the bootstrap one; its opaque ports count.
        pay.set_pushed_addressing(vec!["10.96.0.11".parse().unwrap()], vec![6379]);
        assert!(t.resolve(addr("10.96.0.10:50051")).is_none());
        assert!(t.resolve(addr("10.96.0.11:6379")).unwrap().opaque);
        assert!(!t.resolve(addr("10.96.0.11:50051")).unwrap().opaque);
        // Dual-stack: either family's virtual IP names the service.
        let both = vec!["10.96.0.11".parse().unwrap(), "fd00::11".parse().unwrap()];
        pay.set_pushed_addressing(both, vec![6379]);
        for dst in ["10.96.0.11:6379", "[fd00::11]:6379"] {
            let r = t.resolve(addr(dst)).unwrap();
            assert_eq!(
                (&*r.target.service, r.endpoint, r.opaque),
                ("pay", None, true)
            );
        }
        // Once the control plane forgets it, the bootstrap one is back.
        pay.set_pushed_addressing(Vec::new(), Vec::new());
        assert!(t.resolve(addr("10.96.0.10:6379")).is_some());
        // Endpoints leaving take their IP with them.
        web.set_control(Some(Arc::new(Vec::new())));
        assert!(t.resolve(addr("10.1.0.9:8080")).is_none());
    }
}
