//! What tern-control's admin `/state` says about the mesh, as the operator
//! commands (`check`, `stat`, `dashboard`) read it: the sidecars with what
//! they were sent and acknowledged, endpoints left by sidecars that went
//! away, and the CA's certificates.

use std::time::SystemTime;

use anyhow::Context as _;
use serde_json::Value;

use crate::admin_client;

/// One subscribed sidecar.
#[derive(Clone, Debug)]
pub struct Sidecar {
    pub service: String,
    pub namespace: String,
    pub identity: Option<String>,
    /// Its inbound address; `None` for a caller only.
    pub address: Option<String>,
    /// Its admin listener, when it told.
    pub admin: Option<String>,
    pub labels: Vec<(String, String)>,
    pub sent_version: u64,
    pub acked_version: u64,
    pub nacks: u64,
    pub last_nack: Option<(u64, String)>,
}

impl Sidecar {
    /// `pay 127.0.0.1:4143` (or the admin address for a caller only).
    pub fn name(&self) -> String {
        let at = self
            .address
            .as_deref()
            .or(self.admin.as_deref())
            .unwrap_or("-");
        format!("{}.{} {at}", self.service, self.namespace)
    }
}

/// A registered endpoint whose sidecar's stream ended: it is kept for the
/// registration grace, then forgotten.
#[derive(Clone, Debug)]
pub struct Orphan {
    pub service: String,
    pub namespace: String,
    pub address: String,
}

/// A certificate of the CA.
#[derive(Clone, Debug)]
pub struct CaCert {
    pub subject: String,
    pub not_after: Option<SystemTime>,
    pub not_before: Option<SystemTime>,
}

#[derive(Clone, Debug, Default)]
pub struct MeshState {
    pub config_version: u64,
    pub last_config_error: Option<Vec<String>>,
    pub sidecars: Vec<Sidecar>,
    pub orphans: Vec<Orphan>,
    /// `None` when tern-control runs without its CA.
    pub anchor: Option<CaCert>,
    pub issuer: Option<CaCert>,
}

/// Reads `/state` from tern-control's admin listener.
pub async fn fetch(control: &str) -> anyhow::Result<MeshState> {
    let reply = admin_client::get(control, "/state").await?;
    anyhow::ensure!(
        reply.ok(),
        "tern-control's /state answered {}: {}",
        reply.status,
        reply.body.trim()
    );
    let v: Value = serde_json::from_str(&reply.body).context("tern-control's /state")?;
    Ok(parse(&v))
}

pub fn parse(v: &Value) -> MeshState {
    let text = |v: &Value| v.as_str().map(str::to_string);
    let sidecars = list(&v["subscribers"])
        .map(|s| Sidecar {
            service: text(&s["service"]).unwrap_or_default(),
            namespace: text(&s["namespace"]).unwrap_or_default(),
            identity: text(&s["identity"]),
            address: text(&s["address"]),
            admin: text(&s["admin"]),
            labels: s["labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), text(v).unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default(),
            sent_version: s["sent_version"].as_u64().unwrap_or(0),
            acked_version: s["acked_version"].as_u64().unwrap_or(0),
            nacks: s["nacks"].as_u64().unwrap_or(0),
            last_nack: s["last_nack"].as_object().map(|n| {
                (
                    n.get("version").and_then(Value::as_u64).unwrap_or(0),
                    n.get("reason").and_then(text).unwrap_or_default(),
                )
            }),
        })
        .collect();
    let orphans = list(&v["services"])
        .flat_map(|svc| {
            list(&svc["endpoints"])
                .filter(|e| e["draining"] == true)
                .map(|e| Orphan {
                    service: text(&svc["name"]).unwrap_or_default(),
                    namespace: text(&svc["namespace"]).unwrap_or_default(),
                    address: text(&e["address"]).unwrap_or_default(),
                })
        })
        .collect();
    let cert = |c: &Value| {
        c.is_object().then(|| CaCert {
            subject: text(&c["subject"]).unwrap_or_default(),
            not_after: c["not_after"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok()),
            not_before: c["not_before"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok()),
        })
    };
    MeshState {
        config_version: v["config_version"].as_u64().unwrap_or(0),
        last_config_error: v["last_config_error"]
            .as_array()
            .map(|errors| errors.iter().map(|e| text(e).unwrap_or_default()).collect()),
        sidecars,
        orphans,
        anchor: cert(&v["identity"]["trust_anchor"]),
        issuer: cert(&v["identity"]["issuer"]),
    }
}

fn list(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_subscribers_orphans_and_the_ca() {
        let v = serde_json::json!({
            "config_version": 4,
            "last_config_error": null,
            "services": [{"name": "pay", "namespace": "default", "endpoints": [
                {"address": "127.0.0.1:1", "source": "registered", "draining": true},
                {"address": "127.0.0.1:2", "source": "registered", "draining": false},
            ]}],
            "subscribers": [{"service": "order", "namespace": "default", "admin": "127.0.0.1:9",
                "sent_version": 4, "acked_version": 3, "nacks": 1,
                "last_nack": {"version": 4, "reason": "bad"}, "labels": {}}],
            "identity": {"trust_anchor": {"subject": "CN=a", "not_before": "2026-01-01T00:00:00Z",
                "not_after": "2036-01-01T00:00:00Z"}},
        });
        let s = parse(&v);
        assert_eq!(s.config_version, 4);
        assert_eq!(s.orphans.len(), 1);
        assert_eq!(s.orphans[0].address, "127.0.0.1:1");
        let sc = &s.sidecars[0];
        assert_eq!(sc.admin.as_deref(), Some("127.0.0.1:9"));
        assert_eq!(sc.last_nack, Some((4, "bad".into())));
        assert_eq!(sc.name(), "order.default 127.0.0.1:9");
        assert!(s.anchor.unwrap().not_after.is_some());
        assert!(s.issuer.is_none());
    }
}
