//! kube-rs, configured from the written kubeconfig, against the server.

use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher;
use serde_json::json;
use test_apiserver::WorkloadKind;

use crate::support::Harness;

fn manager() -> PatchParams {
    PatchParams { field_manager: Some("matrix-k8s-toggle".to_owned()), ..PatchParams::default() }
}

#[tokio::test]
async fn kube_rs_reads_a_zero_scale_as_missing_spec_replicas() {
    let harness = Harness::start().await;
    let api: Api<Deployment> = Api::namespaced(harness.kube().await, "bots");
    let scale = api.get_scale("web").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, None);
    assert_eq!(scale.status.unwrap().replicas, 0);
    assert_eq!(scale.metadata.name.as_deref(), Some("web"));
}

#[tokio::test]
async fn kube_rs_scales_a_deployment_with_a_merge_patch_on_the_scale_subresource() {
    let harness = Harness::start().await;
    let api: Api<Deployment> = Api::namespaced(harness.kube().await, "bots");
    let patch = Patch::Merge(json!({"spec": {"replicas": 1}}));
    let scale = api.patch_scale("web", &manager(), &patch).await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(1));
    assert_eq!(harness.server.replicas(WorkloadKind::Deployment, "bots", "web").map(|r| r.0), Some(1));
    let deployment = api.get("web").await.unwrap();
    assert_eq!(deployment.metadata.generation, Some(2));
    let managers: Vec<_> =
        deployment.metadata.managed_fields.unwrap_or_default().into_iter().filter_map(|m| m.manager).collect();
    assert_eq!(managers, ["matrix-k8s-toggle"]);
}

#[tokio::test]
async fn kube_rs_scales_a_statefulset_too() {
    let harness = Harness::start().await;
    let api: Api<StatefulSet> = Api::namespaced(harness.kube().await, "bots");
    let patch = Patch::Merge(json!({"spec": {"replicas": 2}}));
    api.patch_scale("db", &manager(), &patch).await.unwrap();
    let scale = api.get_scale("db").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    assert_eq!(scale.status.unwrap().selector.as_deref(), Some("app=db"));
}

#[tokio::test]
async fn a_kube_rs_watcher_sees_modified_events_until_the_deployment_is_ready() {
    let harness = Harness::start().await;
    let api: Api<Deployment> = Api::namespaced(harness.kube().await, "bots");
    let mut events = watcher(api.clone(), watcher::Config::default().fields("metadata.name=web")).boxed();
    let Some(watcher::Event::Init) = events.try_next().await.unwrap() else {
        panic!("a watcher starts with Init");
    };
    let patch = Patch::Merge(json!({"spec": {"replicas": 1}}));
    api.patch_scale("web", &manager(), &patch).await.unwrap();
    let mut seen = Vec::new();
    let ready = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = events.try_next().await.unwrap() {
            if let watcher::Event::Apply(d) | watcher::Event::InitApply(d) = event {
                let status = d.status.clone().unwrap_or_default();
                seen.push((status.replicas, status.ready_replicas));
                if status.ready_replicas == Some(1) {
                    return d;
                }
            }
        }
        panic!("the watch ended");
    })
    .await
    .expect("ready within 10s");
    assert_eq!(ready.status.unwrap().observed_generation, Some(2));
    assert!(seen.contains(&(Some(1), None)), "a MODIFIED with a created but unready pod comes first: {seen:?}");
}

#[tokio::test]
async fn a_kube_rs_watcher_relists_after_an_in_stream_410_expired() {
    let harness = Harness::start().await;
    let api: Api<Deployment> = Api::namespaced(harness.kube().await, "bots");
    let config = watcher::Config::default().fields("metadata.name=web").timeout(1).disable_bookmarks();
    let mut events = watcher(api, config).boxed();
    for _ in 0..3 {
        events.try_next().await.unwrap();
    }
    harness.server.add_deployment("bots", "other", 1);
    harness.server.compact_watch_history();
    let next = tokio::time::timeout(Duration::from_secs(5), events.next()).await.expect("the resumed watch answers");
    let Some(Err(watcher::Error::WatchError(status))) = next else {
        panic!("the resumed watch is expired: {next:?}");
    };
    assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
    let relisted =
        tokio::time::timeout(Duration::from_secs(5), events.try_next()).await.expect("the watcher re-lists").unwrap();
    assert!(matches!(relisted, Some(watcher::Event::Init)));
}

