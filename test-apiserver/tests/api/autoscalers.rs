//! HorizontalPodAutoscalers and KEDA ScaledObjects: listed and fetched with the real bodies,
//! ScaledObjects patched as a custom resource, both behind RBAC in their own groups.

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::{Api, api::ListParams};
use reqwest::Method;
use test_apiserver::{AutoscalerKind, PAUSED_REPLICAS, RbacRule, WorkloadKind};

use crate::support::Harness;

const HPAS: &str = "/apis/autoscaling/v2/namespaces/bots/horizontalpodautoscalers";
const SCALED_OBJECTS: &str = "/apis/keda.sh/v1alpha1/namespaces/bots/scaledobjects";

#[tokio::test]
async fn kube_rs_lists_hpas_as_autoscaling_v2_objects_with_their_target() {
    let harness = Harness::start().await;
    harness.server.cluster().add_hpa("bots", "web", (WorkloadKind::Deployment, "web"), 1, 5, 2);
    let api: Api<HorizontalPodAutoscaler> = Api::namespaced(harness.kube().await, "bots");
    let list = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let spec = list.items[0].spec.clone().unwrap();
    assert_eq!((spec.scale_target_ref.kind.as_str(), spec.scale_target_ref.name.as_str()), ("Deployment", "web"));
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(1), 5));
    let raw = harness.get(HPAS).await.json();
    assert_eq!(raw["kind"], "HorizontalPodAutoscalerList");
    assert!(raw["items"][0].get("kind").is_none(), "items of a built-in list carry no kind: {raw}");
}

#[tokio::test]
async fn a_scaled_object_takes_a_merge_patch_of_its_annotations_but_no_strategic_merge() {
    let harness = Harness::start().await;
    harness.server.cluster().add_scaled_object("bots", "worker", "web", 1, 4);
    let path = format!("{SCALED_OBJECTS}/worker");
    let before = harness.get(&path).await.json();
    assert_eq!(
        (before["kind"].as_str(), before["apiVersion"].as_str()),
        (Some("ScaledObject"), Some("keda.sh/v1alpha1"))
    );
    let body = format!(r#"{{"metadata":{{"annotations":{{"{PAUSED_REPLICAS}":"0"}}}}}}"#);
    let patched = harness.merge_patch(&path, &body).await;
    assert_eq!(patched.code, 200, "{}", patched.text);
    let stored = harness.server.cluster().autoscaler(AutoscalerKind::ScaledObject, "bots", "worker").unwrap();
    assert_eq!(stored["metadata"]["annotations"][PAUSED_REPLICAS], "0");
    assert_ne!(stored["metadata"]["resourceVersion"], before["metadata"]["resourceVersion"]);
    let strategic = harness.send(Method::PATCH, &path, Some("application/strategic-merge-patch+json"), &body).await;
    assert_eq!(strategic.code, 415, "{}", strategic.text);
    let removed =
        harness.merge_patch(&path, &format!(r#"{{"metadata":{{"annotations":{{"{PAUSED_REPLICAS}":null}}}}}}"#)).await;
    assert_eq!(removed.code, 200);
    assert!(removed.json()["metadata"]["annotations"].get(PAUSED_REPLICAS).is_none(), "{}", removed.text);
    assert_eq!(harness.merge_patch(&format!("{SCALED_OBJECTS}/nope"), &body).await.code, 404);
}

#[tokio::test]
async fn autoscalers_are_refused_without_a_rule_in_their_group() {
    let harness = Harness::start().await;
    let cluster = harness.server.cluster();
    cluster.add_hpa("bots", "web", (WorkloadKind::Deployment, "web"), 1, 5, 2);
    cluster.add_scaled_object("bots", "worker", "web", 1, 4);
    cluster.set_rbac(Some(vec![
        RbacRule::new("list", "horizontalpodautoscalers", "bots").in_group("autoscaling"),
        RbacRule::new("get", "scaledobjects", "bots").in_group("keda.sh").named("worker"),
    ]));
    assert_eq!(harness.get(HPAS).await.code, 200);
    assert_eq!(harness.get(&format!("{HPAS}/web")).await.code, 403, "get is not list");
    assert_eq!(harness.get(&format!("{SCALED_OBJECTS}/worker")).await.code, 200);
    let refused = harness.merge_patch(&format!("{SCALED_OBJECTS}/worker"), "{}").await;
    assert_eq!(refused.code, 403);
    assert!(
        refused.text.contains(r#"cannot patch resource \"scaledobjects\" in API group \"keda.sh\""#),
        "{}",
        refused.text
    );
}
