//! Chat commands, pure: parse a message into a [`Command`], the help text, and the permission
//! each command needs. Nothing here knows Matrix or Kubernetes.

use std::{fmt, time::Duration};

use ruma::{OwnedUserId, UserId};

use crate::calendar::{self, LONGEST_TIMED_START, TimeOfDay};

/// What a command needs the sender to be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Read state: `status`, `list`, `help`.
    Query,
    /// Change state: `start`, `stop`.
    Operate,
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Scale a target up: to `replicas`, else to what it had before it was stopped.
    Start {
        /// The target (the only one when absent).
        target: Option<String>,
        /// Explicit replica count.
        replicas: Option<i32>,
        /// How long it stays on (`for 2h`, `until 18:00`); the target's `max_on` when absent.
        on_for: Option<OnFor>,
    },
    /// Move a timed start's stop later.
    Extend {
        /// The target (the only one when absent).
        target: Option<String>,
        /// How much later.
        by: Duration,
    },
    /// Scale a target to zero, remembering its replica count.
    Stop {
        /// The target (the only one when absent).
        target: Option<String>,
    },
    /// Show the state of one target, or of all.
    Status {
        /// The target (all when absent).
        target: Option<String>,
    },
    /// Show the last actions on one target, or on all.
    History {
        /// The target (all when absent).
        target: Option<String>,
    },
    /// Accept a user's changed encryption identity, naming the start of its key.
    Approve {
        /// The user whose identity to accept.
        user: OwnedUserId,
        /// The start of the new identity's master key (unpadded base64), as typed; at least
        /// [`MIN_FINGERPRINT`] characters.
        fingerprint: String,
    },
    /// List the targets.
    List,
    /// Show the commands.
    Help,
}

impl Command {
    /// The permission this command needs.
    pub fn permission(&self) -> Permission {
        self.spec().permission
    }

    /// The target the command names, if any.
    pub fn target(&self) -> Option<&str> {
        match self {
            Command::Start { target, .. }
            | Command::Extend { target, .. }
            | Command::Stop { target }
            | Command::Status { target }
            | Command::History { target } => target.as_deref(),
            Command::List | Command::Help | Command::Approve { .. } => None,
        }
    }

    /// The command's name, as metrics and logs show it.
    pub fn name(&self) -> &'static str {
        self.spec().name
    }

    fn spec(&self) -> &'static CommandSpec {
        let name = match self {
            Command::Start { .. } => "start",
            Command::Extend { .. } => "extend",
            Command::Stop { .. } => "stop",
            Command::Status { .. } => "status",
            Command::History { .. } => "history",
            Command::Approve { .. } => "approve",
            Command::List => "list",
            Command::Help => "help",
        };
        COMMANDS.iter().find(|c| c.name == name).expect("every command has a spec")
    }
}

/// How long a `start` keeps a target on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFor {
    /// `for 2h`: this long from when the command runs.
    For(Duration),
    /// `until 18:00`, `until tomorrow 9:00`: until that time of day, in the configured zone.
    Until {
        /// The time of day.
        at: TimeOfDay,
        /// Tomorrow's, even if today's has not passed.
        tomorrow: bool,
    },
}

impl fmt::Display for OnFor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OnFor::For(d) => write!(f, "for {}", calendar::duration_text(*d)),
            OnFor::Until { at, tomorrow: true } => write!(f, "until tomorrow {at}"),
            OnFor::Until { at, tomorrow: false } => write!(f, "until {at}"),
        }
    }
}

/// One command's name, aliases, arguments, help and permission, in one place.
#[derive(Debug)]
pub struct CommandSpec {
    /// The name.
    pub name: &'static str,
    /// Other words for it.
    pub aliases: &'static [&'static str],
    /// Argument synopsis.
    pub args: &'static str,
    /// One line of help.
    pub help: &'static str,
    /// What the sender must be allowed to do.
    pub permission: Permission,
}

