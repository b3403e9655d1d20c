//! Who may do what, decided in one place: [`authorize`] takes the sender, the command, its
//! targets, the room and how the event was verified, and returns the targets it may act on or
//! a typed [`Refusal`]. Also the user patterns it matches, and the per-user rate limit.

use std::{fmt, str::FromStr};

use ruma::{OwnedServerName, OwnedUserId, ServerName, UserId};
use serde::{Deserialize, Deserializer};

use crate::{
    commands::{Command, Permission},
    config::{Config, Target},
};

/// One `ALLOWED_USERS` entry: a full user id, or `@*:domain` for everyone on a server.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum UserPattern {
    /// Exactly this user.
    User(OwnedUserId),
    /// Every user on this server.
    Domain(OwnedServerName),
}

impl UserPattern {
    /// Whether `user` matches this pattern.
    pub fn matches(&self, user: &UserId) -> bool {
        match self {
            UserPattern::User(u) => u == user,
            UserPattern::Domain(d) => user.server_name() == d,
        }
    }
}

impl FromStr for UserPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(domain) = s.strip_prefix("@*:") {
            return ServerName::parse(domain)
                .map(UserPattern::Domain)
                .map_err(|e| format!("{s:?}: {domain:?} is not a valid server name ({e})"));
        }
        UserId::parse(s)
            .map(UserPattern::User)
            .map_err(|e| format!("{s:?} is not a full user id like @alice:example.org or @*:example.org ({e})"))
    }
}

impl fmt::Display for UserPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserPattern::User(u) => write!(f, "{u}"),
            UserPattern::Domain(d) => write!(f, "@*:{d}"),
        }
    }
}

impl fmt::Debug for UserPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl<'de> Deserialize<'de> for UserPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A list of user patterns; a user is allowed when any pattern matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList(pub Vec<UserPattern>);

impl AllowList {
    /// Parses a comma- (or whitespace-) separated list such as `ALLOWED_USERS`.
    pub fn parse_list(s: &str) -> Result<Self, String> {
        s.split([',', ' ', '\n', '\t'])
            .filter(|p| !p.trim().is_empty())
            .map(str::parse)
            .collect::<Result<Vec<_>, _>>()
            .map(AllowList)
    }

    /// Whether `user` matches any entry.
    pub fn allows(&self, user: &UserId) -> bool {
        self.0.iter().any(|p| p.matches(user))
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Commands per user per minute; a sliding window over the arrival times (ms).
#[derive(Debug, Default)]
pub struct RateLimiter {
    per_minute: u32,
    seen: std::sync::Mutex<std::collections::HashMap<OwnedUserId, std::collections::VecDeque<i64>>>,
}

impl RateLimiter {
    /// A limiter allowing `per_minute` commands per user (0 = no limit).
    pub fn new(per_minute: u32) -> Self {
        RateLimiter { per_minute, seen: Default::default() }
    }

    /// The configured limit.
    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Whether `user` may run a command arriving at `now_ms`; counts it when so.
    pub fn allow(&self, user: &UserId, now_ms: i64) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let times = seen.entry(user.to_owned()).or_default();
        while times.front().is_some_and(|t| now_ms - t >= 60_000) {
            times.pop_front();
        }
        if times.len() >= self.per_minute as usize {
            return false;
        }
        times.push_back(now_ms);
        true
    }
}

/// Why the trust policy refuses an encrypted event's device or sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustRefusal {
    /// The sender's cross-signing identity differs from the one pinned on first sight.
    IdentityChanged {
        /// The sender.
        user: OwnedUserId,
        /// The new identity's key, in groups of four.
        key: String,
    },
    /// The device that sent it is not known.
    UnknownDevice,
    /// Under `cross-signed`: the device is not signed by its owner's identity.
    DeviceNotCrossSigned {
        /// The device.
        device: ruma::OwnedDeviceId,
    },
    /// The crypto store could not answer.
    CheckFailed(String),
    /// Encryption is still being set up.
    NotReady,
    /// The sender is someone the bot does not work for, so the policy was not asked.
    NotChecked,
}

/// How the event carrying a command was verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// Not encrypted: nothing proves who sent it.
    Plaintext,
    /// Decrypted, from a device and identity the trust policy accepts.
    Trusted,
    /// Decrypted, but the trust policy refuses the device or identity.
    Untrusted(TrustRefusal),
}

