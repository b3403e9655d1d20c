//! Kubernetes, through kube-rs: scale a workload through its `/scale` subresource (JSON merge
//! patch), restore its replica count after a stop (kept by a [`ReplicaMemory`]), read its
//! state, watch a rollout, and turn API errors into messages a person can act on.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use k8s_openapi::api::{
    apps::v1::{Deployment, StatefulSet},
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
    autoscaling::v2::HorizontalPodAutoscaler,
    core::v1::ObjectReference,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        watcher,
    },
};
use serde_json::json;

use crate::config::{Autoscaler, Target, WorkloadKind};

/// The field manager our patches are recorded under.
pub const FIELD_MANAGER: &str = "matrix-k8s-toggle";

/// Annotation in which earlier versions kept the replica count a workload had before it was
/// stopped. Read (never written) when the bridge's own state has no count for the workload.
pub const REMEMBERED_REPLICAS: &str = "matrix-k8s-toggle/replicas-before-stop";

/// Where the replica count to restore is kept across a stop: the bridge's own state, so the
/// bridge needs no write access to the workload object itself.
pub trait ReplicaMemory: Send + Sync {
    /// The count `t` had before it was last stopped, if one is known.
    fn recall(&self, t: &Target) -> Result<Option<i32>, String>;
    /// Keeps `replicas` as the count to restore for `t`.
    fn remember(&self, t: &Target, replicas: i32) -> Result<(), String>;
}

/// What went wrong talking to Kubernetes, phrased for the person who must act.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScaleError {
    /// The ServiceAccount lacks a permission.
    #[error(
        "the bridge's ServiceAccount may not {verb} {resource} in namespace {namespace}: grant `{verb}` on `{resource}`{names} in its Role",
        names = name.as_ref().map(|n| format!(" (resourceNames: [{n}])")).unwrap_or_default()
    )]
    Forbidden {
        /// The verb.
        verb: &'static str,
        /// The resource (with subresource).
        resource: String,
        /// The namespace.
        namespace: String,
        /// The object's name, where the permission can be limited to one.
        name: Option<String>,
    },
    /// The KEDA ScaledObject named for the target does not exist.
    #[error(
        "KEDA ScaledObject {namespace}/{name} does not exist: check the target's `scaled_object` (or remove `autoscaler: keda`); nothing was changed"
    )]
    NoScaledObject {
        /// The namespace.
        namespace: String,
        /// The ScaledObject's name.
        name: String,
    },
    /// The workload does not exist.
    #[error("{kind} {namespace}/{name} does not exist: check the target's namespace and workload name")]
    NotFound {
        /// The workload kind.
        kind: WorkloadKind,
        /// The namespace.
        namespace: String,
        /// The name.
        name: String,
    },
    /// The API server refused our credentials.
    #[error("the Kubernetes API refused the bridge's credentials (401): check its ServiceAccount token or kubeconfig")]
    Unauthorized,
    /// The request was invalid.
    #[error("Kubernetes refused the change: {0}")]
    Invalid(String),
    /// Still failing after retries (429, 5xx, timeouts, unreachable).
    #[error("the Kubernetes API is unavailable ({0}); tried {1} times, try again later")]
    Unavailable(String, u32),
    /// Anything else.
    #[error("Kubernetes error: {0}")]
    Other(String),
    /// The count to restore could not be kept; nothing was scaled.
    #[error("could not keep the replica count to restore ({0}); nothing was changed")]
    Memory(String),
    /// No client could be configured.
    #[error("no Kubernetes configuration: {0}; run in a pod with a ServiceAccount or set KUBECONFIG")]
    Config(String),
}

/// The state of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Scaled to zero, nothing running.
    Off,
    /// Scaled up, not all replicas ready yet.
    Starting,
    /// All replicas up.
    Running,
    /// Scaled to zero, pods still terminating.
    Stopping,
    /// The rollout missed its progress deadline.
    Degraded,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Off => "off",
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Degraded => "degraded",
        })
    }
}

