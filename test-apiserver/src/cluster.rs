//! The simulated cluster: the object store, the knobs tests turn (token, RBAC, faults,
//! latency, controller mode) and the request log. Every clone is the same cluster.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, futures::Notified, watch};
use tokio::time::Instant;

use crate::autoscalers::{self, AutoscalerKind};
use crate::controller::ControllerMode;
use crate::faults::{Fault, Faults};
use crate::rbac::RbacRule;
use crate::requests::RecordedRequest;
use crate::store::{Key, Store};
use crate::workload::WorkloadKind;

/// A handle on the simulated cluster's state.
#[derive(Debug, Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Mutex<Store>,
    knobs: Mutex<Knobs>,
    requests: Mutex<Vec<RecordedRequest>>,
    wake: Notify,
    shutdown: watch::Sender<bool>,
}

/// Settings that shape how requests are answered.
#[derive(Debug, Clone)]
pub(crate) struct Knobs {
    pub token: String,
    pub rbac: Option<Vec<RbacRule>>,
    pub faults: Faults,
    pub latency: Duration,
    /// Delay after a changing request was carried out, before its answer is sent.
    pub answer_delay: Duration,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Cluster {
    /// An empty cluster that accepts `token` and runs the controller in `mode`.
    pub fn new(token: &str, mode: ControllerMode) -> Self {
        Self {
            inner: Arc::new(Inner {
                store: Mutex::new(Store::new(mode)),
                knobs: Mutex::new(Knobs {
                    token: token.to_owned(),
                    rbac: None,
                    faults: Faults::default(),
                    latency: Duration::ZERO,
                    answer_delay: Duration::ZERO,
                }),
                requests: Mutex::new(Vec::new()),
                wake: Notify::new(),
                shutdown: watch::channel(false).0,
            }),
        }
    }

    /// Creates a Deployment with `replicas` ready replicas (or resets an existing one to that).
    pub fn add_deployment(&self, namespace: &str, name: &str, replicas: i32) {
        self.add_workload(WorkloadKind::Deployment, namespace, name, replicas);
    }

    /// Creates a StatefulSet with `replicas` ready replicas (or resets an existing one to that).
    pub fn add_statefulset(&self, namespace: &str, name: &str, replicas: i32) {
        self.add_workload(WorkloadKind::StatefulSet, namespace, name, replicas);
    }

    /// Creates a workload of `kind` with `replicas` ready replicas (or resets one to that).
    pub fn add_workload(&self, kind: WorkloadKind, namespace: &str, name: &str, replicas: i32) {
        self.store().upsert(&Key::new(kind, namespace, name), replicas);
    }

    /// Creates an autoscaling/v2 HorizontalPodAutoscaler `name` in `namespace` that scales the
    /// workload `target` between `min` and `max` replicas (currently `current`).
    pub fn add_hpa(&self, namespace: &str, name: &str, target: (WorkloadKind, &str), min: i32, max: i32, current: i32) {
        let (spec, status) = autoscalers::hpa(target, min, max, current);
        self.store().put_autoscaler(AutoscalerKind::Hpa, namespace, name, spec, status);
    }

    /// Creates a KEDA ScaledObject `name` in `namespace` that scales the Deployment `target`
    /// between `min` and `max` replicas.
    pub fn add_scaled_object(&self, namespace: &str, name: &str, target: &str, min: i32, max: i32) {
        let (spec, status) = autoscalers::scaled_object(target, min, max);
        self.store().put_autoscaler(AutoscalerKind::ScaledObject, namespace, name, spec, status);
    }

    /// An HPA or ScaledObject as a GET would return it.
    pub fn autoscaler(&self, kind: AutoscalerKind, namespace: &str, name: &str) -> Option<serde_json::Value> {
        self.store().autoscaler(kind, namespace, name).cloned()
    }

    /// Deletes a workload, which watchers see as DELETED; false if it did not exist.
    pub fn remove_workload(&self, kind: WorkloadKind, namespace: &str, name: &str) -> bool {
        self.store().remove(&Key::new(kind, namespace, name))
    }

    /// Sets how pods behave for replica changes from now on.
    pub fn set_controller(&self, mode: ControllerMode) {
        self.store().mode = mode;
    }

    /// The controller mode new replica changes get.
    pub fn controller(&self) -> ControllerMode {
        self.store().mode
    }

    /// Replaces the RBAC table; `None` allows everything.
    pub fn set_rbac(&self, rules: Option<Vec<RbacRule>>) {
        self.knobs().rbac = rules;
    }

    /// Changes the bearer token the server accepts, so clients holding the old one get 401.
    pub fn set_token(&self, token: &str) {
        token.clone_into(&mut self.knobs().token);
    }

    /// The bearer token the server accepts.
    pub fn token(&self) -> String {
        self.knobs().token.clone()
    }

    /// Queues a fault behind any already queued.
    pub fn inject_fault(&self, fault: Fault) {
        self.knobs().faults.push(fault);
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        self.knobs().faults.clear();
    }

    /// Delays every API response by `latency` (zero to stop).
    pub fn set_latency(&self, latency: Duration) {
        self.knobs().latency = latency;
    }

    /// Delays answers to changing requests (PATCH, PUT, POST, DELETE) by `delay` after they
    /// were carried out: a client that gives up meanwhile still changed the cluster.
    pub fn set_answer_delay(&self, delay: Duration) {
        self.knobs().answer_delay = delay;
    }

    /// Every API request so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.inner.requests).clone()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        lock(&self.inner.requests).clear();
    }

