//! Drift notices: each target with `drift_notices` on is watched (kube-rs `watcher`, which
//! reconnects by itself); a change to its replicas that this bridge did not make is posted to
//! the rooms that commanded it, naming who made it. The last replicas seen are kept in the
//! store, so a change made while the bridge was away is noticed when it is back, once.

use futures_util::StreamExt;
use kube::api::DynamicObject;

use super::*;
use crate::{calendar, drift};

impl<H: Homeserver> Bridge<H> {
    /// Watches every target with drift notices on, each in its own task, until the process ends.
    pub fn watch_for_drift(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let targets = self.config.targets.iter().filter(|t| t.drift_notices).cloned();
        targets
            .map(|t| {
                let bridge = self.clone();
                tokio::spawn(async move { bridge.watch_target(t).await })
            })
            .collect()
    }

    async fn watch_target(&self, t: Target) {
        let Ok(scaler) = &self.scaler else { return };
        let mut changes = scaler.watch(&t).boxed();
        let mut warned = false;
        while let Some(item) = changes.next().await {
            match item {
                Ok(Some(object)) => {
                    if let Err(e) = self.on_observed(&t, &object).await {
                        tracing::warn!(target = %t.name, kind = e.kind(), error = %e, "could not handle a change of the workload");
                    }
                }
                Ok(None) => {}
                Err(e) if !std::mem::replace(&mut warned, true) => {
                    tracing::warn!(target = %t.name, error = %e, "watching the workload for changes failed; retrying");
                }
                Err(_) => {}
            }
        }
    }

    /// Compares one look at `t`'s workload with the last; says so in the target's room when
    /// someone else changed its replicas.
    pub(super) async fn on_observed(&self, t: &Target, object: &DynamicObject) -> Result<(), BridgeError> {
        let seen = drift::observe(object);
        let last = self.store.seen_replicas(&t.name)?;
        let change = drift::drift(last, self.store.written_replicas(&t.name)?, &seen)
            .filter(|change| drift::is_news(change, t.autoscaler.is_some()));
        if let Some(change) = change {
            self.metrics.drift.inc();
            let now = self.clock.now_ms();
            let at = change.at_ms.map(|at| calendar::when_text(now, at, &self.config.timezone));
            tracing::info!(target = %t.name, from = change.from, to = change.to, manager = ?change.manager, "someone else scaled the workload");
            let who = change.manager.clone().unwrap_or_else(|| "someone else".to_owned());
            let outcome: Result<Change, ScaleError> = Ok(Change::Scaled { from: change.from, to: change.to });
            self.record_action(t, &who, "scale (not via Matrix)".into(), &outcome);
            let version = object.metadata.resource_version.clone().unwrap_or_default();
            let text = Reply::text(replies::drift(t, &change, at.as_deref()));
            for room in self.store.target_rooms(&t.name)? {
                // NB: transaction ids are the bot's, not the room's: one per room.
                let txn = txn_for("drift", &format!("{}-{version}-{room}", t.name));
                match self.send_notice(&room, None, &text, &txn).await {
                    Ok(()) => {}
                    // NB: a transient failure leaves the count unseen, so the notice is tried again.
                    Err(e) if e.is_transient() => return Err(e),
                    Err(e) => tracing::info!(room_id = %room, error = %e, "could not post a drift notice to this room"),
                }
            }
        }
        if last != Some(seen.replicas) {
            self.store.set_seen_replicas(&t.name, seen.replicas)?;
        }
        Ok(())
    }
}
