//! Durable state in `STATE_DIR/state.sqlite3`: processed transaction ids, the event work queue,
//! progress of each command, and small key-value facts (our device id).

use std::{
    path::Path,
    sync::{Mutex, MutexGuard},
};

use rusqlite::{Connection, OptionalExtension, params};

/// Errors of the state database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The state directory could not be created.
    #[error("STATE_DIR {path}: {source}; make it writable by the bridge's user")]
    Dir {
        /// The directory.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// One room event waiting to be handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// Position in the queue; jobs are handled in this order.
    pub seq: i64,
    /// The event id (dedupe key).
    pub event_id: String,
    /// The event as JSON, as the homeserver sent it.
    pub event: String,
    /// How often handling was attempted and postponed.
    pub attempts: i64,
    /// When its transaction arrived (ms since the Unix epoch).
    pub received_ms: i64,
}

/// How far a command has come; persisted so a crash neither repeats nor loses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The action ran; this reply is still to be sent.
    Acted {
        /// The reply to send.
        reply: String,
    },
    /// The reply was sent.
    Replied,
}

/// An encrypted event waiting for its room key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parked {
    /// The event id.
    pub event_id: String,
    /// The room.
    pub room_id: String,
    /// The sender.
    pub sender: String,
    /// When it was parked (ms since the Unix epoch).
    pub parked_ms: i64,
}

/// A rollout being followed after a start or stop, so its outcome is reported in reply to the
/// command even across a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rollout {
    /// The command's event.
    pub event_id: String,
    /// The room of the command.
    pub room_id: String,
    /// The target's name in the configuration.
    pub target: String,
    /// Whether the command was a start (else a stop).
    pub up: bool,
    /// When the workload was scaled (ms since the Unix epoch).
    pub started_ms: i64,
}

/// Most encrypted events kept waiting for their keys; the oldest are dropped beyond it.
pub const MAX_PARKED: i64 = 1000;

/// Now, in the store's time unit: milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// How long handled transactions, jobs and command progress are remembered. Synapse re-sends a
/// transaction only until it is answered, so a week is far beyond any re-delivery.
pub const RETENTION_MS: i64 = 7 * 24 * 60 * 60 * 1000;

/// What [`Store::prune`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Transaction ids forgotten.
    pub transactions: usize,
    /// Handled jobs forgotten, with their command progress.
    pub jobs: usize,
}