/// Every command.
pub const COMMANDS: &[CommandSpec] = &[
    CommandSpec {
        name: "start",
        aliases: &["on"],
        args: "[target] [replicas] [for 2h | until 18:00 | until tomorrow 9:00]",
        help: "scale up, to the replica count it had before it was stopped (1 if unknown); with `for` or `until`, stop it again then",
        permission: Permission::Operate,
    },
    CommandSpec {
        name: "extend",
        aliases: &[],
        args: "[target] <duration>",
        help: "keep a timed start on longer, e.g. `extend web 1h`",
        permission: Permission::Operate,
    },
    CommandSpec {
        name: "stop",
        aliases: &["off"],
        args: "[target]",
        help: "scale to 0, remembering the replica count (and cancel a timed stop)",
        permission: Permission::Operate,
    },
    CommandSpec {
        name: "status",
        aliases: &[],
        args: "[target]",
        help: "show state and replica counts (all targets when none is named)",
        permission: Permission::Query,
    },
    CommandSpec {
        name: "history",
        aliases: &[],
        args: "[target]",
        help: "who started and stopped what, and when: the last 10 actions",
        permission: Permission::Query,
    },
    CommandSpec { name: "list", aliases: &[], args: "", help: "list the targets", permission: Permission::Query },
    CommandSpec {
        name: "approve",
        aliases: &[],
        args: "<@user:server> <key>",
        help: "accept a user's new encryption identity after checking it with them; <key>: at least the first 8 characters of the key my refusal showed",
        permission: Permission::Operate,
    },
    CommandSpec { name: "help", aliases: &[], args: "", help: "show this help", permission: Permission::Query },
];

/// The result of reading a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A command.
    Command(Command),
    /// A known command with wrong arguments; the message says what is wrong.
    Invalid(String),
    /// Not a command (chatter, or an unknown word).
    NotACommand,
}

/// Where the message was said: in a DM every message is for the bot; in a group room only
/// what is addressed to it (`!toggle stop`, a mention, `toggle: stop`), unless bare commands
/// are allowed there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressed {
    /// A DM (the bot and one person): every message is for the bot.
    ToBot,
    /// A group room: only messages addressed to the bot are commands; a bare `stop` said to a
    /// colleague is chatter.
    ToRoom,
    /// A group room where a bare known command counts too (`BARE_COMMANDS=always`, the old
    /// bot's behaviour); a known word followed by a sentence is still chatter.
    ToRoomBare,
}

/// Names the bot answers to when a message starts with them.
#[derive(Debug, Clone)]
pub struct BotNames {
    names: Vec<String>,
}

/// The command prefix that addresses the bot in any room.
pub const PREFIX: &str = "!toggle";

impl BotNames {
    /// The bot's user id, its localpart and its display name.
    pub fn new(user_id: &str, display_name: &str) -> Self {
        let localpart = user_id.trim_start_matches('@').split(':').next().unwrap_or_default();
        let mut names: Vec<String> = [PREFIX, user_id, localpart, display_name]
            .iter()
            .map(|n| normalize(n).to_lowercase())
            .filter(|n| !n.is_empty())
            .collect();
        // Longest first, so "@toggle:x" is stripped before "toggle".
        names.sort_by_key(|n| std::cmp::Reverse(n.len()));
        names.dedup();
        BotNames { names }
    }

    /// Strips a leading address (`!toggle`, `@toggle:hs:`, `Toggle,` …); returns the rest and
    /// whether an address was found.
    fn strip<'a>(&self, text: &'a str) -> (&'a str, bool) {
        for name in &self.names {
            if let Some(rest) = text.strip_prefix(name.as_str()) {
                let rest_trimmed = rest.trim_start_matches([':', ',']).trim_start();
                if rest.is_empty() || rest.starts_with([':', ',', ' ']) {
                    return (rest_trimmed, true);
                }
            }
        }
        (text, false)
    }
}

/// Drops invisible and bidi control characters and collapses whitespace. Case is kept: commands
/// are read case-insensitively, but the user id in `approve` is not changed.
pub fn normalize(text: &str) -> String {
    let cleaned: String =
        text.chars().filter(|c| !is_invisible(*c)).map(|c| if c.is_whitespace() { ' ' } else { c }).collect();
    cleaned.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{2069}' | '\u{FEFF}' | '\u{00AD}' | '\u{061C}')
        || (c.is_control() && !c.is_whitespace())
}

/// Reads a message. `mentioned` is true when the event's `m.mentions` names the bot.
pub fn parse(text: &str, names: &BotNames, addressed: Addressed, mentioned: bool) -> Parsed {
    read(text, names, addressed, mentioned).0
}

