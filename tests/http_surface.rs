//! The HTTP surface without a socket: routes, auth, errors and limits (`app().oneshot`).

mod support;

use support::oneshot::{Oneshot, TOKEN};

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    body::Body,
    http::{Request, StatusCode},
};
use matrix_k8s_toggle::{
    appservice::{MAX_BODY_BYTES, ReadinessBounds, Transaction, TransactionSink},
    clock::ManualClock,
};
use serde_json::Value;

/// A sink that counts the transactions it takes in and says whether encryption is up.
#[derive(Default)]
struct CountingSink {
    ingested: AtomicUsize,
    ready: AtomicBool,
}

impl TransactionSink for CountingSink {
    fn ingest<'a>(&'a self, _: &'a Transaction) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        self.ingested.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {})
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

fn message(id: &str) -> Value {
    serde_json::json!({"type":"m.room.message","event_id":id,"room_id":"!r:x","sender":"@a:x","origin_server_ts":1,"content":{}})
}

#[tokio::test]
async fn an_unknown_path_is_404_unrecognized() {
    let (status, v) = Oneshot::new().call("GET", "/_matrix/app/v1/nothing", "").await;
    assert_eq!((status, v["errcode"].as_str()), (StatusCode::NOT_FOUND, Some("M_UNRECOGNIZED")));
}

#[tokio::test]
async fn a_wrong_method_is_405_unrecognized() {
    let (status, v) = Oneshot::new().call("GET", "/_matrix/app/v1/transactions/t1", "").await;
    assert_eq!((status, v["errcode"].as_str()), (StatusCode::METHOD_NOT_ALLOWED, Some("M_UNRECOGNIZED")));
}

#[tokio::test]
async fn user_and_alias_queries_are_404_not_found() {
    let f = Oneshot::new();
    for uri in ["/_matrix/app/v1/users/@x:y", "/_matrix/app/v1/rooms/%23a:y", "/users/@x:y", "/rooms/%23a:y"] {
        let (status, v) = f.call("GET", uri, "").await;
        assert_eq!((status, v["errcode"].as_str()), (StatusCode::NOT_FOUND, Some("M_NOT_FOUND")), "{uri}");
    }
}

#[tokio::test]
async fn ping_answers_an_empty_object() {
    let (status, v) = Oneshot::new().call("POST", "/_matrix/app/v1/ping", r#"{"transaction_id":"p1"}"#).await;
    assert_eq!((status, v), (StatusCode::OK, serde_json::json!({})));
}

#[tokio::test]
async fn a_body_of_100_events_of_64_kib_is_accepted() {
    let f = Oneshot::new();
    let body_text = "x".repeat(64 * 1024 - 300);
    let events: Vec<Value> = (0..100)
        .map(|i| {
            serde_json::json!({"type":"m.room.message","event_id":format!("$e{i}"),"room_id":"!r:x","sender":"@a:x",
            "origin_server_ts":1,"content":{"msgtype":"m.text","body":body_text}})
        })
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({ "events": events })).unwrap();
    assert!(body.len() > 6 * 1024 * 1024);
    let (status, _) = f.call("PUT", "/_matrix/app/v1/transactions/big", body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(f.store.pending_jobs(1000).unwrap().len(), 100);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let body = vec![b' '; MAX_BODY_BYTES + 1];
    let (status, v) = Oneshot::new().call("PUT", "/_matrix/app/v1/transactions/huge", body).await;
    assert_eq!((status, v["errcode"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("M_TOO_LARGE")));
}

#[tokio::test]
async fn a_too_long_transaction_id_is_refused() {
    let uri = format!("/_matrix/app/v1/transactions/{}", "a".repeat(300));
    let (status, _) = Oneshot::new().call("PUT", &uri, r#"{"events":[]}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn events_of_a_transaction_are_queued_in_order() {
    let f = Oneshot::new();
    let ev = |id: &str| serde_json::json!({"type":"m.room.message","event_id":id,"room_id":"!r:x","sender":"@a:x","origin_server_ts":1,"content":{}});
    let body = serde_json::json!({ "events": [ev("$1"), ev("$2"), ev("$3")] }).to_string();
    let (status, _) = f.call("PUT", "/_matrix/app/v1/transactions/o", body).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<String> = f.store.pending_jobs(10).unwrap().into_iter().map(|j| j.event_id.to_string()).collect();
    assert_eq!(ids, ["$1", "$2", "$3"]);
}

#[tokio::test]
async fn the_bots_own_events_are_answered_but_not_queued() {
    let mut f = Oneshot::new();
    f.state = f.state.ignoring_events_from(ruma::OwnedUserId::try_from("@toggle:x").unwrap());
    let ev = |id: &str, sender: &str| serde_json::json!({"type":"m.room.message","event_id":id,"room_id":"!r:x","sender":sender,"origin_server_ts":1,"content":{}});
    let body = serde_json::json!({ "events": [ev("$1", "@a:x"), ev("$2", "@toggle:x"), ev("$3", "@toggle:xy")] });
    let (status, _) = f.call("PUT", "/_matrix/app/v1/transactions/own", body.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<String> = f.store.pending_jobs(10).unwrap().into_iter().map(|j| j.event_id.to_string()).collect();
    assert_eq!(ids, ["$1", "$3"]);
}

#[tokio::test]
async fn readiness_reports_an_unreachable_homeserver() {
    let f = Oneshot::new();
    let (status, text) = f.get_text("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(text.contains("homeserver: unavailable"), "{text}");
}

#[tokio::test]
async fn metrics_need_no_token_and_count_transactions() {
    let f = Oneshot::new();
    f.call("PUT", "/_matrix/app/v1/transactions/m1", r#"{"events":[]}"#).await;
    let (status, text) = f.get_text("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains("matrix_k8s_toggle_transactions_total{result=\"ok\"} 1"), "{text}");
}

#[tokio::test]
async fn the_same_transaction_id_and_body_again_is_a_retry_but_another_body_is_processed_as_new() {
    let sink = Arc::new(CountingSink::default());
    let f = Oneshot::with(sink.clone(), true, |s| s);
    let first = serde_json::json!({ "events": [message("$before-restart")] }).to_string();
    let after = serde_json::json!({ "events": [message("$after-restart")] }).to_string();

    assert_eq!(f.call("PUT", "/_matrix/app/v1/transactions/1", first.clone()).await.0, StatusCode::OK);
    assert_eq!(f.call("PUT", "/_matrix/app/v1/transactions/1", first).await.0, StatusCode::OK);
    assert_eq!(sink.ingested.load(Ordering::SeqCst), 1, "a retry is not taken in again");

    assert_eq!(f.call("PUT", "/_matrix/app/v1/transactions/1", after).await.0, StatusCode::OK);
    assert_eq!(sink.ingested.load(Ordering::SeqCst), 2, "a reused id with new content is taken in");
    let ids: Vec<String> = f.store.pending_jobs(10).unwrap().into_iter().map(|j| j.event_id.to_string()).collect();
    assert_eq!(ids, ["$before-restart", "$after-restart"]);
    let (_, metrics) = f.get_text("/metrics").await;
    assert!(metrics.contains("matrix_k8s_toggle_transactions_id_reused_total 1"), "{metrics}");
}

#[tokio::test]
async fn readiness_waits_for_encryption_through_the_grace_and_then_fails() {
    let sink = Arc::new(CountingSink::default());
    let clock = ManualClock::at(1_000_000);
    let bounds = ReadinessBounds { encryption_grace: Duration::from_secs(60), max_job_age: Duration::from_secs(300) };
    let f = Oneshot::with(sink.clone(), true, |s| s.with_clock(clock.clone()).with_readiness(bounds));

    let (status, text) = f.get_text("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(text.contains("encryption: starting"), "{text}");

    clock.advance_ms(60_001);
    let (status, text) = f.get_text("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("encryption: not set up"), "{text}");

    sink.ready.store(true, Ordering::SeqCst);
    let (status, text) = f.get_text("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (status, _) = f.get_text("/healthz").await;
    assert_eq!(status, StatusCode::OK, "liveness does not depend on encryption");
}

#[tokio::test]
async fn readiness_fails_and_metrics_show_it_while_the_oldest_job_waits_too_long() {
    let sink = Arc::new(CountingSink { ready: AtomicBool::new(true), ..Default::default() });
    let clock = ManualClock::at(1_000_000);
    let bounds = ReadinessBounds { encryption_grace: Duration::from_secs(60), max_job_age: Duration::from_secs(300) };
    let f = Oneshot::with(sink, true, |s| s.with_clock(clock.clone()).with_readiness(bounds));
    let body = serde_json::json!({ "events": [message("$1"), message("$2")] }).to_string();
    f.call("PUT", "/_matrix/app/v1/transactions/q", body).await;

    let (status, text) = f.get_text("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{text}");

    clock.advance_ms(300_001);
    let (status, text) = f.get_text("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("queue: stuck: 2 waiting, the oldest for 300 s"), "{text}");
    let (_, metrics) = f.get_text("/metrics").await;
    assert!(metrics.contains("matrix_k8s_toggle_queue_depth 2"), "{metrics}");
    assert!(metrics.contains("matrix_k8s_toggle_queue_oldest_job_age_seconds 300.001"), "{metrics}");

    for job in f.store.pending_jobs(10).unwrap() {
        f.store.complete_job(job.seq).unwrap();
    }
    let (status, text) = f.get_text("/readyz").await;
    assert_eq!(status, StatusCode::OK, "an empty queue is ready again: {text}");
}

/// A tracing writer that keeps everything written, for reading the log in a test.
#[derive(Clone, Default)]
struct LogBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_token_in_the_query_is_accepted_beside_an_empty_bearer_and_never_logged() {
    let log = LogBuffer::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let f = Oneshot::new();
    let req = Request::builder()
        .method("PUT")
        .uri(format!("/_matrix/app/v1/transactions/q1?access_token={TOKEN}"))
        .header("authorization", "Bearer ")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"events":[]}"#))
        .unwrap();
    let (status, _) = f.send(req).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("/_matrix/app/v1/transactions/q1"), "the path is logged: {text}");
    assert!(!text.contains(TOKEN), "the token reached the log: {text}");
}
