//! The object store: workloads by kind, namespace and name, one global resourceVersion
//! counter, the watch event history, and the single write path every update goes through.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::autoscalers::AutoscalerKind;
use crate::controller::{self, ControllerMode, Observed, Rollout};
use crate::patch;
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::Status;
use crate::workload::{Created, Workload, WorkloadKind};

/// How many watch events are kept for watches that resume from a resourceVersion.
const HISTORY: usize = 10_000;

/// Where a stored object lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub(crate) fn new(kind: WorkloadKind, namespace: &str, name: &str) -> Self {
        Self { kind, namespace: namespace.to_owned(), name: name.to_owned() }
    }
}

/// A stored object and the rollout the controller is still working on.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub object: Workload,
    pub rollout: Option<Rollout>,
}

/// The `type` of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, as every watcher sees it.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub resource_version: u64,
    pub key: Key,
    pub type_: EventType,
    pub labels: BTreeMap<String, String>,
    pub object: Workload,
}

/// Which objects a list or watch wants.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    pub namespace: Option<String>,
    pub fields: FieldSelector,
    pub labels: LabelSelector,
}

impl Filter {
    pub(crate) fn matches(&self, key: &Key, labels: &BTreeMap<String, String>) -> bool {
        self.namespace.as_ref().is_none_or(|ns| *ns == key.namespace)
            && self.fields.matches(&key.namespace, &key.name)
            && self.labels.matches(labels)
    }
}

/// How a write records itself in `managedFields`, and whether it is a dry run.
#[derive(Debug, Clone)]
pub(crate) struct Write<'a> {
    pub manager: &'a str,
    pub subresource: Option<&'static str>,
    pub fields: Value,
    pub dry_run: bool,
}

/// Where a watch starts.
pub(crate) enum WatchStart {
    /// Synthetic ADDED events for what exists at `resource_version`, then changes.
    Now { events: Vec<Arc<Event>>, resource_version: u64 },
    /// Changes after a resourceVersion, replayed from history.
    Replay(Vec<Arc<Event>>),
    /// The resourceVersion was compacted away: (requested, oldest kept).
    Expired(u64, u64),
}

/// All objects and their history.
#[derive(Debug)]
pub(crate) struct Store {
    resource_version: u64,
    objects: BTreeMap<Key, Entry>,
    history: VecDeque<Arc<Event>>,
    oldest: u64,
    events: broadcast::Sender<Arc<Event>>,
    seed: u64,
    pub mode: ControllerMode,
    /// events.k8s.io Events, as created.
    recorded: Vec<Value>,
    /// HPAs and ScaledObjects by kind, namespace and name, as a GET returns them.
    autoscalers: BTreeMap<(AutoscalerKind, String, String), Value>,
}

impl Store {
    pub(crate) fn new(mode: ControllerMode) -> Self {
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Self {
            resource_version: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            oldest: 0,
            events: broadcast::channel(1024).0,
            seed,
            mode,
            recorded: Vec::new(),
            autoscalers: BTreeMap::new(),
        }
    }

    /// The current global resourceVersion.
    pub(crate) fn resource_version(&self) -> u64 {
        self.resource_version
    }

    /// A random-looking version 4 UID.
    fn next_uid(&mut self) -> String {
        let mut next = || {
            self.seed = self.seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let (a, b) = (next(), next());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        )
    }

    /// Stores an Event created in `namespace`, with the metadata the server gives it; `None`
    /// if one of that name exists.
    pub(crate) fn create_event(&mut self, namespace: &str, mut event: Value) -> Option<Value> {
        let name = event["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let taken =
            self.recorded.iter().any(|e| e["metadata"]["namespace"] == namespace && e["metadata"]["name"] == name);
        if taken {
            return None;
        }
        self.resource_version += 1;
        let uid = self.next_uid();
        let meta = &mut event["metadata"];
        meta["namespace"] = namespace.into();
        meta["uid"] = uid.into();
        meta["resourceVersion"] = self.resource_version.to_string().into();
        meta["creationTimestamp"] = now().to_string().into();
        self.recorded.push(event.clone());
        Some(event)
    }

    /// Every Event created so far, oldest first.
    pub(crate) fn recorded_events(&self) -> Vec<Value> {
        self.recorded.clone()
    }

    /// Creates (or replaces) an autoscaler object with `spec` and `status`.
    pub(crate) fn put_autoscaler(
        &mut self,
        kind: AutoscalerKind,
        namespace: &str,
        name: &str,
        spec: Value,
        status: Value,
    ) {
        self.resource_version += 1;
        let object = serde_json::json!({
            "kind": kind.kind(),
            "apiVersion": kind.api_version(),
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": self.next_uid(),
                "resourceVersion": self.resource_version.to_string(),
                "generation": 1,
                "creationTimestamp": now().to_string(),
            },
            "spec": spec,
            "status": status,
        });
        self.autoscalers.insert((kind, namespace.to_owned(), name.to_owned()), object);
    }

