//! Kubernetes objects → a [`Discovered`] service. Pure functions, no I/O.
//!
//! - A Service of type ExternalName is no mesh service (its "endpoints" are a
//!   DNS name outside the cluster): `None`. A headless Service (`clusterIP:
//!   None`) is a service by name with no virtual IP.
//! - Only TCP ports count (Tern carries TCP); each is `port → targetPort`,
//!   the target resolved per EndpointSlice: a slice's ports are named after
//!   the Service's ports and carry the number the target resolved to for the
//!   pods in that slice, which is how a named targetPort is resolved.
//! - An endpoint counts while ready (`conditions.ready` not false — unset
//!   means ready, as the API documents) and not terminating.
//! - An endpoint whose pod has the `tern-proxy` container (the injector's,
//!   among containers or, as a native sidecar, init containers) is reached
//!   over mTLS at the sidecar's inbound port (its `tern-inbound` container
//!   port, 4143 by default) and must present the SPIFFE id of the pod's
//!   service account. Any other is reached in plaintext at the target port of
//!   the Service's first port, with no identity.
//! - Each endpoint carries its slice's `port → targetPort` wherever the two
//!   differ, so a caller's sidecar names the target port to the endpoint's
//!   sidecar, which forwards only to ports its app serves.
//! - An endpoint naming a pod not (yet) seen is left out until the pod is,
//!   rather than guessed plaintext; one with no pod reference (a slice
//!   written by hand) is plaintext.
//! - Dual-stack: the virtual IPs are every ClusterIP, the primary first; the
//!   endpoints come from slices of the primary family only, so a pod is not
//!   counted twice (once per family).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Discovered, DiscoveredEndpoint, DiscoveredPort};

/// The label an EndpointSlice names its Service by.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Finds a pod by namespace and name.
pub trait Pods {
    fn pod(&self, namespace: &str, name: &str) -> Option<&Pod>;
}

/// `service` with its EndpointSlices, or `None` when it is no mesh service.
pub fn service(
    service: &Service,
    slices: &[&EndpointSlice],
    pods: &dyn Pods,
    trust_domain: &str,
) -> Option<Discovered> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
    let virtual_ips = virtual_ips(spec.cluster_ips.as_deref(), spec.cluster_ip.as_deref());
    let service_ports: Vec<_> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| Some((p, u16::try_from(p.port).ok().filter(|n| *n > 0)?)))
        .collect();
    let family = virtual_ips.first().map(|ip| match ip {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    });
    let mut slices: Vec<&EndpointSlice> = slices
        .iter()
        .copied()
        .filter(|s| match family {
            Some(f) => s.address_type == f,
            None => s.address_type == "IPv4" || s.address_type == "IPv6",
        })
        .collect();
    // Slice names are unique within the namespace: a stable order.
    slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    let mut ports = Vec::with_capacity(service_ports.len());
    for (p, number) in &service_ports {
        let target_port = slices
            .iter()
            .find_map(|s| slice_port(s, p.name.as_deref()))
            .or_else(|| declared_target(p.target_port.as_ref(), *number));
        ports.push(DiscoveredPort {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port: *number,
            target_port,
        });
    }
    let first_port = service_ports.first().map(|(p, n)| (p, *n));
    let mut endpoints = BTreeMap::new();
    for slice in &slices {
        // The plaintext port for this slice's pods: the first Service port's target.
        let plain_port = first_port.and_then(|(p, n)| {
            slice_port(slice, p.name.as_deref())
                .or_else(|| declared_target(p.target_port.as_ref(), n))
        });
        let source = format!(
            "EndpointSlice {namespace}/{}",
            slice.metadata.name.as_deref().unwrap_or_default()
        );
        let targets = target_ports(slice, &service_ports);
        for e in slice.endpoints.iter().filter(|e| ready(e)) {
            if let Some(mut ep) = endpoint(e, namespace, plain_port, pods, trust_domain, &source) {
                ep.target_ports = targets.clone();
                endpoints.entry(ep.address).or_insert(ep);
            }
        }
    }
    let http = service_ports.iter().any(|(p, _)| {
        p.app_protocol
            .as_deref()
            .is_some_and(|a| a.eq_ignore_ascii_case("http"))
    });
    Some(Discovered {
        virtual_ips,
        ports,
        endpoints: endpoints.into_values().collect(),
        http,
    })
}

