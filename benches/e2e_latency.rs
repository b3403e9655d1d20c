#![recursion_limit = "256"]
//! End-to-end latency of a command in an encrypted room, on a real Synapse over loopback, side
//! by side with a peer measured in the same run.
//!
//! A matrix-sdk client sends `BENCH_N` commands (default 40) per peer and mode, alternating
//! `start` and `stop`, in two modes (`BENCH_MODES`, default `paced,back-to-back`): *paced*, each
//! once the previous one was answered (and, for the bridge, its rollout reported) and then
//! `BENCH_GAP_MS` (default 1000) later, as a person would; *back to back*, each as soon as the
//! previous one was answered, so a command queues behind whatever the previous one left the
//! bot and the homeserver doing. The peers, each in its own encrypted room with the client:
//! - the bridge (the production release build as a process, `ECHO_MODE=false`);
//! - the floor: a do-nothing appservice on the same Synapse with the same registration flags,
//!   which notes when the transaction carrying each event arrives (paced mode only);
//! - with `BENCH_PEER=seed`, the old bot, openclaw-k8s-toggle-operator 0.0.19, a syncing client
//!   (installed by `scripts/testbed/seed-venv.sh`, echo off).
//!
//! The commands go in rounds (bridge, old bot, floor; twice), so a drift in the machine's speed
//! touches every peer alike. Per command: send → PATCH `/scale` (as the test apiserver recorded
//! its arrival) and send → decrypted reply; per peer: CPU per command and RSS. Reported as
//! ratios against the peers, which is what carries from one machine to another.
//!
//! Run: `cargo bench --bench e2e_latency` (with `BENCH_PEER=seed` for the old bot). The server
//! under test is the production release build (made in `<target>/bench-server` on first use);
//! `BENCH_BIN=/path/to/binary` picks another.

mod common;
#[path = "e2e/seed.rs"]
mod seed;
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
use matrix_sdk::{
    Room,
    ruma::{
        OwnedEventId, OwnedRoomId, OwnedUserId,
        events::room::message::{OriginalSyncRoomMessageEvent, Relation},
        user_id,
    },
};
use seed::{SeedBot, SeedSetup};
use serde_json::{Value, json};
use support::{bridge::BridgeSetup, e2ee::E2eeClient, scratch_dir, synapse::Synapse};
use test_apiserver::{ControllerMode, TestApiServer};

const DEFAULT_N: usize = 40;
const WAIT: Duration = Duration::from_secs(60);
/// Rounds each peer's commands are split into, one peer after the other in each.
const ROUNDS: usize = 2;
/// The namespaces of the bridge's and the old bot's Deployments (both named `clawdbot`).
const OURS_NS: &str = "clawdbot";
const SEED_NS: &str = "seed";

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

fn seed_bot() -> OwnedUserId {
    user_id!("@seedbot:localhost").to_owned()
}

/// How commands follow each other.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// After the answer (and the bridge's rollout report), then a pause.
    Paced(Duration),
    /// As soon as the answer is there.
    BackToBack,
}

impl Mode {
    fn name(self) -> String {
        match self {
            Mode::Paced(gap) => format!("paced, {} ms apart", gap.as_millis()),
            Mode::BackToBack => "back to back".into(),
        }
    }
}

/// Who answers.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Peer {
    Ours,
    Seed,
    Floor,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Ours => "bridge",
            Peer::Seed => "old bot",
            Peer::Floor => "floor appservice",
        }
    }
}

/// What one peer did in one mode.
#[derive(Default)]
struct Samples {
    patch: Vec<f64>,
    reply: Vec<f64>,
    cpu_ms: f64,
    commands: usize,
}

/// Everything the command loop needs.
struct Bench {
    alice: E2eeClient,
    api: TestApiServer,
    messages: Messages,
    rooms: HashMap<Peer, OwnedRoomId>,
    pids: HashMap<Peer, u32>,
    floor: Floor,
    log: PathBuf,
    /// How many `start`s and `stop`s each peer was sent: even means its workload is at 0.
    switched: Mutex<HashMap<Peer, usize>>,
}

