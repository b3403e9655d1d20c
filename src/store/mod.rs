//! Durable state in `STATE_DIR/state.sqlite3`: processed transaction ids, the event work queue,
//! progress of each command, and small key-value facts (our device id). Timed stops and
//! scheduled switches are in `timers`, what was done to each target in `history`, the rooms and
//! counts kept per target in `targets`; the lock that keeps a second bridge off the directory
//! in `lock`.

use std::{
    path::Path,
    sync::{Mutex, MutexGuard},
};

mod history;
mod lock;
mod targets;
mod timers;

pub use history::{Action, HISTORY_KEPT};
pub use lock::{LockError, StateLock};
pub use targets::ROOMS_PER_TARGET;
pub use timers::{Timer, TimerAction, TimerStage};

use ruma::{EventId, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId};
use rusqlite::{
    Connection, OptionalExtension, params,
    types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef},
};

impl crate::scaler::ReplicaMemory for Store {
    fn recall(&self, t: &crate::config::Target) -> Result<Option<i32>, String> {
        let value = self.get(&replicas_key(t)).map_err(|e| e.to_string())?;
        Ok(value.and_then(|v| v.parse().ok()))
    }

    fn remember(&self, t: &crate::config::Target, replicas: i32) -> Result<(), String> {
        self.set(&replicas_key(t), &replicas.to_string()).map_err(|e| e.to_string())
    }
}

/// The key of a workload's count to restore: the workload itself, not the target's name, so
/// renaming a target keeps it.
fn replicas_key(t: &crate::config::Target) -> String {
    format!("replicas-before-stop/{}/{}/{}", t.kind, t.namespace, t.workload)
}

/// A Matrix id in a column: written as its text, read back parsed, so a bad id fails the read
/// that meets it (naming it) instead of surfacing later.
struct Id<T>(T);

impl<T: AsRef<str>> ToSql for Id<T> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.0.as_ref()))
    }
}

impl<T> FromSql for Id<T>
where
    T: TryFrom<String>,
    T::Error: std::error::Error + Send + Sync + 'static,
{
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = String::column_result(value)?;
        T::try_from(text).map(Id).map_err(|e| FromSqlError::Other(Box::new(e)))
    }
}

/// Reads the Matrix id in column `idx` of `row`.
fn id<T>(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<T>
where
    T: TryFrom<String>,
    T::Error: std::error::Error + Send + Sync + 'static,
{
    row.get::<_, Id<T>>(idx).map(|i| i.0)
}

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
    pub event_id: OwnedEventId,
    /// The event as JSON, as the homeserver sent it.
    pub event: String,
    /// How often handling was attempted and postponed.
    pub attempts: i64,
    /// When its transaction arrived (ms since the Unix epoch).
    pub received_ms: i64,
    /// The room of the event; jobs of one room are handled in order, rooms independently.
    pub room_id: OwnedRoomId,
}

/// What a transaction id that comes again means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransactionSeen {
    /// Never seen (or forgotten): process it.
    New,
    /// The same id with the same body: a retry, already processed.
    Retry,
    /// The same id with another body: Synapse on SQLite starts its ids again after a restart.
    /// Process it as new.
    Reused,
}

/// The queue at a glance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Jobs waiting.
    pub depth: usize,
    /// When the oldest waiting job arrived (ms since the Unix epoch).
    pub oldest_received_ms: Option<i64>,
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
    pub event_id: OwnedEventId,
    /// The room.
    pub room_id: OwnedRoomId,
    /// The sender.
    pub sender: OwnedUserId,
    /// When it was parked (ms since the Unix epoch).
    pub parked_ms: i64,
}

/// A rollout being followed after a start or stop, so its outcome is reported in reply to the
/// command even across a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rollout {
    /// The command's event.
    pub event_id: OwnedEventId,
    /// The room of the command.
    pub room_id: OwnedRoomId,
    /// The target's name in the configuration.
    pub target: String,
    /// Whether the command was a start (else a stop).
    pub up: bool,
    /// When the workload was scaled (ms since the Unix epoch).
    pub started_ms: i64,
}