/// Reads a message; also says whether it was meant for the bot (a DM, a mention or an
/// address), so callers stay silent about doubtful commands that were not.
pub fn read(text: &str, names: &BotNames, addressed: Addressed, mentioned: bool) -> (Parsed, bool) {
    let text = normalize(text);
    let lowered = text.to_lowercase();
    let (rest, prefixed) = names.strip(&lowered);
    let to_bot = prefixed || mentioned || addressed == Addressed::ToBot;
    if !to_bot && addressed == Addressed::ToRoom {
        return (Parsed::NotACommand, false);
    }
    let mut parsed = parse_words(rest, to_bot);
    // NB: older user ids may hold capitals, and a key is base64: keep both as typed. They are
    // the last words; lower-casing neither adds nor removes spaces.
    if let Parsed::Command(Command::Approve { user, fingerprint }) = &mut parsed {
        let words = rest.split(' ').filter(|w| !w.is_empty()).count().saturating_sub(1);
        let typed: Vec<&str> = text.split(' ').collect();
        let args = &typed[typed.len().saturating_sub(words)..];
        if let Some((typed_user, typed_key)) = args.split_first() {
            if typed_user.to_lowercase() == user.as_str()
                && let Ok(typed) = UserId::parse(*typed_user)
            {
                *user = typed;
            }
            let typed_key = typed_key.concat();
            if typed_key.to_lowercase() == *fingerprint {
                *fingerprint = typed_key;
            }
        }
    }
    (parsed, to_bot)
}

/// The fewest characters of a new identity's key that `approve` must quote.
pub const MIN_FINGERPRINT: usize = 8;

fn parse_words(rest: &str, to_bot: bool) -> Parsed {
    let mut words = rest.split(' ').filter(|w| !w.is_empty());
    let Some(verb) = words.next() else {
        return if to_bot { Parsed::Command(Command::Help) } else { Parsed::NotACommand };
    };
    let args: Vec<&str> = words.collect();
    let Some(spec) = COMMANDS.iter().find(|c| c.name == verb || c.aliases.contains(&verb)) else {
        return Parsed::NotACommand;
    };
    // NB: in a group room, a known verb followed by a sentence is chatter ("stop the music"),
    // unless the bot was addressed.
    let result = build(spec.name, &args);
    match result {
        Parsed::Invalid(_) if !to_bot => Parsed::NotACommand,
        other => other,
    }
}

fn build(name: &str, args: &[&str]) -> Parsed {
    let too_many = |max: usize| args.len() > max;
    match name {
        "start" => {
            let usage = "usage: start [target] [replicas] [for 2h | until 18:00]";
            let split = args.iter().position(|w| *w == "for" || *w == "until").unwrap_or(args.len());
            let (head, tail) = args.split_at(split);
            if head.len() > 2 {
                return Parsed::Invalid(usage.into());
            }
            let (target, replicas) = match head {
                [] => (None, None),
                [one] if one.chars().all(|c| c.is_ascii_digit() || c == '-') => (None, Some(*one)),
                [one] => (Some(*one), None),
                [t, r] => (Some(*t), Some(*r)),
                _ => unreachable!("checked above"),
            };
            let replicas = match replicas.map(str::parse::<i32>) {
                None => None,
                Some(Ok(n)) if n >= 1 => Some(n),
                Some(Ok(_)) => {
                    return Parsed::Invalid("replicas must be at least 1; use `stop` to scale to 0".into());
                }
                Some(Err(_)) => {
                    return Parsed::Invalid("replicas must be a whole number, e.g. `start web 2`".into());
                }
            };
            let on_for = match tail {
                [] => None,
                ["for", d] => match timed_duration(d) {
                    Ok(d) => Some(OnFor::For(d)),
                    Err(why) => return Parsed::Invalid(why),
                },
                ["until", "tomorrow", t] | ["until", t] => match TimeOfDay::parse(t) {
                    Ok(at) => Some(OnFor::Until { at, tomorrow: tail.len() == 3 }),
                    Err(why) => return Parsed::Invalid(why),
                },
                _ => return Parsed::Invalid(usage.into()),
            };
            Parsed::Command(Command::Start { target: target.map(str::to_owned), replicas, on_for })
        }
        "extend" => {
            let (target, by) = match args {
                [d] => (None, d),
                [t, d] => (Some(*t), d),
                _ => return Parsed::Invalid("usage: extend [target] <duration>, e.g. `extend web 1h`".into()),
            };
            match timed_duration(by) {
                Ok(by) => Parsed::Command(Command::Extend { target: target.map(str::to_owned), by }),
                Err(why) => Parsed::Invalid(why),
            }
        }
        "stop" | "status" | "history" => {
            if too_many(1) {
                return Parsed::Invalid(format!("usage: {name} [target]"));
            }
            let target = args.first().map(|s| (*s).to_owned());
            Parsed::Command(match name {
                "stop" => Command::Stop { target },
                "status" => Command::Status { target },
                _ => Command::History { target },
            })
        }
        "approve" => match args {
            [user, key @ ..] if user.starts_with('@') && user.contains(':') => {
                let Ok(user) = UserId::parse(*user) else {
                    return Parsed::Invalid(format!(
                        "`{user}` is not a valid user id; usage: approve @user:server KEY"
                    ));
                };
                // NB: the key may be typed in groups, as the refusal shows it.
                let fingerprint = key.concat();
                let base64 = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '/';
                if fingerprint.chars().count() < MIN_FINGERPRINT || !fingerprint.chars().all(base64) {
                    return Parsed::Invalid(format!(
                        "usage: approve {user} KEY, where KEY is at least the first {MIN_FINGERPRINT} characters of the new identity key my refusal showed (check it with {user} first)"
                    ));
                }
                Parsed::Command(Command::Approve { user, fingerprint })
            }
            _ => Parsed::Invalid("usage: approve @user:server KEY".into()),
        },
        "list" if args.is_empty() => Parsed::Command(Command::List),
        "help" if args.is_empty() => Parsed::Command(Command::Help),
        _ => Parsed::Invalid(format!("`{name}` takes no arguments")),
    }
}

