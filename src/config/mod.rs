//! Configuration: one struct from an optional YAML file and the environment, validated once.
//!
//! Environment variables win over the file. Every error names the setting and how to fix it.
//! Which settings there are, their names, defaults and parsers: [`settings`].

pub mod settings;

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

use jiff::tz::TimeZone;

use crate::{
    calendar::{self, Schedule},
    policy::AllowList,
    registration::{Registration, RegistrationError},
    secret::Secret,
};
use settings::*;

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
    /// The longest a chat `start` keeps it on (None = no limit).
    pub max_on: Option<Duration>,
    /// How long before a timed stop the room is warned (None = no warning).
    pub warn_before: Option<Duration>,
    /// When it is switched on and off by itself.
    pub schedule: Option<Schedule>,
    /// Whether a change of its replicas by someone else is posted to its room.
    pub drift_notices: bool,
    /// What else scales it, for the bridge to work with instead of against (None: nothing).
    pub autoscaler: Option<Autoscaler>,
}

/// An autoscaler beside the bridge, named per target because reading or pausing it needs
/// permissions of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Autoscaler {
    /// A HorizontalPodAutoscaler may target the workload: `status`, `stop` and `start` say what
    /// it does (it rests while the workload is at zero and takes over again after a start).
    Hpa,
    /// The KEDA ScaledObject of this name scales the workload: `stop` pauses it at zero with
    /// `autoscaling.keda.sh/paused-replicas`, `start` resumes it.
    Keda {
        /// The ScaledObject's name, in the target's namespace.
        scaled_object: String,
    },
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
            max_on: None,
            warn_before: Some(Duration::from_secs(600)),
            schedule: None,
            drift_notices: true,
            autoscaler: None,
        }
    }

    /// The same target, beside `autoscaler`.
    pub fn with_autoscaler(mut self, autoscaler: Autoscaler) -> Self {
        self.autoscaler = Some(autoscaler);
        self
    }

    /// The same target, kept on at most `max_on` by a chat `start`.
    pub fn with_max_on(mut self, max_on: Duration) -> Self {
        self.max_on = Some(max_on);
        self
    }

    /// The same target, switched on and off by `schedule`.
    pub fn with_schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = Some(schedule);
        self
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
    /// The time zone of times said in chat (`until 18:00`), of replies, and of schedules
    /// that name none.
    pub timezone: TimeZone,
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
            .field("timezone", &self.timezone)
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
    max_on: Option<String>,
    warn_before: Option<String>,
    schedule: Option<RawSchedule>,
    drift_notices: Option<bool>,
    autoscaler: Option<String>,
    scaled_object: Option<String>,
}

/// A target's schedule as written in the config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    on: OneOrMany,
    off: OneOrMany,
    timezone: Option<String>,
}

/// One schedule entry, or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Default upper bound for `start <replicas>`.
pub const DEFAULT_MAX_REPLICAS: i32 = 10;

fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { setting, message: message.into() }
}

/// The config file's top-level mapping (empty without a file).
fn read_file(path: Option<&Path>) -> Result<serde_yaml::Mapping, ConfigError> {
    let Some(p) = path else { return Ok(serde_yaml::Mapping::new()) };
    let file_error = |message: String| ConfigError::File { path: p.display().to_string(), message };
    let text = std::fs::read_to_string(p)
        .map_err(|e| file_error(format!("{e}; fix CONFIG_PATH / --config or create the file")))?;
    match serde_yaml::from_str::<serde_yaml::Value>(&text).map_err(|e| file_error(e.to_string()))? {
        serde_yaml::Value::Null => Ok(serde_yaml::Mapping::new()),
        serde_yaml::Value::Mapping(m) => Ok(m),
        _ => Err(file_error("the file must be a mapping of keys to values".into())),
    }
}

