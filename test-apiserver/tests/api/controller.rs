//! The simulated controller, observed through GETs on the API.

use std::time::Duration;

use serde_json::{Value, json};
use test_apiserver::{ControllerMode, WorkloadKind};

use crate::support::{DEPLOYMENTS, Harness, STATEFULSETS, eventually};

fn condition<'a>(deployment: &'a Value, type_: &str) -> &'a Value {
    deployment["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

#[tokio::test]
async fn scaling_up_is_observed_then_becomes_ready_and_available() {
    let harness = Harness::start().await;
    harness.merge_patch(&format!("{DEPLOYMENTS}/web/scale"), r#"{"spec":{"replicas":2}}"#).await;
    eventually(Duration::from_secs(5), "ready", || async {
        harness.server.replicas(WorkloadKind::Deployment, "bots", "web") == Some((2, 2))
    })
    .await;
    let deployment = harness.get(&format!("{DEPLOYMENTS}/web")).await.json();
    let status = &deployment["status"];
    assert_eq!(status["observedGeneration"], json!(2));
    assert_eq!(
        (&status["replicas"], &status["updatedReplicas"], &status["availableReplicas"]),
        (&json!(2), &json!(2), &json!(2))
    );
    assert!(status.get("unavailableReplicas").is_none());
    assert_eq!(condition(&deployment, "Available")["status"], json!("True"));
    assert_eq!(condition(&deployment, "Progressing")["reason"], json!("NewReplicaSetAvailable"));
}

#[tokio::test]
async fn scaling_to_zero_is_observably_stopping_before_it_is_stopped() {
    let harness = Harness::start().await;
    harness.server.add_deployment("bots", "up", 1);
    harness.server.set_controller(ControllerMode::Ready { after: Duration::from_millis(500) });
    harness.merge_patch(&format!("{DEPLOYMENTS}/up/scale"), r#"{"spec":{"replicas":0}}"#).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let scale = harness.get(&format!("{DEPLOYMENTS}/up/scale")).await.json();
    assert_eq!(scale["spec"], json!({}));
    assert_eq!(scale["status"]["replicas"], json!(1), "still stopping");
    eventually(Duration::from_secs(5), "stopped", || async {
        harness.get(&format!("{DEPLOYMENTS}/up/scale")).await.json()["status"]["replicas"] == 0
    })
    .await;
}

#[tokio::test]
async fn a_never_ready_deployment_reports_progress_deadline_exceeded() {
    let harness = Harness::start().await;
    harness.server.set_controller(ControllerMode::Never { progress_deadline: Duration::from_millis(300) });
    harness.merge_patch(&format!("{DEPLOYMENTS}/web/scale"), r#"{"spec":{"replicas":1}}"#).await;
    eventually(Duration::from_secs(5), "the deadline", || async {
        let deployment = harness.get(&format!("{DEPLOYMENTS}/web")).await.json();
        condition(&deployment, "Progressing")["reason"] == "ProgressDeadlineExceeded"
    })
    .await;
    let deployment = harness.get(&format!("{DEPLOYMENTS}/web")).await.json();
    let progressing = condition(&deployment, "Progressing");
    assert_eq!(progressing["status"], json!("False"));
    let message = progressing["message"].as_str().unwrap();
    assert!(message.starts_with("ReplicaSet \"web-") && message.ends_with("\" has timed out progressing."));
    assert_eq!(condition(&deployment, "Available")["reason"], json!("MinimumReplicasUnavailable"));
    assert_eq!(deployment["status"]["replicas"], json!(1));
    assert_eq!(deployment["status"]["unavailableReplicas"], json!(1));
    assert!(deployment["status"].get("readyReplicas").is_none());
}

#[tokio::test]
async fn a_partial_rollout_stops_at_the_given_ready_count() {
    let harness = Harness::start().await;
    harness.server.set_controller(ControllerMode::Partial { ready: 1, after: Duration::from_millis(100) });
    harness.merge_patch(&format!("{DEPLOYMENTS}/web/scale"), r#"{"spec":{"replicas":3}}"#).await;
    eventually(Duration::from_secs(5), "one ready", || async {
        harness.server.replicas(WorkloadKind::Deployment, "bots", "web") == Some((3, 1))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deployment = harness.get(&format!("{DEPLOYMENTS}/web")).await.json();
    assert_eq!(deployment["status"]["readyReplicas"], json!(1));
    assert_eq!(condition(&deployment, "Progressing")["reason"], json!("ReplicaSetUpdated"));
}

#[tokio::test]
async fn a_statefulset_becomes_ready_one_pod_at_a_time() {
    let harness = Harness::start().await;
    harness.merge_patch(&format!("{STATEFULSETS}/db/scale"), r#"{"spec":{"replicas":2}}"#).await;
    eventually(Duration::from_secs(5), "one pod", || async {
        harness.server.replicas(WorkloadKind::StatefulSet, "bots", "db") == Some((2, 1))
    })
    .await;
    eventually(Duration::from_secs(5), "both pods", || async {
        harness.server.replicas(WorkloadKind::StatefulSet, "bots", "db") == Some((2, 2))
    })
    .await;
    let status = harness.get(&format!("{STATEFULSETS}/db")).await.json()["status"].clone();
    assert_eq!(status["currentRevision"], status["updateRevision"]);
    assert_eq!(status["availableReplicas"], json!(2));
}
