//! The stand-in's objects, its event history and its open watches: one counter of
//! resourceVersions across kinds, a history that compaction forgets, and watches fed under
//! the same lock that records each change, so no watch misses or repeats one.

use std::collections::BTreeMap;

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// The kinds the stand-in serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Service | Kind::Pod => "v1",
        }
    }

    fn from_name(kind: &str) -> Option<Kind> {
        [Kind::Service, Kind::EndpointSlice, Kind::Pod]
            .into_iter()
            .find(|k| k.name() == kind)
    }
}

enum Op {
    Apply(Kind, Value),
    Delete(Kind, String, String),
}

/// Changes made in one step (each still gets its own resourceVersion).
#[derive(Default)]
pub struct Changes {
    ops: Vec<Op>,
}

impl Changes {
    /// Creates or replaces `object` (a k8s-openapi Service, EndpointSlice or Pod).
    pub fn apply<K: k8s_openapi::Resource + serde::Serialize>(
        &mut self,
        object: &K,
    ) -> Result<&mut Self> {
        let Some(kind) = Kind::from_name(K::KIND) else {
            bail!("the stand-in serves no {}", K::KIND);
        };
        let value = serde_json::to_value(object).context("serializing the object")?;
        if value["metadata"]["name"].as_str().is_none() {
            bail!("a {} needs metadata.name", K::KIND);
        }
        self.ops.push(Op::Apply(kind, value));
        Ok(self)
    }

    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> &mut Self {
        self.ops
            .push(Op::Delete(kind, namespace.to_owned(), name.to_owned()));
        self
    }
}

/// What a watch's body is fed.
pub(crate) enum Out {
    Line(Bytes),
    /// End mid-stream: the connection breaks.
    Cut,
}

struct Watch {
    kind: Kind,
    namespace: Option<String>,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Out>,
}

struct Recorded {
    rv: u64,
    kind: Kind,
    namespace: String,
    line: Bytes,
}

/// Why a watch or list cannot be served: the version asked for is compacted away.
pub(crate) struct Gone(pub String);

#[derive(Default)]
pub(crate) struct World {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    /// Events after `oldest`, in order.
    history: Vec<Recorded>,
    /// Watches from a version below this get 410 Gone.
    oldest: u64,
    watches: Vec<Watch>,
    pub requests: Vec<String>,
    pub gone: u64,
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut text = json!({"type": kind, "object": object}).to_string();
    text.push('\n');
    Bytes::from(text)
}

