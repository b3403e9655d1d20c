//! Start-up calls to the homeserver: make sure the bot exists, set its name, and ask Synapse
//! to ping us so one log line says whether it can reach us.

use std::time::Duration;

use ruma::{
    api::client::{
        account::register::{self, LoginType},
        appservice::request_ping,
        profile::{get_profile_field, set_profile_field},
    },
    profile::{ProfileFieldName, ProfileFieldValue},
};

use crate::matrix::{MatrixClient, MatrixError};

/// Registers the bot user if needed (`M_USER_IN_USE` means it exists).
pub async fn ensure_bot_registered(matrix: &MatrixClient) -> Result<(), MatrixError> {
    let mut request = register::v3::Request::new();
    request.username = Some(matrix.bot().localpart().to_owned());
    request.inhibit_login = true;
    request.login_type = Some(LoginType::ApplicationService);
    match matrix.send_without_device(request).await {
        Ok(_) => {
            tracing::info!(user_id = %matrix.bot(), "registered the bot user");
            Ok(())
        }
        Err(e) if e.errcode() == Some("M_USER_IN_USE") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sets the bot's display name when it differs.
pub async fn ensure_display_name(matrix: &MatrixClient, name: &str) -> Result<(), MatrixError> {
    let current = matrix
        .send_without_device(get_profile_field::v3::Request::new(matrix.bot().clone(), ProfileFieldName::DisplayName))
        .await
        .ok()
        .and_then(|r| r.value);
    let wanted = ProfileFieldValue::DisplayName(name.to_owned());
    if current.as_ref() != Some(&wanted) {
        matrix.send_without_device(set_profile_field::v3::Request::new(matrix.bot().clone(), wanted)).await?;
    }
    Ok(())
}

/// Asks the homeserver to ping us and logs whether it could, with the fix when it could not.
/// Returns whether the ping succeeded.
pub async fn ping_via_homeserver(matrix: &MatrixClient, appservice_id: &str, our_url: &str) -> bool {
    match matrix.send_without_device(request_ping::v1::Request::new(appservice_id.to_owned())).await {
        Ok(r) => {
            tracing::info!(duration_ms = r.duration.as_millis() as u64, url = our_url, "the homeserver can reach us");
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "the homeserver could not ping us: {}", ping_fix(&e, our_url));
            false
        }
    }
}

/// The fix for a failed appservice ping.
pub fn ping_fix(error: &MatrixError, our_url: &str) -> String {
    match error.errcode() {
        Some("M_URL_NOT_SET") => "the registration has no `url`: set it to where the homeserver reaches us".into(),
        Some("M_CONNECTION_FAILED") | Some("M_CONNECTION_TIMEOUT") => format!(
            "the homeserver cannot connect to {our_url} (the registration `url`): check that it resolves from the homeserver, that LISTEN_ADDRESS serves that port, and that no network policy blocks it"
        ),
        Some("M_BAD_STATUS") => format!("{our_url} answered the homeserver with an error: do both sides use the same registration file (hs_token)?"),
        Some("M_FORBIDDEN") | Some("M_UNKNOWN_TOKEN") => "the homeserver does not know our as_token: list the same registration file in its `app_service_config_files` as REGISTRATION_PATH, and restart it".into(),
        Some("M_UNRECOGNIZED") => "the homeserver does not support the appservice ping (Synapse 1.84 or newer does)".into(),
        _ if error.is_transient() => "the homeserver is unreachable: check MATRIX_HOMESERVER".into(),
        _ => "check the registration file and MATRIX_HOMESERVER".into(),
    }
}

/// Runs the start-up calls in the background order they need; never blocks serving.
pub async fn run(matrix: &MatrixClient, appservice_id: &str, our_url: &str, display_name: &str) {
    let mut delay = Duration::from_millis(500);
    loop {
        match ensure_bot_registered(matrix).await {
            Ok(()) => break,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, retry_in_s = delay.as_secs_f32(), "cannot reach the homeserver to register the bot; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(e) => {
                tracing::error!(error = %e, "the homeserver refused to register the bot: is the registration file loaded by the homeserver, and does its user namespace hold the bot?");
                break;
            }
        }
    }
    if let Err(e) = ensure_display_name(matrix, display_name).await {
        tracing::warn!(error = %e, "could not set the bot's display name");
    }
    if !ping_via_homeserver(matrix, appservice_id, our_url).await {
        return;
    }
    // NB: right after a quick restart Synapse may still think we are down; a second ping makes
    // it send what it queued without waiting for its back-off.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = matrix.send_without_device(request_ping::v1::Request::new(appservice_id.to_owned())).await;
}
