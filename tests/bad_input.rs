//! Bad input on the transaction endpoint (`app().oneshot`): malformed or mistyped JSON, huge and
//! deeply nested bodies, odd transaction ids, very many events and invisible characters. Each
//! is answered cleanly, nothing harmful is queued, and the next valid transaction still gets
//! `200`.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::StatusCode;
use matrix_k8s_toggle::appservice::MAX_BODY_BYTES;
use ruma::{events::AnyTimelineEvent, serde::Raw};
use serde_json::{Value, json};
use support::oneshot::Oneshot;

/// The stack a Tokio worker thread gets by default.
const NORMAL_STACK: usize = 2 * 1024 * 1024;

/// The app without a socket, and a counter for the probes that check it still serves.
struct Fixture {
    app: Oneshot,
    follow_ups: AtomicUsize,
}

fn fixture() -> Fixture {
    Fixture { app: Oneshot::new(), follow_ups: AtomicUsize::new(0) }
}

impl std::ops::Deref for Fixture {
    type Target = Oneshot;

    fn deref(&self) -> &Oneshot {
        &self.app
    }
}

impl Fixture {
    /// A valid transaction with a fresh id must still be accepted and queued.
    async fn assert_still_serving(&self) {
        let n = self.follow_ups.fetch_add(1, Ordering::Relaxed);
        let event_id = format!("$follow-up-{n}");
        let body = json!({ "events": [message(&event_id, "status")] }).to_string();
        let (status, v) = self.put_txn(&format!("follow-up-{n}"), body).await;
        assert_eq!((status, v), (StatusCode::OK, json!({})), "the server stopped serving");
        assert!(self.queued_ids().contains(&event_id), "{event_id} was not queued");
    }

    /// Queued events other than the follow-up probes.
    fn queued_from_bad_input(&self) -> Vec<String> {
        self.queued_ids().into_iter().filter(|id| !id.starts_with("$follow-up-")).collect()
    }
}

fn message(event_id: &str, body: &str) -> Value {
    json!({
        "type": "m.room.message", "event_id": event_id, "room_id": "!ops:example.org",
        "sender": "@alice:example.org", "origin_server_ts": 1,
        "content": { "msgtype": "m.text", "body": body },
    })
}

fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn nested_objects(depth: usize) -> String {
    format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
}

