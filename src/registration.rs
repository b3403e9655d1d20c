//! The appservice registration: the yaml Synapse loads, with the MSC keys ruma's type lacks.

use std::{fmt, path::Path};

use rand::RngCore;
use ruma::{OwnedServerName, OwnedUserId, UserId};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::secret::Secret;

/// Errors reading or writing a registration file.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The file could not be read or written.
    #[error("registration file {path}: {source}")]
    Io {
        /// The file's path.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid registration.
    #[error("registration file {path} is not valid: {message}")]
    Invalid {
        /// The file's path.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// One namespace entry of a registration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Namespace {
    /// Whether only this appservice may use matching ids.
    pub exclusive: bool,
    /// The regular expression ids are matched against.
    pub regex: String,
}

/// The namespaces an appservice claims.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Namespaces {
    /// User id namespaces.
    #[serde(default)]
    pub users: Vec<Namespace>,
    /// Room alias namespaces.
    #[serde(default)]
    pub aliases: Vec<Namespace>,
    /// Room id namespaces.
    #[serde(default)]
    pub rooms: Vec<Namespace>,
}

/// The appservice registration as Synapse reads it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Registration {
    /// The appservice's unique id on the homeserver.
    pub id: String,
    /// Where the homeserver reaches us.
    pub url: String,
    /// The token we present to the homeserver.
    pub as_token: Secret,
    /// The token the homeserver presents to us.
    pub hs_token: Secret,
    /// Localpart of the bot user.
    pub sender_localpart: String,
    /// Whether the homeserver rate-limits our users.
    #[serde(default)]
    pub rate_limited: bool,
    /// Whether ephemeral events and to-device messages are pushed to us.
    #[serde(default)]
    pub receive_ephemeral: bool,
    /// MSC3202: device lists and one-time-key counts in transactions.
    #[serde(rename = "org.matrix.msc3202", default)]
    pub msc3202: bool,
    /// MSC4190: device management by the appservice.
    #[serde(rename = "io.element.msc4190", default)]
    pub msc4190: bool,
    /// The ids we claim.
    #[serde(default)]
    pub namespaces: Namespaces,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("as_token", &self.as_token)
            .field("hs_token", &self.hs_token)
            .field("sender_localpart", &self.sender_localpart)
            .field("msc3202", &self.msc3202)
            .field("msc4190", &self.msc4190)
            .finish_non_exhaustive()
    }
}

/// Fresh random token: 32 random bytes, URL-safe base64 (43 characters).
pub fn random_token() -> Secret {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

impl Registration {
    /// A new registration with fresh tokens and an exclusive namespace holding only the bot.
    pub fn generate(
        id: &str,
        url: &Url,
        server_name: &ruma::ServerName,
        sender_localpart: &str,
    ) -> Result<Self, RegistrationError> {
        let bot =
            UserId::parse(format!("@{sender_localpart}:{server_name}")).map_err(|e| RegistrationError::Invalid {
                path: "-".into(),
                message: format!("@{sender_localpart}:{server_name} is not a valid user id: {e}"),
            })?;
        Ok(Self {
            id: id.to_owned(),
            url: url.as_str().trim_end_matches('/').to_owned(),
            as_token: random_token(),
            hs_token: random_token(),
            sender_localpart: sender_localpart.to_owned(),
            rate_limited: false,
            receive_ephemeral: true,
            msc3202: true,
            msc4190: true,
            namespaces: Namespaces {
                users: vec![Namespace { exclusive: true, regex: format!("^{}$", regex_escape(bot.as_str())) }],
                aliases: vec![],
                rooms: vec![],
            },
        })
    }

    /// Reads and validates a registration file.
    pub fn load(path: &Path) -> Result<Self, RegistrationError> {
        let display = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| RegistrationError::Io { path: display.clone(), source })?;
        let reg: Registration = serde_yaml::from_str(&text)
            .map_err(|e| RegistrationError::Invalid { path: display.clone(), message: e.to_string() })?;
        reg.validate().map_err(|message| RegistrationError::Invalid { path: display, message })?;
        Ok(reg)
    }

    /// The registration as yaml, with a header comment.
    pub fn to_yaml(&self) -> String {
        let body = serde_yaml::to_string(self).expect("a registration always serializes");
        format!(
            "# Appservice registration for matrix-k8s-toggle, generated by `matrix-k8s-toggle generate-registration`.\n\
             # Give this file to Synapse (app_service_config_files) and to the bridge (REGISTRATION_PATH).\n\
             # The tokens are secrets: keep this file out of version control.\n{body}"
        )
    }

    /// Checks what the bridge relies on; returns a message naming the key to fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.trim().is_empty() {
            return Err("`id` is empty".into());
        }
        if self.as_token.expose().len() < 16 || self.hs_token.expose().len() < 16 {
            return Err("`as_token` and `hs_token` must be at least 16 characters; generate new ones with `matrix-k8s-toggle generate-registration`".into());
        }
        for (key, token) in [("as_token", self.as_token.expose()), ("hs_token", self.hs_token.expose())] {
            if is_placeholder(token) {
                return Err(format!(
                    "`{key}` is a placeholder from the example registration, which anyone can read; generate a registration with fresh tokens: `matrix-k8s-toggle generate-registration --url <where Synapse reaches the bridge> --server-name <server name> -o registration.yaml`, and give the same file to Synapse"
                ));
            }
        }
        if self.as_token.expose() == self.hs_token.expose() {
            return Err("`as_token` and `hs_token` must differ".into());
        }
        let url = Url::parse(&self.url).map_err(|e| format!("`url` {:?} is not a URL: {e}", self.url))?;
        if url.port_or_known_default().is_none() {
            return Err(format!("`url` {:?} has no port", self.url));
        }
        if self.sender_localpart.is_empty() {
            return Err("`sender_localpart` is empty".into());
        }
        Ok(())
    }

    /// The port of the registration URL: where Synapse expects us to listen.
    pub fn url_port(&self) -> u16 {
        Url::parse(&self.url).ok().and_then(|u| u.port_or_known_default()).unwrap_or(9000)
    }

    /// The bot's user id on `server_name`.
    pub fn bot_user_id(&self, server_name: &ruma::ServerName) -> Result<OwnedUserId, String> {
        UserId::parse(format!("@{}:{server_name}", self.sender_localpart))
            .map_err(|e| format!("`sender_localpart` {:?} gives no valid user id: {e}", self.sender_localpart))
    }
}

