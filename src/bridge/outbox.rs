//! The outbox: the bot's messages, encrypted in encrypted rooms and never plaintext there,
//! resent shortened when the homeserver finds them too large.

use super::*;

/// Sends the bot's messages: encrypted in encrypted rooms, never plaintext there.
pub(super) struct Outbox<H> {
    /// The homeserver.
    pub(super) homeserver: Arc<H>,
    /// Whether a room is encrypted, and who gets its keys.
    pub(super) rooms: Arc<Rooms>,
    /// Encryption, once it is set up.
    pub(super) crypto: Arc<CryptoCell>,
}

impl<H: Homeserver> Outbox<H> {
    pub(super) async fn send_notice(
        &self,
        room: &RoomId,
        reply_to: Option<&EventId>,
        reply: &Reply,
        txn: &OwnedTransactionId,
    ) -> Result<(), BridgeError> {
        match self.send_content(room, notice(reply, reply_to), txn).await {
            Err(e) if e.is_too_large() => {
                let Some(short) = reply.shortened(SHORTENED_REPLY_BYTES) else { return Err(e) };
                tracing::info!(room_id = %room, bytes = reply.plain.len(), "the homeserver refused a reply as too large; sending it shortened");
                self.send_content(room, notice(&short, reply_to), txn).await
            }
            sent => sent,
        }
    }

    pub(super) async fn send_content(
        &self,
        room: &RoomId,
        content: RoomMessageEventContent,
        txn: &OwnedTransactionId,
    ) -> Result<(), BridgeError> {
        let info = self.rooms.get(room).unwrap_or_default();
        if info.encrypted {
            let Some(crypto) = self.crypto.get() else {
                return Err(BridgeError::WouldLeakPlaintext(room.to_owned()));
            };
            let raw = Raw::new(&content).map_err(|e| MatrixError::Build(e.to_string()))?.cast_unchecked();
            let visibility =
                info.history_visibility.as_deref().map(HistoryVisibility::from).unwrap_or(HistoryVisibility::Shared);
            crypto.send_encrypted(room, &info.key_recipients(), visibility, raw, txn.clone()).await?;
            return Ok(());
        }
        self.homeserver.send_message(room, txn, &content).await?;
        Ok(())
    }
}

/// The content of a notice, in reply to `reply_to` when given.
pub(super) fn notice(reply: &Reply, reply_to: Option<&EventId>) -> RoomMessageEventContent {
    let mut content = RoomMessageEventContent::notice_html(reply.plain.clone(), reply.html.clone());
    content.relates_to =
        reply_to.map(|id| Relation::Reply(ruma::events::relation::Reply::new(InReplyTo::new(id.to_owned()))));
    content
}

/// A transaction id derived from an event id, so a repeated send is dropped by the homeserver.
pub(super) fn txn_id(kind: &str, event_id: &EventId) -> OwnedTransactionId {
    txn_for(kind, event_id.as_str())
}

/// A transaction id derived from `key` (what the message is about: a timer, a change), so a
/// repeated send is dropped by the homeserver; only `[A-Za-z0-9_-]` of `key` is kept.
pub(super) fn txn_for(kind: &str, key: &str) -> OwnedTransactionId {
    let safe: String = key.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
    format!("mkt-{kind}-{safe}").into()
}
