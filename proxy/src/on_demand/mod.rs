//! On-demand discovery: the sidecar learns a service when its app first
//! uses it, instead of watching the whole mesh.
//!
//! An intercepted connection to an address no known service has, or a
//! request naming an authority no known service has, asks the control plane
//! (a `Lookup` on the Subscribe stream) and waits for the answer at most
//! `lookup_timeout`. Concurrent first uses of one destination share one
//! lookup. The answer arrives in a snapshot that already lists the service
//! found, so once it is applied the caller re-resolves and proceeds meshed.
//! An address outside the mesh is remembered for `outside_mesh_ttl` and
//! passed through without asking again. A service found this way and unused
//! for `idle_timeout` is dropped, and the control plane told (`Forget`).

mod metrics;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::time::Instant as TokioInstant;

use tern_proto::control::v1 as pb;
use tern_proto::control::v1::sidecar_message::Kind;
use tokio::sync::{mpsc, watch};

use crate::config::on_demand::OnDemandConfig;
use crate::targets::Targets;

use metrics::LookupMetrics;

/// How many outside-mesh addresses are remembered at most.
const MAX_OUTSIDE: usize = 10_000;

/// The destination a request was for, when the control plane did not say
/// what it is in time: the balance layer answers UNAVAILABLE naming it. The
/// Route layer waits for lookups of request authorities
/// ([`crate::router::Route`]); the accept loop for intercepted connections.
#[derive(Clone, Debug)]
pub struct Unanswered {
    pub destination: String,
    pub waited: Duration,
}

/// What a lookup came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The service is known now: resolve again.
    Found,
    /// Not in the mesh: pass it through.
    OutsideMesh,
    /// A name the control plane does not know either.
    Unknown,
    /// No answer within the lookup timeout (or the snapshot carrying it was rejected).
    NoAnswer,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Found => "found",
            Self::OutsideMesh => "outside_mesh",
            Self::Unknown => "unknown",
            Self::NoAnswer => "no_answer",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Query {
    Address(SocketAddr),
    Name(String),
}

#[derive(Default)]
struct State {
    /// Lookups in flight, by what they ask: later askers wait on the same one.
    pending: HashMap<Query, (u64, watch::Sender<Option<Outcome>>)>,
    by_id: HashMap<u64, Query>,
    /// Outside-mesh IPs and until when that holds.
    outside: HashMap<IpAddr, TokioInstant>,
    /// Services found by lookups ("name.namespace" → (name, namespace)).
    found: BTreeMap<String, (String, String)>,
}

pub struct OnDemand {
    config: OnDemandConfig,
    targets: Arc<Targets>,
    /// Services named in bootstrap config: never dropped for idleness.
    pinned: BTreeSet<(String, String)>,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Lookups and Forgets for the control-plane session to send.
    requests: mpsc::UnboundedSender<Kind>,
    outgoing: tokio::sync::Mutex<mpsc::UnboundedReceiver<Kind>>,
    metrics: LookupMetrics,
}

impl OnDemand {
    pub fn new(
        config: OnDemandConfig,
        targets: Arc<Targets>,
        pinned: BTreeSet<(String, String)>,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Self>, prometheus::Error> {
        let (requests, outgoing) = mpsc::unbounded_channel();
        Ok(Arc::new(OnDemand {
            config,
            targets,
            pinned,
            state: Mutex::default(),
            next_id: AtomicU64::new(1),
            requests,
            outgoing: tokio::sync::Mutex::new(outgoing),
            metrics: LookupMetrics::register(registry)?,
        }))
    }

    pub fn lookup_timeout(&self) -> Duration {
        self.config.lookup_timeout
    }

    /// What is at `dst`, an intercepted connection's original destination
    /// that no known service has.
    pub async fn address(&self, dst: SocketAddr) -> Outcome {
        let ip = dst.ip().to_canonical();
        if self.is_outside(ip) {
            return Outcome::OutsideMesh;
        }
        self.ask(Query::Address(SocketAddr::new(ip, dst.port())))
            .await
    }

    /// What `authority` (a request's `:authority` or `Host`) names.
    pub async fn name(&self, authority: &str) -> Outcome {
        self.ask(Query::Name(authority.to_ascii_lowercase())).await
    }

    async fn ask(&self, query: Query) -> Outcome {
        let started = Instant::now();
        let mut rx = {
            let mut s = self.lock();
            match s.pending.get(&query) {
                Some((_, tx)) => tx.subscribe(),
                None => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let (tx, rx) = watch::channel(None);
                    s.pending.insert(query.clone(), (id, tx));
                    s.by_id.insert(id, query.clone());
                    let (address, name) = match &query {
                        Query::Address(a) => (a.to_string(), String::new()),
                        Query::Name(n) => (String::new(), n.clone()),
                    };
                    // The receiver lives as long as this struct.
                    let _ = self
                        .requests
                        .send(Kind::Lookup(pb::Lookup { id, address, name }));
                    tracing::debug!(id, ?query, "lookup sent");
                    rx
                }
            }
        };
        let wait = rx.wait_for(Option::is_some);
        let outcome = match tokio::time::timeout(self.config.lookup_timeout, wait).await {
            Ok(Ok(o)) => o.unwrap_or(Outcome::NoAnswer),
            _ => {
                self.give_up(&query);
                Outcome::NoAnswer
            }
        };
        self.metrics.observe(outcome.label(), started.elapsed());
        match outcome {
            Outcome::NoAnswer => {
                tracing::warn!(?query, waited = ?self.config.lookup_timeout, "no answer from the control plane")
            }
            o => {
                tracing::debug!(?query, outcome = o.label(), elapsed = ?started.elapsed(), "lookup answered")
            }
        }
        outcome
    }

