//! The push API's server side (`tern.control.v1.ControlPlane/Subscribe`):
//! what every stream shares, and a [`Session`] per stream. What a sidecar may
//! say and how each message is checked is in [`crate::messages`]; the wire
//! format is in [`crate::wire`].
//!
//! Who a sidecar is comes from its connection, not from what it says: over
//! TLS with a client certificate, the certificate's verified SPIFFE id is the
//! workload's identity and `Hello.identity` may only repeat it; without one
//! the stream is refused, unless `--insecure-plaintext-subscribers` lets
//! a workload without identity in (then `Hello.identity` must be empty). A
//! registered address must be at the stream's peer IP. (Which identity a
//! Service admits, and addresses held by others, are checked in
//! [`Mesh::subscribe`]; the rules are in [`crate::admission`].)

use std::sync::Arc;

use tern_proto::control::v1 as pb;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Streaming};

use crate::admission::LogLimiter;
use crate::metrics::Metrics;
use crate::session::{Session, SnapshotStream};
use crate::state::Mesh;
use crate::tls::ConnInfo;

pub struct ControlPlane {
    pub mesh: Arc<Mesh>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    /// `--insecure-plaintext-subscribers`: sidecars without a client
    /// certificate may subscribe (dev only).
    pub insecure_plaintext: bool,
    /// Bounds the log lines refused subscriptions write.
    pub refusal_log: Arc<LogLimiter>,
}

impl ControlPlane {
    /// The response stream for one Subscribe call: a [`Session`], whose
    /// snapshots are already encoded (see [`crate::wire`]).
    pub fn subscribe(
        &self,
        request: Request<Streaming<pb::SidecarMessage>>,
    ) -> Response<SnapshotStream> {
        let conn = ConnInfo::of(&request);
        let session = Session::new(
            Arc::clone(&self.mesh),
            Arc::clone(&self.metrics),
            self.shutdown.clone(),
            conn,
            request.into_inner(),
        )
        .with_admission(self.insecure_plaintext, Arc::clone(&self.refusal_log));
        Response::new(session.into_stream())
    }
}
