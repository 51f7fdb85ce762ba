//! The Kubernetes source's I/O: three kube-rs watchers (Services,
//! EndpointSlices, Pods, in every namespace) feeding [`Cache`], and each
//! batch of touched services handed to the [`Sink`] (the state's
//! `Mesh::set_discovered`).
//!
//! The API is found as kube-rs finds it ([`kube::Config::infer`]): a
//! kubeconfig named by `KUBECONFIG` (or `~/.kube/config`) when there is one,
//! else the in-cluster service account — the case in a pod.
//!
//! Watchers list then watch (`watcher::Config::default()`), with kube-rs'
//! default backoff between failed attempts. Nothing is published until all
//! three kinds are listed, so a service never flaps to "no endpoints" because
//! its slices came second; after that, every batch of events becomes one
//! update of the services it touched.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::cache::Cache;
use super::metrics::DiscoveryMetrics;
use super::Sink;
use crate::config::ServiceKey;

/// At most this many watch events are folded into one update.
const BATCH: usize = 512;

/// A client for the cluster's API, configured from the environment.
pub async fn client() -> anyhow::Result<Client> {
    let config = kube::Config::infer()
        .await
        .context("finding the Kubernetes API (KUBECONFIG, or the in-cluster service account)")?;
    tracing::info!(api = %config.cluster_url, "Kubernetes discovery: using the API");
    Client::try_from(config).context("building the Kubernetes client")
}

type Watched<K> = Result<Event<K>, watcher::Error>;

/// One watcher's item; boxed, as the three differ much in size.
enum Item {
    Service(Box<Watched<Service>>),
    Slice(Box<Watched<EndpointSlice>>),
    Pod(Box<Watched<Pod>>),
}

/// Watches the cluster and keeps the mesh's discovered services current until `stop`.
pub async fn run<S: Sink>(
    client: Client,
    mesh: Arc<S>,
    metrics: Arc<DiscoveryMetrics>,
    trust_domain: String,
    listed: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let config = watcher::Config::default();
    let services = watcher::watcher(Api::<Service>::all(client.clone()), config.clone())
        .default_backoff()
        .map(|r| Item::Service(Box::new(r)));
    let slices = watcher::watcher(Api::<EndpointSlice>::all(client.clone()), config.clone())
        .default_backoff()
        .map(|r| Item::Slice(Box::new(r)));
    let pods = watcher::watcher(Api::<Pod>::all(client), config)
        .default_backoff()
        .map(|r| Item::Pod(Box::new(r)));
    let merged = futures::stream::select(futures::stream::select(services, slices), pods);
    let mut batches = std::pin::pin!(merged.ready_chunks(BATCH));
    let mut cache = Cache::default();
    let mut pending: BTreeSet<ServiceKey> = BTreeSet::new();
    let mut published = false;
    loop {
        let batch = tokio::select! {
            _ = stop.cancelled() => return,
            b = batches.next() => match b {
                Some(b) => b,
                None => return,
            },
        };
        let since = Instant::now();
        for item in batch {
            pending.extend(apply(&mut cache, item, &metrics));
        }
        if !cache.ready() {
            continue;
        }
        if !published {
            // The first complete picture: every cluster service, and whatever an
            // earlier run of this loop left in the mesh.
            pending.extend(cache.keys());
            pending.extend(mesh.discovered_keys());
            published = true;
            tracing::info!(
                services = cache.services.len(),
                endpointslices = cache.slices.len(),
                pods = cache.pods.len(),
                "Kubernetes discovery: cluster listed"
            );
        }
        if !pending.is_empty() {
            let changes = std::mem::take(&mut pending)
                .into_iter()
                .map(|k| {
                    let d = cache.discovered(&k, &trust_domain);
                    (k, d)
                })
                .collect();
            mesh.set_discovered(changes, since);
        }
        // Every kind is listed and what it holds is in the mesh.
        listed.send_if_modified(|l| !std::mem::replace(l, true));
    }
}

/// Applies one watcher item to the cache; returns the services it touched.
fn apply(cache: &mut Cache, item: Item, metrics: &DiscoveryMetrics) -> BTreeSet<ServiceKey> {
    match item {
        Item::Service(r) => match observe("services", cache.services.listed(), *r, metrics) {
            Some(e) => cache.on_service(e),
            None => BTreeSet::new(),
        },
        Item::Slice(r) => match observe("endpointslices", cache.slices.listed(), *r, metrics) {
            Some(e) => cache.on_slice(e),
            None => BTreeSet::new(),
        },
        Item::Pod(r) => match observe("pods", cache.pods.listed(), *r, metrics) {
            Some(e) => cache.on_pod(e),
            None => BTreeSet::new(),
        },
    }
}

/// Counts and logs one watcher item; the event, if it is one.
fn observe<K>(
    resource: &str,
    listed: bool,
    r: Watched<K>,
    m: &DiscoveryMetrics,
) -> Option<Event<K>> {
    match r {
        Ok(e) => {
            m.events.with_label_values(&[resource]).inc();
            match &e {
                Event::Init if listed => {
                    m.restarts.with_label_values(&[resource]).inc();
                    tracing::info!(resource, "Kubernetes watch restarted: relisting");
                }
                Event::InitDone => tracing::debug!(resource, "Kubernetes list complete"),
                _ => {}
            }
            Some(e)
        }
        Err(e) => {
            m.errors.with_label_values(&[resource]).inc();
            // A 410 Gone is routine (the watch fell behind): the watcher relists.
            tracing::warn!(resource, error = %e, "Kubernetes watch error; retrying with backoff");
            None
        }
    }
}
