//! The glue, and the only module that knows both Matrix and Kubernetes: a queued event →
//! (invite → join or reject) / (message → parse → authorize → scale → reply).
//!
//! Here: the job dispatch ([`JobHandler`]) and the parts every room uses. Each step lives in
//! its own file: `message` (the command recipe), `encrypted` (decrypt, park, requeue, the
//! "could not decrypt" notice), `membership` (invites, leaving, loading rooms), `rollouts`
//! (follow, resume), `drift` (changes someone else made), `timed` (timed starts, `extend`, warnings, schedules), `outbox` (sending) and `homeserver` (the [`Homeserver`] trait: every call
//! the bridge makes to the homeserver, so `decisions` can test it with an in-memory fake). The
//! words are in [`crate::replies`].
//!
//! A command runs at most once: its progress is stored before the reply is sent, and replies
//! use transaction ids derived from the command's event id, so the homeserver drops repeats.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use ruma::{
    EventId, OwnedRoomId, OwnedTransactionId, OwnedUserId, RoomId, TransactionId, UserId,
    api::client::{
        membership::{get_member_events, join_room_by_id, leave_room},
        message::send_message_event,
        state::get_state_event_for_key,
    },
    events::{
        AnyMessageLikeEvent, AnyStateEvent, AnyTimelineEvent, MessageLikeEvent, StateEventType,
        relation::InReplyTo,
        room::{
            history_visibility::HistoryVisibility,
            member::{MembershipState, RoomMemberEvent},
            message::{MessageType, OriginalRoomMessageEvent, Relation, RoomMessageEventContent},
        },
    },
    serde::Raw,
};

use matrix_sdk_common::deserialized_responses::EncryptionInfo;

#[cfg(test)]
mod autoscaler_decisions;
#[cfg(test)]
mod decisions;
mod drift;
mod encrypted;
#[cfg(test)]
mod fake;
mod homeserver;
mod membership;
mod message;
mod outbox;
#[cfg(test)]
mod rollout_reports;
mod rollouts;
mod timed;
#[cfg(test)]
mod timed_decisions;

pub use homeserver::Homeserver;
use outbox::{Outbox, txn_for, txn_id};
pub use rollouts::Interrupted;

pub use crate::replies::{human_duration, outcome_line, status_line};

use crate::{
    calendar::Switch,
    clock::{SharedClock, SystemClock},
    commands::{self, Addressed, BotNames, Command, OnFor, Parsed},
    config::{BareCommands, Config, RefusalMode, Target},
    crypto::{Approval, CryptoCell, CryptoError, Decryption},
    matrix::{MatrixClient, MatrixError},
    metrics::{KindLabel, Metrics},
    policy::{self, RateLimiter, Refusal, Request, TrustRefusal, Verified},
    replies,
    rooms::Rooms,
    scaler::{Change, SCALED_BY_CHAT, ScaleError, Scaler},
    store::{Job, Parked, Progress, Rollout, Store, StoreError, now_ms},
    worker::{JobHandler, Outcome},
};

/// Errors while acting on an event.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The homeserver call failed.
    #[error(transparent)]
    Matrix(#[from] MatrixError),
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A reply would have gone into an encrypted room in plaintext.
    #[error("room {0} is encrypted and encryption is not set up yet; not sending plaintext")]
    WouldLeakPlaintext(OwnedRoomId),
    /// Encrypting or decrypting failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl BridgeError {
    /// Whether the homeserver refused the message as too large.
    fn is_too_large(&self) -> bool {
        match self {
            BridgeError::Matrix(e) | BridgeError::Crypto(CryptoError::Matrix(e)) => e.is_too_large(),
            _ => false,
        }
    }

    /// The metric `kind` this error is counted under.
    pub fn kind(&self) -> &'static str {
        match self {
            BridgeError::Matrix(_) | BridgeError::Crypto(CryptoError::Matrix(_)) => "homeserver",
            BridgeError::Store(_) => "store",
            BridgeError::WouldLeakPlaintext(_) => "encryption_not_ready",
            BridgeError::Crypto(_) => "crypto",
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            BridgeError::Matrix(e) => e.is_transient(),
            BridgeError::Store(_) => true,
            // NB: encryption is being set up; the reply goes out once it is.
            BridgeError::WouldLeakPlaintext(_) => true,
            BridgeError::Crypto(e) => e.is_transient(),
        }
    }
}

