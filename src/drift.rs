//! Drift: whether a change to a workload's desired replicas was made by someone other than
//! this bridge, and by whom, read from the object's `managedFields`. Pure; the watch that feeds
//! it is in `bridge/drift.rs`.

use kube::api::DynamicObject;

use crate::scaler::FIELD_MANAGER;

/// What one look at the workload says about its replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// `spec.replicas` (0 when the API omits it).
    pub replicas: i32,
    /// The field manager that owns `spec.replicas`, if the object says.
    pub manager: Option<String>,
    /// When that manager last wrote it (ms since the Unix epoch), if the object says.
    pub at_ms: Option<i64>,
}

/// A change someone else made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// The replicas before.
    pub from: i32,
    /// The replicas now.
    pub to: i32,
    /// Who, if the object says.
    pub manager: Option<String>,
    /// When, if the object says.
    pub at_ms: Option<i64>,
}

/// Reads the replicas of `object` and who set them: of the `managedFields` entries that hold
/// `f:spec.f:replicas`, the one written last.
pub fn observe(object: &DynamicObject) -> Observed {
    let replicas = object.data["spec"]["replicas"].as_i64().unwrap_or(0) as i32;
    let owner = object
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|e| e.fields_v1.as_ref().is_some_and(|f| !f.0["f:spec"]["f:replicas"].is_null()))
        .max_by_key(|e| e.time.as_ref().map(|t| t.0));
    Observed {
        replicas,
        manager: owner.and_then(|e| e.manager.clone()),
        at_ms: owner.and_then(|e| e.time.as_ref()).map(|t| t.0.as_millisecond()),
    }
}

/// Whether `now` is a change by someone else, given the replicas seen `last` (None: never
/// looked before) and the count this bridge `wrote` last.
pub fn drift(last: Option<i32>, wrote: Option<i32>, now: &Observed) -> Option<Drift> {
    let last = last?;
    if last == now.replicas {
        return None;
    }
    let ours = match now.manager.as_deref() {
        Some(manager) => manager == FIELD_MANAGER,
        // NB: no managedFields to go by: ours if it is what we wrote.
        None => wrote == Some(now.replicas),
    };
    (!ours).then(|| Drift { from: last, to: now.replicas, manager: now.manager.clone(), at_ms: now.at_ms })
}

/// Whether a change someone else made is worth a notice: beside an autoscaler (`autoscaled`),
/// whose job is to move the count, only a switch on or off (a change to or from zero) is.
pub fn is_news(change: &Drift, autoscaled: bool) -> bool {
    !autoscaled || change.from == 0 || change.to == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(replicas: Option<i32>, owners: &[(&str, &str)]) -> DynamicObject {
        let fields: Vec<_> = owners
            .iter()
            .map(|(manager, time)| {
                json!({"manager": manager, "operation": "Update", "time": time, "fieldsType": "FieldsV1",
                       "fieldsV1": {"f:spec": {"f:replicas": {}}}, "subresource": "scale"})
            })
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "apps", "managedFields": fields},
            "spec": replicas.map_or(json!({}), |r| json!({"replicas": r})),
        }))
        .unwrap()
    }

    #[test]
    fn the_owner_of_the_replicas_is_the_last_manager_that_wrote_them() {
        let o = object(
            Some(3),
            &[("matrix-k8s-toggle", "2026-12-03T14:00:00Z"), ("argocd-application-controller", "2026-12-03T14:02:00Z")],
        );
        let seen = observe(&o);
        assert_eq!((seen.replicas, seen.manager.as_deref()), (3, Some("argocd-application-controller")));
        assert_eq!(seen.at_ms, Some(1_796_306_520_000));
        assert_eq!(observe(&object(None, &[])).replicas, 0, "omitted when 0");
    }

    #[test]
    fn a_change_by_another_manager_is_drift_and_ours_or_none_is_not() {
        let argo = Observed { replicas: 3, manager: Some("argocd-application-controller".into()), at_ms: Some(1) };
        assert_eq!(
            drift(Some(0), None, &argo),
            Some(Drift { from: 0, to: 3, manager: argo.manager.clone(), at_ms: Some(1) })
        );
        assert_eq!(drift(Some(3), None, &argo), None, "no change");
        assert_eq!(drift(None, None, &argo), None, "the first look is no change");
        let ours = Observed { replicas: 0, manager: Some(FIELD_MANAGER.into()), at_ms: None };
        assert_eq!(drift(Some(3), Some(0), &ours), None);
        let unknown = Observed { replicas: 2, manager: None, at_ms: None };
        assert_eq!(drift(Some(0), Some(2), &unknown), None, "what we wrote");
        assert!(drift(Some(0), Some(1), &unknown).is_some(), "not what we wrote");
    }

    #[test]
    fn beside_an_autoscaler_only_a_switch_on_or_off_is_news() {
        let change = |from, to| Drift { from, to, manager: Some("kube-controller-manager".into()), at_ms: None };
        assert!(is_news(&change(2, 4), false));
        assert!(!is_news(&change(2, 4), true), "the HPA moving 2 → 4 is its job");
        assert!(is_news(&change(0, 3), true), "switched back on while stopped");
        assert!(is_news(&change(3, 0), true), "switched off");
    }
}