/// Runs `test` on a current-thread runtime on a thread with a normal 2 MiB stack, so a
/// recursion without a depth limit would overflow it and abort the test process.
fn on_a_normal_stack<F>(test: impl FnOnce() -> F + Send + 'static)
where
    F: Future<Output = ()>,
{
    std::thread::Builder::new()
        .stack_size(NORMAL_STACK)
        .spawn(move || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(test()))
        .unwrap()
        .join()
        .unwrap();
}

#[tokio::test]
async fn malformed_json_is_400_not_json() {
    let f = fixture();
    let bodies: [&[u8]; 6] = [b"", b"{", b"not json", br#"{"events":[}"#, br#"{"events":[]} trailing"#, b"\xff\xfe{}"];
    for (i, body) in bodies.into_iter().enumerate() {
        let (status, v) = f.put_txn(&format!("malformed-{i}"), body.to_vec()).await;
        assert_eq!(
            (status, v["errcode"].as_str()),
            (StatusCode::BAD_REQUEST, Some("M_NOT_JSON")),
            "{}",
            String::from_utf8_lossy(body)
        );
        f.assert_still_serving().await;
    }
    assert_eq!(f.queued_from_bad_input(), Vec::<String>::new());
}

#[tokio::test]
async fn invalid_utf8_inside_an_event_is_400_and_never_queued() {
    let f = fixture();
    // NB: the "is it JSON" check skips string contents, so ruma is what refuses these (as
    // M_BAD_JSON): `Raw` events are checked to be UTF-8.
    let bodies: [&[u8]; 2] = [
        b"{\"events\":[{\"type\":\"\xff\"}]}",
        b"{\"events\":[{\"type\":\"m.room.message\",\"event_id\":\"$bad-utf8\",\"content\":{\"body\":\"st\xc3op\"}}]}",
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        let (status, v) = f.put_txn(&format!("utf8-{i}"), body.to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{}: {v}", String::from_utf8_lossy(body));
        f.assert_still_serving().await;
    }
    // NB: bytes in a field nobody reads are skipped unchecked, by serde_json and ruma alike.
    let (status, _) = f.put_txn("utf8-ignored", b"{\"events\":[],\"x\":\"\xed\xa0\x80\"}".to_vec()).await;
    assert!(status == StatusCode::OK || status == StatusCode::BAD_REQUEST, "{status}");
    f.assert_still_serving().await;
    assert_eq!(f.queued_from_bad_input(), Vec::<String>::new());
}

#[tokio::test]
async fn json_that_is_not_a_transaction_is_400_bad_json() {
    let f = fixture();
    let bodies = [
        "{}",
        "[]",
        "null",
        r#""events""#,
        r#"{"events":{}}"#,
        r#"{"events":"$e"}"#,
        r#"{"events":null}"#,
        r#"{"events":[],"ephemeral":{}}"#,
        r#"{"events":[],"de.sorunome.msc2409.to_device":{}}"#,
        r#"{"events":[],"org.matrix.msc3202.device_lists":{"changed":["not a user id"]}}"#,
        r#"{"events":[],"org.matrix.msc3202.device_one_time_keys_count":{"@toggle:example.org":{"DEV":{"signed_curve25519":-1}}}}"#,
        r#"{"events":[],"org.matrix.msc3202.device_unused_fallback_key_types":{"@toggle:example.org":{"DEV":"x"}}}"#,
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        let (status, v) = f.put_txn(&format!("shape-{i}"), body).await;
        assert_eq!((status, v["errcode"].as_str()), (StatusCode::BAD_REQUEST, Some("M_BAD_JSON")), "{body}");
        f.assert_still_serving().await;
    }
}

#[tokio::test]
async fn events_that_are_not_event_objects_are_accepted_and_none_is_queued() {
    let f = fixture();
    // NB: ruma keeps events as `Raw`, so any JSON value is an acceptable event; only events with
    // a valid event id and room id are queued (the rest are refused as they are read), and the
    // worker deserializes them before acting.
    let bodies = [
        r#"{"events":[1,2]}"#,
        r#"{"events":[null,"x",[],{},true]}"#,
        r#"{"events":[{"type":"m.room.message","content":{"body":"stop"}}]}"#,
        r#"{"events":[{"type":"m.room.message","event_id":5,"content":{"body":"stop"}}]}"#,
        r#"{"events":[{"type":"m.room.message","event_id":["$e"],"content":{"body":"stop"}}]}"#,
        r#"{"events":[{"type":"m.room.message","event_id":"$no-room","content":{"body":"stop"}}]}"#,
        r#"{"events":[{"type":"m.room.message","event_id":"$bad-room","room_id":"ops","content":{"body":"stop"}}]}"#,
        r#"{"events":[{"type":"m.room.message","event_id":"no-sigil","room_id":"!ops:example.org","content":{"body":"stop"}}]}"#,
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        let (status, v) = f.put_txn(&format!("odd-{i}"), body).await;
        assert_eq!((status, v), (StatusCode::OK, json!({})), "{body}");
        f.assert_still_serving().await;
    }
    assert_eq!(f.queued_from_bad_input(), Vec::<String>::new());
}

#[tokio::test]
async fn a_refused_transaction_is_not_recorded_so_its_retry_is_processed() {
    let f = fixture();
    let (status, _) = f.put_txn("retry", "{").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let body = json!({ "events": [message("$retried", "status")] }).to_string();
    let (status, _) = f.put_txn("retry", body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(f.queued_ids(), ["$retried"]);
}

#[tokio::test]
async fn a_transaction_body_over_16_mib_is_413_too_large() {
    let f = fixture();
    let filler = "x".repeat(64 * 1024);
    let events: Vec<Value> = (0..260).map(|i| message(&format!("$big-{i}"), &filler)).collect();
    let body = serde_json::to_vec(&json!({ "events": events })).unwrap();
    assert!(body.len() > MAX_BODY_BYTES);
    let (status, v) = f.put_txn("huge", body).await;
    assert_eq!((status, v["errcode"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("M_TOO_LARGE")));
    assert_eq!(f.queued_from_bad_input(), Vec::<String>::new());
    f.assert_still_serving().await;
}

#[test]
fn a_deeply_nested_body_is_400_without_overflowing_a_normal_stack() {
    on_a_normal_stack(|| async {
        let f = fixture();
        for (i, body) in [nested_arrays(100_000), nested_objects(100_000)].into_iter().enumerate() {
            let (status, v) = f.put_txn(&format!("nested-{i}"), body).await;
            assert_eq!((status, v["errcode"].as_str()), (StatusCode::BAD_REQUEST, Some("M_BAD_JSON")), "{v}");
            f.assert_still_serving().await;
        }
        assert_eq!(f.queued_from_bad_input(), Vec::<String>::new());
    });
}

/// Regression: serde's derived `Deserialize` also reads a struct from a JSON array of its
/// fields in order, so `[[event, ...]]` was taken as `{"events": [event, ...]}`.
#[tokio::test]
async fn a_transaction_body_that_is_an_array_is_400() {
    let f = fixture();
    let body = json!([[message("$from-an-array", "stop")]]).to_string();
    let (status, _) = f.put_txn("array", body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(f.queued_from_bad_input(), Vec::<String>::new());
}

#[test]
fn deeply_nested_event_content_neither_overflows_the_stack_nor_reaches_the_worker_as_an_event() {
    on_a_normal_stack(|| async {
        let f = fixture();
        let deep = [nested_arrays(100_000), nested_objects(100_000)];
        for (i, nested) in deep.iter().enumerate() {
            for (j, event_type) in ["m.room.message", "com.example.custom"].into_iter().enumerate() {
                let event = format!(
                    r#"{{"type":"{event_type}","event_id":"$deep-{i}-{j}","room_id":"!ops:example.org","sender":"@alice:example.org","origin_server_ts":1,"content":{{"msgtype":"m.text","body":"stop","x":{nested}}}}}"#
                );
                let (status, _) = f.put_txn(&format!("deep-{i}-{j}"), format!(r#"{{"events":[{event}]}}"#)).await;
                assert!(status == StatusCode::OK || status.is_client_error(), "{status}");
                f.assert_still_serving().await;
            }
        }
        // NB: the worker reads a queued event with ruma, which deserializes through serde_json;
        // its recursion limit (128) turns the nesting into an error before it can exhaust the
        // stack. Reading with ruma must return, whatever it returns.
        let deep_jobs: Vec<_> = f
            .store
            .pending_jobs(100)
            .unwrap()
            .into_iter()
            .filter(|j| j.event_id.as_str().starts_with("$deep-"))
            .collect();
        for job in deep_jobs {
            let error = serde_json::from_str::<Value>(&job.event).unwrap_err();
            assert!(error.to_string().contains("recursion limit exceeded"), "{error}");
            let read = Raw::<AnyTimelineEvent>::from_json_string(job.event).and_then(|raw| raw.deserialize());
            if let Ok(event) = read {
                assert_eq!(event.event_id().as_str(), job.event_id);
            }
        }
    });
}

#[tokio::test]
async fn invalid_transaction_ids_are_400_invalid_param() {
    let f = fixture();
    let long = "a".repeat(300);
    for txn_id in [long.as_str(), "%00", "a%00b", "%0A", "t%1Fx", "%7F", "%C2%85"] {
        let (status, v) = f.put_txn(txn_id, r#"{"events":[]}"#).await;
        assert_eq!((status, v["errcode"].as_str()), (StatusCode::BAD_REQUEST, Some("M_INVALID_PARAM")), "{txn_id}");
        f.assert_still_serving().await;
    }
}

#[tokio::test]
async fn a_transaction_id_that_is_not_utf8_is_400() {
    let f = fixture();
    let (status, _) = f.put_txn("%FF%FE", r#"{"events":[]}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    f.assert_still_serving().await;
}

#[tokio::test]
async fn an_empty_transaction_id_is_404_unrecognized() {
    let f = fixture();
    for uri in ["/_matrix/app/v1/transactions/", "/_matrix/app/v1/transactions", "/transactions/"] {
        let (status, v) = f.call("PUT", uri, r#"{"events":[]}"#).await;
        assert_eq!((status, v["errcode"].as_str()), (StatusCode::NOT_FOUND, Some("M_UNRECOGNIZED")), "{uri}");
        f.assert_still_serving().await;
    }
}

#[tokio::test]
async fn a_transaction_id_of_255_bytes_and_odd_but_printable_ids_are_accepted() {
    let f = fixture();
    let longest = "a".repeat(255);
    for txn_id in [longest.as_str(), "a%2Fb", "sp%20ace", "%E2%80%AEbidi", "%F0%9F%98%80", "%25"] {
        let (status, v) = f.put_txn(txn_id, r#"{"events":[]}"#).await;
        assert_eq!((status, v), (StatusCode::OK, json!({})), "{txn_id}");
    }
    f.assert_still_serving().await;
}

#[tokio::test]
async fn ten_thousand_events_in_one_transaction_are_queued_in_order() {
    let f = fixture();
    let ids: Vec<String> = (0..10_000).map(|i| format!("$many-{i:05}")).collect();
    let events: Vec<Value> = ids.iter().map(|id| message(id, "status")).collect();
    let body = serde_json::to_vec(&json!({ "events": events })).unwrap();
    assert!(body.len() < MAX_BODY_BYTES);
    let (status, v) = f.put_txn("many", body).await;
    assert_eq!((status, v), (StatusCode::OK, json!({})));
    assert_eq!(f.queued_ids(), ids);
    f.assert_still_serving().await;
}

#[tokio::test]
async fn bidi_and_zero_width_characters_in_a_command_are_accepted_and_queued_intact() {
    let f = fixture();
    let sneaky = "\u{202E}!toggle\u{200B} st\u{200D}op\u{2066} web\u{2069}\u{FEFF}";
    let body = json!({ "events": [message("$sneaky", sneaky)] }).to_string();
    let (status, v) = f.put_txn("sneaky", body).await;
    assert_eq!((status, v), (StatusCode::OK, json!({})));
    let job = f.store.pending_jobs(10).unwrap().into_iter().find(|j| j.event_id == "$sneaky").unwrap();
    let event: Value = serde_json::from_str(&job.event).unwrap();
    assert_eq!(event["content"]["body"], sneaky);
    f.assert_still_serving().await;
}

#[tokio::test]
async fn nul_and_lone_surrogate_escapes_are_kept_verbatim_or_the_event_is_skipped() {
    let f = fixture();
    let nul = r#"{"events":[{"type":"m.room.message","event_id":"$nul\u0000id","room_id":"!ops:example.org","content":{"body":"st\u0000op"}}]}"#;
    let (status, _) = f.put_txn("escape-nul", nul).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(f.queued_from_bad_input(), ["$nul\0id"]);
    f.assert_still_serving().await;

    // NB: `Raw` keeps the escape as written; reading the body as a string later fails, and the
    // worker skips events it cannot read.
    let surrogate = r#"{"events":[{"type":"m.room.message","event_id":"$surrogate","room_id":"!ops:example.org","content":{"body":"\ud800"}}]}"#;
    let (status, _) = f.put_txn("escape-surrogate", surrogate).await;
    assert_eq!(status, StatusCode::OK);
    let job = f.store.pending_jobs(10).unwrap().into_iter().find(|j| j.event_id == "$surrogate").unwrap();
    assert!(job.event.contains(r"\ud800"), "{}", job.event);
    f.assert_still_serving().await;

    let surrogate_id = r#"{"events":[{"type":"m.room.message","event_id":"$\udfff","room_id":"!ops:example.org","content":{"body":"stop"}}]}"#;
    let (status, _) = f.put_txn("escape-surrogate-id", surrogate_id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(f.queued_from_bad_input(), ["$nul\0id", "$surrogate"]);
    f.assert_still_serving().await;
}
