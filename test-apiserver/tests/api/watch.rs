//! Raw watch streams: newline-delimited events, bookmarks, 410 Expired, the close.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use test_apiserver::WorkloadKind;

use crate::support::{DEPLOYMENTS, Harness};

fn lines(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn a_watch_from_a_compacted_resource_version_gets_the_in_stream_410() {
    let harness = Harness::start().await;
    harness.server.compact_watch_history();
    let oldest = harness.server.cluster().resource_version();
    let reply = harness.get(&format!("{DEPLOYMENTS}?watch=true&resourceVersion=1&timeoutSeconds=5")).await;
    assert_eq!(reply.code, 200);
    assert_eq!(
        reply.text,
        format!(
            "{{\"type\":\"ERROR\",\"object\":{{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{{}},\"status\":\"Failure\",\"message\":\"too old resource version: 1 ({oldest})\",\"reason\":\"Expired\",\"code\":410}}}}\n"
        )
    );
}

#[tokio::test]
async fn a_watch_from_zero_starts_with_synthetic_added_events_and_ends_with_a_bookmark() {
    let harness = Harness::start().await;
    let started = Instant::now();
    let reply = harness
        .get(&format!("{DEPLOYMENTS}?watch=true&resourceVersion=0&allowWatchBookmarks=true&timeoutSeconds=1"))
        .await;
    assert!(started.elapsed() >= Duration::from_millis(900), "open until timeoutSeconds");
    assert_eq!(reply.headers["content-type"], "application/json");
    assert_eq!(reply.headers["transfer-encoding"], "chunked");
    let events = lines(&reply.text);
    assert_eq!(types(&events), ["ADDED", "BOOKMARK"]);
    assert_eq!(events[0]["object"]["kind"], json!("Deployment"));
    assert_eq!(events[0]["object"]["metadata"]["name"], json!("web"));
    let rv = harness.server.cluster().resource_version().to_string();
    assert_eq!(
        events[1],
        json!({"type": "BOOKMARK", "object": {"kind": "Deployment", "apiVersion": "apps/v1", "metadata": {"resourceVersion": rv}}})
    );
}

#[tokio::test]
async fn a_watch_without_bookmarks_sends_none() {
    let harness = Harness::start().await;
    let reply = harness.get(&format!("{DEPLOYMENTS}?watch=true&timeoutSeconds=1")).await;
    assert_eq!(types(&lines(&reply.text)), ["ADDED"]);
}

#[tokio::test]
async fn send_initial_events_ends_the_initial_state_with_an_annotated_bookmark() {
    let harness = Harness::start().await;
    let reply = harness
        .get(&format!(
            "{DEPLOYMENTS}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1"
        ))
        .await;
    let events = lines(&reply.text);
    assert_eq!(types(&events)[..2], ["ADDED", "BOOKMARK"]);
    assert_eq!(events[1]["object"]["metadata"]["annotations"], json!({"k8s.io/initial-events-end": "true"}));
}

#[tokio::test]
async fn a_watch_from_a_resource_version_replays_later_changes_including_deletes() {
    let harness = Harness::start().await;
    let rv = harness.server.cluster().resource_version();
    harness.server.add_deployment("bots", "extra", 1);
    assert!(harness.server.remove_workload(WorkloadKind::Deployment, "bots", "extra"));
    let reply = harness
        .get(&format!(
            "{DEPLOYMENTS}?watch=true&resourceVersion={rv}&timeoutSeconds=1&fieldSelector=metadata.name%3Dextra"
        ))
        .await;
    let events = lines(&reply.text);
    assert_eq!(types(&events), ["ADDED", "DELETED"]);
    let deleted_rv: u64 = events[1]["object"]["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
    assert_eq!(deleted_rv, rv + 2);
}

#[tokio::test]
async fn every_status_change_is_a_modified_event_with_a_new_resource_version() {
    let harness = Harness::start().await;
    let rv = harness.server.cluster().resource_version();
    let path =
        format!("{DEPLOYMENTS}?watch=true&resourceVersion={rv}&timeoutSeconds=2&fieldSelector=metadata.name%3Dweb");
    let watch = harness.get(&path);
    let patch = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        harness.merge_patch(&format!("{DEPLOYMENTS}/web/scale"), r#"{"spec":{"replicas":1}}"#).await
    };
    let (reply, _) = tokio::join!(watch, patch);
    let events = lines(&reply.text);
    assert_eq!(types(&events), ["MODIFIED", "MODIFIED", "MODIFIED"]);
    let versions: Vec<u64> =
        events.iter().map(|e| e["object"]["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap()).collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    let ready: Vec<&Value> = events.iter().map(|e| &e["object"]["status"]["readyReplicas"]).collect();
    assert_eq!(ready, [&Value::Null, &Value::Null, &json!(1)]);
    assert_eq!(events[0]["object"]["status"]["observedGeneration"], json!(1));
    assert_eq!(events[1]["object"]["status"]["observedGeneration"], json!(2));
}
