//! What a sidecar may say on its Subscribe stream, and how each message is
//! checked and acted on: the Hello ([`parse_hello`]) and what follows it
//! ([`handle`]). The session drives the stream and calls these; they hold no
//! stream state, so they sit below both the session and the server.
//!
//! Who a sidecar is comes from its connection, not from what it says: the
//! verified SPIFFE id of its client certificate is the workload's identity
//! and `Hello.identity` may only repeat it, and a registered address must be
//! at the stream's peer IP.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use tern_proto::control::v1 as pb;
use tern_proto::control::v1::sidecar_message::Kind;
use tonic::Status;

use crate::admission::{self, Refusal};
use crate::config::{names, ServiceKey};
use crate::metrics::Metrics;
use crate::snapshot;
use crate::state::{Mesh, Query, Subscriber, Workload};

/// Bounds what one sidecar can make the control plane hold.
const MAX_WATCHED: usize = 10_000;
const MAX_LABELS: usize = 64;
const MAX_NACK_REASON: usize = 1024;
/// A DNS name with a port.
const MAX_LOOKUP_NAME: usize = 253 + 6;

/// Acts on one message after the Hello; an error ends the stream.
pub fn handle(
    mesh: &Mesh,
    metrics: &Metrics,
    sub: &Subscriber,
    msg: pb::SidecarMessage,
) -> Result<(), Status> {
    match msg.kind {
        Some(Kind::Ack(pb::Ack { version })) => {
            if sub.ack(version) {
                metrics.acks.inc();
            } else {
                tracing::debug!(
                    id = sub.id,
                    version,
                    "ACK for a version never sent; ignored"
                );
            }
        }
        Some(Kind::Nack(pb::Nack {
            version,
            mut reason,
        })) => {
            if reason.len() > MAX_NACK_REASON {
                let mut cut = MAX_NACK_REASON;
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                reason.truncate(cut);
            }
            tracing::warn!(id = sub.id, service = %sub.workload.key, version, %reason, "sidecar rejected a snapshot");
            metrics.nacks.inc();
            sub.nack(version, reason);
        }
        Some(Kind::Watch(pb::Watch { services })) => {
            let own = &sub.workload.key.namespace;
            let keys = services
                .iter()
                .map(|s| snapshot::target(s, own))
                .collect::<Result<BTreeSet<_>, _>>()
                .map_err(|e| Status::invalid_argument(format!("Watch: {e}")))?;
            if !mesh.watch(sub.id, keys, MAX_WATCHED) {
                return Err(Status::resource_exhausted(format!(
                    "Watch: more than {MAX_WATCHED} services"
                )));
            }
        }
        Some(Kind::Lookup(l)) => {
            let query =
                lookup_query(&l).map_err(|e| Status::invalid_argument(format!("Lookup: {e}")))?;
            if !mesh.lookup(sub.id, l.id, &query, MAX_WATCHED) {
                return Err(Status::resource_exhausted(format!(
                    "Lookup: more than {MAX_WATCHED} services"
                )));
            }
        }
        Some(Kind::Forget(pb::Forget { services })) => {
            let own = &sub.workload.key.namespace;
            let keys = services
                .iter()
                .map(|s| snapshot::target(s, own))
                .collect::<Result<BTreeSet<_>, _>>()
                .map_err(|e| Status::invalid_argument(format!("Forget: {e}")))?;
            mesh.forget(sub.id, &keys);
        }
        Some(Kind::Hello(_)) => {
            return Err(Status::invalid_argument(
                "Hello may only be sent once, first",
            ));
        }
        None => return Err(Status::invalid_argument("empty SidecarMessage")),
    }
    Ok(())
}

/// The one thing a Lookup asks for: an address or a name.
fn lookup_query(l: &pb::Lookup) -> Result<Query, String> {
    match (l.address.is_empty(), l.name.is_empty()) {
        (false, true) => l
            .address
            .parse()
            .map(Query::Address)
            .map_err(|_| format!("address `{}` is not an ip:port address", l.address)),
        (true, false) if l.name.len() > MAX_LOOKUP_NAME => {
            Err(format!("name: longer than {MAX_LOOKUP_NAME} bytes"))
        }
        (true, false)
            if !l
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:_".contains(&b)) =>
        {
            Err(format!("name `{}` is not a host name", l.name))
        }
        (true, false) => Ok(Query::Name(l.name.clone())),
        _ => Err("exactly one of address and name must be set".into()),
    }
}

