//! What the bot says when it refuses, in one place, so the words can be read and changed
//! together. (Command answers live with the commands in `bridge`.)

use ruma::UserId;

use crate::{commands::Permission, policy::Refusal};

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
        Refusal::Untrusted(why) => why.clone(),
        Refusal::ViewOnly { command } => format!(
            "You may look but not change anything: `{command}` needs ALLOWED_USERS, and you are in VIEWERS."
        ),
        Refusal::Target { permission: Permission::Operate } => "You may not operate that target.".into(),
        Refusal::Target { permission: Permission::Query } => "You may not see that target.".into(),
        Refusal::ApproveUnencrypted => {
            "Not run: `approve` must be sent in an encrypted room, so I can tell it comes from you.".into()
        }
        Refusal::ApproveSelf => "You cannot approve your own new identity: ask another allowed user to check its key with you and approve it.".into(),
        Refusal::ApproveNotAUser { user } => format!("{user} is not a user id."),
        Refusal::ApproveStranger { user } => format!("{user} is not an allowed user; there is nothing to approve."),
        Refusal::ApproveReach { user, target } => {
            format!("You may not approve {user}: they may operate {target}, which you may not.")
        }
    }
}
