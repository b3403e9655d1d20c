//! Throughput of the transaction endpoint of the release binary, with its durable txnId dedupe
//! (SQLite in STATE_DIR), under a load generator on loopback.
//!
//! For each connection count in `LOAD_CONNECTIONS` (default `1,8`), that many concurrent
//! clients PUT transactions with distinct txnIds, each carrying `LOAD_EVENTS` (default 4) room
//! events, for `LOAD_SECS` seconds (default 10). The events are notices from a user who is not
//! allowed, so the worker drains them without calling anyone. Reported: transactions/s, request
//! latency, the server's CPU and resident memory (VmRSS) under load, and how long the worker
//! took to drain the queue. No homeserver runs: MATRIX_HOMESERVER points at a closed port and
//! there is no KUBECONFIG; the endpoint must answer all the same.
//!
//! Run: `cargo bench --bench load`. The server under test is the production release build (made
//! in `<target>/bench-server` on first use); `BENCH_BIN=/path/to/binary` picks another.

use std::{
    net::TcpListener,
    path::Path,
    process::Command,
    rc::Rc,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use common::{ServerProcess, bench_binary, env_or, proc_status_kb};
use matrix_k8s_toggle::registration::{Registration, parse_server_name};

mod common;

/// Longest a phase may run, whatever LOAD_SECS says.
const MAX_SECS: u64 = 120;

/// Longest wait for the worker to drain the queue after a phase.
const DRAIN_SECS: u64 = 15;

static NEXT_TXN: AtomicU64 = AtomicU64::new(0);

fn main() {
    // NB: the generator gets one thread, so the server has the other core to itself.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(run());
}

async fn run() {
    let secs = env_or("LOAD_SECS", 10u64).clamp(1, MAX_SECS);
    let events = env_or("LOAD_EVENTS", 4usize).max(1);
    let connections: Vec<usize> = std::env::var("LOAD_CONNECTIONS")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .filter(|c| *c > 0)
        .collect();
    let binary = bench_binary();
    let scratch = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("test-scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let dir = tempfile::Builder::new().prefix("load").tempdir_in(&scratch).unwrap();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let port = free_port();
    let url = url::Url::parse(&format!("http://127.0.0.1:{port}")).unwrap();
    let registration =
        Registration::generate("k8s-toggle", &url, &parse_server_name("localhost").unwrap(), "toggle").unwrap();
    let registration_path = dir.path().join("registration.yaml");
    std::fs::write(&registration_path, registration.to_yaml()).unwrap();
    let hs_token = registration.hs_token.expose().to_owned();
    let state = dir.path().join("state");
    let closed_port = free_port();
    let server = ServerProcess::spawn(
        &binary,
        [
            ("MATRIX_HOMESERVER", format!("http://127.0.0.1:{closed_port}")),
            ("MATRIX_SERVER_NAME", "localhost".into()),
            ("REGISTRATION_PATH", registration_path.display().to_string()),
            ("STATE_DIR", state.display().to_string()),
            ("LISTEN_ADDRESS", format!("127.0.0.1:{port}")),
            ("ALLOWED_USERS", "@alice:localhost".into()),
            ("ECHO_MODE", "false".into()),
            ("RUST_LOG", "info".into()),
        ],
        &dir.path().join("bridge.log"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
    let started = Instant::now();
    while !http.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
        assert!(started.elapsed() < Duration::from_secs(30), "the server did not start; see {}", dir.path().display());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let probe = put(&http, &base, &hs_token, "probe", &body("probe", events)).await;
    assert_eq!(probe, Ok(200), "the transaction endpoint does not answer while the homeserver is down");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = proc_status_kb(server.pid(), "VmRSS").unwrap_or(0);

    println!();
    println!(
        "load: PUT /_matrix/app/v1/transactions/{{txnId}}, {events} events each, distinct txnIds, {secs} s per phase"
    );
    println!("server under test: {} (homeserver down, no Kubernetes)", binary.display());
    println!("load average before: {}", load_before.trim());
    println!("idle RSS before load: {:.1} MiB", idle_rss as f64 / 1024.0);
    println!();
    println!(
        "{:>5}{:>10}{:>10}{:>11}{:>9}{:>9}{:>9}{:>11}{:>11}{:>13}{:>10}",
        "conn",
        "txns",
        "txn/s",
        "events/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "CPU cores",
        "CPU µs/txn",
        "max RSS MiB",
        "drain s"
    );
    let mut sent_total = 1u64;
    for &k in &connections {
        let phase = phase(&http, &base, &hs_token, &server, k, events, Duration::from_secs(secs)).await;
        sent_total += phase.ok;
        let drain = drain(&state.join("state.sqlite3"), Duration::from_secs(DRAIN_SECS)).await;
        println!(
            "{k:>5}{:>10}{:>10.0}{:>11.0}{:>9.2}{:>9.2}{:>9.2}{:>11.2}{:>11.0}{:>13.1}{:>10}",
            phase.ok,
            phase.ok as f64 / phase.elapsed,
            (phase.ok * events as u64) as f64 / phase.elapsed,
            phase.p50_ms,
            phase.p99_ms,
            phase.max_ms,
            phase.cpu_s / phase.elapsed,
            phase.cpu_s * 1e6 / phase.ok.max(1) as f64,
            phase.max_rss_kb as f64 / 1024.0,
            drain.map_or(format!("> {DRAIN_SECS}"), |d| format!("{d:.1}")),
        );
        if phase.failed > 0 {
            println!("      {} requests failed or were refused", phase.failed);
        }
    }

    let replay = put(&http, &base, &hs_token, "probe", &body("probe", events)).await;
    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let counter = |result: &str| {
        let prefix = format!("matrix_k8s_toggle_transactions_total{{result=\"{result}\"}}");
        metrics.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse::<f64>().ok()).unwrap_or(0.0)
    };
    println!(
        "(drain: until the worker has handled every queued event; it waits for encryption, which needs the homeserver)"
    );
    println!();
    println!(
        "replaying a processed txnId answers {:?}; the server counted {} new and {} replayed transactions (sent {sent_total} new)",
        replay,
        counter("ok"),
        counter("replayed")
    );
    println!(
        "peak RSS of the run (VmHWM): {:.1} MiB; state database: {:.1} MiB",
        proc_status_kb(server.pid(), "VmHWM").unwrap_or(0) as f64 / 1024.0,
        dir_size(&state) as f64 / 1048576.0
    );
    server.stop();
}

struct Phase {
    ok: u64,
    failed: u64,
    elapsed: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_s: f64,
    max_rss_kb: u64,
}

#[allow(clippy::too_many_arguments)]
async fn phase(
    http: &reqwest::Client,
    base: &str,
    hs_token: &str,
    server: &ServerProcess,
    connections: usize,
    events: usize,
    length: Duration,
) -> Phase {
    let pid = server.pid();
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let deadline = started + length;
    let max_rss = Rc::new(std::cell::Cell::new(0u64));
    let local = tokio::task::LocalSet::new();
    let sampler = {
        let max_rss = max_rss.clone();
        local.spawn_local(async move {
            while Instant::now() < deadline {
                max_rss.set(max_rss.get().max(proc_status_kb(pid, "VmRSS").unwrap_or(0)));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let clients: Vec<_> = (0..connections)
        .map(|_| {
            let (http, base, hs_token) = (http.clone(), base.to_owned(), hs_token.to_owned());
            local.spawn_local(async move {
                let (mut latencies, mut failed) = (Vec::new(), 0u64);
                while Instant::now() < deadline {
                    let txn = format!("load-{}", NEXT_TXN.fetch_add(1, Ordering::Relaxed));
                    let body = body(&txn, events);
                    let sent = Instant::now();
                    match put(&http, &base, &hs_token, &txn, &body).await {
                        Ok(200) => latencies.push(sent.elapsed()),
                        _ => failed += 1,
                    }
                }
                (latencies, failed)
            })
        })
        .collect();
    let (mut latencies, mut failed) = (Vec::new(), 0);
    local
        .run_until(async {
            for client in clients {
                let (l, f) = client.await.unwrap();
                latencies.extend(l);
                failed += f;
            }
            sampler.await.unwrap();
        })
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_s = cpu_seconds(pid) - cpu_before;
    latencies.sort();
    let ms = |q: f64| {
        latencies
            .get(((q * latencies.len() as f64).ceil() as usize).saturating_sub(1))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Phase {
        ok: latencies.len() as u64,
        failed,
        elapsed,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        max_ms: ms(1.0),
        cpu_s,
        max_rss_kb: max_rss.get(),
    }
}

/// A transaction of `events` notices from a user who is not allowed.
fn body(txn: &str, events: usize) -> String {
    let events: Vec<String> = (0..events)
        .map(|j| {
            format!(
                r#"{{"type":"m.room.message","event_id":"${txn}-{j}:localhost","room_id":"!load:localhost","sender":"@stranger:localhost","origin_server_ts":1700000000000,"content":{{"msgtype":"m.notice","body":"load {txn} {j}"}},"unsigned":{{"age":5}}}}"#
            )
        })
        .collect();
    format!(r#"{{"events":[{}]}}"#, events.join(","))
}

async fn put(http: &reqwest::Client, base: &str, hs_token: &str, txn: &str, body: &str) -> Result<u16, String> {
    let response = http
        .put(format!("{base}/_matrix/app/v1/transactions/{txn}"))
        .bearer_auth(hs_token)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    // NB: reading the body to its end hands the connection back to the pool.
    response.bytes().await.map_err(|e| e.to_string())?;
    Ok(status)
}

/// Seconds until the worker has handled every queued event, or `None` after `limit`.
async fn drain(database: &Path, limit: Duration) -> Option<f64> {
    let started = Instant::now();
    let db = rusqlite::Connection::open_with_flags(database, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    loop {
        let pending: i64 = db.query_row("SELECT count(*) FROM jobs WHERE done = 0", [], |r| r.get(0)).unwrap_or(-1);
        if pending == 0 {
            return Some(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
        })
        .unwrap_or(0)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let hz: f64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // NB: after the command name (which may hold spaces) come fields 3, 4, ...: utime and
    // stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    (field(14) + field(15)) as f64 / hz
}