#[tokio::test]
async fn a_kube_rs_streaming_list_watcher_gets_initial_events_then_init_done() {
    let harness = Harness::start().await;
    let api: Api<Deployment> = Api::namespaced(harness.kube().await, "bots");
    let config = watcher::Config::default().streaming_lists();
    let events: Vec<_> = watcher(api, config).take(3).try_collect().await.unwrap();
    assert!(matches!(events[0], watcher::Event::Init));
    assert!(matches!(&events[1], watcher::Event::InitApply(d) if d.metadata.name.as_deref() == Some("web")));
    assert!(matches!(events[2], watcher::Event::InitDone));
    let watch = harness.server.requests().pop().unwrap();
    assert_eq!(watch.query_param("sendInitialEvents").as_deref(), Some("true"));
}

#[tokio::test]
async fn api_watch_streams_changes_after_a_resource_version_and_closes_at_the_timeout() {
    let harness = Harness::start().await;
    let api: Api<Deployment> = Api::namespaced(harness.kube().await, "bots");
    let rv = api.get("web").await.unwrap().metadata.resource_version.unwrap();
    let params = WatchParams::default().fields("metadata.name=web").timeout(2);
    let stream = api.watch(&params, &rv).await.unwrap();
    let patch = Patch::Merge(json!({"spec": {"replicas": 1}}));
    api.patch_scale("web", &manager(), &patch).await.unwrap();
    let events: Vec<_> = tokio::time::timeout(Duration::from_secs(5), stream.try_collect())
        .await
        .expect("the stream closes at timeoutSeconds")
        .unwrap();
    let modified = events.iter().filter(|e| matches!(e, WatchEvent::Modified(_))).count();
    assert!(modified >= 3, "the patch, the controller observing it, the pod ready: {events:?}");
    assert!(matches!(events.last(), Some(WatchEvent::Bookmark(_))), "a bookmark comes before the close: {events:?}");
}

#[tokio::test]
async fn replace_scale_with_a_stale_resource_version_is_a_409_conflict() {
    let harness = Harness::start().await;
    let api: Api<Deployment> = Api::namespaced(harness.kube().await, "bots");
    let stale = api.get_scale("web").await.unwrap();
    let patch = Patch::Merge(json!({"spec": {"replicas": 1}}));
    api.patch_scale("web", &manager(), &patch).await.unwrap();
    let Err(kube::Error::Api(status)) = api.replace_scale("web", &PostParams::default(), &stale).await else {
        panic!("a stale replace fails");
    };
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
}

#[tokio::test]
async fn replace_scale_with_the_current_resource_version_succeeds() {
    let harness = Harness::start().await;
    let api: Api<Deployment> = Api::namespaced(harness.kube().await, "bots");
    let mut scale = api.get_scale("web").await.unwrap();
    scale.spec.get_or_insert_default().replicas = Some(3);
    let replaced = api.replace_scale("web", &PostParams::default(), &scale).await.unwrap();
    assert_eq!(replaced.spec.unwrap().replicas, Some(3));
}

#[tokio::test]
async fn kube_rs_replaces_a_deployment_and_a_stale_replace_conflicts() {
    let harness = Harness::start().await;
    let api: Api<Deployment> = Api::namespaced(harness.kube().await, "bots");
    let mut deployment = api.get("web").await.unwrap();
    let stale = deployment.clone();
    deployment
        .metadata
        .annotations
        .get_or_insert_default()
        .insert("toggle.example/replicas".to_owned(), "1".to_owned());
    let replaced = api.replace("web", &PostParams::default(), &deployment).await.unwrap();
    assert_eq!(replaced.metadata.generation, Some(1), "metadata is not spec");
    assert_eq!(
        harness.server.annotations(WorkloadKind::Deployment, "bots", "web").unwrap()["toggle.example/replicas"],
        "1"
    );
    let Err(kube::Error::Api(status)) = api.replace("web", &PostParams::default(), &stale).await else {
        panic!("a stale replace fails");
    };
    assert_eq!(status.code, 409);
}

#[tokio::test]
async fn kube_rs_reports_a_missing_deployment_as_a_404_api_error() {
    let harness = Harness::start().await;
    let api: Api<Deployment> = Api::namespaced(harness.kube().await, "bots");
    let Err(kube::Error::Api(status)) = api.get_scale("nope").await else {
        panic!("a missing deployment fails");
    };
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    assert_eq!(status.message, "deployments.apps \"nope\" not found");
}

#[tokio::test]
async fn kube_rs_with_a_revoked_token_gets_401() {
    let harness = Harness::start().await;
    let api: Api<Deployment> = Api::namespaced(harness.kube().await, "bots");
    harness.server.set_token("rotated");
    let Err(kube::Error::Api(status)) = api.get("web").await else {
        panic!("a revoked token fails");
    };
    assert_eq!((status.code, status.reason.as_str()), (401, "Unauthorized"));
}
