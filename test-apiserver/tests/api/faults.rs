//! Injected faults answer with the real bodies, then the server recovers.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use reqwest::Method;
use serde_json::json;
use test_apiserver::Fault;

use crate::support::{DEPLOYMENTS, Harness};

#[tokio::test]
async fn a_503_fault_answers_n_times_with_retry_after_then_recovers() {
    let harness = Harness::start().await;
    harness.server.inject_fault(Fault::new(503, 2));
    let path = format!("{DEPLOYMENTS}/web/scale");
    for _ in 0..2 {
        let reply = harness.get(&path).await;
        assert_eq!(reply.code, 503);
        assert_eq!(reply.headers["retry-after"], "1");
        assert_eq!(
            reply.text,
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server is currently unable to handle the request","reason":"ServiceUnavailable","code":503}"#
        );
    }
    assert_eq!(harness.get(&path).await.code, 200);
}

#[tokio::test]
async fn a_429_fault_carries_retry_after_seconds() {
    let harness = Harness::start().await;
    harness.server.inject_fault(Fault::new(429, 1));
    let reply = harness.get(&format!("{DEPLOYMENTS}/web")).await;
    assert_eq!(reply.code, 429);
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(reply.json()["reason"], json!("TooManyRequests"));
    assert_eq!(reply.json()["details"], json!({"retryAfterSeconds": 1}));
}

#[tokio::test]
async fn a_fault_limited_to_patch_on_scale_leaves_reads_alone() {
    let harness = Harness::start().await;
    harness.server.inject_fault(Fault::new(409, 1).on_method("PATCH").on_path("/scale"));
    let path = format!("{DEPLOYMENTS}/web/scale");
    assert_eq!(harness.get(&path).await.code, 200);
    let conflict = harness.merge_patch(&path, r#"{"spec":{"replicas":1}}"#).await;
    assert_eq!(conflict.code, 409);
    assert_eq!(
        conflict.json()["message"],
        json!(
            "Operation cannot be fulfilled on deployments.apps \"web\": the object has been modified; please apply your changes to the latest version and try again"
        )
    );
    assert_eq!(harness.merge_patch(&path, r#"{"spec":{"replicas":1}}"#).await.code, 200);
}

#[tokio::test]
async fn an_injected_403_names_the_refused_verb_and_subresource() {
    let harness = Harness::start().await;
    harness.server.inject_fault(Fault::new(403, 1));
    let reply = harness.merge_patch(&format!("{DEPLOYMENTS}/web/scale"), r#"{"spec":{"replicas":1}}"#).await;
    assert_eq!(reply.code, 403);
    assert!(reply.json()["message"].as_str().unwrap().contains("cannot patch resource \"deployments/scale\""));
}

#[tokio::test]
async fn an_injected_500_is_an_internal_error_for_kube_rs() {
    let harness = Harness::start().await;
    let api: Api<Deployment> = Api::namespaced(harness.kube().await, "bots");
    harness.server.inject_fault(Fault::new(500, 1));
    let Err(kube::Error::Api(status)) = api.get("web").await else {
        panic!("the fault answers");
    };
    assert_eq!((status.code, status.reason.as_str()), (500, "InternalError"));
    assert!(api.get("web").await.is_ok(), "the next request succeeds");
}

#[tokio::test]
async fn latency_delays_responses_until_it_is_lifted() {
    let harness = Harness::start().await;
    harness.server.set_latency(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(harness.get(&format!("{DEPLOYMENTS}/web")).await.code, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    harness.server.set_latency(Duration::ZERO);
    let started = Instant::now();
    harness.get(&format!("{DEPLOYMENTS}/web")).await;
    assert!(started.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn a_shut_down_server_refuses_connections() {
    let harness = Harness::start().await;
    let url = harness.server.url();
    let Harness { server, http, .. } = harness;
    server.shutdown().await;
    let result = http.request(Method::GET, format!("{url}{DEPLOYMENTS}/web")).send().await;
    assert!(result.unwrap_err().is_connect());
}
