//! What the bot says, in one place, so the words can be read and changed together: refusals,
//! command answers, `list` and `status` lines, rollout outcomes, notices, durations.

use std::time::Duration;

use ruma::UserId;

use crate::{
    calendar::Switch,
    commands::Permission,
    config::Target,
    crypto::{Approval, CryptoError},
    policy::{Refusal, TrustRefusal},
    scaler::{AutoscalerState, KEDA_PAUSED_REPLICAS, ScaleError, State, WorkloadStatus},
};

/// How often a refusal that is not a reply to one person (strangers, plaintext) is said at most.
pub const ONCE_AN_HOUR: &str = "(I say this at most once an hour.)";

/// The reply to a refused message of `sender`. (Whether it is said at all, and how often, is
/// the bridge's: strangers hear it only with `UNAUTHORIZED_REPLY=hourly`.)
pub fn refusal(refusal: &Refusal, sender: &UserId) -> String {
    match refusal {
        Refusal::Stranger => format!("Sorry, {sender} may not command this bot. Ask an admin to add you to ALLOWED_USERS."),
        Refusal::Plaintext { encrypted_room: true } => format!(
            "Not run: this command came unencrypted into an encrypted room, so nothing proves who sent it. \
             Send commands from a client with encryption turned on. {ONCE_AN_HOUR}"
        ),
        Refusal::Plaintext { encrypted_room: false } => format!(
            "Not run: commands must be encrypted (REQUIRE_ENCRYPTION=true) and this room is not. \
             Turn on encryption in the room's settings, then send the command again. {ONCE_AN_HOUR}"
        ),
        Refusal::Untrusted(why) => trust_refusal(why),
        Refusal::ViewOnly { command } => format!(
            "You may look but not change anything: `{command}` needs ALLOWED_USERS, and you are in VIEWERS."
        ),
        Refusal::Target { permission: Permission::Operate } => "You may not operate that target.".into(),
        Refusal::Target { permission: Permission::Query } => "You may not see that target.".into(),
        Refusal::ApproveUnencrypted => {
            "Not run: `approve` must be sent in an encrypted room, so I can tell it comes from you.".into()
        }
        Refusal::ApproveSelf => "You cannot approve your own new identity: ask another allowed user to check its key with you and approve it.".into(),
        Refusal::ApproveStranger { user } => format!("{user} is not an allowed user; there is nothing to approve."),
        Refusal::ApproveReach { user, target } => {
            format!("You may not approve {user}: they may operate {target}, which you may not.")
        }
    }
}

