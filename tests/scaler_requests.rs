//! The exact requests the scaler sends (kube-rs over a `tower-test` mock service): path,
//! query, content type and body of every call, and how API errors become messages.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use http::{Request, Response};
use kube::{Client, client::Body};
use matrix_k8s_toggle::{
    config::{Autoscaler, Target, WorkloadKind},
    scaler::{Change, ReplicaMemory, RetryPolicy, ScaleError, Scaler},
};
use serde_json::{Value, json};
use tower_test::mock::{Handle, pair};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

fn target(kind: WorkloadKind) -> Target {
    Target::deployment("clawdbot", "clawdbot").with_kind(kind)
}

fn scaler() -> (Scaler, ApiHandle) {
    let (service, handle) = pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    (Scaler::new(client, RetryPolicy { attempts: 3, first_delay: Duration::from_millis(1) }), handle)
}

/// The bridge's own record of counts to restore, in memory; `broken` makes every call fail.
#[derive(Default)]
struct Memory {
    counts: Mutex<HashMap<String, i32>>,
    broken: bool,
}

impl Memory {
    fn with(workload: &str, replicas: i32) -> Self {
        let memory = Memory::default();
        memory.counts.lock().unwrap().insert(workload.into(), replicas);
        memory
    }

    fn count(&self, workload: &str) -> Option<i32> {
        self.counts.lock().unwrap().get(workload).copied()
    }
}

impl ReplicaMemory for Memory {
    fn recall(&self, t: &Target) -> Result<Option<i32>, String> {
        if self.broken {
            return Err("disk I/O error".into());
        }
        Ok(self.count(&t.workload))
    }

    fn remember(&self, t: &Target, replicas: i32) -> Result<(), String> {
        if self.broken {
            return Err("disk I/O error".into());
        }
        self.counts.lock().unwrap().insert(t.workload.clone(), replicas);
        Ok(())
    }
}

/// One expected request and the answer to give.
struct Step {
    method: &'static str,
    path_and_query: String,
    content_type: Option<&'static str>,
    body: Option<Value>,
    /// Parts of the body to check where the whole cannot be (a JSON pointer and its value).
    body_has: Vec<(&'static str, Value)>,
    status: u16,
    answer: Value,
}

fn get(path: &str, answer: Value) -> Step {
    Step {
        method: "GET",
        path_and_query: path.into(),
        content_type: None,
        body: None,
        body_has: vec![],
        status: 200,
        answer,
    }
}

fn merge_patch(path: &str, body: Value, answer: Value) -> Step {
    Step {
        method: "PATCH",
        path_and_query: format!("{path}?&fieldManager=matrix-k8s-toggle"),
        content_type: Some("application/merge-patch+json"),
        body: Some(body),
        body_has: vec![],
        status: 200,
        answer,
    }
}

fn failing(mut step: Step, status: u16, answer: Value) -> Step {
    step.status = status;
    step.answer = answer;
    step
}

/// How long a step waits for its request before the test fails (instead of hanging).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `steps` in order, asserting each request; panics on anything unexpected, and when an
/// expected request does not come.
fn serve(mut handle: ApiHandle, steps: Vec<Step>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for (i, step) in steps.into_iter().enumerate() {
            let (request, send) = tokio::time::timeout(STEP_TIMEOUT, handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("step {i}: no {} {} came", step.method, step.path_and_query))
                .unwrap_or_else(|| panic!("step {i}: no request came"));
            assert_eq!(request.method().as_str(), step.method, "step {i}");
            let pq = request.uri().path_and_query().unwrap().as_str().to_owned();
            assert_eq!(pq, step.path_and_query, "step {i}");
            let ct = request.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
            assert_eq!(ct.as_deref(), step.content_type, "step {i}");
            let bytes = request.into_body().collect_bytes().await.unwrap();
            if let Some(expected) = step.body {
                let body: Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(body, expected, "step {i}");
            }
            for (pointer, expected) in &step.body_has {
                let body: Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(body.pointer(pointer), Some(expected), "step {i}: {pointer} in {body}");
            }
            let response = Response::builder()
                .status(step.status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&step.answer).unwrap()))
                .unwrap();
            send.send_response(response);
        }
    })
}

const DEPLOY: &str = "/apis/apps/v1/namespaces/clawdbot/deployments/clawdbot";
const STS: &str = "/apis/apps/v1/namespaces/clawdbot/statefulsets/clawdbot";

