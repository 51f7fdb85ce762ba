//! The mesh CA: a trust anchor (a self-signed root, ECDSA P-256, 10 years)
//! and an issuer (an intermediate signed by the root, 1 year) that signs
//! workload certificates.
//!
//! Both come from PEM files (`--ca-anchor`, `--ca-issuer-cert`,
//! `--ca-issuer-key`), or, for local use, from `--state-dir`, where they are
//! generated on first start and reused after (`generate`). Only the issuer's
//! key is needed to sign; the root's key, when it is in the state directory,
//! serves to replace an issuer that is about to expire.
//!
//! A workload certificate names its SPIFFE id as its only SAN (a URI, with an
//! empty subject), may serve and be a client (EKU serverAuth + clientAuth),
//! only signs (KeyUsage digitalSignature), is no CA, and is backdated a minute
//! for clocks a little behind ours. It carries the public key of the
//! workload's CSR: the CA never makes a workload's key.
//!
//! The same issuer signs the server certificate of tern-control's admission
//! webhook, for the DNS names the Kubernetes API server calls it by
//! ([`Ca::issue_server`], in `server.rs`).

mod generate;
mod server;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use serde_json::{json, Value};
use tern_identity::SpiffeId;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use crate::files;

pub const ANCHOR_FILE: &str = "trust-anchor.pem";
pub const ANCHOR_KEY_FILE: &str = "trust-anchor-key.pem";
pub const ISSUER_FILE: &str = "issuer.pem";
pub const ISSUER_KEY_FILE: &str = "issuer-key.pem";

/// How far certificates are backdated, for peers whose clocks are behind.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
pub const ANCHOR_LIFETIME: Duration = Duration::from_secs(3650 * 24 * 3600);
pub const ISSUER_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Larger CSRs are refused unread: a P-256 CSR is well under 1 KiB.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// Where the CA comes from: the CA's settings (`--ca-*`, `--state-dir`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Files {
        anchor: PathBuf,
        issuer_cert: PathBuf,
        issuer_key: PathBuf,
    },
    /// Generated into (and reused from) this directory.
    StateDir(PathBuf),
}

/// What `/state` and the checks need to know of a CA certificate.
#[derive(Clone, Debug)]
pub struct CertFacts {
    pub subject: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertFacts {
    fn json(&self) -> Value {
        json!({
            "subject": self.subject,
            "not_before": rfc3339(self.not_before),
            "not_after": rfc3339(self.not_after),
        })
    }
}

/// A certificate chain the CA issued.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The leaf, then the issuer chain up to (not including) the trust anchor.
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Issued {
    pub fn chain_pem(&self) -> String {
        tern_identity::pem::encode_certs(&self.chain)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the issuer certificate expired at {0}")]
    IssuerExpired(String),
    #[error("no randomness for a serial number")]
    Random,
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
}

/// Why a CSR was refused (all INVALID_ARGUMENT to the caller).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("csr_pem is empty")]
    Empty,
    #[error("csr_pem is larger than {MAX_CSR_BYTES} bytes")]
    TooLarge,
    #[error("csr_pem is not a readable, correctly self-signed CSR ({0})")]
    Unreadable(String),
    #[error("the CSR's SANs are [{found}]; it must name exactly [URI:{want}]")]
    WrongNames { found: String, want: String },
}

/// Parses a PEM CSR, checks its self-signature (rcgen verifies it while
/// parsing) and that its only SAN is `id` as a URI; returns its public key.
pub fn check_csr(csr_pem: &str, id: &SpiffeId) -> Result<rcgen::PublicKey, CsrError> {
    if csr_pem.trim().is_empty() {
        return Err(CsrError::Empty);
    }
    if csr_pem.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge);
    }
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| CsrError::Unreadable(e.to_string()))?;
    let want = id.to_string();
    let names = &csr.params.subject_alt_names;
    let exact = matches!(names.as_slice(), [SanType::URI(uri)] if uri.as_str() == want);
    if !exact {
        let found = names.iter().map(san_text).collect::<Vec<_>>().join(", ");
        return Err(CsrError::WrongNames { found, want });
    }
    Ok(csr.public_key)
}

