//! Small facts the bridge keeps per target: the rooms that commanded it (where timer and
//! drift notices go), the replicas it last saw and the replicas it last wrote (to tell its own
//! changes from others').

use ruma::{OwnedRoomId, RoomId};

use super::{Store, StoreError};

/// How many rooms per target are kept for drift notices.
pub const ROOMS_PER_TARGET: usize = 10;

impl Store {
    /// Remembers `room` as the one that last commanded `target` (for notices of timers that no
    /// command set), and among the rooms that commanded it (for drift notices).
    pub fn set_target_room(&self, target: &str, room: &RoomId) -> Result<(), StoreError> {
        let mut rooms = self.target_rooms(target)?;
        rooms.retain(|r| r != room);
        rooms.insert(0, room.to_owned());
        rooms.truncate(ROOMS_PER_TARGET);
        let list = serde_json::to_string(&rooms).expect("room ids serialize");
        self.set(&format!("rooms-of/{target}"), &list)?;
        self.set(&format!("room-of/{target}"), room.as_str())
    }

    /// The rooms that commanded `target`, the latest first (at most [`ROOMS_PER_TARGET`]).
    pub fn target_rooms(&self, target: &str) -> Result<Vec<OwnedRoomId>, StoreError> {
        Ok(self
            .get(&format!("rooms-of/{target}"))?
            .and_then(|list| serde_json::from_str(&list).ok())
            .unwrap_or_default())
    }

    /// The replicas of `target`'s workload when the bridge last looked.
    pub fn seen_replicas(&self, target: &str) -> Result<Option<i32>, StoreError> {
        Ok(self.get(&format!("seen-replicas/{target}"))?.and_then(|v| v.parse().ok()))
    }

    /// Remembers the replicas of `target`'s workload as seen now.
    pub fn set_seen_replicas(&self, target: &str, replicas: i32) -> Result<(), StoreError> {
        self.set(&format!("seen-replicas/{target}"), &replicas.to_string())
    }

    /// The replicas the bridge last scaled `target` to.
    pub fn written_replicas(&self, target: &str) -> Result<Option<i32>, StoreError> {
        Ok(self.get(&format!("wrote-replicas/{target}"))?.and_then(|v| v.parse().ok()))
    }

    /// Remembers that the bridge scaled `target` to `replicas`.
    pub fn set_written_replicas(&self, target: &str, replicas: i32) -> Result<(), StoreError> {
        self.set(&format!("wrote-replicas/{target}"), &replicas.to_string())
    }

    /// The room that last commanded `target`.
    pub fn target_room(&self, target: &str) -> Result<Option<OwnedRoomId>, StoreError> {
        Ok(self.get(&format!("room-of/{target}"))?.and_then(|r| r.try_into().ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn the_rooms_of_a_target_are_kept_latest_first_once_each() {
        let (_dir, s) = store();
        let r = |n: usize| -> OwnedRoomId { format!("!r{n}:x").try_into().unwrap() };
        for n in [1, 2, 1] {
            s.set_target_room("web", &r(n)).unwrap();
        }
        assert_eq!(s.target_rooms("web").unwrap(), [r(1), r(2)]);
        assert_eq!(s.target_room("web").unwrap(), Some(r(1)));
        for n in 0..20 {
            s.set_target_room("web", &r(n)).unwrap();
        }
        assert_eq!(s.target_rooms("web").unwrap().len(), ROOMS_PER_TARGET);
        assert!(s.target_rooms("db").unwrap().is_empty());
    }
}
