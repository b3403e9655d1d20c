//! Configuration: one struct from an optional YAML file and the environment, validated once.
//!
//! Environment variables win over the file. Every error names the setting and how to fix it.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ruma::{OwnedServerName, OwnedUserId};
use serde::Deserialize;
use url::Url;

use crate::{
    policy::AllowList,
    registration::{Registration, RegistrationError},
    secret::Secret,
};

/// Default homeserver URL, the same as the bot this replaces.
pub const DEFAULT_HOMESERVER: &str = "http://synapse.matrix.svc.cluster.local:8008";

/// A configuration error; the message names the setting and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting has a bad value or is missing.
    #[error("{setting}: {message}")]
    Invalid {
        /// The setting (environment variable name and file key).
        setting: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The configuration file could not be read or parsed.
    #[error("config file {path}: {message}")]
    File {
        /// The file's path.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The registration file is missing or wrong.
    #[error("REGISTRATION_PATH: {0}")]
    Registration(#[from] RegistrationError),
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Kind of workload a target scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Default)]
pub enum WorkloadKind {
    /// An apps/v1 Deployment.
    #[default]
    Deployment,
    /// An apps/v1 StatefulSet.
    StatefulSet,
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
        })
    }
}

/// What to do when someone who is not allowed sends a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RefusalMode {
    /// Say nothing (the old bot's behaviour).
    #[default]
    Silent,
    /// One short refusal per room per hour.
    Hourly,
}

/// Which devices may command in encrypted rooms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TrustPolicy {
    /// Trust on first use: the first identity seen for a user is pinned.
    #[default]
    Tofu,
    /// Only devices cross-signed by their owner.
    CrossSigned,
}

/// Where commands need not be addressed to the bot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BareCommands {
    /// Only in direct chats (the bot and one person); elsewhere `!toggle stop`, a mention or
    /// `toggle: stop`.
    #[default]
    Dm,
    /// In every room (the old bot's behaviour): a bare `stop` said to a colleague is obeyed.
    Always,
}

/// One workload the bot can switch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Name used in commands (`start web`).
    pub name: String,
    /// Deployment or StatefulSet.
    pub kind: WorkloadKind,
    /// Namespace of the workload.
    pub namespace: String,
    /// Name of the workload object.
    pub workload: String,
    /// Upper bound for `start <target> <replicas>`.
    pub max_replicas: i32,
    /// Narrows `ALLOWED_USERS` for this target (None = everyone allowed globally).
    pub allowed_users: Option<AllowList>,
    /// Who may see this target without operating it, instead of `VIEWERS` (None = `VIEWERS`).
    pub viewers: Option<AllowList>,
}

impl Target {
    /// A target named `name` switching the Deployment of that name in `namespace`, with the
    /// defaults (10 replicas at most, no narrower lists); change it with the `with_` methods.
    pub fn deployment(name: &str, namespace: &str) -> Self {
        Target {
            name: name.to_ascii_lowercase(),
            kind: WorkloadKind::Deployment,
            namespace: namespace.to_owned(),
            workload: name.to_owned(),
            max_replicas: DEFAULT_MAX_REPLICAS,
            allowed_users: None,
            viewers: None,
        }
    }

    /// The same target, switching a workload of `kind`.
    pub fn with_kind(mut self, kind: WorkloadKind) -> Self {
        self.kind = kind;
        self
    }

    /// The same target, switching the workload named `workload`.
    pub fn with_workload(mut self, workload: &str) -> Self {
        self.workload = workload.to_owned();
        self
    }
}

