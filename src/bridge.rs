//! The glue, and the only module that knows both Matrix and Kubernetes: a queued event →
//! (invite → join or reject) / (message → parse → authorize → scale → reply).
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
    EventId, OwnedEventId, OwnedRoomId, OwnedTransactionId, RoomId, UserId,
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

use crate::{
    clock::{SharedClock, SystemClock},
    commands::{self, Addressed, BotNames, Command, Parsed},
    config::{BareCommands, Config, RefusalMode, Target},
    crypto::{Approval, CryptoCell, CryptoError, Decryption},
    matrix::{MatrixClient, MatrixError},
    metrics::{KindLabel, Metrics},
    policy::{self, RateLimiter, Refusal, Request, Verified},
    replies,
    rooms::Rooms,
    scaler::{Change, ScaleError, Scaler, State, WorkloadStatus},
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

/// The bridge: everything it needs to act on an event.
pub struct Bridge {
    config: Arc<Config>,
    matrix: Arc<MatrixClient>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    rooms: Arc<Rooms>,
    outbox: Arc<Outbox>,
    crypto: Arc<CryptoCell>,
    scaler: Result<Scaler, ScaleError>,
    names: BotNames,
    refusals: Mutex<HashMap<(OwnedRoomId, &'static str), i64>>,
    limiter: RateLimiter,
    started: std::time::Instant,
    clock: SharedClock,
}

impl Bridge {
    /// A bridge acting with these parts; `scaler` is the error to report when Kubernetes
    /// could not be configured.
    pub fn new(
        config: Arc<Config>,
        matrix: Arc<MatrixClient>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        rooms: Arc<Rooms>,
        crypto: Arc<CryptoCell>,
        scaler: Result<Scaler, ScaleError>,
    ) -> Self {
        let names = BotNames::new(config.bot_user_id.as_str(), &config.display_name);
        let config_limit = config.commands_per_minute;
        let outbox = Arc::new(Outbox { matrix: matrix.clone(), rooms: rooms.clone(), crypto: crypto.clone() });
        Self {
            config,
            matrix,
            store,
            metrics,
            rooms,
            outbox,
            crypto,
            scaler,
            names,
            refusals: Mutex::new(HashMap::new()),
            limiter: RateLimiter::new(config_limit),
            started: std::time::Instant::now(),
            clock: Arc::new(SystemClock),
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

    async fn on_encrypted(&self, job: &Job, room: &RoomId, sender: &UserId) -> Result<(), BridgeError> {
        let Some(crypto) = self.crypto.get() else {
            return Err(BridgeError::WouldLeakPlaintext(room.to_owned()));
        };
        let mut decryption = crypto.decrypt(&job.event, room).await;
        if let Decryption::Decrypted { info, .. } = &decryption
            && unknown_sending_device(info)
        {
            // NB: the sender's new device may not be known yet: ask once, then decrypt again.
            if let Err(e) = crypto.refresh_devices(sender).await {
                tracing::debug!(error = %e, "could not refresh the sender's devices");
            }
            decryption = crypto.decrypt(&job.event, room).await;
        }
        match decryption {
            Decryption::Decrypted { info, .. } if unknown_sending_device(&info) => {
                self.metrics.error("forged_event");
                tracing::warn!(
                    event_id = %job.event_id,
                    sender = %sender,
                    "refusing an encrypted event whose session does not belong to a device of its claimed sender"
                );
                Ok(())
            }
            Decryption::Decrypted { event, info, position } => {
                if job.attempts > 0 {
                    self.metrics.crypto("recovered");
                }
                let inner_room = event.get_field::<String>("room_id").ok().flatten();
                if info.sender != sender || inner_room.as_deref().is_some_and(|r| r != room.as_str()) {
                    self.metrics.error("forged_event");
                    tracing::warn!(event_id = %job.event_id, "refusing an event whose encrypted payload names another sender or room");
                    return Ok(());
                }
                // NB: the outer event id and timestamp are not authenticated; the Megolm message
                // index is. A ciphertext seen before under another event id is a replay.
                let Some(position) = position else {
                    self.metrics.error("forged_event");
                    tracing::warn!(event_id = %job.event_id, "refusing a decrypted event whose Megolm message index cannot be read");
                    return Ok(());
                };
                let first = self.store.first_event_at_megolm_index(
                    &position.session_id,
                    position.index,
                    &job.event_id,
                    job.received_ms,
                )?;
                if first != job.event_id {
                    self.metrics.error("replayed_event");
                    tracing::warn!(
                        event_id = %job.event_id,
                        first_event_id = %first,
                        sender = %sender,
                        session_id = %position.session_id,
                        message_index = position.index,
                        "refusing a replayed ciphertext: this Megolm message already came under another event id"
                    );
                    return Ok(());
                }
                match event.deserialize() {
                    Ok(AnyTimelineEvent::MessageLike(AnyMessageLikeEvent::RoomMessage(
                        MessageLikeEvent::Original(m),
                    ))) => self.on_message(job, &m, Some(&info)).await,
                    Ok(_) => Ok(()),
                    Err(e) => {
                        tracing::debug!(event_id = %job.event_id, error = %e, "skipping a decrypted event we cannot read");
                        Ok(())
                    }
                }
            }
            Decryption::MissingKey { session_id: Some(_) } if !policy::is_known(&self.config, sender) => {
                // NB: only allowed senders' events wait for their keys, so a flood from anyone
                // else cannot push out a real command.
                self.metrics.crypto("not_parked_stranger");
                tracing::debug!(event_id = %job.event_id, sender = %sender, "not keeping an unreadable event of a sender who is not allowed");
                Ok(())
            }
            Decryption::MissingKey { session_id: Some(session_id) } => {
                self.metrics.crypto("waiting_for_key");
                tracing::debug!(event_id = %job.event_id, session_id, "no room key yet; waiting for it");
                let parked = Parked {
                    event_id: job.event_id.clone(),
                    room_id: room.to_string(),
                    sender: sender.to_string(),
                    parked_ms: job.received_ms,
                };
                self.store.park_undecrypted(&parked, &session_id, &job.event)?;
                Ok(())
            }
            Decryption::MissingKey { session_id: None } | Decryption::Failed(_) => {
                tracing::info!(event_id = %job.event_id, sender = %sender, "cannot decrypt an event");
                let event_id =
                    <&EventId>::try_from(job.event_id.as_str()).map_err(|e| MatrixError::Build(e.to_string()))?;
                self.tell_undecryptable(room, sender, event_id).await
            }
        }
    }

    /// Tells an allowed sender, once, that their message could not be read. Others hear nothing.
    async fn tell_undecryptable(&self, room: &RoomId, sender: &UserId, event_id: &EventId) -> Result<(), BridgeError> {
        self.metrics.crypto("undecryptable");
        if !policy::is_known(&self.config, sender) {
            return Ok(());
        }
        let reply = Reply::text(format!(
            "{sender}: I could not decrypt your message. This can happen when your client did not share its key with me (for example while I was restarting). Please send your command again."
        ));
        self.send_notice(room, Some(event_id), &reply, &txn_id("utd", event_id)).await
    }

    /// Answers the senders of messages whose room key never came within the wait window.
    pub async fn report_undecryptable(&self, now_ms: i64) {
        let before = now_ms - self.config.decryption_wait.as_millis() as i64;
        let expired = match self.store.take_expired_undecrypted(before) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the events waiting for keys");
                return;
            }
        };
        for parked in expired {
            let (Ok(room), Ok(sender), Ok(event_id)) = (
                <&RoomId>::try_from(parked.room_id.as_str()),
                <&UserId>::try_from(parked.sender.as_str()),
                <&EventId>::try_from(parked.event_id.as_str()),
            ) else {
                continue;
            };
            if let Err(e) = self.tell_undecryptable(room, sender, event_id).await {
                tracing::warn!(error = %e, "could not tell a sender their message was unreadable");
            }
        }
    }

    async fn on_member(&self, member: RoomMemberEvent) -> Result<(), BridgeError> {
        let room = member.room_id().to_owned();
        let user = <&UserId>::try_from(member.state_key().as_str()).ok().map(ToOwned::to_owned);
        let Some(user) = user else { return Ok(()) };
        let membership = member.membership().clone();
        if user == *self.matrix.bot() {
            match membership {
                MembershipState::Invite if member.sender() != self.matrix.bot() => {
                    return self.on_invite(room, member.sender()).await;
                }
                MembershipState::Leave | MembershipState::Ban => self.rooms.forget(&room),
                _ => {}
            }
            return Ok(());
        }
        let gone = matches!(membership, MembershipState::Leave | MembershipState::Ban);
        self.rooms.set_membership(&room, &user, membership);
        if gone && self.config.leave_rooms_without_allowed_users && self.rooms.is_loaded(&room) {
            let anyone_allowed = self.rooms.get(&room).is_some_and(|r| {
                r.members.iter().any(|(u, m)| {
                    matches!(m, MembershipState::Join | MembershipState::Invite) && policy::may_invite(&self.config, u)
                })
            });
            if !anyone_allowed {
                tracing::info!(room_id = %room, "no allowed user is left; leaving the room");
                let mut request = leave_room::v3::Request::new(room.clone());
                request.reason = Some("no allowed user is left in this room".into());
                self.matrix.send(request).await?;
                self.rooms.forget(&room);
            }
        }
        Ok(())
    }

    async fn on_invite(&self, room: OwnedRoomId, inviter: &UserId) -> Result<(), BridgeError> {
        if policy::may_invite(&self.config, inviter) {
            tracing::info!(room_id = %room, inviter = %inviter, "joining on invite");
            match self.matrix.send(join_room_by_id::v3::Request::new(room.clone())).await {
                Ok(_) => {}
                // NB: the invite may have been withdrawn, or the room left, before we got here.
                Err(e) if e.errcode() == Some("M_FORBIDDEN") || e.errcode() == Some("M_NOT_FOUND") => {
                    tracing::info!(room_id = %room, error = %e, "could not join; the invite is gone");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
            self.load_room(&room).await?;
        } else {
            tracing::info!(room_id = %room, inviter = %inviter, "rejecting an invite from a user who is not allowed");
            let mut request = leave_room::v3::Request::new(room);
            request.reason = Some("only allowed users can invite this bot".into());
            match self.matrix.send(request).await {
                Ok(_) => {}
                Err(e) if !e.is_transient() => {
                    tracing::info!(error = %e, "could not reject the invite")
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Loads the member list and encryption state of `room` from the homeserver.
    async fn load_room(&self, room: &RoomId) -> Result<(), BridgeError> {
        let response = self.matrix.send(get_member_events::v3::Request::new(room.to_owned())).await?;
        let mut members = BTreeMap::new();
        for raw in response.chunk {
            if let Ok(ev) = raw.deserialize()
                && let Ok(user) = <&UserId>::try_from(ev.state_key().as_str())
            {
                members.insert(user.to_owned(), ev.membership().clone());
            }
        }
        // NB: a room once seen encrypted stays so, whatever the homeserver says later.
        if self.store.is_room_encrypted(room.as_str())? {
            self.rooms.set_encrypted(room);
        } else if self.room_state(room, StateEventType::RoomEncryption).await?.is_some() {
            self.mark_encrypted(room)?;
        }
        // NB: it decides whether invited members receive the keys of our replies.
        if let Some(content) = self.room_state(room, StateEventType::RoomHistoryVisibility).await?
            && let Some(visibility) = content["history_visibility"].as_str()
        {
            self.rooms.set_history_visibility(room, visibility);
        }
        self.rooms.load(room, members);
        Ok(())
    }

    /// The content of the room's state event of `kind` (empty state key); `None` when unset.
    async fn room_state(&self, room: &RoomId, kind: StateEventType) -> Result<Option<serde_json::Value>, BridgeError> {
        let request = get_state_event_for_key::v3::Request::new(room.to_owned(), kind, String::new());
        match self.matrix.send(request).await {
            Ok(response) => Ok(Some(serde_json::from_str(response.event_or_content.get()).unwrap_or_default())),
            Err(e) if e.errcode() == Some("M_NOT_FOUND") => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Records that `room` is encrypted, here and in the state database (for after a restart).
    fn mark_encrypted(&self, room: &RoomId) -> Result<(), BridgeError> {
        self.rooms.set_encrypted(room);
        self.store.mark_room_encrypted(room.as_str())?;
        Ok(())
    }

    async fn on_message(
        &self,
        job: &Job,
        message: &OriginalRoomMessageEvent,
        encryption: Option<&EncryptionInfo>,
    ) -> Result<(), BridgeError> {
        let content = &message.content;
        if matches!(content.relates_to, Some(Relation::Replacement(_))) {
            return Ok(());
        }
        let MessageType::Text(text) = &content.msgtype else {
            return Ok(());
        };
        let room = &message.room_id;
        if !self.rooms.is_loaded(room) {
            self.load_room(room).await?;
        }
        let joined = self.rooms.get(room).map_or(0, |r| r.joined().count());
        let addressed = match self.config.bare_commands {
            _ if joined <= 2 => Addressed::ToBot,
            BareCommands::Dm => Addressed::ToRoom,
            BareCommands::Always => Addressed::ToRoomBare,
        };
        let mentioned = content.mentions.as_ref().is_some_and(|m| m.user_ids.contains(self.matrix.bot()));
        let (parsed, to_bot) = commands::read(&text.body, &self.names, addressed, mentioned);
        let sender = &message.sender;
        if matches!(parsed, Parsed::NotACommand) && !to_bot {
            return Ok(());
        }
        let command = match &parsed {
            Parsed::Command(c) => Some(c),
            Parsed::Invalid(_) | Parsed::NotACommand => None,
        };
        let resolution = command.map(|c| self.resolve(c, to_bot));
        let request = Request {
            sender,
            command,
            targets: match &resolution {
                Some(Ok(Some(targets))) => targets.clone(),
                _ => Vec::new(),
            },
            room_encrypted: self.rooms.get(room).is_some_and(|r| r.encrypted),
            verified: self.verification(sender, encryption).await,
        };
        let decision = policy::authorize(&self.config, request);
        match &decision {
            Err(Refusal::Stranger) => return self.refuse(job, room, &message.event_id, sender).await,
            // NB: a plaintext event proves nothing about its sender: anyone with the hs_token, or
            // the homeserver's admin, can write one under an allowed user's name.
            Err(refusal @ Refusal::Plaintext { .. }) => {
                return self.refuse_plaintext(room, &message.event_id, sender, refusal).await;
            }
            _ => {}
        }

        // NB: checked now, when it is about to run, not when it arrived: it may have waited
        // behind a backlog or for its room key.
        let sent_ms = i64::from(message.origin_server_ts.0);
        let reply = too_old(self.clock.now_ms(), sent_ms, self.config.command_max_age).map(|age| {
            tracing::info!(event_id = %message.event_id, age_ms = age.as_millis() as u64, "not running an old command");
            Reply::text(format!(
                "not run: sent {} ago (commands older than {} are not run)",
                human_duration(age),
                human_duration(self.config.command_max_age)
            ))
        });

        if self.config.echo_mode {
            self.send_notice(room, None, &Reply::text(format!("🦞 {}", text.body)), &txn_id("echo", &message.event_id))
                .await?;
        }

        let progress = self.store.progress(message.event_id.as_str())?;
        let (reply, follow_up) = match (progress, reply) {
            (Some(Progress::Replied), _) => return Ok(()),
            (Some(Progress::Acted { reply }), _) => {
                (Reply::text(reply), self.store.rollout(message.event_id.as_str())?)
            }
            (None, Some(reply)) => (reply, None),
            (None, None) => {
                let limited = decision.is_ok() && command.is_some() && !self.limiter.allow(sender, job.received_ms);
                let (reply, follow_up) = match (decision, &parsed) {
                    (Err(refusal), _) => {
                        self.metrics.error(refusal.kind());
                        tracing::info!(event_id = %message.event_id, sender = %sender, refusal = refusal.kind(), "refusing a command");
                        (Some(replies::refusal(&refusal, sender)), None)
                    }
                    (Ok(_), Parsed::Command(_)) if limited => {
                        self.metrics.error("rate_limited");
                        (
                            Some(format!(
                                "Slow down: at most {} commands a minute. Try again shortly.",
                                self.limiter.per_minute()
                            )),
                            None,
                        )
                    }
                    (Ok(authorized), Parsed::Command(cmd)) => match resolution {
                        Some(Err(why)) => (Some(why), None),
                        Some(Ok(None)) => (None, None),
                        _ => self.execute(cmd, message, authorized.targets, job).await,
                    },
                    (Ok(_), Parsed::Invalid(why)) => (Some(why.clone()), None),
                    (Ok(_), Parsed::NotACommand) => (
                        Some(format!(
                            "Unknown command: {}\n{}",
                            text.body.trim(),
                            commands::help_text(&self.target_names())
                        )),
                        None,
                    ),
                };
                let Some(reply) = reply else { return Ok(()) };
                let rollout = follow_up.map(|f| Rollout {
                    event_id: message.event_id.to_string(),
                    room_id: room.to_string(),
                    target: f.target.name,
                    up: f.up,
                    started_ms: now_ms(),
                });
                self.store.set_acted(message.event_id.as_str(), &reply, rollout.as_ref())?;
                (Reply::text(reply), rollout)
            }
        };
        self.send_notice(room, Some(&message.event_id), &reply, &txn_id("reply", &message.event_id)).await?;
        self.metrics.transaction_to_reply_seconds.observe(elapsed_since_ms(job.received_ms).as_secs_f64());
        self.store.set_progress(message.event_id.as_str(), &Progress::Replied)?;
        if let Some(rollout) = follow_up {
            self.follow_rollout(rollout);
        }
        Ok(())
    }

    /// Whether a refusal of `kind` may be said in `room` now: at most one an hour per room.
    fn refusal_due(&self, room: &RoomId, kind: &'static str, now_ms: i64) -> bool {
        let mut refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        let key = (room.to_owned(), kind);
        let due = refusals.get(&key).is_none_or(|t| now_ms - t >= REFUSAL_INTERVAL_MS);
        if due {
            refusals.insert(key, now_ms);
        }
        due
    }

    /// How the event was verified, for [`policy::authorize`]. The trust policy is asked only
    /// for people the bot works for: a stranger's flood causes no key queries.
    async fn verification(&self, sender: &UserId, encryption: Option<&EncryptionInfo>) -> Verified {
        let Some(info) = encryption else { return Verified::Plaintext };
        if !policy::is_known(&self.config, sender) {
            return Verified::NotChecked;
        }
        match self.crypto.get() {
            Some(crypto) => match crypto.check_trust(info, self.config.trust_policy).await {
                Ok(()) => Verified::Trusted,
                Err(why) => Verified::Untrusted(why),
            },
            None => Verified::Untrusted("Encryption is still being set up; send the command again in a moment.".into()),
        }
    }

    /// Refuses a command that came unencrypted where only encrypted ones count; says why at
    /// most once an hour per room.
    async fn refuse_plaintext(
        &self,
        room: &RoomId,
        event_id: &EventId,
        sender: &UserId,
        refusal: &Refusal,
    ) -> Result<(), BridgeError> {
        self.metrics.error(refusal.kind());
        tracing::warn!(
            room_id = %room,
            event_id = %event_id,
            sender = %sender,
            "refusing an unencrypted command: nothing proves who sent it"
        );
        if !self.refusal_due(room, "plaintext", self.clock.now_ms()) {
            return Ok(());
        }
        let reply = Reply::text(replies::refusal(refusal, sender));
        self.send_notice(room, Some(event_id), &reply, &txn_id("plaintext", event_id)).await
    }

    async fn refuse(&self, job: &Job, room: &RoomId, event_id: &EventId, sender: &UserId) -> Result<(), BridgeError> {
        tracing::info!(room_id = %room, sender = %sender, "ignoring a command from a user who is not allowed");
        self.metrics.error("not_allowed");
        if self.config.refusal != RefusalMode::Hourly {
            return Ok(());
        }
        if self.refusal_due(room, "not_allowed", job.received_ms) {
            let reply = Reply::text(replies::refusal(&Refusal::Stranger, sender));
            self.send_notice(room, Some(event_id), &reply, &txn_id("refuse", event_id)).await?;
        }
        Ok(())
    }

    fn target_names(&self) -> Vec<String> {
        self.config.targets.iter().map(|t| t.name.clone()).collect()
    }

    /// Picks the targets a command is about (for [`policy::authorize`] to narrow). `Err` is the
    /// message to answer with, `Ok(None)` means stay silent (chatter naming no known target).
    fn resolve(&self, cmd: &Command, to_bot: bool) -> Result<Option<Vec<&Target>>, String> {
        match cmd {
            Command::Help | Command::Approve { .. } => return Ok(Some(Vec::new())),
            Command::List => return Ok(Some(self.config.targets.iter().collect())),
            Command::Start { .. } | Command::Stop { .. } | Command::Status { .. } => {}
        }
        match cmd.target() {
            Some(name) => match self.config.target(name) {
                Some(t) => Ok(Some(vec![t])),
                None if !to_bot => Ok(None),
                None => Err(format!("There is no target `{name}`. Targets: {}", self.target_names().join(", "))),
            },
            None if matches!(cmd, Command::Status { .. }) => Ok(Some(self.config.targets.iter().collect())),
            None if self.config.targets.len() == 1 => Ok(Some(vec![&self.config.targets[0]])),
            None => Err(format!("Which one? `{} <target>`. Targets: {}", cmd.name(), self.target_names().join(", "))),
        }
    }

    /// Runs an authorized command on `targets` (those the sender may act on); returns the
    /// reply (None = stay silent) and the target to watch.
    async fn execute(
        &self,
        cmd: &Command,
        message: &OriginalRoomMessageEvent,
        targets: Vec<&Target>,
        job: &Job,
    ) -> (Option<String>, Option<FollowUp>) {
        let sender = &message.sender;
        self.metrics.commands.get_or_create(&KindLabel { kind: cmd.name().into() }).inc();
        tracing::info!(command = %cmd, sender = %sender, "command");
        match cmd {
            Command::Help => return (Some(commands::help_text(&self.target_names())), None),
            Command::List => return (Some(list_text(&targets)), None),
            Command::Approve { user, fingerprint } => {
                return (Some(self.approve(sender, user, fingerprint).await), None);
            }
            Command::Start { .. } | Command::Stop { .. } | Command::Status { .. } => {}
        }
        let Some(first) = targets.first().copied() else {
            return (Some(replies::refusal(&Refusal::Target { permission: cmd.permission() }, sender)), None);
        };
        let scaler = match &self.scaler {
            Ok(s) => s,
            Err(e) => return (Some(format!("⚠️ {e}")), None),
        };
        match cmd {
            Command::Status { .. } => {
                let mut lines = Vec::new();
                for t in targets {
                    lines.push(match scaler.status(t).await {
                        Ok(s) => status_line(t, &s),
                        Err(e) => format!("⚠️ {}: {e}", t.name),
                    });
                }
                (Some(lines.join("\n")), None)
            }
            Command::Start { replicas, .. } => {
                if let Some(n) = replicas
                    && *n > first.max_replicas
                {
                    return (Some(format!("{} allows at most {} replicas.", first.name, first.max_replicas)), None);
                }
                match self.patiently(message, scaler.start(first, *replicas, self.store.as_ref())).await {
                    Ok(Change::Scaled { from, to }) => {
                        self.metrics
                            .transaction_to_patch_seconds
                            .observe(elapsed_since_ms(job.received_ms).as_secs_f64());
                        tracing::info!(target = %first.name, from, to, "scaled up");
                        (
                            Some(format!("{} is starting: {from} → {to} replicas.", first.name)),
                            Some(FollowUp { target: first.clone(), up: true }),
                        )
                    }
                    Ok(Change::Unchanged { replicas }) => {
                        (Some(format!("{} is already on ({replicas} replicas).", first.name)), None)
                    }
                    Err(e) => {
                        self.metrics.error("kubernetes");
                        (Some(format!("⚠️ Could not start {}: {e}", first.name)), None)
                    }
                }
            }
            Command::Stop { .. } => match self.patiently(message, scaler.stop(first, self.store.as_ref())).await {
                Ok(Change::Scaled { from, .. }) => {
                    self.metrics.transaction_to_patch_seconds.observe(elapsed_since_ms(job.received_ms).as_secs_f64());
                    tracing::info!(target = %first.name, from, "scaled to zero");
                    (
                        Some(format!("{} is stopping: {from} → 0 replicas (`start` brings back {from}).", first.name)),
                        Some(FollowUp { target: first.clone(), up: false }),
                    )
                }
                Ok(Change::Unchanged { .. }) => (Some(format!("{} is already off.", first.name)), None),
                Err(e) => {
                    self.metrics.error("kubernetes");
                    (Some(format!("⚠️ Could not stop {}: {e}", first.name)), None)
                }
            },
            Command::List | Command::Help | Command::Approve { .. } => unreachable!("answered above"),
        }
    }

    /// Awaits a Kubernetes call; if it takes longer than the configured time, tells the
    /// sender that it is still being tried.
    async fn patiently<T>(&self, message: &OriginalRoomMessageEvent, work: impl Future<Output = T>) -> T {
        let work = std::pin::pin!(work);
        let mut work = work;
        tokio::select! {
            done = &mut work => return done,
            _ = tokio::time::sleep(self.config.slow_notice) => {}
        }
        let notice = Reply::text("Kubernetes is slow to answer; still trying…");
        if let Err(e) = self
            .send_notice(&message.room_id, Some(&message.event_id), &notice, &txn_id("slow", &message.event_id))
            .await
        {
            tracing::warn!(error = %e, "could not say that Kubernetes is slow");
        }
        work.await
    }

    /// `approve @user KEY`, once [`policy::authorize`] let it through: pins the new identity
    /// if `quoted` is the start of its key.
    async fn approve(&self, approver: &UserId, user: &str, quoted: &str) -> String {
        let Ok(user) = <&UserId>::try_from(user) else {
            return format!("{user} is not a user id.");
        };
        let Some(crypto) = self.crypto.get() else {
            return "Encryption is still being set up; try again in a moment.".into();
        };
        match crypto.approve_identity(user, quoted).await {
            Ok(Approval::Approved) => {
                tracing::info!(user = %user, approver = %approver, "approved a changed encryption identity");
                format!("Approved {user}'s new encryption identity; their commands work again.")
            }
            Ok(Approval::NothingToApprove) => format!("{user} has no changed identity to approve."),
            Ok(Approval::KeyMismatch { key }) => {
                tracing::warn!(user = %user, approver = %approver, "an approval quoted another key than the new identity's");
                format!(
                    "Not approved: {quoted} is not the start of {user}'s new identity key, which is {key}. Check it with them again."
                )
            }
            Err(e) => format!("⚠️ Could not approve {user}: {e}"),
        }
    }

    /// Watches a rollout in the background and posts its outcome in reply to the command; the
    /// stored rollout is forgotten once that is done.
    fn follow_rollout(&self, rollout: Rollout) {
        let (Ok(scaler), Some(target)) = (&self.scaler, self.config.target(&rollout.target)) else {
            tracing::info!(event_id = %rollout.event_id, target = %rollout.target, "not following a rollout of a target no longer configured");
            self.forget_rollout(&rollout.event_id);
            return;
        };
        let (Ok(room), Ok(event_id)) =
            (OwnedRoomId::try_from(rollout.room_id.as_str()), OwnedEventId::try_from(rollout.event_id.as_str()))
        else {
            self.forget_rollout(&rollout.event_id);
            return;
        };
        let (scaler, target) = (scaler.clone(), target.clone());
        let (outbox, store) = (self.outbox.clone(), self.store.clone());
        let timeout = self.config.rollout_timeout.saturating_sub(elapsed_since_ms(rollout.started_ms));
        tokio::spawn(async move {
            let text = match scaler.wait_until_settled(&target, timeout).await {
                Ok(s) => outcome_line(&target, &s, rollout.up, elapsed_since_ms(rollout.started_ms)),
                Err(e) => format!("⚠️ Could not follow {}: {e}", target.name),
            };
            let reply = Reply::text(text);
            let txn = txn_id("outcome", &event_id);
            for attempt in 1..=OUTCOME_ATTEMPTS {
                match outbox.send_notice(&room, Some(&event_id), &reply, &txn).await {
                    Err(e) if e.is_transient() && attempt < OUTCOME_ATTEMPTS => {
                        tracing::debug!(error = %e, attempt, "could not post the rollout outcome yet; retrying");
                        tokio::time::sleep(RETRY_DELAY * attempt).await;
                    }
                    Err(e) if e.is_transient() => {
                        tracing::warn!(error = %e, "could not post the rollout outcome; it is retried at the next start");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not post the rollout outcome");
                        break;
                    }
                    Ok(()) => break,
                }
            }
            if let Err(e) = store.finish_rollout(event_id.as_str()) {
                tracing::warn!(error = %e, "could not forget a reported rollout");
            }
        });
    }

    fn forget_rollout(&self, event_id: &str) {
        if let Err(e) = self.store.finish_rollout(event_id) {
            tracing::warn!(error = %e, "could not forget a rollout");
        }
    }

    /// The rollouts a restart interrupted after their command was answered. Read before the
    /// worker starts, so no rollout is both resumed here and followed by its command again.
    pub fn interrupted_rollouts(&self) -> Vec<Rollout> {
        self.store.answered_rollouts().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not read the interrupted rollouts");
            Vec::new()
        })
    }

    /// Follows the interrupted rollouts again and reports them, unless they are long past.
    pub async fn resume_rollouts(&self, rollouts: Vec<Rollout>) {
        self.crypto.wait(CRYPTO_SETUP_WAIT).await;
        for rollout in rollouts {
            if elapsed_since_ms(rollout.started_ms) > self.config.rollout_timeout + STALE_ROLLOUT {
                tracing::info!(event_id = %rollout.event_id, "not reporting a rollout interrupted long ago");
                self.forget_rollout(&rollout.event_id);
                continue;
            }
            let Ok(room) = <&RoomId>::try_from(rollout.room_id.as_str()) else {
                self.forget_rollout(&rollout.event_id);
                continue;
            };
            // NB: the room's encryption must be known before anything is sent there.
            if !self.rooms.is_loaded(room)
                && let Err(e) = self.load_room(room).await
            {
                tracing::warn!(error = %e, "could not load the room of an interrupted rollout; retried at the next start");
                continue;
            }
            tracing::info!(event_id = %rollout.event_id, target = %rollout.target, "following an interrupted rollout again");
            self.follow_rollout(rollout);
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

/// Whether the Megolm session of a decrypted event cannot be tied to a device of the event's
/// claimed sender (a forged sender, or a device we do not know).
fn unknown_sending_device(info: &EncryptionInfo) -> bool {
    use matrix_sdk_common::deserialized_responses::{VerificationLevel, VerificationState};
    info.sender_device.is_none()
        || matches!(
            info.verification_state,
            VerificationState::Unverified(VerificationLevel::None(_) | VerificationLevel::MismatchedSender)
        )
}

/// What to watch after a start or stop.
struct FollowUp {
    target: Target,
    up: bool,
}

/// Sends the bot's messages: encrypted in encrypted rooms, never plaintext there.
struct Outbox {
    matrix: Arc<MatrixClient>,
    rooms: Arc<Rooms>,
    crypto: Arc<CryptoCell>,
}

impl Outbox {
    async fn send_notice(
        &self,
        room: &RoomId,
        reply_to: Option<&EventId>,
        reply: &Reply,
        txn: &OwnedTransactionId,
    ) -> Result<(), BridgeError> {
        match self.send_content(room, notice(reply, reply_to), txn).await {
            Err(e) if e.is_too_large() => {
                let Some(short) = reply.shortened(SHORTENED_REPLY_BYTES) else { return Err(e) };
                tracing::info!(room_id = %room, bytes = reply.plain.len(), "the homeserver refused a reply as too large; sending it shortened");
                self.send_content(room, notice(&short, reply_to), txn).await
            }
            sent => sent,
        }
    }

    async fn send_content(
        &self,
        room: &RoomId,
        content: RoomMessageEventContent,
        txn: &OwnedTransactionId,
    ) -> Result<(), BridgeError> {
        let info = self.rooms.get(room).unwrap_or_default();
        if info.encrypted {
            let Some(crypto) = self.crypto.get() else {
                return Err(BridgeError::WouldLeakPlaintext(room.to_owned()));
            };
            let raw = Raw::new(&content).map_err(|e| MatrixError::Build(e.to_string()))?.cast_unchecked();
            let visibility =
                info.history_visibility.as_deref().map(HistoryVisibility::from).unwrap_or(HistoryVisibility::Shared);
            crypto.send_encrypted(room, &info.key_recipients(), visibility, raw, txn.clone()).await?;
            return Ok(());
        }
        let request = send_message_event::v3::Request::new(room.to_owned(), txn.clone(), &content)
            .map_err(|e| MatrixError::Build(e.to_string()))?;
        self.matrix.send(request).await?;
        Ok(())
    }
}

/// The content of a notice, in reply to `reply_to` when given.
fn notice(reply: &Reply, reply_to: Option<&EventId>) -> RoomMessageEventContent {
    let mut content = RoomMessageEventContent::notice_html(reply.plain.clone(), reply.html.clone());
    content.relates_to =
        reply_to.map(|id| Relation::Reply(ruma::events::relation::Reply::new(InReplyTo::new(id.to_owned()))));
    content
}

/// A transaction id derived from an event id, so a repeated send is dropped by the homeserver.
fn txn_id(kind: &str, event_id: &EventId) -> OwnedTransactionId {
    let safe: String =
        event_id.as_str().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
    format!("mkt-{kind}-{safe}").into()
}

/// "45 s", "3 min", "2 h".
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        _ => format!("{} h", secs / 3600),
    }
}

fn elapsed_since_ms(ms: i64) -> Duration {
    Duration::from_millis((now_ms() - ms).max(0) as u64)
}

/// The answer to `list`: the targets the sender may see.
fn list_text(targets: &[&Target]) -> String {
    let mut out = String::from("Targets:");
    for t in targets {
        out.push_str(&format!(
            "\n• {}: {} {}/{} (at most {} replicas)",
            t.name, t.kind, t.namespace, t.workload, t.max_replicas
        ));
    }
    out
}

/// One line of `status` for a target.
pub fn status_line(t: &Target, s: &WorkloadStatus) -> String {
    let mut line = format!(
        "{} is {}: {}/{} ready (available {}, updated {}; {} {}/{})",
        t.name, s.state, s.ready, s.desired, s.available, s.updated, t.kind, t.namespace, t.workload
    );
    if let Some(m) = &s.message
        && matches!(s.state, State::Degraded | State::Starting)
    {
        line.push_str(&format!(". {m}"));
    }
    line
}

/// The message after watching a start or stop.
pub fn outcome_line(t: &Target, s: &WorkloadStatus, up: bool, took: Duration) -> String {
    let secs = took.as_secs();
    match (up, s.state) {
        (true, State::Running) => format!("{} is up: {}/{} ready after {secs} s", t.name, s.ready, s.desired),
        (false, State::Off) => format!("{} is off after {secs} s", t.name),
        (_, State::Degraded) => format!(
            "⚠️ {} is degraded after {secs} s: {}/{} ready. {}",
            t.name,
            s.ready,
            s.desired,
            s.message.as_deref().unwrap_or("the rollout missed its progress deadline")
        ),
        (true, _) => format!(
            "{} is still starting after {secs} s: {}/{} ready.{}",
            t.name,
            s.ready,
            s.desired,
            s.message.as_deref().map(|m| format!(" {m}")).unwrap_or_default()
        ),
        (false, _) => format!("{} is still stopping after {secs} s: {} pods left", t.name, s.current),
    }
}

/// How long to wait before retrying after a transient failure.
const RETRY_DELAY: Duration = Duration::from_secs(2);

/// Tries to post a rollout outcome before leaving it for the next start.
const OUTCOME_ATTEMPTS: u32 = 5;

/// How long after its timeout an interrupted rollout is still worth reporting.
const STALE_ROLLOUT: Duration = Duration::from_secs(10 * 60);

/// How long after start jobs wait for encryption to be set up. Later jobs do not wait: plain
/// ones are handled, encrypted ones are retried until encryption is ready.
const CRYPTO_SETUP_WAIT: Duration = Duration::from_secs(10);

impl JobHandler for Bridge {
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
        if event.sender() == self.matrix.bot() {
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
    use crate::config::WorkloadKind;

    fn target() -> Target {
        Target {
            name: "clawdbot".into(),
            kind: WorkloadKind::Deployment,
            namespace: "clawdbot".into(),
            workload: "clawdbot".into(),
            max_replicas: 10,
            allowed_users: None,
            viewers: None,
        }
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
