//! Who may subscribe as which workload, and at which address.
//!
//! With a CA (tern-control always has one) a sidecar proves who it is with
//! its client certificate, and everything it asks for is checked against
//! that proof, never against what its Hello says:
//! - a Subscribe needs a client certificate, unless the dev-only
//!   `--insecure-plaintext-subscribers` lets plaintext sidecars in;
//! - a Service admits one identity: the one it declares (`identity:`), else
//!   the service account named like the Service in its namespace
//!   (`spiffe://<trust-domain>/ns/<namespace>/sa/<service>`). Only that
//!   identity subscribes as the Service: it registers its endpoints and
//!   receives its inbound policy;
//! - a registered address is at the IP the stream comes from, so a workload
//!   registers only itself (no NAT between sidecars and tern-control);
//! - an address another identity holds is refused, never overwritten.
//!
//! Every refusal is counted by reason and logged (rate-limited, so a
//! misconfigured fleet cannot flood the log).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tonic::Status;

use crate::config::{Action, IdentityMatch, MeshConfig, ServiceKey};
use crate::metrics::Metrics;

/// Why a Subscribe was refused; [`Refusal::reason`] is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(
        "Subscribe needs a client certificate: connect over TLS with the workload's certificate \
         (from tern-control's CA); plaintext subscribers are allowed only with \
         --insecure-plaintext-subscribers"
    )]
    NoClientCertificate,
    /// A malformed Hello (INVALID_ARGUMENT, naming the field).
    #[error("{0}")]
    InvalidHello(String),
    /// Hello.identity or Hello.namespace contradicts the certificate.
    #[error("{0}")]
    IdentityMismatch(String),
    #[error("identity `{identity}` may not subscribe as Service `{service}`, which admits only `{admitted}`")]
    NotAdmitted {
        identity: String,
        service: ServiceKey,
        admitted: String,
    },
    #[error("Service `{service}` admits only `{admitted}`: registering an endpoint for it needs a client certificate for that identity")]
    CertificateRequired {
        service: ServiceKey,
        admitted: String,
    },
    #[error("Hello.address `{address}`: a workload registers only its own IP, and this stream comes from {peer} (no NAT may sit between sidecars and tern-control; advertise 0.0.0.0:<port> to use the stream's IP)")]
    AddressNotPeer { address: SocketAddr, peer: String },
    #[error("Hello.address `{address}` is already registered for Service `{service}` by {holder}; it is not taken over (it frees once that workload's stream ends and its grace is over)")]
    AddressHeld {
        address: SocketAddr,
        service: ServiceKey,
        holder: String,
    },
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoClientCertificate => "no_client_certificate",
            Refusal::InvalidHello(_) => "invalid_hello",
            Refusal::IdentityMismatch(_) => "identity_mismatch",
            Refusal::NotAdmitted { .. } => "not_admitted",
            Refusal::CertificateRequired { .. } => "certificate_required",
            Refusal::AddressNotPeer { .. } => "address_not_peer",
            Refusal::AddressHeld { .. } => "address_held",
        }
    }

    pub fn status(&self) -> Status {
        let message = self.to_string();
        match self {
            Refusal::NoClientCertificate => Status::unauthenticated(message),
            Refusal::InvalidHello(_) => Status::invalid_argument(message),
            Refusal::AddressHeld { .. } => Status::already_exists(message),
            _ => Status::permission_denied(message),
        }
    }
}

/// The identity a Service admits: its declared one, else the service
/// account named like it in its namespace, in `trust_domain`.
pub fn admitted(service: &ServiceKey, declared: Option<&str>, trust_domain: &str) -> String {
    match declared {
        Some(d) => d.to_owned(),
        None => format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            service.namespace, service.name
        ),
    }
}

/// The trust domain of a verified SPIFFE id (`spiffe://<domain>/...`).
pub fn trust_domain(id: &str) -> &str {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
}

/// Whether a workload with `caller`'s identity may call `service` at all:
/// its AuthorizationPolicy (or, without one, `authz_default`) allows some
/// call from it. What `all_services` shows beyond the caller's namespace.
pub fn may_call(
    config: &MeshConfig,
    authz_default: Action,
    caller: Option<&str>,
    service: &ServiceKey,
) -> bool {
    let Some(policy) = config.authorization.get(service) else {
        return authz_default == Action::Allow;
    };
    if policy.default_action == Action::Allow {
        return true;
    }
    let Some(caller) = caller else {
        return false;
    };
    let namespace = tern_identity::SpiffeId::parse(caller)
        .map(|id| id.namespace().to_owned())
        .unwrap_or_default();
    policy.rules.iter().any(|rule| {
        rule.from.is_empty()
            || rule.from.iter().any(|m| match m {
                IdentityMatch::Exact(id) => id == caller,
                IdentityMatch::Namespace(ns) => *ns == namespace,
            })
    })
}

/// Checks that `address` is at the stream's peer IP.
pub fn check_address(address: SocketAddr, peer: Option<SocketAddr>) -> Result<(), Refusal> {
    let peer_ip = peer.map(|p| p.ip().to_canonical());
    match peer_ip {
        Some(ip) if ip == address.ip().to_canonical() => Ok(()),
        _ => Err(Refusal::AddressNotPeer {
            address,
            peer: peer_ip.map_or_else(|| "an unknown address".into(), |ip: IpAddr| ip.to_string()),
        }),
    }
}

/// At most [`LogLimiter::PER_SECOND`] lines a second; the rest are counted
/// and reported with the next line let through.
pub struct LogLimiter {
    window: Mutex<(Instant, u32)>,
    suppressed: AtomicU64,
}