/// The validated configuration.
#[derive(Clone)]
pub struct Config {
    /// Client-server API base URL.
    pub homeserver: Url,
    /// The homeserver's server name (the part after `:` in user ids).
    pub server_name: OwnedServerName,
    /// Path of the registration file.
    pub registration_path: PathBuf,
    /// The registration (tokens, id, sender localpart).
    pub registration: Registration,
    /// The bot's user id.
    pub bot_user_id: OwnedUserId,
    /// Where the HTTP server listens.
    pub listen_address: SocketAddr,
    /// Directory for all persistent state.
    pub state_dir: PathBuf,
    /// Users allowed to command.
    pub allowed_users: AllowList,
    /// Users who may only look: `status`, `list`, `help`.
    pub viewers: AllowList,
    /// The workloads that can be switched.
    pub targets: Vec<Target>,
    /// Whether to echo `🦞 <message>` before answering.
    pub echo_mode: bool,
    /// Display name of the bot.
    pub display_name: String,
    /// Commands older than this when they are about to run are reported, not run.
    pub command_max_age: Duration,
    /// How long to watch a workload after start/stop before reporting.
    pub rollout_timeout: Duration,
    /// How long an encrypted command waits for its room key before the sender is told.
    pub decryption_wait: Duration,
    /// What to tell users who are not allowed.
    pub refusal: RefusalMode,
    /// Commands a user may send per minute (0 = no limit).
    pub commands_per_minute: u32,
    /// Whether to leave rooms where no allowed user is left.
    pub leave_rooms_without_allowed_users: bool,
    /// After how long a slow Kubernetes call is announced as "still trying".
    pub slow_notice: Duration,
    /// Which devices may command in encrypted rooms.
    pub trust_policy: TrustPolicy,
    /// Whether commands in unencrypted rooms are refused too.
    pub require_encryption: bool,
    /// Where commands need not be addressed to the bot.
    pub bare_commands: BareCommands,
    /// Passphrase of the crypto store, if given.
    pub crypto_store_passphrase: Option<Secret>,
    /// Log filter (tracing `EnvFilter` syntax).
    pub log_filter: String,
    /// Log output format.
    pub log_format: LogFormat,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("homeserver", &self.homeserver.as_str())
            .field("server_name", &self.server_name)
            .field("registration_path", &self.registration_path)
            .field("registration", &self.registration)
            .field("bot_user_id", &self.bot_user_id)
            .field("listen_address", &self.listen_address)
            .field("state_dir", &self.state_dir)
            .field("allowed_users", &self.allowed_users)
            .field("viewers", &self.viewers)
            .field("targets", &self.targets)
            .field("echo_mode", &self.echo_mode)
            .field("command_max_age", &self.command_max_age)
            .field("rollout_timeout", &self.rollout_timeout)
            .field("decryption_wait", &self.decryption_wait)
            .field("refusal", &self.refusal)
            .field("commands_per_minute", &self.commands_per_minute)
            .field("leave_rooms_without_allowed_users", &self.leave_rooms_without_allowed_users)
            .field("slow_notice", &self.slow_notice)
            .field("trust_policy", &self.trust_policy)
            .field("require_encryption", &self.require_encryption)
            .field("bare_commands", &self.bare_commands)
            .field("crypto_store_passphrase", &self.crypto_store_passphrase)
            .field("log_format", &self.log_format)
            .finish()
    }
}

/// A target as written in the config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    #[serde(default)]
    kind: WorkloadKind,
    namespace: Option<String>,
    workload: Option<String>,
    max_replicas: Option<i32>,
    allowed_users: Option<Vec<String>>,
    viewers: Option<Vec<String>>,
}

/// The config file: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    homeserver: Option<String>,
    server_name: Option<String>,
    registration_path: Option<PathBuf>,
    listen_address: Option<String>,
    state_dir: Option<PathBuf>,
    allowed_users: Option<Vec<String>>,
    viewers: Option<Vec<String>>,
    deployment_name: Option<String>,
    deployment_namespace: Option<String>,
    targets: Option<Vec<RawTarget>>,
    echo_mode: Option<bool>,
    display_name: Option<String>,
    command_max_age_secs: Option<u64>,
    rollout_timeout_secs: Option<u64>,
    decryption_wait_secs: Option<u64>,
    commands_per_minute: Option<u32>,
    leave_rooms_without_allowed_users: Option<bool>,
    slow_notice_secs: Option<u64>,
    unauthorized_reply: Option<RefusalMode>,
    trust_policy: Option<TrustPolicy>,
    require_encryption: Option<bool>,
    bare_commands: Option<BareCommands>,
    crypto_store_passphrase_file: Option<PathBuf>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
}

