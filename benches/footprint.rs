#![recursion_limit = "256"]
//! Footprint of the release binary beside a real Synapse: cold start (spawn → first `/healthz`
//! 200, spawn → `/readyz` 200, spawn → encryption machine loaded) on a fresh and on a warm
//! STATE_DIR (median of `FOOTPRINT_RUNS`, default 5), resident memory at idle a few seconds
//! (`FOOTPRINT_IDLE_SECS`, default 5) after start with encryption set up, and binary size.
//! CPU per command is measured by the e2e_latency benchmark.
//!
//! Run: `cargo bench --bench footprint`. The server under test is the production release build
//! (made in `<target>/bench-server` on first use); `BENCH_BIN=/path/to/binary` picks another.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use support::{bridge::BridgeSetup, scratch_dir, synapse::Synapse};
use test_apiserver::TestApiServer;

const WAIT: Duration = Duration::from_secs(60);

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(run());
}

async fn run() {
    let runs: usize = env_or("FOOTPRINT_RUNS", 5);
    let idle_secs: u64 = env_or("FOOTPRINT_IDLE_SECS", 5);
    let binary = bench_binary();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let dir = scratch_dir();
    let api = TestApiServer::start().await.unwrap();
    api.add_deployment("clawdbot", "clawdbot", 0);
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let setup = BridgeSetup::new(dir.path())
        .env("KUBECONFIG", kubeconfig.to_str().unwrap())
        .env("RUST_LOG", "info")
        .env("ECHO_MODE", "false");
    let synapse = Synapse::start(dir.path(), &setup.registration);

    let mut fresh = Vec::new();
    for run in 0..runs {
        let state = dir.path().join(format!("state-fresh-{run}"));
        let (server, times) = Server::start(&binary, &setup, &synapse.url, &state, dir.path()).await;
        server.stop();
        fresh.push(times);
    }

    let warm_state = dir.path().join("state-warm");
    let (server, _) = Server::start(&binary, &setup, &synapse.url, &warm_state, dir.path()).await;
    server.wait_for_log("cross-signed the bot's device").await;
    server.stop();
    let mut warm = Vec::new();
    for _ in 0..runs {
        let (server, times) = Server::start(&binary, &setup, &synapse.url, &warm_state, dir.path()).await;
        server.stop();
        warm.push(times);
    }

    let (server, _) = Server::start(&binary, &setup, &synapse.url, &warm_state, dir.path()).await;
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let status = |field| proc_status_kb(server.pid(), field).unwrap_or(0);
    let idle = [("VmRSS", status("VmRSS")), ("RssAnon", status("RssAnon")), ("RssFile", status("RssFile"))];
    let hwm = status("VmHWM");
    let threads = status("Threads");
    server.stop();
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    println!();
    println!("footprint: release binary beside a real Synapse on loopback, {runs} runs each");
    println!("binary: {} ({:.2} MiB)", binary.display(), std::fs::metadata(&binary).unwrap().len() as f64 / 1048576.0);
    println!("load average before / after: {} / {}", load_before.trim(), load_after.trim());
    println!();
    println!("{:<40}{:>16}{:>16}{:>16}", "cold start (ms, median [min–max])", "/healthz", "/readyz", "encryption");
    for (name, times) in [("fresh STATE_DIR", &fresh), ("warm STATE_DIR", &warm)] {
        let cell = |pick: fn(&StartTimes) -> f64| {
            let mut v: Vec<f64> = times.iter().map(pick).collect();
            v.sort_by(f64::total_cmp);
            format!("{:.0} [{:.0}–{:.0}]", v[v.len() / 2], v[0], v[v.len() - 1])
        };
        println!("{name:<40}{:>16}{:>16}{:>16}", cell(|t| t.healthz), cell(|t| t.readyz), cell(|t| t.encryption));
    }
    println!("(encryption: the `encryption ready` log line, the crypto store opened and the device known)");
    println!();
    let mib = |kb: u64| kb as f64 / 1024.0;
    let idle_text: Vec<String> = idle.iter().map(|(name, kb)| format!("{name} {:.1} MiB", mib(*kb))).collect();
    println!("idle {idle_secs} s after ready (warm STATE_DIR, encryption set up): {}", idle_text.join(", "));
    println!("peak RSS of that run (VmHWM): {:.1} MiB; threads: {threads}", mib(hwm));
    drop(synapse);
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The binary under test: `BENCH_BIN` if set, else the production build of the server. NB: not
/// the one Cargo builds beside this benchmark: that one has its dependencies' features unified
/// with the dev-dependencies'. It is built with `cargo build --release` into its own target
/// directory, `<target>/bench-server` (a no-op when up to date).
fn bench_binary() -> PathBuf {
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

/// Milliseconds from spawn to each milestone.
struct StartTimes {
    healthz: f64,
    readyz: f64,
    encryption: f64,
}

struct Server {
    child: Option<Child>,
    log: PathBuf,
}

impl Server {
    /// Spawns the server on `state` and times it until it is ready and its encryption loaded.
    async fn start(
        binary: &Path,
        setup: &BridgeSetup,
        homeserver: &str,
        state: &Path,
        dir: &Path,
    ) -> (Server, StartTimes) {
        let log = dir.join(format!("bridge-{}.log", state.file_name().unwrap().to_string_lossy()));
        let offset = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let base = format!("http://{}", setup.env["LISTEN_ADDRESS"]);
        let http =
            reqwest::Client::builder().timeout(Duration::from_secs(2)).pool_max_idle_per_host(0).build().unwrap();
        let started = Instant::now();
        let child = Command::new(binary)
            .arg("serve")
            .env_clear()
            .envs(&setup.env)
            .env("MATRIX_HOMESERVER", homeserver)
            .env("STATE_DIR", state)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("starting the bridge");
        let server = Server { child: Some(child), log: log.clone() };
        let ok = |path: &'static str| {
            let (http, url) = (http.clone(), format!("{base}{path}"));
            async move { http.get(&url).send().await.is_ok_and(|r| r.status().is_success()) }
        };
        let (mut healthz, mut readyz, mut encryption) = (None, None, None);
        while healthz.is_none() || readyz.is_none() || encryption.is_none() {
            assert!(started.elapsed() < WAIT, "the bridge did not start; see {}", log.display());
            let now = || started.elapsed().as_secs_f64() * 1000.0;
            if healthz.is_none() && ok("/healthz").await {
                healthz = Some(now());
            }
            if healthz.is_some() && readyz.is_none() && ok("/readyz").await {
                readyz = Some(now());
            }
            if encryption.is_none() && server.log_since(offset).contains("encryption ready") {
                encryption = Some(now());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let times = StartTimes { healthz: healthz.unwrap(), readyz: readyz.unwrap(), encryption: encryption.unwrap() };
        (server, times)
    }

    fn log_since(&self, offset: usize) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(text.get(offset..).unwrap_or_default()).into_owned()
    }

    async fn wait_for_log(&self, line: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log_since(0).contains(line) {
            assert!(Instant::now() < deadline, "no `{line}` in {}", self.log.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM, then wait for the exit.
    fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `kB` field of `/proc/<pid>/status` (VmRSS, VmHWM, ...), or a plain count (Threads).
fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}
