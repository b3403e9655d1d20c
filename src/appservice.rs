//! The appservice HTTP surface Synapse pushes to: `PUT /_matrix/app/v1/transactions/{txnId}`,
//! ping, user and alias queries, and the health, readiness and metrics endpoints.
//!
//! A transaction is a recipe: check the hs_token (constant time) → answer a processed txnId
//! with `200 {}` → parse → hand its end-to-end encryption data to the sink → queue its room
//! events durably → answer `200 {}`. Slow work happens in the worker, never here.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::DefaultBodyLimit,
    extract::{Path, Query, Request, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use ruma::{
    OwnedEventId, OwnedRoomId, OwnedUserId,
    api::{IncomingRequest, appservice::event::push_events},
};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{Mutex, Notify};
use tower_http::trace::TraceLayer;

use crate::{
    clock::{Clock, SharedClock, SystemClock},
    metrics::{Metrics, ResultLabel},
    secret::Secret,
    store::{QueuedEvent, Store, TransactionSeen},
};

/// Largest transaction body accepted: 100 events of 64 KiB plus as many to-device events.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Longest transaction id accepted.
const MAX_TXN_ID_LEN: usize = 255;

/// A parsed transaction, as ruma reads it.
pub type Transaction = push_events::v1::Request;

/// Receives the end-to-end encryption part of each new transaction before it is answered.
/// It must not fail the transaction: the homeserver drops to-device data when retrying.
pub trait TransactionSink: Send + Sync {
    /// Takes in a transaction's to-device events, device lists and key counts.
    fn ingest<'a>(&'a self, txn: &'a Transaction) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

    /// Whether encryption is up (readiness); a sink without encryption always is.
    fn is_ready(&self) -> bool {
        true
    }
}

/// When `/readyz` stops saying ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadinessBounds {
    /// How long after start encryption may still be setting up.
    pub encryption_grace: Duration,
    /// How long the oldest queued job may wait before the bridge counts as stuck.
    pub max_job_age: Duration,
}

impl Default for ReadinessBounds {
    fn default() -> Self {
        Self { encryption_grace: Duration::from_secs(60), max_job_age: Duration::from_secs(5 * 60) }
    }
}

/// A sink that ignores everything (no encryption).
#[derive(Debug, Default)]
pub struct NoSink;

impl TransactionSink for NoSink {
    fn ingest<'a>(&'a self, _: &'a Transaction) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async {})
    }
}

/// Shared state of the HTTP server.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    hs_token: Secret,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    sink: Arc<dyn TransactionSink>,
    work: Arc<Notify>,
    homeserver_reachable: Arc<AtomicBool>,
    serial: Mutex<()>,
    own_sender: std::sync::OnceLock<OwnedUserId>,
    told_reuse: AtomicBool,
    clock: SharedClock,
    started_ms: i64,
    bounds: ReadinessBounds,
}

impl AppState {
    /// State for the server: token to expect, durable store, metrics, the E2EE sink, and the
    /// notifier that wakes the worker when events are queued.
    pub fn new(
        hs_token: Secret,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        sink: Arc<dyn TransactionSink>,
        work: Arc<Notify>,
        homeserver_reachable: Arc<AtomicBool>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                hs_token,
                store,
                metrics,
                sink,
                work,
                homeserver_reachable,
                serial: Mutex::new(()),
                own_sender: std::sync::OnceLock::new(),
                told_reuse: AtomicBool::new(false),
                started_ms: SystemClock.now_ms(),
                clock: Arc::new(SystemClock),
                bounds: ReadinessBounds::default(),
            }),
        }
    }

    fn inner_mut(&mut self) -> &mut Inner {
        Arc::get_mut(&mut self.inner).expect("set before the state is shared")
    }

    /// Uses `clock` for arrival times and readiness (tests move it by hand); the start time
    /// is read from it now.
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        let inner = self.inner_mut();
        inner.started_ms = clock.now_ms();
        inner.clock = clock;
        self
    }

    /// Uses these readiness bounds instead of the defaults.
    pub fn with_readiness(mut self, bounds: ReadinessBounds) -> Self {
        self.inner_mut().bounds = bounds;
        self
    }

    /// Leaves events sent by `user` (the bot itself) out of the work queue: Synapse sends the
    /// bot's own messages back to it, and there is nothing to do for them.
    pub fn ignoring_events_from(self, user: OwnedUserId) -> Self {
        let _ = self.inner.own_sender.set(user);
        self
    }
}

/// A Matrix error response: status, `errcode`, `error`.
#[derive(Debug)]
pub struct MatrixErrorResponse {
    status: StatusCode,
    errcode: &'static str,
    message: String,
}

impl MatrixErrorResponse {
    fn new(status: StatusCode, errcode: &'static str, message: impl Into<String>) -> Self {
        Self { status, errcode, message: message.into() }
    }
}

impl IntoResponse for MatrixErrorResponse {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, errcode = self.errcode, message = %self.message, "request failed");
        } else {
            tracing::debug!(status = %self.status, errcode = self.errcode, message = %self.message, "request refused");
        }
        (self.status, Json(json!({ "errcode": self.errcode, "error": self.message }))).into_response()
    }
}

