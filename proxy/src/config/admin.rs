//! The admin listener's section of the bootstrap config: where it listens
//! and what its sensitive endpoints may show.

use serde::{Deserialize, Serialize};

use super::{err, ConfigError};

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub listen: Option<String>,
    /// Serve `/config` to peers off loopback too (default: loopback only).
    pub expose_config: Option<bool>,
    /// Serve `/tap` although `listen` is not loopback (default: only on loopback).
    pub tap: Option<bool>,
    /// Request headers whose values `/tap` shows.
    pub tap_headers: Option<Vec<String>>,
}

/// Headers `/tap` may show unless configured otherwise: none carries a secret.
pub const DEFAULT_TAP_HEADERS: &[&str] = &["content-type", "user-agent", "grpc-timeout", "te"];

impl AdminFile {
    /// The `/tap` header allowlist, each a valid header name, lowercase.
    pub fn tap_headers(&self) -> Result<Vec<String>, ConfigError> {
        let Some(names) = &self.tap_headers else {
            return Ok(DEFAULT_TAP_HEADERS.iter().map(|h| h.to_string()).collect());
        };
        names
            .iter()
            .map(|n| n.trim())
            .filter(|n| !n.is_empty())
            .map(|n| {
                http::HeaderName::from_bytes(n.as_bytes())
                    .map(|h| h.as_str().to_string())
                    .map_err(|_| err("admin.tap_headers", format!("{n:?} is not a header name")))
            })
            .collect()
    }
}
