#![recursion_limit = "256"]
//! End-to-end latency of a command in an encrypted room, on a real Synapse over loopback.
//!
//! A matrix-sdk client sends N commands (env `BENCH_N`, default 40), alternating `start` and
//! `stop`, each once the previous one was answered and its rollout reported, and then `BENCH_GAP_MS`
//! (default 250) later, as a person would: 0 sends back to back, so a command can queue behind
//! the bridge's handling of its own previous messages. For each it
//! measures send → PATCH `/scale` (as the test apiserver recorded its arrival) and send →
//! decrypted reply at the client. The floor is the same messages into a second encrypted room
//! whose only other member belongs to a do-nothing appservice (its own registration on the same
//! Synapse) that records when the transaction carrying each event arrives. Also reported: the
//! bridge's own `transaction_to_*` histograms over the run, CPU per command and RSS.
//!
//! Run: `cargo bench --bench e2e_latency`. The server under test is the production release
//! build (made in `<target>/bench-server` on first use); `BENCH_BIN=/path/to/binary` picks another.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{Json, Router, body::Bytes, extract::State, routing::put};
use common::{ServerProcess, bench_binary, env_or, proc_status_kb};
use matrix_k8s_toggle::registration::{Registration, parse_server_name};
use matrix_sdk::ruma::{
    OwnedEventId, OwnedUserId,
    events::room::message::{OriginalSyncRoomMessageEvent, Relation},
    user_id,
};
use serde_json::{Value, json};
use support::{bridge::BridgeSetup, e2ee::E2eeClient, scratch_dir, synapse::Synapse};
use test_apiserver::{ControllerMode, TestApiServer};

const DEFAULT_N: usize = 40;
const WAIT: Duration = Duration::from_secs(60);

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(run());
}

fn bot() -> OwnedUserId {
    user_id!("@toggle:localhost").to_owned()
}

fn floor_bot() -> OwnedUserId {
    user_id!("@floor:localhost").to_owned()
}

async fn run() {
    let n: usize = env_or("BENCH_N", DEFAULT_N);
    let gap = Duration::from_millis(env_or("BENCH_GAP_MS", 250));
    let binary = bench_binary();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let dir = scratch_dir();

    let api = TestApiServer::start().await.unwrap();
    api.add_deployment("clawdbot", "clawdbot", 0);
    api.set_controller(ControllerMode::Ready { after: Duration::from_millis(20) });
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let setup = BridgeSetup::new(dir.path())
        .env("KUBECONFIG", kubeconfig.to_str().unwrap())
        .env("ALLOWED_USERS", "@alice:localhost")
        .env("ECHO_MODE", "false")
        // NB: the per-user rate limit (10 a minute by default) would answer most commands.
        .env("COMMANDS_PER_MINUTE", "0")
        .env("RUST_LOG", "info")
        .env("ROLLOUT_TIMEOUT_SECS", "20");

    let floor = Floor::start(dir.path()).await;
    let synapse = Synapse::start_with_registrations(dir.path(), &[&setup.registration, &floor.registration]);
    let bridge = Server::spawn(&binary, &setup, &synapse.url, &dir.path().join("bridge.log")).await;

    synapse.register("alice").await;
    let alice = E2eeClient::login(&synapse.url, "alice", &dir.path().join("client-alice")).await;
    support::eventually(WAIT, "the bot's device to be cross-signed", || async {
        alice.devices_of(&bot()).await.iter().any(|(_, signed)| *signed).then_some(())
    })
    .await;
    let replies = Replies::record(&alice);

    let room = alice.create_encrypted_room(&[&bot()]).await;
    alice.wait_for_join(&room, &bot()).await;
    let floor_room = alice.create_encrypted_room(&[&floor_bot()]).await;
    floor.join(&synapse.url, floor_room.as_str()).await;
    alice.wait_for_join(&floor_room, &floor_bot()).await;

    // Warm-up: Olm session and room key for the bot, first room load, connection pools.
    let warm = alice.send_text(&room, "status").await;
    replies.wait(&warm, 1).await;
    let warm = alice.send_text(&floor_room, "status").await;
    floor.wait(&warm).await;

    let metrics_before = scrape(&bridge.url).await;
    let cpu_before = Cpu::of(bridge.pid());
    let mut ours_patch = Vec::new();
    let mut ours_reply = Vec::new();
    let mut floor_txn = Vec::new();
    for i in 0..n {
        let text = if i.is_multiple_of(2) { "start" } else { "stop" };

        let patches = scale_patches(&api).len();
        let sent = SystemTime::now();
        let command = alice.send_text(&room, text).await;
        let (replied, answer) = replies.wait(&command, 1).await;
        assert!(
            answer.contains("is starting") || answer.contains("is stopping"),
            "`{text}` was answered with {answer:?}; bridge log:\n{}",
            std::fs::read_to_string(dir.path().join("bridge.log")).unwrap_or_default()
        );
        let patched =
            wait_for(WAIT, "the PATCH of /scale", || async { scale_patches(&api).get(patches).map(|r| r.received_at) })
                .await;
        ours_patch.push(ms_between(sent, patched));
        ours_reply.push(ms_between(sent, replied));
        // NB: the rollout report follows the reply; wait for it so commands do not overlap.
        replies.wait(&command, 2).await;

        let sent = SystemTime::now();
        let event = alice.send_text(&floor_room, text).await;
        floor_txn.push(ms_between(sent, floor.wait(&event).await));
        tokio::time::sleep(gap).await;
    }
    let cpu = Cpu::of(bridge.pid()).since(&cpu_before);
    let metrics_after = scrape(&bridge.url).await;
    let rss = proc_status_kb(bridge.pid(), "VmRSS");
    let hwm = proc_status_kb(bridge.pid(), "VmHWM");
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    println!();
    println!(
        "e2e_latency: {n} commands (alternating start/stop) {} ms apart, encrypted rooms, real Synapse on loopback",
        gap.as_millis()
    );
    println!("server under test: {}", binary.display());
    println!("load average before / after: {} / {}", load_before.trim(), load_after.trim());
    println!();
    println!("{:<48}{:>9}{:>9}{:>9}{:>9}", "(ms)", "p50", "p90", "p99", "max");
    let ours_patch = Summary::of(&ours_patch);
    let ours_reply = Summary::of(&ours_reply);
    let floor_summary = Summary::of(&floor_txn);
    ours_patch.print("send → PATCH /scale (ours)");
    ours_reply.print("send → decrypted reply at the client (ours)");
    floor_summary.print("send → transaction received (floor appservice)");
    ours_patch.minus(&floor_summary).print("ours − floor: send → PATCH");
    for name in ["transaction_to_patch_seconds", "transaction_to_reply_seconds", "transaction_handling_seconds"] {
        let name = format!("matrix_k8s_toggle_{name}");
        let buckets = diff(&histogram(&metrics_after, &name), &histogram(&metrics_before, &name));
        let count = buckets.last().map_or(0.0, |b| b.1);
        let q = |q: f64| quantile(&buckets, q).map_or("-".to_owned(), |s| format!("{:.2}", s * 1000.0));
        println!(
            "{:<48}{:>9}{:>9}{:>9}{:>9}  ({count} samples, from histogram buckets)",
            format!("bridge-internal {}", name.trim_start_matches("matrix_k8s_toggle_")),
            q(0.5),
            q(0.9),
            q(0.99),
            ""
        );
    }
    println!();
    println!(
        "bridge CPU per command: {:.2} ms (utime+stime, {} Hz ticks), {:.2} ms (per-thread schedstat)",
        cpu.tick_ms / n as f64,
        cpu.hz,
        cpu.sched_ms / n as f64
    );
    println!("bridge RSS after the run: {} KiB (peak {} KiB)", rss.unwrap_or(0), hwm.unwrap_or(0));

    bridge.stop();
    drop(synapse);
}

