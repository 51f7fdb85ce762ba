//! The flags, checked once into plain settings: what each module takes.
//!
//! Every check that needs no I/O happens here, before anything starts, with
//! the message naming the flag; what needs the files (reading the CA, the
//! token key, the API server's CA) stays with the module that reads them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use tern_identity::SpiffeId;

use super::{Args, AuthzDefault};
use crate::ca::Source;
use crate::config::{Action, LoadOptions};
use crate::discovery::Discovery;
use crate::identity::IdentitySettings;
use crate::tokens::kube::KubeSettings;
use crate::tokens::TokenSettings;
use crate::webhook::WebhookSettings;

/// Everything tern-control runs with, checked; `app::run` hands each module
/// its part.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub config: ConfigSettings,
    pub listen: ListenSettings,
    /// How long a registered endpoint outlives its sidecar's stream.
    pub registration_grace: Duration,
    /// The inbound policy of services without an AuthorizationPolicy.
    pub authz_default: Action,
    /// Dev only: sidecars without a client certificate may subscribe.
    pub insecure_plaintext_subscribers: bool,
    /// Serve `/state` to every peer of the admin listener, not only loopback ones.
    pub admin_expose_state: bool,
    pub discovery: Discovery,
    pub identity: IdentitySettings,
    pub webhook: WebhookSettings,
}

/// The watched config directory and how it is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigSettings {
    pub dir: PathBuf,
    pub options: LoadOptions,
    /// Quiet time after a change before the directory is read.
    pub debounce: Duration,
}

/// Where the gRPC and admin listeners bind (port 0: any free port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenSettings {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

impl Args {
    /// The flags as settings, or the first one that is wrong.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        Ok(Settings {
            config: self.config(),
            listen: ListenSettings {
                grpc: self.grpc_listen,
                admin: self.admin_listen,
            },
            registration_grace: self.registration_grace,
            authz_default: match self.authz_default {
                AuthzDefault::Allow => Action::Allow,
                AuthzDefault::Deny => Action::Deny,
            },
            insecure_plaintext_subscribers: self.insecure_plaintext_subscribers,
            admin_expose_state: self.admin_expose_state,
            discovery: self.discovery,
            identity: self.identity_settings()?,
            webhook: self.webhook_settings(),
        })
    }

    /// The config directory's settings, all `--check` needs.
    pub fn config(&self) -> ConfigSettings {
        ConfigSettings {
            dir: self.config_dir.clone(),
            options: LoadOptions {
                services_elsewhere: self.discovery.services_elsewhere(),
            },
            debounce: self.debounce,
        }
    }

    fn identity_settings(&self) -> anyhow::Result<IdentitySettings> {
        let trust_domain = self.trust_domain()?;
        Ok(IdentitySettings {
            control_identity: self.control_identity(&trust_domain)?,
            trust_domain,
            cert_lifetime: self.cert_lifetime,
            ca: self.ca_source()?,
            tokens: self.token_settings(),
        })
    }

    /// The trust domain as SPIFFE ids spell it (lowercase), checked.
    fn trust_domain(&self) -> anyhow::Result<String> {
        SpiffeId::new(&self.trust_domain, "tern", "tern-control")
            .map(|id| id.trust_domain().to_owned())
            .map_err(|e| anyhow::anyhow!("--trust-domain: {e}"))
    }

    /// The control plane's own identity: `--identity`, or the default in the trust domain.
    fn control_identity(&self, domain: &str) -> anyhow::Result<SpiffeId> {
        let id = match &self.identity {
            None => SpiffeId::new(domain, "tern", "tern-control")?,
            Some(s) => SpiffeId::parse(s).map_err(|e| anyhow::anyhow!("--identity: {e}"))?,
        };
        if id.trust_domain() != domain {
            bail!("--identity {id} is not in the trust domain {domain} (--trust-domain)");
        }
        Ok(id)
    }

    /// The CA files, all three or none (then the CA in the state directory).
    fn ca_source(&self) -> anyhow::Result<Source> {
        match (&self.ca_anchor, &self.ca_issuer_cert, &self.ca_issuer_key) {
            (None, None, None) => Ok(Source::StateDir(self.state_dir.clone())),
            (Some(anchor), Some(cert), Some(key)) => Ok(Source::Files {
                anchor: anchor.clone(),
                issuer_cert: cert.clone(),
                issuer_key: key.clone(),
            }),
            _ => bail!(
                "--ca-anchor, --ca-issuer-cert and --ca-issuer-key go together: give all three, \
                 or none to use the CA in --state-dir"
            ),
        }
    }

    /// The token files default to the state directory.
    fn token_settings(&self) -> TokenSettings {
        let in_state_dir = |given: &Option<PathBuf>, name: &str| {
            given.clone().unwrap_or_else(|| self.state_dir.join(name))
        };
        TokenSettings {
            review: self.token_review,
            key_file: in_state_dir(&self.token_key_file, "token.key"),
            revoked_file: in_state_dir(&self.revoked_tokens_file, "revoked-tokens"),
            kube: KubeSettings {
                api_server: self.kube.kube_api_server.clone(),
                ca_file: self.kube.kube_ca_file.clone(),
                token_file: self.kube.kube_token_file.clone(),
            },
        }
    }

    fn webhook_settings(&self) -> WebhookSettings {
        let w = &self.webhook;
        WebhookSettings {
            listen: w.listen,
            inject: tern_inject::Options {
                proxy_image: w.inject_proxy_image.clone(),
                init_image: w.inject_init_image.clone(),
                native_sidecar: w.inject_native_sidecar,
            },
        }
    }
}