/// Most encrypted events kept waiting for their keys; the oldest are dropped beyond it.
pub const MAX_PARKED: i64 = 1000;

/// Most encrypted events of one sender kept waiting for their keys, so one sender cannot push
/// out the others' waiting commands.
pub const MAX_PARKED_PER_SENDER: i64 = 20;

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
    received_at INTEGER NOT NULL,
    body_hash TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    event TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    received_ms INTEGER NOT NULL DEFAULT 0,
    room_id TEXT NOT NULL DEFAULT ''
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
CREATE TABLE IF NOT EXISTS megolm_seen (
    session_id TEXT NOT NULL,
    message_index INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    seen_ms INTEGER NOT NULL,
    PRIMARY KEY (session_id, message_index)
);
CREATE TABLE IF NOT EXISTS encrypted_rooms (
    room_id TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS timers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    target TEXT NOT NULL,
    action TEXT NOT NULL,
    due_ms INTEGER NOT NULL,
    room_id TEXT,
    stage TEXT NOT NULL DEFAULT 'pending',
    notice TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    UNIQUE (target, action, due_ms)
);
CREATE INDEX IF NOT EXISTS timers_due ON timers(due_ms);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    target TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    what TEXT NOT NULL,
    outcome TEXT NOT NULL
);
";

