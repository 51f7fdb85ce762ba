//! The sidecar's workload identity and the mTLS it gives the mesh hops.
//!
//! At start the sidecar makes a key pair in memory (it is never written or
//! sent), asks tern-control's CA for a certificate with a CSR and its
//! bootstrap token ([`issue`]), and renews at about 70% of the lifetime. The
//! certificate lives in a [`CertStore`] that every TLS config resolves at
//! handshake time, so a renewal changes what new handshakes present without
//! touching open connections. [`tls`] holds the two ends: dialing an
//! endpoint with its expected identity checked, and accepting on the inbound
//! port in strict or permissive mode. The trust anchors are a bundle that
//! [`anchors`] reloads when its file changes (a ConfigMap update during a
//! root rotation); every handshake checks against the bundle in force.

pub mod anchors;
pub mod issue;
pub mod tls;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use prometheus::{Gauge, IntCounterVec, IntGauge};
use rustls::{ClientConfig, ServerConfig};
use tern_identity::tls::{ClientAuth, ALPN_H2, ALPN_HTTP1, ALPN_TERN_TCP};
use tern_identity::{CertStore, SpiffeId, TrustAnchors};

use crate::config::identity::IdentityConfig;
use crate::metrics::Metrics;

/// Client configs by (expected peer identity, protocol offered).
type ClientConfigs = HashMap<(Arc<str>, Alpn), Arc<ClientConfig>>;

/// What a mesh connection carries, offered as its one ALPN protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alpn {
    H2,
    Http1,
    /// Opaque TCP (see [`crate::tcp::header`]).
    Tcp,
}

impl Alpn {
    pub fn http(h2: bool) -> Self {
        if h2 {
            Self::H2
        } else {
            Self::Http1
        }
    }

    fn id(self) -> &'static [u8] {
        match self {
            Self::H2 => ALPN_H2,
            Self::Http1 => ALPN_HTTP1,
            Self::Tcp => ALPN_TERN_TCP,
        }
    }
}

pub struct Identity {
    pub id: SpiffeId,
    pub store: Arc<CertStore>,
    /// The bundle in force, replaced by [`anchors::follow`].
    pub anchors: Arc<TrustAnchors>,
    pub anchors_file: std::path::PathBuf,
    /// Inbound: a mesh client certificate is always required on TLS connections.
    pub server: Arc<ServerConfig>,
    pub control_plane_identity: Arc<str>,
    clients: Mutex<ClientConfigs>,
    pub metrics: TlsMetrics,
}

/// `tern_tls_*` and `tern_identity_*` metrics.
#[derive(Clone)]
pub struct TlsMetrics {
    pub handshake_failures: IntCounterVec,
    pub handshakes: IntCounterVec,
    pub cert_expiry: Gauge,
    /// When the certificate in use was received: with the expiry, its lifetime.
    pub cert_issued: Gauge,
    pub renewals: IntCounterVec,
    pub anchor_reloads: IntCounterVec,
    pub anchors_in_force: IntGauge,
}

impl TlsMetrics {
    pub fn register(metrics: &Metrics) -> Result<Self, prometheus::Error> {
        let handshake_failures = IntCounterVec::new(
            prometheus::Opts::new(
                "tern_tls_handshake_failures_total",
                "TLS handshakes that failed, by direction and reason (wrong_identity, unknown_ca, expired, no_client_cert, plaintext, ...).",
            ),
            &["direction", "reason"],
        )?;
        let handshakes = IntCounterVec::new(
            prometheus::Opts::new(
                "tern_tls_handshakes_total",
                "TLS handshakes completed, by direction.",
            ),
            &["direction"],
        )?;
        let cert_expiry = Gauge::new(
            "tern_identity_cert_expiry_timestamp_seconds",
            "When the workload certificate in use expires, seconds since the Unix epoch (0: none yet).",
        )?;
        let cert_issued = Gauge::new(
            "tern_identity_cert_issued_timestamp_seconds",
            "When the workload certificate in use was received, seconds since the Unix epoch (0: none yet); its lifetime is the expiry minus this.",
        )?;
        let renewals = IntCounterVec::new(
            prometheus::Opts::new(
                "tern_identity_renewals_total",
                "Certificate requests to the control plane's CA, by result (ok, error).",
            ),
            &["result"],
        )?;
        let anchor_reloads = IntCounterVec::new(
            prometheus::Opts::new(
                "tern_identity_trust_anchor_reloads_total",
                "Changes of the trust-anchor bundle file, by result: ok (in force) or rejected (unreadable, empty or unparsable; the last good bundle stays).",
            ),
            &["result"],
        )?;
        let anchors_in_force = IntGauge::new(
            "tern_identity_trust_anchors",
            "Roots in the trust-anchor bundle in force.",
        )?;
        // Both results exist from the start, so a refusal shows as 0 → 1, not as a new series.
        for result in ["ok", "rejected"] {
            anchor_reloads.with_label_values(&[result]);
        }
        metrics
            .registry
            .register(Box::new(anchor_reloads.clone()))?;
        metrics
            .registry
            .register(Box::new(anchors_in_force.clone()))?;
        metrics
            .registry
            .register(Box::new(handshake_failures.clone()))?;
        metrics.registry.register(Box::new(handshakes.clone()))?;
        metrics.registry.register(Box::new(cert_expiry.clone()))?;
        metrics.registry.register(Box::new(cert_issued.clone()))?;
        metrics.registry.register(Box::new(renewals.clone()))?;
        Ok(Self {
            handshake_failures,
            handshakes,
            cert_expiry,
            cert_issued,
            renewals,
            anchor_reloads,
            anchors_in_force,
        })
    }
}

impl Identity {
    /// Reads the trust anchors (a bad bundle at start is fatal: there is no last good one);
    /// the certificate itself arrives later from [`issue`].
    pub fn load(config: &IdentityConfig, metrics: &Metrics) -> anyhow::Result<Arc<Self>> {
        let path = &config.trust_anchors;
        let file = tern_identity::AnchorsFile::open(path)
            .with_context(|| format!("trust anchors {}", path.display()))?;
        let anchors = Arc::clone(file.anchors());
        let store = CertStore::new();
        let server = tern_identity::tls::server_config(
            Arc::clone(&store),
            Arc::clone(&anchors),
            ClientAuth::Required,
        )
        .context("inbound TLS config")?;
        let metrics = TlsMetrics::register(metrics).context("TLS metrics")?;
        metrics.anchors_in_force.set(gauge(anchors.current().len()));
        Ok(Arc::new(Self {
            id: config.id.clone(),
            store,
            anchors,
            anchors_file: path.clone(),
            server,
            control_plane_identity: Arc::clone(&config.control_plane_identity),
            clients: Mutex::new(HashMap::new()),
            metrics,
        }))
    }

    /// The client config for dialing a peer that must present `expected`,
    /// offering `alpn`; one per (identity, protocol), shared by every
    /// endpoint with that identity.
    pub fn client_config(
        &self,
        expected: &Arc<str>,
        alpn: Alpn,
    ) -> Result<Arc<ClientConfig>, rustls::Error> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&(Arc::clone(expected), alpn)) {
            return Ok(Arc::clone(c));
        }
        let config = tern_identity::tls::client_config(
            Some(Arc::clone(&self.store)),
            Arc::clone(&self.anchors),
            Arc::clone(expected),
            &[alpn.id()],
        )?;
        clients.insert((Arc::clone(expected), alpn), Arc::clone(&config));
        Ok(config)
    }

    /// Whether a certificate is held and still valid: peers refuse an expired one.
    pub fn is_ready(&self) -> bool {
        self.store.is_valid()
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