/// Default upper bound for `start <replicas>`.
pub const DEFAULT_MAX_REPLICAS: i32 = 10;

fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { setting, message: message.into() }
}

fn parse_bool(setting: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        other => Err(invalid(setting, format!("{other:?} is not a boolean; use true or false"))),
    }
}

fn parse_secs(setting: &'static str, v: &str) -> Result<u64, ConfigError> {
    v.trim().parse().map_err(|_| invalid(setting, format!("{v:?} is not a whole number of seconds")))
}

/// A list of user patterns from the environment (comma-separated) or else the file (a YAML
/// list); `None` when neither has it. One parser for every list of users.
fn user_list(env: Option<&str>, file: Option<Vec<String>>) -> Result<Option<AllowList>, String> {
    match (env, file) {
        (Some(s), _) => AllowList::parse_list(s).map(Some),
        (None, Some(list)) => list.iter().map(|s| s.parse()).collect::<Result<_, _>>().map(|l| Some(AllowList(l))),
        (None, None) => Ok(None),
    }
}

fn parse_enum<T: for<'de> Deserialize<'de>>(setting: &'static str, v: &str, choices: &str) -> Result<T, ConfigError> {
    serde_yaml::from_str(&v.trim().to_ascii_lowercase())
        .map_err(|_| invalid(setting, format!("{v:?} is not one of {choices}")))
}

impl Config {
    /// Loads the configuration from the process environment and an optional file.
    pub fn from_env(config_path: Option<&Path>) -> Result<Self, ConfigError> {
        let vars: BTreeMap<String, String> = std::env::vars().collect();
        Self::load(config_path, &vars)
    }