/// Prepared statements kept per connection: more than the store's hot statements.
const STATEMENT_CACHE: usize = 48;

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
        migrate(&conn)?;
        // NB: the hot statements are prepared once (`prepare_cached`); rusqlite keeps 16.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the transaction `txn_id` was already processed with this body (`body_hash`).
    /// An id recorded by an older version, without a hash, counts as reused: processing a
    /// retry again is harmless, since events are queued once by event id.
    pub fn transaction_seen(&self, txn_id: &str, body_hash: &str) -> Result<TransactionSeen, StoreError> {
        let row: Option<Option<String>> = self
            .conn()
            .prepare_cached("SELECT body_hash FROM transactions WHERE txn_id = ?1")?
            .query_row([txn_id], |r| r.get(0))
            .optional()?;
        Ok(match row {
            None => TransactionSeen::New,
            Some(Some(hash)) if hash == body_hash => TransactionSeen::Retry,
            Some(_) => TransactionSeen::Reused,
        })
    }

    /// Records a transaction (its id and body hash) and queues its events (event id, room
    /// id, JSON) in one atomic step. Events already queued are skipped. Returns how many were new.
    pub fn record_transaction(
        &self,
        txn_id: &str,
        body_hash: &str,
        events: &[QueuedEvent],
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut added = 0;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO jobs (event_id, room_id, event, received_ms) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for e in events {
                added += insert.execute(params![Id(&e.event_id), Id(&e.room_id), e.json, now_ms])?;
            }
        }
        tx.execute(
            "INSERT INTO transactions (txn_id, received_at, body_hash) VALUES (?1, ?2, ?3)
             ON CONFLICT(txn_id) DO UPDATE SET received_at = excluded.received_at, body_hash = excluded.body_hash",
            params![txn_id, now_ms, body_hash],
        )?;
        tx.commit()?;
        Ok(added)
    }

    /// The oldest unhandled jobs, in order.
    pub fn pending_jobs(&self, limit: usize) -> Result<Vec<Job>, StoreError> {
        self.pending_jobs_except(limit, &[])
    }

    /// The oldest unhandled jobs, in order, leaving out the rooms in `held` (rooms whose
    /// first job must wait).
    pub fn pending_jobs_except(&self, limit: usize, held: &[&RoomId]) -> Result<Vec<Job>, StoreError> {
        let held = serde_json::to_string(held).expect("a list of room ids serializes");
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, event_id, event, attempts, received_ms, room_id FROM jobs
             WHERE done = 0 AND room_id NOT IN (SELECT value FROM json_each(?2)) ORDER BY seq LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit as i64, held], |r| {
            Ok(Job {
                seq: r.get(0)?,
                event_id: id(r, 1)?,
                event: r.get(2)?,
                attempts: r.get(3)?,
                received_ms: r.get(4)?,
                room_id: id(r, 5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many jobs wait, and since when the oldest.
    pub fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        let (depth, oldest): (i64, Option<i64>) = self
            .conn()
            .prepare_cached("SELECT COUNT(*), MIN(received_ms) FROM jobs WHERE done = 0")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(QueueStats { depth: depth as usize, oldest_received_ms: oldest })
    }

    /// Marks a job handled.
    pub fn complete_job(&self, seq: i64) -> Result<(), StoreError> {
        self.conn().prepare_cached("UPDATE jobs SET done = 1, event = '' WHERE seq = ?1")?.execute([seq])?;
        Ok(())
    }

    /// Counts a postponed attempt of a job.
    pub fn postpone_job(&self, seq: i64) -> Result<(), StoreError> {
        self.conn().prepare_cached("UPDATE jobs SET attempts = attempts + 1 WHERE seq = ?1")?.execute([seq])?;
        Ok(())
    }

    /// How far the command in `event_id` has come.
    pub fn progress(&self, event_id: &EventId) -> Result<Option<Progress>, StoreError> {
        let row: Option<(String, Option<String>)> = self
            .conn()
            .prepare_cached("SELECT stage, reply FROM progress WHERE event_id = ?1")?
            .query_row([Id(event_id)], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(row.map(|(stage, reply)| match stage.as_str() {
            "acted" => Progress::Acted { reply: reply.unwrap_or_default() },
            _ => Progress::Replied,
        }))
    }

    /// Records how far the command in `event_id` has come.
    pub fn set_progress(&self, event_id: &EventId, progress: &Progress) -> Result<(), StoreError> {
        let (stage, reply) = match progress {
            Progress::Acted { reply } => ("acted", Some(reply.as_str())),
            Progress::Replied => ("replied", None),
        };
        self.conn().prepare_cached(SET_PROGRESS)?.execute(params![Id(event_id), stage, reply])?;
        Ok(())
    }

    /// Records that the command in `event_id` acted, with its reply and the rollout to follow,
    /// in one atomic step.
    pub fn set_acted(&self, event_id: &EventId, reply: &str, rollout: Option<&Rollout>) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.prepare_cached(SET_PROGRESS)?.execute(params![Id(event_id), "acted", reply])?;
        if let Some(r) = rollout {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO rollouts (event_id, room_id, target, up, started_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![Id(&r.event_id), Id(&r.room_id), r.target, r.up, r.started_ms])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The rollout still to report for the command in `event_id`.
    pub fn rollout(&self, event_id: &EventId) -> Result<Option<Rollout>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT event_id, room_id, target, up, started_ms FROM rollouts WHERE event_id = ?1")?
            .query_row([Id(event_id)], rollout_row)
            .optional()?)
    }

    /// The rollouts still to report whose command was answered, oldest first. (Those of
    /// commands not yet answered resume with their command.)
    pub fn answered_rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT r.event_id, r.room_id, r.target, r.up, r.started_ms FROM rollouts r
             JOIN progress p ON p.event_id = r.event_id WHERE p.stage = 'replied' ORDER BY r.started_ms, r.rowid",
        )?;
        let rows = stmt.query_map([], rollout_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets a rollout once its outcome was posted (or given up).
    pub fn finish_rollout(&self, event_id: &EventId) -> Result<(), StoreError> {
        self.conn().prepare_cached("DELETE FROM rollouts WHERE event_id = ?1")?.execute([Id(event_id)])?;
        Ok(())
    }

    /// Records that the ciphertext at (`session_id`, `index`) came as `event_id`. Returns the
    /// event id it came as first: another id than `event_id` means the ciphertext is replayed.
    /// Kept for good (not pruned): the outer event's timestamp is not authenticated, so an old
    /// ciphertext is as dangerous as a new one.
    pub fn first_event_at_megolm_index(
        &self,
        session_id: &str,
        index: u32,
        event_id: &EventId,
        now_ms: i64,
    ) -> Result<OwnedEventId, StoreError> {
        let conn = self.conn();
        conn.prepare_cached(
            "INSERT OR IGNORE INTO megolm_seen (session_id, message_index, event_id, seen_ms) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![session_id, index, Id(event_id), now_ms])?;
        Ok(conn
            .prepare_cached("SELECT event_id FROM megolm_seen WHERE session_id = ?1 AND message_index = ?2")?
            .query_row(params![session_id, index], |r| id(r, 0))?)
    }

    /// Remembers that `room` is encrypted (for good: Matrix cannot turn encryption off).
    pub fn mark_room_encrypted(&self, room_id: &RoomId) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached("INSERT OR IGNORE INTO encrypted_rooms (room_id) VALUES (?1)")?
            .execute([Id(room_id)])?;
        Ok(())
    }

    /// Whether `room` was seen encrypted, by this process or an earlier one.
    pub fn is_room_encrypted(&self, room_id: &RoomId) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT 1 FROM encrypted_rooms WHERE room_id = ?1")?
            .query_row([Id(room_id)], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// A stored value.
    pub fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT value FROM kv WHERE key = ?1")?
            .query_row([key], |r| r.get(0))
            .optional()?)
    }

    /// Stores a value.
    pub fn set(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO kv (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![key, value])?;
        Ok(())
    }

    /// Parks an encrypted event until the room key of `session_id` arrives. Beyond
    /// [`MAX_PARKED_PER_SENDER`] for its sender, or [`MAX_PARKED`] in all, the oldest go.
    pub fn park_undecrypted(&self, parked: &Parked, session_id: &str, event: &str) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT OR REPLACE INTO undecrypted (event_id, session_id, room_id, sender, event, parked_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![Id(&parked.event_id), session_id, Id(&parked.room_id), Id(&parked.sender), event, parked.parked_ms],
        )?;
        conn.execute(
            "DELETE FROM undecrypted WHERE event_id IN
             (SELECT event_id FROM undecrypted WHERE sender = ?1 ORDER BY parked_ms DESC LIMIT -1 OFFSET ?2)",
            params![Id(&parked.sender), MAX_PARKED_PER_SENDER],
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
                Ok(Parked { event_id: id(r, 0)?, room_id: id(r, 1)?, sender: id(r, 2)?, parked_ms: r.get(3)? })
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

/// One room event to queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedEvent {
    /// The event id (dedupe key).
    pub event_id: OwnedEventId,
    /// The room it belongs to.
    pub room_id: OwnedRoomId,
    /// The event as JSON, as the homeserver sent it.
    pub json: String,
}

/// Brings a database written by an older version up to the current schema.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let has_column = |table: &str, column: &str| -> rusqlite::Result<bool> {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
        let names = stmt.query_map([], |r| r.get::<_, String>(1))?.collect::<Result<Vec<_>, _>>()?;
        Ok(names.iter().any(|n| n == column))
    };
    if !has_column("transactions", "body_hash")? {
        conn.execute_batch("ALTER TABLE transactions ADD COLUMN body_hash TEXT")?;
    }
    if !has_column("jobs", "room_id")? {
        conn.execute_batch(
            "ALTER TABLE jobs ADD COLUMN room_id TEXT NOT NULL DEFAULT '';
             UPDATE jobs SET room_id = COALESCE(json_extract(event, '$.room_id'), '') WHERE done = 0 AND json_valid(event);",
        )?;
    }
    // Every queued event has a room and an event id since the appservice refuses events without
    // them; an older version queued some without a room, which nothing could handle.
    conn.execute_batch("UPDATE jobs SET done = 1 WHERE done = 0 AND room_id = ''")?;
    Ok(())
}