/// A workload's state and replica counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadStatus {
    /// The state.
    pub state: State,
    /// `spec.replicas`.
    pub desired: i32,
    /// `status.replicas` (pods that exist).
    pub current: i32,
    /// Ready replicas.
    pub ready: i32,
    /// Available replicas.
    pub available: i32,
    /// Replicas of the current revision.
    pub updated: i32,
    /// Why it is not up, from the workload's conditions.
    pub message: Option<String>,
}

/// What a start or stop changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Scaled from one count to another.
    Scaled {
        /// Replicas before.
        from: i32,
        /// Replicas now.
        to: i32,
    },
    /// Already at the wanted count; nothing was sent.
    Unchanged {
        /// The count.
        replicas: i32,
    },
}

/// How often and how patiently to retry transient failures.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all.
    pub attempts: u32,
    /// First delay; doubled each time, capped at 5 s.
    pub first_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 6, first_delay: Duration::from_millis(250) }
    }
}

/// The KEDA annotation that holds a ScaledObject at a replica count while it is set.
pub const KEDA_PAUSED_REPLICAS: &str = "autoscaling.keda.sh/paused-replicas";

/// What an autoscaler beside the bridge is doing, as read from its object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoscalerState {
    /// A HorizontalPodAutoscaler targets the workload.
    Hpa {
        /// Its name.
        name: String,
        /// `spec.minReplicas` (1 when omitted).
        min: i32,
        /// `spec.maxReplicas`.
        max: i32,
    },
    /// No HorizontalPodAutoscaler in the namespace targets the workload.
    NoHpa,
    /// The KEDA ScaledObject of the target.
    Keda {
        /// Its name.
        name: String,
        /// `spec.minReplicaCount` (0 when omitted).
        min: i32,
        /// `spec.maxReplicaCount` (100 when omitted).
        max: i32,
        /// The count it is paused at, if the annotation is set.
        paused: Option<String>,
    },
}

/// What a request is about, for the error a person reads when it fails.
#[derive(Debug, Clone, Copy)]
enum Subject<'a> {
    /// The workload, or (`"/scale"`) its subresource.
    Workload(&'static str),
    /// The namespace's HorizontalPodAutoscalers.
    Hpas,
    /// The named ScaledObject.
    ScaledObject(&'a str),
    /// A SelfSubjectAccessReview.
    Review,
}

impl Subject<'_> {
    fn resource(self, t: &Target) -> String {
        match self {
            Subject::Workload(sub) => format!("{}{sub}", plural(t.kind)),
            Subject::Hpas => HPAS.into(),
            Subject::ScaledObject(_) => SCALED_OBJECTS.into(),
            Subject::Review => "selfsubjectaccessreviews".into(),
        }
    }

    fn name(self, t: &Target) -> Option<String> {
        match self {
            Subject::Workload(_) => Some(t.workload.clone()),
            Subject::ScaledObject(name) => Some(name.to_owned()),
            Subject::Hpas | Subject::Review => None,
        }
    }
}

const HPAS: &str = "horizontalpodautoscalers";
const SCALED_OBJECTS: &str = "scaledobjects";

fn scaled_object_resource() -> ApiResource {
    ApiResource {
        group: "keda.sh".into(),
        version: "v1alpha1".into(),
        api_version: "keda.sh/v1alpha1".into(),
        kind: "ScaledObject".into(),
        plural: SCALED_OBJECTS.into(),
    }
}

/// Scales targets.
#[derive(Clone)]
pub struct Scaler {
    client: Client,
    retry: RetryPolicy,
    /// Each workload's uid as its `/scale` last gave it (the workload's own), so recording an
    /// Event after a scale needs no read of the workload.
    uids: Arc<Mutex<HashMap<WorkloadKey, String>>>,
}

/// A workload: its kind, namespace and name.
type WorkloadKey = (WorkloadKind, String, String);