/// What a message asks, as [`authorize`] sees it.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Who sent it (for an encrypted event, as the crypto proved it).
    pub sender: &'a UserId,
    /// The command; `None` for a message to the bot that is no command (answered with help or
    /// its usage).
    pub command: Option<&'a Command>,
    /// The targets the command names (all of them for `status` without one); empty when it
    /// names none that exists.
    pub targets: Vec<&'a Target>,
    /// Whether the room is encrypted, from the room state the bridge tracks.
    pub room_encrypted: bool,
    /// How the event was verified.
    pub verified: Verified,
}

/// Why a message may not be acted on. The reply is made from it (`replies::refusal`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The sender is in neither `ALLOWED_USERS` nor `VIEWERS`.
    Stranger,
    /// Unencrypted where only encrypted commands count.
    Plaintext {
        /// Whether the room is encrypted (else `REQUIRE_ENCRYPTION` refused it).
        encrypted_room: bool,
    },
    /// The trust policy refuses the sending device or identity.
    Untrusted(TrustRefusal),
    /// A viewer asked for a command that changes something.
    ViewOnly {
        /// The command's name.
        command: &'static str,
    },
    /// The sender may not act on any of the targets named.
    Target {
        /// What the command needed.
        permission: Permission,
    },
    /// `approve` came unencrypted.
    ApproveUnencrypted,
    /// `approve` of one's own identity.
    ApproveSelf,
    /// `approve` of someone who is not an allowed user.
    ApproveStranger {
        /// The user named.
        user: OwnedUserId,
    },
    /// `approve` of someone who may operate a target the approver may not.
    ApproveReach {
        /// The user named.
        user: OwnedUserId,
        /// The target the approver may not operate.
        target: String,
    },
}

impl Refusal {
    /// The metric `kind` this refusal is counted under.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Stranger => "not_allowed",
            Refusal::Plaintext { .. } => "plaintext_command",
            Refusal::Untrusted(_) => "untrusted_device",
            Refusal::ViewOnly { .. } | Refusal::Target { .. } => "not_permitted",
            Refusal::ApproveUnencrypted
            | Refusal::ApproveSelf
            | Refusal::ApproveStranger { .. }
            | Refusal::ApproveReach { .. } => "approve_refused",
        }
    }
}

/// What an authorized command may act on: the named targets the sender may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized<'a> {
    /// The targets, in the configuration's order.
    pub targets: Vec<&'a Target>,
}

/// Whether `user` is someone the bot works for at all: in `ALLOWED_USERS` or `VIEWERS`.
pub fn is_known(config: &Config, user: &UserId) -> bool {
    config.allowed_users.allows(user)
        || config.viewers.allows(user)
        || config.targets.iter().any(|t| t.viewers.as_ref().is_some_and(|v| v.allows(user)))
}

/// Whether `user` may invite the bot into a room: only those who may operate something.
pub fn may_invite(config: &Config, user: &UserId) -> bool {
    config.allowed_users.allows(user)
}

/// Whether `user` may start and stop `target`: in `ALLOWED_USERS`, narrowed by the target's
/// `allowed_users`.
pub fn may_operate(config: &Config, target: &Target, user: &UserId) -> bool {
    config.allowed_users.allows(user) && target.allowed_users.as_ref().is_none_or(|l| l.allows(user))
}

/// Whether `user` may see `target` (`status`, `list`): who may operate it, and its viewers
/// (the target's own `viewers`, else `VIEWERS`).
pub fn may_view(config: &Config, target: &Target, user: &UserId) -> bool {
    may_operate(config, target, user) || target.viewers.as_ref().unwrap_or(&config.viewers).allows(user)
}

/// Decides whether a message may be acted on: who sent it, how that is proved, what it asks
/// for and on which targets. The one place that decides who may do what.
pub fn authorize<'a>(config: &'a Config, request: Request<'a>) -> Result<Authorized<'a>, Refusal> {
    let sender = request.sender;
    if !is_known(config, sender) {
        return Err(Refusal::Stranger);
    }
    match &request.verified {
        Verified::Plaintext if request.room_encrypted || config.require_encryption => {
            return Err(Refusal::Plaintext { encrypted_room: request.room_encrypted });
        }
        Verified::Untrusted(why) => return Err(Refusal::Untrusted(why.clone())),
        Verified::Plaintext | Verified::Trusted => {}
    }
    let Some(command) = request.command else {
        return Ok(Authorized { targets: Vec::new() });
    };
    let permission = command.permission();
    if permission == Permission::Operate && !config.allowed_users.allows(sender) {
        return Err(Refusal::ViewOnly { command: command.name() });
    }
    if let Command::Approve { user, .. } = command {
        authorize_approval(config, sender, user, &request.verified)?;
    }
    let permitted: Vec<&Target> = request
        .targets
        .iter()
        .copied()
        .filter(|t| match permission {
            Permission::Operate => may_operate(config, t, sender),
            Permission::Query => may_view(config, t, sender),
        })
        .collect();
    if !request.targets.is_empty() && permitted.is_empty() {
        return Err(Refusal::Target { permission });
    }
    Ok(Authorized { targets: permitted })
}

