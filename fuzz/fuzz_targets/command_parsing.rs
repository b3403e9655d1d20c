//! Arbitrary text as a chat message, in a group room and in a DM, mentioned or not. The first
//! byte picks how it was addressed (bit 0: a DM, bit 1: a mention); the rest is the message.
//!
//! Invariants: reading never panics; a DM, a mention or an address is always "to the bot"; a
//! doubtful command is only answered when it was meant for the bot; what the parser sees does
//! not change when the text is normalized again; a command prints as text that reads back as
//! the same command.

#![no_main]

use libfuzzer_sys::fuzz_target;
use matrix_k8s_toggle::commands::{Addressed, BotNames, Parsed, normalize, parse, read};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let names = BotNames::new("@toggle:example.org", "Kubernetes toggle");
    let addressed = match flags & 5 {
        0 => Addressed::ToRoom,
        4 => Addressed::ToRoomBare,
        _ => Addressed::ToBot,
    };
    let mentioned = flags & 2 != 0;

    let (parsed, to_bot) = read(text, &names, addressed, mentioned);

    if addressed == Addressed::ToBot || mentioned {
        assert!(to_bot, "a DM or a mention is always to the bot: {text:?}");
    }
    if addressed == Addressed::ToRoom && !to_bot {
        assert_eq!(parsed, Parsed::NotACommand, "an unaddressed message in a group room is chatter: {text:?}");
    }
    if matches!(parsed, Parsed::Invalid(_)) {
        assert!(to_bot, "an argument error is only reported when addressed: {text:?}");
    }
    assert_eq!(
        read(&normalize(text), &names, addressed, mentioned),
        (parsed.clone(), to_bot),
        "normalizing again changes nothing: {text:?}"
    );

    if let Parsed::Command(command) = parsed {
        if let Some(target) = command.target() {
            assert_eq!(normalize(target), target, "a target is a normalized word: {text:?}");
        }
        let printed = command.to_string();
        assert_eq!(
            parse(&printed, &names, Addressed::ToBot, false),
            Parsed::Command(command),
            "{printed:?} (from {text:?}) reads back as the same command"
        );
    }
});