impl World {
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// Applies `changes`, each with the next resourceVersion; returns the last one.
    pub fn commit(&mut self, changes: Changes) -> u64 {
        for op in changes.ops {
            match op {
                Op::Apply(kind, mut v) => {
                    let ns = v["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("default")
                        .to_owned();
                    let name = v["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    self.rv += 1;
                    v["metadata"]["namespace"] = json!(ns);
                    v["metadata"]["resourceVersion"] = json!(self.rv.to_string());
                    if v["metadata"]["uid"].is_null() {
                        v["metadata"]["uid"] = json!(format!("uid-{}-{ns}-{name}", kind.name()));
                    }
                    let key = (kind, ns.clone(), name);
                    let ty = match self.objects.insert(key, v.clone()) {
                        Some(_) => "MODIFIED",
                        None => "ADDED",
                    };
                    self.emit(kind, &ns, ty, &v);
                }
                Op::Delete(kind, ns, name) => {
                    let Some(mut v) = self.objects.remove(&(kind, ns.clone(), name)) else {
                        continue;
                    };
                    self.rv += 1;
                    v["metadata"]["resourceVersion"] = json!(self.rv.to_string());
                    self.emit(kind, &ns, "DELETED", &v);
                }
            }
        }
        self.rv
    }

    fn emit(&mut self, kind: Kind, namespace: &str, ty: &str, object: &Value) {
        let line = line(ty, object);
        self.watches.retain(|w| {
            let matches = w.kind == kind && w.namespace.as_deref().is_none_or(|n| n == namespace);
            !matches || w.tx.send(Out::Line(line.clone())).is_ok()
        });
        self.history.push(Recorded {
            rv: self.rv,
            kind,
            namespace: namespace.to_owned(),
            line,
        });
    }

    /// Every open watch ends mid-stream.
    pub fn cut(&mut self) {
        for w in self.watches.drain(..) {
            let _ = w.tx.send(Out::Cut);
        }
    }

    /// Forgets every event so far.
    pub fn compact(&mut self) {
        self.oldest = self.rv;
        self.history.clear();
    }

    pub fn oldest(&self) -> u64 {
        self.oldest
    }

    /// A BOOKMARK with the current version to each watch that allows them.
    pub fn bookmark(&mut self) {
        let rv = self.rv.to_string();
        self.watches.retain(|w| {
            if !w.bookmarks {
                return !w.tx.is_closed();
            }
            let object = json!({"kind": w.kind.name(), "apiVersion": w.kind.api_version(),
                "metadata": {"resourceVersion": rv}});
            w.tx.send(Out::Line(line("BOOKMARK", &object))).is_ok()
        });
    }

    pub fn open_watches(&self) -> usize {
        self.watches.iter().filter(|w| !w.tx.is_closed()).count()
    }

    /// The objects of `kind` (in `namespace`), sorted by namespace and name, as a list's items
    /// are written: without `kind` and `apiVersion`.
    pub fn list(&self, kind: Kind, namespace: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((k, ns, _), _)| *k == kind && namespace.is_none_or(|n| n == ns))
            .map(|(_, v)| {
                let mut v = v.clone();
                if let Some(m) = v.as_object_mut() {
                    m.remove("kind");
                    m.remove("apiVersion");
                }
                v
            })
            .collect()
    }

    /// Opens a watch. `from: None` (no version, or `0`) starts with every current object as
    /// ADDED, as the API server does; `initial_events` (sendInitialEvents) does too and then
    /// marks their end with a bookmark. Otherwise the recorded events after `from` come
    /// first, or 410 Gone when they are forgotten.
    pub fn watch(
        &mut self,
        kind: Kind,
        namespace: Option<&str>,
        from: Option<u64>,
        bookmarks: bool,
        initial_events: bool,
    ) -> Result<(Vec<Bytes>, mpsc::UnboundedReceiver<Out>), Gone> {
        let in_ns = |ns: &str| namespace.is_none_or(|n| n == ns);
        let mut first = Vec::new();
        match from {
            Some(from) if !initial_events => {
                if from < self.oldest {
                    self.gone += 1;
                    return Err(Gone(format!(
                        "too old resource version: {from} ({})",
                        self.oldest
                    )));
                }
                first.extend(
                    self.history
                        .iter()
                        .filter(|e| e.rv > from && e.kind == kind && in_ns(&e.namespace))
                        .map(|e| e.line.clone()),
                );
            }
            _ => {
                for ((k, ns, _), v) in &self.objects {
                    if *k == kind && in_ns(ns) {
                        first.push(line("ADDED", v));
                    }
                }
                if initial_events {
                    let object = json!({"kind": kind.name(), "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": self.rv.to_string(),
                            "annotations": {"k8s.io/initial-events-end": "true"}}});
                    first.push(line("BOOKMARK", &object));
                }
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.watches.push(Watch {
            kind,
            namespace: namespace.map(ToOwned::to_owned),
            bookmarks,
            tx,
        });
        Ok((first, rx))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use k8s_openapi::api::core::v1::Service;

    use super::*;

    fn svc(name: &str) -> Service {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "default"}})).unwrap()
    }

    fn types(lines: &[Bytes]) -> Vec<String> {
        lines
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_slice(l).unwrap();
                format!(
                    "{} {}",
                    v["type"].as_str().unwrap(),
                    v["object"]["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or("-")
                )
            })
            .collect()
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Out>) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Ok(Out::Line(l)) = rx.try_recv() {
            out.push(l);
        }
        out
    }

    #[test]
    fn watches_replay_from_a_version_and_410_after_compaction() {
        let mut w = World::default();
        let mut c = Changes::default();
        c.apply(&svc("pay")).unwrap().apply(&svc("order")).unwrap();
        assert_eq!(w.commit(c), 2);
        let items = w.list(Kind::Service, Some("default"));
        assert_eq!(items.len(), 2);
        assert!(items[0].get("kind").is_none(), "list items carry no kind");
        let (first, mut rx) = w
            .watch(Kind::Service, None, Some(1), true, false)
            .ok()
            .unwrap();
        assert_eq!(types(&first), ["ADDED 2"]);
        let mut c = Changes::default();
        c.apply(&svc("pay"))
            .unwrap()
            .delete(Kind::Service, "default", "order");
        c.delete(Kind::Pod, "default", "none");
        assert_eq!(w.commit(c), 4, "deleting nothing takes no version");
        w.bookmark();
        assert_eq!(
            types(&drain(&mut rx)),
            ["MODIFIED 3", "DELETED 4", "BOOKMARK 4"]
        );
        w.compact();
        assert!(w.watch(Kind::Service, None, Some(3), false, false).is_err());
        assert_eq!(w.gone, 1);
        let (first, _rx) = w
            .watch(Kind::Service, None, Some(4), false, false)
            .ok()
            .unwrap();
        assert!(first.is_empty());
        let (first, _rx) = w
            .watch(Kind::Service, None, None, false, true)
            .ok()
            .unwrap();
        assert_eq!(types(&first), ["ADDED 3", "BOOKMARK 4"]);
        w.cut();
        assert!(matches!(rx.try_recv(), Ok(Out::Cut)));
        assert_eq!(w.open_watches(), 0);
    }
}
