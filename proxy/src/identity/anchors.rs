//! Following the trust-anchor bundle file while the sidecar runs.
//!
//! In Kubernetes the file is a ConfigMap volume: an update swaps the volume's
//! `..data` symlink, which a watch on the file never sees, so the file's
//! content is hashed every [`POLL`] instead (see `tern_identity::anchors`).
//! A new bundle applies to the next handshake, inbound, outbound and towards
//! the control plane; open connections keep going. A bundle that does not
//! read or parse is refused with a warning and a count, once per content, and
//! the one in force stays.

use std::sync::Arc;
use std::time::Duration;

use tern_identity::anchors::{AnchorsFile, Polled};

use super::{gauge, Identity};

/// How often the bundle file is read; with the kubelet's own sync period
/// (about a minute) this bounds how long a ConfigMap update takes to apply.
pub const POLL: Duration = Duration::from_secs(2);

/// Polls the identity's bundle file until the process ends.
pub async fn follow(identity: Arc<Identity>) {
    let mut file = AnchorsFile::new(&identity.anchors_file, Arc::clone(&identity.anchors));
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        // A read of a few kilobytes from a local volume: too small to need a blocking thread.
        report(&identity, file.poll(|_| Ok(())));
    }
}

fn report(identity: &Identity, polled: Polled) {
    let metrics = &identity.metrics;
    let path = identity.anchors_file.display();
    match polled {
        Polled::Unchanged => {}
        Polled::Reloaded { roots, fingerprint } => {
            metrics.anchor_reloads.with_label_values(&["ok"]).inc();
            metrics.anchors_in_force.set(gauge(roots));
            tracing::info!(file = %path, roots, fingerprint, "trust-anchor bundle reloaded; new handshakes use it");
        }
        Polled::Rejected(error) => {
            metrics
                .anchor_reloads
                .with_label_values(&["rejected"])
                .inc();
            tracing::warn!(file = %path, %error, "trust-anchor bundle refused; the last good one stays in force");
        }
    }
}
