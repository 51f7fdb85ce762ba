//! The sidecar's workload identity and the mTLS it gives the mesh hops.
//!
//! At start the sidecar makes a key pair in memory (it is never written or
//! sent), asks tern-control's CA for a certificate with a CSR and its
//! bootstrap token ([`issue`]), and renews at about 70% of the lifetime. The
//! certificate lives in a [`CertStore`] that every TLS config resolves at
//! handshake time, so a renewal changes what new handshakes present without
//! touching open connections. [`tls`] holds the two ends: dialing an
//! endpoint with its expected identity checked, and accepting on the inbound
//! port in strict or permissive mode.

pub mod issue;
pub mod tls;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use prometheus::{Gauge, IntCounterVec};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tern_identity::tls::{ClientAuth, ALPN_H2, ALPN_HTTP1, ALPN_TERN_TCP};
use tern_identity::{CertStore, SpiffeId};

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
    pub roots: Arc<RootCertStore>,
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
    pub renewals: IntCounterVec,
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
        let renewals = IntCounterVec::new(
            prometheus::Opts::new(
                "tern_identity_renewals_total",
                "Certificate requests to the control plane's CA, by result (ok, error).",
            ),
            &["result"],
        )?;
        metrics
            .registry
            .register(Box::new(handshake_failures.clone()))?;
        metrics.registry.register(Box::new(handshakes.clone()))?;
        metrics.registry.register(Box::new(cert_expiry.clone()))?;
        metrics.registry.register(Box::new(renewals.clone()))?;
        Ok(Self {
            handshake_failures,
            handshakes,
            cert_expiry,
            renewals,
        })
    }
}

impl Identity {
    /// Reads the trust anchors; the certificate itself arrives later from [`issue`].
    pub fn load(config: &IdentityConfig, metrics: &Metrics) -> anyhow::Result<Arc<Self>> {
        let pem = std::fs::read(&config.trust_anchors)
            .with_context(|| format!("reading trust anchors {}", config.trust_anchors.display()))?;
        let roots = Arc::new(
            tern_identity::pem::roots(&pem)
                .with_context(|| format!("trust anchors {}", config.trust_anchors.display()))?,
        );
        let store = CertStore::new();
        let server = tern_identity::tls::server_config(
            Arc::clone(&store),
            Arc::clone(&roots),
            ClientAuth::Required,
        )
        .context("inbound TLS config")?;
        Ok(Arc::new(Self {
            id: config.id.clone(),
            store,
            roots,
            server,
            control_plane_identity: Arc::clone(&config.control_plane_identity),
            clients: Mutex::new(HashMap::new()),
            metrics: TlsMetrics::register(metrics).context("TLS metrics")?,
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
            Arc::clone(&self.roots),
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
