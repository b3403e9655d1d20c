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
