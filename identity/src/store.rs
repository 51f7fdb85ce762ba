//! The workload's current certificate, swapped in place on renewal.
//!
//! rustls asks the resolver for a certificate at every handshake, so storing
//! a new one changes what the next handshake presents while connections
//! already open keep theirs: rotation never drops a connection.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use crate::spiffe::{self, IdError};

/// A certificate chain (leaf first), its key, and what the leaf says.
pub struct Credentials {
    pub certified: Arc<CertifiedKey>,
    pub identity: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("empty certificate chain")]
    EmptyChain,
    #[error("leaf certificate: {0}")]
    Leaf(#[from] IdError),
    #[error("private key: {0}")]
    Key(rustls::Error),
    #[error("the private key does not match the certificate: {0}")]
    Mismatch(rustls::Error),
}

impl Credentials {
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: &PrivateKeyDer<'_>,
    ) -> Result<Self, CredentialsError> {
        let leaf = chain.first().ok_or(CredentialsError::EmptyChain)?;
        let identity = spiffe::spiffe_id_of(leaf)?;
        let (not_before, not_after) = spiffe::validity(leaf)?;
        let signer = crate::tls::provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(CredentialsError::Key)?;
        let certified = CertifiedKey::new(chain, signer);
        certified.keys_match().map_err(CredentialsError::Mismatch)?;
        Ok(Self {
            certified: Arc::new(certified),
            identity,
            not_before,
            not_after,
        })
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// Whether a peer would accept the certificate at `t`.
    pub fn is_valid_at(&self, t: SystemTime) -> bool {
        self.not_before <= t && t < spiffe::refused_from(self.not_after)
    }
}

/// Holds the current [`Credentials`]; empty until the first are issued.
#[derive(Default)]
pub struct CertStore {
    current: ArcSwapOption<Credentials>,
}

impl CertStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set(&self, creds: Credentials) {
        self.current.store(Some(Arc::new(creds)));
    }

    pub fn get(&self) -> Option<Arc<Credentials>> {
        self.current.load_full()
    }

    /// Whether a certificate is held and valid now: peers refuse an expired one.
    pub fn is_valid(&self) -> bool {
        self.current
            .load()
            .as_ref()
            .is_some_and(|c| c.is_valid_at(SystemTime::now()))
    }

    fn certified(&self) -> Option<Arc<CertifiedKey>> {
        self.current
            .load()
            .as_ref()
            .map(|c| Arc::clone(&c.certified))
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.current.load();
        f.debug_struct("CertStore")
            .field("identity", &current.as_ref().map(|c| c.identity.as_str()))
            .finish()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certified()
    }
}

impl ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.certified()
    }

    fn has_certs(&self) -> bool {
        self.current.load().is_some()
    }
}