/// The targets under the file key `targets`, checked: one-word unique names, a sane
/// `max_replicas`, lists of users parsed as everywhere else.
fn targets_from_file(
    value: &serde_yaml::Value,
    timezone: &TimeZone,
    warn_before: Option<Duration>,
) -> Result<Vec<Target>, ConfigError> {
    let list: Vec<RawTarget> =
        serde_yaml::from_value(value.clone()).map_err(|e| invalid(TARGETS_KEY, e.to_string()))?;
    let users = |name: &str, what: &str, list: Option<Vec<String>>| {
        list.map(|l| settings::parse_users(&l.join(",")))
            .transpose()
            .map_err(|m| invalid(TARGETS_KEY, format!("{name}: {what}: {m}")))
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for t in list {
        let name = t.name.trim().to_ascii_lowercase();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(invalid(TARGETS_KEY, format!("target name {:?} must be one word", t.name)));
        }
        if name == "for" || name == "until" {
            return Err(invalid(
                TARGETS_KEY,
                format!("target name {name:?} is a word of `start … for 2h | until 18:00`; choose another"),
            ));
        }
        if !seen.insert(name.clone()) {
            return Err(invalid(TARGETS_KEY, format!("target name {name:?} is used twice")));
        }
        let max_replicas = t.max_replicas.unwrap_or(DEFAULT_MAX_REPLICAS);
        if max_replicas < 1 {
            return Err(invalid(TARGETS_KEY, format!("{name}: max_replicas must be at least 1")));
        }
        let duration = |what: &str, text: Option<String>| {
            text.map(|d| calendar::parse_duration(&d))
                .transpose()
                .map_err(|m| invalid(TARGETS_KEY, format!("{name}: {what}: {m}")))
        };
        let max_on = duration("max_on", t.max_on)?;
        let warn_before = match t.warn_before {
            Some(w) => {
                settings::parse_warning(&w).map_err(|m| invalid(TARGETS_KEY, format!("{name}: warn_before: {m}")))?
            }
            None => warn_before,
        };
        let schedule = match t.schedule {
            Some(raw) => {
                let tz = match &raw.timezone {
                    Some(zone) => calendar::time_zone(zone)
                        .map_err(|m| invalid(TARGETS_KEY, format!("{name}: schedule: timezone: {m}")))?,
                    None => timezone.clone(),
                };
                Some(
                    Schedule::new(&raw.on.into_vec(), &raw.off.into_vec(), tz)
                        .map_err(|m| invalid(TARGETS_KEY, format!("{name}: schedule: {m}")))?,
                )
            }
            None => None,
        };
        let autoscaler = match (t.autoscaler.as_deref(), t.scaled_object) {
            (None, None) => None,
            (Some("hpa"), None) => Some(Autoscaler::Hpa),
            (Some("keda"), scaled_object) => Some(Autoscaler::Keda {
                scaled_object: scaled_object.unwrap_or_else(|| t.workload.clone().unwrap_or_else(|| name.clone())),
            }),
            (Some("hpa") | None, Some(_)) => {
                return Err(invalid(TARGETS_KEY, format!("{name}: scaled_object needs `autoscaler: keda`")));
            }
            (Some(other), _) => {
                return Err(invalid(TARGETS_KEY, format!("{name}: autoscaler {other:?} is not `hpa` or `keda`")));
            }
        };
        out.push(Target {
            autoscaler,
            drift_notices: t.drift_notices.unwrap_or(true),
            max_on,
            warn_before,
            schedule,
            allowed_users: users(&name, "allowed_users", t.allowed_users)?,
            viewers: users(&name, "viewers", t.viewers)?,
            workload: t.workload.unwrap_or_else(|| name.clone()),
            namespace: t.namespace.unwrap_or_else(|| "default".into()),
            name,
            kind: t.kind,
            max_replicas,
        });
    }
    if out.is_empty() {
        return Err(invalid(TARGETS_KEY, "the list is empty; name at least one workload or remove the key"));
    }
    Ok(out)
}

/// The passphrase of the crypto store: the variable, else the file it names, else none.
fn passphrase(src: &Sources<'_>) -> Result<Option<Secret>, ConfigError> {
    if let Some(p) = src.get(&PASSPHRASE)? {
        return Ok(Some(Secret::new(p)));
    }
    let Some(f) = src.get(&PASSPHRASE_FILE)? else { return Ok(None) };
    let name = PASSPHRASE_FILE.about.name();
    let text = std::fs::read_to_string(&f).map_err(|e| invalid(name, format!("cannot read {}: {e}", f.display())))?;
    let p = text.trim_end_matches(['\n', '\r']).to_owned();
    if p.is_empty() {
        return Err(invalid(name, format!("{} is empty", f.display())));
    }
    Ok(Some(Secret::new(p)))
}