/// Checks a Hello and turns it into the workload and the services it calls.
/// `verified` is the SPIFFE id of the connection's client certificate.
/// A malformed field is INVALID_ARGUMENT naming it; an identity the
/// connection does not prove, or an address not at the peer's IP, is
/// PERMISSION_DENIED.
pub fn parse_hello(
    h: pb::Hello,
    peer: Option<SocketAddr>,
    verified: Option<&str>,
) -> Result<(Workload, BTreeSet<ServiceKey>), Refusal> {
    let (workload, calls) = parse_fields(h, peer).map_err(Refusal::InvalidHello)?;
    let claimed = workload.identity.as_deref();
    let mismatch = |m: String| Err(Refusal::IdentityMismatch(m));
    let identity = match (verified, claimed) {
        (Some(v), Some(c)) if v != c => {
            return mismatch(format!(
                "Hello.identity `{c}` is not the identity of the client certificate, `{v}`"
            ))
        }
        (Some(v), _) => Some(v.to_owned()),
        (None, Some(c)) => {
            return mismatch(format!(
                "Hello.identity `{c}`: an identity needs a client certificate (connect with TLS \
                 and the workload's certificate, or leave Hello.identity empty)"
            ))
        }
        (None, None) => None,
    };
    // A workload runs in its service account's namespace: a certificate
    // from one namespace does not register workloads in another.
    if let Some(v) = verified {
        let namespace = match tern_identity::SpiffeId::parse(v) {
            Ok(id) => id.namespace().to_owned(),
            Err(e) => return mismatch(format!("client certificate: {e}")),
        };
        if namespace != workload.key.namespace {
            return mismatch(format!(
                "Hello.namespace `{}`: the client certificate `{v}` is for namespace `{namespace}`",
                workload.key.namespace
            ));
        }
    }
    // A workload registers only itself: what it dials from is where it is.
    if let Some(address) = workload.address {
        admission::check_address(address, peer)?;
    }
    Ok((
        Workload {
            identity,
            ..workload
        },
        calls,
    ))
}

/// The Hello's fields, each checked; `identity` is still only the claim.
fn parse_fields(
    h: pb::Hello,
    peer: Option<SocketAddr>,
) -> Result<(Workload, BTreeSet<ServiceKey>), String> {
    names::dns_label(&h.service).map_err(|e| format!("Hello.service: {e}"))?;
    let namespace = if h.namespace.is_empty() {
        "default".to_owned()
    } else {
        names::dns_label(&h.namespace).map_err(|e| format!("Hello.namespace: {e}"))?;
        h.namespace
    };
    let identity = if h.identity.is_empty() {
        None
    } else {
        names::spiffe_id(&h.identity).map_err(|e| format!("Hello.identity: {e}"))?;
        Some(h.identity)
    };
    let address = if h.address.is_empty() {
        None
    } else {
        let mut a: SocketAddr = h
            .address
            .parse()
            .map_err(|_| format!("Hello.address: `{}` is not an ip:port address", h.address))?;
        // A sidecar listening on 0.0.0.0 is reached at the address its
        // stream comes from (the pod IP in Kubernetes).
        if a.ip().is_unspecified() {
            match peer {
                Some(p) => a.set_ip(p.ip()),
                None => {
                    return Err(
                        "Hello.address: an unspecified IP needs a known peer address".into(),
                    )
                }
            }
        }
        if a.port() == 0 {
            return Err("Hello.address: port 0 cannot be called".into());
        }
        Some(a)
    };
    let admin = admin_address(&h.admin, peer)?;
    if h.labels.len() > MAX_LABELS {
        return Err(format!("Hello.labels: more than {MAX_LABELS} labels"));
    }
    let mut labels = BTreeMap::new();
    for (k, v) in h.labels {
        names::label_key(&k).map_err(|e| format!("Hello.labels: {e}"))?;
        names::label_value(&v).map_err(|e| format!("Hello.labels.{k}: {e}"))?;
        labels.insert(k, v);
    }
    if h.calls.len() > MAX_WATCHED {
        return Err(format!("Hello.calls: more than {MAX_WATCHED} services"));
    }
    let calls = h
        .calls
        .iter()
        .map(|c| snapshot::target(c, &namespace).map_err(|e| format!("Hello.calls: {e}")))
        .collect::<Result<BTreeSet<_>, _>>()?;
    Ok((
        Workload {
            key: ServiceKey::new(namespace, h.service),
            identity,
            address,
            labels,
            peer,
            all_services: h.all_services,
            admin,
        },
        calls,
    ))
}

