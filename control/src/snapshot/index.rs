//! Which service an address or a name belongs to, for on-demand lookups.
//!
//! Kept beside the views and updated from them, service by service, as they
//! change: a lookup is two hash probes however large the mesh is. Every
//! virtual IP of a service counts (both families of a dual-stack one), then
//! the IPs of its endpoints (an app may dial a pod directly); names are the
//! service's DNS name, besides the `pay.ns.svc.<domain>` forms that
//! [`super::target`] resolves without an index.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use tern_proto::control::v1 as pb;

use super::Views;
use crate::config::ServiceKey;

#[derive(Default)]
pub struct Index {
    vips: HashMap<IpAddr, ServiceKey>,
    endpoint_ips: HashMap<IpAddr, ServiceKey>,
    names: HashMap<String, ServiceKey>,
    /// What each service put in the maps above, to take it out again.
    entries: HashMap<ServiceKey, Entries>,
}

#[derive(Default)]
struct Entries {
    vips: Vec<IpAddr>,
    endpoint_ips: Vec<IpAddr>,
    name: Option<String>,
}

impl Index {
    /// An index of every view.
    pub fn of(views: &Views) -> Index {
        let mut index = Index::default();
        index.update(views, views.keys());
        index
    }

    /// Re-indexes `changed` from their current views (gone ones drop out).
    pub fn update<'a>(&mut self, views: &Views, changed: impl IntoIterator<Item = &'a ServiceKey>) {
        for key in changed {
            self.remove(key);
            if let Some(view) = views.get(key) {
                self.insert(key, &view.message);
            }
        }
    }

    fn remove(&mut self, key: &ServiceKey) {
        let Some(old) = self.entries.remove(key) else {
            return;
        };
        for ip in old.vips {
            drop_if_owned(&mut self.vips, &ip, key);
        }
        for ip in old.endpoint_ips {
            drop_if_owned(&mut self.endpoint_ips, &ip, key);
        }
        if let Some(name) = old.name {
            drop_if_owned(&mut self.names, &name, key);
        }
    }

    fn insert(&mut self, key: &ServiceKey, sc: &pb::ServiceConfig) {
        let mut e = Entries::default();
        let vips = sc
            .virtual_ips
            .iter()
            .chain(std::iter::once(&sc.virtual_ip))
            .filter_map(|v| v.parse::<IpAddr>().ok());
        for ip in vips {
            // Two services claiming one IP: the first keeps it.
            self.vips.entry(ip).or_insert_with(|| key.clone());
            e.vips.push(ip);
        }
        for ep in &sc.endpoints {
            if let Ok(addr) = ep.address.parse::<SocketAddr>() {
                let ip = addr.ip();
                self.endpoint_ips.entry(ip).or_insert_with(|| key.clone());
                e.endpoint_ips.push(ip);
            }
        }
        if !sc.dns_name.is_empty() {
            let name = normalize(&sc.dns_name);
            self.names
                .entry(name.clone())
                .or_insert_with(|| key.clone());
            e.name = Some(name);
        }
        self.entries.insert(key.clone(), e);
    }

    /// The service at `addr`: the one whose virtual IP it is, else the one
    /// with an endpoint on its IP; `None`: outside the mesh.
    pub fn by_address(&self, addr: SocketAddr) -> Option<&ServiceKey> {
        let ip = addr.ip().to_canonical();
        self.vips.get(&ip).or_else(|| self.endpoint_ips.get(&ip))
    }

    /// The service whose DNS name is `name` (any case, port and final dot ignored).
    pub fn by_dns_name(&self, name: &str) -> Option<&ServiceKey> {
        self.names.get(&normalize(name))
    }

    /// Every service indexed, for tests.
    pub fn services(&self) -> BTreeSet<&ServiceKey> {
        self.entries.keys().collect()
    }
}

fn drop_if_owned<K: Eq + std::hash::Hash>(
    map: &mut HashMap<K, ServiceKey>,
    k: &K,
    key: &ServiceKey,
) {
    if map.get(k) == Some(key) {
        map.remove(k);
    }
}

/// `Pay.Example.com.:8080` → `pay.example.com`.
pub fn normalize(name: &str) -> String {
    let host = match name.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => name,
    };
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use super::*;
    use crate::snapshot::View;

    fn view(name: &str, vips: &[&str], endpoints: &[&str], dns: &str) -> pb::ServiceConfig {
        pb::ServiceConfig {
            name: name.into(),
            namespace: "default".into(),
            virtual_ip: vips.first().map(|v| v.to_string()).unwrap_or_default(),
            virtual_ips: vips.iter().map(|v| v.to_string()).collect(),
            dns_name: dns.into(),
            endpoints: endpoints
                .iter()
                .map(|a| pb::Endpoint {
                    address: a.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn addresses_and_names_find_their_service_and_follow_changes() {
        let pay = ServiceKey::new("default", "pay");
        let mut views = Views::new();
        let v = view(
            "pay",
            &["10.96.0.10", "fd00::10"],
            &["10.1.0.7:4143"],
            "Pay.Example.com",
        );
        views.insert(pay.clone(), Arc::new(View::new(v)));
        let mut index = Index::of(&views);
        let at = |i: &Index, a: &str| i.by_address(a.parse().unwrap()).cloned();
        assert_eq!(at(&index, "10.96.0.10:50051"), Some(pay.clone()));
        assert_eq!(at(&index, "[fd00::10]:80"), Some(pay.clone()));
        // A pod dialed directly, at any port.
        assert_eq!(at(&index, "10.1.0.7:8080"), Some(pay.clone()));
        assert_eq!(at(&index, "10.96.0.11:50051"), None);
        assert_eq!(index.by_dns_name("pay.example.com.:443"), Some(&pay));

        // The endpoint moves; the old IP is outside the mesh from then on.
        let v = view("pay", &["10.96.0.10"], &["10.1.0.8:4143"], "");
        views.insert(pay.clone(), Arc::new(View::new(v)));
        index.update(&views, [&pay]);
        assert_eq!(at(&index, "10.1.0.7:8080"), None);
        assert_eq!(at(&index, "10.1.0.8:8080"), Some(pay.clone()));
        assert_eq!(at(&index, "[fd00::10]:80"), None);
        assert_eq!(index.by_dns_name("pay.example.com"), None);

        views.remove(&pay);
        index.update(&views, [&pay]);
        assert!(index.services().is_empty());
        assert_eq!(at(&index, "10.96.0.10:1"), None);
    }
}
