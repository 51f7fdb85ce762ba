//! Workload identity for the Tern mesh, shared by the sidecar, the control
//! plane and the tests: SPIFFE ids and how they sit in certificates, the
//! bootstrap tokens a workload proves itself with, a hot-swappable store for
//! the current certificate, and the rustls configurations for mesh mTLS
//! (TLS 1.3 only, chains checked against the mesh trust anchors, and the peer's
//! SPIFFE id checked against the identity discovery expects). The trust anchors
//! are a bundle of roots that a running process replaces when its file changes.

pub mod anchors;
pub mod csr;
pub mod pem;
pub mod spiffe;
pub mod store;
pub mod tls;
pub mod token;

pub use anchors::{AnchorsFile, Bundle, TrustAnchors};
pub use spiffe::SpiffeId;
pub use store::{CertStore, Credentials};

use std::sync::Arc;

/// What a connection's TLS handshake established, put in the extensions of
/// every request that arrives on it: authorization, access logs and metrics
/// read the peer's identity from here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnTls {
    /// "TLSv1.3"; `None` for a plaintext connection.
    pub version: Option<&'static str>,
    /// The peer's verified SPIFFE id, when it presented a mesh certificate.
    pub peer_identity: Option<Arc<str>>,
}

impl ConnTls {
    pub fn plaintext() -> Self {
        Self::default()
    }

    pub fn is_tls(&self) -> bool {
        self.version.is_some()
    }
}