/// Watches the workload until its status settles; `last` keeps the latest status seen. Returns
/// false if the watch ends first. The watcher retries failures by itself; the first (e.g. a
/// 403 when the Role lacks `list` or `watch`) is logged.
async fn follow(api: Api<DynamicObject>, t: &Target, last: &mut WorkloadStatus) -> bool {
    let mut stream = watcher::watch_object(api, &t.workload).boxed();
    let mut warned = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(Some(object)) => {
                if let Some(status) = workload_status(t.kind, &object) {
                    *last = status;
                }
                if settled(last) {
                    return true;
                }
            }
            Ok(None) => {}
            Err(error) if !std::mem::replace(&mut warned, true) => tracing::warn!(
                target = %t.name,
                workload = %t.workload,
                namespace = %t.namespace,
                error = %error,
                "watching the rollout failed; retrying until the rollout timeout"
            ),
            Err(_) => {}
        }
    }
    false
}

/// The API resource of a workload kind: the one place the kinds differ in how they are called.
fn api_resource(kind: WorkloadKind) -> ApiResource {
    match kind {
        WorkloadKind::Deployment => ApiResource::erase::<Deployment>(&()),
        WorkloadKind::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
    }
}

/// The state of a workload object of `kind`, by the rules of its controller; `None` if the
/// object does not parse as that kind.
fn workload_status(kind: WorkloadKind, object: &DynamicObject) -> Option<WorkloadStatus> {
    let value = serde_json::to_value(object).ok()?;
    match kind {
        WorkloadKind::Deployment => serde_json::from_value::<Deployment>(value).ok().map(|d| deployment_status(&d)),
        WorkloadKind::StatefulSet => serde_json::from_value::<StatefulSet>(value).ok().map(|s| statefulset_status(&s)),
    }
}

/// One permission the bridge uses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Permission {
    /// The verb.
    pub verb: &'static str,
    /// The API group (`apps`, `events.k8s.io`, `autoscaling`, `keda.sh`).
    pub group: &'static str,
    /// The resource, with its subresource after `/`.
    pub resource: &'static str,
    /// The one object it is limited to, where RBAC can name one (`resourceNames`).
    pub name: Option<String>,
}

impl Permission {
    fn new(verb: &'static str, group: &'static str, resource: &'static str, name: Option<&str>) -> Self {
        Permission { verb, group, resource, name: name.map(str::to_owned) }
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)
    }
}

/// Every permission the bridge uses for `t`, and no more: the workload's (writes go only to
/// the `/scale` subresource, which can change nothing but the replica count: no `patch` or
/// `update` on the workload itself, whose pod template a compromised bridge could rewrite),
/// the audit trail's `create` on Events, and what its autoscaler needs: `list` on the
/// namespace's HorizontalPodAutoscalers to find the one that targets it, or `get` and `patch`
/// on its one KEDA ScaledObject.
pub fn permissions_needed(t: &Target) -> Vec<Permission> {
    let (scale, workloads) = match t.kind {
        WorkloadKind::Deployment => ("deployments/scale", "deployments"),
        WorkloadKind::StatefulSet => ("statefulsets/scale", "statefulsets"),
    };
    // NB: named for list and watch too: the rollout watch pins the object with a
    // metadata.name field selector, which RBAC matches against resourceNames.
    let name = Some(t.workload.as_str());
    let mut needed = vec![
        Permission::new("get", "apps", scale, name),
        Permission::new("patch", "apps", scale, name),
        Permission::new("get", "apps", workloads, name),
        Permission::new("list", "apps", workloads, name),
        Permission::new("watch", "apps", workloads, name),
        // NB: Event names are generated, so this cannot be narrowed to a name.
        Permission::new("create", EVENTS_GROUP, "events", None),
    ];
    match &t.autoscaler {
        None => {}
        Some(Autoscaler::Hpa) => needed.push(Permission::new("list", "autoscaling", HPAS, None)),
        Some(Autoscaler::Keda { scaled_object }) => {
            needed.push(Permission::new("get", "keda.sh", SCALED_OBJECTS, Some(scaled_object)));
            needed.push(Permission::new("patch", "keda.sh", SCALED_OBJECTS, Some(scaled_object)));
        }
    }
    needed
}

/// The API group of the audit trail's Events.
pub const EVENTS_GROUP: &str = "events.k8s.io";

/// The reason of the Event recorded for a scale asked for in chat.
pub const SCALED_BY_CHAT: &str = "ScaledByChat";

fn plural(kind: WorkloadKind) -> &'static str {
    match kind {
        WorkloadKind::Deployment => "deployments",
        WorkloadKind::StatefulSet => "statefulsets",
    }
}