/// Hello.admin, where operators' tools reach the sidecar's admin listener:
/// only shown, never dialled by tern-control, so an unspecified IP becomes
/// the stream's and nothing more is checked.
fn admin_address(text: &str, peer: Option<SocketAddr>) -> Result<Option<SocketAddr>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    let mut a: SocketAddr = text
        .parse()
        .map_err(|_| format!("Hello.admin: `{text}` is not an ip:port address"))?;
    if let (true, Some(p)) = (a.ip().is_unspecified(), peer) {
        a.set_ip(p.ip());
    }
    Ok(Some(a))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn hello() -> pb::Hello {
        pb::Hello {
            service: "order".into(),
            address: "0.0.0.0:4143".into(),
            labels: [("version".to_owned(), "v1".to_owned())].into(),
            calls: vec!["pay".into(), "ledger.finance.svc.cluster.local".into()],
            ..Default::default()
        }
    }

    #[test]
    fn hello_fills_namespace_and_peer_ip() {
        let peer: SocketAddr = "10.1.2.3:55000".parse().unwrap();
        let (w, calls) = parse_hello(hello(), Some(peer), None).unwrap();
        assert_eq!(w.key, ServiceKey::new("default", "order"));
        assert_eq!(w.address, Some("10.1.2.3:4143".parse().unwrap()));
        assert_eq!(w.identity, None);
        let calls: Vec<String> = calls.iter().map(ToString::to_string).collect();
        assert_eq!(calls, ["default/pay", "finance/ledger"]);
        assert_eq!(w.admin, None);
        let mut h = hello();
        h.admin = "0.0.0.0:4191".into();
        let (w, _) = parse_hello(h, Some(peer), None).unwrap();
        assert_eq!(w.admin, Some("10.1.2.3:4191".parse().unwrap()));
    }

    #[test]
    fn bad_hellos_say_which_field() {
        type Mutate = fn(&mut pb::Hello);
        let cases: [(Mutate, &str); 6] = [
            (|h| h.service = String::new(), "Hello.service"),
            (|h| h.admin = "localhost".into(), "Hello.admin"),
            (|h| h.address = "nowhere".into(), "Hello.address"),
            (|h| h.identity = "pay".into(), "Hello.identity"),
            (|h| h.calls = vec!["Pay!".into()], "Hello.calls"),
            (
                |h| h.labels = [("bad key".to_owned(), String::new())].into(),
                "Hello.labels",
            ),
        ];
        for (mutate, field) in cases {
            let mut h = hello();
            h.address = "10.0.0.1:4143".into();
            mutate(&mut h);
            let e = parse_hello(h, None, None).unwrap_err().status();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with(field), "{e}");
        }
        let e = parse_hello(hello(), None, None).unwrap_err().status();
        assert!(e.message().starts_with("Hello.address"), "{e}");
    }

    const ORDER: &str = "spiffe://cluster.local/ns/default/sa/order";
    const PAY: &str = "spiffe://cluster.local/ns/default/sa/pay";

    #[test]
    fn identity_comes_from_the_client_certificate() {
        let peer: SocketAddr = "10.1.2.3:55000".parse().unwrap();
        // A verified identity is the workload's, whether the Hello repeats it or not.
        let (w, _) = parse_hello(hello(), Some(peer), Some(ORDER)).unwrap();
        assert_eq!(w.identity.as_deref(), Some(ORDER));
        let mut h = hello();
        h.identity = ORDER.into();
        let (w, _) = parse_hello(h.clone(), Some(peer), Some(ORDER)).unwrap();
        assert_eq!(w.identity.as_deref(), Some(ORDER));
        // A Hello claiming another identity than the certificate's.
        let e = parse_hello(h.clone(), Some(peer), Some(PAY))
            .unwrap_err()
            .status();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains(PAY) && e.message().contains(ORDER),
            "{e}"
        );
        // A claim without a certificate.
        let e = parse_hello(h, Some(peer), None).unwrap_err().status();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message()
                .contains("an identity needs a client certificate"),
            "{e}"
        );
        // No claim, no certificate: a workload without identity.
        let (w, _) = parse_hello(hello(), Some(peer), None).unwrap();
        assert_eq!(w.identity, None);
        // A certificate does not register workloads outside its namespace.
        let mut h = hello();
        h.namespace = "prod".into();
        let e = parse_hello(h, Some(peer), Some(ORDER))
            .unwrap_err()
            .status();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("namespace `default`"), "{e}");
    }

    #[test]
    fn lookups_ask_for_one_address_or_one_name() {
        let l = |address: &str, name: &str| pb::Lookup {
            id: 1,
            address: address.into(),
            name: name.into(),
        };
        assert!(matches!(
            lookup_query(&l("[fd00::10]:80", "")),
            Ok(Query::Address(a)) if a.port() == 80
        ));
        assert!(matches!(
            lookup_query(&l("", "pay.default:8080")),
            Ok(Query::Name(_))
        ));
        for (bad, says) in [
            (l("10.0.0.1", ""), "not an ip:port"),
            (l("10.0.0.1:80", "pay"), "exactly one"),
            (l("", ""), "exactly one"),
            (l("", "pay/evil"), "not a host name"),
            (l("", &"a".repeat(300)), "longer than"),
        ] {
            let e = lookup_query(&bad).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn the_address_is_the_peers_ip() {
        let peer: SocketAddr = "10.1.2.3:55000".parse().unwrap();
        let mut h = hello();
        h.address = "10.9.9.9:4143".into();
        let e = parse_hello(h.clone(), Some(peer), Some(ORDER)).unwrap_err();
        assert_eq!(e.reason(), "address_not_peer");
        assert_eq!(e.status().code(), tonic::Code::PermissionDenied);
        h.address = "10.1.2.3:4143".into();
        let (w, _) = parse_hello(h.clone(), Some(peer), Some(ORDER)).unwrap();
        assert_eq!(w.address, Some("10.1.2.3:4143".parse().unwrap()));
        // No address, nothing to check: a caller that serves nothing.
        h.address = String::new();
        assert!(parse_hello(h, Some(peer), Some(ORDER)).is_ok());
    }
}
