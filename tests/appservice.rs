#![recursion_limit = "256"]
//! The appservice foundation against a real Synapse: registration accepted, transactions
//! delivered, tokens checked, replays deduplicated (also across restarts), garbage refused.

mod support;

use serde_json::json;
use support::{
    bridge::{BridgeProcess, BridgeSetup},
    client::User,
    scratch_dir,
    stack::{Stack, WAIT},
    synapse::Synapse,
};

fn txn_body(event_id: &str) -> serde_json::Value {
    json!({ "events": [{
        "type": "m.room.message", "event_id": event_id, "room_id": "!r:localhost",
        "sender": "@mallory:localhost", "origin_server_ts": 1, "content": { "msgtype": "m.text", "body": "hi" }
    }]})
}

async fn put_txn(bridge: &BridgeProcess, txn: &str, token: Option<&str>, body: &str) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new()
        .put(format!("{}/_matrix/app/v1/transactions/{txn}", bridge.url))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synapse_accepts_the_generated_registration_and_pushes_an_invite_the_bot_joins() {
    let s = Stack::start().await;
    let (synapse, bridge) = (&s.synapse, &s.bridge);
    let (alice_id, token) = synapse.register("alice").await;
    let alice = User::new(&synapse.url, alice_id, token);
    let room = alice.create_room(&["@toggle:localhost"], false).await;
    alice.wait_for_membership(&room, "@toggle:localhost", "join", WAIT).await;
    assert!(bridge.metric("matrix_k8s_toggle_transactions_total{result=\"ok\"}").await >= 1.0);
    assert!(bridge.log().contains("the homeserver can reach us"), "{}", bridge.log());
    // NB: the log goes to a file, as with `kubectl logs`: plain text, no colour codes.
    assert!(!bridge.log().contains('\u{1b}'), "ANSI escape codes in a log that is not a terminal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_from_a_user_who_is_not_allowed_is_rejected() {
    let s = Stack::start().await;
    let synapse = &s.synapse;
    let (id, token) = synapse.register("mallory").await;
    let mallory = User::new(&synapse.url, id, token);
    let room = mallory.create_room(&["@toggle:localhost"], false).await;
    mallory.wait_for_membership(&room, "@toggle:localhost", "leave", WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_gets_403_and_a_missing_one_401() {
    let s = Stack::start().await;
    let (bridge, hs_token) = (&s.bridge, s.hs_token.clone());
    let body = txn_body("$e1").to_string();
    let (status, v) = put_txn(bridge, "t1", None, &body).await;
    assert_eq!((status, v["errcode"].as_str()), (401, Some("M_MISSING_TOKEN")));
    let (status, v) = put_txn(bridge, "t1", Some("not-the-token"), &body).await;
    assert_eq!((status, v["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
    let status = reqwest::Client::new()
        .put(format!("{}/transactions/t1?access_token=wrong", bridge.url))
        .bearer_auth(&hs_token)
        .body(body.clone())
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 403, "header and query token must agree");
    assert_eq!(bridge.metric("matrix_k8s_toggle_events_total{type=\"m.room.message\"}").await, 0.0);
    let (status, _) = put_txn(bridge, "t1", Some(&hs_token), &body).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_transaction_twice_is_processed_once_also_across_a_restart() {
    let mut s = Stack::start().await;
    let hs_token = s.hs_token.clone();
    let bridge = &mut s.bridge;
    let body = txn_body("$dup").to_string();
    assert_eq!(put_txn(bridge, "same", Some(&hs_token), &body).await, (200, json!({})));
    assert_eq!(put_txn(bridge, "same", Some(&hs_token), &body).await, (200, json!({})));
    // NB: Synapse sends transactions of its own (key counts), so only ours are counted by type.
    assert_eq!(bridge.metric("matrix_k8s_toggle_transactions_total{result=\"replayed\"}").await, 1.0);
    assert_eq!(bridge.metric("matrix_k8s_toggle_events_total{type=\"m.room.message\"}").await, 1.0);

    let status = bridge.terminate();
    assert!(status.success(), "graceful shutdown exits 0, got {status:?}");
    bridge.start_again().await;
    assert_eq!(put_txn(bridge, "same", Some(&hs_token), &body).await, (200, json!({})));
    assert_eq!(bridge.metric("matrix_k8s_toggle_transactions_total{result=\"replayed\"}").await, 1.0);
    assert_eq!(bridge.metric("matrix_k8s_toggle_events_total{type=\"m.room.message\"}").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_body_gets_400_and_the_server_keeps_serving() {
    let s = Stack::start().await;
    let (bridge, hs_token) = (&s.bridge, s.hs_token.clone());
    let (status, v) = put_txn(bridge, "g1", Some(&hs_token), "{not json").await;
    assert_eq!((status, v["errcode"].as_str()), (400, Some("M_NOT_JSON")));
    let (status, v) = put_txn(bridge, "g2", Some(&hs_token), r#"{"events": 5}"#).await;
    assert_eq!((status, v["errcode"].as_str()), (400, Some("M_BAD_JSON")));
    let (status, _) = put_txn(bridge, "g3", Some(&hs_token), &txn_body("$ok").to_string()).await;
    assert_eq!(status, 200);
    let health = reqwest::get(format!("{}/healthz", bridge.url)).await.unwrap();
    assert!(health.status().is_success());
}

// NB: Synapse refuses /sync for appservice users; invites sent while we were away reach us
// as queued transactions when we return, and get the same check as new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invites_waiting_at_start_up_are_joined_only_when_the_inviter_is_allowed() {
    let dir = scratch_dir();
    let setup = BridgeSetup::new(dir.path());
    let synapse = Synapse::start(dir.path(), &setup.registration);
    let (id, token) = synapse.register("alice").await;
    let alice = User::new(&synapse.url, id, token);
    let (id, token) = synapse.register("mallory").await;
    let mallory = User::new(&synapse.url, id, token);
    let welcome = alice.create_room(&["@toggle:localhost"], false).await;
    let lure = mallory.create_room(&["@toggle:localhost"], false).await;

    let _bridge = setup.start(&synapse.url).await;
    alice.wait_for_membership(&welcome, "@toggle:localhost", "join", WAIT).await;
    mallory.wait_for_membership(&lure, "@toggle:localhost", "leave", WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_without_msc3202_is_reported_in_the_log_with_the_fix() {
    let dir = scratch_dir();
    let setup = BridgeSetup::new(dir.path());
    let text = std::fs::read_to_string(&setup.registration).unwrap();
    std::fs::write(&setup.registration, text.replace("org.matrix.msc3202: true", "org.matrix.msc3202: false")).unwrap();
    let synapse = Synapse::start(dir.path(), &setup.registration);
    let bridge = setup.start(&synapse.url).await;
    let (id, token) = synapse.register("alice").await;
    let alice = User::new(&synapse.url, id, token);
    let room = alice.create_room(&["@toggle:localhost"], false).await;
    alice.wait_for_membership(&room, "@toggle:localhost", "join", WAIT).await;
    for text in ["one", "two", "three"] {
        alice.send_text(&room, text).await;
    }
    support::eventually(WAIT, "the missing-MSC3202 warning", || async {
        bridge.log().contains("Synapse sends no one-time-key counts").then_some(())
    })
    .await;
    assert!(bridge.log().contains("msc3202_transaction_extensions: true"));
}
