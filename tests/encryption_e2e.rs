#![recursion_limit = "256"]
//! End-to-end encryption against a real Synapse and a real E2EE client (matrix-sdk): commands
//! in encrypted rooms are decrypted, acted on once, and answered encrypted.

mod support;

use std::time::Duration;

use matrix_sdk::ruma::{EventId, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, user_id};
use serde_json::{Value, json};
use support::{bridge::tokens, client::User, e2ee::E2eeClient, scratch_dir, stack::Stack};

fn bot() -> OwnedUserId {
    user_id!("@toggle:localhost").to_owned()
}

async fn stack(with_proxy: bool) -> Stack {
    stack_with(with_proxy, &[]).await
}

/// The stack for these tests: alice allowed, rollouts followed for 20 s, a proxy between
/// Synapse and the bridge when `with_proxy`, and the `extra` settings.
async fn stack_with(with_proxy: bool, extra: &[(&str, &str)]) -> Stack {
    let build = Stack::build().env("ALLOWED_USERS", "@alice:localhost").env("ROLLOUT_TIMEOUT_SECS", "20").envs(extra);
    if with_proxy { build.proxy_before_bridge() } else { build }.start().await
}

async fn encrypted_room_with_bot(alice: &E2eeClient) -> matrix_sdk::ruma::OwnedRoomId {
    let room = alice.create_encrypted_room(&[&bot()]).await;
    alice.wait_for_join(&room, &bot()).await;
    support::eventually(Duration::from_secs(30), "alice's client to know the bot's device", || async {
        (!alice.devices_of(&bot()).await.is_empty()).then_some(())
    })
    .await;
    room
}

