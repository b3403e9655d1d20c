//! `matrix-k8s-toggle check`: validates the setup and prints one line per check.

use std::{fmt, path::Path};

use ruma::api::client::account::whoami;

use crate::{
    config::Config,
    matrix::MatrixClient,
    scaler::{RetryPolicy, Scaler},
};

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
    lines.extend(kubernetes_checks(&config).await);
    lines
}

/// Per target: the workload exists, and a SelfSubjectAccessReview for every verb we use.
async fn kubernetes_checks(config: &Config) -> Vec<CheckLine> {
    let retry = RetryPolicy { attempts: 2, first_delay: std::time::Duration::from_millis(200) };
    let scaler = match Scaler::infer(retry).await {
        Ok(s) => s,
        Err(e) => return vec![line("kubernetes", Err(e.to_string()))],
    };
    let mut lines = Vec::new();
    for t in &config.targets {
        let name = format!("target {}", t.name);
        let workload = match scaler.status(t).await {
            Ok(s) => Ok(format!(
                "{} {}/{} is {} ({}/{} ready)",
                t.kind, t.namespace, t.workload, s.state, s.ready, s.desired
            )),
            Err(e) => Err(e.to_string()),
        };
        lines.push(line(&name, workload));
        let review = match scaler.access_review(t).await {
            Ok(answers) => {
                let missing: Vec<String> =
                    answers.iter().filter(|(_, allowed)| !allowed).map(|(p, _)| p.to_string()).collect();
                if missing.is_empty() {
                    let granted: Vec<String> = answers.iter().map(|(p, _)| p.to_string()).collect();
                    Ok(format!("allowed: {}", granted.join(", ")))
                } else {
                    Err(format!(
                        "the ServiceAccount may not: {}; grant them in a Role in namespace {} (see deploy/)",
                        missing.join(", "),
                        t.namespace
                    ))
                }
            }
            Err(e) => Err(e.to_string()),
        };
        lines.push(line(&format!("permissions {}", t.name), review));
        if t.autoscaler.is_some() {
            let autoscaler = match scaler.autoscaler(t).await {
                Ok(Some(state)) => Ok(crate::replies::autoscaler_status(&state)),
                Ok(None) => Ok(String::new()),
                Err(e) => Err(e.to_string()),
            };
            lines.push(line(&format!("autoscaler {}", t.name), autoscaler));
        }
    }
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
