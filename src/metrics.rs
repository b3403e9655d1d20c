//! Prometheus metrics, served as text at `GET /metrics`.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Label set with one `kind` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// What is counted.
    pub kind: String,
}

/// Label set with one `type` label: a known Matrix event type, or `other`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// The event type, one of [`KNOWN_EVENT_TYPES`] or `other`.
    pub r#type: &'static str,
}

/// The event types counted under their own name; every other type is counted as `other`, so
/// no room member can add label values (or break the format) by sending odd types.
pub const KNOWN_EVENT_TYPES: &[&str] = &[
    "m.room.message",
    "m.room.encrypted",
    "m.room.member",
    "m.room.encryption",
    "m.room.history_visibility",
    "m.room.create",
    "m.room.name",
    "m.room.topic",
    "m.room.avatar",
    "m.room.power_levels",
    "m.room.join_rules",
    "m.room.guest_access",
    "m.room.canonical_alias",
    "m.room.redaction",
    "m.reaction",
    "m.sticker",
];

/// Label set with one `result` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok`, `replayed` or `rejected`.
    pub result: &'static str,
}

/// All metrics of the bridge.
pub struct Metrics {
    registry: Registry,
    /// Transactions received, by result.
    pub transactions: Family<ResultLabel, Counter>,
    /// Transactions whose id was known but whose body was new (processed as new).
    pub transactions_id_reused: Counter,
    /// Events received, by event type.
    pub events: Family<TypeLabel, Counter>,
    /// Errors, by kind.
    pub errors: Family<KindLabel, Counter>,
    /// Time spent answering a transaction.
    pub transaction_seconds: Histogram,
    /// Commands handled, by command.
    pub commands: Family<KindLabel, Counter>,
    /// Time from a transaction's arrival to the scale request.
    pub transaction_to_patch_seconds: Histogram,
    /// Time from a transaction's arrival to the reply being sent.
    pub transaction_to_reply_seconds: Histogram,
    /// Crypto events (decryption failures, retries, recoveries, OTK uploads, key shares), by kind.
    pub crypto: Family<KindLabel, Counter>,
    /// Timers that ran (timed stops and their warnings, schedule switches), by action.
    pub timers: Family<KindLabel, Counter>,
    /// Changes to a target's replicas that someone other than the bridge made.
    pub drift: Counter,
    /// Jobs waiting in the queue (set when metrics are read).
    pub queue_depth: Gauge,
    /// How long the oldest waiting job has waited, in seconds (set when metrics are read).
    pub queue_oldest_job_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0].into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("matrix_k8s_toggle");
        let transactions = Family::<ResultLabel, Counter>::default();
        let transactions_id_reused = Counter::default();
        let events = Family::<TypeLabel, Counter>::default();
        let errors = Family::<KindLabel, Counter>::default();
        let commands = Family::<KindLabel, Counter>::default();
        let crypto = Family::<KindLabel, Counter>::default();
        let timers = Family::<KindLabel, Counter>::default();
        let drift = Counter::default();
        let queue_depth = Gauge::default();
        let queue_oldest_job_age_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let transaction_seconds = Histogram::new(latency_buckets());
        let transaction_to_patch_seconds = Histogram::new(latency_buckets());
        let transaction_to_reply_seconds = Histogram::new(latency_buckets());
        registry.register("transactions", "Transactions pushed by the homeserver", transactions.clone());
        registry.register(
            "transactions_id_reused",
            "Transactions with a known id and new content, processed as new (Synapse on SQLite after a restart)",
            transactions_id_reused.clone(),
        );
        registry.register("events", "Events received, by type", events.clone());
        registry.register("errors", "Errors, by kind", errors.clone());
        registry.register("commands", "Commands handled, by command", commands.clone());
        registry.register("crypto", "End-to-end encryption events, by kind", crypto.clone());
        registry.register(
            "timers",
            "Timers that ran, by action: stop and warn (timed starts), on and off (schedules)",
            timers.clone(),
        );
        registry.register("drift", "Changes to a target's replicas made by someone else", drift.clone());
        registry.register("queue_depth", "Jobs waiting in the work queue", queue_depth.clone());
        registry.register(
            "queue_oldest_job_age_seconds",
            "How long the oldest waiting job has waited",
            queue_oldest_job_age_seconds.clone(),
        );
        registry.register("transaction_handling_seconds", "Time to answer a transaction", transaction_seconds.clone());
        registry.register(
            "transaction_to_patch_seconds",
            "Time from a command's transaction arriving to its scale request",
            transaction_to_patch_seconds.clone(),
        );
        registry.register(
            "transaction_to_reply_seconds",
            "Time from a command's transaction arriving to its reply being sent",
            transaction_to_reply_seconds.clone(),
        );
        Self {
            registry,
            transactions,
            transactions_id_reused,
            events,
            errors,
            transaction_seconds,
            commands,
            transaction_to_patch_seconds,
            transaction_to_reply_seconds,
            crypto,
            timers,
            drift,
            queue_depth,
            queue_oldest_job_age_seconds,
        }
    }

    /// Counts a received event of type `event_type` (unknown types as `other`).
    pub fn event(&self, event_type: &str) {
        let label = KNOWN_EVENT_TYPES.iter().copied().find(|t| *t == event_type).unwrap_or("other");
        self.events.get_or_create(&TypeLabel { r#type: label }).inc();
    }

    /// Counts an error of `kind`.
    pub fn error(&self, kind: &str) {
        self.errors.get_or_create(&KindLabel { kind: kind.to_owned() }).inc();
    }

    /// Counts a crypto event of `kind`.
    pub fn crypto(&self, kind: &str) {
        self.crypto.get_or_create(&KindLabel { kind: kind.to_owned() }).inc();
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_events_appear_in_the_text_output() {
        let m = Metrics::new();
        m.event("m.room.message");
        m.error("homeserver");
        let text = m.render();
        assert!(text.contains("matrix_k8s_toggle_events_total{type=\"m.room.message\"} 1"), "{text}");
        assert!(text.contains("matrix_k8s_toggle_errors_total{kind=\"homeserver\"} 1"), "{text}");
        assert!(text.contains("# EOF"));
    }

    #[test]
    fn odd_event_types_are_counted_as_other_and_add_no_label_values() {
        let m = Metrics::new();
        for i in 0..1000 {
            m.event(&format!("evil\"}}\n{i}"));
        }
        m.event("m.room.member");
        let text = m.render();
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("matrix_k8s_toggle_events_total")).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines.contains(&r#"matrix_k8s_toggle_events_total{type="other"} 1000"#), "{text}");
        assert!(lines.contains(&r#"matrix_k8s_toggle_events_total{type="m.room.member"} 1"#), "{text}");
        assert!(!text.contains("evil"), "{text}");
    }
}
