//! Watching the config directory and applying each valid change.
//!
//! inotify (through `notify`) reports every step of a save — truncate,
//! write, close, rename — so events are debounced: the directory is read
//! once no event has arrived for the debounce period (100ms by default),
//! which also turns a multi-file change (a `git checkout`) into one reload
//! instead of a reload of each half-done state. When the latest event says a
//! file is whole — a writer closed it, or it was renamed into place (editors'
//! atomic saves, a ConfigMap's symlink swap), or removed — only a short
//! settle ([`SETTLE`]) follows, so an ordinary save reaches the sidecars in
//! tens of milliseconds rather than after a fixed delay.
//!
//! A valid change is applied; an invalid one is logged with file, document
//! and field, counted, shown on `/state`, and the last good config stays in
//! force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::metrics::Metrics;
use crate::state::Mesh;

type Notice = (Instant, notify::Result<Event>);

/// The wait after an event that leaves a file whole: long enough to gather
/// the other files of the same change written right after it.
pub const SETTLE: Duration = Duration::from_millis(10);

/// A watch on the directory, started before the first load so that a change
/// made while loading is not missed.
pub struct Watching {
    dir: PathBuf,
    // Dropping the watcher stops the events.
    _watcher: RecommendedWatcher,
    events: mpsc::UnboundedReceiver<Notice>,
    options: config::LoadOptions,
}

impl Watching {
    pub fn start(dir: &Path) -> notify::Result<Watching> {
        let (tx, events) = mpsc::unbounded_channel();
        // Called on notify's own thread; the time is taken here because this
        // is when the change happened, as far as push latency is concerned.
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<Event>| {
            let _ = tx.send((Instant::now(), res));
        })?;
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        Ok(Watching {
            dir: dir.to_path_buf(),
            _watcher: watcher,
            events,
            options: config::LoadOptions::default(),
        })
    }

    /// Reads the directory with `options` (see [`config::LoadOptions`]).
    pub fn with_options(mut self, options: config::LoadOptions) -> Self {
        self.options = options;
        self
    }

    /// Reloads after each burst of changes until `stop` fires.
    pub async fn run(
        mut self,
        debounce: Duration,
        mesh: Arc<Mesh>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) {
        loop {
            let (first, mut whole) = tokio::select! {
                _ = stop.cancelled() => return,
                t = next_change(&mut self.events) => match t {
                    Some(t) => t,
                    None => return,
                },
            };
            // Wait until the directory has been quiet long enough.
            loop {
                let quiet = if whole {
                    SETTLE.min(debounce)
                } else {
                    debounce
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    more = tokio::time::timeout(quiet, next_change(&mut self.events)) => match more {
                        Ok(Some((_, w))) => whole = w,
                        Ok(None) => return,
                        Err(_) => break,
                    },
                }
            }
            let dir = self.dir.clone();
            let options = self.options;
            let load = move || config::load_dir_with(&dir, options);
            let loaded = match tokio::task::spawn_blocking(load).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "config reload task failed");
                    continue;
                }
            };
            reload(loaded, first, &mesh, &metrics);
        }
    }
}

/// Applies or rejects one reload's outcome.
pub fn reload(
    loaded: Result<config::MeshConfig, config::ConfigErrors>,
    changed_at: Instant,
    mesh: &Mesh,
    metrics: &Metrics,
) {
    match loaded {
        Ok(config) => match mesh.apply_config(config, changed_at) {
            Some(version) => {
                metrics.config_reloads.inc();
                tracing::debug!(version, "config change applied");
            }
            None => tracing::debug!("config directory changed but the config did not"),
        },
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!(error = %e, "config change rejected");
            }
            tracing::error!(
                errors = errors.0.len(),
                version = mesh.config_version(),
                "invalid config change; the last good config stays in force"
            );
            metrics.config_errors.inc();
            mesh.reject_config(errors);
        }
    }
}

/// The next event that may mean the files changed: when it happened, and
/// whether it leaves the file it names whole.
async fn next_change(events: &mut mpsc::UnboundedReceiver<Notice>) -> Option<(Instant, bool)> {
    loop {
        let (at, res) = events.recv().await?;
        match res {
            Ok(ev) => {
                if let Some(whole) = classify(&ev.kind) {
                    return Some((at, whole));
                }
            }
            Err(e) => tracing::warn!(error = %e, "watching the config directory"),
        }
    }
}

/// `None`: not a change. `Some(true)`: the file is whole now. `Some(false)`:
/// more writes may follow.
fn classify(kind: &EventKind) -> Option<bool> {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(true),
        // Our own reads open files too.
        EventKind::Access(_) => None,
        EventKind::Modify(ModifyKind::Name(_)) | EventKind::Remove(_) => Some(true),
        _ => Some(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, RemoveKind, RenameMode};

    #[test]
    fn completed_writes_settle_fast_and_reads_are_ignored() {
        let close_write = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert_eq!(classify(&close_write), Some(true));
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert_eq!(classify(&renamed), Some(true));
        assert_eq!(classify(&EventKind::Remove(RemoveKind::File)), Some(true));
        let written = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert_eq!(classify(&written), Some(false));
        assert_eq!(classify(&EventKind::Create(CreateKind::File)), Some(false));
        let opened = EventKind::Access(AccessKind::Open(AccessMode::Any));
        assert_eq!(classify(&opened), None);
    }
}
