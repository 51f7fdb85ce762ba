//! Roots and issuers made by the test (not by tern-control's state directory) for a root
//! rotation, and files updated the way Kubernetes updates a ConfigMap or Secret volume.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A self-signed root CA.
pub struct Root {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// An intermediate CA signed by a [`Root`]: what tern-control's `--ca-issuer-*` take.
pub struct Intermediate {
    pub cert_pem: String,
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca_params(name: &str) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

impl Root {
    pub fn new(name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let params = ca_params(name)?;
        let pem = params.self_signed(&key)?.pem();
        Ok(Self {
            pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// An issuer under this root.
    pub fn intermediate(&self, name: &str) -> Result<Intermediate> {
        let key = KeyPair::generate()?;
        let params = ca_params(name)?;
        let cert_pem = params.signed_by(&key, &self.issuer)?.pem();
        Ok(Intermediate {
            cert_pem,
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }
}

impl Intermediate {
    /// A workload certificate for `spiffe_id` (the chain, leaf first, and its key, as PEM):
    /// what a sidecar of this issuer would present.
    pub fn leaf(&self, spiffe_id: &str) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem() + &self.cert_pem, key.serialize_pem()))
    }
}

/// A file in a directory mounted like a ConfigMap volume: `NAME -> ..data/NAME`, with `..data` a
/// symlink to a version directory that each update replaces by renaming a new symlink over it.
pub struct MountedFile {
    dir: PathBuf,
    name: String,
    version: u32,
}

impl MountedFile {
    pub fn create(dir: &Path, name: &str, content: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut file = Self {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            version: 0,
        };
        file.update(content)?;
        let link = file.path();
        symlink(format!("..data/{name}"), &link)
            .with_context(|| format!("linking {}", link.display()))?;
        Ok(file)
    }

    /// The path a container reads.
    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// What the kubelet does on an update: the new content in a new version directory, then
    /// `..data` switched to it atomically.
    pub fn update(&mut self, content: &str) -> Result<()> {
        self.version += 1;
        let version = format!("..v{}", self.version);
        let version_dir = self.dir.join(&version);
        std::fs::create_dir(&version_dir)
            .with_context(|| format!("creating {}", version_dir.display()))?;
        std::fs::write(version_dir.join(&self.name), content)
            .with_context(|| format!("writing {}", version_dir.display()))?;
        let tmp = self.dir.join("..data_tmp");
        symlink(&version, &tmp).with_context(|| format!("linking {}", tmp.display()))?;
        std::fs::rename(&tmp, self.dir.join("..data"))
            .with_context(|| format!("switching {}/..data", self.dir.display()))
    }
}
