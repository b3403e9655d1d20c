//! The message recipe, top to bottom: read the command, authorize it (`policy::authorize`),
//! dedupe by its stored progress, execute, reply.

use super::*;

impl<H: Homeserver> Bridge<H> {
    pub(super) async fn on_message(
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
        let info = self.rooms.get(room).unwrap_or_default();
        let joined = info.joined().count();
        let addressed = match self.config.bare_commands {
            _ if joined <= 2 => Addressed::ToBot,
            BareCommands::Dm => Addressed::ToRoom,
            BareCommands::Always => Addressed::ToRoomBare,
        };
        let mentioned = content.mentions.as_ref().is_some_and(|m| m.user_ids.contains(self.homeserver.bot()));
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
            room_encrypted: info.encrypted,
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
            Reply::text(replies::too_old(age, self.config.command_max_age))
        });

        if self.config.echo_mode {
            self.send_notice(room, None, &Reply::text(replies::echo(&text.body)), &txn_id("echo", &message.event_id))
                .await?;
        }

        let progress = self.store.progress(&message.event_id)?;
        // NB: `event` is the scale's Kubernetes Event, recorded once the reply is out. A bridge
        // killed in between answers again when the command is redelivered, but without it:
        // the bridge's own history has the action either way.
        let (reply, follow_up, event) = match (progress, reply) {
            (Some(Progress::Replied), _) => return Ok(()),
            (Some(Progress::Acted { reply }), _) => (Reply::text(reply), self.store.rollout(&message.event_id)?, None),
            (None, Some(reply)) => (reply, None, None),
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
                        (Some(replies::slow_down(self.limiter.per_minute())), None)
                    }
                    (Ok(authorized), Parsed::Command(cmd)) => match resolution {
                        Some(Err(why)) => (Some(why), None),
                        Some(Ok(None)) => (None, None),
                        _ => self.execute(cmd, message, authorized.targets, job).await,
                    },
                    (Ok(_), Parsed::Invalid(why)) => (Some(why.clone()), None),
                    (Ok(_), Parsed::NotACommand) => {
                        (Some(replies::unknown_command(&text.body, &commands::help_text(&self.target_names()))), None)
                    }
                };
                let Some(reply) = reply else { return Ok(()) };
                let event = follow_up.as_ref().map(|f| (f.target.clone(), f.event.clone()));
                let rollout = follow_up.map(|f| Rollout {
                    event_id: message.event_id.clone(),
                    room_id: room.to_owned(),
                    target: f.target.name,
                    up: f.up,
                    started_ms: now_ms(),
                });
                self.store.set_acted(&message.event_id, &reply, rollout.as_ref())?;
                (Reply::text(reply), rollout, event)
            }
        };
        self.send_notice(room, Some(&message.event_id), &reply, &txn_id("reply", &message.event_id)).await?;
        self.metrics.transaction_to_reply_seconds.observe(elapsed_since_ms(job.received_ms).as_secs_f64());
        if let Some((t, note)) = event {
            self.record_event(&t, SCALED_BY_CHAT, &note).await;
        }
        self.store.set_progress(&message.event_id, &Progress::Replied)?;
        if let Some(rollout) = follow_up {
            self.follow_rollout(rollout);
        }
        Ok(())
    }

    /// Whether a refusal of `kind` may be said in `room` now: at most one an hour per room.
    pub(super) fn refusal_due(&self, room: &RoomId, kind: &'static str, now_ms: i64) -> bool {
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
    pub(super) async fn verification(&self, sender: &UserId, encryption: Option<&EncryptionInfo>) -> Verified {
        let Some(info) = encryption else { return Verified::Plaintext };
        if !policy::is_known(&self.config, sender) {
            return Verified::Untrusted(TrustRefusal::NotChecked);
        }
        match self.crypto.get() {
            Some(crypto) => match crypto.check_trust(info, self.config.trust_policy).await {
                Ok(()) => Verified::Trusted,
                Err(why) => Verified::Untrusted(why),
            },
            None => Verified::Untrusted(TrustRefusal::NotReady),
        }
    }

    /// Refuses a command that came unencrypted where only encrypted ones count; says why at
    /// most once an hour per room.
    pub(super) async fn refuse_plaintext(
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

    pub(super) async fn refuse(
        &self,
        job: &Job,
        room: &RoomId,
        event_id: &EventId,
        sender: &UserId,
    ) -> Result<(), BridgeError> {
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

    pub(super) fn target_names(&self) -> Vec<String> {
        self.config.targets.iter().map(|t| t.name.clone()).collect()
    }

    /// Picks the targets a command is about (for [`policy::authorize`] to narrow). `Err` is the
    /// message to answer with, `Ok(None)` means stay silent (chatter naming no known target).
    pub(super) fn resolve(&self, cmd: &Command, to_bot: bool) -> Result<Option<Vec<&Target>>, String> {
        match cmd {
            Command::Help | Command::Approve { .. } => return Ok(Some(Vec::new())),
            Command::List => return Ok(Some(self.config.targets.iter().collect())),
            Command::Start { .. }
            | Command::Stop { .. }
            | Command::Status { .. }
            | Command::History { .. }
            | Command::Extend { .. } => {}
        }
        match cmd.target() {
            Some(name) => match self.config.target(name) {
                Some(t) => Ok(Some(vec![t])),
                None if !to_bot => Ok(None),
                None => Err(replies::no_such_target(name, &self.target_names())),
            },
            None if matches!(cmd, Command::Status { .. } | Command::History { .. }) => {
                Ok(Some(self.config.targets.iter().collect()))
            }
            None if self.config.targets.len() == 1 => Ok(Some(vec![&self.config.targets[0]])),
            None => Err(replies::which_target(cmd.name(), &self.target_names())),
        }
    }

    /// Runs an authorized command on `targets` (those the sender may act on); returns the
    /// reply (None = stay silent) and the target to watch.
    pub(super) async fn execute(
        &self,
        cmd: &Command,
        message: &OriginalRoomMessageEvent,
        targets: Vec<&Target>,
        job: &Job,
    ) -> (Option<String>, Option<FollowUp>) {
        let sender = &message.sender;
        self.metrics.commands.get_or_create(&KindLabel { kind: cmd.name().into() }).inc();
        tracing::info!(command = %cmd, sender = %sender, "command");
        let only = || {
            targets
                .first()
                .copied()
                .ok_or_else(|| replies::refusal(&Refusal::Target { permission: cmd.permission() }, sender))
        };
        let answer = match cmd {
            Command::Help => Ok((commands::help_text(&self.target_names()), None)),
            Command::List => Ok((replies::list_text(&targets), None)),
            Command::Approve { user, fingerprint } => Ok((self.approve(sender, user, fingerprint).await, None)),
            Command::Status { .. } => match only() {
                Ok(_) => Ok((self.status_of(&targets).await, None)),
                Err(refusal) => Err(refusal),
            },
            Command::History { .. } => only().map(|_| (self.history_of(&targets), None)),
            Command::Start { replicas, on_for, .. } => match only() {
                Ok(t) => Ok(self.start_target(t, cmd, *replicas, *on_for, message, job).await),
                Err(refusal) => Err(refusal),
            },
            Command::Stop { .. } => match only() {
                Ok(t) => Ok(self.stop_target(t, cmd, message, job).await),
                Err(refusal) => Err(refusal),
            },
            Command::Extend { by, .. } => only().map(|t| (self.extend_target(t, *by, &message.room_id), None)),
        };
        match answer {
            Ok((text, follow_up)) => (Some(text), follow_up),
            Err(refusal) => (Some(refusal), None),
        }
    }

    async fn status_of(&self, targets: &[&Target]) -> String {
        let scaler = match &self.scaler {
            Ok(s) => s,
            Err(e) => return replies::failure(e),
        };
        let mut lines = Vec::new();
        for t in targets {
            let timers = self.timers_line(t).unwrap_or_else(|e| replies::status_timers_unreadable(&e));
            lines.push(match scaler.status(t).await {
                Ok(s) => format!("{}{timers}{}", status_line(t, &s), self.autoscaler_text(t, None).await),
                Err(e) => replies::status_failed(t, &e),
            });
        }
        lines.join("\n")
    }

    async fn start_target(
        &self,
        t: &Target,
        cmd: &Command,
        replicas: Option<i32>,
        on_for: Option<OnFor>,
        message: &OriginalRoomMessageEvent,
        job: &Job,
    ) -> (String, Option<FollowUp>) {
        if replicas.is_some_and(|n| n > t.max_replicas) {
            return (replies::too_many_replicas(t), None);
        }
        let scaler = match &self.scaler {
            Ok(s) => s,
            Err(e) => return (replies::failure(e), None),
        };
        let result = self.patiently(message, scaler.start(t, replicas, self.store.as_ref())).await;
        self.record_action(t, message.sender.as_str(), cmd.to_string(), &result);
        let change = match result {
            Ok(change) => change,
            Err(e) => {
                self.metrics.error("kubernetes");
                return (replies::could_not("start", t, &e), None);
            }
        };
        let room = &message.room_id;
        self.remember_room(t, room);
        // NB: the stop is stored after the scale: if the bridge dies in between, the command
        // runs again when it is redelivered, and stores it then.
        let now = self.clock.now_ms();
        let (until, capped) = match self.stop_time(t, on_for, now) {
            Some((stop, capped)) => match self.set_timed_stop(t, stop, room) {
                Ok(()) => (Some(self.until_text(stop)), capped),
                Err(e) => return (replies::stop_not_stored(t, &e), None),
            },
            None => (self.store.timed_stop(&t.name).ok().flatten().map(|s| self.until_text(s.due_ms)), false),
        };
        let capped = match (capped, t.max_on) {
            (true, Some(max_on)) => replies::capped(t, max_on),
            _ => String::new(),
        };
        let next = self.schedule_after(t, Switch::On);
        match change {
            Change::Scaled { from, to } => {
                self.metrics.transaction_to_patch_seconds.observe(elapsed_since_ms(job.received_ms).as_secs_f64());
                tracing::info!(target = %t.name, from, to, "scaled up");
                self.wrote(t, to);
                let handed = self.autoscaler_text(t, Some(true)).await;
                let text = format!("{}{capped}{handed}{next}", replies::starting(t, from, to, until.as_deref()));
                let event = replies::audit_by(to, &message.sender);
                (text, Some(FollowUp { target: t.clone(), up: true, event }))
            }
            Change::Unchanged { replicas } => {
                self.followed.found_already(&t.name, true, room);
                let handed = self.autoscaler_text(t, Some(true)).await;
                (format!("{}{capped}{handed}{next}", replies::already_on(t, replicas, until.as_deref())), None)
            }
        }
    }

    async fn stop_target(
        &self,
        t: &Target,
        cmd: &Command,
        message: &OriginalRoomMessageEvent,
        job: &Job,
    ) -> (String, Option<FollowUp>) {
        let scaler = match &self.scaler {
            Ok(s) => s,
            Err(e) => return (replies::failure(e), None),
        };
        let result = self.patiently(message, scaler.stop(t, self.store.as_ref())).await;
        self.record_action(t, message.sender.as_str(), cmd.to_string(), &result);
        let change = match result {
            Ok(change) => change,
            Err(e) => {
                self.metrics.error("kubernetes");
                return (replies::could_not("stop", t, &e), None);
            }
        };
        self.remember_room(t, &message.room_id);
        if let Err(e) = self.store.cancel_timed_stop(&t.name) {
            tracing::warn!(error = %e, "could not cancel a timed stop");
        }
        let next = self.schedule_after(t, Switch::Off);
        match change {
            Change::Scaled { from, .. } => {
                self.metrics.transaction_to_patch_seconds.observe(elapsed_since_ms(job.received_ms).as_secs_f64());
                tracing::info!(target = %t.name, from, "scaled to zero");
                self.wrote(t, 0);
                let paused = self.autoscaler_text(t, Some(false)).await;
                let text = format!("{}{paused}{next}", replies::stopping(t, from));
                let event = replies::audit_by(0, &message.sender);
                (text, Some(FollowUp { target: t.clone(), up: false, event }))
            }
            Change::Unchanged { .. } => {
                self.followed.found_already(&t.name, false, &message.room_id);
                (format!("{}{}{next}", replies::already_off(t), self.autoscaler_text(t, Some(false)).await), None)
            }
        }
    }

    fn extend_target(&self, t: &Target, by: Duration, room: &RoomId) -> String {
        self.remember_room(t, room);
        self.extend(t, by, room).unwrap_or_else(|e| replies::could_not_extend(t, &e))
    }

    /// The answer to `history` for `targets`.
    fn history_of(&self, targets: &[&Target]) -> String {
        let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        match self.store.history(&names, HISTORY_SHOWN) {
            Ok(actions) => {
                let now = self.clock.now_ms();
                replies::history_text(&actions, |at| crate::calendar::when_text(now, at, &self.config.timezone))
            }
            Err(e) => replies::failure(&e),
        }
    }

    /// Writes down what was done to `t`, by whom, and how it ended, for `history`.
    pub(super) fn record_action(&self, t: &Target, actor: &str, what: String, result: &Result<Change, ScaleError>) {
        let action = crate::store::Action {
            target: t.name.clone(),
            at_ms: self.clock.now_ms(),
            actor: actor.to_owned(),
            what,
            outcome: replies::change_outcome(result),
        };
        if let Err(e) = self.store.record_action(&action) {
            tracing::warn!(error = %e, "could not record an action in the history");
        }
    }

    /// What `t`'s autoscaler is doing, for `status` (`after` None) or after a start (`Some(true)`)
    /// or stop; empty for a target without one, so others cost no request.
    async fn autoscaler_text(&self, t: &Target, after: Option<bool>) -> String {
        let Ok(scaler) = &self.scaler else { return String::new() };
        if t.autoscaler.is_none() {
            return String::new();
        }
        let state = scaler.autoscaler(t).await;
        match after {
            None => replies::status_autoscaler(&state),
            Some(up) => replies::autoscaler_after(&state, up),
        }
    }

    /// Notes that the bridge scaled `t` to `to` and records it as a Kubernetes Event.
    pub(super) async fn audit(&self, t: &Target, to: i32, reason: &str, note: String) {
        self.wrote(t, to);
        self.record_event(t, reason, &note).await;
    }

    /// Notes that the bridge scaled `t` to `to`, so its drift watch does not take the change
    /// for someone else's.
    fn wrote(&self, t: &Target, to: i32) {
        if let Err(e) = self.store.set_written_replicas(&t.name, to) {
            tracing::warn!(error = %e, "could not remember the count the bridge scaled to");
        }
    }

    /// Records a scale of `t` as a Kubernetes Event; a failure is logged and counted, never in
    /// the way of the command.
    async fn record_event(&self, t: &Target, reason: &str, note: &str) {
        let Ok(scaler) = &self.scaler else { return };
        if let Err(e) = scaler.record(t, reason, note).await {
            self.metrics.error("audit_event");
            tracing::warn!(target = %t.name, error = %e, "could not record the scale as a Kubernetes Event");
        }
    }

    /// Remembers `room` as where `t` was last commanded, for the schedule's notices.
    fn remember_room(&self, t: &Target, room: &RoomId) {
        if let Err(e) = self.store.set_target_room(&t.name, room) {
            tracing::warn!(error = %e, "could not remember the room of a command");
        }
    }

    /// Awaits a Kubernetes call; if it takes longer than the configured time, tells the
    /// sender that it is still being tried.
    pub(super) async fn patiently<T>(&self, message: &OriginalRoomMessageEvent, work: impl Future<Output = T>) -> T {
        let work = std::pin::pin!(work);
        let mut work = work;
        tokio::select! {
            done = &mut work => return done,
            _ = tokio::time::sleep(self.config.slow_notice) => {}
        }
        let notice = Reply::text(replies::STILL_TRYING);
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
    pub(super) async fn approve(&self, approver: &UserId, user: &UserId, quoted: &str) -> String {
        let Some(crypto) = self.crypto.get() else {
            return replies::ENCRYPTION_NOT_READY.into();
        };
        let outcome = crypto.approve_identity(user, quoted).await;
        match &outcome {
            Ok(Approval::Approved) => {
                tracing::info!(user = %user, approver = %approver, "approved a changed encryption identity")
            }
            Ok(Approval::KeyMismatch { .. }) => {
                tracing::warn!(user = %user, approver = %approver, "an approval quoted another key than the new identity's")
            }
            Ok(Approval::NothingToApprove) | Err(_) => {}
        }
        replies::approval(user, quoted, &outcome)
    }
}

/// How many actions `history` shows.
const HISTORY_SHOWN: usize = 10;

/// What to do once a start or stop is answered: record its Kubernetes Event (`event`, the
/// note) and watch its rollout.
pub(super) struct FollowUp {
    target: Target,
    up: bool,
    event: String,
}
