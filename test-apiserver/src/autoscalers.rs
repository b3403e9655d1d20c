//! HorizontalPodAutoscalers (autoscaling/v2, built in) and KEDA ScaledObjects (keda.sh/v1alpha1,
//! a CustomResourceDefinition): stored as the objects a client reads, listed, fetched and
//! patched. No controller acts on them; tests check what a client asked of them.

use serde_json::{Value, json};

use crate::status::GroupResource;
use crate::workload::WorkloadKind;

/// The KEDA annotation that pauses a ScaledObject at a replica count.
pub const PAUSED_REPLICAS: &str = "autoscaling.keda.sh/paused-replicas";

/// Which autoscaler object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AutoscalerKind {
    /// `autoscaling/v2` HorizontalPodAutoscaler.
    Hpa,
    /// `keda.sh/v1alpha1` ScaledObject.
    ScaledObject,
}

impl AutoscalerKind {
    /// The group and plural the API serves it under.
    pub(crate) fn group_resource(self) -> GroupResource {
        match self {
            Self::Hpa => GroupResource { group: "autoscaling", resource: "horizontalpodautoscalers" },
            Self::ScaledObject => GroupResource { group: "keda.sh", resource: "scaledobjects" },
        }
    }

    /// `apiVersion`.
    pub(crate) fn api_version(self) -> &'static str {
        match self {
            Self::Hpa => "autoscaling/v2",
            Self::ScaledObject => "keda.sh/v1alpha1",
        }
    }

    /// `kind`.
    pub(crate) fn kind(self) -> &'static str {
        match self {
            Self::Hpa => "HorizontalPodAutoscaler",
            Self::ScaledObject => "ScaledObject",
        }
    }

    /// Whether the API serves it from a CustomResourceDefinition: list items then keep their
    /// `kind` and `apiVersion`, and a strategic merge patch is refused (415).
    pub(crate) fn is_custom(self) -> bool {
        self == Self::ScaledObject
    }

    /// Reads `horizontalpodautoscalers` or `scaledobjects` under their group and version.
    pub(crate) fn from_path(group: &str, version: &str, plural: &str) -> Option<Self> {
        match (group, version, plural) {
            ("autoscaling", "v2", "horizontalpodautoscalers") => Some(Self::Hpa),
            ("keda.sh", "v1alpha1", "scaledobjects") => Some(Self::ScaledObject),
            _ => None,
        }
    }
}

/// A new HPA's spec and status: scaling `target` between `min` and `max` on CPU, currently at
/// `current`.
pub(crate) fn hpa(target: (WorkloadKind, &str), min: i32, max: i32, current: i32) -> (Value, Value) {
    let spec = json!({
        "scaleTargetRef": {"kind": target.0.kind(), "name": target.1, "apiVersion": "apps/v1"},
        "minReplicas": min,
        "maxReplicas": max,
        "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}],
    });
    let status = json!({
        "currentReplicas": current,
        "desiredReplicas": current,
        "conditions": [
            {"type": "AbleToScale", "status": "True", "reason": "ReadyForNewScale",
             "message": "recommended size matches current size"},
            {"type": "ScalingActive", "status": "True", "reason": "ValidMetricFound",
             "message": "the HPA was able to successfully calculate a replica count from cpu resource utilization (percentage of request)"},
        ],
    });
    (spec, status)
}

/// A new ScaledObject's spec and status: scaling the Deployment `target` between `min` and
/// `max` on a cron trigger. KEDA leaves `scaleTargetRef.kind` out for a Deployment.
pub(crate) fn scaled_object(target: &str, min: i32, max: i32) -> (Value, Value) {
    let spec = json!({
        "scaleTargetRef": {"name": target},
        "minReplicaCount": min,
        "maxReplicaCount": max,
        "triggers": [{"type": "cron", "metadata": {"timezone": "Etc/UTC", "start": "0 8 * * *", "end": "0 18 * * *", "desiredReplicas": max.to_string()}}],
    });
    let status = json!({
        "scaleTargetKind": "apps/v1.Deployment",
        "scaleTargetGVKR": {"group": "apps", "version": "v1", "kind": "Deployment", "resource": "deployments"},
        "hpaName": format!("keda-hpa-{target}"),
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "ScaledObjectReady", "message": "ScaledObject is defined correctly and is ready for scaling"},
            {"type": "Active", "status": "False", "reason": "ScalerNotActive", "message": "Scaling is not performed because triggers are not active"},
            {"type": "Fallback", "status": "False", "reason": "NoFallbackFound", "message": "No fallback was found"},
            {"type": "Paused", "status": "False", "reason": "ScaledObjectUnpaused", "message": "pause annotation removed for ScaledObject"},
        ],
    });
    (spec, status)
}