    /// An autoscaler object, as a GET returns it.
    pub(crate) fn autoscaler(&self, kind: AutoscalerKind, namespace: &str, name: &str) -> Option<&Value> {
        self.autoscalers.get(&(kind, namespace.to_owned(), name.to_owned()))
    }

    /// The autoscaler objects of `kind` in `namespace`, sorted by name.
    pub(crate) fn autoscalers(&self, kind: AutoscalerKind, namespace: &str) -> Vec<&Value> {
        self.autoscalers.iter().filter(|((k, ns, _), _)| *k == kind && ns == namespace).map(|(_, v)| v).collect()
    }

    /// Replaces an autoscaler object by `candidate`, keeping the fields the server owns: a
    /// write that changes nothing keeps its resourceVersion, a spec change bumps `generation`.
    pub(crate) fn write_autoscaler(
        &mut self,
        kind: AutoscalerKind,
        namespace: &str,
        name: &str,
        mut candidate: Value,
    ) -> Result<Value, Status> {
        let key = (kind, namespace.to_owned(), name.to_owned());
        let current = self.autoscalers.get(&key).ok_or_else(|| Status::not_found(kind.group_resource(), name))?;
        for field in ["name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp"] {
            candidate["metadata"][field] = current["metadata"][field].clone();
        }
        candidate["kind"] = current["kind"].clone();
        candidate["apiVersion"] = current["apiVersion"].clone();
        candidate["status"] = current["status"].clone();
        if candidate == *current {
            return Ok(candidate);
        }
        if candidate["spec"] != current["spec"] {
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            candidate["metadata"]["generation"] = generation.into();
        }
        self.resource_version += 1;
        candidate["metadata"]["resourceVersion"] = self.resource_version.to_string().into();
        self.autoscalers.insert(key, candidate.clone());
        Ok(candidate)
    }

    pub(crate) fn get(&self, key: &Key) -> Option<&Workload> {
        self.objects.get(key).map(|e| &e.object)
    }

    /// Creates a settled workload, or resets an existing one to `replicas` ready replicas.
    pub(crate) fn upsert(&mut self, key: &Key, replicas: i32) {
        let now = now();
        if let Some(entry) = self.objects.get_mut(key) {
            let object = &mut entry.object;
            if object.spec_replicas() != replicas {
                object.set_spec_replicas(replicas);
                let generation = object.generation() + 1;
                object.meta_mut().generation = Some(generation);
            }
            let settled = Observed::settled(object);
            controller::apply(object, &settled, now);
            entry.rollout = None;
            self.commit(key, EventType::Modified);
            return;
        }
        let uid = self.next_uid();
        let mut object =
            Workload::new(key.kind, Created { namespace: &key.namespace, name: &key.name, replicas, uid, now });
        let settled = Observed::settled(&object);
        controller::apply(&mut object, &settled, now);
        self.objects.insert(key.clone(), Entry { object, rollout: None });
        self.commit(key, EventType::Added);
    }

    /// Deletes an object; false if there was none.
    pub(crate) fn remove(&mut self, key: &Key) -> bool {
        if !self.objects.contains_key(key) {
            return false;
        }
        self.commit(key, EventType::Deleted);
        self.objects.remove(key);
        true
    }

    /// The one write path: keeps server-owned fields, validates, bumps `generation` when the
    /// spec changes, skips no-op writes (no new resourceVersion, no event) and starts a rollout.
    pub(crate) fn write(&mut self, key: &Key, mut candidate: Workload, write: Write<'_>) -> Result<Workload, Status> {
        let not_found = || Status::not_found(key.kind.group_resource(), &key.name);
        let current = self.get(key).ok_or_else(not_found)?.clone();
        {
            let (meta, old) = (candidate.meta_mut(), current.meta());
            meta.name.clone_from(&old.name);
            meta.namespace.clone_from(&old.namespace);
            meta.uid.clone_from(&old.uid);
            meta.creation_timestamp.clone_from(&old.creation_timestamp);
            meta.generation = old.generation;
            meta.resource_version.clone_from(&old.resource_version);
            meta.managed_fields.clone_from(&old.managed_fields);
        }
        candidate.take_status(&current);
        candidate.default_fields();
        let replicas = candidate.spec_replicas();
        if replicas < 0 {
            return Err(Status::invalid_replicas("apps", key.kind.kind(), &key.name, replicas.into()));
        }
        if candidate == current {
            return Ok(current);
        }
        let spec_changed = candidate.spec_value() != current.spec_value();
        if spec_changed {
            candidate.meta_mut().generation = Some(current.generation() + 1);
        }
        record_manager(&mut candidate, &write, now());
        if write.dry_run {
            return Ok(candidate);
        }
        let entry = self.objects.get_mut(key).ok_or_else(not_found)?;
        entry.object = candidate;
        if spec_changed {
            entry.rollout = Some(Rollout::start(&entry.object, self.mode, Instant::now()));
        }
        self.commit(key, EventType::Modified);
        self.get(key).cloned().ok_or_else(not_found)
    }

