//! The dashboard's data: every refresh, tern-control's `/state` and each
//! sidecar's `/metrics`, turned into one overview document — golden metrics
//! over the last window, a latency history per service, each sidecar's
//! config, certificate and mTLS coverage, and the NACKs seen lately.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::golden::{Golden, Tallies};
use crate::mesh_state::{self, MeshState, Sidecar};
use crate::prom_text::Sample;
use crate::scrape::{self, Cert};

/// The golden metrics cover about this much time.
const WINDOW: Duration = Duration::from_secs(10);
/// Points of latency history kept per service.
const HISTORY: usize = 90;
/// NACKs listed.
const RECENT_NACKS: usize = 20;

/// Scrapes by sidecar admin address, at one moment.
type Round = (Instant, Vec<(String, Tallies)>);

#[derive(Default)]
struct Memory {
    rounds: VecDeque<Round>,
    history: BTreeMap<String, VecDeque<Value>>,
    nacks: VecDeque<Value>,
}

pub async fn run(control: String, refresh: Duration, out: Arc<Mutex<Value>>) {
    let mut memory = Memory::default();
    loop {
        let overview = match mesh_state::fetch(&control).await {
            Ok(state) => memory.sample(&state, refresh).await,
            Err(e) => json!({
                "error": format!("tern-control at {control}: {e:#}"),
                "refresh_ms": refresh.as_millis() as u64,
            }),
        };
        if let Ok(mut o) = out.lock() {
            *o = overview;
        }
        tokio::time::sleep(refresh).await;
    }
}

impl Memory {
    async fn sample(&mut self, state: &MeshState, refresh: Duration) -> Value {
        let scrapes = scrape_sidecars(&state.sidecars).await;
        let now = Instant::now();
        let tallies: Vec<(String, Tallies)> = scrapes
            .iter()
            .map(|(admin, s)| (admin.clone(), Tallies::from_samples(s)))
            .collect();
        self.rounds.push_back((now, tallies));
        // Keep the newest round at least a window old as the baseline.
        while self.rounds.len() > 2 && self.rounds[1].0 + WINDOW <= now {
            self.rounds.pop_front();
        }
        let (rows, secs) = self.golden(now);
        let services = self.services(&rows);
        let sidecars: Vec<Value> = state
            .sidecars
            .iter()
            .map(|s| self.sidecar(s, &scrapes))
            .collect();
        self.note_nacks(&state.sidecars);
        json!({
            "updated": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            "refresh_ms": refresh.as_millis() as u64,
            "window_s": secs,
            "config_version": state.config_version,
            "last_config_error": state.last_config_error,
            "services": services,
            "sidecars": sidecars,
            "nacks": self.nacks,
        })
    }

    /// Inbound golden metrics between the oldest round kept and the newest.
    fn golden(&self, now: Instant) -> (Vec<Golden>, f64) {
        let (Some(first), Some(last)) = (self.rounds.front(), self.rounds.back()) else {
            return (Vec::new(), 0.0);
        };
        if self.rounds.len() < 2 {
            return (Vec::new(), 0.0);
        }
        let secs = (now - first.0).as_secs_f64();
        let rows = crate::stat::window(&first.1, &last.1)
            .golden(secs)
            .into_iter()
            .filter(|r| r.direction == "inbound")
            .collect();
        (rows, secs)
    }

    fn services(&mut self, rows: &[Golden]) -> Vec<Value> {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        rows.iter()
            .filter(|r| r.route.is_none())
            .map(|svc| {
                let history = self.history.entry(svc.service.clone()).or_default();
                history.push_back(json!({"t": t, "p50_ms": svc.p50_ms, "p99_ms": svc.p99_ms}));
                while history.len() > HISTORY {
                    history.pop_front();
                }
                let routes: Vec<&Golden> = rows
                    .iter()
                    .filter(|r| r.service == svc.service && r.route.is_some())
                    .collect();
                json!({
                    "service": svc.service,
                    "golden": svc,
                    "routes": routes,
                    "history": history,
                })
            })
            .collect()
    }

    fn sidecar(&self, s: &Sidecar, scrapes: &[(String, Vec<Sample>)]) -> Value {
        let samples = s
            .admin
            .as_ref()
            .and_then(|a| scrapes.iter().find(|(admin, _)| admin == a))
            .map(|(_, samples)| samples);
        let cert = samples.and_then(|s| Cert::of(s));
        let now = SystemTime::now();
        json!({
            "service": s.service,
            "namespace": s.namespace,
            "address": s.address,
            "admin": s.admin,
            "identity": s.identity,
            "labels": s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "acked_version": s.acked_version,
            "sent_version": s.sent_version,
            "nacks": s.nacks,
            "answering": samples.is_some(),
            "cert_expires": cert.map(|c| humantime::format_rfc3339_seconds(c.expires).to_string()),
            "cert_left_s": cert.map(|c| c.left(now).as_secs()),
            "mtls": s.admin.as_deref().and_then(|a| self.inbound_mtls(a)),
        })
    }

    /// The share of a sidecar's inbound responses over mTLS in the window.
    fn inbound_mtls(&self, admin: &str) -> Option<f64> {
        let (first, last) = (self.rounds.front()?, self.rounds.back()?);
        let find = |round: &Round| {
            round
                .1
                .iter()
                .find(|(a, _)| a == admin)
                .map(|(_, t)| t.clone())
        };
        let delta = find(last)?.since(&find(first).unwrap_or_default());
        let (mut all, mut tls) = (0.0, 0.0);
        for (key, t) in &delta.0 {
            if key.direction == "inbound" {
                all += t.responses;
                tls += t.tls;
            }
        }
        (all > 0.0).then(|| tls / all)
    }

    /// Remembers each sidecar's last NACK once.
    fn note_nacks(&mut self, sidecars: &[Sidecar]) {
        for s in sidecars {
            let Some((version, reason)) = &s.last_nack else {
                continue;
            };
            let sidecar = s.name();
            let seen = self
                .nacks
                .iter()
                .any(|n| n["sidecar"] == sidecar.as_str() && n["version"] == *version);
            if !seen {
                self.nacks.push_front(json!({
                    "sidecar": sidecar,
                    "version": version,
                    "reason": reason,
                    "seen": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                }));
                self.nacks.truncate(RECENT_NACKS);
            }
        }
    }
}

/// Every sidecar's samples, by admin address; those that do not answer are left out.
async fn scrape_sidecars(sidecars: &[Sidecar]) -> Vec<(String, Vec<Sample>)> {
    let mut tasks = tokio::task::JoinSet::new();
    for admin in sidecars.iter().filter_map(|s| s.admin.clone()) {
        tasks.spawn(async move { Some((admin.clone(), scrape::metrics(&admin).await.ok()?)) });
    }
    let mut out = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(Some(one)) = done {
            out.push(one);
        }
    }
    out
}