/// Alice in an encrypted room with the bot, whose `status` the bot has answered once.
async fn alice_answered_in_an_encrypted_room(s: &Stack) -> (E2eeClient, matrix_sdk::ruma::OwnedRoomId) {
    let alice = s.person("alice", "1").await;
    let room = encrypted_room_with_bot(&alice).await;
    alice.send_text(&room, "status").await;
    alice.wait_for_messages(&room, &bot(), 1).await;
    (alice, room)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_start_is_patched_once_and_answered_encrypted_by_a_cross_signed_bot_device() {
    let s = stack(false).await;
    let alice = s.person("alice", "1").await;
    let room = encrypted_room_with_bot(&alice).await;

    let command = alice.send_text(&room, "start").await;
    let replies = alice.wait_for_messages(&room, &bot(), 2).await;
    assert!(replies[0].body.contains("clawdbot is starting: 0 → 1"), "{replies:?}");
    assert!(replies[1].body.starts_with("clawdbot is up: 1/1 ready"), "{replies:?}");
    for reply in &replies {
        assert!(reply.encrypted, "a reply went out in plaintext: {reply:?}");
        assert_eq!(reply.msgtype, "m.notice");
        assert_eq!(reply.in_reply_to.as_ref(), Some(&command));
    }
    assert_eq!(s.scale_patches(), [json!({"spec":{"replicas":1}})]);

    let devices = alice.devices_of(&bot()).await;
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert!(devices[0].1, "the bot's device is not cross-signed by the bot: {devices:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_on_the_same_state_dir_commands_work_and_no_new_device_appears() {
    let mut s = stack(false).await;
    let (alice, room) = alice_answered_in_an_encrypted_room(&s).await;
    let before = alice.devices_of(&bot()).await;

    assert!(s.bridge.terminate().success());
    s.bridge.start_again().await;

    alice.send_text(&room, "start").await;
    let replies = alice.wait_for_messages(&room, &bot(), 2).await;
    assert!(replies[1].body.contains("clawdbot is starting"), "{replies:?}");
    assert!(replies[1].encrypted);
    assert_eq!(alice.devices_of(&bot()).await, before);
    assert_eq!(s.scale_patches().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_device_of_the_same_user_can_command() {
    let s = stack(false).await;
    let (alice, room) = alice_answered_in_an_encrypted_room(&s).await;
    // NB: the same members and devices as for the first reply: the device checks are skipped
    // (for the second or, if news of the bot's one-time keys came in between, the third).
    for count in [2, 3] {
        alice.send_text(&room, "status").await;
        alice.wait_for_messages(&room, &bot(), count).await;
    }
    let unchanged = "matrix_k8s_toggle_crypto_total{kind=\"devices_unchanged\"}";
    assert!(s.bridge.metric(unchanged).await >= 1.0, "the second reply rechecked every device");

    // NB: a new device must get the next room key all the same.
    let laptop = s.person("alice", "2").await;
    laptop.send_text(&room, "start").await;
    let replies = laptop.wait_for_messages(&room, &bot(), 1).await;
    assert!(replies.iter().any(|r| r.body.contains("clawdbot is starting") && r.encrypted), "{replies:?}");
    assert_eq!(s.scale_patches().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_who_joins_later_reads_the_next_reply_and_a_stranger_in_the_room_is_ignored() {
    let s = stack(false).await;
    let (alice, room) = alice_answered_in_an_encrypted_room(&s).await;

    let bob = s.person("bob", "1").await;
    alice.client.get_room(&room).unwrap().invite_user_by_id(&bob.user_id()).await.unwrap();
    bob.room(&room).await;
    bob.join(&room).await;
    alice.wait_for_join(&room, &bob.user_id()).await;

    bob.send_text(&room, "!toggle start").await;
    alice.send_text(&room, "!toggle status").await;
    let replies = alice.wait_for_messages(&room, &bot(), 2).await;
    assert!(replies[1].body.starts_with("clawdbot is off"), "{replies:?}");
    let seen_by_bob = bob.wait_for_messages(&room, &bot(), 1).await;
    assert!(seen_by_bob.iter().any(|r| r.body.starts_with("clawdbot is off") && r.encrypted), "{seen_by_bob:?}");

    // NB: a room's events are handled in order: had bob's command been answered, its answer
    // would have come before this one.
    assert!(s.scale_patches().is_empty(), "bob's command was run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_room_key_arrives_in_a_later_transaction_runs_exactly_once() {
    let s = stack(true).await;
    let (alice, room) = alice_answered_in_an_encrypted_room(&s).await;

    s.proxy().hold_to_device_from(alice.user_id().as_str());
    alice.client.get_room(&room).unwrap().discard_room_key().await.unwrap();
    alice.send_text(&room, "start").await;
    support::eventually(Duration::from_secs(30), "the bridge to wait for the room key", || async {
        (s.bridge.metric("matrix_k8s_toggle_crypto_total{kind=\"waiting_for_key\"}").await >= 1.0).then_some(())
    })
    .await;
    assert!(s.proxy().held() >= 1);
    assert!(s.scale_patches().is_empty());

    s.proxy().release(&s.hs_token).await;
    let replies = alice.wait_for_messages(&room, &bot(), 2).await;
    assert!(replies[1].body.contains("clawdbot is starting"), "{replies:?}");
    let answer = ask(&room, &alice, &alice, "status").await;
    assert!(answer.starts_with("clawdbot is "), "{answer}");
    assert_eq!(s.scale_patches(), [json!({"spec":{"replicas":1}})]);
    assert_eq!(s.bridge.metric("matrix_k8s_toggle_crypto_total{kind=\"recovered\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_passphrases_and_decrypted_bodies_never_reach_the_log_above_trace() {
    let passphrase = "correct-horse-battery-staple-42";
    let s = stack_with(false, &[("RUST_LOG", "debug"), ("CRYPTO_STORE_PASSPHRASE", passphrase)]).await;
    let alice = s.person("alice", "1").await;
    let room = encrypted_room_with_bot(&alice).await;
    alice.send_text(&room, "unicorn-secret-7781").await;
    let replies = alice.wait_for_messages(&room, &bot(), 1).await;
    assert!(replies[0].body.starts_with("Unknown command: unicorn-secret-7781"), "{replies:?}");
    alice.send_text(&room, "start").await;
    alice.wait_for_messages(&room, &bot(), 3).await;

    let log = s.bridge.log();
    assert!(log.contains("DEBUG"), "the log was not at debug level");
    let registration: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(s.dir.path().join("registration.yaml")).unwrap()).unwrap();
    for (what, secret) in [
        ("as_token", registration["as_token"].as_str().unwrap()),
        ("hs_token", registration["hs_token"].as_str().unwrap()),
        ("passphrase", passphrase),
        ("decrypted body", "unicorn-secret-7781"),
    ] {
        assert!(!log.contains(secret), "the {what} appears in the log");
    }
}

/// What the crypto database under `dir` holds, row by row (or its bytes, when SQLite cannot read
/// it), to tell that nothing was changed. NB: rows, not file bytes: SQLite itself folds its
/// write-ahead log into the file when any connection opens and closes it.
fn snapshot(dir: &std::path::Path) -> Vec<String> {
    let path = dir.join("matrix-sdk-crypto.sqlite3");
    let rows = || -> rusqlite::Result<Vec<String>> {
        let conn = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for table in tables {
            let mut stmt = conn.prepare(&format!("SELECT * FROM \"{table}\""))?;
            let columns = stmt.column_count();
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let values: Vec<String> =
                    (0..columns).map(|i| format!("{:?}", row.get_ref(i).map(|v| v.to_owned()))).collect();
                out.push(format!("{table}: {}", values.join(", ")));
            }
        }
        out.sort();
        Ok(out)
    };
    rows().unwrap_or_else(|_| vec![format!("{:?}", std::fs::read(&path).unwrap())])
}

/// The entries of the state directory whose name starts with "crypto." (set-aside stores).
fn set_aside_stores(state: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("crypto."))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_crypto_store_is_replaced_by_a_new_device_that_works_and_the_old_device_is_deleted() {
    let mut s = stack(false).await;
    let (alice, room) = alice_answered_in_an_encrypted_room(&s).await;
    let previous = alice.devices_of(&bot()).await;

    assert!(s.bridge.terminate().success());
    std::fs::remove_dir_all(s.dir.path().join("state").join("crypto")).unwrap();
    s.bridge.start_again().await;
    support::eventually(Duration::from_secs(30), "the bridge to make a new device", || async {
        s.bridge.log().contains("the crypto store for this device is gone").then_some(())
    })
    .await;
    let devices = support::eventually(Duration::from_secs(30), "a single new cross-signed bot device", || async {
        let d = alice.devices_of(&bot()).await;
        (d.len() == 1 && d[0].0 != previous[0].0 && d[0].1).then_some(d)
    })
    .await;
    assert!(devices[0].1, "the new device is not cross-signed: {devices:?}");
    alice.send_text(&room, "status").await;
    let replies = alice.wait_for_messages(&room, &bot(), 2).await;
    assert!(replies[1].body.starts_with("clawdbot is off"), "{replies:?}");
    assert!(replies[1].encrypted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_passphrase_a_lost_key_file_or_a_damaged_store_stop_start_up_and_leave_the_store_untouched() {
    let mut s = stack_with(false, &[("CRYPTO_STORE_PASSPHRASE", "the-right-passphrase-1")]).await;
    let (alice, room) = alice_answered_in_an_encrypted_room(&s).await;
    let devices = alice.devices_of(&bot()).await;
    assert!(s.bridge.terminate().success());
    let state = s.dir.path().join("state");
    let crypto = state.join("crypto");
    let before = snapshot(&crypto);
    assert!(!before.is_empty());

    for (case, passphrase) in [("wrong passphrase", Some("a-wrong-passphrase-2")), ("no passphrase, no key file", None)]
    {
        s.bridge.set_env("CRYPTO_STORE_PASSPHRASE", passphrase);
        let status = s.bridge.start_expecting_exit();
        assert!(!status.success(), "{case}: the bridge started");
        let log = s.bridge.log();
        assert!(log.contains("cannot unlock the crypto store"), "{case}: {log}");
        assert!(log.contains("set CRYPTO_STORE_PASSPHRASE to the passphrase it was made with"), "{case}: {log}");
        assert!(snapshot(&crypto) == before, "{case}: the crypto store was changed");
        assert!(set_aside_stores(&state).is_empty(), "{case}: the store was set aside");
    }

    s.bridge.set_env("CRYPTO_STORE_PASSPHRASE", Some("the-right-passphrase-1"));
    s.bridge.start_again().await;
    alice.send_text(&room, "status").await;
    let replies = alice.wait_for_messages(&room, &bot(), 2).await;
    assert!(replies[1].body.starts_with("clawdbot is off") && replies[1].encrypted, "{replies:?}");
    assert_eq!(alice.devices_of(&bot()).await, devices, "the right passphrase keeps the device");

    assert!(s.bridge.terminate().success());
    for entry in std::fs::read_dir(&crypto).unwrap() {
        std::fs::write(entry.unwrap().path(), b"this is not a database").unwrap();
    }
    let damaged = snapshot(&crypto);
    assert!(!damaged.is_empty());
    assert!(!s.bridge.start_expecting_exit().success(), "a damaged store let the bridge start");
    assert!(snapshot(&crypto) == damaged, "the damaged store was changed");
    assert!(set_aside_stores(&state).is_empty(), "the damaged store was set aside");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_state_database_lost_the_crypto_stores_own_device_is_kept_and_works() {
    let mut s = stack(false).await;
    let (alice, room) = alice_answered_in_an_encrypted_room(&s).await;
    let devices = alice.devices_of(&bot()).await;

    assert!(s.bridge.terminate().success());
    let state = s.dir.path().join("state");
    for name in ["state.sqlite3", "state.sqlite3-wal", "state.sqlite3-shm"] {
        let _ = std::fs::remove_file(state.join(name));
    }
    s.bridge.start_again().await;
    alice.send_text(&room, "start").await;
    let replies = alice.wait_for_messages(&room, &bot(), 2).await;
    assert!(replies[1].body.contains("clawdbot is starting") && replies[1].encrypted, "{replies:?}");
    assert_eq!(alice.devices_of(&bot()).await, devices, "a new device was made");
    assert!(s.bridge.log().contains("using the crypto store's own"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_deleted_on_the_homeserver_is_replaced_and_the_log_says_what_is_lost() {
    let mut s = stack(false).await;
    let (alice, room) = alice_answered_in_an_encrypted_room(&s).await;
    let previous = alice.devices_of(&bot()).await;

    assert!(s.bridge.terminate().success());
    let (_, as_token) = tokens(&s.registration());
    let resp = reqwest::Client::new()
        .delete(format!("{}/_matrix/client/v3/devices/{}?user_id=%40toggle%3Alocalhost", s.synapse.url, previous[0].0))
        .bearer_auth(&as_token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "deleting the bot's device: {}", resp.text().await.unwrap());
    s.bridge.start_again().await;

    let devices = support::eventually(Duration::from_secs(30), "a single new cross-signed bot device", || async {
        let d = alice.devices_of(&bot()).await;
        (d.len() == 1 && d[0].0 != previous[0].0 && d[0].1).then_some(d)
    })
    .await;
    let log = s.bridge.log();
    assert!(log.contains("the device no longer exists on the homeserver"), "{log}");
    assert!(log.contains("messages encrypted for the old device can no longer be read"), "{log}");
    assert_eq!(set_aside_stores(&s.dir.path().join("state")).len(), 1, "the old store is kept aside");
    // NB: Synapse pushed the device's deletion while the bridge was down, and to-device messages
    // sent while it retries that push are lost for good (its retries carry room events only):
    // a first command may be unreadable, as the bot then says. Send again, as a person would.
    for attempt in 1..=3 {
        alice.client.get_room(&room).unwrap().discard_room_key().await.unwrap();
        let command = alice.send_text(&room, "status").await;
        let reply = support::eventually(Duration::from_secs(40), "an answer to the status", || async {
            alice.received_from(&room, &bot()).into_iter().find(|r| r.in_reply_to.as_ref() == Some(&command))
        })
        .await;
        assert!(reply.encrypted, "{reply:?}");
        if reply.body.starts_with("clawdbot is off") {
            return;
        }
        assert!(reply.body.contains("I could not decrypt your message"), "attempt {attempt}: {reply:?}");
    }
    panic!("the new device {devices:?} never read a command");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_stays_unreadable_gets_one_answer_for_an_allowed_sender_and_none_for_others() {
    let s = stack_with(true, &[("DECRYPTION_WAIT_SECS", "1")]).await;
    let alice = s.person("alice", "1").await;
    let room = encrypted_room_with_bot(&alice).await;
    let bob = s.person("bob", "1").await;
    alice.client.get_room(&room).unwrap().invite_user_by_id(&bob.user_id()).await.unwrap();
    bob.room(&room).await;
    bob.join(&room).await;
    alice.wait_for_join(&room, &bob.user_id()).await;
    alice.send_text(&room, "!toggle status").await;
    alice.wait_for_messages(&room, &bot(), 1).await;

    s.proxy().hold_to_device_from(alice.user_id().as_str());
    s.proxy().hold_to_device_from(bob.user_id().as_str());
    alice.client.get_room(&room).unwrap().discard_room_key().await.unwrap();
    let lost = alice.send_text(&room, "!toggle start").await;
    bob.send_text(&room, "!toggle start").await;
    let replies = alice.wait_for_messages(&room, &bot(), 2).await;
    assert!(replies[1].body.contains("I could not decrypt your message"), "{replies:?}");
    assert!(replies[1].body.contains("send your command again"), "{replies:?}");
    assert_eq!(replies[1].in_reply_to.as_ref(), Some(&lost));
    // NB: bob's event was not kept (so no late answer can come), and an answer at once would
    // have come before the answer to alice's next command (a room's events are handled in order).
    assert!(
        s.bridge.metric("matrix_k8s_toggle_crypto_total{kind=\"not_parked_stranger\"}").await >= 1.0,
        "bob's unreadable event was kept waiting for its key"
    );
    s.proxy().release(&s.hs_token).await;
    let answer = ask(&room, &alice, &alice, "!toggle status").await;
    assert!(answer.starts_with("clawdbot is off"), "bob was answered: {answer}");
    assert!(s.scale_patches().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_cross_signed_policy_a_device_its_owner_did_not_verify_is_refused_with_the_reason() {
    let s = stack_with(false, &[("TRUST_POLICY", "cross-signed")]).await;
    let alice = s.person("alice", "1").await;
    let room = encrypted_room_with_bot(&alice).await;
    alice.send_text(&room, "start").await;
    let replies = alice.wait_for_messages(&room, &bot(), 1).await;
    assert!(replies[0].body.contains("TRUST_POLICY=cross-signed"), "{replies:?}");
    assert!(replies[0].body.contains("verify this session"), "{replies:?}");
    assert!(s.scale_patches().is_empty());
}

/// The event `event_id` of `room` as the homeserver holds it, read by `reader`.
async fn event_as_stored(s: &Stack, reader: &E2eeClient, room: &RoomId, event_id: &EventId) -> Value {
    let url = format!(
        "{}/_matrix/client/v3/rooms/{}/event/{}",
        s.synapse.url,
        support::client::enc(room.as_str()),
        support::client::enc(event_id.as_str())
    );
    let token = reader.client.access_token().unwrap();
    reqwest::Client::new().get(url).bearer_auth(token).send().await.unwrap().json().await.unwrap()
}

/// Pushes `events` to the bridge as someone holding the hs_token can.
async fn push_as_homeserver(s: &Stack, txn_id: &str, events: Vec<Value>) {
    let resp = reqwest::Client::new()
        .put(format!("{}/_matrix/app/v1/transactions/{txn_id}", s.bridge.url))
        .bearer_auth(&s.hs_token)
        .json(&json!({ "events": events }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Alice in an encrypted room with the bot, after `start` and `stop` (two PATCHes, four
/// answers); returns the `start` event's id.
async fn alice_started_and_stopped(s: &Stack) -> (E2eeClient, OwnedRoomId, OwnedEventId) {
    let alice = s.person("alice", "1").await;
    let room = encrypted_room_with_bot(&alice).await;
    let start = alice.send_text(&room, "start").await;
    alice.wait_for_messages(&room, &bot(), 2).await;
    alice.send_text(&room, "stop").await;
    alice.wait_for_messages(&room, &bot(), 4).await;
    assert_eq!(s.scale_patches().len(), 2);
    (alice, room, start)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_event_replayed_under_another_senders_name_is_refused() {
    let s = stack_with(false, &[("ALLOWED_USERS", "@alice:localhost,@bob:localhost")]).await;
    let (alice, room, start) = alice_started_and_stopped(&s).await;
    let mut event = event_as_stored(&s, &alice, &room, &start).await;
    assert_eq!(event["type"], "m.room.encrypted");
    event["sender"] = json!("@bob:localhost");
    event["event_id"] = json!("$forged-start-by-bob");
    push_as_homeserver(&s, "forged-1", vec![event]).await;

    // NB: a room's events are handled in order: once this is answered, the forgery was handled.
    alice.send_text(&room, "status").await;
    let answers = alice.wait_for_messages(&room, &bot(), 5).await;
    assert!(answers[4].body.starts_with("clawdbot is off"), "the forged start ran or was answered: {answers:?}");
    assert_eq!(s.scale_patches().len(), 2, "the forged start ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_command_pushed_again_under_a_new_event_id_is_refused_and_logged() {
    let s = stack(false).await;
    let (alice, room, start) = alice_started_and_stopped(&s).await;
    let mut event = event_as_stored(&s, &alice, &room, &start).await;
    assert_eq!(event["type"], "m.room.encrypted");
    assert_eq!(event["sender"], "@alice:localhost");
    event["event_id"] = json!("$replayed-start");
    event["origin_server_ts"] = json!(now_ms());
    event["unsigned"] = json!({});
    push_as_homeserver(&s, "replay-1", vec![event]).await;

    alice.send_text(&room, "status").await;
    let answers = alice.wait_for_messages(&room, &bot(), 5).await;
    assert!(answers[4].body.starts_with("clawdbot is off"), "the replayed start ran or was answered: {answers:?}");
    assert_eq!(s.scale_patches().len(), 2, "the replayed start scaled the workload up again");
    assert_eq!(s.bridge.metric("matrix_k8s_toggle_errors_total{kind=\"replayed_event\"}").await, 1.0);
    let log = s.bridge.log();
    let line = log.lines().find(|l| l.contains("refusing a replayed ciphertext")).expect("a warning for the replay");
    assert!(line.contains("WARN") && line.contains(start.as_str()), "{line}");
}

/// A plaintext `m.room.message` under `sender`'s name, as someone holding the hs_token can write it.
fn plaintext_message(room: &RoomId, sender: &str, event_id: &str, body: &str) -> Value {
    json!({
        "type": "m.room.message",
        "room_id": room,
        "sender": sender,
        "event_id": event_id,
        "origin_server_ts": now_ms(),
        "content": { "msgtype": "m.text", "body": body },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_command_in_an_encrypted_room_is_refused_with_one_notice_an_hour_also_after_a_restart() {
    let mut s = stack(false).await;
    let (alice, room) = alice_answered_in_an_encrypted_room(&s).await;
    let forged = |id: &str| plaintext_message(&room, "@alice:localhost", id, "start");
    push_as_homeserver(&s, "plain-1", vec![forged("$plain-start-1"), forged("$plain-start-2")]).await;
    alice.send_text(&room, "status").await;
    let answers = alice.wait_for_messages(&room, &bot(), 3).await;
    assert!(
        answers[1].body.starts_with("Not run: this command came unencrypted into an encrypted room"),
        "{answers:?}"
    );
    assert!(answers[2].body.starts_with("clawdbot is off"), "one notice for two plaintext commands: {answers:?}");
    assert!(s.scale_patches().is_empty(), "a plaintext start ran");
    assert_eq!(s.bridge.metric("matrix_k8s_toggle_errors_total{kind=\"plaintext_command\"}").await, 2.0);

    // NB: after a restart the room's encryption must be known before the first event is read.
    s.bridge.terminate();
    s.bridge.start_again().await;
    push_as_homeserver(&s, "plain-2", vec![forged("$plain-start-3")]).await;
    alice.send_text(&room, "status").await;
    let answers = alice.wait_for_messages(&room, &bot(), 5).await;
    assert!(answers[3].body.starts_with("Not run: this command came unencrypted"), "{answers:?}");
    assert!(answers[4].body.starts_with("clawdbot is off"), "{answers:?}");
    assert!(s.scale_patches().is_empty(), "a plaintext start ran after the restart");
}

/// Replaces `client`'s cross-signing identity (a reset, as after a lost recovery key, or as an
/// attacker holding the homeserver would), signing its device with the new one.
async fn reset_identity(client: &E2eeClient) {
    use matrix_sdk::ruma::api::client::uiaa::{AuthData, Password, UserIdentifier};
    if let Some(handle) = client.client.encryption().reset_cross_signing().await.unwrap() {
        let localpart = client.user_id().localpart().to_owned();
        let password = Password::new(UserIdentifier::from(client.user_id()), format!("pw-{localpart}-secret"));
        handle.auth(Some(AuthData::Password(password))).await.unwrap();
    }
}

/// What the bot answers `who` in `room`, as `watcher` (a member since before) sees it.
async fn ask(room: &RoomId, watcher: &E2eeClient, who: &E2eeClient, text: &str) -> String {
    let n = watcher.received_from(room, &bot()).len();
    who.send_text(room, text).await;
    watcher.wait_for_messages(room, &bot(), n + 1).await[n].body.clone()
}

/// The refusal `who` gets once the bot has seen their new identity (until their client has
/// published it, the bot may still see the old one: `status` is asked until then).
async fn refusal_of_a_changed_identity(room: &RoomId, who: &E2eeClient) -> String {
    support::eventually(Duration::from_secs(30), "the new identity to be refused", || async {
        let answer = ask(room, who, who, "!toggle status").await;
        answer.contains("their encryption identity changed").then_some(answer)
    })
    .await
}

/// The key a refusal says the new identity has, without its spaces.
fn refused_key(refusal: &str) -> String {
    let start = refusal.find("The new identity's key is ").expect("the refusal names the key") + 26;
    let end = refusal[start..].find(". ").expect("the key ends the sentence") + start;
    refusal[start..end].replace(' ', "")
}

/// People in one encrypted room with the bot, each of whose commands the bot has answered once.
async fn encrypted_room_of(people: &[&E2eeClient]) -> OwnedRoomId {
    let (first, others) = people.split_first().unwrap();
    let invite: Vec<OwnedUserId> = std::iter::once(bot()).chain(others.iter().map(|p| p.user_id())).collect();
    let room = first.create_encrypted_room(&invite.iter().map(AsRef::as_ref).collect::<Vec<_>>()).await;
    for other in others {
        other.room(&room).await;
        other.join(&room).await;
        first.wait_for_join(&room, &other.user_id()).await;
    }
    first.wait_for_join(&room, &bot()).await;
    for person in people {
        support::eventually(Duration::from_secs(30), "the client to know the bot's device", || async {
            (!person.devices_of(&bot()).await.is_empty()).then_some(())
        })
        .await;
    }
    for person in people {
        let answer = ask(&room, first, person, "!toggle list").await;
        assert!(answer.starts_with("Targets:"), "{} was not answered: {answer}", person.user_id());
    }
    room
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_tofu_a_changed_identity_is_refused_until_another_allowed_user_who_may_do_as_much_approves_its_key() {
    let config = scratch_dir();
    let config_path = config.path().join("config.yaml");
    std::fs::write(
        &config_path,
        "targets:\n  - name: clawdbot\n    namespace: clawdbot\n  - name: vault\n    namespace: clawdbot\n    workload: vault\n    allowed_users: [\"@alice:localhost\", \"@carol:localhost\"]\n",
    )
    .unwrap();
    let s = stack_with(
        false,
        &[
            ("ALLOWED_USERS", "@alice:localhost,@bob:localhost,@carol:localhost"),
            ("CONFIG_PATH", config_path.to_str().unwrap()),
        ],
    )
    .await;
    s.api.add_deployment("clawdbot", "vault", 0);
    let alice = s.person("alice", "1").await;
    alice.client.encryption().bootstrap_cross_signing(None).await.unwrap();
    let (bob, carol) = (s.person("bob", "1").await, s.person("carol", "1").await);
    let room = encrypted_room_of(&[&alice, &bob, &carol]).await;

    reset_identity(&alice).await;
    // NB: until alice's client has published it, the bot may still see the old identity.
    let refusal = refusal_of_a_changed_identity(&room, &alice).await;
    let key = refused_key(&refusal);
    assert!(key.len() >= 40, "{refusal}");
    let answer = ask(&room, &alice, &bob, &format!("!toggle approve @alice:localhost {}", &key[..8])).await;
    assert!(answer.starts_with("You may not approve @alice:localhost: they may operate vault"), "{answer}");
    let answer = ask(&room, &alice, &carol, "!toggle approve @alice:localhost AAAAAAAA").await;
    assert!(
        answer.starts_with("Not approved: AAAAAAAA is not the start of @alice:localhost's new identity key"),
        "{answer}"
    );
    let answer = ask(&room, &alice, &carol, &format!("!toggle approve @alice:localhost {}", &key[..7])).await;
    assert!(answer.contains("at least the first 8 characters"), "{answer}");

    // NB: in an unencrypted room nothing proves who sent an approval.
    let plain = carol.create_plain_room(&[&bot()]).await;
    carol.wait_for_join(&plain, &bot()).await;
    carol.send_text(&plain, &format!("approve @alice:localhost {}", &key[..8])).await;
    let answers = carol.wait_for_messages(&plain, &bot(), 1).await;
    assert!(answers[0].body.starts_with("Not run: `approve` must be sent in an encrypted room"), "{answers:?}");

    let answer = ask(&room, &alice, &alice, "!toggle start clawdbot").await;
    assert!(answer.contains("their encryption identity changed"), "nothing above approved alice: {answer}");
    let answer = ask(&room, &alice, &carol, &format!("!toggle approve @alice:localhost {}", &key[..8])).await;
    assert!(answer.starts_with("Approved @alice:localhost's new encryption identity"), "{answer}");
    let answer = ask(&room, &alice, &alice, "!toggle start clawdbot").await;
    assert!(answer.contains("clawdbot is starting"), "{answer}");
    assert_eq!(s.scale_patches().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_cross_signed_a_reset_identity_signing_its_device_is_refused_until_approved() {
    let s =
        stack_with(false, &[("TRUST_POLICY", "cross-signed"), ("ALLOWED_USERS", "@alice:localhost,@bob:localhost")])
            .await;
    let alice = s.person("alice", "1").await;
    alice.client.encryption().bootstrap_cross_signing(None).await.unwrap();
    let bob = s.person("bob", "1").await;
    bob.client.encryption().bootstrap_cross_signing(None).await.unwrap();
    let room = encrypted_room_of(&[&alice, &bob]).await;

    // NB: the new identity signs alice's device, so only the pin tells it from the first one.
    reset_identity(&alice).await;
    let refusal = refusal_of_a_changed_identity(&room, &alice).await;
    assert!(s.scale_patches().is_empty());

    let answer = ask(&room, &alice, &alice, "!toggle start").await;
    assert!(
        answer.contains("their encryption identity changed"),
        "a device signed by a reset identity was obeyed: {answer}"
    );
    assert!(s.scale_patches().is_empty());
    let approval = format!("!toggle approve @alice:localhost {}", &refused_key(&refusal)[..12]);
    let answer = ask(&room, &alice, &bob, &approval).await;
    assert!(answer.starts_with("Approved @alice:localhost's new encryption identity"), "{answer}");
    let answer = ask(&room, &alice, &alice, "!toggle start").await;
    assert!(answer.contains("clawdbot is starting"), "{answer}");
    assert_eq!(s.scale_patches().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_member_invited_to_a_joined_only_room_is_sent_no_room_key() {
    use matrix_sdk::ruma::{
        api::client::room::{Visibility, create_room::v3::Request as CreateRoom},
        events::{
            InitialStateEvent,
            room::{
                encryption::RoomEncryptionEventContent,
                history_visibility::{HistoryVisibility, RoomHistoryVisibilityEventContent},
            },
        },
    };
    // NB: the bridge reaches Synapse through a proxy that shows which devices it sends keys to.
    let mut s =
        Stack::build().proxy_before_synapse(|proxy| proxy.record_paths_containing("/sendToDevice/")).start().await;
    let (synapse, dir) = (&s.synapse, s.dir.path().to_owned());
    synapse.register("alice").await;
    synapse.register("bob").await;
    let alice = E2eeClient::login(&synapse.url, "alice", &dir.join("client-alice")).await;
    let bob = E2eeClient::login(&synapse.url, "bob", &dir.join("client-bob")).await;

    let mut request = CreateRoom::new();
    request.visibility = Visibility::Private;
    request.invite = vec![bot()];
    request.initial_state = vec![
        InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults()).to_raw_any(),
        InitialStateEvent::with_empty_state_key(RoomHistoryVisibilityEventContent::new(HistoryVisibility::Joined))
            .to_raw_any(),
    ];
    let room = alice.client.create_room(request).await.unwrap().room_id().to_owned();
    alice.wait_for_join(&room, &bot()).await;
    support::eventually(Duration::from_secs(30), "alice's client to know the bot's device", || async {
        (!alice.devices_of(&bot()).await.is_empty()).then_some(())
    })
    .await;
    assert!(ask(&room, &alice, &alice, "status").await.starts_with("clawdbot is off"));

    s.bridge.terminate();
    s.bridge.start_again().await;
    alice.client.get_room(&room).unwrap().invite_user_by_id(&bob.user_id()).await.unwrap();
    bob.room(&room).await;
    s.proxy().take_recorded();
    assert!(ask(&room, &alice, &alice, "!toggle status").await.starts_with("clawdbot is off"));
    let to_bob: Vec<_> =
        s.proxy().take_recorded().into_iter().filter(|(_, body)| body.contains("@bob:localhost")).collect();
    assert!(to_bob.is_empty(), "an invited member of a joined-only room was sent the room key: {to_bob:?}");
}

fn replies_to(replies: &[Value], event_id: &str) -> usize {
    replies.iter().filter(|r| r["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == event_id).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_synapse_restart_a_new_invite_and_commands_in_old_plain_and_encrypted_rooms_are_each_answered_once() {
    const WAIT: Duration = Duration::from_secs(40);
    let s = stack_with(false, &[("ALLOWED_USERS", "@alice:localhost,@carol:localhost")]).await;
    let alice = s.person("alice", "1").await;
    let encrypted = encrypted_room_with_bot(&alice).await;
    alice.send_text(&encrypted, "status").await;
    alice.wait_for_messages(&encrypted, &bot(), 1).await;
    let (carol_id, carol_token) = s.synapse.register("carol").await;
    let carol = User::new(&s.synapse.url, carol_id, carol_token);
    let plain = carol.create_room(&[bot().as_str()], false).await;
    carol.wait_for_membership(&plain, bot().as_str(), "join", WAIT).await;
    carol.send_text(&plain, "status").await;
    carol.wait_for_messages(&plain, bot().as_str(), 1, WAIT).await;

    s.synapse.stop();
    s.synapse.start_again();

    let invited = carol.create_room(&[bot().as_str()], false).await;
    carol.wait_for_membership(&invited, bot().as_str(), "join", WAIT).await;
    let start = carol.send_text(&plain, "start").await;
    let replies = carol.wait_for_messages(&plain, bot().as_str(), 3, WAIT).await;
    assert!(
        replies.iter().any(|r| r["content"]["body"].as_str().unwrap().starts_with("clawdbot is up")),
        "{replies:?}"
    );
    let stop = alice.send_text(&encrypted, "stop").await;
    let seen = alice.wait_for_messages(&encrypted, &bot(), 3).await;
    assert!(seen[1].body.contains("clawdbot is stopping: 1 → 0") && seen[1].encrypted, "{seen:?}");
    assert_eq!(seen[1].in_reply_to.as_ref(), Some(&stop));

    // NB: one more command in each room, answered, shows nothing else was still coming.
    carol.send_text(&plain, "status").await;
    let replies = carol.wait_for_messages(&plain, bot().as_str(), 4, WAIT).await;
    alice.send_text(&encrypted, "status").await;
    let seen = alice.wait_for_messages(&encrypted, &bot(), 4).await;
    assert_eq!(replies_to(&replies, &start), 2, "the start's reply and its outcome, once each: {replies:?}");
    assert_eq!(seen.iter().filter(|r| r.in_reply_to.as_ref() == Some(&stop)).count(), 2, "{seen:?}");
    assert_eq!(s.scale_patches(), [json!({"spec":{"replicas":1}}), json!({"spec":{"replicas":0}})]);
    assert!(s.bridge.metric("matrix_k8s_toggle_transactions_id_reused_total").await >= 1.0);
}