async fn run() {
    let n: usize = env_or("BENCH_N", DEFAULT_N);
    let gap = Duration::from_millis(env_or("BENCH_GAP_MS", 1000));
    let modes: Vec<Mode> = std::env::var("BENCH_MODES")
        .unwrap_or_else(|_| "paced,back-to-back".into())
        .split(',')
        .map(|m| match m.trim() {
            "paced" => Mode::Paced(gap),
            "back-to-back" => Mode::BackToBack,
            other => panic!("BENCH_MODES: {other:?} is not `paced` or `back-to-back`"),
        })
        .collect();
    let with_seed = match std::env::var("BENCH_PEER").as_deref() {
        Ok("seed") => true,
        Ok("") | Err(_) => false,
        Ok(other) => panic!("BENCH_PEER: {other:?} is not `seed`"),
    };
    let binary = bench_binary();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let dir = scratch_dir();

    let api = TestApiServer::start().await.unwrap();
    api.add_deployment(OURS_NS, "clawdbot", 0);
    api.add_deployment(SEED_NS, "clawdbot", 0);
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
    let seed = if with_seed {
        synapse.register("seedbot").await;
        let setup = SeedSetup {
            homeserver: &synapse.url,
            localpart: "seedbot",
            password: "pw-seedbot-secret",
            allowed_user: "@alice:localhost",
            kubeconfig: &kubeconfig,
            namespace: SEED_NS,
            deployment: "clawdbot",
        };
        Some(SeedBot::start(dir.path(), &setup).await)
    } else {
        None
    };
    support::eventually(WAIT, "the bot's device to be cross-signed", || async {
        alice.devices_of(&bot()).await.iter().any(|(_, signed)| *signed).then_some(())
    })
    .await;
    let messages = Messages::record(&alice);

    let mut rooms = HashMap::new();
    let room = alice.create_encrypted_room(&[&bot()]).await;
    alice.wait_for_join(&room, &bot()).await;
    rooms.insert(Peer::Ours, room);
    let floor_room = alice.create_encrypted_room(&[&floor_bot()]).await;
    floor.join(&synapse.url, floor_room.as_str()).await;
    alice.wait_for_join(&floor_room, &floor_bot()).await;
    rooms.insert(Peer::Floor, floor_room);
    let mut pids = HashMap::from([(Peer::Ours, bridge.pid())]);
    if let Some(seed) = &seed {
        let room = alice.create_encrypted_room(&[&seed_bot()]).await;
        alice.wait_for_join(&room, &seed_bot()).await;
        rooms.insert(Peer::Seed, room);
        pids.insert(Peer::Seed, seed.pid());
    }
    let log = dir.path().join("bridge.log");
    let bench = Bench { alice, api, messages, rooms, pids, floor, log, switched: Mutex::default() };

    // Warm-up: Olm sessions and room keys, first room loads, connection pools.
    let peers: Vec<Peer> =
        [Peer::Ours, Peer::Seed, Peer::Floor].into_iter().filter(|p| bench.rooms.contains_key(p)).collect();
    for &peer in &peers {
        bench.command(peer, "status", true).await;
    }
    // NB: idle after the warm-up, with every peer's encryption set up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle: HashMap<Peer, Option<u64>> =
        bench.pids.iter().map(|(p, pid)| (*p, proc_status_kb(*pid, "VmRSS"))).collect();

    let metrics_before = scrape(&bridge.url).await;
    let mut results: Vec<(Mode, HashMap<Peer, Samples>)> = Vec::new();
    for &mode in &modes {
        let mut by_peer: HashMap<Peer, Samples> = HashMap::new();
        for round in 0..ROUNDS {
            let count = n / ROUNDS + usize::from(round < n % ROUNDS);
            for &peer in &peers {
                if peer == Peer::Floor && mode == Mode::BackToBack {
                    continue;
                }
                bench.block(peer, mode, count, by_peer.entry(peer).or_default()).await;
            }
        }
        results.push((mode, by_peer));
    }
    let metrics_after = scrape(&bridge.url).await;
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    println!();
    println!(
        "e2e_latency: {n} commands per peer and mode (alternating start/stop), encrypted rooms, real Synapse on loopback"
    );
    println!("server under test: {}", binary.display());
    println!("load average before / after: {} / {}", load_before.trim(), load_after.trim());
    for (mode, by_peer) in &results {
        println!();
        println!("{}", mode.name());
        println!("{:<48}{:>9}{:>9}{:>9}{:>9}", "(ms)", "p50", "p90", "p99", "max");
        let summary = |peer: Peer, reply: bool| {
            by_peer.get(&peer).map(|s| Summary::of(if reply { &s.reply } else { &s.patch })).filter(|s| s.n > 0)
        };
        for peer in [Peer::Ours, Peer::Seed, Peer::Floor] {
            if let Some(s) = summary(peer, false) {
                let what = if peer == Peer::Floor { "transaction received" } else { "PATCH /scale" };
                s.print(&format!("send → {what} ({})", peer.name()));
            }
            if let Some(s) = summary(peer, true) {
                s.print(&format!("send → decrypted reply ({})", peer.name()));
            }
        }
        let ratio = |what: &str, a: Option<Summary>, b: Option<Summary>| {
            if let (Some(a), Some(b)) = (a, b) {
                println!(
                    "{what:<48}{:>9.2}{:>9.2}{:>9.2}{:>9.2}",
                    a.p50 / b.p50,
                    a.p90 / b.p90,
                    a.p99 / b.p99,
                    a.max / b.max
                );
            }
        };
        ratio("ratio bridge / old bot, send → PATCH", summary(Peer::Ours, false), summary(Peer::Seed, false));
        ratio("ratio bridge / old bot, send → reply", summary(Peer::Ours, true), summary(Peer::Seed, true));
        ratio("ratio bridge / floor, send → PATCH", summary(Peer::Ours, false), summary(Peer::Floor, false));
        let cpu = |peer: Peer| by_peer.get(&peer).filter(|s| s.commands > 0).map(|s| s.cpu_ms / s.commands as f64);
        for peer in [Peer::Ours, Peer::Seed] {
            if let Some(ms) = cpu(peer) {
                println!("CPU per command ({}): {ms:.2} ms (utime+stime)", peer.name());
            }
        }
        if let (Some(a), Some(b)) = (cpu(Peer::Ours), cpu(Peer::Seed)) {
            println!("ratio bridge / old bot, CPU per command: {:.2}", a / b);
        }
    }
    println!();
    for name in ["transaction_to_patch_seconds", "transaction_to_reply_seconds", "transaction_handling_seconds"] {
        let name = format!("matrix_k8s_toggle_{name}");
        let buckets = diff(&histogram(&metrics_after, &name), &histogram(&metrics_before, &name));
        let count = buckets.last().map_or(0.0, |b| b.1);
        let q = |q: f64| quantile(&buckets, q).map_or("-".to_owned(), |s| format!("{:.2}", s * 1000.0));
        println!(
            "{:<48}{:>9}{:>9}{:>9}{:>9}  ({count} samples, all modes, from histogram buckets)",
            format!("bridge-internal {}", name.trim_start_matches("matrix_k8s_toggle_")),
            q(0.5),
            q(0.9),
            q(0.99),
            ""
        );
    }
    println!();
    for peer in [Peer::Ours, Peer::Seed] {
        if let Some(pid) = bench.pids.get(&peer) {
            println!(
                "RSS ({}): idle after the warm-up {} KiB, after the run {} KiB (peak {} KiB)",
                peer.name(),
                idle[&peer].unwrap_or(0),
                proc_status_kb(*pid, "VmRSS").unwrap_or(0),
                proc_status_kb(*pid, "VmHWM").unwrap_or(0)
            );
        }
    }
    if let (Some(Some(a)), Some(Some(b))) = (idle.get(&Peer::Ours), idle.get(&Peer::Seed)) {
        println!("ratio bridge / old bot, idle RSS: {:.2}", *a as f64 / *b as f64);
    }

    bridge.stop();
    drop(seed);
    drop(synapse);
}

