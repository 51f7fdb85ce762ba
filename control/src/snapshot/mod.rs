//! What each sidecar needs, and which sidecars a change affects.
//!
//! A service's *view* — its declaration, endpoints and routing, in the push
//! API's shape — is computed once per change and shared (`Arc`) by every
//! sidecar that calls the service. A sidecar's snapshot is the views it
//! watches plus its own inbound policy. After a config or registry change the
//! views are recomputed and compared with the old ones: an unchanged view
//! keeps its old `Arc`, and only sidecars interested in a changed one are
//! woken. So a change to `inventory` costs a sidecar that calls only `pay`
//! nothing at all.

mod convert;
mod delta;
mod index;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tern_proto::control::v1 as pb;

use crate::config::{names, MeshConfig, ServiceKey};
use crate::registry::Registry;

pub use convert::{inbound as inbound_policy, no_policy};
pub use index::{normalize as normalize_name, Index};

pub type Views = HashMap<ServiceKey, Arc<View<pb::ServiceConfig>>>;
pub type InboundViews = HashMap<ServiceKey, Arc<View<pb::InboundPolicy>>>;

/// A part of snapshots in both forms: the message, compared to find what
/// changed, and its protobuf encoding, copied as is into every snapshot that
/// carries it — a view shared by a thousand sidecars is encoded once.
#[derive(Debug)]
pub struct View<T> {
    pub message: T,
    pub encoded: Bytes,
}

impl<T: Message> View<T> {
    pub fn new(message: T) -> Self {
        let encoded = Bytes::from(message.encode_to_vec());
        View { message, encoded }
    }
}

impl<T> std::ops::Deref for View<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.message
    }
}

/// The view of one service, or `None` when nothing declares it and it has
/// no endpoints (then sidecars are not told about it at all).
pub fn service_view(
    key: &ServiceKey,
    config: &MeshConfig,
    registry: &Registry,
) -> Option<pb::ServiceConfig> {
    let declared = config.services.get(key);
    let statics = config.endpoints.get(key);
    // The cluster's endpoints are the same in every replica; a registration is not.
    let registered = registry
        .endpoints(key)
        .filter(|_| !config.cluster_endpoints.contains(key));
    if declared.is_none() && statics.is_none() && registered.is_none() {
        return None;
    }
    let mut sc = pb::ServiceConfig {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        ..Default::default()
    };
    if let Some(s) = declared {
        convert::service_fields(&mut sc, s);
    }
    // The declared identity is authoritative; a claim only fills the gap.
    let service_identity = declared.and_then(|s| s.identity.clone());
    let service_targets = declared.map(convert::target_ports).unwrap_or_default();
    let mut endpoints = BTreeMap::new();
    for e in statics.into_iter().flatten() {
        // An endpoint's own targets (resolved per EndpointSlice) win.
        let mut target_ports = service_targets.clone();
        target_ports.extend(
            e.target_ports
                .iter()
                .map(|(p, t)| (u32::from(*p), u32::from(*t))),
        );
        endpoints.insert(
            e.address,
            pb::Endpoint {
                address: e.address.to_string(),
                labels: convert::labels(&e.labels),
                identity: service_identity
                    .clone()
                    .or_else(|| e.identity.clone())
                    .unwrap_or_default(),
                target_ports,
            },
        );
    }
    // A live registration describes the workload better than a static entry.
    for (addr, e) in registered.into_iter().flatten() {
        endpoints.insert(
            *addr,
            pb::Endpoint {
                address: addr.to_string(),
                labels: convert::labels(&e.labels),
                identity: service_identity
                    .clone()
                    .or_else(|| e.identity.clone())
                    .unwrap_or_default(),
                target_ports: service_targets.clone(),
            },
        );
    }
    sc.endpoints = endpoints.into_values().collect();
    sc.traffic = Some(convert::traffic(config.traffic.get(key)));
    Some(sc)
}

/// Recomputes the views of `keys`, keeping the old `Arc` of every view that
/// did not change; returns the keys whose view changed (or appeared, or went).
pub fn refresh<'a>(
    views: &mut Views,
    keys: impl IntoIterator<Item = &'a ServiceKey>,
    config: &MeshConfig,
    registry: &Registry,
) -> BTreeSet<ServiceKey> {
    let mut changed = BTreeSet::new();
    for key in keys {
        let new = service_view(key, config, registry);
        if update(views, key, new) {
            changed.insert(key.clone());
        }
    }
    changed
}

