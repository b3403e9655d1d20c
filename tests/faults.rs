#![recursion_limit = "256"]
//! Faults survived: our server killed mid-command, Synapse down when we reply, the
//! Kubernetes API failing or gone, and our server down while commands queue up.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{
    client::User,
    eventually,
    stack::{BOT, Stack, WAIT},
};
use test_apiserver::{ControllerMode, Fault};

/// The default stack with `extra` settings.
async fn stack(extra: &[(&str, &str)]) -> Stack {
    Stack::build().envs(extra).start().await
}

/// Alice, in a DM with the bot.
async fn alice_in_dm(s: &Stack) -> (User, String) {
    let alice = s.user("alice").await;
    let room = s.dm(&alice).await;
    (alice, room)
}

/// Sends `status` and waits for its answer, the `count`th message of the bot: the room's
/// events are handled in order, so anything earlier would have been answered before it.
async fn status_answered_as_message(alice: &User, room: &str, count: usize) -> Vec<Value> {
    let marker = alice.send_text(room, "status").await;
    let replies = alice.wait_for_messages(room, BOT, count, WAIT).await;
    assert_eq!(replies_to(&replies, &marker).len(), 1, "{replies:?}");
    replies
}

fn body(e: &Value) -> &str {
    e["content"]["body"].as_str().unwrap_or_default()
}

