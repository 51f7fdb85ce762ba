//! A stand-in for the Kubernetes API server's list and watch of Services, EndpointSlices and
//! Pods, on loopback over real TLS. It is not an API server: this machine cannot run one, so
//! tests of tern-control's Kubernetes discovery talk to this instead.
//!
//! What it does as the API server does (as kube-rs' watchers use it):
//! - `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, `/api/v1/pods`, and
//!   the same under `/namespaces/<ns>/`, with the caller's bearer token (401 otherwise);
//! - a list answers `{kind: ...List, metadata: {resourceVersion}, items}` (items without
//!   `kind`/`apiVersion`, as the API server writes them), paged by `limit` and `continue`;
//!   `resourceVersionMatch=Exact` with a version other than the current one, or a `continue`
//!   from before a compaction, is `410 Gone`;
//! - `watch=true` streams JSON lines `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR,
//!   "object": ...}` from `resourceVersion` on: first the recorded events after it, then live
//!   ones; a version older than the last compaction gets an `ERROR` event carrying a `Status`
//!   with code 410 (Expired), and the stream ends, which makes a client relist;
//!   `allowWatchBookmarks=true` adds a BOOKMARK with the current version every bookmark period;
//!   `timeoutSeconds` ends the stream cleanly; `sendInitialEvents=true` first sends every
//!   object as ADDED and a BOOKMARK annotated `k8s.io/initial-events-end`.
//! - Every change gets the next resourceVersion (one counter for all kinds, like etcd's
//!   revision), written into the object's `metadata.resourceVersion`.
//!
//! What it leaves out: label and field selectors (kube-rs sends none here), other resources,
//! writes through the API (tests change objects through [`KubeWatchStandIn`] instead), and
//! paged lists are cut from the current contents rather than a snapshot at the first page's
//! version.
//!
//! Tests mutate objects ([`KubeWatchStandIn::apply`], [`KubeWatchStandIn::delete`]), cut every
//! open watch mid-stream ([`KubeWatchStandIn::cut_watches`]) or expire every version so far,
//! forcing relists ([`KubeWatchStandIn::expire`]); the `_with` variants make changes in the same
//! step, before any client can reconnect.

mod serve;
mod world;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, Result};
use base64::Engine as _;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use world::World;
pub use world::{Changes, Kind};

/// How often open watches that allow bookmarks get one (the API server's is about a minute;
/// tests want to see them).
pub const BOOKMARK_PERIOD: Duration = Duration::from_millis(500);

pub(crate) struct Shared {
    bearer: String,
    world: Mutex<World>,
}

impl Shared {
    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct KubeWatchStandIn {
    pub addr: SocketAddr,
    /// The CA (PEM) its certificate is signed by.
    pub ca_pem: String,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeWatchStandIn {
    /// Listens on a free loopback port; accepts only callers presenting `bearer`.
    pub async fn start(bearer: &str) -> Result<Self> {
        Self::start_on(bearer, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Listens on `addr` (e.g. a Docker bridge's host side, for containers); its certificate
    /// names `kubernetes.default.svc`, so such clients reach it by that name.
    pub async fn start_on(bearer: &str, addr: SocketAddr) -> Result<Self> {
        let (ca_pem, config) = crate::kube_api::tls_config()?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            bearer: bearer.to_owned(),
            world: Mutex::new(World::default()),
        });
        let acceptor = TlsAcceptor::from(config);
        let tasks = vec![
            tokio::spawn(serve::serve(listener, acceptor, Arc::clone(&shared))),
            tokio::spawn(bookmarks(Arc::clone(&shared))),
        ];
        Ok(Self {
            addr,
            ca_pem,
            shared,
            tasks,
        })
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Writes a kubeconfig at `path` for this server (its CA, the `bearer` token): what
    /// `KUBECONFIG` names for a client.
    pub fn write_kubeconfig(&self, path: &Path, bearer: &str) -> Result<PathBuf> {
        self.write_kubeconfig_for(path, bearer, &self.url())
    }

    /// The same, naming the server as `server` (a URL its certificate covers).
    pub fn write_kubeconfig_for(&self, path: &Path, bearer: &str, server: &str) -> Result<PathBuf> {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\n    \
             certificate-authority-data: {ca}\nusers:\n- name: tern-control\n  user:\n    token: {bearer}\n\
             contexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: tern-control\n\
             current-context: stand-in\n",
            server
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path.to_path_buf())
    }

    /// Creates or replaces `object` (a k8s-openapi Service, EndpointSlice or Pod); returns
    /// its new resourceVersion.
    pub fn apply<K: k8s_openapi::Resource + Serialize>(&self, object: &K) -> Result<u64> {
        let mut changes = Changes::default();
        changes.apply(object)?;
        Ok(self.shared.world().commit(changes))
    }

    /// Deletes the object if it exists; returns the resourceVersion now.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> u64 {
        let mut changes = Changes::default();
        changes.delete(kind, namespace, name);
        self.shared.world().commit(changes)
    }

    /// Every open watch ends mid-stream (the connection breaks, no final chunk).
    pub fn cut_watches(&self) {
        self.cut_watches_with(Changes::default());
    }

    /// Cuts every open watch, then makes `changes` before anyone can watch again.
    pub fn cut_watches_with(&self, changes: Changes) {
        let mut world = self.shared.world();
        world.cut();
        world.commit(changes);
    }

    /// Makes `changes`, then forgets every event so far: a watch resuming from any earlier
    /// version gets 410 Gone and must relist. Open watches are cut (they would be told 410 at
    /// their next event anyway).
    pub fn expire_with(&self, changes: Changes) {
        let mut world = self.shared.world();
        world.cut();
        world.commit(changes);
        world.compact();
    }

    pub fn expire(&self) {
        self.expire_with(Changes::default());
    }

    /// The path and query of every request served, in order.
    pub fn requests(&self) -> Vec<String> {
        self.shared.world().requests.clone()
    }

    /// Watches open now.
    pub fn open_watches(&self) -> usize {
        self.shared.world().open_watches()
    }

    /// Watches answered with 410 Gone so far.
    pub fn gone(&self) -> u64 {
        self.shared.world().gone
    }
}

impl Drop for KubeWatchStandIn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.shared.world().cut();
    }
}

async fn bookmarks(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(BOOKMARK_PERIOD);
    loop {
        tick.tick().await;
        shared.world().bookmark();
    }
}
