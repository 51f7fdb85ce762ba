//! The workload side of issuance: a fresh key pair that never leaves the
//! process, and a certificate signing request naming the identity wanted.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::SpiffeId;

/// An ECDSA P-256 key held only in memory.
pub struct WorkloadKey {
    pair: KeyPair,
}

impl WorkloadKey {
    pub fn generate() -> Result<Self, rcgen::Error> {
        Ok(Self {
            pair: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// A PEM CSR whose only SAN is `id`'s URI.
    pub fn csr_pem(&self, id: &SpiffeId) -> Result<String, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.serialize_request(&self.pair)?.pem()
    }

    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pair.serialize_der()))
    }

    /// PEM of the private key, for tests that hand it to other TLS tools.
    pub fn private_key_pem(&self) -> String {
        self.pair.serialize_pem()
    }
}
