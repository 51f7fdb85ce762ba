//! Workload identity settings: where the trust anchors and the bootstrap
//! token are, which SPIFFE id to ask for, and how the inbound port treats
//! plaintext.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tern_identity::SpiffeId;

use super::control_plane::ControlPlanes;
use super::{err, ConfigError};

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// PEM file of the mesh trust anchors; setting it turns mTLS on.
    pub trust_anchors: Option<String>,
    /// File holding the bootstrap token (re-read at every renewal, so a
    /// rotated projected ServiceAccount token is picked up).
    pub token_file: Option<String>,
    /// Default `cluster.local`.
    pub trust_domain: Option<String>,
    /// Default: the service name.
    pub service_account: Option<String>,
    /// The control plane's SPIFFE id [default: spiffe://TRUST_DOMAIN/ns/tern/sa/tern-control].
    pub control_plane_identity: Option<String>,
    /// `https://host:port` of the CA's Identity service [default: the control plane's URL].
    pub server: Option<String>,
    /// strict (mTLS only), permissive (mTLS or plaintext) or off.
    pub inbound_tls: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct IdentityConfig {
    /// Where certificates are requested: tern-control's gRPC port.
    pub server: ControlPlanes,
    pub trust_anchors: PathBuf,
    pub token_file: PathBuf,
    #[serde(serialize_with = "display")]
    pub id: SpiffeId,
    pub control_plane_identity: Arc<str>,
}

/// What the inbound listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InboundTls {
    /// Mesh mTLS only; plaintext connections are refused.
    Strict,
    /// mTLS or plaintext, told apart by each connection's first byte.
    Permissive,
    /// Plaintext only (no identity configured).
    Off,
}

fn display<S: serde::Serializer>(id: &SpiffeId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&id.to_string())
}

impl IdentityFile {
    /// `None` when no trust anchors are configured: the sidecar runs without mTLS.
    pub fn validate(
        &self,
        service_name: &str,
        namespace: &str,
        control_plane: Option<&ControlPlanes>,
    ) -> Result<(Option<IdentityConfig>, InboundTls), ConfigError> {
        let mode = match self.inbound_tls.as_deref().map(str::trim) {
            None | Some("") => None,
            Some("strict") => Some(InboundTls::Strict),
            Some("permissive") => Some(InboundTls::Permissive),
            Some("off") => Some(InboundTls::Off),
            Some(other) => {
                return Err(err(
                    "identity.inbound_tls",
                    format!("{other:?} is not strict, permissive or off"),
                ))
            }
        };
        let Some(anchors) = self.trust_anchors.as_deref().filter(|s| !s.is_empty()) else {
            if matches!(mode, Some(InboundTls::Strict | InboundTls::Permissive)) {
                return Err(err(
                    "identity.inbound_tls",
                    "mTLS needs an identity: set identity.trust_anchors and identity.token_file",
                ));
            }
            return Ok((None, InboundTls::Off));
        };
        let token_file = self
            .token_file
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                err(
                    "identity.token_file",
                    "required with identity.trust_anchors: the token proves who this workload is",
                )
            })?;
        let server = match self.server.as_deref().filter(|s| !s.is_empty()) {
            Some(s) => ControlPlanes::parse(s).map_err(|e| err("identity.server", e))?,
            None => control_plane.cloned().ok_or_else(|| {
                err(
                    "identity.server",
                    "identity needs a CA: set control_plane or identity.server",
                )
            })?,
        };
        if !server.tls() {
            return Err(err(
                "identity.server",
                format!(
                    "{server} is not https://host:port; certificates are only requested over TLS"
                ),
            ));
        }
        if let Some(cp) = control_plane.filter(|u| !u.tls()) {
            return Err(err(
                "control_plane",
                format!("{cp}: with an identity the control-plane stream must be https://"),
            ));
        }
        let trust_domain = self.trust_domain.as_deref().unwrap_or("cluster.local");
        let sa = self.service_account.as_deref().unwrap_or(service_name);
        let id = SpiffeId::new(trust_domain, namespace, sa)
            .map_err(|e| err("identity.service_account", e.to_string()))?;
        let control_plane_identity = match self.control_plane_identity.as_deref() {
            Some(s) => SpiffeId::parse(s)
                .map_err(|e| err("identity.control_plane_identity", e.to_string()))?,
            None => SpiffeId::new(trust_domain, "tern", "tern-control")
                .map_err(|e| err("identity.trust_domain", e.to_string()))?,
        };
        Ok((
            Some(IdentityConfig {
                server,
                trust_anchors: PathBuf::from(anchors),
                token_file: PathBuf::from(token_file),
                id,
                control_plane_identity: Arc::from(control_plane_identity.to_string()),
            }),
            mode.unwrap_or(InboundTls::Strict),
        ))
    }
}
