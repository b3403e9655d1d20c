//! The HTTP surface without a socket: our axum app over a fresh state database, called with
//! `oneshot` as Synapse would call it.

use std::sync::{Arc, atomic::AtomicBool};

use axum::{
    body::Body,
    http::{Request, StatusCode},
};
use http_body_util::BodyExt;
use matrix_k8s_toggle::{
    appservice::{AppState, NoSink, TransactionSink, app},
    metrics::Metrics,
    secret::Secret,
    store::Store,
};
use serde_json::Value;
use tokio::sync::Notify;
use tower::ServiceExt;

/// The hs_token the app expects.
pub const TOKEN: &str = "hs-token-for-tests-0123456789";

/// The app, its state and its state database.
pub struct Oneshot {
    /// The app's state (clone it into `app`).
    pub state: AppState,
    /// The state database the app queues into.
    pub store: Arc<Store>,
    _dir: tempfile::TempDir,
}

impl Oneshot {
    /// An app without encryption, whose homeserver has not answered a ping.
    pub fn new() -> Self {
        Self::with(Arc::new(NoSink), false, |s| s)
    }

    /// An app with `sink` for to-device data, `homeserver_reachable` as the ping's outcome, and
    /// its state changed by `configure`.
    pub fn with(
        sink: Arc<dyn TransactionSink>,
        homeserver_reachable: bool,
        configure: impl FnOnce(AppState) -> AppState,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let state = AppState::new(
            Secret::new(TOKEN),
            store.clone(),
            Arc::new(Metrics::new()),
            sink,
            Arc::new(Notify::new()),
            Arc::new(AtomicBool::new(homeserver_reachable)),
        );
        Oneshot { state: configure(state), store, _dir: dir }
    }

    /// Sends `request` to the app; returns the status and the body's bytes.
    pub async fn send(&self, request: Request<Body>) -> (StatusCode, Vec<u8>) {
        let response = app(self.state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        (status, response.into_body().collect().await.unwrap().to_bytes().to_vec())
    }

    /// `method uri` with the hs_token and a JSON `body`; the answer as JSON (`Null` if it is not).
    pub async fn call(&self, method: &str, uri: &str, body: impl Into<Body>) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(body.into())
            .unwrap();
        let (status, bytes) = self.send(request).await;
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// `GET uri` without a token; the answer as text.
    pub async fn get_text(&self, uri: &str) -> (StatusCode, String) {
        let (status, bytes) = self.send(Request::get(uri).body(Body::empty()).unwrap()).await;
        (status, String::from_utf8(bytes).unwrap())
    }

    /// Pushes the transaction `txn_id` with `body`.
    pub async fn put_txn(&self, txn_id: &str, body: impl Into<Body>) -> (StatusCode, Value) {
        self.call("PUT", &format!("/_matrix/app/v1/transactions/{txn_id}"), body).await
    }

    /// The event ids waiting in the queue, in order.
    pub fn queued_ids(&self) -> Vec<String> {
        self.store.pending_jobs(100_000).unwrap().into_iter().map(|j| j.event_id.to_string()).collect()
    }
}
