//! Reading PEM files and strings into rustls' DER types.

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("no {0} found in the PEM data")]
    Missing(&'static str),
    #[error("unreadable PEM: {0}")]
    Io(#[from] std::io::Error),
    #[error("certificate rejected as a trust anchor: {0}")]
    Anchor(rustls::Error),
}

pub fn certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let mut reader = pem;
    let certs = rustls_pemfile::certs(&mut reader).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(PemError::Missing("CERTIFICATE"));
    }
    Ok(certs)
}

pub fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    let mut reader = pem;
    rustls_pemfile::private_key(&mut reader)?.ok_or(PemError::Missing("PRIVATE KEY"))
}

/// The mesh trust anchors: every certificate in the PEM data.
pub fn roots(pem: &[u8]) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(pem)? {
        roots.add(cert).map_err(PemError::Anchor)?;
    }
    Ok(roots)
}

/// DER certificates as one PEM string.
pub fn encode_certs(certs: &[CertificateDer<'_>]) -> String {
    let mut out = String::new();
    for c in certs {
        out.push_str(&pem_block("CERTIFICATE", c.as_ref()));
    }
    out
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
