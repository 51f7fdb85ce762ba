//! The cluster's Services, EndpointSlices and Pods as the watchers last
//! reported them, and which mesh services each watch event touched.
//!
//! A watch restart (a 410 Gone, a dropped connection, the first start)
//! arrives as `Init`, the whole list as `InitApply`s, then `InitDone`: the
//! list is buffered and swapped in at `InitDone`, and every object that
//! differs between the old and the new contents — added, changed, or gone
//! because the list no longer has it — counts as touched. So a change made
//! while a watch was down is found by the relist, and one the relist repeats
//! touches nothing.
//!
//! Pure data: events in, service keys out; [`super::cluster`] does the I/O.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;
use kube::ResourceExt as _;

use super::translate::{self, Pods, SERVICE_NAME_LABEL};
use super::Discovered;
use crate::config::ServiceKey;

/// `(namespace, name)` of a namespaced object.
pub type Name = (String, String);

fn name_of<K: kube::Resource>(o: &K) -> Name {
    (o.namespace().unwrap_or_default(), o.name_any())
}

/// An object that changed: as it was (`None`: new) and as it is (`None`: gone).
pub type Touched<K> = (Option<Arc<K>>, Option<Arc<K>>);

/// The objects of one kind, with relists applied atomically.
pub struct Store<K> {
    objects: HashMap<Name, Arc<K>>,
    relist: Option<HashMap<Name, Arc<K>>>,
    /// Set at the first `InitDone`: the store holds a complete list.
    listed: bool,
    /// Relists after the first: watch restarts.
    pub restarts: u64,
}

impl<K> Default for Store<K> {
    fn default() -> Self {
        Store {
            objects: HashMap::new(),
            relist: None,
            listed: false,
            restarts: 0,
        }
    }
}

impl<K: kube::Resource + PartialEq> Store<K> {
    /// Applies one watcher event; returns the objects it changed.
    pub fn apply(&mut self, event: Event<K>) -> Vec<Touched<K>> {
        match event {
            Event::Init => {
                if self.listed {
                    self.restarts += 1;
                }
                self.relist = Some(HashMap::new());
                Vec::new()
            }
            Event::InitApply(o) => {
                let name = name_of(&o);
                self.relist
                    .get_or_insert_with(HashMap::new)
                    .insert(name, Arc::new(o));
                Vec::new()
            }
            Event::InitDone => {
                let new = self.relist.take().unwrap_or_default();
                let old = std::mem::replace(&mut self.objects, new);
                self.listed = true;
                let mut touched = Vec::new();
                for (name, was) in &old {
                    match self.objects.get(name) {
                        Some(now) if now == was => {}
                        now => touched.push((Some(Arc::clone(was)), now.cloned())),
                    }
                }
                for (name, now) in &self.objects {
                    if !old.contains_key(name) {
                        touched.push((None, Some(Arc::clone(now))));
                    }
                }
                touched
            }
            Event::Apply(o) => {
                let now = Arc::new(o);
                match self.objects.insert(name_of(&*now), Arc::clone(&now)) {
                    Some(was) if was == now => Vec::new(),
                    was => vec![(was, Some(now))],
                }
            }
            Event::Delete(o) => match self.objects.remove(&name_of(&o)) {
                Some(was) => vec![(Some(was), None)],
                None => Vec::new(),
            },
        }
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&Arc<K>> {
        self.objects.get(&(namespace.to_owned(), name.to_owned()))
    }

    pub fn listed(&self) -> bool {
        self.listed
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &Name> {
        self.objects.keys()
    }
}

impl Pods for Store<Pod> {
    fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.get(namespace, name).map(|p| &**p)
    }
}

/// The three stores and the indexes from slices and pods to services.
#[derive(Default)]
pub struct Cache {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub pods: Store<Pod>,
    /// The slices of each service (by their `kubernetes.io/service-name` label).
    slices_of: HashMap<ServiceKey, BTreeSet<Name>>,
    /// The slices whose endpoints name each pod.
    pod_slices: HashMap<Name, BTreeSet<Name>>,
}

impl Cache {
    pub fn on_service(&mut self, event: Event<Service>) -> BTreeSet<ServiceKey> {
        let mut keys = BTreeSet::new();
        for (was, now) in self.services.apply(event) {
            for o in was.iter().chain(now.iter()) {
                let (namespace, name) = name_of(&**o);
                keys.insert(ServiceKey::new(namespace, name));
            }
        }
        keys
    }

