//! The request log.

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::support::{DEPLOYMENTS, Harness};

#[tokio::test]
async fn every_request_is_logged_with_method_path_query_content_type_and_body() {
    let harness = Harness::start().await;
    let api: Api<Deployment> = Api::namespaced(harness.kube().await, "bots");
    let params = PatchParams { field_manager: Some("matrix-k8s-toggle".to_owned()), ..PatchParams::default() };
    api.get_scale("web").await.unwrap();
    api.patch_scale("web", &params, &Patch::Merge(json!({"spec": {"replicas": 1}}))).await.unwrap();
    let requests = harness.server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].method, "GET");
    assert_eq!(requests[0].path, format!("{DEPLOYMENTS}/web/scale"));
    let patch = &requests[1];
    assert_eq!(patch.method, "PATCH");
    assert_eq!(patch.content_type.as_deref(), Some("application/merge-patch+json"));
    assert_eq!(patch.query_param("fieldManager").as_deref(), Some("matrix-k8s-toggle"));
    assert_eq!(patch.json(), Some(json!({"spec": {"replicas": 1}})));
}

#[tokio::test]
async fn denied_and_faulted_requests_are_logged_too_and_the_log_can_be_cleared() {
    let harness = Harness::start().await;
    harness.server.inject_fault(test_apiserver::Fault::new(500, 1));
    harness.get(&format!("{DEPLOYMENTS}/web")).await;
    harness.send_as(reqwest::Method::GET, DEPLOYMENTS, None, "", Some("bad")).await;
    assert_eq!(harness.server.requests().len(), 2);
    harness.server.clear_requests();
    assert!(harness.server.requests().is_empty());
}