fn scale(replicas: i32) -> Value {
    let spec = if replicas == 0 { json!({}) } else { json!({ "replicas": replicas }) };
    json!({"kind":"Scale","apiVersion":"autoscaling/v1",
        "metadata":{"name":"clawdbot","namespace":"clawdbot","uid":"u1","resourceVersion":"7","creationTimestamp":"2026-01-01T00:00:00Z"},
        "spec": spec, "status":{"replicas":replicas,"selector":"app=clawdbot"}})
}

fn deployment(annotations: Value) -> Value {
    json!({"kind":"Deployment","apiVersion":"apps/v1",
        "metadata":{"name":"clawdbot","namespace":"clawdbot","uid":"u1","resourceVersion":"7","generation":2,"annotations":annotations},
        "spec":{"selector":{"matchLabels":{"app":"clawdbot"}},"template":{"metadata":{"labels":{"app":"clawdbot"}}}},
        "status":{"observedGeneration":2}})
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":message,"reason":reason,
        "details":{"name":"clawdbot","group":"apps","kind":"deployments"},"code":code})
}

#[tokio::test]
async fn stop_keeps_the_count_in_the_bridges_memory_and_patches_only_the_scale_subresource() {
    let (scaler, handle) = scaler();
    let api = serve(
        handle,
        vec![
            get(&format!("{DEPLOY}/scale"), scale(3)),
            merge_patch(&format!("{DEPLOY}/scale"), json!({"spec":{"replicas":0}}), scale(0)),
        ],
    );
    let memory = Memory::default();
    let change = scaler.stop(&target(WorkloadKind::Deployment), &memory).await.unwrap();
    assert_eq!(change, Change::Scaled { from: 3, to: 0 });
    assert_eq!(memory.count("clawdbot"), Some(3));
    api.await.unwrap();
}

#[tokio::test]
async fn a_stop_whose_count_cannot_be_kept_changes_nothing() {
    let (scaler, handle) = scaler();
    let api = serve(handle, vec![get(&format!("{DEPLOY}/scale"), scale(3))]);
    let memory = Memory { broken: true, ..Memory::default() };
    let err = scaler.stop(&target(WorkloadKind::Deployment), &memory).await.unwrap_err();
    assert!(matches!(&err, ScaleError::Memory(_)), "{err:?}");
    assert!(err.to_string().contains("nothing was changed"), "{err}");
    api.await.unwrap();
}

#[tokio::test]
async fn start_restores_the_count_the_bridge_kept_with_one_patch_and_no_read_of_the_workload() {
    let (scaler, handle) = scaler();
    let api = serve(
        handle,
        vec![
            get(&format!("{DEPLOY}/scale"), scale(0)),
            merge_patch(&format!("{DEPLOY}/scale"), json!({"spec":{"replicas":3}}), scale(3)),
        ],
    );
    let memory = Memory::with("clawdbot", 3);
    let change = scaler.start(&target(WorkloadKind::Deployment), None, &memory).await.unwrap();
    assert_eq!(change, Change::Scaled { from: 0, to: 3 });
    api.await.unwrap();
}

#[tokio::test]
async fn start_of_a_workload_stopped_by_an_earlier_version_restores_the_count_in_its_annotation() {
    let (scaler, handle) = scaler();
    let api = serve(
        handle,
        vec![
            get(&format!("{DEPLOY}/scale"), scale(0)),
            get(DEPLOY, deployment(json!({"matrix-k8s-toggle/replicas-before-stop":"3"}))),
            merge_patch(&format!("{DEPLOY}/scale"), json!({"spec":{"replicas":3}}), scale(3)),
        ],
    );
    let change = scaler.start(&target(WorkloadKind::Deployment), None, &Memory::default()).await.unwrap();
    assert_eq!(change, Change::Scaled { from: 0, to: 3 });
    api.await.unwrap();
}

#[tokio::test]
async fn start_without_a_remembered_count_scales_to_one() {
    let (scaler, handle) = scaler();
    let api = serve(
        handle,
        vec![
            get(&format!("{DEPLOY}/scale"), scale(0)),
            get(DEPLOY, deployment(json!({}))),
            merge_patch(&format!("{DEPLOY}/scale"), json!({"spec":{"replicas":1}}), scale(1)),
        ],
    );
    let change = scaler.start(&target(WorkloadKind::Deployment), None, &Memory::default()).await.unwrap();
    assert_eq!(change, Change::Scaled { from: 0, to: 1 });
    api.await.unwrap();
}

