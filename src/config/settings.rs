//! The table of settings: for each, its environment variable, its key in the file, its default
//! and its parser, and the one reader that looks them up (environment first, then the file).
//!
//! The README's Configuration table is checked against [`SETTINGS`] by a test, so the two cannot
//! drift apart.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use ruma::OwnedServerName;
use serde::Deserialize;
use serde_yaml::{Mapping, Value};
use url::Url;

use super::{BareCommands, ConfigError, LogFormat, RefusalMode, TrustPolicy};
use crate::policy::AllowList;

/// What a setting is when nothing sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// This value, parsed like one that was set.
    Value(&'static str),
    /// Nothing: start-up fails and names the setting.
    Required,
    /// Nothing: the feature it configures is off.
    Unset,
    /// Worked out from other settings, as described.
    Derived(&'static str),
}

/// Where a setting is read and what it is when unset.
#[derive(Clone, Copy, Debug)]
pub struct About {
    /// The environment variable, if the environment can set it.
    pub env: Option<&'static str>,
    /// An older name of the environment variable, still read.
    pub alias: Option<&'static str>,
    /// The key in the config file, if the file can set it.
    pub key: Option<&'static str>,
    /// What it is when unset.
    pub fallback: Fallback,
}

impl About {
    /// The name errors use: the environment variable, else the file key.
    pub fn name(&self) -> &'static str {
        self.env.or(self.key).unwrap_or("?")
    }
}

/// One setting: where it is read and how its text becomes a value.
pub struct Setting<T> {
    /// Where it is read.
    pub about: About,
    parse: fn(&str) -> Result<T, String>,
}

const fn setting<T>(
    env: &'static str,
    key: &'static str,
    fallback: Fallback,
    parse: fn(&str) -> Result<T, String>,
) -> Setting<T> {
    Setting { about: About { env: Some(env), alias: None, key: Some(key), fallback }, parse }
}

use Fallback::{Derived, Required, Unset, Value as Is};

/// `MATRIX_HOMESERVER`.
pub const HOMESERVER: Setting<Url> =
    setting("MATRIX_HOMESERVER", "homeserver", Is(super::DEFAULT_HOMESERVER), parse_http_url);
/// `MATRIX_SERVER_NAME`.
pub const SERVER_NAME: Setting<OwnedServerName> =
    setting("MATRIX_SERVER_NAME", "server_name", Required, crate::registration::parse_server_name);
/// `REGISTRATION_PATH`.
pub const REGISTRATION_PATH: Setting<PathBuf> = setting("REGISTRATION_PATH", "registration_path", Required, parse_path);
/// `LISTEN_ADDRESS`.
pub const LISTEN_ADDRESS: Setting<SocketAddr> = setting(
    "LISTEN_ADDRESS",
    "listen_address",
    Derived("`0.0.0.0:<port of the registration url>`"),
    parse_socket_address,
);
/// `STATE_DIR`, also read as `CRYPTO_STORE_PATH` (the old bot's name).
pub const STATE_DIR: Setting<PathBuf> = Setting {
    about: About {
        env: Some("STATE_DIR"),
        alias: Some("CRYPTO_STORE_PATH"),
        key: Some("state_dir"),
        fallback: Is("/data"),
    },
    parse: parse_path,
};
/// `ALLOWED_USERS`.
pub const ALLOWED_USERS: Setting<AllowList> = setting("ALLOWED_USERS", "allowed_users", Required, parse_users);
/// `VIEWERS`.
pub const VIEWERS: Setting<AllowList> = setting("VIEWERS", "viewers", Unset, parse_users);
/// `DEPLOYMENT_NAME`.
pub const DEPLOYMENT_NAME: Setting<String> = setting("DEPLOYMENT_NAME", "deployment_name", Is("clawdbot"), parse_text);
/// `DEPLOYMENT_NAMESPACE`.
pub const DEPLOYMENT_NAMESPACE: Setting<String> =
    setting("DEPLOYMENT_NAMESPACE", "deployment_namespace", Is("clawdbot"), parse_text);
/// `ECHO_MODE`.
pub const ECHO_MODE: Setting<bool> = setting("ECHO_MODE", "echo_mode", Is("false"), parse_bool);
/// `BOT_DISPLAY_NAME`.
pub const DISPLAY_NAME: Setting<String> =
    setting("BOT_DISPLAY_NAME", "display_name", Is("Kubernetes toggle"), parse_text);
