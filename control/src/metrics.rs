//! Prometheus metrics of the control plane, all prefixed `tern_control_`.
//!
//! A registry of our own rather than the global one, so tests can build as
//! many control planes in one process as they like.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub subscribers: IntGauge,
    pub pushes: IntCounter,
    /// Bytes of the snapshots sent (protobuf, before gRPC framing).
    pub push_bytes: IntCounter,
    pub push_latency: Histogram,
    pub acks: IntCounter,
    pub nacks: IntCounter,
    pub config_reloads: IntCounter,
    pub config_errors: IntCounter,
    pub config_version: IntGauge,
    pub registered_endpoints: IntGauge,
    pub certificates_issued: IntCounter,
    /// By `reason`: plaintext, unauthenticated, invalid_identity, permission_denied,
    /// invalid_csr, unavailable, internal.
    pub certificate_refusals: IntCounterVec,
    /// By `reason`, from `tern_identity::tls::failure_reason` (plus `timeout`).
    pub tls_handshake_failures: IntCounterVec,
    /// Subscribe streams refused, by `reason` (see `admission::Refusal::reason`).
    pub subscribe_refusals: IntCounterVec,
    /// Admin requests refused, by `path` (`/state` from a non-loopback peer).
    pub admin_refusals: IntCounterVec,
    /// Unix seconds, by `certificate`: trust_anchor, issuer, control_plane, webhook.
    pub certificate_expiry: IntGaugeVec,
    /// Admission reviews answered by the webhook, by `result`: injected, unchanged, denied,
    /// bad_request.
    pub webhook_reviews: IntCounterVec,
    /// The Kubernetes discovery source's (`--discovery kubernetes`).
    pub discovery: std::sync::Arc<crate::discovery::metrics::DiscoveryMetrics>,
    /// Changes of the trust-anchor bundle file, by `result`: ok, rejected.
    pub trust_anchor_reloads: IntCounterVec,
    /// Roots in the trust-anchor bundle in force.
    pub trust_anchors: IntGauge,
    /// Sidecars' on-demand lookups answered, by `result`: found, outside_mesh, unknown.
    pub lookups: IntCounterVec,
    resident_memory: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::with_opts(Opts::new(format!("tern_control_{name}"), help))?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::with_opts(Opts::new(format!("tern_control_{name}"), help))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let push_latency = Histogram::with_opts(
            HistogramOpts::new(
                "tern_control_push_latency_seconds",
                "Time from a config or registry change to a snapshot carrying it being sent to a sidecar.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )?;
        registry.register(Box::new(push_latency.clone()))?;
        let counters =
            |name: &str, help: &str, label: &str| -> Result<IntCounterVec, prometheus::Error> {
                let c =
                    IntCounterVec::new(Opts::new(format!("tern_control_{name}"), help), &[label])?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "tern_control_certificate_expiry_timestamp_seconds",
                "When the CA's certificates and the control plane's own expire (unix seconds).",
            ),
            &["certificate"],
        )?;
        registry.register(Box::new(certificate_expiry.clone()))?;
        let trust_anchor_reloads = counters(
            "trust_anchor_reloads_total",
            "Changes of the trust-anchor bundle file, by result: ok (in force) or rejected (unreadable, unparsable, or without the root of the issuer; the last good bundle stays).",
            "result",
        )?;
        // Both results exist from the start, so a refusal shows as 0 → 1, not as a new series.
        for result in ["ok", "rejected"] {
            trust_anchor_reloads.with_label_values(&[result]);
        }
        let lookups = counters(
            "lookups_total",
            "On-demand lookups (an address or a name a sidecar does not know) answered, by result: found, outside_mesh, unknown.",
            "result",
        )?;
        for result in ["found", "outside_mesh", "unknown"] {
            lookups.with_label_values(&[result]);
        }
        Ok(Metrics {
            lookups,
            certificates_issued: counter(
                "certificates_issued_total",
                "Workload certificates signed by the CA (Identity.Certify).",
            )?,
            certificate_refusals: counters(
                "certificate_refusals_total",
                "Certify calls refused, by reason.",
                "reason",
            )?,
            tls_handshake_failures: counters(
                "tls_handshake_failures_total",
                "TLS handshakes on the gRPC listener that failed, by reason.",
                "reason",
            )?,
            subscribe_refusals: counters(
                "subscribe_refusals_total",
                "Subscribe streams refused (no client certificate, identity not admitted, address not the peer's or held by another identity), by reason.",
                "reason",
            )?,
            admin_refusals: counters(
                "admin_refusals_total",
                "Admin requests refused (/state from a non-loopback peer without --admin-expose-state), by path.",
                "path",
            )?,
            certificate_expiry,
            webhook_reviews: counters(
                "webhook_reviews_total",
                "Admission reviews answered by the injection webhook, by result.",
                "result",
            )?,
            trust_anchor_reloads,
            trust_anchors: gauge(
                "trust_anchors",
                "Roots in the trust-anchor bundle in force.",
            )?,
            subscribers: gauge("subscribers", "Sidecars with an open Subscribe stream.")?,
            pushes: counter("pushes_total", "Snapshots sent to sidecars.")?,
            push_bytes: counter(
                "push_bytes_total",
                "Bytes of the snapshots sent to sidecars (protobuf encoding, before gRPC framing).",
            )?,
            push_latency,
            acks: counter("acks_total", "Snapshots acknowledged by sidecars.")?,
            nacks: counter("nacks_total", "Snapshots rejected by sidecars.")?,
            config_reloads: counter(
                "config_reloads_total",
                "Config directory changes that were valid and applied.",
            )?,
            config_errors: counter(
                "config_errors_total",
                "Config directory changes rejected as invalid; the last good config stayed in force.",
            )?,
            config_version: gauge(
                "config_version",
                "Generation of the mesh config in force (grows with every applied change).",
            )?,
            registered_endpoints: gauge(
                "registered_endpoints",
                "Endpoints registered by sidecars, including those within their grace period.",
            )?,
            discovery: std::sync::Arc::new(
                crate::discovery::metrics::DiscoveryMetrics::register(&registry)?,
            ),
            resident_memory: gauge(
                "resident_memory_bytes",
                "Resident set size of the control plane process.",
            )?,
            registry,
        })
    }

    /// The text exposition format, with the memory gauge read fresh.
    pub fn encode(&self) -> Result<String, prometheus::Error> {
        if let Some(rss) = resident_memory_bytes() {
            self.resident_memory.set(rss);
        }
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

/// VmRSS of this process from /proc (Linux); `None` elsewhere.
pub fn resident_memory_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_metric_is_exposed_with_the_prefix() {
        let m = Metrics::new().unwrap();
        m.pushes.inc();
        m.push_latency.observe(0.003);
        m.certificates_issued.inc();
        m.certificate_refusals
            .with_label_values(&["unauthenticated"])
            .inc();
        m.tls_handshake_failures
            .with_label_values(&["unknown_ca"])
            .inc();
        m.webhook_reviews.with_label_values(&["injected"]).inc();
        m.subscribe_refusals
            .with_label_values(&["no_client_certificate"])
            .inc();
        m.admin_refusals.with_label_values(&["/state"]).inc();
        let text = m.encode().unwrap();
        for name in [
            "tern_control_subscribers",
            "tern_control_pushes_total 1",
            "tern_control_push_latency_seconds_bucket",
            "tern_control_nacks_total",
            "tern_control_config_errors_total",
            "tern_control_config_version",
            "tern_control_certificates_issued_total 1",
            "tern_control_certificate_refusals_total{reason=\"unauthenticated\"} 1",
            "tern_control_tls_handshake_failures_total{reason=\"unknown_ca\"} 1",
            "tern_control_webhook_reviews_total{result=\"injected\"} 1",
            "tern_control_trust_anchor_reloads_total{result=\"rejected\"} 0",
            "tern_control_trust_anchors 0",
            "tern_control_subscribe_refusals_total{reason=\"no_client_certificate\"} 1",
            "tern_control_admin_refusals_total{path=\"/state\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("tern_control_"), "{line}");
        }
    }
}