/// [`refresh`] for every service the config or the registry knows, and every
/// service that had a view before (it may have disappeared).
pub fn refresh_all(
    views: &mut Views,
    config: &MeshConfig,
    registry: &Registry,
) -> BTreeSet<ServiceKey> {
    let keys: BTreeSet<ServiceKey> = config
        .services
        .keys()
        .chain(config.endpoints.keys())
        .chain(registry.services())
        .chain(views.keys())
        .cloned()
        .collect();
    refresh(views, &keys, config, registry)
}

/// Recomputes inbound policies; a service without one gets none here (the
/// caller hands out [`no_policy`] with the mesh-wide default). Returns the
/// services whose policy changed.
pub fn refresh_inbound(inbound: &mut InboundViews, config: &MeshConfig) -> BTreeSet<ServiceKey> {
    let keys: BTreeSet<ServiceKey> = config
        .authorization
        .keys()
        .chain(inbound.keys())
        .cloned()
        .collect();
    let mut changed = BTreeSet::new();
    for key in &keys {
        let new = config
            .authorization
            .contains_key(key)
            // The policy exists, so the mesh default plays no part.
            .then(|| convert::inbound(config, key, crate::config::Action::Allow));
        if update(inbound, key, new) {
            changed.insert(key.clone());
        }
    }
    changed
}

fn update<K: Eq + Hash + Clone, V: PartialEq + Message>(
    map: &mut HashMap<K, Arc<View<V>>>,
    key: &K,
    new: Option<V>,
) -> bool {
    match (map.get(key), new) {
        (Some(old), Some(new)) if old.message == new => false,
        (None, None) => false,
        (_, Some(new)) => {
            map.insert(key.clone(), Arc::new(View::new(new)));
            true
        }
        (Some(_), None) => {
            map.remove(key);
            true
        }
    }
}

/// What one sidecar's snapshot is built from: shared views, not copies.
pub struct Built {
    pub config_version: u64,
    pub services: Vec<Arc<View<pb::ServiceConfig>>>,
    pub inbound: Arc<View<pb::InboundPolicy>>,
    /// Lookup answers this snapshot carries (never part of [`Built::same_as`]).
    pub lookups: Vec<pb::LookupResult>,
}

impl Built {
    /// Same content as `other`, decided by pointer: unchanged views keep their `Arc`.
    pub fn same_as(&self, other: &Built) -> bool {
        Arc::ptr_eq(&self.inbound, &other.inbound)
            && self.services.len() == other.services.len()
            && self
                .services
                .iter()
                .zip(&other.services)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }

    /// The snapshot as a message (for tests and inspection).
    pub fn to_snapshot(&self, version: u64) -> pb::Snapshot {
        pb::Snapshot {
            version,
            config_version: self.config_version,
            services: self.services.iter().map(|s| s.message.clone()).collect(),
            inbound: Some(self.inbound.message.clone()),
            lookups: self.lookups.clone(),
            incremental: false,
            removed: Vec::new(),
        }
    }

    /// The snapshot's protobuf encoding, assembled from the views' own
    /// encodings: what a `pb::Snapshot` would encode to, without building one.
    pub fn encode(&self, version: u64) -> Bytes {
        let services = self.services.iter().map(|s| &s.encoded);
        self.encode_with(version, services, Some(&self.inbound.encoded), None)
    }