fn rollout_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Rollout> {
    Ok(Rollout { event_id: id(r, 0)?, room_id: id(r, 1)?, target: r.get(2)?, up: r.get(3)?, started_ms: r.get(4)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(id: &str) -> OwnedEventId {
        id.try_into().unwrap()
    }

    fn r(id: &str) -> OwnedRoomId {
        id.try_into().unwrap()
    }

    fn u(id: &str) -> OwnedUserId {
        id.try_into().unwrap()
    }

    fn ev(id: &str) -> QueuedEvent {
        in_room(id, "!r:x")
    }

    fn in_room(id: &str, room: &str) -> QueuedEvent {
        QueuedEvent { event_id: e(id), room_id: r(room), json: format!("{{\"event_id\":\"{id}\"}}") }
    }

    #[test]
    fn a_recorded_transaction_is_remembered_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert_eq!(s.transaction_seen("t1", "h-t1").unwrap(), TransactionSeen::New);
            s.record_transaction("t1", "h-t1", &[ev("$a")], 0).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.transaction_seen("t1", "h-t1").unwrap(), TransactionSeen::Retry);
        assert_eq!(s.pending_jobs(10).unwrap().len(), 1);
    }

    #[test]
    fn a_megolm_position_belongs_to_the_first_event_id_it_came_as_even_after_pruning_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert_eq!(s.first_event_at_megolm_index("sess", 7, &e("$first"), 0).unwrap(), "$first");
            assert_eq!(s.first_event_at_megolm_index("sess", 7, &e("$first"), 1).unwrap(), "$first", "a retry");
            assert_eq!(s.first_event_at_megolm_index("sess", 8, &e("$next"), 2).unwrap(), "$next");
            s.prune(i64::MAX).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.first_event_at_megolm_index("sess", 7, &e("$replayed"), 3).unwrap(), "$first");
        assert_eq!(s.first_event_at_megolm_index("other", 7, &e("$other"), 3).unwrap(), "$other");
    }

    #[test]
    fn a_room_seen_encrypted_stays_encrypted_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert!(!s.is_room_encrypted(&r("!r:x")).unwrap());
            s.mark_room_encrypted(&r("!r:x")).unwrap();
            s.mark_room_encrypted(&r("!r:x")).unwrap();
            s.prune(i64::MAX).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert!(s.is_room_encrypted(&r("!r:x")).unwrap());
        assert!(!s.is_room_encrypted(&r("!other:x")).unwrap());
    }

    #[test]
    fn the_count_to_restore_is_kept_per_workload_across_reopening() {
        use crate::{
            config::{Target, WorkloadKind},
            scaler::ReplicaMemory,
        };
        let target = |kind, workload: &str| Target::deployment("web", "apps").with_kind(kind).with_workload(workload);
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert_eq!(s.recall(&target(WorkloadKind::Deployment, "web")).unwrap(), None);
            s.remember(&target(WorkloadKind::Deployment, "web"), 3).unwrap();
            s.remember(&target(WorkloadKind::Deployment, "web"), 4).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.recall(&target(WorkloadKind::Deployment, "web")).unwrap(), Some(4));
        assert_eq!(s.recall(&target(WorkloadKind::StatefulSet, "web")).unwrap(), None, "another kind");
        assert_eq!(s.recall(&target(WorkloadKind::Deployment, "db")).unwrap(), None, "another workload");
    }

    #[test]
    fn a_known_transaction_id_with_another_body_is_reused_and_then_remembered_with_the_new_body() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.record_transaction("1", "first", &[ev("$a")], 0).unwrap();
        assert_eq!(s.transaction_seen("1", "second").unwrap(), TransactionSeen::Reused);
        s.record_transaction("1", "second", &[ev("$b")], 0).unwrap();
        assert_eq!(s.transaction_seen("1", "second").unwrap(), TransactionSeen::Retry);
        assert_eq!(s.transaction_seen("1", "first").unwrap(), TransactionSeen::Reused);
        assert_eq!(s.pending_jobs(10).unwrap().len(), 2);
    }

    #[test]
    fn a_state_database_of_the_previous_version_is_migrated_and_its_transaction_ids_count_as_reused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join("state.sqlite3")).unwrap();
            conn.execute_batch(
                "CREATE TABLE transactions (txn_id TEXT PRIMARY KEY, received_at INTEGER NOT NULL);
                 CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE,
                     event TEXT NOT NULL, done INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
                     received_ms INTEGER NOT NULL DEFAULT 0);
                 INSERT INTO transactions VALUES ('7', 1);
                 INSERT INTO jobs (event_id, event) VALUES ('$old', '{\"event_id\":\"$old\",\"room_id\":\"!old:x\"}');",
            )
            .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.transaction_seen("7", "anything").unwrap(), TransactionSeen::Reused);
        let jobs = s.pending_jobs(10).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].room_id, "!old:x");
    }

    #[test]
    fn held_rooms_are_left_out_of_the_pending_jobs_and_the_queue_stats_count_all() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.record_transaction("t", "h", &[in_room("$a1", "!a:x"), in_room("$b1", "!b:x"), in_room("$a2", "!a:x")], 10)
            .unwrap();
        let ids = |held: &[&str]| -> Vec<OwnedEventId> {
            let held: Vec<OwnedRoomId> = held.iter().map(|h| r(h)).collect();
            let held: Vec<&RoomId> = held.iter().map(|h| h.as_ref()).collect();
            s.pending_jobs_except(10, &held).unwrap().into_iter().map(|j| j.event_id).collect()
        };
        assert_eq!(ids(&[]), ["$a1", "$b1", "$a2"]);
        assert_eq!(ids(&["!a:x"]), ["$b1"]);
        assert!(ids(&["!a:x", "!b:x"]).is_empty());
        assert_eq!(s.queue_stats().unwrap(), QueueStats { depth: 3, oldest_received_ms: Some(10) });
    }

    #[test]
    fn an_event_in_two_transactions_is_queued_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.record_transaction("t1", "h-t1", &[ev("$a"), ev("$b")], 0).unwrap(), 2);
        assert_eq!(s.record_transaction("t2", "h-t2", &[ev("$b"), ev("$c")], 0).unwrap(), 1);
        let ids: Vec<_> = s.pending_jobs(10).unwrap().into_iter().map(|j| j.event_id).collect();
        assert_eq!(ids, ["$a", "$b", "$c"]);
    }

    #[test]
    fn completed_jobs_leave_the_queue_and_are_not_queued_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.record_transaction("t1", "h-t1", &[ev("$a")], 0).unwrap();
        let job = s.pending_jobs(10).unwrap().remove(0);
        s.complete_job(job.seq).unwrap();
        assert!(s.pending_jobs(10).unwrap().is_empty());
        assert_eq!(s.record_transaction("t2", "h-t2", &[ev("$a")], 0).unwrap(), 0);
        assert!(s.pending_jobs(10).unwrap().is_empty());
    }

    #[test]
    fn progress_moves_from_acted_to_replied() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.progress(&e("$a")).unwrap(), None);
        s.set_progress(&e("$a"), &Progress::Acted { reply: "done".into() }).unwrap();
        assert_eq!(s.progress(&e("$a")).unwrap(), Some(Progress::Acted { reply: "done".into() }));
        s.set_progress(&e("$a"), &Progress::Replied).unwrap();
        assert_eq!(s.progress(&e("$a")).unwrap(), Some(Progress::Replied));
    }

    #[test]
    fn a_parked_event_returns_to_the_queue_when_its_key_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.record_transaction("t1", "h-t1", &[ev("$a")], 0).unwrap();
        let job = s.pending_jobs(10).unwrap().remove(0);
        let parked = Parked { event_id: e("$a"), room_id: r("!r"), sender: u("@u:x"), parked_ms: 5 };
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
    fn one_sender_parking_many_events_pushes_out_only_their_own_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let park = |id: &str, sender: &str, at: i64| {
            let p = Parked { event_id: e(id), room_id: r("!r"), sender: u(sender), parked_ms: at };
            s.park_undecrypted(&p, "sess", "{}").unwrap();
        };
        park("$alice", "@alice:x", 0);
        for i in 0..MAX_PARKED_PER_SENDER + 5 {
            park(&format!("$flood{i}"), "@flood:x", 1 + i);
        }
        let kept = s.take_expired_undecrypted(i64::MAX).unwrap();
        assert!(kept.iter().any(|p| p.event_id == "$alice"), "alice's event was pushed out");
        let flood = kept.iter().filter(|p| p.sender == "@flood:x").count();
        assert_eq!(flood as i64, MAX_PARKED_PER_SENDER);
        assert!(!kept.iter().any(|p| p.event_id == "$flood0"), "the flood's oldest should go first");
    }

    #[test]
    fn expired_parked_events_are_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for (id, at) in [("$old", 10), ("$new", 100)] {
            let p = Parked { event_id: e(id), room_id: r("!r"), sender: u("@u:x"), parked_ms: at };
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
        store.record_transaction("old", "h-old", &[ev("$done"), ev("$pending")], 1_000).unwrap();
        store.record_transaction("new", "h-new", &[ev("$recent")], 5_000).unwrap();
        let jobs = store.pending_jobs(10).unwrap();
        for job in jobs.iter().filter(|j| j.event_id != "$pending") {
            store.complete_job(job.seq).unwrap();
        }
        store.set_progress(&e("$done"), &Progress::Replied).unwrap();
        store.set_progress(&e("$recent"), &Progress::Replied).unwrap();

        let pruned = store.prune(2_000).unwrap();

        assert_eq!(pruned, Pruned { transactions: 1, jobs: 1 });
        assert_eq!(store.transaction_seen("old", "h-old").unwrap(), TransactionSeen::New);
        assert_eq!(store.transaction_seen("new", "h-new").unwrap(), TransactionSeen::Retry);
        assert_eq!(store.progress(&e("$done")).unwrap(), None);
        assert_eq!(store.progress(&e("$recent")).unwrap(), Some(Progress::Replied));
        let pending: Vec<_> = store.pending_jobs(10).unwrap().into_iter().map(|j| j.event_id).collect();
        assert_eq!(pending, ["$pending"]);
        assert_eq!(store.prune(2_000).unwrap(), Pruned::default());
    }

    #[test]
    fn a_rollout_is_kept_with_the_acted_stage_and_listed_once_the_command_is_answered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rollout =
            Rollout { event_id: e("$cmd"), room_id: r("!r:x"), target: "web".into(), up: true, started_ms: 42 };
        store.set_acted(&e("$cmd"), "web is starting", Some(&rollout)).unwrap();
        assert_eq!(store.progress(&e("$cmd")).unwrap(), Some(Progress::Acted { reply: "web is starting".into() }));
        assert_eq!(store.rollout(&e("$cmd")).unwrap(), Some(rollout.clone()));
        assert_eq!(store.answered_rollouts().unwrap(), [], "not answered yet");

        store.set_progress(&e("$cmd"), &Progress::Replied).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.answered_rollouts().unwrap(), [rollout]);

        store.finish_rollout(&e("$cmd")).unwrap();
        assert_eq!(store.answered_rollouts().unwrap(), []);
        assert_eq!(store.rollout(&e("$cmd")).unwrap(), None);
    }

    #[test]
    fn a_stored_id_that_is_no_matrix_id_fails_the_read_that_meets_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .conn()
            .execute(
                "INSERT INTO rollouts (event_id, room_id, target, up, started_ms) VALUES ('$cmd', 'no room', 'web', 1, 0)",
                [],
            )
            .unwrap();
        let err = store.rollout(&e("$cmd")).unwrap_err().to_string();
        assert!(err.contains("room") || err.contains("sigil"), "{err}");
    }

    #[test]
    fn an_older_versions_queued_event_without_a_room_is_set_aside_at_opening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.record_transaction("t", "h", &[ev("$kept")], 0).unwrap();
            store
                .conn()
                .execute("INSERT INTO jobs (event_id, room_id, event) VALUES ('$roomless', '', '{}')", [])
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let pending: Vec<_> = store.pending_jobs(10).unwrap().into_iter().map(|j| j.event_id).collect();
        assert_eq!(pending, ["$kept"]);
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