    /// The lookup of `query` timed out: the next asker starts a new one.
    fn give_up(&self, query: &Query) {
        let mut s = self.lock();
        if let Some((id, tx)) = s.pending.remove(query) {
            s.by_id.remove(&id);
            tx.send_replace(Some(Outcome::NoAnswer));
        }
    }

    fn is_outside(&self, ip: IpAddr) -> bool {
        let mut s = self.lock();
        match s.outside.get(&ip) {
            Some(until) if *until > TokioInstant::now() => true,
            Some(_) => {
                s.outside.remove(&ip);
                false
            }
            None => false,
        }
    }

    /// The answers a snapshot carried; `applied` is false when the snapshot
    /// was rejected (then whoever waits gets no answer).
    pub fn answer(&self, results: &[pb::LookupResult], applied: bool) {
        let now = TokioInstant::now();
        let mut s = self.lock();
        for r in results {
            let outcome = match pb::LookupOutcome::try_from(r.outcome) {
                _ if !applied => Outcome::NoAnswer,
                Ok(pb::LookupOutcome::Found) => Outcome::Found,
                Ok(pb::LookupOutcome::OutsideMesh) => Outcome::OutsideMesh,
                _ => Outcome::Unknown,
            };
            if outcome == Outcome::Found {
                if let Some((name, ns)) = r.service.split_once('.') {
                    let key = (name.to_owned(), ns.to_owned());
                    if !self.pinned.contains(&key) {
                        s.found.insert(r.service.clone(), key);
                    }
                }
            }
            let Some(query) = s.by_id.remove(&r.id) else {
                continue; // answered after its askers gave up
            };
            if let (Outcome::OutsideMesh, Query::Address(a)) = (outcome, &query) {
                if s.outside.len() >= MAX_OUTSIDE {
                    s.outside.retain(|_, until| *until > now);
                }
                if s.outside.len() < MAX_OUTSIDE {
                    s.outside.insert(a.ip(), now + self.config.outside_mesh_ttl);
                }
            }
            if let Some((_, tx)) = s.pending.remove(&query) {
                tx.send_replace(Some(outcome));
            }
        }
    }

    /// Services found by lookups, to name again in the Hello of a new
    /// session (a control plane that restarted knows nothing of them).
    pub fn found(&self) -> Vec<String> {
        self.lock().found.keys().cloned().collect()
    }

    /// The next Lookup or Forget to send; cancel safe.
    pub async fn next_request(&self) -> Option<Kind> {
        self.outgoing.lock().await.recv().await
    }

    /// Drops services found by lookups and unused for `idle_timeout`, checking
    /// a few times per idle period, for ever.
    pub async fn sweep_idle(self: Arc<Self>) {
        let every = (self.config.idle_timeout / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            tokio::time::sleep(every).await;
            self.drop_idle();
        }
    }

    fn drop_idle(&self) {
        let idle_ms = u64::try_from(self.config.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let now = crate::accrual::now_ms();
        let mut gone = Vec::new();
        {
            let mut s = self.lock();
            s.found.retain(|full, (name, ns)| {
                let used = self
                    .targets
                    .get(name, ns)
                    .map(|e| e.target.last_used())
                    .unwrap_or(0);
                let idle = now.saturating_sub(used) >= idle_ms;
                if idle {
                    gone.push((full.clone(), name.clone(), ns.clone()));
                }
                !idle
            });
        }
        if gone.is_empty() {
            return;
        }
        for (_, name, ns) in &gone {
            self.targets.remove(name, ns);
        }
        let services: Vec<String> = gone.into_iter().map(|(full, _, _)| full).collect();
        self.metrics.dropped.inc_by(services.len() as u64);
        tracing::info!(?services, idle = ?self.config.idle_timeout, "dropped services unused for the idle timeout");
        let _ = self.requests.send(Kind::Forget(pb::Forget { services }));
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests;
