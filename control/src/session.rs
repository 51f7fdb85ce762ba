//! One sidecar's Subscribe stream.
//!
//! The session *is* the response stream: hyper polls it for the next
//! snapshot whenever the HTTP/2 stream has room, and the same poll reads the
//! sidecar's messages (ACK, NACK, Watch), the mesh's wake-ups and shutdown.
//! So no task or channel sits between a wake-up and the socket; a snapshot
//! is built only when it can be sent, and a slow sidecar gets the newest
//! state rather than a backlog of stale ones; a wake-up whose result equals
//! what was last sent sends nothing. When hyper drops the stream (the
//! sidecar went away), the subscription goes with it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tern_proto::control::v1 as pb;
use tern_proto::control::v1::sidecar_message::Kind;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Status, Streaming};

use crate::admission::{self, LogLimiter, Refusal};
use crate::messages::{handle, parse_hello};
use crate::metrics::Metrics;
use crate::snapshot::Built;
use crate::state::{Mesh, Subscription};
use crate::tls::ConnInfo;

/// A connection that never says who it is should not hold a slot for long.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub type SnapshotStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

pub struct Session {
    mesh: Arc<Mesh>,
    metrics: Arc<Metrics>,
    peer: Option<SocketAddr>,
    /// The verified SPIFFE id of the connection's client certificate.
    verified: Option<Arc<str>>,
    /// Whether a connection without one may subscribe (dev only).
    plaintext_allowed: bool,
    refusal_log: Arc<LogLimiter>,
    inbound: Streaming<pb::SidecarMessage>,
    // Made once: every session waits on the same token, and re-registering
    // on each poll would make them all contend for its lock.
    stopping: Pin<Box<WaitForCancellationFutureOwned>>,
    state: State,
    /// What the last snapshot sent was built from.
    last: Option<Built>,
    /// Woken since the last snapshot was built.
    dirty: bool,
    /// The sidecar applies incremental snapshots (Hello.incremental).
    incremental: bool,
}

enum State {
    AwaitingHello,
    Subscribed(Subscription),
    Closed,
}

enum Event {
    Stop,
    Message(Result<Option<pb::SidecarMessage>, Status>),
    Woken,
}

impl Session {
    pub fn new(
        mesh: Arc<Mesh>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        conn: ConnInfo,
        inbound: Streaming<pb::SidecarMessage>,
    ) -> Self {
        Session {
            mesh,
            metrics,
            peer: conn.remote,
            verified: conn.peer_identity,
            plaintext_allowed: false,
            refusal_log: Arc::new(LogLimiter::new()),
            inbound,
            stopping: Box::pin(shutdown.cancelled_owned()),
            state: State::AwaitingHello,
            last: None,
            dirty: false,
            incremental: false,
        }
    }

    /// Lets sidecars without a client certificate in when `plaintext_allowed`;
    /// refusals are logged through `refusal_log`.
    pub fn with_admission(mut self, plaintext_allowed: bool, refusal_log: Arc<LogLimiter>) -> Self {
        self.plaintext_allowed = plaintext_allowed;
        self.refusal_log = refusal_log;
        self
    }