    pub fn on_slice(&mut self, event: Event<EndpointSlice>) -> BTreeSet<ServiceKey> {
        let mut keys = BTreeSet::new();
        for (was, now) in self.slices.apply(event) {
            if let Some(was) = was {
                keys.extend(self.index_slice(&was, false));
            }
            if let Some(now) = now {
                keys.extend(self.index_slice(&now, true));
            }
        }
        keys
    }

    pub fn on_pod(&mut self, event: Event<Pod>) -> BTreeSet<ServiceKey> {
        let mut keys = BTreeSet::new();
        for (was, now) in self.pods.apply(event) {
            let Some(o) = now.or(was) else { continue };
            for slice in self.pod_slices.get(&name_of(&*o)).into_iter().flatten() {
                if let Some(key) = self
                    .slices
                    .get(&slice.0, &slice.1)
                    .and_then(|s| service_of(s))
                {
                    keys.insert(key);
                }
            }
        }
        keys
    }

    /// Adds (or removes) a slice in the indexes; returns its service.
    fn index_slice(&mut self, slice: &EndpointSlice, add: bool) -> Option<ServiceKey> {
        let name = name_of(slice);
        let pods = slice.endpoints.iter().filter_map(|e| {
            let r = e.target_ref.as_ref()?;
            if r.kind.as_deref().is_some_and(|k| k != "Pod") {
                return None;
            }
            Some((
                r.namespace.clone().unwrap_or_else(|| name.0.clone()),
                r.name.clone()?,
            ))
        });
        for pod in pods {
            let set = self.pod_slices.entry(pod.clone()).or_default();
            if add {
                set.insert(name.clone());
            } else {
                set.remove(&name);
                if set.is_empty() {
                    self.pod_slices.remove(&pod);
                }
            }
        }
        let key = service_of(slice)?;
        let set = self.slices_of.entry(key.clone()).or_default();
        if add {
            set.insert(name);
        } else {
            set.remove(&name);
            if set.is_empty() {
                self.slices_of.remove(&key);
            }
        }
        Some(key)
    }

    /// Whether every store holds a complete list (before that, a service may
    /// look endpointless only because its slices have not arrived).
    pub fn ready(&self) -> bool {
        self.services.listed() && self.slices.listed() && self.pods.listed()
    }

    /// Every service the cluster has.
    pub fn keys(&self) -> BTreeSet<ServiceKey> {
        self.services
            .names()
            .map(|(ns, name)| ServiceKey::new(ns, name))
            .collect()
    }

    /// `key` as the mesh should see it, or `None` when it is no mesh service.
    pub fn discovered(&self, key: &ServiceKey, trust_domain: &str) -> Option<Discovered> {
        let service = self.services.get(&key.namespace, &key.name)?;
        let slices: Vec<&EndpointSlice> = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|(ns, name)| self.slices.get(ns, name).map(|s| &**s))
            .collect();
        translate::service(service, &slices, &self.pods, trust_domain)
    }
}

/// The service a slice belongs to.
fn service_of(slice: &EndpointSlice) -> Option<ServiceKey> {
    let service = slice.labels().get(SERVICE_NAME_LABEL)?;
    Some(ServiceKey::new(
        slice.namespace().unwrap_or_default(),
        service,
    ))
}

#[cfg(test)]
mod tests;
