//! The ports the app serves, which the sidecar forwards to (`TERN_INBOUND_PORTS`).
//!
//! tern-init redirects every inbound TCP port to the sidecar (less the skip list), so nothing
//! reaches the app around it; the sidecar then forwards only to the ports the app serves and
//! refuses the rest. Those are the TCP ports its containers declare, the ports their probes name
//! by number (the kubelet's probes come through the sidecar too), and what
//! `tern.dev/inbound-ports` adds; less `tern.dev/skip-inbound-ports`, whose traffic bypasses
//! the sidecar on purpose and must not reach the app through it either.

use k8s_openapi::api::core::v1::{Container, PodSpec, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The TCP ports the app's containers declare, in order, each once.
pub(crate) fn declared(spec: &PodSpec) -> Vec<u16> {
    let mut ports = Vec::new();
    let declared = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| u16::try_from(p.container_port).ok().filter(|p| *p > 0));
    for port in declared {
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
}

/// `8080` or `9000-9010` (both ends included, from 1 to 65535).
pub(crate) fn port_or_range(s: &str) -> bool {
    range(s).is_some()
}

fn range(s: &str) -> Option<(u16, u16)> {
    let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p > 0);
    match s.split_once('-') {
        Some((a, b)) => match (port(a), port(b)) {
            (Some(a), Some(b)) if a <= b => Some((a, b)),
            _ => None,
        },
        None => port(s).map(|p| (p, p)),
    }
}

/// The served ports as the proxy takes them (`8080,9000-9010`); `None` when there are none.
/// `extra` and `skip` are the annotations' lists, already checked with [`port_or_range`].
pub(crate) fn served(spec: &PodSpec, extra: Option<&str>, skip: Option<&str>) -> Option<String> {
    let mut set = vec![false; usize::from(u16::MAX) + 1];
    let probed = spec.containers.iter().flat_map(probe_ports);
    for port in declared(spec).into_iter().chain(probed) {
        set[usize::from(port)] = true;
    }
    for (list, serve) in [(extra, true), (skip, false)] {
        for (lo, hi) in list
            .into_iter()
            .flat_map(|l| l.split(','))
            .filter_map(range)
        {
            set[usize::from(lo)..=usize::from(hi)].fill(serve);
        }
    }
    let mut out: Vec<String> = Vec::new();
    let mut port = 1;
    while port < set.len() {
        if !set[port] {
            port += 1;
            continue;
        }
        let start = port;
        while port < set.len() && set[port] {
            port += 1;
        }
        out.push(match port - 1 == start {
            true => start.to_string(),
            false => format!("{start}-{}", port - 1),
        });
    }
    (!out.is_empty()).then(|| out.join(","))
}

/// The ports a container's probes name by number (a name refers to a declared port).
fn probe_ports(c: &Container) -> impl Iterator<Item = u16> + '_ {
    let probes = [&c.liveness_probe, &c.readiness_probe, &c.startup_probe];
    probes.into_iter().flatten().flat_map(|p: &Probe| {
        let numbered = |port: &IntOrString| match port {
            IntOrString::Int(n) => Some(*n),
            IntOrString::String(_) => None,
        };
        let http = p.http_get.as_ref().and_then(|h| numbered(&h.port));
        let tcp = p.tcp_socket.as_ref().and_then(|t| numbered(&t.port));
        let grpc = p.grpc.as_ref().map(|g| g.port);
        [http, tcp, grpc]
            .into_iter()
            .flatten()
            .filter_map(|n| u16::try_from(n).ok().filter(|p| *p > 0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> PodSpec {
        serde_yaml::from_str(yaml).unwrap_or_default()
    }

    #[test]
    fn declared_and_probed_ports_plus_extra_less_skipped() {
        let s = spec(
            "containers:\n\
             - name: app\n  ports: [{containerPort: 8080}, {containerPort: 53, protocol: UDP}]\n  \
               readinessProbe: {httpGet: {port: 8081, path: /ready}}\n  \
               livenessProbe: {tcpSocket: {port: http}}\n\
             - name: side\n  ports: [{containerPort: 9000}]\n  startupProbe: {grpc: {port: 9001}}\n",
        );
        assert_eq!(declared(&s), [8080, 9000]);
        assert_eq!(
            served(&s, None, None).as_deref(),
            Some("8080-8081,9000-9001")
        );
        assert_eq!(
            served(&s, Some("7000-7002,9100"), Some("9001,7001")).as_deref(),
            Some("7000,7002,8080-8081,9000,9100")
        );
        assert_eq!(served(&spec("containers: [{name: a}]"), None, None), None);
        assert_eq!(served(&s, None, Some("1-65535")), None);
    }

    #[test]
    fn ranges_are_checked() {
        for good in ["80", "9000-9010", "65535"] {
            assert!(port_or_range(good), "{good}");
        }
        for bad in ["0", "http", "9-3", "70000", "1-", ""] {
            assert!(!port_or_range(bad), "{bad}");
        }
    }
}