impl Bench {
    /// `count` commands to `peer`, one after the other as `mode` has them, into `samples`.
    async fn block(&self, peer: Peer, mode: Mode, count: usize, samples: &mut Samples) {
        let cpu_before = self.pids.get(&peer).map(|pid| Cpu::of(*pid));
        let mut last = None;
        for _ in 0..count {
            let text = {
                let mut switched = self.switched.lock().unwrap();
                let n = switched.entry(peer).or_default();
                *n += 1;
                if *n % 2 == 1 { "start" } else { "stop" }
            };
            let (patch, reply, command) = self.command(peer, text, mode != Mode::BackToBack).await;
            samples.patch.push(patch);
            samples.reply.extend(reply);
            last = Some(command);
            if let Mode::Paced(gap) = mode {
                tokio::time::sleep(gap).await;
            }
        }
        // NB: the bridge's last rollout report belongs to this block.
        if let (Peer::Ours, Mode::BackToBack, Some(command)) = (peer, mode, &last) {
            self.messages.reply_to(command, 2).await;
        }
        if let (Some(before), Some(pid)) = (cpu_before, self.pids.get(&peer)) {
            samples.cpu_ms += Cpu::of(*pid).since(&before).tick_ms;
        }
        samples.commands += count;
    }

    /// Sends `text` to `peer` and waits for what it does: returns send → PATCH (the
    /// transaction's arrival for the floor), send → reply (none for the floor) and the event.
    /// With `settle`, also waits for the bridge's rollout report.
    async fn command(&self, peer: Peer, text: &str, settle: bool) -> (f64, Option<f64>, OwnedEventId) {
        let room = &self.rooms[&peer];
        let is_status = text == "status";
        match peer {
            Peer::Floor => {
                let sent = SystemTime::now();
                let event = self.alice.send_text(room, text).await;
                (ms_between(sent, self.floor.wait(&event).await), None, event)
            }
            Peer::Ours => {
                let patches = scale_patches(&self.api, OURS_NS).len();
                let sent = SystemTime::now();
                let command = self.alice.send_text(room, text).await;
                let (replied, answer) = self.messages.reply_to(&command, 1).await;
                assert!(
                    is_status || answer.contains("is starting") || answer.contains("is stopping"),
                    "`{text}` was answered with {answer:?}; bridge log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
                let patched = if is_status { replied } else { self.patch(OURS_NS, patches).await };
                if settle && !is_status {
                    self.messages.reply_to(&command, 2).await;
                }
                (ms_between(sent, patched), Some(ms_between(sent, replied)), command)
            }
            Peer::Seed => {
                let patches = scale_patches(&self.api, SEED_NS).len();
                let before = self.messages.count_from(room, &seed_bot());
                let sent = SystemTime::now();
                let command = self.alice.send_text(room, text).await;
                let (replied, answer) = self.messages.nth_from(room, &seed_bot(), before).await;
                assert!(
                    is_status || answer.contains("Deployment is now"),
                    "the old bot answered `{text}` with {answer:?}"
                );
                let patched = if is_status { replied } else { self.patch(SEED_NS, patches).await };
                (ms_between(sent, patched), Some(ms_between(sent, replied)), command)
            }
        }
    }

    /// When the `index`-th PATCH of a `/scale` in `namespace` arrived.
    async fn patch(&self, namespace: &str, index: usize) -> SystemTime {
        wait_for(WAIT, "the PATCH of /scale", || async {
            scale_patches(&self.api, namespace).get(index).map(|r| r.received_at)
        })
        .await
    }
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

/// Every message the client decrypted from someone else: room, sender, when, text, and the
/// event it replies to.
struct Messages {
    seen: Arc<Mutex<Vec<Seen>>>,
}

struct Seen {
    room: OwnedRoomId,
    sender: OwnedUserId,
    at: SystemTime,
    body: String,
    in_reply_to: Option<OwnedEventId>,
}

impl Messages {
    fn record(client: &E2eeClient) -> Messages {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let me = client.user_id();
        client.client.add_event_handler(move |event: OriginalSyncRoomMessageEvent, room: Room| {
            let at = SystemTime::now();
            let (sink, me) = (sink.clone(), me.clone());
            async move {
                if event.sender != me {
                    let in_reply_to = match &event.content.relates_to {
                        Some(Relation::Reply(reply)) => Some(reply.in_reply_to.event_id.clone()),
                        _ => None,
                    };
                    let body = event.content.body().to_owned();
                    let room = room.room_id().to_owned();
                    sink.lock().unwrap().push(Seen { room, sender: event.sender, at, body, in_reply_to });
                }
            }
        });
        Messages { seen }
    }

    /// Waits for the `count`-th reply to `event`; returns when the first one arrived and its text.
    async fn reply_to(&self, event: &OwnedEventId, count: usize) -> (SystemTime, String) {
        wait_for(WAIT, &format!("{count} replies to {event}"), || async {
            let seen = self.seen.lock().unwrap();
            let answers: Vec<_> = seen.iter().filter(|s| s.in_reply_to.as_ref() == Some(event)).collect();
            (answers.len() >= count).then(|| (answers[0].at, answers[0].body.clone()))
        })
        .await
    }

    /// How many messages `sender` sent into `room` so far.
    fn count_from(&self, room: &OwnedRoomId, sender: &OwnedUserId) -> usize {
        self.seen.lock().unwrap().iter().filter(|s| &s.room == room && &s.sender == sender).count()
    }

    /// Waits for the `index`-th message (from 0) of `sender` in `room`: when, and its text.
    async fn nth_from(&self, room: &OwnedRoomId, sender: &OwnedUserId, index: usize) -> (SystemTime, String) {
        wait_for(WAIT, &format!("message {index} of {sender}"), || async {
            let seen = self.seen.lock().unwrap();
            let from = seen.iter().filter(|s| &s.room == room && &s.sender == sender).nth(index)?;
            Some((from.at, from.body.clone()))
        })
        .await
    }
}

fn scale_patches(api: &TestApiServer, namespace: &str) -> Vec<test_apiserver::RecordedRequest> {
    let prefix = format!("/apis/apps/v1/namespaces/{namespace}/");
    api.requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.starts_with(&prefix) && r.path.ends_with("/scale"))
        .collect()
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
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Summary {
    fn of(samples: &[f64]) -> Summary {
        if samples.is_empty() {
            return Summary { n: 0, p50: 0.0, p90: 0.0, p99: 0.0, max: 0.0 };
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
        Summary { n: sorted.len(), p50: rank(0.5), p90: rank(0.9), p99: rank(0.99), max: sorted[sorted.len() - 1] }
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