/// ClusterIPs, primary first (`clusterIPs` when set, else `clusterIP`);
/// `None` and unparsable values dropped.
pub fn virtual_ips(cluster_ips: Option<&[String]>, cluster_ip: Option<&str>) -> Vec<IpAddr> {
    let listed: Vec<&str> = match cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => cluster_ip.into_iter().collect(),
    };
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in listed.into_iter().filter_map(|s| s.parse().ok()) {
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// `port → targetPort` for the pods of `slice`, where the two differ; a port
/// whose named target the slice does not resolve is left out.
fn target_ports(slice: &EndpointSlice, ports: &[(&ServicePort, u16)]) -> BTreeMap<u16, u16> {
    ports
        .iter()
        .filter_map(|(p, n)| {
            let target = slice_port(slice, p.name.as_deref())
                .or_else(|| declared_target(p.target_port.as_ref(), *n))?;
            (target != *n).then_some((*n, target))
        })
        .collect()
}

/// The number a slice resolved the Service port `name` to (unnamed: `""`).
fn slice_port(slice: &EndpointSlice, name: Option<&str>) -> Option<u16> {
    let name = name.unwrap_or_default();
    slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref().unwrap_or_default() == name)
        .and_then(|p| p.port)
        .and_then(|n| u16::try_from(n).ok())
        .filter(|n| *n > 0)
}

/// A numeric targetPort, or the port itself when none is given; a named one
/// needs a slice to resolve it.
fn declared_target(target: Option<&IntOrString>, port: u16) -> Option<u16> {
    match target {
        None => Some(port),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok().filter(|n| *n > 0),
        Some(IntOrString::String(s)) => s.parse().ok().filter(|n| *n > 0),
    }
}

fn ready(e: &Endpoint) -> bool {
    let c = e.conditions.as_ref();
    c.and_then(|c| c.ready) != Some(false) && c.and_then(|c| c.terminating) != Some(true)
}

fn endpoint(
    e: &Endpoint,
    namespace: &str,
    plain_port: Option<u16>,
    pods: &dyn Pods,
    trust_domain: &str,
    source: &str,
) -> Option<DiscoveredEndpoint> {
    let ip: IpAddr = e.addresses.first()?.parse().ok()?;
    let pod = match e.target_ref.as_ref() {
        Some(r) if r.kind.as_deref().is_none_or(|k| k == "Pod") => {
            let ns = r.namespace.as_deref().unwrap_or(namespace);
            Some(pods.pod(ns, r.name.as_deref()?)?)
        }
        _ => None,
    };
    let labels = pod
        .and_then(|p| p.metadata.labels.clone())
        .unwrap_or_default();
    let (port, identity) = match pod.and_then(sidecar_inbound_port) {
        Some(inbound) => {
            let pod = pod?;
            (inbound, Some(pod_identity(pod, namespace, trust_domain)?))
        }
        None => (plain_port?, None),
    };
    Some(DiscoveredEndpoint {
        address: SocketAddr::new(ip, port),
        labels,
        identity,
        source: source.to_owned(),
        target_ports: BTreeMap::new(),
    })
}

/// The inbound port of the pod's Tern sidecar, if it has one.
pub fn sidecar_inbound_port(pod: &Pod) -> Option<u16> {
    let spec = pod.spec.as_ref()?;
    let proxy = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == tern_inject::PROXY_CONTAINER)?;
    let named = proxy
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("tern-inbound"))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .filter(|n| *n > 0);
    Some(named.unwrap_or(tern_inject::INBOUND_PORT))
}

/// `spiffe://<trust-domain>/ns/<ns>/sa/<service account>` (`default` when unset).
pub fn pod_identity(pod: &Pod, namespace: &str, trust_domain: &str) -> Option<String> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or(namespace);
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    match tern_identity::SpiffeId::new(trust_domain, ns, sa) {
        Ok(id) => Some(id.to_string()),
        Err(e) => {
            tracing::warn!(namespace = ns, service_account = sa, error = %e, "no SPIFFE id for a pod's service account; its endpoint is left out");
            None
        }
    }
}

#[cfg(test)]
mod tests;
