//! One subscribed sidecar as the state and its session task share it: who
//! it is, how to wake its session, and what it was sent and acknowledged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tern_proto::control::v1 as pb;
use tokio::sync::watch;

use super::lock;
use crate::config::ServiceKey;

/// Who a subscribed sidecar is, from its Hello (already validated).
#[derive(Clone, Debug)]
pub struct Workload {
    pub key: ServiceKey,
    /// The SPIFFE id of the sidecar's client certificate, verified in the
    /// TLS handshake; `None` on a plaintext connection.
    pub identity: Option<String>,
    /// Its inbound listener; `None` for a workload nobody calls.
    pub address: Option<SocketAddr>,
    pub labels: BTreeMap<String, String>,
    /// The stream's remote address, for operators.
    pub peer: Option<SocketAddr>,
    /// It watches every service (Hello.all_services), not only its calls.
    pub all_services: bool,
    /// Its admin listener (Hello.admin), shown for operators' tools.
    pub admin: Option<SocketAddr>,
}

/// What was delivered to one sidecar, shown on `/state`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Delivery {
    pub sent_version: u64,
    pub acked_version: u64,
    pub nacks: u64,
    pub last_nack: Option<NackRecord>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NackRecord {
    pub version: u64,
    pub reason: String,
}

/// One open Subscribe stream, shared by the session task and the state.
pub struct Subscriber {
    pub id: u64,
    pub workload: Workload,
    wake: watch::Sender<()>,
    /// The earliest change not yet pushed: where push latency is measured from.
    pending: Mutex<Option<Instant>>,
    delivery: Mutex<Delivery>,
    /// Lookup answers for the next snapshot.
    answers: Mutex<Vec<pb::LookupResult>>,
}

impl Subscriber {
    /// A subscriber and the receiver its session waits on.
    pub(super) fn new(id: u64, workload: Workload) -> (Arc<Subscriber>, watch::Receiver<()>) {
        let (wake, woken) = watch::channel(());
        let sub = Subscriber {
            id,
            workload,
            wake,
            pending: Mutex::new(None),
            delivery: Mutex::new(Delivery::default()),
            answers: Mutex::new(Vec::new()),
        };
        (Arc::new(sub), woken)
    }

    /// Marks the snapshot possibly changed since `since` and wakes the session.
    pub(super) fn wake(&self, since: Instant) {
        lock(&self.pending).get_or_insert(since);
        self.wake.send_replace(());
    }

    /// Queues a lookup's answer for the next snapshot and wakes the session.
    pub(super) fn answer(&self, result: pb::LookupResult, since: Instant) {
        lock(&self.answers).push(result);
        self.wake(since);
    }

    /// The lookup answers queued since the last snapshot.
    pub fn take_answers(&self) -> Vec<pb::LookupResult> {
        std::mem::take(&mut *lock(&self.answers))
    }

    pub fn take_pending(&self) -> Option<Instant> {
        lock(&self.pending).take()
    }

    pub fn sent(&self, version: u64) {
        lock(&self.delivery).sent_version = version;
    }

    /// Records an ACK; false when the version was never sent on this stream.
    pub fn ack(&self, version: u64) -> bool {
        let mut d = lock(&self.delivery);
        if version == 0 || version > d.sent_version {
            return false;
        }
        d.acked_version = d.acked_version.max(version);
        true
    }

    pub fn nack(&self, version: u64, reason: String) {
        let mut d = lock(&self.delivery);
        d.nacks += 1;
        d.last_nack = Some(NackRecord { version, reason });
    }

    pub fn delivery(&self) -> Delivery {
        lock(&self.delivery).clone()
    }
}
