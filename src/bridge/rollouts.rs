//! Rollouts: after a start or stop, watch the workload and post the outcome in reply to the
//! command; after a restart, follow the interrupted ones again.

use tokio::sync::oneshot;

use super::*;

/// The rollout followed for each target. A later command on the same target takes over from
/// the one before: that one's report would only describe a change already undone.
#[derive(Default)]
pub(super) struct Followed(Mutex<HashMap<String, Follower>>);

/// The rollout followed for a target: its command, its direction, and who to tell of a later one.
struct Follower {
    event_id: ruma::OwnedEventId,
    up: bool,
    taken_over: oneshot::Sender<OwnedRoomId>,
}

impl Followed {
    /// Follows `rollout` for its target; the rollout it takes over from is told the room of
    /// the command that did. The receiver hears of the next one.
    fn take_over(&self, rollout: &Rollout) -> oneshot::Receiver<OwnedRoomId> {
        let (tx, rx) = oneshot::channel();
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let follower = Follower { event_id: rollout.event_id.clone(), up: rollout.up, taken_over: tx };
        if let Some(earlier) = map.insert(rollout.target.clone(), follower) {
            let _ = earlier.taken_over.send(rollout.room_id.clone());
        }
        rx
    }

    /// A command from `room` found `target` already where it wanted it (`up`): a rollout the
    /// other way is then over, and that command's answer says where the workload is.
    pub(super) fn found_already(&self, target: &str, up: bool, room: &RoomId) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(target).is_some_and(|f| f.up != up)
            && let Some(earlier) = map.remove(target)
        {
            let _ = earlier.taken_over.send(room.to_owned());
        }
    }

    /// Stops following the rollout of `event_id` on `target`, unless a later one took over.
    fn done(&self, target: &str, event_id: &EventId) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(target).is_some_and(|f| f.event_id == event_id) {
            map.remove(target);
        }
    }
}

/// A rollout a restart interrupted, registered as followed so a later command takes it over.
pub struct Interrupted {
    rollout: Rollout,
    taken_over: oneshot::Receiver<OwnedRoomId>,
}

impl<H: Homeserver> Bridge<H> {
    /// Watches a rollout in the background and posts its outcome in reply to the command, at
    /// the earliest [`REPORT_HOLD`] after it; the stored rollout is forgotten once that is done.
    /// A later command on the same target before then takes over: in the same room nothing
    /// more is said (that command's reply and report tell), in another room a short line does.
    pub(super) fn follow_rollout(&self, rollout: Rollout) {
        let taken_over = self.followed.take_over(&rollout);
        self.follow(rollout, taken_over);
    }

    /// Follows `rollout`, already registered in [`Followed`]; `taken_over` hears of a later one.
    fn follow(&self, rollout: Rollout, taken_over: oneshot::Receiver<OwnedRoomId>) {
        let (Ok(scaler), Some(target)) = (&self.scaler, self.config.target(&rollout.target)) else {
            tracing::info!(event_id = %rollout.event_id, target = %rollout.target, "not following a rollout of a target no longer configured");
            self.followed.done(&rollout.target, &rollout.event_id);
            self.forget_rollout(&rollout.event_id);
            return;
        };
        let (scaler, target) = (scaler.clone(), target.clone());
        let (outbox, store, followed) = (self.outbox.clone(), self.store.clone(), self.followed.clone());
        let timeout = self.config.rollout_timeout.saturating_sub(elapsed_since_ms(rollout.started_ms));
        tokio::spawn(async move {
            let report = async {
                let (settled, ()) =
                    tokio::join!(scaler.wait_until_settled(&target, timeout), tokio::time::sleep(REPORT_HOLD));
                match settled {
                    Ok(s) => outcome_line(&target, &s, rollout.up, elapsed_since_ms(rollout.started_ms)),
                    Err(e) => replies::could_not_follow(&target, &e),
                }
            };
            // NB: a closed channel (the bridge is gone) is no taking over; the report goes on.
            let text = tokio::select! {
                Ok(room) = taken_over => {
                    tracing::debug!(event_id = %rollout.event_id, target = %target.name, "a later command took over this rollout");
                    (room != rollout.room_id).then(|| replies::taken_over(&target, rollout.up))
                }
                text = report => Some(text),
            };
            followed.done(&target.name, &rollout.event_id);
            if let Some(text) = text
                && !post_outcome(&outbox, &rollout, &text).await
            {
                return;
            }
            if let Err(e) = store.finish_rollout(&rollout.event_id) {
                tracing::warn!(error = %e, "could not forget a reported rollout");
            }
        });
    }

    pub(super) fn forget_rollout(&self, event_id: &EventId) {
        if let Err(e) = self.store.finish_rollout(event_id) {
            tracing::warn!(error = %e, "could not forget a rollout");
        }
    }

    /// The rollouts a restart interrupted after their command was answered, oldest first, each
    /// already registered as followed. Called before the worker starts: no rollout is both
    /// resumed and followed by its command again, and a later command on the same target
    /// (two stored here, or one redelivered to the worker) takes over however the two race.
    pub fn interrupted_rollouts(&self) -> Vec<Interrupted> {
        let rollouts = self.store.answered_rollouts().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not read the interrupted rollouts");
            Vec::new()
        });
        rollouts
            .into_iter()
            .map(|rollout| Interrupted { taken_over: self.followed.take_over(&rollout), rollout })
            .collect()
    }

    /// Follows the interrupted rollouts again and reports them, unless they are long past.
    pub async fn resume_rollouts(&self, interrupted: Vec<Interrupted>) {
        self.crypto.wait(CRYPTO_SETUP_WAIT).await;
        for Interrupted { rollout, taken_over } in interrupted {
            if elapsed_since_ms(rollout.started_ms) > self.config.rollout_timeout + STALE_ROLLOUT {
                tracing::info!(event_id = %rollout.event_id, "not reporting a rollout interrupted long ago");
                self.followed.done(&rollout.target, &rollout.event_id);
                self.forget_rollout(&rollout.event_id);
                continue;
            }
            let room = &rollout.room_id;
            // NB: the room's encryption must be known before anything is sent there.
            if !self.rooms.is_loaded(room)
                && let Err(e) = self.load_room(room).await
            {
                tracing::warn!(error = %e, "could not load the room of an interrupted rollout; retried at the next start");
                self.followed.done(&rollout.target, &rollout.event_id);
                continue;
            }
            tracing::info!(event_id = %rollout.event_id, target = %rollout.target, "following an interrupted rollout again");
            self.follow(rollout, taken_over);
        }
    }
}

/// Posts a rollout's outcome in reply to its command, retrying while the homeserver is away;
/// false when it is still away after that, so the next start tries again.
async fn post_outcome<H: Homeserver>(outbox: &Outbox<H>, rollout: &Rollout, text: &str) -> bool {
    let reply = Reply::text(text.to_owned());
    let txn = txn_id("outcome", &rollout.event_id);
    for attempt in 1..=OUTCOME_ATTEMPTS {
        match outbox.send_notice(&rollout.room_id, Some(&rollout.event_id), &reply, &txn).await {
            Err(e) if e.is_transient() && attempt < OUTCOME_ATTEMPTS => {
                tracing::debug!(error = %e, attempt, "could not post the rollout outcome yet; retrying");
                tokio::time::sleep(RETRY_DELAY * attempt).await;
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "could not post the rollout outcome; it is retried at the next start");
                return false;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not post the rollout outcome");
                return true;
            }
            Ok(()) => return true,
        }
    }
    true
}
