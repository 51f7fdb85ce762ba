//! Sidecars with workload identities: a `tern-control` whose CA issues their
//! certificates, bootstrap tokens minted by the real `ternctl token create`,
//! and the flags that turn a [`ProxySpec`] into an mTLS sidecar.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::control::{ConfigDir, Control};
use crate::identity::mint_token;
use crate::proxy::ProxySpec;

pub const TRUST_DOMAIN: &str = "cluster.local";

/// `spiffe://cluster.local/ns/default/sa/<sa>`.
pub fn spiffe(sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{sa}")
}

/// A control plane run for its CA (and, when sidecars subscribe, its config).
pub struct MeshCa {
    pub control: Control,
    pub anchors: PathBuf,
    tokens: PathBuf,
}

impl MeshCa {
    /// tern-control over an empty mesh config, with `extra_args` (such as `--cert-lifetime 10s`).
    pub async fn start(dir: &Path, extra_args: &[&str]) -> Result<Self> {
        let config = ConfigDir::with_services(
            dir,
            "# No Service documents: the sidecars use static endpoints.\n",
        )?;
        Self::start_with(dir, &config, extra_args).await
    }

    pub async fn start_with(dir: &Path, config: &ConfigDir, extra_args: &[&str]) -> Result<Self> {
        let (control, anchors) = crate::identity::start_control(dir, config, extra_args).await?;
        Self::with_control(dir, control, anchors)
    }

    /// tern-control over an empty mesh config with `extra_args` that give it its CA as files
    /// (`--ca-anchor`, `--ca-issuer-cert`, `--ca-issuer-key`); sidecars trust `anchors`.
    pub async fn start_with_ca_files(
        dir: &Path,
        extra_args: &[&str],
        anchors: PathBuf,
    ) -> Result<Self> {
        let config = ConfigDir::with_services(dir, "# No Service documents.\n")?;
        let control = Control::start(dir, "tern-control", &config, extra_args).await?;
        Self::with_control(dir, control, anchors)
    }

    /// Like [`MeshCa::start_with`], the gRPC port listening on `grpc` (an address other
    /// network namespaces reach, say).
    pub async fn start_on(dir: &Path, config: &ConfigDir, grpc: SocketAddr) -> Result<Self> {
        let control = Control::start_on(dir, "tern-control", config, grpc, &[]).await?;
        let anchors = control.trust_anchor();
        Self::with_control(dir, control, anchors)
    }

    /// The CA of a control plane started by the caller (with `--discovery kubernetes`, say).
    pub fn of(dir: &Path, control: Control) -> Result<Self> {
        let anchors = control.trust_anchor();
        Self::with_control(dir, control, anchors)
    }

    fn with_control(dir: &Path, control: Control, anchors: PathBuf) -> Result<Self> {
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens)
            .with_context(|| format!("creating {}", tokens.display()))?;
        Ok(Self {
            control,
            anchors,
            tokens,
        })
    }

    pub fn grpc(&self) -> SocketAddr {
        self.control.grpc
    }

    /// A token file for `default/<sa>`, as Kubernetes would project it.
    pub fn token_file(&self, sa: &str) -> Result<PathBuf> {
        let path = self.tokens.join(format!("{sa}.token"));
        if !path.is_file() {
            let token = mint_token(&self.control.state_dir, "default", sa)?;
            std::fs::write(&path, token + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(path)
    }

    /// The flags that give a sidecar the identity of service account `sa`,
    /// with certificates from this CA (and no config subscription).
    pub fn identity_args(&self, sa: &str) -> Result<Vec<String>> {
        Ok(vec![
            "--identity-server".into(),
            format!("https://{}", self.grpc()),
            "--identity-trust-anchors".into(),
            self.anchors.display().to_string(),
            "--identity-token-file".into(),
            self.token_file(sa)?.display().to_string(),
            "--service-account".into(),
            sa.to_string(),
        ])
    }

    /// `spec` as an mTLS sidecar of service account `sa`.
    pub fn sidecar(&self, spec: ProxySpec, sa: &str) -> Result<ProxySpec> {
        let args = self.identity_args(sa)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Ok(spec.args(&args))
    }

    /// The flags of a sidecar that also subscribes to this control plane over mTLS.
    pub fn subscribed_args(&self, sa: &str) -> Result<Vec<String>> {
        let mut args = self.identity_args(sa)?;
        args.extend(["--control-plane".into(), format!("https://{}", self.grpc())]);
        Ok(args)
    }
}