    /// Objects of `kind` that `filter` selects, sorted by namespace and name as etcd lists them.
    pub(crate) fn list(&self, kind: WorkloadKind, filter: &Filter) -> Vec<&Workload> {
        self.objects
            .iter()
            .filter(|(k, e)| k.kind == kind && filter.matches(k, &e.object.labels()))
            .map(|(_, e)| &e.object)
            .collect()
    }

    /// Where a watch from `resource_version` (None: from now) begins, and its live feed.
    pub(crate) fn watch(
        &self,
        kind: WorkloadKind,
        filter: &Filter,
        resource_version: Option<u64>,
    ) -> (WatchStart, broadcast::Receiver<Arc<Event>>) {
        let receiver = self.events.subscribe();
        let start = match resource_version {
            None => WatchStart::Now {
                resource_version: self.resource_version,
                events: self
                    .objects
                    .iter()
                    .filter(|(k, e)| k.kind == kind && filter.matches(k, &e.object.labels()))
                    .map(|(k, e)| {
                        Arc::new(Event {
                            resource_version: self.resource_version,
                            key: k.clone(),
                            type_: EventType::Added,
                            labels: e.object.labels(),
                            object: e.object.clone(),
                        })
                    })
                    .collect(),
            },
            Some(rv) if rv < self.oldest => WatchStart::Expired(rv, self.oldest),
            Some(rv) => WatchStart::Replay(self.history.iter().filter(|e| e.resource_version > rv).cloned().collect()),
        };
        (start, receiver)
    }

    /// Forgets the watch history, so any older resourceVersion gets 410 Expired.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.oldest = self.resource_version;
    }

    /// Advances every rollout to `now`; returns when the next one is due.
    pub(crate) fn reconcile(&mut self, now: Instant) -> Option<Instant> {
        let wall = self::now();
        let due: Vec<Key> = self.objects.iter().filter(|(_, e)| e.rollout.is_some()).map(|(k, _)| k.clone()).collect();
        let mut next: Option<Instant> = None;
        for key in due {
            let Some(entry) = self.objects.get_mut(&key) else {
                continue;
            };
            let Some(rollout) = entry.rollout.clone() else {
                continue;
            };
            let elapsed = now.saturating_duration_since(rollout.started);
            let progress = controller::progress(key.kind, &rollout, elapsed);
            let before = entry.object.clone();
            controller::apply(&mut entry.object, &Observed::of(&rollout, &progress), wall);
            match progress.next {
                Some(after) => {
                    let at = rollout.started + after;
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
                None => entry.rollout = None,
            }
            if entry.object != before {
                self.commit(&key, EventType::Modified);
            }
        }
        next
    }

    /// Bumps the resourceVersion onto the object and tells every watcher.
    fn commit(&mut self, key: &Key, type_: EventType) {
        self.resource_version += 1;
        let rv = self.resource_version;
        let Some(entry) = self.objects.get_mut(key) else {
            return;
        };
        entry.object.meta_mut().resource_version = Some(rv.to_string());
        let event = Arc::new(Event {
            resource_version: rv,
            key: key.clone(),
            type_,
            labels: entry.object.labels(),
            object: entry.object.clone(),
        });
        if self.history.len() >= HISTORY
            && let Some(dropped) = self.history.pop_front()
        {
            self.oldest = dropped.resource_version;
        }
        self.history.push_back(Arc::clone(&event));
        let _ = self.events.send(event);
    }
}