#[tokio::test]
async fn start_of_a_running_workload_sends_no_patch() {
    let (scaler, handle) = scaler();
    let api = serve(handle, vec![get(&format!("{DEPLOY}/scale"), scale(2))]);
    assert_eq!(
        scaler.start(&target(WorkloadKind::Deployment), None, &Memory::default()).await.unwrap(),
        Change::Unchanged { replicas: 2 }
    );
    api.await.unwrap();
}

#[tokio::test]
async fn a_statefulset_is_scaled_through_its_own_scale_subresource() {
    let (scaler, handle) = scaler();
    let api = serve(
        handle,
        vec![
            get(&format!("{STS}/scale"), scale(0)),
            merge_patch(&format!("{STS}/scale"), json!({"spec":{"replicas":2}}), scale(2)),
        ],
    );
    let change = scaler.start(&target(WorkloadKind::StatefulSet), Some(2), &Memory::default()).await.unwrap();
    assert_eq!(change, Change::Scaled { from: 0, to: 2 });
    api.await.unwrap();
}

#[tokio::test]
async fn a_forbidden_patch_names_the_verb_and_resource_the_service_account_lacks() {
    let (scaler, handle) = scaler();
    let msg = "deployments.apps \"clawdbot\" is forbidden: User \"system:serviceaccount:toggle:matrix-k8s-toggle\" cannot patch resource \"deployments/scale\" in API group \"apps\" in the namespace \"clawdbot\"";
    let api = serve(
        handle,
        vec![
            get(&format!("{DEPLOY}/scale"), scale(0)),
            get(DEPLOY, deployment(json!({}))),
            failing(
                merge_patch(&format!("{DEPLOY}/scale"), json!({"spec":{"replicas":1}}), json!({})),
                403,
                status_body(403, "Forbidden", msg),
            ),
        ],
    );
    let err = scaler.start(&target(WorkloadKind::Deployment), None, &Memory::default()).await.unwrap_err();
    assert!(
        matches!(&err, ScaleError::Forbidden { verb: "patch", resource, .. } if resource == "deployments/scale"),
        "{err:?}"
    );
    assert!(err.to_string().contains("grant `patch` on `deployments/scale`"), "{err}");
    api.await.unwrap();
}

#[tokio::test]
async fn a_missing_workload_is_named() {
    let (scaler, handle) = scaler();
    let api = serve(
        handle,
        vec![failing(
            get(&format!("{DEPLOY}/scale"), json!({})),
            404,
            status_body(404, "NotFound", "deployments.apps \"clawdbot\" not found"),
        )],
    );
    let err = scaler.stop(&target(WorkloadKind::Deployment), &Memory::default()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "Deployment clawdbot/clawdbot does not exist: check the target's namespace and workload name"
    );
    api.await.unwrap();
}

#[tokio::test]
async fn unavailable_answers_are_retried_then_succeed() {
    let (scaler, handle) = scaler();
    let api = serve(
        handle,
        vec![
            failing(get(&format!("{DEPLOY}/scale"), json!({})), 503, status_body(503, "ServiceUnavailable", "busy")),
            failing(get(&format!("{DEPLOY}/scale"), json!({})), 429, status_body(429, "TooManyRequests", "slow down")),
            get(&format!("{DEPLOY}/scale"), scale(0)),
        ],
    );
    assert_eq!(
        scaler.stop(&target(WorkloadKind::Deployment), &Memory::default()).await.unwrap(),
        Change::Unchanged { replicas: 0 }
    );
    api.await.unwrap();
}

#[tokio::test]
async fn unavailable_answers_are_reported_after_the_last_attempt() {
    let (scaler, handle) = scaler();
    let fail = || failing(get(&format!("{DEPLOY}/scale"), json!({})), 500, status_body(500, "InternalError", "boom"));
    let api = serve(handle, vec![fail(), fail(), fail()]);
    let err = scaler.stop(&target(WorkloadKind::Deployment), &Memory::default()).await.unwrap_err();
    assert!(matches!(err, ScaleError::Unavailable(_, 3)), "{err:?}");
    api.await.unwrap();
}

const SCALED_OBJECT: &str = "/apis/keda.sh/v1alpha1/namespaces/clawdbot/scaledobjects/agent-so";

fn scaled_object(paused: Option<&str>) -> Value {
    let annotations = match paused {
        Some(at) => json!({ "autoscaling.keda.sh/paused-replicas": at }),
        None => json!({}),
    };
    json!({"kind":"ScaledObject","apiVersion":"keda.sh/v1alpha1",
        "metadata":{"name":"agent-so","namespace":"clawdbot","uid":"k1","resourceVersion":"9","annotations":annotations},
        "spec":{"scaleTargetRef":{"name":"clawdbot"},"minReplicaCount":1,"maxReplicaCount":4}})
}

