//! `matrix-k8s-toggle check`: validates the setup and prints one line per check.

use std::{fmt, path::Path};

use ruma::api::client::account::whoami;

use crate::{config::Config, matrix::MatrixClient};

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    /// What was checked.
    pub name: String,
    /// `Ok(detail)` or `Err(what is wrong and the fix)`.
    pub result: Result<String, String>,
}

impl fmt::Display for CheckLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.result {
            Ok(detail) => write!(f, "ok    {}: {detail}", self.name),
            Err(problem) => write!(f, "FAIL  {}: {problem}", self.name),
        }
    }
}

fn line(name: &str, result: Result<String, String>) -> CheckLine {
    CheckLine { name: name.to_owned(), result }
}

/// Runs every check; stops early when the configuration itself is invalid.
pub async fn run(config_path: Option<&Path>) -> Vec<CheckLine> {
    let config = match Config::from_env(config_path) {
        Ok(c) => c,
        Err(e) => return vec![line("configuration", Err(e.to_string()))],
    };
    let mut lines = vec![
        line(
            "configuration",
            Ok(format!(
                "bot {}, {} target(s), state in {}",
                config.bot_user_id,
                config.targets.len(),
                config.state_dir.display()
            )),
        ),
        line(
            "registration",
            Ok(format!("id {}, url {}, {}", config.registration.id, config.registration.url, msc_summary(&config))),
        ),
    ];
    lines.extend(homeserver_checks(&config).await);
    lines
}

fn msc_summary(config: &Config) -> String {
    let r = &config.registration;
    let mut missing = vec![];
    if !r.receive_ephemeral {
        missing.push("receive_ephemeral: true");
    }
    if !r.msc3202 {
        missing.push("org.matrix.msc3202: true");
    }
    if missing.is_empty() {
        "encryption keys enabled".into()
    } else {
        format!("WARNING: encrypted rooms need {} in the registration", missing.join(" and "))
    }
}

async fn homeserver_checks(config: &Config) -> Vec<CheckLine> {
    let http = reqwest::Client::new();
    let versions_url = format!("{}/_matrix/client/versions", config.homeserver.as_str().trim_end_matches('/'));
    let reachable = match http.get(&versions_url).send().await {
        Ok(r) if r.status().is_success() => Ok(format!("{} answers", config.homeserver)),
        Ok(r) => Err(format!("{versions_url} answered {}; is MATRIX_HOMESERVER the client-server API?", r.status())),
        Err(e) => Err(format!("cannot reach {versions_url}: {e}; fix MATRIX_HOMESERVER")),
    };
    let ok = reachable.is_ok();
    let mut lines = vec![line("homeserver", reachable)];
    if !ok {
        return lines;
    }
    let matrix =
        MatrixClient::new(&config.homeserver, config.registration.as_token.clone(), config.bot_user_id.clone());
    let whoami = match matrix.send_without_device(whoami::v3::Request::new()).await {
        Ok(r) if r.user_id == config.bot_user_id => Ok(format!("accepted, acting as {}", r.user_id)),
        Ok(r) => Err(format!("the homeserver says we are {}, expected {}", r.user_id, config.bot_user_id)),
        Err(e) => Err(format!(
            "{e}; the homeserver must load this registration file (app_service_config_files) and be restarted after changes, and MATRIX_SERVER_NAME must match its server_name"
        )),
    };
    lines.push(line("as_token", whoami));
    lines
}
