//! The bridge's decisions, tested without Synapse: who is refused, what is answered, what is
//! scaled, and that nothing runs twice. The real-Synapse tests in `tests/` cover the wiring.

use super::fake::{Call, Harness, room, user};
use super::*;

/// alice operates everything, bob only `web`; vic may look; eve is nobody.
const CONFIG: &str = "allowed_users: ['@alice:example.org', '@bob:example.org']\n\
                      viewers: ['@vic:example.org']\n\
                      targets:\n\
                      \x20 - {name: web, namespace: apps}\n\
                      \x20 - {name: db, namespace: apps, allowed_users: ['@alice:example.org']}\n";

/// A harness whose room `!dm` is a direct chat of the bot with `with`.
fn dm(with: &str) -> (Harness, OwnedRoomId) {
    let h = Harness::new(CONFIG);
    let dm = room("dm");
    h.homeserver.room(&dm, &[&user(with)]);
    (h, dm)
}

#[tokio::test(start_paused = true)]
async fn an_allowed_users_stop_scales_to_zero_and_says_what_it_did() {
    let (h, dm) = dm("alice");
    let said = h.say(&dm, &user("alice"), "stop web").await;
    assert_eq!(said, ["web is stopping: 2 → 0 replicas (`start` brings back 2)."]);
    assert_eq!(h.replicas("web"), 0);
    assert_eq!(h.replicas("db"), 2, "only the named target");
}

#[tokio::test(start_paused = true)]
async fn a_stranger_is_neither_obeyed_nor_answered_by_default() {
    let (h, dm) = dm("eve");
    assert_eq!(h.say(&dm, &user("eve"), "stop web").await, Vec::<String>::new());
    assert_eq!(h.patches(), 0);
    assert_eq!(h.replicas("web"), 2);
}