    /// Every events.k8s.io Event created so far, oldest first.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.store().recorded_events()
    }

    /// `(spec.replicas, status.readyReplicas)` of a workload.
    pub fn replicas(&self, kind: WorkloadKind, namespace: &str, name: &str) -> Option<(i32, i32)> {
        self.store().get(&Key::new(kind, namespace, name)).map(|o| (o.spec_replicas(), o.ready_replicas()))
    }

    /// `metadata.annotations` of a workload (empty when it has none).
    pub fn annotations(&self, kind: WorkloadKind, namespace: &str, name: &str) -> Option<BTreeMap<String, String>> {
        self.store().get(&Key::new(kind, namespace, name)).map(|o| o.meta().annotations.clone().unwrap_or_default())
    }

    /// The workload as a GET would return it.
    pub fn object(&self, kind: WorkloadKind, namespace: &str, name: &str) -> Option<serde_json::Value> {
        self.store().get(&Key::new(kind, namespace, name)).map(|o| o.to_value())
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.store().resource_version()
    }

    /// Forgets the watch history: a watch from any earlier resourceVersion gets 410 Expired.
    pub fn compact_watch_history(&self) {
        self.store().compact();
    }

    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.inner.store)
    }

    pub(crate) fn knobs(&self) -> MutexGuard<'_, Knobs> {
        lock(&self.inner.knobs)
    }

    pub(crate) fn record(&self, request: RecordedRequest) {
        lock(&self.inner.requests).push(request);
    }

    /// Tells the controller a spec changed.
    pub(crate) fn wake_controller(&self) {
        self.inner.wake.notify_one();
    }

    pub(crate) fn controller_wakeup(&self) -> Notified<'_> {
        self.inner.wake.notified()
    }

    pub(crate) fn reconcile(&self, now: Instant) -> Option<Instant> {
        self.store().reconcile(now)
    }

    /// The controller of this cluster, for the caller to run: it moves rollouts on until the
    /// cluster shuts down ([`crate::TestApiServer`] runs its own; an in-process cluster needs it).
    pub fn run_controller(&self) -> impl Future<Output = ()> + Send + 'static {
        crate::controller::run(self.clone())
    }

    /// Resolves once the server shuts down; open watches and the controller end then.
    pub(crate) fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut signal = self.inner.shutdown.subscribe();
        async move {
            let _ = signal.wait_for(|stop| *stop).await.map(|_| ());
        }
    }

    pub(crate) fn stop(&self) {
        self.inner.shutdown.send_replace(true);
    }
}