    pub fn into_stream(self) -> SnapshotStream {
        Box::pin(futures::stream::unfold(self, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        }))
    }

    /// The next snapshot to send, or the status that ends the stream.
    async fn next(&mut self) -> Option<Result<Bytes, Status>> {
        if matches!(self.state, State::AwaitingHello) {
            if let Err(status) = self.hello().await {
                self.state = State::Closed;
                return status.map(Err);
            }
        }
        loop {
            if self.dirty {
                self.dirty = false;
                match self.snapshot() {
                    Some(bytes) => return Some(Ok(bytes)),
                    None => continue,
                }
            }
            let event = {
                let State::Subscribed(sub) = &mut self.state else {
                    return None;
                };
                tokio::select! {
                    _ = &mut self.stopping => Event::Stop,
                    msg = self.inbound.message() => Event::Message(msg),
                    changed = sub.woken.changed() => match changed {
                        Ok(()) => Event::Woken,
                        // The sender lives as long as the subscription.
                        Err(_) => Event::Stop,
                    },
                }
            };
            match event {
                Event::Woken => self.dirty = true,
                Event::Stop => {
                    return self.end(
                        "shutdown",
                        Some(Status::unavailable("tern-control is shutting down")),
                    );
                }
                Event::Message(Ok(Some(m))) => {
                    let State::Subscribed(sub) = &self.state else {
                        return None;
                    };
                    if let Err(status) = handle(&self.mesh, &self.metrics, &sub.subscriber, m) {
                        return self.end("protocol error", Some(status));
                    }
                }
                Event::Message(Ok(None)) => return self.end("sidecar closed the stream", None),
                Event::Message(Err(status)) => {
                    tracing::debug!(peer = ?self.peer, %status, "stream error");
                    return self.end("stream error", None);
                }
            }
        }
    }

    /// Reads and checks the Hello, then subscribes. `Err(None)`: the stream
    /// ended without a word; `Err(Some(status))`: end it with that status.
    async fn hello(&mut self) -> Result<(), Option<Status>> {
        let first = tokio::select! {
            _ = &mut self.stopping => return Err(Some(Status::unavailable("tern-control is shutting down"))),
            first = tokio::time::timeout(HELLO_TIMEOUT, self.inbound.message()) => first,
        };
        let hello = match first {
            Ok(Ok(Some(pb::SidecarMessage {
                kind: Some(Kind::Hello(h)),
            }))) => h,
            Ok(Ok(Some(_))) => {
                return Err(Some(Status::invalid_argument(
                    "the first message must be a Hello",
                )))
            }
            Ok(Ok(None)) => return Err(None),
            Ok(Err(status)) => {
                tracing::debug!(peer = ?self.peer, %status, "stream failed before its Hello");
                return Err(None);
            }
            Err(_) => return Err(Some(Status::deadline_exceeded("no Hello within 10s"))),
        };
        let service = hello.service.clone();
        self.incremental = hello.incremental;
        let refuse = |r: Refusal| {
            let log = &self.refusal_log;
            Some(admission::refuse(
                &r,
                &self.metrics,
                log,
                self.peer,
                &service,
            ))
        };
        if self.verified.is_none() && !self.plaintext_allowed {
            return Err(refuse(Refusal::NoClientCertificate));
        }
        let (workload, calls) =
            parse_hello(hello, self.peer, self.verified.as_deref()).map_err(refuse)?;
        let mut sub = self.mesh.subscribe(workload, calls).map_err(refuse)?;
        let w = &sub.subscriber.workload;
        tracing::info!(id = sub.subscriber.id, service = %w.key, identity = w.identity.as_deref().unwrap_or("-"), address = ?w.address, peer = ?self.peer, "sidecar subscribed");
        // Subscribing woke it; the first snapshot is due regardless.
        sub.woken.borrow_and_update();
        self.dirty = true;
        self.state = State::Subscribed(sub);
        Ok(())
    }

    /// Builds the snapshot due, or `None` when it equals the last one sent.
    fn snapshot(&mut self) -> Option<Bytes> {
        let State::Subscribed(sub) = &self.state else {
            return None;
        };
        let subscriber = &sub.subscriber;
        let since = subscriber.take_pending();
        let mut built = self.mesh.build(subscriber.id)?;
        // Lookup answers are due even when nothing else changed.
        built.lookups = subscriber.take_answers();
        if built.lookups.is_empty() && self.last.as_ref().is_some_and(|l| l.same_as(&built)) {
            return None;
        }
        let version = self.mesh.next_version();
        // After the stream's first (complete) snapshot, a sidecar that
        // applies incremental ones is sent only what changed.
        let bytes = match (&self.last, self.incremental) {
            (Some(last), true) => built.encode_delta(version, last),
            _ => built.encode(version),
        };
        self.metrics.push_bytes.inc_by(bytes.len() as u64);
        subscriber.sent(version);
        self.metrics.pushes.inc();
        if let Some(t) = since {
            self.metrics.push_latency.observe(t.elapsed().as_secs_f64());
        }
        tracing::debug!(
            id = subscriber.id,
            version,
            services = built.services.len(),
            lookups = built.lookups.len(),
            bytes = bytes.len(),
            "snapshot sent"
        );
        self.last = Some(built);
        Some(bytes)
    }

    fn end(
        &mut self,
        reason: &'static str,
        status: Option<Status>,
    ) -> Option<Result<Bytes, Status>> {
        // Dropping the subscription starts the endpoint's grace now, not
        // whenever hyper gets round to dropping the stream.
        if let State::Subscribed(sub) = std::mem::replace(&mut self.state, State::Closed) {
            log_end(&sub, reason);
        }
        status.map(Err)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let State::Subscribed(sub) = &self.state {
            log_end(sub, "sidecar went away");
        }
    }
}

fn log_end(sub: &Subscription, reason: &str) {
    let s = &sub.subscriber;
    tracing::info!(id = s.id, service = %s.workload.key, reason, "sidecar unsubscribed");
}
