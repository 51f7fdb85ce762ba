//! The CA of a state directory: generated on first start, reused after, and
//! its issuer replaced from the root's key when it nears its expiry.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::{
    offset, serial, whole_seconds, ANCHOR_FILE, ANCHOR_KEY_FILE, ANCHOR_LIFETIME, CLOCK_SKEW,
    ISSUER_FILE, ISSUER_KEY_FILE, ISSUER_LIFETIME,
};
use crate::files::{self, Mode};

/// An issuer with less than this left is replaced at start (when the root's key is there).
pub const ISSUER_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Makes sure `dir` holds a usable CA as of `now`: generates one if it holds
/// none, replaces an issuer close to its expiry, and refuses a partial one.
pub fn prepare(dir: &Path, trust_domain: &str, now: SystemTime) -> anyhow::Result<()> {
    let all = [ANCHOR_FILE, ANCHOR_KEY_FILE, ISSUER_FILE, ISSUER_KEY_FILE];
    let present: Vec<&str> = all.into_iter().filter(|f| dir.join(f).exists()).collect();
    if present.is_empty() {
        files::ensure_dir(dir)?;
        generate(dir, trust_domain, now)?;
        tracing::info!(dir = %dir.display(), trust_domain, "generated a new CA (trust anchor and issuer)");
        return Ok(());
    }
    // The root's key may have been moved somewhere safer: it is only needed
    // to replace the issuer.
    let missing: Vec<&str> = [ANCHOR_FILE, ISSUER_FILE, ISSUER_KEY_FILE]
        .into_iter()
        .filter(|f| !present.contains(f))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{}: the CA there is incomplete ({} missing); restore the files, or remove {} to \
             generate a new CA (every workload certificate issued so far then stops being trusted)",
            dir.display(),
            missing.join(", "),
            present.join(", ")
        );
    }
    renew_issuer_if_due(dir, trust_domain, now)
}

/// Writes a new root and issuer into `dir`.
pub fn generate(dir: &Path, trust_domain: &str, now: SystemTime) -> anyhow::Result<()> {
    let root_key = new_key()?;
    let root = ca_params(
        &format!("Tern trust anchor {trust_domain}"),
        IsCa::Ca(BasicConstraints::Unconstrained),
        now,
        ANCHOR_LIFETIME,
    )?;
    let root_cert = root
        .self_signed(&root_key)
        .context("signing the trust anchor")?;
    let anchor = Issuer::new(root, root_key);
    files::write(
        &dir.join(ANCHOR_KEY_FILE),
        anchor.key().serialize_pem().as_bytes(),
        Mode::Private,
    )?;
    files::write(
        &dir.join(ANCHOR_FILE),
        root_cert.pem().as_bytes(),
        Mode::Public,
    )?;
    write_issuer(dir, &anchor, trust_domain, now)
}

/// A new issuer signed by `anchor`, written over the old one (key first: a
/// crash in between leaves a mismatch that loading reports, never a key
/// readable by others).
fn write_issuer(
    dir: &Path,
    anchor: &Issuer<'_, KeyPair>,
    trust_domain: &str,
    now: SystemTime,
) -> anyhow::Result<()> {
    let key = new_key()?;
    let mut params = ca_params(
        &format!("Tern issuer {trust_domain}"),
        IsCa::Ca(BasicConstraints::Constrained(0)),
        now,
        ISSUER_LIFETIME,
    )?;
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, anchor)
        .context("signing the issuer")?;
    files::write(
        &dir.join(ISSUER_KEY_FILE),
        key.serialize_pem().as_bytes(),
        Mode::Private,
    )?;
    files::write(&dir.join(ISSUER_FILE), cert.pem().as_bytes(), Mode::Public)
}

fn renew_issuer_if_due(dir: &Path, trust_domain: &str, now: SystemTime) -> anyhow::Result<()> {
    let issuer_pem = files::read(&dir.join(ISSUER_FILE))?;
    let issuer = tern_identity::pem::certs(&issuer_pem)
        .with_context(|| format!("{}", dir.join(ISSUER_FILE).display()))?;
    let Some(first) = issuer.first() else {
        return Ok(());
    };
    let (_, cert) = X509Certificate::from_der(first)
        .map_err(|e| anyhow::anyhow!("{}: not X.509 ({e})", dir.join(ISSUER_FILE).display()))?;
    let not_after = super::unix(cert.validity().not_after.timestamp());
    if not_after.duration_since(now).unwrap_or_default() > ISSUER_RENEW_BEFORE {
        return Ok(());
    }
    let key_path = dir.join(ANCHOR_KEY_FILE);
    if !key_path.exists() {
        tracing::warn!(
            issuer = %dir.join(ISSUER_FILE).display(),
            expires = %super::rfc3339(not_after),
            "the issuer expires soon and the trust anchor's key is not here to replace it"
        );
        return Ok(());
    }
    let anchor_pem = String::from_utf8(files::read(&dir.join(ANCHOR_FILE))?)
        .context("trust anchor: not PEM text")?;
    let key_pem =
        String::from_utf8(files::read(&key_path)?).context("trust anchor key: not PEM text")?;
    let key =
        KeyPair::from_pem(&key_pem).map_err(|e| anyhow::anyhow!("{}: {e}", key_path.display()))?;
    let anchor = Issuer::from_ca_cert_pem(&anchor_pem, key)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join(ANCHOR_FILE).display()))?;
    write_issuer(dir, &anchor, trust_domain, now)?;
    tracing::info!(dir = %dir.display(), old_expiry = %super::rfc3339(not_after), "replaced the issuer, which was about to expire");
    Ok(())
}

fn new_key() -> anyhow::Result<KeyPair> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating an ECDSA P-256 key")
}

fn ca_params(
    common_name: &str,
    is_ca: IsCa,
    now: SystemTime,
    lifetime: Duration,
) -> anyhow::Result<CertificateParams> {
    let now = whole_seconds(now);
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tern");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = is_ca;
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(serial().context("no randomness for a serial number")?);
    params.not_before = offset(now.checked_sub(CLOCK_SKEW).unwrap_or(now))?;
    params.not_after = offset(now + lifetime)?;
    Ok(params)
}
