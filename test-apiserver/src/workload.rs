//! The two scalable workload kinds, as stored objects: construction with the real server's
//! defaults, JSON rendering, and the autoscaling/v1 `Scale` view.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::status::GroupResource;

/// Which apps/v1 resource a workload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    /// `apps/v1` Deployment.
    #[serde(alias = "Deployment", alias = "deployments")]
    Deployment,
    /// `apps/v1` StatefulSet.
    #[serde(alias = "StatefulSet", alias = "statefulsets")]
    StatefulSet,
}

impl WorkloadKind {
    /// The resource name in URLs and RBAC, e.g. `deployments`.
    pub fn plural(self) -> &'static str {
        match self {
            Self::Deployment => "deployments",
            Self::StatefulSet => "statefulsets",
        }
    }

    /// The `kind` field, e.g. `Deployment`.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Deployment => "Deployment",
            Self::StatefulSet => "StatefulSet",
        }
    }

    /// Looks a kind up by its URL resource name.
    pub fn from_plural(plural: &str) -> Option<Self> {
        match plural {
            "deployments" => Some(Self::Deployment),
            "statefulsets" => Some(Self::StatefulSet),
            _ => None,
        }
    }

    pub(crate) fn group_resource(self) -> GroupResource {
        GroupResource { group: "apps", resource: self.plural() }
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.plural())
    }
}

impl FromStr for WorkloadKind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "deployment" | "deployments" => Ok(Self::Deployment),
            "statefulset" | "statefulsets" => Ok(Self::StatefulSet),
            _ => Err(UnknownKind(s.to_owned())),
        }
    }
}

/// A workload kind name that is neither a Deployment nor a StatefulSet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown workload kind {0:?}: expected deployment or statefulset")]
pub struct UnknownKind(pub String);

/// `NAMESPACE/NAME=REPLICAS`, a workload to create at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSeed {
    /// The namespace.
    pub namespace: String,
    /// The object name.
    pub name: String,
    /// Ready replicas to start with.
    pub replicas: i32,
}

/// Why a `NAMESPACE/NAME=REPLICAS` argument did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadSeedError {
    /// The text lacks the `/` or the `=`, or a part is empty.
    #[error("expected NAMESPACE/NAME=REPLICAS, got {0:?}")]
    Shape(String),
    /// The replica count is not a non-negative integer.
    #[error("replicas in {text:?} must be a non-negative integer")]
    Replicas {
        /// The whole argument.
        text: String,
        /// Why the number did not parse.
        #[source]
        source: Option<std::num::ParseIntError>,
    },
}

impl FromStr for WorkloadSeed {
    type Err = WorkloadSeedError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let shape = || WorkloadSeedError::Shape(text.to_owned());
        let (object, replicas) = text.rsplit_once('=').ok_or_else(shape)?;
        let (namespace, name) = object.split_once('/').ok_or_else(shape)?;
        if namespace.is_empty() || name.is_empty() || name.contains('/') {
            return Err(shape());
        }
        let replicas: i32 =
            replicas.parse().map_err(|e| WorkloadSeedError::Replicas { text: text.to_owned(), source: Some(e) })?;
        if replicas < 0 {
            return Err(WorkloadSeedError::Replicas { text: text.to_owned(), source: None });
        }
        Ok(Self { namespace: namespace.to_owned(), name: name.to_owned(), replicas })
    }
}

/// A stored workload object.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Workload {
    Deployment(Box<Deployment>),
    StatefulSet(Box<StatefulSet>),
}

/// What the server fills in when it creates an object.
pub(crate) struct Created<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub replicas: i32,
    pub uid: String,
    pub now: Timestamp,
}