/// The router: appservice API (token-checked), health, readiness, metrics, and the fallbacks.
pub fn app(state: AppState) -> Router {
    let appservice = Router::new()
        .route("/_matrix/app/v1/transactions/{txn_id}", put(put_transaction))
        .route("/transactions/{txn_id}", put(put_transaction))
        .route("/_matrix/app/v1/ping", post(ping))
        .route("/_matrix/app/v1/users/{user_id}", get(not_found))
        .route("/_matrix/app/v1/rooms/{alias}", get(not_found))
        .route("/users/{user_id}", get(not_found))
        .route("/rooms/{alias}", get(not_found))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_hs_token));
    Router::new()
        .merge(appservice)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(unrecognized)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // NB: the span names the path, never the query: the hs_token may come as `access_token`.
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            tracing::debug_span!("request", method = %request.method(), path = %request.uri().path())
        }))
        .with_state(state)
}

#[derive(Deserialize)]
struct TokenQuery {
    access_token: Option<String>,
}

async fn require_hs_token(
    State(state): State<AppState>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").map(str::trim))
        // NB: an empty `Bearer ` header beside the query parameter: the parameter decides.
        .filter(|t| !t.is_empty());
    let token = match (bearer, query.access_token.as_deref()) {
        (None, None) => {
            return MatrixErrorResponse::new(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "missing hs_token")
                .into_response();
        }
        (Some(a), Some(b)) if a != b => {
            return MatrixErrorResponse::new(
                StatusCode::FORBIDDEN,
                "M_FORBIDDEN",
                "Authorization header and access_token parameter differ",
            )
            .into_response();
        }
        (Some(t), _) | (None, Some(t)) => t,
    };
    if !state.inner.hs_token.matches(token) {
        state.inner.metrics.error("bad_hs_token");
        return MatrixErrorResponse::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", "wrong hs_token").into_response();
    }
    next.run(request).await
}

#[tracing::instrument(skip_all, fields(txn_id = %txn_id))]
async fn put_transaction(
    State(state): State<AppState>,
    Path(txn_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, MatrixErrorResponse> {
    let started = Instant::now();
    let inner = &state.inner;
    let result = handle_transaction(inner, &txn_id, body).await;
    inner.metrics.transaction_seconds.observe(started.elapsed().as_secs_f64());
    let label = match &result {
        Ok(true) => "ok",
        Ok(false) => "replayed",
        Err(_) => "rejected",
    };
    inner.metrics.transactions.get_or_create(&ResultLabel { result: label }).inc();
    result.map(|_| Json(json!({})))
}

/// Returns whether the transaction was new.
async fn handle_transaction(
    inner: &Inner,
    txn_id: &str,
    body: Result<Bytes, BytesRejection>,
) -> Result<bool, MatrixErrorResponse> {
    if txn_id.is_empty() || txn_id.len() > MAX_TXN_ID_LEN || txn_id.chars().any(char::is_control) {
        return Err(MatrixErrorResponse::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", "invalid transaction id"));
    }
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            MatrixErrorResponse::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "M_TOO_LARGE",
                format!("transaction larger than {MAX_BODY_BYTES} bytes"),
            )
        } else {
            MatrixErrorResponse::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", rejection.body_text())
        }
    })?;
    let _serial = inner.serial.lock().await;
    let body_hash = body_hash(&body);
    match store_call(inner, |s| s.transaction_seen(txn_id, &body_hash))? {
        TransactionSeen::New => {}
        TransactionSeen::Retry => {
            tracing::debug!("transaction already processed");
            return Ok(false);
        }
        TransactionSeen::Reused => {
            inner.metrics.transactions_id_reused.inc();
            if !inner.told_reuse.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    "the homeserver reused a transaction id with new content (Synapse on SQLite does after a restart); processing it as new, and counting further ones in transactions_id_reused_total"
                );
            } else {
                tracing::debug!("transaction id reused with new content; processing it as new");
            }
        }
    }
    let txn = parse_transaction(txn_id, &body)?;
    for event in &txn.events {
        inner.metrics.event(event.get_field::<&str>("type").ok().flatten().unwrap_or_default());
    }
    inner.sink.ingest(&txn).await;
    let queued: Vec<QueuedEvent> = txn
        .events
        .iter()
        .filter(|e| {
            let own = inner.own_sender.get().map(|u| u.as_str());
            own.is_none() || e.get_field::<&str>("sender").ok().flatten() != own
        })
        .filter_map(|e| {
            // NB: an event without valid ids can be neither deduplicated nor ordered in its room:
            // refused here, where it is read, not skipped later.
            let ids = (e.get_field::<OwnedEventId>("event_id"), e.get_field::<OwnedRoomId>("room_id"));
            let (Ok(Some(event_id)), Ok(Some(room_id))) = ids else {
                inner.metrics.error("bad_event");
                tracing::warn!("refusing an event without a valid event id and room id");
                return None;
            };
            Some(QueuedEvent { event_id, room_id, json: e.json().get().to_owned() })
        })
        .collect();
    let now_ms = inner.clock.now_ms();
    let added = store_call(inner, |s| s.record_transaction(txn_id, &body_hash, &queued, now_ms))?;
    tracing::debug!(events = txn.events.len(), queued = added, to_device = txn.to_device.len(), "transaction accepted");
    if added > 0 {
        inner.work.notify_one();
    }
    Ok(true)
}

