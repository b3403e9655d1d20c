//! A real Synapse (pinned, from PyPI) on 127.0.0.1, started and stopped by the test bed scripts.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha1::Sha1;

use super::{free_port, repo_root};

/// The server name every test homeserver uses.
pub const SERVER_NAME: &str = "localhost";

fn script(name: &str) -> PathBuf {
    repo_root().join("scripts").join("testbed").join(name)
}

/// Makes sure the Synapse venv exists (once per test process); returns its path.
pub fn ensure_venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let out = Command::new(script("synapse-venv.sh")).output().expect("running synapse-venv.sh");
        assert!(out.status.success(), "synapse-venv.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// A running Synapse; stopped when dropped.
pub struct Synapse {
    dir: PathBuf,
    pid: std::sync::Mutex<Option<u32>>,
    /// Client-server API base URL.
    pub url: String,
    shared_secret: String,
}

impl Synapse {
    /// Configures and starts a Synapse in `dir` with one appservice registration.
    pub fn start(dir: &Path, registration: &Path) -> Synapse {
        Self::start_with_registrations(dir, &[registration])
    }

    /// Configures and starts a Synapse in `dir` with several appservice registrations (the
    /// first one as `start` has it, the others appended to `app_service_config_files`).
    pub fn start_with_registrations(dir: &Path, registrations: &[&Path]) -> Synapse {
        let (first, others) = registrations.split_first().expect("at least one registration");
        ensure_venv();
        let dir = dir.join("synapse");
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        run(Command::new(script("synapse.sh")).args([
            "config",
            dir.to_str().unwrap(),
            &port.to_string(),
            first.to_str().unwrap(),
            SERVER_NAME,
        ]));
        if !others.is_empty() {
            add_registrations(&dir.join("homeserver.yaml"), others);
        }
        let synapse = Synapse {
            pid: std::sync::Mutex::new(None),
            url: format!("http://127.0.0.1:{port}"),
            shared_secret: std::fs::read_to_string(dir.join("shared_secret")).unwrap().trim().to_owned(),
            dir,
        };
        synapse.start_again();
        synapse
    }

    /// Stops Synapse (tests of an unreachable homeserver); `start_again` brings it back.
    pub fn stop(&self) {
        run(Command::new(script("synapse.sh")).args(["stop", self.dir.to_str().unwrap()]));
        *self.pid.lock().unwrap() = None;
    }

    /// Starts a stopped Synapse again on the same port and database.
    pub fn start_again(&self) {
        run(Command::new(script("synapse.sh")).args(["start", self.dir.to_str().unwrap()]));
        let pid = std::fs::read_to_string(self.dir.join("synapse.pid")).unwrap().trim().parse().unwrap();
        *self.pid.lock().unwrap() = Some(pid);
    }

    /// Registers a user through the admin API (shared secret); returns (user id, access token).
    pub async fn register(&self, localpart: &str) -> (String, String) {
        let http = reqwest::Client::new();
        let url = format!("{}/_synapse/admin/v1/register", self.url);
        let nonce: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
        let nonce = nonce["nonce"].as_str().unwrap().to_owned();
        let password = format!("pw-{localpart}-secret");
        let mut mac = Hmac::<Sha1>::new_from_slice(self.shared_secret.as_bytes()).unwrap();
        for (i, part) in [nonce.as_str(), localpart, password.as_str(), "notadmin"].iter().enumerate() {
            if i > 0 {
                mac.update(b"\x00");
            }
            mac.update(part.as_bytes());
        }
        let body = json!({
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": false,
            "mac": hex::encode(mac.finalize().into_bytes()),
        });
        let resp = http.post(&url).json(&body).send().await.unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "registering {localpart}: {v}");
        (v["user_id"].as_str().unwrap().to_owned(), v["access_token"].as_str().unwrap().to_owned())
    }

    /// The homeserver log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("homeserver.log")).unwrap_or_default()
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        // NB: by pid, not through the script: the scratch directory may already be gone.
        if let Some(pid) = self.pid.lock().unwrap().take() {
            let pid = pid.to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            for _ in 0..100 {
                let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')));
                if !alive {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
    }
}

/// Appends `registrations` to the `app_service_config_files` list of a homeserver.yaml
/// written by synapse.sh (one `  - "path"` line per file under the key).
fn add_registrations(config: &Path, registrations: &[&Path]) {
    let text = std::fs::read_to_string(config).unwrap();
    let mut out = String::with_capacity(text.len());
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        out.push_str(line);
        out.push('\n');
        if line.trim_end() == "app_service_config_files:" {
            while lines.peek().is_some_and(|l| l.trim_start().starts_with("- ")) {
                out.push_str(lines.next().unwrap());
                out.push('\n');
            }
            for path in registrations {
                let absolute = std::fs::canonicalize(path).unwrap();
                // NB: a JSON string is a YAML string.
                out.push_str(&format!("  - {}\n", serde_json::to_string(absolute.to_str().unwrap()).unwrap()));
            }
        }
    }
    std::fs::write(config, out).unwrap();
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("running a test bed script");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
