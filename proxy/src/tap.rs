//! `/tap`: a live stream of the requests this sidecar carries, for
//! `ternctl tap`.
//!
//! An event carries request metadata only: never a body, and the values of
//! the allowlisted request headers (`--tap-headers`) and no other. The
//! request path pays for tapping only while someone taps: [`Tap::active`] is
//! one atomic load, and nothing is captured when it says no. Events go
//! through a bounded broadcast channel: a tap client that reads too slowly
//! loses the oldest events (it is told how many, and they are counted in
//! `tern_tap_events_dropped_total`); a request never waits for it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, Request};
use http_body::Frame;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::body::{self, Body, BoxError};
use crate::metrics::Direction;

/// Events buffered per tap client before the oldest are dropped.
const BUFFER: usize = 1024;

/// The tap hub, shared by every listener's stack and the admin port.
#[derive(Clone)]
pub struct Tap {
    inner: Arc<Inner>,
}

struct Inner {
    tx: broadcast::Sender<Arc<Event>>,
    /// Tap clients connected now: the request path's only check.
    subscribers: AtomicUsize,
    headers: Vec<HeaderName>,
    dropped: prometheus::IntCounter,
}

/// What is known of a tapped request when it arrives.
pub struct Started {
    method: String,
    authority: String,
    path: String,
    headers: BTreeMap<String, String>,
}

/// One request, reported once its response ended.
#[derive(Debug, Serialize)]
pub struct Event {
    pub time: String,
    pub direction: &'static str,
    pub service: String,
    /// The gRPC method (`package.Service/Method`), or `http`.
    pub route: String,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub status: u16,
    pub grpc_status: Option<u32>,
    pub latency_ms: f64,
    pub peer_identity: Option<String>,
    pub tls: Option<&'static str>,
    pub attempts: u32,
    pub upstream: Option<SocketAddr>,
    pub error: Option<&'static str>,
    /// Allowlisted request headers only.
    pub headers: BTreeMap<String, String>,
}

/// The rest of an [`Event`], known when the response ends.
pub struct Finished<'a> {
    pub direction: Direction,
    pub service: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub grpc_status: Option<u32>,
    pub latency_ms: f64,
    pub peer_identity: Option<&'a str>,
    pub tls: Option<&'static str>,
    pub attempts: u32,
    pub upstream: Option<SocketAddr>,
    pub error: Option<&'static str>,
}

impl Tap {
    /// `headers`: the allowlist (validated names); `registry`: where the
    /// dropped-events counter is registered.
    pub fn new(headers: &[String], registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let dropped = prometheus::IntCounter::new(
            "tern_tap_events_dropped_total",
            "Tap events a /tap client did not read in time and lost.",
        )?;
        registry.register(Box::new(dropped.clone()))?;
        let headers = headers
            .iter()
            .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
            .collect();
        let (tx, _) = broadcast::channel(BUFFER);
        Ok(Self {
            inner: Arc::new(Inner {
                tx,
                subscribers: AtomicUsize::new(0),
                headers,
                dropped,
            }),
        })
    }

    /// Whether anyone taps: when not, nothing else here is called.
    pub fn active(&self) -> bool {
        self.inner.subscribers.load(Ordering::Relaxed) > 0
    }

    /// What a tapped request is known by on arrival; `None` when nobody taps.
    pub fn start<B>(&self, req: &Request<B>) -> Option<Box<Started>> {
        if !self.active() {
            return None;
        }
        let headers = self
            .inner
            .headers
            .iter()
            .filter_map(|name| {
                let values: Vec<&str> = req
                    .headers()
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                (!values.is_empty()).then(|| (name.as_str().to_string(), values.join(", ")))
            })
            .collect();
        Some(Box::new(Started {
            method: req.method().to_string(),
            authority: crate::router::authority(req).to_string(),
            path: req.uri().path().to_string(),
            headers,
        }))
    }

    /// Sends a finished request to every tap client; never waits.
    pub fn finish(&self, started: Started, f: Finished<'_>) {
        let event = Event {
            time: crate::access_log::now_rfc3339(),
            direction: f.direction.as_str(),
            service: f.service.to_string(),
            route: f.route.to_string(),
            method: started.method,
            authority: started.authority,
            path: started.path,
            status: f.status,
            grpc_status: f.grpc_status,
            latency_ms: f.latency_ms,
            peer_identity: f.peer_identity.map(str::to_string),
            tls: f.tls,
            attempts: f.attempts,
            upstream: f.upstream,
            error: f.error,
            headers: started.headers,
        };
        // No receiver left (the last client just went): nothing to do.
        let _ = self.inner.tx.send(Arc::new(event));
    }

