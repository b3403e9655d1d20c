//! Our server as a real process, configured by environment variables only.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::{bridge_binary, eventually, free_port};

/// Writes a registration for a bridge on `port` with our own `generate-registration`.
pub fn generate_registration(dir: &Path, port: u16) -> PathBuf {
    let path = dir.join("registration.yaml");
    let out = Command::new(bridge_binary())
        .args(["generate-registration", "--url", &format!("http://127.0.0.1:{port}"), "--server-name", "localhost"])
        .arg("-o")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "generate-registration: {}", String::from_utf8_lossy(&out.stderr));
    path
}

/// The hs_token and as_token of a registration file.
pub fn tokens(registration: &Path) -> (String, String) {
    let v: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(registration).unwrap()).unwrap();
    (v["hs_token"].as_str().unwrap().to_owned(), v["as_token"].as_str().unwrap().to_owned())
}

/// A running `matrix-k8s-toggle serve`; killed when dropped.
pub struct BridgeProcess {
    child: Option<Child>,
    /// Where it listens.
    pub url: String,
    env: BTreeMap<String, String>,
    log_path: PathBuf,
    restarts: u32,
}

/// Everything needed to start the bridge.
pub struct BridgeSetup {
    /// Scratch directory (state and logs live under it).
    pub dir: PathBuf,
    /// The port from the registration URL.
    pub port: u16,
    /// The registration file.
    pub registration: PathBuf,
    /// Environment of the process.
    pub env: BTreeMap<String, String>,
}

impl BridgeSetup {
    /// A registration on a free port, and the minimal environment around it.
    pub fn new(dir: &Path) -> Self {
        let port = free_port();
        let registration = generate_registration(dir, port);
        let mut env = BTreeMap::new();
        env.insert("MATRIX_SERVER_NAME".into(), "localhost".into());
        env.insert("REGISTRATION_PATH".into(), registration.display().to_string());
        env.insert("STATE_DIR".into(), dir.join("state").display().to_string());
        env.insert("LISTEN_ADDRESS".into(), format!("127.0.0.1:{port}"));
        env.insert("ALLOWED_USERS".into(), "@alice:localhost".into());
        env.insert("RUST_LOG".into(), "info,matrix_k8s_toggle=debug".into());
        BridgeSetup { dir: dir.to_owned(), port, registration, env }
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Starts the bridge and waits until it serves.
    pub async fn start(self, homeserver: &str) -> BridgeProcess {
        let mut env = self.env;
        env.insert("MATRIX_HOMESERVER".into(), homeserver.into());
        let mut bridge = BridgeProcess {
            child: None,
            url: format!("http://{}", env["LISTEN_ADDRESS"]),
            env,
            log_path: self.dir.join("bridge.log"),
            restarts: 0,
        };
        bridge.spawn().await;
        bridge
    }
}

impl BridgeProcess {
    /// Starts `serve` with this environment, its output appended to the log.
    fn spawn_child(&self) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path).unwrap();
        Command::new(bridge_binary())
            .arg("serve")
            .env_clear()
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting the bridge")
    }

    async fn spawn(&mut self) {
        self.child = Some(self.spawn_child());
        let http = reqwest::Client::new();
        let url = format!("{}/healthz", self.url);
        let log_path = self.log_path.clone();
        eventually(Duration::from_secs(20), "the bridge to serve /healthz", || {
            let (http, url) = (http.clone(), url.clone());
            async move { http.get(&url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await;
        let _ = log_path;
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Resident memory of the process in KiB (VmRSS).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Stops the process with SIGTERM and waits for it.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("bridge running");
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        child.wait().unwrap()
    }

    /// Kills the process with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sets (or with `None` removes) an environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        match value {
            Some(v) => self.env.insert(key.into(), v.into()),
            None => self.env.remove(key),
        };
    }

    /// Starts the process again and waits for it to exit by itself (a start-up that must
    /// fail); panics if it is still running after 30 s.
    pub fn start_expecting_exit(&mut self) -> std::process::ExitStatus {
        assert!(self.child.is_none(), "stop the bridge first");
        let mut child = self.spawn_child();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the bridge kept running; it should have stopped at start-up:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a second process with the same environment and state beside this one, until it
    /// exits by itself (within 30 s); returns its exit status and what it printed.
    pub async fn run_second_instance(&self) -> (std::process::ExitStatus, String) {
        let env = self.env.clone();
        let run = tokio::task::spawn_blocking(move || {
            Command::new(bridge_binary()).arg("serve").env_clear().envs(&env).stdin(Stdio::null()).output()
        });
        let output = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("the second bridge kept running; it should have stopped at start-up")
            .unwrap()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        (output.status, text)
    }

    /// Starts the process again with the same environment and state.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "stop the bridge first");
        self.restarts += 1;
        self.spawn().await;
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The value of a Prometheus sample line starting with `prefix` (e.g. `name{label="x"}`), 0 if absent.
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.url)).await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(prefix).and_then(|rest| rest.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- bridge log ---\n{}", self.log());
        }
    }
}