    /// Loads the configuration from `env` (variable → value) and an optional file.
    pub fn load(config_path: Option<&Path>, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let get = |k: &str| env.get(k).map(String::as_str).filter(|v| !v.trim().is_empty());
        let path = config_path.map(Path::to_path_buf).or_else(|| get("CONFIG_PATH").map(PathBuf::from));
        let raw = match &path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::File {
                    path: p.display().to_string(),
                    message: format!("{e}; fix CONFIG_PATH / --config or create the file"),
                })?;
                serde_yaml::from_str::<Option<RawConfig>>(&text)
                    .map_err(|e| ConfigError::File { path: p.display().to_string(), message: e.to_string() })?
                    .unwrap_or_default()
            }
            None => RawConfig::default(),
        };

        let homeserver_s = get("MATRIX_HOMESERVER")
            .map(str::to_owned)
            .or(raw.homeserver)
            .unwrap_or_else(|| DEFAULT_HOMESERVER.to_owned());
        let homeserver = Url::parse(homeserver_s.trim())
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| invalid("MATRIX_HOMESERVER", format!("{homeserver_s:?} is not an http(s) URL; set it to the client-server API base, e.g. http://synapse:8008")))?;

        let server_name_s = get("MATRIX_SERVER_NAME").map(str::to_owned).or(raw.server_name).ok_or_else(|| {
            invalid(
                "MATRIX_SERVER_NAME",
                "not set; set it to your homeserver's server name (the part after ':' in user ids, e.g. example.org)",
            )
        })?;
        let server_name = crate::registration::parse_server_name(server_name_s.trim())
            .map_err(|m| invalid("MATRIX_SERVER_NAME", m))?;

        let registration_path =
            get("REGISTRATION_PATH").map(PathBuf::from).or(raw.registration_path).ok_or_else(|| {
                invalid(
                    "REGISTRATION_PATH",
                    "not set; point it at the registration yaml made by `matrix-k8s-toggle generate-registration`",
                )
            })?;
        let registration = Registration::load(&registration_path)?;
        let bot_user_id = registration.bot_user_id(&server_name).map_err(|m| invalid("REGISTRATION_PATH", m))?;

        let listen_address = match get("LISTEN_ADDRESS").map(str::to_owned).or(raw.listen_address) {
            Some(s) => s
                .trim()
                .parse()
                .map_err(|_| invalid("LISTEN_ADDRESS", format!("{s:?} is not an address like 0.0.0.0:9000")))?,
            None => SocketAddr::from(([0, 0, 0, 0], registration.url_port())),
        };

        let state_dir = get("STATE_DIR")
            .or_else(|| get("CRYPTO_STORE_PATH"))
            .map(PathBuf::from)
            .or(raw.state_dir)
            .unwrap_or_else(|| PathBuf::from("/data"));

        let allowed_users = user_list(get("ALLOWED_USERS"), raw.allowed_users)
            .map_err(|m| invalid("ALLOWED_USERS", m))?
            .unwrap_or_default();
        let viewers = user_list(get("VIEWERS"), raw.viewers).map_err(|m| invalid("VIEWERS", m))?.unwrap_or_default();
        if allowed_users.is_empty() {
            return Err(invalid(
                "ALLOWED_USERS",
                "empty: nobody could command the bot; set it to full user ids or @*:domain, comma-separated",
            ));
        }

        let targets = match raw.targets {
            Some(list) if get("DEPLOYMENT_NAME").is_none() => {
                let mut seen = std::collections::HashSet::new();
                let mut out = Vec::new();
                for t in list {
                    let name = t.name.trim().to_ascii_lowercase();
                    if name.is_empty() || name.contains(char::is_whitespace) {
                        return Err(invalid("targets", format!("target name {:?} must be one word", t.name)));
                    }
                    if !seen.insert(name.clone()) {
                        return Err(invalid("targets", format!("target name {name:?} is used twice")));
                    }
                    let allowed = user_list(None, t.allowed_users)
                        .map_err(|m| invalid("targets", format!("{name}: allowed_users: {m}")))?;
                    let target_viewers =
                        user_list(None, t.viewers).map_err(|m| invalid("targets", format!("{name}: viewers: {m}")))?;
                    let max_replicas = t.max_replicas.unwrap_or(DEFAULT_MAX_REPLICAS);
                    if max_replicas < 1 {
                        return Err(invalid("targets", format!("{name}: max_replicas must be at least 1")));
                    }
                    out.push(Target {
                        workload: t.workload.unwrap_or_else(|| name.clone()),
                        namespace: t.namespace.unwrap_or_else(|| "default".into()),
                        name,
                        kind: t.kind,
                        max_replicas,
                        allowed_users: allowed,
                        viewers: target_viewers,
                    });
                }
                if out.is_empty() {
                    return Err(invalid("targets", "the list is empty; name at least one workload or remove the key"));
                }
                out
            }
            _ => {
                let workload = get("DEPLOYMENT_NAME")
                    .map(str::to_owned)
                    .or(raw.deployment_name)
                    .unwrap_or_else(|| "clawdbot".into());
                let namespace = get("DEPLOYMENT_NAMESPACE")
                    .map(str::to_owned)
                    .or(raw.deployment_namespace)
                    .unwrap_or_else(|| "clawdbot".into());
                vec![Target::deployment(workload.trim(), namespace.trim())]
            }
        };

        let echo_mode = match get("ECHO_MODE") {
            Some(v) => parse_bool("ECHO_MODE", v)?,
            None => raw.echo_mode.unwrap_or(false),
        };
        let display_name = get("BOT_DISPLAY_NAME")
            .map(str::to_owned)
            .or(raw.display_name)
            .unwrap_or_else(|| "Kubernetes toggle".into());
        let command_max_age = Duration::from_secs(match get("COMMAND_MAX_AGE_SECS") {
            Some(v) => parse_secs("COMMAND_MAX_AGE_SECS", v)?,
            None => raw.command_max_age_secs.unwrap_or(300),
        });
        let rollout_timeout = Duration::from_secs(match get("ROLLOUT_TIMEOUT_SECS") {
            Some(v) => parse_secs("ROLLOUT_TIMEOUT_SECS", v)?,
            None => raw.rollout_timeout_secs.unwrap_or(120),
        });
        let decryption_wait = Duration::from_secs(match get("DECRYPTION_WAIT_SECS") {
            Some(v) => parse_secs("DECRYPTION_WAIT_SECS", v)?,
            None => raw.decryption_wait_secs.unwrap_or(30),
        });
        let commands_per_minute = match get("COMMANDS_PER_MINUTE") {
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| invalid("COMMANDS_PER_MINUTE", format!("{v:?} is not a whole number (0 = no limit)")))?,
            None => raw.commands_per_minute.unwrap_or(10),
        };
        let leave_rooms_without_allowed_users = match get("LEAVE_ROOMS_WITHOUT_ALLOWED_USERS") {
            Some(v) => parse_bool("LEAVE_ROOMS_WITHOUT_ALLOWED_USERS", v)?,
            None => raw.leave_rooms_without_allowed_users.unwrap_or(true),
        };
        let slow_notice = Duration::from_secs(match get("SLOW_NOTICE_SECS") {
            Some(v) => parse_secs("SLOW_NOTICE_SECS", v)?,
            None => raw.slow_notice_secs.unwrap_or(5),
        });
        let refusal = match get("UNAUTHORIZED_REPLY") {
            Some(v) => parse_enum("UNAUTHORIZED_REPLY", v, "silent, hourly")?,
            None => raw.unauthorized_reply.unwrap_or_default(),
        };
        let trust_policy = match get("TRUST_POLICY") {
            Some(v) => parse_enum("TRUST_POLICY", v, "tofu, cross-signed")?,
            None => raw.trust_policy.unwrap_or_default(),
        };
        let require_encryption = match get("REQUIRE_ENCRYPTION") {
            Some(v) => parse_bool("REQUIRE_ENCRYPTION", v)?,
            None => raw.require_encryption.unwrap_or(false),
        };
        let bare_commands = match get("BARE_COMMANDS") {
            Some(v) => parse_enum("BARE_COMMANDS", v, "dm, always")?,
            None => raw.bare_commands.unwrap_or_default(),
        };
        let passphrase_file =
            get("CRYPTO_STORE_PASSPHRASE_FILE").map(PathBuf::from).or(raw.crypto_store_passphrase_file);
        let crypto_store_passphrase = match (get("CRYPTO_STORE_PASSPHRASE"), passphrase_file) {
            (Some(p), _) => Some(Secret::new(p.to_owned())),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(&f).map_err(|e| {
                    invalid("CRYPTO_STORE_PASSPHRASE_FILE", format!("cannot read {}: {e}", f.display()))
                })?;
                let p = text.trim_end_matches(['\n', '\r']).to_owned();
                if p.is_empty() {
                    return Err(invalid("CRYPTO_STORE_PASSPHRASE_FILE", format!("{} is empty", f.display())));
                }
                Some(Secret::new(p))
            }
            (None, None) => None,
        };
        let log_filter = get("RUST_LOG").map(str::to_owned).or(raw.log_level).unwrap_or_else(|| "info".into());
        let log_format = match get("LOG_FORMAT") {
            Some(v) => parse_enum("LOG_FORMAT", v, "text, json")?,
            None => raw.log_format.unwrap_or_default(),
        };

        Ok(Config {
            homeserver,
            server_name,
            registration_path,
            registration,
            bot_user_id,
            listen_address,
            state_dir,
            allowed_users,
            viewers,
            targets,
            echo_mode,
            display_name,
            command_max_age,
            rollout_timeout,
            decryption_wait,
            refusal,
            commands_per_minute,
            leave_rooms_without_allowed_users,
            slow_notice,
            trust_policy,
            require_encryption,
            bare_commands,
            crypto_store_passphrase,
            log_filter,
            log_format,
        })
    }

    /// The target named `name` (case-insensitive).
    pub fn target(&self, name: &str) -> Option<&Target> {
        let name = name.to_ascii_lowercase();
        self.targets.iter().find(|t| t.name == name)
    }
}

