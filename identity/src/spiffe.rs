//! SPIFFE ids of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`
//! and reading them out of X.509 certificates.

use std::fmt;
use std::time::{Duration, SystemTime};

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("{0:?} is not a SPIFFE id (want spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)")]
    Malformed(String),
    #[error("{what} {value:?} is not valid (letters, digits, '-', '.', '_'; at most 253)")]
    BadPart { what: &'static str, value: String },
    #[error("certificate is not valid X.509: {0}")]
    BadCertificate(String),
    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    #[error("certificate has more than one spiffe:// URI SAN")]
    SeveralSpiffeIds,
}

/// A workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdError> {
        check("trust domain", trust_domain)?;
        check("namespace", namespace)?;
        check("service account", service_account)?;
        Ok(Self {
            trust_domain: trust_domain.to_ascii_lowercase(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    pub fn parse(s: &str) -> Result<Self, IdError> {
        let malformed = || IdError::Malformed(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(malformed)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => Self::new(td, ns, sa),
            _ => Err(malformed()),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

fn check(what: &'static str, value: &str) -> Result<(), IdError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(IdError::BadPart {
            what,
            value: value.to_string(),
        })
    }
}

/// The one `spiffe://` URI SAN of a DER certificate, as written in it.
pub fn spiffe_id_of(cert_der: &[u8]) -> Result<String, IdError> {
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| IdError::BadCertificate(e.to_string()))?;
    let mut found = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if uri.starts_with("spiffe://") {
                    if found.is_some() {
                        return Err(IdError::SeveralSpiffeIds);
                    }
                    found = Some(uri.to_string());
                }
            }
        }
    }
    found.ok_or(IdError::NoSpiffeId)
}

/// The first moment a certificate with this `notAfter` is refused. X.509
/// validity includes its `notAfter` second, and webpki checks whole seconds
/// (`now > notAfter`), so peers accept the certificate until one second later.
pub fn refused_from(not_after: SystemTime) -> SystemTime {
    not_after + Duration::from_secs(1)
}

/// When a DER certificate's validity starts and ends (`notBefore`, `notAfter`).
pub fn validity(cert_der: &[u8]) -> Result<(SystemTime, SystemTime), IdError> {
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| IdError::BadCertificate(e.to_string()))?;
    let v = cert.validity();
    let at = |t: i64| {
        if t >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    Ok((at(v.not_before.timestamp()), at(v.not_after.timestamp())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/pay").unwrap();
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "pay");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/pay");
        for bad in [
            "pay",
            "spiffe://cluster.local/ns/default",
            "spiffe://cluster.local/ns/default/sa/pay/x",
            "spiffe://cluster.local/ns//sa/pay",
            "spiffe://cluster.local/ns/a b/sa/pay",
            "https://cluster.local/ns/default/sa/pay",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