/// `COMMAND_MAX_AGE_SECS`.
pub const COMMAND_MAX_AGE: Setting<Duration> =
    setting("COMMAND_MAX_AGE_SECS", "command_max_age_secs", Is("300"), parse_secs);
/// `ROLLOUT_TIMEOUT_SECS`.
pub const ROLLOUT_TIMEOUT: Setting<Duration> =
    setting("ROLLOUT_TIMEOUT_SECS", "rollout_timeout_secs", Is("120"), parse_secs);
/// `SLOW_NOTICE_SECS`.
pub const SLOW_NOTICE: Setting<Duration> = setting("SLOW_NOTICE_SECS", "slow_notice_secs", Is("5"), parse_secs);
/// `COMMANDS_PER_MINUTE`.
pub const COMMANDS_PER_MINUTE: Setting<u32> =
    setting("COMMANDS_PER_MINUTE", "commands_per_minute", Is("10"), parse_count);
/// `UNAUTHORIZED_REPLY`.
pub const UNAUTHORIZED_REPLY: Setting<RefusalMode> =
    setting("UNAUTHORIZED_REPLY", "unauthorized_reply", Is("silent"), |v| parse_choice(v, "silent, hourly"));
/// `LEAVE_ROOMS_WITHOUT_ALLOWED_USERS`.
pub const LEAVE_ROOMS: Setting<bool> =
    setting("LEAVE_ROOMS_WITHOUT_ALLOWED_USERS", "leave_rooms_without_allowed_users", Is("true"), parse_bool);
/// `TRUST_POLICY`.
pub const TRUST_POLICY: Setting<TrustPolicy> =
    setting("TRUST_POLICY", "trust_policy", Is("tofu"), |v| parse_choice(v, "tofu, cross-signed"));
/// `REQUIRE_ENCRYPTION`.
pub const REQUIRE_ENCRYPTION: Setting<bool> =
    setting("REQUIRE_ENCRYPTION", "require_encryption", Is("false"), parse_bool);
/// `BARE_COMMANDS`.
pub const BARE_COMMANDS: Setting<BareCommands> =
    setting("BARE_COMMANDS", "bare_commands", Is("dm"), |v| parse_choice(v, "dm, always"));
/// `DECRYPTION_WAIT_SECS`.
pub const DECRYPTION_WAIT: Setting<Duration> =
    setting("DECRYPTION_WAIT_SECS", "decryption_wait_secs", Is("30"), parse_secs);
/// `TIMEZONE`.
pub const TIMEZONE: Setting<jiff::tz::TimeZone> =
    setting("TIMEZONE", "timezone", Is("UTC"), crate::calendar::time_zone);
/// `WARN_BEFORE`.
pub const WARN_BEFORE: Setting<Option<Duration>> = setting("WARN_BEFORE", "warn_before", Is("10m"), parse_warning);
/// `CRYPTO_STORE_PASSPHRASE`: environment only, so it is never written into a file.
pub const PASSPHRASE: Setting<String> = Setting {
    about: About {
        env: Some("CRYPTO_STORE_PASSPHRASE"),
        alias: None,
        key: None,
        fallback: Derived("(generated key file)"),
    },
    parse: parse_raw,
};
/// `CRYPTO_STORE_PASSPHRASE_FILE`.
pub const PASSPHRASE_FILE: Setting<PathBuf> =
    setting("CRYPTO_STORE_PASSPHRASE_FILE", "crypto_store_passphrase_file", Unset, parse_path);
/// `RUST_LOG`.
pub const LOG_FILTER: Setting<String> = setting("RUST_LOG", "log_level", Is("info"), parse_text);
/// `LOG_FORMAT`.
pub const LOG_FORMAT: Setting<LogFormat> =
    setting("LOG_FORMAT", "log_format", Is("text"), |v| parse_choice(v, "text, json"));

/// The file key of the list of targets, which is not a single value.
pub const TARGETS_KEY: &str = "targets";