impl Workload {
    /// A workload that has finished rolling out `replicas` ready pods.
    pub(crate) fn new(kind: WorkloadKind, created: Created<'_>) -> Self {
        let Created { namespace, name, replicas, uid, now } = created;
        let time = serde_json::to_value(Time(now)).unwrap_or_default();
        let template = json!({
            "metadata": {"labels": {"app": name}},
            "spec": {
                "containers": [{
                    "name": name,
                    "image": format!("registry.example/{name}:latest"),
                    "resources": {},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "Always"
                }],
                "restartPolicy": "Always",
                "terminationGracePeriodSeconds": 30,
                "dnsPolicy": "ClusterFirst",
                "securityContext": {},
                "schedulerName": "default-scheduler"
            }
        });
        let metadata = json!({
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "generation": 1,
            "creationTimestamp": time,
            "labels": {"app": name},
        });
        match kind {
            WorkloadKind::Deployment => {
                let mut deployment: Deployment = from_json(json!({
                    "metadata": metadata,
                    "spec": {
                        "replicas": replicas,
                        "selector": {"matchLabels": {"app": name}},
                        "template": template,
                        "strategy": {
                            "type": "RollingUpdate",
                            "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}
                        },
                        "revisionHistoryLimit": 10,
                        "progressDeadlineSeconds": 600
                    },
                    "status": {}
                }));
                deployment
                    .metadata
                    .annotations
                    .get_or_insert_default()
                    .insert("deployment.kubernetes.io/revision".to_owned(), "1".to_owned());
                Self::Deployment(Box::new(deployment))
            }
            WorkloadKind::StatefulSet => Self::StatefulSet(Box::new(from_json(json!({
                "metadata": metadata,
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": {"app": name}},
                    "template": template,
                    "serviceName": name,
                    "podManagementPolicy": "OrderedReady",
                    "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
                    "revisionHistoryLimit": 10,
                    "persistentVolumeClaimRetentionPolicy": {
                        "whenDeleted": "Retain",
                        "whenScaled": "Retain"
                    }
                },
                "status": {"replicas": 0}
            })))),
        }
    }

    /// Reads an object of `kind` from a request body or a patched document.
    pub(crate) fn from_value(kind: WorkloadKind, value: Value) -> Result<Self, String> {
        let parsed = match kind {
            WorkloadKind::Deployment => serde_json::from_value(value).map(|d| Self::Deployment(Box::new(d))),
            WorkloadKind::StatefulSet => serde_json::from_value(value).map(|s| Self::StatefulSet(Box::new(s))),
        };
        parsed.map_err(|e| format!("{kind} in version \"v1\" cannot be handled as a {kind}: {e}", kind = kind.kind()))
    }

    pub(crate) fn meta(&self) -> &ObjectMeta {
        match self {
            Self::Deployment(d) => &d.metadata,
            Self::StatefulSet(s) => &s.metadata,
        }
    }

    pub(crate) fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Self::Deployment(d) => &mut d.metadata,
            Self::StatefulSet(s) => &mut s.metadata,
        }
    }

    pub(crate) fn name(&self) -> &str {
        self.meta().name.as_deref().unwrap_or_default()
    }

    pub(crate) fn generation(&self) -> i64 {
        self.meta().generation.unwrap_or_default()
    }

    pub(crate) fn labels(&self) -> BTreeMap<String, String> {
        self.meta().labels.clone().unwrap_or_default()
    }

    /// `spec.replicas`, with a missing value read as the server default of 1.
    pub(crate) fn spec_replicas(&self) -> i32 {
        let replicas = match self {
            Self::Deployment(d) => d.spec.as_ref().and_then(|s| s.replicas),
            Self::StatefulSet(s) => s.spec.as_ref().and_then(|s| s.replicas),
        };
        replicas.unwrap_or(1)
    }

    pub(crate) fn set_spec_replicas(&mut self, replicas: i32) {
        match self {
            Self::Deployment(d) => d.spec.get_or_insert_default().replicas = Some(replicas),
            Self::StatefulSet(s) => s.spec.get_or_insert_default().replicas = Some(replicas),
        }
    }

    /// Applies the defaulting the real server does on every write.
    pub(crate) fn default_fields(&mut self) {
        let replicas = self.spec_replicas();
        self.set_spec_replicas(replicas);
    }

    /// The `spec` as JSON, to tell whether a write changed it.
    pub(crate) fn spec_value(&self) -> Value {
        match self {
            Self::Deployment(d) => serde_json::to_value(&d.spec),
            Self::StatefulSet(s) => serde_json::to_value(&s.spec),
        }
        .unwrap_or_default()
    }

    /// Moves `status` over from `other`; the main resource never writes status.
    pub(crate) fn take_status(&mut self, other: &Self) {
        match (self, other) {
            (Self::Deployment(d), Self::Deployment(o)) => d.status.clone_from(&o.status),
            (Self::StatefulSet(s), Self::StatefulSet(o)) => s.status.clone_from(&o.status),
            _ => {}
        }
    }

    /// The object as a GET or watch event returns it, with `kind` and `apiVersion`.
    pub(crate) fn to_value(&self) -> Value {
        match self {
            Self::Deployment(d) => serde_json::to_value(d),
            Self::StatefulSet(s) => serde_json::to_value(s),
        }
        .unwrap_or_default()
    }

    /// The object as a list item, which the real server sends without `kind` and `apiVersion`.
    pub(crate) fn to_list_item(&self) -> Value {
        let mut value = self.to_value();
        if let Some(map) = value.as_object_mut() {
            map.remove("kind");
            map.remove("apiVersion");
        }
        value
    }

    /// `spec.selector` as a selector string, e.g. `app=web`.
    pub(crate) fn selector(&self) -> String {
        let selector = match self {
            Self::Deployment(d) => d.spec.as_ref().map(|s| &s.selector),
            Self::StatefulSet(s) => s.spec.as_ref().map(|s| &s.selector),
        };
        selector
            .and_then(|s| s.match_labels.as_ref())
            .map(|labels| labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
            .unwrap_or_default()
    }

    /// `status.replicas`, read as 0 when omitted.
    pub(crate) fn status_replicas(&self) -> i32 {
        match self {
            Self::Deployment(d) => d.status.as_ref().and_then(|s| s.replicas),
            Self::StatefulSet(s) => s.status.as_ref().map(|s| s.replicas),
        }
        .unwrap_or_default()
    }

    /// `status.readyReplicas`, read as 0 when omitted.
    pub(crate) fn ready_replicas(&self) -> i32 {
        match self {
            Self::Deployment(d) => d.status.as_ref().and_then(|s| s.ready_replicas),
            Self::StatefulSet(s) => s.status.as_ref().and_then(|s| s.ready_replicas),
        }
        .unwrap_or_default()
    }

    /// The autoscaling/v1 `Scale` view of this object.
    pub(crate) fn scale(&self) -> Scale {
        let meta = self.meta();
        Scale {
            kind: "Scale",
            api_version: "autoscaling/v1",
            metadata: ScaleMeta {
                name: meta.name.clone().unwrap_or_default(),
                namespace: meta.namespace.clone().unwrap_or_default(),
                uid: meta.uid.clone().unwrap_or_default(),
                resource_version: meta.resource_version.clone().unwrap_or_default(),
                creation_timestamp: meta.creation_timestamp.clone(),
            },
            spec: ScaleSpec { replicas: self.spec_replicas() },
            status: ScaleStatus { replicas: self.status_replicas(), selector: self.selector() },
        }
    }

    /// The name of the ReplicaSet (or revision) the current pod template produces.
    pub(crate) fn revision_name(&self) -> String {
        let template = match self {
            Self::Deployment(d) => d.spec.as_ref().map(|s| serde_json::to_string(&s.template)),
            Self::StatefulSet(s) => s.spec.as_ref().map(|s| serde_json::to_string(&s.template)),
        };
        let text = template.and_then(Result::ok).unwrap_or_default();
        format!("{}-{}", self.name(), pod_template_hash(&text))
    }
}

