//! The exact bodies and omissions of the real apiserver, over raw HTTP.

use reqwest::Method;
use serde_json::json;

use crate::support::{DEPLOYMENTS, Harness, MERGE, STATEFULSETS};

#[tokio::test]
async fn a_missing_deployment_is_the_real_404_body() {
    let harness = Harness::start().await;
    let reply = harness.get(&format!("{DEPLOYMENTS}/nope")).await;
    assert_eq!(reply.code, 404);
    assert_eq!(
        reply.text,
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"deployments.apps \"nope\" not found","reason":"NotFound","details":{"name":"nope","group":"apps","kind":"deployments"},"code":404}"#
    );
}

#[tokio::test]
async fn a_missing_statefulset_scale_is_a_404_naming_statefulsets() {
    let harness = Harness::start().await;
    let reply = harness.get(&format!("{STATEFULSETS}/nope/scale")).await;
    assert_eq!(reply.code, 404);
    assert_eq!(reply.json()["message"], json!("statefulsets.apps \"nope\" not found"));
    assert_eq!(reply.json()["details"], json!({"name": "nope", "group": "apps", "kind": "statefulsets"}));
}

#[tokio::test]
async fn an_unknown_path_is_the_generic_404() {
    let harness = Harness::start().await;
    let reply = harness.get("/apis/apps/v1/namespaces/bots/replicasets").await;
    assert_eq!(reply.code, 404);
    assert_eq!(reply.json()["message"], json!("the server could not find the requested resource"));
}