    /// A JSON-lines body of the events `filter` matches, until the client
    /// goes away. A line `{"dropped": N}` tells the client it lost N events.
    pub fn stream(&self, filter: Filter) -> Body {
        let client = Client {
            rx: self.inner.tx.subscribe(),
            inner: Arc::clone(&self.inner),
            filter,
        };
        self.inner.subscribers.fetch_add(1, Ordering::Relaxed);
        let hello = serde_json::json!({"tapping": true}).to_string() + "\n";
        let first = futures::stream::once(async move { Ok(Frame::data(Bytes::from(hello))) });
        let events = futures::stream::unfold(client, |mut c| async move {
            let line = c.next_line().await?;
            Some((Ok::<_, BoxError>(Frame::data(Bytes::from(line))), c))
        });
        body::boxed(http_body_util::StreamBody::new(futures::StreamExt::chain(
            first, events,
        )))
    }
}

/// One tap client's receiver; leaving unregisters it.
struct Client {
    rx: broadcast::Receiver<Arc<Event>>,
    inner: Arc<Inner>,
    filter: Filter,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.inner.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Client {
    async fn next_line(&mut self) -> Option<String> {
        loop {
            match self.rx.recv().await {
                Ok(ev) if self.filter.matches(&ev) => {
                    return Some(serde_json::to_string(&*ev).ok()? + "\n");
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    self.inner.dropped.inc_by(n);
                    return Some(serde_json::json!({ "dropped": n }).to_string() + "\n");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// Which events a tap client wants; every part set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub direction: Option<String>,
    /// A gRPC method (`pkg.Service/Method`), a gRPC service (`pkg.Service`),
    /// a path, or `http` (every request that is not gRPC).
    pub route: Option<String>,
    /// An HTTP status (`503`), a class (`5xx`), or a gRPC status by name
    /// (`UNAVAILABLE`) or number (`14`).
    pub status: Option<String>,
    /// A SPIFFE id, or its service account name.
    pub peer: Option<String>,
}

impl Filter {
    /// From the query string `direction=&route=&status=&peer=`; an unknown
    /// key or a direction other than inbound/outbound is an error.
    pub fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut f = Self::default();
        for (key, value) in query_pairs(query) {
            let value = Some(value).filter(|v| !v.is_empty());
            match key.as_str() {
                "direction" => f.direction = value,
                "route" => f.route = value,
                "status" => f.status = value,
                "peer" => f.peer = value,
                other => return Err(format!("unknown tap filter {other:?}")),
            }
        }
        if let Some(d) = &f.direction {
            if d != "inbound" && d != "outbound" {
                return Err(format!("direction must be inbound or outbound, not {d:?}"));
            }
        }
        Ok(f)
    }

    pub fn matches(&self, ev: &Event) -> bool {
        self.direction.as_deref().is_none_or(|d| d == ev.direction)
            && self.route.as_deref().is_none_or(|r| route_matches(r, ev))
            && self.status.as_deref().is_none_or(|s| status_matches(s, ev))
            && self.peer.as_deref().is_none_or(|p| peer_matches(p, ev))
    }
}

fn route_matches(want: &str, ev: &Event) -> bool {
    let want = want.strip_prefix('/').unwrap_or(want);
    ev.route == want
        || ev
            .route
            .strip_prefix(want)
            .is_some_and(|rest| rest.starts_with('/'))
        || ev.path.strip_prefix('/') == Some(want)
}

fn status_matches(want: &str, ev: &Event) -> bool {
    if let Ok(n) = want.parse::<u32>() {
        return match n {
            0..=99 => ev.grpc_status == Some(n),
            _ => u32::from(ev.status) == n,
        };
    }
    if let Some(class) = want.strip_suffix("xx") {
        return class.parse::<u16>().is_ok_and(|c| ev.status / 100 == c);
    }
    ev.grpc_status
        .is_some_and(|code| tern_proto::grpc_code::name(code).eq_ignore_ascii_case(want))
}

fn peer_matches(want: &str, ev: &Event) -> bool {
    ev.peer_identity.as_deref().is_some_and(|id| {
        id == want
            || id
                .rsplit_once("/sa/")
                .is_some_and(|(_, account)| account == want)
    })
}

/// `key=value` pairs of a query string, percent-decoded.
pub fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = || std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok();
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match hex().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) => {
                    out.push(b);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests;
