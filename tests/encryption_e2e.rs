#![recursion_limit = "256"]
//! End-to-end encryption against a real Synapse and a real E2EE client (matrix-sdk): commands
//! in encrypted rooms are decrypted, acted on once, and answered encrypted.

mod support;

use std::time::Duration;

use matrix_sdk::ruma::{OwnedUserId, user_id};
use serde_json::{Value, json};
use support::{
    bridge::{BridgeProcess, BridgeSetup, tokens},
    e2ee::E2eeClient,
    free_port,
    proxy::Proxy,
    scratch_dir,
    synapse::Synapse,
};
use test_apiserver::{ControllerMode, TestApiServer};

fn bot() -> OwnedUserId {
    user_id!("@toggle:localhost").to_owned()
}

struct Stack {
    synapse: Synapse,
    bridge: BridgeProcess,
    api: TestApiServer,
    hs_token: String,
    _proxy: Option<Proxy>,
    // NB: last, so the scratch directory outlives the processes using it.
    dir: tempfile::TempDir,
}

async fn stack(with_proxy: bool) -> Stack {
    let dir = scratch_dir();
    let api = TestApiServer::start().await.unwrap();
    api.add_deployment("clawdbot", "clawdbot", 0);
    api.set_controller(ControllerMode::Ready { after: Duration::from_millis(200) });
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let mut setup = BridgeSetup::new(dir.path())
        .env("KUBECONFIG", kubeconfig.to_str().unwrap())
        .env("ALLOWED_USERS", "@alice:localhost")
        .env("ROLLOUT_TIMEOUT_SECS", "20");
    let mut proxy = None;
    if with_proxy {
        let behind = free_port();
        proxy = Some(Proxy::start(setup.port, &format!("http://127.0.0.1:{behind}")).await);
        setup = setup.env("LISTEN_ADDRESS", &format!("127.0.0.1:{behind}"));
    }
    let synapse = Synapse::start(dir.path(), &setup.registration);
    let (hs_token, _) = tokens(&setup.registration);
    let bridge = setup.start(&synapse.url).await;
    Stack { dir, synapse, bridge, api, hs_token, _proxy: proxy }
}

impl Stack {
    async fn person(&self, name: &str, device: &str) -> E2eeClient {
        if device == "1" {
            self.synapse.register(name).await;
        }
        E2eeClient::login(&self.synapse.url, name, &self.dir.path().join(format!("client-{name}-{device}"))).await
    }

    fn scale_patches(&self) -> Vec<Value> {
        self.api
            .requests()
            .into_iter()
            .filter(|r| r.method == "PATCH" && r.path.ends_with("/scale"))
            .map(|r| serde_json::from_str(&r.body).unwrap())
            .collect()
    }

    fn proxy(&self) -> &Proxy {
        self._proxy.as_ref().unwrap()
    }
}

async fn encrypted_room_with_bot(alice: &E2eeClient) -> matrix_sdk::ruma::OwnedRoomId {
    let room = alice.create_encrypted_room(&[&bot()]).await;
    alice.wait_for_join(&room, &bot()).await;
    room
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
    let alice = s.person("alice", "1").await;
    let room = encrypted_room_with_bot(&alice).await;
    alice.send_text(&room, "status").await;
    alice.wait_for_messages(&room, &bot(), 1).await;
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
    let alice = s.person("alice", "1").await;
    let room = encrypted_room_with_bot(&alice).await;
    alice.send_text(&room, "status").await;
    alice.wait_for_messages(&room, &bot(), 1).await;

    let laptop = s.person("alice", "2").await;
    laptop.send_text(&room, "start").await;
    let replies = laptop.wait_for_messages(&room, &bot(), 1).await;
    assert!(replies.iter().any(|r| r.body.contains("clawdbot is starting") && r.encrypted), "{replies:?}");
    assert_eq!(s.scale_patches().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_who_joins_later_reads_the_next_reply_and_a_stranger_in_the_room_is_ignored() {
    let s = stack(false).await;
    let alice = s.person("alice", "1").await;
    let room = encrypted_room_with_bot(&alice).await;
    alice.send_text(&room, "status").await;
    alice.wait_for_messages(&room, &bot(), 1).await;

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

    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(alice.received_from(&room, &bot()).len(), 2, "bob's command got an answer");
    assert!(s.scale_patches().is_empty(), "bob's command was run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_room_key_arrives_in_a_later_transaction_runs_exactly_once() {
    let s = stack(true).await;
    let alice = s.person("alice", "1").await;
    let room = encrypted_room_with_bot(&alice).await;
    alice.send_text(&room, "status").await;
    alice.wait_for_messages(&room, &bot(), 1).await;

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
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(s.scale_patches(), [json!({"spec":{"replicas":1}})]);
    assert_eq!(s.bridge.metric("matrix_k8s_toggle_crypto_total{kind=\"recovered\"}").await, 1.0);
}
