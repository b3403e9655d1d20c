//! Micro-benchmarks (criterion) of the hot paths a transaction takes inside the bridge:
//! parsing a 100-event transaction, recording it durably, the whole `PUT` handler, Megolm
//! decryption through an `OlmMachine` on the SQLite crypto store, and command parsing.
//!
//! Run: `cargo bench --bench micro` (add a filter, e.g. `-- megolm`, to run one group).

use std::{
    collections::BTreeMap,
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::body::Body;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, StatusCode};
use matrix_k8s_toggle::{
    app,
    appservice::{AppState, NoSink, parse_transaction},
    commands::{self, Addressed, BotNames},
    metrics::Metrics,
    secret::Secret,
    store::{QueuedEvent, Store, TransactionSeen},
};
use matrix_sdk_crypto::{
    CollectStrategy, DecryptionSettings, EncryptionSettings, EncryptionSyncChanges, OlmMachine,
    RoomEventDecryptionResult, TrustRequirement,
    types::{
        events::room::encrypted::EncryptedEvent,
        requests::{AnyOutgoingRequest, ToDeviceRequest},
    },
};
use matrix_sdk_sqlite::SqliteCryptoStore;
use ruma::{
    DeviceId, OneTimeKeyAlgorithm, OwnedRoomId, RoomId, UInt, UserId,
    api::client::{
        keys::{claim_keys, get_keys, upload_keys},
        sync::sync_events::DeviceLists,
        to_device::send_event_to_device,
    },
    device_id,
    events::{
        AnyMessageLikeEventContent,
        room::{encryption::RoomEncryptionEventContent, history_visibility::HistoryVisibility},
    },
    owned_room_id,
    serde::Raw,
    to_device::DeviceIdOrAllDevices,
    user_id,
};
use serde_json::{Value, json};
use tower::ServiceExt;

/// Events in each benchmarked transaction.
const EVENTS_PER_TXN: usize = 100;

/// Distinct Megolm events decrypted in turn.
const ENCRYPTED_EVENTS: usize = 1000;

const HS_TOKEN: &str = "bench-hs-token-0123456789abcdef";

static SEQ: AtomicU64 = AtomicU64::new(0);

fn next() -> u64 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// One room event as Synapse pushes it: half plain messages, half encrypted ones.
fn room_event(i: usize, unique: u64) -> Value {
    let event_id = format!("$bench{unique}-{i}:localhost");
    if i.is_multiple_of(2) {
        json!({
            "type": "m.room.message",
            "event_id": event_id,
            "room_id": "!room:localhost",
            "sender": "@alice:localhost",
            "origin_server_ts": 1_700_000_000_000u64 + i as u64,
            "content": { "msgtype": "m.text", "body": format!("status web {i}") },
            "unsigned": { "age": 12 }
        })
    } else {
        json!({
            "type": "m.room.encrypted",
            "event_id": event_id,
            "room_id": "!room:localhost",
            "sender": "@alice:localhost",
            "origin_server_ts": 1_700_000_000_000u64 + i as u64,
            "content": {
                "algorithm": "m.megolm.v1.aes-sha2",
                "ciphertext": "A".repeat(320),
                "device_id": "ALICEDEVICE",
                "sender_key": "Bcdefghijklmnopqrstuvwxyz0123456789ABCDEFGH",
                "session_id": "Sessionidsessionidsessionidsessionid0123456"
            },
            "unsigned": { "age": 12 }
        })
    }
}

/// A 100-event transaction body with event ids unique to `unique`.
fn transaction_body(unique: u64) -> Vec<u8> {
    let events: Vec<Value> = (0..EVENTS_PER_TXN).map(|i| room_event(i, unique)).collect();
    serde_json::to_vec(&json!({ "events": events })).unwrap()
}

fn queued(unique: u64) -> Vec<QueuedEvent> {
    (0..EVENTS_PER_TXN)
        .map(|i| {
            let event = room_event(i, unique);
            QueuedEvent {
                event_id: event["event_id"].as_str().unwrap().try_into().unwrap(),
                room_id: event["room_id"].as_str().unwrap().try_into().unwrap(),
                json: event.to_string(),
            }
        })
        .collect()
}

