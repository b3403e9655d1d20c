//! Properties of command parsing (proptest): it never panics; case, spacing and invisible
//! characters never change what a message means; a command reads back from how it prints; and
//! group-room chatter is left alone.

use std::time::Duration;

use matrix_k8s_toggle::{
    calendar::TimeOfDay,
    commands::{Addressed, BotNames, COMMANDS, Command, OnFor, Parsed, normalize, parse, read},
};
use proptest::{option, prelude::*};

fn names() -> BotNames {
    BotNames::new("@toggle:example.org", "Kubernetes toggle")
}

fn dm(text: &str) -> Parsed {
    parse(text, &names(), Addressed::ToBot, false)
}

fn group(text: &str) -> Parsed {
    parse(text, &names(), Addressed::ToRoom, false)
}

fn mentioned(text: &str) -> Parsed {
    parse(text, &names(), Addressed::ToRoom, true)
}

/// Every way a message can be read, so one comparison covers DMs, rooms and mentions.
fn all_readings(text: &str) -> [Parsed; 3] {
    [dm(text), group(text), mentioned(text)]
}

fn is_command_word(word: &str) -> bool {
    COMMANDS.iter().any(|c| c.name == word || c.aliases.contains(&word))
}

/// Conservative: also true for texts that merely start like one of the bot's names.
fn may_address_the_bot(normalized: &str) -> bool {
    ["!toggle", "toggle", "@toggle:example.org", "kubernetes"].iter().any(|n| normalized.starts_with(n))
}

fn target() -> impl Strategy<Value = String> {
    // NB: the configuration refuses these as target names: they start a time in `start`.
    "[a-z][a-z0-9-]{0,15}".prop_filter("a word of the start command", |t| t != "for" && t != "until")
}

/// A duration as `for` and `extend` take it: whole minutes, up to a week.
fn duration() -> impl Strategy<Value = Duration> {
    (1u64..=7 * 24 * 60).prop_map(|m| Duration::from_secs(m * 60))
}

fn on_for() -> impl Strategy<Value = OnFor> {
    prop_oneof![
        duration().prop_map(OnFor::For),
        (0i8..24, 0i8..60, any::<bool>())
            .prop_map(|(hour, minute, tomorrow)| OnFor::Until { at: TimeOfDay { hour, minute }, tomorrow }),
    ]
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (option::of(target()), option::of(1..=1000i32), option::of(on_for()))
            .prop_map(|(target, replicas, on_for)| Command::Start { target, replicas, on_for }),
        (option::of(target()), duration()).prop_map(|(target, by)| Command::Extend { target, by }),
        option::of(target()).prop_map(|target| Command::Stop { target }),
        option::of(target()).prop_map(|target| Command::Status { target }),
        option::of(target()).prop_map(|target| Command::History { target }),
        Just(Command::List),
        Just(Command::Help),
        (user(), fingerprint())
            .prop_map(|(user, fingerprint)| Command::Approve { user: parse_user(&user), fingerprint }),
    ]
}

fn parse_user(s: &str) -> ruma::OwnedUserId {
    s.try_into().unwrap()
}

/// A user id as the parser keeps it (lower-cased).
fn user() -> impl Strategy<Value = String> {
    "@[a-z0-9._=-]{1,12}:[a-z0-9.-]{1,12}(:[0-9]{1,4})?"
}

/// The start of an identity key as `approve` takes it (base64, case kept).
fn fingerprint() -> impl Strategy<Value = String> {
    "[A-Za-z0-9+/]{8,43}"
}

/// Text that looks like a command often enough to reach every branch of the parser.
fn near_command() -> impl Strategy<Value = String> {
    "(!toggle |toggle[:,]? |@toggle:example.org: |kubernetes toggle, )?(start|on|stop|off|status|list|help|approve|extend|history)( (-?[0-9]{1,11}|[a-z@:.]{1,8}|for|until|tomorrow|[0-9]{1,3}[dhm]|[0-9]{1,2}:[0-9]{2}|\\PC{1,4})){0,4}"
}

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), near_command()]
}

/// One or more whitespace characters of the kinds people and clients produce.
fn spacing() -> impl Strategy<Value = String> {
    "[ \t\n\r\u{a0}\u{2003}\u{2028}\u{3000}]{1,4}"
}

/// The invisible and bidi control characters a message may carry.
fn invisible() -> impl Strategy<Value = char> {
    prop_oneof![
        proptest::char::range('\u{200B}', '\u{200F}'),
        proptest::char::range('\u{202A}', '\u{202E}'),
        proptest::char::range('\u{2060}', '\u{2064}'),
        proptest::char::range('\u{2066}', '\u{2069}'),
        Just('\u{FEFF}'),
        Just('\u{00AD}'),
        Just('\u{061C}'),
    ]
}