impl Scaler {
    /// A scaler over `client`.
    pub fn new(client: Client, retry: RetryPolicy) -> Self {
        Scaler { client, retry, uids: Arc::default() }
    }

    /// A scaler from the kubeconfig or in-cluster configuration, as kube infers it.
    pub async fn infer(retry: RetryPolicy) -> Result<Self, ScaleError> {
        let client = Client::try_default().await.map_err(|e| ScaleError::Config(e.to_string()))?;
        Ok(Self::new(client, retry))
    }

    async fn retrying<T, F, Fut>(
        &self,
        target: &Target,
        verb: &'static str,
        subject: Subject<'_>,
        f: F,
    ) -> Result<T, ScaleError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let resource = subject.resource(target);
        let mut delay = self.retry.first_delay;
        let mut attempt = 1;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let transient = is_transient(&e);
                    if !transient || attempt >= self.retry.attempts {
                        return Err(classify(e, target, verb, subject, attempt));
                    }
                    tracing::debug!(attempt, error = %e, verb, resource = %resource, "transient Kubernetes error; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
            }
        }
    }

    /// The workload's API, whatever its kind.
    fn api(&self, t: &Target) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &t.namespace, &api_resource(t.kind))
    }

    async fn spec_replicas(&self, t: &Target) -> Result<i32, ScaleError> {
        let api = self.api(t);
        let scale = self.retrying(t, "get", Subject::Workload("/scale"), || api.get_scale(&t.workload)).await?;
        if let Some(uid) = scale.metadata.uid {
            let key = (t.kind, t.namespace.clone(), t.workload.clone());
            self.uids.lock().unwrap_or_else(|e| e.into_inner()).insert(key, uid);
        }
        // NB: the API omits spec.replicas when it is 0.
        Ok(scale.spec.and_then(|s| s.replicas).unwrap_or(0))
    }

    async fn patch_scale(&self, t: &Target, replicas: i32) -> Result<(), ScaleError> {
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        let patch = Patch::Merge(json!({ "spec": { "replicas": replicas } }));
        let api = self.api(t);
        self.retrying(t, "patch", Subject::Workload("/scale"), || api.patch_scale(&t.workload, &params, &patch))
            .await?;
        Ok(())
    }

    async fn object(&self, t: &Target) -> Result<DynamicObject, ScaleError> {
        let api = self.api(t);
        self.retrying(t, "get", Subject::Workload(""), || api.get(&t.workload)).await
    }

    /// Scales up: to `replicas`, else to the count `memory` kept at the last stop (or, for a
    /// workload stopped by an earlier version, its annotation; 1 when unknown). A workload
    /// already running is left alone unless `replicas` differs.
    pub async fn start(
        &self,
        t: &Target,
        replicas: Option<i32>,
        memory: &dyn ReplicaMemory,
    ) -> Result<Change, ScaleError> {
        let current = self.spec_replicas(t).await?;
        // NB: resumed before the scale, so KEDA's own count does not undo it afterwards.
        if let Some(Autoscaler::Keda { scaled_object }) = &t.autoscaler {
            self.pause_keda(t, scaled_object, None).await?;
        }
        let wanted = match replicas {
            Some(n) => n,
            None if current > 0 => return Ok(Change::Unchanged { replicas: current }),
            None => {
                let remembered = match memory.recall(t).map_err(ScaleError::Memory)? {
                    Some(n) => Some(n),
                    None => {
                        let object = self.object(t).await?;
                        object
                            .metadata
                            .annotations
                            .unwrap_or_default()
                            .get(REMEMBERED_REPLICAS)
                            .and_then(|v| v.parse().ok())
                    }
                };
                remembered.filter(|n| *n >= 1).unwrap_or(1).min(t.max_replicas)
            }
        };
        if wanted == current {
            return Ok(Change::Unchanged { replicas: current });
        }
        self.patch_scale(t, wanted).await?;
        Ok(Change::Scaled { from: current, to: wanted })
    }

    /// Scales to zero, first keeping the current count in `memory`. A KEDA ScaledObject is
    /// paused at zero first, so that KEDA holds it there instead of scaling it back up.
    pub async fn stop(&self, t: &Target, memory: &dyn ReplicaMemory) -> Result<Change, ScaleError> {
        let current = self.spec_replicas(t).await?;
        // NB: the count is kept before anything changes, KEDA included (paused at 0, it would
        // scale the workload down by itself).
        if current > 0 {
            memory.remember(t, current).map_err(ScaleError::Memory)?;
        }
        if let Some(Autoscaler::Keda { scaled_object }) = &t.autoscaler {
            self.pause_keda(t, scaled_object, Some(0)).await?;
        }
        if current == 0 {
            return Ok(Change::Unchanged { replicas: 0 });
        }
        self.patch_scale(t, 0).await?;
        Ok(Change::Scaled { from: current, to: 0 })
    }

    /// Sets (`Some`) or removes (`None`) the KEDA annotation that holds the ScaledObject
    /// `name` at a replica count. Removing an absent one changes nothing.
    async fn pause_keda(&self, t: &Target, name: &str, at: Option<i32>) -> Result<(), ScaleError> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &t.namespace, &scaled_object_resource());
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        let value = at.map(|n| n.to_string());
        let patch = Patch::Merge(json!({ "metadata": { "annotations": { KEDA_PAUSED_REPLICAS: value } } }));
        self.retrying(t, "patch", Subject::ScaledObject(name), || api.patch(name, &params, &patch)).await?;
        Ok(())
    }

    /// What the target's autoscaler (if it names one) is doing: the HorizontalPodAutoscaler
    /// that targets the workload, or its KEDA ScaledObject.
    pub async fn autoscaler(&self, t: &Target) -> Result<Option<AutoscalerState>, ScaleError> {
        match &t.autoscaler {
            None => Ok(None),
            Some(Autoscaler::Hpa) => {
                let api: Api<HorizontalPodAutoscaler> = Api::namespaced(self.client.clone(), &t.namespace);
                let params = ListParams::default();
                let list = self.retrying(t, "list", Subject::Hpas, || api.list(&params)).await?;
                let kind = t.kind.to_string();
                let hpa = list.items.into_iter().find_map(|hpa| {
                    let spec = hpa.spec?;
                    let target = &spec.scale_target_ref;
                    let apps = target.api_version.as_deref().is_none_or(|v| v.starts_with("apps/"));
                    (apps && target.kind == kind && target.name == t.workload).then(|| AutoscalerState::Hpa {
                        name: hpa.metadata.name.unwrap_or_default(),
                        min: spec.min_replicas.unwrap_or(1),
                        max: spec.max_replicas,
                    })
                });
                Ok(Some(hpa.unwrap_or(AutoscalerState::NoHpa)))
            }
            Some(Autoscaler::Keda { scaled_object }) => {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), &t.namespace, &scaled_object_resource());
                let object =
                    self.retrying(t, "get", Subject::ScaledObject(scaled_object), || api.get(scaled_object)).await?;
                let spec = &object.data["spec"];
                let count = |field: &str, default: i32| spec[field].as_i64().map_or(default, |n| n as i32);
                Ok(Some(AutoscalerState::Keda {
                    name: scaled_object.clone(),
                    min: count("minReplicaCount", 0),
                    max: count("maxReplicaCount", 100),
                    paused: object.metadata.annotations.unwrap_or_default().remove(KEDA_PAUSED_REPLICAS),
                }))
            }
        }
    }

    /// The workload's state and counts.
    pub async fn status(&self, t: &Target) -> Result<WorkloadStatus, ScaleError> {
        let object = self.object(t).await?;
        workload_status(t.kind, &object).ok_or_else(|| {
            ScaleError::Other(format!("{} {}/{} does not read as a {}", t.kind, t.namespace, t.workload, t.kind))
        })
    }

    /// Watches the workload until it settles (running, off, or degraded) or `timeout` passes;
    /// returns the last status seen.
    pub async fn wait_until_settled(&self, t: &Target, timeout: Duration) -> Result<WorkloadStatus, ScaleError> {
        let mut last = self.status(t).await?;
        if settled(&last) {
            return Ok(last);
        }
        let _ = tokio::time::timeout(timeout, follow(self.api(t), t, &mut last)).await;
        Ok(last)
    }

    /// Every look at `t`'s workload from now on, as a watch that reconnects by itself (with
    /// backoff after errors).
    pub fn watch(
        &self,
        t: &Target,
    ) -> impl futures_util::Stream<Item = Result<Option<DynamicObject>, watcher::Error>> + Send + use<> {
        use kube::runtime::WatchStreamExt;
        watcher::watch_object(self.api(t), &t.workload).default_backoff()
    }

    /// Records a Kubernetes Event on `t`'s workload (`reason`, `note`), so `kubectl describe`
    /// shows who scaled it and how.
    pub async fn record(&self, t: &Target, reason: &str, note: &str) -> Result<(), ScaleError> {
        let key = (t.kind, t.namespace.clone(), t.workload.clone());
        let known = self.uids.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
        let uid = match known {
            Some(uid) => Some(uid),
            None => self.object(t).await?.metadata.uid,
        };
        let reference = ObjectReference {
            api_version: Some("apps/v1".into()),
            kind: Some(t.kind.to_string()),
            name: Some(t.workload.clone()),
            namespace: Some(t.namespace.clone()),
            // NB: `kubectl describe` finds a workload's events by its uid.
            uid,
            ..Default::default()
        };
        // NB: a recorder per event: kube's folds events of one reason within six minutes into a
        // series that keeps the first note, which would hide who made the second scale.
        let recorder =
            Recorder::new(self.client.clone(), Reporter { controller: FIELD_MANAGER.into(), instance: None });
        let event = Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(note.into()),
            action: "Scale".into(),
            secondary: None,
        };
        recorder.publish(&event, &reference).await.map_err(|e| match e {
            kube::Error::Api(status) if status.code == 403 => ScaleError::Forbidden {
                verb: "create",
                resource: "events".into(),
                namespace: t.namespace.clone(),
                name: None,
            },
            other => classify(other, t, "create", Subject::Workload(""), 1),
        })
    }

    /// Asks the API server (SelfSubjectAccessReview) about every permission the bridge uses
    /// for `t` ([`permissions_needed`]). Returns each with whether it is granted.
    pub async fn access_review(&self, t: &Target) -> Result<Vec<(Permission, bool)>, ScaleError> {
        let mut out = Vec::new();
        for permission in permissions_needed(t) {
            let allowed = self.allowed(t, &permission).await?;
            out.push((permission, allowed));
        }
        Ok(out)
    }

    /// Whether the API server grants `permission` in `t`'s namespace.
    async fn allowed(&self, t: &Target, permission: &Permission) -> Result<bool, ScaleError> {
        let Permission { verb, group, resource, name } = permission;
        let (resource, subresource) = resource.split_once('/').map_or((*resource, None), |(r, s)| (r, Some(s)));
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(t.namespace.clone()),
                    verb: Some((*verb).into()),
                    group: Some((*group).into()),
                    resource: Some(resource.into()),
                    subresource: subresource.map(str::to_owned),
                    name: name.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<SelfSubjectAccessReview> = Api::all(self.client.clone());
        let post = PostParams::default();
        let answer = self.retrying(t, "create", Subject::Review, || api.create(&post, &review)).await?;
        Ok(answer.status.is_some_and(|s| s.allowed))
    }
}

