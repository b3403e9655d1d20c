//! The transaction sink: each transaction's to-device events, device lists and key counts go
//! to the machine; room keys that arrive put their waiting events back in the queue; and a
//! warning when Synapse sends no MSC3202 data.

use super::*;

/// Where the crypto machine becomes available once set up; it also takes in transactions, and
/// puts events waiting for a room key back in the queue when the key comes.
#[derive(Debug)]
pub struct CryptoCell {
    tx: tokio::sync::watch::Sender<Option<Arc<Crypto>>>,
    without_key_counts: std::sync::atomic::AtomicU32,
    store: Arc<Store>,
    work: Arc<tokio::sync::Notify>,
}

impl CryptoCell {
    /// An empty cell; events waiting for keys are in `store`, and `work` wakes the worker.
    pub fn new(store: Arc<Store>, work: Arc<tokio::sync::Notify>) -> Self {
        Self { tx: tokio::sync::watch::channel(None).0, without_key_counts: Default::default(), store, work }
    }

    /// Puts the events waiting for these room keys (Megolm session ids) back in the queue.
    fn requeue(&self, sessions: &[String]) {
        let mut requeued = 0;
        for session in sessions {
            match self.store.requeue_undecrypted(session) {
                Ok(n) => requeued += n,
                Err(e) => tracing::error!(error = %e, "cannot requeue events waiting for a room key"),
            }
        }
        if requeued > 0 {
            tracing::debug!(events = requeued, "room keys arrived for waiting events");
            self.work.notify_one();
        }
    }
}

/// Transactions with room events but no key counts after which the MSC3202 settings are
/// reported missing.
pub(super) const MISSING_COUNTS_WARNING_AFTER: u32 = 3;

/// How long a transaction waits for the crypto machine to be set up.
pub(super) const INGEST_WAIT: Duration = Duration::from_secs(30);

impl CryptoCell {
    /// Makes the machine available.
    pub fn set(&self, crypto: Arc<Crypto>) {
        self.tx.send_replace(Some(crypto));
    }

    /// The machine, if set up.
    pub fn get(&self) -> Option<Arc<Crypto>> {
        self.tx.borrow().clone()
    }

    /// The machine, waiting up to `timeout` for it to be set up.
    pub async fn wait(&self, timeout: Duration) -> Option<Arc<Crypto>> {
        let mut rx = self.tx.subscribe();
        let ready = tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await;
        ready.ok().and_then(|r| r.ok().map(|v| v.clone())).flatten()
    }
}

impl CryptoCell {
    /// Warns once when Synapse sends room events but never key counts: the MSC3202 settings
    /// are missing on one side (there is no other way to detect them).
    pub(super) fn notice_missing_key_counts(&self, txn: &Transaction) {
        use std::sync::atomic::Ordering;
        if !txn.device_one_time_keys_count.is_empty() {
            self.without_key_counts.store(u32::MAX, Ordering::Relaxed);
            return;
        }
        if txn.events.is_empty() || self.get().is_none() {
            return;
        }
        let seen = self.without_key_counts.load(Ordering::Relaxed);
        if seen == u32::MAX {
            return;
        }
        self.without_key_counts.store(seen + 1, Ordering::Relaxed);
        if seen + 1 == MISSING_COUNTS_WARNING_AFTER {
            tracing::warn!(
                "Synapse sends no one-time-key counts or device lists, so encrypted rooms will fail: set \
                 `experimental_features: {{msc3202_transaction_extensions: true, msc2409_to_device_messages_enabled: true}}` \
                 in homeserver.yaml and `org.matrix.msc3202: true` and `receive_ephemeral: true` in the registration, then restart Synapse"
            );
        }
    }
}

impl crate::appservice::TransactionSink for CryptoCell {
    fn is_ready(&self) -> bool {
        self.get().is_some()
    }

    fn ingest<'a>(
        &'a self,
        txn: &'a Transaction,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            self.notice_missing_key_counts(txn);
            let has_crypto_data =
                !txn.to_device.is_empty() || !txn.device_one_time_keys_count.is_empty() || !txn.device_lists.is_empty();
            if !has_crypto_data {
                return;
            }
            let Some(crypto) = self.wait(INGEST_WAIT).await else {
                tracing::error!("encryption is not set up; this transaction's room keys are lost");
                return;
            };
            if let Some(room_keys) = crypto.ingest(txn).await {
                self.requeue(&room_keys);
                tokio::spawn(async move { crypto.flush().await });
            }
        })
    }
}

/// Whether a transaction tells the machine anything: to-device events, device-list changes,
/// or key counts other than the ones it was last given. Synapse repeats the counts in every
/// transaction, and feeding the same ones again costs a crypto store write for nothing.
pub(super) fn is_news(to_device: usize, lists: &DeviceLists, counts: &KeyCounts, last: Option<&KeyCounts>) -> bool {
    let no_counts = counts.0.is_empty() && counts.1.is_none();
    to_device > 0 || !lists.is_empty() || (!no_counts && last != Some(counts))
}

#[cfg(test)]
mod tests {
    use ruma::owned_user_id;

    use super::*;

    fn counts(signed: u32, fallback: bool) -> KeyCounts {
        let counts = BTreeMap::from([(OneTimeKeyAlgorithm::SignedCurve25519, UInt::from(signed))]);
        (counts, fallback.then(|| vec![OneTimeKeyAlgorithm::SignedCurve25519]))
    }

    #[test]
    fn the_same_key_counts_again_are_not_news_but_changed_ones_are() {
        let none = DeviceLists::new();
        assert!(is_news(0, &none, &counts(50, true), None));
        assert!(!is_news(0, &none, &counts(50, true), Some(&counts(50, true))));
        assert!(is_news(0, &none, &counts(49, true), Some(&counts(50, true))));
        assert!(is_news(0, &none, &counts(50, false), Some(&counts(50, true))));
    }

    #[test]
    fn to_device_events_and_device_list_changes_are_news_even_with_the_same_counts() {
        let same = counts(50, true);
        assert!(is_news(1, &DeviceLists::new(), &same, Some(&same)));
        let mut changed = DeviceLists::new();
        changed.changed.push(owned_user_id!("@alice:localhost"));
        assert!(is_news(0, &changed, &same, Some(&same)));
    }

    #[test]
    fn a_transaction_without_any_encryption_data_is_not_news() {
        let empty: KeyCounts = (BTreeMap::new(), None);
        assert!(!is_news(0, &DeviceLists::new(), &empty, None));
    }
}