/// Every setting, in the README's order.
pub const SETTINGS: &[About] = &[
    HOMESERVER.about,
    SERVER_NAME.about,
    REGISTRATION_PATH.about,
    LISTEN_ADDRESS.about,
    STATE_DIR.about,
    ALLOWED_USERS.about,
    VIEWERS.about,
    DEPLOYMENT_NAME.about,
    DEPLOYMENT_NAMESPACE.about,
    ECHO_MODE.about,
    DISPLAY_NAME.about,
    COMMAND_MAX_AGE.about,
    ROLLOUT_TIMEOUT.about,
    SLOW_NOTICE.about,
    COMMANDS_PER_MINUTE.about,
    UNAUTHORIZED_REPLY.about,
    LEAVE_ROOMS.about,
    TRUST_POLICY.about,
    REQUIRE_ENCRYPTION.about,
    BARE_COMMANDS.about,
    DECRYPTION_WAIT.about,
    TIMEZONE.about,
    WARN_BEFORE.about,
    PASSPHRASE.about,
    PASSPHRASE_FILE.about,
    LOG_FILTER.about,
    LOG_FORMAT.about,
];

/// The environment and the file, read through [`Setting`]s: a set, non-blank variable wins over
/// the file key.
pub struct Sources<'a> {
    env: &'a BTreeMap<String, String>,
    file: Mapping,
}

impl<'a> Sources<'a> {
    /// Reads from `env` and the top-level mapping of the config `file`; a file key that is no
    /// setting is refused here, so a typo never goes unnoticed.
    pub fn new(env: &'a BTreeMap<String, String>, file: Mapping) -> Result<Self, String> {
        for key in file.keys() {
            let known = key.as_str().is_some_and(|k| k == TARGETS_KEY || SETTINGS.iter().any(|s| s.key == Some(k)));
            if !known {
                let shown = serde_yaml::to_string(key).unwrap_or_default();
                return Err(format!(
                    "unknown key {:?}; the keys are listed in the README's Configuration table",
                    shown.trim()
                ));
            }
        }
        Ok(Sources { env, file })
    }

    /// The environment variable `name`, if set to something other than blanks.
    pub fn env(&self, name: &str) -> Option<&'a str> {
        self.env.get(name).map(String::as_str).filter(|v| !v.trim().is_empty())
    }

    /// The raw file value under `key`, if present and not null.
    pub fn file_value(&self, key: &str) -> Option<&Value> {
        self.file.get(key).filter(|v| !v.is_null())
    }

    /// The setting's value: the environment's, else the file's, else its [`Fallback::Value`];
    /// `None` when it is unset and has no value to fall back on.
    pub fn get<T>(&self, s: &Setting<T>) -> Result<Option<T>, ConfigError> {
        let a = &s.about;
        let from_env = a.env.and_then(|n| self.env(n).map(|v| (n, v.to_owned())));
        let from_alias = || a.alias.and_then(|n| self.env(n).map(|v| (n, v.to_owned())));
        let from_file = || -> Result<Option<(&'static str, String)>, ConfigError> {
            let Some(key) = a.key else { return Ok(None) };
            match self.file_value(key) {
                Some(v) => yaml_text(v).map(|t| Some((key, t))).map_err(|m| super::invalid(key, m)),
                None => Ok(None),
            }
        };
        let found = match from_env.or_else(from_alias) {
            Some(found) => Some(found),
            None => from_file()?,
        };
        match (found, a.fallback) {
            (Some((name, text)), _) => (s.parse)(&text).map(Some).map_err(|m| super::invalid(name, m)),
            (None, Fallback::Value(text)) => (s.parse)(text).map(Some).map_err(|m| super::invalid(a.name(), m)),
            (None, _) => Ok(None),
        }
    }

    /// The setting's value, which has a [`Fallback::Value`] and so is always there.
    pub fn value<T>(&self, s: &Setting<T>) -> Result<T, ConfigError> {
        self.get(s)?.ok_or_else(|| super::invalid(s.about.name(), "not set and has no default"))
    }

    /// The setting's value, or an error naming it with `hint` on how to set it.
    pub fn required<T>(&self, s: &Setting<T>, hint: &str) -> Result<T, ConfigError> {
        self.get(s)?.ok_or_else(|| super::invalid(s.about.name(), format!("not set; {hint}")))
    }
}

