//! The old bot, openclaw-k8s-toggle-operator, as the benchmark's peer (`BENCH_PEER=seed`): a
//! Python process from its own venv (`scripts/testbed/seed-venv.sh`), logged in as an ordinary
//! user on the same Synapse, switching its own Deployment on the same test apiserver.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::support::repo_root;

/// The line the old bot logs when its sync loop starts, after its first sync.
const LISTENING: &str = "Listening for commands";

/// The old bot, running; killed when dropped.
pub struct SeedBot {
    child: Child,
    log: PathBuf,
}

/// Where the old bot logs in and what it switches.
pub struct SeedSetup<'a> {
    pub homeserver: &'a str,
    pub localpart: &'a str,
    pub password: &'a str,
    pub allowed_user: &'a str,
    pub kubeconfig: &'a Path,
    pub namespace: &'a str,
    pub deployment: &'a str,
}

impl SeedBot {
    /// Installs the old bot if needed, starts it in `dir` and waits until it listens.
    pub async fn start(dir: &Path, setup: &SeedSetup<'_>) -> SeedBot {
        let out =
            Command::new(repo_root().join("scripts/testbed/seed-venv.sh")).output().expect("running seed-venv.sh");
        assert!(out.status.success(), "seed-venv.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let venv = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        let log = dir.join("seed-bot.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(venv.join("bin/python"))
            .arg(repo_root().join("scripts/testbed/seed-bot.py"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir)
            .env("MATRIX_HOMESERVER", setup.homeserver)
            .env("MATRIX_USER", setup.localpart)
            .env("MATRIX_PASSWORD", setup.password)
            .env("ALLOWED_USERS", setup.allowed_user)
            .env("DEPLOYMENT_NAME", setup.deployment)
            .env("DEPLOYMENT_NAMESPACE", setup.namespace)
            .env("CRYPTO_STORE_PATH", dir.join("seed-crypto-store"))
            .env("KUBECONFIG", setup.kubeconfig)
            // NB: echo off, and INFO as the bridge's RUST_LOG=info: a fair comparison.
            .env("ECHO_MODE", "false")
            .env("LOGURU_LEVEL", "INFO")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("starting the old bot");
        let bot = SeedBot { child, log };
        crate::support::eventually(Duration::from_secs(120), "the old bot to listen", || async {
            bot.log().contains(LISTENING).then_some(())
        })
        .await;
        bot
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SeedBot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