fn transactions(c: &mut Criterion) {
    let mut group = c.benchmark_group("transaction");
    group.throughput(Throughput::Elements(EVENTS_PER_TXN as u64));

    let body = transaction_body(0);
    group.bench_function("parse_100_events", |b| {
        b.iter(|| parse_transaction(black_box("txn-1"), black_box(&body)).unwrap());
    });

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    group.bench_function("record_100_events", |b| {
        b.iter_batched(
            || {
                let n = next();
                (format!("txn-{n}"), queued(n))
            },
            |(txn, events)| {
                assert_eq!(store.transaction_seen(&txn, "hash").unwrap(), TransactionSeen::New);
                store.record_transaction(&txn, "hash", &events, 0).unwrap()
            },
            BatchSize::SmallInput,
        );
    });

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = AppState::new(
        Secret::new(HS_TOKEN),
        Arc::new(Store::open(dir.path()).unwrap()),
        Arc::new(Metrics::new()),
        Arc::new(NoSink),
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(AtomicBool::new(true)),
    );
    let router = app(state);
    group.bench_function("put_handler_100_events", |b| {
        b.iter_batched(
            || {
                let n = next();
                Request::put(format!("/_matrix/app/v1/transactions/txn-{n}"))
                    .header("authorization", format!("Bearer {HS_TOKEN}"))
                    .header("content-type", "application/json")
                    .body(Body::from(transaction_body(n)))
                    .unwrap()
            },
            |request| {
                let response = rt.block_on(router.clone().oneshot(request)).unwrap();
                assert_eq!(response.status(), StatusCode::OK);
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn command_parsing(c: &mut Criterion) {
    let names = BotNames::new("@toggle:localhost", "Kubernetes toggle");
    let messages = [
        ("dm_start", "start", Addressed::ToBot),
        ("prefixed_stop", "!toggle stop web", Addressed::ToRoom),
        ("mention_status", "@toggle:localhost: status clawdbot", Addressed::ToRoom),
        ("chatter", "shall we stop for lunch at noon today?", Addressed::ToRoom),
    ];
    let mut group = c.benchmark_group("commands_read");
    group.throughput(Throughput::Elements(1));
    for (name, text, addressed) in messages {
        group.bench_function(name, |b| {
            b.iter(|| commands::read(black_box(text), &names, addressed, false));
        });
    }
    group.finish();
}

fn sender() -> &'static UserId {
    user_id!("@alice:localhost")
}

fn receiver() -> &'static UserId {
    user_id!("@toggle:localhost")
}

fn sender_device() -> &'static DeviceId {
    device_id!("ALICEPHONE")
}

fn receiver_device() -> &'static DeviceId {
    device_id!("TOGGLEBENCH")
}

/// Answers the machine's key upload as a homeserver would; returns the uploaded request.
async fn upload_keys(machine: &OlmMachine) -> upload_keys::v3::Request {
    for request in machine.outgoing_requests().await.unwrap() {
        if let AnyOutgoingRequest::KeysUpload(upload) = request.request() {
            let counts = BTreeMap::from([(OneTimeKeyAlgorithm::SignedCurve25519, UInt::from(50u32))]);
            let response = upload_keys::v3::Response::new(counts);
            machine.mark_request_as_sent(request.request_id(), &response).await.unwrap();
            return upload.clone();
        }
    }
    panic!("the machine asked for no key upload");
}

/// Answers `machine`'s keys query with the device keys `other` uploaded.
async fn learn_devices(machine: &OlmMachine, other: &UserId, other_device: &DeviceId, keys: &upload_keys::v3::Request) {
    machine.update_tracked_users([other]).await.unwrap();
    for request in machine.outgoing_requests().await.unwrap() {
        if let AnyOutgoingRequest::KeysQuery(_) = request.request() {
            let mut response = get_keys::v3::Response::new();
            let device_keys = keys.device_keys.clone().expect("device keys were uploaded");
            response.device_keys =
                BTreeMap::from([(other.to_owned(), BTreeMap::from([(other_device.to_owned(), device_keys)]))]);
            machine.mark_request_as_sent(request.request_id(), &response).await.unwrap();
        }
    }
}

/// The to-device event for `device` in a room key share, as a transaction carries it.
fn to_device_event(share: &ToDeviceRequest, from: &UserId, user: &UserId, device: &DeviceId) -> Raw<Value> {
    let content = &share.messages[user][&DeviceIdOrAllDevices::DeviceId(device.to_owned())];
    Raw::new(&json!({
        "sender": from,
        "type": share.event_type.to_string(),
        "content": content,
        "to_user_id": user,
        "to_device_id": device,
    }))
    .unwrap()
}

/// The bot's machine as the bridge opens it: on a SQLite store encrypted with a 32-byte key.
async fn bot_on_sqlite(dir: &std::path::Path) -> OlmMachine {
    let key = [7u8; 32];
    let store = SqliteCryptoStore::open_with_key(dir, Some(&key)).await.unwrap();
    OlmMachine::with_store(receiver(), receiver_device(), store, None).await.unwrap()
}

/// A sender (in memory) for `bot`, with a room key of `room` shared from the sender to the bot
/// through an Olm session, as a homeserver would carry it; returns the sender.
async fn share_room_key(bot: &OlmMachine, room: &RoomId) -> OlmMachine {
    let alice = OlmMachine::new(sender(), sender_device()).await;
    let bot_keys = upload_keys(bot).await;
    let alice_keys = upload_keys(&alice).await;
    learn_devices(&alice, receiver(), receiver_device(), &bot_keys).await;
    learn_devices(bot, sender(), sender_device(), &alice_keys).await;

    let (claim_id, _) = alice.get_missing_sessions([receiver()].into_iter()).await.unwrap().expect("a claim");
    let (key_id, one_time_key) = bot_keys.one_time_keys.iter().next().expect("one-time keys were uploaded");
    let claimed = BTreeMap::from([(
        receiver().to_owned(),
        BTreeMap::from([(receiver_device().to_owned(), BTreeMap::from([(key_id.clone(), one_time_key.clone())]))]),
    )]);
    alice.mark_request_as_sent(&claim_id, &claim_keys::v3::Response::new(claimed)).await.unwrap();

    let mut settings = EncryptionSettings::new(
        RoomEncryptionEventContent::with_recommended_defaults(),
        HistoryVisibility::Shared,
        CollectStrategy::ErrorOnVerifiedUserProblem,
    );
    // NB: one session for all the benchmark's events (the default rotates after 100).
    settings.rotation_period_msgs = 10 * ENCRYPTED_EVENTS as u64;
    let shares = alice.share_room_key(room, [receiver()].into_iter(), settings).await.unwrap();
    let mut events = Vec::new();
    for share in &shares {
        events.push(to_device_event(share, sender(), receiver(), receiver_device()).cast_unchecked());
        alice.mark_request_as_sent(&share.txn_id, &send_event_to_device::v3::Response::new()).await.unwrap();
    }
    assert!(!events.is_empty(), "no room key was shared");
    let counts = BTreeMap::new();
    let lists = DeviceLists::new();
    let changes = EncryptionSyncChanges {
        to_device_events: events,
        changed_devices: &lists,
        one_time_keys_counts: &counts,
        unused_fallback_keys: None,
        next_batch_token: None,
    };
    let (_, keys) = bot.receive_sync_changes(changes, &decryption_settings()).await.unwrap();
    assert_eq!(keys.len(), 1, "the bot did not take in the room key");
    alice
}

fn decryption_settings() -> DecryptionSettings {
    DecryptionSettings { sender_device_trust_requirement: TrustRequirement::Untrusted }
}

/// `count` Megolm-encrypted `m.room.message` events from the sender, as room events.
async fn encrypted_events(alice: &OlmMachine, room: &OwnedRoomId, count: usize) -> Vec<Raw<EncryptedEvent>> {
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let content: Raw<AnyMessageLikeEventContent> =
            Raw::new(&json!({ "msgtype": "m.text", "body": if i.is_multiple_of(2) { "start" } else { "stop" } }))
                .unwrap()
                .cast_unchecked();
        let encrypted = alice.encrypt_room_event_raw(room, "m.room.message", &content).await.unwrap();
        let event = json!({
            "type": "m.room.encrypted",
            "event_id": format!("$megolm{i}:localhost"),
            "room_id": room,
            "sender": sender(),
            "origin_server_ts": 1_700_000_000_000u64 + i as u64,
            "content": encrypted.content,
        });
        out.push(Raw::new(&event).unwrap().cast_unchecked());
    }
    out
}

fn megolm(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // NB: the SQLite store's pool must be dropped inside the runtime.
    let _runtime = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let room = owned_room_id!("!encrypted:localhost");
    let settings = decryption_settings();
    let mut group = c.benchmark_group("megolm");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(10));
    let bots = [
        ("decrypt_sqlite_keyed_store", rt.block_on(bot_on_sqlite(dir.path()))),
        ("decrypt_memory_store", rt.block_on(OlmMachine::new(receiver(), receiver_device()))),
    ];
    for (name, bot) in bots {
        let alice = rt.block_on(share_room_key(&bot, &room));
        let events = rt.block_on(encrypted_events(&alice, &room, ENCRYPTED_EVENTS));
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                let event = &events[i % events.len()];
                i += 1;
                let result = rt.block_on(bot.try_decrypt_room_event(event, &room, &settings)).unwrap();
                assert!(matches!(result, RoomEventDecryptionResult::Decrypted(_)));
            });
        });
    }
    group.finish();
}

criterion_group!(benches, transactions, command_parsing, megolm);
criterion_main!(benches);
