//! events.k8s.io Events: created as kube-rs's `Recorder` creates them, stored with the
//! server's metadata, refused by RBAC in their own API group.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use serde_json::json;
use test_apiserver::RbacRule;

use crate::support::Harness;

fn reference() -> ObjectReference {
    ObjectReference {
        api_version: Some("apps/v1".into()),
        kind: Some("Deployment".into()),
        name: Some("web".into()),
        namespace: Some("bots".into()),
        ..Default::default()
    }
}

fn scaled(note: &str) -> Event {
    Event {
        type_: EventType::Normal,
        reason: "ScaledByChat".into(),
        note: Some(note.into()),
        action: "Scale".into(),
        secondary: None,
    }
}

#[tokio::test]
async fn an_event_published_by_kube_rs_is_stored_with_its_reason_note_and_object() {
    let harness = Harness::start().await;
    let recorder = Recorder::new(harness.kube().await, Reporter { controller: "tester".into(), instance: None });
    recorder.publish(&scaled("Scaled to 0 by @alice:x"), &reference()).await.unwrap();
    let events = harness.server.events();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!((e["reason"].as_str(), e["note"].as_str()), (Some("ScaledByChat"), Some("Scaled to 0 by @alice:x")));
    assert_eq!(e["regarding"]["name"], "web");
    assert_eq!(e["metadata"]["namespace"], "bots");
    assert!(e["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36), "{e}");
}

#[tokio::test]
async fn an_event_name_is_taken_once_and_a_nameless_one_is_invalid() {
    let harness = Harness::start().await;
    let path = "/apis/events.k8s.io/v1/namespaces/bots/events";
    let body = json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "web.1"},
        "reportingController": "t", "reportingInstance": "t", "action": "Scale", "reason": "ScaledByChat",
        "eventTime": "2026-12-03T07:00:00.000000Z",
    });
    let post = |body: serde_json::Value| {
        let harness = &harness;
        async move { harness.send(reqwest::Method::POST, path, Some("application/json"), &body.to_string()).await }
    };
    assert_eq!(post(body.clone()).await.code, 201);
    let again = post(body.clone()).await;
    assert_eq!((again.code, again.json()["reason"].as_str()), (409, Some("AlreadyExists")));
    let mut nameless = body;
    nameless["metadata"] = json!({});
    assert_eq!(post(nameless).await.code, 422);
}

#[tokio::test]
async fn creating_an_event_needs_create_on_events_in_the_events_group() {
    let harness = Harness::start().await;
    harness.server.set_rbac(Some(vec![RbacRule::new("create", "events", "bots")]));
    let recorder = Recorder::new(harness.kube().await, Reporter { controller: "tester".into(), instance: None });
    let err = recorder.publish(&scaled("x"), &reference()).await.unwrap_err().to_string();
    assert!(err.contains("cannot create resource \"events\" in API group \"events.k8s.io\""), "{err}");
    harness.server.set_rbac(Some(vec![RbacRule::new("create", "events", "bots").in_group("events.k8s.io")]));
    recorder.publish(&scaled("y"), &reference()).await.unwrap();
    assert_eq!(harness.server.events().len(), 1);
}
