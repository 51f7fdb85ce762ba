//! How a discovered service and the directory's documents of the same name
//! make one service: the config the rest of the control plane sees.
//!
//! The merge rule, per service key (`namespace/name`):
//! - The cluster owns addressing: the virtual IP (the primary ClusterIP;
//!   a headless service keeps the Service document's `virtualIP`, if any),
//!   the ports (in the cluster's order, each keeping its cluster name, or the
//!   document's when the cluster gives none) and the endpoints, each with
//!   its own target ports. A port's `targetPort` (for endpoints the cluster
//!   does not list) is the cluster's where it resolved one, else the document's.
//! - A `tern.dev` Service document of the same name extends it: its
//!   `protocol`, `identity` and `dnsName` apply, a port it lists with the same
//!   number keeps the document's `protocol: opaque`, and a port only it lists
//!   is added. Without one, the protocol is HTTP when a port's appProtocol is
//!   `http`, else gRPC (the default of a Service document).
//! - `Endpoints` documents add endpoints beside the cluster's (one address
//!   appears once). Registered sidecars add none: the EndpointSlices are the
//!   truth every replica of the control plane shares, and a registration
//!   lives in one replica only.
//! - TrafficPolicy and AuthorizationPolicy documents apply by name as to any
//!   service.
//!
//! What the directory said about a discovered key is kept aside, so a
//! service that leaves the cluster falls back to its documents, and a new
//! directory load is overlaid again ([`Overlay::apply`]).

use std::collections::BTreeMap;

use crate::config::{MeshConfig, Port, Protocol, Service, ServiceKey, StaticEndpoint};

use super::Discovered;

struct Entry {
    discovered: Discovered,
    dir_service: Option<Service>,
    dir_endpoints: Option<Vec<StaticEndpoint>>,
}

/// The discovered services, and the directory's entries they cover.
#[derive(Default)]
pub struct Overlay {
    entries: BTreeMap<ServiceKey, Entry>,
}

impl Overlay {
    /// Lays every discovered service over `config`, freshly loaded from the
    /// directory, remembering what the directory now says about each key.
    pub fn apply(&mut self, config: &mut MeshConfig) {
        for (key, e) in &mut self.entries {
            e.dir_service = config.services.remove(key);
            e.dir_endpoints = config.endpoints.remove(key);
            write(
                config,
                key,
                &e.discovered,
                e.dir_service.as_ref(),
                e.dir_endpoints.clone(),
            );
        }
    }

    /// Sets `key`'s discovered service (`None`: it is gone) in `config`, the
    /// config in force. Returns whether anything changed.
    pub fn set(
        &mut self,
        key: &ServiceKey,
        new: Option<Discovered>,
        config: &mut MeshConfig,
    ) -> bool {
        match (self.entries.get_mut(key), new) {
            (Some(e), Some(d)) => {
                if e.discovered == d {
                    return false;
                }
                e.discovered = d;
                write(
                    config,
                    key,
                    &e.discovered,
                    e.dir_service.as_ref(),
                    e.dir_endpoints.clone(),
                );
            }
            (None, Some(d)) => {
                // Not yet overlaid: what `config` holds for the key is the directory's.
                let e = Entry {
                    discovered: d,
                    dir_service: config.services.get(key).cloned(),
                    dir_endpoints: config.endpoints.get(key).cloned(),
                };
                write(
                    config,
                    key,
                    &e.discovered,
                    e.dir_service.as_ref(),
                    e.dir_endpoints.clone(),
                );
                self.entries.insert(key.clone(), e);
            }
            (Some(_), None) => {
                let Some(e) = self.entries.remove(key) else {
                    return false;
                };
                restore(&mut config.services, key, e.dir_service);
                restore(&mut config.endpoints, key, e.dir_endpoints);
                config.cluster_endpoints.remove(key);
            }
            (None, None) => return false,
        }
        true
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Endpoints of every discovered service.
    pub fn endpoint_count(&self) -> usize {
        self.entries
            .values()
            .map(|e| e.discovered.endpoints.len())
            .sum()
    }

    pub fn keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.entries.keys()
    }

    pub fn get(&self, key: &ServiceKey) -> Option<&Discovered> {
        self.entries.get(key).map(|e| &e.discovered)
    }
}

fn restore<V>(map: &mut BTreeMap<ServiceKey, V>, key: &ServiceKey, dir: Option<V>) {
    match dir {
        Some(v) => map.insert(key.clone(), v),
        None => map.remove(key),
    };
}

/// Writes the merged service and endpoints of `key` into `config`.
fn write(
    config: &mut MeshConfig,
    key: &ServiceKey,
    d: &Discovered,
    dir: Option<&Service>,
    dir_endpoints: Option<Vec<StaticEndpoint>>,
) {
    config.services.insert(key.clone(), merge(d, dir));
    config.cluster_endpoints.insert(key.clone());
    let mut endpoints = dir_endpoints.unwrap_or_default();
    endpoints.extend(d.endpoints.iter().map(|e| StaticEndpoint {
        address: e.address,
        labels: e.labels.clone(),
        identity: e.identity.clone(),
        source: e.source.clone(),
        target_ports: e.target_ports.clone(),
    }));
    restore(
        &mut config.endpoints,
        key,
        (!endpoints.is_empty()).then_some(endpoints),
    );
}

/// One service from the cluster's view and the document's (see the module doc).
pub fn merge(d: &Discovered, dir: Option<&Service>) -> Service {
    let dir_port = |n: u16| dir.and_then(|s| s.ports.iter().find(|p| p.port == n));
    let mut ports: Vec<Port> = d
        .ports
        .iter()
        .map(|p| Port {
            name: p
                .name
                .clone()
                .or_else(|| dir_port(p.port).and_then(|q| q.name.clone())),
            port: p.port,
            opaque: dir_port(p.port).is_some_and(|q| q.opaque),
            // For endpoints the cluster does not list (registered, static):
            // the cluster's target where it resolved one, else the document's.
            target_port: p
                .target_port
                .or_else(|| dir_port(p.port).and_then(|q| q.target_port))
                .filter(|t| *t != p.port),
        })
        .collect();
    for p in dir.map(|s| s.ports.as_slice()).unwrap_or_default() {
        if !d.ports.iter().any(|q| q.port == p.port) {
            ports.push(p.clone());
        }
    }
    let discovered_protocol = if d.http {
        Protocol::Http
    } else {
        Protocol::Grpc
    };
    Service {
        protocol: dir.map_or(discovered_protocol, |s| s.protocol),
        ports,
        virtual_ip: d
            .virtual_ips
            .first()
            .copied()
            .or_else(|| dir.and_then(|s| s.virtual_ip)),
        more_virtual_ips: d.virtual_ips.iter().skip(1).copied().collect(),
        identity: dir.and_then(|s| s.identity.clone()),
        dns_name: dir.and_then(|s| s.dns_name.clone()),
    }
}

#[cfg(test)]
mod tests;
