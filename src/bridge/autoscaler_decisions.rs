//! What the bridge says and does beside an autoscaler: a HorizontalPodAutoscaler it names in
//! `status`, `stop` and `start`, a KEDA ScaledObject it pauses and resumes instead of fighting,
//! and drift notices that leave the autoscaler's own moves alone.

use test_apiserver::{AutoscalerKind, PAUSED_REPLICAS, RbacRule, WorkloadKind};

use super::fake::{Harness, room, user};
use super::*;

const HPA: &str = "allowed_users: ['@alice:example.org']\n\
                   targets:\n\
                   \x20 - {name: web, namespace: apps, autoscaler: hpa}\n\
                   \x20 - {name: db, namespace: apps}\n";

const KEDA: &str = "allowed_users: ['@alice:example.org']\n\
                    targets:\n\
                    \x20 - {name: web, namespace: apps, autoscaler: keda, scaled_object: web-scaler}\n";

fn harness(config: &str) -> (Harness, OwnedRoomId) {
    let h = Harness::new(config);
    let dm = room("dm");
    h.homeserver.room(&dm, &[&user("alice")]);
    (h, dm)
}

fn paused_at(h: &Harness) -> Option<String> {
    let object = h.cluster.autoscaler(AutoscalerKind::ScaledObject, "apps", "web-scaler").unwrap();
    object["metadata"]["annotations"][PAUSED_REPLICAS].as_str().map(str::to_owned)
}

#[tokio::test(start_paused = true)]
async fn status_stop_and_start_say_what_the_hpa_that_targets_the_workload_does() {
    let (h, dm) = harness(HPA);
    h.cluster.add_hpa("apps", "other", (WorkloadKind::Deployment, "db"), 1, 3, 2);
    h.cluster.add_hpa("apps", "web-hpa", (WorkloadKind::Deployment, "web"), 2, 6, 2);
    let status = h.say(&dm, &user("alice"), "status web").await;
    assert!(
        status[0].ends_with("; HPA web-hpa scales it between 2 and 6 replicas (it rests while the workload is at 0)"),
        "{status:?}"
    );
    let stop = h.say(&dm, &user("alice"), "stop web").await;
    assert_eq!(
        stop,
        [
            "web is stopping: 2 → 0 replicas (`start` brings back 2). HPA web-hpa rests while it is at 0 (an HPA does not scale from zero); `start` hands it back."
        ]
    );
    let start = h.say(&dm, &user("alice"), "start web").await;
    assert_eq!(start, ["web is starting: 0 → 2 replicas. HPA web-hpa scales it from here (2–6 replicas)."]);
    let db = h.say(&dm, &user("alice"), "status db").await;
    assert!(!db[0].contains("HPA"), "db names no autoscaler, so none is looked up: {db:?}");
}

#[tokio::test(start_paused = true)]
async fn an_hpa_target_without_an_hpa_says_so_and_one_that_cannot_be_read_does_not_stop_the_command() {
    let (h, dm) = harness(HPA);
    let status = h.say(&dm, &user("alice"), "status web").await;
    assert!(status[0].ends_with("; no HorizontalPodAutoscaler targets it"), "{status:?}");
    let rule = |verb: &str, resource: &str| RbacRule::new(verb, resource, "apps").named("web");
    h.cluster.set_rbac(Some(vec![
        rule("get", "deployments/scale"),
        rule("patch", "deployments/scale"),
        rule("get", "deployments"),
    ]));
    let stop = h.say(&dm, &user("alice"), "stop web").await;
    assert!(stop[0].starts_with("web is stopping: 2 → 0 replicas"), "{stop:?}");
    assert!(
        stop[0].contains("⚠️ Its autoscaler is unreadable: the bridge's ServiceAccount may not list horizontalpodautoscalers in namespace apps: grant `list` on `horizontalpodautoscalers` in its Role."),
        "{stop:?}"
    );
    assert_eq!(h.replicas("web"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_keda_target_is_paused_at_zero_by_stop_and_resumed_by_start() {
    let (h, dm) = harness(KEDA);
    h.cluster.add_scaled_object("apps", "web-scaler", "web", 1, 4);
    let stop = h.say(&dm, &user("alice"), "stop web").await;
    assert_eq!(
        stop,
        [
            "web is stopping: 2 → 0 replicas (`start` brings back 2). KEDA ScaledObject web-scaler is paused at 0 so it does not scale it back up; `start` resumes it."
        ]
    );
    assert_eq!(paused_at(&h).as_deref(), Some("0"));
    assert_eq!(h.replicas("web"), 0);
    let status = h.say(&dm, &user("alice"), "status web").await;
    assert!(
        status[0]
            .ends_with("; KEDA ScaledObject web-scaler is paused at 0 replicas (autoscaling.keda.sh/paused-replicas)"),
        "{status:?}"
    );
    let start = h.say(&dm, &user("alice"), "start web").await;
    assert_eq!(
        start,
        [
            "web is starting: 0 → 2 replicas. KEDA ScaledObject web-scaler is resumed and scales it from here (1–4 replicas)."
        ]
    );
    assert_eq!(paused_at(&h), None);
    assert_eq!(h.replicas("web"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_keda_target_whose_scaled_object_is_missing_or_may_not_be_paused_is_not_scaled() {
    let (h, dm) = harness(KEDA);
    let stop = h.say(&dm, &user("alice"), "stop web").await;
    assert_eq!(
        stop,
        [
            "⚠️ Could not stop web: KEDA ScaledObject apps/web-scaler does not exist: check the target's `scaled_object` (or remove `autoscaler: keda`); nothing was changed"
        ]
    );
    assert_eq!(h.replicas("web"), 2, "not scaled against an autoscaler it could not pause");
    h.cluster.add_scaled_object("apps", "web-scaler", "web", 1, 4);
    h.cluster.set_rbac(Some(vec![
        RbacRule::new("*", "deployments/scale", "apps"),
        RbacRule::new("get", "scaledobjects", "apps").in_group("keda.sh").named("web-scaler"),
    ]));
    let stop = h.say(&dm, &user("alice"), "stop web").await;
    assert!(
        stop[0].contains("may not patch scaledobjects in namespace apps: grant `patch` on `scaledobjects` (resourceNames: [web-scaler])"),
        "{stop:?}"
    );
    assert_eq!(h.replicas("web"), 2);
    assert_eq!(paused_at(&h), None);
}

#[tokio::test(start_paused = true)]
async fn beside_an_hpa_its_own_moves_are_not_drift_but_a_switch_back_on_is() {
    let (h, dm) = harness(HPA);
    h.cluster.add_hpa("apps", "web-hpa", (WorkloadKind::Deployment, "web"), 1, 6, 2);
    let t = h.bridge.config.target("web").unwrap().clone();
    h.bridge.on_observed(&t, &h.object("web").await).await.unwrap();
    h.scale_as("kube-controller-manager", "web", 5).await;
    h.bridge.on_observed(&t, &h.object("web").await).await.unwrap();
    h.say(&dm, &user("alice"), "stop web").await;
    h.bridge.on_observed(&t, &h.object("web").await).await.unwrap();
    h.scale_as("kubectl", "web", 3).await;
    h.bridge.on_observed(&t, &h.object("web").await).await.unwrap();
    let drift: Vec<String> = h.homeserver.sent().into_iter().filter(|m| m.starts_with("⚠️")).collect();
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert!(drift[0].starts_with("⚠️ web was scaled 0 → 3 by kubectl"), "{drift:?}");
}