/// Whether a token is one of the example files' placeholders rather than a secret.
fn is_placeholder(token: &str) -> bool {
    let lowered = token.to_ascii_lowercase();
    ["replace", "changeme", "change-me", "change_me", "placeholder", "example", "your-token", "xxxxxxxx"]
        .iter()
        .any(|word| lowered.contains(word))
}

/// Escapes regex metacharacters (Synapse reads the namespace as a Python regex).
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Parses a server name given on the command line or in the environment.
pub fn parse_server_name(s: &str) -> Result<OwnedServerName, String> {
    ruma::ServerName::parse(s).map_err(|e| format!("{s:?} is not a valid server name: {e}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_example_registrations_placeholder_tokens_are_refused_with_the_command_that_makes_real_ones() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("registration/example-registration.yaml");
        let err = super::Registration::load(&path).unwrap_err().to_string();
        assert!(err.contains("placeholder"), "{err}");
        assert!(err.contains("matrix-k8s-toggle generate-registration"), "{err}");
        for token in ["CHANGE_ME_0123456789abcdef", "replace-me-with-a-random-token"] {
            assert!(super::is_placeholder(token), "{token}");
        }
        assert!(!super::is_placeholder("Qm9hcmQgZm9yIGEgZmV3IGhvdXJzIGFuZCBoYXBweQ"));
    }

    use super::*;

    fn generated() -> Registration {
        Registration::generate(
            "k8s-toggle",
            &Url::parse("http://toggle.svc:9000").unwrap(),
            &parse_server_name("example.org").unwrap(),
            "toggle",
        )
        .unwrap()
    }

    #[test]
    fn generated_registration_has_fresh_long_tokens() {
        let a = generated();
        let b = generated();
        assert!(a.as_token.expose().len() >= 43);
        assert_ne!(a.as_token.expose(), a.hs_token.expose());
        assert_ne!(a.as_token.expose(), b.as_token.expose());
    }

    #[test]
    fn generated_registration_claims_only_the_bot_exclusively() {
        let yaml = generated().to_yaml();
        let v: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(v["namespaces"]["users"][0]["regex"].as_str(), Some(r"^@toggle:example\.org$"));
        assert_eq!(v["namespaces"]["users"][0]["exclusive"].as_bool(), Some(true));
        assert_eq!(v["namespaces"]["users"].as_sequence().unwrap().len(), 1);
        assert_eq!(v["org.matrix.msc3202"].as_bool(), Some(true));
        assert_eq!(v["io.element.msc4190"].as_bool(), Some(true));
        assert_eq!(v["receive_ephemeral"].as_bool(), Some(true));
        assert_eq!(v["rate_limited"].as_bool(), Some(false));
        assert_eq!(v["url"].as_str(), Some("http://toggle.svc:9000"));
    }

    #[test]
    fn generated_registration_round_trips_through_load() {
        let reg = generated();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reg.yaml");
        std::fs::write(&path, reg.to_yaml()).unwrap();
        assert_eq!(Registration::load(&path).unwrap(), reg);
    }

    #[test]
    fn debug_output_hides_tokens() {
        let reg = generated();
        let debug = format!("{reg:?}");
        assert!(!debug.contains(reg.as_token.expose()));
        assert!(!debug.contains(reg.hs_token.expose()));
    }

    #[test]
    fn a_registration_with_equal_tokens_is_refused() {
        let mut reg = generated();
        reg.hs_token = reg.as_token.clone();
        assert!(reg.validate().unwrap_err().contains("must differ"));
    }
}
