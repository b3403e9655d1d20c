#![recursion_limit = "256"]
//! Commands end to end in plain rooms: a real Synapse, our server, the test apiserver, and
//! people chatting through the client-server API.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{
    deploy_role_rules,
    stack::{BOT, Stack, StackBuilder, WAIT},
};
use test_apiserver::{ControllerMode, RbacRule, TestApiServer, WorkloadKind};

/// The default stack with `api` and rollouts followed for 20 s.
fn with(api: TestApiServer) -> StackBuilder {
    Stack::build().api(api).env("ROLLOUT_TIMEOUT_SECS", "20")
}

/// Deployment clawdbot/clawdbot at `replicas`, ready 300 ms after a change.
async fn stack(replicas: i32) -> Stack {
    let api = TestApiServer::start().await.unwrap();
    api.add_deployment("clawdbot", "clawdbot", replicas);
    api.set_controller(ControllerMode::Ready { after: Duration::from_millis(300) });
    with(api).start().await
}

fn body(event: &Value) -> &str {
    event["content"]["body"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_remembers_the_count_and_start_restores_it_after_a_restart_with_exactly_one_patch() {
    let mut s = stack(3).await;
    let alice = s.user("alice").await;
    let room = s.dm(&alice).await;

    let stop = alice.send_text(&room, "stop").await;
    let replies = alice.wait_for_messages(&room, BOT, 1, WAIT).await;
    assert!(body(&replies[0]).contains("clawdbot is stopping: 3 → 0"), "{}", body(&replies[0]));
    assert_eq!(replies[0]["content"]["msgtype"], "m.notice");
    assert_eq!(replies[0]["content"]["m.relates_to"]["m.in_reply_to"]["event_id"], stop.as_str());
    assert!(replies[0]["content"]["formatted_body"].is_string());
    assert_eq!(s.scale_patches(), [json!({"spec":{"replicas":0}})]);
    let writes: Vec<_> = s
        .api
        .requests()
        .into_iter()
        .filter(|r| matches!(r.method.as_str(), "PATCH" | "PUT") && !r.path.ends_with("/scale"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(writes.is_empty(), "the workload object itself was written: {writes:?}");
    let annotations = s.api.annotations(WorkloadKind::Deployment, "clawdbot", "clawdbot").unwrap();
    assert!(!annotations.contains_key("matrix-k8s-toggle/replicas-before-stop"), "{annotations:?}");
    let replies = alice.wait_for_messages(&room, BOT, 2, WAIT).await;
    assert!(body(&replies[1]).starts_with("clawdbot is off after"), "{}", body(&replies[1]));
    // NB: the count to restore lives in the bridge's state, which outlives the process.
    s.bridge.terminate();
    s.bridge.start_again().await;

    alice.send_text(&room, "status").await;
    let replies = alice.wait_for_messages(&room, BOT, 3, WAIT).await;
    assert!(body(&replies[2]).starts_with("clawdbot is off: 0/0 ready"), "{}", body(&replies[2]));

    s.api.clear_requests();
    alice.send_text(&room, "start").await;
    let replies = alice.wait_for_messages(&room, BOT, 4, WAIT).await;
    assert!(body(&replies[3]).contains("clawdbot is starting: 0 → 3"), "{}", body(&replies[3]));
    let replies = alice.wait_for_messages(&room, BOT, 5, WAIT).await;
    assert!(body(&replies[4]).starts_with("clawdbot is up: 3/3 ready after"), "{}", body(&replies[4]));
    assert_eq!(s.scale_patches(), [json!({"spec":{"replicas":3}})]);
    assert_eq!(s.api.replicas(WorkloadKind::Deployment, "clawdbot", "clawdbot"), Some((3, 3)));

    alice.send_text(&room, "status").await;
    let replies = alice.wait_for_messages(&room, BOT, 6, WAIT).await;
    assert!(body(&replies[5]).starts_with("clawdbot is running: 3/3 ready"), "{}", body(&replies[5]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_is_not_allowed_causes_no_patch_and_no_reply_and_their_invite_is_rejected() {
    let s = stack(1).await;
    let alice = s.user("alice").await;
    let mallory = s.user("mallory").await;
    let room = s.group_room(&alice, &mallory).await;

    mallory.send_text(&room, "!toggle stop").await;
    mallory.send_text(&room, "stop").await;
    alice.send_text(&room, "!toggle status").await;
    let replies = alice.wait_for_messages(&room, BOT, 1, WAIT).await;
    assert!(body(&replies[0]).starts_with("clawdbot is running"), "{}", body(&replies[0]));
    assert_eq!(replies.len(), 1, "only alice's command is answered");
    assert!(s.scale_patches().is_empty());

    let own = mallory.create_room(&[BOT], false).await;
    mallory.wait_for_membership(&own, BOT, "leave", WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chatter_in_a_group_room_gets_no_answer() {
    let s = stack(1).await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s.group_room(&alice, &bob).await;
    alice.send_text(&room, "good morning everyone").await;
    alice.send_text(&room, "stop the music please").await;
    // NB: said to bob, not to the bot: in a room with more than one person it must be addressed.
    alice.send_text(&room, "stop").await;
    alice.send_text(&room, "status").await;
    alice.send_text(&room, "!toggle list").await;
    // NB: a room's messages are handled in order: the first answer is to the last message.
    let replies = alice.wait_for_messages(&room, BOT, 1, WAIT).await;
    assert!(body(&replies[0]).starts_with("Targets:"), "{}", body(&replies[0]));
    assert!(s.scale_patches().is_empty(), "a bare stop said in a group room ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_sees_status_and_list_but_cannot_stop() {
    let api = TestApiServer::start().await.unwrap();
    api.add_deployment("clawdbot", "clawdbot", 1);
    let s = with(api).env("VIEWERS", "@vic:localhost").start().await;
    let alice = s.user("alice").await;
    let vic = s.user("vic").await;
    let room = s.group_room(&alice, &vic).await;
    vic.send_text(&room, "!toggle stop").await;
    vic.send_text(&room, "!toggle status").await;
    let replies = alice.wait_for_messages(&room, BOT, 2, WAIT).await;
    assert!(body(&replies[0]).starts_with("You may look but not change anything: `stop`"), "{}", body(&replies[0]));
    assert!(body(&replies[1]).starts_with("clawdbot is running"), "{}", body(&replies[1]));
    assert!(s.scale_patches().is_empty(), "a viewer stopped the workload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_bare_commands_always_a_bare_command_in_a_group_room_is_obeyed_as_by_the_old_bot() {
    let api = TestApiServer::start().await.unwrap();
    api.add_deployment("clawdbot", "clawdbot", 1);
    let s = with(api).env("BARE_COMMANDS", "always").start().await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s.group_room(&alice, &bob).await;
    alice.send_text(&room, "stop the music please").await;
    alice.send_text(&room, "stop").await;
    let replies = alice.wait_for_messages(&room, BOT, 1, WAIT).await;
    assert!(body(&replies[0]).starts_with("clawdbot is stopping: 1 → 0"), "{}", body(&replies[0]));
    assert_eq!(s.scale_patches(), [json!({"spec": {"replicas": 0}})]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_require_encryption_a_command_in_an_unencrypted_room_is_refused_with_one_notice_an_hour() {
    let api = TestApiServer::start().await.unwrap();
    api.add_deployment("clawdbot", "clawdbot", 1);
    let s = with(api).env("REQUIRE_ENCRYPTION", "true").start().await;
    let alice = s.user("alice").await;
    let room = s.dm(&alice).await;
    alice.send_text(&room, "stop").await;
    let replies = alice.wait_for_messages(&room, BOT, 1, WAIT).await;
    assert!(
        body(&replies[0]).contains("commands must be encrypted (REQUIRE_ENCRYPTION=true)"),
        "{}",
        body(&replies[0])
    );
    alice.send_text(&room, "stop").await;
    // NB: the second refusal is counted before its notice would be sent, and its job is done
    // only after that send: both together mean it was handled.
    support::eventually(WAIT, "the second plaintext command to be handled", || async {
        let refused = s.bridge.metric("matrix_k8s_toggle_errors_total{kind=\"plaintext_command\"}").await;
        let waiting = s.bridge.metric("matrix_k8s_toggle_queue_depth").await;
        (refused == 2.0 && waiting == 0.0).then_some(())
    })
    .await;
    assert_eq!(alice.messages_from(&room, BOT).await.len(), 1, "a second notice within the hour");
    assert!(s.scale_patches().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_command_in_a_dm_gets_the_help() {
    let s = stack(0).await;
    let alice = s.user("alice").await;
    let room = s.dm(&alice).await;
    alice.send_text(&room, "make coffee").await;
    let replies = alice.wait_for_messages(&room, BOT, 1, WAIT).await;
    assert!(body(&replies[0]).starts_with("Unknown command: make coffee"), "{}", body(&replies[0]));
    assert!(body(&replies[0]).contains("stop | off"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_event_sent_again_in_a_new_transaction_causes_no_second_patch() {
    let s = stack(0).await;
    let alice = s.user("alice").await;
    let room = s.dm(&alice).await;
    let event_id = alice.send_text(&room, "start").await;
    alice.wait_for_messages(&room, BOT, 1, WAIT).await;
    assert_eq!(s.scale_patches().len(), 1);

    let event = alice.messages(&room, 50).await.into_iter().find(|e| e["event_id"] == event_id.as_str()).unwrap();
    let resp = reqwest::Client::new()
        .put(format!("{}/_matrix/app/v1/transactions/resent-1", s.bridge.url))
        .bearer_auth(&s.hs_token)
        .json(&json!({ "events": [event] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // NB: a room's events are handled in order: once this is answered, the resent one was handled.
    alice.send_text(&room, "status").await;
    let replies = alice.wait_for_messages(&room, BOT, 3, WAIT).await;
    assert!(replies.iter().any(|r| body(r).starts_with("clawdbot is ")), "{replies:?}");
    assert_eq!(s.scale_patches().len(), 1);
    let started = replies.iter().filter(|r| body(r).starts_with("clawdbot is starting: 0 → 1")).count();
    assert_eq!(started, 1, "{replies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_patch_is_answered_with_the_missing_permission() {
    let s = stack(0).await;
    s.api.set_rbac(Some(vec![
        RbacRule::new("get", "deployments/scale", "clawdbot"),
        RbacRule::new("get", "deployments", "clawdbot"),
    ]));
    let alice = s.user("alice").await;
    let room = s.dm(&alice).await;
    alice.send_text(&room, "start").await;
    let replies = alice.wait_for_messages(&room, BOT, 1, WAIT).await;
    let text = body(&replies[0]);
    assert!(text.contains("may not patch deployments/scale in namespace clawdbot"), "{text}");
    assert!(text.contains("grant `patch` on `deployments/scale`"), "{text}");
    assert_eq!(s.api.replicas(WorkloadKind::Deployment, "clawdbot", "clawdbot").map(|r| r.0), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_only_the_role_in_deploy_stop_and_start_follow_their_rollouts() {
    let s = stack(2).await;
    s.api.set_rbac(Some(deploy_role_rules()));
    let alice = s.user("alice").await;
    let room = s.dm(&alice).await;

    alice.send_text(&room, "stop").await;
    let replies = alice.wait_for_messages(&room, BOT, 2, WAIT).await;
    assert!(body(&replies[0]).contains("clawdbot is stopping: 2 → 0"), "{}", body(&replies[0]));
    assert!(body(&replies[1]).starts_with("clawdbot is off after"), "{}", body(&replies[1]));
    alice.send_text(&room, "start").await;
    let replies = alice.wait_for_messages(&room, BOT, 4, WAIT).await;
    assert!(body(&replies[2]).contains("clawdbot is starting: 0 → 2"), "{}", body(&replies[2]));
    assert!(body(&replies[3]).starts_with("clawdbot is up: 2/2 ready after"), "{}", body(&replies[3]));
    let watches = s.api.requests().into_iter().filter(|r| r.query.contains("watch=true")).count();
    assert!(watches >= 1, "the rollouts were followed with a watch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulset_target_from_the_config_file_is_scaled() {
    let api = TestApiServer::start().await.unwrap();
    api.add_deployment("apps", "web", 1);
    api.add_statefulset("data", "postgres", 0);
    api.set_controller(ControllerMode::Ready { after: Duration::from_millis(200) });
    let s = with(api)
        .config_file(
            "targets:\n  - {name: web, namespace: apps}\n  - {name: db, kind: StatefulSet, namespace: data, workload: postgres, max_replicas: 3}\n",
        )
        .start()
        .await;
    let alice = s.user("alice").await;
    let room = s.dm(&alice).await;
    alice.send_text(&room, "start db 2").await;
    let replies = alice.wait_for_messages(&room, BOT, 2, WAIT).await;
    assert!(body(&replies[0]).contains("db is starting: 0 → 2"), "{}", body(&replies[0]));
    assert!(body(&replies[1]).starts_with("db is up: 2/2 ready"), "{}", body(&replies[1]));
    let patches: Vec<_> = s.api.requests().into_iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0].path, "/apis/apps/v1/namespaces/data/statefulsets/postgres/scale");

    alice.send_text(&room, "start db 5").await;
    let replies = alice.wait_for_messages(&room, BOT, 3, WAIT).await;
    assert_eq!(body(&replies[2]), "db allows at most 3 replicas.");
    alice.send_text(&room, "stop").await;
    let replies = alice.wait_for_messages(&room, BOT, 4, WAIT).await;
    assert!(body(&replies[3]).starts_with("Which one?"), "{}", body(&replies[3]));
    alice.send_text(&room, "status").await;
    let replies = alice.wait_for_messages(&room, BOT, 5, WAIT).await;
    let status = body(&replies[4]);
    assert!(status.contains("web is running: 1/1") && status.contains("db is running: 2/2"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bot_leaves_a_room_where_no_allowed_user_is_left() {
    let s = stack(0).await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let room = s.group_room(&alice, &bob).await;
    alice.send_text(&room, "!toggle status").await;
    alice.wait_for_messages(&room, BOT, 1, WAIT).await;
    alice.leave(&room).await;
    bob.wait_for_membership(&room, BOT, "leave", WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_too_large_for_the_homeserver_is_sent_shortened() {
    let s = stack(0).await;
    let alice = s.user("alice").await;
    let room = s.dm(&alice).await;
    let huge = "x".repeat(60 * 1024);
    let command = alice.send_text(&room, &huge).await;
    let replies = alice.wait_for_messages(&room, BOT, 1, WAIT).await;
    assert_eq!(replies[0]["content"]["m.relates_to"]["m.in_reply_to"]["event_id"], command.as_str(), "{replies:?}");
    let text = body(&replies[0]);
    assert!(text.starts_with("Unknown command: xxxx"), "{text}");
    assert!(text.ends_with("more characters left out: the message was too large)"), "{text}");
    assert!(text.len() < 8 * 1024, "{}", text.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_start_is_stopped_by_the_running_bridge_when_its_time_is_up() {
    let s = stack(0).await;
    let alice = s.user("alice").await;
    let room = s.dm(&alice).await;
    alice.send_text(&room, "start for 1m").await;
    let replies = alice.wait_for_messages(&room, BOT, 1, WAIT).await;
    assert!(body(&replies[0]).starts_with("clawdbot is starting: 0 → 1 replicas, on until "), "{replies:?}");
    // NB: the shortest timed start is a minute; its stop notice is the proof the timer ran.
    let stopped = |m: &Value| body(m).starts_with("clawdbot is stopping: its time is up");
    support::eventually(Duration::from_secs(120), "the timed stop", || async {
        alice.messages_from(&room, BOT).await.iter().any(stopped).then_some(())
    })
    .await;
    assert_eq!(s.api.replicas(WorkloadKind::Deployment, "clawdbot", "clawdbot").unwrap().0, 0);
    assert_eq!(s.scale_patches().len(), 2, "one start, one stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_bridge_on_the_same_state_directory_stops_at_start_up_and_says_why() {
    let s = stack(0).await;
    let (status, output) = s.bridge.run_second_instance().await;
    assert!(!status.success());
    assert!(output.contains("is in use by another bridge"), "{output}");
    let alice = s.user("alice").await;
    let room = s.dm(&alice).await;
    alice.send_text(&room, "status").await;
    let replies = alice.wait_for_messages(&room, BOT, 1, WAIT).await;
    assert!(body(&replies[0]).starts_with("clawdbot is off"), "the first one still serves: {replies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_by_another_controller_is_posted_naming_it_and_the_bridges_own_is_not() {
    let s = stack(0).await;
    let alice = s.user("alice").await;
    let room = s.dm(&alice).await;
    alice.send_text(&room, "start").await;
    alice.wait_for_messages(&room, BOT, 2, WAIT).await;
    // NB: the tests link two TLS backends; a kube client needs one chosen, as main does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::from_yaml(&s.api.kubeconfig_yaml()).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    let api: kube::Api<k8s_openapi::api::apps::v1::Deployment> = kube::Api::namespaced(client, "clawdbot");
    let params =
        kube::api::PatchParams { field_manager: Some("argocd-application-controller".into()), ..Default::default() };
    api.patch_scale("clawdbot", &params, &kube::api::Patch::Merge(json!({"spec": {"replicas": 3}}))).await.unwrap();
    let notice = |m: &Value| body(m).starts_with("⚠️ clawdbot was scaled 1 → 3 by argocd-application-controller");
    support::eventually(WAIT, "the drift notice", || async {
        alice.messages_from(&room, BOT).await.iter().any(notice).then_some(())
    })
    .await;
    let marker = alice.send_text(&room, "status").await;
    let replies = alice.wait_for_messages(&room, BOT, 4, WAIT).await;
    assert!(replies.iter().any(|r| r["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == marker.as_str()));
    let drift = replies.iter().filter(|m| body(m).starts_with("⚠️")).count();
    assert_eq!(drift, 1, "one notice, none for the bridge's own start: {replies:?}");
}