fn settled(s: &WorkloadStatus) -> bool {
    matches!(s.state, State::Running | State::Off | State::Degraded)
}

fn is_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => matches!(status.code, 409 | 429 | 500..=599),
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

fn classify(e: kube::Error, t: &Target, verb: &'static str, subject: Subject<'_>, attempts: u32) -> ScaleError {
    match e {
        kube::Error::Api(status) => match status.code {
            403 => ScaleError::Forbidden {
                verb,
                resource: subject.resource(t),
                namespace: t.namespace.clone(),
                name: subject.name(t),
            },
            404 => match subject {
                Subject::ScaledObject(name) => {
                    ScaleError::NoScaledObject { namespace: t.namespace.clone(), name: name.to_owned() }
                }
                _ => ScaleError::NotFound { kind: t.kind, namespace: t.namespace.clone(), name: t.workload.clone() },
            },
            401 => ScaleError::Unauthorized,
            422 | 400 => ScaleError::Invalid(status.message),
            409 | 429 | 500..=599 => ScaleError::Unavailable(format!("{} {}", status.code, status.reason), attempts),
            _ => ScaleError::Other(format!("{} {}: {}", status.code, status.reason, status.message)),
        },
        other if is_transient(&other) => ScaleError::Unavailable(other.to_string(), attempts),
        other => ScaleError::Other(other.to_string()),
    }
}

