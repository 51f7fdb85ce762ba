//! Server certificates for DNS names, for HTTPS endpoints that a client
//! outside the mesh reaches by name: the admission webhook, which the
//! Kubernetes API server calls as `tern-control.tern.svc` and checks against
//! the `caBundle` of the webhook configuration (the trust anchor).

use std::time::Duration;

use rcgen::{DistinguishedName, DnType, ExtendedKeyUsagePurpose, PublicKeyData, SanType};

use super::{Ca, IssueError, Issued};

impl Ca {
    /// Signs a TLS server certificate for `dns_names` (the first is also the
    /// subject's common name) carrying `public_key`: SANs are those DNS names
    /// only, EKU serverAuth only, valid from a minute ago for `lifetime`
    /// (never past the issuer's own expiry). The chain is leaf + issuer, as
    /// for workloads.
    pub fn issue_server(
        &self,
        dns_names: &[&str],
        public_key: &impl PublicKeyData,
        lifetime: Duration,
    ) -> Result<Issued, IssueError> {
        let mut subject = DistinguishedName::new();
        if let Some(first) = dns_names.first() {
            subject.push(DnType::CommonName, *first);
        }
        let names = dns_names
            .iter()
            .map(|n| Ok(SanType::DnsName((*n).try_into()?)))
            .collect::<Result<Vec<_>, rcgen::Error>>()?;
        self.sign(
            subject,
            names,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            public_key,
            lifetime,
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;
    use std::time::SystemTime;

    use rustls::pki_types::ServerName;
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer as _, X509Certificate};

    use super::*;
    use crate::ca::Source;

    const NAMES: [&str; 2] = [
        "tern-control.tern.svc",
        "tern-control.tern.svc.cluster.local",
    ];

    fn ca() -> (tempfile::TempDir, Ca) {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load(&Source::StateDir(dir.path().to_path_buf()), "cluster.local").unwrap();
        (dir, ca)
    }

    #[test]
    fn a_server_certificate_names_its_dns_names_only() {
        let (_dir, ca) = ca();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let issued = ca
            .issue_server(&NAMES, &key, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(issued.chain.len(), 2, "leaf + issuer");
        let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).unwrap();
        let sans: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => format!("DNS:{d}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(sans, NAMES.map(|n| format!("DNS:{n}")));
        assert!(!leaf.is_ca());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(issued.not_after > SystemTime::now());
        assert_eq!(
            leaf.subject().to_string(),
            "CN=tern-control.tern.svc",
            "the first name is the common name"
        );
    }

    #[test]
    fn a_web_pki_client_accepts_it_by_name() {
        let (_dir, ca) = ca();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let issued = ca
            .issue_server(&NAMES, &key, Duration::from_secs(3600))
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(ca.roots().unwrap()),
            tern_identity::tls::provider(),
        )
        .build()
        .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        let check = |name: &str| {
            rustls::client::danger::ServerCertVerifier::verify_server_cert(
                verifier.as_ref(),
                &issued.chain[0],
                &issued.chain[1..],
                &ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                now,
            )
        };
        for name in NAMES {
            check(name).unwrap();
        }
        assert!(check("tern-control.other.svc").is_err());
    }
}
