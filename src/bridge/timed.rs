//! Time: the stop a timed `start` sets (`for 2h`, `until 18:00`, or the target's `max_on`),
//! `extend`, the warning before the stop, and the schedules' switches. Every instant comes
//! from the injected clock; every timer is a row in the store, so after a restart each due one
//! runs once, late ones at once and saying how late.

use super::*;
use crate::{
    calendar::{self, Switch},
    commands::OnFor,
    store::{Timer, TimerAction, TimerStage},
};

/// How long a timer whose scale failed waits before it is tried again.
const TIMER_RETRY_MS: i64 = 60_000;

impl<H: Homeserver> Bridge<H> {
    /// When a `start` of `t` now should stop it again, and whether `max_on` cut that short:
    /// what the command asked for, else `max_on`, else never.
    pub(super) fn stop_time(&self, t: &Target, on_for: Option<OnFor>, now_ms: i64) -> Option<(i64, bool)> {
        let asked = match on_for {
            Some(OnFor::For(d)) => Some(now_ms + d.as_millis() as i64),
            Some(OnFor::Until { at, tomorrow }) => {
                Some(calendar::next_time_of_day(now_ms, &self.config.timezone, at, tomorrow))
            }
            None => None,
        };
        let longest = t.max_on.map(|m| now_ms + m.as_millis() as i64);
        match (asked, longest) {
            (Some(a), Some(l)) if a > l => Some((l, true)),
            (Some(a), _) => Some((a, false)),
            (None, Some(l)) => Some((l, false)),
            (None, None) => None,
        }
    }

    /// Sets `t`'s timed stop at `stop_ms`, with its warning, noticed in `room`.
    pub(super) fn set_timed_stop(&self, t: &Target, stop_ms: i64, room: &RoomId) -> Result<(), BridgeError> {
        let now = self.clock.now_ms();
        let warn = t.warn_before.map(|w| stop_ms - w.as_millis() as i64).filter(|w| *w > now);
        self.store.set_timed_stop(&t.name, stop_ms, warn, room)?;
        self.timers_changed.notify_one();
        Ok(())
    }

    /// `until 17:42 (in 2 h)`, for a stop at `stop_ms`.
    pub(super) fn until_text(&self, stop_ms: i64) -> String {
        let now = self.clock.now_ms();
        let left = Duration::from_millis((stop_ms - now).max(0) as u64);
        replies::until(&calendar::when_text(now, stop_ms, &self.config.timezone), left)
    }

    /// What `t`'s schedule does next after `switch`ing it now, as a sentence; empty without one.
    pub(super) fn schedule_after(&self, t: &Target, switch: Switch) -> String {
        let Some(schedule) = &t.schedule else { return String::new() };
        let now = self.clock.now_ms();
        match schedule.next(switch.opposite(), now) {
            Some(at) => replies::schedule_next(switch.opposite(), &calendar::when_text(now, at, &self.config.timezone)),
            None => String::new(),
        }
    }

    /// The timed stop and the next scheduled switch of `t`, for `status`.
    pub(super) fn timers_line(&self, t: &Target) -> Result<String, BridgeError> {
        let mut line = String::new();
        if let Some(stop) = self.store.timed_stop(&t.name)? {
            line.push_str(&replies::status_until(&self.until_text(stop.due_ms)));
        }
        if let Some(next) = self.store.next_scheduled(&t.name)?
            && let Some(switch) = next.switch()
        {
            let when = calendar::when_text(self.clock.now_ms(), next.due_ms, &self.config.timezone);
            line.push_str(&replies::status_schedule(switch, &when));
        }
        Ok(line)
    }

    /// `extend [target] <by>`: moves `t`'s timed stop `by` later, at most `max_on` from now.
    pub(super) fn extend(&self, t: &Target, by: Duration, room: &RoomId) -> Result<String, BridgeError> {
        let Some(stop) = self.store.timed_stop(&t.name)? else { return Ok(replies::no_timed_stop(t)) };
        let now = self.clock.now_ms();
        let mut wanted = stop.due_ms.max(now) + by.as_millis() as i64;
        let mut capped = String::new();
        if let Some(max_on) = t.max_on
            && wanted > now + max_on.as_millis() as i64
        {
            wanted = now + max_on.as_millis() as i64;
            capped = replies::capped(t, max_on);
        }
        self.set_timed_stop(t, wanted, room)?;
        Ok(format!("{}{capped}", replies::extended(t, &self.until_text(wanted))))
    }