/// A message for the room: plain text and its HTML form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Plain text.
    pub plain: String,
    /// HTML.
    pub html: String,
}

impl Reply {
    /// A reply from plain text; the HTML form escapes it and keeps line breaks.
    pub fn text(plain: impl Into<String>) -> Self {
        let plain = plain.into();
        let html = escape_html(&plain).replace('\n', "<br>");
        Reply { plain, html }
    }

    /// The reply cut to at most `max_bytes` of text (at a character boundary), saying how much
    /// was left out; `None` when it is already that short.
    pub fn shortened(&self, max_bytes: usize) -> Option<Reply> {
        if self.plain.len() <= max_bytes {
            return None;
        }
        let mut cut = max_bytes;
        while !self.plain.is_char_boundary(cut) {
            cut -= 1;
        }
        let left_out = self.plain[cut..].chars().count();
        Some(Reply::text(format!(
            "{}… ({left_out} more characters left out: the message was too large)",
            &self.plain[..cut]
        )))
    }
}

/// How much text a reply keeps when the homeserver refused it as too large: with its HTML
/// form (at worst five times longer when escaped) and encryption, well under Synapse's
/// 64 KiB event limit.
pub const SHORTENED_REPLY_BYTES: usize = 4000;

/// Whether a command sent at `sent_ms` is too old to run at `now_ms`; returns its age if so.
pub fn too_old(now_ms: i64, sent_ms: i64, max_age: Duration) -> Option<Duration> {
    let age_ms = now_ms.saturating_sub(sent_ms);
    (age_ms > max_age.as_millis() as i64).then(|| Duration::from_millis(age_ms as u64))
}

/// Escapes text for HTML.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// How long a refusal to a stranger stays the only one in a room.
const REFUSAL_INTERVAL_MS: i64 = 3_600_000;

/// The bridge: everything it needs to act on an event. `H` is the homeserver (a fake in tests).
pub struct Bridge<H = MatrixClient> {
    config: Arc<Config>,
    homeserver: Arc<H>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    rooms: Arc<Rooms>,
    outbox: Arc<Outbox<H>>,
    crypto: Arc<CryptoCell>,
    scaler: Result<Scaler, ScaleError>,
    names: BotNames,
    refusals: Mutex<HashMap<(OwnedRoomId, &'static str), i64>>,
    limiter: RateLimiter,
    started: tokio::time::Instant,
    clock: SharedClock,
    timers_changed: tokio::sync::Notify,
    followed: Arc<rollouts::Followed>,
}

impl<H: Homeserver> Bridge<H> {
    /// A bridge acting with these parts; `scaler` is the error to report when Kubernetes
    /// could not be configured.
    pub fn new(
        config: Arc<Config>,
        homeserver: Arc<H>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        rooms: Arc<Rooms>,
        crypto: Arc<CryptoCell>,
        scaler: Result<Scaler, ScaleError>,
    ) -> Self {
        let names = BotNames::new(config.bot_user_id.as_str(), &config.display_name);
        let config_limit = config.commands_per_minute;
        let outbox = Arc::new(Outbox { homeserver: homeserver.clone(), rooms: rooms.clone(), crypto: crypto.clone() });
        Self {
            config,
            homeserver,
            store,
            metrics,
            rooms,
            outbox,
            crypto,
            scaler,
            names,
            refusals: Mutex::new(HashMap::new()),
            limiter: RateLimiter::new(config_limit),
            started: tokio::time::Instant::now(),
            clock: Arc::new(SystemClock),
            timers_changed: tokio::sync::Notify::new(),
            followed: Arc::default(),
        }
    }