/// A duration for `start … for` or `extend`: at least a minute, at most [`LONGEST_TIMED_START`].
fn timed_duration(text: &str) -> Result<Duration, String> {
    let d = calendar::parse_duration(text)?;
    if d > LONGEST_TIMED_START {
        return Err(format!(
            "{text} is longer than a timed start may last ({}); for longer, start it without `for`",
            calendar::duration_text(LONGEST_TIMED_START)
        ));
    }
    Ok(d)
}

/// The help text, listing commands (and targets when there are several).
pub fn help_text(targets: &[String]) -> String {
    let mut out = String::from("Commands:\n");
    for c in COMMANDS {
        let names = std::iter::once(c.name).chain(c.aliases.iter().copied()).collect::<Vec<_>>().join(" | ");
        let synopsis = if c.args.is_empty() { names } else { format!("{names} {}", c.args) };
        out.push_str(&format!("• {synopsis}: {}\n", c.help));
    }
    if targets.len() > 1 {
        out.push_str(&format!("Targets: {}\n", targets.join(", ")));
    }
    out.push_str(&format!("In a group room, address me: `{PREFIX} status` or mention me."));
    out
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        if let Some(t) = self.target() {
            write!(f, " {t}")?;
        }
        if let Command::Start { replicas: Some(n), .. } = self {
            write!(f, " {n}")?;
        }
        if let Command::Start { on_for: Some(on_for), .. } = self {
            write!(f, " {on_for}")?;
        }
        if let Command::Extend { by, .. } = self {
            write!(f, " {}", calendar::duration_text(*by))?;
        }
        if let Command::Approve { user, fingerprint } = self {
            write!(f, " {user} {fingerprint}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> BotNames {
        BotNames::new("@toggle:example.org", "Kubernetes toggle")
    }

    fn dm(text: &str) -> Parsed {
        parse(text, &names(), Addressed::ToBot, false)
    }

    fn group(text: &str) -> Parsed {
        parse(text, &names(), Addressed::ToRoom, false)
    }

    fn group_with_bare_commands(text: &str) -> Parsed {
        parse(text, &names(), Addressed::ToRoomBare, false)
    }

    fn cmd(c: Command) -> Parsed {
        Parsed::Command(c)
    }

    #[test]
    fn commands_parse_as_the_table_says() {
        let table: &[(&str, Parsed)] = &[
            ("start", cmd(Command::Start { target: None, replicas: None, on_for: None })),
            ("on", cmd(Command::Start { target: None, replicas: None, on_for: None })),
            ("  START  ", cmd(Command::Start { target: None, replicas: None, on_for: None })),
            ("Start 3", cmd(Command::Start { target: None, replicas: Some(3), on_for: None })),
            ("start web", cmd(Command::Start { target: Some("web".into()), replicas: None, on_for: None })),
            ("start web 2", cmd(Command::Start { target: Some("web".into()), replicas: Some(2), on_for: None })),
            ("stop", cmd(Command::Stop { target: None })),
            ("OFF", cmd(Command::Stop { target: None })),
            ("off\tdb", cmd(Command::Stop { target: Some("db".into()) })),
            ("status", cmd(Command::Status { target: None })),
            ("status web", cmd(Command::Status { target: Some("web".into()) })),
            ("list", cmd(Command::List)),
            ("approve @bob:example.org Xk3d9aQ2", approve("@bob:example.org", "Xk3d9aQ2")),
            ("approve @bob:example.org Xk3d 9aQ2 Lm", approve("@bob:example.org", "Xk3d9aQ2Lm")),
            ("approve bob", Parsed::Invalid("usage: approve @user:server KEY".into())),
            (
                "approve @bob:bad_server Xk3d9aQ2",
                Parsed::Invalid("`@bob:bad_server` is not a valid user id; usage: approve @user:server KEY".into()),
            ),
            ("APPROVE @Bob:Example.org aBcD+/12", approve("@Bob:Example.org", "aBcD+/12")),
            ("help", cmd(Command::Help)),
            ("", cmd(Command::Help)),
            ("hello there", Parsed::NotACommand),
            ("start 0", Parsed::Invalid("replicas must be at least 1; use `stop` to scale to 0".into())),
            ("start web lots", Parsed::Invalid("replicas must be a whole number, e.g. `start web 2`".into())),
            ("start a b c", Parsed::Invalid("usage: start [target] [replicas] [for 2h | until 18:00]".into())),
            ("list all", Parsed::Invalid("`list` takes no arguments".into())),
            ("start web for 2h", start_for("web", None, OnFor::For(Duration::from_secs(7200)))),
            ("start web 3 for 1h30m", start_for("web", Some(3), OnFor::For(Duration::from_secs(5400)))),
            (
                "on for 30m",
                cmd(Command::Start {
                    target: None,
                    replicas: None,
                    on_for: Some(OnFor::For(Duration::from_secs(1800))),
                }),
            ),
            ("start web until 18:00", start_for("web", None, until(18, 0, false))),
            ("start web until tomorrow 9:00", start_for("web", None, until(9, 0, true))),
            ("extend web 1h", cmd(Command::Extend { target: Some("web".into()), by: Duration::from_secs(3600) })),
            ("extend 30m", cmd(Command::Extend { target: None, by: Duration::from_secs(1800) })),
            ("history", cmd(Command::History { target: None })),
            ("history web", cmd(Command::History { target: Some("web".into()) })),
            ("history web db", Parsed::Invalid("usage: history [target]".into())),
        ];
        for (text, expected) in table {
            assert_eq!(&dm(text), expected, "{text:?}");
        }
    }

    fn start_for(target: &str, replicas: Option<i32>, on_for: OnFor) -> Parsed {
        cmd(Command::Start { target: Some(target.into()), replicas, on_for: Some(on_for) })
    }

    fn until(hour: i8, minute: i8, tomorrow: bool) -> OnFor {
        OnFor::Until { at: TimeOfDay { hour, minute }, tomorrow }
    }

    #[test]
    fn a_timed_start_that_is_no_time_too_long_or_at_no_clock_time_is_answered_not_guessed() {
        let answer = |text: &str| match dm(text) {
            Parsed::Invalid(why) => why,
            other => panic!("{text:?} read as {other:?}"),
        };
        assert!(answer("start web for 0m").contains("no time at all"), "{}", answer("start web for 0m"));
        assert!(answer("start web for 99999h").contains("longer than a timed start may last"));
        assert!(answer("start web until 25:00").contains("not a time of day"));
        assert!(answer("start web for").starts_with("usage: start"));
        assert!(answer("start web for 2h 3h").starts_with("usage: start"));
        assert!(answer("start web until noon").contains("HH:MM"));
        assert!(answer("extend web").contains("not a duration"), "{}", answer("extend web"));
        assert!(answer("extend").starts_with("usage: extend"));
        assert!(answer("extend web 0m").contains("no time at all"));
    }

    #[test]
    fn a_timed_start_prints_as_it_is_read() {
        for text in ["start web 3 for 1h30m", "start until tomorrow 09:00", "start web until 18:00", "extend web 2h"] {
            let Parsed::Command(c) = dm(text) else { panic!("{text}") };
            assert_eq!(c.to_string(), text);
        }
    }

    fn approve(user: &str, fingerprint: &str) -> Parsed {
        cmd(Command::Approve { user: UserId::parse(user).unwrap(), fingerprint: fingerprint.into() })
    }

    #[test]
    fn approve_keeps_the_capitals_of_an_older_user_id_and_of_the_key_after_an_address() {
        let parsed = group("Kubernetes Toggle: approve @Old_User:Example.org QmFzZTY0 S2V5");
        assert_eq!(parsed, approve("@Old_User:Example.org", "QmFzZTY0S2V5"));
    }

    #[test]
    fn approve_without_at_least_eight_characters_of_the_key_is_refused_with_the_usage() {
        for text in
            ["approve @bob:example.org", "approve @bob:example.org Xk3d9aQ", "approve @bob:example.org Xk3d-9aQ2"]
        {
            let Parsed::Invalid(why) = dm(text) else { panic!("{text:?} was accepted") };
            assert!(why.contains("at least the first 8 characters"), "{text:?}: {why}");
        }
    }

    #[test]
    fn addressed_forms_are_accepted_in_a_group_room() {
        let expected = cmd(Command::Status { target: None });
        for text in [
            "!toggle status",
            "!TOGGLE status",
            "@toggle:example.org: status",
            "toggle, status",
            "Kubernetes toggle: status",
        ] {
            assert_eq!(group(text), expected, "{text:?}");
            assert_eq!(group_with_bare_commands(text), expected, "{text:?}");
        }
    }

    #[test]
    fn a_bare_command_said_in_a_group_room_is_chatter_unless_bare_commands_are_allowed() {
        for (text, command) in [
            ("stop", Command::Stop { target: None }),
            ("status", Command::Status { target: None }),
            ("start web", Command::Start { target: Some("web".into()), replicas: None, on_for: None }),
        ] {
            assert_eq!(group(text), Parsed::NotACommand, "{text:?}");
            assert_eq!(group_with_bare_commands(text), cmd(command.clone()), "{text:?}");
            assert_eq!(dm(text), cmd(command), "{text:?} in a DM");
        }
    }

    #[test]
    fn chatter_in_a_group_room_is_not_a_command() {
        for text in ["stop the music please", "let's start", "good morning", "start a b c"] {
            assert_eq!(group(text), Parsed::NotACommand, "{text:?}");
            assert_eq!(group_with_bare_commands(text), Parsed::NotACommand, "{text:?}");
        }
    }

    #[test]
    fn a_mention_makes_bad_arguments_an_answerable_error() {
        let parsed = parse("start a b c", &names(), Addressed::ToRoom, true);
        assert!(matches!(parsed, Parsed::Invalid(_)));
        let parsed = parse("!toggle start a b c", &names(), Addressed::ToRoom, false);
        assert!(matches!(parsed, Parsed::Invalid(_)));
    }

    #[test]
    fn zero_width_and_bidi_characters_are_ignored() {
        assert_eq!(dm("st\u{200B}op"), cmd(Command::Stop { target: None }));
        assert_eq!(dm("\u{202E}status\u{202C}"), cmd(Command::Status { target: None }));
        assert_eq!(dm("\u{FEFF}on"), cmd(Command::Start { target: None, replicas: None, on_for: None }));
    }

    #[test]
    fn a_name_prefix_must_end_at_a_word_boundary() {
        assert_eq!(group("toggleswitch status"), Parsed::NotACommand);
    }

    #[test]
    fn each_command_declares_its_permission() {
        assert_eq!(Command::Start { target: None, replicas: None, on_for: None }.permission(), Permission::Operate);
        assert_eq!(Command::Stop { target: None }.permission(), Permission::Operate);
        assert_eq!(Command::Status { target: None }.permission(), Permission::Query);
        assert_eq!(Command::List.permission(), Permission::Query);
        assert_eq!(
            Command::Approve { user: UserId::parse("@b:x").unwrap(), fingerprint: "Xk3d9aQ2".into() }.permission(),
            Permission::Operate
        );
        assert_eq!(Command::Help.permission(), Permission::Query);
    }

    #[test]
    fn help_lists_every_command_and_alias() {
        let text = help_text(&["web".into(), "db".into()]);
        for word in ["start | on", "stop | off", "status", "list", "help", "Targets: web, db", "!toggle"] {
            assert!(text.contains(word), "{word} missing from {text}");
        }
    }
}
