//! What the process benchmarks share: the server binary under test, the server as a child
//! process, `/proc` readings and settings from the environment.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

/// The binary under test: `BENCH_BIN` if set, else the production build of the server. NB: not
/// the one Cargo builds beside the benchmarks: that one has its dependencies' features unified
/// with the dev-dependencies'. It is built with `cargo build --release` into its own target
/// directory, `<target>/bench-server` (a no-op when up to date).
pub fn bench_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("BENCH_BIN") {
        return PathBuf::from(path);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| manifest.join("target"), PathBuf::from);
    let target = target.join("bench-server");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building the server under test: cargo build --release into {}", target.display());
    let status = Command::new(cargo)
        .current_dir(manifest)
        .args(["build", "--release", "--locked", "-p", "matrix-k8s-toggle", "--bin", "matrix-k8s-toggle"])
        .arg("--target-dir")
        .arg(&target)
        .status()
        .expect("running cargo");
    assert!(status.success(), "building the server under test failed");
    target.join("release").join("matrix-k8s-toggle")
}

/// The server under test running `serve` with exactly the given environment, its output
/// appended to a log file; SIGTERM on [`ServerProcess::stop`], killed when dropped.
pub struct ServerProcess {
    child: Option<Child>,
}

impl ServerProcess {
    /// Starts `binary serve`.
    pub fn spawn<K, V>(binary: &Path, env: impl IntoIterator<Item = (K, V)>, log: &Path) -> ServerProcess
    where
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(binary)
            .arg("serve")
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting the server under test");
        ServerProcess { child: Some(child) }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `kB` field of `/proc/<pid>/status` (VmRSS, VmHWM, ...), or a plain count (Threads).
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The environment variable `name` parsed, or `default` when unset or unreadable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
