//! A request's attempts, shared by the layers that make them and the one
//! that reports them.
//!
//! Routing makes one per request ([`crate::router::Routed`]); the retry
//! layer counts attempts in it, the balance layer records each attempt's
//! endpoint (which the next attempt avoids, and errors name), and Observe
//! reads the count and the endpoint that answered when it logs and counts
//! the request. One allocation per request carries all of it: the endpoint
//! travels neither as an extension of each attempt nor of each response.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tern_identity::ConnTls;

use crate::endpoint::EndpointClient;

#[derive(Clone, Default)]
pub struct Attempts(Arc<Shared>);

#[derive(Default)]
struct Shared {
    count: AtomicU32,
    /// The endpoint the latest attempt went to.
    latest: Mutex<Option<Arc<EndpointClient>>>,
    /// Each retry, kept only for a sampled request, whose span shows them.
    retries: Option<Mutex<Vec<RetryEvent>>>,
}

/// An attempt that failed and was retried.
#[derive(Clone, Debug)]
pub struct RetryEvent {
    pub time: SystemTime,
    /// Which attempt failed, the first being 1.
    pub attempt: u32,
    pub endpoint: SocketAddr,
    pub reason: &'static str,
}

impl Attempts {
    /// Attempts that also remember each retry, for a span.
    pub fn recorded() -> Self {
        Self(Arc::new(Shared {
            retries: Some(Mutex::default()),
            ..Shared::default()
        }))
    }

    /// Attempts made so far.
    pub fn count(&self) -> u32 {
        self.0.count.load(Ordering::Relaxed)
    }

    pub fn set_count(&self, n: u32) {
        self.0.count.store(n, Ordering::Relaxed);
    }

    /// The balance layer chose `ep` for the attempt being made.
    pub fn sent_to(&self, ep: &Arc<EndpointClient>) {
        if let Ok(mut latest) = self.0.latest.lock() {
            *latest = Some(Arc::clone(ep));
        }
    }

    /// The address of the endpoint the latest attempt went to.
    pub fn latest_addr(&self) -> Option<SocketAddr> {
        let latest = self.0.latest.lock().ok()?;
        latest.as_ref().map(|ep| ep.addr())
    }

    /// The endpoint the latest attempt went to, and what its connection
    /// established when it speaks mTLS.
    pub fn upstream(&self) -> Option<(SocketAddr, Option<ConnTls>)> {
        let latest = self.0.latest.lock().ok()?;
        let ep = latest.as_ref()?;
        Some((ep.addr(), ep.uses_tls().then(|| ep.conn_tls())))
    }

    pub(super) fn retrying(&self, attempt: u32, endpoint: SocketAddr, reason: &'static str) {
        if let Some(Ok(mut log)) = self.0.retries.as_ref().map(Mutex::lock) {
            log.push(RetryEvent {
                time: SystemTime::now(),
                attempt,
                endpoint,
                reason,
            });
        }
    }

    /// The retries recorded so far (none unless [`Attempts::recorded`]).
    pub fn retries(&self) -> Vec<RetryEvent> {
        let log = self.0.retries.as_ref().and_then(|l| l.lock().ok());
        log.map(|l| l.clone()).unwrap_or_default()
    }
}
