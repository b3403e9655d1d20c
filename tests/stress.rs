#![recursion_limit = "256"]
//! Stress, bounded: thousands of transactions with mixed events, hundreds of commands among
//! them, replays of whole transactions and of single events. Every command is answered
//! exactly once and memory stays bounded.

mod support;

use std::{
    collections::HashMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use support::{
    client::{User, enc},
    eventually,
    stack::Stack,
};
use test_apiserver::TestApiServer;

const BOT: &str = "@toggle:localhost";
const TRANSACTIONS: usize = 2000;
const COMMAND_EVERY: usize = 6;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn message(room: &str, sender: &str, id: &str, body: &str) -> Value {
    json!({"type": "m.room.message", "room_id": room, "sender": sender, "event_id": id,
           "origin_server_ts": now_ms(), "content": {"msgtype": "m.text", "body": body}})
}

fn noise(i: usize) -> Vec<Value> {
    vec![
        json!({"type": "m.room.member", "room_id": "!elsewhere:localhost", "sender": format!("@u{i}:localhost"),
               "state_key": format!("@u{i}:localhost"), "event_id": format!("$member-{i}"),
               "origin_server_ts": now_ms(), "content": {"membership": "join"}}),
        json!({"type": "m.reaction", "room_id": "!elsewhere:localhost", "sender": "@u:localhost",
               "event_id": format!("$reaction-{i}"), "origin_server_ts": now_ms(),
               "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$x", "key": "👍"}}}),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_transactions_lose_and_repeat_no_command_and_memory_stays_bounded() {
    let api = TestApiServer::start().await.unwrap();
    api.add_deployment("clawdbot", "clawdbot", 1);
    let stack = Stack::build().api(api).env("COMMANDS_PER_MINUTE", "0").env("RUST_LOG", "warn").start().await;
    let (bridge, synapse, hs_token, api) = (&stack.bridge, &stack.synapse, stack.hs_token.clone(), &stack.api);
    let alice = stack.user("alice").await;
    let room = stack.dm(&alice).await;

    let http = reqwest::Client::new();
    let put = |txn: String, events: Vec<Value>| {
        let (http, url, token) = (http.clone(), bridge.url.clone(), hs_token.clone());
        async move {
            let resp = http
                .put(format!("{url}/_matrix/app/v1/transactions/{txn}"))
                .bearer_auth(token)
                .json(&json!({ "events": events, "ephemeral": [{"type": "m.typing", "room_id": "!r:localhost", "content": {"user_ids": []}}] }))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "transaction {txn}");
        }
    };
    let mut commands = Vec::new();
    for i in 0..TRANSACTIONS {
        let mut events = noise(i);
        events.push(message(&room, "@mallory:localhost", &format!("$stranger-{i}"), "stop"));
        if i % COMMAND_EVERY == 0 {
            let id = format!("$stress-command-{i}");
            events.push(message(&room, "@alice:localhost", &id, "status"));
            commands.push(id);
        }
        put(format!("stress-{i}"), events.clone()).await;
        if i % 10 == 0 {
            put(format!("stress-{i}"), events.clone()).await;
        }
        if i % 15 == 0 && !commands.is_empty() {
            let again = &commands[commands.len() / 2];
            put(format!("again-{i}"), vec![message(&room, "@alice:localhost", again, "status")]).await;
        }
    }
    let peak_after_load = bridge.rss_kib().unwrap();

    eventually(Duration::from_secs(240), "every command to be answered", || async {
        let replies = all_bot_replies(&alice, &synapse.url, &room).await;
        (replies.len() >= commands.len()).then_some(())
    })
    .await;
    // NB: one more command through Synapse: once it is answered, everything before it was handled.
    let marker = alice.send_text(&room, "status").await;
    let answered = eventually(Duration::from_secs(60), "the last command to be answered", || async {
        let replies = all_bot_replies(&alice, &synapse.url, &room).await;
        replies.contains(&marker).then(|| replies.into_iter().filter(|r| *r != marker).collect::<Vec<_>>())
    })
    .await;
    assert!(answered.len() >= commands.len());
    let mut per_command: HashMap<String, usize> = HashMap::new();
    for reply_to in &answered {
        *per_command.entry(reply_to.clone()).or_default() += 1;
    }
    for id in &commands {
        assert_eq!(per_command.get(id), Some(&1), "command {id} answered {:?} times", per_command.get(id));
    }
    assert_eq!(per_command.len(), commands.len(), "replies to events that were not commands");
    let rss = bridge.rss_kib().unwrap().max(peak_after_load);
    assert!(rss < 200 * 1024, "resident memory {rss} KiB after the stress run");
    assert!(api.requests().iter().all(|r| r.method != "PATCH"), "a stranger's stop ran");
}

/// The `m.in_reply_to` targets of every message the bot sent into `room`.
async fn all_bot_replies(alice: &User, homeserver: &str, room: &str) -> Vec<String> {
    let token = alice.token().to_owned();
    let http = reqwest::Client::new();
    let mut from: Option<String> = None;
    let mut out = Vec::new();
    loop {
        let mut url = format!("{homeserver}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1000", enc(room));
        if let Some(f) = &from {
            url.push_str(&format!("&from={}", enc(f)));
        }
        let page: Value = http.get(url).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
        for e in page["chunk"].as_array().into_iter().flatten() {
            if e["sender"] == BOT
                && let Some(id) = e["content"]["m.relates_to"]["m.in_reply_to"]["event_id"].as_str()
            {
                out.push(id.to_owned());
            }
        }
        match page["end"].as_str() {
            Some(end) if page["chunk"].as_array().is_some_and(|c| !c.is_empty()) => from = Some(end.to_owned()),
            _ => break,
        }
    }
    out
}