    /// Plans each target's next scheduled switches from the schedule as configured now.
    /// Switches that came due while the bridge was away are kept, to run late.
    pub fn plan_schedules(&self) -> Result<(), BridgeError> {
        let now = self.clock.now_ms();
        for t in &self.config.targets {
            self.store.forget_future_scheduled(&t.name, now)?;
            if let Some(schedule) = &t.schedule {
                for (switch, action) in [(Switch::On, TimerAction::On), (Switch::Off, TimerAction::Off)] {
                    if let Some(at) = schedule.next(switch, now) {
                        self.store.add_scheduled(&t.name, action, at)?;
                    }
                }
            }
        }
        self.timers_changed.notify_one();
        Ok(())
    }

    /// When the next timer is due, if any.
    pub fn next_timer_due(&self) -> Option<i64> {
        self.store.next_timer_due().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the timers");
            None
        })
    }

    /// Waits until a timer is set or changed.
    pub async fn timers_changed(&self) {
        self.timers_changed.notified().await
    }

    /// Runs every timer due now, once each; returns how many ran. Of a target's overdue
    /// scheduled switches only the latest runs: after a weekend away, Monday's state counts.
    pub async fn run_due_timers(&self) -> usize {
        let now = self.clock.now_ms();
        let due = match self.store.due_timers(now) {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the due timers");
                return 0;
            }
        };
        let mut ran = 0;
        for timer in &due {
            let superseded = timer.action.is_scheduled()
                && timer.stage == TimerStage::Pending
                && due.iter().any(|o| o.target == timer.target && o.action.is_scheduled() && o.due_ms > timer.due_ms);
            let result = if superseded {
                tracing::info!(target = %timer.target, action = ?timer.action, "skipping a scheduled switch a later one supersedes");
                self.skip_scheduled(timer, now)
            } else {
                self.run_timer(timer, now).await
            };
            match result {
                Ok(()) => ran += 1,
                Err(e) => {
                    tracing::warn!(target = %timer.target, kind = e.kind(), error = %e, "a timer could not finish; it is tried again")
                }
            }
        }
        ran
    }

    /// Drops a scheduled switch that a later one supersedes, and plans its next one.
    fn skip_scheduled(&self, timer: &Timer, now: i64) -> Result<(), BridgeError> {
        self.store.finish_timer(timer.id)?;
        self.plan_next(timer, now)
    }

    /// Plans the switch after `timer` by its target's schedule.
    fn plan_next(&self, timer: &Timer, now: i64) -> Result<(), BridgeError> {
        let schedule = self.config.target(&timer.target).and_then(|t| t.schedule.as_ref());
        if let (Some(schedule), Some(switch)) = (schedule, timer.switch())
            && let Some(at) = schedule.next(switch, now.max(timer.due_ms))
        {
            self.store.add_scheduled(&timer.target, timer.action, at)?;
        }
        Ok(())
    }

    async fn run_timer(&self, timer: &Timer, now: i64) -> Result<(), BridgeError> {
        let Some(t) = self.config.target(&timer.target) else {
            tracing::info!(target = %timer.target, "forgetting a timer of a target no longer configured");
            return Ok(self.store.finish_timer(timer.id)?);
        };
        let notice = match &timer.stage {
            TimerStage::Acted(notice) => notice.clone(),
            stage => {
                let restarted = *stage == TimerStage::Acting;
                self.store.set_timer_stage(timer.id, &TimerStage::Acting)?;
                match self.act(t, timer, now, restarted).await {
                    Some(notice) => notice,
                    None => return Ok(()),
                }
            }
        };
        self.store.set_timer_stage(timer.id, &TimerStage::Acted(notice.clone()))?;
        if let Some(text) = notice
            && let Some(room) = self.timer_room(timer)?
        {
            self.send_notice(&room, None, &Reply::text(text), &txn_for("timer", &timer.id.to_string())).await?;
        }
        self.store.finish_timer(timer.id)?;
        self.metrics.timers.get_or_create(&KindLabel { kind: timer.action.as_str().into() }).inc();
        self.plan_next(timer, now)
    }

    /// Does what `timer` says to `t`; returns its notice (`Some(None)`: nothing to say), or
    /// `None` when it failed and was put off.
    async fn act(&self, t: &Target, timer: &Timer, now: i64, restarted: bool) -> Option<Option<String>> {
        let tz = &self.config.timezone;
        let due_text = calendar::when_text(now, timer.due_ms, tz);
        let late = replies::late(Duration::from_millis((now - timer.due_ms).max(0) as u64), &due_text);
        let scaler = match &self.scaler {
            Ok(s) => s,
            Err(e) => return Some(Some(replies::failure(e))),
        };
        let memory = self.store.as_ref();
        let (verb, result) = match timer.action {
            TimerAction::Warn => {
                let stop = self.store.timed_stop(&t.name).ok().flatten().filter(|s| s.due_ms > now);
                return Some(stop.map(|s| replies::stop_warning(t, &calendar::when_text(now, s.due_ms, tz))));
            }
            TimerAction::Stop | TimerAction::Off => ("stop", scaler.stop(t, memory).await),
            TimerAction::On => ("start", scaler.start(t, None, memory).await),
        };
        let actor = if timer.action.is_scheduled() { "the schedule" } else { "a timed stop" };
        self.record_action(t, actor, timer.action.as_str().to_owned(), &result);
        let change = match result {
            Ok(change) => change,
            Err(e) => {
                self.metrics.error("kubernetes");
                tracing::warn!(target = %t.name, error = %e, "a timer could not scale; trying again in a minute");
                if let Err(e) = self.store.retry_timer(timer.id, now + TIMER_RETRY_MS) {
                    tracing::warn!(error = %e, "could not put a timer off");
                }
                let first = timer.attempts == 0;
                if first && let Some(room) = self.timer_room(timer).ok().flatten() {
                    let text = Reply::text(replies::timer_failed(t, verb, &e));
                    let txn = txn_for("timer-failed", &timer.id.to_string());
                    if let Err(e) = self.send_notice(&room, None, &text, &txn).await {
                        tracing::warn!(error = %e, "could not say that a timer failed");
                    }
                }
                return None;
            }
        };
        tracing::info!(target = %t.name, action = timer.action.as_str(), ?change, late_ms = now - timer.due_ms, "a timer ran");
        if let Change::Scaled { to, .. } = change {
            let reason = if timer.action.is_scheduled() { "ScaledBySchedule" } else { "TimedStop" };
            self.audit(t, to, reason, replies::audit_by_timer(to, timer.action.is_scheduled())).await;
        }
        Some(match (timer.action, change) {
            (TimerAction::Stop, Change::Scaled { from, .. }) => Some(replies::timed_stop(t, Some(from), &late)),
            // NB: after a restart in the middle of its own stop, "already off" is this stop's work.
            (TimerAction::Stop, Change::Unchanged { .. }) if restarted => Some(replies::timed_stop(t, None, &late)),
            (TimerAction::Stop, Change::Unchanged { .. }) => None,
            // NB: the schedule takes over from a chat command at its next switch.
            (_, change) => {
                if let Err(e) = self.store.cancel_timed_stop(&t.name) {
                    tracing::warn!(error = %e, "could not cancel a timed stop the schedule overrides");
                }
                match (timer.switch(), change) {
                    (Some(switch), Change::Scaled { from, to }) => {
                        Some(replies::scheduled(t, switch, from, to, &self.schedule_after(t, switch), &late))
                    }
                    _ => None,
                }
            }
        })
    }

    /// Where `timer`'s notices go: the room of the command that set it, else the room that
    /// last commanded its target.
    fn timer_room(&self, timer: &Timer) -> Result<Option<OwnedRoomId>, BridgeError> {
        match &timer.room_id {
            Some(room) => Ok(Some(room.clone())),
            None => Ok(self.store.target_room(&timer.target)?),
        }
    }
}

impl Timer {
    /// The schedule switch this timer is, if it is one.
    fn switch(&self) -> Option<Switch> {
        match self.action {
            TimerAction::On => Some(Switch::On),
            TimerAction::Off => Some(Switch::Off),
            TimerAction::Stop | TimerAction::Warn => None,
        }
    }
}