/// A file value as the text an environment variable would hold: scalars as written, a list of
/// scalars comma-separated (so lists of users are parsed one way, whichever the source).
fn yaml_text(v: &Value) -> Result<String, String> {
    fn scalar(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
    match v {
        Value::Sequence(items) => items
            .iter()
            .map(|i| scalar(i).ok_or_else(|| "a list here holds plain values only".to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map(|l| l.join(",")),
        other => scalar(other).ok_or_else(|| "must be a plain value or a list of them".to_owned()),
    }
}

fn parse_http_url(v: &str) -> Result<Url, String> {
    Url::parse(v.trim()).ok().filter(|u| matches!(u.scheme(), "http" | "https")).ok_or_else(|| {
        format!("{v:?} is not an http(s) URL; set it to the client-server API base, e.g. http://synapse:8008")
    })
}

fn parse_path(v: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(v.trim()))
}

fn parse_socket_address(v: &str) -> Result<SocketAddr, String> {
    v.trim().parse().map_err(|_| format!("{v:?} is not an address like 0.0.0.0:9000"))
}

/// A list of user ids or `@*:domain` patterns, comma-separated.
pub fn parse_users(v: &str) -> Result<AllowList, String> {
    AllowList::parse_list(v)
}

fn parse_text(v: &str) -> Result<String, String> {
    Ok(v.trim().to_owned())
}

fn parse_raw(v: &str) -> Result<String, String> {
    Ok(v.to_owned())
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        other => Err(format!("{other:?} is not a boolean; use true or false")),
    }
}

fn parse_secs(v: &str) -> Result<Duration, String> {
    v.trim().parse().map(Duration::from_secs).map_err(|_| format!("{v:?} is not a whole number of seconds"))
}

fn parse_count(v: &str) -> Result<u32, String> {
    v.trim().parse().map_err(|_| format!("{v:?} is not a whole number (0 = no limit)"))
}

/// How long before a timed stop the room is warned: a duration, or `off`.
pub fn parse_warning(v: &str) -> Result<Option<Duration>, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "off" | "0" | "none" => Ok(None),
        other => crate::calendar::parse_duration(other).map(Some).map_err(|m| format!("{m}, or off")),
    }
}

