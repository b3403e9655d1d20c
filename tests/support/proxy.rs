//! A pass-through between Synapse and our server (either way round) that can hold back
//! to-device events, so a test can make a room key arrive in a later transaction than the
//! message it unlocks; refuse paths; and record requests.

use std::sync::{Arc, Mutex};

use axum::{
    Router,
    body::Bytes,
    extract::{Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

const TO_DEVICE: &str = "de.sorunome.msc2409.to_device";

#[derive(Default)]
struct Inner {
    target: String,
    hold_from: Mutex<Vec<String>>,
    held: Mutex<Vec<Value>>,
    released: Mutex<u32>,
    refuse: Mutex<Vec<(String, u16)>>,
    record: Mutex<Vec<String>>,
    recorded: Mutex<Vec<(String, String)>>,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1:`port` and forwards everything to `target` (http://host:port).
    pub async fn start(port: u16, target: &str) -> Proxy {
        let inner = Arc::new(Inner { target: target.into(), ..Default::default() });
        let app = Router::new().fallback(forward).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Proxy { inner, task }
    }

    /// Holds back to-device events sent by `sender` from now on.
    pub fn hold_to_device_from(&self, sender: &str) {
        self.inner.hold_from.lock().unwrap().push(sender.into());
    }

    /// Answers every request whose path contains `fragment` with `status` (M_UNKNOWN) instead
    /// of forwarding it.
    pub fn refuse_paths_containing(&self, fragment: &str, status: u16) {
        self.inner.refuse.lock().unwrap().push((fragment.into(), status));
    }

    /// Keeps (path, body) of every request whose path contains `fragment`.
    pub fn record_paths_containing(&self, fragment: &str) {
        self.inner.record.lock().unwrap().push(fragment.into());
    }

    /// The requests recorded so far, forgetting them.
    pub fn take_recorded(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.inner.recorded.lock().unwrap())
    }

    /// How many to-device events are held.
    pub fn held(&self) -> usize {
        self.inner.held.lock().unwrap().len()
    }

    /// Stops holding and delivers the held events in a transaction of their own.
    pub async fn release(&self, hs_token: &str) {
        self.inner.hold_from.lock().unwrap().clear();
        let held: Vec<Value> = std::mem::take(&mut *self.inner.held.lock().unwrap());
        let n = {
            let mut r = self.inner.released.lock().unwrap();
            *r += 1;
            *r
        };
        let resp = reqwest::Client::new()
            .put(format!("{}/_matrix/app/v1/transactions/held-{n}", self.inner.target))
            .bearer_auth(hs_token)
            .json(&json!({ "events": [], TO_DEVICE: held }))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "releasing held events: {}", resp.status());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let refused = inner.refuse.lock().unwrap().iter().find(|(f, _)| parts.uri.path().contains(f.as_str())).cloned();
    if let Some((_, status)) = refused {
        let body = json!({"errcode": "M_UNKNOWN", "error": "refused by the test proxy"}).to_string();
        return (StatusCode::from_u16(status).unwrap(), body).into_response();
    }
    let bytes: Bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let mut body = bytes.to_vec();
    if inner.record.lock().unwrap().iter().any(|f| parts.uri.path().contains(f.as_str())) {
        inner.recorded.lock().unwrap().push((parts.uri.path().to_owned(), String::from_utf8_lossy(&body).into_owned()));
    }
    let hold_from = inner.hold_from.lock().unwrap().clone();
    if !hold_from.is_empty()
        && parts.uri.path().contains("/transactions/")
        && let Ok(mut txn) = serde_json::from_slice::<Value>(&body)
        && let Some(list) = txn.get_mut(TO_DEVICE).and_then(Value::as_array_mut)
    {
        let (held, kept): (Vec<Value>, Vec<Value>) =
            list.drain(..).partition(|e| hold_from.iter().any(|s| e["sender"] == s.as_str()));
        inner.held.lock().unwrap().extend(held);
        *list = kept;
        body = serde_json::to_vec(&txn).unwrap();
    }
    let url = format!("{}{}", inner.target, parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let mut req = reqwest::Client::new().request(parts.method.clone(), url).body(body);
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            req = req.header(name, value);
        }
    }
    match req.send().await {
        Ok(resp) => {
            let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
            (status, resp.bytes().await.unwrap_or_default()).into_response()
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}