/// The state database.
pub struct Store {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS transactions (
    txn_id TEXT PRIMARY KEY,
    received_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    event TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    received_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs(done, seq);
CREATE TABLE IF NOT EXISTS progress (
    event_id TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    reply TEXT
);
CREATE TABLE IF NOT EXISTS undecrypted (
    event_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    event TEXT NOT NULL,
    parked_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS undecrypted_session ON undecrypted(session_id);
CREATE TABLE IF NOT EXISTS rollouts (
    event_id TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    target TEXT NOT NULL,
    up INTEGER NOT NULL,
    started_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// Records how far a command has come: (event id, stage, reply).
const SET_PROGRESS: &str = "INSERT INTO progress (event_id, stage, reply) VALUES (?1, ?2, ?3)
    ON CONFLICT(event_id) DO UPDATE SET stage = excluded.stage, reply = excluded.reply";

impl Store {
    /// Opens (creating if needed) the state database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir { path: dir.display().to_string(), source })?;
        let conn = Connection::open(dir.join("state.sqlite3"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the transaction `txn_id` was already processed.
    pub fn transaction_seen(&self, txn_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT 1 FROM transactions WHERE txn_id = ?1", [txn_id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Records a transaction and queues its events (event id, JSON) in one atomic step.
    /// Events already queued are skipped. Returns how many were new.
    pub fn record_transaction(
        &self,
        txn_id: &str,
        events: &[(String, String)],
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut added = 0;
        {
            let mut insert =
                tx.prepare_cached("INSERT OR IGNORE INTO jobs (event_id, event, received_ms) VALUES (?1, ?2, ?3)")?;
            for (event_id, event) in events {
                added += insert.execute(params![event_id, event, now_ms])?;
            }
        }
        tx.execute(
            "INSERT OR IGNORE INTO transactions (txn_id, received_at) VALUES (?1, ?2)",
            params![txn_id, now_ms],
        )?;
        tx.commit()?;
        Ok(added)
    }

    /// The oldest unhandled jobs, in order.
    pub fn pending_jobs(&self, limit: usize) -> Result<Vec<Job>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, event_id, event, attempts, received_ms FROM jobs WHERE done = 0 ORDER BY seq LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok(Job {
                seq: r.get(0)?,
                event_id: r.get(1)?,
                event: r.get(2)?,
                attempts: r.get(3)?,
                received_ms: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Marks a job handled.
    pub fn complete_job(&self, seq: i64) -> Result<(), StoreError> {
        self.conn().execute("UPDATE jobs SET done = 1, event = '' WHERE seq = ?1", [seq])?;
        Ok(())
    }

    /// Counts a postponed attempt of a job.
    pub fn postpone_job(&self, seq: i64) -> Result<(), StoreError> {
        self.conn().execute("UPDATE jobs SET attempts = attempts + 1 WHERE seq = ?1", [seq])?;
        Ok(())
    }

    /// How far the command in `event_id` has come.
    pub fn progress(&self, event_id: &str) -> Result<Option<Progress>, StoreError> {
        let row: Option<(String, Option<String>)> = self
            .conn()
            .query_row("SELECT stage, reply FROM progress WHERE event_id = ?1", [event_id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        Ok(row.map(|(stage, reply)| match stage.as_str() {
            "acted" => Progress::Acted { reply: reply.unwrap_or_default() },
            _ => Progress::Replied,
        }))
    }

    /// Records how far the command in `event_id` has come.
    pub fn set_progress(&self, event_id: &str, progress: &Progress) -> Result<(), StoreError> {
        let (stage, reply) = match progress {
            Progress::Acted { reply } => ("acted", Some(reply.as_str())),
            Progress::Replied => ("replied", None),
        };
        self.conn().execute(SET_PROGRESS, params![event_id, stage, reply])?;
        Ok(())
    }

    /// Records that the command in `event_id` acted, with its reply and the rollout to follow,
    /// in one atomic step.
    pub fn set_acted(&self, event_id: &str, reply: &str, rollout: Option<&Rollout>) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(SET_PROGRESS, params![event_id, "acted", reply])?;
        if let Some(r) = rollout {
            tx.execute(
                "INSERT OR REPLACE INTO rollouts (event_id, room_id, target, up, started_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![r.event_id, r.room_id, r.target, r.up, r.started_ms],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The rollout still to report for the command in `event_id`.
    pub fn rollout(&self, event_id: &str) -> Result<Option<Rollout>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT event_id, room_id, target, up, started_ms FROM rollouts WHERE event_id = ?1",
                [event_id],
                rollout_row,
            )
            .optional()?)
    }

    /// The rollouts still to report whose command was answered, oldest first. (Those of
    /// commands not yet answered resume with their command.)
    pub fn answered_rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT r.event_id, r.room_id, r.target, r.up, r.started_ms FROM rollouts r
             JOIN progress p ON p.event_id = r.event_id WHERE p.stage = 'replied' ORDER BY r.started_ms",
        )?;
        let rows = stmt.query_map([], rollout_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets a rollout once its outcome was posted (or given up).
    pub fn finish_rollout(&self, event_id: &str) -> Result<(), StoreError> {
        self.conn().execute("DELETE FROM rollouts WHERE event_id = ?1", [event_id])?;
        Ok(())
    }

    /// A stored value.
    pub fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.conn().query_row("SELECT value FROM kv WHERE key = ?1", [key], |r| r.get(0)).optional()?)
    }

    /// Stores a value.
    pub fn set(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO kv (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// Parks an encrypted event until the room key of `session_id` arrives.
    pub fn park_undecrypted(&self, parked: &Parked, session_id: &str, event: &str) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT OR REPLACE INTO undecrypted (event_id, session_id, room_id, sender, event, parked_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![parked.event_id, session_id, parked.room_id, parked.sender, event, parked.parked_ms],
        )?;
        conn.execute(
            "DELETE FROM undecrypted WHERE event_id IN
             (SELECT event_id FROM undecrypted ORDER BY parked_ms DESC LIMIT -1 OFFSET ?1)",
            [MAX_PARKED],
        )?;
        Ok(())
    }

    /// Puts the events waiting for `session_id` back in the queue; returns how many.
    pub fn requeue_undecrypted(&self, session_id: &str) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let n = tx.execute(
            "UPDATE jobs SET done = 0, attempts = attempts + 1,
                 event = (SELECT u.event FROM undecrypted u WHERE u.event_id = jobs.event_id)
             WHERE event_id IN (SELECT event_id FROM undecrypted WHERE session_id = ?1)",
            [session_id],
        )?;
        tx.execute("DELETE FROM undecrypted WHERE session_id = ?1", [session_id])?;
        tx.commit()?;
        Ok(n)
    }

    /// Removes and returns the events parked before `before_ms`.
    pub fn take_expired_undecrypted(&self, before_ms: i64) -> Result<Vec<Parked>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let parked = {
            let mut stmt = tx.prepare(
                "SELECT event_id, room_id, sender, parked_ms FROM undecrypted WHERE parked_ms < ?1 ORDER BY parked_ms",
            )?;
            let rows = stmt.query_map([before_ms], |r| {
                Ok(Parked { event_id: r.get(0)?, room_id: r.get(1)?, sender: r.get(2)?, parked_ms: r.get(3)? })
            })?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        tx.execute("DELETE FROM undecrypted WHERE parked_ms < ?1", [before_ms])?;
        tx.commit()?;
        Ok(parked)
    }

    /// Forgets transactions received, and handled jobs (with their progress) queued, before
    /// `before_ms`, so the database stays small however long the bridge runs. Pending jobs are kept.
    pub fn prune(&self, before_ms: i64) -> Result<Pruned, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let transactions = tx.execute("DELETE FROM transactions WHERE received_at < ?1", [before_ms])?;
        tx.execute(
            "DELETE FROM progress WHERE event_id IN
             (SELECT event_id FROM jobs WHERE done = 1 AND received_ms < ?1)",
            [before_ms],
        )?;
        let jobs = tx.execute("DELETE FROM jobs WHERE done = 1 AND received_ms < ?1", [before_ms])?;
        tx.execute("DELETE FROM rollouts WHERE started_ms < ?1", [before_ms])?;
        tx.commit()?;
        Ok(Pruned { transactions, jobs })
    }

    /// Whether the database answers.
    pub fn is_healthy(&self) -> bool {
        self.conn().query_row("SELECT 1", [], |r| r.get::<_, i64>(0)).is_ok()
    }
}

fn rollout_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Rollout> {
    Ok(Rollout { event_id: r.get(0)?, room_id: r.get(1)?, target: r.get(2)?, up: r.get(3)?, started_ms: r.get(4)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str) -> (String, String) {
        (id.to_owned(), format!("{{\"event_id\":\"{id}\"}}"))
    }

    #[test]
    fn a_recorded_transaction_is_remembered_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert!(!s.transaction_seen("t1").unwrap());
            s.record_transaction("t1", &[ev("$a")], 0).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert!(s.transaction_seen("t1").unwrap());
        assert_eq!(s.pending_jobs(10).unwrap().len(), 1);
    }

    #[test]
    fn an_event_in_two_transactions_is_queued_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.record_transaction("t1", &[ev("$a"), ev("$b")], 0).unwrap(), 2);
        assert_eq!(s.record_transaction("t2", &[ev("$b"), ev("$c")], 0).unwrap(), 1);
        let ids: Vec<_> = s.pending_jobs(10).unwrap().into_iter().map(|j| j.event_id).collect();
        assert_eq!(ids, ["$a", "$b", "$c"]);
    }

    #[test]
    fn completed_jobs_leave_the_queue_and_are_not_queued_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.record_transaction("t1", &[ev("$a")], 0).unwrap();
        let job = s.pending_jobs(10).unwrap().remove(0);
        s.complete_job(job.seq).unwrap();
        assert!(s.pending_jobs(10).unwrap().is_empty());
        assert_eq!(s.record_transaction("t2", &[ev("$a")], 0).unwrap(), 0);
        assert!(s.pending_jobs(10).unwrap().is_empty());
    }

    #[test]
    fn progress_moves_from_acted_to_replied() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.progress("$a").unwrap(), None);
        s.set_progress("$a", &Progress::Acted { reply: "done".into() }).unwrap();
        assert_eq!(s.progress("$a").unwrap(), Some(Progress::Acted { reply: "done".into() }));
        s.set_progress("$a", &Progress::Replied).unwrap();
        assert_eq!(s.progress("$a").unwrap(), Some(Progress::Replied));
    }

    #[test]
    fn a_parked_event_returns_to_the_queue_when_its_key_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.record_transaction("t1", &[ev("$a")], 0).unwrap();
        let job = s.pending_jobs(10).unwrap().remove(0);
        let parked = Parked { event_id: "$a".into(), room_id: "!r".into(), sender: "@u:x".into(), parked_ms: 5 };
        s.park_undecrypted(&parked, "sess", &job.event).unwrap();
        s.complete_job(job.seq).unwrap();
        assert_eq!(s.requeue_undecrypted("other").unwrap(), 0);
        assert_eq!(s.requeue_undecrypted("sess").unwrap(), 1);
        let again = s.pending_jobs(10).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].event, job.event);
        assert_eq!(again[0].attempts, 1);
        assert_eq!(s.requeue_undecrypted("sess").unwrap(), 0);
    }

    #[test]
    fn expired_parked_events_are_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for (id, at) in [("$old", 10), ("$new", 100)] {
            let p = Parked { event_id: id.into(), room_id: "!r".into(), sender: "@u:x".into(), parked_ms: at };
            s.park_undecrypted(&p, "sess", "{}").unwrap();
        }
        let taken = s.take_expired_undecrypted(50).unwrap();
        assert_eq!(taken.iter().map(|p| p.event_id.as_str()).collect::<Vec<_>>(), ["$old"]);
        assert!(s.take_expired_undecrypted(50).unwrap().is_empty());
    }

    #[test]
    fn pruning_forgets_old_handled_work_and_keeps_pending_and_recent_work() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.record_transaction("old", &[ev("$done"), ev("$pending")], 1_000).unwrap();
        store.record_transaction("new", &[ev("$recent")], 5_000).unwrap();
        let jobs = store.pending_jobs(10).unwrap();
        for job in jobs.iter().filter(|j| j.event_id != "$pending") {
            store.complete_job(job.seq).unwrap();
        }
        store.set_progress("$done", &Progress::Replied).unwrap();
        store.set_progress("$recent", &Progress::Replied).unwrap();

        let pruned = store.prune(2_000).unwrap();

        assert_eq!(pruned, Pruned { transactions: 1, jobs: 1 });
        assert!(!store.transaction_seen("old").unwrap());
        assert!(store.transaction_seen("new").unwrap());
        assert_eq!(store.progress("$done").unwrap(), None);
        assert_eq!(store.progress("$recent").unwrap(), Some(Progress::Replied));
        let pending: Vec<_> = store.pending_jobs(10).unwrap().into_iter().map(|j| j.event_id).collect();
        assert_eq!(pending, ["$pending"]);
        assert_eq!(store.prune(2_000).unwrap(), Pruned::default());
    }

    #[test]
    fn a_rollout_is_kept_with_the_acted_stage_and_listed_once_the_command_is_answered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rollout =
            Rollout { event_id: "$cmd".into(), room_id: "!r:x".into(), target: "web".into(), up: true, started_ms: 42 };
        store.set_acted("$cmd", "web is starting", Some(&rollout)).unwrap();
        assert_eq!(store.progress("$cmd").unwrap(), Some(Progress::Acted { reply: "web is starting".into() }));
        assert_eq!(store.rollout("$cmd").unwrap(), Some(rollout.clone()));
        assert_eq!(store.answered_rollouts().unwrap(), [], "not answered yet");

        store.set_progress("$cmd", &Progress::Replied).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.answered_rollouts().unwrap(), [rollout]);

        store.finish_rollout("$cmd").unwrap();
        assert_eq!(store.answered_rollouts().unwrap(), []);
        assert_eq!(store.rollout("$cmd").unwrap(), None);
    }

    #[test]
    fn key_values_are_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.set("device_id", "A").unwrap();
        s.set("device_id", "B").unwrap();
        assert_eq!(s.get("device_id").unwrap().as_deref(), Some("B"));
        assert_eq!(s.get("nope").unwrap(), None);
    }
}