#[tokio::test(start_paused = true)]
async fn with_hourly_refusals_a_stranger_hears_one_refusal_per_room_per_hour() {
    let h = Harness::new(&format!("{CONFIG}unauthorized_reply: hourly\n"));
    let dm = room("dm");
    h.homeserver.room(&dm, &[&user("eve")]);
    let first = h.say(&dm, &user("eve"), "stop web").await;
    assert_eq!(first.len(), 1);
    assert!(first[0].contains("may not command this bot"), "{first:?}");
    assert_eq!(h.say(&dm, &user("eve"), "stop web").await, Vec::<String>::new(), "within the hour");
    h.clock.advance_ms(3_600_000);
    assert_eq!(h.say(&dm, &user("eve"), "stop web").await.len(), 1, "an hour later");
    assert_eq!(h.patches(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_viewer_may_see_the_status_but_not_stop() {
    let (h, dm) = dm("vic");
    let said = h.say(&dm, &user("vic"), "stop web").await;
    assert_eq!(said, ["You may look but not change anything: `stop` needs ALLOWED_USERS, and you are in VIEWERS."]);
    assert_eq!(h.patches(), 0);
    let said = h.say(&dm, &user("vic"), "status web").await;
    assert_eq!(said.len(), 1);
    assert!(said[0].starts_with("web is "), "{said:?}");
}

#[tokio::test(start_paused = true)]
async fn a_user_narrowed_to_one_target_may_not_touch_another() {
    let (h, dm) = dm("bob");
    assert_eq!(h.say(&dm, &user("bob"), "stop db").await, ["You may not operate that target."]);
    assert_eq!(h.replicas("db"), 2);
    let said = h.say(&dm, &user("bob"), "status").await;
    assert_eq!(said.len(), 1);
    assert!(said[0].starts_with("web is ") && !said[0].contains("db"), "bob sees only web: {said:?}");
}

#[tokio::test(start_paused = true)]
async fn in_a_group_room_a_bare_stop_said_to_a_colleague_is_ignored_and_an_addressed_one_runs() {
    let h = Harness::new(CONFIG);
    let ops = room("ops");
    h.homeserver.room(&ops, &[&user("alice"), &user("bob")]);
    assert_eq!(h.say(&ops, &user("alice"), "stop").await, Vec::<String>::new());
    assert_eq!(h.say(&ops, &user("alice"), "stop web").await, Vec::<String>::new());
    assert_eq!(h.patches(), 0);
    let said = h.say(&ops, &user("alice"), "!toggle stop web").await;
    assert_eq!(said.len(), 1);
    assert_eq!(h.replicas("web"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_command_whose_reply_could_not_be_sent_is_not_run_again_when_it_is_retried() {
    let (h, dm) = dm("alice");
    let job = h.message(&dm, &user("alice"), "stop web");
    h.homeserver.fail_sends(1);
    assert!(matches!(h.handle(&job).await, Outcome::RetryAfter(_)), "the reply failed: try again");
    assert_eq!(h.replicas("web"), 0);
    h.cluster.add_deployment("apps", "web", 3);
    assert_eq!(h.handle(&job).await, Outcome::Done);
    assert_eq!(h.patches(), 1, "stopped once");
    assert_eq!(h.replicas("web"), 3, "the retry did not act again");
    let replies = || h.homeserver.sent().into_iter().filter(|t| t.contains("is stopping")).collect::<Vec<_>>();
    assert_eq!(replies(), ["web is stopping: 2 → 0 replicas (`start` brings back 2)."]);
    assert_eq!(h.handle(&job).await, Outcome::Done, "redelivered once more");
    assert_eq!(replies().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_command_older_than_the_maximum_age_is_answered_not_run() {
    let (h, dm) = dm("alice");
    let job = h.message(&dm, &user("alice"), "stop web");
    h.clock.advance_ms(301_000);
    assert_eq!(h.handle(&job).await, Outcome::Done);
    let sent = h.homeserver.sent();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].starts_with("not run: sent 5 min"), "{sent:?}");
    assert_eq!(h.patches(), 0);
}

#[tokio::test(start_paused = true)]
async fn start_above_the_targets_maximum_is_refused_without_scaling() {
    let (h, dm) = dm("alice");
    assert_eq!(h.say(&dm, &user("alice"), "start web 11").await, ["web allows at most 10 replicas."]);
    assert_eq!(h.patches(), 0);
}

#[tokio::test(start_paused = true)]
async fn approve_in_an_unencrypted_room_is_refused() {
    let (h, dm) = dm("alice");
    let said = h.say(&dm, &user("alice"), "approve @bob:example.org Xk3d9aQ2").await;
    assert_eq!(said, ["Not run: `approve` must be sent in an encrypted room, so I can tell it comes from you."]);
}

#[tokio::test(start_paused = true)]
async fn with_require_encryption_a_plaintext_command_is_refused_once_an_hour() {
    let h = Harness::new(&format!("{CONFIG}require_encryption: true\n"));
    let dm = room("dm");
    h.homeserver.room(&dm, &[&user("alice")]);
    let said = h.say(&dm, &user("alice"), "stop web").await;
    assert_eq!(said.len(), 1);
    assert!(said[0].contains("REQUIRE_ENCRYPTION=true"), "{said:?}");
    assert_eq!(h.say(&dm, &user("alice"), "stop web").await, Vec::<String>::new());
    assert_eq!(h.patches(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_invite_from_an_allowed_user_is_joined_and_one_from_a_stranger_rejected() {
    let h = Harness::new(CONFIG);
    let invite = |from: &str, to: &RoomId| {
        h.job(
            to,
            serde_json::json!({
                "type": "m.room.member", "state_key": h.homeserver.bot(), "sender": user(from),
                "origin_server_ts": 1, "content": { "membership": "invite" },
            }),
        )
    };
    assert_eq!(h.handle(&invite("alice", &room("a"))).await, Outcome::Done);
    assert_eq!(h.handle(&invite("eve", &room("e"))).await, Outcome::Done);
    assert_eq!(
        h.homeserver.calls(),
        [Call::Join(room("a")), Call::Leave(room("e"), "only allowed users can invite this bot".into())]
    );
}

#[tokio::test(start_paused = true)]
async fn the_bot_leaves_a_room_when_the_last_allowed_user_leaves() {
    let h = Harness::new(CONFIG);
    let ops = room("ops");
    h.homeserver.room(&ops, &[&user("alice"), &user("eve")]);
    h.say(&ops, &user("eve"), "hello").await;
    let leave = h.job(
        &ops,
        serde_json::json!({
            "type": "m.room.member", "state_key": user("alice"), "sender": user("alice"),
            "origin_server_ts": 1, "content": { "membership": "leave" },
        }),
    );
    assert_eq!(h.handle(&leave).await, Outcome::Done);
    assert_eq!(h.homeserver.calls(), [Call::Leave(ops, "no allowed user is left in this room".into())]);
}

#[tokio::test(start_paused = true)]
async fn the_bots_own_messages_are_never_read_as_commands() {
    let (h, dm) = dm("alice");
    let bot = h.homeserver.bot().to_owned();
    assert_eq!(h.say(&dm, &bot, "stop web").await, Vec::<String>::new());
    assert_eq!(h.patches(), 0);
}

#[tokio::test(start_paused = true)]
async fn history_lists_who_did_what_newest_first_for_the_targets_the_sender_may_see() {
    let (h, dm) = dm("alice");
    h.say(&dm, &user("alice"), "stop web").await;
    h.say(&dm, &user("alice"), "start db 3").await;
    h.say(&dm, &user("alice"), "stop db").await;
    let said = h.say(&dm, &user("alice"), "history").await;
    let lines: Vec<&str> = said[0].lines().collect();
    assert_eq!(lines[0], "Last actions, newest first:");
    assert!(lines[1].ends_with("db: stop db by @alice:example.org: 3 → 0 replicas"), "{said:?}");
    assert!(lines[2].ends_with("db: start db 3 by @alice:example.org: 2 → 3 replicas"), "{said:?}");
    assert!(lines[3].ends_with("web: stop web by @alice:example.org: 2 → 0 replicas"), "{said:?}");

    let bob = room("bob");
    h.homeserver.room(&bob, &[&user("bob")]);
    let said = h.say(&bob, &user("bob"), "history").await;
    assert_eq!(said[0].lines().count(), 2, "bob sees web only: {said:?}");
    let vic = room("vic");
    h.homeserver.room(&vic, &[&user("vic")]);
    assert_eq!(h.say(&vic, &user("vic"), "history web").await[0].lines().count(), 2, "a viewer may look");
    let eve = room("eve");
    h.homeserver.room(&eve, &[&user("eve")]);
    assert_eq!(h.say(&eve, &user("eve"), "history").await, Vec::<String>::new());
}

#[tokio::test(start_paused = true)]
async fn every_scale_is_recorded_as_a_kubernetes_event_on_the_workload_naming_who() {
    let (h, dm) = dm("alice");
    h.say(&dm, &user("alice"), "stop web").await;
    h.say(&dm, &user("alice"), "stop web").await;
    let events = h.cluster.events();
    assert_eq!(events.len(), 1, "none for the stop that changed nothing: {events:?}");
    let e = &events[0];
    assert_eq!((e["reason"].as_str(), e["type"].as_str()), (Some("ScaledByChat"), Some("Normal")));
    assert_eq!(e["note"], "Scaled to 0 by @alice:example.org via Matrix");
    assert_eq!(e["reportingController"], "matrix-k8s-toggle");
    let web = h.cluster.object(test_apiserver::WorkloadKind::Deployment, "apps", "web").unwrap();
    assert_eq!(e["regarding"]["uid"], web["metadata"]["uid"], "kubectl describe finds it by uid");
    assert_eq!((e["regarding"]["kind"].as_str(), e["regarding"]["name"].as_str()), (Some("Deployment"), Some("web")));
    h.say(&dm, &user("alice"), "start web").await;
    assert_eq!(h.cluster.events()[1]["note"], "Scaled to 2 by @alice:example.org via Matrix");
}

#[tokio::test(start_paused = true)]
async fn the_reply_goes_out_before_the_kubernetes_event_is_recorded() {
    let (h, dm) = dm("alice");
    h.say(&dm, &user("alice"), "stop web").await;
    assert_eq!(h.cluster.events().len(), 1, "the Event is recorded once the reply is out");
    // NB: the first send is the reply; the rollout report may follow.
    assert_eq!(h.homeserver.events_at_send().first(), Some(&0), "no Event yet when the reply was sent");
    h.say(&dm, &user("alice"), "start web").await;
    assert_eq!(h.cluster.events().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_scale_goes_ahead_when_its_event_cannot_be_recorded_and_the_failure_is_counted() {
    let (h, dm) = dm("alice");
    let rule = |verb: &str, resource: &str| test_apiserver::RbacRule::new(verb, resource, "apps");
    h.cluster.set_rbac(Some(vec![
        rule("get", "deployments/scale"),
        rule("patch", "deployments/scale"),
        rule("get", "deployments"),
        rule("list", "deployments"),
        rule("watch", "deployments"),
    ]));
    assert_eq!(
        h.say(&dm, &user("alice"), "stop web").await,
        ["web is stopping: 2 → 0 replicas (`start` brings back 2)."]
    );
    assert_eq!(h.replicas("web"), 0);
    assert!(h.cluster.events().is_empty());
    let text = h.metrics.render();
    assert!(text.contains("matrix_k8s_toggle_errors_total{kind=\"audit_event\"} 1"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_change_by_another_controller_is_noticed_once_naming_it_and_the_bridges_own_are_not() {
    let (h, dm) = dm("alice");
    h.say(&dm, &user("alice"), "stop web").await;
    let t = h.bridge.config.target("web").unwrap().clone();
    h.bridge.on_observed(&t, &h.object("web").await).await.unwrap();
    let sent = h.homeserver.sent().len();
    h.say(&dm, &user("alice"), "start web").await;
    h.bridge.on_observed(&t, &h.object("web").await).await.unwrap();
    assert_eq!(h.homeserver.sent().len(), sent + 1, "the start's reply, no drift notice");

    h.scale_as("argocd-application-controller", "web", 5).await;
    let seen = h.object("web").await;
    h.bridge.on_observed(&t, &seen).await.unwrap();
    h.bridge.on_observed(&t, &seen).await.unwrap();
    let drift: Vec<String> = h.homeserver.sent().into_iter().filter(|m| m.starts_with("⚠️")).collect();
    assert_eq!(drift.len(), 1, "once: {drift:?}");
    assert!(drift[0].starts_with("⚠️ web was scaled 2 → 5 by argocd-application-controller at "), "{drift:?}");
    assert!(drift[0].ends_with(", not by this bot."), "{drift:?}");
    assert!(
        h.say(&dm, &user("alice"), "history web").await[0].contains("by argocd-application-controller: 2 → 5 replicas")
    );

    let ops = room("ops");
    h.homeserver.room(&ops, &[&user("alice"), &user("bob")]);
    h.say(&ops, &user("alice"), "!toggle start web 1").await;
    h.bridge.on_observed(&t, &h.object("web").await).await.unwrap();
    h.scale_as("kubectl", "web", 4).await;
    h.bridge.on_observed(&t, &h.object("web").await).await.unwrap();
    let rooms: Vec<OwnedRoomId> = h
        .homeserver
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            super::fake::Call::Send(room, _, text) if text.contains("by kubectl") => Some(room),
            _ => None,
        })
        .collect();
    assert_eq!(rooms, [room("ops"), room("dm")], "every room that commanded web, the latest first");
}

#[tokio::test(start_paused = true)]
async fn a_change_made_while_the_bridge_was_away_is_noticed_after_the_restart_once() {
    let (mut h, dm) = dm("alice");
    h.say(&dm, &user("alice"), "stop web").await;
    let t = h.bridge.config.target("web").unwrap().clone();
    h.bridge.on_observed(&t, &h.object("web").await).await.unwrap();
    h.scale_as("kubectl", "web", 3).await;
    h.restart();
    h.bridge.on_observed(&t, &h.object("web").await).await.unwrap();
    h.restart();
    h.bridge.on_observed(&t, &h.object("web").await).await.unwrap();
    let drift: Vec<String> = h.homeserver.sent().into_iter().filter(|m| m.starts_with("⚠️")).collect();
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert!(drift[0].contains("scaled 0 → 3 by kubectl"), "{drift:?}");
}
