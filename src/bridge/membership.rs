//! Membership: invites (join or reject), leaving rooms without allowed users, and loading a
//! room's members, encryption and history visibility.

use super::*;

impl<H: Homeserver> Bridge<H> {
    pub(super) async fn on_member(&self, member: RoomMemberEvent) -> Result<(), BridgeError> {
        let room = member.room_id().to_owned();
        let user = <&UserId>::try_from(member.state_key().as_str()).ok().map(ToOwned::to_owned);
        let Some(user) = user else { return Ok(()) };
        let membership = member.membership().clone();
        if user == *self.homeserver.bot() {
            match membership {
                MembershipState::Invite if member.sender() != self.homeserver.bot() => {
                    return self.on_invite(room, member.sender()).await;
                }
                MembershipState::Leave | MembershipState::Ban => self.rooms.forget(&room),
                _ => {}
            }
            return Ok(());
        }
        let gone = matches!(membership, MembershipState::Leave | MembershipState::Ban);
        self.rooms.set_membership(&room, &user, membership);
        if gone && self.config.leave_rooms_without_allowed_users && self.rooms.is_loaded(&room) {
            let anyone_allowed = self.rooms.get(&room).is_some_and(|r| {
                r.members.iter().any(|(u, m)| {
                    matches!(m, MembershipState::Join | MembershipState::Invite) && policy::may_invite(&self.config, u)
                })
            });
            if !anyone_allowed {
                tracing::info!(room_id = %room, "no allowed user is left; leaving the room");
                self.homeserver.leave(&room, "no allowed user is left in this room").await?;
                self.rooms.forget(&room);
            }
        }
        Ok(())
    }

    pub(super) async fn on_invite(&self, room: OwnedRoomId, inviter: &UserId) -> Result<(), BridgeError> {
        if policy::may_invite(&self.config, inviter) {
            tracing::info!(room_id = %room, inviter = %inviter, "joining on invite");
            match self.homeserver.join(&room).await {
                Ok(_) => {}
                // NB: the invite may have been withdrawn, or the room left, before we got here.
                Err(e) if e.errcode() == Some("M_FORBIDDEN") || e.errcode() == Some("M_NOT_FOUND") => {
                    tracing::info!(room_id = %room, error = %e, "could not join; the invite is gone");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
            self.load_room(&room).await?;
        } else {
            tracing::info!(room_id = %room, inviter = %inviter, "rejecting an invite from a user who is not allowed");
            match self.homeserver.leave(&room, "only allowed users can invite this bot").await {
                Ok(_) => {}
                Err(e) if !e.is_transient() => {
                    tracing::info!(error = %e, "could not reject the invite")
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Loads the member list and encryption state of `room` from the homeserver.
    pub(super) async fn load_room(&self, room: &RoomId) -> Result<(), BridgeError> {
        let members = self.homeserver.members(room).await?;
        // NB: a room once seen encrypted stays so, whatever the homeserver says later.
        if self.store.is_room_encrypted(room)? {
            self.rooms.set_encrypted(room);
        } else if self.homeserver.state(room, StateEventType::RoomEncryption).await?.is_some() {
            self.mark_encrypted(room)?;
        }
        // NB: it decides whether invited members receive the keys of our replies.
        if let Some(content) = self.homeserver.state(room, StateEventType::RoomHistoryVisibility).await?
            && let Some(visibility) = content["history_visibility"].as_str()
        {
            self.rooms.set_history_visibility(room, visibility);
        }
        self.rooms.load(room, members);
        Ok(())
    }

    /// Records that `room` is encrypted, here and in the state database (for after a restart).
    pub(super) fn mark_encrypted(&self, room: &RoomId) -> Result<(), BridgeError> {
        self.rooms.set_encrypted(room);
        self.store.mark_room_encrypted(room)?;
        Ok(())
    }
}
