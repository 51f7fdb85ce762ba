//! The inbound listener's settings: where it listens, the app it forwards
//! to, and, with transparent interception, which of the app's ports it
//! forwards to at all.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::ports::{PortItem, PortSet};
use super::{addr, err, ConfigError};

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InboundFile {
    pub listen: Option<String>,
    pub app: Option<String>,
    /// Connections redirected here by iptables go to the app on the port
    /// they were sent to (at the address they were sent to).
    pub transparent: Option<bool>,
    /// The ports the app serves besides `app`'s, e.g. `[8080, "9000-9010"]`:
    /// transparent inbound forwards to these and refuses every other port.
    #[serde(default)]
    pub ports: Vec<PortItem>,
}

#[derive(Clone, Debug, Serialize)]
pub struct InboundConfig {
    pub listen: SocketAddr,
    /// Where HTTP from other sidecars goes when nothing names another port.
    pub app: Option<SocketAddr>,
    /// Redirected connections (and requests naming a port) go to the app's
    /// port they name, at the IP they came in on.
    pub transparent: bool,
    /// The ports the app serves, `app`'s included, none of the sidecar's
    /// own: the only ports a redirected connection, a `tern-dst-port` or a
    /// `tern.tcp/1` header may name.
    pub ports: PortSet,
}

impl InboundFile {
    /// `None` without an app and without transparent interception: no
    /// inbound listener. `own`: the sidecar's other listeners' ports.
    pub(super) fn validate(&self, own: &[u16]) -> Result<Option<InboundConfig>, ConfigError> {
        let transparent = self.transparent.unwrap_or(false);
        if self.app.is_none() && !transparent {
            if !self.ports.is_empty() {
                return Err(err(
                    "inbound.ports",
                    "needs inbound.transparent (--inbound-transparent)",
                ));
            }
            return Ok(None);
        }
        let listen = addr(
            "inbound.listen",
            self.listen.as_deref().unwrap_or("0.0.0.0:4143"),
        )?;
        let app = self
            .app
            .as_deref()
            .map(|a| addr("inbound.app", a))
            .transpose()?;
        let mut ports = PortSet::parse(&self.ports).map_err(|e| err("inbound.ports", e))?;
        let own: Vec<u16> = own.iter().copied().chain([listen.port()]).collect();
        if let Some(p) = own.iter().find(|p| ports.contains(**p)) {
            return Err(err(
                "inbound.ports",
                format!("{p} is one of the sidecar's own ports, never forwarded to"),
            ));
        }
        if let Some(a) = app {
            ports.insert(a.port());
        }
        Ok(Some(InboundConfig {
            listen,
            app,
            transparent,
            ports,
        }))
    }
}