/// Our server as a child process with the setup's environment.
/// Our server with the setup's environment, ready.
struct Server {
    process: ServerProcess,
    url: String,
}

impl Server {
    async fn spawn(binary: &Path, setup: &BridgeSetup, homeserver: &str, log: &Path) -> Server {
        let env = setup.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain([("MATRIX_HOMESERVER", homeserver)]);
        let process = ServerProcess::spawn(binary, env, log);
        let server = Server { process, url: format!("http://{}", setup.env["LISTEN_ADDRESS"]) };
        let http = reqwest::Client::new();
        let url = format!("{}/readyz", server.url);
        wait_for(WAIT, "the bridge to be ready", || async {
            http.get(&url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ())
        })
        .await;
        server
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn stop(self) {
        self.process.stop();
    }
}

/// The do-nothing appservice: answers every transaction with `{}` after noting when the
/// transaction carrying each event arrived.
struct Floor {
    registration: PathBuf,
    as_token: String,
    arrivals: Arc<Mutex<HashMap<String, SystemTime>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Floor {
    async fn start(dir: &Path) -> Floor {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = url::Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let server_name = parse_server_name("localhost").unwrap();
        // NB: the same registration flags as ours, so Synapse does the same work for both.
        let registration = Registration::generate("floor", &url, &server_name, "floor").unwrap();
        let path = dir.join("floor-registration.yaml");
        std::fs::write(&path, registration.to_yaml()).unwrap();
        let arrivals = Arc::new(Mutex::new(HashMap::new()));
        let app = Router::new()
            .route("/_matrix/app/v1/transactions/{txn}", put(floor_transaction))
            .route("/transactions/{txn}", put(floor_transaction))
            .fallback(|| async { Json(json!({})) })
            .with_state(arrivals.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Floor { registration: path, as_token: registration.as_token.expose().to_owned(), arrivals, task }
    }

    /// Joins the floor bot to `room` (it was invited) with the appservice's token.
    async fn join(&self, homeserver: &str, room: &str) {
        let encoded: String = url::form_urlencoded::byte_serialize(room.as_bytes()).collect();
        let response = reqwest::Client::new()
            .post(format!("{homeserver}/_matrix/client/v3/join/{encoded}"))
            .bearer_auth(&self.as_token)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "the floor bot could not join: {}", response.status());
    }

    async fn wait(&self, event: &OwnedEventId) -> SystemTime {
        wait_for(WAIT, "the floor appservice to receive the event", || async {
            self.arrivals.lock().unwrap().get(event.as_str()).copied()
        })
        .await
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn floor_transaction(
    State(arrivals): State<Arc<Mutex<HashMap<String, SystemTime>>>>,
    body: Bytes,
) -> Json<Value> {
    let at = SystemTime::now();
    if let Ok(txn) = serde_json::from_slice::<Value>(&body) {
        let mut arrivals = arrivals.lock().unwrap();
        for event in txn["events"].as_array().into_iter().flatten() {
            if let Some(id) = event["event_id"].as_str() {
                arrivals.entry(id.to_owned()).or_insert(at);
            }
        }
    }
    Json(json!({}))
}

/// When the client decrypted each reply, by the event it answers.
struct Replies {
    seen: Arc<Mutex<Vec<(OwnedEventId, SystemTime, String)>>>,
}

impl Replies {
    fn record(client: &E2eeClient) -> Replies {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let bot = bot();
        client.client.add_event_handler(move |event: OriginalSyncRoomMessageEvent| {
            let at = SystemTime::now();
            let (sink, bot) = (sink.clone(), bot.clone());
            async move {
                if event.sender == bot
                    && let Some(Relation::Reply(reply)) = &event.content.relates_to
                {
                    let body = event.content.body().to_owned();
                    sink.lock().unwrap().push((reply.in_reply_to.event_id.clone(), at, body));
                }
            }
        });
        Replies { seen }
    }

    /// Waits for the `count`-th reply to `event`; returns when the first one arrived and its text.
    async fn wait(&self, event: &OwnedEventId, count: usize) -> (SystemTime, String) {
        wait_for(WAIT, &format!("{count} replies to {event}"), || async {
            let seen = self.seen.lock().unwrap();
            let answers: Vec<_> = seen.iter().filter(|(e, _, _)| e == event).collect();
            (answers.len() >= count).then(|| (answers[0].1, answers[0].2.clone()))
        })
        .await
    }
}

fn scale_patches(api: &TestApiServer) -> Vec<test_apiserver::RecordedRequest> {
    api.requests().into_iter().filter(|r| r.method == "PATCH" && r.path.ends_with("/scale")).collect()
}

/// Polls `f` every 2 ms (arrival times are measured by polling) until it returns `Some`.
async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    support::eventually_every(Duration::from_millis(2), timeout, what, f).await
}

fn ms_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

/// Percentiles of a sample (nearest rank).
struct Summary {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Summary {
    fn of(samples: &[f64]) -> Summary {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
        Summary { p50: rank(0.5), p90: rank(0.9), p99: rank(0.99), max: sorted[sorted.len() - 1] }
    }

    fn minus(&self, other: &Summary) -> Summary {
        Summary {
            p50: self.p50 - other.p50,
            p90: self.p90 - other.p90,
            p99: self.p99 - other.p99,
            max: self.max - other.max,
        }
    }

    fn print(&self, what: &str) {
        println!("{what:<48}{:>9.2}{:>9.2}{:>9.2}{:>9.2}", self.p50, self.p90, self.p99, self.max);
    }
}

async fn scrape(base: &str) -> String {
    reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap()
}

/// The cumulative buckets `(le, count)` of a histogram in Prometheus text, `+Inf` last.
fn histogram(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"}")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

fn diff(after: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after.iter().map(|(le, n)| (*le, n - before.iter().find(|(l, _)| l == le).map_or(0.0, |b| b.1))).collect()
}

/// The `q` quantile of cumulative buckets, interpolated linearly inside its bucket (as
/// Prometheus' `histogram_quantile` does).
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            return Some(lower + (le - lower) * (rank - below) / (count - below).max(f64::MIN_POSITIVE));
        }
        (lower, below) = (le, count);
    }
    Some(lower)
}

/// CPU time of a process.
struct Cpu {
    tick_ms: f64,
    sched_ms: f64,
    hz: u64,
}

impl Cpu {
    fn of(pid: u32) -> Cpu {
        let hz = clock_ticks_per_second();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // NB: after the command name (which may hold spaces) come fields 3, 4, ...: utime and
        // stime are fields 14 and 15.
        let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        let ticks = field(14) + field(15);
        let mut sched_ns = 0u64;
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                let line = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
                sched_ns += line.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            }
        }
        Cpu { tick_ms: ticks as f64 * 1000.0 / hz as f64, sched_ms: sched_ns as f64 / 1e6, hz }
    }

    fn since(&self, before: &Cpu) -> Cpu {
        Cpu { tick_ms: self.tick_ms - before.tick_ms, sched_ms: self.sched_ms - before.sched_ms, hz: self.hz }
    }
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}