/// Configurations for unit tests elsewhere in the crate.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Writes a generated registration for `example.org`, url port 9123, into `dir`.
    pub(crate) fn registration(dir: &Path) -> PathBuf {
        let reg = Registration::generate(
            "k8s-toggle",
            &Url::parse("http://127.0.0.1:9123").unwrap(),
            &crate::registration::parse_server_name("example.org").unwrap(),
            "toggle",
        )
        .unwrap();
        let path = dir.join("registration.yaml");
        std::fs::write(&path, reg.to_yaml()).unwrap();
        path
    }

    /// A configuration for server `example.org` from the YAML `file` and the variables `env`,
    /// with a generated registration.
    pub(crate) fn config(file: &str, env: &[(&str, &str)]) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let reg_path = registration(dir.path());
        let file_path = dir.path().join("config.yaml");
        std::fs::write(&file_path, file).unwrap();
        let mut vars = BTreeMap::new();
        vars.insert("MATRIX_SERVER_NAME".to_owned(), "example.org".to_owned());
        vars.insert("REGISTRATION_PATH".to_owned(), reg_path.display().to_string());
        for (k, v) in env {
            vars.insert((*k).to_owned(), (*v).to_owned());
        }
        Config::load(Some(&file_path), &vars).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
        env: BTreeMap<String, String>,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let reg_path = testing::registration(dir.path());
            let mut env = BTreeMap::new();
            env.insert("MATRIX_HOMESERVER".into(), "http://127.0.0.1:8008".into());
            env.insert("MATRIX_SERVER_NAME".into(), "example.org".into());
            env.insert("REGISTRATION_PATH".into(), reg_path.display().to_string());
            env.insert("ALLOWED_USERS".into(), "@alice:example.org".into());
            Fixture { dir, env }
        }

        fn with(mut self, k: &str, v: &str) -> Self {
            self.env.insert(k.into(), v.into());
            self
        }

        fn without(mut self, k: &str) -> Self {
            self.env.remove(k);
            self
        }

        fn file(&self, yaml: &str) -> PathBuf {
            let p = self.dir.path().join("config.yaml");
            std::fs::write(&p, yaml).unwrap();
            p
        }

        fn load(&self) -> Result<Config, ConfigError> {
            Config::load(None, &self.env)
        }
    }

    #[test]
    fn environment_and_registration_alone_are_enough() {
        let c = Fixture::new().load().unwrap();
        assert_eq!(c.listen_address, "0.0.0.0:9123".parse().unwrap());
        assert_eq!(c.bot_user_id.as_str(), "@toggle:example.org");
        assert_eq!(c.targets.len(), 1);
        assert_eq!(c.targets[0].workload, "clawdbot");
        assert_eq!(c.targets[0].namespace, "clawdbot");
        assert!(!c.echo_mode);
        assert!(!c.require_encryption, "REQUIRE_ENCRYPTION is off unless set");
        assert_eq!(c.bare_commands, BareCommands::Dm, "group rooms need an address unless set");
    }

    #[test]
    fn viewers_come_from_the_environment_or_the_file_and_per_target() {
        let c = testing::config(
            "allowed_users: ['@alice:example.org']\nviewers: ['@*:example.org']\ntargets:\n  - name: web\n    viewers: ['@bob:example.org']\n  - name: db\n",
            &[],
        );
        assert_eq!(c.viewers, AllowList::parse_list("@*:example.org").unwrap());
        assert_eq!(c.targets[0].viewers, Some(AllowList::parse_list("@bob:example.org").unwrap()));
        assert_eq!(c.targets[1].viewers, None);
        let c = Fixture::new().with("VIEWERS", "@carol:example.org, @*:ops.example.org").load().unwrap();
        assert_eq!(c.viewers.0.len(), 2);
        let err = Fixture::new().with("VIEWERS", "carol").load().unwrap_err().to_string();
        assert!(err.starts_with("VIEWERS:") && err.contains("@alice:example.org"), "{err}");
    }

    #[test]
    fn require_encryption_and_bare_commands_are_read_from_the_environment_and_checked() {
        let c = Fixture::new().with("REQUIRE_ENCRYPTION", "true").with("BARE_COMMANDS", "Always").load().unwrap();
        assert!(c.require_encryption);
        assert_eq!(c.bare_commands, BareCommands::Always);
        let err = Fixture::new().with("BARE_COMMANDS", "never").load().unwrap_err().to_string();
        assert!(err.starts_with("BARE_COMMANDS:") && err.contains("dm, always"), "{err}");
    }

    #[test]
    fn a_missing_server_name_is_named_with_the_fix() {
        let err = Fixture::new().without("MATRIX_SERVER_NAME").load().unwrap_err().to_string();
        assert!(err.starts_with("MATRIX_SERVER_NAME:"), "{err}");
        assert!(err.contains("set it"), "{err}");
    }

    #[test]
    fn a_missing_registration_file_is_named() {
        let err = Fixture::new().with("REGISTRATION_PATH", "/nonexistent/reg.yaml").load().unwrap_err().to_string();
        assert!(err.starts_with("REGISTRATION_PATH:"), "{err}");
    }

    #[test]
    fn empty_allowed_users_are_refused() {
        let err = Fixture::new().with("ALLOWED_USERS", " , ").load().unwrap_err().to_string();
        assert!(err.starts_with("ALLOWED_USERS:"), "{err}");
    }

    #[test]
    fn crypto_store_path_is_accepted_as_state_dir() {
        let c = Fixture::new().with("CRYPTO_STORE_PATH", "/var/lib/toggle").load().unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/toggle"));
        let c = Fixture::new().with("CRYPTO_STORE_PATH", "/a").with("STATE_DIR", "/b").load().unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/b"));
    }

    #[test]
    fn environment_wins_over_the_file() {
        let f = Fixture::new().with("DEPLOYMENT_NAMESPACE", "prod");
        let p = f.file("deployment_namespace: staging\ndeployment_name: web\necho_mode: true\n");
        let c = Config::load(Some(&p), &f.env).unwrap();
        assert_eq!(c.targets[0].namespace, "prod");
        assert_eq!(c.targets[0].workload, "web");
        assert!(c.echo_mode);
    }

    #[test]
    fn the_file_can_name_several_targets() {
        let f = Fixture::new();
        let p = f.file(
            "targets:\n  - {name: Web, namespace: apps, max_replicas: 3}\n  - {name: db, kind: StatefulSet, namespace: data, workload: postgres, allowed_users: ['@dba:example.org']}\n",
        );
        let c = Config::load(Some(&p), &f.env).unwrap();
        assert_eq!(c.targets.len(), 2);
        assert_eq!(c.target("WEB").unwrap().workload, "web");
        let db = c.target("db").unwrap();
        assert_eq!(db.kind, WorkloadKind::StatefulSet);
        assert_eq!(db.workload, "postgres");
        assert_eq!(db.max_replicas, DEFAULT_MAX_REPLICAS);
        assert!(db.allowed_users.is_some());
    }

    #[test]
    fn an_unknown_file_key_is_refused() {
        let f = Fixture::new();
        let p = f.file("alowed_users: ['@a:b.c']\n");
        let err = Config::load(Some(&p), &f.env).unwrap_err().to_string();
        assert!(err.contains("alowed_users"), "{err}");
    }

    #[test]
    fn a_bad_boolean_names_the_setting() {
        let err = Fixture::new().with("ECHO_MODE", "maybe").load().unwrap_err().to_string();
        assert!(err.starts_with("ECHO_MODE:"), "{err}");
    }

    #[test]
    fn debug_output_hides_every_secret() {
        let f = Fixture::new().with("CRYPTO_STORE_PASSPHRASE", "correct horse battery");
        let c = f.load().unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("correct horse battery"));
        assert!(!debug.contains(c.registration.as_token.expose()));
        assert!(!debug.contains(c.registration.hs_token.expose()));
    }

    #[test]
    fn log_format_accepts_json_and_refuses_others() {
        assert_eq!(Fixture::new().with("LOG_FORMAT", "JSON").load().unwrap().log_format, LogFormat::Json);
        let err = Fixture::new().with("LOG_FORMAT", "xml").load().unwrap_err().to_string();
        assert!(err.starts_with("LOG_FORMAT:"), "{err}");
    }
}
