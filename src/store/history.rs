//! The bridge's own record of what it did to each target: who (a person, a timed stop, the
//! schedule), what, when and with what outcome, for `history`. The newest [`HISTORY_KEPT`]
//! are kept.

use rusqlite::params;

use super::{Store, StoreError};

/// How many actions are kept, over all targets.
pub const HISTORY_KEPT: i64 = 1000;

/// One thing the bridge did to a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// The target's name in the configuration.
    pub target: String,
    /// When (ms since the Unix epoch).
    pub at_ms: i64,
    /// Who: a user id, `timed stop` or `schedule`.
    pub actor: String,
    /// What: the command as written (`start web for 2h`), or the timer's action.
    pub what: String,
    /// How it ended: `2 → 0 replicas`, `no change`, or why it failed.
    pub outcome: String,
}

impl Store {
    /// Records `action`, forgetting the oldest beyond [`HISTORY_KEPT`].
    pub fn record_action(&self, action: &Action) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.prepare_cached("INSERT INTO history (target, at_ms, actor, what, outcome) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![action.target, action.at_ms, action.actor, action.what, action.outcome])?;
        conn.prepare_cached("DELETE FROM history WHERE id <= (SELECT MAX(id) FROM history) - ?1")?
            .execute([HISTORY_KEPT])?;
        Ok(())
    }

    /// The last `limit` actions on the targets in `targets`, newest first.
    pub fn history(&self, targets: &[&str], limit: usize) -> Result<Vec<Action>, StoreError> {
        let targets = serde_json::to_string(targets).expect("a list of names serializes");
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT target, at_ms, actor, what, outcome FROM history
             WHERE target IN (SELECT value FROM json_each(?1)) ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![targets, limit as i64], |r| {
            Ok(Action { target: r.get(0)?, at_ms: r.get(1)?, actor: r.get(2)?, what: r.get(3)?, outcome: r.get(4)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(target: &str, at_ms: i64) -> Action {
        Action {
            target: target.into(),
            at_ms,
            actor: "@alice:x".into(),
            what: "stop".into(),
            outcome: "2 → 0 replicas".into(),
        }
    }

    #[test]
    fn history_lists_the_newest_first_for_the_targets_asked_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            for (i, t) in ["web", "db", "web"].iter().enumerate() {
                s.record_action(&action(t, i as i64)).unwrap();
            }
        }
        let s = Store::open(dir.path()).unwrap();
        let web: Vec<i64> = s.history(&["web"], 10).unwrap().iter().map(|a| a.at_ms).collect();
        assert_eq!(web, [2, 0]);
        assert_eq!(s.history(&["web", "db"], 2).unwrap().len(), 2);
        assert!(s.history(&[], 10).unwrap().is_empty(), "no targets, nothing to see");
    }

    #[test]
    fn only_the_newest_actions_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for i in 0..HISTORY_KEPT + 5 {
            s.record_action(&action("web", i)).unwrap();
        }
        let all = s.history(&["web"], usize::MAX >> 1).unwrap();
        assert_eq!(all.len() as i64, HISTORY_KEPT);
        assert_eq!(all.last().unwrap().at_ms, 5, "the oldest went");
    }
}