impl LogLimiter {
    pub const PER_SECOND: u32 = 10;

    pub fn new() -> Self {
        LogLimiter {
            window: Mutex::new((Instant::now(), 0)),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one)` if a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        // A panic elsewhere must not silence refusals for good.
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if now.duration_since(w.0) >= Duration::from_secs(1) {
            *w = (now, 0);
        }
        if w.1 >= Self::PER_SECOND {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        w.1 += 1;
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts and logs a refused Subscribe, and returns its status.
pub fn refuse(
    refusal: &Refusal,
    metrics: &Metrics,
    limiter: &LogLimiter,
    peer: Option<SocketAddr>,
    service: &str,
) -> Status {
    metrics
        .subscribe_refusals
        .with_label_values(&[refusal.reason()])
        .inc();
    let status = refusal.status();
    // The name comes from the peer, unchecked when the Hello was malformed.
    let mut cut = service.len().min(64);
    while !service.is_char_boundary(cut) {
        cut -= 1;
    }
    let service = &service[..cut];
    if let Some(suppressed) = limiter.allow() {
        tracing::warn!(peer = ?peer, service, reason = refusal.reason(), suppressed, detail = status.message(), "subscription refused");
    }
    status
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_service_admits_its_declared_identity_or_its_namesake() {
        let pay = ServiceKey::new("shop", "pay");
        assert_eq!(
            admitted(&pay, None, "cluster.local"),
            "spiffe://cluster.local/ns/shop/sa/pay"
        );
        let declared = "spiffe://cluster.local/ns/shop/sa/runner";
        assert_eq!(admitted(&pay, Some(declared), "x"), declared);
        assert_eq!(trust_domain(declared), "cluster.local");
        assert_eq!(trust_domain("nonsense"), "");
    }

    #[test]
    fn what_a_caller_may_call_follows_the_authorization_policies() {
        let service = |name: &str| {
            format!(
                "apiVersion: tern.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, \
                 namespace: finance}}\nspec: {{ports: [{{port: 80}}]}}\n---\n"
            )
        };
        let services: String = ["ledger", "audit", "open", "nopolicy"]
            .map(service)
            .concat();
        let policies = "\
apiVersion: tern.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ledger, namespace: finance}
spec: {service: ledger, rules: [{from: [{namespace: finance}]}]}
---
apiVersion: tern.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: finance}
spec: {service: audit, rules: [{from: [{identity: spiffe://td/ns/default/sa/order}]}]}
---
apiVersion: tern.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: open, namespace: finance}
spec: {service: open, default: allow, rules: []}
";
        let files = [(std::path::PathBuf::from("p.yaml"), services + policies)];
        let config = crate::config::parse_files(&files).unwrap();
        let key = |name: &str| ServiceKey::new("finance", name);
        let order = Some("spiffe://td/ns/default/sa/order");
        let teller = Some("spiffe://td/ns/finance/sa/teller");
        let may = |caller, name: &str, default| may_call(&config, default, caller, &key(name));
        assert!(!may(order, "ledger", Action::Allow));
        assert!(may(teller, "ledger", Action::Allow), "same namespace rule");
        assert!(may(order, "audit", Action::Deny), "identity rule");
        assert!(!may(teller, "audit", Action::Allow));
        assert!(may(None, "open", Action::Deny), "default: allow");
        assert!(!may(None, "ledger", Action::Allow), "no identity, no rule");
        // Without a policy: the mesh default.
        assert!(may(order, "nopolicy", Action::Allow));
        assert!(!may(order, "nopolicy", Action::Deny));
    }

    #[test]
    fn the_address_must_be_the_peers() {
        let peer: SocketAddr = "10.1.2.3:55000".parse().unwrap();
        assert!(check_address("10.1.2.3:4143".parse().unwrap(), Some(peer)).is_ok());
        // A dual-stack listener sees IPv4 peers as IPv4-mapped IPv6.
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:55000".parse().unwrap();
        assert!(check_address("10.1.2.3:4143".parse().unwrap(), Some(mapped)).is_ok());
        let e = check_address("10.9.9.9:4143".parse().unwrap(), Some(peer)).unwrap_err();
        assert_eq!(e.reason(), "address_not_peer");
        assert_eq!(e.status().code(), tonic::Code::PermissionDenied);
        assert!(e.to_string().contains("10.1.2.3"), "{e}");
        assert!(check_address("10.1.2.3:4143".parse().unwrap(), None).is_err());
    }

    #[test]
    fn refusals_map_to_codes() {
        assert_eq!(
            Refusal::NoClientCertificate.status().code(),
            tonic::Code::Unauthenticated
        );
        let held = Refusal::AddressHeld {
            address: "10.0.0.1:4143".parse().unwrap(),
            service: ServiceKey::new("default", "pay"),
            holder: "spiffe://cluster.local/ns/default/sa/pay".into(),
        };
        assert_eq!(held.status().code(), tonic::Code::AlreadyExists);
        assert!(held.to_string().contains("sa/pay"));
    }

    #[test]
    fn the_log_limiter_lets_ten_a_second_through() {
        let l = LogLimiter::new();
        for _ in 0..LogLimiter::PER_SECOND {
            assert_eq!(l.allow(), Some(0));
        }
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        l.window.lock().unwrap().0 -= Duration::from_secs(2);
        assert_eq!(l.allow(), Some(2), "the next line reports what it skipped");
    }
}