#[tokio::test]
async fn the_scale_body_has_the_real_shape_and_omits_zero_spec_replicas() {
    let harness = Harness::start().await;
    let scale = harness.get(&format!("{DEPLOYMENTS}/web/scale")).await.json();
    let meta = &scale["metadata"];
    assert_eq!(scale["kind"], json!("Scale"));
    assert_eq!(scale["apiVersion"], json!("autoscaling/v1"));
    assert_eq!((&meta["name"], &meta["namespace"]), (&json!("web"), &json!("bots")));
    assert!(meta["uid"].is_string() && meta["resourceVersion"].is_string());
    assert!(meta["creationTimestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(scale["spec"], json!({}));
    assert_eq!(scale["status"], json!({"replicas": 0, "selector": "app=web"}));
}

#[tokio::test]
async fn a_scaled_down_deployment_omits_its_zero_status_counts() {
    let harness = Harness::start().await;
    let deployment = harness.get(&format!("{DEPLOYMENTS}/web")).await.json();
    assert_eq!(deployment["spec"]["replicas"], json!(0));
    let status = deployment["status"].as_object().unwrap();
    for omitted in ["replicas", "readyReplicas", "availableReplicas", "updatedReplicas", "unavailableReplicas"] {
        assert!(!status.contains_key(omitted), "{omitted} is omitted: {status:?}");
    }
    assert_eq!(status["observedGeneration"], json!(1));
}

#[tokio::test]
async fn a_patch_bumps_resource_version_and_a_spec_change_bumps_generation() {
    let harness = Harness::start().await;
    let before = harness.get(&format!("{DEPLOYMENTS}/web")).await.json();
    let rv = |v: &serde_json::Value| v["metadata"]["resourceVersion"].as_str().unwrap().parse::<u64>().unwrap();
    let scale = harness.merge_patch(&format!("{DEPLOYMENTS}/web/scale"), r#"{"spec":{"replicas":2}}"#).await.json();
    assert!(rv(&scale) > rv(&before));
    assert_eq!(scale["spec"]["replicas"], json!(2));
    let after = harness.get(&format!("{DEPLOYMENTS}/web")).await.json();
    assert_eq!(after["metadata"]["generation"], json!(2));

    let annotated = harness
        .merge_patch(&format!("{DEPLOYMENTS}/web"), r#"{"metadata":{"annotations":{"toggle.example/replicas":"2"}}}"#)
        .await
        .json();
    assert!(rv(&annotated) > rv(&after));
    assert_eq!(annotated["metadata"]["generation"], json!(2));
    assert_eq!(annotated["metadata"]["annotations"]["toggle.example/replicas"], json!("2"));
}

#[tokio::test]
async fn a_patch_that_changes_nothing_keeps_the_resource_version() {
    let harness = Harness::start().await;
    let path = format!("{DEPLOYMENTS}/web/scale");
    let before = harness.get(&path).await.json();
    let patched = harness.merge_patch(&path, r#"{"spec":{"replicas":0}}"#).await.json();
    assert_eq!(patched["metadata"]["resourceVersion"], before["metadata"]["resourceVersion"]);
    assert_eq!(harness.get(&format!("{DEPLOYMENTS}/web")).await.json()["metadata"]["generation"], json!(1));
}

#[tokio::test]
async fn annotations_merge_and_null_removes_one() {
    let harness = Harness::start().await;
    let path = format!("{DEPLOYMENTS}/web");
    harness.merge_patch(&path, r#"{"metadata":{"annotations":{"a":"1","b":"2"}}}"#).await;
    harness.merge_patch(&path, r#"{"metadata":{"annotations":{"a":null}}}"#).await;
    let annotations = harness.server.annotations(test_apiserver::WorkloadKind::Deployment, "bots", "web").unwrap();
    assert_eq!(annotations.get("b").map(String::as_str), Some("2"));
    assert!(!annotations.contains_key("a"));
}

#[tokio::test]
async fn a_patch_with_a_stale_resource_version_is_the_real_409_body() {
    let harness = Harness::start().await;
    let path = format!("{DEPLOYMENTS}/web/scale");
    let stale = harness.get(&path).await.json()["metadata"]["resourceVersion"].clone();
    harness.merge_patch(&path, r#"{"spec":{"replicas":2}}"#).await;
    let body = json!({"metadata": {"resourceVersion": stale}, "spec": {"replicas": 1}});
    let reply = harness.merge_patch(&path, &body.to_string()).await;
    assert_eq!(reply.code, 409);
    assert_eq!(
        reply.text,
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Operation cannot be fulfilled on deployments.apps \"web\": the object has been modified; please apply your changes to the latest version and try again","reason":"Conflict","details":{"name":"web","group":"apps","kind":"deployments"},"code":409}"#
    );
}

#[tokio::test]
async fn a_put_scale_naming_another_object_is_a_400() {
    let harness = Harness::start().await;
    let reply = harness
        .send(
            Method::PUT,
            &format!("{DEPLOYMENTS}/web/scale"),
            Some("application/json"),
            r#"{"kind":"Scale","apiVersion":"autoscaling/v1","metadata":{"name":"other"},"spec":{"replicas":1}}"#,
        )
        .await;
    assert_eq!(reply.code, 400);
    assert_eq!(
        reply.json()["message"],
        json!("the name of the object (other) does not match the name on the URL (web)")
    );
}

#[tokio::test]
async fn a_patch_with_the_wrong_content_type_is_the_real_415_body() {
    let harness = Harness::start().await;
    let reply = harness
        .send(
            Method::PATCH,
            &format!("{DEPLOYMENTS}/web/scale"),
            Some("application/json"),
            r#"{"spec":{"replicas":1}}"#,
        )
        .await;
    assert_eq!(reply.code, 415);
    assert_eq!(
        reply.text,
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml","reason":"UnsupportedMediaType","code":415}"#
    );
}

#[tokio::test]
async fn strategic_merge_and_json_patch_are_accepted_too() {
    let harness = Harness::start().await;
    let path = format!("{DEPLOYMENTS}/web");
    let strategic = harness
        .send(Method::PATCH, &path, Some("application/strategic-merge-patch+json"), r#"{"spec":{"replicas":2}}"#)
        .await;
    assert_eq!(strategic.json()["spec"]["replicas"], json!(2));
    let json_patch = harness
        .send(
            Method::PATCH,
            &path,
            Some("application/json-patch+json"),
            r#"[{"op":"replace","path":"/spec/replicas","value":3}]"#,
        )
        .await;
    assert_eq!(json_patch.json()["spec"]["replicas"], json!(3));
}

#[tokio::test]
async fn negative_replicas_on_scale_are_the_real_422_body() {
    let harness = Harness::start().await;
    let reply = harness.merge_patch(&format!("{DEPLOYMENTS}/web/scale"), r#"{"spec":{"replicas":-1}}"#).await;
    assert_eq!(reply.code, 422);
    assert_eq!(
        reply.json(),
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "Scale.autoscaling \"web\" is invalid: spec.replicas: Invalid value: -1: must be greater than or equal to 0",
            "reason": "Invalid",
            "details": {"name": "web", "group": "autoscaling", "kind": "Scale", "causes": [{
                "reason": "FieldValueInvalid",
                "message": "Invalid value: -1: must be greater than or equal to 0",
                "field": "spec.replicas"
            }]},
            "code": 422
        })
    );
}

#[tokio::test]
async fn negative_replicas_on_the_deployment_name_the_deployment_kind() {
    let harness = Harness::start().await;
    let reply = harness.merge_patch(&format!("{DEPLOYMENTS}/web"), r#"{"spec":{"replicas":-3}}"#).await;
    assert_eq!(reply.code, 422);
    assert_eq!(reply.json()["details"]["kind"], json!("Deployment"));
    assert_eq!(reply.json()["details"]["group"], json!("apps"));
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_the_real_401_body() {
    let harness = Harness::start().await;
    for token in [Some("wrong"), None] {
        let reply = harness.send_as(Method::GET, &format!("{DEPLOYMENTS}/web"), None, "", token).await;
        assert_eq!(reply.code, 401);
        assert_eq!(
            reply.text,
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#
        );
    }
}

#[tokio::test]
async fn a_list_carries_its_resource_version_and_honours_field_selector_and_limit() {
    let harness = Harness::start().await;
    harness.server.add_deployment("bots", "api", 1);
    harness.server.add_deployment("other", "web", 1);
    let list = harness.get(&format!("{DEPLOYMENTS}?fieldSelector=metadata.name%3Dweb&limit=500")).await.json();
    assert_eq!(list["kind"], json!("DeploymentList"));
    assert_eq!(list["apiVersion"], json!("apps/v1"));
    assert_eq!(list["metadata"]["resourceVersion"], json!(harness.server.cluster().resource_version().to_string()));
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["metadata"]["name"], json!("web"));
    assert!(items[0].get("kind").is_none(), "list items carry no kind");

    let first = harness.get(&format!("{DEPLOYMENTS}?limit=1")).await.json();
    assert_eq!(first["items"][0]["metadata"]["name"], json!("api"));
    assert_eq!(first["metadata"]["remainingItemCount"], json!(1));
    let token = first["metadata"]["continue"].as_str().unwrap();
    let second = harness.get(&format!("{DEPLOYMENTS}?limit=1&continue={token}")).await.json();
    assert_eq!(second["items"][0]["metadata"]["name"], json!("web"));
    assert!(second["metadata"].get("continue").is_none());

    let everywhere = harness.get("/apis/apps/v1/deployments").await.json();
    assert_eq!(everywhere["items"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn an_unsupported_field_selector_is_a_400() {
    let harness = Harness::start().await;
    let reply = harness.get(&format!("{DEPLOYMENTS}?fieldSelector=spec.replicas%3D1")).await;
    assert_eq!(reply.code, 400);
    assert_eq!(reply.json()["message"], json!("field label not supported: spec.replicas"));
}

#[tokio::test]
async fn a_patch_body_that_is_not_json_is_a_400() {
    let harness = Harness::start().await;
    let reply = harness.send(Method::PATCH, &format!("{DEPLOYMENTS}/web/scale"), Some(MERGE), "{nope").await;
    assert_eq!(reply.code, 400);
    assert_eq!(reply.json()["reason"], json!("BadRequest"));
}
