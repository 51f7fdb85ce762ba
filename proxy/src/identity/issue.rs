//! Getting and renewing the workload certificate from tern-control's CA.
//!
//! One key pair per process, made in memory at start and never written or
//! sent; each request is a new CSR signed with it, plus the bootstrap token
//! (re-read from its file every time, since a projected Kubernetes token is
//! rotated in place). Renewal starts at about 70% of the certificate's
//! lifetime; a failed attempt is retried with jittered backoff, never past
//! the point where the certificate would lapse without trying again.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tern_backoff::{ExpBackoff, Jitter};
use tern_identity::csr::WorkloadKey;
use tern_identity::Credentials;
use tern_proto::identity::v1 as pb;
use tokio::sync::watch;

use super::Identity;

/// Failed certificate requests are retried after 200ms, 400ms ... 5s, each ±50%.
const RETRY: ExpBackoff =
    ExpBackoff::new(Duration::from_millis(200), Duration::from_secs(5)).jitter(Jitter::Spread(0.5));

pub struct Issuer {
    pub identity: Arc<Identity>,
    /// The CA: tern-control's replicas (any one issues).
    pub control_plane: crate::control::failover::Replicas,
    pub token_file: std::path::PathBuf,
    /// Becomes true once the first certificate is held.
    pub issued: watch::Sender<bool>,
}

impl Issuer {
    pub async fn run(self) {
        let key = match WorkloadKey::generate() {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, "cannot generate the workload key; no certificate will be issued");
                return;
            }
        };
        let mut attempt = 0;
        loop {
            match self.certify(&key).await {
                Ok(creds) => {
                    // Measured from now, not from not_before, which the CA
                    // backdates to allow for clock skew.
                    let now = SystemTime::now();
                    let lifetime = creds.not_after.duration_since(now).unwrap_or_default();
                    let not_after = secs(creds.not_after);
                    tracing::info!(
                        identity = %creds.identity,
                        not_after,
                        lifetime = ?lifetime,
                        "workload certificate issued"
                    );
                    self.identity.metrics.cert_expiry.set(not_after as f64);
                    self.identity.metrics.cert_issued.set(secs(now) as f64);
                    self.identity
                        .metrics
                        .renewals
                        .with_label_values(&["ok"])
                        .inc();
                    let renew_at = renewal_time(now, creds.not_after);
                    self.identity.store.set(creds);
                    self.issued.send_replace(true);
                    attempt = 0;
                    let wait = renew_at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    tokio::time::sleep(wait).await;
                }
                Err(reason) => {
                    self.identity
                        .metrics
                        .renewals
                        .with_label_values(&["error"])
                        .inc();
                    let wait = RETRY.delay(attempt);
                    tracing::warn!(reason, retry_in = ?wait, "certificate request failed");
                    tokio::time::sleep(wait).await;
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    async fn certify(&self, key: &WorkloadKey) -> Result<Credentials, String> {
        let token = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| format!("reading the token {}: {e}", self.token_file.display()))?;
        let csr_pem = key
            .csr_pem(&self.identity.id)
            .map_err(|e| format!("building the CSR: {e}"))?;
        let (channel, _) = self.control_plane.connect(Some(&self.identity)).await?;
        let mut client = pb::identity_client::IdentityClient::new(channel);
        let request = pb::CertifyRequest {
            identity: self.identity.id.to_string(),
            token: token.trim().to_string(),
            csr_pem,
        };
        let rsp = tokio::time::timeout(Duration::from_secs(10), client.certify(request))
            .await
            .map_err(|_| "the control plane did not answer within 10s".to_string())?
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        let chain = tern_identity::pem::certs(rsp.chain_pem.as_bytes())
            .map_err(|e| format!("issued chain: {e}"))?;
        let creds = Credentials::new(chain, &key.private_key_der())
            .map_err(|e| format!("issued certificate: {e}"))?;
        let want = self.identity.id.to_string();
        if creds.identity != want {
            return Err(format!(
                "issued certificate names {}, asked for {want}",
                creds.identity
            ));
        }
        Ok(creds)
    }
}

/// About 70% into the remaining lifetime, jittered by ±5% of it so a fleet
/// started together does not renew together.
fn renewal_time(issued: SystemTime, not_after: SystemTime) -> SystemTime {
    let lifetime = not_after.duration_since(issued).unwrap_or_default();
    let fraction = 0.65 + 0.10 * fastrand::f64();
    issued + lifetime.mul_f64(fraction)
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_between_65_and_75_percent() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000);
        let end = start + Duration::from_secs(100);
        for _ in 0..100 {
            let at = renewal_time(start, end);
            let into = at.duration_since(start).unwrap_or_default();
            assert!(into >= Duration::from_secs(65) && into <= Duration::from_secs(75));
        }
    }
}