fn san_text(san: &SanType) -> String {
    match san {
        SanType::URI(u) => format!("URI:{}", u.as_str()),
        SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
        SanType::Rfc822Name(m) => format!("email:{}", m.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        other => format!("{other:?}"),
    }
}

pub struct Ca {
    trust_domain: String,
    anchor_path: PathBuf,
    anchor_pem: String,
    anchor: CertFacts,
    /// The issuer's certificate, then any intermediates between it and the anchor.
    issuer_chain: Vec<CertificateDer<'static>>,
    issuer_facts: CertFacts,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Loads the CA from `source`, generating it first in a state directory
    /// that has none.
    pub fn load(source: &Source, trust_domain: &str) -> anyhow::Result<Ca> {
        let (anchor, cert, key) = match source {
            Source::Files {
                anchor,
                issuer_cert,
                issuer_key,
            } => (anchor.clone(), issuer_cert.clone(), issuer_key.clone()),
            Source::StateDir(dir) => {
                generate::prepare(dir, trust_domain, SystemTime::now())?;
                (
                    dir.join(ANCHOR_FILE),
                    dir.join(ISSUER_FILE),
                    dir.join(ISSUER_KEY_FILE),
                )
            }
        };
        let text = |p: &Path| -> anyhow::Result<String> {
            String::from_utf8(files::read(p)?)
                .with_context(|| format!("{}: not PEM text", p.display()))
        };
        Self::from_pem(
            &text(&anchor)?,
            &text(&cert)?,
            &text(&key)?,
            trust_domain,
            anchor.clone(),
        )
        .with_context(|| {
            format!(
                "CA from {}, {} and {}",
                anchor.display(),
                cert.display(),
                key.display()
            )
        })
    }

    /// Checks that the issuer is a CA whose key is `issuer_key_pem`, that it
    /// chains to one of the anchors, and that both are valid now.
    pub fn from_pem(
        anchor_pem: &str,
        issuer_pem: &str,
        issuer_key_pem: &str,
        trust_domain: &str,
        anchor_path: PathBuf,
    ) -> anyhow::Result<Ca> {
        let now = SystemTime::now();
        let anchors = tern_identity::pem::certs(anchor_pem.as_bytes()).context("trust anchor")?;
        let mut issuer_chain =
            tern_identity::pem::certs(issuer_pem.as_bytes()).context("issuer certificate")?;
        // A bundle that ends with the root: the root is not sent along.
        issuer_chain.retain(|c| !anchors.contains(c));
        let Some(issuer_der) = issuer_chain.first() else {
            bail!("the issuer certificate is the trust anchor itself; give an intermediate");
        };
        let key = KeyPair::from_pem(issuer_key_pem)
            .map_err(|e| anyhow::anyhow!("issuer key: not a PKCS#8 private key ({e})"))?;
        let mut anchor = None;
        for a in &anchors {
            let facts = ca_facts(a, "trust anchor", now)?;
            anchor.get_or_insert(facts);
        }
        let anchor = anchor.context("no trust anchor")?;
        let issuer_facts = ca_facts(issuer_der, "issuer", now)?;
        for c in &issuer_chain[1..] {
            ca_facts(c, "intermediate above the issuer", now)?;
        }
        let (_, parsed) = X509Certificate::from_der(issuer_der)
            .map_err(|e| anyhow::anyhow!("issuer certificate: {e}"))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            bail!("the issuer key does not belong to the issuer certificate");
        }
        verify_path(&issuer_chain, &anchors)?;
        let issuer = Issuer::from_ca_cert_der(issuer_der, key)
            .map_err(|e| anyhow::anyhow!("issuer certificate: {e}"))?;
        Ok(Ca {
            trust_domain: trust_domain.to_owned(),
            anchor_path,
            anchor_pem: anchor_pem.to_owned(),
            anchor,
            issuer_chain,
            issuer_facts,
            issuer,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The file the trust anchor was read from: what sidecars must trust.
    pub fn anchor_path(&self) -> &Path {
        &self.anchor_path
    }

    pub fn anchor_pem(&self) -> &str {
        &self.anchor_pem
    }

    pub fn anchor(&self) -> &CertFacts {
        &self.anchor
    }

    pub fn issuer(&self) -> &CertFacts {
        &self.issuer_facts
    }

    /// Whether `anchors` may replace the bundle in force: each is a CA certificate valid now,
    /// and the issuer chains to one of them (a bundle without the issuer's root would make
    /// every certificate this CA signs untrusted).
    pub fn check_anchors(&self, anchors: &[CertificateDer<'_>]) -> anyhow::Result<()> {
        let now = SystemTime::now();
        for a in anchors {
            ca_facts(a, "trust anchor", now)?;
        }
        verify_path(&self.issuer_chain, anchors)
    }

    /// The trust anchors as rustls roots.
    pub fn roots(&self) -> anyhow::Result<RootCertStore> {
        tern_identity::pem::roots(self.anchor_pem.as_bytes()).context("trust anchor")
    }

    /// Signs a certificate for `id` carrying `public_key`, valid from a minute
    /// ago for `lifetime` (never past the issuer's own expiry).
    pub fn issue(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        lifetime: Duration,
    ) -> Result<Issued, IssueError> {
        self.sign(
            DistinguishedName::new(),
            vec![SanType::URI(id.to_string().try_into()?)],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            public_key,
            lifetime,
        )
    }

    /// Signs a leaf (not a CA, digitalSignature) with these names and uses, valid from a
    /// minute ago for `lifetime` (never past the issuer's own expiry).
    fn sign(
        &self,
        subject: DistinguishedName,
        names: Vec<SanType>,
        uses: Vec<ExtendedKeyUsagePurpose>,
        public_key: &impl PublicKeyData,
        lifetime: Duration,
    ) -> Result<Issued, IssueError> {
        let now = whole_seconds(SystemTime::now());
        let not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now);
        let not_after = now
            .checked_add(lifetime)
            .unwrap_or(self.issuer_facts.not_after)
            .min(self.issuer_facts.not_after);
        if not_after <= now {
            return Err(IssueError::IssuerExpired(rfc3339(
                self.issuer_facts.not_after,
            )));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = subject;
        params.subject_alt_names = names;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = uses;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial().ok_or(IssueError::Random)?);
        params.not_before = offset(not_before)?;
        params.not_after = offset(not_after)?;
        let cert = params.signed_by(public_key, &self.issuer)?;
        let mut chain = Vec::with_capacity(1 + self.issuer_chain.len());
        chain.push(cert.der().clone());
        chain.extend(self.issuer_chain.iter().cloned());
        Ok(Issued {
            chain,
            not_before,
            not_after,
        })
    }

    /// The CA part of `/state`.
    pub fn json(&self) -> Value {
        json!({
            "trust_domain": self.trust_domain,
            "anchor_file": self.anchor_path.display().to_string(),
            "trust_anchor": self.anchor.json(),
            "issuer": self.issuer_facts.json(),
        })
    }
}

/// Parses a CA certificate and checks it is one and is valid at `now`.
fn ca_facts(der: &CertificateDer<'_>, what: &str, now: SystemTime) -> anyhow::Result<CertFacts> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| anyhow::anyhow!("{what}: not X.509 ({e})"))?;
    if !cert.is_ca() {
        bail!("{what} {} is not a CA certificate", cert.subject());
    }
    let v = cert.validity();
    let facts = CertFacts {
        subject: cert.subject().to_string(),
        not_before: unix(v.not_before.timestamp()),
        not_after: unix(v.not_after.timestamp()),
    };
    if now >= facts.not_after {
        bail!(
            "{what} {} expired at {}",
            facts.subject,
            rfc3339(facts.not_after)
        );
    }
    if now < facts.not_before {
        bail!(
            "{what} {} is not valid before {}",
            facts.subject,
            rfc3339(facts.not_before)
        );
    }
    Ok(facts)
}

/// Each certificate of `chain` is signed by the next, and the last by one of `anchors`.
fn verify_path(chain: &[CertificateDer<'_>], anchors: &[CertificateDer<'_>]) -> anyhow::Result<()> {
    fn parse<'a>(der: &'a CertificateDer<'_>) -> anyhow::Result<X509Certificate<'a>> {
        X509Certificate::from_der(der)
            .map(|(_, c)| c)
            .map_err(|e| anyhow::anyhow!("not X.509 ({e})"))
    }
    let chain = chain
        .iter()
        .map(parse)
        .collect::<anyhow::Result<Vec<_>>>()?;
    for pair in chain.windows(2) {
        if let [child, parent] = pair {
            child
                .verify_signature(Some(parent.public_key()))
                .map_err(|_| {
                    anyhow::anyhow!("{} is not signed by {}", child.subject(), parent.subject())
                })?;
        }
    }
    let top = chain.last().context("empty issuer chain")?;
    for a in anchors {
        let anchor = parse(a)?;
        if top.verify_signature(Some(anchor.public_key())).is_ok() {
            return Ok(());
        }
    }
    bail!(
        "the issuer {} is not signed by the trust anchor",
        top.subject()
    )
}

/// A random positive 128-bit serial number.
fn serial() -> Option<SerialNumber> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).ok()?;
    // Positive, and a fixed length: the top bit clear, the next one set.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Some(SerialNumber::from_slice(&bytes))
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    unix(
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
    )
}

fn unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

fn offset(t: SystemTime) -> Result<time::OffsetDateTime, rcgen::Error> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or(rcgen::Error::Time)
}

/// Unix seconds, as the Certify response carries them.
pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
