//! Timers: the stop a timed `start` set, its warning, and a schedule's next switches. Each is a
//! row that moves pending → acting (the scale is under way) → acted (its notice is decided) and
//! is deleted once the notice is out, so after a crash each runs once: a pending or acting one
//! acts again (scaling is idempotent), an acted one only sends its notice.

use ruma::{OwnedRoomId, RoomId};
use rusqlite::{OptionalExtension, params};

use super::{Id, Store, StoreError};

/// What a timer does when it is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimerAction {
    /// The stop of a timed start.
    Stop,
    /// The warning before that stop.
    Warn,
    /// A schedule switches the target on.
    On,
    /// A schedule switches the target off.
    Off,
}

impl TimerAction {
    /// `stop`, `warn`, `on` or `off`, as stored and counted.
    pub fn as_str(self) -> &'static str {
        match self {
            TimerAction::Stop => "stop",
            TimerAction::Warn => "warn",
            TimerAction::On => "on",
            TimerAction::Off => "off",
        }
    }

    fn parse(s: &str) -> rusqlite::Result<Self> {
        Ok(match s {
            "stop" => TimerAction::Stop,
            "warn" => TimerAction::Warn,
            "on" => TimerAction::On,
            "off" => TimerAction::Off,
            other => return Err(rusqlite::Error::InvalidColumnType(2, other.to_owned(), rusqlite::types::Type::Text)),
        })
    }

    /// Whether a schedule set it (else a chat command).
    pub fn is_scheduled(self) -> bool {
        matches!(self, TimerAction::On | TimerAction::Off)
    }
}

/// How far a due timer has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimerStage {
    /// Not started.
    Pending,
    /// Its scale was asked for; whether it got through is unknown.
    Acting,
    /// It acted; this notice (none: nothing to say) is still to be sent.
    Acted(Option<String>),
}

/// One timer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timer {
    /// Its row.
    pub id: i64,
    /// The target's name in the configuration.
    pub target: String,
    /// What it does.
    pub action: TimerAction,
    /// When (ms since the Unix epoch).
    pub due_ms: i64,
    /// Where its notice goes; none: the room that last commanded the target.
    pub room_id: Option<OwnedRoomId>,
    /// How far it has come.
    pub stage: TimerStage,
    /// How often acting failed and was put off.
    pub attempts: i64,
}

const COLUMNS: &str = "id, target, action, due_ms, room_id, stage, notice, attempts";

fn timer_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Timer> {
    let stage: String = r.get(5)?;
    Ok(Timer {
        id: r.get(0)?,
        target: r.get(1)?,
        action: TimerAction::parse(&r.get::<_, String>(2)?)?,
        due_ms: r.get(3)?,
        room_id: r.get::<_, Option<Id<OwnedRoomId>>>(4)?.map(|i| i.0),
        stage: match stage.as_str() {
            "acting" => TimerStage::Acting,
            "acted" => TimerStage::Acted(r.get(6)?),
            _ => TimerStage::Pending,
        },
        attempts: r.get(7)?,
    })
}

impl Store {
    /// Sets `target`'s timed stop to `stop_ms` (and its warning to `warn_ms`), replacing any it
    /// had that has not started; notices go to `room`.
    pub fn set_timed_stop(
        &self,
        target: &str,
        stop_ms: i64,
        warn_ms: Option<i64>,
        room: &RoomId,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM timers WHERE target = ?1 AND action IN ('stop', 'warn') AND stage = 'pending'",
            [target],
        )?;
        let insert = "INSERT OR REPLACE INTO timers (target, action, due_ms, room_id) VALUES (?1, ?2, ?3, ?4)";
        tx.execute(insert, params![target, TimerAction::Stop.as_str(), stop_ms, Id(room)])?;
        if let Some(warn_ms) = warn_ms {
            tx.execute(insert, params![target, TimerAction::Warn.as_str(), warn_ms, Id(room)])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Cancels `target`'s timed stop and its warning, unless they are under way; returns
    /// whether there was one.
    pub fn cancel_timed_stop(&self, target: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "DELETE FROM timers WHERE target = ?1 AND action IN ('stop', 'warn') AND stage = 'pending'",
            [target],
        )?;
        Ok(n > 0)
    }

