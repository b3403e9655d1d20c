//! Timed starts, `extend`, warnings and schedules, tested on the injected clock: no test waits
//! for wall-clock time. Restarts are a new bridge on the same state.

use super::fake::{Harness, room, user};
use super::*;
use crate::{calendar::when_text, clock::Clock};

const HOUR: i64 = 3_600_000;
const MINUTE: i64 = 60_000;

/// alice operates `web` (2 replicas) and `db`; the zone is UTC.
const CONFIG: &str = "allowed_users: ['@alice:example.org']\n\
                      targets:\n\
                      \x20 - {name: web, namespace: apps}\n\
                      \x20 - {name: db, namespace: apps, max_on: 8h}\n";

/// Monday 2026-12-07 07:00 UTC.
const MONDAY_7AM: i64 = 1_796_626_800_000;

fn at(h: &Harness, offset_ms: i64) -> String {
    when_text(h.clock.now_ms(), h.clock.now_ms() + offset_ms, &jiff::tz::TimeZone::UTC)
}

/// A harness with alice in a DM, and `web` stopped (so it remembers 2 replicas).
async fn stopped(config: &str) -> (Harness, OwnedRoomId) {
    let h = Harness::new(config);
    let dm = room("dm");
    h.homeserver.room(&dm, &[&user("alice")]);
    h.say(&dm, &user("alice"), "stop web").await;
    (h, dm)
}

