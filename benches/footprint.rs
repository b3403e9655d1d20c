#![recursion_limit = "256"]
//! Footprint of the release binary beside a real Synapse: cold start (spawn → first `/healthz`
//! 200, spawn → `/readyz` 200, spawn → encryption machine loaded) on a fresh and on a warm
//! STATE_DIR (median of `FOOTPRINT_RUNS`, default 5), resident memory at idle a few seconds
//! (`FOOTPRINT_IDLE_SECS`, default 5) after start with encryption set up, and binary size.
//! CPU per command is measured by the e2e_latency benchmark.
//!
//! Run: `cargo bench --bench footprint`. The server under test is the production release build
//! (made in `<target>/bench-server` on first use); `BENCH_BIN=/path/to/binary` picks another.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::{ServerProcess, bench_binary, env_or, proc_status_kb};
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

/// Milliseconds from spawn to each milestone.
struct StartTimes {
    healthz: f64,
    readyz: f64,
    encryption: f64,
}

struct Server {
    process: ServerProcess,
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
        let base = format!("http://{}", setup.env["LISTEN_ADDRESS"]);
        let http =
            reqwest::Client::builder().timeout(Duration::from_secs(2)).pool_max_idle_per_host(0).build().unwrap();
        let started = Instant::now();
        let state = state.to_str().expect("a UTF-8 path");
        let env = setup
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain([("MATRIX_HOMESERVER", homeserver), ("STATE_DIR", state)]);
        let server = Server { process: ServerProcess::spawn(binary, env, &log), log: log.clone() };
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
        self.process.pid()
    }

    fn stop(self) {
        self.process.stop();
    }
}