fn keda_target() -> Target {
    target(WorkloadKind::Deployment).with_autoscaler(Autoscaler::Keda { scaled_object: "agent-so".into() })
}

#[tokio::test]
async fn stop_beside_keda_keeps_the_count_then_pauses_the_scaled_object_at_zero_then_scales() {
    let (scaler, handle) = scaler();
    let paused = json!({"metadata":{"annotations":{"autoscaling.keda.sh/paused-replicas":"0"}}});
    let api = serve(
        handle,
        vec![
            get(&format!("{DEPLOY}/scale"), scale(3)),
            merge_patch(SCALED_OBJECT, paused, scaled_object(Some("0"))),
            merge_patch(&format!("{DEPLOY}/scale"), json!({"spec":{"replicas":0}}), scale(0)),
        ],
    );
    let memory = Memory::default();
    let change = scaler.stop(&keda_target(), &memory).await.unwrap();
    assert_eq!(change, Change::Scaled { from: 3, to: 0 });
    assert_eq!(memory.count("clawdbot"), Some(3));
    api.await.unwrap();
}

#[tokio::test]
async fn start_beside_keda_removes_the_pause_before_it_restores_the_count() {
    let (scaler, handle) = scaler();
    let resumed = json!({"metadata":{"annotations":{"autoscaling.keda.sh/paused-replicas":null}}});
    let api = serve(
        handle,
        vec![
            get(&format!("{DEPLOY}/scale"), scale(0)),
            merge_patch(SCALED_OBJECT, resumed, scaled_object(None)),
            merge_patch(&format!("{DEPLOY}/scale"), json!({"spec":{"replicas":3}}), scale(3)),
        ],
    );
    let change = scaler.start(&keda_target(), None, &Memory::with("clawdbot", 3)).await.unwrap();
    assert_eq!(change, Change::Scaled { from: 0, to: 3 });
    api.await.unwrap();
}

#[tokio::test]
async fn a_stop_whose_scaled_object_may_not_be_patched_leaves_the_workload_running() {
    let (scaler, handle) = scaler();
    let paused = json!({"metadata":{"annotations":{"autoscaling.keda.sh/paused-replicas":"0"}}});
    let forbidden = json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Forbidden","code":403,
        "message":"scaledobjects.keda.sh \"agent-so\" is forbidden: User \"system:serviceaccount:toggle:matrix-k8s-toggle\" cannot patch resource \"scaledobjects\" in API group \"keda.sh\" in the namespace \"clawdbot\""});
    let api = serve(
        handle,
        vec![
            get(&format!("{DEPLOY}/scale"), scale(3)),
            failing(merge_patch(SCALED_OBJECT, paused, json!({})), 403, forbidden),
        ],
    );
    let err = scaler.stop(&keda_target(), &Memory::default()).await.unwrap_err();
    assert!(matches!(&err, ScaleError::Forbidden { .. }), "{err:?}");
    assert!(err.to_string().contains("patch scaledobjects"), "the message names the permission: {err}");
    api.await.unwrap();
}

#[tokio::test]
async fn the_event_after_a_scale_names_the_workload_by_the_uid_its_scale_gave_without_reading_it() {
    let (scaler, handle) = scaler();
    let event = Step {
        method: "POST",
        path_and_query: "/apis/events.k8s.io/v1/namespaces/clawdbot/events?".into(),
        content_type: Some("application/json"),
        body: None,
        body_has: vec![
            ("/regarding/uid", json!("u1")),
            ("/regarding/kind", json!("Deployment")),
            ("/reason", json!("ScaledByChat")),
        ],
        status: 201,
        answer: json!({"kind":"Event","apiVersion":"events.k8s.io/v1","metadata":{"name":"clawdbot.1","namespace":"clawdbot"},"eventTime":"2026-01-01T00:00:00.000000Z"}),
    };
    let api = serve(
        handle,
        vec![
            get(&format!("{DEPLOY}/scale"), scale(3)),
            merge_patch(&format!("{DEPLOY}/scale"), json!({"spec":{"replicas":0}}), scale(0)),
            event,
        ],
    );
    let t = target(WorkloadKind::Deployment);
    scaler.stop(&t, &Memory::default()).await.unwrap();
    scaler.record(&t, "ScaledByChat", "Scaled to 0 by @alice:example.org via Matrix").await.unwrap();
    api.await.unwrap();
}