    /// [`Built::encode`] of some services and maybe the inbound policy;
    /// with `removed`, an incremental snapshot.
    fn encode_with<'a>(
        &self,
        version: u64,
        services: impl Iterator<Item = &'a Bytes> + Clone,
        inbound: Option<&'a Bytes>,
        removed: Option<&[String]>,
    ) -> Bytes {
        use prost::encoding::{
            bool, encode_key, encode_varint, encoded_len_varint, string, uint64, WireType,
        };
        let parts = services.map(|b| (3, b)).chain(inbound.map(|b| (4, b)));
        let len: usize = parts
            .clone()
            .map(|(_, b)| 1 + encoded_len_varint(b.len() as u64) + b.len())
            .sum();
        // Two tagged varints of at most 11 bytes each come first.
        let mut buf = BytesMut::with_capacity(len + 22);
        if version != 0 {
            uint64::encode(1, &version, &mut buf);
        }
        if self.config_version != 0 {
            uint64::encode(2, &self.config_version, &mut buf);
        }
        for (tag, part) in parts {
            encode_key(tag, WireType::LengthDelimited, &mut buf);
            encode_varint(part.len() as u64, &mut buf);
            buf.put_slice(part);
        }
        for answer in &self.lookups {
            prost::encoding::message::encode(5, answer, &mut buf);
        }
        if let Some(removed) = removed {
            bool::encode(6, &true, &mut buf);
            string::encode_repeated(7, removed, &mut buf);
        }
        buf.freeze()
    }
}

/// Who cares about which service: the index that turns "these services
/// changed" into "wake these subscribers" without scanning everyone.
#[derive(Default)]
pub struct Interest {
    /// Subscribers watching (calling) each service.
    watchers: HashMap<ServiceKey, HashSet<u64>>,
    /// Subscribers whose own workload is each service (its inbound policy).
    owners: HashMap<ServiceKey, HashSet<u64>>,
    /// Subscribers watching every service.
    all: HashSet<u64>,
}

impl Interest {
    pub fn watch(&mut self, id: u64, key: &ServiceKey) {
        self.watchers.entry(key.clone()).or_default().insert(id);
    }

    /// Stops counting `id` as a watcher of `keys`.
    pub fn unwatch(&mut self, id: u64, keys: &[ServiceKey]) {
        for key in keys {
            if let Some(set) = self.watchers.get_mut(key) {
                set.remove(&id);
                if set.is_empty() {
                    self.watchers.remove(key);
                }
            }
        }
    }

    pub fn watch_all(&mut self, id: u64) {
        self.all.insert(id);
    }

    pub fn own(&mut self, id: u64, key: &ServiceKey) {
        self.owners.entry(key.clone()).or_default().insert(id);
    }

    pub fn forget<'a>(
        &mut self,
        id: u64,
        watched: impl IntoIterator<Item = &'a ServiceKey>,
        own: &ServiceKey,
    ) {
        fn drop_id(map: &mut HashMap<ServiceKey, HashSet<u64>>, key: &ServiceKey, id: u64) {
            if let Some(set) = map.get_mut(key) {
                set.remove(&id);
                if set.is_empty() {
                    map.remove(key);
                }
            }
        }
        for key in watched {
            drop_id(&mut self.watchers, key, id);
        }
        drop_id(&mut self.owners, own, id);
        self.all.remove(&id);
    }

    /// Subscribers to wake after `views` and `inbound` services changed.
    pub fn affected(
        &self,
        views: &BTreeSet<ServiceKey>,
        inbound: &BTreeSet<ServiceKey>,
    ) -> BTreeSet<u64> {
        let watching = views.iter().filter_map(|k| self.watchers.get(k));
        let owning = inbound.iter().filter_map(|k| self.owners.get(k));
        // A policy change can change which services an all_services
        // subscriber may call, and so what it is sent.
        let all = (!views.is_empty() || !inbound.is_empty()).then_some(&self.all);
        watching
            .chain(owning)
            .chain(all)
            .flatten()
            .copied()
            .collect()
    }
}

/// Resolves a name a sidecar calls — `pay`, `pay.ns`, or
/// `pay.ns.svc.cluster.local` — against the sidecar's own namespace.
pub fn target(name: &str, own_namespace: &str) -> Result<ServiceKey, String> {
    let mut parts = name.split('.');
    let service = parts.next().unwrap_or_default();
    let namespace = parts.next();
    let rest: Vec<&str> = parts.collect();
    let bad = || {
        format!("`{name}` is not a service name (pay, pay.namespace or pay.namespace.svc.<domain>)")
    };
    if !(rest.is_empty() || rest.first() == Some(&"svc")) {
        return Err(bad());
    }
    names::dns_label(service).map_err(|_| bad())?;
    let namespace = namespace.unwrap_or(own_namespace);
    names::dns_label(namespace).map_err(|_| bad())?;
    Ok(ServiceKey::new(namespace, service))
}

#[cfg(test)]
mod tests;