/// Why the trust policy would not let a message act.
pub fn trust_refusal(why: &TrustRefusal) -> String {
    match why {
        TrustRefusal::IdentityChanged { user, key } => format!(
            "I won't act on commands from {user} right now: their encryption identity changed since I first saw it. \
             The new identity's key is {key}. If that is expected (a new login after a reset), another allowed user who \
             has checked this key with {user} can send `approve {user} KEY` with at least its first {} characters.",
            crate::commands::MIN_FINGERPRINT
        ),
        TrustRefusal::UnknownDevice => "I cannot tell which device sent this, so I won't act on it.".into(),
        TrustRefusal::DeviceNotCrossSigned { device } => format!(
            "I only take commands from devices their owner has verified (TRUST_POLICY=cross-signed), and {device} is not: \
             verify this session from one of your other sessions, then send the command again."
        ),
        TrustRefusal::CheckFailed(e) => {
            format!("I could not check the sender's encryption identity or device ({e}); try again.")
        }
        TrustRefusal::NotReady => "Encryption is still being set up; send the command again in a moment.".into(),
        TrustRefusal::NotChecked => "I could not check who sent this, so I won't act on it.".into(),
    }
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

/// The answer to `list`: the targets the sender may see.
pub fn list_text(targets: &[&Target]) -> String {
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
        // NB: something else moved it back before this rollout was done (a command redelivered
        // after a restart finding it already there, another controller, a person with kubectl).
        (true, State::Off | State::Stopping) => format!(
            "{} was scaled back to 0 after {secs} s, before it was up; `status {}` tells where it is now.",
            t.name, t.name
        ),
        (false, State::Running | State::Starting) => format!(
            "{} was scaled up again to {} after {secs} s, before it was off; `status {}` tells where it is now.",
            t.name, s.desired, t.name
        ),
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

/// A command that waited too long (behind a backlog, or for its key) to be run safely.
pub fn too_old(age: Duration, max_age: Duration) -> String {
    format!("not run: sent {} ago (commands older than {} are not run)", human_duration(age), human_duration(max_age))
}

/// The echo of `ECHO_MODE`, as the old bot said it.
pub fn echo(body: &str) -> String {
    format!("🦞 {body}")
}

/// A sender over `COMMANDS_PER_MINUTE`.
pub fn slow_down(per_minute: u32) -> String {
    format!("Slow down: at most {per_minute} commands a minute. Try again shortly.")
}

/// A message to the bot that is no command.
pub fn unknown_command(body: &str, help: &str) -> String {
    format!("Unknown command: {}\n{help}", body.trim())
}

/// A command naming a target that is not configured.
pub fn no_such_target(name: &str, targets: &[String]) -> String {
    format!("There is no target `{name}`. Targets: {}", targets.join(", "))
}

/// A command that must name one of several targets.
pub fn which_target(command: &str, targets: &[String]) -> String {
    format!("Which one? `{command} <target>`. Targets: {}", targets.join(", "))
}

/// An error that is the whole answer (Kubernetes not configured, the state unreadable), marked.
pub fn failure(error: &dyn std::fmt::Display) -> String {
    format!("⚠️ {error}")
}

/// `status` of one target failed.
pub fn status_failed(t: &Target, error: &dyn std::fmt::Display) -> String {
    format!("⚠️ {}: {error}", t.name)
}

/// `start <target> <replicas>` above the target's bound.
pub fn too_many_replicas(t: &Target) -> String {
    format!("{} allows at most {} replicas.", t.name, t.max_replicas)
}

/// A start that scaled the workload up; `until` says when it stops again.
pub fn starting(t: &Target, from: i32, to: i32, until: Option<&str>) -> String {
    match until {
        Some(until) => format!("{} is starting: {from} → {to} replicas, on {until}.", t.name),
        None => format!("{} is starting: {from} → {to} replicas.", t.name),
    }
}

/// A start of a workload that is on already; `until` says when it stops.
pub fn already_on(t: &Target, replicas: i32, until: Option<&str>) -> String {
    match until {
        Some(until) => format!("{} is already on ({replicas} replicas), on {until}.", t.name),
        None => format!("{} is already on ({replicas} replicas).", t.name),
    }
}

/// When a timed start stops: `until 17:42 (in 2 h)`.
pub fn until(stop_text: &str, left: Duration) -> String {
    format!("until {stop_text} (in {})", human_duration(left))
}

/// A timed start cut to the target's `max_on`.
pub fn capped(t: &Target, max_on: Duration) -> String {
    format!(" {} stays on at most {} from a chat start (max_on).", t.name, crate::calendar::duration_text(max_on))
}

/// What the schedule does next, after a command overrode it.
pub fn schedule_next(switch: Switch, at_text: &str) -> String {
    match switch {
        Switch::On => format!(" The schedule starts it again {at_text}."),
        Switch::Off => format!(" The schedule stops it {at_text}."),
    }
}

/// `extend` moved the stop.
pub fn extended(t: &Target, until: &str) -> String {
    format!("{} now stays on {until}.", t.name)
}

/// `extend` of a target that has no timed stop.
pub fn no_timed_stop(t: &Target) -> String {
    format!("{} has no timed stop; `start {} for 1h` sets one.", t.name, t.name)
}

/// The warning before a timed stop.
pub fn stop_warning(t: &Target, stop_text: &str) -> String {
    format!("{} turns off at {stop_text}; `extend {} 1h` keeps it on.", t.name, t.name)
}

/// A timed stop that ran; `from` is the count it had (None: already off, or unknown after a
/// restart); `late` says how late.
pub fn timed_stop(t: &Target, from: Option<i32>, late: &str) -> String {
    match from {
        Some(from) => {
            format!("{} is stopping: its time is up ({from} → 0 replicas; `start` brings back {from}).{late}", t.name)
        }
        None => format!("{} is off: its time is up.{late}", t.name),
    }
}

/// A switch by the schedule that changed the workload.
pub fn scheduled(t: &Target, switch: Switch, from: i32, to: i32, next: &str, late: &str) -> String {
    let verb = match switch {
        Switch::On => "starting",
        Switch::Off => "stopping",
    };
    format!("{} is {verb} on schedule: {from} → {to} replicas.{next}{late}", t.name)
}

/// A start that scaled but whose stop could not be stored.
pub fn stop_not_stored(t: &Target, error: &dyn std::fmt::Display) -> String {
    format!("⚠️ {} is on, but its stop could not be stored: {error}. Stop it by hand when it is done.", t.name)
}

/// `extend` that failed.
pub fn could_not_extend(t: &Target, error: &dyn std::fmt::Display) -> String {
    format!("⚠️ Could not extend {}: {error}", t.name)
}

/// What `status` adds for a timed stop: `; on until 17:42 (in 2 h)`.
pub fn status_until(until: &str) -> String {
    format!("; on {until}")
}

/// What `status` adds for a schedule: `; the schedule switches it off 19:00`.
pub fn status_schedule(switch: Switch, at_text: &str) -> String {
    format!("; the schedule switches it {} {at_text}", switch.as_str())
}

/// What an autoscaler beside the bridge is doing, as `status` and `check` say it.
pub fn autoscaler_status(state: &AutoscalerState) -> String {
    match state {
        AutoscalerState::Hpa { name, min, max } => {
            format!("HPA {name} scales it between {min} and {max} replicas (it rests while the workload is at 0)")
        }
        AutoscalerState::NoHpa => "no HorizontalPodAutoscaler targets it".into(),
        AutoscalerState::Keda { name, paused: Some(at), .. } => {
            format!("KEDA ScaledObject {name} is paused at {at} replicas ({KEDA_PAUSED_REPLICAS})")
        }
        AutoscalerState::Keda { name, min, max, paused: None } => {
            format!("KEDA ScaledObject {name} scales it between {min} and {max} replicas")
        }
    }
}

/// What `status` adds for an autoscaler: `; HPA web scales it between 1 and 5 replicas …`.
pub fn status_autoscaler(state: &Result<Option<AutoscalerState>, ScaleError>) -> String {
    match state {
        Ok(Some(state)) => format!("; {}", autoscaler_status(state)),
        Ok(None) => String::new(),
        Err(e) => format!("; ⚠️ its autoscaler is unreadable: {e}"),
    }
}

/// What a stop (`up` false) or start adds about the autoscaler it paused or handed back to.
pub fn autoscaler_after(state: &Result<Option<AutoscalerState>, ScaleError>, up: bool) -> String {
    match (state, up) {
        (Ok(None | Some(AutoscalerState::NoHpa)), _) => String::new(),
        (Ok(Some(AutoscalerState::Hpa { name, .. })), false) => {
            format!(" HPA {name} rests while it is at 0 (an HPA does not scale from zero); `start` hands it back.")
        }
        (Ok(Some(AutoscalerState::Hpa { name, min, max })), true) => {
            format!(" HPA {name} scales it from here ({min}–{max} replicas).")
        }
        (Ok(Some(AutoscalerState::Keda { name, .. })), false) => {
            format!(" KEDA ScaledObject {name} is paused at 0 so it does not scale it back up; `start` resumes it.")
        }
        (Ok(Some(AutoscalerState::Keda { name, min, max, .. })), true) => {
            format!(" KEDA ScaledObject {name} is resumed and scales it from here ({min}–{max} replicas).")
        }
        (Err(e), _) => format!(" ⚠️ Its autoscaler is unreadable: {e}."),
    }
}

/// What `status` adds when the timers could not be read.
pub fn status_timers_unreadable(error: &dyn std::fmt::Display) -> String {
    format!("; ⚠️ timers unreadable: {error}")
}

/// The answer to `history`: one line per action, newest first, with times as `when` names them.
pub fn history_text(actions: &[crate::store::Action], when: impl Fn(i64) -> String) -> String {
    if actions.is_empty() {
        return "Nothing done yet.".into();
    }
    let mut out = String::from("Last actions, newest first:");
    for a in actions {
        out.push_str(&format!("\n• {} {}: {} by {}: {}", when(a.at_ms), a.target, a.what, a.actor, a.outcome));
    }
    out
}

/// How a scale ended, for `history`.
pub fn change_outcome(change: &Result<crate::scaler::Change, crate::scaler::ScaleError>) -> String {
    match change {
        Ok(crate::scaler::Change::Scaled { from, to }) => format!("{from} → {to} replicas"),
        Ok(crate::scaler::Change::Unchanged { replicas }) => format!("no change ({replicas} replicas)"),
        Err(e) => format!("failed: {e}"),
    }
}

/// A change of `t`'s replicas that this bridge did not make.
pub fn drift(t: &Target, d: &crate::drift::Drift, at: Option<&str>) -> String {
    let who = d.manager.as_deref().unwrap_or("someone else");
    let at = at.map(|a| format!(" at {a}")).unwrap_or_default();
    format!("⚠️ {} was scaled {} → {} by {who}{at}, not by this bot.", t.name, d.from, d.to)
}

/// The note of the Kubernetes Event for a scale asked for in chat.
pub fn audit_by(to: i32, sender: &UserId) -> String {
    format!("Scaled to {to} by {sender} via Matrix")
}

/// The note of the Kubernetes Event for a scale by a timer.
pub fn audit_by_timer(to: i32, scheduled: bool) -> String {
    if scheduled {
        format!("Scaled to {to} by the schedule in matrix-k8s-toggle's configuration")
    } else {
        format!("Scaled to {to}: the time of a timed start via Matrix was up")
    }
}

/// How late a timer ran: nothing when on time.
pub fn late(by: Duration, due_text: &str) -> String {
    if by < Duration::from_secs(60) {
        return String::new();
    }
    format!(" ({} late: I was not running at {due_text}.)", human_duration(by))
}

/// A timer whose scale failed; it is tried again.
pub fn timer_failed(t: &Target, verb: &str, error: &dyn std::fmt::Display) -> String {
    format!("⚠️ Could not {verb} {} on time: {error}. I try again every minute.", t.name)
}

/// A stop that scaled the workload to zero.
pub fn stopping(t: &Target, from: i32) -> String {
    format!("{} is stopping: {from} → 0 replicas (`start` brings back {from}).", t.name)
}

/// A stop of a workload that is off already.
pub fn already_off(t: &Target) -> String {
    format!("{} is already off.", t.name)
}

/// A start or stop (`verb`) that failed.
pub fn could_not(verb: &str, t: &Target, error: &dyn std::fmt::Display) -> String {
    format!("⚠️ Could not {verb} {}: {error}", t.name)
}

/// Said while a Kubernetes call takes longer than `SLOW_NOTICE_SECS`.
pub const STILL_TRYING: &str = "Kubernetes is slow to answer; still trying…";

/// A rollout that could not be followed.
pub fn could_not_follow(t: &Target, error: &dyn std::fmt::Display) -> String {
    format!("⚠️ Could not follow {}: {error}", t.name)
}

/// Instead of a rollout's report, when a later command from another room took over the target.
pub fn taken_over(t: &Target, up: bool) -> String {
    let what = if up { "start" } else { "stop" };
    format!(
        "{}: a later command in another room changed it before this {what} was done; `status {}` tells where it is now.",
        t.name, t.name
    )
}

/// To an allowed sender whose message could not be decrypted.
pub fn undecryptable(sender: &UserId) -> String {
    format!(
        "{sender}: I could not decrypt your message. This can happen when your client did not share its key with me (for example while I was restarting). Please send your command again."
    )
}

/// How an `approve` of `user`'s identity, quoting `quoted`, ended.
pub fn approval(user: &UserId, quoted: &str, outcome: &Result<Approval, CryptoError>) -> String {
    match outcome {
        Ok(Approval::Approved) => format!("Approved {user}'s new encryption identity; their commands work again."),
        Ok(Approval::NothingToApprove) => format!("{user} has no changed identity to approve."),
        Ok(Approval::KeyMismatch { key }) => format!(
            "Not approved: {quoted} is not the start of {user}'s new identity key, which is {key}. Check it with them again."
        ),
        Err(e) => format!("⚠️ Could not approve {user}: {e}"),
    }
}

/// `approve` before encryption is set up.
pub const ENCRYPTION_NOT_READY: &str = "Encryption is still being set up; try again in a moment.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_identity_is_refused_with_its_key_and_how_to_approve_it() {
        let user = ruma::user_id!("@alice:x.org").to_owned();
        let text = trust_refusal(&TrustRefusal::IdentityChanged { user, key: "Xk3d 9aQ2 Lm".into() });
        assert!(text.contains("their encryption identity changed"), "{text}");
        assert!(text.contains("The new identity's key is Xk3d 9aQ2 Lm."), "{text}");
        assert!(text.contains("`approve @alice:x.org KEY` with at least its first 8 characters"), "{text}");
    }

    #[test]
    fn every_refusal_names_what_to_do_or_why() {
        let sender = ruma::user_id!("@bob:x.org");
        let plaintext = refusal(&Refusal::Plaintext { encrypted_room: true }, sender);
        assert!(plaintext.contains("encryption turned on") && plaintext.contains(ONCE_AN_HOUR), "{plaintext}");
        let required = refusal(&Refusal::Plaintext { encrypted_room: false }, sender);
        assert!(required.contains("REQUIRE_ENCRYPTION=true"), "{required}");
        let viewer = refusal(&Refusal::ViewOnly { command: "stop" }, sender);
        assert!(viewer.contains("`stop` needs ALLOWED_USERS"), "{viewer}");
        let stranger = refusal(&Refusal::Stranger, sender);
        assert!(stranger.contains("@bob:x.org") && stranger.contains("ALLOWED_USERS"), "{stranger}");
    }
}