/// `approve`: only another allowed user, in an encrypted message, who may operate every target
/// the approved user may.
fn authorize_approval(config: &Config, approver: &UserId, user: &UserId, verified: &Verified) -> Result<(), Refusal> {
    if *verified != Verified::Trusted {
        return Err(Refusal::ApproveUnencrypted);
    }
    if user == approver {
        return Err(Refusal::ApproveSelf);
    }
    if !config.allowed_users.allows(user) {
        return Err(Refusal::ApproveStranger { user: user.to_owned() });
    }
    if let Some(t) = config.targets.iter().find(|t| may_operate(config, t, user) && !may_operate(config, t, approver)) {
        return Err(Refusal::ApproveReach { user: user.to_owned(), target: t.name.clone() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> OwnedUserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn an_exact_entry_allows_only_that_user() {
        let list = AllowList::parse_list("@alice:example.org").unwrap();
        assert!(list.allows(&user("@alice:example.org")));
        assert!(!list.allows(&user("@alice:evil.org")));
        assert!(!list.allows(&user("@bob:example.org")));
    }

    #[test]
    fn a_domain_entry_allows_everyone_on_that_server_only() {
        let list = AllowList::parse_list("@*:example.org").unwrap();
        assert!(list.allows(&user("@bob:example.org")));
        assert!(!list.allows(&user("@bob:example.org.evil")));
        assert!(!list.allows(&user("@bob:evil.org")));
    }

    #[test]
    fn a_list_accepts_commas_and_spaces() {
        let list = AllowList::parse_list(" @a:x.org, @b:y.org ,@*:z.org").unwrap();
        assert_eq!(list.0.len(), 3);
    }

    #[test]
    fn the_rate_limit_counts_per_user_over_a_sliding_minute() {
        let limiter = RateLimiter::new(2);
        let (a, b) = (user("@a:x.org"), user("@b:x.org"));
        assert!(limiter.allow(&a, 0));
        assert!(limiter.allow(&a, 1_000));
        assert!(!limiter.allow(&a, 2_000));
        assert!(limiter.allow(&b, 2_000), "another user has their own budget");
        assert!(limiter.allow(&a, 60_000), "the first command left the window");
        assert!(!limiter.allow(&a, 60_500));
    }

    #[test]
    fn a_zero_rate_limit_allows_everything() {
        let limiter = RateLimiter::new(0);
        assert!((0..1000).all(|i| limiter.allow(&user("@a:x.org"), i)));
    }

    mod authorize {
        use super::super::*;
        use crate::config::testing;

        /// alice operates everything; bob operates web only; vic views everything; wes views web
        /// only; db is for alice and vic.
        fn config(env: &[(&str, &str)]) -> Config {
            testing::config(
                "allowed_users: ['@alice:x.org', '@bob:x.org']\n\
                 viewers: ['@vic:x.org']\n\
                 targets:\n\
                 \x20 - name: web\n\
                 \x20   viewers: ['@vic:x.org', '@wes:x.org']\n\
                 \x20 - name: db\n\
                 \x20   allowed_users: ['@alice:x.org']\n",
                env,
            )
        }

        fn user(s: &str) -> OwnedUserId {
            UserId::parse(s).unwrap()
        }

        fn ask<'a>(
            config: &'a Config,
            sender: &'a UserId,
            command: &'a Command,
            verified: Verified,
            room_encrypted: bool,
        ) -> Result<Vec<&'a str>, Refusal> {
            let targets = match command {
                Command::Help | Command::Approve { .. } => Vec::new(),
                _ => match command.target() {
                    Some(name) => vec![config.target(name).unwrap()],
                    None => config.targets.iter().collect(),
                },
            };
            let request = Request { sender, command: Some(command), targets, room_encrypted, verified };
            authorize(config, request).map(|a| a.targets.iter().map(|t| t.name.as_str()).collect())
        }

        fn stop(target: &str) -> Command {
            Command::Stop { target: Some(target.into()) }
        }

        fn approve(who: &str) -> Command {
            Command::Approve { user: user(who), fingerprint: "Xk3d9aQ2".into() }
        }

        #[test]
        fn who_may_do_what_follows_the_allow_lists_viewers_and_targets() {
            let c = config(&[]);
            let status = Command::Status { target: None };
            let (alice, bob, vic, wes, eve) =
                (user("@alice:x.org"), user("@bob:x.org"), user("@vic:x.org"), user("@wes:x.org"), user("@eve:x.org"));
            let t = Verified::Trusted;
            assert_eq!(ask(&c, &alice, &stop("db"), t.clone(), true), Ok(vec!["db"]));
            assert_eq!(ask(&c, &bob, &stop("web"), t.clone(), true), Ok(vec!["web"]));
            assert_eq!(
                ask(&c, &bob, &stop("db"), t.clone(), true),
                Err(Refusal::Target { permission: Permission::Operate })
            );
            assert_eq!(ask(&c, &bob, &status, t.clone(), true), Ok(vec!["web"]), "bob sees only what he operates");
            assert_eq!(
                ask(&c, &vic, &status, t.clone(), true),
                Ok(vec!["web", "db"]),
                "db has no viewers of its own: VIEWERS"
            );
            assert_eq!(ask(&c, &wes, &status, t.clone(), true), Ok(vec!["web"]));
            assert_eq!(ask(&c, &wes, &Command::List, t.clone(), true), Ok(vec!["web"]));
            assert_eq!(ask(&c, &vic, &Command::Help, t.clone(), true), Ok(vec![]));
            assert_eq!(ask(&c, &vic, &stop("web"), t.clone(), true), Err(Refusal::ViewOnly { command: "stop" }));
            assert_eq!(ask(&c, &eve, &status, t.clone(), true), Err(Refusal::Stranger));
            assert_eq!(ask(&c, &eve, &Command::Help, t, true), Err(Refusal::Stranger));
        }

        #[test]
        fn plaintext_counts_only_in_unencrypted_rooms_and_not_with_require_encryption() {
            let alice = user("@alice:x.org");
            let c = config(&[]);
            assert_eq!(ask(&c, &alice, &stop("web"), Verified::Plaintext, false), Ok(vec!["web"]));
            assert_eq!(
                ask(&c, &alice, &stop("web"), Verified::Plaintext, true),
                Err(Refusal::Plaintext { encrypted_room: true })
            );
            let strict = config(&[("REQUIRE_ENCRYPTION", "true")]);
            assert_eq!(
                ask(&strict, &alice, &Command::Help, Verified::Plaintext, false),
                Err(Refusal::Plaintext { encrypted_room: false })
            );
            assert_eq!(ask(&strict, &alice, &stop("web"), Verified::Trusted, false), Ok(vec!["web"]));
        }

        #[test]
        fn an_untrusted_or_unchecked_device_is_refused_whatever_it_asks() {
            let c = config(&[]);
            let alice = user("@alice:x.org");
            let changed = TrustRefusal::IdentityChanged { user: alice.clone(), key: "Xk3d 9aQ2".into() };
            let refused = ask(&c, &alice, &Command::Help, Verified::Untrusted(changed.clone()), true);
            assert_eq!(refused, Err(Refusal::Untrusted(changed)));
            let unchecked = ask(&c, &alice, &Command::Help, Verified::Untrusted(TrustRefusal::NotChecked), true);
            assert_eq!(unchecked, Err(Refusal::Untrusted(TrustRefusal::NotChecked)));
        }

        #[test]
        fn approve_needs_encryption_another_allowed_user_and_as_much_reach() {
            let c = config(&[]);
            let (alice, bob, vic) = (user("@alice:x.org"), user("@bob:x.org"), user("@vic:x.org"));
            let t = Verified::Trusted;
            assert_eq!(ask(&c, &alice, &approve("@bob:x.org"), t.clone(), true), Ok(vec![]));
            assert_eq!(
                ask(&c, &bob, &approve("@alice:x.org"), t.clone(), true),
                Err(Refusal::ApproveReach { user: alice.clone(), target: "db".into() })
            );
            assert_eq!(ask(&c, &alice, &approve("@alice:x.org"), t.clone(), true), Err(Refusal::ApproveSelf));
            assert_eq!(
                ask(&c, &alice, &approve("@vic:x.org"), t.clone(), true),
                Err(Refusal::ApproveStranger { user: vic.clone() })
            );
            assert_eq!(
                ask(&c, &vic, &approve("@bob:x.org"), t.clone(), true),
                Err(Refusal::ViewOnly { command: "approve" })
            );
            assert_eq!(
                ask(&c, &alice, &approve("@bob:x.org"), Verified::Plaintext, false),
                Err(Refusal::ApproveUnencrypted)
            );
        }
    }

    #[test]
    fn a_bare_localpart_is_refused_with_an_example() {
        let err = AllowList::parse_list("alice").unwrap_err();
        assert!(err.contains("@alice:example.org"), "{err}");
    }
}
