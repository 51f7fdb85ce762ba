//! The one HTTP/2 connection an endpoint's requests share, and when it is
//! replaced.
//!
//! h2 keeps a slot per stream in a slab that grows to the most streams the
//! connection ever held at once (queued ones included) and never shrinks, and
//! so does its buffer of queued frames. A burst of thousands of concurrent
//! calls would leave megabytes in the pool's connection for as long as it
//! lives. So a connection that once held [`BURST_STREAMS`] or more streams at
//! once leaves the pool when its streams fall back to a sixteenth of that
//! peak: new requests open a fresh connection, sized for what they need, and
//! the old one closes, and frees its slab, when its last stream ends.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use hyper::client::conn::http2;

use crate::body::Body;

/// Streams at once from which a connection is replaced once the burst is over.
pub const BURST_STREAMS: u32 = 512;
/// The share of its peak a connection's streams must fall to for it to be
/// replaced; a connection still that busy is using what it grew.
const SETTLED_SHARE: u32 = 16;

/// An HTTP/2 connection's sender, and what decides how long it is used.
pub struct Pooled {
    tx: http2::SendRequest<Body>,
    /// When a certificate of the mTLS session expires: no new requests after.
    retire_at: Option<SystemTime>,
    streams: Streams,
}

impl Pooled {
    pub fn new(tx: http2::SendRequest<Body>, retire_at: Option<SystemTime>) -> Self {
        Self {
            tx,
            retire_at,
            streams: Streams::default(),
        }
    }

    /// Whether the connection takes new requests.
    fn usable(&self) -> bool {
        !self.tx.is_closed() && self.retire_at.is_none_or(|t| SystemTime::now() < t)
    }
}

/// The pool's current connection, shared with the streams it carries so the
/// last of a burst can take it out.
#[derive(Default)]
pub struct H2Pool {
    current: Arc<ArcSwapOption<Pooled>>,
}

impl H2Pool {
    /// The current connection's sender, with its stream counted, when it can
    /// take a request.
    pub fn checkout(&self) -> Option<(http2::SendRequest<Body>, StreamGuard)> {
        let conn = self.current.load_full()?;
        if !conn.usable() {
            return None;
        }
        Some((conn.tx.clone(), self.guard(conn)))
    }

    /// Makes `conn` the current connection and counts a stream on it.
    pub fn insert(&self, conn: Pooled) -> (http2::SendRequest<Body>, StreamGuard) {
        let conn = Arc::new(conn);
        self.current.store(Some(Arc::clone(&conn)));
        (conn.tx.clone(), self.guard(conn))
    }

    /// The current connection closed under a request that it never sent.
    pub fn forget(&self) {
        self.current.store(None);
    }

    fn guard(&self, conn: Arc<Pooled>) -> StreamGuard {
        conn.streams.enter();
        StreamGuard {
            conn,
            pool: Arc::clone(&self.current),
        }
    }
}

/// A stream counted on its connection until its response ends (or fails).
pub struct StreamGuard {
    conn: Arc<Pooled>,
    pool: Arc<ArcSwapOption<Pooled>>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.conn.streams.leave() {
            return;
        }
        // Only if it is still the current one: a newer connection stays.
        let current = Some(Arc::clone(&self.conn));
        self.pool.compare_and_swap(&current, None);
        tracing::debug!("upstream connection replaced after a burst");
    }
}

/// A connection's streams now, and the most it held at once.
#[derive(Default)]
struct Streams {
    now: AtomicU32,
    peak: AtomicU32,
    replaced: AtomicBool,
}

impl Streams {
    fn enter(&self) {
        let now = self.now.fetch_add(1, Ordering::Relaxed) + 1;
        if now > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// One stream ended: true, once, when the burst its connection grew for
    /// is over and the connection should leave the pool.
    fn leave(&self) -> bool {
        let left = self.now.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        let peak = self.peak.load(Ordering::Relaxed);
        if peak < BURST_STREAMS || left > peak / SETTLED_SHARE {
            return false;
        }
        !self.replaced.swap(true, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many streams were still open each time `leave` said to replace.
    fn replaced_at(streams: &Streams, open: u32) -> Vec<u32> {
        (0..open).for_each(|_| streams.enter());
        (0..open)
            .rev()
            .filter(|_| streams.leave())
            .collect::<Vec<_>>()
    }

    #[test]
    fn an_ordinary_load_keeps_its_connection() {
        let streams = Streams::default();
        assert!(replaced_at(&streams, BURST_STREAMS - 1).is_empty());
        assert!(replaced_at(&streams, 200).is_empty());
    }

    #[test]
    fn a_burst_replaces_the_connection_once_when_it_has_settled() {
        let streams = Streams::default();
        // 600 at once: replaced when 37 (600 / 16, rounded down) are left.
        assert_eq!(replaced_at(&streams, 600), vec![37]);
        // ... and only once, whatever follows on the old connection.
        assert!(replaced_at(&streams, 600).is_empty());
    }
}