    /// `target`'s pending timed stop.
    pub fn timed_stop(&self, target: &str) -> Result<Option<Timer>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM timers WHERE target = ?1 AND action = 'stop' AND stage = 'pending' ORDER BY due_ms LIMIT 1"),
                [target],
                timer_row,
            )
            .optional()?)
    }

    /// Adds a schedule's switch of `target` at `due_ms`, once.
    pub fn add_scheduled(&self, target: &str, action: TimerAction, due_ms: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO timers (target, action, due_ms) VALUES (?1, ?2, ?3)",
            params![target, action.as_str(), due_ms],
        )?;
        Ok(())
    }

    /// `target`'s next pending switch by its schedule.
    pub fn next_scheduled(&self, target: &str) -> Result<Option<Timer>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM timers WHERE target = ?1 AND action IN ('on', 'off') AND stage = 'pending' ORDER BY due_ms LIMIT 1"),
                [target],
                timer_row,
            )
            .optional()?)
    }

    /// Forgets the schedule's switches of `target` that are not due by `now_ms`, so they can
    /// be planned again from the schedule as it is configured now.
    pub fn forget_future_scheduled(&self, target: &str, now_ms: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM timers WHERE target = ?1 AND action IN ('on', 'off') AND stage = 'pending' AND due_ms > ?2",
            params![target, now_ms],
        )?;
        Ok(())
    }

    /// The timers due by `now_ms` that have not finished, oldest first.
    pub fn due_timers(&self, now_ms: i64) -> Result<Vec<Timer>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {COLUMNS} FROM timers WHERE due_ms <= ?1 ORDER BY due_ms, id"))?;
        let rows = stmt.query_map([now_ms], timer_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// When the next timer is due.
    pub fn next_timer_due(&self) -> Result<Option<i64>, StoreError> {
        Ok(self.conn().query_row("SELECT MIN(due_ms) FROM timers", [], |r| r.get(0))?)
    }

    /// Records how far timer `id` has come.
    pub fn set_timer_stage(&self, id: i64, stage: &TimerStage) -> Result<(), StoreError> {
        let (name, notice) = match stage {
            TimerStage::Pending => ("pending", None),
            TimerStage::Acting => ("acting", None),
            TimerStage::Acted(notice) => ("acted", notice.as_deref()),
        };
        self.conn().execute("UPDATE timers SET stage = ?2, notice = ?3 WHERE id = ?1", params![id, name, notice])?;
        Ok(())
    }

    /// Puts timer `id` back to pending at `due_ms`, counting the failed attempt.
    pub fn retry_timer(&self, id: i64, due_ms: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE timers SET stage = 'pending', due_ms = ?2, attempts = attempts + 1 WHERE id = ?1",
            params![id, due_ms],
        )?;
        Ok(())
    }

    /// Forgets timer `id`: it is done.
    pub fn finish_timer(&self, id: i64) -> Result<(), StoreError> {
        self.conn().execute("DELETE FROM timers WHERE id = ?1", [id])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room() -> OwnedRoomId {
        "!r:x".try_into().unwrap()
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn a_new_timed_stop_replaces_the_pending_one_and_its_warning() {
        let (_dir, s) = store();
        s.set_timed_stop("web", 1_000, Some(900), &room()).unwrap();
        s.set_timed_stop("web", 2_000, None, &room()).unwrap();
        let due = s.due_timers(i64::MAX).unwrap();
        assert_eq!(due.iter().map(|t| (t.action, t.due_ms)).collect::<Vec<_>>(), [(TimerAction::Stop, 2_000)]);
        assert_eq!(s.timed_stop("web").unwrap().unwrap().room_id, Some(room()));
        assert!(s.cancel_timed_stop("web").unwrap());
        assert!(!s.cancel_timed_stop("web").unwrap());
        assert_eq!(s.next_timer_due().unwrap(), None);
    }

    #[test]
    fn a_timer_under_way_is_neither_cancelled_nor_replaced_and_keeps_its_notice_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.set_timed_stop("web", 1_000, None, &room()).unwrap();
            let t = s.due_timers(1_000).unwrap().remove(0);
            s.set_timer_stage(t.id, &TimerStage::Acted(Some("web is off".into()))).unwrap();
            assert!(!s.cancel_timed_stop("web").unwrap(), "it acted already");
        }
        let s = Store::open(dir.path()).unwrap();
        let t = s.due_timers(1_000).unwrap().remove(0);
        assert_eq!(t.stage, TimerStage::Acted(Some("web is off".into())));
        s.finish_timer(t.id).unwrap();
        assert!(s.due_timers(i64::MAX).unwrap().is_empty());
    }

    #[test]
    fn a_schedules_switch_is_added_once_and_only_future_ones_are_forgotten() {
        let (_dir, s) = store();
        s.add_scheduled("web", TimerAction::On, 100).unwrap();
        s.add_scheduled("web", TimerAction::On, 100).unwrap();
        s.add_scheduled("web", TimerAction::Off, 500).unwrap();
        assert_eq!(s.next_scheduled("web").unwrap().unwrap().due_ms, 100);
        s.forget_future_scheduled("web", 200).unwrap();
        let left: Vec<_> = s.due_timers(i64::MAX).unwrap().into_iter().map(|t| (t.action, t.due_ms)).collect();
        assert_eq!(left, [(TimerAction::On, 100)], "the overdue one stays, to run late");
    }

    #[test]
    fn a_failed_timer_is_put_off_and_counted() {
        let (_dir, s) = store();
        s.set_timed_stop("web", 1_000, None, &room()).unwrap();
        let t = s.due_timers(1_000).unwrap().remove(0);
        s.set_timer_stage(t.id, &TimerStage::Acting).unwrap();
        s.retry_timer(t.id, 61_000).unwrap();
        assert!(s.due_timers(60_000).unwrap().is_empty());
        let again = s.due_timers(61_000).unwrap().remove(0);
        assert_eq!((again.stage, again.attempts), (TimerStage::Pending, 1));
    }
}
