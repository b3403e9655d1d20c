//! Encrypted events: decrypt (refusing forged senders and replayed ciphertexts), park those
//! whose room key has not come, and the one "could not decrypt" notice.

use super::*;

impl<H: Homeserver> Bridge<H> {
    pub(super) async fn on_encrypted(&self, job: &Job, room: &RoomId, sender: &UserId) -> Result<(), BridgeError> {
        let Some(crypto) = self.crypto.get() else {
            return Err(BridgeError::WouldLeakPlaintext(room.to_owned()));
        };
        let mut decryption = crypto.decrypt(&job.event, room).await;
        if let Decryption::Decrypted { info, .. } = &decryption
            && unknown_sending_device(info)
        {
            // NB: the sender's new device may not be known yet: ask once, then decrypt again.
            if let Err(e) = crypto.refresh_devices(sender).await {
                tracing::debug!(error = %e, "could not refresh the sender's devices");
            }
            decryption = crypto.decrypt(&job.event, room).await;
        }
        match decryption {
            Decryption::Decrypted { info, .. } if unknown_sending_device(&info) => {
                self.metrics.error("forged_event");
                tracing::warn!(
                    event_id = %job.event_id,
                    sender = %sender,
                    "refusing an encrypted event whose session does not belong to a device of its claimed sender"
                );
                Ok(())
            }
            Decryption::Decrypted { event, info, position } => {
                if job.attempts > 0 {
                    self.metrics.crypto("recovered");
                }
                let inner_room = event.get_field::<String>("room_id").ok().flatten();
                if info.sender != sender || inner_room.as_deref().is_some_and(|r| r != room.as_str()) {
                    self.metrics.error("forged_event");
                    tracing::warn!(event_id = %job.event_id, "refusing an event whose encrypted payload names another sender or room");
                    return Ok(());
                }
                // NB: the outer event id and timestamp are not authenticated; the Megolm message
                // index is. A ciphertext seen before under another event id is a replay.
                let Some(position) = position else {
                    self.metrics.error("forged_event");
                    tracing::warn!(event_id = %job.event_id, "refusing a decrypted event whose Megolm message index cannot be read");
                    return Ok(());
                };
                let first = self.store.first_event_at_megolm_index(
                    &position.session_id,
                    position.index,
                    &job.event_id,
                    job.received_ms,
                )?;
                if first != job.event_id {
                    self.metrics.error("replayed_event");
                    tracing::warn!(
                        event_id = %job.event_id,
                        first_event_id = %first,
                        sender = %sender,
                        session_id = %position.session_id,
                        message_index = position.index,
                        "refusing a replayed ciphertext: this Megolm message already came under another event id"
                    );
                    return Ok(());
                }
                match event.deserialize() {
                    Ok(AnyTimelineEvent::MessageLike(AnyMessageLikeEvent::RoomMessage(
                        MessageLikeEvent::Original(m),
                    ))) => self.on_message(job, &m, Some(&info)).await,
                    Ok(_) => Ok(()),
                    Err(e) => {
                        tracing::debug!(event_id = %job.event_id, error = %e, "skipping a decrypted event we cannot read");
                        Ok(())
                    }
                }
            }
            Decryption::MissingKey { session_id: Some(_) } if !policy::is_known(&self.config, sender) => {
                // NB: only allowed senders' events wait for their keys, so a flood from anyone
                // else cannot push out a real command.
                self.metrics.crypto("not_parked_stranger");
                tracing::debug!(event_id = %job.event_id, sender = %sender, "not keeping an unreadable event of a sender who is not allowed");
                Ok(())
            }
            Decryption::MissingKey { session_id: Some(session_id) } => {
                self.metrics.crypto("waiting_for_key");
                tracing::debug!(event_id = %job.event_id, session_id, "no room key yet; waiting for it");
                let parked = Parked {
                    event_id: job.event_id.clone(),
                    room_id: room.to_owned(),
                    sender: sender.to_owned(),
                    parked_ms: job.received_ms,
                };
                self.store.park_undecrypted(&parked, &session_id, &job.event)?;
                Ok(())
            }
            Decryption::MissingKey { session_id: None } | Decryption::Failed(_) => {
                tracing::info!(event_id = %job.event_id, sender = %sender, "cannot decrypt an event");
                self.tell_undecryptable(room, sender, &job.event_id).await
            }
        }
    }

    /// Tells an allowed sender, once, that their message could not be read. Others hear nothing.
    pub(super) async fn tell_undecryptable(
        &self,
        room: &RoomId,
        sender: &UserId,
        event_id: &EventId,
    ) -> Result<(), BridgeError> {
        self.metrics.crypto("undecryptable");
        if !policy::is_known(&self.config, sender) {
            return Ok(());
        }
        let reply = Reply::text(replies::undecryptable(sender));
        self.send_notice(room, Some(event_id), &reply, &txn_id("utd", event_id)).await
    }

    /// Answers the senders of messages whose room key never came within the wait window.
    pub async fn report_undecryptable(&self, now_ms: i64) {
        let before = now_ms - self.config.decryption_wait.as_millis() as i64;
        let expired = match self.store.take_expired_undecrypted(before) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the events waiting for keys");
                return;
            }
        };
        for parked in expired {
            if let Err(e) = self.tell_undecryptable(&parked.room_id, &parked.sender, &parked.event_id).await {
                tracing::warn!(error = %e, "could not tell a sender their message was unreadable");
            }
        }
    }
}

/// Whether the Megolm session of a decrypted event cannot be tied to a device of the event's
/// claimed sender (a forged sender, or a device we do not know).
pub(super) fn unknown_sending_device(info: &EncryptionInfo) -> bool {
    use matrix_sdk_common::deserialized_responses::{VerificationLevel, VerificationState};
    info.sender_device.is_none()
        || matches!(
            info.verification_state,
            VerificationState::Unverified(VerificationLevel::None(_) | VerificationLevel::MismatchedSender)
        )
}
