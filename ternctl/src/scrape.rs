//! Scraping one sidecar's admin `/metrics`, and the facts the operator
//! commands read from it beyond the golden metrics: its certificate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::admin_client;
use crate::prom_text::{self, Sample};

/// Tern's samples from a sidecar's `/metrics`.
pub async fn metrics(admin: &str) -> anyhow::Result<Vec<Sample>> {
    let reply = admin_client::get(admin, "/metrics").await?;
    anyhow::ensure!(reply.ok(), "/metrics answered {}", reply.status);
    Ok(prom_text::parse(&reply.body, "tern_"))
}

/// The value of an unlabelled gauge.
pub fn gauge(samples: &[Sample], name: &str) -> Option<f64> {
    samples.iter().find(|s| s.name == name).map(|s| s.value)
}

/// The workload certificate a sidecar has in use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cert {
    pub expires: SystemTime,
    /// When it arrived: the expiry minus this is its lifetime.
    pub issued: Option<SystemTime>,
}

impl Cert {
    /// `None` when the sidecar has no certificate (yet).
    pub fn of(samples: &[Sample]) -> Option<Cert> {
        let at = |secs: f64| (secs > 0.0).then(|| UNIX_EPOCH + Duration::from_secs_f64(secs));
        Some(Cert {
            expires: at(gauge(
                samples,
                "tern_identity_cert_expiry_timestamp_seconds",
            )?)?,
            issued: gauge(samples, "tern_identity_cert_issued_timestamp_seconds").and_then(at),
        })
    }

    /// Validity left at `now` (zero once expired).
    pub fn left(&self, now: SystemTime) -> Duration {
        self.expires.duration_since(now).unwrap_or_default()
    }

    /// Whether it is near expiry at `now`: less than `min` left, or less than a fifth of its
    /// lifetime, well past the point (70%) where the sidecar renews.
    pub fn near_expiry(&self, now: SystemTime, min: Duration) -> bool {
        let left = self.left(now);
        let lifetime = self
            .issued
            .and_then(|i| self.expires.duration_since(i).ok())
            .unwrap_or_default();
        left < min || left < lifetime / 5
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn certificates_near_expiry() {
        let text = "tern_identity_cert_expiry_timestamp_seconds 1000\n\
                    tern_identity_cert_issued_timestamp_seconds 0\n";
        let cert = Cert::of(&prom_text::parse(text, "tern_")).unwrap();
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(cert.issued, None);
        assert!(!cert.near_expiry(at(100), Duration::from_secs(600)));
        assert!(cert.near_expiry(at(500), Duration::from_secs(600)));
        assert_eq!(cert.left(at(2000)), Duration::ZERO);
        let issued = Cert {
            issued: Some(at(0)),
            ..cert
        };
        // 150s of a 1000s lifetime left: under a fifth.
        assert!(issued.near_expiry(at(850), Duration::from_secs(60)));
        let none = prom_text::parse("tern_identity_cert_expiry_timestamp_seconds 0\n", "tern_");
        assert_eq!(Cert::of(&none), None);
    }
}
