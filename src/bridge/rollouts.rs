//! Rollouts: after a start or stop, watch the workload and post the outcome in reply to the
//! command; after a restart, follow the interrupted ones again.

use super::*;

impl<H: Homeserver> Bridge<H> {
    /// Watches a rollout in the background and posts its outcome in reply to the command; the
    /// stored rollout is forgotten once that is done.
    pub(super) fn follow_rollout(&self, rollout: Rollout) {
        let (Ok(scaler), Some(target)) = (&self.scaler, self.config.target(&rollout.target)) else {
            tracing::info!(event_id = %rollout.event_id, target = %rollout.target, "not following a rollout of a target no longer configured");
            self.forget_rollout(&rollout.event_id);
            return;
        };
        let (room, event_id) = (rollout.room_id.clone(), rollout.event_id.clone());
        let (scaler, target) = (scaler.clone(), target.clone());
        let (outbox, store) = (self.outbox.clone(), self.store.clone());
        let timeout = self.config.rollout_timeout.saturating_sub(elapsed_since_ms(rollout.started_ms));
        tokio::spawn(async move {
            let text = match scaler.wait_until_settled(&target, timeout).await {
                Ok(s) => outcome_line(&target, &s, rollout.up, elapsed_since_ms(rollout.started_ms)),
                Err(e) => replies::could_not_follow(&target, &e),
            };
            let reply = Reply::text(text);
            let txn = txn_id("outcome", &event_id);
            for attempt in 1..=OUTCOME_ATTEMPTS {
                match outbox.send_notice(&room, Some(&event_id), &reply, &txn).await {
                    Err(e) if e.is_transient() && attempt < OUTCOME_ATTEMPTS => {
                        tracing::debug!(error = %e, attempt, "could not post the rollout outcome yet; retrying");
                        tokio::time::sleep(RETRY_DELAY * attempt).await;
                    }
                    Err(e) if e.is_transient() => {
                        tracing::warn!(error = %e, "could not post the rollout outcome; it is retried at the next start");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not post the rollout outcome");
                        break;
                    }
                    Ok(()) => break,
                }
            }
            if let Err(e) = store.finish_rollout(&event_id) {
                tracing::warn!(error = %e, "could not forget a reported rollout");
            }
        });
    }

    pub(super) fn forget_rollout(&self, event_id: &EventId) {
        if let Err(e) = self.store.finish_rollout(event_id) {
            tracing::warn!(error = %e, "could not forget a rollout");
        }
    }

    /// The rollouts a restart interrupted after their command was answered. Read before the
    /// worker starts, so no rollout is both resumed here and followed by its command again.
    pub fn interrupted_rollouts(&self) -> Vec<Rollout> {
        self.store.answered_rollouts().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not read the interrupted rollouts");
            Vec::new()
        })
    }

    /// Follows the interrupted rollouts again and reports them, unless they are long past.
    pub async fn resume_rollouts(&self, rollouts: Vec<Rollout>) {
        self.crypto.wait(CRYPTO_SETUP_WAIT).await;
        for rollout in rollouts {
            if elapsed_since_ms(rollout.started_ms) > self.config.rollout_timeout + STALE_ROLLOUT {
                tracing::info!(event_id = %rollout.event_id, "not reporting a rollout interrupted long ago");
                self.forget_rollout(&rollout.event_id);
                continue;
            }
            let room = &rollout.room_id;
            // NB: the room's encryption must be known before anything is sent there.
            if !self.rooms.is_loaded(room)
                && let Err(e) = self.load_room(room).await
            {
                tracing::warn!(error = %e, "could not load the room of an interrupted rollout; retried at the next start");
                continue;
            }
            tracing::info!(event_id = %rollout.event_id, target = %rollout.target, "following an interrupted rollout again");
            self.follow_rollout(rollout);
        }
    }
}
