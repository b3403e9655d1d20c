//! The RBAC table: 403s with the real message, and SelfSubjectAccessReview from the same table.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use test_apiserver::RbacRule;

use crate::support::{DEPLOYMENTS, Harness};

fn read_only() -> Vec<RbacRule> {
    vec![
        RbacRule::new("get", "deployments", "bots"),
        RbacRule::new("get", "deployments/scale", "bots"),
        RbacRule::new("list", "deployments", "bots"),
        RbacRule::new("watch", "deployments", "bots"),
    ]
}

#[tokio::test]
async fn a_denied_scale_patch_is_the_real_403_body() {
    let harness = Harness::start().await;
    harness.server.set_rbac(Some(read_only()));
    let reply = harness.merge_patch(&format!("{DEPLOYMENTS}/web/scale"), r#"{"spec":{"replicas":1}}"#).await;
    assert_eq!(reply.code, 403);
    assert_eq!(
        reply.text,
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"deployments.apps \"web\" is forbidden: User \"system:serviceaccount:toggle:matrix-k8s-toggle\" cannot patch resource \"deployments/scale\" in API group \"apps\" in the namespace \"bots\"","reason":"Forbidden","details":{"name":"web","group":"apps","kind":"deployments"},"code":403}"#
    );
    let allowed = harness.get(&format!("{DEPLOYMENTS}/web/scale")).await;
    assert_eq!(allowed.code, 200);
}

#[tokio::test]
async fn a_denied_list_names_no_object() {
    let harness = Harness::start().await;
    harness.server.set_rbac(Some(vec![RbacRule::new("get", "deployments", "bots")]));
    let reply = harness.get(DEPLOYMENTS).await;
    assert_eq!(reply.code, 403);
    assert_eq!(
        reply.json()["message"],
        json!(
            "deployments.apps is forbidden: User \"system:serviceaccount:toggle:matrix-k8s-toggle\" cannot list resource \"deployments\" in API group \"apps\" in the namespace \"bots\""
        )
    );
}

#[tokio::test]
async fn a_rule_limited_to_one_name_allows_only_that_object() {
    let harness = Harness::start().await;
    harness.server.add_deployment("bots", "other", 1);
    harness.server.set_rbac(Some(vec![RbacRule::new("patch", "deployments/scale", "bots").named("web")]));
    let body = r#"{"spec":{"replicas":1}}"#;
    assert_eq!(harness.merge_patch(&format!("{DEPLOYMENTS}/web/scale"), body).await.code, 200);
    assert_eq!(harness.merge_patch(&format!("{DEPLOYMENTS}/other/scale"), body).await.code, 403);
}

#[tokio::test]
async fn kube_rs_sees_a_forbidden_api_error() {
    let harness = Harness::start().await;
    harness.server.set_rbac(Some(read_only()));
    let api: Api<Deployment> = Api::namespaced(harness.kube().await, "bots");
    let patch = Patch::Merge(json!({"spec": {"replicas": 1}}));
    let Err(kube::Error::Api(status)) = api.patch_scale("web", &PatchParams::default(), &patch).await else {
        panic!("the patch is denied");
    };
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
}

fn review(verb: &str, subresource: &str) -> SelfSubjectAccessReview {
    SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some("bots".to_owned()),
                verb: Some(verb.to_owned()),
                group: Some("apps".to_owned()),
                resource: Some("deployments".to_owned()),
                subresource: Some(subresource.to_owned()),
                name: Some("web".to_owned()),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    }
}

#[tokio::test]
async fn self_subject_access_review_answers_from_the_same_table() {
    let harness = Harness::start().await;
    harness.server.set_rbac(Some(read_only()));
    let api: Api<SelfSubjectAccessReview> = Api::all(harness.kube().await);
    let get = api.create(&PostParams::default(), &review("get", "scale")).await.unwrap();
    let get = get.status.unwrap();
    assert!(get.allowed);
    assert!(get.reason.unwrap().starts_with("RBAC: allowed by RoleBinding"));
    let patch = api.create(&PostParams::default(), &review("patch", "scale")).await.unwrap();
    assert!(!patch.status.unwrap().allowed);
    let requests = harness.server.requests();
    let last = requests.last().unwrap();
    assert_eq!(last.path, "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews");
    assert_eq!(last.method, "POST");
}

#[tokio::test]
async fn self_subject_access_review_is_201_and_echoes_the_spec() {
    let harness = Harness::start().await;
    let reply = harness
        .send(
            reqwest::Method::POST,
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            Some("application/json"),
            r#"{"apiVersion":"authorization.k8s.io/v1","kind":"SelfSubjectAccessReview","spec":{"resourceAttributes":{"namespace":"bots","verb":"patch","group":"apps","resource":"deployments","subresource":"scale","name":"web"}}}"#,
        )
        .await;
    assert_eq!(reply.code, 201);
    let body = reply.json();
    assert_eq!(body["kind"], json!("SelfSubjectAccessReview"));
    assert_eq!(body["spec"]["resourceAttributes"]["subresource"], json!("scale"));
    assert_eq!(body["status"]["allowed"], json!(true));
}