fn is_zero_width_or_bidi(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

fn flip_ascii_case(text: &str, flips: &[bool]) -> String {
    text.chars()
        .zip(flips.iter().copied().cycle())
        .map(|(c, flip)| if flip && c.is_ascii_lowercase() { c.to_ascii_uppercase() } else { c })
        .collect()
}

fn insert_at_char_boundaries(text: &str, insertions: &[(usize, char)]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for &(at, c) in insertions {
        chars.insert(at % (chars.len() + 1), c);
    }
    chars.into_iter().collect()
}

fn respace(words: &[String], lead: &str, gaps: &[String], trail: &str) -> String {
    let mut out = lead.to_owned();
    for (i, word) in words.iter().enumerate() {
        if i > 0 {
            out.push_str(&gaps[(i - 1) % gaps.len()]);
        }
        out.push_str(word);
    }
    out.push_str(trail);
    out
}

proptest! {
    #[test]
    fn reading_any_text_never_panics(text in any_text(), to_bot in any::<bool>(), mention in any::<bool>()) {
        let addressed = if to_bot { Addressed::ToBot } else { Addressed::ToRoom };
        let (_, meant_for_bot) = read(&text, &names(), addressed, mention);
        prop_assert!(meant_for_bot || !(to_bot || mention));
    }

    #[test]
    fn case_and_spacing_never_change_a_generated_command(
        command in command(),
        flips in prop::collection::vec(any::<bool>(), 1..32),
        lead in "[ \t\u{3000}]{0,3}",
        gaps in prop::collection::vec(spacing(), 1..4),
        trail in "[ \t\n]{0,3}",
    ) {
        let canonical = command.to_string();
        // NB: every word but the user id and key of `approve`, which are kept as typed.
        let is_user = |i: usize| i >= 1 && matches!(command, Command::Approve { .. });
        let words: Vec<String> = canonical
            .split(' ')
            .enumerate()
            .map(|(i, w)| if is_user(i) { w.to_owned() } else { flip_ascii_case(w, &flips) })
            .collect();
        let text = respace(&words, &lead, &gaps, &trail);
        prop_assert_eq!(dm(&text), Parsed::Command(command.clone()), "{:?}", text);
        let prefixed = format!("!TogGle{}{text}", gaps[0]);
        prop_assert_eq!(group(&prefixed), Parsed::Command(command), "{:?}", prefixed);
    }

    #[test]
    fn ascii_case_never_changes_the_result_for_any_text(
        text in any_text(),
        flips in prop::collection::vec(any::<bool>(), 1..32),
    ) {
        let flipped = flip_ascii_case(&text, &flips);
        prop_assert_eq!(all_readings(&flipped), all_readings(&text), "{:?} vs {:?}", flipped, text);
    }

    #[test]
    fn the_kind_and_amount_of_whitespace_never_change_the_result_for_any_words(
        words in prop::collection::vec("\\S{1,8}", 0..6),
        lead in "[ \t\n]{0,3}",
        gaps in prop::collection::vec(spacing(), 1..4),
        trail in "[ \t\n\u{3000}]{0,3}",
    ) {
        let plain = words.join(" ");
        let spaced = respace(&words, &lead, &gaps, &trail);
        prop_assert_eq!(all_readings(&spaced), all_readings(&plain), "{:?} vs {:?}", spaced, plain);
    }

    #[test]
    fn invisible_characters_anywhere_never_change_the_result(
        text in any_text(),
        insertions in prop::collection::vec((any::<usize>(), invisible()), 1..8),
    ) {
        let sneaky = insert_at_char_boundaries(&text, &insertions);
        prop_assert_eq!(all_readings(&sneaky), all_readings(&text), "{:?} vs {:?}", sneaky, text);
    }

    #[test]
    fn invisible_characters_inside_a_generated_command_never_change_it(
        command in command(),
        insertions in prop::collection::vec((any::<usize>(), invisible()), 1..8),
    ) {
        let sneaky = insert_at_char_boundaries(&command.to_string(), &insertions);
        prop_assert_eq!(dm(&sneaky), Parsed::Command(command), "{:?}", sneaky);
    }

    #[test]
    fn a_generated_command_reads_back_as_itself_in_a_dm_and_after_the_prefix_in_a_group_room(
        command in command(),
    ) {
        let printed = command.to_string();
        prop_assert_eq!(dm(&printed), Parsed::Command(command.clone()), "{:?}", printed);
        let prefixed = format!("!toggle {printed}");
        prop_assert_eq!(
            read(&prefixed, &names(), Addressed::ToRoom, false),
            (Parsed::Command(command), true),
            "{:?}", prefixed
        );
    }

    #[test]
    fn any_command_parsed_from_any_text_reads_back_as_itself(text in any_text()) {
        if let Parsed::Command(command) = dm(&text) {
            let printed = command.to_string();
            prop_assert_eq!(dm(&printed), Parsed::Command(command), "{:?} from {:?}", printed, text);
        }
    }

    #[test]
    fn an_approve_command_reads_its_user_and_key_in_a_dm(user in user(), fingerprint in fingerprint()) {
        prop_assert_eq!(
            dm(&format!("approve {user} {fingerprint}")),
            Parsed::Command(Command::Approve { user: parse_user(&user), fingerprint })
        );
    }

    #[test]
    fn in_a_group_room_a_text_not_addressed_to_the_bot_is_never_a_command(text in any_text()) {
        let (parsed, to_bot) = read(&text, &names(), Addressed::ToRoom, false);
        prop_assert!(to_bot || parsed == Parsed::NotACommand, "{:?} read as {:?}", text, parsed);
        prop_assert!(!to_bot || may_address_the_bot(&normalize(&text).to_lowercase()), "{:?}", text);
    }

    #[test]
    fn chatter_that_does_not_start_with_a_command_word_is_never_a_command_in_a_group_room(
        first in "[a-z']{1,12}",
        rest in any_text(),
    ) {
        prop_assume!(!is_command_word(&first) && !may_address_the_bot(&first));
        let text = format!("{first} {rest}");
        prop_assert_eq!(
            read(&text, &names(), Addressed::ToRoom, false),
            (Parsed::NotACommand, false),
            "{:?}", text
        );
    }

    #[test]
    fn any_text_without_a_leading_command_word_or_address_is_not_a_command_in_a_group_room(text in any_text()) {
        let normalized = normalize(&text);
        let first = normalized.split(' ').next().unwrap_or_default();
        prop_assume!(!is_command_word(first) && !may_address_the_bot(&normalized));
        prop_assert_eq!(group(&text), Parsed::NotACommand, "{:?}", text);
    }

    #[test]
    fn a_command_word_followed_by_a_sentence_is_an_error_in_a_dm_and_chatter_in_a_group_room(
        verb in prop::sample::select(
            COMMANDS.iter().flat_map(|c| std::iter::once(c.name).chain(c.aliases.iter().copied())).collect::<Vec<_>>()
        ),
        sentence in prop::collection::vec("[a-z]{1,8}", 3..7),
    ) {
        let text = format!("{verb} {}", sentence.join(" "));
        prop_assert!(matches!(dm(&text), Parsed::Invalid(_)), "{:?}", text);
        prop_assert_eq!(group(&text), Parsed::NotACommand, "{:?}", text);
    }

    #[test]
    fn approve_keeps_the_user_id_and_key_exactly_as_typed(
        localpart in "[a-zA-Z0-9._=/+-]{1,12}",
        server in "[a-zA-Z0-9.-]{1,12}",
        verb in "[aA][pP][pP][rR][oO][vV][eE]",
        fingerprint in fingerprint(),
    ) {
        let user = format!("@{localpart}:{server}");
        prop_assert_eq!(
            dm(&format!("{verb} {user} {fingerprint}")),
            Parsed::Command(Command::Approve { user: parse_user(&user), fingerprint })
        );
    }

    #[test]
    fn normalize_is_idempotent(text in any_text()) {
        let once = normalize(&text);
        prop_assert_eq!(normalize(&once), once.clone(), "{:?}", text);
    }

    #[test]
    fn normalized_text_is_single_spaced_and_free_of_invisible_characters(text in any_text()) {
        let normalized = normalize(&text);
        prop_assert!(!normalized.starts_with(' ') && !normalized.ends_with(' ') && !normalized.contains("  "));
        prop_assert!(normalized.chars().all(|c| c == ' ' || !(c.is_whitespace() || c.is_control())));
        prop_assert!(!normalized.chars().any(is_zero_width_or_bidi), "{:?}", normalized);
    }
}

/// Regression found by fuzzing (`command_parsing`): `Command::Approve` printed without its user.
#[test]
fn an_approve_command_prints_its_user_and_key() {
    let command = Command::Approve { user: parse_user("@bob:example.org"), fingerprint: "Xk3d9aQ2".into() };
    assert_eq!(command.to_string(), "approve @bob:example.org Xk3d9aQ2");
    assert_eq!(dm(&command.to_string()), Parsed::Command(command));
}