fn parse_choice<T: for<'de> Deserialize<'de>>(v: &str, choices: &str) -> Result<T, String> {
    serde_yaml::from_str(&v.trim().to_ascii_lowercase()).map_err(|_| format!("{v:?} is not one of {choices}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(s: &str) -> String {
        format!("`{s}`")
    }

    /// The README's Configuration table row for `about`: variable, file key, default.
    fn row(about: &About) -> [String; 3] {
        let env = match (about.env, about.alias) {
            (Some(e), Some(a)) => format!("{} (alias {})", code(e), code(a)),
            (Some(e), None) => code(e),
            (None, _) => "—".into(),
        };
        let key = about.key.map(code).unwrap_or_else(|| "—".into());
        let fallback = match about.fallback {
            Fallback::Value(v) => code(v),
            Fallback::Required => "(required)".into(),
            Fallback::Unset => "—".into(),
            Fallback::Derived(d) => d.into(),
        };
        [env, key, fallback]
    }

    #[test]
    fn the_readme_configuration_table_lists_every_setting_with_its_default() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let table: Vec<[String; 3]> = readme
            .lines()
            .skip_while(|l| !l.starts_with("| Variable | File key | Default |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
                [cells[0].to_owned(), cells[1].to_owned(), cells[2].to_owned()]
            })
            .collect();
        assert!(table.len() > 20, "the README's Configuration table was not found");
        for about in SETTINGS {
            let want = row(about);
            assert!(table.contains(&want), "README.md lacks the row {want:?}");
        }
        for r in &table {
            let ours = SETTINGS.iter().any(|a| row(a) == *r);
            let documented_elsewhere = r[0] == "`KUBECONFIG`" || r[1] == code(TARGETS_KEY);
            assert!(ours || documented_elsewhere, "README.md documents {r:?}, which is no setting");
        }
    }

    #[test]
    fn every_default_parses() {
        let env = BTreeMap::new();
        let src = Sources::new(&env, Mapping::new()).unwrap();
        src.value(&HOMESERVER).unwrap();
        src.value(&STATE_DIR).unwrap();
        src.value(&DEPLOYMENT_NAME).unwrap();
        src.value(&DEPLOYMENT_NAMESPACE).unwrap();
        assert!(!src.value(&ECHO_MODE).unwrap());
        src.value(&DISPLAY_NAME).unwrap();
        assert_eq!(src.value(&COMMAND_MAX_AGE).unwrap(), Duration::from_secs(300));
        src.value(&ROLLOUT_TIMEOUT).unwrap();
        src.value(&SLOW_NOTICE).unwrap();
        assert_eq!(src.value(&COMMANDS_PER_MINUTE).unwrap(), 10);
        assert_eq!(src.value(&UNAUTHORIZED_REPLY).unwrap(), RefusalMode::Silent);
        assert!(src.value(&LEAVE_ROOMS).unwrap());
        assert_eq!(src.value(&TRUST_POLICY).unwrap(), TrustPolicy::Tofu);
        assert!(!src.value(&REQUIRE_ENCRYPTION).unwrap());
        assert_eq!(src.value(&BARE_COMMANDS).unwrap(), BareCommands::Dm);
        src.value(&DECRYPTION_WAIT).unwrap();
        assert_eq!(src.value(&LOG_FILTER).unwrap(), "info");
        assert_eq!(src.value(&LOG_FORMAT).unwrap(), LogFormat::Text);
        let with_value = SETTINGS.iter().filter(|a| matches!(a.fallback, Fallback::Value(_))).count();
        assert_eq!(src.value(&TIMEZONE).unwrap(), jiff::tz::TimeZone::UTC);
        assert_eq!(src.value(&WARN_BEFORE).unwrap(), Some(Duration::from_secs(600)));
        assert_eq!(with_value, 20, "a new setting with a default: read it above");
    }

    #[test]
    fn the_environment_wins_then_the_alias_then_the_file() {
        let file: Mapping = serde_yaml::from_str("state_dir: /from/file\n").unwrap();
        let mut env = BTreeMap::new();
        assert_eq!(Sources::new(&env, file.clone()).unwrap().value(&STATE_DIR).unwrap(), PathBuf::from("/from/file"));
        env.insert("CRYPTO_STORE_PATH".to_owned(), "/from/alias".to_owned());
        assert_eq!(Sources::new(&env, file.clone()).unwrap().value(&STATE_DIR).unwrap(), PathBuf::from("/from/alias"));
        env.insert("STATE_DIR".to_owned(), "/from/env".to_owned());
        assert_eq!(Sources::new(&env, file.clone()).unwrap().value(&STATE_DIR).unwrap(), PathBuf::from("/from/env"));
        env.insert("STATE_DIR".to_owned(), "  ".to_owned());
        assert_eq!(
            Sources::new(&env, file).unwrap().value(&STATE_DIR).unwrap(),
            PathBuf::from("/from/alias"),
            "a blank variable counts as unset"
        );
    }

    #[test]
    fn a_bad_file_value_names_the_file_key_and_a_bad_variable_names_the_variable() {
        let env: BTreeMap<String, String> = [("ECHO_MODE".to_owned(), "perhaps".to_owned())].into();
        let file: Mapping = serde_yaml::from_str("slow_notice_secs: soon\necho_mode: true\n").unwrap();
        let src = Sources::new(&env, file).unwrap();
        let err = src.value(&SLOW_NOTICE).unwrap_err().to_string();
        assert!(err.starts_with("slow_notice_secs:") && err.contains("whole number of seconds"), "{err}");
        let err = src.value(&ECHO_MODE).unwrap_err().to_string();
        assert!(err.starts_with("ECHO_MODE:") && err.contains("true or false"), "{err}");
    }

    #[test]
    fn a_list_of_users_reads_the_same_from_the_file_and_the_environment() {
        let file: Mapping = serde_yaml::from_str("viewers: ['@bob:example.org', '@*:ops.example.org']\n").unwrap();
        let from_file = Sources::new(&BTreeMap::new(), file).unwrap().value(&VIEWERS).unwrap();
        let env: BTreeMap<String, String> =
            [("VIEWERS".to_owned(), "@bob:example.org, @*:ops.example.org".to_owned())].into();
        let from_env = Sources::new(&env, Mapping::new()).unwrap().value(&VIEWERS).unwrap();
        assert_eq!(from_file, from_env);
        assert_eq!(from_file.0.len(), 2);
        let nested: Mapping = serde_yaml::from_str("viewers: [[ '@bob:example.org' ]]\n").unwrap();
        let err = Sources::new(&BTreeMap::new(), nested).unwrap().value(&VIEWERS).unwrap_err().to_string();
        assert!(err.starts_with("viewers:"), "{err}");
    }

    #[test]
    fn an_unknown_file_key_is_refused_by_name() {
        let file: Mapping = serde_yaml::from_str("alowed_users: ['@a:b.c']\n").unwrap();
        let err = Sources::new(&BTreeMap::new(), file).err().unwrap();
        assert!(err.contains("alowed_users") && err.contains("README"), "{err}");
    }
}
