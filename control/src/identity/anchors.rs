//! Following the trust-anchor bundle file (`--ca-anchor`, or the state
//! directory's) while the control plane runs, for a root rotation without a
//! restart: the gRPC listener checks client certificates against the bundle
//! in force at each handshake.
//!
//! The file is polled by content hash, as the sidecars do, because a Secret or
//! ConfigMap volume changes by swapping a `..data` symlink. A new bundle must
//! read, parse, hold only CA certificates valid now, and still hold the root
//! the issuer chains to; otherwise it is refused with a warning and a count,
//! and the bundle in force stays. The issuer itself is read at start: a new
//! issuer takes a restart (see docs/SECURITY.md).

use std::sync::Arc;
use std::time::Duration;

use tern_identity::anchors::{AnchorsFile, Polled};
use tokio_util::sync::CancellationToken;

use super::Authority;
use crate::metrics::Metrics;

/// How often the bundle file is read.
pub const POLL: Duration = Duration::from_secs(2);

/// Polls the anchor file until `stop`.
pub async fn follow(authority: Arc<Authority>, metrics: Arc<Metrics>, stop: CancellationToken) {
    let ca = Arc::clone(&authority.ca);
    let mut file = AnchorsFile::new(ca.anchor_path(), Arc::clone(&authority.anchors));
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let polled = file.poll(|bundle| {
            ca.check_anchors(bundle.certs())
                .map_err(|e| format!("{e:#}"))
        });
        report(&file, polled, &metrics);
    }
}

fn report(file: &AnchorsFile, polled: Polled, metrics: &Metrics) {
    let path = file.path().display();
    match polled {
        Polled::Unchanged => {}
        Polled::Reloaded { roots, fingerprint } => {
            metrics
                .trust_anchor_reloads
                .with_label_values(&["ok"])
                .inc();
            metrics
                .trust_anchors
                .set(i64::try_from(roots).unwrap_or(i64::MAX));
            tracing::info!(file = %path, roots, fingerprint, "trust-anchor bundle reloaded; new handshakes use it");
        }
        Polled::Rejected(error) => {
            metrics
                .trust_anchor_reloads
                .with_label_values(&["rejected"])
                .inc();
            tracing::warn!(file = %path, %error, "trust-anchor bundle refused; the last good one stays in force");
        }
    }
}
