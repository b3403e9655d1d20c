//! What the bridge asks of the homeserver, as a small trait: the real client implements it
//! with the client-server API, and the bridge's unit tests with an in-memory fake.
//!
//! Encrypted sends are not here: they go through [`crate::crypto`], which has its own client.

use super::*;

/// The homeserver, as the bridge uses it: join, leave, read a room, send a message.
pub trait Homeserver: Send + Sync + 'static {
    /// The bot's user id.
    fn bot(&self) -> &UserId;

    /// Joins `room` (on an invite).
    fn join(&self, room: &RoomId) -> impl Future<Output = Result<(), MatrixError>> + Send;

    /// Leaves `room`, or rejects its invite, saying why.
    fn leave(&self, room: &RoomId, reason: &str) -> impl Future<Output = Result<(), MatrixError>> + Send;

    /// Everyone with a membership in `room`, and that membership.
    fn members(
        &self,
        room: &RoomId,
    ) -> impl Future<Output = Result<BTreeMap<OwnedUserId, MembershipState>, MatrixError>> + Send;

    /// The content of the room's state event of `kind` (empty state key); `None` when unset.
    fn state(
        &self,
        room: &RoomId,
        kind: StateEventType,
    ) -> impl Future<Output = Result<Option<serde_json::Value>, MatrixError>> + Send;

    /// Sends `content` as an unencrypted `m.room.message` under `txn`.
    fn send_message(
        &self,
        room: &RoomId,
        txn: &TransactionId,
        content: &RoomMessageEventContent,
    ) -> impl Future<Output = Result<(), MatrixError>> + Send;
}

impl Homeserver for MatrixClient {
    fn bot(&self) -> &UserId {
        MatrixClient::bot(self)
    }

    async fn join(&self, room: &RoomId) -> Result<(), MatrixError> {
        self.send(join_room_by_id::v3::Request::new(room.to_owned())).await.map(drop)
    }

    async fn leave(&self, room: &RoomId, reason: &str) -> Result<(), MatrixError> {
        let mut request = leave_room::v3::Request::new(room.to_owned());
        request.reason = Some(reason.to_owned());
        self.send(request).await.map(drop)
    }

    async fn members(&self, room: &RoomId) -> Result<BTreeMap<OwnedUserId, MembershipState>, MatrixError> {
        let response = self.send(get_member_events::v3::Request::new(room.to_owned())).await?;
        let mut members = BTreeMap::new();
        for raw in response.chunk {
            if let Ok(ev) = raw.deserialize()
                && let Ok(user) = <&UserId>::try_from(ev.state_key().as_str())
            {
                members.insert(user.to_owned(), ev.membership().clone());
            }
        }
        Ok(members)
    }

    async fn state(&self, room: &RoomId, kind: StateEventType) -> Result<Option<serde_json::Value>, MatrixError> {
        let request = get_state_event_for_key::v3::Request::new(room.to_owned(), kind, String::new());
        match self.send(request).await {
            Ok(response) => Ok(Some(serde_json::from_str(response.event_or_content.get()).unwrap_or_default())),
            Err(e) if e.errcode() == Some("M_NOT_FOUND") => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn send_message(
        &self,
        room: &RoomId,
        txn: &TransactionId,
        content: &RoomMessageEventContent,
    ) -> Result<(), MatrixError> {
        let request = send_message_event::v3::Request::new(room.to_owned(), txn.to_owned(), content)
            .map_err(|e| MatrixError::Build(e.to_string()))?;
        self.send(request).await.map(drop)
    }
}