/// The state of a Deployment, as its controller reports it.
pub fn deployment_status(d: &Deployment) -> WorkloadStatus {
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    let st = d.status.clone().unwrap_or_default();
    let (current, ready, available, updated) = (
        st.replicas.unwrap_or(0),
        st.ready_replicas.unwrap_or(0),
        st.available_replicas.unwrap_or(0),
        st.updated_replicas.unwrap_or(0),
    );
    let generation = d.metadata.generation.unwrap_or(0);
    let observed = st.observed_generation.unwrap_or(0) >= generation;
    let conditions = st.conditions.unwrap_or_default();
    let progressing = conditions.iter().find(|c| c.type_ == "Progressing");
    let deadline_exceeded = progressing.is_some_and(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded"));
    let message = if deadline_exceeded {
        progressing.and_then(|c| c.message.clone())
    } else {
        conditions.iter().find(|c| c.type_ == "Available" && c.status == "False").and_then(|c| c.message.clone())
    };
    let state = if desired == 0 {
        if current > 0 { State::Stopping } else { State::Off }
    } else if deadline_exceeded {
        State::Degraded
    } else if observed && updated == desired && available == desired && ready >= desired && current == desired {
        State::Running
    } else {
        State::Starting
    };
    WorkloadStatus { state, desired, current, ready, available, updated, message }
}

/// The state of a StatefulSet, as its controller reports it.
pub fn statefulset_status(s: &StatefulSet) -> WorkloadStatus {
    let desired = s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    let st = s.status.clone().unwrap_or_default();
    let (current, ready, available, updated) = (
        st.replicas,
        st.ready_replicas.unwrap_or(0),
        st.available_replicas.unwrap_or(0),
        st.updated_replicas.unwrap_or(0),
    );
    let observed = st.observed_generation.unwrap_or(0) >= s.metadata.generation.unwrap_or(0);
    let state = if desired == 0 {
        if current > 0 { State::Stopping } else { State::Off }
    } else if observed && ready == desired && current == desired {
        State::Running
    } else {
        State::Starting
    };
    WorkloadStatus { state, desired, current, ready, available, updated, message: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(spec: i32, status: serde_json::Value, generation: i64) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "d", "generation": generation},
            "spec": {"replicas": spec, "selector": {}, "template": {}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn deployment_states_follow_the_controller_fields() {
        let cases = [
            (0, json!({"observedGeneration": 2}), State::Off),
            (0, json!({"observedGeneration": 2, "replicas": 1}), State::Stopping),
            (1, json!({"observedGeneration": 2, "replicas": 1}), State::Starting),
            (
                1,
                json!({"observedGeneration": 1, "replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1}),
                State::Starting,
            ),
            (
                1,
                json!({"observedGeneration": 2, "replicas": 1, "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1}),
                State::Running,
            ),
            (
                2,
                json!({"observedGeneration": 2, "replicas": 2, "readyReplicas": 1, "conditions": [
                    {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet \"d-1\" has timed out progressing."}
                ]}),
                State::Degraded,
            ),
        ];
        for (spec, status, expected) in cases {
            let s = deployment_status(&deployment(spec, status.clone(), 2));
            assert_eq!(s.state, expected, "{spec} {status}");
        }
    }

    #[test]
    fn a_degraded_deployment_carries_the_condition_message() {
        let d = deployment(
            1,
            json!({"observedGeneration": 2, "replicas": 1, "conditions": [
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "timed out"}
            ]}),
            2,
        );
        assert_eq!(deployment_status(&d).message.as_deref(), Some("timed out"));
    }
}
