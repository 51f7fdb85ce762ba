//! The `on_demand:` section: how the sidecar asks the control plane about
//! destinations it does not know (see [`crate::on_demand`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{duration, err, ConfigError};

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OnDemandFile {
    /// How long a connection or request waits for the control plane's answer.
    pub lookup_timeout: Option<String>,
    /// How long an address the control plane says is outside the mesh is
    /// passed through without asking again.
    pub outside_mesh_ttl: Option<String>,
    /// A service found by a lookup and unused this long is dropped.
    pub idle_timeout: Option<String>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct OnDemandConfig {
    #[serde(with = "super::humantime_serde_compat")]
    pub lookup_timeout: Duration,
    #[serde(with = "super::humantime_serde_compat")]
    pub outside_mesh_ttl: Duration,
    #[serde(with = "super::humantime_serde_compat")]
    pub idle_timeout: Duration,
}

impl OnDemandFile {
    pub fn validate(&self) -> Result<OnDemandConfig, ConfigError> {
        let positive = |field: &str, v: Option<&str>, default: Duration| {
            let d = duration(field, v, default)?;
            match d.is_zero() {
                true => Err(err(field, "must be longer than 0")),
                false => Ok(d),
            }
        };
        Ok(OnDemandConfig {
            lookup_timeout: positive(
                "on_demand.lookup_timeout",
                self.lookup_timeout.as_deref(),
                Duration::from_secs(1),
            )?,
            outside_mesh_ttl: positive(
                "on_demand.outside_mesh_ttl",
                self.outside_mesh_ttl.as_deref(),
                Duration::from_secs(30),
            )?,
            idle_timeout: positive(
                "on_demand.idle_timeout",
                self.idle_timeout.as_deref(),
                Duration::from_secs(600),
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_and_bad_values() {
        let c = OnDemandFile::default().validate().unwrap();
        assert_eq!(c.lookup_timeout, Duration::from_secs(1));
        assert_eq!(c.outside_mesh_ttl, Duration::from_secs(30));
        assert_eq!(c.idle_timeout, Duration::from_secs(600));
        let f = OnDemandFile {
            lookup_timeout: Some("0s".into()),
            ..Default::default()
        };
        let e = f.validate().unwrap_err().to_string();
        assert!(e.contains("on_demand.lookup_timeout"), "{e}");
        let f = OnDemandFile {
            idle_timeout: Some("soon".into()),
            ..Default::default()
        };
        let e = f.validate().unwrap_err().to_string();
        assert!(e.contains("on_demand.idle_timeout"), "{e}");
    }
}