#[tokio::test(start_paused = true)]
async fn a_timed_start_says_until_when_warns_before_and_stops_once_on_time() {
    let (h, dm) = stopped(CONFIG).await;
    let stop_at = at(&h, 2 * HOUR);
    let said = h.say(&dm, &user("alice"), "start web for 2h").await;
    assert_eq!(said, [format!("web is starting: 0 → 2 replicas, on until {stop_at} (in 2 h).")]);

    h.clock.advance_ms(109 * MINUTE);
    assert_eq!(h.bridge.run_due_timers().await, 0, "nothing due yet");
    h.clock.advance_ms(MINUTE);
    assert_eq!(h.bridge.run_due_timers().await, 1);
    assert_eq!(
        h.homeserver.sent().last().unwrap(),
        &format!("web turns off at {stop_at}; `extend web 1h` keeps it on.")
    );
    assert_eq!(h.replicas("web"), 2);

    h.clock.advance_ms(10 * MINUTE);
    assert_eq!(h.bridge.run_due_timers().await, 1);
    assert_eq!(h.replicas("web"), 0);
    assert_eq!(
        h.homeserver.sent().last().unwrap(),
        "web is stopping: its time is up (2 → 0 replicas; `start` brings back 2)."
    );
    let (sent, patches) = (h.homeserver.sent().len(), h.patches());
    h.clock.advance_ms(HOUR);
    assert_eq!(h.bridge.run_due_timers().await, 0);
    assert_eq!((h.homeserver.sent().len(), h.patches()), (sent, patches), "it ran once");
    assert_eq!(h.cluster.events().last().unwrap()["reason"], "TimedStop");
    let text = h.metrics.render();
    assert!(text.contains("matrix_k8s_toggle_timers_total{kind=\"stop\"} 1"), "{text}");
    assert!(text.contains("matrix_k8s_toggle_timers_total{kind=\"warn\"} 1"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn stop_cancels_the_timed_stop_and_its_warning() {
    let (h, dm) = stopped(CONFIG).await;
    h.say(&dm, &user("alice"), "start web for 1h").await;
    h.say(&dm, &user("alice"), "stop web").await;
    h.say(&dm, &user("alice"), "start web").await;
    h.clock.advance_ms(2 * HOUR);
    assert_eq!(h.bridge.run_due_timers().await, 0);
    assert_eq!(h.replicas("web"), 2, "the later plain start stays on");
}

#[tokio::test(start_paused = true)]
async fn extend_moves_the_stop_and_status_shows_it() {
    let (h, dm) = stopped(CONFIG).await;
    assert_eq!(
        h.say(&dm, &user("alice"), "extend web 1h").await,
        ["web has no timed stop; `start web for 1h` sets one."]
    );
    h.say(&dm, &user("alice"), "start web for 1h").await;
    let stop_at = at(&h, 2 * HOUR);
    assert_eq!(
        h.say(&dm, &user("alice"), "extend web 1h").await,
        [format!("web now stays on until {stop_at} (in 2 h).")]
    );
    let status = h.say(&dm, &user("alice"), "status web").await;
    assert!(status[0].ends_with(&format!("; on until {stop_at} (in 2 h)")), "{status:?}");
    h.clock.advance_ms(HOUR + MINUTE);
    h.bridge.run_due_timers().await;
    assert_eq!(h.replicas("web"), 2, "the first stop time passed: still on");
    h.clock.advance_ms(HOUR);
    h.bridge.run_due_timers().await;
    assert_eq!(h.replicas("web"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_targets_max_on_times_a_plain_start_and_caps_a_longer_one() {
    let h = Harness::new(CONFIG);
    let dm = room("dm");
    h.homeserver.room(&dm, &[&user("alice")]);
    h.say(&dm, &user("alice"), "stop db").await;
    let eight = at(&h, 8 * HOUR);
    assert_eq!(
        h.say(&dm, &user("alice"), "start db").await,
        [format!("db is starting: 0 → 2 replicas, on until {eight} (in 8 h).")]
    );
    assert_eq!(
        h.say(&dm, &user("alice"), "start db for 10h").await,
        [format!(
            "db is already on (2 replicas), on until {eight} (in 8 h). db stays on at most 8h from a chat start (max_on)."
        )]
    );
    assert_eq!(h.say(&dm, &user("alice"), "extend db 5h").await.len(), 1);
    h.clock.advance_ms(8 * HOUR);
    h.bridge.run_due_timers().await;
    assert_eq!(h.replicas("db"), 0, "extend is capped too");
}

#[tokio::test(start_paused = true)]
async fn a_stop_due_while_the_bridge_was_down_runs_once_at_start_and_says_how_late() {
    let (mut h, dm) = stopped(CONFIG).await;
    let stop_ms = h.clock.now_ms() + HOUR;
    h.say(&dm, &user("alice"), "start web for 1h").await;
    h.restart();
    h.clock.advance_ms(3 * HOUR);
    // NB: named as the bridge names it now, 2 h later (a date once midnight is in between).
    let stop_at = when_text(h.clock.now_ms(), stop_ms, &jiff::tz::TimeZone::UTC);
    let sent = h.homeserver.sent().len();
    assert_eq!(h.bridge.run_due_timers().await, 2, "the warning and the stop");
    assert_eq!(h.replicas("web"), 0);
    let said = h.homeserver.sent().split_off(sent);
    assert_eq!(said.len(), 1, "no warning for a stop already due: {said:?}");
    assert!(said[0].ends_with(&format!("(2 h late: I was not running at {stop_at}.)")), "{said:?}");
    h.restart();
    assert_eq!(h.bridge.run_due_timers().await, 0, "not again after another restart");
}

#[tokio::test(start_paused = true)]
async fn a_stop_whose_notice_could_not_be_sent_scales_once_and_sends_it_once() {
    let (h, dm) = stopped(CONFIG).await;
    h.say(&dm, &user("alice"), "start web for 1h").await;
    let patches = h.patches();
    h.clock.advance_ms(50 * MINUTE);
    assert_eq!(h.bridge.run_due_timers().await, 1, "the warning");
    h.clock.advance_ms(10 * MINUTE);
    let sent = h.homeserver.sent().len();
    h.homeserver.fail_sends(1);
    assert_eq!(h.bridge.run_due_timers().await, 0, "its notice failed");
    assert_eq!(h.replicas("web"), 0, "it scaled");
    assert_eq!(h.bridge.run_due_timers().await, 1);
    assert_eq!(h.bridge.run_due_timers().await, 0);
    assert_eq!(h.patches(), patches + 1, "one stop");
    let stops = h.homeserver.sent().split_off(sent);
    assert_eq!(stops, ["web is stopping: its time is up (2 → 0 replicas; `start` brings back 2)."]);
}

#[tokio::test(start_paused = true)]
async fn a_stop_interrupted_after_its_scale_says_the_target_is_off_after_the_restart() {
    let (mut h, dm) = stopped(CONFIG).await;
    h.say(&dm, &user("alice"), "start web for 1h").await;
    h.clock.advance_ms(HOUR);
    let timer = h.store.timed_stop("web").unwrap().unwrap();
    // NB: as if the bridge died right after its PATCH: the timer is acting, the workload off.
    h.store.set_timer_stage(timer.id, &crate::store::TimerStage::Acting).unwrap();
    h.cluster.add_deployment("apps", "web", 0);
    h.restart();
    h.bridge.run_due_timers().await;
    assert_eq!(h.homeserver.sent().last().unwrap(), "web is off: its time is up.");
}

/// web on a weekday schedule in UTC.
const SCHEDULED: &str = "allowed_users: ['@alice:example.org']\n\
                         targets:\n\
                         \x20 - name: web\n\
                         \x20   namespace: apps\n\
                         \x20   schedule: {on: 'Mon-Fri 08:00', off: 'Mon-Fri 19:00'}\n";

#[tokio::test(start_paused = true)]
async fn a_schedule_switches_on_and_off_and_a_command_overrides_it_until_its_next_switch() {
    let h = Harness::at(SCHEDULED, MONDAY_7AM);
    let dm = room("dm");
    h.homeserver.room(&dm, &[&user("alice")]);
    h.cluster.add_deployment("apps", "web", 0);
    assert_eq!(
        h.say(&dm, &user("alice"), "stop web").await,
        ["web is already off. The schedule starts it again 08:00."]
    );
    h.bridge.plan_schedules().unwrap();
    h.clock.advance_ms(HOUR);
    assert_eq!(h.bridge.run_due_timers().await, 1);
    assert_eq!(h.replicas("web"), 1);
    assert_eq!(
        h.homeserver.sent().last().unwrap(),
        "web is starting on schedule: 0 → 1 replicas. The schedule stops it 19:00."
    );

    h.clock.advance_ms(HOUR);
    assert_eq!(
        h.say(&dm, &user("alice"), "stop web").await,
        ["web is stopping: 1 → 0 replicas (`start` brings back 1). The schedule starts it again Tue 08:00."]
    );
    let (sent, patches) = (h.homeserver.sent().len(), h.patches());
    h.clock.advance_ms(10 * HOUR);
    assert_eq!(h.bridge.run_due_timers().await, 1, "19:00: the off switch");
    assert_eq!(h.patches(), patches, "already off: nothing to do");
    let said = h.homeserver.sent().split_off(sent);
    assert!(!said.iter().any(|s| s.contains("schedule")), "nothing to say: {said:?}");
    h.clock.advance_ms(13 * HOUR);
    assert_eq!(h.bridge.run_due_timers().await, 1, "Tuesday 08:00");
    assert_eq!(h.replicas("web"), 1);
    assert!(h.metrics.render().contains("matrix_k8s_toggle_timers_total{kind=\"on\"} 2"));
    let history = h.say(&dm, &user("alice"), "history").await;
    assert!(history[0].lines().nth(1).unwrap().ends_with("web: on by the schedule: 0 → 1 replicas"), "{history:?}");
}

#[tokio::test(start_paused = true)]
async fn after_a_weekend_away_only_the_latest_scheduled_switch_runs_so_the_workload_does_not_flap() {
    let mut h = Harness::at(SCHEDULED, MONDAY_7AM - 3 * 24 * HOUR + 11 * HOUR);
    let dm = room("dm");
    h.homeserver.room(&dm, &[&user("alice")]);
    h.say(&dm, &user("alice"), "start web").await;
    h.bridge.plan_schedules().unwrap();
    h.restart();
    h.clock.advance_ms(3 * 24 * HOUR - 11 * HOUR + 5 * HOUR);
    h.bridge.plan_schedules().unwrap();
    assert_eq!(h.bridge.run_due_timers().await, 2, "Friday's off skipped, Monday's on run");
    assert_eq!(h.replicas("web"), 2, "on, as Monday 08:00 says");
    let patches: Vec<_> = h.cluster.requests().into_iter().filter(|r| r.method == "PATCH").collect();
    assert!(patches.is_empty(), "web was on already: no stop and start");
    assert_eq!(h.store.next_scheduled("web").unwrap().unwrap().action, crate::store::TimerAction::Off);
}
