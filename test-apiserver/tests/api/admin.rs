//! The `/_test/` admin API steers the same knobs as the library.

use reqwest::Method;
use serde_json::json;

use crate::support::{DEPLOYMENTS, Harness, STATEFULSETS};

#[tokio::test]
async fn workloads_can_be_added_inspected_and_removed() {
    let harness = Harness::start().await;
    let added = harness
        .admin(
            Method::POST,
            "/workloads",
            Some(json!({"kind": "statefulset", "namespace": "bots", "name": "cache", "replicas": 2})),
        )
        .await;
    assert_eq!(added.code, 201);
    assert_eq!(harness.get(&format!("{STATEFULSETS}/cache/scale")).await.json()["spec"]["replicas"], json!(2));
    let shown = harness.admin(Method::GET, "/workloads/statefulset/bots/cache", None).await.json();
    assert_eq!((&shown["specReplicas"], &shown["readyReplicas"]), (&json!(2), &json!(2)));
    let removed = harness.admin(Method::DELETE, "/workloads/statefulsets/bots/cache", None).await;
    assert_eq!(removed.code, 204);
    assert_eq!(harness.get(&format!("{STATEFULSETS}/cache")).await.code, 404);
    let unknown = harness.admin(Method::GET, "/workloads/pods/bots/x", None).await;
    assert_eq!(unknown.code, 400);
}

#[tokio::test]
async fn controller_rbac_token_faults_and_requests_are_steerable() {
    let harness = Harness::start().await;
    let put = |path: &'static str, body| harness.admin(Method::PUT, path, Some(body));
    assert_eq!(put("/controller", json!({"mode": "never", "progressDeadlineMs": 1000})).await.code, 204);
    assert_eq!(
        harness.admin(Method::GET, "/controller", None).await.json(),
        json!({"mode": "never", "progressDeadlineMs": 1000})
    );

    put("/rbac", json!({"rules": [{"verb": "get", "resource": "deployments", "namespace": "bots"}]})).await;
    assert_eq!(harness.get(&format!("{DEPLOYMENTS}/web")).await.code, 200);
    assert_eq!(harness.get(&format!("{DEPLOYMENTS}/web/scale")).await.code, 403);
    put("/rbac", json!({"rules": null})).await;

    harness.admin(Method::POST, "/faults", Some(json!({"status": 503, "times": 1, "pathContains": "/scale"}))).await;
    assert_eq!(harness.get(&format!("{DEPLOYMENTS}/web/scale")).await.code, 503);
    assert_eq!(harness.get(&format!("{DEPLOYMENTS}/web/scale")).await.code, 200);

    let logged = harness.admin(Method::GET, "/requests", None).await.json();
    assert_eq!(logged.as_array().unwrap().len(), 4);
    assert_eq!(logged[0]["path"], json!(format!("{DEPLOYMENTS}/web")));
    assert_eq!(logged[0]["contentType"], json!(null));
    harness.admin(Method::DELETE, "/requests", None).await;
    assert!(harness.server.requests().is_empty());

    put("/token", json!({"token": "new"})).await;
    assert_eq!(harness.get(&format!("{DEPLOYMENTS}/web")).await.code, 401);
    let kubeconfig = harness.admin(Method::GET, "/kubeconfig", None).await.text;
    assert!(kubeconfig.contains("token: new"), "{kubeconfig}");
    assert!(kubeconfig.contains(&harness.server.url()), "{kubeconfig}");
}