    /// Uses `clock` to tell a command's age (tests move it by hand).
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    async fn handle_event(&self, job: &Job, event: AnyTimelineEvent) -> Result<(), BridgeError> {
        match event {
            AnyTimelineEvent::State(AnyStateEvent::RoomMember(member)) => self.on_member(member).await,
            AnyTimelineEvent::State(AnyStateEvent::RoomEncryption(e)) => self.mark_encrypted(e.room_id()),
            AnyTimelineEvent::State(AnyStateEvent::RoomHistoryVisibility(e)) => {
                if let Some(original) = e.as_original() {
                    self.rooms.set_history_visibility(e.room_id(), original.content.history_visibility.as_str());
                }
                Ok(())
            }
            AnyTimelineEvent::MessageLike(AnyMessageLikeEvent::RoomMessage(MessageLikeEvent::Original(message))) => {
                self.on_message(job, &message, None).await
            }
            AnyTimelineEvent::MessageLike(AnyMessageLikeEvent::RoomEncrypted(MessageLikeEvent::Original(e))) => {
                self.on_encrypted(job, &e.room_id, &e.sender).await
            }
            _ => Ok(()),
        }
    }

    async fn send_notice(
        &self,
        room: &RoomId,
        reply_to: Option<&EventId>,
        reply: &Reply,
        txn: &OwnedTransactionId,
    ) -> Result<(), BridgeError> {
        if !self.rooms.is_loaded(room) {
            self.load_room(room).await?;
        }
        self.outbox.send_notice(room, reply_to, reply, txn).await
    }
}

fn elapsed_since_ms(ms: i64) -> Duration {
    Duration::from_millis((now_ms() - ms).max(0) as u64)
}

/// How long to wait before retrying after a transient failure.
const RETRY_DELAY: Duration = Duration::from_secs(2);

/// Tries to post a rollout outcome before leaving it for the next start.
const OUTCOME_ATTEMPTS: u32 = 5;

/// How long after the reply a rollout's report goes out at the earliest: a quick next command
/// on the same target takes over from it instead of the two crossing in the room.
const REPORT_HOLD: Duration = Duration::from_secs(1);

/// How long after its timeout an interrupted rollout is still worth reporting.
const STALE_ROLLOUT: Duration = Duration::from_secs(10 * 60);

/// How long after start jobs wait for encryption to be set up. Later jobs do not wait: plain
/// ones are handled, encrypted ones are retried until encryption is ready.
const CRYPTO_SETUP_WAIT: Duration = Duration::from_secs(10);

impl<H: Homeserver> JobHandler for Bridge<H> {
    async fn handle(&self, job: &Job) -> Outcome {
        // NB: joining or answering before our device exists would make clients leave the bot
        // out of their room keys. NB: one deadline for all jobs, not 10 s for each.
        self.crypto.wait(CRYPTO_SETUP_WAIT.saturating_sub(self.started.elapsed())).await;
        let event = match Raw::<AnyTimelineEvent>::from_json_string(job.event.clone()).and_then(|r| r.deserialize()) {
            Ok(event) => event,
            Err(e) => {
                tracing::debug!(event_id = %job.event_id, error = %e, "skipping an event we cannot read");
                return Outcome::Done;
            }
        };
        if event.sender() == self.homeserver.bot() {
            return Outcome::Done;
        }
        match self.handle_event(job, event).await {
            Ok(()) => Outcome::Done,
            Err(e) if e.is_transient() => {
                self.metrics.error(e.kind());
                tracing::warn!(event_id = %job.event_id, kind = e.kind(), error = %e, "could not act on an event yet; will retry");
                Outcome::RetryAfter(RETRY_DELAY)
            }
            Err(e) => {
                self.metrics.error(e.kind());
                tracing::warn!(event_id = %job.event_id, kind = e.kind(), error = %e, "could not act on an event");
                Outcome::Done
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scaler::{State, WorkloadStatus};

    fn target() -> Target {
        Target::deployment("clawdbot", "clawdbot")
    }

    fn status(state: State, desired: i32, ready: i32, message: Option<&str>) -> WorkloadStatus {
        WorkloadStatus {
            state,
            desired,
            current: desired,
            ready,
            available: ready,
            updated: ready,
            message: message.map(Into::into),
        }
    }

    #[test]
    fn a_finished_start_says_how_long_it_took() {
        let line = outcome_line(&target(), &status(State::Running, 1, 1, None), true, Duration::from_secs(14));
        assert_eq!(line, "clawdbot is up: 1/1 ready after 14 s");
    }

    #[test]
    fn a_start_still_in_progress_after_the_bound_carries_the_condition_message() {
        let s = status(State::Starting, 1, 0, Some("Deployment does not have minimum availability."));
        let line = outcome_line(&target(), &s, true, Duration::from_secs(120));
        assert_eq!(
            line,
            "clawdbot is still starting after 120 s: 0/1 ready. Deployment does not have minimum availability."
        );
    }

    #[test]
    fn a_start_whose_workload_was_scaled_back_to_zero_says_so_instead_of_still_starting() {
        let line = outcome_line(&target(), &status(State::Off, 0, 0, None), true, Duration::from_secs(5));
        assert_eq!(
            line,
            "clawdbot was scaled back to 0 after 5 s, before it was up; `status clawdbot` tells where it is now."
        );
    }

    #[test]
    fn a_stop_whose_workload_was_scaled_up_again_says_so_instead_of_still_stopping() {
        let line = outcome_line(&target(), &status(State::Running, 2, 2, None), false, Duration::from_secs(7));
        assert_eq!(
            line,
            "clawdbot was scaled up again to 2 after 7 s, before it was off; `status clawdbot` tells where it is now."
        );
    }

    #[test]
    fn status_names_state_counts_and_workload() {
        let line = status_line(&target(), &status(State::Running, 2, 2, None));
        assert_eq!(line, "clawdbot is running: 2/2 ready (available 2, updated 2; Deployment clawdbot/clawdbot)");
    }

    #[test]
    fn a_long_reply_is_shortened_at_a_character_boundary_and_says_how_much_was_left_out() {
        let reply = Reply::text("é".repeat(10));
        let short = reply.shortened(5).unwrap();
        assert_eq!(short.plain, "éé… (8 more characters left out: the message was too large)");
        assert!(reply.shortened(20).is_none(), "20 bytes are already short enough");
    }

    #[test]
    fn a_command_is_too_old_only_past_the_maximum_age_measured_when_it_runs() {
        use crate::clock::{Clock, ManualClock};
        let max = Duration::from_secs(300);
        let clock = ManualClock::at(1_000_000);
        let sent = clock.now_ms();
        assert_eq!(too_old(clock.now_ms(), sent, max), None);
        clock.advance_ms(300_000);
        assert_eq!(too_old(clock.now_ms(), sent, max), None, "exactly the maximum age still runs");
        clock.advance_ms(1);
        assert_eq!(too_old(clock.now_ms(), sent, max), Some(Duration::from_millis(300_001)));
        assert_eq!(too_old(0, 5_000, max), None, "a timestamp from the future is not old");
    }

    #[test]
    fn errors_are_counted_by_what_failed_not_all_as_the_homeserver() {
        let store = BridgeError::Store(StoreError::Sqlite(rusqlite::Error::InvalidQuery));
        assert_eq!(store.kind(), "store");
        assert!(store.is_transient());
        let room = OwnedRoomId::try_from("!r:x").unwrap();
        assert_eq!(BridgeError::WouldLeakPlaintext(room).kind(), "encryption_not_ready");
        let matrix = BridgeError::Matrix(MatrixError::Build("bad".into()));
        assert_eq!(matrix.kind(), "homeserver");
    }

    #[test]
    fn html_replies_escape_markup() {
        let r = Reply::text("a <b> & \"c\"\nd");
        assert_eq!(r.html, "a &lt;b&gt; &amp; &quot;c&quot;<br>d");
    }

    #[test]
    fn reply_transaction_ids_are_stable_and_url_safe() {
        let id = <&EventId>::try_from("$abc+/=DEF:x.org").unwrap();
        assert_eq!(txn_id("reply", id), txn_id("reply", id));
        assert_eq!(txn_id("reply", id).as_str(), "mkt-reply-abcDEFxorg");
    }
}