fn replies_to<'a>(replies: &'a [Value], event_id: &str) -> Vec<&'a Value> {
    replies.iter().filter(|r| r["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == event_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_right_after_the_patch_causes_no_second_patch_and_exactly_one_reply() {
    let mut s = stack(&[]).await;
    let (alice, room) = alice_in_dm(&s).await;
    s.api.set_answer_delay(Duration::from_secs(3));
    let command = alice.send_text(&room, "start").await;
    s.wait_for_patch().await;
    s.bridge.kill();
    s.api.set_answer_delay(Duration::ZERO);
    assert_eq!(s.api.replicas(test_apiserver::WorkloadKind::Deployment, "clawdbot", "clawdbot").unwrap().0, 1);

    s.bridge.start_again().await;
    alice.wait_for_messages(&room, BOT, 1, WAIT).await;
    let replies = status_answered_as_message(&alice, &room, 2).await;
    let answers = replies_to(&replies, &command);
    assert_eq!(answers.len(), 1, "{replies:?}");
    assert!(body(answers[0]).contains("clawdbot is already on (1 replicas)"), "{replies:?}");
    assert_eq!(s.scale_patches().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_interrupted_by_a_kill_is_still_reported_once_after_the_restart() {
    let mut s = stack(&[]).await;
    let (alice, room) = alice_in_dm(&s).await;
    s.api.set_controller(ControllerMode::Ready { after: Duration::from_secs(4) });
    let command = alice.send_text(&room, "start").await;
    let replies = alice.wait_for_messages(&room, BOT, 1, WAIT).await;
    assert!(body(&replies[0]).contains("clawdbot is starting: 0 → 1"), "{replies:?}");
    s.bridge.kill();

    s.bridge.start_again().await;
    alice.wait_for_messages(&room, BOT, 2, WAIT).await;
    let replies = status_answered_as_message(&alice, &room, 3).await;
    let answers = replies_to(&replies, &command);
    assert_eq!(answers.len(), 2, "{replies:?}");
    assert!(body(answers[1]).starts_with("clawdbot is up: 1/1 ready after"), "{replies:?}");
    assert_eq!(s.scale_patches().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_a_start_and_a_stop_reports_no_stale_start_after_the_restart() {
    let mut s = stack(&[]).await;
    let (alice, room) = alice_in_dm(&s).await;
    // NB: the start's rollout stays open; a stop takes effect at once.
    s.api.set_controller(ControllerMode::Never { progress_deadline: Duration::from_secs(600) });
    let start = alice.send_text(&room, "start").await;
    let replies = alice.wait_for_messages(&room, BOT, 1, WAIT).await;
    assert!(body(&replies[0]).contains("clawdbot is starting: 0 → 1"), "{replies:?}");
    s.api.set_answer_delay(Duration::from_secs(3));
    let stop = alice.send_text(&room, "stop").await;
    s.wait_for_patches(2).await;
    s.bridge.kill();
    s.api.set_answer_delay(Duration::ZERO);

    s.bridge.start_again().await;
    alice.wait_for_messages(&room, BOT, 2, WAIT).await;
    // NB: longer than a report is held after its rollout settles, so a stale one would be out.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let replies = status_answered_as_message(&alice, &room, 3).await;
    assert_eq!(replies_to(&replies, &start).len(), 1, "no report of the start once it was stopped: {replies:?}");
    let answers = replies_to(&replies, &stop);
    assert_eq!(answers.len(), 1, "{replies:?}");
    assert_eq!(body(answers[0]), "clawdbot is already off.", "{replies:?}");
    assert_eq!(s.scale_patches().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_waits_while_synapse_is_down_and_is_delivered_when_it_is_back() {
    let s = stack(&[]).await;
    let (alice, room) = alice_in_dm(&s).await;
    s.api.set_answer_delay(Duration::from_secs(2));
    let command = alice.send_text(&room, "start").await;
    s.wait_for_patch().await;
    s.synapse.stop();
    // NB: an outage of a few seconds, not a wait to see nothing happen.
    tokio::time::sleep(Duration::from_secs(5)).await;
    s.synapse.start_again();
    // The reply, then the rollout's outcome.
    alice.wait_for_messages(&room, BOT, 2, WAIT).await;
    let replies = status_answered_as_message(&alice, &room, 3).await;
    let answers = replies_to(&replies, &command);
    assert_eq!(answers.len(), 2, "{replies:?}");
    assert!(body(answers[0]).contains("clawdbot is starting: 0 → 1"), "{replies:?}");
    assert!(body(answers[1]).starts_with("clawdbot is up: 1/1 ready after"), "{replies:?}");
    assert_eq!(s.scale_patches().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_errors_for_a_while_are_retried_and_the_user_is_told_it_is_slow() {
    let s = stack(&[("SLOW_NOTICE_SECS", "1")]).await;
    let (alice, room) = alice_in_dm(&s).await;
    for status in [503, 500, 429, 503] {
        s.api.inject_fault(Fault::new(status, 1).on_method("PATCH"));
    }
    alice.send_text(&room, "start").await;
    let replies = alice.wait_for_messages(&room, BOT, 2, WAIT).await;
    assert_eq!(body(&replies[0]), "Kubernetes is slow to answer; still trying…", "{replies:?}");
    assert!(body(&replies[1]).contains("clawdbot is starting: 0 → 1"), "{replies:?}");
    assert_eq!(s.api.replicas(test_apiserver::WorkloadKind::Deployment, "clawdbot", "clawdbot").unwrap().0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_kubernetes_api_gets_a_clear_reply() {
    let s = stack(&[("SLOW_NOTICE_SECS", "60")]).await;
    let (alice, room) = alice_in_dm(&s).await;
    // NB: the directory first, so it is dropped last.
    let Stack { dir: _dir, synapse: _synapse, bridge: _bridge, api, .. } = s;
    api.shutdown().await;
    alice.send_text(&room, "stop").await;
    let replies = alice.wait_for_messages(&room, BOT, 1, WAIT).await;
    let text = body(&replies[0]);
    assert!(text.starts_with("⚠️ Could not stop clawdbot: the Kubernetes API is unavailable"), "{text}");
    assert!(text.contains("try again later"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_queued_while_we_were_down_are_handled_in_order_and_old_ones_are_not_run() {
    let mut s = stack(&[("COMMAND_MAX_AGE_SECS", "3")]).await;
    let (alice, room) = alice_in_dm(&s).await;
    assert!(s.bridge.terminate().success());
    let old = alice.send_text(&room, "start").await;
    // NB: makes the command older than COMMAND_MAX_AGE_SECS (the homeserver's clock, not ours).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let fresh = alice.send_text(&room, "status").await;
    s.bridge.start_again().await;

    let replies = alice.wait_for_messages(&room, BOT, 2, WAIT).await;
    assert_eq!(replies[0]["content"]["m.relates_to"]["m.in_reply_to"]["event_id"], old.as_str(), "{replies:?}");
    assert!(body(&replies[0]).starts_with("not run: sent "), "{replies:?}");
    assert!(body(&replies[0]).contains("s ago (commands older than 3 s are not run)"), "{replies:?}");
    assert_eq!(replies[1]["content"]["m.relates_to"]["m.in_reply_to"]["event_id"], fresh.as_str(), "{replies:?}");
    assert!(body(&replies[1]).starts_with("clawdbot is off"), "{replies:?}");
    assert_eq!(s.scale_patches().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_waited_behind_a_slow_one_past_the_maximum_age_is_not_run() {
    let s = stack(&[("COMMAND_MAX_AGE_SECS", "3"), ("SLOW_NOTICE_SECS", "60")]).await;
    let (alice, room) = alice_in_dm(&s).await;
    s.api.set_latency(Duration::from_secs(3));
    let slow = alice.send_text(&room, "start").await;
    let waiting = alice.send_text(&room, "stop").await;

    let replies = alice.wait_for_messages(&room, BOT, 2, WAIT).await;
    assert_eq!(replies_to(&replies, &slow).len(), 1, "{replies:?}");
    assert!(body(replies_to(&replies, &slow)[0]).contains("clawdbot is starting: 0 → 1"), "{replies:?}");
    let late = replies_to(&replies, &waiting);
    assert_eq!(late.len(), 1, "{replies:?}");
    assert!(body(late[0]).starts_with("not run: sent "), "{replies:?}");
    assert_eq!(s.scale_patches().len(), 1, "the late stop was run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_encryption_unable_to_start_a_command_in_a_plain_room_is_still_answered() {
    // NB: the bridge reaches Synapse through a proxy that refuses to create its device.
    let s = Stack::build()
        .proxy_before_synapse(|proxy| proxy.refuse_paths_containing("/_matrix/client/v3/devices/", 500))
        .start()
        .await;
    let (synapse, bridge) = (&s.synapse, &s.bridge);
    let (id, token) = synapse.register("alice").await;
    let alice = User::new(&synapse.url, id, token);

    let encrypted = alice.create_room(&[BOT], true).await;
    alice.wait_for_membership(&encrypted, BOT, "join", WAIT).await;
    alice.send_text(&encrypted, "status").await;
    eventually(WAIT, "the encrypted room's command to wait for encryption", || async {
        (bridge.metric("matrix_k8s_toggle_errors_total{kind=\"encryption_not_ready\"}").await >= 1.0).then_some(())
    })
    .await;

    let plain = alice.create_room(&[BOT], false).await;
    alice.wait_for_membership(&plain, BOT, "join", WAIT).await;
    let command = alice.send_text(&plain, "status").await;
    let replies = alice.wait_for_messages(&plain, BOT, 1, WAIT).await;
    assert_eq!(replies_to(&replies, &command).len(), 1, "{replies:?}");
    assert!(body(&replies[0]).starts_with("clawdbot is off"), "{replies:?}");
    assert!(alice.messages_from(&encrypted, BOT).await.is_empty(), "plaintext went into the encrypted room");
    assert!(bridge.log().contains("could not set up encryption"), "{}", bridge.log());
}
