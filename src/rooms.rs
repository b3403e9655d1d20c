//! Room state the bridge tracks: members, whether the room is encrypted, history visibility.
//! Filled from the homeserver the first time a room is needed, then kept up to date from the
//! state events in transactions.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId, events::room::member::MembershipState};

/// What we know of one room.
#[derive(Debug, Clone, Default)]
pub struct RoomInfo {
    /// Membership of each user seen.
    pub members: BTreeMap<OwnedUserId, MembershipState>,
    /// Whether `m.room.encryption` is set.
    pub encrypted: bool,
    /// `m.room.history_visibility`, when known.
    pub history_visibility: Option<String>,
    /// Whether the member list was loaded from the homeserver.
    pub loaded: bool,
}

impl RoomInfo {
    /// Users whose membership is `join`.
    pub fn joined(&self) -> impl Iterator<Item = &OwnedUserId> {
        self.members.iter().filter(|(_, m)| **m == MembershipState::Join).map(|(u, _)| u)
    }

    /// Users who should receive room keys: joined, plus invited unless history is `joined`-only.
    pub fn key_recipients(&self) -> Vec<OwnedUserId> {
        let invited_too = self.history_visibility.as_deref() != Some("joined");
        self.members
            .iter()
            .filter(|(_, m)| **m == MembershipState::Join || (invited_too && **m == MembershipState::Invite))
            .map(|(u, _)| u.clone())
            .collect()
    }
}

/// All rooms the bridge is in.
#[derive(Debug, Default)]
pub struct Rooms {
    rooms: Mutex<HashMap<OwnedRoomId, RoomInfo>>,
}

impl Rooms {
    fn with<T>(&self, room: &RoomId, f: impl FnOnce(&mut RoomInfo) -> T) -> T {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        f(rooms.entry(room.to_owned()).or_default())
    }

    /// A copy of what we know of `room`.
    pub fn get(&self, room: &RoomId) -> Option<RoomInfo> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner()).get(room).cloned()
    }

    /// Whether the room's members were loaded from the homeserver.
    pub fn is_loaded(&self, room: &RoomId) -> bool {
        self.get(room).is_some_and(|r| r.loaded)
    }

    /// Records a membership change.
    pub fn set_membership(&self, room: &RoomId, user: &UserId, membership: MembershipState) {
        self.with(room, |r| {
            r.members.insert(user.to_owned(), membership);
        });
    }

    /// Marks the room encrypted (this cannot be undone in Matrix).
    pub fn set_encrypted(&self, room: &RoomId) {
        self.with(room, |r| r.encrypted = true);
    }

    /// Records the history visibility.
    pub fn set_history_visibility(&self, room: &RoomId, visibility: &str) {
        self.with(room, |r| r.history_visibility = Some(visibility.to_owned()));
    }

    /// Replaces the member list with one loaded from the homeserver; later events update it.
    pub fn load(&self, room: &RoomId, members: BTreeMap<OwnedUserId, MembershipState>) {
        self.with(room, |r| {
            for (user, m) in members {
                r.members.entry(user).or_insert(m);
            }
            r.loaded = true;
        });
    }

    /// Forgets a room (after the bot left it).
    pub fn forget(&self, room: &RoomId) {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner()).remove(room);
    }
}

#[cfg(test)]
mod tests {
    use ruma::{room_id, user_id};

    use super::*;

    #[test]
    fn key_recipients_include_invited_users_unless_history_is_joined_only() {
        let rooms = Rooms::default();
        let room = room_id!("!r:x");
        rooms.set_membership(room, user_id!("@a:x"), MembershipState::Join);
        rooms.set_membership(room, user_id!("@b:x"), MembershipState::Invite);
        rooms.set_membership(room, user_id!("@c:x"), MembershipState::Leave);
        assert_eq!(rooms.get(room).unwrap().key_recipients().len(), 2);
        rooms.set_history_visibility(room, "joined");
        assert_eq!(rooms.get(room).unwrap().key_recipients(), [user_id!("@a:x").to_owned()]);
    }

    #[test]
    fn loading_does_not_override_newer_membership_from_events() {
        let rooms = Rooms::default();
        let room = room_id!("!r:x");
        rooms.set_membership(room, user_id!("@a:x"), MembershipState::Leave);
        let mut loaded = BTreeMap::new();
        loaded.insert(user_id!("@a:x").to_owned(), MembershipState::Join);
        loaded.insert(user_id!("@b:x").to_owned(), MembershipState::Join);
        rooms.load(room, loaded);
        let info = rooms.get(room).unwrap();
        assert!(info.loaded);
        assert_eq!(info.joined().count(), 1);
    }
}