/// `0` is what Go's `omitempty` drops; everything else is kept.
pub(crate) fn nonzero(n: i32) -> Option<i32> {
    (n != 0).then_some(n)
}

/// A hash in the alphabet `rand.SafeEncodeString` uses for `pod-template-hash`.
fn pod_template_hash(text: &str) -> String {
    const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let hash = text.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    hash.to_string().bytes().map(|b| char::from(ALPHANUMS[usize::from(b) % ALPHANUMS.len()])).collect()
}

fn from_json<T: serde::de::DeserializeOwned + Default>(value: Value) -> T {
    serde_json::from_value(value).unwrap_or_default()
}

/// `autoscaling/v1` Scale, with fields in the real server's order and omissions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Scale {
    kind: &'static str,
    api_version: &'static str,
    metadata: ScaleMeta,
    spec: ScaleSpec,
    status: ScaleStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
struct ScaleMeta {
    name: String,
    namespace: String,
    uid: String,
    resource_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    creation_timestamp: Option<Time>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct ScaleSpec {
    #[serde(skip_serializing_if = "is_zero")]
    replicas: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct ScaleStatus {
    replicas: i32,
    #[serde(skip_serializing_if = "String::is_empty")]
    selector: String,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

impl Scale {
    pub(crate) fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

impl Serialize for Workload {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Deployment(d) => d.serialize(serializer),
            Self::StatefulSet(s) => s.serialize(serializer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web(kind: WorkloadKind, replicas: i32) -> Workload {
        Workload::new(
            kind,
            Created { namespace: "apps", name: "web", replicas, uid: "u".to_owned(), now: Timestamp::UNIX_EPOCH },
        )
    }

    #[test]
    fn a_scale_with_zero_replicas_omits_spec_replicas_but_keeps_status_replicas() {
        let scale = web(WorkloadKind::Deployment, 0).scale().to_value();
        assert_eq!(scale["spec"], json!({}));
        assert_eq!(scale["status"], json!({"replicas": 0, "selector": "app=web"}));
    }

    #[test]
    fn a_deployment_keeps_zero_spec_replicas_because_it_is_a_pointer() {
        let value = web(WorkloadKind::Deployment, 0).to_value();
        assert_eq!(value["spec"]["replicas"], json!(0));
        assert_eq!(value["metadata"]["creationTimestamp"], json!("1970-01-01T00:00:00Z"));
    }

    #[test]
    fn list_items_carry_no_kind_or_api_version() {
        let item = web(WorkloadKind::StatefulSet, 1).to_list_item();
        assert!(item.get("kind").is_none() && item.get("apiVersion").is_none());
        assert_eq!(item["spec"]["podManagementPolicy"], json!("OrderedReady"));
    }

    #[test]
    fn revision_names_use_the_safe_alphabet() {
        let name = web(WorkloadKind::Deployment, 1).revision_name();
        let hash = name.strip_prefix("web-").unwrap();
        assert!(hash.chars().all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c)));
    }

    #[test]
    fn seeds_parse_namespace_name_and_replicas() {
        assert_eq!(
            "clawdbot/clawdbot=0".parse(),
            Ok(WorkloadSeed { namespace: "clawdbot".to_owned(), name: "clawdbot".to_owned(), replicas: 0 })
        );
        for bad in ["clawdbot=0", "a/b", "/b=1", "a/b=-1", "a/b=x"] {
            assert!(bad.parse::<WorkloadSeed>().is_err(), "{bad}");
        }
    }

    #[test]
    fn kinds_parse_from_singular_and_plural_names() {
        assert_eq!("statefulsets".parse(), Ok(WorkloadKind::StatefulSet));
        assert_eq!("Deployment".parse(), Ok(WorkloadKind::Deployment));
        assert!("pods".parse::<WorkloadKind>().is_err());
    }
}