impl Config {
    /// Loads the configuration from the process environment and an optional file.
    pub fn from_env(config_path: Option<&Path>) -> Result<Self, ConfigError> {
        let vars: BTreeMap<String, String> = std::env::vars().collect();
        Self::load(config_path, &vars)
    }

    /// Loads the configuration from `env` (variable → value) and an optional file, setting by
    /// setting from [`settings`].
    pub fn load(config_path: Option<&Path>, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let path = config_path
            .map(Path::to_path_buf)
            .or_else(|| env.get("CONFIG_PATH").filter(|v| !v.trim().is_empty()).map(PathBuf::from));
        let src = Sources::new(env, read_file(path.as_deref())?).map_err(|message| ConfigError::File {
            path: path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            message,
        })?;

        let server_name = src.required(
            &SERVER_NAME,
            "set it to your homeserver's server name (the part after ':' in user ids, e.g. example.org)",
        )?;
        let registration_path = src.required(
            &REGISTRATION_PATH,
            "point it at the registration yaml made by `matrix-k8s-toggle generate-registration`",
        )?;
        let registration = Registration::load(&registration_path)?;
        let bot_user_id = registration.bot_user_id(&server_name).map_err(|m| invalid("REGISTRATION_PATH", m))?;
        let listen_address =
            src.get(&LISTEN_ADDRESS)?.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], registration.url_port())));

        let allowed_users = src.get(&ALLOWED_USERS)?.unwrap_or_default();
        if allowed_users.is_empty() {
            return Err(invalid(
                "ALLOWED_USERS",
                "empty: nobody could command the bot; set it to full user ids or @*:domain, comma-separated",
            ));
        }

        let timezone = src.value(&TIMEZONE)?;
        let warn_before = src.value(&WARN_BEFORE)?;
        let targets = match src.file_value(TARGETS_KEY) {
            Some(list) if src.env("DEPLOYMENT_NAME").is_none() => targets_from_file(list, &timezone, warn_before)?,
            _ => {
                let mut target = Target::deployment(&src.value(&DEPLOYMENT_NAME)?, &src.value(&DEPLOYMENT_NAMESPACE)?);
                target.warn_before = warn_before;
                vec![target]
            }
        };

        Ok(Config {
            homeserver: src.value(&HOMESERVER)?,
            server_name,
            registration_path,
            registration,
            bot_user_id,
            listen_address,
            state_dir: src.value(&STATE_DIR)?,
            allowed_users,
            viewers: src.get(&VIEWERS)?.unwrap_or_default(),
            targets,
            echo_mode: src.value(&ECHO_MODE)?,
            display_name: src.value(&DISPLAY_NAME)?,
            command_max_age: src.value(&COMMAND_MAX_AGE)?,
            rollout_timeout: src.value(&ROLLOUT_TIMEOUT)?,
            decryption_wait: src.value(&DECRYPTION_WAIT)?,
            timezone,
            refusal: src.value(&UNAUTHORIZED_REPLY)?,
            commands_per_minute: src.value(&COMMANDS_PER_MINUTE)?,
            leave_rooms_without_allowed_users: src.value(&LEAVE_ROOMS)?,
            slow_notice: src.value(&SLOW_NOTICE)?,
            trust_policy: src.value(&TRUST_POLICY)?,
            require_encryption: src.value(&REQUIRE_ENCRYPTION)?,
            bare_commands: src.value(&BARE_COMMANDS)?,
            crypto_store_passphrase: passphrase(&src)?,
            log_filter: src.value(&LOG_FILTER)?,
            log_format: src.value(&LOG_FORMAT)?,
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
    fn a_target_reads_its_longest_start_warning_and_schedule_with_the_global_zone_by_default() {
        let c = testing::config(
            "allowed_users: ['@alice:example.org']\ntimezone: Europe/Berlin\nwarn_before: 5m\ntargets:\n  - name: web\n    max_on: 8h\n    schedule: {on: 'Mon-Fri 08:00', off: ['Mon-Fri 19:00', 'Sat 12:00']}\n  - name: db\n    warn_before: 'off'\n    schedule: {on: daily 07:00, off: daily 23:00, timezone: UTC}\n",
            &[],
        );
        let (web, db) = (c.target("web").unwrap(), c.target("db").unwrap());
        assert_eq!(web.max_on, Some(Duration::from_secs(8 * 3600)));
        assert_eq!(web.warn_before, Some(Duration::from_secs(300)), "the global warn_before");
        assert_eq!(db.warn_before, None);
        assert_eq!(web.schedule.as_ref().unwrap().tz(), &calendar::time_zone("Europe/Berlin").unwrap());
        assert_eq!(db.schedule.as_ref().unwrap().tz(), &TimeZone::UTC);
        assert_eq!(c.timezone, calendar::time_zone("Europe/Berlin").unwrap());
    }

    #[test]
    fn an_unknown_time_zone_or_a_bad_schedule_is_refused_at_start_naming_the_setting() {
        let err = Fixture::new().with("TIMEZONE", "Mars/Olympus_Mons").load().unwrap_err().to_string();
        assert!(err.starts_with("TIMEZONE:") && err.contains("IANA"), "{err}");
        let f = Fixture::new();
        let p = f.file(
            "targets:\n  - name: web\n    schedule: {on: 'Mon 08:00', off: 'Mon 19:00', timezone: Europe/Atlantis}\n",
        );
        let err = Config::load(Some(&p), &f.env).unwrap_err().to_string();
        assert!(err.starts_with("targets: web: schedule: timezone:") && err.contains("Europe/Atlantis"), "{err}");
        let p = f.file("targets:\n  - name: web\n    schedule: {on: 'Mon 08:00', off: 'Mon 25:00'}\n");
        let err = Config::load(Some(&p), &f.env).unwrap_err().to_string();
        assert!(err.starts_with("targets: web: schedule: off:"), "{err}");
        let p = f.file("targets:\n  - name: web\n    max_on: 0m\n");
        let err = Config::load(Some(&p), &f.env).unwrap_err().to_string();
        assert!(err.starts_with("targets: web: max_on:"), "{err}");
        let err = Fixture::new().with("WARN_BEFORE", "soon").load().unwrap_err().to_string();
        assert!(err.starts_with("WARN_BEFORE:") && err.contains("or off"), "{err}");
    }

    #[test]
    fn a_target_names_its_autoscaler_and_a_scaled_object_defaults_to_the_workload() {
        let c = testing::config(
            "allowed_users: ['@alice:example.org']\ntargets:\n  - {name: web, autoscaler: hpa}\n  - {name: agent, workload: clawdbot, autoscaler: keda}\n  - {name: batch, autoscaler: keda, scaled_object: batch-scaler}\n  - {name: db}\n",
            &[],
        );
        assert_eq!(c.target("web").unwrap().autoscaler, Some(Autoscaler::Hpa));
        let keda = |name: &str| Some(Autoscaler::Keda { scaled_object: name.to_owned() });
        assert_eq!(c.target("agent").unwrap().autoscaler, keda("clawdbot"), "the workload's name");
        assert_eq!(c.target("batch").unwrap().autoscaler, keda("batch-scaler"));
        assert_eq!(c.target("db").unwrap().autoscaler, None);
    }

    #[test]
    fn an_unknown_autoscaler_or_a_scaled_object_without_keda_is_refused_naming_the_fix() {
        let f = Fixture::new();
        let p = f.file("targets:\n  - {name: web, autoscaler: vpa}\n");
        let err = Config::load(Some(&p), &f.env).unwrap_err().to_string();
        assert!(err.starts_with("targets: web: autoscaler") && err.contains("`hpa` or `keda`"), "{err}");
        let p = f.file("targets:\n  - {name: web, autoscaler: hpa, scaled_object: web}\n");
        let err = Config::load(Some(&p), &f.env).unwrap_err().to_string();
        assert!(err.starts_with("targets: web: scaled_object") && err.contains("autoscaler: keda"), "{err}");
        let p = f.file("targets:\n  - {name: web, scaled_object: web}\n");
        assert!(Config::load(Some(&p), &f.env).is_err(), "scaled_object alone");
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
