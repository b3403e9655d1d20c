//! Rollout reports: when they go out, and how a later command on the same target takes over.
//! Time is tokio's paused clock; the test API server's pods are ready 200 ms after a change.

use super::fake::{Harness, room, user};
use super::*;

const CONFIG: &str = "allowed_users: ['@alice:example.org', '@bob:example.org']\n\
                      targets:\n\
                      \x20 - {name: web, namespace: apps}\n\
                      \x20 - {name: db, namespace: apps}\n";

/// A harness with alice and bob in the room `team`.
fn team() -> (Harness, OwnedRoomId) {
    let h = Harness::new(CONFIG);
    h.run_controller();
    let team = room("team");
    h.homeserver.room(&team, &[&user("alice"), &user("bob")]);
    (h, team)
}

#[tokio::test(start_paused = true)]
async fn a_rollout_is_reported_once_and_not_before_the_hold_has_passed() {
    let (h, team) = team();
    h.say(&team, &user("alice"), "!toggle stop web").await;
    tokio::time::sleep(REPORT_HOLD - Duration::from_millis(100)).await;
    assert_eq!(h.homeserver.sent().len(), 1, "settled after 200 ms, but held: {:?}", h.homeserver.sent());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = h.homeserver.sent();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(sent[1].starts_with("web is off after"), "{sent:?}");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(h.homeserver.sent().len(), 2, "once");
    assert!(h.store.answered_rollouts().unwrap().is_empty(), "forgotten once reported");
}

#[tokio::test(start_paused = true)]
async fn a_later_command_on_the_same_target_in_the_same_room_takes_over_the_report() {
    let (h, team) = team();
    h.say(&team, &user("alice"), "!toggle stop web").await;
    h.say(&team, &user("bob"), "!toggle start web").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent = h.homeserver.sent();
    assert_eq!(sent.len(), 3, "two replies and one report: {sent:?}");
    assert!(sent[1].starts_with("web is starting: 0 → 2"), "{sent:?}");
    assert!(sent[2].starts_with("web is up: 2/2 ready after"), "the start's report, not the stop's: {sent:?}");
    assert!(h.store.answered_rollouts().unwrap().is_empty(), "both rollouts are done with");
}

#[tokio::test(start_paused = true)]
async fn a_command_on_another_target_does_not_take_over_the_report() {
    let (h, team) = team();
    h.say(&team, &user("alice"), "!toggle stop web").await;
    h.say(&team, &user("alice"), "!toggle stop db").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut reports = h.homeserver.sent().split_off(2);
    reports.sort();
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert!(reports[0].starts_with("db is off after") && reports[1].starts_with("web is off after"), "{reports:?}");
}

#[tokio::test(start_paused = true)]
async fn a_later_command_from_another_room_leaves_a_line_in_place_of_the_report() {
    let (h, team) = team();
    let ops = room("ops");
    h.homeserver.room(&ops, &[&user("bob")]);
    h.say(&team, &user("alice"), "!toggle stop web").await;
    h.say(&ops, &user("bob"), "start web").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let in_team = h.homeserver.sent_in(&team);
    assert_eq!(in_team.len(), 2, "{in_team:?}");
    assert_eq!(
        in_team[1],
        "web: a later command in another room changed it before this stop was done; `status web` tells where it is now."
    );
    let in_ops = h.homeserver.sent_in(&ops);
    assert_eq!(in_ops.len(), 2, "{in_ops:?}");
    assert!(in_ops[1].starts_with("web is up: 2/2 ready after"), "{in_ops:?}");
}

/// Stores `rollout` as a restart finds it: its command answered (`replied`) or only acted on.
fn stored(h: &Harness, event_id: &EventId, team: &RoomId, up: bool, replied: bool) {
    let rollout = Rollout {
        event_id: event_id.to_owned(),
        room_id: team.to_owned(),
        target: "web".into(),
        up,
        started_ms: now_ms(),
    };
    h.store.set_acted(event_id, "the reply", Some(&rollout)).unwrap();
    if replied {
        h.store.set_progress(event_id, &Progress::Replied).unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn of_two_rollouts_a_restart_interrupted_on_one_target_only_the_later_is_reported() {
    let (h, team) = team();
    stored(&h, &EventId::parse("$stop").unwrap(), &team, false, true);
    tokio::time::sleep(Duration::from_millis(5)).await;
    stored(&h, &EventId::parse("$start").unwrap(), &team, true, true);
    let interrupted = h.bridge.interrupted_rollouts();
    h.bridge.resume_rollouts(interrupted).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent = h.homeserver.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].starts_with("web is up: 2/2 ready after"), "{sent:?}");
    assert!(h.store.answered_rollouts().unwrap().is_empty(), "both rollouts are done with");
}

#[tokio::test(start_paused = true)]
async fn a_command_redelivered_after_a_restart_takes_over_a_resumed_rollout_whichever_comes_first() {
    let (h, team) = team();
    stored(&h, &EventId::parse("$start").unwrap(), &team, true, true);
    // The stop scaled web to 0 and stored its reply; the kill came before the reply went out.
    h.scale_as("matrix-k8s-toggle", "web", 0).await;
    let stop = h.message(&team, &user("alice"), "!toggle stop web");
    stored(&h, &stop.event_id, &team, false, false);

    let interrupted = h.bridge.interrupted_rollouts();
    // NB: the worker gets to the redelivered stop before the resumed rollout is followed.
    assert_eq!(h.handle(&stop).await, Outcome::Done);
    h.bridge.resume_rollouts(interrupted).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent = h.homeserver.sent();
    assert_eq!(sent.len(), 2, "the stop's reply and its report, none for the start: {sent:?}");
    assert!(sent[1].starts_with("web is off after"), "{sent:?}");
}

#[tokio::test(start_paused = true)]
async fn a_resumed_start_whose_workload_is_at_zero_again_says_so() {
    let (h, team) = team();
    stored(&h, &EventId::parse("$start").unwrap(), &team, true, true);
    h.scale_as("kubectl", "web", 0).await;
    let interrupted = h.bridge.interrupted_rollouts();
    h.bridge.resume_rollouts(interrupted).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent = h.homeserver.sent_in(&team);
    let report: Vec<_> = sent.iter().filter(|s| s.starts_with("web was scaled back to 0")).collect();
    assert_eq!(report.len(), 1, "{sent:?}");
}

#[tokio::test(start_paused = true)]
async fn a_redelivered_stop_that_finds_the_workload_off_ends_the_resumed_start_report() {
    let (h, team) = team();
    stored(&h, &EventId::parse("$start").unwrap(), &team, true, true);
    // The stop's PATCH landed; the kill came before its answer did.
    h.scale_as("matrix-k8s-toggle", "web", 0).await;
    let interrupted = h.bridge.interrupted_rollouts();
    let said = h.say(&team, &user("alice"), "!toggle stop web").await;
    assert!(said[0].starts_with("web is already off"), "{said:?}");
    h.bridge.resume_rollouts(interrupted).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.homeserver.sent(), said, "no report of the start after the stop's answer");
}

#[tokio::test(start_paused = true)]
async fn a_second_start_of_a_starting_target_leaves_the_first_report_in_place() {
    let (h, team) = team();
    h.say(&team, &user("alice"), "!toggle stop web").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    h.say(&team, &user("alice"), "!toggle start web").await;
    let again = h.say(&team, &user("bob"), "!toggle start web").await;
    assert!(again[0].starts_with("web is already on"), "{again:?}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent = h.homeserver.sent();
    assert!(sent.last().unwrap().starts_with("web is up: 2/2 ready after"), "{sent:?}");
}