/// The SHA-256 of a transaction body, hex: what tells a retry from a reused id.
fn body_hash(body: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(body);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn store_call<T>(
    inner: &Inner,
    f: impl FnOnce(&Store) -> Result<T, crate::store::StoreError>,
) -> Result<T, MatrixErrorResponse> {
    f(&inner.store).map_err(|e| {
        inner.metrics.error("state_store");
        MatrixErrorResponse::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", e.to_string())
    })
}

/// Parses a transaction body with ruma's push_events type.
pub fn parse_transaction(txn_id: &str, body: &[u8]) -> Result<Transaction, MatrixErrorResponse> {
    if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
        return Err(MatrixErrorResponse::new(StatusCode::BAD_REQUEST, "M_NOT_JSON", "body is not JSON"));
    }
    // NB: serde would also read a JSON array as the struct's fields in order.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(MatrixErrorResponse::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", "the body must be a JSON object"));
    }
    let request = http::Request::builder()
        .method(http::Method::PUT)
        .uri(format!("/_matrix/app/v1/transactions/{}", urlencode(txn_id)))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(|e| MatrixErrorResponse::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", e.to_string()))?;
    push_events::v1::Request::try_from_http_request(request, &[txn_id])
        .map_err(|e| MatrixErrorResponse::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", format!("not a transaction: {e}")))
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn ping(State(state): State<AppState>, body: Bytes) -> Json<serde_json::Value> {
    let txn = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("transaction_id").and_then(|t| t.as_str()).map(str::to_owned));
    tracing::info!(transaction_id = ?txn, "homeserver pinged us");
    state.inner.homeserver_reachable.store(true, Ordering::Relaxed);
    Json(json!({}))
}

async fn not_found() -> MatrixErrorResponse {
    MatrixErrorResponse::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", "this bridge has no such user or room")
}

async fn unrecognized() -> MatrixErrorResponse {
    MatrixErrorResponse::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "unrecognized request")
}

async fn method_not_allowed() -> MatrixErrorResponse {
    MatrixErrorResponse::new(StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED", "method not allowed")
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when the state database answers, the homeserver is reachable, encryption is up (or
/// still within its start-up grace) and the oldest queued job is not older than the bound.
async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    let inner = &state.inner;
    let now_ms = inner.clock.now_ms();
    let store = inner.store.queue_stats();
    let homeserver = inner.homeserver_reachable.load(Ordering::Relaxed);
    let encryption = if inner.sink.is_ready() {
        Check::Ok
    } else if now_ms - inner.started_ms <= inner.bounds.encryption_grace.as_millis() as i64 {
        Check::Starting
    } else {
        Check::Failing("not set up; see the log")
    };
    let queue = match &store {
        Ok(stats) => {
            let age_ms = stats.oldest_received_ms.map_or(0, |t| (now_ms - t).max(0));
            if age_ms > inner.bounds.max_job_age.as_millis() as i64 {
                Check::Stuck { depth: stats.depth, age: Duration::from_millis(age_ms as u64) }
            } else {
                Check::Ok
            }
        }
        Err(_) => Check::Failing("unavailable"),
    };
    let checks = [
        ("state_store", if store.is_ok() { Check::Ok } else { Check::Failing("unavailable") }),
        ("homeserver", if homeserver { Check::Ok } else { Check::Failing("unavailable") }),
        ("encryption", encryption),
        ("queue", queue),
    ];
    let ready = checks.iter().all(|(_, c)| !matches!(c, Check::Failing(_) | Check::Stuck { .. }));
    let text: String = checks.iter().map(|(name, check)| format!("{name}: {check}\n")).collect();
    (if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, text)
}

/// One line of `/readyz`.
enum Check {
    Ok,
    Starting,
    Failing(&'static str),
    Stuck { depth: usize, age: Duration },
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Check::Ok => f.write_str("ok"),
            Check::Starting => f.write_str("starting"),
            Check::Failing(why) => f.write_str(why),
            Check::Stuck { depth, age } => {
                write!(f, "stuck: {depth} waiting, the oldest for {} s", age.as_secs())
            }
        }
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let inner = &state.inner;
    if let Ok(stats) = inner.store.queue_stats() {
        let age_ms = stats.oldest_received_ms.map_or(0, |t| (inner.clock.now_ms() - t).max(0));
        inner.metrics.queue_depth.set(stats.depth as i64);
        inner.metrics.queue_oldest_job_age_seconds.set(age_ms as f64 / 1000.0);
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], inner.metrics.render())
}