/// Wall-clock time at the one-second precision the API serialises.
pub(crate) fn now() -> Timestamp {
    let seconds = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Timestamp::from_second(i64::try_from(seconds).unwrap_or_default()).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Adds or extends `manager`'s `Update` entry in `managedFields`. As in the real server, an
/// update takes the fields it writes over from every other manager, whose emptied entries go.
fn record_manager(object: &mut Workload, write: &Write<'_>, now: Timestamp) {
    let entries = object.meta_mut().managed_fields.get_or_insert_default();
    for other in entries.iter_mut().filter(|e| e.manager.as_deref() != Some(write.manager)) {
        if let Some(fields) = other.fields_v1.as_mut() {
            patch::subtract(&mut fields.0, &write.fields);
        }
    }
    entries.retain(|e| e.fields_v1.as_ref().is_none_or(|f| f.0.as_object().is_none_or(|o| !o.is_empty())));
    let subresource = write.subresource.map(str::to_owned);
    let existing = entries.iter_mut().find(|e| {
        e.manager.as_deref() == Some(write.manager)
            && e.operation.as_deref() == Some("Update")
            && e.subresource == subresource
    });
    match existing {
        Some(entry) => {
            let fields = entry.fields_v1.get_or_insert(FieldsV1(Value::Null));
            patch::union(&mut fields.0, &write.fields);
            entry.time = Some(Time(now));
        }
        None => entries.push(ManagedFieldsEntry {
            api_version: Some("apps/v1".to_owned()),
            fields_type: Some("FieldsV1".to_owned()),
            fields_v1: Some(FieldsV1(write.fields.clone())),
            manager: Some(write.manager.to_owned()),
            operation: Some("Update".to_owned()),
            subresource,
            time: Some(Time(now)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store_with_web() -> (Store, Key) {
        let mut store = Store::new(ControllerMode::default());
        let key = Key::new(WorkloadKind::Deployment, "apps", "web");
        store.upsert(&key, 1);
        (store, key)
    }

    fn write(manager: &str) -> Write<'_> {
        Write { manager, subresource: None, fields: json!({"f:spec": {"f:replicas": {}}}), dry_run: false }
    }

    #[test]
    fn a_spec_change_bumps_resource_version_and_generation() {
        let (mut store, key) = store_with_web();
        let mut candidate = store.get(&key).unwrap().clone();
        candidate.set_spec_replicas(2);
        let written = store.write(&key, candidate, write("test")).unwrap();
        assert_eq!(written.meta().resource_version.as_deref(), Some("2"));
        assert_eq!(written.generation(), 2);
    }

    #[test]
    fn an_identical_write_is_a_no_op_without_a_new_resource_version() {
        let (mut store, key) = store_with_web();
        let candidate = store.get(&key).unwrap().clone();
        let written = store.write(&key, candidate, write("test")).unwrap();
        assert_eq!(written.meta().resource_version.as_deref(), Some("1"));
        assert_eq!(store.resource_version(), 1);
    }

    #[test]
    fn a_dry_run_changes_nothing() {
        let (mut store, key) = store_with_web();
        let mut candidate = store.get(&key).unwrap().clone();
        candidate.set_spec_replicas(5);
        let dry = Write { dry_run: true, ..write("test") };
        assert_eq!(store.write(&key, candidate, dry).unwrap().spec_replicas(), 5);
        assert_eq!(store.get(&key).unwrap().spec_replicas(), 1);
    }

    #[test]
    fn a_watch_from_a_compacted_version_is_expired() {
        let (mut store, key) = store_with_web();
        store.upsert(&key, 2);
        store.compact();
        let (start, _) = store.watch(WorkloadKind::Deployment, &Filter::default(), Some(1));
        assert!(matches!(start, WatchStart::Expired(1, 2)));
    }

    #[test]
    fn managed_fields_record_the_field_manager() {
        let (mut store, key) = store_with_web();
        let mut candidate = store.get(&key).unwrap().clone();
        candidate.set_spec_replicas(3);
        let written = store.write(&key, candidate, write("matrix-k8s-toggle")).unwrap();
        let entries = written.meta().managed_fields.clone().unwrap();
        assert_eq!(entries[0].manager.as_deref(), Some("matrix-k8s-toggle"));
    }

    #[test]
    fn the_last_writer_of_a_field_owns_it_alone() {
        let (mut store, key) = store_with_web();
        for (manager, replicas) in [("matrix-k8s-toggle", 3), ("argocd-application-controller", 1)] {
            let mut candidate = store.get(&key).unwrap().clone();
            candidate.set_spec_replicas(replicas);
            store.write(&key, candidate, write(manager)).unwrap();
        }
        let entries = store.get(&key).unwrap().meta().managed_fields.clone().unwrap();
        let owners: Vec<_> = entries.iter().filter_map(|e| e.manager.as_deref()).collect();
        assert!(owners.contains(&"argocd-application-controller"), "{owners:?}");
        assert!(!owners.contains(&"matrix-k8s-toggle"), "the bridge's emptied entry went: {owners:?}");
    }
}
